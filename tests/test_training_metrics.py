"""training/metrics.Logger and runtime/workdir on a gs:// workdir (fsspec in memory):
metrics.jsonl, config.json, a resumed run rewriting later steps, only process 0 writing."""

import json
import sys

import jax
import numpy as np
import pytest

import train_fixtures as tf
from apollo_jax.training import checkpoint
from apollo_jax.training import metrics
from apollo_jax.runtime import workdir as workdir_io

_config = tf.tiny_config


@pytest.fixture
def gs_in_memory(monkeypatch):
  """gs:// served by fsspec's in-memory filesystem: the same epath/fsspec code path as GCS."""
  import fsspec
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem
  monkeypatch.setitem(sys.modules[fsspec.register_implementation.__module__]._registry, "gcs",
                      MemoryFileSystem)
  backend.fsspec_backend._get_filesystem.cache_clear()
  MemoryFileSystem.store.clear()
  yield MemoryFileSystem.store
  backend.fsspec_backend._get_filesystem.cache_clear()


def test_gs_workdir_metrics_and_config(gs_in_memory, monkeypatch):
  from etils import epath
  c = _config()
  work = "gs://bucket/run"
  log = metrics.Logger(work, c, 0)
  log.write(1, {"loss": 1.0})
  log.write(2, {"loss": np.float32(0.5)})
  log.close()
  workdir_io.write_config(c, work)
  assert any(k.endswith("bucket/run/metrics.jsonl") for k in gs_in_memory)
  read = lambda: workdir_io.read_metrics(work)
  assert read() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
  assert json.loads(epath.Path(work, "config.json").read_text())["model"]["vocab_size"] == 640
  log = metrics.Logger(work, c, 1)         # resumed at step 1: step 2 is redone
  log.write(2, {"loss": 0.25})
  log.close()
  assert read() == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.25}]
  assert str(checkpoint.workdir_path(work)) == work                  # URIs are kept as given
  monkeypatch.setattr(jax, "process_index", lambda: 1)      # only process 0 writes
  log = metrics.Logger("gs://bucket/other", c, 0)
  log.write(1, {"loss": 1.0})
  log.close()
  workdir_io.write_config(c, "gs://bucket/other")
  assert not any("other" in k for k in gs_in_memory)


def _write(work, start, steps, c):
  log = metrics.Logger(work, c, start)
  for s in steps:
    log.write(s, {"loss": float(s)})
  log.close()


def test_local_metrics_are_appended_never_rewritten(tmp_path, caplog):
  c, work = _config(), str(tmp_path)
  path = tmp_path / "metrics.jsonl"
  _write(work, 0, [1, 2, 3], c)
  first = path.read_bytes()
  _write(work, 2, [3, 4], c)                       # resumed from the step-2 checkpoint
  assert path.read_bytes().startswith(first)        # the earlier bytes are never touched
  assert [(r["step"], r["loss"]) for r in workdir_io.read_metrics(work)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
  _write(work, 0, [1], c)                           # killed before any checkpoint: all redone
  assert [r["step"] for r in workdir_io.read_metrics(work)] == [1]
  with open(path, "a") as f:
    f.write('{"step": 2, "lo')                      # a crash or a full disk mid-append
  with caplog.at_level("WARNING"):
    assert [r["step"] for r in workdir_io.read_metrics(work)] == [1]
  assert "metrics.jsonl: dropped a torn last line" in caplog.text
  _write(work, 1, [2], c)                           # the next run cuts the torn tail, then appends
  assert [r["step"] for r in workdir_io.read_metrics(work)] == [1, 2]
  assert b'"lo{' not in path.read_bytes()                 # not appended onto the torn line


def test_a_bad_line_inside_metrics_names_file_and_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
    workdir_io.read_metrics(str(tmp_path))
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
    metrics.Logger(str(tmp_path), _config(), 1)


def test_one_trainer_per_workdir(tmp_path):
  first = workdir_io.TrainerLock(str(tmp_path)).acquire()
  with pytest.raises(workdir_io.WorkdirLocked, match=r"in use by another trainer \(host .*, pid \d+"):
    workdir_io.TrainerLock(str(tmp_path)).acquire()
  first.release()
  workdir_io.TrainerLock(str(tmp_path)).acquire().release()    # free again once released


def test_a_dead_trainer_leaves_no_stale_lock(tmp_path):
  import subprocess
  import sys
  code = ("import sys; from apollo_jax.runtime import workdir as w; w.TrainerLock(sys.argv[1]).acquire(); "
          "import os; os._exit(9)")                              # dies holding it, no cleanup
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tf.REPO, check=False, timeout=60)
  assert "pid" in (tmp_path / "train.lock").read_text()          # the file is still there...
  workdir_io.TrainerLock(str(tmp_path)).acquire().release()      # ...but the lock died with it


def test_gs_lease_refuses_a_live_holder_and_takes_over_an_expired_one(gs_in_memory, monkeypatch):
  work = "gs://bucket/locked"
  first = workdir_io.TrainerLock(work).acquire()
  with pytest.raises(workdir_io.WorkdirLocked, match="in use by another trainer"):
    workdir_io.TrainerLock(work).acquire()
  now = __import__("time").time()
  monkeypatch.setattr(workdir_io.time, "time", lambda: now + workdir_io.TrainerLock.LEASE_S + 1)
  workdir_io.TrainerLock(work).acquire().release()              # the holder stopped renewing
  del first
