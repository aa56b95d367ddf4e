#!/usr/bin/env bash
# The main job on bundled data: write the synthetic demo stack with its clicks, segment all of
# its slices from the clicks on one slice, and compare with the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
out=${1:-demo}
revolver sample "$out" --overwrite
revolver segment "$out/image.tif" --points "$out/points.csv" -o "$out/segmented.tif" --overwrite
revolver compare "$out/segmented.tif" "$out/labels.tif"
