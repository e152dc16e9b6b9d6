"""make_data(config, cache_dir, process_index, process_count): the training and eval data.

Records come pre-tokenised from token_cache (built once per data/tokenizer change); rows only read
their samples' arrays and pack them. Data.steps_for_epochs(e) converts epochs into steps.

Train stream: epoch e orders the train records by priority (mixture.order with seed
(data.order_seed, e)), packs them greedily into rows (packing.plan_rows) and the epochs are
concatenated into one endless stream of rows. Step s uses global rows [s*G, (s+1)*G) with
G = global_batch; process p reads only rows s*G + p*G/P ... + G/P - 1 (disjoint, covering).
Every row is a pure function of (seed, epoch, token lengths, row index), so the grain iterator's
state is just {"next_index": step}: get_state()/set_state() resume exactly, and
grain.checkpoint.CheckpointSave works on it. (With data.num_workers > 0 grain's multiprocess
iterator has its own state format: resume with the same num_workers.)

Eval: the held-out records (a seeded `data.eval_fraction` of train_files, or data.eval_files) in a
fixed seeded order, packed once; eval_batches() yields at most config.eval_batches batches, the
last one padded with empty rows (loss_mask 0) so every batch has the same shape
(config.eval_batches <= 0: all of them). An empty eval split is not an error: skip_empty_eval()
turns evaluation off with a logged note.
"""

import dataclasses
import logging
import threading
from collections import Counter

import numpy as np

from apollo_jax import languages
from apollo_jax.data import mixture, packing, token_cache
from apollo_jax.data import tokenizer as tok_lib


@dataclasses.dataclass
class Data:
  train_iter: object            # grain DatasetIterator (get_state / set_state), endless
  eval_batches: object          # () -> fresh finite iterator of batches
  tokenizer: object
  stats: dict
  rows: object = None           # TrainRows: steps_for_epochs(), epoch_rows()
  local_cache: str = ""         # this host's data cache dir (other TFDS builds go there too)

  def steps_for_epochs(self, epochs: float) -> int:
    """Optimizer steps that cover `epochs` passes over the train split (fractions allowed)."""
    return self.rows.steps_for_epochs(epochs)


class TrainRows:
  """Random-access grain source: item i = this process's i-th row of the endless row stream."""

  def __init__(self, corpus, record_ids, seed, seq_len, mode, pad_id, global_batch, process_index,
               process_count, priorities=""):
    self.corpus, self.record_ids = corpus, np.asarray(record_ids, np.int64)
    self.seed, self.seq_len, self.mode, self.pad_id = seed, seq_len, mode, pad_id
    self.global_batch, self.local = global_batch, global_batch // process_count
    self.process_index = process_index
    self.prio, self.repeat, self.unknown_sources = mixture.weights(corpus.sources(self.record_ids), priorities)
    self._init_cache()

  def _init_cache(self):
    self._lock = threading.RLock()      # grain reads rows from several threads
    self._plans = {}                    # epoch -> (order, offsets), a few recent epochs
    self._row_starts = [0]              # global row index where epoch e starts

  def __getstate__(self):               # grain worker processes: rebuild caches and lock there
    state = dict(self.__dict__)
    for k in ("_lock", "_plans", "_row_starts"):
      state.pop(k)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_cache()

  def __len__(self):
    return 2**62                        # endless (grain's MapDataset needs a length)

  def plan(self, epoch):
    """(record ids in order, row offsets) of one epoch."""
    with self._lock:
      if epoch not in self._plans:
        order = self.record_ids[mixture.order(self.prio, self.repeat, self.seed, epoch)]
        offsets = packing.plan_rows(self.corpus.lengths[order], self.seq_len)
        if len(self._plans) >= 4:
          self._plans.pop(min(self._plans))
        self._plans[epoch] = (order, offsets)
      return self._plans[epoch]

  def locate(self, g):
    """Global row g -> (epoch, row within the epoch)."""
    with self._lock:
      while g >= self._row_starts[-1]:
        epoch = len(self._row_starts) - 1
        self._row_starts.append(self._row_starts[-1] + len(self.plan(epoch)[1]) - 1)
      epoch = int(np.searchsorted(self._row_starts, g, side="right")) - 1
      return epoch, g - self._row_starts[epoch]

  def epoch_rows(self, epoch: int) -> int:
    """Packed rows of one epoch (epochs differ slightly: each has its own order)."""
    return len(self.plan(epoch)[1]) - 1

  def steps_for_epochs(self, epochs: float) -> int:
    if epochs <= 0:
      raise ValueError(f"epochs={epochs} must be > 0")
    whole = int(epochs)
    rows = sum(self.epoch_rows(e) for e in range(whole))
    rows += (epochs - whole) * self.epoch_rows(whole) if epochs > whole else 0
    return max(1, int(np.ceil(rows / self.global_batch)))

  def global_row(self, i):
    step, j = divmod(int(i), self.local)
    return step * self.global_batch + self.process_index * self.local + j

  def __getitem__(self, i):
    epoch, row = self.locate(self.global_row(i))
    order, offsets = self.plan(epoch)
    ids = order[offsets[row]:offsets[row + 1]]
    return packing.pack_row(self.corpus.samples(ids), self.seq_len, self.pad_id, self.mode)


def split_eval(n, fraction, seed):
  """Deterministic held-out record indices (sorted) and the rest, by seed."""
  k = int(round(fraction * n))
  if fraction > 0 and n >= 2:
    k = min(max(k, 1), n - 1)
  held = np.sort(np.random.default_rng([int(seed), 1]).choice(n, size=k, replace=False))
  return np.setdiff1d(np.arange(n), held), held


