"""Export a model to a directory that stock `transformers` loads without trust_remote_code.

Post-MoE -> `Qwen2MoeForCausalLM` (`mlp_only_layers` = the dense layers, `num_experts` = the real
experts: padded experts are dropped, `moe_intermediate_size = intermediate_size`, no shared
expert: `shared_expert_intermediate_size=0` and a zero `shared_expert_gate`); dense ->
`Qwen2ForCausalLM`.

The two HF-format clients disagree on a model without a shared expert (CLIENTS): transformers
builds zero-size shared-expert modules and reports their tensors MISSING when absent; vLLM builds
no such module and refuses a checkpoint that has them. Both build `shared_expert_gate`, so the
zero gate is always written. Either file set computes the same logits in transformers. Weights are named by hf/names.py, the table hf/load.py imports through
(per-expert keys, torch [out, in] layout), so `convert_from_hf` of an export gives back identical
params. Tied embeddings store no lm_head, as HF does.

What stock HF cannot represent: `moe.routing='language'` routes every token by its language id,
which HF's top-k router never sees. The export refuses it unless `force_topk=True` (the HF model
then routes by plain top-k: a different model, said in the model card). Hybrid-k needs no
language ids at inference (plain top-k, exactly what HF computes).
"""

import json
import os
import re

import jax
import numpy as np

from apollo_jax import config as cfg
from apollo_jax import languages
from apollo_jax.hf import load as hf_load
from apollo_jax.hf import names as hf_names
from apollo_jax.hf import tokenizer as tokenizer_export
from apollo_jax.model.size import count_params
from apollo_jax.hf.safetensors import write_safetensors

DTYPES = ("bfloat16", "float32")
# client -> whether the zero-size shared-expert tensors are written (see the module docstring).
CLIENTS = {"transformers": True, "vllm": False}
CLIENT_HELP = ("transformers: also write the zero-size shared_expert.{gate,up,down}_proj tensors that "
               "transformers builds for shared_expert_intermediate_size=0 (a clean load report; vLLM "
               "refuses them: it builds no shared expert then). vllm: leave them out (vLLM loads it; "
               "transformers still does, with the same logits, but reports those tensors missing). "
               "Dense models: the same files either way.")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size) -> int:
  """'5GB' (10^9, as HF) / '500MiB' / 1000 -> bytes."""
  if isinstance(size, int):
    return size
  m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"max_shard_size={size!r}: expected e.g. '5GB', '500MB', '2GiB' or a byte count")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def check_exportable(config, force_topk=False):
  if config.moe.routing == "language" and not force_topk:
    raise ValueError("moe.routing='language' cannot be exported to stock transformers: it routes each "
                     "token to its language's expert, and HF's Qwen2-MoE router sees no language ids. "
                     "Export anyway with --force_topk (HF then routes by plain top-k, a different model; "
                     "the model card says so), or keep using apollo_jax.inference with language=...")


def moe_layers(config):
  return cfg.moe_layer_indices(config.moe.layers, config.model.num_layers)


def hf_config(config, dtype, token_ids) -> dict:
  """config.json of the export (Qwen2MoeConfig / Qwen2Config fields)."""
  m, e = config.model, config.moe
  moe = moe_layers(config)
  out = {
      "architectures": ["Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM"],
      "model_type": "qwen2_moe" if moe else "qwen2",
      "vocab_size": m.vocab_size, "hidden_size": m.hidden_size, "intermediate_size": m.intermediate_size,
      "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
      "num_key_value_heads": m.num_kv_heads, "hidden_act": "silu",
      "max_position_embeddings": int(m.get("max_position_embeddings", 32768)),
      "initializer_range": m.init_std, "rms_norm_eps": m.rms_norm_eps, "use_cache": True,
      "tie_word_embeddings": bool(m.tie_embeddings), "rope_theta": m.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
      "use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers,
      "attention_dropout": 0.0, "dtype": dtype, **token_ids}
  if m.head_dim > 0 and m.head_dim * m.num_heads != m.hidden_size:
    out["head_dim"] = m.head_dim
  if moe:
    out.update({
        "num_experts": e.num_experts, "num_experts_per_tok": e.top_k, "norm_topk_prob": bool(e.norm_topk_prob),
        "moe_intermediate_size": m.intermediate_size, "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(m.num_layers) if i not in moe],
        "shared_expert_intermediate_size": m.intermediate_size if e.shared_expert else 0,
        "output_router_logits": False, "router_aux_loss_coef": float(e.aux_loss_weight), "qkv_bias": True})
  return out


