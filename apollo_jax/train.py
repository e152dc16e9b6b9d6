"""Train Apollo-MoE: `python -m apollo_jax.train --config=configs/tiny.py --workdir=DIR`.

Config arguments and overrides: `--config=configs/tiny.py:routing=topk --config.steps=200
--config.optim.lr=3e-4`. A run resumes from the latest complete checkpoint in DIR/checkpoints.
SIGTERM (preemption) finishes the current step, saves, waits for the save and exits 0. A
non-finite loss stops the run with exit status 1 without saving that state. `--config.init_from`
and `--config.epochs`: see run_setup.py; user errors print one paragraph (`--debug`: traceback).

Multi-process (TPU pods, multi-GPU hosts): set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or run where jax.distributed auto-detects the cluster and set only
JAX_COORDINATOR_ADDRESS=auto); every process runs the same command with a shared WORKDIR.
"""

import os
import signal
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from apollo_jax import checkpoint, cli, config as cfg, metrics as mx, optimizer, plan, run_setup, sharding
from apollo_jax import train_step as ts
from apollo_jax import workdir as workdir_io
from apollo_jax.data import pipeline
from apollo_jax.evaluation import in_training
from apollo_jax.model import transformer


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "output dir: checkpoints/, metrics.jsonl, data_cache/")


class NonFiniteLoss(RuntimeError):
  pass


