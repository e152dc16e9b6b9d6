"""A pre-tokenised corpus: token ids and labels of every record, read back as arrays.

The cache (built once by token_cache.py) holds, per record, in file order:
  records.array_record  record i = int32 [language, source id] + int32 ids[n] + uint8 kind[n]
                        (kind 0: not trained, 1: label = the id, 2: label = EOS, the EOS label at
                        the start of a later user turn, chat.py)
  meta.npz              lengths, languages, source_ids, source_names: packing plans need only these
  meta.json             build facts (num_records, tokens, bad records, eos_id); written last
so the loader never tokenises: sample(i) is one random read and np.frombuffer.
"""

import json
import os

import numpy as np

from apollo_jax.data import chat

RECORDS, META_NPZ, META_JSON = "records.array_record", "meta.npz", "meta.json"
KIND_IGNORE, KIND_ID, KIND_EOS = 0, 1, 2


def encode_record(language, source_id, ids, labels, eos):
  """(ids, labels) of chat.ChatEncoder -> record bytes (labels stored as a uint8 kind per token)."""
  kind = np.where(labels == chat.IGNORE, KIND_IGNORE, np.where(labels == ids, KIND_ID, KIND_EOS)).astype(np.uint8)
  if not np.all((kind != KIND_EOS) | (labels == eos)):
    raise AssertionError("a label is neither IGNORE, its id nor EOS; chat.py changed: update the cache format")
  return np.asarray([language, source_id], np.int32).tobytes() + ids.astype(np.int32).tobytes() + kind.tobytes()


def decode_record(raw, eos):
  """Record bytes -> (ids int32[n], labels int32[n], language)."""
  n = (len(raw) - 8) // 5
  language = int(np.frombuffer(raw, np.int32, 1)[0])
  ids = np.frombuffer(raw, np.int32, n, offset=8)
  kind = np.frombuffer(raw, np.uint8, n, offset=8 + 4 * n)
  labels = np.where(kind == KIND_ID, ids, np.where(kind == KIND_EOS, eos, chat.IGNORE)).astype(np.int32)
  return ids, labels, language


def is_complete(directory) -> bool:
  return os.path.exists(os.path.join(directory, META_JSON))


class Corpus:
  """Records of one build, in canonical (file) order; record i is `sample(i)`."""

  def __init__(self, directory, tokenizer):
    self.directory, self.tokenizer = str(directory), tokenizer
    with open(os.path.join(self.directory, META_JSON)) as f:
      self.meta = json.load(f)
    with np.load(os.path.join(self.directory, META_NPZ)) as z:
      self.lengths = z["lengths"]                # tokens per templated sample (untruncated)
      self.languages = z["languages"]
      self.source_ids = z["source_ids"]          # index into self.source_names
      self.source_names = [str(s) for s in z["source_names"]]
    self.eos = int(self.meta["eos_id"])
    self._source = None

  def __getstate__(self):                        # grain workers reopen the file themselves
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  @property
  def source(self):
    """The array_record reader (thread-safe reads); one batched read per row is ~2x faster than
    one read per record."""
    if self._source is None:
      from array_record.python import array_record_module
      self._source = array_record_module.ArrayRecordReader(os.path.join(self.directory, RECORDS),
                                                           "readahead_buffer_size:0")
    return self._source

  def __len__(self):
    return len(self.lengths)

  def sources(self, ids=None):
    ids = np.arange(len(self)) if ids is None else ids
    return [self.source_names[k] for k in self.source_ids[ids]]

  def samples(self, ids):
    """[(ids, labels, language index)] of the records `ids`."""
    return [decode_record(raw, self.eos) for raw in self.source.read([int(i) for i in ids])] if len(ids) else []

  def sample(self, i):
    return self.samples([i])[0]
