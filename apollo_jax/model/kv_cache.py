"""Attention over a key/value cache, for generation (prefill, then one token per step).

The cache of one attention layer lives in the flax "cache" collection of that layer:
  k, v   [B, L, nkv, hd]  keys (after RoPE) and values in the compute dtype, L = cache length
  valid  [B, L] bool      the slot holds a real token (left padding: segment id 0 is never valid)
  index  int32            slots [0, index) are written; the next S tokens go to [index, index+S)
Every row writes the same slots (prompts are left-padded to one length), and each token carries
its own position, so rows of different lengths share one cache and one jitted step.

A call appends the S new tokens (S = prompt length at prefill, 1 per decode step) and attends
from them over the cache: query t sees the valid slots <= index + t. With no cache yet (the
first call, `apply(..., mutable=["cache"])` without a cache) the variables start empty.
"""

import jax
import jax.numpy as jnp


def attention(module, q, k, v, segment_ids, cache_len: int):
  """q [B, S, nh, hd], k/v [B, S, nkv, hd] -> [B, S, nh*hd]; updates `module`'s cache."""
  B, S, nkv, hd = k.shape
  nh = q.shape[2]
  if S > cache_len:
    raise ValueError(f"{S} new tokens do not fit a KV cache of {cache_len} slots")
  ck = module.variable("cache", "k", jnp.zeros, (B, cache_len, nkv, hd), k.dtype)
  cv = module.variable("cache", "v", jnp.zeros, (B, cache_len, nkv, hd), v.dtype)
  cvalid = module.variable("cache", "valid", jnp.zeros, (B, cache_len), jnp.bool_)
  cindex = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  i = cindex.value
  ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, i, 0, 0))
  cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, i, 0, 0))
  cvalid.value = jax.lax.dynamic_update_slice(cvalid.value, segment_ids != 0, (0, i))
  cindex.value = i + S

  slots = jnp.arange(cache_len)
  visible = slots[None, :] <= (i + jnp.arange(S))[:, None]                     # [S, L]
  mask = (cvalid.value[:, None, :] & visible[None])[:, None, None]             # [B, 1, 1, S, L]
  # Same math as layers.Attention: query heads grouped by their kv head, fp32 softmax.
  qg = q.reshape(B, S, nkv, nh // nkv, hd)
  scores = jnp.einsum("BTKRD,BSKD->BKRTS", qg, ck.value).astype(jnp.float32) * (hd ** -0.5)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKRTS,BSKD->BTKRD", probs, cv.value).reshape(B, S, nh * hd)
