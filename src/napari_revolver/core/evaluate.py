"""Few-shot evaluation: score a predictor on a labelled stack the way the paper does.

Protocol (guided networks for few-shot segmentation, sec. 3 and 5): one or more *support*
slices carry the annotation, every other slice is a *query*. For ``P`` points, ``P`` positive
and ``P`` negative pixels are drawn uniformly at random from the foreground and background of
each support slice (``numpy.random.default_rng(seed)`` per seed); the network is guided with
them and segments every query slice. The score is the foreground IoU of each query (an empty
prediction of an empty truth scores 1), averaged over queries; the table reports its mean and
standard deviation over seeds. ``"dense"`` guides with the whole support mask(s) instead (the
densest shot; deterministic, so one seed).

Baselines: ``"rf"``, an ilastik-style pixel classifier (multiscale filter features and a random
forest, :class:`RandomForestBaseline`) trained on the pixels under the same points, and for
the ``"dense"`` budget on pixels drawn from the whole support masks; ``"dense"``, the network's
dense row above.

No napari or Qt here; scikit-image and scikit-learn (the ``bench`` extra) are imported only for
the random forest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .predictor import RevolverPredictor
    from .task import Task

__all__ = [
    "BASELINES",
    "EvalResult",
    "RandomForestBaseline",
    "evaluate_few_shot",
    "format_table",
    "foreground_iou",
    "sample_support_points",
]

#: Baselines :func:`evaluate_few_shot` knows.
BASELINES = ("rf", "dense")

#: Pixels of each class per support slice that the forest learns from for the dense budget.
DENSE_RF_PIXELS = 5000

_BENCH_HINT = (
    "the random-forest baseline needs scikit-learn (and scikit-image, a core dependency); "
    "install them with `pip install napari-revolver[bench]`"
)


def _require_bench() -> None:
    """Raise an ``ImportError`` naming the extra to install when the RF deps are missing."""
    try:
        import skimage.feature  # noqa: F401
        import sklearn.ensemble  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_BENCH_HINT} ({exc})") from exc


# --------------------------------------------------------------------------------- sampling
def sample_support_points(rng: np.random.Generator, mask: np.ndarray, n: int) -> np.ndarray:
    """Draw ``n`` pixels uniformly at random from the ``True`` pixels of ``mask``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the draw (one ``choice`` call, so seeded draws are reproducible).
    mask : np.ndarray
        ``(H, W)`` bool (anything non-zero counts).
    n : int
        Number of points, ``>= 1``.

    Returns
    -------
    np.ndarray
        ``(n, 2)`` float64 ``(y, x)`` pixel coordinates; drawn without replacement unless the
        mask has fewer than ``n`` pixels.

    Raises
    ------
    ValueError
        ``mask`` is not 2D or empty, or ``n < 1``.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a (H, W) mask; got shape {mask.shape}")
    if n < 1:
        raise ValueError(f"the number of points must be >= 1; got {n}")
    yx = np.argwhere(mask)
    if len(yx) == 0:
        raise ValueError("the mask has no pixel to sample points from")
    pick = rng.choice(len(yx), size=n, replace=len(yx) < n)
    return yx[pick].astype(np.float64)


