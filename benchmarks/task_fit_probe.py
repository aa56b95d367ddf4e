"""Probe: does a per-task ridge fit on cached features (and fixed filters) grow with support?

A closed-form ridge regression (as in R2-D2, Bertinetto et al. 2019) fitted per task on the
support's cached encoder features (fine + upsampled coarse, at stride 4), optionally with
scikit-image's multiscale filter responses (what the random forest sees), predicts the query
slices. No training: it measures whether the features carry a task model that improves with
more clicks, before such a fit is built into the segmentor and trained end to end.

    python benchmarks/task_fit_probe.py DATA_DIR [--datasets isbi2012_em,dsb2018_u2os] [--json]

Support: slice 0 with P positive and P negative random points (3 seeds) or the dense mask;
queries: the last 4 slices (512 x 512 crops of larger images). Foreground IoU, mean over queries.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from skimage.feature import multiscale_basic_features

from napari_revolver import RevolverPredictor
from napari_revolver.core.evaluate import foreground_iou

TASKS = {
    # data set: foreground of its labels
    "isbi2012_em": lambda lab: lab == 0,  # membranes
    "vnc_sstem_organelles": lambda lab: lab == 3,  # mitochondria (evaluation only)
    "dsb2018_u2os": lambda lab: lab > 0,
    "usiigaci_phase": lambda lab: lab > 0,
    "plant_cells_3d": lambda lab: lab == 7414,  # one cell
}


def grid_feats(pred, k, img, use_filters):
    f = pred.features(k)
    fine = f.fine[0].float()
    coarse = F.interpolate(f.coarse.float(), size=fine.shape[-2:], mode="bilinear")[0]
    parts = [fine, coarse]
    if use_filters:
        plane = img[k].astype(np.float32)
        plane = (plane - plane.mean()) / (plane.std() + 1e-6)
        fb = multiscale_basic_features(
            plane, intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16
        )
        fb = torch.from_numpy(fb).permute(2, 0, 1)[None]
        fb = F.avg_pool2d(fb, 4, ceil_mode=True)[0]
        h, w = fine.shape[-2:]
        pad = torch.zeros(fb.shape[0], h, w)
        pad[:, : fb.shape[1], : fb.shape[2]] = fb[:, :h, :w]
        parts.append(pad)
    X = torch.cat(parts).reshape(len(torch.cat(parts)), -1).T  # (hw, d)
    return X, fine.shape[-2:]


def ridge(X, y, w, lam=1.0):
    mu, sd = X.mean(0), X.std(0) + 1e-4
    Xn = (X - mu) / sd
    Xb = torch.cat([Xn, torch.ones(len(Xn), 1)], 1)
    A = Xb.T @ (Xb * w[:, None]) + lam * torch.eye(Xb.shape[1])
    beta = torch.linalg.solve(A, Xb.T @ (w * y))
    return lambda Z: torch.cat([(Z - mu) / sd, torch.ones(len(Z), 1)], 1) @ beta


def run(pred, data, name, P_list=(1, 5, 20, "dense"), n_q=4, use_filters=False):
    sel = TASKS[name]
    img = tifffile.imread(f"{data}/{name}/image.tif")
    lab = tifffile.imread(f"{data}/{name}/labels.tif")
    n = img.shape[0]
    if img.shape[1] > 600:
        img = img[:, :512, :512]
        lab = lab[:, :512, :512]
    pred.set_volume(img)
    s = 0
    qs = list(range(n - n_q, n))
    Xs, grid = grid_feats(pred, s, img, use_filters)
    gt_s = sel(lab[s])
    H, W = gt_s.shape
    # dense target on grid
    t = torch.from_numpy(gt_s.astype(np.float32))[None, None]
    hh, ww = grid
    tt = torch.zeros(1, 1, hh * 4, ww * 4)
    tt[..., :H, :W] = t
    valid = torch.zeros_like(tt)
    valid[..., :H, :W] = 1
    yd = F.avg_pool2d(tt, 4)[0, 0].reshape(-1)
    vd = F.avg_pool2d(valid, 4)[0, 0].reshape(-1)
    Qs = [grid_feats(pred, q, img, use_filters)[0] for q in qs]
    out = {}
    for P in P_list:
        ious = []
        for seed in range(3 if P != "dense" else 1):
            r = np.random.default_rng(seed)
            if P == "dense":
                y = torch.where(yd > 0.5, 1.0, -1.0)
                w = vd.clone()
            else:
                fg = np.argwhere(gt_s)
                bg = np.argwhere(~gt_s)
                pp = fg[r.choice(len(fg), P, replace=False)]
                nn_ = bg[r.choice(len(bg), P, replace=False)]
                y = torch.zeros(hh * ww)
                w = torch.zeros(hh * ww)
                for (yy, xx), lbl in [(p, 1.0) for p in pp] + [(p, -1.0) for p in nn_]:
                    idx = (yy // 4) * ww + (xx // 4)
                    y[idx] = lbl
                    w[idx] = 1.0
            f = ridge(Xs, y, w, lam=1.0 if P == "dense" else 10.0)
            per = []
            for q, Xq in zip(qs, Qs, strict=True):
                m = f(Xq).reshape(1, 1, hh, ww)
                m = F.interpolate(m, scale_factor=4, mode="bilinear")[0, 0, :H, :W] > 0
                per.append(foreground_iou(m.numpy(), sel(lab[q])))
            ious.append(np.mean(per))
        out[P] = float(np.mean(ious))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("data", help="folder of data sets (<name>/image.tif + labels.tif)")
    ap.add_argument("--datasets", default="isbi2012_em,vnc_sstem_organelles,dsb2018_u2os")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pred = RevolverPredictor(args.weights, device="cpu")
    rows = []
    for name in args.datasets.split(","):
        for filt in (False, True):
            t0 = time.time()
            res = run(pred, args.data, name, use_filters=filt)
            rows.append(
                {
                    "dataset": name,
                    "inputs": "features+filters" if filt else "features",
                    **{str(k): v for k, v in res.items()},
                    "seconds": time.time() - t0,
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| data set | ridge inputs | 1+1 | 5+5 | 20+20 | dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['inputs']} | "
            + " | ".join(f"{r[k]:.3f}" for k in ("1", "5", "20", "dense"))
            + " |"
        )


if __name__ == "__main__":
    main()
