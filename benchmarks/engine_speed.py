"""Engine speed on this machine: click-to-update latency, encoder time, cached propagation.

Targets (512x512 slices, laptop-class CPU): update <= 30 ms median (a class click and an
object click), encoder <= 150 ms per slice,
propagation of 100 slices with cached features <= 3 s (also with a per-task pixel fit in use).
An object click runs the head in a window around its clicks where that is exact (on large
slices); a first click on an object (one positive) is timed with the windows and with the head
on the whole slice.
Following ``--objects`` object tasks through every slice is compared with one class task
(target <= 3x): first as after clicking them (their clicked-slice masks kept from the clicks),
then with those masks computed again.
A class click as the CLI and the plugin make it (deciding on a pixel fit of the clicks,
``guide(fit=True)``) is reported beside the plain one. Each number is also printed as a ratio
to a random-forest pixel classifier (scikit-image multiscale features + scikit-learn, 100 trees)
predicting the same slice in the same process.

    python benchmarks/engine_speed.py [--weights W] [--device cpu] [--image STACK.tif]
        [--scale 0.5] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import RandomForestBaseline, median_ms, timeit


def synthetic_stack(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from napari_revolver.core.synthetic import sample_stack

    image, labels, _, _ = sample_stack(seed=seed, shape=(min(n, 24), size, size))
    reps = -(-n // image.shape[0])
    return np.concatenate([image] * reps)[:n], np.concatenate([labels] * reps)[:n]


def follow_seconds(predictor, z, labels, rng, n_objects, sync) -> tuple[list[float], list[float]]:
    """Seconds of three runs following ``n_objects`` together through every slice.

    Features cached; after one untimed run, as the class propagation it is compared with.
    First with the objects' clicked-slice masks kept from that run (as the plugin has them
    from the clicks), then with them computed again in every run.
    """
    h, w = predictor.info.slice_shape
    centres = rng.integers(0, [h, w], (n_objects, 2))
    if labels is not None:
        fg = np.argwhere(labels[z] > 0)
        centres = fg[rng.choice(len(fg), n_objects, replace=len(fg) < n_objects)]
    objects = [
        predictor.guide([[z, *c]], [1], kind="object", label_value=i + 1)
        for i, c in enumerate(centres)
    ]

    def follow() -> None:
        for _ in predictor.propagate(objects):
            pass
        sync()

    def follow_anew() -> None:
        predictor.forget_object_masks()
        follow()

    return timeit(follow, 3, warmup=1), timeit(follow_anew, 3, warmup=0)


def _fitted_task(predictor, task, labels, z):
    """``task`` with a pixel fit that replaces the network (fitted to slice ``z``'s labels)."""
    if labels is None:
        return None
    pf = predictor.fit_labels({z: np.where(labels[z] > 0, 1, 2).astype(np.uint8)})
    if pf is None:
        return None
    return replace(task, pixel_fit=replace(pf, gain=1.0, net_weight=0.0))


def _propagation_s(predictor, task, sync) -> float | None:
    """Best of three propagations of ``task`` through the cached stack (``None``: no task)."""
    if task is None:
        return None

    def propagate() -> None:
        for _ in predictor.propagate(task):
            pass
        sync()

    return min(timeit(propagate, 3, warmup=1))


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=None)
    ap.add_argument(
        "--no-refiner", action="store_true", help="object clicks select only (no click refiner)"
    )
    ap.add_argument(
        "--no-follower", action="store_true", help="objects followed without the follower"
    )
    ap.add_argument(
        "--no-snap", action="store_true", help="followed masks not snapped to the image's edges"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--image", type=Path, default=None, help="a (Z, Y, X) TIFF; default synthetic")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--objects", type=int, default=50, help="objects followed together")
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="slices resized by this factor before the network (the forest reads them as given)",
    )
    ap.add_argument("--json", action="store_true")
    return ap.parse_args()


