"""Routing rules on tiny hand-computed cases (expected values written out) and numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import config as cfg
from apollo_jax.model import routing
from tolerance import assert_close

F, T = False, True

# 5 tokens, 4 experts. Top-2 of rows 0-3 is [0, 1]; of row 4 it is [3, 2].
PROBS = np.array([[0.5, 0.3, 0.15, 0.05]] * 4 + [[0.1, 0.2, 0.3, 0.4]], np.float32)
FAMILY = np.array([2, 1, 0, -1, 0], np.int32)


def _route(mode, k=2, probs=PROBS, family=FAMILY, norm=False, num_real=None):
  out = routing.route(jnp.asarray(probs), k, mode, None if family is None else jnp.asarray(family),
                      norm, num_real)
  return [np.asarray(a) for a in out]


def test_hybrid_replaces_lowest_slot_only_when_family_missing():
  idx, w, valid, fam = _route("hybrid")
  np.testing.assert_array_equal(idx, [[0, 2],    # f=2 missing -> replaces slot 1 (the lower one)
                                      [0, 1],    # f=1 already second choice -> unchanged
                                      [0, 1],    # f=0 already first choice -> unchanged
                                      [0, 1],    # f=-1: no expert -> plain top-k
                                      [3, 0]])   # f=0 missing -> replaces slot 1 (was 2)
  np.testing.assert_allclose(w, [[0.5, 0.15], [0.5, 0.3], [0.5, 0.3], [0.5, 0.3], [0.4, 0.1]])
  np.testing.assert_array_equal(valid, np.ones((5, 2), bool))
  np.testing.assert_array_equal(fam, [[F, T], [F, T], [T, F], [F, F], [F, T]])


def test_hybrid_k3_replaces_slot_k_minus_1():
  idx, w, _, _ = _route("hybrid", k=3, probs=np.array([[0.4, 0.3, 0.2, 0.1]], np.float32),
                        family=np.array([3], np.int32))
  np.testing.assert_array_equal(idx, [[0, 1, 3]])
  np.testing.assert_allclose(w, [[0.4, 0.3, 0.1]])


def test_weights_renormalised_only_with_norm_topk_prob():
  _, w, _, _ = _route("hybrid", norm=True)
  assert_close(w, [[0.5 / 0.65, 0.15 / 0.65], [0.5 / 0.8, 0.3 / 0.8],          # f32 w / (sum of 2)
                   [0.5 / 0.8, 0.3 / 0.8], [0.5 / 0.8, 0.3 / 0.8],
                   [0.4 / 0.5, 0.1 / 0.5]], dtype=np.float32, terms=2)
  _, w, _, _ = _route("topk", norm=False)
  np.testing.assert_allclose(w, [[0.5, 0.3]] * 4 + [[0.4, 0.3]])


def test_topk_ignores_language():
  idx, w, valid, fam = _route("topk")
  np.testing.assert_array_equal(idx, [[0, 1]] * 4 + [[3, 2]])
  assert not fam.any() and valid.all()


def test_language_mode_weight_one_and_fallback():
  idx, w, valid, fam = _route("language")
  np.testing.assert_array_equal(idx[:, 0], [2, 1, 0, 0, 0])
  np.testing.assert_array_equal(valid, [[T, F], [T, F], [T, F], [T, T], [T, F]])
  np.testing.assert_allclose(w, [[1, 0], [1, 0], [1, 0], [0.5, 0.3], [1, 0]])
  np.testing.assert_array_equal(fam, [[T, F], [T, F], [T, F], [F, F], [T, F]])


def test_modes_needing_language_fail_clearly_without_it():
  with pytest.raises(ValueError, match="needs the tokens"):
    routing.route(jnp.asarray(PROBS), 2, "hybrid", None)
  with pytest.raises(ValueError, match="unknown routing mode"):
    routing.route(jnp.asarray(PROBS), 2, "family", jnp.asarray(FAMILY))


def test_padded_experts_get_zero_prob_and_are_never_chosen():
  logits = jnp.array([[1.0, 2.0, 3.0], [0.0, -200.0, -200.0]])   # row 1: probs underflow to 0
  probs = routing.router_probs(logits, 5)
  e = np.exp([1.0, 2.0, 3.0])
  assert_close(probs[0, :3], e / e.sum(), dtype=np.float32, terms=3)   # f32 softmax over 3
  np.testing.assert_array_equal(probs[0, 3:], 0)                       # padded: exactly 0
  np.testing.assert_array_equal(probs[1], [1, 0, 0, 0, 0])
  for mode in ("topk", "hybrid"):
    idx, _, _, _ = routing.route(probs, 3, mode, jnp.array([-1, -1]), num_real=3)
    assert np.asarray(idx).max() < 3, idx
  _, idx = routing.top_k(probs, 3, num_real=3)
  np.testing.assert_array_equal(idx, [[2, 1, 0], [0, 1, 2]])


def test_capacity_formula():
  assert cfg.capacity(16, 7, 2, 2.0, 4) == 10        # ceil(2*16*2/7) = ceil(9.14)
  assert cfg.capacity(8, 7, 2, 1.0, 4) == 4          # ceil(2.29) = 3 -> floor at min_capacity 4
  assert cfg.capacity(8, 7, 2, 1.0, 1) == 3
  assert cfg.capacity(8, 2, 2, 4.0, 4) == 8          # capped at the group size
  assert cfg.capacity(16, 7, 2, 0.0, 4) == 16        # cf <= 0: no drop
  assert cfg.capacity(16, 7, 2, -1.0, 4) == 16


def test_priority_levels():
  np.testing.assert_array_equal(routing.priority_levels(jnp.array([[F, F], [F, T], [T, F]])),
                                [[1, 2], [1, 0], [0, 2]])


# One group of 4 tokens, 2 experts, top-2. t1's slot 1 and t3's slot 0 are family assignments.
IDX = np.array([[[0, 1], [1, 0], [0, 1], [0, 1]]], np.int32)
IS_FAM = np.array([[[F, F], [F, T], [F, F], [T, F]]])


def _positions(valid):
  return np.asarray(routing.capacity_positions(
      jnp.asarray(IDX), jnp.asarray(valid), routing.priority_levels(jnp.asarray(IS_FAM)), 2))


def test_capacity_positions_and_drop_priority():
  pos = _positions(np.ones((1, 4, 2), bool))
  # expert 0 queue: level 0: t1, t3; level 1 (first choices): t0, t2.
  # expert 1 queue: level 1: t1; level 2 (second choices): t0, t2, t3.
  np.testing.assert_array_equal(pos, [[[2, 1], [0, 0], [3, 2], [1, 3]]])
  keep = pos < 2
  # forced family assignments (t1->0, t3->0) survive; unforced first choices t0, t2 of expert 0
  # are dropped; t1's first choice beats every second choice; t0 beats t2 (earlier token).
  np.testing.assert_array_equal(keep, [[[F, T], [T, T], [F, F], [T, F]]])


def test_invalid_assignments_use_no_capacity():
  valid = np.ones((1, 4, 2), bool)
  valid[0, 2] = False                    # t2 is padding
  pos = _positions(valid)
  np.testing.assert_array_equal(pos[0, [0, 1, 3]], [[2, 1], [0, 0], [1, 2]])


def test_capacity_slots():
  # group of 2 tokens, K=2, E=2, C=2: t0 -> e0 slot 0 (kept), e1 (dropped); t1 -> e1 slot 0, e0 slot 1
  slot, slot_token, slot_assignment = routing.capacity_slots(
      jnp.array([[[0, 1], [1, 0]]]), jnp.array([[[T, F], [T, T]]]), jnp.array([[[0, 0], [0, 1]]]), 2, 2)
  np.testing.assert_array_equal(slot, [[[0, 4], [2, 1]]])                  # e*C + c; 4 = dropped
  np.testing.assert_array_equal(slot_token, [[0, 1, 1, 2]])               # 2 = empty slot
  np.testing.assert_array_equal(slot_assignment, [[0, 3, 2, 4]])          # s*K + k; 4 = empty


def _np_softmax(x):
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def test_aux_and_z_loss_match_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
  mask = rng.random((2, 6)) > 0.3
  probs = routing.router_probs(jnp.asarray(logits), 8)            # 3 padded experts
  _, idx = routing.top_k(probs, 2, num_real=5)
  aux = routing.load_balancing_loss(probs, idx, jnp.asarray(mask), 5)
  z = routing.z_loss(jnp.asarray(logits), jnp.asarray(mask))
  ent = routing.router_entropy(probs, jnp.asarray(mask))

  p = _np_softmax(logits.astype(np.float64))[mask]                 # [N, 5] non-padding tokens
  top = np.argsort(-p, axis=-1)[:, :2]
  frac = np.bincount(top.ravel(), minlength=5) / top.size
  # f32 vs float64: a softmax over the 5 experts, then sums over them and means over the N tokens
  terms = 5 + mask.size
  assert_close(aux, 5 * np.sum(frac * p.mean(0)), dtype=np.float32, terms=terms)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))[mask]
  assert_close(z, np.mean(lse ** 2), dtype=np.float32, terms=terms)
  assert_close(ent, np.mean(-(p * np.log(p)).sum(-1)), dtype=np.float32, terms=terms)
  load = routing.expert_load(idx, jnp.asarray(mask)[..., None] & jnp.ones((1, 1, 2), bool), 5)
  assert_close(load, frac, dtype=np.float32, terms=top.size)      # a mean over the 2 N assignments
