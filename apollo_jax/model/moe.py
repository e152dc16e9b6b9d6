"""Mixture-of-experts block: router, stacked SwiGLU experts, two dispatch implementations.

`moe.impl` (config.py):
  dropless  (default) every top-k assignment is computed, exactly as the original's loop over
            experts: assignments sorted by expert and run through a grouped matmul
            (model/dropless.py, kernel moe.kernel, auto: per backend), over a mesh's expert axis
            by moe.dispatch (model/expert_parallel.py). No capacity, no drops.
  capacity  GShard-style: tokens [B, S_row] are flattened and split into G groups of S tokens
            (`group_shape`); groups may span rows, so one group mixes languages. Per group every
            assignment gets a slot in its expert's buffer of C slots (routing.capacity_positions:
            the token's own family expert first, then first choices, then second choices;
            earlier tokens first); assignments past C are dropped (they add zero; the residual
            carries the token). Dispatch and combine are index gathers into [E, G, C, M]
            (routing.capacity_slots), so memory is linear in the group size.

Einsum letters: B batch rows, S tokens per group, G groups, E experts (padded), C capacity
slots per expert and group, M model (hidden) size, H expert hidden (intermediate) size, K top-k
slots, N tokens. Padding tokens (segment id 0) are not routed.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apollo_jax import config as cfg
from apollo_jax.model import dropless, expert_parallel, layers, routing
from apollo_jax.model.config import ModelConfig
from apollo_jax.runtime import sharding

def group_shape(B: int, S: int, group_size: int):
  """(G, g): the largest g <= group_size such that g divides S, or g is a multiple of S that
  divides B*S (groups of whole rows). g = 1 always qualifies, so this never fails."""
  best = 1
  for g in range(1, min(S, group_size) + 1):
    if S % g == 0:
      best = g
  for m in range(1, B + 1):
    if B % m == 0 and m * S <= group_size:
      best = max(best, m * S)
  return (B * S) // best, best


def routing_mode(routing_cfg: str, train: bool) -> str:
  """The routing rule of this call: Hybrid-k forces the family expert only in training."""
  if routing_cfg == "language":
    return "language"
  if routing_cfg == "hybrid" and train:
    return "hybrid"
  return "topk"


def _expert_init(std: float, num_real: int):
  """N(0, std) for real experts; padded experts (never routed to) are zero."""
  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, dtype) * std
    return w * (jnp.arange(shape[0]) < num_real)[:, None, None].astype(dtype)
  return init


class Experts(nn.Module):
  """E stacked SwiGLU experts: creates the weights and returns compute(wg, wu, wd)."""
  num_experts: int      # padded
  num_real: int
  intermediate_size: int
  init_std: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, model_size: int, compute):
    E, M, I = self.num_experts, model_size, self.intermediate_size
    # Pinned to the weight's own (FSDP) sharding after the cast, so the all-gather moves the
    # compute dtype (bf16), not the float32 master weight (as the embedding and head).
    w = lambda name, shape, names: nn.with_logical_constraint(self.param(name, nn.with_logical_partitioning(
        _expert_init(self.init_std, self.num_real), names), shape, jnp.float32).astype(self.dtype), names)
    return compute(w("gate_proj", (E, M, I), ("exp", "embed_moe", "mlp")),
                   w("up_proj", (E, M, I), ("exp", "embed_moe", "mlp")),
                   w("down_proj", (E, I, M), ("exp", "mlp", "embed_moe")))


def capacity_experts(x_EGCM, wg, wu, wd):
  """The experts on their dispatched tokens [E, G, C, M], one batched einsum each. The
  constraints move the sharding from the groups to the experts: under an expert mesh axis this
  is where GSPMD inserts the all-to-all (and the reverse one on the way out)."""
  act = ("act_exp", "act_group", None, "act_embed")
  x_EGCM = nn.with_logical_constraint(x_EGCM, act)
  h_EGCH = (nn.silu(jnp.einsum("EGCM,EMH->EGCH", x_EGCM, wg))
            * jnp.einsum("EGCM,EMH->EGCH", x_EGCM, wu))
  return nn.with_logical_constraint(jnp.einsum("EGCH,EHM->EGCM", h_EGCH, wd), act)


def capacity_moe(x_GSM, idx, weights, keep, pos, C, experts):
  """Capacity dispatch -> experts -> weighted combine, by index gathers (each slot holds at most
  one token, so this equals the one-hot [G,S,E,C] einsums exactly)."""
  G, S, M = x_GSM.shape
  K, E = idx.shape[-1], experts.num_experts
  slot, slot_token, slot_assignment = routing.capacity_slots(idx, keep, pos, E, C)
  gather = jax.vmap(dropless.gather_rows)                                     # per group
  x_GEcM = gather(x_GSM, slot_token, slot)                                    # [G, E*C, M]
  x_EGCM = x_GEcM.reshape(G, E, C, M).transpose(1, 0, 2, 3)
  y_EGCM = experts(M, lambda wg, wu, wd: capacity_experts(x_EGCM, wg, wu, wd))
  y_GEcM = y_EGCM.transpose(1, 0, 2, 3).reshape(G, E * C, M)
  y_GSKM = gather(y_GEcM, slot.reshape(G, S * K), slot_assignment[..., None]).reshape(G, S, K, M)
  return jnp.einsum("GSKM,GSK->GSM", y_GSKM, (weights * keep).astype(y_GSKM.dtype))


def dropless_moe(x, idx, weights, valid, wg, wu, wd, kernel: str, interpret: bool = False,
                 mesh=None, batch_axes=(), dispatch: str = "gather_weights"):
  """Dropless experts on x [B, S, M] with idx/weights/valid [B, S, K] -> float32 [B, S, M].

  Under a multi-device `mesh` (an AbstractMesh; None: plain jit) it runs per device under
  shard_map over `batch_axes`, each device with its own rows, by `dispatch`
  (model/expert_parallel.py): gather_weights computes them with every expert's weights
  all-gathered (the expert axis acts as data parallelism); gather_tokens and ragged_a2a keep
  each device's weights to its expert shard [E / ep, M, I] and move the tokens instead, so the
  weights' gradients stay sharded over the expert axis too.
  """
  def rows(fn):
    def local(x, idx, weights, valid, *w):
      B, S, M = x.shape
      flat = lambda a: a.reshape(B * S, *a.shape[2:])
      return fn(flat(x), flat(idx), flat(weights), flat(valid), *w).reshape(B, S, M)
    return local

  every_expert = rows(lambda *a: dropless.moe_ffn(*a, kernel, interpret=interpret))
  tok = jax.P(batch_axes)
  if dispatch == "gather_weights":
    return sharding.per_device(every_expert, mesh, batch_axes, (tok,) * 4 + (jax.P(),) * 3, tok)(
        x, idx, weights, valid, wg, wu, wd)
  ffn = {"gather_tokens": expert_parallel.gather_tokens_ffn,
         "ragged_a2a": expert_parallel.ragged_a2a_ffn}[dispatch]
  axis = sharding.EXPERT_AXIS
  local_experts = rows(lambda *a: ffn(*a, kernel, axis, interpret=interpret))
  return sharding.per_device(local_experts, mesh, batch_axes, (tok,) * 4 + (jax.P(axis),) * 3, tok,
                             fallback=every_expert)(x, idx, weights, valid, wg, wu, wd)


class MoEBlock(nn.Module):
  """Replaces the MLP in an MoE decoder layer. Returns (y [B,S,M], stats dict of fp32 arrays)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, segment_ids, family=None, train: bool = False):
    m, e = self.config, self.config.moe
    dtype = layers.dtype_of(m.dtype)
    E_real, E, K, I = e.num_experts, e.padded_experts, e.top_k, m.intermediate_size
    B, S_row, M = x.shape
    dropless_ = e.impl == "dropless"
    # Routing groups only matter for capacity; dropless routes each row as one group.
    G, S = (B, S_row) if dropless_ else group_shape(B, S_row, e.group_size)
    mode = routing_mode(e.routing, train)

    x_GSM = nn.with_logical_constraint(x.reshape(G, S, M), ("act_batch", None, "act_embed"))
    token_mask = (segment_ids != 0).reshape(G, S)
    fam = None if family is None else family.reshape(G, S)
    if fam is None and mode != "topk":
      fam = jnp.full((G, S), -1, jnp.int32)     # only reached at init: route by plain top-k

    # Router in float32 over the real experts; padded experts get logit -inf (probability 0).
    logits = nn.Dense(E_real, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                      kernel_init=layers.kernel_init(e.router_init_std, ("embed", None)),
                      name="gate")(x_GSM.astype(jnp.float32))                       # [G,S,E_real]
    probs = routing.router_probs(logits, E)
    idx, weights, valid, is_family = routing.route(
        probs, K, mode, fam, e.norm_topk_prob, num_real=E_real)
    valid = valid & token_mask[..., None]

    experts = Experts(E, E_real, I, m.init_std, dtype, name="experts")
    if dropless_:
      keep = valid
      y = experts(M, lambda wg, wu, wd: dropless_moe(x_GSM, idx, weights, valid, wg, wu, wd, e.kernel,
                                                     e.interpret, m.mesh, m.batch_axes, e.dispatch))
    else:
      cf = e.capacity_factor if train else e.eval_capacity_factor
      C = cfg.capacity(S, E_real, K, cf, e.min_capacity)
      pos = routing.capacity_positions(idx, valid, routing.priority_levels(is_family), E)
      keep = valid & (pos < C)
      y = capacity_moe(x_GSM, idx, weights, keep, pos, C, experts)
    y = y.astype(dtype).reshape(B, S_row, M)

    if e.shared_expert:   # always-on FFN scaled by sigmoid(x @ w_s), as the original's share_flag
      shared = layers.MLP(I, m.init_std, dtype, name="shared_expert")(x)
      s_gate = layers.dense(1, ("embed", None), m.init_std, dtype, name="shared_expert_gate")(x)
      y = y + nn.sigmoid(s_gate) * shared

    n_valid = jnp.maximum(jnp.sum(valid), 1)
    stats = {
        "load": routing.expert_load(idx, valid, E_real),
        "drop_fraction": jnp.sum(valid & ~keep) / n_valid,
        "entropy": routing.router_entropy(probs, token_mask),
        "aux_loss": routing.load_balancing_loss(
            probs, routing.top_k(probs, K, E_real)[1], token_mask, E_real),
        "z_loss": routing.z_loss(logits, token_mask),
    }
    if e.analysis:
      stats["chosen_experts"] = jnp.where(valid, idx, -1).reshape(B, S_row, K)
    return y, stats
