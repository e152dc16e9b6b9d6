"""Import HF Qwen2 / Qwen2-MoE / released Apollo-MoE checkpoints, and upcycle dense -> Post-MoE.

No torch: safetensors files are read by `safetensors_np` (bfloat16, the dtype of every released
checkpoint, becomes float32 exactly). Params come back as a plain nested dict of float32 numpy
arrays shaped exactly like `build_model(config).init(...)["params"]` (unboxed); `layer_plan(config)`
says which decoder layers are stacked into one scanned block.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from apollo_jax import config as cfg
from apollo_jax import languages
from apollo_jax.model.transformer import abstract_params, build_model, layer_plan
from apollo_jax.safetensors_np import read_safetensors

# architecture -> flavour; model_type is the fallback when a config has no `architectures`.
ARCHITECTURES = {"Qwen2ForCausalLM": "dense", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "UpcyclingQwen2MoeForCausalLM": "upcycling"}
MODEL_TYPES = {"qwen2": "dense", "qwen2_moe": "qwen2_moe", "upcycling_qwen2_moe": "upcycling"}
MODEL_DIMS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
              "num_kv_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_embeddings")


# ----------------------------------------------------------------------------------------- config

def read_hf_config(hf_dir) -> dict:
  path = os.path.join(hf_dir, "config.json") if os.path.isdir(hf_dir) else hf_dir
  with open(path) as f:
    return json.load(f)


def _flavour(hf):
  archs = hf.get("architectures") or []
  for a in archs:
    if a in ARCHITECTURES:
      return ARCHITECTURES[a]
  if not archs and hf.get("model_type") in MODEL_TYPES:
    return MODEL_TYPES[hf["model_type"]]
  raise ValueError(f"unsupported architecture {archs or hf.get('model_type')!r}; supported: "
                   f"{', '.join(ARCHITECTURES)} (model_type {', '.join(MODEL_TYPES)})")


def _layers_spec(idx, num_layers):
  """MoE layer indices -> the moe.layers string ('none' | 'all' | 'last:N' | '3,7')."""
  idx = tuple(idx)
  if not idx:
    return "none"
  if idx == tuple(range(num_layers)):
    return "all"
  if idx == tuple(range(num_layers - len(idx), num_layers)):
    return f"last:{len(idx)}"
  return ",".join(map(str, idx))


def config_from_hf(hf_config, base=None) -> ml_collections.ConfigDict:
  """Our config (model + moe filled) for an HF config dict (or a dir / config.json path)."""
  hf = read_hf_config(hf_config) if isinstance(hf_config, (str, os.PathLike)) else dict(hf_config)
  flavour = _flavour(hf)
  c = ml_collections.ConfigDict(base.to_dict()) if base is not None else cfg.base_config()
  m, e = c.model, c.moe

  def need(cond, msg):
    if not cond:
      raise ValueError(f"unsupported HF config ({hf.get('architectures')}): {msg}")

  need(hf.get("hidden_act", "silu") == "silu", f"hidden_act={hf.get('hidden_act')!r} (only silu)")
  need(not hf.get("use_sliding_window", False), "use_sliding_window=true (no sliding-window attention)")
  need(hf.get("qkv_bias", True), "qkv_bias=false (Qwen2 attention always has q/k/v biases)")
  rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  need(rope_type == "default", f"rope_type={rope_type!r} (only default RoPE)")
  m.vocab_size = int(hf["vocab_size"])
  m.hidden_size = int(hf["hidden_size"])
  m.intermediate_size = int(hf["intermediate_size"])
  m.num_layers = int(hf["num_hidden_layers"])
  m.num_heads = int(hf["num_attention_heads"])
  m.num_kv_heads = int(hf.get("num_key_value_heads") or m.num_heads)
  hd = hf.get("head_dim")
  m.head_dim = 0 if not hd or hd * m.num_heads == m.hidden_size else int(hd)
  m.rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
  m.rms_norm_eps = float(hf.get("rms_norm_eps", 1e-6))
  m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
  m.init_std = float(hf.get("initializer_range", m.init_std))

  if flavour == "dense":
    e.layers = "none"
    return c
  n_exp = int(hf.get("num_experts") or 0)
  step = int(hf.get("decoder_sparse_step", 1) or 1)
  dense_only = set(hf.get("mlp_only_layers") or [])
  idx = [i for i in range(m.num_layers)
         if n_exp > 0 and i not in dense_only and (i + 1) % step == 0]
  e.layers = _layers_spec(idx, m.num_layers)
  if not idx:
    return c
  e.num_experts = n_exp
  e.top_k = int(hf.get("num_experts_per_tok", 2))
  e.norm_topk_prob = bool(hf.get("norm_topk_prob", False))
  moe_i = int(hf.get("moe_intermediate_size") or m.intermediate_size)
  need(moe_i == m.intermediate_size, f"moe_intermediate_size={moe_i} != intermediate_size="
       f"{m.intermediate_size}; our experts are full FFNs of intermediate_size (no fine-grained experts)")
  if flavour == "qwen2_moe":
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    e.shared_expert = shared > 0
    e.routing = "topk"
  else:  # released Apollo-MoE remote code (SPEC §2.4, §3): shared expert only with share_flag
    shared = int(hf.get("shared_expert_intermediate_size") or m.intermediate_size)
    e.shared_expert = bool(hf.get("share_flag", False))
    gate = bool(hf.get("language_gate", False))
    e.routing = ("language" if e.shared_expert and e.top_k == 1 else "hybrid") if gate else "topk"
  if e.shared_expert:
    need(shared == m.intermediate_size, f"shared_expert_intermediate_size={shared} != intermediate_size="
         f"{m.intermediate_size}; our shared expert is a full FFN")
  by_size = {n: name for name, n in languages.NUM_EXPERTS.items()}
  if n_exp in by_size:
    e.expert_map = by_size[n_exp]
  elif e.routing != "topk":
    need(False, f"language routing with num_experts={n_exp}: no expert map of that size "
                f"({languages.NUM_EXPERTS})")
  return c


def apply_overrides(config, overrides):
  """{'moe.expert_multiple': 8, 'model.dtype': 'bfloat16'} -> config (a copy)."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, val in (overrides or {}).items():
    node, parts = c, key.split(".")
    for p in parts[:-1]:
      node = node[p]
    if parts[-1] not in node:
      raise ValueError(f"unknown config field {key!r}")
    node[parts[-1]] = val
  return c


