"""The HF export against vLLM's loading rules, written down as data (vLLM is CUDA-only; it cannot
be installed on the CPU machines that run this suite).

What vLLM's Qwen2 / Qwen2-MoE models build, read from their source (vLLM 0.33): a decoder layer is
sparse when it is not in `mlp_only_layers`, `num_experts > 0` and `(i + 1) % decoder_sparse_step
== 0`; a sparse block always builds `gate` and `shared_expert_gate`, the routed experts, and the
shared expert only when `shared_expert_intermediate_size > 0`; a tied head is the embedding (no
`lm_head` parameter). Its loader accepts a checkpoint when every tensor names a parameter it built
(else "There is no module or parameter named ...") of the same shape, and every parameter is
loaded. `vllm_params` below is that rule; the test grounds it against a transformers model built
here (transformers builds the same, plus the zero-size shared expert), then checks both file sets
of convert_to_hf --client: vllm's is accepted, transformers' is not (the conflict --client exists
for), and transformers loads vllm's with the same logits.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import lm_fixtures as lf  # noqa: E402
from apollo_jax import convert_from_hf  # noqa: E402
from apollo_jax.hf import export as hf_export  # noqa: E402
from apollo_jax.hf import load as hf_load  # noqa: E402

SWIGLU = ("gate_proj", "up_proj", "down_proj")
IDS = np.random.RandomState(1).randint(0, 4096, (2, 11)).astype(np.int32)


def _swiglu(prefix, hidden, inter):
  return {f"{prefix}gate_proj.weight": (inter, hidden), f"{prefix}up_proj.weight": (inter, hidden),
          f"{prefix}down_proj.weight": (hidden, inter)}


def vllm_params(c: dict) -> dict:
  """{checkpoint name: shape} that vLLM's Qwen2ForCausalLM / Qwen2MoeForCausalLM (from config.json
  `c`) builds and must receive, no more, no less."""
  h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
  d = c.get("head_dim") or h // heads
  out = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
  if not c["tie_word_embeddings"]:
    out["lm_head.weight"] = (c["vocab_size"], h)
  moe = c.get("model_type") == "qwen2_moe"
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    for n, rows in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
      out[f"{p}self_attn.{n}.weight"], out[f"{p}self_attn.{n}.bias"] = (rows, h), (rows,)
    out[f"{p}self_attn.o_proj.weight"] = (h, heads * d)
    out[f"{p}input_layernorm.weight"] = out[f"{p}post_attention_layernorm.weight"] = (h,)
    sparse = (moe and i not in (c.get("mlp_only_layers") or []) and c["num_experts"] > 0
              and (i + 1) % c["decoder_sparse_step"] == 0)
    if not sparse:
      out.update(_swiglu(f"{p}mlp.", h, c["intermediate_size"]))
      continue
    out[f"{p}mlp.gate.weight"] = (c["num_experts"], h)
    out[f"{p}mlp.shared_expert_gate.weight"] = (1, h)          # built whatever the shared width
    for j in range(c["num_experts"]):
      out.update(_swiglu(f"{p}mlp.experts.{j}.", h, c["moe_intermediate_size"]))
    if c["shared_expert_intermediate_size"] > 0:
      out.update(_swiglu(f"{p}mlp.shared_expert.", h, c["shared_expert_intermediate_size"]))
  return out


def vllm_accepts(out_dir) -> list:
  """The reasons vLLM's loader would refuse `out_dir` (empty: it loads)."""
  want = vllm_params(json.load(open(os.path.join(out_dir, "config.json"))))
  got = {k: tuple(v.shape) for k, v in hf_load.load_hf_state(out_dir).items()}
  return ([f"no module or parameter named {k}" for k in sorted(set(got) - set(want))] +
          [f"not initialized from checkpoint: {k}" for k in sorted(set(want) - set(got))] +
          [f"shape {got[k]} != {want[k]}: {k}" for k in sorted(set(want) & set(got)) if got[k] != want[k]])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  lm = lf.randomized("hybrid8")
  dirs = {}
  for client in hf_export.CLIENTS:
    dirs[client] = str(tmp_path_factory.mktemp(f"export_{client}"))
    hf_export.export(lm, dirs[client], "float32", client=client)
  return lm, dirs


def _per_expert(shapes):
  """transformers 5 holds the experts fused ([E, 2I, H] gate_up, [E, H, I] down): the per-expert
  names and shapes its checkpoints (and vLLM) use."""
  out = {}
  for k, shape in shapes.items():
    if k.endswith("mlp.experts.gate_up_proj"):
      e, two_i, h = shape
      out.update({f"{k[:-len('gate_up_proj')]}{j}.{n}.weight": (two_i // 2, h)
                  for j in range(e) for n in ("gate_proj", "up_proj")})
    elif k.endswith("mlp.experts.down_proj"):
      out.update({f"{k[:-len('down_proj')]}{j}.down_proj.weight": shape[1:] for j in range(shape[0])})
    else:
      out[k] = shape
  return out


def test_rules_agree_with_transformers_but_for_the_empty_shared_expert(exports):
  _, dirs = exports
  c = json.load(open(os.path.join(dirs["vllm"], "config.json")))
  with torch.device("meta"):                        # shapes only, nothing initialised
    model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**c))
  theirs = _per_expert({k: tuple(v.shape) for k, v in model.state_dict().items()})
  if c["tie_word_embeddings"]:
    theirs.pop("lm_head.weight")                    # the embedding itself, not saved (as in vLLM)
  want = vllm_params(c)
  assert {k: v for k, v in theirs.items() if k in want} == want
  assert set(want) - set(theirs) == set()
  extra = {k: v for k, v in theirs.items() if k not in want}
  assert sorted(extra) == sorted(f"model.layers.{i}.mlp.shared_expert.{n}.weight"
                                 for i in (2, 3) for n in SWIGLU)
  assert all(0 in shape for shape in extra.values())


def test_vllm_export_loads_in_vllm_and_transformers(exports):
  lm, dirs = exports
  assert vllm_accepts(dirs["vllm"]) == []
  refused = vllm_accepts(dirs["transformers"])     # the default file set: the conflict
  assert refused and all("no module or parameter named" in r and ".shared_expert." in r for r in refused)
  model, info = lf.hf_model(dirs["vllm"])
  assert sorted(info["missing_keys"]) == sorted(f"model.layers.{i}.mlp.shared_expert.{n}.weight"
                                                for i in (2, 3) for n in SWIGLU)
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  ref, _ = lf.hf_model(dirs["transformers"])
  np.testing.assert_array_equal(lf.torch_logits(model, IDS), lf.torch_logits(ref, IDS))
  # both file sets import back to the same params
  _, back = convert_from_hf.convert(dirs["vllm"], os.path.join(dirs["vllm"], "..", "back"), config=lm.config)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), lm.params, back)


def test_dense_export_is_the_same_for_both_clients(tmp_path):
  lm = lf.randomized("dense")
  for client in hf_export.CLIENTS:
    hf_export.export(lm, str(tmp_path / client), "float32", client=client)
    assert vllm_accepts(str(tmp_path / client)) == []


def test_unknown_client():
  with pytest.raises(ValueError, match="client='tgi'; choose one of transformers, vllm"):
    hf_export.check_client("tgi")
