"""convert_to_gguf: the file read back with the gguf package's own reader.

Every tensor against the model's weights (names as llama.cpp's DeepSeek-MoE / Qwen2 loaders
look them up, shapes, stored types, values), the q/k reordering against RoPE itself (attention
scores with HF's half-split rotation of the original rows = llama.cpp's adjacent-pair rotation
of the stored rows), the architecture metadata llama.cpp requires, the tokenizer fields against
the sentencepiece model, the other dtypes within their rounding, and the refusals. That llama.cpp
then computes our logits and tokens is benchmarks/llama_cpp_check.py (needs llama-cpp-python).
"""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import lm_fixtures as lf  # noqa: E402
from apollo_jax import convert_to_gguf  # noqa: E402
from apollo_jax.hf import config as hf_config  # noqa: E402
from apollo_jax.hf import export as hf_export  # noqa: E402
from apollo_jax.hf import gguf_export  # noqa: E402
from apollo_jax.hf import tokenizer as tokenizer_export  # noqa: E402

# What llama.cpp's `deepseek` loader reads with a required get_key (besides the general ones), and
# the tensors it creates per layer kind (LLM_ARCH_DEEPSEEK in llama.cpp's model loader).
REQUIRED_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length",
                 "attention.head_count", "attention.layer_norm_rms_epsilon", "leading_dense_block_count",
                 "expert_feed_forward_length", "expert_shared_count", "expert_count", "expert_used_count")
ATTN = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")
DENSE_FFN = ("ffn_gate", "ffn_up", "ffn_down")
MOE_FFN = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps",
           "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")


def _read(lm, path, dtype="f32"):
  gguf_export.export(lm, str(path), dtype)
  r = gguf.GGUFReader(str(path))
  return r, {t.name: t for t in r.tensors}


def _field(r, key):
  return r.fields[key].contents()


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
  lm = lf.randomized("hybrid8")
  r, tensors = _read(lm, tmp_path_factory.mktemp("gguf") / "h.gguf")
  return lm, r, tensors, hf_export.state_dict(lm.params, lm.config)


