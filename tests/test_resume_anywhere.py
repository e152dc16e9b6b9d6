"""Cloud workdirs (gs:// through fsspec), resume across expert padding and process counts,
SIGTERM agreement across processes, and the GPU launcher's install step."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_fixtures as tf
from apollo_jax.training import checkpoint
from apollo_jax.training import metrics
from apollo_jax.training import optimizer
from apollo_jax.runtime import sharding
from apollo_jax.runtime import workdir as workdir_io
from apollo_jax.training import step as ts
from apollo_jax.model import transformer

_config, _flat = tf.tiny_config, tf.flat

# ------------------------------------------------------------------------------ gs:// workdir

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
  assert checkpoint.Checkpointer.__init__ and str(checkpoint.workdir_path(work)) == work
  monkeypatch.setattr(jax, "process_index", lambda: 1)      # only process 0 writes
  log = metrics.Logger("gs://bucket/other", c, 0)
  log.write(1, {"loss": 1.0})
  log.close()
  workdir_io.write_config(c, "gs://bucket/other")
  assert not any("other" in k for k in gs_in_memory)


# --------------------------------------------------------------------- resume across padding

class _Iter:
  def __init__(self, step=0):
    self.state = {"next_index": step}

  def get_state(self):
    return self.state

  def set_state(self, s):
    self.state = s


def _state(config, devices, seed):
  """(random train state on `devices` (padded experts zero), abstract state, shardings)."""
  mesh = sharding.make_mesh(config, jax.devices()[:devices])
  with sharding.activate(mesh):
    model, tx = transformer.build_model(config, mesh), optimizer.make_optimizer(config)
    abstract, shardings, _ = ts.state_shardings(model, config, tx, mesh)
  n = config.moe.num_experts
  rng = np.random.default_rng(seed)

  def fill(path, a, s):
    v = np.zeros(a.shape, a.dtype)
    if np.issubdtype(a.dtype, np.floating) and a.ndim:
      v = rng.normal(size=a.shape).astype(a.dtype)
      if any(getattr(k, "key", None) == "experts" for k in path):
        v[n:] = 0
    return jax.device_put(v, s)
  return jax.tree_util.tree_map_with_path(fill, abstract, shardings), abstract, shardings


@pytest.mark.slow
def test_resume_across_expert_padding(tmp_path):
  """8 padded experts on an expert=2 mesh -> 7 unpadded on expert=1 (fsdp=4) -> back to 8 on
  expert=4: params and optimizer moments of the 7 real experts survive every hop exactly; a
  checkpoint whose 8th expert is not zero cannot be trimmed to 7."""
  a_cfg = _config(mesh__expert=2, mesh__fsdp=-1)
  state, _, _ = _state(a_cfg, 8, 0)
  ck = checkpoint.Checkpointer(str(tmp_path), a_cfg)
  ck.save(3, state, _Iter(3))
  bad = jax.tree.map(lambda x: x, state)
  leaf = bad["params"]["layers_3"]["mlp"]["experts"]["gate_proj"]
  bad["params"]["layers_3"]["mlp"]["experts"]["gate_proj"] = leaf.at[7].set(1.0)
  ck.save(9, bad, _Iter(9))
  ck.close()
  ref = _flat(state)
  assert ref["['params']['layers_2']['mlp']['experts']['up_proj']"].shape[0] == 8

  b_cfg = _config(mesh__expert=1, mesh__fsdp=4)
  _, b_abs, b_sh = _state(b_cfg, 4, 1)
  it = _Iter()
  ck = checkpoint.Checkpointer(str(tmp_path), b_cfg)
  got = ck.restore(3, b_abs, b_sh, it)
  assert it.state == {"next_index": 3}
  flat = _flat(got)
  assert flat.keys() == ref.keys()
  n_expert_leaves = 0
  for k, v in flat.items():
    if "experts" in k:
      n_expert_leaves += 1
      assert v.shape[0] == 7, k
      np.testing.assert_array_equal(v, ref[k][:7], err_msg=k)
    else:
      np.testing.assert_array_equal(v, ref[k], err_msg=k)
  assert n_expert_leaves == 3 * 2 * 3       # {gate,up,down} x 2 MoE layers x (param, mu, nu)
  assert jax.tree.leaves(got["params"])[0].sharding.mesh.shape["fsdp"] == 4
  with pytest.raises(ValueError, match=r"layers_3.*gate_proj.*non-zero experts beyond the 7"):
    ck.restore(9, b_abs, b_sh)
  ck.save(4, got, _Iter(4))
  ck.close()

  c_cfg = _config(mesh__expert=4, mesh__fsdp=2)
  _, c_abs, c_sh = _state(c_cfg, 8, 2)
  back = _flat(checkpoint.Checkpointer(str(tmp_path), c_cfg).restore(4, c_abs, c_sh))
  for k, v in back.items():
    np.testing.assert_array_equal(v, ref[k], err_msg=k)


def test_data_position_across_process_counts(tmp_path):
  c = _config()
  state, abstract, shardings = _state(c, 1, 0)
  ck = checkpoint.Checkpointer(str(tmp_path), c)
  ck.save(5, state, _Iter(5))
  ck.close()
  data_file = [os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "checkpoints" / "5" / "data")
               for f in fs if not f.startswith("_")][0]
  saved = json.load(open(data_file))
  ck = checkpoint.Checkpointer(str(tmp_path), c)
  same = json.dumps({"next_index": 5})
  for states, ok in (([same, same], True), ([same, json.dumps({"next_index": 6})], False)):
    json.dump({**saved, "process_count": 2, "states": states}, open(data_file, "w"))
    it = _Iter()
    if ok:                                 # 2 processes at the same step -> 1 process goes on
      ck.restore(5, abstract, shardings, it)
      assert it.state == {"next_index": 5}
    else:
      with pytest.raises(ValueError, match="written by 2 processes, this run has 1, and their saved"):
        ck.restore(5, abstract, shardings, it)
  json.dump(saved, open(data_file, "w"))
  c2 = _config(global_batch=16)
  with pytest.raises(ValueError, match="global_batch=8, this run has 16"):
    checkpoint.Checkpointer(str(tmp_path), c2).restore(5, abstract, shardings, _Iter())


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


# ------------------------------------------------------------------------------ GPU launcher

def test_gpu_launcher_installs_once_then_trains(tmp_path):
  """launch/gpu_multihost.sh installs requirements-gpu.txt into a missing venv once (stamped by
  the requirements' hash), then execs the trainer with the arguments; fake pip/python record calls."""
  venv, log = tmp_path / "venv", tmp_path / "calls"
  (venv / "bin").mkdir(parents=True)
  for name in ("pip", "python"):
    script = venv / "bin" / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\n')
    script.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
  env["VENV"] = str(venv)
  for _ in range(2):
    out = subprocess.run(["bash", "launch/gpu_multihost.sh", "--config=configs/tiny.py", "--workdir=w"],
                         cwd=tf.REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
  calls = log.read_text().splitlines()
  assert calls == ["pip install -q -r requirements-gpu.txt",
                   "python -m apollo_jax.train --config=configs/tiny.py --workdir=w",
                   "python -m apollo_jax.train --config=configs/tiny.py --workdir=w"]
