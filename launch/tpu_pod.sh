#!/usr/bin/env bash
# Train on every worker of a TPU pod slice. Run from your workstation:
#   TPU=my-v5p-64 ZONE=us-east5-a bash launch/tpu_pod.sh --config=configs/apollo_moe_7b.py --workdir=gs://bucket/run1
# Each worker runs the same command; jax.distributed.initialize() discovers the pod by itself
# (JAX_COORDINATOR_ADDRESS=auto). The repo must already be cloned at ~/apollo_jax on every worker
# (e.g. `gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "git clone ... apollo_jax"`).
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/apollo_jax && python3 -m venv .venv && .venv/bin/pip install -q -r requirements-tpu.txt &&
  JAX_COORDINATOR_ADDRESS=auto .venv/bin/python -m apollo_jax.train $args"
