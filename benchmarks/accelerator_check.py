"""The device check: one command, one table, one JSON file, on whatever accelerator is here.

  python benchmarks/accelerator_check.py [--out=accelerator_check.json]   # GPU or TPU, < 8 min
  python benchmarks/accelerator_check.py --quick                          # CPU, tiny shapes (tests)

Sections (each kernel only where it runs: Pallas kernels natively, cudnn on GPU):
  parity     each attention and MoE kernel in bfloat16 against the float32 reference on the same
             inputs (attention: the masked softmax; MoE: every expert on every token, masked to
             the routed ones). Its error must be <= 2x the error of the plain bfloat16 reference
             (xla attention / the loop-over-experts MoE in bf16) + one bf16 ulp of the scale.
             With 2 or more devices, also each expert-parallel dispatch (gather_tokens, and
             ragged_a2a off CPU) over all devices as one expert axis, by the same rule.
  moe        forward + backward of the dropless expert FFN per kernel (blocks; ragged without
             and, in a subprocess, with XLA's ragged-dot fusion flag; gmm on TPU) against a dense
             SwiGLU FFN on the same tokens (the MoE does top_k x its FLOPs at best).
  attention  forward + backward per kernel at the 0.5B shape (14 q / 2 kv heads, D 64) and seq 4096.
  train      one train step of Apollo-MoE-0.5B (bf16, remat as shipped, 2 rows x 4096 tokens per
             device, random init): tokens/s and MFU against the device's peak (training/metrics.py).
Times are the best of --repeats after a warm-up; nothing here is asserted on time.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from apollo_jax import config as cfg  # noqa: E402
from apollo_jax.model import attention, dropless  # noqa: E402
from apollo_jax.training import metrics  # noqa: E402
from benchmarks.moe_block import timeit as best_time  # noqa: E402

RAGGED_FUSION = dropless.RAGGED_FUSION_FLAG + "=true"
FULL = dict(tokens=16384, hidden=896, inter=4864, experts=7, top_k=2, batch=4, seq=4096,
            heads=14, kv_heads=2, head_dim=64, parity_tokens=4096, parity_seq=1024)
QUICK = dict(tokens=512, hidden=32, inter=64, experts=7, top_k=2, batch=1, seq=256,
             heads=4, kv_heads=2, head_dim=32, parity_tokens=512, parity_seq=256)


def rel_err(a, b):
  """max |a - b| / max |b| over a pytree (float64 on the host)."""
  a, b = (np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]) for t in (a, b))
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------------ kernels available here
def attention_kernels(backend, quick):
  """Attention kernels to check: natives of this backend; interpreted Pallas ones only in --quick."""
  names = ["xla", "blocked"]
  names += [k for k in ("splash", "pallas_gpu") if not attention.interprets(k, backend) or quick]
  return names + (["cudnn"] if backend == "gpu" else [])


def moe_kernels(backend, quick):
  names = ["blocks", "ragged"]
  return names + (["gmm"] if backend == "tpu" or quick else [])


# ------------------------------------------------------------------ attention
def segments(B, S, packed):
  """Segment ids [B, S]: several documents per row with boundaries off the 128 tiles and padding
  at the tail (packed), or one document per row (cudnn takes no segment ids)."""
  if not packed:
    return jnp.ones((B, S), jnp.int32)
  pos = np.arange(S) / S
  seg = 1 + np.searchsorted([0.3, 0.55, 0.9], pos, side="right")      # documents 1, 2, 3, 4
  seg = np.where(pos >= 0.97, 0, seg)                                  # then padding
  return jnp.asarray(np.broadcast_to(seg, (B, S)), jnp.int32)


def attention_inputs(B, S, H, Kv, D, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(ks[0], (B, S, Kv, H // Kv, D), jnp.float32)
  k = jax.random.normal(ks[1], (B, S, Kv, D), jnp.float32)
  v = jax.random.normal(ks[2], (B, S, Kv, D), jnp.float32)
  r = jax.random.normal(ks[3], q.shape, jnp.float32)
  return tuple(x.astype(dtype) for x in (q, k, v, r))


def attention_grad_fn(impl, interpret):
  """(output, dq, dk, dv) of sum(attend(q, k, v) * r), jitted."""
  def f(q, k, v, r, seg):
    out, vjp = jax.vjp(lambda q, k, v: attention.attend(q, k, v, seg, impl, interpret), q, k, v)
    return (out,) + vjp(r)
  return jax.jit(f)


def attention_parity(s, backend, quick):
  B, S = 2 if not quick else 1, s["parity_seq"]
  rows = {}
  for impl in attention_kernels(backend, quick):
    seg = segments(B, S, packed=impl != "cudnn")
    q, k, v, r = attention_inputs(B, S, s["heads"], s["kv_heads"], s["head_dim"], jnp.bfloat16)
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v, r))
    ref = attention_grad_fn("xla", False)(*f32, seg)
    base = attention_grad_fn("xla", False)(q, k, v, r, seg)
    got = attention_grad_fn(impl, attention.interprets(impl, backend))(q, k, v, r, seg)
    rows[impl] = verdict(got, base, ref)
  return rows


def verdict(got, base, ref):
  """Errors of each output against the f32 reference, and the pass rule of the docstring."""
  ulp = float(jnp.finfo(jnp.bfloat16).eps)
  errs = [rel_err(g, f) for g, f in zip(got, ref)]
  bounds = [2 * rel_err(b, f) + ulp for b, f in zip(base, ref)]
  return {"errors": errs, "bounds": bounds, "ok": all(e <= b for e, b in zip(errs, bounds))}


def attention_times(s, backend, quick, repeats):
  B, S = s["batch"], s["seq"]
  out = {}
  for impl in attention_kernels(backend, quick):
    if attention.interprets(impl, backend):
      continue                                            # interpret mode is not a benchmark
    seg = segments(B, S, packed=impl != "cudnn")
    q, k, v, r = attention_inputs(B, S, s["heads"], s["kv_heads"], s["head_dim"], jnp.bfloat16)
    fn = attention_grad_fn(impl, False)
    try:
      out[impl] = best_time(fn, q, k, v, r, seg, repeats=repeats)
    except Exception as e:                                 # e.g. out of memory for xla's [S, S]
      out[impl] = f"failed: {type(e).__name__}: {str(e)[:200]}"
  return out


# ------------------------------------------------------------------ MoE
def moe_inputs(s, N, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  M, I, E, K = s["hidden"], s["inter"], s["experts"], s["top_k"]
  x = jax.random.normal(ks[0], (N, M), jnp.float32)
  logits = jax.random.normal(ks[1], (N, E), jnp.float32) + jnp.linspace(0, 1.5, E)   # uneven load
  weights, idx = jax.lax.top_k(jax.nn.softmax(logits), K)
  wg = jax.random.normal(ks[2], (E, M, I), jnp.float32) * M ** -0.5
  wu = jax.random.normal(ks[3], (E, M, I), jnp.float32) * M ** -0.5
  wd = jax.random.normal(ks[4], (E, I, M), jnp.float32) * I ** -0.5
  dy = jax.random.normal(ks[5], (N, M), jnp.float32)
  cast = lambda a: a.astype(dtype)
  return cast(x), idx.astype(jnp.int32), weights, cast(wg), cast(wu), cast(wd), dy


def loop_moe(x, idx, weights, valid, wg, wu, wd):
  """Every expert on every token, kept where routed: the loop-over-experts reference."""
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(wg.shape[0]):
    h = jax.nn.silu(x @ wg[e]) * (x @ wu[e])
    w_e = jnp.sum(jnp.where((idx == e) & valid, weights, 0.0), axis=1)
    y = y + w_e[:, None] * (h @ wd[e]).astype(jnp.float32)
  return y


def moe_grad_fn(ffn):
  """(y, dx, dwg, dwu, dwd) of sum(ffn(x, ...) * dy), jitted."""
  def f(x, idx, weights, wg, wu, wd, dy):
    valid = jnp.ones(idx.shape, bool)
    y, vjp = jax.vjp(lambda x, wg, wu, wd: ffn(x, idx, weights, valid, wg, wu, wd), x, wg, wu, wd)
    return (y,) + vjp(dy.astype(y.dtype))
  return jax.jit(f)


def kernel_ffn(kernel, backend):
  interpret = kernel == "gmm" and backend != "tpu"
  return lambda *a: dropless.moe_ffn(*a, kernel=kernel, interpret=interpret)


def moe_parity(s, backend, quick):
  inputs = moe_inputs(s, s["parity_tokens"], jnp.bfloat16)
  f32 = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in inputs)
  ref = moe_grad_fn(loop_moe)(*f32)
  base = moe_grad_fn(loop_moe)(*inputs)
  return {k: verdict(moe_grad_fn(kernel_ffn(k, backend))(*inputs), base, ref)
          for k in moe_kernels(backend, quick)}


def dispatch_parity(s, backend):
  """model/moe.py dropless_moe with every device on one expert axis, per dispatch (module
  docstring); {} on one device. The experts are padded to a multiple of the devices."""
  from jax.sharding import AxisType
  from apollo_jax.model import moe
  from apollo_jax.runtime import sharding
  n = jax.device_count()
  if n < 2:
    return {}
  s = dict(s, experts=-(-s["experts"] // n) * n)
  inputs = moe_inputs(s, s["parity_tokens"], jnp.bfloat16)
  f32 = tuple(a.astype(jnp.float32) if a.dtype == jnp.bfloat16 else a for a in inputs)
  ref, base = moe_grad_fn(loop_moe)(*f32), moe_grad_fn(loop_moe)(*inputs)
  mesh = jax.make_mesh((1, 1, n, 1), cfg.MESH_AXES, axis_types=(AxisType.Auto,) * 4)

  def ffn(dispatch):
    def f(*a):                    # [N, ...] -> n rows of N / n tokens, one per device
      rows = [t.reshape(n, t.shape[0] // n, *t.shape[1:]) for t in a[:4]]
      y = moe.dropless_moe(*rows, *a[4:], "blocks", mesh=mesh.abstract_mesh,
                           batch_axes=sharding.BATCH_AXES, dispatch=dispatch)
      return y.reshape(a[0].shape[0], -1)
    return f

  with jax.set_mesh(mesh):
    return {d: verdict(moe_grad_fn(ffn(d))(*inputs), base, ref)
            for d in ["gather_tokens"] + (["ragged_a2a"] if backend != "cpu" else [])}


def dense_ffn(x, idx, weights, valid, wg, wu, wd):
  """One SwiGLU FFN of expert 0's shape on every token: what a dense layer costs."""
  del idx, weights, valid
  return ((jax.nn.silu(x @ wg[0]) * (x @ wu[0])) @ wd[0]).astype(jnp.float32)


