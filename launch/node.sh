#!/usr/bin/env bash
# Start sabiscale on THIS node of a multi-node job: one DeepSpeed per-node launcher, which starts
# one rank per local GPU (or GPUS_PER_NODE CPU ranks) and sets RANK/LOCAL_RANK/WORLD_SIZE.
# Needs no ssh: run it once on every node (slurm.sbatch does that through srun).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/node.sh RECIPE [key=value ...]   # on node 0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/node.sh RECIPE [key=value ...]   # on node 1
#
# Environment: NNODES, NODE_RANK, MASTER_ADDR (an address every node reaches), MASTER_PORT
# (default 29500), GPUS_PER_NODE (default: GPUs nvidia-smi sees, else 1), SABISCALE_COMMAND
# (default train; e.g. score), and GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME when a node has several
# interfaces (gloo otherwise advertises the loopback address and the other node cannot connect).
set -euo pipefail
: "${NNODES:?set NNODES (number of nodes)}" "${NODE_RANK:?set NODE_RANK (0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT="${MASTER_PORT:-29500}"
# The GPUs this job may use: Slurm (or the user) names them in CUDA_VISIBLE_DEVICES, and the
# launcher below would overwrite that variable with the ids it is given, so it is given these ids.
IFS=',' read -r -a visible <<< "${CUDA_VISIBLE_DEVICES:-}"
if [[ -z "${GPUS_PER_NODE:-}" ]]; then
  if [[ ${#visible[@]} -gt 0 ]]; then GPUS_PER_NODE=${#visible[@]}
  else
    GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$GPUS_PER_NODE" -gt 0 ]] || GPUS_PER_NODE=1
  fi
fi
[[ $# -ge 1 ]] || { echo "usage: launch/node.sh RECIPE [key=value ...]" >&2; exit 2; }
# Each rank's math threads: this node's cores shared by its ranks (torch would otherwise start
# one thread per core in every rank, and the ranks would fight over the cores)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / GPUS_PER_NODE > 0 ? $(nproc) / GPUS_PER_NODE : 1 ))}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${SABISCALE_PYTHON:-$here/../.venv/bin/python}"
[[ -x "$python" ]] || python=python3

# world_info: every node's local device ids, in node-rank order (DeepSpeed derives global ranks
# from it and sets CUDA_VISIBLE_DEVICES to this node's list): the visible ones where given
world_info=$("$python" -c '
import base64, json, sys
nodes, per_node, visible = int(sys.argv[1]), int(sys.argv[2]), [d for d in sys.argv[3].split(",") if d]
ids = [int(d) if d.isdigit() else d for d in visible][:per_node] if len(visible) >= per_node else list(range(per_node))
print(base64.urlsafe_b64encode(json.dumps({f"node{i}": ids for i in range(nodes)}).encode()).decode())' \
  "$NNODES" "$GPUS_PER_NODE" "${CUDA_VISIBLE_DEVICES:-}")

echo "sabiscale node $NODE_RANK/$NNODES on ${SLURMD_NODENAME:-$(hostname)}: $GPUS_PER_NODE rank(s)" \
     "(devices ${CUDA_VISIBLE_DEVICES:-0..$((GPUS_PER_NODE - 1))}), master $MASTER_ADDR:$MASTER_PORT," \
     "$OMP_NUM_THREADS thread(s) per rank"
[[ -z "${SABISCALE_DRY_RUN:-}" ]] || { echo "world_info=$world_info"; exit 0; }
# Slurm's --signal=USR1 reaches every process of the step: the launcher must survive it (its
# default action is to die) while the ranks, which handle it, save a checkpoint and exit
trap '' USR1
# Slurm signals every process of the step: the launcher and the ranks handle a stop signal
# themselves (checkpoint, exit 75); this shell only waits for them.
trap ':' TERM
status=0
"$python" -m deepspeed.launcher.launch --world_info="$world_info" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" --module sabiscale "${SABISCALE_COMMAND:-train}" "$@" \
  || status=$?
# Stopped for a preemption signal with the checkpoint saved (every node does at the same step).
# Under `srun --kill-on-bad-exit` the first task to exit has the others killed, and srun then
# reports their signal instead of 75; so node 0, where the batch script runs, says so in a file
# (launch/slurm.sbatch requeues on it), and the other nodes let node 0 exit first.
if [[ $status -eq 75 && -n "${SLURM_JOB_ID:-}" ]]; then
  if [[ "$NODE_RANK" == 0 ]]; then
    : > "${TMPDIR:-/tmp}/sabiscale-stopped-$SLURM_JOB_ID"
  else
    trap 'exit 75' TERM
    sleep 60 & wait $! || true
  fi
fi
exit "$status"
