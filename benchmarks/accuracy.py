"""Accuracy curves on the labelled data sets of a MANIFEST (the ``revolver eval`` protocol).

For every data set, its suggested task is scored on its held-out split: the last 25% of the
planes or images (training never sees them), or every image but the first four for a data set
held out whole. The queries are fixed, and so are the four candidate support slices just before
them (for a z-stack, the neighbouring planes; for a collection, other images of the same kind).
With k = 1, 2 or 4 support slices the candidates are split into 4 / k disjoint runs of k
consecutive slices, each run is scored, and the results are averaged: every candidate is used
once for every k, so more support slices are compared with fewer on the same annotations and the
same queries, not against one lucky or unlucky slice. P positive and P negative points are
drawn at random from each support slice's foreground and background (P = 1, 2, 5, 10, 20), or the
whole support mask guides the network (dense). The random forest gets the same points.

On z-stacks the network is scored twice: as on any collection, and with the clicks acting by
position on the other planes too (``--local``, the recommended mode for one stack). Every data
set is read with the default settings: dark objects on a light background (H&E, EM organelles)
must be recognised from the clicks. ``--use-invert`` reads the data sets marked as dark-on-light
with ``invert=True`` instead (the protocol of weights trained before polarity augmentation); the
forest always gets the original image (its filters do not care about the sign).

``vnc_sstem_organelles`` (mitochondria, labels == 3) is non-commercial and never trained on: it
is scored on 512 x 512 centre crops, every plane held out.

    python benchmarks/accuracy.py DATA_DIR [--weights W] [--points 1,2,5,10,20,dense]
        [--supports 1,2,4] [--seeds 3] [--datasets a,b] [--nearest-only] [--no-rf]
        [--use-invert] [--scale S] [--no-pixel-fit] [--out-dir docs/benchmarks]

Writes ``accuracy.md`` (tables), ``accuracy.json`` (every row) and ``accuracy.png`` (IoU vs
points, one line per method and support count) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Spec:
    """A data set's suggested task (from its MANIFEST entry)."""

    label_value: int | None  # None: labels > 0
    held_out_whole: bool  # not used in training at all
    volumetric: bool  # consecutive planes are neighbours in z or time
    task: str
    invert: bool = False  # dark objects on a light background (read so with --use-invert)
    crop: int | None = None  # centre crop of this size (large planes, to bound the time)
    follows: bool = False  # one object through z: its summary row uses positions (+local)


DATASETS = {
    "dsb2018_u2os": Spec(None, False, False, "nuclei (labels > 0)"),
    "usiigaci_phase": Spec(None, False, False, "whole cells (labels > 0)"),
    "isbi2012_em": Spec(0, False, True, "membranes (labels == 0)"),
    "plant_cells_3d": Spec(7414, False, True, "one cell (id 7414) through z", follows=True),
    "miccai2015_he": Spec(None, True, False, "nuclei (labels > 0), RGB, centre crops", True),
    # A class task on a z-stack, scored as on a collection (no positions through z).
    "vnc_sstem_organelles": Spec(
        3, True, False, "mitochondria (labels == 3), EM, 512 px crops", True, crop=512
    ),
}
MAX_SUPPORT = 4