# ------------------------------------------------------------------------------ RF baseline
class RandomForestBaseline:
    """The ilastik-style pixel classifier: multiscale filter features + a random forest.

    Trained on the pixels under the clicked points (as ilastik's brush strokes), predicting
    every pixel of a slice. Features are scikit-image's ``multiscale_basic_features``
    (intensity, edges and texture at sigmas 1 to ``sigma_max``) of the slice normalised to its
    1st-99.8th percentiles.

    Parameters
    ----------
    n_estimators : int
        Trees in the forest.
    sigma_max : float
        Largest filter scale.
    seed : int
        ``random_state`` of the forest.
    n_jobs : int
        Worker threads of the forest (``-1``: all cores).

    Raises
    ------
    ImportError
        scikit-learn (or scikit-image) is missing (``pip install napari-revolver[bench]``).
    """

    def __init__(
        self, n_estimators: int = 100, sigma_max: float = 16.0, seed: int = 0, n_jobs: int = -1
    ) -> None:
        _require_bench()
        from sklearn.ensemble import RandomForestClassifier

        self.sigma_max = sigma_max
        self.forest = RandomForestClassifier(
            n_estimators=n_estimators, n_jobs=n_jobs, random_state=seed
        )

    def features(self, image: np.ndarray) -> np.ndarray:
        """Compute the pixel features of one slice.

        Parameters
        ----------
        image : np.ndarray
            ``(H, W)`` grayscale or ``(H, W, C)`` slice, any numeric dtype.

        Returns
        -------
        np.ndarray
            ``(H, W, F)`` float32 features of the slice normalised to its 1st-99.8th
            percentiles.
        """
        from skimage.feature import multiscale_basic_features

        x = np.asarray(image).astype(np.float32)
        lo, hi = np.percentile(x, [1, 99.8])
        x = (x - lo) / max(hi - lo, 1e-6)
        return multiscale_basic_features(
            x,
            intensity=True,
            edges=True,
            texture=True,
            sigma_min=1,
            sigma_max=self.sigma_max,
            channel_axis=-1 if x.ndim == 3 else None,
        )

    def fit(
        self, features: list[np.ndarray], points: list[np.ndarray], labels: list[np.ndarray]
    ) -> RandomForestBaseline:
        """Fit the forest on the clicked pixels of one or more slices.

        Parameters
        ----------
        features : list of np.ndarray
            ``features[i]`` ``(H, W, F)``: :meth:`features` of slice ``i``.
        points : list of np.ndarray
            ``points[i]`` ``(N_i, 2)`` ``(y, x)`` pixel coordinates on slice ``i`` (rounded).
        labels : list of np.ndarray
            ``labels[i]`` ``(N_i,)``: 1 foreground, 0 background.

        Returns
        -------
        RandomForestBaseline
            ``self``, fitted.
        """
        xs, ys = [], []
        for f, p, lab in zip(features, points, labels, strict=True):
            yx = np.rint(np.asarray(p)).astype(int)
            xs.append(f[yx[:, 0], yx[:, 1]])
            ys.append(np.asarray(lab))
        self.forest.fit(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Predict the foreground of one slice.

        Parameters
        ----------
        features : np.ndarray
            ``(H, W, F)``: :meth:`features` of the slice.

        Returns
        -------
        np.ndarray
            ``(H, W)`` bool: pixels whose foreground (label 1) probability exceeds 0.5.
        """
        h, w, nf = features.shape
        proba = self.forest.predict_proba(features.reshape(-1, nf))
        cls = list(self.forest.classes_)
        p = proba[:, cls.index(1)] if 1 in cls else np.zeros(len(proba))
        return (p > 0.5).reshape(h, w)


# ------------------------------------------------------------------------------------ result
@dataclass(frozen=True)
class EvalResult:
    """One row of an evaluation: a method at one annotation budget.

    Attributes
    ----------
    method : str
        ``"revolver"`` (the network guided by points), ``"rf"`` (random forest on the same
        points) or ``"dense"`` (the network guided by the whole support mask).
    points : str
        Positive (and as many negative) points per support slice, ``"1"``, ``"5"``, ...; or
        ``"dense"``.
    iou_mean, iou_std : float
        Mean and standard deviation over seeds of the query-averaged foreground IoU.
    seconds_per_slice : float
        Wall-clock seconds per query slice (revolver: the propagation with features cached;
        rf: features + prediction), averaged over seeds.
    support : tuple of int
        Support slice indices.
    n_queries : int
        Query slices scored.
    seeds : int
        Seeds averaged (1 for ``"dense"``).
    fits_used : int or None
        How many of the row's tasks (one per seed) were predicted with a per-task pixel fit
        in place of the network alone (``PixelFit.active``, and not followed by position;
        see ``RevolverPredictor.fit_clicks`` and ``guide_labels``); ``None`` for the forest.
    """

    method: str
    points: str
    iou_mean: float
    iou_std: float
    seconds_per_slice: float
    support: tuple[int, ...]
    n_queries: int
    seeds: int
    fits_used: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the row as JSON-friendly built-in types."""
        return {
            "method": self.method,
            "points": self.points,
            "iou_mean": float(self.iou_mean),
            "iou_std": float(self.iou_std),
            "seconds_per_slice": float(self.seconds_per_slice),
            "support": [int(s) for s in self.support],
            "n_queries": int(self.n_queries),
            "seeds": int(self.seeds),
            "fits_used": None if self.fits_used is None else int(self.fits_used),
        }


def foreground_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Compute the foreground intersection over union of a prediction and its truth.

    This is the package's one IoU: the evaluation, the benchmarks and training's validation
    score all go through it.

    Parameters
    ----------
    pred : np.ndarray
        Predicted mask, any shape (``(H, W)`` for a slice, ``(Z, H, W)`` for a stack);
        non-zero is foreground.
    truth : np.ndarray
        Ground truth of the same shape as ``pred``; non-zero is foreground.

    Returns
    -------
    float
        ``|pred & truth| / |pred | truth|`` over all pixels, in [0, 1]; 1.0 when both masks
        are empty (an empty prediction of an empty truth is right).

    Raises
    ------
    ValueError
        If the shapes of ``pred`` and ``truth`` differ.
    """
    pred, truth = np.asarray(pred) > 0, np.asarray(truth) > 0
    if pred.shape != truth.shape:
        raise ValueError(
            f"pred and truth must have the same shape; got {pred.shape} and {truth.shape}"
        )
    union = int((pred | truth).sum())
    return float((pred & truth).sum() / union) if union else 1.0


# -------------------------------------------------------------------------------- validation
def _parse_points(points: Iterable[int | str]) -> list[int | str]:
    """Validate point budgets: positive ints or ``"dense"``, duplicates dropped, order kept."""
    out: list[int | str] = []
    for p in points:
        if isinstance(p, str):
            s = p.strip().lower()
            if s == "dense":
                v: int | str = "dense"
            else:
                try:
                    v = int(s)
                except ValueError:
                    raise ValueError(
                        f"points must be positive integers or 'dense'; got {p!r}"
                    ) from None
        elif isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_)):
            v = int(p)
        else:
            raise ValueError(f"points must be positive integers or 'dense'; got {p!r}")
        if v != "dense" and v < 1:  # type: ignore[operator]
            raise ValueError(
                f"the number of points per class must be >= 1 (P positive and P negative "
                f"per support slice); got {v}"
            )
        if v not in out:
            out.append(v)
    return out


def _parse_support(support: int | Iterable[int], n: int) -> tuple[int, ...]:
    """Validate support slice indices against a stack of ``n`` slices, leaving a query."""
    items = [support] if isinstance(support, (int, np.integer)) else list(support)
    if not items:
        raise ValueError("support needs at least one slice index; got none")
    out: list[int] = []
    for s in items:
        if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"support slice indices must be integers; got {s!r}")
        if not 0 <= int(s) < n:
            raise ValueError(
                f"support slice {int(s)} is out of range: expected an index in [0, {n - 1}] "
                f"for a stack of {n} slices"
            )
        if int(s) not in out:
            out.append(int(s))
    if len(out) >= n:
        raise ValueError(
            f"every slice is a support slice ({len(out)} of {n}); at least one query slice "
            "must remain to be scored"
        )
    return tuple(out)


def _check_shapes(image: Any, labels: np.ndarray) -> bool:
    """Validate ``image`` ``(N, H, W[, 3|4])`` against ``labels`` ``(N, H, W)``; return rgb."""
    ishape = tuple(int(s) for s in getattr(image, "shape", ()))
    if len(ishape) not in (3, 4) or (len(ishape) == 4 and ishape[-1] not in (3, 4)):
        raise ValueError(
            f"expected an image stack (N, H, W) or RGB (N, H, W, 3); got shape {ishape}"
        )
    if labels.ndim != 3:
        raise ValueError(f"expected labels (N, H, W); got shape {labels.shape}")
    if ishape[:3] != labels.shape:
        raise ValueError(
            f"image and labels shapes differ: labels must be (N, H, W) = {ishape[:3]} to match "
            f"image {ishape}; got {labels.shape}"
        )
    if ishape[0] < 2:
        raise ValueError(
            f"expected at least 2 slices (a support slice and a query slice); got {ishape[0]} "
            f"in shape {ishape}"
        )
    return len(ishape) == 4


# -------------------------------------------------------------------------------- evaluation
def evaluate_few_shot(
    predictor: RevolverPredictor,
    image: Any,
    labels: Any,
    *,
    support: int | Sequence[int] = (0,),
    points: Sequence[int | str] = (1, 5, 20, "dense"),
    seeds: int = 3,
    label_value: int | None = None,
    baselines: Sequence[str] = (),
    progress: Callable[[int, int], None] | None = None,
    local: bool = False,
    queries: Sequence[int] | None = None,
    invert: bool = False,
    scale: float = 1.0,
    pixel_fit: bool = True,
) -> list[EvalResult]:
    """Score few-shot segmentation of a labelled stack (see the module docstring).

    Parameters
    ----------
    predictor : RevolverPredictor
        The network; its volume is replaced by ``image`` (``set_volume``).
    image : array-like
        ``(N, H, W)`` grayscale or ``(N, H, W, 3)`` RGB slices.
    labels : array-like
        ``(N, H, W)`` ground truth.
    support : int or sequence of int
        Support slice(s); several give multi-shot guidance (their tasks merged). Every other
        slice is a query.
    points : sequence of int or "dense"
        Budgets: ``P`` positive and ``P`` negative points per support slice; ``"dense"``: the
        whole support mask(s).
    seeds : int
        Random draws of the points per budget (seeds ``0 .. seeds - 1``).
    label_value : int, optional
        Foreground is ``labels == label_value``; default ``labels > 0``.
    baselines : sequence of {"rf", "dense"}
        ``"rf"`` adds a random-forest row per point budget (needs ``napari-revolver[bench]``);
        ``"dense"`` adds the dense row if ``points`` does not already ask for it.
    progress : callable, optional
        ``progress(done, total)`` after each unit of work.
    local : bool
        The annotations also act by position on the queries (``RevolverPredictor.propagate``);
        for slices of one z-stack or time-lapse.
    queries : sequence of int, optional
        Slices to score; default every slice that is not a support slice. Fixing them lets
        runs with different support slices be compared on the same queries.
    invert : bool
        Dark objects on a light background: intensities reversed (``set_volume(invert=)``).
    scale : float
        Slices resized by this factor before the network (``set_volume(scale=)``); the
        points, masks and scores stay in the data's pixels.
    pixel_fit : bool
        The network's tasks decide on a per-task pixel fit of their clicks and support masks,
        as the CLI and the plugin do (``guide(fit=True)``, ``guide_labels``); ``False``: the
        network alone.

    Returns
    -------
    list of EvalResult
        Per budget in ``points`` order: the ``revolver`` row then the ``rf`` row; the
        ``dense`` row where ``"dense"`` appears in ``points`` (else last).

    Raises
    ------
    ValueError
        Mismatched shapes, fewer than 2 slices, a support index out of range, a support slice
        without foreground or background, ``P < 1``, ``seeds < 1``, an unknown baseline.
    ImportError
        ``"rf"`` without scikit-learn (``pip install napari-revolver[bench]``).
    """
    budgets, use_rf, seeds = _parse_budgets(points, baselines, seeds)
    labels = np.asarray(labels)
    rgb = _check_shapes(image, labels)
    n = labels.shape[0]
    sup = _parse_support(support, n)
    fg = labels == label_value if label_value is not None else labels > 0
    _check_support_classes(fg, sup, label_value)
    query_list = _parse_queries(queries, n, sup)
    counts = [b for b in budgets if isinstance(b, int)]

    # Units of work: encode every slice, one propagation per (budget, seed) and for dense,
    # then the forest: its fits and one feature + prediction pass per query slice.
    total = n + len(counts) * seeds + ("dense" in budgets)
    if use_rf:
        total += len(counts) * seeds + len(query_list) + ("dense" in budgets)
    tick = _Progress(progress, total)

    predictor.set_volume(image, rgb=rgb, invert=invert, scale=scale)
    last = 0
    for d, _ in predictor.precompute():
        tick(d - last)
        last = d

    scorer = _NetworkScorer(predictor, fg, sup, query_list, local, pixel_fit)
    # The same points for the network and the forest: drawn per (budget, seed).
    draws = _draw_support_points(fg, sup, counts, seeds)
    rows: dict[tuple[str, int | str], EvalResult] = {}
    for p in counts:
        rows[("revolver", p)] = scorer.points_row(
            p, [draws[(p, seed)] for seed in range(seeds)], tick
        )
    if "dense" in budgets:
        rows[("dense", "dense")] = scorer.dense_row()
        tick()
    if use_rf:
        rows.update(
            _run_rf(image, fg, sup, query_list, counts, seeds, draws, tick, "dense" in budgets)
        )
    return _ordered_rows(rows, budgets, use_rf)


def _parse_budgets(
    points: Iterable[int | str], baselines: Sequence[str], seeds: int
) -> tuple[list[int | str], bool, int]:
    """Validate the budgets, baselines and seeds of :func:`evaluate_few_shot`.

    Returns
    -------
    budgets : list of int or "dense"
        The point budgets in order, ``"dense"`` appended when the dense baseline asks for it.
    use_rf : bool
        Whether random-forest rows are computed (their dependencies are checked).
    seeds : int
        ``seeds`` as a plain int.
    """
    budgets = _parse_points(points)
    base = list(dict.fromkeys(baselines))
    unknown = [b for b in base if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; expected some of {list(BASELINES)}")
    if isinstance(seeds, bool) or not isinstance(seeds, (int, np.integer)) or seeds < 1:
        raise ValueError(f"seeds must be an integer >= 1; got {seeds!r}")
    if "dense" in base and "dense" not in budgets:
        budgets.append("dense")
    if not budgets:
        raise ValueError("points is empty: give at least one budget (e.g. 1, 5 or 'dense')")
    use_rf = "rf" in base
    if use_rf:
        _require_bench()
    return budgets, use_rf, int(seeds)


def _check_support_classes(fg: np.ndarray, sup: tuple[int, ...], label_value: int | None) -> None:
    """Raise ``ValueError`` unless every support slice has foreground and background pixels."""
    for s in sup:
        n_fg = int(fg[s].sum())
        if n_fg == 0 or n_fg == fg[s].size:
            what = "foreground" if n_fg == 0 else "background"
            target = f"== {label_value}" if label_value is not None else "> 0"
            raise ValueError(
                f"support slice {s} has no {what} pixels (foreground: labels {target}); "
                f"expected both foreground and background on every support slice"
            )


def _parse_queries(queries: Sequence[int] | None, n: int, sup: tuple[int, ...]) -> list[int]:
    """Return the query slices: ``queries`` validated, or every slice that is not a support."""
    if queries is None:
        return [k for k in range(n) if k not in sup]
    out = [int(q) for q in queries]
    bad = [q for q in out if not 0 <= q < n or q in sup]
    if bad or not out:
        raise ValueError(
            f"queries must be slice indices in [0, {n - 1}] that are not support slices "
            f"{list(sup)}; got {list(out)}"
        )
    return out


class _Progress:
    """Count units of work and report ``progress(done, total)`` after each."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, k: int = 1) -> None:
        """Record ``k`` more units done."""
        self.done += k
        if self.progress is not None:
            self.progress(self.done, self.total)


#: Points drawn on each support slice: ``(yx (2P, 2), labels (2P,))``, positives first.
_SupportDraw = list[tuple[np.ndarray, np.ndarray]]


def _draw_support_points(
    fg: np.ndarray, sup: tuple[int, ...], counts: list[int], seeds: int
) -> dict[tuple[int, int], _SupportDraw]:
    """Draw ``P`` positive and ``P`` negative points per support slice, per (budget, seed)."""
    draws: dict[tuple[int, int], _SupportDraw] = {}
    for p in counts:
        for seed in range(seeds):
            rng = np.random.default_rng(seed)
            per_slice = []
            for s in sup:
                pos = sample_support_points(rng, fg[s], p)
                neg = sample_support_points(rng, ~fg[s], p)
                per_slice.append((np.concatenate([pos, neg]), np.array([1] * p + [0] * p, np.int8)))
            draws[(p, seed)] = per_slice
    return draws


@dataclass(frozen=True)
class _NetworkScorer:
    """Score tasks of the guided network on the query slices of one labelled stack."""

    predictor: RevolverPredictor
    fg: np.ndarray
    support: tuple[int, ...]
    queries: list[int]
    local: bool
    pixel_fit: bool = True

    def fit_used(self, task: Task) -> bool:
        """Whether the task's pixel fit counts in the scored predictions.

        Not a fit tried and not chosen (kept for its scores), and not with ``local``: a task
        followed by position keeps the network (``RevolverPredictor.propagate``).
        """
        return not self.local and task.pixel_fit is not None and task.pixel_fit.active

    def score(self, task: Task) -> tuple[float, float]:
        """Return the query-mean IoU and seconds per query slice of one task."""
        t0 = time.perf_counter()
        preds = {
            step.index[0]: step.result[0]
            for step in self.predictor.propagate(
                task, indices=self.queries, output="masks", local=self.local
            )
        }
        seconds = (time.perf_counter() - t0) / len(self.queries)
        ious = [foreground_iou(preds[k], self.fg[k]) for k in self.queries]
        return float(np.mean(ious)), seconds

    def points_row(self, p: int, draws: list[_SupportDraw], tick: Callable[[], None]) -> EvalResult:
        """Guide with each seed's points (``draws[seed]``) and summarise budget ``p``."""
        ious, secs, fits = [], [], 0
        for seed, per_slice in enumerate(draws):
            pts = np.concatenate(
                [
                    np.column_stack([np.full(len(yx), s, np.float64), yx])
                    for s, (yx, _) in zip(self.support, per_slice, strict=True)
                ]
            )
            lab = np.concatenate([lab for _, lab in per_slice])
            # As the CLI and the plugin guide class tasks: the clicks decide on a pixel fit.
            task = self.predictor.guide(pts, lab, name=f"P={p} seed={seed}", fit=self.pixel_fit)
            iou, sec = self.score(task)
            ious.append(iou)
            secs.append(sec)
            fits += self.fit_used(task)
            tick()
        return _row("revolver", str(p), ious, secs, self.support, len(self.queries), fits)

    def dense_row(self) -> EvalResult:
        """Guide with the whole support mask(s), as one task, and score it."""
        painted = {s: np.where(self.fg[s], 1, 2).astype(np.uint8) for s in self.support}
        task = self.predictor.guide_labels(painted, name="dense", fit=self.pixel_fit)
        iou, sec = self.score(task)
        fits = int(self.fit_used(task))
        return _row("dense", "dense", [iou], [sec], self.support, len(self.queries), fits)


def _ordered_rows(
    rows: dict[tuple[str, int | str], EvalResult], budgets: list[int | str], use_rf: bool
) -> list[EvalResult]:
    """Order rows per budget: ``revolver`` then ``rf``; ``dense`` where it was asked for."""
    out: list[EvalResult] = []
    for b in budgets:
        if b == "dense":
            out.append(rows[("dense", "dense")])
            if use_rf:
                out.append(rows[("rf", "dense")])
            continue
        out.append(rows[("revolver", b)])
        if use_rf:
            out.append(rows[("rf", b)])
    return out


def _run_rf(
    image: Any,
    fg: np.ndarray,
    sup: tuple[int, ...],
    queries: list[int],
    counts: list[int],
    seeds: int,
    draws: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]],
    tick: Callable[[], None],
    dense: bool = False,
) -> dict[tuple[str, int | str], EvalResult]:
    """Score the random forest: one per (budget, seed), each query's features computed once.

    With ``dense``, one more forest learns from the whole support mask, as a user who paints
    every pixel of the support slices in ilastik: up to :data:`DENSE_RF_PIXELS` random
    pixels of each class per support slice (seed 0), which bounds its fitting time.

    Seconds per slice = the query's feature time + that forest's prediction time, averaged.
    """
    helper = RandomForestBaseline()
    sup_feats = [helper.features(np.asarray(image[s])) for s in sup]
    forests: dict[tuple[int | str, int], RandomForestBaseline] = {}
    for p in counts:
        for seed in range(seeds):
            per_slice = draws[(p, seed)]
            forests[(p, seed)] = RandomForestBaseline(seed=seed).fit(
                sup_feats, [yx for yx, _ in per_slice], [lab for _, lab in per_slice]
            )
            tick()
    if dense:
        rng = np.random.default_rng(0)
        pts, labs = [], []
        for s in sup:
            yx = [sample_support_points(rng, m, DENSE_RF_PIXELS) for m in (fg[s], ~fg[s])]
            pts.append(np.concatenate(yx))
            labs.append(np.repeat([1, 0], [len(yx[0]), len(yx[1])]))
        forests[("dense", 0)] = RandomForestBaseline(seed=0).fit(sup_feats, pts, labs)
        tick()
    del sup_feats
    iou_sum = {key: 0.0 for key in forests}
    predict_s = {key: 0.0 for key in forests}
    feature_s = 0.0
    for k in queries:
        t0 = time.perf_counter()
        feats = helper.features(np.asarray(image[k]))
        feature_s += time.perf_counter() - t0
        for key, forest in forests.items():
            t0 = time.perf_counter()
            pred = forest.predict(feats)
            predict_s[key] += time.perf_counter() - t0
            iou_sum[key] += foreground_iou(pred, fg[k])
        tick()
    nq = len(queries)
    rows: dict[tuple[str, int | str], EvalResult] = {}
    for p in counts:
        ious = [iou_sum[(p, seed)] / nq for seed in range(seeds)]
        secs = [(feature_s + predict_s[(p, seed)]) / nq for seed in range(seeds)]
        rows[("rf", p)] = _row("rf", str(p), ious, secs, sup, nq)
    if dense:
        key = ("dense", 0)
        secs = [(feature_s + predict_s[key]) / nq]
        rows[("rf", "dense")] = _row("rf", "dense", [iou_sum[key] / nq], secs, sup, nq)
    return rows


