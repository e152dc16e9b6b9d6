"""A built dataset plus per-record metadata (source, language, token length), with random access
to tokenised samples.

Token lengths (of the full chat-templated sample) are computed once per (data, tokenizer) pair and
cached in `<cache_dir>/lengths/`, so packing plans are pure functions of (seed, epoch, lengths) and
never need the text again; rows tokenise their few samples on the fly.
"""

import logging
import os

import numpy as np

from apollo_jax.data import chat, tfds_builders
from apollo_jax.data import tokenizer as tok_lib


class Corpus:
  """Records of one TFDS build, in canonical (file) order; record i is `sample(i)`."""

  def __init__(self, source, meta, tokenizer, cache_dir):
    self.source, self.meta, self.tokenizer = source, meta, tokenizer
    self.encoder = chat.ChatEncoder(tokenizer)
    path = os.path.join(cache_dir, "lengths", f"{meta['fingerprint']}-{tok_lib.fingerprint(tokenizer)}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    else:
      arrays = self._scan()
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + f".tmp{os.getpid()}.npz"
      np.savez(tmp, **arrays)
      os.replace(tmp, path)
    self.position = arrays["position"]           # record index -> data-source position
    self.lengths = arrays["lengths"]             # tokens per templated sample (untruncated)
    self.languages = arrays["languages"]
    self.source_ids = arrays["source_ids"]       # index into self.source_names
    self.source_names = [str(s) for s in arrays["source_names"]]

  def __len__(self):
    return len(self.lengths)

  def _scan(self):
    n = len(self.source)
    logging.info("tokenising %d records once to measure their lengths", n)
    position = np.zeros(n, np.int64)
    lengths = np.zeros(n, np.int64)
    languages = np.zeros(n, np.int32)
    source_ids = np.zeros(n, np.int32)
    names = {}
    for pos in range(n):
      element = self.source[pos]
      i = int(element["index"])
      s = tfds_builders.decode_sample(element)
      position[i] = pos
      lengths[i] = len(self.encoder(s.turns)[0])
      languages[i] = s.language
      source_ids[i] = names.setdefault(s.source, len(names))
    return {"position": position, "lengths": lengths, "languages": languages, "source_ids": source_ids,
            "source_names": np.array(list(names), dtype=str)}

  def sources(self, ids=None):
    ids = np.arange(len(self)) if ids is None else ids
    return [self.source_names[k] for k in self.source_ids[ids]]

  def sample(self, i):
    """(ids, labels, language index) of record i."""
    s = tfds_builders.decode_sample(self.source[int(self.position[i])])
    ids, labels = self.encoder(s.turns)
    return ids, labels, s.language

  def text(self, i):
    return tfds_builders.decode_sample(self.source[int(self.position[i])])


def open_corpus(files, cache_dir, tokenizer, skip_bad=False):
  source, meta = tfds_builders.build_dataset(files, cache_dir, skip_bad)
  return Corpus(source, meta, tokenizer, cache_dir)
