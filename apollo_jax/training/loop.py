"""The training loop behind `python -m apollo_jax.train` (apollo_jax/train.py): build or resume the
state, then step, log, evaluate, checkpoint and stop on SIGTERM or a non-finite loss.
"""

import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np

from apollo_jax import config as cfg
from apollo_jax.training import checkpoint
from apollo_jax.training import metrics as mx
from apollo_jax.training import optimizer
from apollo_jax.training import memory_plan
from apollo_jax.training import setup
from apollo_jax.runtime import sharding
from apollo_jax.training import step as ts
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.data import pipeline
from apollo_jax.evaluation import in_training
from apollo_jax.model import transformer


class NonFiniteLoss(RuntimeError):
  pass


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
  setup.prepare(config)             # init_from's tokenizer; big configs: what is missing (first)
  cfg.validate(config, jax.device_count())
  mesh = sharding.make_mesh(config)
  stop = StopRequest()
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
    model = transformer.build_model(config, mesh)
    data = pipeline.make_data(config, config.data.cache_dir or os.path.join(workdir, "data_cache"),
                              jax.process_index(), jax.process_count())
    config = pipeline.skip_empty_eval(config, data)
    setup.apply_epochs(config, data)  # steps from config.epochs: before the schedule is built
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
        params = setup.load_params(config, abstract["params"], shardings["params"])
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

  train_fn = memory_plan.before_training(config, mesh, train_fn, state, log.print)   # memory/FLOP plan

  if start == 0 and config.eval_every > 0:     # baseline for "is eval loss falling"
    ev0 = evaluate(eval_fn, state["params"], data, mesh, rows)
    summary["eval_loss_start"] = ev0["eval_loss"]
    log.write(0, ev0)                          # analysis/plots.py draws the eval curve from step 0
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
