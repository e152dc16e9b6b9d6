"""`python -m apollo_jax.plot`: training curves from a metrics.jsonl are valid PNGs of known size."""

import json
import os
import subprocess
import sys

import matplotlib.image
import pytest
from apollo_jax.analysis import plots
from apollo_jax.runtime import workdir as workdir_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(workdir, moe_layers=(2, 3), experts=3):
  """A metrics.jsonl as train.py writes it: the step-0 eval record, then train steps."""
  recs = [{"step": 0, "eval_loss": 8.3, "eval_loss/Indo-European": 8.4}]
  for step in range(1, 21):
    r = {"step": step, "loss": 8 - 0.1 * step, "lr": 1e-3 * min(1, step / 5), "grad_norm": 1 + 1 / step,
         "tokens_per_s": None if step == 1 else 9000.0, "loss/Indo-European": 8 - 0.1 * step,
         "loss/Sino-Tibetan": 8.1 - 0.1 * step}
    for i in moe_layers:
      r[f"moe/layer_{i}/load"] = [1 / experts] * experts
      r[f"moe/layer_{i}/drop_fraction"] = 0.01 * i
    if step % 10 == 0:
      r["eval_loss"] = 8.2 - 0.1 * step
    recs.append(r)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)


def _shape(path):
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.std() > 0, f"{path}: blank image"
  return img.shape[:2]


def test_training_curves(tmp_path):
  _metrics(tmp_path, moe_layers=(0, 1, 2, 3))
  paths = plots.training_curves(str(tmp_path))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["family_loss.png", "grad_norm.png", "loss.png", "lr.png", "moe_drop.png",
                   "moe_load.png", "tokens_per_s.png"]
  assert all(os.path.dirname(p) == str(tmp_path / "plots") for p in paths)
  for p in paths:      # 6.4 x 4 in at 100 dpi; the load figure has one 3.2 in panel per layer
    assert _shape(p) == ((400, 1280) if p.endswith("moe_load.png") else (400, 640)), p
  steps, values = plots._series(workdir_io.read_metrics(str(tmp_path)), "eval_loss")
  assert steps == [0, 10, 20] and values == pytest.approx([8.3, 7.2, 6.2])     # from the step-0 baseline


def test_dense_run_skips_moe_curves_and_cli_errors(tmp_path):
  _metrics(tmp_path, moe_layers=())
  names = {os.path.basename(p) for p in plots.training_curves(str(tmp_path), str(tmp_path / "out"))}
  assert "moe_load.png" not in names and "moe_drop.png" not in names and "loss.png" in names
  out = subprocess.run([sys.executable, "-m", "apollo_jax.plot", f"--workdir={tmp_path / 'missing'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "metrics.jsonl not found" in out.stderr