def maybe_initialize_distributed():
  """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr:
    return
  if addr == "auto":            # TPU pods / SLURM: let JAX detect the cluster
    jax.distributed.initialize()
    return
  missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
  if missing:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={addr} is set but {', '.join(missing)} is not; set all three "
                     "(or JAX_COORDINATOR_ADDRESS=auto on a TPU pod / SLURM cluster)")
  jax.distributed.initialize(addr, int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))


class StopRequest:
  """SIGTERM -> stop after a step that every process agrees on, without a per-step device sync.

  One process: a Python SIGTERM handler sets a flag. Several: JAX's preemption sync point (the
  coordination service catches SIGTERM on any process and picks the same step for all, host-side
  only); if that service is off, the flags are all-gathered every AGREE_EVERY steps.
  """

  AGREE_EVERY = 10

  def __init__(self):
    from jax._src import distributed
    self.flag = False
    self.sync = jax.process_count() > 1 and distributed.global_state.preemption_sync_manager is not None
    if not self.sync:          # (a Python handler would replace the coordination service's)
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.flag = True

  def requested(self, step: int) -> bool:
    """Call after every step (all processes, same steps)."""
    from jax.experimental import multihost_utils
    if self.sync:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.flag
    if step % self.AGREE_EVERY:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.flag))))


def global_batch(local, mesh, rows: int):
  """Process-local numpy rows -> global jax arrays sharded over the batch mesh axes."""
  sh = sharding.batch_sharding(mesh)
  out = {}
  for k in ts.BATCH_KEYS:
    x = np.asarray(local[k], np.int32)
    if x.shape[0] < rows:     # a short final eval batch: pad rows that carry no loss
      x = np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], np.int32)])
    out[k] = jax.make_array_from_process_local_data(sh, x, (rows * jax.process_count(), x.shape[1]))
  return out


def train(config, workdir: str) -> dict:
  """Runs (or resumes) training; returns a summary dict. Raises NonFiniteLoss on NaN/Inf."""
  run_setup.prepare(config)             # init_from's tokenizer; big configs: what is missing (first)
  cfg.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  stop = StopRequest()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    model = transformer.build_model(config)
    data = pipeline.make_data(config, config.data.cache_dir or os.path.join(workdir, "data_cache"),
                              jax.process_index(), jax.process_count())
    config = pipeline.skip_empty_eval(config, data)
    run_setup.apply_epochs(config, data)  # steps from config.epochs: before the schedule is built
    workdir_io.write_config(config, workdir)   # WORKDIR/config.json + tokenizer: all inference/export need
    tx = optimizer.make_optimizer(config)
    abstract, shardings, init_fn = ts.state_shardings(model, config, tx, mesh)
    ckpt = checkpoint.Checkpointer(workdir, config)
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, abstract, shardings, data.train_iter)
      print(f"resumed from {ckpt.directory}/{latest}", flush=True)
    else:
      params = None
      if config.init_from:
        params = run_setup.load_params(config, abstract["params"], shardings["params"])
      state = ts.init_state(config, tx, shardings, init_fn, params)
    try:
      return _loop(config, workdir, mesh, model, tx, state, shardings, data, ckpt, stop)
    finally:
      ckpt.close()             # waits for in-flight async saves (also on NaN / errors)


def _loop(config, workdir, mesh, model, tx, state, shardings, data, ckpt, stop):
  train_fn = ts.jit_train_step(ts.make_train_step(model, config, tx, mesh), shardings, mesh)
  eval_fn = ts.jit_eval_step(ts.make_eval_step(model, config), shardings, mesh)
  rows = config.global_batch // jax.process_count()
  tokens_per_step = config.global_batch * config.data.seq_len
  peak, peak_src = mx.peak_flops(config)
  start = int(state["step"])
  bench = in_training.make(config, mesh, data.tokenizer)   # None unless bench_eval.every > 0
  log = mx.Logger(workdir, config, start)
  keys = ("train_samples", "eval_samples", "steps_per_epoch", "packing_efficiency", "bad_records_skipped")
  log.print("data: " + ", ".join(f"{k}={data.stats[k]:.3g}" if isinstance(data.stats[k], float)
                                 else f"{k}={data.stats[k]}" for k in keys if k in data.stats))
  log.print(f"mesh {dict(mesh.shape)}, {jax.device_count()} devices ({jax.devices()[0].device_kind}), "
            f"{mx.active_params(config) / 1e6:.2f}M active matmul params, peak {peak:.3g} FLOP/s "
            f"({peak_src}); start step {start} of {config.steps}")
  summary = {"start_step": start, "loss": None, "eval_loss": None, "eval_loss_start": None,
             "tokens_per_s": None}
  if start >= config.steps:
    log.print(f"already trained: checkpoint step {start} >= steps={config.steps}")
    log.close()
    return {**summary, "step": start, "status": "done"}

  train_fn = plan.before_training(config, mesh, train_fn, state, log.print)   # memory/FLOP plan

  if start == 0 and config.eval_every > 0:     # baseline for "is eval loss falling"
    ev0 = evaluate(eval_fn, state["params"], data, mesh, rows)
    summary["eval_loss_start"] = ev0["eval_loss"]
    log.write(0, ev0)                          # plot.py draws the eval curve from step 0
    log.print(f"step 0: eval_loss {summary['eval_loss_start']:.4f}")

  def check(step, m):
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      raise NonFiniteLoss(
          f"non-finite loss at step {step} (loss={loss}, grad_norm={gnorm}); stopped WITHOUT saving "
          f"this state. Last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}. Try a lower "
          "--config.optim.lr, a longer warmup, or check the data; rerunning resumes from that checkpoint.")
    return loss

  step, status, pending = start, "done", None
  t0, t_steps, excluded, total_time, total_steps = None, start, 0.0, 0.0, 0
  while step < config.steps:
    batch = global_batch(next(data.train_iter), mesh, rows)
    state, m = train_fn(state, batch)
    step += 1
    if pending is not None:          # check the previous step while this one runs
      check(*pending)
    pending = (step, m)
    stopping = stop.requested(step)
    do_eval = config.eval_every > 0 and (step % config.eval_every == 0 or step == config.steps)
    do_bench = bench is not None and bench.due(step)
    do_log = step % config.log_every == 0 or step == config.steps or do_eval or do_bench or stopping
    do_ckpt = step % config.ckpt.every == 0 or step == config.steps or stopping
    if t0 is None:                   # the first step compiled: time from here on
      jax.block_until_ready(m["loss"])
      t0, t_steps = time.time(), step
    if not (do_log or do_ckpt):
      log.advance(1)
      continue
    loss = check(*pending)           # never save or report a non-finite state
    pending = None
    log.advance(1, loss=loss)
    if do_log:
      now = time.time()
      rec = {"loss": loss, "ce": m["ce"], "aux_loss": m["aux_loss"], "lr": m["lr"],
             "grad_norm": m["grad_norm"], "tokens_per_s": None, "mfu": None}
      if step > t_steps:
        dt = now - t0 - excluded
        rec["tokens_per_s"] = (step - t_steps) * tokens_per_step / dt
        rec["mfu"] = mx.mfu(config, rec["tokens_per_s"], peak)
        total_time, total_steps = total_time + dt, total_steps + step - t_steps
        summary["tokens_per_s"] = total_steps * tokens_per_step / total_time
      rec.update(ts.family_losses(m["family_ce_sum"], m["family_count"]))
      rec.update({k: v for k, v in m.items() if k.startswith("moe/")})
      if do_eval:
        t_eval = time.time()
        rec.update(evaluate(eval_fn, state["params"], data, mesh, rows))
        summary["eval_loss"] = rec["eval_loss"]
        log.print(f"step {step}: loss {loss:.4f}  eval_loss {rec['eval_loss']:.4f}")
        excluded += time.time() - t_eval
      if do_bench:
        t_bench = time.time()
        rec.update(bench(state["params"]))
        excluded += time.time() - t_bench
      log.write(step, rec)
      summary["loss"] = loss
    if do_ckpt:
      t_ckpt = time.time()
      ckpt.save(step, state, data.train_iter)
      if stopping:
        ckpt.wait()
        status = "preempted"
        log.print(f"SIGTERM: saved checkpoint at step {step} in {ckpt.directory}; exiting. "
                  "Rerun the same command to resume.")
        break
      excluded += time.time() - t_ckpt
    if do_log:                       # restart the throughput window after log/eval/save work
      t0, t_steps, excluded = time.time(), step, 0.0
  log.close()
  return {**summary, "step": step, "status": status}


def evaluate(eval_fn, params, data, mesh, rows):
  """Token-mean CE over all held-out batches (sum CE / token count), and per family."""
  total = None
  for local in data.eval_batches():
    out = eval_fn(params, global_batch(local, mesh, rows))
    total = out if total is None else jax.tree.map(lambda a, b: a + b, total, out)
  if total is None:
    raise ValueError("the eval split is empty: add data.eval_files, raise data.eval_fraction, or set "
                     "--config.eval_every=0")
  total = jax.device_get(total)
  res = {"eval_loss": float(total["ce_sum"] / max(float(total["count"]), 1.0))}
  res.update({f"eval_{k}": v for k, v in
              ts.family_losses(total["family_ce_sum"], total["family_count"]).items()})
  return res


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/tiny.py")
  if not flags.FLAGS["verbosity"].present:   # Orbax logs every save at INFO; keep the bar readable
    logging.set_verbosity(logging.WARNING)
  maybe_initialize_distributed()
  t = time.time()
  try:
    s = train(config, workdir)
  except NonFiniteLoss as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() != 0:
    return
  fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
  ev = fmt(s["eval_loss"]) if s["eval_loss_start"] is None else f"{fmt(s['eval_loss_start'])} -> {fmt(s['eval_loss'])}"
  print(f"{s['status']}: step {s['step']}/{config.steps} (started at {s['start_step']}) in "
        f"{time.time() - t:.1f}s; final loss {fmt(s['loss'])}, eval loss {ev}, "
        f"{fmt(s['tokens_per_s'])} tokens/s", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
