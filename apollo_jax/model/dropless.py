"""Dropless MoE: every top-k assignment computed, sorted by expert, grouped matmul, no capacity.

Pure array functions (no Flax). Letters: N tokens, K slots, A = N*K assignments, E experts,
R rows of the sorted buffer, M model size, I expert hidden size, b rows per block.

  plan = sort_plan(idx, valid, E, b)     assignments sorted by expert; each expert's run padded
                                         to a multiple of b rows, so every block of b rows
                                         belongs to one expert
  x_rows = gather_rows(x, plan.token_of_row, plan.row_of_assignment)      [R, M]
  y_rows = grouped_swiglu(x_rows, plan, wg, wu, wd, kernel)               [R, M]
  y      = sum_k w[:, k] * gather_rows(y_rows, row_of_assignment, ...)    [N, M]

Kernels for the grouped matmul (`KERNELS`; moe.kernel=auto picks one per backend: `resolve_kernel`):

  kernel  what                                                  default on  measured
  blocks  a loop over the experts, and in it over the expert's  CPU, GPU    CPU: fastest, ~the FLOPs
          blocks of b rows, each one [b, M] x [M, I] matmul;                of the k experts + the
          a custom VJP accumulates the expert's weight                      block padding (< E*b
          gradient in the inner loop's carry                                rows). GPU: unmeasured
  ragged  jax.lax.ragged_dot over the sorted rows               TPU         unmeasured (native there)
  gmm     Pallas megablox gmm (its custom VJP uses tgmm), one   never       TPU: unmeasured; lowers
          row tile per block                                                to the Mosaic kernel
  einsum  blocks without the loop: one batched einsum over    never       only lowered: the plan
          per-block gathered weights (never compiled at real                counts FLOPs with it
          sizes; not a config choice)                                       (training/memory_plan.py)

ragged_dot is not the GPU default: XLA's GPU compiler expands it into a dense dot over every
expert (E/k x the FLOPs) unless XLA_FLAGS has --xla_gpu_experimental_use_ragged_dot_fusion=true,
and that fusion also needs cuDNN >= 9.22, sm80+ and bf16/f16, and may still expand the weight
gradient; so an explicit moe.kernel=ragged on GPU without the flag is refused. On CPU it expands
to E masked dense dots too. gmm off TPU runs in Pallas interpret mode (correct, very slow: tests
only). All kernels are exact: the same rows, weights and sums as the loop-over-experts reference
(tests/test_moe.py); the timings are benchmarks/moe_block.py on CPU, no accelerator measured.

The gathers have custom VJPs that transpose into gathers as well (each token has K rows, each
row one token), so the backward needs no scatter-add (slow on CPU, serialised on GPU).
"""

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import megablox

KERNELS = ("blocks", "ragged", "gmm")     # what `resolve_kernel` returns
BLOCK_ROWS = 128     # b for `blocks` and gmm's row tile: large enough for an efficient matmul,
                     # small enough that the padding (< E*b rows) stays a few % of N*K at 4k tokens
GMM_TILE = 128       # gmm's k and n tile (M and I need not be multiples: gmm masks the k
                     # remainder and clips the n edge)
RAGGED_FUSION_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion"


def resolve_kernel(kernel: str, backend: str) -> str:
  """The grouped-matmul kernel of moe.kernel=`kernel` on `backend` (see the module docstring;
  config.validate has checked `kernel`)."""
  if kernel == "auto":
    return "ragged" if backend == "tpu" else "blocks"
  if kernel == "ragged" and backend == "gpu" and not _ragged_fusion_enabled():
    raise ValueError(
        "moe.kernel='ragged' on GPU: without XLA's ragged-dot fusion, XLA expands "
        "jax.lax.ragged_dot into a dense matmul over every expert (E/top_k x the FLOPs and memory). "
        f"Set XLA_FLAGS='{RAGGED_FUSION_FLAG}=true' (needs cuDNN >= 9.22, sm80+, bf16/f16) or "
        "use moe.kernel=blocks (or auto).")
  return kernel


