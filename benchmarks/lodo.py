"""Leave one data set out: what the weights owe to having trained on each data set.

Each run folder (``revolver train --out RUN``) names the data sets it trained on in its
``config.json``. Every run's ``best.safetensors`` is scored with the protocol of
``benchmarks/accuracy.py`` (held-out queries, one support slice, P + P clicks or the dense
mask, the network in each data set's documented mode) on every data set given. A run that
never trained on a data set is that set's leave-one-out result; the table sets it beside the
runs that did train on it, at the same training budget.

    python benchmarks/lodo.py DATA_DIR RUN [RUN ...] [--datasets a,b] [--points 5,dense]
        [--seeds 2] [--rows lodo.json ...] [--out-dir DIR]

``--rows`` adds the rows of earlier runs of this script (their ``lodo.json``), so runs scored
separately, as their training finished, end up in one table.

Writes ``lodo.md`` (the table) and ``lodo.json`` (every row) to ``--out-dir``. The runs should
differ only in their data sets (same steps, crop and seed), so that the difference is what a
data set teaches; ``docs/benchmarks.md`` gives the commands of the published runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import accuracy


def trained_on(run: Path) -> list[str]:
    """The data sets a run trained on (its ``config.json``; none for procedural only)."""
    config = run / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{run} is not a training run: it has no config.json")
    cfg = json.loads(config.read_text())
    if not cfg.get("data"):
        return []
    return list(cfg.get("datasets") or [])


def weights_of(run: Path) -> Path:
    """The run's best weights."""
    w = run / "best.safetensors"
    if not w.exists():
        raise FileNotFoundError(f"{run} has no best.safetensors yet: let it reach a validation")
    return w


def score(args: argparse.Namespace, run: Path) -> list[dict]:
    """The accuracy rows of one run's weights on ``args.datasets`` (network rows only)."""
    ns = argparse.Namespace(
        data=args.data,
        weights=str(weights_of(run)),
        device=args.device,
        points=args.points,
        supports="1",
        datasets=args.datasets,
        nearest_only=False,
        seeds=args.seeds,
        no_rf=True,
        use_invert=False,
        scale=1.0,
        no_pixel_fit=False,
    )
    seen = set(trained_on(run))
    rows = []
    for r in accuracy.run(ns):
        if r["method"] != accuracy.recommended(r["dataset"], dense=r["points"] == "dense"):
            continue
        rows.append({**r, "run": run.name, "seen": r["dataset"] in seen})
    return rows


def table(rows: list[dict]) -> str:
    """One line per data set and budget: each run's IoU (``*``: never trained on it)."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    names = list(dict.fromkeys(r["dataset"] for r in rows))
    budgets = list(dict.fromkeys(r["points"] for r in rows))
    lines = [
        "| data set | points | "
        + " | ".join(runs)
        + " | trained on it | left out | left out - trained |",
        "|---|---|" + "---:|" * (len(runs) + 3),
    ]
    for n in names:
        for p in budgets:
            cells, seen, unseen = [], [], []
            for run in runs:
                r = next(
                    (x for x in rows if (x["run"], x["dataset"], x["points"]) == (run, n, p)), None
                )
                if r is None:
                    cells.append("n/a")
                    continue
                cells.append(f"{r['iou_mean']:.3f}" + ("" if r["seen"] else "*"))
                (seen if r["seen"] else unseen).append(r["iou_mean"])
            s = f"{np.mean(seen):.3f}" if seen else "n/a"
            u = f"{np.mean(unseen):.3f}" if unseen else "n/a"
            d = f"{np.mean(unseen) - np.mean(seen):+.3f}" if seen and unseen else "n/a"
            lines.append(f"| {n} | {p} | " + " | ".join(cells) + f" | {s} | {u} | {d} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path, help="folder of the data sets (with MANIFEST.md)")
    ap.add_argument("runs", type=Path, nargs="*", help="training run folders")
    ap.add_argument(
        "--datasets",
        default="isbi2012_em,plant_cells_3d,dsb2018_u2os,usiigaci_phase",
        help="data sets to score every run on",
    )
    ap.add_argument("--points", default="5,dense")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=Path, nargs="*", default=[], help="earlier lodo.json files")
    ap.add_argument("--out-dir", type=Path, default=Path("."))
    args = ap.parse_args()
    if not args.runs and not args.rows:
        raise SystemExit("give training run folders to score, or --rows of earlier scores")
    for name in args.datasets.split(","):
        if name not in accuracy.DATASETS:
            raise SystemExit(f"unknown data set {name!r}; known: {', '.join(accuracy.DATASETS)}")
    for run in args.runs:  # every run usable before the first (long) score
        trained_on(run), weights_of(run)
    rows = [r for f in args.rows for r in json.loads(f.read_text())]
    for run in args.runs:
        print(f"{run.name}: trained on {', '.join(trained_on(run)) or 'procedural data'}")
        rows += score(args, run)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "lodo.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    (args.out_dir / "lodo.md").write_text(
        "# Leave one data set out\n\n`*`: the run never trained on that data set.\n\n" + text + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
