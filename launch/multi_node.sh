#!/usr/bin/env bash
# Several machines from one shell, with DeepSpeed's runner: it reads a hostfile
# ("host slots=N" per line) and starts node.sh's equivalent on every host over passwordless ssh.
# The run directory (output_dir) must be on a filesystem all hosts share.
#   launch/multi_node.sh HOSTFILE RECIPE [key=value ...]
# Without ssh between the hosts, run launch/node.sh on each host instead (or use slurm.sbatch).
set -euo pipefail
[[ $# -ge 2 ]] || { echo "usage: launch/multi_node.sh HOSTFILE RECIPE [key=value ...]" >&2; exit 2; }
hostfile="$1"; recipe="$2"; shift 2
[[ -f "$hostfile" ]] || { echo "hostfile $hostfile does not exist (lines like: node-a slots=8)" >&2; exit 2; }
master=$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
deepspeed="$here/../.venv/bin/deepspeed"; [[ -x "$deepspeed" ]] || deepspeed=deepspeed
exec "$deepspeed" --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  --module sabiscale train "$recipe" "$@"