def _ragged_fusion_enabled() -> bool:
  """Whether XLA_FLAGS turns the ragged-dot fusion on (its last mention wins, as XLA parses it)."""
  values = [v for k, _, v in (f.partition("=") for f in os.environ.get("XLA_FLAGS", "").split())
            if k == RAGGED_FUSION_FLAG]
  return bool(values) and values[-1].lower() in ("", "true", "1")


class Plan(NamedTuple):
  token_of_row: jax.Array        # int32 [R]: token of each sorted row (N for padding rows)
  assignment_of_row: jax.Array   # int32 [R]: flat assignment of each row (A for padding rows)
  row_of_assignment: jax.Array   # int32 [N, K]: row of each assignment (R for invalid ones)
  block_expert: jax.Array        # int32 [R // b]: the expert of each block
  num_blocks: jax.Array          # int32 []: blocks in use (the rest are padding)
  group_sizes: jax.Array         # int32 [E]: valid assignments per expert
  block: int


def sort_plan(idx, valid, num_experts: int, block: int = BLOCK_ROWS) -> Plan:
  """Sort the valid assignments idx/valid [N, K] by expert (stable: token order within an
  expert); expert e's run starts at a multiple of `block`. Invalid assignments get no row."""
  N, K = idx.shape
  A, E = N * K, num_experts
  R = -(-(A + E * (block - 1)) // block) * block            # static worst case of the padding
  e_flat = jnp.where(valid, idx, E).reshape(A).astype(jnp.int32)      # invalid -> sentinel E
  order = jnp.argsort(e_flat, stable=True).astype(jnp.int32)          # assignments by expert
  e_sorted = e_flat[order]
  counts = jnp.bincount(e_flat, length=E + 1)[:E].astype(jnp.int32)
  padded = -(-counts // block) * block
  start = jnp.cumsum(counts) - counts
  pstart = jnp.cumsum(padded) - padded
  e_c = jnp.minimum(e_sorted, E - 1)
  row_sorted = jnp.where(e_sorted < E, pstart[e_c] + jnp.arange(A, dtype=jnp.int32) - start[e_c], R)
  row_of_assignment = jnp.zeros(A, jnp.int32).at[order].set(row_sorted)
  assignment_of_row = jnp.full(R + 1, A, jnp.int32).at[row_sorted].set(order)[:R]
  token_of_row = jnp.where(assignment_of_row < A, assignment_of_row // K, N)
  block_starts = jnp.arange(R // block, dtype=jnp.int32) * block
  block_expert = jnp.minimum(jnp.searchsorted(jnp.cumsum(padded), block_starts, side="right"), E - 1)
  return Plan(token_of_row, assignment_of_row, row_of_assignment.reshape(N, K),
              block_expert.astype(jnp.int32), (jnp.sum(padded) // block).astype(jnp.int32), counts,
              block)


# ------------------------------------------------------------------ gathers with gather VJPs
@jax.custom_vjp
def gather_rows(src, idx, inv_idx):
  """out[i] = src[idx[i]] (0 where idx[i] == len(src)). inv_idx [len(src), c] lists, per source
  row j, every i with idx[i] == j (len(out) for none); it makes the backward a gather too."""
  return _take(src, idx)


def _take(src, idx):
  return jnp.take(src, idx, axis=0, mode="fill", fill_value=0)


def _gather_fwd(src, idx, inv_idx):
  return _take(src, idx), (idx, inv_idx)


def _gather_bwd(res, g):
  idx, inv_idx = res
  d_src = jnp.sum(_take(g, inv_idx.reshape(-1)).reshape(*inv_idx.shape, *g.shape[1:]), axis=1)
  return d_src, None, None


gather_rows.defvjp(_gather_fwd, _gather_bwd)


def dispatch(x_NM, plan: Plan):
  """x [N, M] -> sorted rows [R, M] (padding rows 0)."""
  return gather_rows(x_NM, plan.token_of_row, plan.row_of_assignment)


def combine(y_rows, weights, plan: Plan):
  """sum_k weights[n, k] * y_rows[row of (n, k)] -> [N, M], summed in float32."""
  N, K = weights.shape
  inv = plan.assignment_of_row[:, None]
  y = gather_rows(y_rows, plan.row_of_assignment.reshape(N * K), inv).reshape(N, K, -1)
  return jnp.einsum("NKM,NK->NM", y.astype(jnp.float32), weights.astype(jnp.float32))


# ------------------------------------------------------------------ grouped SwiGLU kernels
def grouped_swiglu(x_rows, plan: Plan, wg, wu, wd, kernel: str, interpret: bool = False):
  """down(silu(gate(x)) * up(x)) of each row with its expert's weights [E, M, I] / [E, I, M].
  `interpret`: run gmm in Pallas interpret mode (off TPU)."""
  if kernel == "blocks":
    blocks = -(-plan.group_sizes // plan.block)
    first_block = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(blocks).astype(jnp.int32)])
    return _blocks_swiglu(x_rows, first_block, wg, wu, wd, plan.block)
  if kernel == "einsum":
    return _einsum_swiglu(x_rows, plan.block_expert, wg, wu, wd, plan.block)
  # Rows are padded per expert to the plan's block; ragged_dot and gmm want each group
  # contiguous, so give them the padded sizes (padding rows are zero and never read back).
  sizes = -(-plan.group_sizes // plan.block) * plan.block
  if kernel == "ragged":
    dot = lambda a, w: jax.lax.ragged_dot(a, w, sizes)
  elif kernel == "gmm":
    # The plan's block is gmm's row tile tm (moe_ffn): every expert's run starts at a multiple of
    # tm, so no tile is shared by two experts, and R is a multiple of tm, as gmm requires. gmm
    # never writes the rows past the last run (garbage; NaN in interpret mode): the row mask on
    # every output zeroes them, and on the input it zeroes their gradient, which gmm's backward
    # leaves unwritten as well.
    rows = (jnp.arange(x_rows.shape[0]) < jnp.sum(sizes))[:, None]
    mask = lambda a: jnp.where(rows, a, 0)
    tiling = (plan.block, GMM_TILE, GMM_TILE)
    dot = lambda a, w: mask(megablox.gmm(a, w, sizes, x_rows.dtype, tiling, interpret=interpret))
    x_rows = mask(x_rows)
  else:
    raise ValueError(f"unknown dropless kernel {kernel!r}; choose one of {KERNELS}")
  return dot(jax.nn.silu(dot(x_rows, wg)) * dot(x_rows, wu), wd)


def _einsum_swiglu(x, block_expert, wg, wu, wd, b):
  """`blocks` without its loop, for counting FLOPs (XLA counts a loop body once): every block of
  the plan (the unused ones are zero rows) times its expert's weights, gathered per block to
  [R / b, M, I]. The same numbers as `blocks`, but R / b copies of expert matrices (GBs at 7B):
  only lowered by the plan (training/memory_plan.py), never compiled at real sizes."""
  w = lambda a: jnp.take(a, block_expert, axis=0)
  xb = x.reshape(-1, b, x.shape[-1])
  h = jax.nn.silu(jnp.einsum("nbm,nmi->nbi", xb, w(wg))) * jnp.einsum("nbm,nmi->nbi", xb, w(wu))
  return jnp.einsum("nbi,nim->nbm", h, w(wd)).reshape(x.shape)


def _block(a, i, b):
  return jax.lax.dynamic_slice_in_dim(a, i * b, b, axis=0)


def _expert(w, e):
  return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _dot(a, b, contract):
  """a . b contracting dims `contract` = (dim of a, dim of b): transposed operands are read as
  they lie, never copied into a transposed buffer first."""
  return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())))


def _each_expert(first_block, body, carry):
  """fori over the experts e: body(e, lo, hi, carry) loops over e's blocks [lo, hi). Each body
  slices its expert's weights once, not once per block: every slice of an [E, M, I] array is a
  copy, and per block those copies cost more than the matmuls on CPU."""
  return jax.lax.fori_loop(0, first_block.shape[0] - 1,
                           lambda e, c: body(e, first_block[e], first_block[e + 1], c), carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blocks_swiglu(x, first_block, wg, wu, wd, b):
  return _blocks_fwd(x, first_block, wg, wu, wd, b)[0]


def _blocks_fwd(x, first_block, wg, wu, wd, b):
  R, I = x.shape[0], wg.shape[-1]

  def expert(e, lo, hi, carry):
    g_w, u_w, d_w = _expert(wg, e), _expert(wu, e), _expert(wd, e)

    def block(i, carry):
      y, g, u = carry
      xb = _block(x, i, b)
      gb, ub = xb @ g_w, xb @ u_w
      yb = (jax.nn.silu(gb) * ub) @ d_w
      put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(buf, v, i * b, axis=0)
      return put(y, yb), put(g, gb), put(u, ub)
    return jax.lax.fori_loop(lo, hi, block, carry)

  zeros = lambda n: jnp.zeros((R, n), x.dtype)
  y, g, u = _each_expert(first_block, expert, (zeros(x.shape[1]), zeros(I), zeros(I)))
  return y, (x, first_block, wg, wu, wd, g, u)


def _blocks_bwd(b, res, dy):
  x, first_block, wg, wu, wd, g, u = res
  f32 = lambda w: jnp.zeros(w.shape, jnp.float32)

  def expert(e, lo, hi, carry):
    dx, dwg, dwu, dwd = carry
    g_w, u_w, d_w = _expert(wg, e), _expert(wu, e), _expert(wd, e)

    def block(i, carry):   # this expert's weight gradients accumulate in the loop carry
      dx, dg_w, du_w, dd_w = carry
      xb, dyb, gb, ub = _block(x, i, b), _block(dy, i, b), _block(g, i, b), _block(u, i, b)
      sg = jax.nn.sigmoid(gb)
      act = gb * sg
      dh = _dot(dyb, d_w, (1, 1))                        # dy @ wd[e]^T
      dgb = dh * ub * (sg * (1 + gb * (1 - sg)))         # d silu(g) / dg = s (1 + g (1 - s))
      dub = dh * act
      dxb = _dot(dgb, g_w, (1, 1)) + _dot(dub, u_w, (1, 1))
      acc = lambda w, a, c: w + _dot(a, c, (0, 0)).astype(jnp.float32)      # w += a^T @ c
      return (jax.lax.dynamic_update_slice_in_dim(dx, dxb, i * b, axis=0),
              acc(dg_w, xb, dgb), acc(du_w, xb, dub), acc(dd_w, act * ub, dyb))

    dx, dg_w, du_w, dd_w = jax.lax.fori_loop(
        lo, hi, block, (dx, f32(g_w), f32(u_w), f32(d_w)))
    put = lambda w, v: jax.lax.dynamic_update_index_in_dim(w, v, e, axis=0)
    return dx, put(dwg, dg_w), put(dwu, du_w), put(dwd, dd_w)

  dx, dwg, dwu, dwd = _each_expert(first_block, expert, (jnp.zeros_like(x), f32(wg), f32(wu), f32(wd)))
  return (dx, None, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype))


_blocks_swiglu.defvjp(_blocks_fwd, _blocks_bwd)


def moe_ffn(x_NM, idx, weights, valid, wg, wu, wd, kernel: str, block: int = BLOCK_ROWS,
            interpret: bool = False):
  """The routed experts' output [N, M] (float32): sum_k weights * expert_idx(x), every valid
  assignment computed. idx/weights/valid [N, K]; invalid slots contribute nothing. `block`: the
  rows per block of `blocks` and gmm's row tile (ragged needs no padding: block 1)."""
  wg, wu, wd = (jnp.asarray(w) for w in (wg, wu, wd))      # params may arrive as numpy arrays
  plan = sort_plan(idx, valid, wg.shape[0], 1 if kernel == "ragged" else block)
  y_rows = grouped_swiglu(dispatch(x_NM, plan), plan, wg, wu, wd, kernel, interpret)
  return combine(y_rows, jnp.where(valid, weights, 0.0), plan)
