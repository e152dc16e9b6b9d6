"""Tokenizer files of an HF export: tokenizer.json (the same ids as ours), tokenizer_config.json
with the training chat template, special_tokens_map.json.

An HF `tokenizer.json` is copied. A sentencepiece BPE model (the shipped sample tokenizer, see
data/train_tokenizer.py) is converted to an equivalent `tokenizers` BPE:
  * vocabulary = the pieces in id order; merges = every split of a piece into two pieces, ranked
    by the merged piece's score (sentencepiece BPE merges the highest-scoring pair first);
  * normalizer: spaces -> "▁" (identity normalisation, no dummy prefix, as trained);
  * pre-tokenizer: sentencepiece's words (a run of "▁" starts a word, whitespace-only pieces
    allowed), then single digits (split_digits);
  * user-defined symbols ("\\n", "User:", "Assistant:") are added tokens matched before
    everything, control pieces (<pad>, <s>, </s>) special tokens; byte fallback for the rest.
The tests check identical ids on the sample texts of all 50 languages.
"""

import json
import os
import shutil

# The training format (chat.py, as the original): `User:{q}\nAssistant:{a}` turns joined by "\n", EOS
# after the last answer; add_generation_prompt appends "\nAssistant:". No system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['user', 'assistant'] -%}"
    "{{ raise_exception('Apollo-MoE was trained without a system prompt: roles must be user/assistant') }}"
    "{%- endif -%}"
    "{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ 'User:' + message['content'] }}"
    "{%- else -%}{{ 'Assistant:' + message['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '\\nAssistant:' }}"
    "{%- elif messages and messages[-1]['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}")


def _sp_proto(path):
  from sentencepiece import sentencepiece_model_pb2
  proto = sentencepiece_model_pb2.ModelProto()
  with open(path, "rb") as f:
    proto.ParseFromString(f.read())
  return proto


def sentencepiece_to_tokenizers(path):
  """A `tokenizers.Tokenizer` giving the same ids as the sentencepiece BPE model at `path`."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
  proto = _sp_proto(path)
  t, n = proto.trainer_spec, proto.normalizer_spec
  unsupported = []
  if t.model_type != t.BPE:
    unsupported.append(f"model_type={t.ModelType.Name(t.model_type)} (only BPE)")
  if n.name not in ("identity", "") or n.add_dummy_prefix or n.remove_extra_whitespaces:
    unsupported.append(f"normalizer {n.name!r} add_dummy_prefix={n.add_dummy_prefix} "
                       f"remove_extra_whitespaces={n.remove_extra_whitespaces} (only identity, no prefix)")
  if t.treat_whitespace_as_suffix or not t.split_by_whitespace or not n.escape_whitespaces:
    unsupported.append("whitespace handling other than train_tokenizer.py's")
  if unsupported:
    raise ValueError(f"{path}: cannot convert this sentencepiece model to tokenizer.json: "
                     + "; ".join(unsupported) + ". Train it with apollo_jax.data.train_tokenizer, "
                     "or ship an HF tokenizer.json")
  pieces = list(proto.pieces)
  vocab = {p.piece: i for i, p in enumerate(pieces)}
  normal = proto.SentencePiece.NORMAL
  rank = {p.piece: -p.score for p in pieces if p.type == normal}
  merges = []
  for piece in sorted(rank, key=lambda s: (rank[s], vocab[s])):
    splits = [(piece[:i], piece[i:]) for i in range(1, len(piece))
              if piece[:i] in rank and piece[i:] in rank]
    merges += sorted(splits, key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
  unk = pieces[t.unk_id].piece
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=t.byte_fallback,
                             fuse_unk=True))
  tok.normalizer = normalizers.Replace(" ", "▁")
  pre = [pre_tokenizers.Split(Regex("▁+[^▁]*|[^▁]+"), behavior="isolated")]
  if t.split_digits:
    pre.append(pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
  tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
  control = proto.SentencePiece.CONTROL
  user = proto.SentencePiece.USER_DEFINED
  tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == user])
  tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                          for p in pieces if p.type in (control, proto.SentencePiece.UNKNOWN)])
  return tok


def write_tokenizer(tokenizer, out_dir, model_max_length):
  """tokenizer.json + tokenizer_config.json (with the chat template) + special_tokens_map.json.
  Returns {"eos_token_id", "pad_token_id", "bos_token_id"} for config / generation_config."""
  from apollo_jax.data.tokenizer import SentencePieceTokenizer
  dst = os.path.join(out_dir, "tokenizer.json")
  if isinstance(tokenizer, SentencePieceTokenizer):
    sp = tokenizer._sp
    tok = sentencepiece_to_tokenizers(tokenizer.path)
    tok.save(dst)
    name = lambda i: sp.id_to_piece(i) if i >= 0 else None
    eos, pad, bos = name(sp.eos_id()), name(sp.pad_id()), name(sp.bos_id())
  else:
    if os.path.abspath(tokenizer.path) != os.path.abspath(dst):
      shutil.copyfile(tokenizer.path, dst)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(dst)
    eos, pad, bos = tok.id_to_token(tokenizer.eos_id), tok.id_to_token(tokenizer.pad_id), None
  special = {k: v for k, v in {"eos_token": eos, "pad_token": pad, "bos_token": bos}.items() if v}
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
            "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
            "padding_side": "left", "chat_template": CHAT_TEMPLATE, **special}
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
    json.dump(special, f, indent=2, ensure_ascii=False)
  ids = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
  if bos:
    ids["bos_token_id"] = tok.token_to_id(bos)
  return ids
