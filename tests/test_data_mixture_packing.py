"""Mixture (data/mixture.py): defaults, overrides, priority-proportional order. Packing (data/packing.py)."""

import numpy as np
import pytest

from apollo_jax.data import chat, mixture, packing


def test_default_table_and_overrides():
  d = mixture.default_priority
  for key in ("medicalBook_en_qa", "medicalGuideline_ko_qa", "medicalPaper_ru_qa", "medicalWeb_it_qa",
              "medicalWiki_hi_qa"):
    assert d(key)[:2] == (16.0, 1), key
  for key in ("medicalExam_de", "medicalPatient_ar", "general_en", "code_zh", "math_en", "general_ckb",
              "medicalExam_sw", "medicalBook_ckb_qa"):
    assert d(key)[:2] == (2.0, 2), key
  assert d("myNewSource_en") == (2.0, 1, False)        # unknown: documented default, no KeyError
  prio, rep, unknown = mixture.weights(["general_en", "medicalWeb_en_qa", "x_en", "general_en"],
                                       "medicalWeb=8:3,general=1:1,general_en=4")
  assert prio.tolist() == [4.0, 8.0, 2.0, 4.0] and rep.tolist() == [1, 3, 1, 1] and unknown == ["x_en"]
  for bad in ("general", "general=0:1", "general=2:0", "general=a:b", "=2:1"):
    with pytest.raises(ValueError, match="data.priorities"):
      mixture.parse_priorities(bad)


def test_order_repeats_and_determinism():
  prio = np.array([16.0, 2.0, 2.0, 16.0])
  rep = np.array([1, 2, 3, 1])
  o = mixture.order(prio, rep, seed=3407, epoch=0)
  assert np.bincount(o).tolist() == [1, 2, 3, 1]
  assert (o == mixture.order(prio, rep, 3407, 0)).all()
  big_p, big_r = np.r_[np.full(500, 16.0), np.full(500, 2.0)], np.ones(1000, int)
  a = mixture.order(big_p, big_r, 3407, 0)
  assert not (a == mixture.order(big_p, big_r, 3407, 1)).all()
  assert not (a == mixture.order(big_p, big_r, 42, 0)).all()


def test_order_follows_priorities_statistically():
  """Exponential race == sequential sampling without replacement proportional to priority."""
  n = 600
  prio = np.r_[np.full(n, 16.0), np.full(n, 2.0)]
  is16 = prio == 16
  first = int(0.2 * 2 * n)
  ours_frac, pair = [], []
  for seed in range(20):
    o = mixture.order(prio, np.ones(2 * n, int), seed)
    ours_frac.append(is16[o[:first]].mean())
    rank = np.empty(2 * n, int)
    rank[o] = np.arange(2 * n)
    # P(a given priority-2 item precedes a given priority-16 item) = 2 / 18 exactly
    r16 = np.sort(rank[is16])
    pair.append(np.searchsorted(r16, rank[~is16]).sum() / n / n)
    pair[-1] = 1 - pair[-1]
  # independent reference: literally draw one item at a time with probability ∝ priority
  rng = np.random.default_rng(123)
  ref_frac = []
  for _ in range(200):
    left16, left2, got16 = n, n, 0
    for _ in range(first):
      if rng.random() < 16 * left16 / (16 * left16 + 2 * left2):
        left16, got16 = left16 - 1, got16 + 1
      else:
        left2 -= 1
    ref_frac.append(got16 / first)
  assert abs(np.mean(ours_frac) - np.mean(ref_frac)) < 0.01, (np.mean(ours_frac), np.mean(ref_frac))
  assert 0.8 < np.mean(ref_frac) < 0.95
  assert abs(np.mean(pair) - 2 / 18) < 0.01, np.mean(pair)


def _sample(n, start, lang, label_from=1):
  ids = np.arange(start, start + n, dtype=np.int32)
  labels = np.where(np.arange(n) >= label_from, ids, chat.IGNORE).astype(np.int32)
  return ids, labels, lang


def test_plan_rows_greedy_in_order():
  assert packing.plan_rows([5, 3, 4, 8, 2], 8).tolist() == [0, 2, 3, 4, 5]
  assert packing.plan_rows([12, 1, 7, 1], 8).tolist() == [0, 1, 3, 4]     # 12 truncated to 8
  assert packing.plan_rows([], 8).tolist() == [0]


def test_pack_row_segments_positions_languages():
  samples = [_sample(3, 100, 4), _sample(4, 200, 7, label_from=2)]
  row = packing.pack_row(samples, 10, pad_id=0, mode="segment")
  assert row["input_ids"].tolist() == [100, 101, 102, 200, 201, 202, 203, 0, 0, 0]
  assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0, 0, 0]
  assert row["positions"].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 0, 0]
  assert row["language_ids"].tolist() == [4, 4, 4, 7, 7, 7, 7, 0, 0, 0]
  # targets shifted within each sample; the last token of a sample predicts nothing
  assert row["targets"].tolist() == [101, 102, 0, 201, 202, 203, 0, 0, 0, 0]
  assert row["loss_mask"].tolist() == [1, 1, 0, 0, 1, 1, 0, 0, 0, 0]
  assert all(v.dtype == np.int32 and v.shape == (10,) for v in row.values())


def test_no_target_crosses_a_boundary_random():
  rng = np.random.default_rng(0)
  lens = rng.integers(1, 30, size=60)
  seq = 32
  samples = [_sample(int(n), 1000 * i, i % 50, label_from=0) for i, n in enumerate(lens)]
  offsets = packing.plan_rows(lens, seq)
  for r in range(len(offsets) - 1):
    row = packing.pack_row(samples[offsets[r]:offsets[r + 1]], seq, pad_id=0)
    seg = row["segment_ids"]
    for t in range(seq):
      same_next = t + 1 < seq and seg[t + 1] == seg[t] and seg[t] > 0
      if row["loss_mask"][t]:
        assert same_next and row["targets"][t] == row["input_ids"][t + 1]
      elif seg[t] > 0:
        assert not same_next                    # labels from 0: only sample ends are untrained
      if seg[t] > 0:
        assert row["language_ids"][t] == (row["input_ids"][t] // 1000) % 50
  assert offsets[-1] == 60


def test_causal_mode_reproduces_original():
  samples = [_sample(3, 100, 4), _sample(4, 200, 7)]
  row = packing.pack_row(samples, 10, pad_id=5, mode="causal")
  assert row["segment_ids"].tolist() == [1] * 7 + [0] * 3
  assert row["positions"].tolist() == list(range(10))
  assert row["input_ids"].tolist()[7:] == [5, 5, 5] and row["targets"].tolist()[7:] == [5, 5, 5]
  # targets are still per sample (the original's labels are IGNORE at a new sample's first turn)
  assert row["targets"].tolist()[:7] == [101, 102, 5, 201, 202, 203, 5]
  assert row["loss_mask"].tolist() == [1, 1, 0, 1, 1, 1, 0, 0, 0, 0]


def test_truncation_and_overflow():
  row = packing.pack_row([_sample(12, 0, 1)], 8, pad_id=0)
  assert row["input_ids"].tolist() == list(range(8)) and row["loss_mask"].tolist() == [1] * 7 + [0]
  with pytest.raises(ValueError, match="overflow"):
    packing.pack_row([_sample(5, 0, 1), _sample(5, 0, 1)], 8, pad_id=0)
  with pytest.raises(ValueError, match="data.packing"):
    packing.pack_row([], 8, 0, mode="flash")
