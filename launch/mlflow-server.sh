#!/usr/bin/env bash
# An MLflow tracking server for a team on one machine or a login node: sqlite backend, artifacts
# stored under DIR and served by the server itself (clients upload over HTTP, so compute nodes need
# no shared filesystem), bound to 127.0.0.1 (reach it through an SSH tunnel, not an open port).
#
#   launch/mlflow-server.sh [DIR] [PORT]        # defaults: runs/mlflow-server 5000
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # then every sabiscale run logs there
set -euo pipefail
dir=$(realpath -m "${1:-runs/mlflow-server}")
port="${2:-5000}"
host="${MLFLOW_HOST:-127.0.0.1}"
mkdir -p "$dir/artifacts"
here=$(cd "$(dirname "$0")/.." && pwd)
mlflow_bin="${MLFLOW_BIN:-$here/.venv/bin/mlflow}"
[ -x "$mlflow_bin" ] || mlflow_bin=mlflow
# The job-execution workers are not needed for tracking and double the start-up time.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
echo "MLflow server: http://$host:$port (store $dir/mlflow.db)" >&2
exec "$mlflow_bin" server --host "$host" --port "$port" \
  --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/artifacts"
