"""Attention kernels (model/attention.py) = a numpy reference, incl. segment isolation and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apollo_jax import config as cfg
from apollo_jax.model import attention
from apollo_jax.model.transformer import build_model
from tolerance import assert_close, violation

B, T, KV, R, D = 2, 16, 2, 2, 8
SEG = np.array([[1] * 5 + [2] * 7 + [3] * 2 + [0] * 2,       # three packed samples + padding
                [1] * 16], np.int32)


def np_attention(q, k, v, seg):
  """Loop over rows/heads/queries: softmax over the visible keys only (float64)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  out = np.zeros_like(q)
  for b in range(B):
    for h in range(KV):
      for r in range(R):
        for t in range(T):
          vis = [s for s in range(t + 1) if seg[b, s] == seg[b, t]]
          sc = np.array([q[b, t, h, r] @ k[b, s, h] for s in vis]) / np.sqrt(D)
          p = np.exp(sc - sc.max())
          out[b, t, h, r] = (p / p.sum()) @ v[b, vis, h]
  return out


@pytest.fixture(scope="module")
def qkv():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return (jax.random.normal(ks[0], (B, T, KV, R, D)), jax.random.normal(ks[1], (B, T, KV, D)),
          jax.random.normal(ks[2], (B, T, KV, D)))


@pytest.fixture
def small_tiles(monkeypatch):
  monkeypatch.setattr(attention, "TILE", 4)      # 4 query tiles at T=16


@pytest.mark.slow
def test_blocked_and_xla_equal_reference_and_each_other(qkv, small_tiles):
  q, k, v = qkv
  seg = jnp.asarray(SEG)
  want = np_attention(q, k, v, SEG)
  outs = {impl: attention.attend(q, k, v, seg, impl) for impl in ("xla", "blocked")}
  terms = D + 2 * T            # f32 scores over D, softmax sum and weighted sum over <= T keys
  for impl, out in outs.items():
    assert_close(out, want, dtype=np.float32, terms=terms, err_msg=impl)
  # negative control: without the segment mask (plain causal) the error is far outside the bound
  leak = attention.attend(q, k, v, jnp.where(seg > 0, 1, 0), "xla")
  assert violation(leak, want, dtype=np.float32, terms=terms) > 100
  r = jax.random.normal(jax.random.PRNGKey(5), q.shape)
  grad = lambda impl: jax.grad(lambda *a: jnp.sum(attention.attend(*a, seg, impl) * r), argnums=(0, 1, 2))(q, k, v)
  for name, g_b, g_x in zip("qkv", grad("blocked"), grad("xla")):   # tiles reorder forward and backward
    assert_close(g_b, g_x, dtype=np.float32, terms=2 * terms, err_msg=name)


def test_blocked_keeps_segments_apart(qkv, small_tiles):
  """Changing the keys/values of sample 1 leaves samples 2 and 3 of the row unchanged."""
  q, k, v = qkv
  seg = jnp.asarray(SEG)
  base = attention.attend(q, k, v, seg, "blocked")
  k2, v2 = k.at[0, :5].add(3.0), v.at[0, :5].add(3.0)
  moved = attention.attend(q, k2, v2, seg, "blocked")
  np.testing.assert_array_equal(moved[0, 5:14], base[0, 5:14])
  assert not np.allclose(moved[0, :5], base[0, :5])


def test_resolve_per_backend_and_packing():
  assert attention.resolve("auto", "cpu") == "blocked"
  assert attention.resolve("auto", "gpu") == "xla"
  assert attention.resolve("cudnn", "gpu") == "cudnn"
  c = cfg.load("tiny")
  c.model.attention = "cudnn"
  with pytest.raises(ValueError, match="no segment ids.*data.packing='causal'"):
    build_model(c)                             # ModelConfig is only built from a valid config
  c.model.attention = "flash"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    build_model(c)
