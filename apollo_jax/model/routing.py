"""Routing as pure array functions (no Flax), so every rule can be checked against numpy.

Shapes: `...` is any leading token shape (e.g. [G, S]); E = padded experts, K = top-k.
An *assignment* is one (token, slot) pair: expert index `idx[..., k]`, weight `weights[..., k]`,
and `valid[..., k]` (False for slots that carry nothing: padding tokens, unused slots).

Routing modes (config.moe.routing; the original's are in docs/original.md, Routing):
  topk      plain top-k of the full softmax (all inference except `language`).
  hybrid    training of Hybrid-k: top-k, and if the token's expert f is not among them it
            replaces the LOWEST slot (K-1); weights are the full-softmax probs of the chosen.
  language  the token goes to f with weight 1 (slot 0 only); tokens without an expert (f == -1)
            fall back to plain top-k.
"""

import jax
import jax.numpy as jnp

from apollo_jax import config as cfg


def router_probs(logits, num_padded: int):
  """float32 softmax over the real experts; padded experts (logit -inf) get probability 0.

  logits [..., E_real] -> probs [..., num_padded].
  """
  logits = logits.astype(jnp.float32)
  pad = num_padded - logits.shape[-1]
  if pad < 0:
    raise ValueError(f"num_padded={num_padded} is smaller than the {logits.shape[-1]} real experts")
  logits = jnp.pad(logits, [(0, 0)] * (logits.ndim - 1) + [(0, pad)], constant_values=-jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def top_k(probs, k: int, num_real: int | None = None):
  """(weights, idx) [..., k] of the k largest probs, best first; experts >= num_real never win."""
  if num_real is not None and num_real < probs.shape[-1]:
    real = jnp.arange(probs.shape[-1]) < num_real
    probs_sel = jnp.where(real, probs, -1.0)   # padded experts below every real prob (even 0)
  else:
    probs_sel = probs
  _, idx = jax.lax.top_k(probs_sel, k)
  return jnp.take_along_axis(probs, idx, axis=-1), idx


def route(probs, k: int, mode: str, family=None, norm_topk_prob: bool = False,
          num_real: int | None = None):
  """Choose experts per token. probs [..., E] (float32), family int [...] (-1: none) or None.

  Returns (idx int32 [..., K], weights float32 [..., K], valid bool [..., K],
  is_family bool [..., K]); `is_family` marks assignments to the token's own expert f when the
  mode uses language (hybrid/language), which get capacity priority (see `priority_levels`).
  """
  if mode not in cfg.ROUTING_MODES:
    raise ValueError(f"unknown routing mode {mode!r}; choose one of {cfg.ROUTING_MODES}")
  _, idx = top_k(probs, k, num_real)
  valid = jnp.ones(idx.shape, bool)
  if mode == "topk":
    return _finish(probs, idx, valid, jnp.zeros(idx.shape, bool), norm_topk_prob)
  if family is None:
    raise ValueError(f"routing mode {mode!r} needs the tokens' expert ids (family)")
  family = family.astype(jnp.int32)
  has_f = (family >= 0)[..., None]                                  # [..., 1]
  f = jnp.maximum(family, 0)[..., None]
  if mode == "hybrid":
    present = jnp.any(idx == f, axis=-1, keepdims=True)
    idx = jnp.where(has_f & ~present & (jnp.arange(k) == k - 1), f, idx)
    return _finish(probs, idx, valid, has_f & (idx == f), norm_topk_prob)
  # language: slot 0 = f with weight 1, other slots unused; f == -1 keeps plain top-k.
  first = jnp.arange(k) == 0
  idx = jnp.where(has_f & first, f, idx)
  valid = jnp.where(has_f, first, valid)
  is_family = has_f & first
  idx, w, valid, _ = _finish(probs, idx, valid, is_family, norm_topk_prob)
  return idx, jnp.where(is_family, 1.0, w), valid, is_family


def _gather_weights(probs, idx, norm_topk_prob, valid):
  w = jnp.take_along_axis(probs, idx, axis=-1) * valid
  if norm_topk_prob:
    w = w / jnp.sum(w, axis=-1, keepdims=True)
  return w


def _finish(probs, idx, valid, is_family, norm_topk_prob):
  return (idx.astype(jnp.int32), _gather_weights(probs, idx, norm_topk_prob, valid), valid,
          is_family)


def priority_levels(is_family):
  """Capacity priority per assignment: 0 = the token's own expert f, then 1 + slot (first
  choices before second choices ...). Lower levels claim expert slots first."""
  k = is_family.shape[-1]
  return jnp.where(is_family, 0, 1 + jnp.arange(k)).astype(jnp.int32)


def capacity_positions(idx, valid, level, num_experts: int):
  """Slot position of every assignment in its expert's buffer, per group.

  idx/valid/level [G, S, K]. Assignments are ordered by (level, token): all level-0 assignments
  of the group first in token order, then level 1, ... A token uses an expert at most once, so
  the running count per (level, token, expert) is unambiguous. Returns int32 [G, S, K]
  (meaningless where not valid). Cost O(G * (K+1) * S * E).
  """
  G, S, K = idx.shape
  L = K + 1
  onehot = jax.nn.one_hot(idx, num_experts, dtype=jnp.int32) * valid[..., None]      # [G,S,K,E]
  by_level = jnp.einsum("GSKE,GSKL->GLSE", onehot, jax.nn.one_hot(level, L, dtype=jnp.int32))
  before = jnp.cumsum(by_level.reshape(G, L * S, num_experts), axis=1) - by_level.reshape(
      G, L * S, num_experts)                                                         # exclusive
  before = before.reshape(G, L, S, num_experts).transpose(0, 2, 1, 3).reshape(G, S, L * num_experts)
  return jnp.take_along_axis(before, level * num_experts + idx, axis=-1).astype(jnp.int32)


def capacity_slots(idx, keep, pos, num_experts: int, capacity: int):
  """Index form of the [G, S, E, C] dispatch/combine masks, for gather/scatter dispatch.

  idx/keep/pos [G, S, K] -> (slot int32 [G, S, K]: flat slot e*C + c of each kept assignment,
  E*C where dropped; slot_token int32 [G, E*C]: the token in each slot, S where empty;
  slot_assignment int32 [G, E*C]: the flat assignment s*K + k in each slot, S*K where empty).
  Each slot holds at most one assignment, so both inverses are well defined.
  """
  G, S, K = idx.shape
  n = num_experts * capacity
  slot = jnp.where(keep, idx * capacity + pos, n).astype(jnp.int32)
  flat = slot.reshape(G, S * K)
  fill = lambda empty, values: jax.vmap(lambda sl, v: jnp.full(n + 1, empty, jnp.int32).at[sl].set(v))(
      flat, jnp.broadcast_to(values, (G, S * K)))[:, :n]
  return (slot, fill(S, jnp.repeat(jnp.arange(S, dtype=jnp.int32), K)),
          fill(S * K, jnp.arange(S * K, dtype=jnp.int32)))


def expert_load(idx, valid, num_real: int):
  """float32 [num_real]: fraction of the valid assignments that go to each expert (sums to 1)."""
  counts = jnp.sum(jax.nn.one_hot(idx, num_real, dtype=jnp.float32) * valid[..., None],
                   axis=tuple(range(idx.ndim)))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def load_balancing_loss(probs, idx, token_mask, num_real: int):
  """Switch load-balancing loss E * sum_e(frac_e * meanprob_e) over the non-padding tokens.

  frac_e = fraction of the router's own top-k assignments (`idx`) going to e (sums to 1, so a
  perfectly balanced router scores 1.0); meanprob_e = mean router probability of e.
  """
  valid = jnp.broadcast_to(token_mask[..., None], idx.shape)
  frac = expert_load(idx, valid, num_real)
  m = token_mask.astype(jnp.float32)[..., None]
  mean_prob = jnp.sum(probs[..., :num_real] * m, axis=tuple(range(m.ndim - 1))) / jnp.maximum(
      jnp.sum(m), 1.0)
  return num_real * jnp.sum(frac * mean_prob)


def z_loss(logits, token_mask):
  """Router z-loss: mean over non-padding tokens of logsumexp(logits)^2 (real experts only)."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  m = token_mask.astype(jnp.float32)
  return jnp.sum(lse * lse * m) / jnp.maximum(jnp.sum(m), 1.0)


def router_entropy(probs, token_mask):
  """Mean over non-padding tokens of -sum_e p log p."""
  ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1)
  m = token_mask.astype(jnp.float32)
  return jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)
