"""Preemption and failure handling of `python -m apollo_jax.train`: SIGTERM saves and exits 0, a
NaN loss exits non-zero without saving the bad state (subprocess runs on fixture data)."""

import os
import re
import signal

import numpy as np
import pytest

import train_fixtures as tf

pytestmark = pytest.mark.slow
STEPS = 30


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
