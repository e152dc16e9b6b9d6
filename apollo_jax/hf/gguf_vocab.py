"""The tokenizer of a GGUF export, as llama.cpp's sentencepiece ("llama") tokenizer reads it, so
that llama.cpp tokenises exactly as we do.

llama.cpp's "llama" tokenizer merges the highest-scoring pair of adjacent pieces first, as
sentencepiece BPE does, with byte fallback through the <0xXX> pieces. Three settings make it
agree with data/train_tokenizer.py's models:
  * `add_space_prefix` = the model's add_dummy_prefix (False: else llama.cpp prepends a space to
    every text and every token id changes);
  * user-defined symbols ("\\n", "User:", "Assistant:") typed USER_DEFINED: llama.cpp then splits
    them out of the text before merging, always, as sentencepiece does;
  * no BOS / EOS added (the chat template and prompts place EOS themselves).
Token types are sentencepiece's piece types (same numbering as GGUF's). A model vocabulary larger
than the tokenizer's is padded with UNUSED pieces, as llama.cpp's converter does.
"""

from apollo_jax.hf import tokenizer as tokenizer_export

_TYPES = {"NORMAL": 1, "UNKNOWN": 2, "CONTROL": 3, "USER_DEFINED": 4, "UNUSED": 5, "BYTE": 6}


def vocab(tokenizer, vocab_size) -> dict:
  """The tokenizer.ggml.* fields (plain python values) for `tokenizer`, padded to `vocab_size`."""
  from apollo_jax.data.tokenizer import SentencePieceTokenizer
  if not isinstance(tokenizer, SentencePieceTokenizer):
    raise ValueError(f"tokenizer {tokenizer.path}: GGUF export supports sentencepiece .model tokenizers "
                     "(apollo_jax.data.train_tokenizer's); an HF tokenizer.json (e.g. Qwen2's byte-level "
                     "BPE) is not supported yet. Export to HF instead (python -m apollo_jax.convert_to_hf)")
  proto = tokenizer_export._sp_proto(tokenizer.path)
  t, n = proto.trainer_spec, proto.normalizer_spec
  if t.model_type != t.BPE or n.name not in ("identity", "") or n.remove_extra_whitespaces:
    raise ValueError(f"{tokenizer.path}: GGUF export needs a sentencepiece BPE model with the identity "
                     f"normaliser (this one: model_type={t.ModelType.Name(t.model_type)}, normaliser "
                     f"{n.name!r}, remove_extra_whitespaces={n.remove_extra_whitespaces}); train one with "
                     "python -m apollo_jax.data.train_tokenizer")
  kind = proto.SentencePiece.Type.Name
  pieces = list(proto.pieces)
  if len(pieces) > vocab_size:
    raise ValueError(f"tokenizer has {len(pieces)} pieces, more than model.vocab_size={vocab_size}")
  pad = vocab_size - len(pieces)
  return {
      "tokens": [p.piece for p in pieces] + [f"[PAD{i}]" for i in range(len(pieces), vocab_size)],
      "scores": [float(p.score) for p in pieces] + [-1000.0] * pad,
      "types": [_TYPES[kind(p.type)] for p in pieces] + [_TYPES["UNUSED"]] * pad,
      "ids": {k: v for k, v in {"bos": tokenizer._sp.bos_id(), "eos": tokenizer.eos_id, "unk": tokenizer._sp.unk_id(),
                                "pad": tokenizer.pad_id}.items() if v >= 0},
      "add_space_prefix": bool(n.add_dummy_prefix),
      "chat_template": tokenizer_export.CHAT_TEMPLATE,
  }


def write(writer, v):
  """Add the fields of `vocab(...)` to a gguf.GGUFWriter."""
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(v["tokens"])
  writer.add_token_scores(v["scores"])
  writer.add_token_types(v["types"])
  ids = v["ids"]
  for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                   ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
    if key in ids:
      add(ids[key])
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)
  writer.add_add_space_prefix(v["add_space_prefix"])
  writer.add_chat_template(v["chat_template"])
