"""Expert-parallel dropless MoE: each device keeps only its expert shard's weights; tokens move.

Runs per device inside `jax.shard_map` (model/moe.py `dropless_moe`) with the tokens of the
device's rows (x [N, M], idx/weights/valid [N, K]) and the weights of its E_loc = E / ep local
experts ([E_loc, M, I], all-gathered over fsdp/tensor only); `axis` is the mesh's expert axis of
size ep, and the device holds experts [me * E_loc, (me + 1) * E_loc). Both dispatches compute
every valid assignment exactly (the same rows, weights and float32 sums as dropless.moe_ffn on
one device); no buffer can overflow, whatever the routing:

  gather_tokens  ring of experts: all-gather the tokens and routing of the expert group
                 ([ep * N, M]), compute the assignments to local experts with the usual sort +
                 grouped matmul, reduce-scatter (psum_scatter) the float32 partial outputs back
                 to their rows. The sorted buffer holds ep * N * min(K, E_loc) rows (a token
                 has at most min(K, E_loc) distinct local experts: the static worst case), the
                 blocks kernel computes only the used ones. Portable (runs on XLA:CPU).
  ragged_a2a     jax.lax.ragged_all_to_all: each device sorts its assignments by expert (so by
                 destination shard) and sends each shard only its rows; the receive buffer is
                 the same static worst case, ep * N * min(K, E_loc) rows; the outputs return by
                 the reverse ragged_all_to_all and are combined locally. Moves ~K rows per token
                 instead of ep; XLA:CPU does not implement the op (TPU and GPU only).

Letters as model/dropless.py; ep expert shards, E_loc local experts, Kc = min(K, E_loc).
"""

import jax
import jax.numpy as jnp

from apollo_jax.model import dropless

DISPATCHES = ("gather_weights", "gather_tokens", "ragged_a2a")     # what `resolve_dispatch` returns
# moe.dispatch=auto with an expert axis > 1, per backend: the exact portable dispatch everywhere
# until ragged_a2a has been compared with it on a device (benchmarks/accelerator_check.py).
AUTO = {"cpu": "gather_tokens", "gpu": "gather_tokens", "tpu": "gather_tokens"}


def resolve_dispatch(dispatch: str, backend: str, expert_axis: int, num_experts: int) -> str:
  """The dispatch of moe.dispatch=`dispatch` on `backend` with an expert mesh axis of size
  `expert_axis` and `num_experts` (padded) experts (config.validate has checked the name).
  Without an expert axis (size 1) there is nothing to move: gather_weights."""
  if expert_axis <= 1:
    return "gather_weights"
  if num_experts % expert_axis:
    raise ValueError(
        f"the mesh's expert axis {expert_axis} does not divide the {num_experts} (padded) experts, "
        f"so they cannot be split over it; set moe.expert_multiple to a multiple of {expert_axis} "
        "(0: the expert axis) or change mesh.expert")
  if dispatch == "auto":
    return AUTO.get(backend, "gather_tokens")
  if dispatch == "ragged_a2a" and backend == "cpu":
    raise ValueError(
        "moe.dispatch='ragged_a2a': XLA:CPU does not implement ragged_all_to_all (it only lowers "
        "for TPU and GPU). Use moe.dispatch=gather_tokens (the same result, portable) or auto.")
  return dispatch


def local_slots(idx, weights, valid, lo, num_local: int):
  """The assignments to experts [lo, lo + num_local) with local expert ids, keeping at most
  Kc = min(K, num_local) slots per token (the local ones first): a token's valid experts are
  distinct (model/routing.py), so no local assignment is lost. -> idx, weights, valid [N, Kc]."""
  local = idx - lo
  mine = valid & (local >= 0) & (local < num_local)
  kc = min(idx.shape[-1], num_local)
  if kc < idx.shape[-1]:
    order = jnp.argsort(~mine, axis=-1, stable=True)[:, :kc]
    local, weights, mine = (jnp.take_along_axis(a, order, axis=-1) for a in (local, weights, mine))
  return jnp.where(mine, local, 0), weights, mine


