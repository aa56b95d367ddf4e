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
  in :data:`GAINS`), and the fit alone, each with the fit's logit smoothed over the fine grid
  (:data:`SMOOTHING`) and shifted (:data:`BIASES`); their score is the IoU of the foreground
  on the held-out annotated cells, summed over the quadrants;
* the best candidate replaces the network only if it leads by more than :data:`MARGIN`.

The rule needs many annotated cells to be reliable: with a few clicks, two or three held-out
clicks per quadrant choose the wrong candidate as often as the right one (measured in
``docs/benchmarks.md``). It therefore runs for supports given as masks or painted labels
(:meth:`.predictor.RevolverPredictor.guide_labels`), with at least :data:`MIN_CELLS` annotated
cells per class.

Clicks have their own, stricter rule (:func:`validated_click_fit`): the fit is considered only
where the network, guided by all the clicks, gets more than :data:`CLICK_MARGIN` of its own
clicks wrong (class-balanced), and it replaces the network only where, each click held out in
turn, it predicts the held-out clicks better than the network by more than
:data:`CLICK_MARGIN`, and marks at most :data:`MAX_AREA_RATIO` times as much of the support
slices as foreground as the network does. Where the network reproduces its clicks (nuclei,
cells, membranes in ``docs/benchmarks.md``) this costs one pass over the support slice and
changes nothing. A click fit that replaces the network is shifted to the class's share of the
support slices, which the fit itself estimates (:func:`prior_shift`), and smoothed by
:data:`CLICK_SMOOTHING`: clicks, drawn from both classes alike, cannot choose either.

The shift matters: a fit that weighs both classes the same draws a small class (EM
mitochondria on a tenth of the slice) far too wide, and a linear model of single cells is
noisy where the network's decoding is smooth; both are read off the held-out quadrants, not
set by hand.

No parameter is learnt; the fit is a weighted L2 logistic regression (damped Newton steps) on
the cached features and fixed multiscale filter responses (:func:`fit_features`, what a
random forest sees), standardised per support, each class weighing the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model.encoder import EncoderOutput
from .model.filters import FilterBank

__all__ = [
    "CLICK_MARGIN",
    "FIT_SIGMAS",
    "GAINS",
    "MARGIN",
    "MAX_AREA_RATIO",
    "MIN_CELLS",
    "BIASES",
    "CLICK_SMOOTHING",
    "PixelFit",
    "SMOOTHING",
    "smooth_cells",
    "cell_features",
    "FitInputs",
    "fit_features",
    "fit_inputs",
    "drawn_shift",
    "expected_iou_threshold",
    "prior_shift",
    "validated_click_fit",
    "validated_fit",
]

#: Scales (slice pixels) of the filter responses the fit sees beside the cached features: up
#: to 16, as the random forest's (:class:`.evaluate.RandomForestBaseline`).
FIT_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)
#: Weights of the fit's logit tried beside the network's (and the fit alone).
GAINS = (0.5, 1.0, 2.0)
#: Shifts of the fit's logit tried by cross-validation on painted supports.
BIASES = (-3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0)
#: Gaussian smoothing of the fit's logit (sigma, fine cells) tried by cross-validation.
SMOOTHING = (0.0, 1.0, 2.0)
#: Lead in cross-validated IoU a candidate needs over the network alone.
MARGIN = 0.05
#: Annotated fine cells per class below which the network is used alone (32 cells are 512
#: pixels: a small class, as glia or synapses in EM, painted on a whole slice).
MIN_CELLS = 32
#: L2 strength of the fit, on standardised features.
STRENGTH = 10.0
#: Annotated cells per class a fit is solved on at most (evenly spaced among them): a painted
#: slice has tens of thousands, and a few thousand determine a linear model as well.
MAX_CELLS = 2000
#: Clicks: the class-balanced accuracy on the clicks by which the network must fail its own
#: clicks, and the fit lead it on held-out clicks, for the fit to replace it (more than one
#: click in ten).
CLICK_MARGIN = 0.12
#: Clicks per class below which the network is used alone (each is held out in turn).
MIN_CLICKS = 2
#: Clicks: how much more of the support slices the fit may mark as foreground than the
#: network. Accuracy on clicks weighs both classes the same, so it cannot see the false
#: positives a small class pays for on a large background; a fit that claims much more than
#: the network buys its click accuracy with them (procedural scenes, ``docs/benchmarks.md``).
MAX_AREA_RATIO = 1.25
#: Clicks per class held out at most (evenly spaced among them): each costs one network pass.
MAX_HELD_CLICKS = 8
#: Clicks: Gaussian smoothing (sigma, fine cells) of a click fit that replaces the network.
CLICK_SMOOTHING = 1.0


