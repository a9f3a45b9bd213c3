#!/usr/bin/env bash
# Install the torch sabiscale is tested with, built for this machine:
#   no NVIDIA driver        -> the CPU wheel (torch==$TORCH_VERSION from PyPI or the local disk)
#   an NVIDIA driver        -> the CUDA build the driver can run, from the PyTorch index: the newest
#                              of TORCH_CUDA_BUILDS whose CUDA version the driver supports
#                              (nvidia-smi's "CUDA Version"); PyPI's default CUDA build may need a
#                              newer driver, and torch then silently sees no GPU.
# Usage: launch/install_torch.sh PIP [--dry-run]   (make install calls it)
set -euo pipefail
PIP="${1:?usage: install_torch.sh PIP [--dry-run]}"
DRY="${2:-}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_CUDA_BUILDS="${TORCH_CUDA_BUILDS:-13.0 12.8 12.6}"   # newest first
run() { if [[ "$DRY" == "--dry-run" ]]; then echo "$*"; else "$@"; fi; }

if ! command -v nvidia-smi >/dev/null 2>&1; then
  run "$PIP" install -q "torch==$TORCH_VERSION"
  exit 0
fi
driver_cuda=$(nvidia-smi 2>/dev/null | grep -oP 'CUDA Version:\s*\K[0-9]+\.[0-9]+' | head -n 1 || true)
if [[ -z "$driver_cuda" ]]; then
  echo "nvidia-smi is present but reports no CUDA version (is the driver loaded?); installing the CPU build" >&2
  run "$PIP" install -q "torch==$TORCH_VERSION"
  exit 0
fi
for build in $TORCH_CUDA_BUILDS; do
  if [[ "$(printf '%s\n%s\n' "$build" "$driver_cuda" | sort -V | head -n 1)" == "$build" ]]; then
    tag="cu${build/./}"
    echo "NVIDIA driver supports CUDA $driver_cuda: torch $TORCH_VERSION+$tag" >&2
    run "$PIP" install -q "torch==$TORCH_VERSION" --index-url "https://download.pytorch.org/whl/$tag"
    exit 0
  fi
done
echo "the NVIDIA driver supports CUDA $driver_cuda, older than every CUDA build of torch $TORCH_VERSION" \
     "($TORCH_CUDA_BUILDS): update the driver, or set TORCH_CUDA_BUILDS / TORCH_VERSION to a build it runs" >&2
exit 2
