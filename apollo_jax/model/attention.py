"""Attention math behind one switch, `model.attention` (config.py): auto | xla | blocked | cudnn |
splash | pallas_gpu.

All paths take grouped queries q [B, T, Kv, R, D] (R query heads share each of the Kv kv heads),
k/v [B, S, Kv, D], per-token segment ids, and compute softmax(q k^T / sqrt(D)) v with the
softmax in float32, where key s is visible from query t iff s <= t and both are in the same
segment (segment 0 = padding: it only sees padding). Per kernel:

  xla         full [T, S] scores per head, masked. Any packing (segment ids), any T/S.
  blocked     query tiles of TILE rows; tile i only sees the keys of tiles 0..i, so the fully
              masked causal tiles (~half the scores at T >> TILE) are never computed. Exact (each
              query row still softmaxes over all its visible keys at once). Any packing. Off
              CPU each tile recomputes its scores in the backward (`remats`), so the backward
              holds O(TILE x S) scores per head instead of ~S^2/2.
  splash      Pallas TPU splash attention (flash: [block, block] scores at a time, fused backward),
              segment ids + causal mask, kv heads shared by their R query heads, vmapped over rows.
              Any packing. Native on TPU, Pallas interpret mode elsewhere (tests only: slow).
  pallas_gpu  Pallas GPU (Triton) flash attention, segment ids + causal. It has no GQA, so k/v
              are repeated to the query heads. Any packing. Native on GPU, interpret elsewhere.
  cudnn       jax.nn.dot_product_attention(implementation="cudnn"): GPU flash attention. It takes
              no segment ids, only causal masking and per-row sequence lengths, so it supports
              data.packing="causal" (one causal stream per row, padding at the tail; padding
              queries then see real keys, which changes only padding outputs, never trained on)
              and NOT data.packing="segment": config.validate refuses that instead of ignoring the segments.
  auto        splash on TPU, blocked on CPU and GPU: never xla's full [S, S] by default.

Measured here (CPU): blocked and xla (blocked faster: benchmarks/vs_torch.py), and the numerics
of splash and pallas_gpu in interpret mode (tests/test_attention.py). Unmeasured (no TPU or GPU in
this project's CI): the speed of everything on TPU and GPU, so pallas_gpu and cudnn are opt-in.

blocked, splash and pallas_gpu need T == S, a multiple of TILE (`tiled`); other shapes take xla.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from apollo_jax.runtime import sharding

KERNELS = ("xla", "blocked", "cudnn", "splash", "pallas_gpu")     # what `resolve` returns
NATIVE = {"splash": ("tpu",), "pallas_gpu": ("gpu", "cuda")}      # Pallas kernels: where they compile
TILE = 128


def resolve(impl: str, backend: str | None = None) -> str:
  """The kernel of model.attention=`impl` on `backend` (config.validate has checked `impl` and
  that cudnn, which takes no segment ids, only meets data.packing='causal')."""
  if impl == "auto":
    return "splash" if (backend or jax.default_backend()) == "tpu" else "blocked"
  return impl


def interprets(kernel: str, backend: str | None = None) -> bool:
  """Whether `kernel` runs in Pallas interpret mode on `backend`: a Pallas kernel off its native one."""
  return kernel in NATIVE and (backend or jax.default_backend()) not in NATIVE[kernel]


def remats(kernel: str, backend: str | None = None) -> bool:
  """Whether blocked recomputes each tile's scores in the backward (flash attention's memory:
  O(TILE x S) per head instead of ~S^2/2): off CPU. On CPU it costs ~10% of the attention's
  fwd+bwd time and XLA's CPU schedule keeps the peak memory the same anyway."""
  return kernel == "blocked" and (backend or jax.default_backend()) != "cpu"


def tiled(T: int, S: int) -> bool:
  """Whether the tiled kernels (blocked, splash, pallas_gpu) take queries T over keys S, else xla."""
  return T == S and T % TILE == 0


def attention_mask(segment_ids):
  """bool [B, 1, 1, S, S]: key s visible from query t iff s <= t and both are in the same segment."""
  S = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((S, S), bool))
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None, None]


def attend(q, k, v, segment_ids, impl: str = "xla", interpret: bool = False, remat: bool = False,
           mesh=None, batch_axes: tuple = (), head_axis: str | None = None):
  """Grouped-query attention output [B, T, Kv, R, D] in q's dtype (see the module docstring);
  `interpret` (ModelConfig.attention_interpret) runs a Pallas kernel in interpret mode, `remat`
  (ModelConfig.attention_remat) recomputes blocked's tiles in the backward; a Pallas kernel runs
  per device under `mesh` (`per_device`)."""
  if impl not in KERNELS:
    raise ValueError(f"unknown attention kernel {impl!r}; choose one of {KERNELS}")
  T, S = q.shape[1], k.shape[1]
  if impl == "cudnn":
    return _cudnn(q, k, v, segment_ids)
  if impl == "blocked" and tiled(T, S) and T > TILE:
    return _blocked(q, k, v, segment_ids, remat)
  if impl in PALLAS and tiled(T, S):
    kernel = functools.partial(PALLAS[impl], interpret=interpret)
    return per_device(kernel, q, k, v, segment_ids, mesh, batch_axes, head_axis)
  return _masked(q, k, v, attention_mask(segment_ids))


