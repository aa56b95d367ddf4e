"""The paper's baselines (Rakelly et al., sec. 5) next to the guided network, on real data.

* **guided**: the shipped weights guided by the points (what napari-revolver does); on z-stacks
  with the clicks also acting by position (``--local``), as in ``accuracy.py``.
* **fg-bg**: the same architecture trained with its guidance withheld (``revolver train
  --no-guidance``): it segments what is usually foreground and cannot follow the points, so its
  score is the same for every budget. It shows how much of the guided score comes from the
  points.
* **fine-tune**: the fg-bg network fine-tuned on the support slice (its encoder and head, Adam,
  ``--steps`` steps on the pixels under the points, or on the whole mask for dense), then applied
  to the queries. Its time includes the fine-tuning, and every query must be encoded again with
  the tuned encoder: nothing can be cached across clicks.

Protocol, queries and point draws are those of ``accuracy.py --nearest-only`` (one support
slice, the slice just before the held-out queries; P positive + P negative random points; seeds
0..N-1): fine-tuning costs seconds per task, so one support run, not four.

    python benchmarks/paper_baselines.py DATA_DIR --fgbg-weights RUN/best.safetensors
        [--weights W] [--datasets dsb2018_u2os,isbi2012_em] [--points 1,5,dense] [--seeds 3]
        [--steps 40] [--out docs/benchmarks/paper_baselines.md]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from napari_revolver.core.evaluate import foreground_iou

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASETS, Spec, load, split

#: One table row: data set, method, points, IoU mean, IoU std, set-up seconds, seconds / slice.
Row = tuple[str, str, str, float, float, float, float]


def trainable_model(path: str) -> torch.nn.Module:
    """A checkpoint as an unfused model with gradients (batch norms kept in eval mode)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from napari_revolver.core.model.guided_net import ModelConfig
    from napari_revolver.core.model.registry import build_from_config

    with safe_open(path, framework="pt") as f:
        config = ModelConfig.from_dict(json.loads(f.metadata()["config"]))
    model = build_from_config(config)
    model.load_state_dict(load_file(path))
    return model.eval()


def prepare(plane: np.ndarray) -> torch.Tensor:
    """``(1, 3, H', W')`` normalised, padded to a multiple of 32 as the predictor does."""
    from napari_revolver.core.preprocess import normalize_slice

    x = torch.from_numpy(normalize_slice(plane))[None]
    h, w = x.shape[-2:]
    ph, pw = -h % 32, -w % 32
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
    return x


def no_guidance(model: torch.nn.Module):
    from napari_revolver.core.model.guide import GuideOutput

    c = model.config
    return GuideOutput(
        torch.zeros(1, 2, c.coarse_channels), torch.zeros(1, 2, c.fine_channels), torch.zeros(1, 2)
    )