def load(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Image and labels of one data set; images of different sizes are centre-cropped."""
    import tifffile

    d = root / name
    if (d / "image.tif").exists():
        return tifffile.imread(d / "image.tif"), tifffile.imread(d / "labels.tif")
    files = sorted((d / "images").glob("*.tif"))
    if not files:
        raise FileNotFoundError(f"{d} has neither image.tif nor images/*.tif")
    imgs = [tifffile.imread(f) for f in files]
    labs = [tifffile.imread(d / "masks" / f.name) for f in files]
    h = min(i.shape[0] for i in imgs)
    w = min(i.shape[1] for i in imgs)

    def crop(a: np.ndarray) -> np.ndarray:
        y0, x0 = (a.shape[0] - h) // 2, (a.shape[1] - w) // 2
        return a[y0 : y0 + h, x0 : x0 + w]

    return np.stack([crop(i) for i in imgs]), np.stack([crop(m) for m in labs])


def split(n: int, spec: Spec) -> tuple[int, list[int]]:
    """First slice of the evaluated range and the query slices within it.

    The range holds ``MAX_SUPPORT`` support candidates followed by the queries; with the
    training split's rule (``load_labelled_stacks``: the last ``round(n / 4)`` slices are
    held out).
    """
    if spec.held_out_whole:
        start, first_query = 0, MAX_SUPPORT
    else:
        first_query = n - max(1, int(round(n * 0.25)))
        start = first_query - MAX_SUPPORT
    if start < 0 or first_query >= n:
        raise ValueError(f"{n} slices are too few for {MAX_SUPPORT} supports and a query")
    return start, list(range(first_query - start, n - start))


def support_groups(first_query: int, k: int, nearest_only: bool = False) -> list[list[int]]:
    """The support sets scored for ``k`` support slices.

    The ``MAX_SUPPORT`` slices just before the queries are split into ``MAX_SUPPORT // k``
    disjoint runs of ``k`` consecutive slices, so every candidate slice is used exactly once for
    each ``k`` and a result is not the luck of one slice. ``nearest_only``: only the run that ends
    next to the queries.
    """
    if k < 1 or MAX_SUPPORT % k:
        raise ValueError(f"support slices must divide {MAX_SUPPORT}; got {k}")
    first = first_query - MAX_SUPPORT
    groups = [list(range(first + g * k, first + (g + 1) * k)) for g in range(MAX_SUPPORT // k)]
    return groups[-1:] if nearest_only else groups


def pooled(means: list[float], stds: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over groups of seeds (within plus between variance)."""
    m = float(np.mean(means))
    return m, float(np.sqrt(np.mean(np.square(stds)) + np.var(means)))


