"""Import HF Qwen2 / Qwen2-MoE / released Apollo-MoE checkpoints (config mapping: hf/config.py).

No torch: safetensors files are read by hf/safetensors.py (bfloat16, the dtype of every released
checkpoint, becomes float32 exactly). Params come back as a plain nested dict of float32 numpy
arrays shaped exactly like `build_model(config).init(...)["params"]` (unboxed); `layer_plan(config)`
says which decoder layers are stacked into one scanned block.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from apollo_jax import config as cfg
from apollo_jax.hf.config import apply_overrides, check_same_model, config_from_hf, read_hf_config
from apollo_jax.model import config as model_config
from apollo_jax.model.transformer import abstract_params, build_model, layer_plan
from apollo_jax.hf.safetensors import read_safetensors

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
  for blk in layer_plan(model_config.from_config(config)):
    tree = top.pop(blk["name"])
    if blk["stacked"]:
      layers += [jax.tree.map(lambda x, j=j: x[j], tree) for j in range(blk["count"])]
    else:
      layers.append(tree)
  return top, layers


def join_layers(top, layers, config):
  """Inverse of split_layers: stacks every scanned run of dense layers per layer_plan."""
  params = dict(top)
  for blk in layer_plan(model_config.from_config(config)):
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
