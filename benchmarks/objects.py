"""Object tasks on held-out data: simulated clicks per object, and objects followed through z.

Clicks (the held-out images of ``dsb2018_u2os`` and ``usiigaci_phase`` and held-out slices of
``isbi2012_em`` neurite cross-sections as 2D connected components, which no weights trained on;
``miccai2015_he``, never trained on, read as given: no ``--invert``): the simulated annotator of
:mod:`napari_revolver.core.evaluate_objects`, mean IoU after 1, 3, 5 clicks, NoC@85, NoC@90.
Following: one click per object, propagated, per-object 3D IoU, on

* ``plant_cells_3d`` held-out slices 48-63 (the last quarter, never trained on) as a stack of
  their own, cells clicked on its middle slice;
* ``plant_cells_3d`` whole, cells clicked on slice 32 (slices 0-47 are in the training split
  of the weights, the click refiner and the follower: a longer reach, not held out);
* ``vnc_sstem_organelles`` mitochondria, ``labels == 3`` as 3D connected components, from
  slice 0 (non-commercial: evaluation only, never trained on).

    python benchmarks/objects.py [--data ../shared/data] [--images 4] [--objects 10]
        [--follow 20] [--weights W] [--refiner R | --no-refiner] [--corrector C | --no-corrector]
        [--follower F | --no-follower] [--sets a,b] [--skip-follow] [--skip-clicks]
        [--out-dir docs/benchmarks]

Writes ``objects.md``, ``objects.json`` and ``objects.png`` (IoU vs clicks) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from scipy import ndimage

from napari_revolver import RevolverPredictor
from napari_revolver.core.evaluate import foreground_iou
from napari_revolver.core.evaluate_objects import (
    evaluate_clicks,
    evaluate_following,
    pick_objects,
    summarise_clicks,
    summarise_following,
)
from napari_revolver.core.weights import load_refiner

#: Share of each training data set's planes held out of training (``load_labelled_stacks``).
HELD_OUT = 0.25

#: Followed objects are also summarised over those at least this far (pixels) inside their
#: edge somewhere on the clicked slice: objects a user would click, not label slivers.
CLICKABLE_RADIUS = 5.0


def _he(root: Path, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    files = sorted((root / "miccai2015_he" / "images").glob("*.tif"))
    step = max(1, len(files) // n)
    return [
        (tifffile.imread(f), tifffile.imread(root / "miccai2015_he" / "masks" / f.name))
        for f in files[::step][:n]
    ]


def _stack(root: Path, name: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` planes of a data set's held-out split (the last quarter, never trained on)."""
    image = tifffile.imread(root / name / "image.tif")
    labels = tifffile.imread(root / name / "labels.tif")
    first = len(image) - max(1, round(len(image) * HELD_OUT))
    idx = np.unique(np.linspace(first, len(image) - 1, n).astype(int))
    return image[idx], labels[idx]


def clicks_on(
    predictor: RevolverPredictor,
    data: list[tuple[np.ndarray, np.ndarray]],
    args: argparse.Namespace,
    **reading: Any,
) -> list:
    """The simulated annotator on every (image, labels) stack of ``data`` (``args.objects``
    objects per slice, ``args.max_clicks`` clicks); ``reading``: ``invert``, ``scale``."""
    results = []
    for image, labels in data:
        results += evaluate_clicks(
            predictor,
            image,
            labels,
            objects_per_slice=args.objects,
            max_clicks=args.max_clicks,
            **reading,
        )
    return results


def click_rows(predictor: RevolverPredictor, root: Path, args: argparse.Namespace) -> list[dict]:
    """Score simulated clicks on every 2D instance data set."""
    sets = {
        "dsb2018_u2os": (lambda: [_stack(root, "dsb2018_u2os", args.images)], False),
        "usiigaci_phase": (lambda: [_stack(root, "usiigaci_phase", args.images)], False),
        "miccai2015_he": (lambda: [(i[None], m[None]) for i, m in _he(root, args.images)], False),
        "isbi2012_em": (lambda: [_isbi(root, args.images)], False),
    }
    rows = []
    for name, (load, invert) in sets.items():
        if args.sets and name not in args.sets.split(","):
            continue
        t0 = time.perf_counter()
        results = clicks_on(predictor, load(), args, invert=invert)
        s = summarise_clicks(results)
        rows.append(
            {
                "data": name,
                "invert": invert,
                "refiner": predictor.refiner is not None,
                "corrector": predictor.refiner is not None and predictor.corrector is not None,
                **s.to_dict(),
                "seconds": time.perf_counter() - t0,
            }
        )
        print(rows[-1], flush=True)
        rows[-1]["curve"] = [
            float(np.mean([r.iou_at(k) for r in results])) for k in range(1, args.max_clicks + 1)
        ]
    return rows


