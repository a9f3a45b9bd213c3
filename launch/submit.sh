#!/usr/bin/env bash
# Submit launch/slurm.sbatch with cores and memory per node derived from the recipe's profile:
#   NODES=4 GPUS_PER_NODE=8 launch/submit.sh RECIPE [key=value ...]
# `sabiscale plan RECIPE --slurm` computes --cpus-per-task and --mem for the one launcher task of
# each node (all its ranks, and DeepSpeed's CPU Adam under the offload profiles). To override,
# set SBATCH_* variables (e.g. SBATCH_PARTITION=gpu) or call sbatch on launch/slurm.sbatch with
# your own flags. SUBMIT_DRY_RUN=1 prints the sbatch command instead of running it.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: NODES=N GPUS_PER_NODE=G launch/submit.sh RECIPE [key=value ...]" >&2; exit 2; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
sabiscale="${SABISCALE_BIN:-$here/../.venv/bin/sabiscale}"
NODES="${NODES:-1}" GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
resources=$("$sabiscale" plan "$@" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --slurm | grep -oP '^slurm: \K.*') \
  || { echo "sabiscale plan found no profile that fits; see: $sabiscale plan $*" >&2; exit 2; }
command=(sbatch $resources "$here/slurm.sbatch" "$@")
if [[ -n "${SUBMIT_DRY_RUN:-}" ]]; then echo "${command[*]}"; else exec "${command[@]}"; fi
