"""Attention math behind one switch, `model.attention` (config.py): auto | xla | blocked | cudnn.

All paths take grouped queries q [B, T, Kv, R, D] (R query heads share each of the Kv kv heads),
k/v [B, S, Kv, D], per-token segment ids, and compute softmax(q k^T / sqrt(D)) v with the
softmax in float32, where key s is visible from query t iff s <= t and both are in the same
segment (segment 0 = padding: it only sees padding). Packing support per kernel:

  xla      full [T, S] scores per head, masked. Any packing (segment ids), any T/S.
  blocked  query tiles of TILE rows; tile i only sees the keys of tiles 0..i, so the fully
           masked causal tiles (~half the scores at T >> TILE) are never computed. Exact (each
           query row still softmaxes over all its visible keys at once). Any packing (segment
           ids). Used when T == S is a multiple of TILE larger than one tile, else xla.
  cudnn    jax.nn.dot_product_attention(implementation="cudnn"): GPU flash attention. It takes
           no segment ids, only causal masking and per-row sequence lengths, so it supports
           data.packing="causal" (one causal stream per row, padding at the tail; padding
           queries then see real keys, which changes only padding outputs, never trained on)
           and NOT data.packing="segment": config.validate refuses that instead of ignoring the segments.
  auto     blocked on CPU (measured faster: benchmarks/vs_torch.py), xla elsewhere. cudnn is
           opt-in: it is unmeasured here (no GPU in this project's CI).
"""

import jax
import jax.numpy as jnp

KERNELS = ("xla", "blocked", "cudnn")     # what `resolve` returns
TILE = 128


def resolve(impl: str, backend: str | None = None) -> str:
  """The kernel of model.attention=`impl` on `backend` (config.validate has checked `impl` and
  that cudnn, which takes no segment ids, only meets data.packing='causal')."""
  if impl == "auto":
    return "blocked" if (backend or jax.default_backend()) == "cpu" else "xla"
  return impl


def attention_mask(segment_ids):
  """bool [B, 1, 1, S, S]: key s visible from query t iff s <= t and both are in the same segment."""
  S = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((S, S), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None, None]


def attend(q, k, v, segment_ids, impl: str = "xla"):
  """Grouped-query attention output [B, T, Kv, R, D] in q's dtype (see the module docstring)."""
  T, S = q.shape[1], k.shape[1]
  if impl == "cudnn":
    return _cudnn(q, k, v, segment_ids)
  if impl == "blocked" and T == S and T % TILE == 0 and T > TILE:
    return _blocked(q, k, v, segment_ids)
  if impl not in KERNELS:
    raise ValueError(f"unknown attention kernel {impl!r}; choose one of {KERNELS}")
  return _masked(q, k, v, attention_mask(segment_ids))


def _masked(q, k, v, mask):
  """Softmax attention of q [B,T,Kv,R,D] over k/v [B,S,Kv,D] under mask [B,1,1,T,S]."""
  scores = jnp.einsum("BTKRD,BSKD->BKRTS", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKRTS,BSKD->BTKRD", probs, v)


def _blocked(q, k, v, segment_ids):
  """Query tile i attends to keys [0, (i+1)*TILE): a static loop, each tile one masked softmax."""
  outs = []
  for i in range(q.shape[1] // TILE):
    lo, hi = i * TILE, (i + 1) * TILE
    causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]                 # [TILE, hi]
    same = segment_ids[:, lo:hi, None] == segment_ids[:, None, :hi]                  # [B, TILE, hi]
    outs.append(_masked(q[:, lo:hi], k[:, :hi], v[:, :hi], (causal[None] & same)[:, None, None]))
  return jnp.concatenate(outs, axis=1)


def _cudnn(q, k, v, segment_ids):
  """cuDNN flash attention, causal, each row's real tokens = its non-padding prefix."""
  B, T, Kv, R, D = q.shape
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  out = jax.nn.dot_product_attention(
      q.reshape(B, T, Kv * R, D), k, v, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation="cudnn")
  return out.reshape(B, T, Kv, R, D)
