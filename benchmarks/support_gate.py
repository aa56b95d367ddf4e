"""Probe: can the support itself say when a per-task pixel fit beats the network?

On EM mitochondria the guided network stays below the random forest at every budget, while a
linear model fitted per task on the same cached features (the positives against the negatives,
under the click footprints) beats the forest (`task_fit_probe.py`). On nuclei, phase-contrast
cells and membranes the same fit is far below the network, and adding it to the network's
logits costs IoU there. This probe measures a rule that needs no training: fit on three
quadrants of each support slice, score on the fourth (the network guided by the same three
quadrants), and add the fit to the network only where it wins that cross-validation by a
margin.

For every data set of ``accuracy.py`` (its held-out queries, its four single-slice support
groups), ``P`` positive and ``P`` negative random points per support slice (``--seeds`` draws)
or the dense mask:

* ``net``: the guided network alone (what ``accuracy.py`` scores);
* ``fit``: weighted L2 logistic regression (``core.pixel_fit.logistic``) on the support
  slice's cached features (fine + upsampled coarse, standardised per slice), each click's
  footprint weighting its cells, the two classes weighing the same; its sign on the query;
* ``net+g*fit``: the network's logit plus ``g`` times the fit's (``--gains``);
* ``gated``: per task, the candidate with the best cross-validated score on the support (a
  weighted balanced accuracy on the held-out clicks' cells, or the IoU on the held-out quadrant
  of a dense mask), if it beats the network's by more than ``--margin``; the network otherwise.

    python benchmarks/support_gate.py DATA_DIR [--weights W] [--datasets a,b] [--points 5,20]
        [--seeds 2] [--gains 0.5,1,2] [--margin 0.05] [--out-dir D]

Prints one table; ``--out-dir`` also writes ``support_gate.md`` and ``support_gate.json``.
No timing: the rule costs four passes of the head on each support slice, which this probe does
not optimise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import accuracy as acc

from napari_revolver import RevolverPredictor
from napari_revolver.core.evaluate import foreground_iou, sample_support_points
from napari_revolver.core.model.guide import point_masks
from napari_revolver.core.pixel_fit import logistic
from napari_revolver.core.prior import dense_support


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def samples(masks: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Annotated cells ``(index, label, weight)`` of ``masks`` ``(2, n)`` where ``keep`` ``(n,)``.

    Each class's weights sum to half the number of samples (the classes weigh the same).
    """
    m = masks * keep[None]
    on = m.max(0) > 1e-3
    cells = np.flatnonzero(on)
    idx = np.concatenate([cells, cells])
    y = np.repeat([1.0, 0.0], len(cells))
    wt = np.concatenate([m[0, on], m[1, on]])
    sel = wt > 1e-6
    idx, y, wt = idx[sel], y[sel], wt[sel]
    for c in (0.0, 1.0):
        wt[y == c] /= max(wt[y == c].sum(), 1e-9)
    return idx, y, wt * len(wt) / 2


