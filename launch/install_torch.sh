#!/usr/bin/env bash
# Install the torch sabiscale is tested with, built for this machine. torch 2.13's CUDA builds
# (PyTorch's release matrix, RELEASE.md and RFC #178665) are cu126 (sm_50-sm_90, drivers for CUDA
# 12.0 on by minor-version compatibility: R525+), cu130 (sm_75-sm_120, drivers for CUDA 13.0 on:
# R580+) and cu132 (experimental); there is no cu128 or cu129. So:
#   no NVIDIA driver          -> torch==$TORCH_VERSION from PyPI (or the local disk)
#   driver for CUDA >= 13.0   -> cu130, unless a GPU is older than Turing (V100 sm_70, P100): cu126
#   driver for CUDA 12.0-12.9 -> cu126 (R535/R550 clusters included), unless a GPU is Blackwell
#                                (sm_100/sm_120), which only cu130 has kernels for: update the driver
#   older drivers             -> refused, with the builds that would run
# TORCH_BUILD=cpu|cu126|cu130|cu132 overrides the choice, e.g. on a login node without GPUs for
# compute nodes with R535 drivers: TORCH_BUILD=cu126 make install.
# Usage: launch/install_torch.sh PIP [--dry-run]   (make install calls it)
set -euo pipefail
PIP="${1:?usage: install_torch.sh PIP [--dry-run]}"
DRY="${2:-}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
INDEX="https://download.pytorch.org/whl"
run() { if [[ "$DRY" == "--dry-run" ]]; then echo "$*"; else "$@"; fi; }
version_ge() { [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" == "$2" ]]; }  # $1 >= $2

install_build() {  # $1: cpu|pypi|cuXYZ
  case "$1" in
    pypi) run "$PIP" install -q "torch==$TORCH_VERSION" ;;
    *) echo "installing torch $TORCH_VERSION+$1 from $INDEX/$1" >&2
       run "$PIP" install -q "torch==$TORCH_VERSION" --index-url "$INDEX/$1" ;;
  esac
}

if [[ -n "${TORCH_BUILD:-}" ]]; then
  case "$TORCH_BUILD" in cpu|cu126|cu130|cu132) install_build "$TORCH_BUILD"; exit 0 ;;
    *) echo "TORCH_BUILD=$TORCH_BUILD: torch $TORCH_VERSION is built as cpu, cu126, cu130 or cu132" >&2; exit 2 ;;
  esac
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "no NVIDIA driver here: torch $TORCH_VERSION from PyPI. On a cluster login node, set TORCH_BUILD to the" \
       "compute nodes' build (cu126 for drivers R525-R575, cu130 for R580 and newer)" >&2
  install_build pypi
  exit 0
fi
driver_cuda=$(nvidia-smi 2>/dev/null | grep -oP 'CUDA Version:\s*\K[0-9]+\.[0-9]+' | head -n 1 || true)
if [[ -z "$driver_cuda" ]]; then
  echo "nvidia-smi is present but reports no CUDA version (is the driver loaded?); installing torch from PyPI" >&2
  install_build pypi
  exit 0
fi
# the oldest and newest compute capability among the GPUs (empty where the driver cannot say)
caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | grep -E '^[0-9]+\.[0-9]+$' | sort -V || true)
oldest=$(head -n 1 <<<"$caps"); newest=$(tail -n 1 <<<"$caps")
if version_ge "$driver_cuda" 13.0; then
  if [[ -n "$oldest" ]] && ! version_ge "$oldest" 7.5; then
    echo "GPU compute capability $oldest (before Turing): cu130 has no kernels for it; cu126 does" >&2
    install_build cu126
  else
    install_build cu130
  fi
  exit 0
fi
if version_ge "$driver_cuda" 12.0; then
  if [[ -n "$newest" ]] && version_ge "$newest" 10.0; then
    echo "GPU compute capability $newest (Blackwell) needs torch's cu130 build, which needs a driver for CUDA 13.0" \
         "(R580 or newer); this driver supports CUDA $driver_cuda. Update the driver, then run make install again" \
         "(or TORCH_BUILD=cu130 once it is updated; builds: $INDEX/cu130)" >&2
    exit 2
  fi
  install_build cu126
  exit 0
fi
echo "the NVIDIA driver supports CUDA $driver_cuda; torch $TORCH_VERSION needs a driver for CUDA 12.0 or newer" \
     "(R525+: the cu126 build, $INDEX/cu126; R580+: cu130). Update the driver, or set TORCH_VERSION to an older" \
     "torch with TORCH_BUILD naming a build your driver runs" >&2
exit 2