# ------------------------------------------------------------------------------------ safetensors

def load_hf_state(hf_dir) -> dict:
  """All tensors of an HF checkpoint dir (model.safetensors, or sharded with an index json)."""
  single = os.path.join(hf_dir, "model.safetensors")
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(single):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
                            "(pytorch_model.bin is not supported: re-save with safetensors)")
  state = {}
  for name in files:
    state.update(read_safetensors(os.path.join(hf_dir, name)))
  return state


# ---------------------------------------------------------------------------------- param trees



def split_layers(params, config):
  """Params -> (top-level dict without layer blocks, [per-decoder-layer dict] * num_layers)."""
  top = dict(params)
  layers = []
  for blk in layer_plan(config):
    tree = top.pop(blk["name"])
    if blk["stacked"]:
      layers += [jax.tree.map(lambda x, j=j: x[j], tree) for j in range(blk["count"])]
    else:
      layers.append(tree)
  return top, layers


def join_layers(top, layers, config):
  """Inverse of split_layers: stacks every scanned run of dense layers per layer_plan."""
  params = dict(top)
  for blk in layer_plan(config):
    run = layers[blk["start"]:blk["start"] + blk["count"]]
    params[blk["name"]] = (jax.tree.map(lambda *xs: np.stack(xs), *run) if blk["stacked"] else run[0])
  return params


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def finish_tree(params, config, what="params"):
  """Check: every leaf present, nothing extra, every shape as build_model(config) expects."""
  got, want = _flat(params), _flat(abstract_params(config))
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = [f"{k}: got {tuple(np.shape(got[k]))}, model expects {tuple(want[k].shape)}"
         for k in sorted(set(got) & set(want)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
  if missing or extra or bad:
    raise ValueError(f"{what} do not match the model of this config: missing {missing}, "
                     f"unexpected {extra}, wrong shapes {bad}")
  return params


# ------------------------------------------------------------------------------------ HF -> ours

class _State:
  """Pops tensors by HF name so that leftovers can be reported as unexpected."""

  def __init__(self, state):
    self.s = dict(state)
    self.missing = []

  def has(self, key):
    return key in self.s

  def take(self, key):
    if key not in self.s:
      self.missing.append(key)
      return None
    return np.asarray(self.s.pop(key), np.float32)

  def t(self, key):           # torch Linear [out, in] -> Flax kernel [in, out]
    w = self.take(key)
    return None if w is None else w.T


def _swiglu(st, p):
  return {n: {"kernel": st.t(f"{p}{n}.weight")} for n in ("gate_proj", "up_proj", "down_proj")}


def _experts(st, p, n_real, n_pad):
  if st.has(p + "experts.gate_up_proj"):          # transformers-5 fused layout
    gu, down = st.take(p + "experts.gate_up_proj"), st.take(p + "experts.down_proj")
    if gu is None or down is None:
      return None
    i = gu.shape[1] // 2
    g, u, d = gu[:, :i].transpose(0, 2, 1), gu[:, i:].transpose(0, 2, 1), down.transpose(0, 2, 1)
  else:                                           # legacy per-expert keys (what save_pretrained writes)
    w = {n: [st.t(f"{p}experts.{j}.{n}.weight") for j in range(n_real)]
         for n in ("gate_proj", "up_proj", "down_proj")}
    if any(x is None for v in w.values() for x in v):
      return None
    g, u, d = (np.stack(w[n]) for n in ("gate_proj", "up_proj", "down_proj"))
  if g.shape[0] != n_real:
    raise ValueError(f"{p}experts: checkpoint has {g.shape[0]} experts, config says {n_real}")
  pad = lambda x: np.concatenate([x, np.zeros((n_pad - n_real,) + x.shape[1:], np.float32)])
  return {"gate_proj": pad(g), "up_proj": pad(u), "down_proj": pad(d)}


def _layer(st, i, moe, config):
  p = f"model.layers.{i}."
  attn = {n: {"kernel": st.t(f"{p}self_attn.{n}.weight"), "bias": st.take(f"{p}self_attn.{n}.bias")}
          for n in ("q_proj", "k_proj", "v_proj")}
  attn["o_proj"] = {"kernel": st.t(f"{p}self_attn.o_proj.weight")}
  st.s.pop(f"{p}self_attn.rotary_emb.inv_freq", None)     # old checkpoints: a recomputed buffer
  out = {"input_layernorm": {"scale": st.take(p + "input_layernorm.weight")}, "self_attn": attn,
         "post_attention_layernorm": {"scale": st.take(p + "post_attention_layernorm.weight")}}
  if not moe:
    out["mlp"] = _swiglu(st, p + "mlp.")
    return out
  mp = p + "mlp."
  mlp = {"gate": {"kernel": st.t(mp + "gate.weight")},
         "experts": _experts(st, mp, config.moe.num_experts, cfg.padded_num_experts(config))}
  if config.moe.shared_expert:
    mlp["shared_expert"] = _swiglu(st, mp + "shared_expert.")
    mlp["shared_expert_gate"] = {"kernel": st.t(mp + "shared_expert_gate.weight")}
  else:  # Qwen2-MoE with shared_expert_intermediate_size=0 stores empty shared-expert tensors
    shared = [k for k in st.s if k.startswith(mp + "shared_expert.")]
    if all(st.s[k].size == 0 for k in shared):
      for k in shared + [mp + "shared_expert_gate.weight"]:
        st.s.pop(k, None)
  out["mlp"] = mlp
  return out


def params_from_hf(state: dict, config) -> dict:
  """HF tensors -> our param tree (float32 numpy). Errors name missing/unexpected tensors."""
  st = _State(state)
  moe_idx = set(cfg.moe_layer_indices(config.moe.layers, config.model.num_layers))
  layers = [_layer(st, i, i in moe_idx, config) for i in range(config.model.num_layers)]
  emb = st.take("model.embed_tokens.weight")
  top = {"embed_tokens": {"embedding": emb}, "norm": {"scale": st.take("model.norm.weight")}}
  if config.model.tie_embeddings:
    head = st.s.pop("lm_head.weight", None)
    if head is not None and emb is not None and not np.array_equal(np.asarray(head, np.float32), emb):
      raise ValueError("config has tie_word_embeddings=true but lm_head.weight differs from "
                       "model.embed_tokens.weight (max |diff| "
                       f"{np.abs(np.asarray(head, np.float32) - emb).max():.3g}); set "
                       "tie_word_embeddings=false in config.json to keep a separate head")
  else:
    top["lm_head"] = {"kernel": st.t("lm_head.weight")}
  if st.missing:
    raise ValueError(f"checkpoint is missing {len(st.missing)} tensor(s) the config needs: "
                     f"{', '.join(st.missing[:20])}")
  if st.s:
    extra = sorted(st.s)
    raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config "
                     f"(moe.layers={config.moe.layers!r}, shared_expert={config.moe.shared_expert}): "
                     f"{', '.join(extra[:20])}")
  return finish_tree(join_layers(top, layers, config), config, "converted HF params")


def load_pretrained(hf_dir, config_overrides=None):
  """(config, params) for an HF checkpoint dir."""
  config = apply_overrides(config_from_hf(read_hf_config(hf_dir)), config_overrides)
  cfg.validate(config)
  return config, params_from_hf(load_hf_state(hf_dir), config)


def from_pretrained(hf_dir, config_overrides=None):
  """(module, params): `module.apply({'params': params}, input_ids)` gives the HF logits."""
  config, params = load_pretrained(hf_dir, config_overrides)
  return build_model(config), params


# ------------------------------------------------------------------------------------- upcycling

def check_same_model(a, b, what_a="source", what_b="target"):
  """Model dimensions must agree (dtype / remat / scan_layers may differ)."""
  diff = {k: (a.model[k], b.model[k]) for k in MODEL_DIMS if a.model[k] != b.model[k]}
  if diff:
    raise ValueError(f"model dimensions differ, {{field: ({what_a}, {what_b})}}: {diff}")


def upcycle(dense_params, dense_config, moe_config, rng) -> dict:
  """Dense params -> Post-MoE params (SPEC §2.5): experts = copies of the dense FFN, router N(0, std).

  Everything the two models share is copied unchanged; padded experts are zero; a shared expert
  (if configured) is another copy of the FFN with its gate N(0, init_std). Not function-preserving
  (the chosen experts' un-normalised probabilities scale the FFN output), exactly as the original.
  """
  check_same_model(dense_config, moe_config, "dense config", "MoE config")
  top, layers = split_layers(jax.tree.map(np.asarray, dense_params), dense_config)
  src_moe = set(cfg.moe_layer_indices(dense_config.moe.layers, dense_config.model.num_layers))
  dst_moe = set(cfg.moe_layer_indices(moe_config.moe.layers, moe_config.model.num_layers))
  n, n_pad = moe_config.moe.num_experts, cfg.padded_num_experts(moe_config)
  h = moe_config.model.hidden_size
  out = []
  for i, layer in enumerate(layers):
    if i in src_moe:
      if i not in dst_moe:
        raise ValueError(f"layer {i} is MoE in the source config but dense in the target")
      out.append(layer)          # already MoE: copied as is (finish_tree checks the shapes)
      continue
    if i not in dst_moe:
      out.append(layer)
      continue
    ffn = layer["mlp"]
    rng, k_router, k_shared = jax.random.split(rng, 3)

    def experts(w):
      return np.concatenate([np.broadcast_to(w, (n,) + w.shape),
                             np.zeros((n_pad - n,) + w.shape, np.float32)]).astype(np.float32)

    router = np.asarray(jax.random.normal(k_router, (h, n), jnp.float32)) * moe_config.moe.router_init_std
    mlp = {"gate": {"kernel": router},
           "experts": {k: experts(ffn[k]["kernel"]) for k in ("gate_proj", "up_proj", "down_proj")}}
    if moe_config.moe.shared_expert:
      mlp["shared_expert"] = jax.tree.map(np.copy, ffn)
      gate = np.asarray(jax.random.normal(k_shared, (h, 1), jnp.float32)) * moe_config.model.init_std
      mlp["shared_expert_gate"] = {"kernel": gate}
    out.append({**layer, "mlp": mlp})
  return finish_tree(join_layers(top, out, moe_config), moe_config, "upcycled params")


# -------------------------------------------------------------------------------- Orbax params io

def save_params(params, config, out_dir):
  """OUT/params (Orbax StandardCheckpointer) + OUT/model_config.json ({model, moe})."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "params"), jax.tree.map(np.asarray, params), force=True)
  ckptr.wait_until_finished()
  ckptr.close()
  with open(os.path.join(out_dir, "model_config.json"), "w") as f:
    json.dump({"model": config.model.to_dict(), "moe": config.moe.to_dict()}, f, indent=2)


def load_params(out_dir, abstract_target=None):
  """(params, {'model': ..., 'moe': ...}) from save_params' dir; `abstract_target` (a tree of
  jax.ShapeDtypeStruct, optionally with shardings) restores onto devices / a mesh."""
  import orbax.checkpoint as ocp
  out_dir = os.path.abspath(out_dir)
  path = os.path.join(out_dir, "params")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{out_dir}: no Orbax params (expected {path}, written by convert_from_hf)")
  with open(os.path.join(out_dir, "model_config.json")) as f:
    meta = json.load(f)
  ckptr = ocp.StandardCheckpointer()
  params = ckptr.restore(path, abstract_target) if abstract_target is not None else ckptr.restore(path)
  ckptr.close()
  return params, meta


def check_saved_config(meta, config):
  """Raise if params saved with `meta` (load_params) cannot be used by `config`'s model."""
  saved = ml_collections.ConfigDict({"model": meta["model"], "moe": meta["moe"]})
  check_same_model(saved, config, "saved params", "config")
  a = cfg.moe_layer_indices(saved.moe.layers, saved.model.num_layers)
  b = cfg.moe_layer_indices(config.moe.layers, config.model.num_layers)
  keys = ("num_experts", "shared_expert")
  if a != b or any(saved.moe[k] != config.moe[k] for k in keys):
    raise ValueError(f"saved params have MoE layers {a} ({ {k: saved.moe[k] for k in keys} }) but the "
                     f"config wants {b} ({ {k: config.moe[k] for k in keys} }); upcycle with "
                     "convert_from_hf --upcycle --config=... or change config.moe")


def repad_experts(params, config):
  """Pad (zeros) or trim the padded experts of saved params to padded_num_experts(config), e.g.
  params converted for mesh.expert=1 (E=7) used on an expert axis of 8 (E_pad=8)."""
  n, n_pad = config.moe.num_experts, cfg.padded_num_experts(config)
  top, layers = split_layers(jax.tree.map(np.asarray, params), config)
  out = []
  for layer in layers:
    mlp = layer["mlp"]
    if "experts" not in mlp:
      out.append(layer)        # dense layer
      continue
    experts = {}
    for k, w in mlp["experts"].items():
      if np.any(w[n:]):
        raise ValueError(f"experts/{k} has {w.shape[0]} experts with non-zero weights beyond the "
                         f"{n} real ones; config.moe.num_experts={n} does not match these params")
      experts[k] = np.concatenate([w[:n], np.zeros((n_pad - n,) + w.shape[1:], w.dtype)])
    out.append({**layer, "mlp": {**mlp, "experts": experts}})
  return finish_tree(join_layers(top, out, config), config, "re-padded params")
