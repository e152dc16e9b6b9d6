"""Expert-parallel dropless MoE (model/expert_parallel.py) on 8 simulated devices: the same
outputs and gradients as one device and as a dense every-expert-on-every-token reference, for
expert axes 2, 4 and 8, every routing mode, padded experts and adversarial routing; weights and
gradients held per expert shard (compiled per-device buffers); config errors; ragged_a2a through
an exact emulation of ragged_all_to_all (XLA:CPU lacks the op; tests/test_lowering.py lowers the
real one for TPU and CUDA)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from apollo_jax import config as cfg
from apollo_jax.model import expert_parallel, moe, routing
from apollo_jax.model.config import from_config
from configs import tiny
from tolerance import assert_close

B, S, M, I, E_REAL, E, K = 8, 16, 16, 24, 7, 8, 2     # 7 real experts padded to 8
AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")
# f32 roundings feeding one output: gate/up over M, down over I, the weighted sum of K slots;
# the weight gradients also sum over the B * S tokens
TERMS = 2 * M + I + K


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all's documented semantics from all_gather and gathers (runs on CPU,
  differentiable): from every source s, its rows [input_offsets_s[me], + send_sizes_s[me]) are
  written to this device's output at output_offsets_s[me]; other rows keep `output`."""
  del recv_sizes                                  # = the sources' send_sizes[me] by contract
  me = jax.lax.axis_index(axis_name)
  gather = lambda a: jax.lax.all_gather(a, axis_name)
  ops, in_off, sizes, out_off = (gather(a) for a in (operand, input_offsets, send_sizes, output_offsets))
  start, size, src_off = out_off[:, me], sizes[:, me], in_off[:, me]          # per source
  j = jnp.arange(output.shape[0])
  inside = (j >= start[:, None]) & (j < (start + size)[:, None])              # [source, row]
  src = jnp.argmax(inside, axis=0)
  row = jnp.clip(src_off[src] + j - start[src], 0, operand.shape[0] - 1)
  keep = inside.any(axis=0).reshape((-1,) + (1,) * (output.ndim - 1))
  return jnp.where(keep, ops[src, row], output)


def mesh_of(ep):
  return jax.make_mesh((1, 8 // ep, ep, 1), AXES, axis_types=(AxisType.Auto,) * 4)


def test_emulation_matches_the_documented_example():
  """The two-device example of jax.lax.ragged_all_to_all's docstring."""
  mesh = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Auto,))
  args = [np.array(a, np.int32) for a in ([1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1],
                                           [0, 0, 1, 2], [1, 1, 2, 1])]
  f = jax.shard_map(lambda *a: emulated_ragged_all_to_all(*a, axis_name="x"), mesh=mesh,
                    in_specs=(jax.P("x"),) * 6, out_specs=jax.P("x"), check_vma=False)
  np.testing.assert_array_equal(jax.jit(f)(*args), [1, 3, 0, 0, 2, 2, 4, 0])


def routings():
  """name -> (idx, weights, valid) [B, S, K]: every mode, padded experts, adversarial skews."""
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  logits = jax.random.normal(keys[0], (B, S, E_REAL)) * 2
  probs = routing.router_probs(logits, E)
  family = jax.random.randint(keys[1], (B, S), -1, E_REAL)
  pad = jnp.arange(S) < S - 3                                        # padding tokens: not routed
  out = {}
  for mode in ("hybrid", "topk", "language"):
    idx, w, valid, _ = routing.route(probs, K, mode, family, num_real=E_REAL)
    out[mode] = (idx, w, valid & pad[None, :, None])
  # every token's first choice on expert 0 (one device gets every token's first slot)
  skew = routing.router_probs(logits.at[..., 0].add(100.0), E)
  out["first_choice_on_one_expert"] = routing.route(skew, K, "topk", num_real=E_REAL)[:3]
  # every token of one language: language routing sends all of them to its expert (the last
  # real one, 6), and hybrid forces it into every token's slots
  one = jnp.full((B, S), E_REAL - 1)
  out["one_language_language"] = routing.route(probs, K, "language", one, num_real=E_REAL)[:3]
  out["one_language_hybrid"] = routing.route(probs, K, "hybrid", one, num_real=E_REAL)[:3]
  return out


