#!/usr/bin/env bash
# One short training burst on a single CUDA GPU, with the CUDA checks and GPU timings, that
# copies its checkpoints out as it goes. Everything it needs travels with the checkout:
#
#   bash scripts/gpu_burst.sh prepare DATA_DIR    # here: copy the trainable data sets into
#                                                 # .gpu-data/ (ignored by git)
#   bash scripts/gpu_burst.sh run OUT [MINUTES]   # on the GPU machine: train for MINUTES
#                                                 # (default 7), then test and time
#
# The run uses the machine's own python3 and torch (no install): the package is put on
# PYTHONPATH from src/. It warm-starts from the shipped weights unless INIT names others, and
# writes OUT/log.jsonl, OUT/best.safetensors and OUT/checkpoint.pt every CHECKPOINT_EVERY steps,
# plus OUT/cuda-tests.log and OUT/gpu-speed.json. Only data sets whose terms allow training are
# copied (vnc_sstem_organelles is non-commercial and miccai2015_he states no terms: both are
# for evaluation only).
set -euo pipefail
cd "$(dirname "$0")/.."

# miccai2015_he states no license (research use at most): scored, never trained on.
TRAINABLE="isbi2012_em plant_cells_3d dsb2018_u2os usiigaci_phase"

case "${1:-}" in
prepare)
    src=${2:?usage: gpu_burst.sh prepare DATA_DIR}
    mkdir -p .gpu-data
    grep -qxF "/.gpu-data/" .git/info/exclude 2>/dev/null || echo "/.gpu-data/" >>.git/info/exclude
    for name in $TRAINABLE; do
        [ -d "$src/$name" ] && cp -r "$src/$name" .gpu-data/
    done
    du -sh .gpu-data
    ;;
run)
    out=${2:?usage: gpu_burst.sh run OUT [MINUTES]}
    minutes=${3:-7}
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.cuda.get_device_name())'
    init=${INIT:-src/napari_revolver/weights/revolver-s.safetensors}
    datasets=$(ls .gpu-data | paste -sd, -)
    # Train in the background; stop it after the time budget (it checkpoints as it goes and
    # the same command resumes it).
    python3 -m napari_revolver.cli train --out "$out/run" --device cuda --init "$init" \
        --data .gpu-data --datasets "$datasets" --steps "${STEPS:-100000}" \
        --batch "${BATCH:-64}" --crop "${CROP:-256}" --workers "${WORKERS:-12}" \
        --checkpoint-every "${CHECKPOINT_EVERY:-100}" --val-every "${VAL_EVERY:-250}" \
        --p-real "${P_REAL:-0.6}" >"$out/train.log" 2>&1 &
    pid=$!
    sleep $((minutes * 60)) || true
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" || true
    # Flat copies: only files two folders down come back.
    for f in best.safetensors checkpoint.pt log.jsonl config.json; do
        [ -f "$out/run/$f" ] && cp "$out/run/$f" "$out/$f"
    done
    rm -rf "$out/run"
    python3 -m pytest -q -p no:cacheprovider tests/core/test_model.py tests/core/test_predictor.py \
        -k "cuda or device or tiled or model" >"$out/cuda-tests.log" 2>&1 || true
    python3 benchmarks/engine_speed.py --device cuda --json >"$out/gpu-speed.json" 2>&1 || true
    tail -5 "$out/train.log"
    ;;
*)
    echo "usage: gpu_burst.sh prepare DATA_DIR | run OUT [MINUTES]" >&2
    exit 2
    ;;
esac
