"""Train Apollo-MoE: `python -m apollo_jax.train --config=configs/tiny.py --workdir=DIR`.

Config arguments and overrides: `--config=configs/tiny.py:routing=topk --config.steps=200
--config.optim.lr=3e-4`. A run resumes from the latest complete checkpoint in DIR/checkpoints.
SIGTERM (preemption) finishes the current step, saves, waits for the save and exits 0. A
non-finite loss stops the run with exit status 1 without saving that state. `--config.init_from`
and `--config.epochs`: see apollo_jax/training/setup.py; user errors print one paragraph (`--debug`: traceback).

Multi-process (TPU pods, multi-GPU hosts): set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or run where jax.distributed auto-detects the cluster and set only
JAX_COORDINATOR_ADDRESS=auto); every process runs the same command with a shared WORKDIR.
"""

import sys
import time

import jax
from absl import flags
from ml_collections import config_flags

from apollo_jax.runtime import cli
from apollo_jax.runtime.distributed import maybe_initialize_distributed
from apollo_jax.training.loop import NonFiniteLoss, train


def define_flags():
  """CLI flags; defined only when run as a script, so importing this module never clashes."""
  config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/tiny.py[:args]",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "output dir: checkpoints/, metrics.jsonl, data_cache/")


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  maybe_initialize_distributed()
  t = time.time()
  try:
    s = train(config, workdir)
  except NonFiniteLoss as e:
    print(f"ERROR: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  if jax.process_index() != 0:
    return
  fmt = lambda v: "n/a" if v is None else f"{v:.4g}"
  ev = fmt(s["eval_loss"]) if s["eval_loss_start"] is None else f"{fmt(s['eval_loss_start'])} -> {fmt(s['eval_loss'])}"
  print(f"{s['status']}: step {s['step']}/{config.steps} (started at {s['start_step']}) in "
        f"{time.time() - t:.1f}s; final loss {fmt(s['loss'])}, eval loss {ev}, "
        f"{fmt(s['tokens_per_s'])} tokens/s", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main, required=("config", "workdir"))