def weights_of():
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  real = (jnp.arange(E) < E_REAL)[:, None, None]                     # padded expert weights 0
  wg, wu = (jax.random.normal(k, (E, M, I)) * 0.3 * real for k in ks[:2])
  wd = jax.random.normal(ks[2], (E, I, M)) * 0.3 * real
  x = jax.random.normal(ks[3], (B, S, M))
  return x, wg, wu, wd


def dense_reference(x, idx, w, valid, wg, wu, wd):
  """Every expert on every token, weighted by an [N, E] matrix of the routing (independent of
  the sort, the kernels and the dispatch)."""
  wmat = jnp.einsum("BSKE,BSK->BSE", jax.nn.one_hot(idx, E), w * valid)
  h = jax.nn.silu(jnp.einsum("BSM,EMI->BSEI", x, wg)) * jnp.einsum("BSM,EMI->BSEI", x, wu)
  return jnp.einsum("BSE,BSEM->BSM", wmat, jnp.einsum("BSEI,EIM->BSEM", h, wd))


def grad_fn(ffn, mesh=None):
  r = jnp.cos(jnp.arange(B * S * M, dtype=jnp.float32)).reshape(B, S, M)
  def loss(x, w, wg, wu, wd, idx, valid):
    y = ffn(x, idx, w, valid, wg, wu, wd)
    return jnp.sum(y * r), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))


def expert_parallel_ffn(dispatch, mesh):
  if dispatch == "ragged_a2a_emulated":        # the real ragged_a2a_ffn with the emulated op
    ffn = lambda *a: expert_parallel.ragged_a2a_ffn(*a, all_to_all=emulated_ragged_all_to_all)
    tok = jax.P(BATCH_AXES)
    def local(x, idx, w, valid, wg, wu, wd):
      flat = lambda a: a.reshape(-1, *a.shape[2:])
      return ffn(flat(x), flat(idx), flat(w), flat(valid), wg, wu, wd, "blocks", "expert").reshape(x.shape)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok,) * 4 + (jax.P("expert"),) * 3,
                         out_specs=tok, check_vma=False)
  return lambda *a: moe.dropless_moe(*a, "blocks", mesh=mesh.abstract_mesh, batch_axes=BATCH_AXES,
                                     dispatch=dispatch)


@pytest.fixture(scope="module")
def references():
  """Per routing: (one-device output and grads, dense-reference output and grads)."""
  x, wg, wu, wd = weights_of()
  one = grad_fn(lambda *a: moe.dropless_moe(*a, "blocks"))
  dense = grad_fn(dense_reference)
  out = {}
  for name, (idx, w, valid) in routings().items():
    out[name] = (one(x, w, wg, wu, wd, idx, valid), dense(x, w, wg, wu, wd, idx, valid))
  return out


def check(got, want, name):
  (_, y), grads = got
  (_, y_want), grads_want = want
  assert_close(y, y_want, dtype=np.float32, terms=TERMS, err_msg=f"{name} output")
  for what, g, gw in zip(("x", "weights", "gate", "up", "down"), grads, grads_want):
    assert_close(g, gw, dtype=np.float32, terms=2 * TERMS + B * S, err_msg=f"{name} d{what}")


@pytest.mark.parametrize("ep", [pytest.param(2, marks=pytest.mark.slow),
                                pytest.param(4, marks=pytest.mark.slow), 8])
@pytest.mark.parametrize("dispatch", ["gather_tokens", "ragged_a2a_emulated"])
def test_same_outputs_and_grads_as_one_device_and_the_dense_reference(references, dispatch, ep):
  x, wg, wu, wd = weights_of()
  mesh = mesh_of(ep)
  with jax.set_mesh(mesh):
    fn = grad_fn(expert_parallel_ffn(dispatch, mesh))
    for name, (idx, w, valid) in routings().items():
      got = fn(x, w, wg, wu, wd, idx, valid)
      one, dense = references[name]
      check(got, one, f"{name} vs one device:")
      check(got, dense, f"{name} vs dense reference:")
      assert float(jnp.abs(got[1][2][E_REAL:]).max()) == 0.0      # padded experts: no gradient


