"""The one table of HF tensor names: our param path <-> the Qwen2 / Qwen2-MoE checkpoint name.

hf/load.py imports through it, hf/export.py exports through it, and tests/test_hf_names.py checks
it against the state dict of transformers models built locally. A `Name` addresses one tensor:
`layer` picks a decoder layer's tree (hf/load.split_layers) or the top-level tree (None), `path`
the leaf inside it, `expert` the row of a stacked experts leaf [E_pad, ...] (None elsewhere), and
`transpose` marks Linear kernels (torch stores [out, in], Flax [in, out]).
"""

from typing import NamedTuple

from apollo_jax import config as cfg

SWIGLU = ("gate_proj", "up_proj", "down_proj")


class Name(NamedTuple):
  layer: int | None
  path: tuple
  hf: str
  transpose: bool = False
  expert: int | None = None


def _swiglu(i, path, prefix):
  return [Name(i, path + (n, "kernel"), f"{prefix}{n}.weight", True) for n in SWIGLU]


def layer_names(i, moe, num_experts, shared_expert) -> list:
  """Names of decoder layer i, in checkpoint order; the experts are the real ones only."""
  p = f"model.layers.{i}."
  out = []
  for n in ("q_proj", "k_proj", "v_proj"):
    out += [Name(i, ("self_attn", n, "kernel"), f"{p}self_attn.{n}.weight", True),
            Name(i, ("self_attn", n, "bias"), f"{p}self_attn.{n}.bias")]
  out.append(Name(i, ("self_attn", "o_proj", "kernel"), f"{p}self_attn.o_proj.weight", True))
  if not moe:
    out += _swiglu(i, ("mlp",), p + "mlp.")
  else:
    out.append(Name(i, ("mlp", "gate", "kernel"), p + "mlp.gate.weight", True))
    out += [Name(i, ("mlp", "experts", n), f"{p}mlp.experts.{j}.{n}.weight", True, j)
            for j in range(num_experts) for n in SWIGLU]
    if shared_expert:
      out += _swiglu(i, ("mlp", "shared_expert"), p + "mlp.shared_expert.")
      out.append(Name(i, ("mlp", "shared_expert_gate", "kernel"), p + "mlp.shared_expert_gate.weight", True))
  out += [Name(i, ("input_layernorm", "scale"), p + "input_layernorm.weight"),
          Name(i, ("post_attention_layernorm", "scale"), p + "post_attention_layernorm.weight")]
  return out


def names(config) -> list:
  """Every tensor of `config`'s model, in checkpoint order. A tied head stores no lm_head."""
  m, e = config.model, config.moe
  moe = set(cfg.moe_layer_indices(e.layers, m.num_layers))
  out = [Name(None, ("embed_tokens", "embedding"), "model.embed_tokens.weight")]
  for i in range(m.num_layers):
    out += layer_names(i, i in moe, e.num_experts, e.shared_expert)
  out.append(Name(None, ("norm", "scale"), "model.norm.weight"))
  if not m.tie_embeddings:
    out.append(Name(None, ("lm_head", "kernel"), "lm_head.weight", True))
  return out


def empty_shared_expert(i, hidden) -> dict:
  """{name: shape} of the placeholders Qwen2-MoE stores for a layer without a shared expert
  (shared_expert_intermediate_size=0): transformers builds these modules unconditionally, vLLM
  only the gate (hf/export.py, CLIENTS); an empty matmul plus a zero gate add exactly 0."""
  p = f"model.layers.{i}.mlp."
  return {p + "shared_expert.gate_proj.weight": (0, hidden), p + "shared_expert.up_proj.weight": (0, hidden),
          p + "shared_expert.down_proj.weight": (hidden, 0), p + "shared_expert_gate.weight": (1, hidden)}


def fused_experts(i) -> tuple:
  """(gate_up, down) names of the fused expert tensors transformers >= 5 saves by default:
  gate_up [E, 2I, H] (gate rows first), down [E, H, I]."""
  p = f"model.layers.{i}.mlp.experts."
  return p + "gate_up_proj", p + "down_proj"


def rotary_buffer(i) -> str:
  """A recomputed RoPE buffer old checkpoints store; the model has no parameter for it."""
  return f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