def _row(
    method: str,
    points: str,
    ious: list[float],
    secs: list[float],
    sup: tuple[int, ...],
    n_queries: int,
    fits_used: int | None = None,
) -> EvalResult:
    return EvalResult(
        method=method,
        points=points,
        iou_mean=float(np.mean(ious)),
        iou_std=float(np.std(ious)),
        seconds_per_slice=float(np.mean(secs)),
        support=tuple(sup),
        n_queries=n_queries,
        seeds=len(ious),
        fits_used=fits_used,
    )


# ------------------------------------------------------------------------------------ table
def format_table(results: Sequence[EvalResult]) -> str:
    """Format results as a markdown table.

    Parameters
    ----------
    results : sequence of EvalResult
        Rows, in the order to print them.

    Returns
    -------
    str
        One line per row after a header: method, points per class, IoU mean and standard
        deviation, seeds, milliseconds per query slice (``n/a`` when not finite) and how many
        of the seeds' tasks chose a pixel fit (``n/a`` for the forest).
    """
    lines = [
        "| method | points per class | IoU mean | IoU std | seeds | ms / slice | pixel fit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ms = 1000 * r.seconds_per_slice
        ms_s = f"{ms:.1f}" if math.isfinite(ms) else "n/a"
        fit = "n/a" if r.fits_used is None else f"{r.fits_used} of {r.seeds}"
        lines.append(
            f"| {r.method} | {r.points} | {r.iou_mean:.3f} | {r.iou_std:.3f} | {r.seeds} | "
            f"{ms_s} | {fit} |"
        )
    return "\n".join(lines)
