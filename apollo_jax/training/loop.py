"""The training loop behind `python -m apollo_jax.train` (apollo_jax/train.py): build or resume the
state, then step, log, evaluate, checkpoint and stop on SIGTERM or a non-finite loss.
"""

import contextlib
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
  lock = hold_workdir(workdir)
  ckpt = checkpoint.Checkpointer(workdir, config)
  try:
    latest = ckpt.latest_step()
    if latest is not None:           # before anything is built or written
      setup.check_resume(workdir, config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
      model = transformer.build_model(config, mesh)
      data = pipeline.make_data(config, config.data.cache_dir or os.path.join(workdir, "data_cache"),
                                jax.process_index(), jax.process_count())
      config = pipeline.skip_empty_eval(config, data)
      setup.apply_epochs(config, data)  # steps from config.epochs: before the schedule is built
      tx = optimizer.make_optimizer(config)
      abstract, shardings, init_fn = ts.state_shardings(model, config, tx, mesh)
      if latest is not None:
        latest, state = ckpt.restore_latest(abstract, shardings, data.train_iter)   # newest intact one
        print(f"resumed from {ckpt.directory}/{latest}", flush=True)
      else:
        params = None
        if config.init_from:
          params = setup.load_params(config, abstract["params"], shardings["params"])
        state = ts.init_state(config, tx, shardings, init_fn, params)
      workdir_io.write_config(config, workdir)   # only now: a failed resume leaves the workdir as it was
      return _loop(config, workdir, mesh, model, tx, state, shardings, data, ckpt, stop, lock)
  finally:
    ckpt.close()                     # waits for in-flight async saves (also on NaN / errors)
    lock.release()


def hold_workdir(workdir):
  """The workdir's TrainerLock, taken by process 0 for the run; every process stops if it is
  held elsewhere."""
  lock, refused = workdir_io.TrainerLock(workdir), None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except workdir_io.WorkdirLocked as e:
      refused = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
      raise workdir_io.WorkdirLocked(f"{workdir} is in use by another trainer (see process 0's log)")
  if refused is not None:
    raise refused
  return lock


def _loop(config, workdir, mesh, model, tx, state, shardings, data, ckpt, stop, lock):
  train_fn = ts.jit_train_step(ts.make_train_step(model, config, tx, mesh), shardings, mesh)
  eval_fn = ts.jit_eval_step(ts.make_eval_step(model, config), shardings, mesh)
  rows = config.global_batch // jax.process_count()
  tokens_per_step = config.global_batch * config.data.seq_len
  peak, peak_src = mx.peak_flops(config)
  start = int(state["step"])
  bench = in_training.make(config, mesh, data.tokenizer, data.local_cache)   # None unless bench_eval.every > 0
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

  step, status = start, "done"
  chrono, guard = Chrono(), FiniteGuard(ckpt)
  while step < config.steps:
    state, m = train_fn(state, global_batch(next(data.train_iter), mesh, rows))
    step += 1
    guard.push(step, m)
    ckpt.check()                     # a failed background save stops the run now, not a save later
    lock.renew()                     # gs:// workdirs: keep the lease (a no-op elsewhere)
    if not chrono.running:           # the first step compiled: time from here on
      jax.block_until_ready(m["loss"])
      chrono.restart(step)
    stopping = stop.requested(step)
    eval_now = due(config.eval_every, step, config.steps)
    bench_now = bench is not None and due(config.bench_eval.every, step, config.steps)
    log_now = due(config.log_every, step, config.steps) or eval_now or bench_now or stopping
    save_now = due(config.ckpt.every, step, config.steps) or stopping
    if not (log_now or save_now):
      log.advance(1)
      continue
    loss = guard.now()               # never save or report a non-finite state
    log.advance(1, loss=loss)
    if log_now:
      rec = {"loss": loss, "ce": m["ce"], "aux_loss": m["aux_loss"], "lr": m["lr"],
             "grad_norm": m["grad_norm"], "tokens_per_s": None, "mfu": None}
      steps_per_s = chrono.lap(step)
      if steps_per_s is not None:
        rec["tokens_per_s"] = steps_per_s * tokens_per_step
        rec["mfu"] = mx.mfu(config, rec["tokens_per_s"], peak)
        summary["tokens_per_s"] = chrono.mean_steps_per_s * tokens_per_step
      rec.update(ts.family_losses(m["family_ce_sum"], m["family_count"]))
      rec.update({k: v for k, v in m.items() if k.startswith("moe/")})
      if eval_now:
        with chrono.paused():
          rec.update(evaluate(eval_fn, state["params"], data, mesh, rows))
        summary["eval_loss"] = rec["eval_loss"]
        log.print(f"step {step}: loss {loss:.4f}  eval_loss {rec['eval_loss']:.4f}")
      if bench_now:
        with chrono.paused():
          rec.update(bench(state["params"]))
      log.write(step, rec)
      summary["loss"] = loss
    if save_now:
      with chrono.paused():
        ckpt.save(step, state, data.train_iter)
      if stopping:
        ckpt.wait()
        status = "preempted"
        log.print(f"SIGTERM: saved checkpoint at step {step} in {ckpt.directory}; exiting. "
                  "Rerun the same command to resume.")
        break
    if log_now:                      # the next throughput window starts after this step's work
      chrono.restart(step)
  log.close()
  return {**summary, "step": step, "status": status}


def due(every: int, step: int, last: int) -> bool:
  """A periodic schedule: every `every` steps and at the last step; never when `every` <= 0."""
  return every > 0 and (step % every == 0 or step == last)


class Chrono:
  """Training throughput, window by window: a window opens at `restart(step)` and `lap(step)`
  closes it; time inside `paused()` (eval, benchmark, checkpoint) does not count."""

  def __init__(self):
    self.running, self.t0, self.step0, self.pause = False, 0.0, 0, 0.0
    self.total_s, self.total_steps = 0.0, 0

  def restart(self, step: int):
    self.running, self.t0, self.step0, self.pause = True, time.time(), step, 0.0

  @contextlib.contextmanager
  def paused(self):
    t = time.time()
    try:
      yield
    finally:
      self.pause += time.time() - t

  def lap(self, step: int):
    """Steps per second since the window opened (None if no step ran in it)."""
    if step <= self.step0:
      return None
    dt = time.time() - self.t0 - self.pause
    self.total_s, self.total_steps = self.total_s + dt, self.total_steps + step - self.step0
    return (step - self.step0) / dt

  @property
  def mean_steps_per_s(self) -> float:
    return self.total_steps / self.total_s


class FiniteGuard:
  """Checks each step's loss one step late, so the host never waits for the step it has just
  dispatched; `now()` checks the newest step at once, before anything is logged or saved."""

  def __init__(self, ckpt):
    self.ckpt, self.pending = ckpt, None

  def push(self, step, metrics):
    if self.pending is not None:
      self._check(*self.pending)
    self.pending = (step, metrics)

  def now(self) -> float:
    loss, self.pending = self._check(*self.pending), None
    return loss

  def _check(self, step, m) -> float:
    loss, gnorm = float(m["loss"]), float(m["grad_norm"])
    if not (np.isfinite(loss) and np.isfinite(gnorm)):
      raise NonFiniteLoss(
          f"non-finite loss at step {step} (loss={loss}, grad_norm={gnorm}); stopped WITHOUT saving "
          f"this state. Last good checkpoint: step {self.ckpt.latest_step()} in {self.ckpt.directory}. "
          "Try a lower --config.optim.lr, a longer warmup, or check the data; rerunning resumes from "
          "that checkpoint.")
    return loss


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