class Probe:
    """Scores of one data set (one :class:`accuracy.Spec`)."""

    def __init__(self, predictor: RevolverPredictor, image: np.ndarray, fg: np.ndarray) -> None:
        self.p, self.fg = predictor, fg
        predictor.set_volume(image)
        self.shape = fg.shape[1:]
        self._feats: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}

    def feats(self, k: int) -> tuple[np.ndarray, tuple[int, int]]:
        """``(h * w, D)`` per-cell features of slice ``k`` and the fine grid ``(h, w)``."""
        if k not in self._feats:
            f = self.p.features(k)
            up = F.interpolate(f.coarse.float(), size=f.fine.shape[-2:], mode="bilinear")
            x = torch.cat([f.fine.float(), up], 1)[0]
            self._feats[k] = (x.reshape(len(x), -1).T.numpy(), tuple(f.fine.shape[-2:]))
        return self._feats[k]

    def response(self, beta: np.ndarray, k: int, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """The fit's logit ``(H, W)`` on slice ``k``, upsampled from the fine grid."""
        x, (h, w) = self.feats(k)
        r = np.c_[(x - norm[0]) / norm[1], np.ones(len(x))] @ beta
        r = torch.from_numpy(r.reshape(h, w).astype(np.float32))[None, None]
        r = F.interpolate(r, scale_factor=self.p.model.fine_stride, mode="bilinear")[0, 0]
        return r[: self.shape[0], : self.shape[1]].numpy()

    def task(self, s: int, masks: np.ndarray):
        """A class task guided by fine-grid weights ``(2, h * w)`` on slice ``s``."""
        f = self.p.features(s)
        m = torch.from_numpy(masks.reshape(2, *f.fine.shape[-2:]).astype(np.float32))
        g = self.p.guide_features(f, m)
        return self.p._task(g, "probe", 1, np.zeros((0, 3)), np.zeros(0, np.int8))

    def run(
        self,
        s: int,
        masks: np.ndarray,
        dense: bool,
        queries: list[int],
        gains: list[float],
        lam: float,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Query IoU and cross-validated support score of every candidate, for one support.

        ``masks`` ``(2, h * w)``: the support's fine-grid weights; ``dense``: they annotate
        every cell (scored by IoU on the held-out quadrant, not on held-out clicks).
        """
        x, (h, w) = self.feats(s)
        norm = (x.mean(0), x.std(0) + 1e-3)
        xs = np.c_[(x - norm[0]) / norm[1], np.ones(len(x))]
        names = ["net", *[f"net+{g:g}*fit" for g in gains], "fit"]
        stride = self.p.model.fine_stride
        H, W = self.shape
        cy, cx = np.meshgrid(np.arange(h) * stride, np.arange(w) * stride, indexing="ij")
        quad = ((cy >= H // 2) * 2 + (cx >= W // 2)).ravel()
        yy, xx = np.mgrid[:H, :W]
        quad_px = (yy >= H // 2) * 2 + (xx >= W // 2)
        hits = {n: [0.0, 0.0] for n in names}

        def candidates(net_logit: np.ndarray, fit: np.ndarray) -> dict[str, np.ndarray]:
            out = {"net": net_logit, "fit": fit}
            out.update({f"net+{g:g}*fit": net_logit + g * fit for g in gains})
            return out

        for q in range(4):
            train = (quad != q).astype(np.float32)
            if min((masks[c] * train).sum() for c in (0, 1)) < 1e-3:
                continue
            if (masks * (1 - train)).sum() < 1e-3:
                continue
            idx, y, wt = samples(masks, train)
            beta = logistic(xs[idx], y, wt, lam)
            net = logit(self.p.predict_proba(s, self.task(s, masks * train[None]))[0])
            cands = candidates(net, self.response(beta, s, norm))
            if dense:
                held = quad_px == q
                for n, z in cands.items():
                    pred = z > 0
                    hits[n][0] += np.sum(pred & self.fg[s] & held)
                    hits[n][1] += np.sum((pred | self.fg[s]) & held)
            else:
                idx2, y2, wt2 = samples(masks, 1 - train)
                for n, z in cands.items():
                    pad = np.zeros((h * stride, w * stride), np.float32)
                    pad[:H, :W] = z
                    cell = pad.reshape(h, stride, w, stride).mean((1, 3)).ravel()[idx2]
                    hits[n][0] += np.sum(wt2 * ((cell > 0) == (y2 > 0)))
                    hits[n][1] += np.sum(wt2)
        cv = {n: (a / b if b else 0.0) for n, (a, b) in hits.items()}
        idx, y, wt = samples(masks, np.ones(h * w, np.float32))
        beta = logistic(xs[idx], y, wt, lam)
        task = self.task(s, masks)
        ious: dict[str, list[float]] = {n: [] for n in names}
        for k in queries:
            net = logit(self.p.predict_proba(k, task)[0])
            for n, z in candidates(net, self.response(beta, k, norm)).items():
                ious[n].append(foreground_iou(z > 0, self.fg[k]))
        return {n: float(np.mean(v)) for n, v in ious.items()}, cv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", type=Path)
    ap.add_argument("--weights", default=None, help="weights file (default: the shipped ones)")
    ap.add_argument("--datasets", default=",".join(acc.DATASETS))
    ap.add_argument("--points", default="5,20", help="points per class; dense is always scored")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--gains", default="0.5,1,2", help="weights g of the fit's logit")
    ap.add_argument("--margin", type=float, default=0.05, help="cross-validated lead needed")
    ap.add_argument("--lam", type=float, default=10.0, help="L2 strength of the fit")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    predictor = RevolverPredictor(args.weights, device="cpu")
    gains = [float(g) for g in args.gains.split(",")]
    budgets: list[int | str] = [int(p) for p in args.points.split(",")] + ["dense"]
    rows = []
    for name in args.datasets.split(","):
        spec = acc.DATASETS[name]
        image, labels = acc.load(args.data, name)
        if spec.crop:
            y0 = max(0, (image.shape[1] - spec.crop) // 2)
            x0 = max(0, (image.shape[2] - spec.crop) // 2)
            image = image[:, y0 : y0 + spec.crop, x0 : x0 + spec.crop]
            labels = labels[:, y0 : y0 + spec.crop, x0 : x0 + spec.crop]
        start, queries = acc.split(len(image), spec)
        image, labels = image[start:], labels[start:]
        fg = labels > 0 if spec.label_value is None else labels == spec.label_value
        probe = Probe(predictor, image, fg)
        t0 = time.perf_counter()
        for budget in budgets:
            per_task = []
            for (s,) in acc.support_groups(queries[0], 1):
                _, (h, w) = probe.feats(s)
                stride = predictor.model.fine_stride
                for seed in [0] if budget == "dense" else range(args.seeds):
                    if budget == "dense":
                        masks = dense_support(fg[s], (h, w), stride).reshape(2, -1).numpy()
                    else:
                        rng = np.random.default_rng(seed)
                        pts = np.concatenate(
                            [
                                sample_support_points(rng, fg[s], budget),
                                sample_support_points(rng, ~fg[s], budget),
                            ]
                        )
                        lab = np.repeat([1, 0], budget).astype(np.int8)
                        masks = point_masks(
                            torch.from_numpy(pts), torch.from_numpy(lab), (h, w), stride
                        )
                        masks = masks.reshape(2, -1).numpy()
                    dense = budget == "dense"
                    per_task.append(probe.run(s, masks, dense, queries, gains, args.lam))
            names = list(per_task[0][0])
            row = {n: float(np.mean([iou[n] for iou, _ in per_task])) for n in names}
            gated = []
            for iou, cv in per_task:
                best = max(names, key=lambda n: cv[n])
                gated.append(iou[best] if cv[best] - cv["net"] > args.margin else iou["net"])
            row["gated"] = float(np.mean(gated))
            rows.append({"dataset": name, "points": str(budget), "tasks": len(per_task), **row})
            print(
                f"{name} P={budget}: " + "  ".join(f"{n} {v:.3f}" for n, v in row.items()),
                file=sys.stderr,
            )
        print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    cols = [c for c in rows[0] if c not in ("dataset", "points", "tasks")]
    lines = [
        "| data set | points | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
        *(
            f"| {r['dataset']} | {r['points']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
            for r in rows
        ),
    ]
    text = "\n".join(lines)
    print(text)
    if args.out_dir:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "support_gate.md").write_text(text + "\n")
        (args.out_dir / "support_gate.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
