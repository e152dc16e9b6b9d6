"""`python -m apollo_jax.params` prints the exact released parameter counts (docs/original.md)."""

import json
import os
import subprocess
import sys

import pytest

from apollo_jax import config as cfg
from apollo_jax.model.size import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  return cfg.load(f"{name}:{arg}" if arg else name)


@pytest.mark.parametrize("name,total,active", [
    ("apollo_moe_0p5b", 650_938_496, 520_194_176),
    ("apollo_2b", 2_039_187_968, 1_626_311_168),
    ("apollo_moe_7b", 10_059_897_344, 8_023_038_464),
])
def test_released_counts(name, total, active):
  assert count_params(load(name)) == {"total_params": total, "active_params": active}


def test_padding_is_not_counted():
  c = load("apollo_moe_0p5b")
  c.moe.expert_multiple = 8
  assert count_params(c) == {"total_params": 650_938_496, "active_params": 520_194_176}


def test_dense_and_variants():
  assert count_params(load("apollo_moe_0p5b", "moe_layers=none")) == {
      "total_params": 494_032_768, "active_params": 494_032_768}          # Qwen2-0.5B
  c = load("apollo_moe_7b", "moe_layers=last:3")
  assert count_params(c)["total_params"] == 11_282_037_760        # last 3 layers MoE: 11.28 B


def test_cli_prints_json():
  out = subprocess.run([sys.executable, "-m", "apollo_jax.params",
                        "--config=configs/apollo_moe_7b.py"], cwd=ROOT, capture_output=True,
                       text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"total_params": 10_059_897_344,
                                                            "active_params": 8_023_038_464}