def logits_of(model: torch.nn.Module, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return model.segment(model.encode(x), no_guidance(model), size)[0]


def score(
    model: torch.nn.Module, image: np.ndarray, fg: np.ndarray, queries: list[int]
) -> tuple[float, float]:
    """Mean query IoU and seconds per query slice (encoder + head, nothing cached)."""
    t0 = time.perf_counter()
    ious = []
    with torch.no_grad():
        for k in queries:
            logit = logits_of(model, prepare(image[k]), fg.shape[1:])
            ious.append(foreground_iou(logit.numpy() > 0, fg[k]))
    return float(np.mean(ious)), (time.perf_counter() - t0) / len(queries)


def fine_tune(
    base: torch.nn.Module,
    plane: np.ndarray,
    yx: np.ndarray | None,
    labels: np.ndarray | None,
    mask: np.ndarray | None,
    steps: int,
    lr: float,
) -> torch.nn.Module:
    """A copy of ``base`` tuned on one support slice: points (``yx``, ``labels``) or ``mask``."""
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = prepare(plane)
    size = plane.shape[:2]
    if mask is not None:
        target = torch.from_numpy(mask.astype(np.float32))
        pos = float(target.mean())
        weight = torch.where(target > 0.5, 0.5 / max(pos, 1e-3), 0.5 / max(1 - pos, 1e-3))
    else:
        iy, ix = (
            torch.from_numpy(yx[:, 0].astype(np.int64)),
            torch.from_numpy(yx[:, 1].astype(np.int64)),
        )
        target_pts = torch.from_numpy(labels.astype(np.float32))
    for _ in range(steps):
        logit = logits_of(model, x, size)
        if mask is not None:
            loss = F.binary_cross_entropy_with_logits(logit, target, weight=weight)
        else:
            loss = F.binary_cross_entropy_with_logits(logit[iy, ix], target_pts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", type=Path)
    ap.add_argument("--fgbg-weights", required=True)
    ap.add_argument("--weights", default=None, help="guided network (default: shipped)")
    ap.add_argument("--datasets", default="dsb2018_u2os,isbi2012_em,plant_cells_3d")
    ap.add_argument("--points", default="1,5,dense")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps (default 40)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    return ap.parse_args()


def guided_rows(
    name: str,
    guided,
    image: np.ndarray,
    labels: np.ndarray,
    spec: Spec,
    support: int,
    queries: list[int],
    budgets: list[int | str],
    seeds: int,
) -> list[Row]:
    """The guided network through ``evaluate_few_shot`` (no set-up time: nothing is tuned)."""
    from napari_revolver.core.evaluate import evaluate_few_shot

    res = evaluate_few_shot(
        guided,
        image,
        labels,
        support=[support],
        queries=queries,
        points=budgets,
        seeds=seeds,
        label_value=spec.label_value,
        local=spec.volumetric,
        invert=spec.invert,
    )
    return [
        (name, "guided", r.points, r.iou_mean, r.iou_std, 0.0, r.seconds_per_slice) for r in res
    ]


def support_annotation(
    fg: np.ndarray, p: int | str, seed: int
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``(yx, labels, mask)`` of one fine-tuning task: points of budget ``p``, or the mask."""
    from napari_revolver.core.evaluate import sample_support_points

    if p == "dense":
        return None, None, fg
    rng = np.random.default_rng(seed)  # the same draws as evaluate_few_shot
    pos = sample_support_points(rng, fg, p)
    neg = sample_support_points(rng, ~fg, p)
    return np.concatenate([pos, neg]), np.array([1] * p + [0] * p), None


def fine_tune_row(
    name: str,
    fgbg: torch.nn.Module,
    image: np.ndarray,
    fg: np.ndarray,
    support: int,
    queries: list[int],
    p: int | str,
    args: argparse.Namespace,
) -> Row:
    """Fine-tune the fg-bg network per seed on budget ``p`` and score the queries."""
    ious, tune_s, slice_s = [], [], []
    for seed in range(1 if p == "dense" else args.seeds):
        yx, lab, mask = support_annotation(fg[support], p, seed)
        t0 = time.perf_counter()
        tuned = fine_tune(fgbg, image[support], yx, lab, mask, args.steps, args.lr)
        tune_s.append(time.perf_counter() - t0)
        v, sec = score(tuned, image, fg, queries)
        ious.append(v)
        slice_s.append(sec)
    return (
        name,
        "fine-tune",
        str(p),
        float(np.mean(ious)),
        float(np.std(ious)),
        float(np.mean(tune_s)),
        float(np.mean(slice_s)),
    )


def dataset_rows(
    name: str, args: argparse.Namespace, guided, fgbg: torch.nn.Module, budgets: list[int | str]
) -> list[Row]:
    """Every method's rows on one data set, its support slice the one before the queries."""
    spec = DATASETS[name]
    image, labels = load(args.data, name)
    start, queries = split(len(image), spec)
    image, labels = image[start:], labels[start:]
    s = queries[0] - 1
    fg = labels == spec.label_value if spec.label_value is not None else labels > 0
    rows = guided_rows(name, guided, image, labels, spec, s, queries, budgets, args.seeds)
    base_iou, base_sec = score(fgbg, image, fg, queries)
    rows += [(name, "fg-bg", str(p), base_iou, 0.0, 0.0, base_sec) for p in budgets]
    rows += [fine_tune_row(name, fgbg, image, fg, s, queries, p, args) for p in budgets]
    return rows


def print_rows(rows: list[Row]) -> None:
    for row in rows:
        print(
            f"{row[0]:16s} {row[1]:10s} P={row[2]:5s} IoU {row[3]:.3f} ± {row[4]:.3f}"
            f"  tune {row[5]:.1f} s  {1000 * row[6]:.0f} ms/slice",
            file=sys.stderr,
        )


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| data set | method | points (+/-) | IoU mean | IoU std | set-up per task (s) | "
        "ms / query slice |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, method, p, m, sd, tune, sec in rows:
        lines.append(
            f"| {name} | {method} | {p} | {m:.3f} | {sd:.3f} | {tune:.1f} | {1000 * sec:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from napari_revolver import RevolverPredictor

    guided = RevolverPredictor(args.weights, "cpu")
    fgbg = trainable_model(args.fgbg_weights)
    budgets = [p if p == "dense" else int(p) for p in args.points.split(",")]
    rows: list[Row] = []
    for name in args.datasets.split(","):
        new = dataset_rows(name, args, guided, fgbg, budgets)
        print_rows(new)
        rows += new
    table = markdown_table(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
