"""Attention kernels (model/attention.py) = a numpy reference, incl. segment isolation and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas.ops.gpu import attention as raw_pallas_gpu

from apollo_jax import config as cfg
from apollo_jax.model import attention
from apollo_jax.model.config import from_config
from apollo_jax.model.transformer import Transformer, abstract_variables, build_model
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
  assert attention.resolve("auto", "tpu") == "splash"
  assert attention.resolve("auto", "gpu") == "blocked"
  assert attention.resolve("auto", "cpu") == "blocked"
  for impl in attention.KERNELS:                # explicit choices as given, on any backend
    assert attention.resolve(impl, "cpu") == impl
  assert not attention.interprets("splash", "tpu") and attention.interprets("splash", "cpu")
  assert not attention.interprets("pallas_gpu", "gpu") and attention.interprets("pallas_gpu", "tpu")
  assert not attention.interprets("blocked", "cpu") and not attention.interprets("cudnn", "gpu")
  assert attention.remats("blocked", "gpu") and attention.remats("blocked", "tpu")
  assert not attention.remats("blocked", "cpu") and not attention.remats("splash", "tpu")
  c = cfg.load("tiny")
  c.model.attention = "cudnn"
  with pytest.raises(ValueError, match="no segment ids.*data.packing='causal'"):
    build_model(c)                             # ModelConfig is only built from a valid config
  c.model.attention = "flash"
  with pytest.raises(ValueError, match="model.attention='flash'"):
    build_model(c)
  for impl in ("splash", "pallas_gpu"):        # both take segment ids: any packing
    c.model.attention, c.data.packing, c.data.seq_len = impl, "segment", 256
    build_model(c)
    c.data.seq_len = 200                       # not a multiple of the 128-token blocks
    with pytest.raises(ValueError, match=f"model.attention='{impl}'.*data.seq_len to a multiple of 128"):
      build_model(c)


# Tiled shapes: T = S = 384 = 3 blocks of 128; segment boundaries off the block edges, several
# samples per row, padding (segment 0) at the tail of row 0.
TB, TT, TD = 2, 384, 32
TSEG = np.zeros((TB, TT), np.int32)
TSEG[0, :50], TSEG[0, 50:200], TSEG[0, 200:300] = 1, 2, 3
TSEG[1, :170], TSEG[1, 170:] = 1, 2


def np_attention_vjp(q, k, v, seg, dout):
  """float64 numpy softmax attention under the causal + segment mask, and its backward for the
  output cotangent `dout`: (out, dq, dk, dv). Grouped heads: q [B,T,Kv,R,D], k/v [B,S,Kv,D]."""
  q, k, v, dout = (np.asarray(a, np.float64) for a in (q, k, v, dout))
  T, scale = q.shape[1], q.shape[-1] ** -0.5
  mask = np.tril(np.ones((T, T), bool))[None] & (seg[:, :, None] == seg[:, None, :])     # [B,T,S]
  s = np.einsum("btkrd,bskd->bkrts", q, k) * scale
  s = np.where(mask[:, None, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bkrts,bskd->btkrd", p, v)
  dp = np.einsum("btkrd,bskd->bkrts", dout, v)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
  return (out, np.einsum("bkrts,bskd->btkrd", ds, k), np.einsum("bkrts,btkrd->bskd", ds, q),
          np.einsum("bkrts,btkrd->bskd", p, dout))


@pytest.fixture(scope="module")
def tiled_case():
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (TB, TT, KV, R, TD))
  k, v = (jax.random.normal(kk, (TB, TT, KV, TD)) for kk in ks[1:3])
  dout = jax.random.normal(ks[3], q.shape)
  return (q, k, v, dout), np_attention_vjp(q, k, v, TSEG, dout)


@pytest.mark.parametrize("impl,remat", [("xla", False), ("blocked", False), ("blocked", True),
                                        ("splash", False), ("pallas_gpu", False)])
def test_kernel_equals_reference_forward_and_backward(tiled_case, impl, remat):
  """Each kernel (the Pallas ones in interpret mode) = the float64 reference: out, dq, dk, dv."""
  (q, k, v, dout), want = tiled_case
  seg = jnp.asarray(TSEG)
  f = lambda q, k, v: attention.attend(q, k, v, seg, impl, interpret=True, remat=remat)
  got = jax.jit(lambda q, k, v: (f(q, k, v), *jax.vjp(f, q, k, v)[1](dout)))(q, k, v)
  terms = TD + 2 * TT          # f32 scores over D, softmax sum and weighted sum over <= T keys
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(g, w, dtype=np.float32, terms=terms if name == "out" else 2 * terms,
                 err_msg=f"{impl} {name}")


@pytest.mark.parametrize("impl", ["splash", "pallas_gpu"])
def test_pallas_kernels_run_per_device_under_a_mesh(tiled_case, impl):
  """Under a mesh each Pallas kernel runs on its device's rows (fsdp=2) and kv heads (tensor=2):
  the same numbers as the reference, forward and backward."""
  (q, k, v, dout), want = tiled_case
  mesh = jax.make_mesh((1, 2, 1, 2), cfg.MESH_AXES, devices=jax.devices()[:4],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  seg = jnp.asarray(TSEG)
  f = lambda q, k, v: attention.attend(q, k, v, seg, impl, True, False, mesh.abstract_mesh,
                                       ("data", "fsdp", "expert"), "tensor")
  with jax.set_mesh(mesh):
    lowered = jax.jit(lambda q, k, v: (f(q, k, v), *jax.vjp(f, q, k, v)[1](dout))).lower(q, k, v)
    got = lowered.compile()(q, k, v)
  assert "sdy.manual_computation" in lowered.as_text()
  terms = TD + 2 * TT
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    assert_close(g, w, dtype=np.float32, terms=terms if name == "out" else 2 * terms,
                 err_msg=f"{impl} {name}")


def test_blocked_remat_keeps_backward_residuals_linear_in_length(tiled_case):
  """Saved, blocked's backward holds each tile's probabilities (> T*S/2 floats per head); with
  remat only q, k, v and the segment ids (its gradients: test_kernel_equals_reference_...)."""
  (q, k, v, _), _ = tiled_case
  seg = jnp.asarray(TSEG)
  nbytes = {remat: sum(x.nbytes for x in jax.tree.leaves(
                jax.vjp(lambda *a: attention.attend(*a, seg, "blocked", remat=remat), q, k, v)[1]))
            for remat in (False, True)}
  assert nbytes[True] <= q.nbytes + k.nbytes + v.nbytes + seg.nbytes
  assert nbytes[False] > TB * KV * R * TT * TT // 2 * 4


def test_pallas_gpu_repeats_kv_heads_in_group_order(tiled_case):
  """The raw Pallas GPU kernel has no GQA and gives wrong numbers silently; pallas_gpu repeats
  each kv head to its R query heads. Negative controls: the raw kernel with un-repeated kv heads,
  and with them repeated in the wrong order (tiled: kv head h % Kv), are far off the reference."""
  (q, k, v, dout), want = tiled_case
  q, k, v, seg = q[:1, :128], k[:1, :128], v[:1, :128], TSEG[:1, :128]     # one block: fast
  want = np_attention_vjp(q, k, v, seg, dout[:1, :128])[0]
  terms = TD + 2 * 128
  got = attention.attend(q, k, v, jnp.asarray(seg), "pallas_gpu", interpret=True)
  assert_close(got, want, dtype=np.float32, terms=terms)
  raw = lambda k, v: raw_pallas_gpu.mha(q.reshape(1, 128, KV * R, TD), k, v, jnp.asarray(seg),
                                        sm_scale=TD ** -0.5, causal=True, interpret=True).reshape(q.shape)
  assert violation(raw(k, v), want, dtype=np.float32, terms=terms) > 100
  tiled = lambda x: jnp.tile(x, (1, 1, R, 1))
  assert violation(raw(tiled(k), tiled(v)), want, dtype=np.float32, terms=terms) > 100


def test_tiled_kernels_fall_back_to_xla_off_the_tiles(qkv):
  """T=16 (not a multiple of TILE) and decode-like T != S take the masked xla path."""
  q, k, v = qkv
  seg = jnp.asarray(SEG)
  want = attention.attend(q, k, v, seg, "xla")
  for impl in ("blocked", "splash", "pallas_gpu"):
    np.testing.assert_array_equal(attention.attend(q, k, v, seg, impl, interpret=True), want)


def test_splash_lowers_for_tpu_from_cpu_and_interprets_on_cpu():
  """from_config(backend='tpu') gives the real splash kernel (a tpu_custom_call when the train
  gradient lowers for TPU here); on this CPU machine splash interprets and = xla."""
  c = cfg.load("tiny")
  c.moe.layers, c.model.num_layers = "none", 1
  tpu = from_config(c, backend="tpu")
  assert (tpu.attention, tpu.attention_interpret) == ("splash", False)
  ids = jnp.zeros((2, c.data.seq_len), jnp.int32)
  params = abstract_variables(Transformer(tpu), ids.shape)
  loss = lambda params: jnp.sum(Transformer(tpu).apply(params, ids))
  text = jax.jit(jax.grad(loss)).trace(params).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text
  c.model.attention = "splash"
  cpu = from_config(c)
  assert (cpu.attention, cpu.attention_interpret) == ("splash", True)
  variables = Transformer(cpu).init(jax.random.PRNGKey(0), ids)
  ids = jax.random.randint(jax.random.PRNGKey(1), ids.shape, 0, c.model.vocab_size)
  c.model.attention = "xla"
  logits = {m.attention: jax.jit(Transformer(m).apply)(variables, ids) for m in (cpu, from_config(c))}
  assert_close(logits["splash"], logits["xla"], dtype=np.float32, terms=8 * c.model.hidden_size)


def test_pallas_gpu_lowers_for_cuda_from_cpu(qkv):
  """Lowering pallas_gpu (forward and backward) for CUDA works here: Triton custom calls."""
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(ks[0], (1, 128, KV, R, TD))
  k, v = (jax.random.normal(kk, (1, 128, KV, TD)) for kk in ks[1:])
  seg = jnp.ones((1, 128), jnp.int32)
  loss = lambda q, k, v: jnp.sum(attention.attend(q, k, v, seg, "pallas_gpu"))
  text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text
