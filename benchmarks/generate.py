"""KV-cache generation throughput: prefill tokens/s and decode tokens/s, after compilation.

  python benchmarks/generate.py --model=runs/tiny          # a trained workdir (or any inference.load path)
  python benchmarks/generate.py                            # the tiny config, random init
  python benchmarks/generate.py --batch=1 --prompt_len=200 --new_tokens=128

Prefill: one jitted call writing batch x prompt_len tokens into the cache. Decode: one jitted
step per token for the whole batch (greedy); tokens/s = batch / step time. The median of
--repeats runs is reported.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax import config as cfg, inference  # noqa: E402
from apollo_jax.inference import decoding
from apollo_jax.runtime import sharding


def load(a):
  if a.model:
    return inference.load(a.model)
  c = cfg.load("tiny")
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  from apollo_jax.model.transformer import build_model
  params = build_model(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  from apollo_jax.model.transformer import unbox
  return inference.from_params(c, unbox(params))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="", help="inference.load path; default: tiny random init")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--prompt_len", type=int, default=64)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--repeats", type=int, default=3)
  a = p.parse_args(argv)
  lm = load(a)
  V = lm.config.model.vocab_size
  rng = np.random.RandomState(0)
  prompts = [rng.randint(4, min(V, 1000), a.prompt_len).tolist() for _ in range(a.batch)]
  B = -(-decoding.bucket(a.batch, 1) // lm.batch_multiple) * lm.batch_multiple
  P = decoding.bucket(a.prompt_len)
  L = P + decoding.bucket(a.new_tokens)
  ids, seg, pos = decoding.left_pad(prompts + [[0]] * (B - a.batch), P, 0)
  dec = lm._decoder
  live = jnp.asarray((np.arange(B) < a.batch).astype(np.int32))
  prefill_s, step_s = [], []
  with sharding.activate(lm.mesh):
    for _ in range(a.repeats + 1):               # the first round compiles
      t = time.perf_counter()
      cache = jax.block_until_ready(dec.prefill(lm.params, ids, seg, pos, None, L))
      prefill_s.append(time.perf_counter() - t)
      tok, p_ = jnp.asarray(ids[:, -1]), jnp.asarray(pos[:, -1])
      done = jnp.zeros(B, bool)
      cache, tok, done, _ = dec.step(lm.params, cache, tok, p_, live, done, None, jax.random.key(0), -1,
                                     0.0, 1.0, False, L)
      jax.block_until_ready(tok)
      t = time.perf_counter()
      for i in range(1, a.new_tokens):
        cache, tok, done, _ = dec.step(lm.params, cache, tok, p_ + i, live, done, None, jax.random.key(i), -1,
                                       0.0, 1.0, False, L)
      jax.block_until_ready(tok)
      step_s.append((time.perf_counter() - t) / max(a.new_tokens - 1, 1))
  pre, step = float(np.median(prefill_s[1:])), float(np.median(step_s[1:]))
  print(f"model {a.model or 'tiny (random init)'}, mesh {dict(lm.mesh.shape)}, {jax.devices()[0].device_kind}, "
        f"batch {a.batch}, prompt {a.prompt_len} (bucket {P}), cache {L}")
  print(f"prefill  {a.batch * (P - 1) / pre:12,.0f} tokens/s  ({pre * 1e3:.1f} ms for {a.batch} x {P - 1} tokens)")
  print(f"decode   {a.batch / step:12,.0f} tokens/s  ({step * 1e3:.2f} ms per step of {a.batch} tokens)")


if __name__ == "__main__":
  main()
