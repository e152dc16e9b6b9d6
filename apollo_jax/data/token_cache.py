"""Build the pre-tokenised corpus once (corpus.py describes it): streaming parse, chat template
and tokenisation in parallel worker processes, written as the TFDS dataset apollo_moe_tokens/h<key>
(data/tfds_builders.py) under `<cache_dir>/tfds`.

Cache key (cheap to check on every start, no re-hash of 13.5 GB): CACHE_VERSION (bump when the
record layout changes), the source of chat.py (the template; any edit rebuilds), the tokenizer
file's hash, skip_bad, and per input file its name, size, mtime and a hash of its first and last MiB. Trade-off: an edit that keeps size, mtime,
head and tail identical is not noticed (only deliberate tampering does that); copying the data
without keeping mtimes (`cp` without -p) rebuilds although nothing changed, which is safe.

Concurrency: processes on one host take a file lock; the first builds into a temporary folder
renamed into place at the end, the others wait and reuse it. A remote cache_dir (gs://... or any
etils epath) is mirrored to local disk (array_record reads local files): process 0 builds and
uploads (apollo_meta.json last = complete), the other hosts wait for it and download.
"""

import collections
import hashlib
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from array import array

import numpy as np

from apollo_jax.data import chat, corpus, records, tfds_builders
from apollo_jax.data import tokenizer as tok_lib

CACHE_VERSION = "apollo_jax-tokens-1"
CHUNK_RECORDS = 512                  # records per task sent to a worker process
WAIT_POLL_S = 5.0


