#!/usr/bin/env bash
# Train on one or several GPU hosts: run this script once per host (or let SLURM do it with srun).
#   one host:  bash launch/gpu_multihost.sh --config=... --workdir=...          (one process, all local GPUs)
#   SLURM:     srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 bash launch/gpu_multihost.sh --config=... --workdir=...
#   by hand:   JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3> bash launch/gpu_multihost.sh ...
# One process per host drives all its local GPUs; the train script calls jax.distributed.initialize
# with these variables (under SLURM they are derived from SLURM_* variables below).
# First it installs requirements-gpu.txt into $VENV (default .venv) when that is missing or the
# requirements changed; a lock makes hosts sharing one filesystem install only once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
stamp="$venv/.requirements-gpu.sha256"
want=$(cat requirements.txt requirements-gpu.txt | sha256sum | cut -d' ' -f1)
(
  flock 9
  if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
    echo "installing requirements-gpu.txt into $venv" >&2
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q -r requirements-gpu.txt
    echo "$want" > "$stamp"
  fi
) 9>"${venv%/}.install.lock"
if [[ -n "${SLURM_JOB_ID:-}" && -z "${JAX_COORDINATOR_ADDRESS:-}" && "${SLURM_NTASKS:-1}" -gt 1 ]]; then
  head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  export JAX_COORDINATOR_ADDRESS="$head:${JAX_COORDINATOR_PORT:-12345}"
  export JAX_NUM_PROCESSES="$SLURM_NTASKS" JAX_PROCESS_ID="$SLURM_PROCID"
fi
if [[ -n "${JAX_COORDINATOR_ADDRESS:-}" ]]; then
  : "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES with JAX_COORDINATOR_ADDRESS}" "${JAX_PROCESS_ID:?set JAX_PROCESS_ID}"
fi
exec "$venv/bin/python" -m apollo_jax.train "$@"
