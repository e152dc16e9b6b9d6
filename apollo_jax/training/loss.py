"""Cross-entropy of the LM head without materialising the whole [tokens, V] fp32 logits.

`chunked_token_ce(x, w, targets, chunk)` = token_ce(x @ w, targets) in value and gradient, but
the sequence is cut into chunks of `chunk` positions and only one chunk's logits [B, chunk, V]
exist at a time: the forward keeps just the per-token logsumexp, the backward recomputes each
chunk's logits (one extra head matmul, ~1/3 of the head's training FLOPs) and accumulates the
head gradient in fp32. Sequence tiling rather than vocabulary tiling: the vocabulary stays
whole per chunk, so a `tensor`-sharded vocabulary and the logsumexp need nothing special, and
rows stay on their batch shards.

At 7B (V = 152,064) with 4,096-token rows the fp32 logits of one row are 2.5 GB, their softmax
and gradient as much again; with chunks of 1,024 positions a quarter of one.
"""

import functools

import jax
import jax.numpy as jnp

from apollo_jax.model.transformer import head_logits


def token_ce(logits, targets):
  """fp32 cross-entropy per token: logsumexp(logits) - logits[target]."""
  logits = logits.astype(jnp.float32)
  gold = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - gold


def chunk_length(seq_len: int, chunk: int) -> int:
  """The largest divisor of seq_len that is <= chunk (chunk <= 0: the whole sequence)."""
  if chunk <= 0 or chunk >= seq_len:
    return seq_len
  return max(c for c in range(1, chunk + 1) if seq_len % c == 0)


def chunked_token_ce(x_BSM, w_MV, targets, chunk: int):
  """Per-token fp32 CE [B, S] of the logits head_logits(x, w), `chunk` positions at a time."""
  c = chunk_length(x_BSM.shape[1], chunk)
  if c == x_BSM.shape[1]:
    return token_ce(head_logits(x_BSM, w_MV), targets)
  return _chunked_ce(x_BSM, w_MV, targets, c)


def _chunks(a, c):
  """[B, S, ...] -> [S/c, B, c, ...]."""
  return a.reshape(a.shape[0], a.shape[1] // c, c, *a.shape[2:]).swapaxes(0, 1)


def _unchunk(a):
  a = a.swapaxes(0, 1)
  return a.reshape(a.shape[0], -1, *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_ce(x_BSM, w_MV, targets, c):
  return _forward(x_BSM, w_MV, targets, c)[0]


def _forward(x_BSM, w_MV, targets, c):
  def body(_, xt):
    x, t = xt
    logits = head_logits(x, w_MV)
    lse = jax.nn.logsumexp(logits, axis=-1)
    gold = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return None, (lse - gold, lse)
  _, (ce, lse) = jax.lax.scan(body, None, (_chunks(x_BSM, c), _chunks(targets, c)))
  return _unchunk(ce), _unchunk(lse)


def _fwd(x_BSM, w_MV, targets, c):
  ce, lse = _forward(x_BSM, w_MV, targets, c)
  return ce, (x_BSM, w_MV, targets, lse)


def _bwd(c, res, g_BS):
  """d ce / d logits = g * (softmax - onehot(target)); dx = dlogits w^T, dw = sum x^T dlogits."""
  x_BSM, w_MV, targets, lse = res
  V = w_MV.shape[1]

  def body(dw_MV, xs):
    x, t, lse, g = xs
    probs = jnp.exp(head_logits(x, w_MV) - lse[..., None])
    dlogits = (g[..., None] * (probs - jax.nn.one_hot(t, V, dtype=jnp.float32))).astype(x.dtype)
    dx = jnp.einsum("BCV,MV->BCM", dlogits, w_MV.astype(x.dtype), preferred_element_type=jnp.float32)
    dw_MV = dw_MV + jnp.einsum("BCM,BCV->MV", x, dlogits, preferred_element_type=jnp.float32)
    return dw_MV, dx.astype(x.dtype)
  xs = tuple(_chunks(a, c) for a in (x_BSM, targets, lse, g_BS))
  dw_MV, dx = jax.lax.scan(body, jnp.zeros(w_MV.shape, jnp.float32), xs)
  return _unchunk(dx), dw_MV.astype(w_MV.dtype), None


_chunked_ce.defvjp(_fwd, _bwd)
