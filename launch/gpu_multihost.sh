#!/usr/bin/env bash
# Train on several GPU hosts: run this script once per host (or let SLURM do it with srun).
#   SLURM:   srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_multihost.sh --config=... --workdir=...
#   by hand: JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3> bash launch/gpu_multihost.sh ...
# One process per host drives all its local GPUs; the train script calls jax.distributed.initialize
# with these variables (under SLURM they are derived from SLURM_* variables below).
set -euo pipefail
if [[ -n "${SLURM_JOB_ID:-}" && -z "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export JAX_COORDINATOR_ADDRESS="$head:${JAX_COORDINATOR_PORT:-12345}"
  export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"
fi
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port}" "${JAX_NUM_PROCESSES:?}" "${JAX_PROCESS_ID:?}"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m apollo_jax.train "$@"
