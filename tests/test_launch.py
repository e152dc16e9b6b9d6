"""The launchers in launch/: the GPU launcher's one-time install step."""

import os
import subprocess

import train_fixtures as tf


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