def per_device_buffers(dispatch, ep=8, E_=8, M_=512, I_=512):
  """(compiled per-device temporaries in bytes, every f32 buffer shape of the per-device program)
  of the gradient of the dropless block on 16 tokens per device (so the weights dominate),
  expert weights [E, M, I] sharded (expert, fsdp, -) as the model's."""
  mesh = mesh_of(ep)
  sh = lambda spec: jax.sharding.NamedSharding(mesh, jax.P(*spec))
  N = 16 * 8
  shapes = [((N // S, S, M_), BATCH_AXES), ((E_, M_, I_), ("expert", "fsdp")),
            ((E_, M_, I_), ("expert", "fsdp")), ((E_, I_, M_), ("expert", None, "fsdp"))]
  x, wg, wu, wd = (jax.ShapeDtypeStruct(s, jnp.float32, sharding=sh(p)) for s, p in shapes)
  rt = lambda dt: jax.ShapeDtypeStruct((N // S, S, K), dt, sharding=sh((BATCH_AXES,)))
  ffn = lambda *a: moe.dropless_moe(*a, "blocks", mesh=mesh.abstract_mesh, batch_axes=BATCH_AXES,
                                    dispatch=dispatch)
  loss = lambda x, w, wg, wu, wd, idx, valid: jnp.sum(ffn(x, idx, w, valid, wg, wu, wd))
  out = tuple(sh(p) for _, p in shapes[1:])
  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(2, 3, 4)), out_shardings=out).lower(
        x, rt(jnp.float32), wg, wu, wd, rt(jnp.int32), rt(jnp.bool_)).compile()
  return (compiled.memory_analysis().temp_size_in_bytes,
          set(re.findall(r"f32\[([\d,]+)\]", compiled.as_text())))


def test_expert_weights_and_grads_stay_on_their_shard():
  """mesh.expert=8: the gather_tokens block holds 1/8 of the expert weights and accumulates
  only its own experts' float32 gradient ([1, M, I]); gather_weights holds all 8."""
  full = "8,512,512"
  temp_ep, shapes_ep = per_device_buffers("gather_tokens")
  temp_ag, shapes_ag = per_device_buffers("gather_weights")
  assert full in shapes_ag and full not in shapes_ep, sorted(shapes_ep)
  assert "1,512,512" in shapes_ep
  # every expert's f32 weights; one shard's gathered weights + its gradient are 2/8 of them
  weights = 3 * 8 * 512 * 512 * 4
  assert temp_ag > weights and temp_ep < 0.3 * weights, (temp_ep, temp_ag)


def test_config_resolution_and_errors():
  c = tiny.get_config()
  assert c.moe.dispatch == "auto"
  c.moe.expert_multiple = 0                          # pad to the expert axis
  c.mesh.update(fsdp=4, expert=2)
  assert from_config(c, mesh_of(2)).moe.dispatch == "gather_tokens"
  assert from_config(c, mesh_of(2), "tpu").moe.dispatch == "gather_tokens"
  c.mesh.update(fsdp=8, expert=1)
  assert from_config(c, mesh_of(1)).moe.dispatch == "gather_weights"     # nothing to move
  c.moe.dispatch = "ragged_a2a"
  c.mesh.update(fsdp=4, expert=2)
  assert from_config(c, mesh_of(2), "gpu").moe.dispatch == "ragged_a2a"
  with pytest.raises(ValueError, match="XLA:CPU does not implement ragged_all_to_all"):
    from_config(c, mesh_of(2), "cpu")
  c.moe.expert_multiple = 7
  with pytest.raises(ValueError, match="expert axis 4 does not divide the 7"):
    from_config(c, mesh_of(4), "gpu")
  c.moe.dispatch = "ring"
  with pytest.raises(ValueError, match="moe.dispatch='ring'; choose one of"):
    cfg.validate(c)
  c.moe.dispatch, c.moe.impl = "gather_tokens", "capacity"
  with pytest.raises(ValueError, match="applies to moe.impl='dropless' only"):
    cfg.validate(c)