def moe_times(s, backend, quick, repeats, only=None):
  inputs = moe_inputs(s, s["tokens"], jnp.bfloat16)
  fns = {"dense_ffn": dense_ffn}
  fns.update({k: kernel_ffn(k, backend) for k in moe_kernels(backend, quick)
              if k != "gmm" or backend == "tpu"})
  if only:
    fns = {only: fns[only]}
  return {name: best_time(moe_grad_fn(fn), *inputs, repeats=repeats) for name, fn in fns.items()}


def ragged_fused_time(args):
  """ragged in a fresh process with XLA's ragged-dot fusion flag (flags are read at start-up)."""
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + RAGGED_FUSION).strip())
  cmd = [sys.executable, os.path.abspath(__file__), "--only_moe=ragged", f"--repeats={args.repeats}"]
  cmd += ["--quick"] if args.quick else []
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  if out.returncode != 0:
    return f"failed: {out.stderr.strip().splitlines()[-1][:300] if out.stderr.strip() else out.returncode}"
  return json.loads(out.stdout.strip().splitlines()[-1])["ragged"]


# ------------------------------------------------------------------ train step
def train_step(quick, repeats):
  from benchmarks import train_step as bench
  c = cfg.load("tiny" if quick else "apollo_moe_0p5b")
  c.global_batch, c.grad_accum = 2 * jax.device_count(), 1
  if quick:
    c.data.seq_len = 128
  c.data.seq_len = min(c.data.seq_len, 4096)
  c.mesh.update(data=1, fsdp=-1, expert=1, tensor=1)
  cfg.validate(c, jax.device_count())
  run, state = bench.build(c)
  state = run(state)                                      # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    state = run(state)
    best = min(best, time.perf_counter() - t)
  tps = c.global_batch * c.data.seq_len / best
  peak, peak_source = metrics.peak_flops(c)
  return {"config": "tiny" if quick else "apollo_moe_0p5b", "rows": c.global_batch,
          "seq": c.data.seq_len, "dtype": c.model.dtype, "remat": c.model.remat, "step_s": best,
          "tokens_per_s": tps, "mfu": metrics.mfu(c, tps, peak), "peak": peak_source}


