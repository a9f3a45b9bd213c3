#!/usr/bin/env bash
# The wheels a GPU machine without network needs beside its preinstalled CUDA torch, resolved
# exactly (pip's resolver, with torch pinned to the tested version) and downloaded once on a
# machine with network:
#   launch/gpu_wheelhouse.sh wheelhouse/                # resolve + download (Linux x86_64, this Python)
#   launch/gpu_wheelhouse.sh wheelhouse/ --resolve-only # write wheelhouse/requirements.txt only
# then, on the GPU machine (torch already installed there):
#   pip install --no-index --find-links wheelhouse/ -r wheelhouse/requirements.txt
#   pip install --no-index --find-links wheelhouse/ --no-deps -e .
#   python benchmarks/gpu_smoke.py
# torch itself, its nvidia-* CUDA libraries and triton are left out: they come with the machine's torch.
set -euo pipefail
OUT="${1:?usage: gpu_wheelhouse.sh OUT_DIR [--resolve-only]}"
MODE="${2:-}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT"
"$PYTHON" -m pip install --dry-run --ignore-installed --quiet --report "$OUT/resolved.json" \
  "torch==$TORCH_VERSION" "$ROOT[dev,hf,eval]"
"$PYTHON" - "$OUT/resolved.json" "$OUT/requirements.txt" <<'PY'
import json, re, sys
report = json.load(open(sys.argv[1]))
skip = re.compile(r"^(torch|triton|nvidia-.*|sabiscale)$")
pins = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"]
              if not skip.match(i["metadata"]["name"].lower()))
open(sys.argv[2], "w").write("\n".join(pins) + "\n")
print(f"{len(pins)} packages pinned in {sys.argv[2]}")
PY
if [[ "$MODE" != "--resolve-only" ]]; then
  "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$OUT" -r "$OUT/requirements.txt"
fi
