"""A pre-tokenised corpus: token ids and labels of every record, read back as arrays.

The cache (built once by token_cache.py) is the TFDS dataset apollo_moe_tokens
(data/tfds_builders.py), record i in file order = {ids int32[n], label_kind uint8[n] (KIND_*:
0 not trained, 1 label = the id, 2 label = EOS, the EOS label at the start of a later user turn,
chat.py), language, source_id}. Beside it, index.npz holds lengths, languages, source_ids and
source_names (packing plans need only these) and apollo_meta.json the build facts (num_records,
tokens, bad records, eos_id), so the loader never tokenises: sample(i) is one random read.
"""

import os

import numpy as np

from apollo_jax.data import chat, tfds_builders

INDEX_NPZ = "index.npz"
KIND_IGNORE, KIND_ID, KIND_EOS = 0, 1, 2


def to_example(language, source_id, ids, labels, eos) -> dict:
  """(ids, labels) of chat.ChatEncoder -> one apollo_moe_tokens example (labels as a uint8 kind)."""
  kind = np.where(labels == chat.IGNORE, KIND_IGNORE, np.where(labels == ids, KIND_ID, KIND_EOS)).astype(np.uint8)
  if not np.all((kind != KIND_EOS) | (labels == eos)):
    raise AssertionError("a label is neither IGNORE, its id nor EOS; chat.py changed: update the cache format")
  return {"ids": ids.astype(np.int32), "label_kind": kind, "language": np.int32(language),
          "source_id": np.int32(source_id)}


def from_example(feature, eos):
  """An apollo_moe_tokens record as read by tfds_builders.ExampleReader -> (ids int32[n],
  labels int32[n], language)."""
  ids = np.frombuffer(feature["ids"].bytes_list.value[0], np.int32)
  kind = np.frombuffer(feature["label_kind"].bytes_list.value[0], np.uint8)
  labels = np.where(kind == KIND_ID, ids, np.where(kind == KIND_EOS, eos, chat.IGNORE)).astype(np.int32)
  return ids, labels, int(feature["language"].int64_list.value[0])


class Corpus:
  """Records of one build, in canonical (file) order; record i is `sample(i)`."""

  def __init__(self, directory, tokenizer):
    self.directory, self.tokenizer = str(directory), tokenizer
    self.meta = tfds_builders.read_meta(self.directory)
    with np.load(os.path.join(self.directory, INDEX_NPZ)) as z:
      self.lengths = z["lengths"]                # tokens per templated sample (untruncated)
      self.languages = z["languages"]
      self.source_ids = z["source_ids"]          # index into self.source_names
      self.source_names = [str(s) for s in z["source_names"]]
    self.eos = int(self.meta["eos_id"])
    self._source = None

  def __getstate__(self):                        # grain workers reopen the dataset themselves
    return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

  @property
  def source(self):
    if self._source is None:
      self._source = tfds_builders.ExampleReader(self.directory)
    return self._source

  def __len__(self):
    return len(self.lengths)

  def sources(self, ids=None):
    ids = np.arange(len(self)) if ids is None else ids
    return [self.source_names[k] for k in self.source_ids[ids]]

  def samples(self, ids):
    """[(ids, labels, language index)] of the records `ids`."""
    if not len(ids):
      return []
    return [from_example(x, self.eos) for x in self.source.read(ids)]

  def sample(self, i):
    return self.samples([i])[0]
