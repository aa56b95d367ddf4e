"""Does the click fit ever hurt? Class tasks on procedural scenes, with and without it.

Each seed draws a scene of the procedural generator (fluorescence, phase, EM- or tissue-like;
1-3 object classes, sometimes membranes), 8 planes of 256 x 256. Every class (and the membrane
network) covering 1-90% of plane 0 is a task: P positive and P negative clicks drawn at random
on plane 0, planes 4-7 scored by foreground IoU. The network alone (``guide``) is compared with
what the CLI and the plugin do (``guide(fit=True)``: a pixel fit of the clicks replaces the
network where the clicks show that it helps; see ``core/pixel_fit.py``).

The seeds start at 10 000 000, far from the generator's training draws; none of it needs data
files.

    python benchmarks/click_fit_scenes.py --seeds 0:120 [--points 5,20] [--weights W]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

#: Seeds of the scenes are offset by this much from the ones given.
SEED_OFFSET = 10_000_000
SHAPE = (8, 256, 256)
QUERIES = (4, 5, 6, 7)


@dataclass(frozen=True)
class Row:
    """One task at one budget."""

    seed: int
    value: int  # the class's value in the scene's semantic labels
    membrane: bool
    points: int
    network: float  # mean query IoU of the network alone
    gated: float  # ... with the click fit deciding
    fitted: bool  # whether the fit replaced the network


def scene(seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Image ``(Z, Y, X)`` float32, semantic labels, and the membrane's value (0: none)."""
    from napari_revolver.core import synthetic as S

    rng = np.random.default_rng(SEED_OFFSET + seed)
    style = S.random_style(rng)
    vol = S.render_volume(S.make_scene(rng, style, SHAPE))
    membrane = len(style.classes) + 1 if style.membrane is not None else 0
    return vol.image.astype(np.float32), vol.semantic, membrane


def _score(predictor, task, fg: np.ndarray) -> float:
    """Mean foreground IoU of ``task`` on the query planes."""
    from napari_revolver.core.evaluate import foreground_iou

    return float(
        np.mean([foreground_iou(predictor.predict_slice(q, task), fg[q]) for q in QUERIES])
    )


def run(predictor, seeds: range, points: list[int]) -> list[Row]:
    """Score every task of every scene at every budget."""
    from napari_revolver.core.evaluate import _draw_support_points

    rows = []
    for seed in seeds:
        image, semantic, membrane = scene(seed)
        predictor.set_volume(image)
        for value in range(1, int(semantic.max()) + 1):
            fg = semantic == value
            share = fg[0].mean()
            if not 0.01 <= share <= 0.9 or not fg[list(QUERIES)].any():
                continue
            for p in points:
                yx, lab = _draw_support_points(fg, (0,), [p], 1)[(p, 0)][0]
                pts = np.c_[np.zeros(len(yx)), yx]
                plain = predictor.guide(pts, lab)
                gated = predictor.guide(pts, lab, fit=True)
                fitted = gated.pixel_fit is not None and gated.pixel_fit.active

                net = _score(predictor, plain, fg)
                rows.append(
                    Row(
                        seed,
                        value,
                        value == membrane,
                        p,
                        net,
                        _score(predictor, gated, fg) if fitted else net,
                        fitted,
                    )
                )
    return rows


def summary(rows: list[Row], points: list[int]) -> str:
    """One line per budget: tasks, how often the fit took over, means, worst and best change."""
    lines = []
    for p in points:
        rs = [r for r in rows if r.points == p]
        if not rs:
            continue
        change = np.array([r.gated - r.network for r in rs])
        lines.append(
            f"{p:>2d} + {p:<2d}: {len(rs)} tasks, fit used in {sum(r.fitted for r in rs)}; "
            f"mean IoU {np.mean([r.network for r in rs]):.3f} -> "
            f"{np.mean([r.gated for r in rs]):.3f}; worst change {change.min():+.3f}, "
            f"best {change.max():+.3f}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seeds", default="0:40", help="START:STOP of the scene seeds")
    ap.add_argument("--points", default="5,20", help="clicks per class, comma separated")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from napari_revolver import RevolverPredictor

    torch.set_num_threads(max(1, torch.get_num_threads()))
    start, stop = (int(v) for v in args.seeds.split(":"))
    points = [int(p) for p in args.points.split(",")]
    predictor = RevolverPredictor(args.weights, args.device)
    t = time.perf_counter()
    rows = run(predictor, range(start, stop), points)
    for r in rows:
        if r.fitted:
            what = "membrane" if r.membrane else f"class {r.value}"
            print(
                f"seed {r.seed} {what}, {r.points} + {r.points}: fit used, "
                f"{r.network:.3f} -> {r.gated:.3f}"
            )
    print(summary(rows, points))
    print(f"({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
