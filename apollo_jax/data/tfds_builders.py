"""The datasets apollo_jax builds, as TensorFlow Datasets (array_record, no TensorFlow).

  apollo_moe_tokens   the pre-tokenised training corpus (built by data/token_cache.py; fields in
                      data/corpus.py), read by the grain loader (data/pipeline.py)
  apollo_moe_bench    ApolloMoEBench records, validated, read by evaluate, analyze and the
                      in-training benchmark (evaluation/bench.py)

Each build of inputs with fingerprint F is the TFDS dataset `<name>/h<F>` under
`<cache_dir>/tfds`, in input order (disable_shuffling; keys are record indices), plus
apollo_meta.json (build facts, written last: its presence means complete). A user reads one with
`tfds.builder_from_directory(<cache_dir>/tfds/<name>/h<F>/1.0.0)`, or, with this module imported,
`tfds.data_source("<name>/h<F>", data_dir="<cache_dir>/tfds")`. Builds are atomic (a temporary
data_dir renamed into place) and one per host at a time (a lock file per fingerprint).
"""

import contextlib
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import sys

import numpy as np
import tensorflow_datasets as tfds

from apollo_jax.data import records

VERSION = "1.0.0"
META_JSON = "apollo_meta.json"
BENCH_FORMAT = "apollo_jax-bench-1"        # bump when the stored bench features change


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """A generator over examples handed in by `prepare`; nothing is downloaded."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, examples=None, **kwargs):
    self._examples = examples
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(self.FEATURES),
                                 disable_shuffling=True, description=self.__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield from enumerate(self._examples)

  def _log_download_bytes(self):             # TFDS prints these to stdout; builds log their own
    pass

  def _log_download_done(self):
    pass


class ApolloMoeTokens(_LocalBuilder):
  """Pre-tokenised ApolloMoEDataset conversations: token ids, a per-token label kind (0: not
  trained, 1: label = the id, 2: label = EOS), the language index and the source id (names in
  apollo_meta.json)."""
  # Arrays stored as raw bytes (Encoding.BYTES): decoded with one np.frombuffer (ExampleReader).
  FEATURES = {"ids": tfds.features.Tensor(shape=(None,), dtype=np.int32, encoding=tfds.features.Encoding.BYTES),
              "label_kind": tfds.features.Tensor(shape=(None,), dtype=np.uint8,
                                                 encoding=tfds.features.Encoding.BYTES),
              "language": np.int32, "source_id": np.int32}


class ApolloMoeBench(_LocalBuilder):
  """ApolloMoEBench multiple-choice records (validated when built), with their bench `index`."""
  FEATURES = {"index": np.int64, **{k: tfds.features.Text() for k in records.BENCH_FIELDS + ("context", "class")}}


def dataset_dir(cache_dir, cls, key) -> str:
  return os.path.join(cache_dir, "tfds", cls.name, f"h{key}", VERSION)


def is_complete(directory) -> bool:
  return os.path.exists(os.path.join(directory, META_JSON))


def read_meta(directory) -> dict:
  with open(os.path.join(directory, META_JSON)) as f:
    return json.load(f)


def data_source(directory):
  """Random-access TFDS data source of a built dataset directory."""
  with _quiet_tfds():
    return tfds.builder_from_directory(directory).as_data_source(split="train")


class ExampleReader:
  """Random reads of a built dataset's array_record shards, parsed straight from the stored
  tf.train.Example protos: 4x the rate of the TFDS data source's generic decoder on the token
  cache (benchmarks/data_pipeline.py; tests/test_data_cache.py checks both give the same).
  `read(ids)` returns each record's {feature name: Feature proto}. Pickles as its directory."""

  def __init__(self, directory):
    self.directory = str(directory)
    with _quiet_tfds():
      split = tfds.builder_from_directory(self.directory).info.splits["train"]
    self.paths = [os.path.join(self.directory, f) for f in split.filenames]
    self.starts = np.concatenate([[0], np.cumsum(split.shard_lengths)])
    self._readers = None

  def __getstate__(self):
    return {**self.__dict__, "_readers": None}

  def __len__(self):
    return int(self.starts[-1])

  def read(self, ids) -> list:
    from array_record.python import array_record_module
    from tensorflow_datasets.proto import tf_example_pb2
    if self._readers is None:
      self._readers = [array_record_module.ArrayRecordReader(p, "readahead_buffer_size:0") for p in self.paths]
    ids = np.asarray(ids, np.int64)
    shard = np.searchsorted(self.starts, ids, side="right") - 1
    out = [None] * len(ids)
    for s in np.unique(shard):
      pos = np.flatnonzero(shard == s)
      for p, raw in zip(pos, self._readers[s].read([int(i) for i in ids[pos] - self.starts[s]])):
        out[p] = tf_example_pb2.Example.FromString(raw).features.feature
    return out