def _stack(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    """The benchmark's stack and its labels (``None`` for an image given with ``--image``)."""
    if args.image:
        import tifffile

        return tifffile.imread(args.image)[: args.slices], None
    return synthetic_stack(args.slices, args.size)


def main() -> None:
    args = _args()

    import torch

    from napari_revolver import RevolverPredictor

    image, labels = _stack(args)
    n = image.shape[0]
    predictor = RevolverPredictor(args.weights, args.device)
    # --no-refiner / --no-follower: without the weights' own refiners.
    predictor.refiner = None if args.no_refiner else predictor.refiner
    predictor.follower = None if args.no_follower else predictor.follower
    if args.no_snap:
        predictor.follow_params = replace(predictor.follow_params, snap=None)
    predictor.set_volume(image, scale=args.scale)
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

    def click_deciding_fit() -> None:
        predictor.predict_slice(z, predictor.guide(pts, lab, fit=True))
        sync()

    fit_update = timeit(click_deciding_fit, args.repeat, warmup=1)
    fitted = _fitted_task(predictor, task, labels, z)

    # An object click: guide + head on the slice, then the selection under the click, and the
    # refiner. The second click of an object, as a user makes it: the mask after the first is
    # kept from when it was shown (a refiner that reads the previous mask reads it), and each
    # timed click is a new one (its negative moved by a thousandth of a pixel: the same pixel),
    # so its own mask is never read back.
    predictor.forget_object_masks()
    predictor.predict_slice(z, predictor.guide(pts[:1], [1], kind="object"))
    clicks = iter(range(1 << 30))

    def object_click() -> None:
        obj_pts = np.concatenate([pts[:1], pts[5:6] + [0, 0, 1e-3 * next(clicks) % 0.4]])
        predictor.predict_slice(z, predictor.guide(obj_pts, [1, 0], kind="object"))
        sync()

    object_update = timeit(object_click, args.repeat * 2, warmup=3)

    # A first click on an object (one positive), with the head in a window around it and,
    # in this process, on the whole slice.
    def first_object_click() -> None:
        predictor.forget_object_masks()
        predictor.predict_slice(z, predictor.guide(pts[:1], [1], kind="object"))
        sync()

    import napari_revolver.core.predictor as predictor_module

    first_click = timeit(first_object_click, args.repeat, warmup=1)
    share = predictor_module.OBJECT_WINDOW_SHARE
    predictor_module.OBJECT_WINDOW_SHARE = 0.0
    try:
        first_click_whole = timeit(first_object_click, args.repeat, warmup=1)
    finally:
        predictor_module.OBJECT_WINDOW_SHARE = share

    t = time.perf_counter()
    for _ in predictor.precompute():
        pass
    precompute_s = time.perf_counter() - t

    propagation_s = _propagation_s(predictor, task, sync)
    propagation_fit_s = _propagation_s(predictor, fitted, sync)

    same_objects = copy.deepcopy(rng)
    following, following_anew = follow_seconds(predictor, z, labels, rng, args.objects, sync)
    # The same objects with their ends decided by the watershed alone (no look fit).
    params = predictor.follow_params
    predictor.follow_params = replace(params, look=None)
    following_no_look, _ = follow_seconds(predictor, z, labels, same_objects, args.objects, sync)
    predictor.follow_params = params

    rf = RandomForestBaseline()
    feats = rf.features(image[z])
    rf.fit([feats], [yx], [lab])
    rf_predict = timeit(lambda: rf.predict(rf.features(image[z])), max(3, args.repeat // 4))

    res = {
        "device": str(predictor.device),
        "threads": torch.get_num_threads(),
        "slice": [h, w],
        "update_ms_median": median_ms(update),
        "update_deciding_fit_ms_median": median_ms(fit_update),
        "object_update_ms_median": median_ms(object_update),
        "object_first_click_ms_median": median_ms(first_click),
        "object_first_click_whole_slice_ms_median": median_ms(first_click_whole),
        "encoder_ms_median": median_ms(encoder),
        "propagation_s": propagation_s,
        "propagation_fit_s": propagation_fit_s,
        "propagation_slices": n,
        "follow_objects": args.objects,
        "follow_s": min(following),
        "follow_clicked_anew_s": min(following_anew),
        "follow_no_look_s": min(following_no_look),
        "precompute_s": precompute_s,
        "rf_slice_ms_median": median_ms(rf_predict),
    }
    res["update_vs_rf"] = res["update_ms_median"] / res["rf_slice_ms_median"]
    res["object_update_vs_rf"] = res["object_update_ms_median"] / res["rf_slice_ms_median"]
    res["encoder_vs_rf"] = res["encoder_ms_median"] / res["rf_slice_ms_median"]
    res["follow_vs_class"] = res["follow_s"] / res["propagation_s"]
    res["follow_clicked_anew_vs_class"] = res["follow_clicked_anew_s"] / res["propagation_s"]
    res["follow_no_look_vs_class"] = res["follow_no_look_s"] / res["propagation_s"]
    res["propagation_vs_rf"] = 1000 * res["propagation_s"] / (res["rf_slice_ms_median"] * n)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    _report(res, args.objects)


def _report(res: dict, objects: int) -> None:
    """Print the measures, their targets and their ratios to the forest."""
    h, w = res["slice"]
    n = res["propagation_slices"]
    print(f"device {res['device']} ({res['threads']} threads), slices {h}x{w}")
    print(f"{'measure':38s} {'value':>10s} {'target':>9s} {'vs RF':>8s}")
    print(
        f"{'click-to-update (guide + head), median':38s} {res['update_ms_median']:8.1f}ms "
        f"{'<= 30ms':>9s} {res['update_vs_rf']:7.3f}x"
    )
    print(
        f"{'class click deciding on a pixel fit':38s} "
        f"{res['update_deciding_fit_ms_median']:8.1f}ms {'':>9s} "
        f"{res['update_deciding_fit_ms_median'] / res['rf_slice_ms_median']:7.3f}x"
    )
    print(
        f"{'object click (guide + head + select)':38s} {res['object_update_ms_median']:8.1f}ms "
        f"{'<= 30ms':>9s} {res['object_update_vs_rf']:7.3f}x"
    )
    for name, key in (
        ("object click, one positive", "object_first_click_ms_median"),
        ("  the same, head on the whole slice", "object_first_click_whole_slice_ms_median"),
    ):
        print(f"{name:38s} {res[key]:8.1f}ms {'':>9s} {res[key] / res['rf_slice_ms_median']:7.3f}x")
    print(
        f"{'encoder per slice, median':38s} {res['encoder_ms_median']:8.1f}ms "
        f"{'<= 150ms':>9s} {res['encoder_vs_rf']:7.3f}x"
    )
    print(
        f"{f'propagation, {n} slices cached':38s} {res['propagation_s']:9.2f}s "
        f"{'<= 3s':>9s} {res['propagation_vs_rf']:7.3f}x"
    )
    if res["propagation_fit_s"] is not None:
        fit_s = res["propagation_fit_s"]
        print(
            f"{f'propagation, {n} slices, pixel fit used':38s} {fit_s:9.2f}s "
            f"{'<= 3s':>9s} {1000 * fit_s / (res['rf_slice_ms_median'] * n):7.3f}x"
        )
    print(
        f"{f'follow {objects} objects, {n} slices':38s} {res['follow_s']:9.2f}s "
        f"{'<= 3x':>9s} {res['follow_vs_class']:7.2f}x one class task"
    )
    print(
        f"{'  the same, clicked slices anew':38s} {res['follow_clicked_anew_s']:9.2f}s "
        f"{'':>9s} {res['follow_clicked_anew_vs_class']:7.2f}x one class task"
    )
    print(
        f"{'  the same, ends by the watershed':38s} {res['follow_no_look_s']:9.2f}s "
        f"{'':>9s} {res['follow_no_look_vs_class']:7.2f}x one class task"
    )
    print(f"{'(precompute all features)':38s} {res['precompute_s']:9.2f}s")
    print(f"{'random forest, one slice (feat+predict)':38s} {res['rf_slice_ms_median']:8.1f}ms")
    print("ratios: our time / random-forest time for the same amount of work (lower is faster)")


if __name__ == "__main__":
    main()
