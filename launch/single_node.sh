#!/usr/bin/env bash
# One machine, N GPUs (or N CPU ranks): the deepspeed launcher starts one rank per device.
#   launch/single_node.sh RECIPE [NUM_GPUS] [key=value ...]
#   launch/single_node.sh launch/recipes/shared_data.yaml 4 train.max_steps=5000
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: launch/single_node.sh RECIPE [NUM_GPUS] [key=value ...]" >&2; exit 2; }
recipe="$1"; shift
gpus=""
if [[ $# -ge 1 && "$1" =~ ^[0-9]+$ ]]; then gpus="$1"; shift; fi
if [[ -z "$gpus" ]]; then
  gpus=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
  [[ "$gpus" -gt 0 ]] || gpus=1
fi
# each rank's math threads: the machine's cores shared by the ranks (see launch/node.sh)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / gpus > 0 ? $(nproc) / gpus : 1 ))}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deepspeed="$here/../.venv/bin/deepspeed"; [[ -x "$deepspeed" ]] || deepspeed=deepspeed
exec "$deepspeed" --num_gpus "$gpus" --master_port "${MASTER_PORT:-29500}" --module sabiscale train "$recipe" "$@"
