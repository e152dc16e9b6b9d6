"""Export to one GGUF file for llama.cpp / Ollama, written with the `gguf` package.

llama.cpp has no Post-MoE Qwen2: its `qwen2moe` makes every layer MoE, needs an untied head and a
shared expert with a real gate. Its DeepSeek-MoE (v1) architecture `deepseek` represents ours
exactly: `leading_dense_block_count` dense layers then MoE layers (so the MoE layers must be a
trailing block: `last:N` or `all`), softmax top-k weights NOT renormalised (norm_topk_prob=False,
the released models' setting), q/k/v biases, a tied head (no `output` tensor), and an ungated
shared expert, required there, which is written all-zero so it adds exactly 0. A dense model is
llama.cpp's `qwen2`. The tensor names come from the gguf package's own HF name map, applied to
the HF state dict of hf/export.py.

llama.cpp's `deepseek` applies RoPE to adjacent pairs (x[2i], x[2i+1]), Qwen2 / HF to the halves
(x[i], x[i + d/2]): the q and k rows (weights and biases) of each head are reordered so that each
half-pair becomes an adjacent pair (`interleave_halves`); q.k, and so attention, is unchanged.

Dtypes: f32 / f16 / bf16 / q8_0 for the matrices; 1-D tensors (norms, biases) and the router stay
f32, as llama.cpp's own converter does (q8_0 rows not a multiple of 32 fall back to f16).
"""

import numpy as np

from apollo_jax.hf import export as hf_export
from apollo_jax.hf import gguf_vocab

DTYPES = ("f32", "f16", "bf16", "q8_0")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")


def architecture(config) -> str:
  return "deepseek" if hf_export.moe_layers(config) else "qwen2"


def check_exportable(config, force_topk=False):
  """ValueError naming what llama.cpp cannot represent, and what to do instead."""
  hf_export.check_exportable(config, force_topk)
  m, e = config.model, config.moe
  moe = tuple(hf_export.moe_layers(config))
  if not moe:
    return
  first = m.num_layers - len(moe)
  if moe != tuple(range(first, m.num_layers)):
    raise ValueError(f"moe.layers={e.layers!r} (layers {list(moe)}): GGUF export needs the MoE layers to "
                     "be one trailing block (moe.layers='last:N' or 'all', or 'none'), because llama.cpp's "
                     "DeepSeek-MoE architecture has only leading dense layers; export to HF "
                     "(python -m apollo_jax.convert_to_hf) for other layouts")
  if e.norm_topk_prob:
    raise ValueError("moe.norm_topk_prob=True: llama.cpp's DeepSeek-MoE architecture weights the top-k "
                     "experts by their softmax probabilities without renormalising them, so this model "
                     "cannot be represented; export to HF (python -m apollo_jax.convert_to_hf) instead")
  if e.shared_expert:
    raise ValueError("moe.shared_expert=True: the shared expert is gated by sigmoid(x @ w), and llama.cpp's "
                     "DeepSeek-MoE shared expert has no gate; export to HF (python -m apollo_jax.convert_to_hf)")
  if m.head_dim and m.head_dim % 2:
    raise ValueError(f"model.head_dim={m.head_dim} is odd: RoPE needs an even head dimension")


