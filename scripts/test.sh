#!/usr/bin/env bash
# Install everything the test suite needs on a fresh machine, then run it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
python3 -m pytest -q "$@"
