"""End-to-end `python -m apollo_jax.train` runs (subprocesses on fixture data): metrics.jsonl,
exact resume after SIGKILL, and mesh-independent losses (1 vs 8 simulated devices)."""

import math
import os
import shutil
import signal

import numpy as np
import pytest

import train_fixtures as tf
from tolerance import assert_close, network_terms

pytestmark = pytest.mark.slow
STEPS = 30
# f32 roundings per update of the tf.flags model: forward and backward through 4 layers (d_model
# 64, d_ff 128), a log-softmax over V=640, sums over the 16 x 64 tokens; each update's rounding
# difference is carried into the weights of the next, so a run of n steps counts n times as many
STEP_TERMS = 2 * network_terms(4, 64, 128) + 640 + 16 * 64


@pytest.fixture(scope="module")
def reference(data, jit_cache, tmp_path_factory):
  """An uninterrupted 1-device run of STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  tf.check_ok(tf.run(workdir, tf.flags(data, STEPS), 1, jit_cache))
  return workdir


def test_metrics_jsonl(reference):
  recs = tf.read_metrics(reference)
  assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
  for r in recs:
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "moe/layer_2/load",
                "moe/layer_2/drop_fraction", "moe/layer_3/load", "moe/layer_3/drop_fraction"):
      assert key in r, key
    assert math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert len(r["moe/layer_2/load"]) == 7
    assert_close(sum(r["moe/layer_2/load"]), 1.0, dtype=np.float32, terms=7)   # 7 f32 fractions
    assert 0 <= r["moe/layer_3/drop_fraction"] <= 1
    assert any(k.startswith("loss/") for k in r)          # per-family loss
  assert recs[0]["tokens_per_s"] is None and recs[1]["tokens_per_s"] > 0 and recs[1]["mfu"] > 0
  evals = [r["step"] for r in recs if "eval_loss" in r]
  assert evals == [10, 20, 30]
  first = tf.read_metrics(reference, train_only=False)[0]     # the step-0 eval baseline
  assert first["step"] == 0 and "loss" not in first and first["eval_loss"] > recs[-1]["eval_loss"]
  # the schedule: warmup_ratio 0.1 of 30 steps = 3 warmup steps, first update at lr 0
  assert recs[0]["lr"] == 0 and recs[3]["lr"] == pytest.approx(3e-3)
  assert recs[-1]["loss"] < recs[0]["loss"] - 0.5
  assert tf.committed_steps(reference) == [20, 25, 30]   # keep=3
  from apollo_jax.runtime import workdir as workdir_io          # config.json + tokenizer: all inference needs
  assert workdir_io.read_config(reference).steps == STEPS and workdir_io.tokenizer_path(reference, None)


def test_resume_after_sigkill_is_exact(reference, data, jit_cache, tmp_path):
  workdir = str(tmp_path / "killed")
  proc = tf.start(workdir, tf.flags(data, STEPS), 1, jit_cache)
  try:
    tf.wait_for(lambda: tf.committed_steps(workdir), proc, what="the first committed checkpoint")
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  first = tf.committed_steps(workdir)
  assert first and max(first) < STEPS, first
  result = tf.check_ok(tf.run(workdir, tf.flags(data, STEPS), 1, jit_cache))
  assert "resumed from" in result.stdout
  a, b = tf.restore_params(reference, STEPS), tf.restore_params(workdir, STEPS)
  assert a.keys() == b.keys()
  diff = [k for k in a if not np.array_equal(a[k], b[k])]
  assert not diff, f"resumed params differ from the uninterrupted run: {diff}"
  ref, res = tf.read_metrics(reference), tf.read_metrics(workdir)
  assert [r["step"] for r in res] == list(range(1, STEPS + 1))
  assert [r["loss"] for r in res] == [r["loss"] for r in ref]


@pytest.mark.parametrize("mesh", [dict(mesh__data=2, mesh__fsdp=2, mesh__expert=2),
                                  dict(mesh__fsdp=8)], ids=["data2_fsdp2_expert2", "fsdp8"])
def test_losses_do_not_depend_on_the_mesh(reference, data, jit_cache, tmp_path, mesh):
  workdir = str(tmp_path / "mesh")
  result = tf.check_ok(tf.run(workdir, tf.flags(data, STEPS, ckpt__every=1000, **mesh), 8, jit_cache))
  # every reshard GSPMD needs has an efficient form (no fallback to replicating a tensor)
  assert "Involuntary full rematerialization" not in result.stderr
  ref, got = tf.read_metrics(reference), tf.read_metrics(workdir)
  assert len(got) == len(ref) == STEPS
  for r, g in zip(ref, got):      # the mesh reorders every step's reductions
    tol = dict(dtype=np.float32, terms=r["step"] * STEP_TERMS, err_msg=f"step {r['step']}")
    assert_close(g["loss"], r["loss"], **tol)
    assert_close(g["grad_norm"], r["grad_norm"], **tol)
    if "eval_loss" in r:
      assert_close(g["eval_loss"], r["eval_loss"], **tol)


def test_resume_onto_another_mesh(reference, data, jit_cache, tmp_path):
  """A 1-device checkpoint resumes on an 8-device (data, fsdp, expert) mesh and ends where the
  1-device run ended (same program as the mesh test above, so the compile is cached)."""
  workdir = tmp_path / "remesh"
  shutil.copytree(os.path.join(reference, "checkpoints", "25"), workdir / "checkpoints" / "25")
  flags = tf.flags(data, STEPS, ckpt__every=1000, mesh__data=2, mesh__fsdp=2, mesh__expert=2)
  result = tf.check_ok(tf.run(str(workdir), flags, 8, jit_cache))
  assert f"step {STEPS}/{STEPS} (started at 25)" in result.stdout
  a, b = tf.restore_params(reference, STEPS), tf.restore_params(str(workdir), STEPS)
  for k in a:                      # 5 updates on another mesh: other f32 orders each step
    assert_close(b[k], a[k], dtype=np.float32, terms=(STEPS - 25) * STEP_TERMS, err_msg=k)


def test_two_processes_match_one(reference, data, jit_cache, tmp_path):
  """2 processes x 4 CPU devices (jax.distributed over 127.0.0.1, gloo): each process loads only
  its rows, the global batch is assembled from both; the losses equal the 1-device run's."""
  import subprocess
  import sys
  workdir = str(tmp_path / "mp")
  flags = tf.flags(data, STEPS, ckpt__every=1000, mesh__fsdp=8)
  env = tf.env(4, jit_cache)
  env.update(NPROC="2", DEVICES_PER_PROCESS="4", PYTHON=sys.executable)
  out = subprocess.run(["bash", "launch/local_multiprocess.sh", f"--workdir={workdir}"] + flags,
                       cwd=tf.REPO, env=env, text=True, capture_output=True, timeout=300)
  assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
  ref, got = tf.read_metrics(reference), tf.read_metrics(workdir)
  assert [r["step"] for r in got] == [r["step"] for r in ref]
  for r, g in zip(ref, got):      # 8 devices over 2 processes: every step's reductions reordered
    assert_close(g["loss"], r["loss"], dtype=np.float32, terms=r["step"] * STEP_TERMS, err_msg=f"step {r['step']}")
  assert tf.committed_steps(workdir) == [STEPS]