def interleave_halves(rows, num_heads):
  """[heads * d, ...] rows, per head (x[0..d/2), x[d/2..d)) -> (x0, x_{d/2}, x1, x_{d/2+1}, ...)."""
  d = rows.shape[0] // num_heads
  r = rows.reshape(num_heads, 2, d // 2, *rows.shape[1:])
  return np.swapaxes(r, 1, 2).reshape(rows.shape)


def hf_tensors(params, config) -> dict:
  """{HF-style name: float32 array} of what the GGUF stores: the HF state dict with, for
  `deepseek`, q/k rows interleaved, experts stacked ([E, out, in] under
  model.layers.i.mlp.experts.<proj>.weight), the zero gate dropped and a zero shared expert."""
  state = hf_export.state_dict(params, config, client="vllm")     # no zero-size placeholders
  if architecture(config) == "qwen2":
    return state
  m, e = config.model, config.moe
  moe = set(hf_export.moe_layers(config))
  out = {}
  for name, w in state.items():
    if ".shared_expert_gate." in name:
      continue                             # zero (no shared expert); deepseek's has no gate
    if ".self_attn.q_proj." in name:
      w = interleave_halves(w, m.num_heads)
    elif ".self_attn.k_proj." in name:
      w = interleave_halves(w, m.num_kv_heads)
    out[name] = w
  for i in sorted(moe):
    p = f"model.layers.{i}.mlp."
    for n in _SWIGLU:
      out[f"{p}experts.{n}.weight"] = np.stack(
          [out.pop(f"{p}experts.{j}.{n}.weight") for j in range(e.num_experts)])
      shape = (m.hidden_size, m.intermediate_size) if n == "down_proj" else (m.intermediate_size, m.hidden_size)
      out[f"{p}shared_experts.{n}.weight"] = np.zeros(shape, np.float32)
  return out


def _gguf():
  try:
    import gguf
  except ImportError as err:
    raise ImportError("GGUF export needs the gguf package: pip install gguf==0.19.0") from err
  return gguf


def tensor_type(gguf_name, shape, dtype):
  """The GGML type a tensor is stored in for the file dtype `dtype`."""
  t = _gguf().GGMLQuantizationType
  if len(shape) <= 1 or gguf_name.endswith("ffn_gate_inp.weight") or dtype == "f32":
    return t.F32
  if dtype == "q8_0" and shape[-1] % 32:
    return t.F16
  return {"f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}[dtype]


def gguf_tensors(params, config, dtype="f32"):
  """[(gguf name, float32 array, GGML type)] in checkpoint order."""
  gguf = _gguf()
  arch = {"deepseek": gguf.MODEL_ARCH.DEEPSEEK, "qwen2": gguf.MODEL_ARCH.QWEN2}[architecture(config)]
  names = gguf.get_tensor_name_map(arch, config.model.num_layers)
  out = []
  for hf_name, w in hf_tensors(params, config).items():
    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
      raise AssertionError(f"no GGUF name for {hf_name}")    # a bug: every HF name above is mapped
    out.append((name, w, tensor_type(name, w.shape, dtype)))
  return out


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def write_architecture(writer, config, name):
  m, e = config.model, config.moe
  head_dim = m.head_dim or m.hidden_size // m.num_heads
  writer.add_name(name)
  writer.add_context_length(int(m.max_position_embeddings))
  writer.add_embedding_length(m.hidden_size)
  writer.add_block_count(m.num_layers)
  writer.add_feed_forward_length(m.intermediate_size)
  writer.add_head_count(m.num_heads)
  writer.add_head_count_kv(m.num_kv_heads)
  writer.add_rope_freq_base(float(m.rope_theta))
  writer.add_rope_dimension_count(head_dim)
  writer.add_layer_norm_rms_eps(float(m.rms_norm_eps))
  writer.add_vocab_size(m.vocab_size)
  if head_dim * m.num_heads != m.hidden_size:
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
  moe = hf_export.moe_layers(config)
  if moe:
    writer.add_leading_dense_block_count(m.num_layers - len(moe))
    writer.add_expert_count(e.num_experts)
    writer.add_expert_used_count(e.top_k)
    writer.add_expert_feed_forward_length(m.intermediate_size)
    writer.add_expert_shared_count(1)                  # the all-zero shared expert
    writer.add_expert_weights_scale(1.0)


def export(lm, path, dtype="f32", force_topk=False, name="Apollo-MoE (apollo_jax)"):
  """Write `lm` (an inference.LM with a tokenizer) to the GGUF file `path`. Returns its tensor count."""
  gguf = _gguf()
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {', '.join(DTYPES)}")
  config = lm.config
  check_exportable(config, force_topk)
  if lm.tokenizer is None:
    raise ValueError("the model has no tokenizer; a GGUF file must carry one (pass --tokenizer=PATH)")
  vocab = gguf_vocab.vocab(lm.tokenizer, config.model.vocab_size)   # fail before writing anything
  tensors = gguf_tensors(lm.params, config, dtype)
  writer = gguf.GGUFWriter(path, architecture(config))
  write_architecture(writer, config, name)
  writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype])))
  if dtype == "q8_0":
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  gguf_vocab.write(writer, vocab)
  for tname, w, qtype in tensors:
    writer.add_tensor(tname, gguf.quants.quantize(np.ascontiguousarray(w), qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return len(tensors)
