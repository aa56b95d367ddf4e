"""A per-task pixel fit, added to the network where the support itself shows that it helps.

The guide's pooled vectors are a nearest-mean rule: on EM mitochondria, dark membranes lie as
close to the mitochondria's mean as the mitochondria do, and the network stays below a random
forest however much support it gets. A linear model of the *same cached features*, fitted to
the annotated cells of the support, tells them apart (``benchmarks/support_gate.py``). On
nuclei, cells and membranes the same model is far worse than the network, whose spatial
decoding generalises across images. So the support decides, by cross-validation:

* the annotated slices are split into quadrants; for each quadrant, the fit and the network
  (guided by the other three quadrants' annotations) predict the quadrant's annotated cells;
* the candidates are the network alone, the network's logit plus ``g`` times the fit's (``g``
  in :data:`GAINS`), and the fit alone; their score is the IoU of the foreground on the
  held-out annotated cells, summed over the quadrants;
* the best candidate replaces the network only if it leads by more than :data:`MARGIN`.

The rule needs many annotated cells to be reliable: with a few clicks, two or three held-out
clicks per quadrant choose the wrong candidate as often as the right one (measured in
``docs/benchmarks.md``). It therefore runs for supports given as masks or painted labels
(:meth:`.predictor.RevolverPredictor.guide_labels`), with at least :data:`MIN_CELLS` annotated
cells per class; tasks guided by points use the network alone.

No parameter is learnt; the fit is a weighted L2 logistic regression (damped Newton steps) on
the cached features and fixed multiscale filter responses (:func:`fit_features`, what a
random forest sees), standardised per support, each class weighing the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model.encoder import EncoderOutput
from .model.filters import FilterBank

__all__ = [
    "FIT_SIGMAS",
    "GAINS",
    "MARGIN",
    "MIN_CELLS",
    "PixelFit",
    "cell_features",
    "FitInputs",
    "fit_features",
    "fit_inputs",
    "validated_fit",
]

#: Scales (slice pixels) of the filter responses the fit sees beside the cached features: up
#: to 16, as the random forest's (:class:`.evaluate.RandomForestBaseline`).
FIT_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
#: Weights of the fit's logit tried beside the network's (and the fit alone).
GAINS = (0.5, 1.0, 2.0)
#: Lead in cross-validated IoU a candidate needs over the network alone.
MARGIN = 0.05
#: Annotated fine cells per class below which the network is used alone.
MIN_CELLS = 200
#: L2 strength of the fit, on standardised features.
STRENGTH = 10.0
#: Annotated cells per class a fit is solved on at most (evenly spaced among them): a painted
#: slice has tens of thousands, and a few thousand determine a linear model as well.
MAX_CELLS = 2000


@dataclass(frozen=True, eq=False)
class PixelFit:
    """A task's fitted pixel model and how much it counts.

    The task's logit is ``net_weight * network logit + gain * fit logit``, with the fit's logit
    ``[(x - mean) / scale, 1] . coef`` for the cell features ``x`` (:func:`fit_features`).

    Attributes
    ----------
    mean, scale : np.ndarray
        ``(D,)`` float32 standardisation of the features (the support's).
    coef : np.ndarray
        ``(D + 1,)`` float32 coefficients, the intercept last.
    gain : float
        Weight of the fit's logit (0: the network alone).
    net_weight : float
        Weight of the network's logit: 1, or 0 where the fit alone won.
    scores : dict of str to float
        Cross-validated IoU of each candidate (``"net"``, ``"net+0.5*fit"``, ..., ``"fit"``),
        for the record.
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    gain: float
    net_weight: float = 1.0
    scores: dict[str, float] | None = None

    def __post_init__(self) -> None:
        """Check the shapes and freeze private float32 copies of the arrays."""
        d = self.mean.shape
        if len(d) != 1 or self.scale.shape != d or self.coef.shape != (d[0] + 1,):
            raise ValueError(
                f"PixelFit needs mean (D,), scale (D,) and coef (D + 1,); got "
                f"{self.mean.shape}, {self.scale.shape} and {self.coef.shape}"
            )
        for name in ("mean", "scale", "coef"):
            a = np.array(getattr(self, name), np.float32, copy=True)
            a.setflags(write=False)
            object.__setattr__(self, name, a)

    @property
    def active(self) -> bool:
        """Whether the fit changes the network's output at all."""
        return self.gain != 0.0 or self.net_weight != 1.0

    def logits(self, features: torch.Tensor | FitInputs) -> torch.Tensor:
        """Return the fit's logit on the fine grid.

        Parameters
        ----------
        features : torch.Tensor or FitInputs
            ``(B, D, h, w)`` from :func:`fit_features`, or its parts from :func:`fit_inputs`
            (cheaper on many slices: nothing is concatenated, and the coarse part is combined
            before it is upsampled, which bilinear upsampling allows exactly).

        Returns
        -------
        torch.Tensor
            ``(B, h, w)`` float32.
        """
        parts = (features,) if isinstance(features, torch.Tensor) else features.parts
        d = sum(p.shape[1] for p in parts)
        if d != len(self.mean):
            raise ValueError(
                f"the pixel fit was made on {len(self.mean)} feature channels; "
                f"these features have {d}"
            )
        dev = parts[0].device
        w = torch.from_numpy(self.coef[:-1] / self.scale).to(dev)
        b = float(self.coef[-1] - np.dot(self.coef[:-1], self.mean / self.scale))
        if isinstance(features, torch.Tensor):
            return torch.einsum("bdhw,d->bhw", features.float(), w) + b
        fine, coarse, filters = features.parts
        cf, cc = fine.shape[1], coarse.shape[1]
        out = torch.einsum("bdhw,d->bhw", fine.float(), w[:cf])
        low = torch.einsum("bdhw,d->bhw", coarse.float(), w[cf : cf + cc])[:, None]
        out = (
            out
            + F.interpolate(low, size=out.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        )
        return out + torch.einsum("bdhw,d->bhw", filters, w[cf + cc :]) + b

    def combine(self, net_logits: torch.Tensor, fit_logits: torch.Tensor) -> torch.Tensor:
        """Mix the network's and the fit's logits (same shape)."""
        return self.net_weight * net_logits + self.gain * fit_logits

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "mean": self.mean.astype(float).tolist(),
            "scale": self.scale.astype(float).tolist(),
            "coef": self.coef.astype(float).tolist(),
            "gain": self.gain,
            "net_weight": self.net_weight,
            "scores": self.scores,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> PixelFit:
        """Inverse of :meth:`to_dict`."""
        return cls(
            mean=np.asarray(d["mean"], np.float32),
            scale=np.asarray(d["scale"], np.float32),
            coef=np.asarray(d["coef"], np.float32),
            gain=float(d["gain"]),  # type: ignore[arg-type]
            net_weight=float(d.get("net_weight", 1.0)),  # type: ignore[arg-type]
            scores=d.get("scores"),  # type: ignore[arg-type]
        )


def cell_features(f: EncoderOutput) -> torch.Tensor:
    """Per fine cell feature vectors: the fine features, then the coarse ones upsampled.

    Parameters
    ----------
    f : EncoderOutput
        ``coarse (B, Cc, h, w)``, ``fine (B, Cf, 2h, 2w)``.

    Returns
    -------
    torch.Tensor
        ``(B, Cf + Cc, 2h, 2w)`` float32.
    """
    fine = f.fine.float()
    up = F.interpolate(f.coarse.float(), size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, up], dim=1)


_BANK = FilterBank(FIT_SIGMAS)


@dataclass(frozen=True)
class FitInputs:
    """What the pixel fit reads on a batch of slices, in parts (see :func:`fit_features`).

    Attributes
    ----------
    fine : torch.Tensor
        ``(B, Cf, h, w)`` cached fine features.
    coarse : torch.Tensor
        ``(B, Cc, h / 2, w / 2)`` cached coarse features (not yet upsampled).
    filters : torch.Tensor
        ``(B, Cb, h, w)`` float32 filter responses at :data:`FIT_SIGMAS`.
    """

    fine: torch.Tensor
    coarse: torch.Tensor
    filters: torch.Tensor

    @property
    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three parts, in the order of the fit's coefficients."""
        return self.fine, self.coarse, self.filters


def fit_inputs(f: EncoderOutput, images: torch.Tensor) -> FitInputs:
    """Gather what the pixel fit reads on slices: their features and filter responses.

    Parameters
    ----------
    f : EncoderOutput
        The slices' cached features, batch ``B``.
    images : torch.Tensor
        ``(B, C, H, W)`` the same slices, normalised as the encoder reads them (unpadded).
    """
    h, w = f.fine.shape[-2:]
    stride = FilterBank.stride
    x = images.float().to(f.fine.device)
    ph, pw = h * stride - x.shape[-2], w * stride - x.shape[-1]
    if ph or pw:
        mode = "reflect" if ph < x.shape[-2] and pw < x.shape[-1] else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return FitInputs(f.fine, f.coarse, _BANK.to(x.device)(x))


def fit_features(f: EncoderOutput, images: torch.Tensor) -> torch.Tensor:
    """Return what the pixel fit reads per fine cell: cell features and filter responses.

    Parameters are those of :func:`fit_inputs`.

    Returns
    -------
    torch.Tensor
        ``(B, D, h, w)`` float32 on the fine grid: the fine features, the coarse ones
        upsampled, then the smoothed intensity, gradient magnitude and Hessian eigenvalues at
        :data:`FIT_SIGMAS`.
    """
    inputs = fit_inputs(f, images)
    return torch.cat([cell_features(f), inputs.filters], dim=1)


def logistic(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, strength: float, start: np.ndarray | None = None
) -> np.ndarray:
    """Weighted L2 logistic regression by damped Newton steps.

    Parameters
    ----------
    x : np.ndarray
        ``(N, D + 1)``, the last column ones (its coefficient, the intercept, is not penalised).
    y : np.ndarray
        ``(N,)`` in {0, 1}.
    w : np.ndarray
        ``(N,)`` sample weights.
    strength : float
        L2 penalty.
    start : np.ndarray, optional
        ``(D + 1,)`` coefficients to start from (zeros by default).

    Returns
    -------
    np.ndarray
        ``(D + 1,)`` coefficients.
    """
    pen = np.full(x.shape[1], strength)
    pen[-1] = 1e-6
    beta = np.zeros(x.shape[1]) if start is None else np.asarray(start, np.float64).copy()

    def loss(b: np.ndarray) -> float:
        z = x @ b
        return float(np.sum(w * (np.logaddexp(0.0, z) - y * z)) + 0.5 * np.sum(pen * b * b))

    f = loss(beta)
    for _ in range(30):
        p = 0.5 * (1.0 + np.tanh(0.5 * (x @ beta)))
        grad = x.T @ (w * (p - y)) + pen * beta
        hess = (x * (w * p * (1.0 - p))[:, None]).T @ x + np.diag(pen)
        step = np.linalg.solve(hess, grad)
        t, new, f_new = 1.0, beta, f
        while t > 1e-4:
            new = beta - t * step
            f_new = loss(new)
            if f_new <= f:
                break
            t *= 0.5
        beta, gained, f = new, f - f_new, f_new
        if gained <= 1e-6 * max(f, 1e-12):
            break
    return beta


@dataclass(frozen=True)
class _Support:
    """Annotated cells of all support slices: features, labels, weights and quadrants."""

    x: np.ndarray  # (N, D) features of the labelled cells
    y: np.ndarray  # (N,) 1 foreground, 0 background
    w: np.ndarray  # (N,) annotation weight of the cell's label
    quadrant: np.ndarray  # (N,) 0-3
    slice_of: np.ndarray  # (N,) which support slice
    cell: np.ndarray  # (N,) flat fine-grid index on its slice


def _support(feats: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> _Support:
    parts = []
    for i, (x, m) in enumerate(zip(feats, masks, strict=True)):
        d, h, w = x.shape
        m = m.reshape(2, -1).numpy()
        labelled = m.sum(0) > 0.5
        cells = np.flatnonzero(labelled)
        yy, xx = np.divmod(cells, w)
        parts.append(
            (
                x.reshape(d, -1)[:, cells].T.numpy(),
                (m[0, cells] > m[1, cells]).astype(np.float64),
                m[:, cells].sum(0).astype(np.float64),
                (yy >= h / 2) * 2 + (xx >= w / 2),
                np.full(len(cells), i),
                cells,
            )
        )
    return _Support(*(np.concatenate(p) for p in zip(*parts, strict=True)))


def _fit(
    s: _Support,
    keep: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    start: np.ndarray | None = None,
) -> np.ndarray:
    rows = []
    for c in (0.0, 1.0):
        idx = np.flatnonzero(keep & (s.y == c))
        if len(idx) > MAX_CELLS:
            idx = idx[np.linspace(0, len(idx) - 1, MAX_CELLS).round().astype(int)]
        rows.append(idx)
    sel = np.concatenate(rows)
    x = np.c_[(s.x[sel] - mean) / scale, np.ones(len(sel))]
    y, w = s.y[sel], s.w[sel].copy()
    for c in (0.0, 1.0):
        w[y == c] *= 0.5 * len(w) / max(w[y == c].sum(), 1e-9)
    return logistic(x, y, w, STRENGTH, start)


def validated_fit(
    feats: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    network_logits: Callable[[list[torch.Tensor]], list[torch.Tensor]],
) -> PixelFit | None:
    """Fit a task's pixel model and choose its weight by cross-validation on the support.

    Parameters
    ----------
    feats : sequence of torch.Tensor
        Per support slice, ``(D, h, w)`` cell features (:func:`fit_features`).
    masks : sequence of torch.Tensor
        Per support slice, ``(2, h, w)`` foreground and background annotation weights on the
        same grid; a cell counts as annotated where they sum to more than one half.
    network_logits : callable
        Given one ``(2, h, w)`` mask per support slice, the network's logits ``(h, w)`` on each
        support slice (at cell resolution) when guided by those masks alone.

    Returns
    -------
    PixelFit or None
        ``None`` when the support has fewer than :data:`MIN_CELLS` annotated cells of a class
        (or no two quadrants to validate on): the network alone.
    """
    s = _support(feats, masks)
    if min(int((s.y == c).sum()) for c in (0.0, 1.0)) < MIN_CELLS:
        return None
    mean = s.x.mean(0)
    scale = s.x.std(0) + 1e-3
    coef = _fit(s, np.ones(len(s.y), bool), mean, scale)
    names = ["net", *[f"net+{g:g}*fit" for g in GAINS], "fit"]
    inter = dict.fromkeys(names, 0.0)
    union = dict.fromkeys(names, 0.0)
    folds = 0
    for q in range(4):
        held = s.quadrant == q
        train = ~held
        if not held.any() or min(int((s.y[train] == c).sum()) for c in (0.0, 1.0)) < 1:
            continue
        folds += 1
        fold_coef = _fit(s, train, mean, scale, start=coef)
        fit = np.c_[(s.x[held] - mean) / scale, np.ones(int(held.sum()))] @ fold_coef
        fold_masks = []
        for m in masks:
            h, w = m.shape[-2:]
            yy, xx = np.mgrid[0:h, 0:w]
            keep = ((yy >= h / 2) * 2 + (xx >= w / 2)) != q
            fold_masks.append(m * torch.from_numpy(keep.astype(np.float32))[None])
        net_maps = network_logits(fold_masks)
        net = np.concatenate(
            [
                net_maps[i].reshape(-1).numpy()[s.cell[held & (s.slice_of == i)]]
                for i in range(len(masks))
            ]
        )
        truth = s.y[held] > 0
        wt = s.w[held]
        candidates = {"net": net, "fit": fit}
        candidates.update({f"net+{g:g}*fit": net + g * fit for g in GAINS})
        for name, z in candidates.items():
            pred = z > 0
            inter[name] += float(np.sum(wt * (pred & truth)))
            union[name] += float(np.sum(wt * (pred | truth)))
    if folds < 2:
        return None
    scores = {n: inter[n] / union[n] if union[n] else 0.0 for n in names}
    best = max(names, key=lambda n: scores[n])
    if scores[best] - scores["net"] <= MARGIN or best == "net":
        gain, net_weight = 0.0, 1.0
    elif best == "fit":
        gain, net_weight = 1.0, 0.0
    else:
        gain, net_weight = GAINS[names.index(best) - 1], 1.0
    return PixelFit(mean, scale, coef, gain, net_weight, scores)
