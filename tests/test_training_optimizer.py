"""Optimizer recipe: HF's warmup-cosine schedule over the 1.35 horizon, AdamW decay on all but biases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax.training import optimizer
from apollo_jax.model import transformer
from configs import tiny
from tolerance import assert_close


def _config(steps=100, **optim):
  c = tiny.get_config()
  c.steps = steps
  c.optim.lr = 1e-4
  c.optim.warmup_ratio = 0.03
  c.optim.horizon = 1.35
  c.optim.update(optim)
  return c


def test_schedule_matches_hf_cosine_with_warmup():
  torch = pytest.importorskip("torch")
  from transformers import get_cosine_schedule_with_warmup
  c = _config(steps=100)
  warmup, total = optimizer.schedule_lengths(c.optim, c.steps)
  # the original: total = floor(steps * (epochs + 0.35)), warmup = int(0.03 * total)
  assert (warmup, total) == (int(0.03 * 135), 135) == (4, 135)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=c.optim.lr)
  ref = get_cosine_schedule_with_warmup(opt, warmup, total)
  hf = []
  for _ in range(total + 5):
    hf.append(opt.param_groups[0]["lr"])
    opt.step()
    ref.step()
  ours = np.asarray([optimizer.make_schedule(c.optim, c.steps)(s) for s in range(total + 5)])
  # (past `total` HF's cosine rises again; ours stays 0 — never reached, training stops at `steps`)
  # f32 schedule vs HF's float64 one: a few roundings of the progress and cos (1 + cos cancels
  # near the end, so the error is relative to the peak lr, not to the value)
  assert_close(ours[:total + 1], hf[:total + 1], dtype=np.float32, terms=4, scale=c.optim.lr)
  # the points that matter: 0 at start, peak at warmup end, ~0.17 peak at the last update, 0 at total
  assert ours[0] == 0 and ours[warmup] == pytest.approx(1e-4)
  assert_close(ours[c.steps - 1] / 1e-4, 0.5 * (1 + math.cos(math.pi * 95 / 131)), dtype=np.float32, terms=4,
               scale=1.0)           # f32 1 + cos: terms of size 1
  assert 0.15 < ours[c.steps - 1] / 1e-4 < 0.19
  assert ours[total] == 0 and ours[total + 3] == 0


def test_schedule_horizon_one_without_warmup():
  c = _config(steps=10, warmup_ratio=0.0, horizon=1.0)
  f = optimizer.make_schedule(c.optim, c.steps)
  assert_close([f(0), f(5), f(10)], [1e-4, 0.5e-4, 0.0], dtype=np.float32, terms=4, scale=1e-4)   # f32 cosine


def test_weight_decay_skips_biases_only():
  # One update with zero gradients: Adam's step is 0, so only decoupled weight decay moves
  # parameters: p <- p * (1 - lr * wd) where decayed, unchanged where not.
  c = _config(steps=10, warmup_ratio=0.0, lr=0.5, weight_decay=0.1)
  params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype),
                        transformer.abstract_params(c))
  tx = optimizer.make_optimizer(c)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = jax.tree.map(lambda p, u: p + u, params, updates)
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(new)[0]}
  biases = [k for k in flat if k.endswith("['bias']")]
  decayed = [k for k in flat if k not in biases]
  assert len(biases) == 3 * 3       # q/k/v bias of 3 blocks: layers_0 (2 stacked), layers_2, layers_3
  assert any("norm" in k for k in decayed) and any("experts" in k for k in decayed)
  assert any("embedding" in k for k in decayed) and any("['gate']" in k for k in decayed)
  for k in biases:
    np.testing.assert_array_equal(flat[k], 1.0, err_msg=k)
  for k in decayed:
    assert_close(flat[k], 1 - 0.5 * 0.1, dtype=np.float32, terms=2, err_msg=k)   # f32 p - lr * wd * p


def test_gradients_are_clipped_to_global_norm():
  c = _config(steps=10, warmup_ratio=0.0, weight_decay=0.0, clip=1.0)
  tx = optimizer.make_optimizer(c)
  params = {"w": jnp.zeros(4)}
  state = tx.init(params)
  g = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}     # norm 50 -> clipped to norm 1
  _, state = tx.update(g, state, params)
  mu = state[1][0].mu["w"]                            # Adam's first moment sees the clipped grad
  # f32: the global norm (a sum of 4 squares), the scaling, Adam's (1 - b1) factor
  assert_close(mu, 0.1 * np.array([0.6, 0.8, 0, 0]), dtype=np.float32, terms=4 + 2)
