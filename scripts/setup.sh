#!/usr/bin/env bash
# Install napari-revolver and what it needs on a fresh machine (idempotent).
#   bash scripts/setup.sh          the library and the `revolver` command
#   bash scripts/setup.sh dev      plus the test and benchmark tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The CPU build of torch first: with no torch present, a plain `torch` requirement would pull
# the CUDA build and gigabytes of GPU libraries.
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
    "$PY" -m pip install --quiet torch==2.13.0
fi
extras=""
if [ "${1:-}" = "dev" ]; then extras="[dev]"; fi
"$PY" -m pip install --quiet -e ".${extras}"
"$PY" -c 'import napari_revolver, torch; print(f"napari-revolver {napari_revolver.__version__} with torch {torch.__version__} ready")'
