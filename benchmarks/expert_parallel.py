"""Expert-parallel dropless MoE block against the all-gather one, on 8 simulated CPU devices.

Times forward + backward of model/moe.py `dropless_moe` (Hybrid-2 routing, the `blocks` kernel,
expert weights sharded (expert, fsdp, -) as the model's) with moe.dispatch
  gather_weights  every device all-gathers every expert's weights, computes its own tokens
  gather_tokens   ring of experts: tokens all-gathered over the expert axis, local experts only
on a mesh fsdp = 8 / ep, expert = ep. Each system runs in its own process, the two alternate
(ABAB...), the load average is printed before each run (the machine may be shared), and the
report gives the median times and their ratio. Bytes moved per device per step are read from
the compiled per-device HLO: for every collective, the bytes a device receives (ring algorithm:
all-gather and all-to-all (g-1)/g of the result, reduce-scatter (g-1) x the result, all-reduce
2 (g-1)/g of it, g the group size). XLA:CPU widens bf16 collectives to f32, so run in f32.

  python benchmarks/expert_parallel.py                       # E=8, ep=8, 4096 tokens
  python benchmarks/expert_parallel.py --experts=56 --ep=8   # one expert per language, padded
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEMS = ("gather_weights", "gather_tokens")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def group_size(line: str) -> int:
  """The replica group size of one HLO collective, in any of XLA's three notations."""
  if m := re.search(r"replica_groups=\{\{([\d,]*)\}", line):
    return len(m.group(1).split(","))
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", line):
    sizes = dict((k.strip("'"), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
    return math.prod(sizes[a.strip().strip("'")] for a in m.group(2).split(","))
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]", line):
    return int(m.group(2))
  raise ValueError(f"unknown replica_groups in {line[:200]}")


def collective_bytes(hlo: str) -> dict:
  """Per collective kind: bytes one device receives per call of the program (module docstring)."""
  factor = {"all-gather": lambda g: (g - 1) / g, "all-to-all": lambda g: (g - 1) / g,
            "reduce-scatter": lambda g: g - 1, "all-reduce": lambda g: 2 * (g - 1) / g}
  out = {}
  for line in hlo.splitlines():
    m = re.search(r" (all-gather|reduce-scatter|all-reduce|all-to-all)(?:-start)?\(", line)
    if not m or " = " not in line[:m.start()]:
      continue
    result = line[line.index(" = ") + 3:m.start()]
    size = sum(DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for t, dims in re.findall(r"(\w+)\[([\d,]*)\]", result))
    out[m.group(1)] = out.get(m.group(1), 0) + size * factor[m.group(1)](group_size(line))
  return out


def worker(a):
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  sys.path.insert(0, ROOT)
  import jax
  import jax.numpy as jnp
  from jax.sharding import AxisType, NamedSharding
  from apollo_jax.model import moe, routing

  mesh = jax.make_mesh((1, 8 // a.ep, a.ep, 1), ("data", "fsdp", "expert", "tensor"),
                       axis_types=(AxisType.Auto,) * 4)
  axes = ("data", "fsdp", "expert")
  sh = lambda *spec: NamedSharding(mesh, jax.P(*spec))
  B, S, M, I, E, K = a.tokens // a.seq, a.seq, a.hidden, a.inter, a.experts, 2
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  x = jax.device_put(jax.random.normal(ks[0], (B, S, M)), sh(axes))
  probs = routing.router_probs(jax.random.normal(ks[1], (B, S, E)), E)
  family = jax.random.randint(ks[2], (B, 1), 0, E) * jnp.ones((1, S), jnp.int32)
  idx, w, valid, _ = (jax.device_put(t, sh(axes)) for t in routing.route(probs, K, "hybrid", family))
  wg, wu = (jax.device_put(jax.random.normal(k, (E, M, I)) * 0.02, sh("expert", "fsdp")) for k in ks[3:5])
  wd = jax.device_put(jax.random.normal(ks[5], (E, I, M)) * 0.02, sh("expert", None, "fsdp"))

  def loss(x, w, wg, wu, wd):
    y = moe.dropless_moe(x, idx, w, valid, wg, wu, wd, "blocks", mesh=mesh.abstract_mesh,
                         batch_axes=axes, dispatch=a.worker)
    return jnp.mean(jnp.square(y))

  with jax.set_mesh(mesh):
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)),
                   out_shardings=(sh(axes), sh(axes), sh("expert", "fsdp"), sh("expert", "fsdp"),
                                  sh("expert", None, "fsdp")))
    compiled = step.lower(x, w, wg, wu, wd).compile()
    args = (x, w, wg, wu, wd)
    jax.block_until_ready(compiled(*args))
    best = float("inf")
    for _ in range(a.repeats):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      best = min(best, time.perf_counter() - t)
  mem = compiled.memory_analysis()
  print(json.dumps(dict(time=best, bytes=collective_bytes(compiled.as_text()),
                        temp=mem.temp_size_in_bytes, arguments=mem.argument_size_in_bytes)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--hidden", type=int, default=256)
  p.add_argument("--inter", type=int, default=704)
  p.add_argument("--experts", type=int, default=8, help="padded experts (a multiple of --ep)")
  p.add_argument("--ep", type=int, default=8, help="expert axis size (divides 8)")
  p.add_argument("--repeats", type=int, default=5, help="timed calls per process (best kept)")
  p.add_argument("--rounds", type=int, default=3, help="processes per system, alternated")
  p.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    return worker(a)
  import statistics
  runs = {s: [] for s in SYSTEMS}
  for r in range(a.rounds):
    for s in (SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]):
      load = os.getloadavg()[0]
      argv = [sys.executable, __file__, f"--worker={s}"] + [
          f"--{k}={getattr(a, k)}" for k in ("tokens", "seq", "hidden", "inter", "experts", "ep", "repeats")]
      out = subprocess.run(argv, capture_output=True, text=True, check=True)
      res = json.loads(out.stdout.strip().splitlines()[-1])
      runs[s].append(res)
      print(f"round {r} {s:15s} {res['time'] * 1e3:8.1f} ms   load average {load:.2f}", flush=True)
  print(f"tokens={a.tokens} M={a.hidden} I={a.inter} E={a.experts} k=2 f32, mesh fsdp={8 // a.ep} "
        f"expert={a.ep}; fwd+bwd, best of {a.repeats} per process, median of {a.rounds} processes")
  med = {s: statistics.median(x["time"] for x in runs[s]) for s in SYSTEMS}
  for s in SYSTEMS:
    last = runs[s][-1]
    moved = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(last["bytes"].items()))
    print(f"  {s:15s} {med[s] * 1e3:8.1f} ms  {med[s] / med['gather_weights']:5.2f} x gather_weights;"
          f"  per device: temporaries {last['temp'] / 1e6:.1f} MB, received {moved} "
          f"(total {sum(last['bytes'].values()) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