def _halves_to_pairs(rows, heads):
  """The reordering written out: stored row h*d + 2j + s = original row h*d + s*d/2 + j."""
  d = rows.shape[0] // heads
  out = np.empty_like(rows)
  for h in range(heads):
    for j in range(d // 2):
      for s in range(2):
        out[h * d + 2 * j + s] = rows[h * d + s * d // 2 + j]
  return out


def test_every_tensor(hybrid):
  lm, _, tensors, hf = hybrid
  m, e = lm.config.model, lm.config.moe
  names = {"token_embd.weight", "output_norm.weight"}            # tied head: no output.weight
  for i in range(m.num_layers):
    names |= {f"blk.{i}.{n}.weight" for n in ATTN + (MOE_FFN if i >= 2 else DENSE_FFN)}
    names |= {f"blk.{i}.attn_{x}.bias" for x in "qkv"}
  assert set(tensors) == names
  want = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
  for i in range(m.num_layers):
    p = f"model.layers.{i}."
    want[f"blk.{i}.attn_norm.weight"] = hf[p + "input_layernorm.weight"]
    want[f"blk.{i}.ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    want[f"blk.{i}.attn_output.weight"] = hf[p + "self_attn.o_proj.weight"]
    want[f"blk.{i}.attn_v.weight"] = hf[p + "self_attn.v_proj.weight"]
    want[f"blk.{i}.attn_v.bias"] = hf[p + "self_attn.v_proj.bias"]
    for x, heads in (("q", m.num_heads), ("k", m.num_kv_heads)):
      for kind in ("weight", "bias"):
        want[f"blk.{i}.attn_{x}.{kind}"] = _halves_to_pairs(hf[f"{p}self_attn.{x}_proj.{kind}"], heads)
    for n in ("gate", "up", "down"):
      if i < 2:
        want[f"blk.{i}.ffn_{n}.weight"] = hf[f"{p}mlp.{n}_proj.weight"]
      else:
        want[f"blk.{i}.ffn_{n}_exps.weight"] = np.stack(
            [hf[f"{p}mlp.experts.{j}.{n}_proj.weight"] for j in range(e.num_experts)])
        want[f"blk.{i}.ffn_{n}_shexp.weight"] = np.zeros(hf[f"{p}mlp.experts.0.{n}_proj.weight"].shape)
    if i >= 2:
      want[f"blk.{i}.ffn_gate_inp.weight"] = hf[p + "mlp.gate.weight"]
  for name, t in tensors.items():
    assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
    np.testing.assert_array_equal(t.data, want[name], err_msg=name)
  assert tensors["blk.3.ffn_down_exps.weight"].data.shape == (7, 64, 128)     # real experts only
  assert not np.any(hf["model.layers.3.mlp.shared_expert_gate.weight"])      # what was dropped is 0


def _rope(x, pos, theta, pairs):
  """RoPE on [S, d]: rotate (x[i], x[i + d/2]) (HF, Qwen2) or (x[2i], x[2i+1]) (llama.cpp NORM)."""
  d = x.shape[-1]
  ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
  a, b = (x[:, 0::2], x[:, 1::2]) if pairs else (x[:, :d // 2], x[:, d // 2:])
  ra, rb = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
  out = np.empty_like(x)
  if pairs:
    out[:, 0::2], out[:, 1::2] = ra, rb
  else:
    out[:, :d // 2], out[:, d // 2:] = ra, rb
  return out


def test_reordered_rows_give_the_same_attention_scores(hybrid):
  lm, _, tensors, hf = hybrid
  m = lm.config.model
  d = m.hidden_size // m.num_heads
  x, pos = np.random.RandomState(0).standard_normal((9, m.hidden_size)), np.arange(9.0) * 7
  p = "model.layers.1.self_attn."
  q_hf = x @ hf[p + "q_proj.weight"].T + hf[p + "q_proj.bias"]
  k_hf = x @ hf[p + "k_proj.weight"].T + hf[p + "k_proj.bias"]
  q_gg = x @ tensors["blk.1.attn_q.weight"].data.T + tensors["blk.1.attn_q.bias"].data
  k_gg = x @ tensors["blk.1.attn_k.weight"].data.T + tensors["blk.1.attn_k.bias"].data
  g = m.num_heads // m.num_kv_heads
  for h in range(m.num_heads):
    kh = h // g
    ref = _rope(q_hf[:, h * d:(h + 1) * d], pos, m.rope_theta, False) @ _rope(
        k_hf[:, kh * d:(kh + 1) * d], pos, m.rope_theta, False).T
    ours = _rope(q_gg[:, h * d:(h + 1) * d], pos, m.rope_theta, True) @ _rope(
        k_gg[:, kh * d:(kh + 1) * d], pos, m.rope_theta, True).T
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_architecture_metadata(hybrid):
  lm, r, _, _ = hybrid
  m, e = lm.config.model, lm.config.moe
  assert _field(r, "general.architecture") == "deepseek"
  for key in REQUIRED_KEYS:
    assert f"deepseek.{key}" in r.fields, key
  want = {"embedding_length": m.hidden_size, "block_count": 4, "feed_forward_length": m.intermediate_size,
          "attention.head_count": m.num_heads, "attention.head_count_kv": m.num_kv_heads,
          "leading_dense_block_count": 2, "expert_count": 7, "expert_used_count": e.top_k,
          "expert_feed_forward_length": m.intermediate_size, "expert_shared_count": 1,
          "expert_weights_scale": 1.0, "rope.dimension_count": m.hidden_size // m.num_heads,
          "rope.freq_base": m.rope_theta, "vocab_size": m.vocab_size,
          "context_length": m.max_position_embeddings}
  assert {k: _field(r, f"deepseek.{k}") for k in want} == pytest.approx(want)
  assert _field(r, "deepseek.attention.layer_norm_rms_epsilon") == pytest.approx(m.rms_norm_eps, rel=1e-6)
  assert _field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
  assert not e.norm_topk_prob        # what `deepseek` computes: softmax top-k, not renormalised


def test_tokenizer_fields(hybrid):
  lm, r, _, _ = hybrid
  sp = lm.tokenizer._sp
  n = sp.get_piece_size()
  assert _field(r, "tokenizer.ggml.model") == "llama"
  assert _field(r, "tokenizer.ggml.tokens") == [sp.id_to_piece(i) for i in range(n)]
  assert _field(r, "tokenizer.ggml.scores") == pytest.approx([sp.get_score(i) for i in range(n)])
  kind = lambda i: (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                    else 5 if sp.is_unused(i) else 1)
  types = _field(r, "tokenizer.ggml.token_type")
  for i in range(n):
    assert types[i] == (4 if sp.id_to_piece(i) in ("\n", "User:", "Assistant:") else kind(i)), i
  assert (_field(r, "tokenizer.ggml.eos_token_id"), _field(r, "tokenizer.ggml.padding_token_id"),
          _field(r, "tokenizer.ggml.bos_token_id"), _field(r, "tokenizer.ggml.unknown_token_id")) == (
              sp.eos_id(), sp.pad_id(), sp.bos_id(), sp.unk_id())
  assert _field(r, "tokenizer.ggml.add_space_prefix") is False
  assert _field(r, "tokenizer.ggml.add_bos_token") is False and _field(r, "tokenizer.ggml.add_eos_token") is False
  assert _field(r, "tokenizer.chat_template") == tokenizer_export.CHAT_TEMPLATE


@pytest.mark.parametrize("dtype,qtype", [("f16", "F16"), ("bf16", "BF16"), ("q8_0", "Q8_0")])
def test_dtypes(dtype, qtype, hybrid, tmp_path):
  import ml_dtypes
  lm, _, ref, _ = hybrid
  _, tensors = _read(lm, tmp_path / f"{dtype}.gguf", dtype)
  assert set(tensors) == set(ref)
  for name, t in tensors.items():
    keep = ref[name].data.ndim == 1 or name.endswith("ffn_gate_inp.weight")
    assert t.tensor_type.name == ("F32" if keep else qtype), name
    want = np.asarray(ref[name].data)
    got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
    if keep:
      np.testing.assert_array_equal(got, want, err_msg=name)
    elif qtype == "Q8_0":
      # blocks of 32 along a row, int8 steps of d = max|block| / 127 (d itself stored in f16):
      # round to nearest is within d/2, plus 127 times d's own f16 rounding
      blocks = lambda a: a.reshape(*a.shape[:-1], -1, 32)
      d = np.abs(blocks(want)).max(axis=-1, keepdims=True) / 127
      assert np.all(np.abs(blocks(got) - blocks(want)) <= d * (0.5 + 127 * 2**-11) * (1 + 1e-6)), name
    else:
      # round to nearest: half a step of the format relative to the value (subnormals: absolute)
      fi = ml_dtypes.finfo({"F16": np.float16, "BF16": ml_dtypes.bfloat16}[qtype])
      bound = 0.5 * float(fi.eps) * np.abs(want) + float(fi.smallest_subnormal)
      assert np.all(np.abs(got - want) <= bound), name


def test_dense_is_qwen2_with_its_head(tmp_path):
  lm = lf.randomized("dense")
  r, tensors = _read(lm, tmp_path / "d.gguf")
  hf = hf_export.state_dict(lm.params, lm.config)
  assert _field(r, "general.architecture") == "qwen2" and "qwen2.expert_count" not in r.fields
  np.testing.assert_array_equal(tensors["output.weight"].data, hf["lm_head.weight"])
  np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, hf["model.layers.0.self_attn.q_proj.weight"])
  assert len(tensors) == len(hf)


ERRORS = {   # config overrides: message
    "list": ({"moe.layers": "1,3"}, "one trailing block"),
    "norm_topk": ({"moe.norm_topk_prob": True}, "without renormalising"),
    "language": ({"moe.routing": "language"}, "--force_topk"),
    "shared": ({"moe.shared_expert": True}, "has no gate"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_refusals(case):
  overrides, match = ERRORS[case]
  config = hf_config.apply_overrides(lf.tiny_config(), overrides)
  with pytest.raises(ValueError, match=match):
    gguf_export.check_exportable(config)


def test_command_errors(tmp_path):
  with pytest.raises(ValueError, match="--dtype='q4'"):
    convert_to_gguf.convert("x", str(tmp_path / "a.gguf"), dtype="q4")
  (tmp_path / "b.gguf").write_text("")
  with pytest.raises(FileExistsError, match="exists"):
    convert_to_gguf.convert("x", str(tmp_path / "b.gguf"))


def test_hf_tokenizer_is_refused_clearly(tmp_path):
  lm = lf.randomized("hybrid8")
  out = lf.export(lm, str(tmp_path / "hf"))
  from apollo_jax.data.tokenizer import load_tokenizer
  with pytest.raises(ValueError, match="HF tokenizer.json.*not supported"):
    gguf_export.gguf_vocab.vocab(load_tokenizer(out, eos_token="</s>"), 4096)
