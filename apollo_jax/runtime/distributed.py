"""Multi-process start-up (TPU pods, multi-GPU hosts) from environment variables."""

import os

import jax


def maybe_initialize_distributed():
  """jax.distributed.initialize from JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID."""
  addr = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if not addr:
    return
  if addr == "auto":            # TPU pods / SLURM: let JAX detect the cluster
    jax.distributed.initialize()
    return
  missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
  if missing:
    raise ValueError(f"JAX_COORDINATOR_ADDRESS={addr} is set but {', '.join(missing)} is not; set all three "
                     "(or JAX_COORDINATOR_ADDRESS=auto on a TPU pod / SLURM cluster)")
  jax.distributed.initialize(addr, int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"]))