def check_client(client):
  if client not in CLIENTS:
    raise ValueError(f"client={client!r}; choose one of {', '.join(CLIENTS)} ({CLIENT_HELP})")


def state_dict(params, config, client="transformers") -> dict:
  """Our params -> {HF name: float32 numpy} in torch layout, in checkpoint order (hf/names.py);
  padded experts are dropped. `client` (CLIENTS) decides the zero-size shared-expert tensors."""
  check_client(client)
  top, layers = hf_load.split_layers(
      jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params), config)
  out = {}
  for name in hf_names.names(config):
    w = top if name.layer is None else layers[name.layer]
    for k in name.path:
      w = w[k]
    w = w if name.expert is None else w[name.expert]
    out[name.hf] = w.T if name.transpose else w
  if not config.moe.shared_expert:
    for i in moe_layers(config):
      out.update({k: np.zeros(shape, np.float32)
                  for k, shape in hf_names.empty_shared_expert(i, config.model.hidden_size).items()
                  if CLIENTS[client] or k.endswith("shared_expert_gate.weight")})
  return out


def write_weights(state, out_dir, dtype="bfloat16", max_shard_size="5GB"):
  """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when
  the weights exceed max_shard_size. Returns the file names."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; choose one of {DTYPES}")
  limit, width = parse_size(max_shard_size), 2 if dtype == "bfloat16" else 4
  shards, size = [[]], 0
  for name, arr in state.items():
    n = arr.size * width
    if shards[-1] and size + n > limit:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += n
  meta = {"format": "pt"}
  if len(shards) == 1:
    write_safetensors(os.path.join(out_dir, "model.safetensors"), state, dtype, meta)
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fname, keys in zip(names, shards):
    write_safetensors(os.path.join(out_dir, fname), {k: state[k] for k in keys}, dtype, meta)
    weight_map.update({k: fname for k in keys})
  total = sum(a.size for a in state.values()) * width
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return names


def _json(path, obj):
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)


def export(lm, out_dir, dtype="bfloat16", max_shard_size="5GB", force_topk=False, client="transformers"):
  """Write the HF dir for `lm` (an inference.LM) for `client` (CLIENTS). Returns the files written."""
  config = lm.config
  check_exportable(config, force_topk)
  check_client(client)
  os.makedirs(out_dir, exist_ok=True)
  files = write_weights(state_dict(lm.params, config, client), out_dir, dtype, max_shard_size)
  token_ids = {}
  if lm.tokenizer is not None:
    token_ids = tokenizer_export.write_tokenizer(lm.tokenizer, out_dir, config.model.max_position_embeddings)
    files += ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
  _json(os.path.join(out_dir, "config.json"), hf_config(config, dtype, token_ids))
  gen = {"do_sample": False, **token_ids}
  _json(os.path.join(out_dir, "generation_config.json"), gen)
  with open(os.path.join(out_dir, "README.md"), "w") as f:
    f.write(model_card(lm, dtype, force_topk))
  return files + ["config.json", "generation_config.json", "README.md"]


FRONT_MATTER = {"library_name": "transformers", "pipeline_tag": "text-generation",
                "tags": ["medical", "multilingual", "mixture-of-experts", "apollo-moe", "apollo_jax"],
                "language": list(languages.CODES)}


def front_matter(meta=None) -> list:
  """The model card's YAML lines, every value written as JSON (double-quoted strings, a valid YAML
  flow value): a bare `no` (Norwegian) is False to YAML 1.1 readers (the Hub's, gguf's), `on`/`yes`
  True, `1e3` a number."""
  return [f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in (meta or FRONT_MATTER).items()]


def model_card(lm, dtype, force_topk=False) -> str:
  """README.md: architecture, MoE layers, routing, parameter counts, training, languages."""
  c = lm.config
  m, e = c.model, c.moe
  moe = moe_layers(c)
  counts = count_params(c)
  arch = "Qwen2MoeForCausalLM" if moe else "Qwen2ForCausalLM"
  lines = ["---", *front_matter(), "---", "",
           "# Apollo-MoE (exported by apollo_jax)", "",
           "A Qwen2 decoder " + (f"with Post-MoE layers (mixture of language-family experts in layers "
                                 f"{list(moe)})" if moe else "(dense)") +
           ", trained with apollo_jax and exported with `python -m apollo_jax.convert_to_hf`. "
           "Loads with stock transformers, no `trust_remote_code`. Research model: not medical advice.", "",
           "## Architecture", "",
           f"- `{arch}`: {m.num_layers} layers, hidden {m.hidden_size}, FFN {m.intermediate_size}, "
           f"{m.num_heads} query / {m.num_kv_heads} key-value heads, RoPE theta {m.rope_theta:g}, "
           f"vocabulary {m.vocab_size}, tied embeddings: {bool(m.tie_embeddings)}",
           f"- parameters: {counts['total_params']:,} total, {counts['active_params']:,} active per token",
           f"- weights: {dtype} safetensors"]
  if moe:
    lines += [f"- MoE layers {list(moe)} (`mlp_only_layers` = the others): {e.num_experts} experts, each a "
              f"full SwiGLU FFN of width {m.intermediate_size}, top-{e.top_k}, weights = router softmax "
              f"probabilities ({'renormalised' if e.norm_topk_prob else 'not renormalised'}), "
              f"shared expert: {bool(e.shared_expert)}", "",
              "## Routing", "",
              {"hybrid": "Trained with Hybrid-k routing: top-k of the router, with the token's language-"
                         "family expert forced into the k. At inference the router runs plain top-k "
                         "with no language ids, exactly what this HF model computes.",
               "topk": "Plain top-k routing in training and inference.",
               "language": "Trained with language-specific routing (each token to its language's "
                           "expert). Exported with --force_topk: this HF model routes by plain top-k "
                           "instead, so its outputs differ from the trained model's."}[e.routing]]
    if e.routing != "topk":
      fams = languages.expert_map(e.expert_map) if e.expert_map in languages.EXPERT_MAPS else None
      if fams is not None:
        lines += ["", f"Expert map `{e.expert_map}` (language -> expert): " + ", ".join(
            f"{code} {int(fams[i])}" for i, code in enumerate(languages.CODES))]
  lines += ["", "## Chat format", "",
            "`User:{question}\\nAssistant:{answer}<eos>`, turns joined by `\\n`, no system prompt "
            "(`tokenizer.apply_chat_template` renders it).", "",
            "## Training", ""]
  if lm.kind == "workdir":
    d = c.data
    lines += [f"- data: `{d.train_files}`, sequence length {d.seq_len}, packing `{d.packing}`",
              f"- {c.steps} steps x {c.global_batch} rows, AdamW lr {c.optim.lr:g} (warmup "
              f"{c.optim.warmup_ratio:g}, cosine horizon {c.optim.horizon:g}), weight decay "
              f"{c.optim.weight_decay:g}, clip {c.optim.clip:g}, seed {c.seed}",
              f"- source: `{lm.source}` (full config in that workdir's config.json)"]
  else:
    lines += [f"- converted from `{lm.source}` (no training config recorded there)"]
  lines += ["", "## Languages", "",
            ", ".join(f"{languages.NAMES[code]} ({code})" for code in languages.CODES), ""]
  return "\n".join(lines)