def _isbi(root: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    image, labels = _stack(root, "isbi2012_em", n)
    comps = np.stack([ndimage.label(s == 255)[0] for s in labels])
    return image, comps


def follow_rows(predictor: RevolverPredictor, root: Path, k: int) -> list[dict]:
    """Follow ``k`` objects per 3D data set from one click each."""
    rows = []
    image = tifffile.imread(root / "plant_cells_3d" / "image.tif")
    labels = tifffile.imread(root / "plant_cells_3d" / "labels.tif").astype(np.int64)
    cells = np.where(labels > 1, labels, 0)  # id 1 is the dim outside
    first = len(image) - round(len(image) * HELD_OUT)
    held = slice(first, len(image))
    rows.append(
        _follow(
            predictor,
            f"plant_cells_3d held-out slices {first}-{len(image) - 1}",
            image[held],
            cells[held],
            (len(image) - first) // 2,
            k,
        )
    )
    z = image.shape[0] // 2
    rows.append(_follow(predictor, "plant_cells_3d whole (0-47 trained on)", image, cells, z, k))
    image = tifffile.imread(root / "vnc_sstem_organelles" / "image.tif")
    mito = ndimage.label(tifffile.imread(root / "vnc_sstem_organelles" / "labels.tif") == 3)[0]
    rows.append(_follow(predictor, "vnc_sstem_organelles mitochondria", image, mito, 0, k))
    return rows


def _follow(predictor, name, image, labels, z, k) -> dict:
    row = _follow_once(predictor, name, image, labels, z, k, False)
    given = _follow_once(predictor, name, image, labels, z, k, True)
    row["given_start"] = {k: given[k] for k in ("iou_mean", "frac_iou_ge_0.5", "ious")}
    ids = pick_objects(labels[z], k, min_area=100)
    row["copied_start"] = _copied_start(labels, z, ids)
    row["in_pieces"] = _in_pieces(labels[z], ids)
    row["inscribed"] = [inscribed_radius(labels[z] == i) for i in ids]
    return row


def inscribed_radius(mask: np.ndarray) -> float:
    """The radius of the largest disc inside ``mask`` ``(H, W)``: its largest distance to its edge.

    The slice's border counts as an edge (a cell cut by the crop is as narrow there).
    """
    return float(ndimage.distance_transform_edt(np.pad(mask, 1)).max())


def clickable(row: dict, radius: float = CLICKABLE_RADIUS) -> dict | None:
    """A follow row's summary over its objects with an inscribed radius of ``radius`` or more.

    ``None`` for rows written before the radius was recorded.
    """
    if "inscribed" not in row:
        return None
    ious = np.array([v for v, r in zip(row["ious"], row["inscribed"], strict=True) if r >= radius])
    return {
        "n_objects": len(ious),
        "iou_mean": float(ious.mean()) if len(ious) else float("nan"),
        "frac_iou_ge_0.5": float((ious >= 0.5).mean()) if len(ious) else float("nan"),
    }


def _in_pieces(plane: np.ndarray, ids: list[int], share: float = 0.9) -> int:
    """How many objects are in pieces on the clicked slice: no piece holds ``share`` of them.

    A cell cut at a grazing angle, or labelled in fragments there: one click starts one piece.
    """
    n = 0
    for i in ids:
        obj = plane == i
        parts, count = ndimage.label(obj)
        if count > 1 and np.bincount(parts.ravel())[1:].max() < share * obj.sum():
            n += 1
    return n


def _copied_start(labels: np.ndarray, z: int, ids: list[int]) -> dict:
    """Reference: each object's true start mask copied unchanged onto every slice."""
    ious = np.array(
        [foreground_iou(np.broadcast_to(labels[z] == i, labels.shape), labels == i) for i in ids]
    )
    return {"iou_mean": float(ious.mean()), "frac_iou_ge_0.5": float((ious >= 0.5).mean())}


def _follow_once(predictor, name, image, labels, z, k, given_start) -> dict:
    t0 = time.perf_counter()
    ids = pick_objects(labels[z], k, min_area=100)
    res = evaluate_following(predictor, image, labels, ids, start=z, given_start=given_start)
    row = {
        "data": name + (", true mask on the start slice" if given_start else ""),
        "start": z,
        "follower": predictor.follower is not None,
        "snap": predictor.follow_params.snap,
        "look": predictor.follow_params.look,
        **summarise_following(res),
        "ious": [r.iou for r in res],
        "seconds": time.perf_counter() - t0,
    }
    print({k: v for k, v in row.items() if k != "ious"}, flush=True)
    return row


def write(rows: list[dict], follow: list[dict], out: Path, max_clicks: int) -> None:
    """Write the tables, the JSON and the plot."""
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Object tasks (simulated annotator, held-out images)",
        "",
        f"Click refiner: {'yes' if rows and rows[0]['refiner'] else 'no (selection only)'}; "
        "corrections drawn by "
        f"{'a refiner of their own' if rows and rows[0].get('corrector') else 'the same'}.",
        f"Follower: {'yes' if follow and follow[0]['follower'] else 'no (the last mask)'}; "
        f"snapped to edges: {'yes' if follow and follow[0].get('snap') else 'no'}; "
        f"ends by the objects' look: {'yes' if follow and follow[0].get('look') else 'no'}.",
        "",
        "| data set | objects | IoU@1 | IoU@3 | IoU@5 | NoC@85 | NoC@90 | ms per click |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ms = f"{r['click_ms']:.0f}" if "click_ms" in r else "-"
        lines.append(
            f"| {r['data']} | {r['n_objects']} | {r['iou@1']:.3f} | {r['iou@3']:.3f} | "
            f"{r['iou@5']:.3f} | {r['noc@85']:.2f} | {r['noc@90']:.2f} | {ms} |"
        )
    lines += [
        "",
        f"NoC: clicks to reach the IoU, {max_clicks} when never reached. ms per click: the "
        "median time of the segmentation after a click (guide, probability, selection and "
        "refiner on the whole image), on the machine that ran it.",
        "",
        "| followed through z | objects | 3D IoU mean | share at IoU >= 0.5 | "
        "3D IoU from the true start mask | share at IoU >= 0.5 | true start mask copied | "
        "in pieces on the clicked slice | objects a user would click: how many, 3D IoU mean, "
        "share at IoU >= 0.5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in follow:
        g, c, k = r["given_start"], r["copied_start"], clickable(r)
        lines.append(
            f"| {r['data']} (click on slice {r['start']}) | {int(r['n_objects'])} | "
            f"{r['iou_mean']:.3f} | {r['frac_iou_ge_0.5']:.0%} | {g['iou_mean']:.3f} | "
            f"{g['frac_iou_ge_0.5']:.0%} | {c['iou_mean']:.3f} ({c['frac_iou_ge_0.5']:.0%}) | "
            f"{r.get('in_pieces', '-')} | "
            + (
                "-"
                if k is None
                else f"{k['n_objects']}, {k['iou_mean']:.3f}, {k['frac_iou_ge_0.5']:.0%}"
            )
            + " |"
        )
    lines += [
        "",
        "From the true start mask: each object's true mask on the clicked slice is given (as "
        "a mask painted by hand), which scores the following alone. Copied: that mask put "
        "unchanged on every slice of the stack, a reference that no following should fall "
        "below where objects move little. In pieces: objects of which no connected piece holds "
        "90% on the clicked slice (a cell cut at a grazing angle, or labelled in fragments "
        "there); one click starts one piece of them. Objects a user would click: those "
        f"with a disc of radius {CLICKABLE_RADIUS:g} px inside them on the clicked slice, of the "
        "same run (the others are slivers of cells cut along their walls); the columns before "
        "score every object drawn.",
    ]
    (out / "objects.md").write_text("\n".join(lines) + "\n")
    (out / "objects.json").write_text(json.dumps({"clicks": rows, "follow": follow}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for r in rows:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", ms=3, label=r["data"])
    ax.axhline(0.85, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("clicks")
    ax.set_ylabel("mean IoU")
    ax.set_ylim(0, 1)
    if rows:  # following only (--skip-clicks): no curve to name
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "objects.png", dpi=120)


def _predictor(args: argparse.Namespace) -> RevolverPredictor:
    """The predictor the command line asks for: its weights, refiners and following."""
    predictor = RevolverPredictor(args.weights, device="cpu")
    if args.refiner:
        predictor.refiner = load_refiner(args.refiner, predictor.weights.sha256)
    if args.no_refiner:
        predictor.refiner = None
    if args.corrector:
        predictor.corrector = load_refiner(args.corrector, predictor.weights.sha256, role="clicks")
    if args.no_corrector:
        predictor.corrector = None
    if args.follower:
        predictor.follower = load_refiner(args.follower, predictor.weights.sha256)
    if args.no_follower:
        predictor.follower = None
    if args.no_snap:
        predictor.follow_params = replace(predictor.follow_params, snap=None)
    if args.no_look:
        predictor.follow_params = replace(predictor.follow_params, look=None)
    return predictor


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    ap.add_argument("--images", type=int, default=4, help="images per 2D data set")
    ap.add_argument("--objects", type=int, default=10, help="objects per image")
    ap.add_argument("--weights", default=None, help="weights file (default: shipped)")
    ap.add_argument(
        "--no-refiner", action="store_true", help="select objects without the click refiner"
    )
    ap.add_argument("--refiner", default=None, help="click refiner file (default: the weights')")
    ap.add_argument(
        "--no-corrector",
        action="store_true",
        help="the click refiner draws corrections too (not the weights' corrections refiner)",
    )
    ap.add_argument(
        "--corrector", default=None, help="corrections refiner file (default: the weights')"
    )
    ap.add_argument(
        "--no-follower", action="store_true", help="follow objects without the follower"
    )
    ap.add_argument("--follower", default=None, help="follower file (default: the weights')")
    ap.add_argument(
        "--no-snap", action="store_true", help="followed masks not snapped to the image's edges"
    )
    ap.add_argument(
        "--no-look",
        action="store_true",
        help="the watershed's region says where followed objects end (not the follower's mask "
        "and their look)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        help="write the tables of these objects.json files together (to --out-dir); run nothing",
    )
    ap.add_argument("--skip-clicks", action="store_true", help="score following only")
    ap.add_argument("--sets", default=None, help="comma-separated click data sets (default all)")
    ap.add_argument("--skip-follow", action="store_true", help="score clicks only")
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--follow", type=int, default=20, help="objects followed per 3D data set")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.merge:
        if args.out_dir is None:
            ap.error("--merge needs --out-dir")
        parts = [json.loads(f.read_text()) for f in args.merge]
        order = ["dsb2018_u2os", "usiigaci_phase", "miccai2015_he", "isbi2012_em"]
        rows = sorted(
            (r for part in parts for r in part["clicks"]),
            key=lambda r: order.index(r["data"]) if r["data"] in order else len(order),
        )
        write(rows, [r for part in parts for r in part["follow"]], args.out_dir, args.max_clicks)
        return
    predictor = _predictor(args)
    print(f"click refiner: {'none' if predictor.refiner is None else 'yes'}", flush=True)
    print(f"corrections refiner: {'none' if predictor.corrector is None else 'yes'}", flush=True)
    print(f"follower: {'none' if predictor.follower is None else 'yes'}", flush=True)
    follow = [] if args.skip_follow else follow_rows(predictor, args.data, args.follow)
    rows = [] if args.skip_clicks else click_rows(predictor, args.data, args)
    if args.out_dir is not None:
        write(rows, follow, args.out_dir, args.max_clicks)


if __name__ == "__main__":
    main()