def run(args: argparse.Namespace) -> list[dict]:
    from napari_revolver import RevolverPredictor
    from napari_revolver.core.evaluate import evaluate_few_shot

    predictor = RevolverPredictor(args.weights, args.device)
    points = [p if p == "dense" else int(p) for p in args.points.split(",")]
    supports = [int(k) for k in args.supports.split(",")]
    rows: list[dict] = []
    for name in args.datasets.split(","):
        spec = DATASETS[name]
        image, labels = load(args.data, name)
        if spec.crop:
            y0 = max(0, (image.shape[1] - spec.crop) // 2)
            x0 = max(0, (image.shape[2] - spec.crop) // 2)
            image = image[:, y0 : y0 + spec.crop, x0 : x0 + spec.crop]
            labels = labels[:, y0 : y0 + spec.crop, x0 : x0 + spec.crop]
        start, queries = split(len(image), spec)
        image, labels = image[start:], labels[start:]
        for k in supports:
            groups = support_groups(queries[0], k, args.nearest_only)
            modes = [False, True] if spec.volumetric else [False]
            for local in modes:
                t = time.perf_counter()
                per_group = [
                    evaluate_few_shot(
                        predictor,
                        image,
                        labels,
                        support=support,
                        queries=queries,
                        points=points,
                        seeds=args.seeds,
                        label_value=spec.label_value,
                        baselines=() if (args.no_rf or local) else ("rf",),
                        local=local,
                        invert=spec.invert and args.use_invert,
                        scale=args.scale,
                        pixel_fit=not args.no_pixel_fit,
                    )
                    for support in groups
                ]
                print(
                    f"{name}: {k} support(s) x {len(groups)} group(s), {len(queries)} queries"
                    f"{', local' if local else ''}: {time.perf_counter() - t:.0f} s",
                    file=sys.stderr,
                )
                for results in zip(*per_group, strict=True):
                    r = results[0]
                    method = r.method
                    if local and method in ("revolver", "dense"):
                        method += "+local"
                    mean, std = pooled([x.iou_mean for x in results], [x.iou_std for x in results])
                    rows.append(
                        {
                            "dataset": name,
                            "task": spec.task,
                            "supports": k,
                            "scale": args.scale,
                            "method": method,
                            "points": r.points,
                            "iou_mean": mean,
                            "iou_std": std,
                            "seconds_per_slice": float(
                                np.mean([x.seconds_per_slice for x in results])
                            ),
                            "n_queries": r.n_queries,
                            "seeds": r.seeds,
                            # Tasks (seeds x groups) that chose a pixel fit over the network.
                            "fits_used": None
                            if r.fits_used is None
                            else sum(x.fits_used or 0 for x in results),
                            "groups": [
                                {
                                    "support_slices": [start + s for s in x.support],
                                    "iou_mean": x.iou_mean,
                                    "iou_std": x.iou_std,
                                }
                                for x in results
                            ],
                        }
                    )
                    print(
                        f"  {method:15s} P={r.points:5s} IoU {mean:.3f} ± {std:.3f} ("
                        + ", ".join(f"{x.iou_mean:.3f}" for x in results)
                        + f"; {1000 * rows[-1]['seconds_per_slice']:.0f} ms/slice"
                        + (
                            ""
                            if rows[-1]["fits_used"] is None
                            else f"; fit in {rows[-1]['fits_used']} of {r.seeds * len(results)}"
                        )
                        + ")",
                        file=sys.stderr,
                    )
    return rows


def _find(rows: list[dict], dataset: str, method: str, points: str, k: int = 1) -> dict | None:
    for r in rows:
        if (r["dataset"], r["method"], r["points"], r["supports"]) == (dataset, method, points, k):
            return r
    return None


def _get(rows: list[dict], dataset: str, method: str, points: str, k: int = 1) -> float | None:
    r = _find(rows, dataset, method, points, k)
    return None if r is None else r["iou_mean"]


def recommended(dataset: str, dense: bool = False) -> str:
    """The network's row for a data set in its documented mode.

    Clicks act by position on other slices (``--local``) only for a task that follows one
    object through z; a class task (all membranes of an EM stack) is read without, as
    ``docs/usage-napari.md`` says. Both rows are scored on z-stacks.
    """
    base = "dense" if dense else "revolver"
    return base + ("+local" if DATASETS[dataset].follows else "")


#: The support budgets of the growth table.
POINTS = ("1", "5", "20", "dense")


def growth(rows: list[dict]) -> str:
    """Network and forest at 1+1, 5+5, 20+20 and dense support (one support slice).

    ``grows`` says whether the network's IoU never drops as the support grows, allowing for
    the seed spread (a drop smaller than the larger of the two standard deviations counts as
    no drop).
    """
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        "| data set | network 1 / 5 / 20 / dense | grows | RF 1 / 5 / 20 / dense "
        "| 5+5 vs RF | dense vs RF dense |",
        "|---|---|:-:|---|---:|---:|",
    ]

    for n in names:
        net = [_find(rows, n, recommended(n, dense=p == "dense"), p) for p in POINTS]
        rf = [_find(rows, n, "rf", p) for p in POINTS]
        if any(r is None for r in net):
            continue
        ok = all(
            b["iou_mean"] >= a["iou_mean"] - max(a["iou_std"], b["iou_std"])
            for a, b in zip(net, net[1:], strict=False)
        )

        def fmt(rs: list[dict | None]) -> str:
            return " / ".join("n/a" if r is None else f"{r['iou_mean']:.2f}" for r in rs)

        d5 = "n/a" if rf[1] is None else f"{net[1]['iou_mean'] - rf[1]['iou_mean']:+.3f}"
        dd = "n/a" if rf[3] is None else f"{net[3]['iou_mean'] - rf[3]['iou_mean']:+.3f}"
        lines.append(f"| {n} | {fmt(net)} | {'yes' if ok else 'no'} | {fmt(rf)} | {d5} | {dd} |")
    return "\n".join(lines)


def summary(rows: list[dict]) -> str:
    """The acceptance numbers, from the rows."""
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = [
        growth(rows),
        "",
        "| data set | network, 5+5 | RF, 5+5 | difference | 1+1 / dense | 5+5 / dense |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    diffs, r1s, r5s = [], [], []
    for n in names:
        net5 = _get(rows, n, recommended(n), "5")
        rf5 = _get(rows, n, "rf", "5")
        net1 = _get(rows, n, recommended(n), "1")
        dense = _get(rows, n, recommended(n, dense=True), "dense")
        if None in (net5, rf5, net1, dense):
            continue
        diffs.append(net5 - rf5)
        r1s.append(net1 / dense if dense else float("nan"))
        r5s.append(net5 / dense if dense else float("nan"))
        lines.append(
            f"| {n} | {net5:.3f} | {rf5:.3f} | {net5 - rf5:+.3f} | {r1s[-1]:.0%} | {r5s[-1]:.0%} |"
        )
    if diffs:
        lines.append(
            f"| **mean** | | | **{np.mean(diffs):+.3f}** | **{np.nanmean(r1s):.0%}** | "
            f"**{np.nanmean(r5s):.0%}** |"
        )
    ks = sorted({r["supports"] for r in rows})
    if len(ks) > 1:
        lines += ["", "| support slices | " + " | ".join(str(k) for k in ks) + " |"]
        lines.append("|---|" + "---:|" * len(ks))
        for p in ("1", "5", "dense"):
            means = []
            for k in ks:
                vals = [_get(rows, n, recommended(n, dense=p == "dense"), p, k) for n in names]
                vals = [v for v in vals if v is not None]
                means.append(f"{np.mean(vals):.3f}" if vals else "n/a")
            label = "dense" if p == "dense" else f"{p}+{p} points"
            lines.append(f"| network, {label}, mean over data sets | " + " | ".join(means) + " |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = [
        "| data set | task | supports | method | points (+/-) | IoU mean | IoU std | ms / slice |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['task']} | {r['supports']} | {r['method']} | {r['points']} | "
            f"{r['iou_mean']:.3f} | {r['iou_std']:.3f} | {1000 * r['seconds_per_slice']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["dataset"] for r in rows))
    budgets = list(dict.fromkeys(r["points"] for r in rows if r["points"] != "dense"))
    xs = {p: i for i, p in enumerate([*budgets, "dense"])}
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.4), squeeze=False)
    colours = {"revolver": "tab:blue", "revolver+local": "tab:green", "rf": "tab:orange"}
    dense_of = {"revolver": "dense", "revolver+local": "dense+local"}
    styles = {1: "-", 2: "--", 4: ":"}
    for ax, name in zip(axes[0], names, strict=True):
        for method, colour in colours.items():
            for k, style in styles.items():
                pts = [
                    (xs[r["points"]], r["iou_mean"])
                    for r in rows
                    if (r["dataset"], r["method"], r["supports"]) == (name, method, k)
                ]
                dense = _get(rows, name, dense_of.get(method, ""), "dense", k)
                if dense is not None:
                    pts.append((xs["dense"], dense))
                if not pts:
                    continue
                x, y = zip(*sorted(pts), strict=True)
                ax.plot(x, y, style, color=colour, marker="o", ms=3, label=f"{method}, {k} sup.")
        ax.set_title(f"{name}\n{DATASETS[name].task}", fontsize=8)
        ax.set_xticks(list(xs.values()), list(xs), fontsize=7)
        ax.set_xlabel("points per class per support slice", fontsize=7)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("foreground IoU (mean over seeds)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    for ax in axes[0]:
        h, lab = ax.get_legend_handles_labels()
        if len(h) > len(handles):
            handles, labels = h, lab
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path, nargs="?", help="folder of data sets (not with --rows)")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--points", default="1,2,5,10,20,dense")
    ap.add_argument("--supports", default="1,2,4")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--datasets", default=",".join(DATASETS))
    ap.add_argument("--no-rf", action="store_true")
    ap.add_argument(
        "--use-invert",
        action="store_true",
        help="read dark-on-light data sets with invert=True (default: as given)",
    )
    ap.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="resize every data set's slices by this factor before the network (the forest "
        "reads them as given; scores in the data's pixels)",
    )
    ap.add_argument(
        "--no-pixel-fit",
        action="store_true",
        help="the network alone: tasks do not decide on a pixel fit of their support",
    )
    ap.add_argument(
        "--nearest-only",
        action="store_true",
        help="score only the support slice(s) next to the queries, not every disjoint group",
    )
    ap.add_argument("--out-dir", type=Path, default=None, help="write accuracy.md/.json/.png")
    ap.add_argument(
        "--rows",
        type=Path,
        nargs="+",
        default=None,
        help="render the tables and plot from earlier runs' accuracy.json files (e.g. data sets "
        "run in parallel) instead of running",
    )
    args = ap.parse_args()
    if args.rows:
        rows = [r for f in args.rows for r in json.loads(f.read_text())["rows"]]
    elif args.data is None:
        ap.error("give the data folder, or --rows")
    else:
        rows = run(args)
    text = summary(rows) + "\n\n" + table(rows)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "accuracy.md").write_text(text + "\n")
        (args.out_dir / "accuracy.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        plot(rows, args.out_dir / "accuracy.png")


if __name__ == "__main__":
    main()
