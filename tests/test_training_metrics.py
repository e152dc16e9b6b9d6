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
  read = lambda: [json.loads(x) for x in epath.Path(work, "metrics.jsonl").read_text().splitlines()]
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