def per_device(kernel, q, k, v, segment_ids, mesh, batch_axes, head_axis):
  """kernel(q, k, v, segment_ids) on each device's rows (`batch_axes`) and, where they split
  evenly, kv heads (`head_axis`). GSPMD has no partitioning rule for a Pallas custom call: it
  would gather every row and head onto each device; attention is independent per row and kv head."""
  heads = head_axis if mesh is not None and head_axis and q.shape[2] % mesh.shape[head_axis] == 0 else None
  qkv, seg = jax.P(batch_axes, None, heads), jax.P(batch_axes)
  return sharding.per_device(kernel, mesh, batch_axes, (qkv, qkv, qkv, seg), qkv)(q, k, v, segment_ids)


def _masked(q, k, v, mask):
  """Softmax attention of q [B,T,Kv,R,D] over k/v [B,S,Kv,D] under mask [B,1,1,T,S]."""
  scores = jnp.einsum("BTKRD,BSKD->BKRTS", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("BKRTS,BSKD->BTKRD", probs, v)


def _blocked(q, k, v, segment_ids, remat):
  """Query tile i attends to keys [0, (i+1)*TILE): a static loop, each tile one masked softmax.
  Saved, each tile's probabilities are residuals of the backward (~T*S/2 per head in all);
  with `remat` each tile recomputes them in the backward from q, k, v and the segment ids."""
  def tile(q_tile, k, v, segment_ids, lo, hi):
    causal = jnp.arange(hi)[None, :] <= jnp.arange(lo, hi)[:, None]                 # [TILE, hi]
    same = segment_ids[:, lo:hi, None] == segment_ids[:, None, :hi]                  # [B, TILE, hi]
    return _masked(q_tile, k[:, :hi], v[:, :hi], (causal[None] & same)[:, None, None])
  outs = []
  for i in range(q.shape[1] // TILE):
    lo, hi = i * TILE, (i + 1) * TILE
    f = functools.partial(tile, lo=lo, hi=hi)
    outs.append((jax.checkpoint(f) if remat else f)(q[:, lo:hi], k, v, segment_ids))
  return jnp.concatenate(outs, axis=1)


def _heads_major(x):
  """[B, T, ..., D] -> [B, heads, T, D], the heads flattened kv-major ([Kv, R] -> Kv*R)."""
  return jnp.swapaxes(x.reshape(*x.shape[:2], -1, x.shape[-1]), 1, 2)


def _splash_kernel(T: int, heads: int, interpret: bool):
  """The splash kernel of one row: causal over T, blocks of the largest of 512/256/128 dividing T.
  Built at each trace (not cached: it holds arrays, which would leak from one trace to the next)."""
  block = next(b for b in (512, 256, TILE) if T % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                            use_fused_bwd_kernel=True)
  mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((T, T))] * heads)
  return splash.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash(q, k, v, segment_ids, interpret):
  """Splash attention per row. Splash does not scale the scores: q is scaled here. Query head
  h = kv * R + r of the kv-major flattening uses kv head h // R, as splash groups them."""
  B, T, Kv, R, D = q.shape
  kernel = _splash_kernel(T, Kv * R, interpret)
  q = (q.astype(jnp.float32) * D ** -0.5).astype(q.dtype)
  row = lambda q, k, v, seg: kernel(q, k, v, segment_ids=splash.SegmentIds(q=seg, kv=seg))
  out = jax.vmap(row)(_heads_major(q), _heads_major(k), _heads_major(v), segment_ids)
  return jnp.swapaxes(out, 1, 2).reshape(q.shape)


def _pallas_gpu(q, k, v, segment_ids, interpret):
  """Pallas GPU flash attention. It assumes as many kv heads as query heads and gives wrong
  numbers otherwise (no error), so each kv head is repeated R times: flattened query head
  kv * R + r then meets kv head kv."""
  B, T, Kv, R, D = q.shape
  k, v = jnp.repeat(k, R, axis=2), jnp.repeat(v, R, axis=2)
  out = pallas_gpu.mha(q.reshape(B, T, Kv * R, D), k, v, segment_ids, sm_scale=D ** -0.5,
                       causal=True, interpret=interpret)
  return out.reshape(q.shape)


PALLAS = {"splash": _splash, "pallas_gpu": _pallas_gpu}     # the Pallas kernels, each run per device


def _cudnn(q, k, v, segment_ids):
  """cuDNN flash attention, causal, each row's real tokens = its non-padding prefix."""
  B, T, Kv, R, D = q.shape
  lengths = jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32)
  out = jax.nn.dot_product_attention(
      q.reshape(B, T, Kv * R, D), k, v, is_causal=True, query_seq_lengths=lengths,
      key_value_seq_lengths=lengths, implementation="cudnn")
  return out.reshape(B, T, Kv, R, D)
