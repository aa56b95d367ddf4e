#!/usr/bin/env bash
# One short training burst on a single CUDA GPU, with the CUDA checks and GPU timings, that
# copies its checkpoints out as it goes. Everything it needs travels with the checkout:
#
#   bash scripts/gpu_burst.sh prepare DATA_DIR    # here: copy the trainable data sets into
#                                                 # .gpu-data/ (ignored by git)
#   bash scripts/gpu_burst.sh run OUT [MINUTES]   # on the GPU machine: train for MINUTES
#                                                 # (default 6.5), then test and time
#
# The run uses the machine's own python3 and torch (no install): the package is put on
# PYTHONPATH from src/. It warm-starts from the shipped weights unless INIT names others, and
# writes OUT/run/log.jsonl, OUT/run/best.safetensors and OUT/run/checkpoint.pt (every
# CHECKPOINT_EVERY steps), OUT/train.log, OUT/cuda-tests.log, OUT/gpu-speed.json and (with
# isbi2012_em in the data) OUT/gpu-speed-em.json, the timings on its sections. DEVICE=cpu
# runs the same steps here, as a dry run (tests/core/test_gpu_burst.py does, on DATA). Only
# data sets whose terms allow training are copied (vnc_sstem_organelles is non-commercial and
# miccai2015_he states no terms: both are for evaluation only).
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
    minutes=${3:-6.5}
    mkdir -p "$out"
    device=${DEVICE:-cuda}
    export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
    py=${PYTHON:-python3}
    # All cores but two make episodes (counted before OMP_NUM_THREADS=1, which nproc obeys).
    cores=$("$py" -c 'import os; print(len(os.sched_getaffinity(0)))')
    workers=${WORKERS:-$((cores > 3 ? cores - 2 : 1))}
    # Episode workers are single-threaded numpy: one core each, no oversubscription.
    export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
    if [ "$device" = cuda ]; then
        "$py" -c 'import torch; assert torch.cuda.is_available(), "no CUDA GPU"; print(torch.__version__, torch.cuda.get_device_name())'
    fi
    init=${INIT:-src/napari_revolver/weights/revolver-s.safetensors}
    data=${DATA:-.gpu-data}
    datasets=$(ls "$data" | paste -sd, -)
    echo "$cores cores, $workers episode workers"
    # The run stops itself after MINUTES (the learning rate decays over them) and writes
    # straight under OUT/run, one folder down, so a run cut short still returns its files.
    # --freeze-encoder (FREEZE=1, the default) keeps the shipped encoder: the cached features
    # and the object refiners trained on them stay valid. No inverted or colour-mixed episodes
    # by default (P_INVERT, P_COLOUR): at an equal CPU budget they cost the plant cell and
    # U2OS and gained nothing on H&E or mitochondria (docs/model-card.md, v10).
    freeze=()
    [ "${FREEZE:-1}" = 1 ] && freeze=(--freeze-encoder)
    timeout $("$py" -c "print(int(60 * $minutes + 120))") \
        "$py" -m napari_revolver.cli train --out "$out/run" --device "$device" --init "$init" \
        --data "$data" --datasets "$datasets" --steps "${STEPS:-100000}" --minutes "$minutes" \
        --batch "${BATCH:-32}" --lr "${LR:-8e-4}" --crop "${CROP:-256}" --workers "$workers" \
        --checkpoint-every "${CHECKPOINT_EVERY:-100}" --val-every "${VAL_EVERY:-200}" \
        --p-real "${P_REAL:-0.6}" --p-instance "${P_INSTANCE:-0.6}" \
        --p-invert "${P_INVERT:-0}" --p-colour "${P_COLOUR:-0}" \
        "${freeze[@]}" >"$out/train.log" 2>&1 || true
    tail -3 "$out/train.log"
    timeout "${TEST_S:-90}" "$py" -m pytest -q -p no:cacheprovider tests/core/test_model.py \
        tests/core/test_predictor.py -k "cuda or device or tiled or model" \
        >"$out/cuda-tests.log" 2>&1 || true
    tail -1 "$out/cuda-tests.log"
    timeout "${SPEED_S:-90}" "$py" benchmarks/engine_speed.py --device "$device" --json \
        >"$out/gpu-speed.json" 2>&1 || true
    tail -3 "$out/gpu-speed.json"
    # The same on real EM sections, clicked at their neurites (when the data came along).
    em="$data/isbi2012_em"
    if [ -f "$em/image.tif" ] && [ -f "$em/labels.tif" ]; then
        timeout "${SPEED_EM_S:-60}" "$py" benchmarks/engine_speed.py --device "$device" --json \
            --image "$em/image.tif" --labels "$em/labels.tif" --slices 20 --repeat 5 \
            --objects 10 >"$out/gpu-speed-em.json" 2>&1 || true
        tail -3 "$out/gpu-speed-em.json"
    fi
    ;;
*)
    echo "usage: gpu_burst.sh prepare DATA_DIR | run OUT [MINUTES]" >&2
    exit 2
    ;;
esac
