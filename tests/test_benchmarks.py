"""The benchmark scripts still run (tiny shapes, one repeat). No timing is asserted."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("script,args,expect", [
    ("moe_block.py", ["--tokens=256", "--seq=64", "--hidden=32", "--inter=64", "--repeats=1"],
     ["dense_ffn", "moe_dropless", "moe_cf1.25_g512", "moe_nodrop_g512", "all_experts"]),
    ("train_step.py", ["--hidden=32", "--inter=64", "--layers=3", "--seq=32", "--batch=2",
                       "--vocab=128", "--group=32", "--rounds=1"],
     ["dense", "post_moe", "post_moe_cf1.25", "all_moe"]),
    ("vs_torch.py", ["--quick"], ["HF transformers Qwen2MoeForCausalLM", "apollo_jax / torch",
                                  "MoE layer / dense FFN"]),
])
@pytest.mark.slow
def test_benchmark_runs(script, args, expect):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script)] + args, cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  for name in expect:
    assert name in out.stdout, out.stdout