# ------------------------------------------------------------------ report
def table(r):
  lines = [f"accelerator check on {r['device']} ({r['backend']}), jax {r['jax']}, {r['shapes']}"]
  for section in ("attention", "moe", "dispatch"):
    for name, v in r["parity"][section].items():
      errs = " ".join(f"{e:.2e}<={b:.2e}" for e, b in zip(v["errors"], v["bounds"]))
      lines.append(f"  parity {section:9s} {name:11s} {'ok  ' if v['ok'] else 'FAIL'} {errs}")
  base = r["moe"].get("dense_ffn")
  for name, t in r["moe"].items():
    ratio = f"{t / base:6.2f} x dense_ffn" if isinstance(t, float) and base else ""
    lines.append(f"  moe fwd+bwd {name:18s} " + (f"{t * 1e3:9.2f} ms  {ratio}" if isinstance(t, float) else t))
  for name, t in r["attention"].items():
    lines.append(f"  attention fwd+bwd {name:12s} " + (f"{t * 1e3:9.2f} ms" if isinstance(t, float) else t))
  t = r["train"]
  lines.append(f"  train step {t['config']} {t['rows']} x {t['seq']} {t['dtype']} remat {t['remat']}: "
               f"{t['step_s'] * 1e3:.1f} ms, {t['tokens_per_s']:.0f} tokens/s, MFU {t['mfu']:.3f} ({t['peak']})")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="tiny shapes (CPU; what the test suite runs)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default="accelerator_check.json")
  p.add_argument("--only_moe", default="", help=argparse.SUPPRESS)   # the fused-ragged subprocess
  a = p.parse_args()
  backend, s = jax.default_backend(), (QUICK if a.quick else FULL)
  if a.only_moe:
    print(json.dumps(moe_times(s, backend, a.quick, a.repeats, only=a.only_moe)))
    return
  t0 = time.perf_counter()
  r = {"device": jax.devices()[0].device_kind, "backend": backend, "jax": jax.__version__,
       "shapes": {k: s[k] for k in ("tokens", "hidden", "inter", "experts", "top_k", "seq", "heads",
                                    "kv_heads", "head_dim")}}
  r["parity"] = {"attention": attention_parity(s, backend, a.quick), "moe": moe_parity(s, backend, a.quick),
                 "dispatch": dispatch_parity(s, backend)}
  r["moe"] = moe_times(s, backend, a.quick, a.repeats)
  r["moe"]["ragged_fused"] = ragged_fused_time(a)
  r["attention"] = attention_times(s, backend, a.quick, a.repeats)
  r["train"] = train_step(a.quick, a.repeats)
  r["seconds"] = time.perf_counter() - t0
  print(table(r))
  print(f"  total {r['seconds']:.0f} s; JSON: {a.out}")
  with open(a.out, "w") as f:
    json.dump(r, f, indent=1)
  ok = all(v["ok"] for sec in r["parity"].values() for v in sec.values())
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