def file_key(path) -> str:
  st = os.stat(path)
  h = hashlib.sha256(f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
  with open(path, "rb") as f:
    h.update(f.read(1 << 20))
    f.seek(max(0, st.st_size - (1 << 20)))
    h.update(f.read(1 << 20))
  return h.hexdigest()


def cache_key(paths, tokenizer, skip_bad) -> str:
  h = hashlib.sha256(f"{CACHE_VERSION}|{tok_lib.fingerprint(tokenizer)}|skip_bad={bool(skip_bad)}".encode())
  with open(chat.__file__, "rb") as f:
    h.update(f.read())
  for p in paths:
    h.update(file_key(p).encode())
  return h.hexdigest()[:20]


def is_remote(path) -> bool:
  return "://" in str(path) and not str(path).startswith("file://")


# ---------------------------------------------------------------------------- tokenising workers

_ENCODER = None


def _init_worker(tokenizer):
  global _ENCODER
  _ENCODER = chat.ChatEncoder(tokenizer)


def _encode_chunk(chunk, encoder=None):
  """[(language, source id, turns)] -> [apollo_moe_tokens example], lengths."""
  enc = encoder or _ENCODER
  out, lengths = [], []
  for language, source_id, turns in chunk:
    ids, labels = enc(turns)
    out.append(corpus.to_example(language, source_id, ids, labels, enc.eos))
    lengths.append(len(ids))
  return out, lengths


def encoded_chunks(chunks, tokenizer, workers):
  """Encoded chunks in input order. The first chunk is encoded here; later ones on `workers`
  spawned processes (none for a one-chunk corpus), with at most 2 * workers chunks in flight."""
  chunks = iter(chunks)
  encoder = chat.ChatEncoder(tokenizer)
  first = next(chunks, None)
  if first is None:
    return
  yield _encode_chunk(first, encoder)
  second = next(chunks, None)
  if second is None:
    return
  rest = itertools.chain([second], chunks)
  if workers <= 1:
    yield from (_encode_chunk(c, encoder) for c in rest)
    return
  ctx = multiprocessing.get_context("spawn")       # fork is unsafe in a process running JAX threads
  with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
    pending = collections.deque()
    for c in rest:
      pending.append(pool.apply_async(_encode_chunk, (c,)))
      if len(pending) >= 2 * workers:
        yield pending.popleft().get()
    while pending:
      yield pending.popleft().get()


def default_workers(workers: int) -> int:
  if workers > 0:
    return workers
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------- build

def _progress(total):
  from tqdm import auto as tqdm
  return tqdm.tqdm(total=total, unit="B", unit_scale=True, desc="tokenising the corpus (once)", mininterval=2.0)


def build(paths, tokenizer, skip_bad, workers, cache_dir, key):
  """Parse, tokenise and write `paths` as apollo_moe_tokens/h<key> under cache_dir (atomically)."""
  bad = records.BadRecords() if skip_bad else None
  names, lengths, langs, sids = {}, array("q"), array("i"), array("i")
  t0 = time.time()
  progress = _progress(sum(os.path.getsize(p) for p in paths))

  def chunks():
    items = (s for p in paths for s in records.iter_dataset_file(p, bad, progress.update))
    for group in iter(lambda: list(itertools.islice(items, CHUNK_RECORDS)), []):
      chunk = [(s.language, names.setdefault(s.source, len(names)), s.turns) for s in group]
      langs.extend(c[0] for c in chunk)
      sids.extend(c[1] for c in chunk)
      yield chunk

  def examples():
    for exs, lens in encoded_chunks(chunks(), tokenizer, default_workers(workers)):
      lengths.extend(lens)
      yield from exs
    progress.close()
    if not len(lengths):
      found = bad.count if bad else 0
      raise ValueError(f"no valid records in {paths}" + (f" ({found} bad ones skipped)" if found else ""))

  def finish(directory):
    np.savez(os.path.join(directory, corpus.INDEX_NPZ), lengths=np.asarray(lengths, np.int64),
             languages=np.asarray(langs, np.int32), source_ids=np.asarray(sids, np.int32),
             source_names=np.array(list(names), dtype=str))
    tally = bad or records.BadRecords()
    return {"files": [str(p) for p in paths], "num_records": len(lengths), "tokens": int(sum(lengths)),
            "bad_records_skipped": tally.count, "bad_reasons": tally.reasons, "eos_id": int(tokenizer.eos_id),
            "version": CACHE_VERSION, "build_seconds": round(time.time() - t0, 2),
            "build_workers": default_workers(workers), "build_pid": os.getpid(), "fingerprint": key}

  try:
    out = tfds_builders.prepare(tfds_builders.ApolloMoeTokens, cache_dir, key, examples(), finish)
  finally:
    progress.close()
  meta = tfds_builders.read_meta(out)
  logging.info("tokenised %d records (%d tokens) in %.1f s: %.0f records/s, %.0f tokens/s -> %s",
               meta["num_records"], meta["tokens"], meta["build_seconds"],
               meta["num_records"] / meta["build_seconds"], meta["tokens"] / meta["build_seconds"], out)
  return out


# ---------------------------------------------------------------------------- remote cache dirs

def _copy_dir(src, dst):
  """Copy a dataset directory src -> dst (any epath on either side); apollo_meta.json goes last,
  so its presence marks the copy complete."""
  from etils import epath
  src, dst = epath.Path(src), epath.Path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  names = sorted(p.name for p in src.iterdir() if p.name != tfds_builders.META_JSON)
  for name in names + [tfds_builders.META_JSON]:
    with (src / name).open("rb") as r, (dst / f"{name}.partial").open("wb") as w:
      shutil.copyfileobj(r, w, 1 << 24)
    (dst / f"{name}.partial").rename(dst / name)


def _mirror(cache_dir, key, local, is_builder, build_fn, wait_s=None):
  """Make `local` hold the build `key` of the remote cache_dir: download it, or build it here and
  upload it (is_builder: process 0), or wait for process 0 to upload it."""
  from etils import epath
  remote = epath.Path(tfds_builders.dataset_dir(str(cache_dir), tfds_builders.ApolloMoeTokens, key))
  if not (remote / tfds_builders.META_JSON).exists():
    if is_builder:
      build_fn()
      _copy_dir(local, remote)
      return
    t0 = time.time()
    while not (remote / tfds_builders.META_JSON).exists():
      if wait_s is not None and time.time() - t0 > wait_s:
        raise TimeoutError(f"waited {wait_s:.0f} s for process 0 to build the token cache {remote}; "
                           "is process 0 running with the same data.train_files and data.tokenizer?")
      logging.info("waiting for process 0 to build the token cache %s", remote)
      time.sleep(WAIT_POLL_S)
  tmp = tfds_builders.temporary_sibling(local)
  _copy_dir(remote, tmp)
  os.replace(tmp, local)


def _unreadable(directory, tokenizer):
  """None if the built cache opens and its first and last records decode, else what failed."""
  try:
    c = corpus.Corpus(directory, tokenizer)
    if len(c) != c.meta["num_records"]:
      return f"{len(c)} records indexed, {c.meta['num_records']} built"
    c.samples([0, len(c) - 1])
    if len(c.source) != len(c):
      return f"{len(c.source)} records stored, {len(c)} indexed"
  except Exception as e:  # noqa: BLE001 (numpy, json, array_record, protobuf: any of them)
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return None


def local_root(cache_dir) -> str:
  if not is_remote(cache_dir):
    return str(cache_dir).removeprefix("file://")
  h = hashlib.sha256(str(cache_dir).encode()).hexdigest()[:12]
  return os.path.join(tempfile.gettempdir(), "apollo_jax_data_cache", h)


def open_corpus(files, cache_dir, tokenizer, skip_bad=False, workers=0, process_index=0, wait_s=None):
  """The Corpus of `files` under cache_dir (a local path or any etils epath), built if needed."""
  paths = records.expand_files(files) if isinstance(files, str) else list(files)
  key = cache_key(paths, tokenizer, skip_bad)
  root = local_root(cache_dir)
  local = tfds_builders.dataset_dir(root, tfds_builders.ApolloMoeTokens, key)
  build_fn = lambda: build(paths, tokenizer, skip_bad, workers, root, key)
  with tfds_builders.locked(os.path.dirname(local) + ".lock"):
    if tfds_builders.is_complete(local):
      problem = _unreadable(local, tokenizer)
      if problem:                      # derived data: rebuild it rather than fail or train on it
        logging.warning("the token cache %s is damaged (%s): rebuilding it", local, problem)
        shutil.rmtree(local)
    if not tfds_builders.is_complete(local):
      if not is_remote(cache_dir):
        build_fn()
      else:
        _mirror(cache_dir, key, local, process_index == 0, build_fn, wait_s)
  c = corpus.Corpus(local, tokenizer)
  if c.meta["bad_records_skipped"]:          # a reused cache still says so, never silently
    records.BadRecords(c.meta["bad_records_skipped"], c.meta["bad_reasons"]).log()
  return c
