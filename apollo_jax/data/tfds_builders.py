"""TFDS builder for local ApolloMoEBench files (array_record, no TensorFlow).

The JSON is parsed and validated once (records.py) and written under
`<cache_dir>/tfds/<builder>/h<content hash>/1.0.0/`; the config name is a hash of the input files'
bytes (and of skip_bad), so editing, adding or removing a file rebuilds automatically and an
unchanged input is reused. Records keep their file order (disable_shuffling) and carry their
global `index` too, so readers never depend on TFDS's write order. Read back with
`builder.as_data_source(split="train")` (random access). (Training data is pre-tokenised
instead: token_cache.py.)
"""

import contextlib
import hashlib
import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from apollo_jax.data import records, token_cache

FORMAT_VERSION = "apollo_jax-data-1"       # bump when the stored features change
STATS_FILE = "apollo_build_stats.json"


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Generator over records handed in by build(); nothing is downloaded."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, rows=None, **kwargs):
    self._rows = rows
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self.FEATURES),
                                 disable_shuffling=True, description=self.__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i, row in enumerate(self._rows):
      yield i, dict(row, index=i)


class ApolloMoeBench(_LocalBuilder):
  """ApolloMoEBench multiple-choice records."""
  FEATURES = {"index": np.int64, **{k: tfds.features.Text() for k in records.BENCH_FIELDS + ("context", "class")}}


def fingerprint(paths, extra: str = "") -> str:
  """Hash of the files' bytes in order (not their paths: moving the data does not rebuild)."""
  h = hashlib.sha256(f"{FORMAT_VERSION}|{extra}|{len(paths)}".encode())
  for p in paths:
    h.update(f"|{os.path.getsize(p)}|".encode())
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
  return h.hexdigest()[:20]


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS warns about 'custom data configuration' (our hash configs are deliberate)."""
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _build(cls, files, cache_dir, skip_bad, read_fn, to_row):
  paths = records.expand_files(files) if isinstance(files, str) else list(files)
  fp = fingerprint(paths, f"skip_bad={bool(skip_bad)}")
  with token_cache.locked(os.path.join(cache_dir, ".build.lock")), _quiet_tfds():
    builder = cls(config=tfds.core.BuilderConfig(name=f"h{fp}"), data_dir=os.path.join(cache_dir, "tfds"),
                  file_format="array_record")
    stats_path = os.path.join(builder.data_dir, STATS_FILE)
    if not builder.is_prepared() or not os.path.exists(stats_path):
      items, bad = read_fn(paths, skip_bad)
      if not items:
        raise ValueError(f"no valid records in {paths}" + (f" ({bad.count} bad ones skipped)" if bad.count else ""))
      if not builder.is_prepared():
        logging.info("building %s (%d records) from %s under %s", cls.__name__, len(items), paths, cache_dir)
        builder._rows = (to_row(x) for x in items)
        builder.download_and_prepare()
      tmp = stats_path + ".tmp"
      with open(tmp, "w") as f:
        json.dump({"files": paths, "num_records": len(items), "bad_records_skipped": bad.count,
                   "bad_reasons": bad.reasons}, f, indent=1)
      os.replace(tmp, stats_path)
    else:
      with open(stats_path) as f:
        meta = json.load(f)
      if meta["bad_records_skipped"]:        # reused cache: still say so, never silently
        records.BadRecords(meta["bad_records_skipped"], meta["bad_reasons"]).log()
  with open(stats_path) as f:
    meta = json.load(f)
  meta["fingerprint"] = fp
  return builder.as_data_source(split="train"), meta


def build_bench(files, cache_dir: str, skip_bad: bool = False):
  """(data source, meta) for ApolloMoEBench files."""
  return _build(ApolloMoeBench, files, cache_dir, skip_bad, records.read_bench, dict)


def _text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def decode_bench(element) -> dict:
  return {k: _text(element[k]) for k in records.BENCH_FIELDS + ("context", "class")}


def load_bench(files, cache_dir: str, skip_bad: bool = False) -> list:
  """ApolloMoEBench records as dicts, in file order (via the TFDS build)."""
  src, _ = build_bench(files, cache_dir, skip_bad)
  out = [None] * len(src)
  for pos in range(len(src)):
    element = src[pos]
    out[int(element["index"])] = decode_bench(element)
  return out
