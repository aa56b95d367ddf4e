"""Few-shot accuracy on the labelled data sets described in a MANIFEST (``revolver eval`` protocol).

For every data set: its suggested task, evaluated on its held-out split (the last 25% of planes or
images, which training never sees; data sets not used in training are held out whole), with
P positive + P negative random points on the first held-out slice and every other held-out slice
as a query, against the random-forest pixel classifier given the same points.

    python benchmarks/accuracy.py DATA_DIR [--weights W] [--points 1,5,20,dense] [--seeds 3]
                                   [--out docs/benchmarks/accuracy.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

#: name -> (label_value or None for labels > 0, held out whole?)
TASKS = {
    "dsb2018_u2os": (None, False, "nuclei (labels > 0)"),
    "usiigaci_phase": (None, False, "whole cells (labels > 0)"),
    "isbi2012_em": (0, False, "membranes (labels == 0)"),
    "plant_cells_3d": (7414, False, "one cell, id 7414, across z"),
    "miccai2015_he": (None, True, "nuclei (labels > 0), RGB, centre crops 392 x 439"),
}


def load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    import tifffile

    d = root / name
    if (d / "image.tif").exists():
        return tifffile.imread(d / "image.tif"), tifffile.imread(d / "labels.tif")
    files = sorted((d / "images").glob("*.tif"))
    imgs = [tifffile.imread(f) for f in files]
    labs = [tifffile.imread(d / "masks" / f.name) for f in files]
    h = min(i.shape[0] for i in imgs)
    w = min(i.shape[1] for i in imgs)

    def crop(a: np.ndarray) -> np.ndarray:
        y0, x0 = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        return a[y0 : y0 + h, x0 : x0 + w]

    return np.stack([crop(i) for i in imgs]), np.stack([crop(m) for m in labs])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--points", default="1,5,20,dense")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default=",".join(TASKS))
    ap.add_argument("--no-rf", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = ap.parse_args()

    from napari_revolver import RevolverPredictor
    from napari_revolver.core.evaluate import evaluate_few_shot

    predictor = RevolverPredictor(args.weights, args.device)
    points = [p if p == "dense" else int(p) for p in args.points.split(",")]
    rows = []
    for name in args.datasets.split(","):
        value, whole, what = TASKS[name]
        image, labels = load(args.data, name)
        n = len(image)
        start = 0 if whole else n - max(2, round(n * 0.25))
        image, labels = image[start:], labels[start:]
        t = time.perf_counter()
        res = evaluate_few_shot(
            predictor,
            image,
            labels,
            support=(0,),
            points=points,
            seeds=args.seeds,
            label_value=value,
            baselines=() if args.no_rf else ("rf",),
        )
        print(
            f"{name}: {len(image)} held-out slices, {time.perf_counter() - t:.0f} s",
            file=sys.stderr,
        )
        for r in res:
            rows.append((name, what, r))
            print(
                f"  {r.method:8s} P={r.points:5s} IoU {r.iou_mean:.3f} ± {r.iou_std:.3f} "
                f"({1000 * r.seconds_per_slice:.0f} ms/slice)",
                file=sys.stderr,
            )
    lines = [
        "| data set | task | method | points (+/-) | IoU mean | IoU std | ms / slice |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, what, r in rows:
        lines.append(
            f"| {name} | {what} | {r.method} | {r.points} | {r.iou_mean:.3f} | "
            f"{r.iou_std:.3f} | {1000 * r.seconds_per_slice:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
