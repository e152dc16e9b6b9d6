"""Helpers for the end-to-end training tests: fixture data, the tiny run's flags, subprocess runs."""

import os
import subprocess
import sys
import time

import numpy as np

import data_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data(root):
  """(train json, tokenizer, data cache dir) in a few languages, built once under `root`."""
  os.makedirs(root, exist_ok=True)
  lst, _, tok, _ = data_fixtures.setup(root)
  return lst, tok, os.path.join(root, "data_cache")


def shared_data(tmp_path_factory):
  """make_data() once per pytest session (shared by the train test files)."""
  root = tmp_path_factory.getbasetemp() / "train_data"
  if not (root / "tok.model").exists():
    return make_data(str(root))
  return str(root / "data_list.json"), str(root / "tok.model"), str(root / "data_cache")


def shared_jit_cache(tmp_path_factory):
  """One JAX compilation cache per session: reruns of the same program skip the compile."""
  path = tmp_path_factory.getbasetemp() / "train_jit_cache"
  path.mkdir(exist_ok=True)
  return str(path)


def flags(data, steps=30, **overrides):
  """Flags of the shrunk tiny config: 16 rows x 64 tokens, 2 micro-batches, 8 padded experts."""
  lst, tok, cache = data
  values = {
      "data.train_files": lst, "data.tokenizer": tok, "data.cache_dir": cache, "data.seq_len": 64,
      "data.eval_fraction": 0.15, "model.vocab_size": 640, "global_batch": 16, "grad_accum": 2,
      "moe.group_size": 64, "moe.expert_multiple": 8, "steps": steps, "log_every": 1,
      "eval_every": 10, "eval_batches": 1, "ckpt.every": 5, "ckpt.keep": 3, "optim.warmup_ratio": 0.1,
  }
  values.update({k.replace("__", "."): v for k, v in overrides.items()})
  return ["--config=configs/tiny.py"] + [f"--config.{k}={v}" for k, v in values.items()]


def env(devices=1, cache_dir=None):
  e = dict(os.environ)
  e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
           WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
  if cache_dir:     # identical programs across runs compile once (speed only)
    e.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return e


def command(workdir, flag_list):
  return [sys.executable, "-m", "apollo_jax.train", f"--workdir={workdir}"] + flag_list


def run(workdir, flag_list, devices=1, cache_dir=None, timeout=300):
  return subprocess.run(command(workdir, flag_list), cwd=REPO, env=env(devices, cache_dir),
                        capture_output=True, text=True, timeout=timeout)


def start(workdir, flag_list, devices=1, cache_dir=None):
  return subprocess.Popen(command(workdir, flag_list), cwd=REPO, env=env(devices, cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, proc, timeout=240, what="condition"):
  """Polls `predicate` every 10 ms; fails if the process exits first or time runs out."""
  t = time.time()
  while time.time() - t < timeout:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run exited (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
    time.sleep(0.01)
  raise AssertionError(f"timed out waiting for {what}")


def committed_steps(workdir):
  """Checkpoint steps whose directory is committed (no Orbax tmp suffix)."""
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def read_metrics(workdir, train_only=True):
  """metrics.jsonl records as readers see them (resumes applied); train_only drops the step-0
  eval-only record (it has no "loss")."""
  from apollo_jax.runtime import workdir as workdir_io
  if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    return []
  recs = workdir_io.read_metrics(workdir)
  return [r for r in recs if "loss" in r] if train_only else recs


def restore_params(workdir, step):
  """Params of checkpoint `step` as a flat {path: np.ndarray}, read with Orbax directly."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(path)
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]}


def check_ok(result):
  assert result.returncode == 0, f"train failed (rc={result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
  return result


def tiny_config(**kw):
  """The tiny config at vocab 640; keyword `a__b=v` sets field a.b."""
  from apollo_jax import config as cfg
  c = cfg.load("tiny")
  c.model.vocab_size = 640
  for k, v in kw.items():
    *path, leaf = k.split("__")
    node = c
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def flat(tree):
  """{keystr path: np.ndarray} of a pytree."""
  import jax
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