def test_init_from_upcycled_hf_checkpoint(data, jit_cache, tmp_path):
  """HF Qwen2 dir -> convert_from_hf --upcycle -> train --config.init_from: the run starts from
  exactly those weights (7 experts re-padded to the mesh's 8), checked with lr=0 for 2 steps."""
  import subprocess
  import sys
  transformers = pytest.importorskip("transformers")
  from apollo_jax.hf import load as hf_load
  hf_cfg = transformers.Qwen2Config(vocab_size=640, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6)
  hf_dir, conv = str(tmp_path / "hf"), str(tmp_path / "converted")
  transformers.Qwen2ForCausalLM(hf_cfg).save_pretrained(hf_dir)
  out = subprocess.run([sys.executable, "-m", "apollo_jax.convert_from_hf", f"--hf_dir={hf_dir}",
                        f"--out={conv}", "--upcycle", "--config=configs/tiny.py",
                        "--config.model.vocab_size=640"], cwd=tf.REPO, env=tf.env(1), text=True,
                       capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  workdir = str(tmp_path / "run")
  flags = tf.flags(data, 2, init_from=conv, optim__lr=0.0, eval_every=0)
  tf.check_ok(tf.run(workdir, flags, 1, jit_cache))
  converted, _ = hf_load.load_params(conv)
  trained = tf.restore_params(workdir, 2)
  flat = {jax_key: v for jax_key, v in _flat(converted)}
  assert flat.keys() == trained.keys()
  for k, v in flat.items():
    got = trained[k]
    if "experts" in k:                   # padded expert (index 7) is zero, the rest identical
      assert got.shape[0] == 8 and v.shape[0] == 7 and not got[7:].any()
      got = got[:7]
    np.testing.assert_array_equal(got, v, err_msg=k)


def _flat(tree):
  import jax
  return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