@dataclass(frozen=True, eq=False)
class PixelFit:
    """A task's fitted pixel model and how much it counts.

    The task's logit is ``net_weight * network logit + gain * fit logit``, with the fit's logit
    ``G * ([(x - mean) / scale, 1] . coef) + bias`` for the cell features ``x``
    (:func:`fit_features`), ``G`` a Gaussian of ``smooth`` fine cells (:func:`smooth_cells`).

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
        Cross-validated IoU of each candidate (``"net"``, ``"net+0.5*fit"``, ..., ``"fit"``,
        each at its best smoothing and shift), for the record.
    bias : float
        Shift of the fit's logit (its threshold moved).
    smooth : float
        Gaussian smoothing of the fit's logit, sigma in fine cells (0: none).
    """

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    gain: float
    net_weight: float = 1.0
    scores: dict[str, float] | None = None
    bias: float = 0.0
    smooth: float = 0.0

    def __post_init__(self) -> None:
        """Check the shapes and freeze private float32 copies of the arrays."""
        d = self.mean.shape
        if len(d) != 1 or self.scale.shape != d or self.coef.shape != (d[0] + 1,):
            raise ValueError(
                f"PixelFit needs mean (D,), scale (D,) and coef (D + 1,); got "
                f"{self.mean.shape}, {self.scale.shape} and {self.coef.shape}"
            )
        if not self.smooth >= 0.0:
            raise ValueError(f"PixelFit smoothing must be >= 0 fine cells; got {self.smooth}")
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
            out = torch.einsum("bdhw,d->bhw", features.float(), w) + b
        else:
            fine, coarse, filters = features.parts
            cf, cc = fine.shape[1], coarse.shape[1]
            out = torch.einsum("bdhw,d->bhw", fine.float(), w[:cf])
            low = torch.einsum("bdhw,d->bhw", coarse.float(), w[cf : cf + cc])[:, None]
            up = F.interpolate(low, size=out.shape[-2:], mode="bilinear", align_corners=False)
            out = out + up[:, 0] + torch.einsum("bdhw,d->bhw", filters, w[cf + cc :]) + b
        return smooth_cells(out, self.smooth) + self.bias

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
            "bias": self.bias,
            "smooth": self.smooth,
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
            bias=float(d.get("bias", 0.0)),  # type: ignore[arg-type]
            smooth=float(d.get("smooth", 0.0)),  # type: ignore[arg-type]
        )


