"""Tokenizers behind one small interface: encode(text) -> list[int], decode(ids) -> str,
eos_id, pad_id, vocab_size.

* sentencepiece `.model` files (the shipped sample tokenizer; see train_tokenizer.py);
* HuggingFace `tokenizer.json` through the `tokenizers` library (Qwen2's byte-level BPE is not
  sentencepiece). EOS is `<|endoftext|>` when the vocabulary has it (Qwen2's EOS), else the
  `eos_token` argument.

encode() never adds special tokens: the chat template (chat.py) places EOS itself. Both wrappers
load lazily and pickle as their path, so grain worker processes can receive them.
"""

import hashlib
import os

QWEN_EOS = "<|endoftext|>"
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]")


class SentencePieceTokenizer:
  def __init__(self, path: str):
    self.path = path
    self._sp = None
    self._load()

  def _load(self):
    import sentencepiece as spm
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    if self._sp.eos_id() < 0:
      raise ValueError(f"sentencepiece model {self.path} has no EOS piece (eos_id=-1); retrain it with "
                       "eos_id=3 (python -m apollo_jax.data.train_tokenizer)")

  def __getstate__(self):
    return {"path": self.path}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load()

  def encode(self, text: str) -> list:
    return self._sp.encode(text, out_type=int)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    p = self._sp.pad_id()
    return p if p >= 0 else self.eos_id       # models without <pad>: pad with EOS (Qwen does too)

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()


class HFTokenizer:
  def __init__(self, path: str, eos_token: str = ""):
    self.path, self.eos_token = path, eos_token
    self._load()

  def _load(self):
    import tokenizers
    self._tok = tokenizers.Tokenizer.from_file(self.path)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    name = QWEN_EOS if QWEN_EOS in vocab else self.eos_token
    if not name or name not in vocab:
      raise ValueError(f"{self.path}: no EOS token: {QWEN_EOS!r} is not in the vocabulary and "
                       f"eos_token={self.eos_token!r} is {'not set' if not name else 'not in it either'}; "
                       "set data.eos_token to the tokenizer's end-of-text token")
    self._eos = vocab[name]
    # Qwen2 pads with <|endoftext|> (its EOS); other vocabularies may have their own pad token.
    pads = [vocab[p] for p in PAD_CANDIDATES if p in vocab and name != QWEN_EOS]
    self._pad = pads[0] if pads else self._eos

  def __getstate__(self):
    return {"path": self.path, "eos_token": self.eos_token}

  def __setstate__(self, state):
    self.__init__(state["path"], state["eos_token"])

  def encode(self, text: str) -> list:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)


def load_tokenizer(path: str, eos_token: str = ""):
  """Pick the implementation by extension: `.model` -> sentencepiece, `.json` (or a directory
  holding tokenizer.json, e.g. an HF checkpoint) -> tokenizers."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "tokenizer.json")):
    path = os.path.join(path, "tokenizer.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer {path!r} not found; set data.tokenizer to a sentencepiece .model "
                            "or an HF tokenizer.json (train one: python -m apollo_jax.data.train_tokenizer)")
  kinds = {".model": lambda: SentencePieceTokenizer(path), ".json": lambda: HFTokenizer(path, eos_token)}
  for ext, make in kinds.items():
    if path.endswith(ext):
      try:
        return make()
      except ValueError:
        raise                                              # our own checks (EOS...), already clear
      except Exception as e:  # noqa: BLE001 (sentencepiece: RuntimeError, tokenizers: Exception)
        raise ValueError(f"tokenizer {path!r} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
                         "truncated or not a tokenizer file? Copy it again or point data.tokenizer at "
                         "another one") from e
  raise ValueError(f"tokenizer {path!r}: unknown kind; expected a sentencepiece '.model' file or an HF "
                   "'tokenizer.json'")


def fingerprint(tokenizer) -> str:
  """Content hash of the tokenizer file (cache key for token lengths)."""
  h = hashlib.sha256(type(tokenizer).__name__.encode())
  h.update(getattr(tokenizer, "eos_token", "").encode())
  with open(tokenizer.path, "rb") as f:
    h.update(f.read())
  return h.hexdigest()[:16]
