#!/usr/bin/env bash
# Run NPROC training processes on this machine, wired together with jax.distributed over
# 127.0.0.1 — the multi-host code path (per-process data shares, global arrays, Orbax from every
# process) without a cluster. On CPU each process simulates DEVICES_PER_PROCESS devices.
#   NPROC=2 DEVICES_PER_PROCESS=4 bash launch/local_multiprocess.sh --config=configs/tiny.py --workdir=runs/mp
# Exits non-zero if any process fails. The tests use it (tests/test_train.py).
set -uo pipefail
cd "$(dirname "$0")/.."
nproc=${NPROC:-2}
port=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
python=${PYTHON:-.venv/bin/python}
if [[ -n "${DEVICES_PER_PROCESS:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
fi
pids=()
for ((i = 0; i < nproc; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$port" JAX_NUM_PROCESSES="$nproc" JAX_PROCESS_ID="$i" \
    "$python" -m apollo_jax.train "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
