"""Object tasks with slices resized before the network (``set_volume(..., scale=s)``).

For each data set and each scale, in one process: the simulated annotator of
:mod:`napari_revolver.core.evaluate_objects` on the objects of ``benchmarks/objects.py``
(mean IoU after 1, 3, 5 clicks, NoC@85 within ``--max-clicks``), and objects followed through
z from one click (mean 3D IoU, share at IoU >= 0.5). Everything is scored in the data's own
pixels: the predictor converts points in and masks out. Time is reported as a ratio to scale 1
in the same run.

Click sets: ``dsb2018_u2os``, ``usiigaci_phase``, ``miccai2015_he``, ``isbi2012_em`` (as in
``objects.py``) and ``vnc_mito``: mitochondria (``labels == 3``) of ``vnc_sstem_organelles`` as
2D connected components on slices 0, 5, 10, 15 (non-commercial: evaluation only). Follow sets:
``vnc_mito`` (3D components from slice 0, as ``objects.py``) and ``plant_held`` (the held-out
plant slices, as ``objects.py``).

    python benchmarks/scale.py [--data ../shared/data] [--scales 1,0.5]
        [--sets vnc_mito,usiigaci_phase] [--follow-sets vnc_mito] [--images 4] [--objects 10]
        [--max-clicks 5] [--follow 20] [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage

from napari_revolver import RevolverPredictor
from napari_revolver.core.evaluate_objects import (
    evaluate_following,
    pick_objects,
    summarise_clicks,
    summarise_following,
)

sys.path.insert(0, str(Path(__file__).parent))
import objects as bench  # the data sets of benchmarks/objects.py

CLICK_SETS = ("dsb2018_u2os", "usiigaci_phase", "miccai2015_he", "isbi2012_em", "vnc_mito")
FOLLOW_SETS = ("vnc_mito", "plant_held")


def _vnc(root: Path) -> tuple[np.ndarray, np.ndarray]:
    return (
        tifffile.imread(root / "vnc_sstem_organelles" / "image.tif"),
        tifffile.imread(root / "vnc_sstem_organelles" / "labels.tif"),
    )


def click_data(root: Path, name: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (image, instance labels) stacks a click set is scored on."""
    if name == "miccai2015_he":
        return [(i[None], m[None]) for i, m in bench._he(root, n)]
    if name == "isbi2012_em":
        return [bench._isbi(root, n)]
    if name == "vnc_mito":
        image, labels = _vnc(root)
        idx = np.arange(0, 5 * n, 5)
        return [(image[idx], np.stack([ndimage.label(s == 3)[0] for s in labels[idx]]))]
    return [bench._stack(root, name, n)]


def follow_data(root: Path, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(image, 3D instance labels, clicked slice) of a follow set."""
    if name == "vnc_mito":
        image, labels = _vnc(root)
        return image, ndimage.label(labels == 3)[0], 0
    image = tifffile.imread(root / "plant_cells_3d" / "image.tif")
    labels = tifffile.imread(root / "plant_cells_3d" / "labels.tif").astype(np.int64)
    first = len(image) - round(len(image) * bench.HELD_OUT)
    cells = np.where(labels > 1, labels, 0)[first:]  # id 1 is the dim outside
    return image[first:], cells, len(cells) // 2


def _timed(rows: list[dict], base: dict | None, row: dict, t0: float) -> dict:
    """Add the run's time and its ratio to scale 1's (``base``); return the scale-1 row."""
    row["seconds"] = time.perf_counter() - t0
    base = base or row
    row["time_ratio"] = row["seconds"] / base["seconds"]
    rows.append(row)
    print(row, flush=True)
    return base


def click_rows(predictor, args: argparse.Namespace, scales: list[float]) -> list[dict]:
    """Simulated clicks on each click set at each scale."""
    rows: list[dict] = []
    for name in [s for s in args.sets.split(",") if s]:
        data = click_data(args.data, name, args.images)
        base = None
        for s in scales:
            t0 = time.perf_counter()
            results = bench.clicks_on(predictor, data, args, scale=s)
            summary = summarise_clicks(results).to_dict()
            row = {"kind": "clicks", "data": name, "scale": s, **summary}
            base = _timed(rows, base, row, t0)
    return rows


def follow_rows(predictor, args: argparse.Namespace, scales: list[float]) -> list[dict]:
    """One click per object, followed through z, at each scale."""
    rows: list[dict] = []
    for name in [s for s in args.follow_sets.split(",") if s]:
        image, labels, z = follow_data(args.data, name)
        ids = pick_objects(labels[z], args.follow, min_area=100)
        base = None
        for s in scales:
            t0 = time.perf_counter()
            res = evaluate_following(predictor, image, labels, ids, start=z, scale=s)
            row = {"kind": "follow", "data": name, "scale": s, **summarise_following(res)}
            base = _timed(rows, base, row, t0)
    return rows


def print_tables(rows: list[dict]) -> None:
    """Markdown tables of the rows (each kind that was run)."""
    clicks = [r for r in rows if r["kind"] == "clicks"]
    follow = [r for r in rows if r["kind"] == "follow"]
    if clicks:
        print()
        print("| data set | scale | IoU@1 | IoU@3 | IoU@5 | NoC@85 | time vs scale 1 |")
        print("|---|---:|---:|---:|---:|---:|---:|")
    for r in clicks:
        print(
            f"| {r['data']} | {r['scale']:g} | {r['iou@1']:.3f} | {r['iou@3']:.3f} | "
            f"{r['iou@5']:.3f} | {r['noc@85']:.2f} | {r['time_ratio']:.2f} |"
        )
    if follow:
        print()
        print("| followed through z | scale | objects | 3D IoU mean | share >= 0.5 | time vs 1 |")
        print("|---|---:|---:|---:|---:|---:|")
    for r in follow:
        print(
            f"| {r['data']} | {r['scale']:g} | {int(r['n_objects'])} | {r['iou_mean']:.3f} | "
            f"{r['frac_iou_ge_0.5']:.0%} | {r['time_ratio']:.2f} |"
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    ap.add_argument("--scales", default="1,0.5", help="comma-separated; 1 is always run first")
    ap.add_argument("--sets", default=",".join(CLICK_SETS), help="click sets ('' for none)")
    ap.add_argument("--follow-sets", default="vnc_mito", help="follow sets ('' for none)")
    ap.add_argument("--images", type=int, default=4, help="images per click set")
    ap.add_argument("--objects", type=int, default=10, help="objects per image")
    ap.add_argument("--max-clicks", type=int, default=5)
    ap.add_argument("--follow", type=int, default=20, help="objects followed per set")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    scales = [float(s) for s in args.scales.split(",") if s.strip()]
    scales = [1.0] + [s for s in scales if s != 1.0]
    predictor = RevolverPredictor(args.weights, device="cpu")
    rows = click_rows(predictor, args, scales) + follow_rows(predictor, args, scales)
    print_tables(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
