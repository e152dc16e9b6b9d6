"""Greedy in-order packing of tokenised samples into rows of seq_len (docs/original.md, Packing).

The row plan is a pure function of the sample lengths, so the data order (and the iterator state)
is fully described by (seed, epoch, row index). Differences from the original, on purpose:
  * no groups of 256 samples with a forced flush at each group end (less padding);
  * a sample longer than seq_len is truncated and COUNTED (the original truncated silently).

Modes:
  "segment": segment ids 1, 2, ... per sample and positions 0.. per sample; attention never
             crosses samples (default);
  "causal":  the original: segment id 1 for every real token and positions 0..S-1 along the row,
             so later samples attend to earlier ones (parity experiments only).
Padding: pad_id input and target, segment 0, loss_mask 0, language 0.
"""

import numpy as np

from apollo_jax import config as cfg
from apollo_jax.data import chat

KEYS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "language_ids")


def plan_rows(lengths, seq_len: int):
  """Row boundaries for samples packed in the given order: row r holds samples
  [offsets[r], offsets[r+1]). lengths are truncated to seq_len first."""
  lengths = np.minimum(np.asarray(lengths, np.int64), seq_len)
  offsets = [0]
  fill = 0
  for i, n in enumerate(lengths.tolist()):
    if fill + n > seq_len and fill > 0:
      offsets.append(i)
      fill = 0
    fill += n
  if len(lengths):
    offsets.append(len(lengths))
  return np.asarray(offsets, np.int64)


def empty_row(seq_len: int, pad_id: int):
  row = {k: np.zeros(seq_len, np.int32) for k in KEYS}
  row["input_ids"][:] = pad_id
  row["targets"][:] = pad_id
  return row


def pack_row(samples, seq_len: int, pad_id: int, mode: str = "segment"):
  """samples: iterable of (ids, labels, language_index) -> dict of int32 [seq_len] arrays.

  Samples must fit together (as planned by plan_rows); each one is truncated to seq_len first.
  """
  if mode not in cfg.PACKING_MODES:
    raise ValueError(f"data.packing={mode!r}; choose one of {cfg.PACKING_MODES}")
  row = empty_row(seq_len, pad_id)
  if mode == "causal":
    row["positions"][:] = np.arange(seq_len)    # the original: one position counter per row
  pos = 0
  for seg, (ids, labels, lang) in enumerate(samples, start=1):
    ids, labels = ids[:seq_len], labels[:seq_len]
    n = len(ids)
    if pos + n > seq_len:
      raise ValueError(f"packing plan overflow: sample of {n} tokens at offset {pos} of a {seq_len}-row")
    sl = slice(pos, pos + n)
    targets, mask = chat.shift(ids, labels, pad_id)
    row["input_ids"][sl] = ids
    row["targets"][sl] = targets
    row["loss_mask"][sl] = mask
    row["segment_ids"][sl] = seg if mode == "segment" else 1
    if mode == "segment":
      row["positions"][sl] = np.arange(n)
    row["language_ids"][sl] = lang
    pos += n
  return row


def stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}
