"""MoE block cost, measured side by side in one run (forward + backward, jitted).

Compares, on the same tokens and sizes:
  dense_ffn        one SwiGLU FFN (what a dense layer costs; the MoE's active FLOPs are ~k x this)
  moe_dropless_{K} our default MoE block, moe.impl="dropless" (training mode, Hybrid-k): exact,
                   with each grouped-matmul kernel K of dropless.KERNELS (moe.kernel); gmm only on
                   TPU unless --kernels names it (Pallas interpret mode elsewhere: no benchmark);
                   ragged on GPU only with XLA's ragged-dot fusion flag (else reported skipped)
  moe_cf{X}_g{S}   moe.impl="capacity" at capacity factor X, groups of S tokens (drops)
  all_experts      every expert on every token, weighted by the routing (dropless, E/k x FLOPs)
Ratios are to dense_ffn; absolute times are noisy on shared machines, the ratios much less.

  python benchmarks/moe_block.py                 # CPU-sized defaults
  python benchmarks/moe_block.py --tokens=32768 --hidden=896 --inter=4864 --dtype=bfloat16   # GPU/TPU
  python benchmarks/moe_block.py --kernels=blocks,ragged      # only these dropless kernels
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.model import dropless, layers  # noqa: E402
from apollo_jax.model.config import from_config  # noqa: E402
from apollo_jax.model.moe import MoEBlock  # noqa: E402


def timeit(fn, *args, repeats):
  jax.block_until_ready(fn(*args))                       # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def grad_step(module, variables, x, *extra):
  def loss(v, x):
    y = module.apply(v, x, *extra)
    y = y[0] if isinstance(y, tuple) else y
    return jnp.mean(jnp.square(y.astype(jnp.float32)))
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


class AllExperts(nn.Module):
  """Dropless reference: every expert on every token, weighted by the top-k router probs."""
  num_experts: int
  top_k: int
  inter: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    M = x.shape[-1]
    probs = jax.nn.softmax(nn.Dense(self.num_experts, use_bias=False)(x.astype(jnp.float32)))
    w, idx = jax.lax.top_k(probs, self.top_k)
    weights = jnp.sum(jax.nn.one_hot(idx, self.num_experts) * w[..., None], -2)      # [B,S,E]
    init = nn.initializers.normal(0.02)
    wg = self.param("wg", init, (self.num_experts, M, self.inter)).astype(self.dtype)
    wu = self.param("wu", init, (self.num_experts, M, self.inter)).astype(self.dtype)
    wd = self.param("wd", init, (self.num_experts, self.inter, M)).astype(self.dtype)
    h = nn.silu(jnp.einsum("BSM,EMH->BSEH", x, wg)) * jnp.einsum("BSM,EMH->BSEH", x, wu)
    return jnp.einsum("BSEH,EHM,BSE->BSM", h, wd, weights.astype(self.dtype))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--inter", type=int, default=704)
  p.add_argument("--experts", type=int, default=7)
  p.add_argument("--top_k", type=int, default=2)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--kernels", default="", help="comma-separated dropless kernels (default: every "
                 "one of dropless.KERNELS; gmm only on TPU)")
  a = p.parse_args()
  kernels = a.kernels.split(",") if a.kernels else [
      k for k in dropless.KERNELS if k != "gmm" or jax.default_backend() == "tpu"]
  dtype = layers.dtype_of(a.dtype)
  B = a.tokens // a.seq
  x = jax.random.normal(jax.random.PRNGKey(0), (B, a.seq, a.hidden), jnp.float32).astype(dtype)
  seg = jnp.ones((B, a.seq), jnp.int32)
  fam = jax.random.randint(jax.random.PRNGKey(1), (B, 1), 0, a.experts) * jnp.ones((1, a.seq), jnp.int32)

  results = {}
  ffn = layers.MLP(a.inter, 0.02, dtype)
  v = ffn.init(jax.random.PRNGKey(2), x)
  results["dense_ffn"] = timeit(grad_step(ffn, v, x), v, x, repeats=a.repeats)

  skipped = {}
  runs = [("dropless", k, 0.0, 0) for k in kernels] + [
      ("capacity", "auto", cf, group) for cf, group in ((1.25, 512), (2.0, 512), (2.0, 2048), (0.0, 512))]
  for impl, kernel, cf, group in runs:
    c = cfg.base_config()
    c.moe.impl, c.moe.kernel = impl, kernel
    c.model.hidden_size, c.model.intermediate_size, c.model.dtype = a.hidden, a.inter, a.dtype
    c.model.num_heads = c.model.num_kv_heads = 1         # attention is not benchmarked here; any valid value
    c.moe.num_experts, c.moe.top_k, c.moe.group_size = a.experts, a.top_k, max(group, 1)
    c.moe.capacity_factor = cf
    name = (f"moe_dropless_{kernel}" if impl == "dropless" else
            f"moe_cf{cf:g}_g{group}" if cf > 0 else f"moe_nodrop_g{group}")
    try:
      block = MoEBlock(from_config(c))
    except ValueError as err:                # e.g. ragged on GPU without the fusion flag
      skipped[name] = str(err)
      continue
    v = block.init(jax.random.PRNGKey(3), x, seg, fam, True)
    step = grad_step(block, v, x, seg, fam, True)
    results[name] = timeit(step, v, x, repeats=a.repeats)

  ref = AllExperts(a.experts, a.top_k, a.inter, dtype)
  v = ref.init(jax.random.PRNGKey(4), x)
  results["all_experts"] = timeit(grad_step(ref, v, x), v, x, repeats=a.repeats)

  base = results["dense_ffn"]
  print(f"{jax.devices()[0].device_kind}: tokens={a.tokens} M={a.hidden} I={a.inter} E={a.experts} "
        f"k={a.top_k} {a.dtype}, fwd+bwd, best of {a.repeats}")
  for name, t in results.items():
    print(f"  {name:22s} {t * 1e3:9.2f} ms   {t / base:6.2f} x dense_ffn")
  for name, why in skipped.items():
    print(f"  {name:22s} skipped: {why}")


if __name__ == "__main__":
  main()
