#!/usr/bin/env bash
# Run the same command on every worker of a Cloud TPU VM pod slice (one JAX process per worker/host).
#
#   launch/tpu_pod.sh TPU_NAME ZONE [PROJECT] -- COMMAND...
#   launch/tpu_pod.sh my-v5e-256 us-west4-a -- \
#       scalingnote train --config configs/qwen2_5_7b.py:v5e256 --workdir gs://bucket/runs/7b \
#       --config.model.init=/mnt/ckpt/Qwen2.5-7B --config.data.path=/mnt/data/msmarco
#
# Needs: gcloud, the repository and its .venv at the same path on every worker (e.g. cloned into the home
# directory by a previous `gcloud compute tpus tpu-vm ssh --worker=all` call, then `make .venv/.installed-stamp`),
# and a --workdir every worker can write: a gs:// bucket or a shared filesystem (checkpoints are written by
# all processes together). Each worker runs COMMAND with SCALINGNOTE_DISTRIBUTED=auto: jax.distributed finds
# the coordinator and the worker ids from the TPU metadata itself. Output of every worker streams back here.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE [PROJECT] -- COMMAND..." >&2
  exit 2
fi
name=$1 zone=$2
shift 2
project=()
if [[ $1 != "--" ]]; then
  project=(--project "$1")
  shift
fi
[[ $1 == "--" ]] || { echo "$0: expected -- before the command" >&2; exit 2; }
shift

repo=$(cd "$(dirname "$0")/.." && pwd)
remote="cd $(printf %q "$repo") && SCALINGNOTE_DISTRIBUTED=auto PATH=$(printf %q "$repo")/.venv/bin:\$PATH $(printf '%q ' "$@")"
exec gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project[@]}" --worker=all --command "$remote"
