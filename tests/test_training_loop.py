"""training/loop.py: its schedule, timer and non-finite guard, and how `python -m apollo_jax.train`
stops: SIGTERM saves and exits 0 (also agreed across processes), a NaN loss exits non-zero without
saving the bad state (subprocess runs on fixture data)."""

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import train_fixtures as tf
from apollo_jax.training import loop


def test_due_every_n_steps_and_at_the_last():
  assert [s for s in range(1, 11) if loop.due(4, s, 10)] == [4, 8, 10]
  assert not any(loop.due(0, s, 10) for s in range(1, 11))       # 0: never, not even the last


def test_chrono_excludes_paused_time(monkeypatch):
  now = [100.0]
  monkeypatch.setattr(time, "time", lambda: now[0])
  c = loop.Chrono()
  assert not c.running
  c.restart(5)
  assert c.lap(5) is None                                         # no step in the window
  now[0] += 2.0
  with c.paused():
    now[0] += 30.0                                                # eval / checkpoint time
  now[0] += 2.0
  assert c.lap(9) == 1.0                                          # 4 steps in 4 s of training
  c.restart(9)
  now[0] += 1.0
  assert c.lap(13) == 4.0 and c.mean_steps_per_s == 8 / 5


class _Checkpointer:
  directory = "/w/checkpoints"

  def latest_step(self):
    return 40


def test_finite_guard_checks_one_step_late_and_now():
  guard = loop.FiniteGuard(_Checkpointer())
  ok = {"loss": np.float32(2.0), "grad_norm": np.float32(1.0)}
  guard.push(1, ok)
  guard.push(2, {"loss": np.float32(np.nan), "grad_norm": np.float32(1.0)})    # not checked yet
  with pytest.raises(loop.NonFiniteLoss, match=r"step 2 .*Last good checkpoint: step 40 in /w/checkpoints"):
    guard.now()
  guard = loop.FiniteGuard(_Checkpointer())
  guard.push(1, {"loss": np.float32(1.0), "grad_norm": np.float32(np.inf)})
  with pytest.raises(loop.NonFiniteLoss, match="step 1"):
    guard.push(2, ok)                                             # checked when the next step comes
  guard = loop.FiniteGuard(_Checkpointer())
  guard.push(3, ok)
  assert guard.now() == 2.0


STEPS = 30


@pytest.mark.slow
def test_sigterm_saves_and_resumes(data, jit_cache, tmp_path):
  workdir = str(tmp_path / "run")
  flags = tf.flags(data, STEPS, ckpt__every=1000)       # no periodic checkpoint before the signal
  proc = tf.start(workdir, flags, 1, jit_cache)
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    tf.wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc,
                what="the first logged step")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == 0, out[-3000:]
  m = re.search(r"SIGTERM: saved checkpoint at step (\d+)", out)
  assert m, out[-3000:]
  step = int(m.group(1))
  assert 1 <= step < STEPS
  assert tf.committed_steps(workdir) == [step]            # saved, and committed before exit
  assert tf.read_metrics(workdir)[-1]["step"] == step

  result = tf.check_ok(tf.run(workdir, flags, 1, jit_cache))
  assert f"resumed from {os.path.join(workdir, 'checkpoints')}/{step}" in result.stdout
  assert f"step {STEPS}/{STEPS} (started at {step})" in result.stdout
  assert [r["step"] for r in tf.read_metrics(workdir)] == list(range(1, STEPS + 1))
  assert tf.committed_steps(workdir) == [step, STEPS]


@pytest.mark.slow
def test_nan_loss_stops_without_saving(data, jit_cache, tmp_path):
  workdir = str(tmp_path / "run")
  # checkpoints every 2 steps; update 5 is poisoned (hidden test hook config.debug_nan_at_step).
  # log_every=10 so the NaN is caught by the lagged check when step 6 (a checkpoint step) runs.
  flags = tf.flags(data, STEPS, ckpt__every=2, log_every=10, debug_nan_at_step=5)
  result = tf.run(workdir, flags, 1, jit_cache)
  assert result.returncode != 0
  assert "non-finite loss at step 5" in result.stderr, result.stderr[-3000:]
  assert "Last good checkpoint: step 4" in result.stderr
  assert tf.committed_steps(workdir) == [2, 4]
  params = tf.restore_params(workdir, 4)
  assert params and all(np.isfinite(x).all() for x in params.values())
  # the bad state never reached the metrics either
  assert all(r["step"] < 5 for r in tf.read_metrics(workdir))


# ---------------------------------------------------------------------------- SIGTERM sync

STOP_SCRIPT = r"""
import os, signal, sys, time
pid, port = int(sys.argv[1]), sys.argv[2]
import jax
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid, initialization_timeout=30)
from apollo_jax.training import loop
stop = loop.StopRequest()
assert stop.sync
for step in range(1, 400):
  time.sleep(0.01 * (pid + 1))             # the processes run at different speeds
  if pid == 1 and step == 5:
    os.kill(os.getpid(), signal.SIGTERM)
  if stop.requested(step):
    print("STOP", step, flush=True)
    break
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_sigterm_on_one_process_stops_all_at_the_same_step(tmp_path):
  import socket
  script = tmp_path / "stop.py"
  script.write_text(STOP_SCRIPT)
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = str(s.getsockname()[1])
  s.close()
  env = {**tf.env(1), "PYTHONPATH": tf.REPO}
  procs = [subprocess.Popen([sys.executable, str(script), str(i), port], cwd=tf.REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
  outs = [p.communicate(timeout=120) for p in procs]
  steps = [re.findall(r"STOP (\d+)", o) for o, _ in outs]
  assert all(p.returncode == 0 for p in procs), [e[-2000:] for _, e in outs]
  assert steps[0] == steps[1] and len(steps[0]) == 1 and int(steps[0][0]) >= 5


def test_a_second_trainer_on_a_workdir_stops_at_once(tmp_path):
  from apollo_jax.runtime import workdir as workdir_io
  held = workdir_io.TrainerLock(str(tmp_path)).acquire()
  with pytest.raises(workdir_io.WorkdirLocked, match=f"{tmp_path} is in use by another trainer"):
    loop.train(tf.tiny_config(), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")
  held.release()


@pytest.fixture
def small_disk(tmp_path):
  """An 8 MB tmpfs: room for one checkpoint of the test model (~5.5 MB), not two. Skipped where
  the machine does not allow mounting one."""
  mnt = tmp_path / "small"
  mnt.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  yield mnt
  subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_stops_the_run_at_the_failed_save(data, jit_cache, small_disk):
  workdir = str(small_disk / "run")
  out = tf.run(workdir, tf.flags(data, STEPS, ckpt__every=5, eval_every=0), 1, jit_cache)
  assert out.returncode == 1, out.stderr[-3000:]
  err = next(line for line in out.stderr.splitlines() if line.startswith("ERROR: "))
  assert re.search(r"ERROR: writing a checkpoint in .* failed: .*(No space left|ENOSPC|space).*"
                   r"last complete checkpoint is step 5", err), err
  steps = [r["step"] for r in tf.read_metrics(workdir)]
  assert steps and steps[-1] < 15                 # stopped when the step-10 write failed, not at the next save
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "5"))
