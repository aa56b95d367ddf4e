"""Engine speed on this machine: click-to-update latency, encoder time, cached propagation.

Targets (512x512 slices, laptop-class CPU): update <= 30 ms median (a class click and an
object click), encoder <= 150 ms per slice,
propagation of 100 slices with cached features <= 3 s (also with a per-task pixel fit in use).
An object click runs the head in a window around its clicks where that is exact (on large
slices); a first click on an object (one positive), the target's click, is timed with the
windows and with the head on the whole slice. A negative correction after it is timed too:
it changes neither the object's guide nor its local prior, so its head pass is the first
click's, kept (a positive correction costs what a first click does).
Following ``--objects`` object tasks through every slice is compared with one class task
(target <= 3x): first as after clicking them (their clicked-slice masks kept from the clicks),
then with those masks computed again.
A class click as the CLI and the plugin make it (deciding on a pixel fit of the clicks,
``guide(fit=True)``) is reported beside the plain one. Each number is also printed as a ratio
to a random-forest pixel classifier (scikit-image multiscale features + scikit-learn, 100 trees)
predicting the same slice in the same process.

With ``--labels`` (the image's labels, same shape) the clicks are a user's: the class clicks
are drawn on the foreground (``labels == --label-value``, default any label) and off it, and
each object is clicked once at the innermost pixel of one connected piece of foreground on
the middle slice (the timed object click on a piece of median size), as
``benchmarks/objects.py`` clicks them. Without it, an ``--image`` is clicked at random pixels,
which an object task follows as if each were an object (a worst case on EM sections, where
most of a slice is probable).

    python benchmarks/engine_speed.py [--weights W] [--device cpu] [--image STACK.tif
        [--labels LABELS.tif [--label-value V]]] [--scale 0.5] [--json]
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
    if isinstance(labels, RealLabels):
        centres = labels.object_clicks(z, n_objects, rng)
    elif labels is not None:
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


class RealLabels(np.ndarray):
    """``(Z, H, W)`` bool foreground of an ``--image`` from ``--labels``; its objects are the
    connected pieces of each slice, clicked at their innermost pixels."""

    def _pieces(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Slice ``z``'s pieces (ids from 1) and their sizes (of ids 1, 2, ...)."""
        from scipy import ndimage

        pieces, count = ndimage.label(np.asarray(self[z]))
        if count == 0:
            raise SystemExit(f"--labels: no foreground on slice {z}")
        return pieces, np.bincount(pieces.ravel())[1:]

    def object_clicks(self, z: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """``(n, 2)`` innermost pixels of ``n`` pieces of slice ``z``, drawn by ``rng``.

        With fewer pieces than ``n``, every piece, some clicked twice.
        """
        from napari_revolver.core.objects import innermost

        pieces, sizes = self._pieces(z)
        ids = np.arange(1, len(sizes) + 1)
        ids = rng.choice(ids, n, replace=False) if len(ids) > n else np.resize(ids, n)
        return np.array([innermost(pieces == i) for i in ids])

    def typical_click(self, z: int, min_area: int = 64) -> np.ndarray:
        """The innermost pixel ``(y, x)`` of the piece of median size on slice ``z``.

        Among the pieces of at least ``min_area`` pixels, as ``benchmarks/objects.py`` draws
        them (all pieces if none is that large).
        """
        from napari_revolver.core.objects import innermost

        pieces, sizes = self._pieces(z)
        ids = np.flatnonzero(sizes >= min_area) + 1
        ids = ids if len(ids) else np.arange(1, len(sizes) + 1)
        median = ids[np.argsort(sizes[ids - 1])[len(ids) // 2]]
        return np.array(innermost(pieces == median))


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
    ap.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="the --image's labels (Z, Y, X): clicks on their foreground and its pieces",
    )
    ap.add_argument(
        "--label-value",
        type=int,
        default=None,
        help="with --labels, the foreground is labels == this (default: labels > 0)",
    )
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
    if args.labels is not None and args.image is None:
        raise SystemExit("--labels needs the --image they label")
    if args.image:
        import tifffile

        image = tifffile.imread(args.image)[: args.slices]
        if args.labels is None:
            return image, None
        labels = tifffile.imread(args.labels)[: args.slices]
        if labels.shape != image.shape[: labels.ndim] or labels.ndim != 3:
            raise SystemExit(
                f"--labels must be (Z, Y, X) like the image's slices; got {labels.shape} for "
                f"an image of {image.shape}"
            )
        fg = labels > 0 if args.label_value is None else labels == args.label_value
        return image, fg.view(RealLabels)
    return synthetic_stack(args.slices, args.size)


def _clicks(
    labels: np.ndarray | None, z: int, shape: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Five positive and five negative clicks ``(10, 3)`` on slice ``z``, and their labels.

    On the labels' foreground and off it (random pixels without labels). With ``--labels``
    the first is at the innermost pixel of a typical piece: the object click timed.
    """
    if labels is not None:
        fg = np.argwhere(labels[z] > 0)
        bg = np.argwhere(labels[z] == 0)
        pos = fg[rng.choice(len(fg), 5, replace=False)]
        neg = bg[rng.choice(len(bg), 5, replace=False)]
    else:
        pos = rng.integers(0, shape, (5, 2))
        neg = rng.integers(0, shape, (5, 2))
    if isinstance(labels, RealLabels):
        pos[0] = labels.typical_click(z)
    yx = np.concatenate([pos, neg]).astype(float)
    return np.concatenate([np.full((10, 1), z), yx], 1), np.array([1] * 5 + [0] * 5)


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
    pts, lab = _clicks(labels, z, (h, w), rng)

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

    # A negative correction: the guide, the selection under the clicks and the refiner, with
    # the head pass kept from the first click (the guide and the local prior are the same).
    # The second click of an object, as a user makes it: the mask after the first is kept from
    # when it was shown (a refiner that reads the previous mask reads it), and each timed
    # click is a new one (its negative moved by a thousandth of a pixel: the same pixel), so
    # its own mask is never read back.
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
    rf.fit([feats], [pts[:, 1:]], [lab])
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
    first = res["object_first_click_ms_median"]
    print(
        f"{'object click, one positive':38s} {first:8.1f}ms "
        f"{'<= 30ms':>9s} {first / res['rf_slice_ms_median']:7.3f}x"
    )
    for name, key in (
        ("  the same, head on the whole slice", "object_first_click_whole_slice_ms_median"),
        ("  then a negative correction", "object_update_ms_median"),
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
