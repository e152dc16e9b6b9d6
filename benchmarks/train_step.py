"""Train-step throughput of Post-MoE vs the dense baseline, measured side by side in one run.

Same model width, same tokens, same mesh: `moe.layers=none` (dense Qwen2) against the Post-MoE
variants, each step timed after compilation, the variants interleaved round by round so machine
noise hits all of them alike. Reports tokens/s and the ratio to dense (the MoE's extra expert
FLOPs are only in its MoE layers; MaxText-style targets are >= 0.85-0.9 of dense at cf 1.25-2).
Variants without a capacity factor run the default dropless MoE; `_cf{X}` ones moe.impl=capacity.

  python benchmarks/train_step.py                                   # CPU-sized defaults
  python benchmarks/train_step.py --hidden=896 --inter=4864 --layers=24 --heads=14 --kv_heads=2 \
      --seq=4096 --batch=8 --dtype=bfloat16                         # 0.5B shapes on an accelerator
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.training import metrics
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts  # noqa: E402
from apollo_jax.model import transformer  # noqa: E402


def make_config(a, layers_spec, cf):
  c = cfg.load("tiny")
  m = c.model
  m.hidden_size, m.intermediate_size, m.num_layers = a.hidden, a.inter, a.layers
  m.num_heads, m.num_kv_heads, m.vocab_size, m.dtype = a.heads, a.kv_heads, a.vocab, a.dtype
  c.moe.layers, c.moe.capacity_factor, c.moe.group_size = layers_spec, cf, a.group
  c.moe.impl = "capacity" if cf else "dropless"          # cf 0: the exact default
  c.data.seq_len, c.global_batch, c.steps = a.seq, a.batch, 1000
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  return cfg.validate(c, jax.device_count())


def build(config, input_ids=None):
  """(run(state) -> state, initial state) of one jitted train step on a fixed batch."""
  mesh = sharding.make_mesh(config)
  with sharding.activate(mesh):
    model = transformer.build_model(config, mesh)
    tx = optimizer.make_optimizer(config)
    _, shardings, init_fn = ts.state_shardings(model, config, tx, mesh)
    state = ts.init_state(config, tx, shardings, init_fn)
    step = ts.jit_train_step(ts.make_train_step(model, config, tx, mesh), shardings, mesh)
  B, S = config.global_batch, config.data.seq_len
  rng = np.random.default_rng(0)
  batch = {k: np.ones((B, S), np.int32) for k in ts.BATCH_KEYS}
  batch["input_ids"] = (rng.integers(0, config.model.vocab_size, (B, S), dtype=np.int32)
                        if input_ids is None else np.asarray(input_ids, np.int32))
  batch["targets"] = rng.integers(0, config.model.vocab_size, (B, S), dtype=np.int32)
  batch["positions"] = np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy()
  batch["language_ids"] = np.repeat(rng.integers(0, 50, (B, 1), dtype=np.int32), S, axis=1)
  batch = jax.device_put(batch, sharding.batch_sharding(mesh))

  def run(state):
    with sharding.activate(mesh):
      state, m = step(state, batch)
      jax.block_until_ready(m["loss"])
    return state
  return run, state


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--inter", type=int, default=704)
  p.add_argument("--layers", type=int, default=8)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv_heads", type=int, default=2)
  p.add_argument("--vocab", type=int, default=4096)
  p.add_argument("--seq", type=int, default=512)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--group", type=int, default=512)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--rounds", type=int, default=5)
  a = p.parse_args()
  variants = {"dense": ("none", 0), "post_moe": ("last:2", 0), "post_moe_cf1.25": ("last:2", 1.25),
              "all_moe": ("all", 0)}
  runs, states, best, configs = {}, {}, {}, {}
  for name, (layers_spec, cf) in variants.items():
    configs[name] = make_config(a, layers_spec, cf)
    runs[name], states[name] = build(configs[name])
    states[name] = runs[name](states[name])           # compile + warm up
    best[name] = float("inf")
  for _ in range(a.rounds):                             # interleaved rounds
    for name in variants:
      t = time.perf_counter()
      states[name] = runs[name](states[name])
      best[name] = min(best[name], time.perf_counter() - t)
  tokens = a.batch * a.seq
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: H={a.hidden} I={a.inter} L={a.layers} "
        f"seq={a.seq} batch={a.batch} {a.dtype}, 7 family experts top-2 hybrid, best of {a.rounds}")
  for name in variants:
    tps = tokens / best[name]
    mfu = metrics.mfu(configs[name], tps, metrics.peak_flops(configs[name])[0])
    print(f"  {name:18s} {tps:10.0f} tokens/s   {tps * best['dense'] / tokens:5.2f} x dense   "
          f"MFU {mfu:.3f} (active FLOPs)")


if __name__ == "__main__":
  main()