def eval_rows_fn(corpus, ids, config, process_index, process_count):
  """eval_batches(): packs `ids` in a seeded order and yields this process's share of each batch."""
  d = config.data
  order = np.asarray(ids)[np.random.default_rng([int(d.order_seed), 2]).permutation(len(ids))]
  offsets = packing.plan_rows(corpus.lengths[order], d.seq_len) if len(order) else np.zeros(1, np.int64)
  n_rows, g = len(offsets) - 1, config.global_batch
  local = g // process_count
  n_batches = -(-n_rows // g)
  if config.eval_batches > 0:
    n_batches = min(n_batches, config.eval_batches)
  pad = corpus.tokenizer.pad_id

  def row(r):
    if r >= n_rows:
      return packing.empty_row(d.seq_len, pad)
    return packing.pack_row(corpus.samples(order[offsets[r]:offsets[r + 1]]), d.seq_len, pad,
                            d.packing)

  def eval_batches():
    for b in range(n_batches):
      start = b * g + process_index * local
      yield packing.stack([row(r) for r in range(start, start + local)])

  return eval_batches, n_rows


def _grain_iter(rows, local, num_workers):
  import grain
  ds = grain.MapDataset.source(rows).batch(local, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  if num_workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():     # grain workers read absl flags: unparsed -> UnparsedFlagAccessError
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def make_data(config, cache_dir, process_index=0, process_count=1):
  d = config.data
  g = config.global_batch
  if g % process_count:
    raise ValueError(f"global_batch={g} must be divisible by the {process_count} processes")
  if not 0 <= d.eval_fraction < 1:
    raise ValueError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
  tok = tok_lib.load_tokenizer(d.tokenizer, d.get("eos_token", ""))
  vocab = config.model.vocab_size
  if tok.vocab_size > vocab:
    raise ValueError(f"tokenizer {d.tokenizer} has {tok.vocab_size} tokens but model.vocab_size={vocab}; "
                     "raise model.vocab_size (ids beyond it would be silently clipped)")
  corpus = lambda files: token_cache.open_corpus(files, cache_dir, tok, d.skip_bad_records, d.build_workers,
                                                 process_index)
  train = corpus(d.train_files)
  bad = train.meta["bad_records_skipped"]
  if d.eval_files:
    ev = corpus(d.eval_files)
    bad += ev.meta["bad_records_skipped"]
    train_ids, eval_ids = np.arange(len(train)), np.arange(len(ev))
  else:
    ev = train
    train_ids, eval_ids = split_eval(len(train), d.eval_fraction, d.order_seed)
  if not len(train_ids):
    raise ValueError(f"no training records in {d.train_files}")

  rows = TrainRows(train, train_ids, d.order_seed, d.seq_len, d.packing, tok.pad_id, g, process_index,
                   process_count, d.priorities)
  if rows.unknown_sources:
    logging.warning("source keys not in the default mixture table use priority %g, repeat %d: %s",
                    *mixture.UNKNOWN_DEFAULT, ", ".join(rows.unknown_sources))
  eval_batches, eval_rows = eval_rows_fn(ev, eval_ids, config, process_index, process_count)

  order0, offsets0 = rows.plan(0)
  lens = np.minimum(train.lengths[train_ids], d.seq_len)
  epoch_tokens = int(np.minimum(train.lengths[order0], d.seq_len).sum())
  truncated = int((train.lengths[train_ids] > d.seq_len).sum() + (ev.lengths[eval_ids] > d.seq_len).sum())
  stats = {
      "bad_records_skipped": int(bad),
      "train_samples": int(len(train_ids)),
      "eval_samples": int(len(eval_ids)),
      "train_tokens": int(lens.sum()),
      "eval_tokens": int(np.minimum(ev.lengths[eval_ids], d.seq_len).sum()),
      "truncated_samples": truncated,
      "epoch_samples": int(len(order0)),          # with repeat counts
      "rows_per_epoch": int(len(offsets0) - 1),
      "steps_per_epoch": (len(offsets0) - 1) / g,
      "packing_efficiency": epoch_tokens / max(1, (len(offsets0) - 1) * d.seq_len),
      "eval_rows": int(eval_rows),
      "tokenizer_vocab": int(tok.vocab_size),
      "unknown_sources": rows.unknown_sources,
      "train_samples_per_language": {languages.CODES[k]: int(v) for k, v in
                                     sorted(Counter(train.languages[train_ids].tolist()).items())},
  }
  if truncated:
    logging.warning("%d samples are longer than data.seq_len=%d and are truncated", truncated, d.seq_len)
  logging.info("data: %s", {k: v for k, v in stats.items() if k != "train_samples_per_language"})
  train_iter = _grain_iter(rows, g // process_count, d.num_workers)
  return Data(train_iter, eval_batches, tok, stats, rows, token_cache.local_root(cache_dir))


def skip_empty_eval(config, data):
  """config, with eval_every=0 and a logged note when there is nothing to evaluate (e.g. the big
  configs' data.eval_fraction=0 without data.eval_files), instead of failing at the first eval."""
  if data.stats["eval_rows"] or config.eval_every <= 0:
    return config
  logging.warning("no evaluation: the eval split is empty (data.eval_fraction=%g, data.eval_files=%r); set "
                  "data.eval_files=... or data.eval_fraction>0 to evaluate", config.data.eval_fraction,
                  config.data.eval_files)
  config = config.copy_and_resolve_references()
  config.eval_every = 0
  return config

