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
    ("expert_parallel.py", ["--tokens=512", "--seq=64", "--hidden=32", "--inter=64", "--repeats=1",
                            "--rounds=1"], ["gather_weights", "gather_tokens", "all-gather"]),
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


@pytest.mark.slow
def test_accelerator_check_quick_passes_its_parity_checks(tmp_path):
  """The device check on CPU: every kernel's bf16 parity passes and the JSON has every section."""
  import json
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "accelerator_check.py"), "--quick",
                        "--repeats=1", f"--out={tmp_path / 'check.json'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  r = json.loads((tmp_path / "check.json").read_text())
  assert set(r["parity"]["attention"]) == {"xla", "blocked", "splash", "pallas_gpu"}
  assert set(r["parity"]["moe"]) == {"blocks", "ragged", "gmm"}
  assert all(v["ok"] for sec in r["parity"].values() for v in sec.values())
  assert {"dense_ffn", "blocks", "ragged", "ragged_fused"} <= set(r["moe"])
  assert all(isinstance(t, float) for t in r["moe"].values()), r["moe"]
  assert r["train"]["tokens_per_s"] > 0 and "FAIL" not in out.stdout


def test_llama_cpp_check_skips_cleanly_without_llama_cpp():
  """Where llama-cpp-python is absent (CI) the check says so and succeeds; where it is installed
  it is run by hand (docs/hf.md#gguf)."""
  pytest.importorskip("gguf")
  import importlib.util
  if importlib.util.find_spec("llama_cpp") is not None:
    pytest.skip("llama_cpp is installed here: run benchmarks/llama_cpp_check.py itself")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "llama_cpp_check.py")], cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=120)
  assert out.returncode == 0 and out.stdout.startswith("SKIP: llama_cpp is not importable"), out.stdout + out.stderr
