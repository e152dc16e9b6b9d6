"""HF `config.json` <-> our config: which flavour a checkpoint is (dense Qwen2, Qwen2-MoE, the
released Apollo-MoE layout), its dimensions and MoE layers as config fields, user overrides."""

import json
import os

import ml_collections

from apollo_jax import config as cfg
from apollo_jax import languages

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
  else:  # released Apollo-MoE remote code (docs/original.md, Routing): shared expert only with share_flag
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


def check_same_model(a, b, what_a="source", what_b="target"):
  """Model dimensions must agree (dtype / remat / scan_layers may differ)."""
  diff = {k: (a.model[k], b.model[k]) for k in MODEL_DIMS if a.model[k] != b.model[k]}
  if diff:
    raise ValueError(f"model dimensions differ, {{field: ({what_a}, {what_b})}}: {diff}")
