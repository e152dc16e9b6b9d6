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
from apollo_jax.hf import names as hf_names
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

def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _normalise(state, config) -> dict:
  """The checkpoint in the per-expert layout of hf/names.py: fused expert tensors split per expert
  (exact), RoPE buffers and empty shared-expert placeholders dropped."""
  state = dict(state)
  moe = cfg.moe_layer_indices(config.moe.layers, config.model.num_layers)
  for i in range(config.model.num_layers):
    state.pop(hf_names.rotary_buffer(i), None)
  for i in moe:
    gate_up, down = hf_names.fused_experts(i)
    if gate_up in state and down in state:
      gu, d = state.pop(gate_up), state.pop(down)
      if gu.shape[0] != config.moe.num_experts:
        raise ValueError(f"{gate_up}: checkpoint has {gu.shape[0]} experts, config says "
                         f"{config.moe.num_experts}")
      half = gu.shape[1] // 2
      for j in range(gu.shape[0]):
        p = f"model.layers.{i}.mlp.experts.{j}."
        state.update({p + "gate_proj.weight": gu[j, :half], p + "up_proj.weight": gu[j, half:],
                      p + "down_proj.weight": d[j]})
    empty = hf_names.empty_shared_expert(i, config.model.hidden_size)
    # absent (vLLM's file set) counts as empty, like the zero-size tensors of transformers' set
    if not config.moe.shared_expert and all(np.size(state.get(k, ())) == 0
                                            for k in empty if ".shared_expert." in k):
      for k in empty:
        state.pop(k, None)
  return state


def params_from_hf(state: dict, config) -> dict:
  """HF tensors -> our param tree (float32 numpy). Errors name missing/unexpected tensors."""
  state = _normalise(state, config)
  top, layers, experts, missing = {}, [{} for _ in range(config.model.num_layers)], {}, []
  for name in hf_names.names(config):
    if name.hf not in state:
      missing.append(name.hf)
      continue
    w = np.asarray(state.pop(name.hf), np.float32)
    w = w.T if name.transpose else w
    if name.expert is None:
      _set(top if name.layer is None else layers[name.layer], name.path, w)
    else:
      experts.setdefault((name.layer, name.path), []).append(w)
  if config.model.tie_embeddings and "lm_head.weight" in state:
    head, emb = np.asarray(state.pop("lm_head.weight"), np.float32), top["embed_tokens"]["embedding"]
    if not np.array_equal(head, emb):
      raise ValueError("config has tie_word_embeddings=true but lm_head.weight differs from "
                       f"model.embed_tokens.weight (max |diff| {np.abs(head - emb).max():.3g}); set "
                       "tie_word_embeddings=false in config.json to keep a separate head")
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config needs: "
                     f"{', '.join(missing[:20])}")
  if state:
    extra = sorted(state)
    raise ValueError(f"checkpoint has {len(extra)} unexpected tensor(s) for this config "
                     f"(moe.layers={config.moe.layers!r}, num_experts={config.moe.num_experts}, "
                     f"shared_expert={config.moe.shared_expert}): {', '.join(extra[:20])}")
  n_pad = cfg.padded_num_experts(config)
  for (i, path), ws in experts.items():
    pad = np.zeros((n_pad - len(ws),) + ws[0].shape, np.float32)
    _set(layers[i], path, np.concatenate([np.stack(ws), pad]))
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