def gather_tokens_ffn(x, idx, weights, valid, wg, wu, wd, kernel: str, axis: str,
                      interpret: bool = False):
  """Ring of experts (module docstring): the float32 MoE output [N, M] of this device's rows."""
  E_loc = wg.shape[0]
  gather = lambda a: jax.lax.all_gather(a, axis, axis=0, tiled=True)
  x_all, idx_all, w_all, valid_all = (gather(a) for a in (x, idx, weights, valid))
  lo = jax.lax.axis_index(axis) * E_loc
  idx_l, w_l, valid_l = local_slots(idx_all, w_all, valid_all, lo, E_loc)
  y_all = dropless.moe_ffn(x_all, idx_l, w_l, valid_l, wg, wu, wd, kernel, interpret=interpret)
  return jax.lax.psum_scatter(y_all, axis, scatter_dimension=0, tiled=True)


def exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def ragged_a2a_ffn(x, idx, weights, valid, wg, wu, wd, kernel: str, axis: str,
                   interpret: bool = False, all_to_all=jax.lax.ragged_all_to_all):
  """ragged_all_to_all dispatch (module docstring): the float32 MoE output [N, M] of this
  device's rows. `all_to_all`: the collective (ragged_all_to_all's signature; the tests pass an
  exact emulation that runs on CPU)."""
  (N, K), M, E_loc = idx.shape, x.shape[-1], wg.shape[0]
  ep, me = jax.lax.axis_size(axis), jax.lax.axis_index(axis)
  A, cap = N * K, ep * N * min(K, E_loc)        # cap: a device's static worst-case receive rows
  # Sort by global expert (block 1: no padding), i.e. by destination shard; rows [A, M].
  plan = dropless.sort_plan(idx, valid, ep * E_loc, block=1)
  send = dropless.dispatch(x, plan)
  a = plan.assignment_of_row
  send_expert = jnp.where(a < A, idx.reshape(A)[jnp.minimum(a, A - 1)] % E_loc, E_loc)
  send_sizes = plan.group_sizes.reshape(ep, E_loc).sum(axis=1).astype(jnp.int32)     # per shard
  sizes = jax.lax.all_gather(send_sizes, axis)                     # [src, dst] rows moved
  in_offsets = exclusive_cumsum(send_sizes)
  out_offsets = exclusive_cumsum(sizes, axis=0)[me]                # where my rows land on each dst
  recv_sizes = sizes[:, me]
  recv_offsets = exclusive_cumsum(sizes, axis=0)[:, me]            # where each src's rows land here
  back_offsets = exclusive_cumsum(sizes, axis=1)[:, me]            # where they came from, per src

  def there(a, fill):          # sorted rows -> the receive buffer of their shard
    out = jnp.full((cap,) + a.shape[1:], fill, a.dtype)
    return all_to_all(a, out, in_offsets, send_sizes, out_offsets, recv_sizes, axis_name=axis)

  x_recv = there(send, 0)
  e_recv = there(send_expert[:, None].astype(jnp.int32), E_loc)    # E_loc: an empty row
  local = dropless.sort_plan(e_recv, e_recv < E_loc, E_loc,
                             1 if kernel == "ragged" else dropless.BLOCK_ROWS)
  y_rows = dropless.grouped_swiglu(dropless.dispatch(x_recv, local), local, wg, wu, wd, kernel,
                                   interpret)
  y_recv = dropless.gather_rows(y_rows, local.row_of_assignment.reshape(cap),
                                local.assignment_of_row[:, None])  # receive order, compute dtype
  back = all_to_all(y_recv, jnp.zeros((A, M), y_recv.dtype), recv_offsets, recv_sizes,
                    back_offsets, send_sizes, axis_name=axis)
  return dropless.combine(back, jnp.where(valid, weights, 0.0), plan)

