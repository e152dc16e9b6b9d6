"""Qwen2 building blocks: RMSNorm, rotary embedding, GQA attention with q/k/v bias, SwiGLU MLP.

Everything computes exactly as HF `Qwen2ForCausalLM` (the original's base) so imported checkpoints give the
same logits. Params are float32; activations run in `dtype` (the model's compute dtype); norm
statistics and the attention softmax are float32. Kernels are [in, out] (HF Linear transposed).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from apollo_jax.model import attention, kv_cache

Dtype = Any


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def kernel_init(std: float, names):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def dense(features, names, std, dtype, use_bias=False, bias_names=None, name=None):
  """A Dense layer with float32 params, N(0, std) kernel and zero bias, both logically named."""
  return Dense(features, use_bias, dtype, kernel_init(std, names),
               nn.with_logical_partitioning(nn.initializers.zeros_init(), bias_names or (None,)),
               name=name)


class Dense(nn.Module):
  """x @ kernel (+ bias) in `dtype`: nn.Dense's params (kernel [in, out] then bias, the same
  names, shapes, init and init order, so the same values), its forward, and a backward that
  transposes the INPUT for the kernel gradient (`matmul`)."""
  features: int
  use_bias: bool
  dtype: Dtype
  kernel_init: Any
  bias_init: Any

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    y = matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    return y if bias is None else y + bias.astype(self.dtype)


@jax.custom_vjp
def matmul(x, w):
  """x [..., K] @ w [K, N]. The VJP is autodiff's (dx = g w^T, dw = x^T g over all leading
  dims), written out so that the [tokens, K] input is what gets transposed: left to itself, XLA
  on CPU transposes the [tokens, N] cotangent instead, in a loop fusion with its producer (the
  SwiGLU or RoPE backward) that writes column-major, ~2x the MLP's fwd+bwd time there."""
  return _matmul(x, w)


def _matmul(x, w):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
  x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  return dx.astype(x.dtype), (x2.T @ g2).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class RMSNorm(nn.Module):
  """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, THEN times the scale (as HF)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * scale.astype(x.dtype)


def rope_cos_sin(positions, head_dim: int, theta: float):
  """cos, sin [B, S, head_dim] (float32) for the rotate-half convention, from per-token positions."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq          # [B, S, hd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
  """x [B, S, heads, hd]: x*cos + rotate_half(x)*sin, cos/sin cast to x's dtype (as HF)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class Attention(nn.Module):
  """GQA self-attention: q/k/v projections with bias, o projection without, RoPE on q and k."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  init_std: float
  dtype: Dtype = jnp.float32
  impl: str = "xla"           # attention kernel (attention.resolve of model.attention)
  interpret: bool = False     # run a Pallas kernel in interpret mode (off its native backend)
  remat: bool = False         # blocked: recompute each tile's scores in the backward
  mesh: Any = None            # Pallas kernels: shard_map'ed over this mesh (ModelConfig.mesh)
  batch_axes: tuple = ()
  head_axis: str | None = None

  @nn.compact
  def __call__(self, x, segment_ids, positions, cache_len: int = 0):
    B, S, H = x.shape
    nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
    proj = lambda n, names, name: dense(n * hd, ("embed", names), self.init_std, self.dtype,
                                        use_bias=True, bias_names=(names,), name=name)
    q = proj(nh, "heads", "q_proj")(x).reshape(B, S, nh, hd)
    k = proj(nkv, "kv", "k_proj")(x).reshape(B, S, nkv, hd)
    v = proj(nkv, "kv", "v_proj")(x).reshape(B, S, nkv, hd)
    cos, sin = rope_cos_sin(positions, hd, self.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_len:         # generation: attend over (and append to) the KV cache (kv_cache.py)
      out = kv_cache.attention(self, q, k, v, segment_ids, cache_len)
      return dense(H, ("heads", "embed"), self.init_std, self.dtype, name="o_proj")(out)
    # Query heads grouped by the kv head they share: [B, S, nkv, rep, hd] (no k/v repetition).
    q = q.reshape(B, S, nkv, nh // nkv, hd)
    out = attention.attend(q, k, v, segment_ids, self.impl, self.interpret, self.remat,
                           self.mesh, self.batch_axes, self.head_axis).reshape(B, S, nh * hd)
    return dense(H, ("heads", "embed"), self.init_std, self.dtype, name="o_proj")(out)


class MLP(nn.Module):
  """SwiGLU without biases: down(silu(gate(x)) * up(x))."""
  intermediate_size: int
  init_std: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    I, std = self.intermediate_size, self.init_std
    g = dense(I, ("embed", "mlp"), std, self.dtype, name="gate_proj")(x)
    u = dense(I, ("embed", "mlp"), std, self.dtype, name="up_proj")(x)
    return dense(x.shape[-1], ("mlp", "embed"), std, self.dtype, name="down_proj")(nn.silu(g) * u)