def smooth_cells(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """Smooth ``(B, h, w)`` maps with a Gaussian of ``sigma`` cells (edges replicated).

    ``sigma`` 0 returns ``z`` itself.
    """
    if sigma <= 0.0:
        return z
    r = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=z.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    x = F.pad(z[:, None].float(), (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1))
    return F.conv2d(x, k.view(1, 1, -1, 1))[:, 0]


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
    """Annotated cells of all support slices: features, labels, weights and folds."""

    x: np.ndarray  # (N, D) features of the labelled cells
    y: np.ndarray  # (N,) 1 foreground, 0 background
    w: np.ndarray  # (N,) annotation weight of the cell's label
    group: np.ndarray  # (N,) fold: quadrant 0-3 (painted), or click index (clicks)
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


def _read_cells(maps: Sequence[torch.Tensor], at: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate each map's values at its flat cell indices ``at[i]``."""
    return np.concatenate([m.reshape(-1).numpy()[c] for m, c in zip(maps, at, strict=True)])


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
    # name: (network weight, gain); every mix with the fit is tried at each smoothing and shift.
    mixes = {"net": (1.0, 0.0), **{f"net+{g:g}*fit": (1.0, g) for g in GAINS}, "fit": (0.0, 1.0)}
    keys = [("net", 0.0, 0.0)] + [
        (name, sigma, bias)
        for name, (_, g) in mixes.items()
        if g
        for sigma in SMOOTHING
        for bias in BIASES
    ]
    inter = dict.fromkeys(keys, 0.0)
    union = dict.fromkeys(keys, 0.0)
    folds = 0
    for q in range(4):
        held = s.group == q
        train = ~held
        if not held.any() or min(int((s.y[train] == c).sum()) for c in (0.0, 1.0)) < 1:
            continue
        folds += 1
        fold_coef = _fit(s, train, mean, scale, start=coef)
        # The fold's fit on whole support slices, so that smoothing sees every cell's neighbours.
        fold_fit = PixelFit(mean, scale, fold_coef, 1.0)
        fit_maps = [fold_fit.logits(x[None].float())[0] for x in feats]
        fold_masks = []
        for m in masks:
            h, w = m.shape[-2:]
            yy, xx = np.mgrid[0:h, 0:w]
            keep = ((yy >= h / 2) * 2 + (xx >= w / 2)) != q
            fold_masks.append(m * torch.from_numpy(keep.astype(np.float32))[None])
        net_maps = network_logits(fold_masks)

        at = [s.cell[held & (s.slice_of == i)] for i in range(len(masks))]
        net = _read_cells(net_maps, at)
        smoothed = {
            sigma: _read_cells([smooth_cells(z[None], sigma)[0] for z in fit_maps], at)
            for sigma in SMOOTHING
        }
        truth = s.y[held] > 0
        wt = s.w[held]
        for name, sigma, bias in keys:
            net_weight, gain = mixes[name]
            z = net_weight * net + gain * (smoothed[sigma] + bias) if gain else net
            pred = z > 0
            inter[(name, sigma, bias)] += float(np.sum(wt * (pred & truth)))
            union[(name, sigma, bias)] += float(np.sum(wt * (pred | truth)))
    if folds < 2:
        return None
    score = {k: inter[k] / union[k] if union[k] else 0.0 for k in keys}
    # Ties go to the network, then to the smaller shift and the lesser smoothing.
    best = max(keys, key=lambda k: (score[k], k[0] == "net", -abs(k[2]), -k[1]))
    scores = {name: max(v for k, v in score.items() if k[0] == name) for name in mixes}
    if best[0] == "net" or score[best] - score[keys[0]] <= MARGIN:
        return PixelFit(mean, scale, coef, 0.0, 1.0, scores)
    net_weight, gain = mixes[best[0]]
    return PixelFit(mean, scale, coef, gain, net_weight, scores, bias=best[2], smooth=best[1])


def prior_shift(logits: np.ndarray, iterations: int = 100) -> tuple[float, float]:
    """Estimate a class's share of cells, and the logit shift it implies, from a balanced fit.

    A fit that weighs both classes the same models the likelihood ratio as if the classes
    were equally common; on a slice where the class covers a share ``pi`` of the cells, the
    posterior's logit is the fit's plus ``log(pi / (1 - pi))``. ``pi`` is the fixed point of
    ``pi = mean(sigmoid(logits + log(pi / (1 - pi))))`` over the slice's cells, the maximum
    likelihood estimate of the prior (Saerens, Latinne and Decaestecker 2002, "Adjusting the
    outputs of a classifier to new a priori probabilities").

    Parameters
    ----------
    logits : np.ndarray
        The balanced fit's logits on every cell of the support slices, any shape.
    iterations : int
        Fixed-point steps at most.

    Returns
    -------
    (float, float)
        The share ``pi`` (within ``[1e-4, 1 - 1e-4]``) and the shift ``log(pi / (1 - pi))``.
    """
    z = np.asarray(logits, np.float64).reshape(-1)
    if z.size == 0:
        raise ValueError("prior_shift needs the logits of at least one cell")
    pi = 0.5
    for _ in range(iterations):
        new = float(np.mean(0.5 * (1.0 + np.tanh(0.5 * (z + math.log(pi / (1.0 - pi)))))))
        new, last = min(max(new, 1e-4), 1.0 - 1e-4), pi
        pi = new
        if abs(new - last) < 1e-6:
            break
    return pi, math.log(pi / (1.0 - pi))


def expected_iou_threshold(probabilities: np.ndarray) -> tuple[float, float]:
    """Find the threshold on calibrated probabilities that maximises the expected IoU.

    The most probable label of each cell (threshold 0.5) maximises the expected accuracy, not
    the IoU: where a class is hard to tell from its surroundings, a lower threshold trades
    false positives for the many cells it would miss (the optimal threshold for F1, and so
    for IoU, is half the best F1; Lipton, Elkan and Narayanaswamy 2014). The expected true
    positives, false positives and misses of a threshold ``t`` are read from the
    probabilities themselves: ``sum(p)``, ``sum(1 - p)`` over the cells above ``t``, and
    ``sum(p)`` over those below.

    Parameters
    ----------
    probabilities : np.ndarray
        Calibrated foreground probabilities of every cell of the support slices, any shape.

    Returns
    -------
    (float, float)
        The threshold (0.05 to 0.95 in steps of 0.05; of equals, the nearest 0.5) and its
        expected IoU.
    """
    p = np.sort(np.asarray(probabilities, np.float64).reshape(-1))
    if p.size == 0:
        raise ValueError("expected_iou_threshold needs the probabilities of at least one cell")
    below = np.concatenate([[0.0], np.cumsum(p)])  # sum(p) over the k lowest cells
    total = below[-1]
    best, best_iou = 0.5, -1.0
    # Nearest 0.5 first, so that a tie keeps the most probable label.
    for t in sorted(np.round(np.arange(0.05, 0.951, 0.05), 2), key=lambda t: abs(t - 0.5)):
        k = int(np.searchsorted(p, t, side="right"))
        tp = total - below[k]
        fp = (p.size - k) - tp
        fn = below[k]
        iou = tp / (tp + fp + fn) if tp + fp + fn > 0 else 0.0
        if iou > best_iou + 1e-12:
            best, best_iou = float(t), float(iou)
    return best, best_iou


def drawn_shift(logits: np.ndarray) -> tuple[float, float, float]:
    """Find the shift that draws a balanced fit for its slices: calibrated, IoU-thresholded.

    Parameters
    ----------
    logits : np.ndarray
        The balanced fit's logits on every cell of the support slices (smoothed as it will be
        drawn), any shape.

    Returns
    -------
    (float, float, float)
        The class's estimated share (:func:`prior_shift`), the threshold on the calibrated
        probabilities (:func:`expected_iou_threshold`) and the shift of the logit that both
        imply, ``log(pi / (1 - pi)) - log(t / (1 - t))``, kept within :data:`BIASES` (the
        shifts a painted support may choose): a share estimated near zero (or one) by a fit
        that is sure of few cells would otherwise erase the class (or fill the slice).
    """
    z = np.asarray(logits, np.float64).reshape(-1)
    share, prior = prior_shift(z)
    threshold, _ = expected_iou_threshold(1.0 / (1.0 + np.exp(-(z + prior))))
    shift = prior - math.log(threshold / (1.0 - threshold))
    return share, threshold, min(max(shift, BIASES[0]), BIASES[-1])


def _balanced(correct: np.ndarray, y: np.ndarray) -> float:
    """Class-balanced mean of per-click scores ``correct`` (clicks labelled ``y``)."""
    return float(np.mean([correct[y == c].mean() for c in (0, 1)]))


def _held_clicks(y: np.ndarray) -> list[int]:
    """Choose the clicks held out in turn: per class at most :data:`MAX_HELD_CLICKS`, spread."""
    held: list[int] = []
    for c in (0, 1):
        idx = np.flatnonzero(y == c)
        if len(idx) > MAX_HELD_CLICKS:
            idx = idx[np.linspace(0, len(idx) - 1, MAX_HELD_CLICKS).round().astype(int)]
        held.extend(idx.tolist())
    return held


def _held_out_scores(
    s: _Support,
    y: np.ndarray,
    coef: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    footprints: Sequence[tuple[int, torch.Tensor]],
    masks: Sequence[torch.Tensor],
    at_click: list[tuple[int, tuple[int, int]]],
    network_logits: Callable[
        [list[list[torch.Tensor]], list[tuple[int, tuple[int, int]]] | None],
        list[list[torch.Tensor]],
    ],
    click_score: Callable[[Sequence[torch.Tensor], int], float],
) -> tuple[float, float]:
    """Class-balanced scores of the fit and the network on clicks held out in turn.

    Each held-out click (:func:`_held_clicks` of the click labels ``y``) is predicted by the
    fit refitted without it (from ``coef``) and by the network guided by ``masks`` less its
    footprint, read around it (:func:`validated_click_fit` has the arguments).
    """
    held = _held_clicks(y)
    fit_ok, folds = [], []
    # Each fold's masks differ from ``masks`` on one slice, its click's: those slices' are
    # made in one block each.
    taken = {
        i: masks[i].expand(len(held), -1, -1, -1).clone() for i in {footprints[j][0] for j in held}
    }
    for n, j in enumerate(held):
        fold_coef = _fit(s, s.group != j, mean, scale, start=coef)
        mine = s.group == j
        z = np.c_[(s.x[mine] - mean) / scale, np.ones(int(mine.sum()))] @ fold_coef
        fit_ok.append(float(np.sum(s.w[mine] * ((z > 0) == y[j])) / s.w[mine].sum()))
        i, fp = footprints[j]
        fold = list(masks)
        fold[i] = taken[i][n]
        fold[i][1 - y[j]].sub_(fp).clamp_min_(0.0)
        folds.append(fold)
    focus = [at_click[j] for j in held]
    net_ok = [
        click_score(maps, j) for maps, j in zip(network_logits(folds, focus), held, strict=True)
    ]
    return _balanced(np.array(fit_ok), y[held]), _balanced(np.array(net_ok), y[held])


def validated_click_fit(
    features: Callable[[], Sequence[torch.Tensor]],
    footprints: Sequence[tuple[int, torch.Tensor]],
    labels: np.ndarray,
    network_logits: Callable[
        [list[list[torch.Tensor]], list[tuple[int, tuple[int, int]]] | None],
        list[list[torch.Tensor]],
    ],
    *,
    clicks_in_windows: bool = False,
) -> PixelFit | None:
    """Fit a task's pixel model to clicks; keep it only where held-out clicks say it is better.

    Parameters
    ----------
    features : callable
        Returns, per support slice, the ``(D, h, w)`` cell features (:func:`fit_features`);
        called only when the fit is tried.
    footprints : sequence of (int, torch.Tensor)
        Per click, its support slice (an index into the features) and its ``(h, w)``
        footprint on the fine grid (:func:`.model.guide.point_masks` of the click alone).
    labels : np.ndarray
        ``(N,)`` per click: 1 positive, 0 negative.
    network_logits : callable
        Given several annotations, each as one ``(2, h, w)`` mask (positive, negative) per
        support slice, and where each is read (``None``: everywhere; else per annotation the
        support slice and fine cell ``(y, x)``), the network's ``(h, w)`` logits on each
        support slice under each annotation alone (batched: one call for all held-out
        clicks, each needed only around its click).
    clicks_in_windows : bool
        Read the network's score on its own clicks one window per click rather than from one
        pass over the support slices (the same scores; cheaper on large slices with few
        clicks). The pass over the slices then runs only if the fit is tried.

    Returns
    -------
    PixelFit or None
        ``None`` (the network alone) with fewer than :data:`MIN_CLICKS` clicks of a class, or
        where the network gets its own clicks right (within :data:`CLICK_MARGIN`). Otherwise
        the fit, active (the fit alone) only if it leads the network on held-out clicks by
        more than :data:`CLICK_MARGIN` and marks at most :data:`MAX_AREA_RATIO` times the
        network's foreground on the support slices; ``scores`` records the held-out scores
        (``"net"``, ``"fit"``: not read where the fit marks too much, which refuses it
        before the held-out clicks are scored), ``"net_on_clicks"`` and both foreground
        fractions (of the fit as chosen: both classes weighing the same). An active fit is
        shifted by :func:`prior_shift` of its logits on the support slices (the estimated
        share is ``scores["fit_share"]``) and the threshold of :func:`expected_iou_threshold`
        (``scores["fit_threshold"]``), within :data:`BIASES`, and smoothed by
        :data:`CLICK_SMOOTHING` fine cells.

    Raises
    ------
    ValueError
        As many footprints as labels are needed.
    """
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(footprints) != len(y):
        raise ValueError(f"one footprint per click: {len(footprints)} footprints, {len(y)} labels")
    if min(int((y == c).sum()) for c in (0, 1)) < MIN_CLICKS:
        return None
    n_slices = 1 + max(i for i, _ in footprints)
    grids = {i: fp.shape for i, fp in footprints}
    masks = [torch.zeros(2, *grids[i]) for i in range(n_slices)]
    for (i, fp), c in zip(footprints, y, strict=True):
        masks[i][1 - c] += fp
    flat = [fp.reshape(-1).numpy().astype(np.float64) for _, fp in footprints]
    cells = [np.flatnonzero(f > 1e-3) for f in flat]

    def click_score(maps: Sequence[torch.Tensor], j: int) -> float:
        """Soft accuracy of logits ``maps`` on click ``j``'s footprint."""
        wt = flat[j][cells[j]]
        z = maps[footprints[j][0]].reshape(-1).numpy()[cells[j]]
        return float(np.sum(wt * ((z > 0) == y[j])) / wt.sum())

    # Where each click's logits are read: its support slice and its footprint's peak cell.
    at_click = [(i, divmod(int(torch.argmax(fp)), fp.shape[-1])) for i, fp in footprints]
    if clicks_in_windows:
        full = None
        own_maps = network_logits([masks] * len(y), at_click)
    else:
        (full,) = network_logits([masks], None)
        own_maps = [full] * len(y)
    own_each = np.array([click_score(own_maps[j], j) for j in range(len(y))])
    own = _balanced(own_each, y)
    if own >= 1.0 - CLICK_MARGIN:
        return None
    if full is None:
        (full,) = network_logits([masks], None)
    feats = features()
    x_all = torch.cat([f.reshape(f.shape[0], -1) for f in feats], dim=1).T.numpy()
    mean = x_all.mean(0)
    scale = x_all.std(0) + 1e-3
    at = [(i, c) for (i, _), c in zip(footprints, cells, strict=True)]
    s = _Support(
        x=np.concatenate([feats[i].reshape(feats[i].shape[0], -1)[:, c].T.numpy() for i, c in at]),
        y=np.concatenate([np.full(len(c), float(v)) for c, v in zip(cells, y, strict=True)]),
        w=np.concatenate([f[c] for f, c in zip(flat, cells, strict=True)]),
        group=np.concatenate([np.full(len(c), j) for j, c in enumerate(cells)]),
        slice_of=np.concatenate([np.full(len(c), i) for i, c in at]),
        cell=np.concatenate(cells),
    )
    coef = _fit(s, np.ones(len(s.y), bool), mean, scale)
    net_area = float(np.mean(np.concatenate([m.reshape(-1).numpy() > 0 for m in full])))
    # The fit's logits on every cell, as it is drawn (its weights folded into one product
    # with the features, not the features standardised first: 25-100x less time).
    draft = PixelFit(mean, scale, coef, 1.0)
    z_all = np.concatenate([draft.logits(f[None])[0].reshape(-1).numpy() for f in feats])
    fit_area = float(np.mean(z_all > 0))
    scores = {
        "net_on_clicks": own,
        "net_on_positives": float(own_each[y == 1].mean()),
        "net_on_negatives": float(own_each[y == 0].mean()),
        "net_foreground": net_area,
        "fit_foreground": fit_area,
    }
    if fit_area > MAX_AREA_RATIO * net_area:
        # Refused whatever the held-out clicks say: their fits and network passes (most of
        # the cost of trying the fit) are not run, and the scores have no "net" and "fit".
        return PixelFit(mean, scale, coef, 0.0, 1.0, scores)
    scores["fit"], scores["net"] = fit_score, net_score = _held_out_scores(
        s, y, coef, mean, scale, footprints, masks, at_click, network_logits, click_score
    )
    if fit_score - net_score <= CLICK_MARGIN:
        return PixelFit(mean, scale, coef, 0.0, 1.0, scores)
    # The clicks chose the fit as a classifier, both classes weighing the same (as held-out
    # clicks do). It is drawn for the slice: smoothed, its probabilities calibrated to the
    # class's share of the support slices, and thresholded where the expected IoU is best.
    maps = np.split(z_all, np.cumsum([f.shape[-2] * f.shape[-1] for f in feats])[:-1])
    z = np.concatenate(
        [
            smooth_cells(torch.from_numpy(m.reshape(1, *f.shape[-2:])), CLICK_SMOOTHING)
            .reshape(-1)
            .numpy()
            for m, f in zip(maps, feats, strict=True)
        ]
    )
    share, threshold, shift = drawn_shift(z)
    scores["fit_share"] = share
    scores["fit_threshold"] = threshold
    return PixelFit(mean, scale, coef, 1.0, 0.0, scores, bias=shift, smooth=CLICK_SMOOTHING)
