"""Object evaluation: the simulated annotator of interactive segmentation, and 3D following.

Clicks (the protocol of DIOS, RITM and their successors): the first click goes at the object's
interior point farthest from its boundary; each next click goes at the centre (the point
farthest from the boundary) of the largest error region, positive on a miss and negative on a
false positive. The scores are the mean IoU after 1, 3 and 5 clicks and NoC@85 / NoC@90, the
clicks needed to reach that IoU (``max_clicks`` when never reached, as is the convention).

Following (video object segmentation, paper sec. 5.3-5.4): one click on each of K objects on one
slice, the objects propagated through the stack, and each object's 3D IoU against its own
ground-truth component.

No napari or Qt here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from .evaluate import foreground_iou

if TYPE_CHECKING:
    from .predictor import RevolverPredictor

__all__ = [
    "ClickResult",
    "FollowResult",
    "ObjectSummary",
    "evaluate_clicks",
    "evaluate_following",
    "next_click",
    "pick_objects",
    "simulate_clicks",
    "summarise_clicks",
    "summarise_following",
]

#: The IoU levels of NoC@85 and NoC@90.
NOC_LEVELS = (0.85, 0.90)


def _interior_distance(region: np.ndarray) -> np.ndarray:
    """Distance of each pixel of ``region`` to its boundary, the image border included."""
    padded = np.pad(region, 1)
    return ndimage.distance_transform_edt(padded)[1:-1, 1:-1]


def next_click(pred: np.ndarray, truth: np.ndarray) -> tuple[tuple[int, int], int] | None:
    """Place the simulated annotator's next click.

    Parameters
    ----------
    pred : np.ndarray
        ``(H, W)`` bool, the current prediction (all False before the first click).
    truth : np.ndarray
        ``(H, W)`` bool, the object.

    Returns
    -------
    ((y, x), label) or None
        The point farthest from the boundary of the largest error region (by that distance,
        as RITM does), 1 on a miss and 0 on a false positive; ``None`` when there is no error.
    """
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    best: tuple[float, tuple[int, int], int] | None = None
    for region, label in ((truth & ~pred, 1), (pred & ~truth, 0)):
        if not region.any():
            continue
        d = _interior_distance(region)
        k = int(np.argmax(d))
        score = float(d.flat[k])
        if best is None or score > best[0]:
            best = (score, tuple(int(v) for v in np.unravel_index(k, d.shape)), label)  # type: ignore[assignment]
    return None if best is None else (best[1], best[2])


@dataclass(frozen=True)
class ClickResult:
    """One object's IoU after each simulated click.

    Attributes
    ----------
    ious : tuple of float
        ``ious[i]``: the IoU after ``i + 1`` clicks. Once it reaches the highest NoC level
        past click 5 the annotator stops, and later entries repeat the last value.
    max_clicks : int
        The click budget.
    seconds : tuple of float
        ``seconds[i]``: the time the segmentation after click ``i + 1`` took (what a user
        waits for; the annotator's own work not counted). Empty where not timed.
    """

    ious: tuple[float, ...]
    max_clicks: int
    seconds: tuple[float, ...] = ()

    def iou_at(self, k: int) -> float:
        """IoU after ``k`` clicks (the last value when the annotator stopped earlier)."""
        return self.ious[min(k, len(self.ious)) - 1]

    def noc(self, level: float) -> int:
        """Clicks needed to reach IoU ``level``; ``max_clicks`` when never reached."""
        for i, v in enumerate(self.ious):
            if v >= level:
                return i + 1
        return self.max_clicks


def simulate_clicks(
    segment: Callable[[np.ndarray, np.ndarray], np.ndarray],
    truth: np.ndarray,
    *,
    max_clicks: int = 20,
) -> ClickResult:
    """Run the simulated annotator on one object.

    Parameters
    ----------
    segment : callable
        ``segment(points (N, 2) as (y, x), labels (N,))`` returns the ``(H, W)`` bool mask of
        the object the clicks select.
    truth : np.ndarray
        ``(H, W)`` bool, the object.
    max_clicks : int
        Click budget (20 in the literature).

    Returns
    -------
    ClickResult
    """
    truth = np.asarray(truth, bool)
    if not truth.any():
        raise ValueError("truth is empty: the annotator needs an object to click")
    pred = np.zeros_like(truth)
    pts: list[tuple[int, int]] = []
    labs: list[int] = []
    ious: list[float] = []
    seconds: list[float] = []
    for i in range(max_clicks):
        click = next_click(pred, truth)
        if click is None:
            ious.append(1.0)
            break
        pts.append(click[0])
        labs.append(click[1])
        t0 = time.perf_counter()
        pred = np.asarray(segment(np.asarray(pts, np.float64), np.asarray(labs, np.int8)), bool)
        seconds.append(time.perf_counter() - t0)
        ious.append(foreground_iou(pred, truth))
        if i + 1 >= 5 and ious[-1] >= max(NOC_LEVELS):
            break
    return ClickResult(tuple(ious), max_clicks, tuple(seconds))


def pick_objects(labels: np.ndarray, k: int, *, min_area: int = 64, seed: int = 0) -> list[int]:
    """Choose up to ``k`` object ids of a label image, seeded, each at least ``min_area`` pixels.

    Parameters
    ----------
    labels : np.ndarray
        Instance ids, any shape, 0 background.
    k : int
        Objects to pick.
    min_area : int
        Smaller objects are left out (they are too small to click reliably at this scale).
    seed : int
        Seed of the draw.

    Returns
    -------
    list of int
        Sorted ids.
    """
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    ids = ids[counts >= min_area]
    if len(ids) > k:
        ids = np.random.default_rng(seed).choice(ids, k, replace=False)
    return sorted(int(i) for i in ids)


@dataclass(frozen=True)
class ObjectSummary:
    """Mean click scores over objects.

    Attributes
    ----------
    n_objects : int
    iou_at : dict of int to float
        Mean IoU after 1, 3 and 5 clicks.
    noc : dict of float to float
        Mean NoC at 0.85 and 0.90.
    click_ms : float or None
        Median time of a click's segmentation over every click of every object, in
        milliseconds (``None`` where none was timed).
    """

    n_objects: int
    iou_at: dict[int, float]
    noc: dict[float, float]
    click_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-friendly built-in types."""
        return {
            "n_objects": self.n_objects,
            **{f"iou@{k}": v for k, v in self.iou_at.items()},
            **{f"noc@{round(100 * k)}": v for k, v in self.noc.items()},
            **({} if self.click_ms is None else {"click_ms": self.click_ms}),
        }


def summarise_clicks(results: Sequence[ClickResult]) -> ObjectSummary:
    """Average :class:`ClickResult` s into IoU after 1, 3, 5 clicks and NoC@85 / NoC@90."""
    if not results:
        raise ValueError("no object was evaluated")
    seconds = [t for r in results for t in r.seconds]
    return ObjectSummary(
        len(results),
        {k: float(np.mean([r.iou_at(k) for r in results])) for k in (1, 3, 5)},
        {lv: float(np.mean([r.noc(lv) for r in results])) for lv in NOC_LEVELS},
        1e3 * float(np.median(seconds)) if seconds else None,
    )


def evaluate_clicks(
    predictor: RevolverPredictor,
    image: Any,
    labels: np.ndarray,
    *,
    objects_per_slice: int = 10,
    max_clicks: int = 20,
    min_area: int = 64,
    seed: int = 0,
    invert: bool = False,
    rgb: bool | None = None,
    scale: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[ClickResult]:
    """Score object clicks on every slice of a labelled stack with the simulated annotator.

    Parameters
    ----------
    predictor : RevolverPredictor
        The network; its volume is replaced by ``image``.
    image : array-like
        ``(N, H, W)`` or ``(N, H, W, 3)`` slices (or one ``(H, W)`` image).
    labels : np.ndarray
        ``(N, H, W)`` instance ids (or one ``(H, W)``), 0 background.
    objects_per_slice : int
        Objects drawn per slice (seeded), each clicked from scratch.
    max_clicks : int
        Click budget per object.
    min_area : int
        Objects smaller than this are not drawn.
    seed : int
        Seed of the object draw.
    invert : bool
        Dark objects on a light background (``set_volume(invert=True)``).
    rgb : bool, optional
        Whether the last image axis is RGB; default guessed.
    scale : float
        Slices resized by this factor before the network (``set_volume(scale=...)``); clicks
        and scores stay in the data's pixels.
    progress : callable, optional
        ``progress(done, total)`` after each object.

    Returns
    -------
    list of ClickResult
        One per object, slice by slice.
    """
    labels = np.asarray(labels)
    image = image if labels.ndim == 3 else np.asarray(image)[None]
    labels = labels if labels.ndim == 3 else labels[None]
    predictor.set_volume(image, rgb=rgb, invert=invert, scale=scale)
    todo = [
        (z, i)
        for z in range(labels.shape[0])
        for i in pick_objects(labels[z], objects_per_slice, min_area=min_area, seed=seed + z)
    ]
    out: list[ClickResult] = []
    for n, (z, i) in enumerate(todo):

        def segment(pts: np.ndarray, lab: np.ndarray, z: int = z) -> np.ndarray:
            zyx = np.column_stack([np.full(len(pts), z, np.float64), pts])
            task = predictor.guide(zyx, lab, kind="object")
            return predictor.predict_slice(z, task)

        out.append(simulate_clicks(segment, labels[z] == i, max_clicks=max_clicks))
        if progress is not None:
            progress(n + 1, len(todo))
    return out


@dataclass(frozen=True)
class FollowResult:
    """One followed object's 3D score.

    Attributes
    ----------
    object_id : int
        Its id in the ground truth.
    iou : float
        3D IoU of the followed object with its ground-truth component.
    slices_true, slices_predicted : int
        Slices the object spans in the ground truth and in the prediction.
    """

    object_id: int
    iou: float
    slices_true: int
    slices_predicted: int


def summarise_following(results: Sequence[FollowResult]) -> dict[str, float]:
    """Mean 3D IoU and the fraction of objects at IoU >= 0.5."""
    if not results:
        raise ValueError("no object was followed")
    ious = np.array([r.iou for r in results])
    return {
        "n_objects": float(len(ious)),
        "iou_mean": float(ious.mean()),
        "frac_iou_ge_0.5": float((ious >= 0.5).mean()),
    }


def evaluate_following(
    predictor: RevolverPredictor,
    image: Any,
    labels: np.ndarray,
    object_ids: Sequence[int],
    *,
    start: int | None = None,
    invert: bool = False,
    scale: float = 1.0,
    given_start: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> list[FollowResult]:
    """Click each object once on one slice, follow them all through z, score each in 3D.

    Parameters
    ----------
    predictor : RevolverPredictor
        The network; its volume is replaced by ``image``.
    image : array-like
        ``(Z, H, W)`` stack.
    labels : np.ndarray
        ``(Z, H, W)`` instance ids (3D objects), 0 background.
    object_ids : sequence of int
        Objects to follow.
    start : int, optional
        The clicked slice; default, per object, the slice where it is largest.
    invert : bool
        Dark objects on a light background.
    scale : float
        Slices resized by this factor before the network; scores in the data's pixels.
    given_start : bool
        Give each object its true mask on the clicked slice (``Task.object_masks``, as a mask
        painted by hand): scores the following alone, without the one click's segmentation.
    progress : callable, optional
        ``progress(done, total)`` per slice of the propagation.

    Returns
    -------
    list of FollowResult
        In ``object_ids`` order.
    """
    labels = np.asarray(labels)
    predictor.set_volume(image, invert=invert, scale=scale)
    tasks = []
    for value, i in enumerate(object_ids, start=1):
        obj = labels == i
        z = int(np.argmax(obj.reshape(len(obj), -1).sum(1))) if start is None else start
        if not obj[z].any():
            raise ValueError(f"object {i} is not on slice {z}")
        d = _interior_distance(obj[z])
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        task = predictor.guide(
            [[z, y, x]], [1], kind="object", name=f"object {i}", label_value=value
        )
        if given_start:
            task = replace(task, object_masks=(((z,), obj[z]),))
        tasks.append(task)
    out = np.zeros(labels.shape, np.uint32)
    for step in predictor.propagate(tasks):
        out[step.index] = step.result
        if progress is not None:
            progress(step.done, step.total)
    results = []
    for value, i in enumerate(object_ids, start=1):
        pred, truth = out == value, labels == i
        results.append(
            FollowResult(
                i,
                foreground_iou(pred, truth),
                int(truth.any(axis=(1, 2)).sum()),
                int(pred.any(axis=(1, 2)).sum()),
            )
        )
    return results
