"""Engine speed on this machine: click-to-update latency, encoder time, cached propagation.

Targets (512x512 slices, laptop-class CPU): update <= 30 ms median, encoder <= 150 ms per slice,
propagation of 100 slices with cached features <= 3 s. Each number is also printed as a ratio
to a random-forest pixel classifier (scikit-image multiscale features + scikit-learn, 100 trees)
predicting the same slice in the same process.

    python benchmarks/engine_speed.py [--weights W] [--device cpu] [--image STACK.tif] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RandomForestBaseline, median_ms, timeit


def synthetic_stack(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from napari_revolver.core.synthetic import sample_stack

    image, labels, _, _ = sample_stack(seed=seed, shape=(min(n, 24), size, size))
    reps = -(-n // image.shape[0])
    return np.concatenate([image] * reps)[:n], np.concatenate([labels] * reps)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", type=Path, default=None, help="a (Z, Y, X) TIFF; default synthetic")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from napari_revolver import RevolverPredictor

    if args.image:
        import tifffile

        image = tifffile.imread(args.image)[: args.slices]
        labels = None
    else:
        image, labels = synthetic_stack(args.slices, args.size)
    n = image.shape[0]
    predictor = RevolverPredictor(args.weights, args.device)
    predictor.set_volume(image)
    rng = np.random.default_rng(0)
    z = n // 2
    h, w = image.shape[1:3]
    if labels is not None:
        fg = np.argwhere(labels[z] > 0)
        bg = np.argwhere(labels[z] == 0)
        pos = fg[rng.choice(len(fg), 5, replace=False)]
        neg = bg[rng.choice(len(bg), 5, replace=False)]
    else:
        pos = rng.integers(0, [h, w], (5, 2))
        neg = rng.integers(0, [h, w], (5, 2))
    yx = np.concatenate([pos, neg]).astype(float)
    pts = np.concatenate([np.full((10, 1), z), yx], 1)
    lab = np.array([1] * 5 + [0] * 5)

    sync = torch.cuda.synchronize if predictor.device.type == "cuda" else (lambda: None)

    def encode_one() -> None:
        predictor.cache.clear()
        predictor.cache.store = None
        predictor.features(z)
        sync()

    encoder = timeit(encode_one, args.repeat, warmup=2)
    predictor.features(z)

    def click() -> None:
        task = predictor.guide(pts, lab)
        predictor.predict_slice(z, task)
        sync()

    update = timeit(click, args.repeat * 2, warmup=3)
    task = predictor.guide(pts, lab)

    t = time.perf_counter()
    for _ in predictor.precompute():
        pass
    precompute_s = time.perf_counter() - t

    def propagate() -> None:
        for _ in predictor.propagate(task):
            pass
        sync()

    propagation = timeit(propagate, 3, warmup=1)

    rf = RandomForestBaseline()
    feats = rf.features(image[z])
    rf.fit([feats], [yx], [lab])
    rf_predict = timeit(lambda: rf.predict(rf.features(image[z])), max(3, args.repeat // 4))

    res = {
        "device": str(predictor.device),
        "threads": torch.get_num_threads(),
        "slice": [h, w],
        "update_ms_median": median_ms(update),
        "encoder_ms_median": median_ms(encoder),
        "propagation_s": min(propagation),
        "propagation_slices": n,
        "precompute_s": precompute_s,
        "rf_slice_ms_median": median_ms(rf_predict),
    }
    res["update_vs_rf"] = res["update_ms_median"] / res["rf_slice_ms_median"]
    res["encoder_vs_rf"] = res["encoder_ms_median"] / res["rf_slice_ms_median"]
    res["propagation_vs_rf"] = 1000 * res["propagation_s"] / (res["rf_slice_ms_median"] * n)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"device {res['device']} ({res['threads']} threads), slices {h}x{w}")
    print(f"{'measure':38s} {'value':>10s} {'target':>9s} {'vs RF':>8s}")
    print(
        f"{'click-to-update (guide + head), median':38s} {res['update_ms_median']:8.1f}ms "
        f"{'<= 30ms':>9s} {res['update_vs_rf']:7.3f}x"
    )
    print(
        f"{'encoder per slice, median':38s} {res['encoder_ms_median']:8.1f}ms "
        f"{'<= 150ms':>9s} {res['encoder_vs_rf']:7.3f}x"
    )
    print(
        f"{f'propagation, {n} slices cached':38s} {res['propagation_s']:9.2f}s "
        f"{'<= 3s':>9s} {res['propagation_vs_rf']:7.3f}x"
    )
    print(f"{'(precompute all features)':38s} {res['precompute_s']:9.2f}s")
    print(f"{'random forest, one slice (feat+predict)':38s} {res['rf_slice_ms_median']:8.1f}ms")
    print("ratios: our time / random-forest time for the same amount of work (lower is faster)")


if __name__ == "__main__":
    main()