@contextlib.contextmanager
def locked(path):
  """Exclusive lock on `path` (a lock file) shared by the processes of one host."""
  import fcntl
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def temporary_sibling(path) -> str:
  """A fresh temporary sibling of `path`, unique per host and process (shared file systems)."""
  tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  return tmp


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS warns about 'custom data configuration' (our fingerprint configs are deliberate) and
  draws its own progress bars (builds show ours)."""
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def prepare(cls, cache_dir, key, examples, finish) -> str:
  """Write `examples` as the dataset cls/h<key> and return its directory. `finish(directory)`
  runs after the examples are written and returns the build facts for apollo_meta.json, which is
  written last; then the directory is renamed into place. Nothing is left behind on failure."""
  final = dataset_dir(cache_dir, cls, key)
  shutil.rmtree(final, ignore_errors=True)            # an unfinished earlier build
  tmp = temporary_sibling(os.path.dirname(final))
  try:
    with _quiet_tfds():
      builder = cls(examples=examples, config=tfds.core.BuilderConfig(name=f"h{key}"), data_dir=tmp,
                    file_format="array_record")
      builder.download_and_prepare()
    meta = finish(builder.data_dir)
    with open(os.path.join(builder.data_dir, META_JSON), "w") as f:
      json.dump(meta, f, indent=1)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    os.replace(builder.data_dir, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


# ---------------------------------------------------------------------------- ApolloMoEBench

def fingerprint(paths, extra: str = "") -> str:
  """Hash of the files' bytes in order (not their paths: moving the data does not rebuild)."""
  h = hashlib.sha256(f"{BENCH_FORMAT}|{extra}|{len(paths)}".encode())
  for p in paths:
    h.update(f"|{os.path.getsize(p)}|".encode())
    with open(p, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        h.update(chunk)
  return h.hexdigest()[:20]


def _source_hash(fn) -> str:
  """Hash of the module that defines `fn` (a changed validation rule rebuilds)."""
  return hashlib.sha256(inspect.getsource(sys.modules[fn.__module__]).encode()).hexdigest()[:12] if fn else ""


def build_bench(files, cache_dir: str, skip_bad: bool = False, validate=None):
  """(dataset directory of ApolloMoEBench `files`, whether it was built now). `validate(record, where)`
  (e.g. evaluation/bench.py's parser) may reject records at build time: raised, or with
  skip_bad counted in the build facts."""
  paths = records.expand_files(files) if isinstance(files, str) else list(files)
  key = fingerprint(paths, f"skip_bad={bool(skip_bad)}|{_source_hash(validate)}")
  directory = dataset_dir(cache_dir, ApolloMoeBench, key)
  with locked(os.path.dirname(directory) + ".lock"):
    if is_complete(directory):
      return directory, False
    keep = None if validate is None else (lambda r, where: (validate(r, where), r)[1])
    items, bad = records.read_bench(paths, skip_bad, parse=keep)     # logs what it skips
    if not items:
      raise ValueError(f"no valid records in {paths}" + (f" ({bad.count} bad ones skipped)" if bad.count else ""))
    logging.info("building %s (%d records) from %s under %s", ApolloMoeBench.name, len(items), paths, cache_dir)
    prepare(ApolloMoeBench, cache_dir, key, (dict(r, index=i) for i, r in enumerate(items)),
            lambda _: {"files": paths, "num_records": len(items), "bad_records_skipped": bad.count,
                       "bad_reasons": bad.reasons, "fingerprint": key})
  return directory, True


def _text(x):
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def load_bench(files, cache_dir: str, skip_bad: bool = False, validate=None):
  """(records as dicts in bench order, BadRecords of the build) through the TFDS dataset."""
  directory, built = build_bench(files, cache_dir, skip_bad, validate)
  src, meta = data_source(directory), read_meta(directory)
  out = [None] * len(src)
  for element in src.__getitems__(list(range(len(src)))):
    out[int(element["index"])] = {k: _text(element[k]) for k in records.BENCH_FIELDS + ("context", "class")}
  bad = records.BadRecords(meta["bad_records_skipped"], meta["bad_reasons"])
  if not built:                                # a reused build still says so, never silently
    bad.log("benchmark records")
  return out, bad
