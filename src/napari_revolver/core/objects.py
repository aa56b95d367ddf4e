"""Object tasks: the one object under the clicks, and that object followed through z and t.

A class task says "things like these"; an object task says "this one". The network's class
probability (guided by the object's positive clicks, with the local prior on the clicked slice)
says what looks like the object; the geometry here says which of those pixels are *it*:

* On a clicked slice (:func:`select_object`), a seeded watershed on the distance transform of
  the probable region picks the object: its marker is the positive clicks, competitors are the
  other confident cores, the negative clicks and, where the clicked region is a clump much
  larger than the disc at the click, the other distance peaks in it. A negative click is a
  competitor marker, never a negative in the guide: on a look-alike neighbour it would teach
  the network that the object's own appearance is background (the clicked object would shrink
  with it).
* Through the stack (:func:`follow_objects`), every object moves outward from its annotated
  slices one slice at a time. On each slice one head pass serves all objects, guided by the
  clicks and by the masks just predicted on the neighbouring slice (dense support: the memory
  of their appearance; the local prior: of their position). A joint watershed seeded by each
  object's eroded previous mask assigns every pixel to at most one object. An object stops
  where its marker finds nothing probable, where its area jumps, or where the new region
  overlaps the previous one too little (a look-alike neighbour): the step reports where and why.

No napari or Qt here.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from skimage.segmentation import watershed

from . import snap
from .evaluate import foreground_iou
from .model.click_refiner import (
    ClickRefiner,
    Window,
    paste_logits,
    stack_inputs,
    window_around,
)
from .model.guide import local_prior
from .prior import annotated_slices, dense_support
from .propagation import ObjectEvent, PropagationStep
from .snap import bounding_box as _mask_box
from .task import Task
from .volume import VolumeInfo

if TYPE_CHECKING:
    from .model.guide import GuideOutput
    from .pixel_fit import PixelFit
    from .predictor import RevolverPredictor

__all__ = [
    "FollowParams",
    "click_threshold",
    "clicks_on",
    "follow_objects",
    "follow_step",
    "look_fit",
    "memory_probability",
    "obey_clicks",
    "object_order",
    "reaches_edge",
    "refine_once",
    "refined_mask",
    "refined_masks",
    "refiner_inputs",
    "refiner_window",
    "select_in_box",
    "select_object",
    "without_last_click",
]

Key = tuple[int, ...]

#: Confident cores: probability above this is an object's centre, not its rim.
CORE = 0.8
#: Background marker: probability below this is background for sure.
BACKGROUND = 0.1


@dataclass(frozen=True)
class FollowParams:
    """How objects are followed from slice to slice.

    Attributes
    ----------
    min_overlap : float
        The new mask must cover at least this share of the previous one's eroded core, and
        IoU with the previous mask at least ``min_iou``; otherwise the object has ended (or
        what is there is another object).
    min_iou : float
        See ``min_overlap``.
    max_growth, max_shrink : float
        Largest area ratio new / previous (and previous / new) accepted in one step.
    erosion : float
        The previous mask is eroded by this share of its radius to seed the next slice
        (objects drift; the core of the last mask is still inside them).
    reach : float or None
        With a number, the new mask stays within the previous one dilated by this share of its
        radius (an object moves and grows a little from one slice to the next; a leak into a
        neighbour's territory stops there). ``None`` (the default): no such bound. Measured
        with 15 objects each (``benchmarks/objects.py``), 0.3 helps plant cells through z
        (3D IoU 0.10 -> 0.23) and hurts EM mitochondria (0.21 -> 0.08), which drift further
        between sections.
    snap : float or None
        Each continuing object's new mask (the follower's; without a follower, its last mask)
        is redrawn on the image's edges within this share of its radius (:mod:`.snap`).
        ``None``: no snapping (without a follower, the watershed's mask is the new mask).
    look : float or None
        With a follower, who says whether an object goes on. A number: the follower's new mask
        must pass the rules above, and the object's *look* must be under it: the mean
        probability of a pixel fit of the objects against their surroundings on the slices
        they were clicked on (:func:`look_fit`) at least this much. Where that fit cannot be
        made, or does not tell the objects from their surroundings better than the network
        (its cross-validation on those slices), the watershed decides, as with ``None``: the
        rules on the region each object's last mask seeds in the memory probability.
        Measured (``benchmarks/objects.py``, :doc:`objects`): the watershed's region ends
        most objects where they go on (EM mitochondria leak into the cytoplasm, plant cells'
        regions collapse), and the follower alone never lets go of an EM mitochondrion.
    look_band : int
        Pixels around the objects left out of the look fit's negatives (their rims).
    """

    min_overlap: float = 0.3
    min_iou: float = 0.25
    max_growth: float = 2.5
    max_shrink: float = 4.0
    erosion: float = 0.3
    reach: float | None = None
    snap: float | None = 0.25
    look: float | None = 0.3
    look_band: int = 8


# ------------------------------------------------------------------------- clicked slice
def _disc(mask: np.ndarray, yx: Sequence[tuple[int, int]], r: int, value: int) -> None:
    """Set discs of radius ``r`` around points ``yx`` of ``mask`` to ``value`` (in place)."""
    h, w = mask.shape
    for y, x in yx:
        y0, y1, x0, x1 = max(0, y - r), min(h, y + r + 1), max(0, x - r), min(w, x + r + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        mask[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = value


def _markers(
    prob: np.ndarray, pos: np.ndarray, neg: np.ndarray, region: np.ndarray, dist: np.ndarray
) -> np.ndarray:
    """Watershed markers: 1 the object (its clicks and cores), 2 background, 3+ competitors.

    ``dist`` is the distance transform of ``region``.
    """
    cores, n = ndimage.label(prob > CORE)
    pos_cores = set(cores[tuple(pos.T)].tolist()) - {0}
    lut = np.arange(n + 1, dtype=np.int32) + 2  # other cores compete (3, 4, ...)
    lut[0] = 0
    lut[list(pos_cores)] = 1
    markers = lut[cores]
    r = _radius_from(dist, pos[0])
    obj = markers == 1
    if obj.sum() > 2.5 * np.pi * r * r:
        # A clump far larger than the disc at the click: its other distance peaks are other
        # objects, and the object is only what floods from the clicks.
        size = int(2 * r) | 1
        peaks = (dist == ndimage.maximum_filter(dist, size=size)) & obj & (dist >= 0.5 * r)
        nxt = int(markers.max()) + 1
        for py, px in np.argwhere(peaks):
            if np.min(np.hypot(pos[:, 0] - py, pos[:, 1] - px)) > 1.5 * r:
                _disc(markers, [(int(py), int(px))], 1, nxt)
                nxt += 1
        markers[obj & (markers == 1)] = 0
    nxt = int(markers.max()) + 1
    for v in neg:
        # A negative click takes back the core around it, as far as the region's edge (a
        # neighbour merged into the object, or a rim the object overshot).
        d = max(int(dist[tuple(v)]) + 1, 2)
        near = np.zeros(markers.shape, np.uint8)
        _disc(near, [tuple(v)], d, 1)
        markers[(near > 0) & (markers == 1)] = 0
        _disc(markers, [tuple(v)], 2, nxt)
        nxt += 1
    _disc(markers, [tuple(v) for v in pos], 2, 1)
    markers[~region] = 0
    markers[prob < BACKGROUND] = 2
    return markers


def _radius_from(dist: np.ndarray, p: np.ndarray, steps: int = 8) -> float:
    """Return the object's radius seen from a click at ``p``: the distance peak it reaches.

    A click need not sit at the object's centre: off centre, or beside a dim spot inside the
    object, the distance to the region's edge at the click is far below the object's radius.
    The disc of that distance is searched for a larger distance, and the disc of that one,
    until it grows by less than 5% (at most ``steps`` times). In a clump of round objects
    this stops at the clicked one's centre: the disc reaches the neighbours only through
    their common edge, where the distance is small. At least 2 pixels.
    """
    h, w = dist.shape
    y, x = int(p[0]), int(p[1])
    r = float(dist[y, x])
    for _ in range(steps):
        k = int(np.ceil(r))
        y0, y1, x0, x1 = max(0, y - k), min(h, y + k + 1), max(0, x - k), min(w, x + k + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        reached = float(dist[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r].max())
        if reached <= 1.05 * r:
            break
        r = reached
    return max(r, 2.0)


def _region(prob: np.ndarray, pos: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels that may belong to the object: probable, plus what a positive click adds."""
    region = prob > threshold
    for y, x in pos[1:]:
        if region[y, x]:
            continue
        # A positive click on a miss: the disc reaching from it to the probable region, and
        # what is somewhat probable in that disc.
        gap = distance_to(region, (int(y), int(x)))  # inf: nothing probable to reach
        d = max(int(gap) + 1, 3) if np.isfinite(gap) else 3
        disc = np.zeros(region.shape, np.uint8)
        _disc(disc, [(int(y), int(x))], d, 1)
        region |= (disc > 0) & (prob > threshold / 2.5)
        _disc(region.view(np.uint8), [(int(y), int(x))], max(d // 2, 2), 1)
    return region


def select_object(
    prob: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
) -> np.ndarray:
    """Select the single object under the positive clicks of one slice.

    Parameters
    ----------
    prob : np.ndarray
        ``(H, W)`` float class probability of what looks like the object.
    points : np.ndarray
        ``(N, 2)`` ``(y, x)`` clicks on this slice, in pixels.
    labels : np.ndarray
        ``(N,)`` 1 positive, 0 negative; at least one positive.
    threshold : float
        Probability threshold of the object's extent.

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool: the connected object containing the positive clicks.

    Raises
    ------
    ValueError
        No positive click, or shapes that do not match.
    """
    prob = np.asarray(prob, np.float32)
    yx = _click_pixels(points, prob.shape)
    labels = np.asarray(labels)
    if yx.shape != (len(labels), 2) or prob.ndim != 2:
        raise ValueError(
            f"expected prob (H, W), points (N, 2) and labels (N,); got {prob.shape}, "
            f"{np.shape(points)} and {labels.shape}"
        )
    if not (labels == 1).any():
        raise ValueError("an object needs at least one positive click on its slice")
    h, w = prob.shape
    found = select_in_box(prob, (0, h, 0, w), (h, w), points, labels, threshold=threshold)
    assert found is not None  # the whole slice is known
    return found[0]


#: Margin of the selection window around what can be the object, in pixels.
WINDOW_PAD = 32

#: Pixels around an object's positive clicks within which the predictor selects it where the
#: probable parts under them reach far (``select_in_box(bound=...)``).
SELECT_BOUND = 128


def _window(
    prob: np.ndarray, pos: np.ndarray, area: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """Find the part of the slice that decides the object under ``pos`` (``None``: all of it).

    The object can only grow inside the 8-connected parts of ``prob >= BACKGROUND`` that hold
    its positive clicks (lower probability is background from the start); those parts and the
    positive clicks, padded by :data:`WINDOW_PAD`, bound the window. A negative click outside
    it cannot change the object: it is not in those parts, where competitors start. Distances
    inside the window are the same as on the whole slice, since the parts are surrounded by
    background. ``area``: the slice's pixels, when ``prob`` is a part of it (default
    ``prob.size``); a window over half of them is ``None``.
    """
    support, _ = ndimage.label(prob >= BACKGROUND, structure=np.ones((3, 3), bool))
    ids = np.unique(support[tuple(pos.T)])
    ids = ids[ids > 0]
    if not len(ids):
        return None
    ys, xs = np.nonzero(np.isin(support, ids))
    ys, xs = np.concatenate([ys, pos[:, 0]]), np.concatenate([xs, pos[:, 1]])
    h, w = prob.shape
    y0, y1 = max(0, int(ys.min()) - WINDOW_PAD), min(h, int(ys.max()) + WINDOW_PAD + 1)
    x0, x1 = max(0, int(xs.min()) - WINDOW_PAD), min(w, int(xs.max()) + WINDOW_PAD + 1)
    if (y1 - y0) * (x1 - x0) > 0.5 * (h * w if area is None else area):
        return None
    return (y0, y1), (x0, x1)


def select_in_box(
    prob: np.ndarray,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    points: np.ndarray,
    labels: np.ndarray,
    *,
    threshold: float = 0.5,
    bound: int | None = None,
) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`select_object` from the probability inside a box of the slice only.

    Parameters
    ----------
    prob : np.ndarray
        ``(y1 - y0, x1 - x0)`` the probability on the slice pixels ``box``.
    box : tuple of int
        ``(y0, y1, x0, x1)``.
    shape : tuple of int
        ``(H, W)`` of the slice.
    points, labels, threshold
        As :func:`select_object`.

    Returns
    -------
    (np.ndarray, np.ndarray) or None
        The ``(H, W)`` bool selection, what :func:`select_object` gives on the whole slice
        whatever the probability outside the box, and an ``(N,)`` bool mask of the clicks
        that decide it: the positive ones, and the negative ones in the window around the
        probable parts that hold the positives. A negative click farther away changes nothing
        (it starts no competitor there), and is best not shown to the click refiner, whose
        window would grow to take it in. ``None`` where the answer could depend on the
        probability outside the box (the part that decides the object reaches a side of the
        box that is not the slice's edge, or is not found) or a positive click is outside it;
        never when the box is the whole slice and there is a positive click.

    Other Parameters
    ----------------
    bound : int, optional
        Where the probable parts under the clicks reach beyond the box, or cover most of the
        slice (touching cells in a clump, EM neurites), select inside the positive clicks'
        box grown by ``bound`` pixels instead (:func:`_bounded_select`), and keep that
        where the object stays clear of that box's sides inside the slice. It is then what
        the whole slice gives unless the competition between the clump's objects reaches
        farther than ``bound`` (a scratch check: the same mask on 143 of 144 clicks of EM
        neurites, phase-contrast cells and nuclei at 128 px). ``None``: never.
    """
    y0, y1, x0, x1 = box
    h, w = shape
    yx = _click_pixels(points, shape) - (y0, x0)
    labels = np.asarray(labels)
    pos = yx[labels == 1]
    if not len(pos) or not ((pos >= 0) & (pos < prob.shape)).all():
        return None
    # Everything that can decide the object lies in a window around it: work there only,
    # unless that window is most of the slice.
    window = _window(prob, pos, area=h * w)
    beyond = window is not None and (
        (window[0][0] == 0 < y0)
        or (window[1][0] == 0 < x0)
        or (y0 + window[0][1] == y1 < h)
        or (x0 + window[1][1] == x1 < w)
    )
    if (window is None or beyond) and bound is not None:
        found = _bounded_select(prob, box, shape, yx, labels, threshold, bound)
        if found is not None:
            return found
    if window is None:
        if box != (0, h, 0, w):
            return None
        return _select(prob, pos, yx[labels == 0], threshold), np.ones(len(labels), bool)
    if beyond:
        return None
    (wy0, wy1), (wx0, wx1) = window
    inside = (yx >= (wy0, wx0)).all(axis=1) & (yx < (wy1, wx1)).all(axis=1)
    deciding = (labels == 1) | inside
    neg = yx[(labels == 0) & inside]
    out = np.zeros(shape, bool)
    out[y0 + wy0 : y0 + wy1, x0 + wx0 : x0 + wx1] = _select(
        prob[wy0:wy1, wx0:wx1], pos - (wy0, wx0), neg - (wy0, wx0), threshold
    )
    return out, deciding


def _bounded_select(
    prob: np.ndarray,
    box: tuple[int, int, int, int],
    shape: tuple[int, int],
    yx: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    bound: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Select inside the positive clicks' box grown by ``bound`` px (within ``box``).

    ``prob`` and ``yx`` (integer clicks) are in ``box`` coordinates. Returns what
    :func:`select_in_box` does, or ``None`` where the object reaches a side of the grown box
    that is not the slice's edge (it may go on beyond: the caller decides on more).
    """
    y0, _, x0, _ = box
    bh, bw = prob.shape
    pos = yx[labels == 1]
    cy0, cx0 = (int(v) for v in np.maximum(pos.min(0) - bound, 0))
    cy1, cx1 = (int(v) for v in np.minimum(pos.max(0) + bound + 1, (bh, bw)))
    inside = (yx >= (cy0, cx0)).all(axis=1) & (yx < (cy1, cx1)).all(axis=1)
    neg = yx[(labels == 0) & inside]
    sel = _select(prob[cy0:cy1, cx0:cx1], pos - (cy0, cx0), neg - (cy0, cx0), threshold)
    ys, xs = slice(y0 + cy0, y0 + cy1), slice(x0 + cx0, x0 + cx1)
    if _touches_inner_side(sel, ys, xs, shape):
        return None
    out = np.zeros(shape, bool)
    out[ys, xs] = sel
    return out, (labels == 1) | inside


def _select(prob: np.ndarray, pos: np.ndarray, neg: np.ndarray, threshold: float) -> np.ndarray:
    """Run :func:`select_object` on ``prob`` (the slice or a window of it)."""
    region = _region(prob, pos, threshold)
    dist = ndimage.distance_transform_edt(region)
    markers = _markers(prob, pos, neg, region, dist)
    return _near_first(flood_object(dist, markers, region), pos)


def flood_object(dist: np.ndarray, markers: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Return the object's basin: marker 1's in the watershed of ``-dist`` from ``markers``.

    The watershed floods the pixels of ``region`` that no marker holds, from the markers
    beside them. As ``watershed(-dist, markers, mask=region | (markers == 2)) == 1``, but a
    marker pixel with no unmarked ``region`` pixel among its 4 neighbours floods nothing,
    so only the others seed it: the background marker covers most of a slice, and its pixels
    would fill the watershed's queue for nothing (3-4x the time on EM and phase-contrast
    slices). The basin is the same up to ties: seeds of equal height leave the queue in an
    order that depends on what else it holds (on 400 random maps, 12 basins differed by 1-8
    pixels), as with the whole watershed between a window and its slice.

    Parameters
    ----------
    dist : np.ndarray
        ``(H, W)`` float, the distance transform of ``region``.
    markers : np.ndarray
        ``(H, W)`` int, :func:`_markers`: 1 the object, 2 background, 3+ competitors.
    region : np.ndarray
        ``(H, W)`` bool, the pixels that may belong to the object.

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool.
    """
    free = region & (markers == 0)
    seeds = np.where(ndimage.binary_dilation(free), markers, 0)
    basins = watershed(-dist, seeds, mask=free | (seeds > 0))
    return (basins == 1) | (markers == 1)


def distance_to(mask: np.ndarray, yx: tuple[int, int]) -> float:
    """Euclidean distance from pixel ``yx`` to the nearest ``True`` pixel of ``mask`` ``(H, W)``.

    ``distance_transform_edt(~mask)[yx]`` without the transform of the whole mask: the
    nearest pixel is searched in growing squares around ``yx`` (one within the square's
    half-side is the nearest of all). ``inf`` for an empty mask.
    """
    y, x = yx
    h, w = mask.shape
    k = 16
    while True:
        y0, x0 = max(0, y - k), max(0, x - k)
        ys, xs = np.nonzero(mask[y0 : y + k + 1, x0 : x + k + 1])
        d = float(np.sqrt(((ys + y0 - y) ** 2 + (xs + x0 - x) ** 2).min())) if len(ys) else np.inf
        whole = y0 == 0 and x0 == 0 and y + k >= h - 1 and x + k >= w - 1
        if d <= k or whole:
            return d
        k *= 4


def _near_first(mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Keep the part of ``mask`` at the first positive click, and parts of others close to it.

    A positive click far from the object (beyond twice its radius) starts nothing new.
    """
    comp, _ = ndimage.label(mask)
    first = comp[tuple(pos[0])]
    if not first:
        return np.zeros_like(mask)
    obj = comp == first
    if len(pos) == 1:
        return obj
    # Distances in the object's box: as on the whole mask, at a fraction of the cost.
    box = _mask_box(obj, 1)
    r = max(float(ndimage.distance_transform_edt(obj[box]).max()), 2.0)
    near = [p for p in pos[1:] if distance_to(obj, (int(p[0]), int(p[1]))) <= 2 * r]
    keep = {int(first)} | {int(comp[tuple(p)]) for p in near}
    keep.discard(0)
    return np.isin(comp, list(keep))


def obey_clicks(mask: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Make an object's mask agree with every click on its slice.

    The network (the click refiner above all) may draw over a negative click or leave out a
    positive one. The click would then change nothing, and the annotator would click there
    again and again. Here:

    * a positive click on a miss, within twice the object's radius of it (a click farther
      away starts nothing new, as in :func:`select_object`), adds the disc around it that is
      just wide enough to reach the mask;
    * then a negative click inside the mask (a disc may have reached over one) cuts the mask
      along its narrowest necks between the positive clicks and the negative ones (a seeded
      watershed on its distance transform), and the negative clicks' side goes: a
      protrusion at its neck, a merged neighbour at the waist between the two, and on a
      convex mask the part behind the click.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` bool, the object's mask.
    points : np.ndarray
        ``(N, 2)`` ``(y, x)`` clicks on this slice, in pixels.
    labels : np.ndarray
        ``(N,)`` 1 positive, 0 negative.

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool: ``mask`` itself when every click agrees with it (or it is empty).
    """
    mask = np.asarray(mask, bool)
    yx = _click_pixels(points, mask.shape)
    labels = np.asarray(labels)
    if not mask.any() or not len(yx):
        return mask
    wrong = mask[tuple(yx.T)] != (labels == 1)
    if not wrong.any():
        return mask
    mask = _fill_misses(mask, yx[wrong & (labels == 1)])
    # After the fill: a disc may have covered a negative click beside a positive one.
    neg = yx[labels == 0]
    return _cut_negatives(mask, yx[labels == 1], neg[mask[tuple(neg.T)]])


def _fill_misses(mask: np.ndarray, misses: np.ndarray) -> np.ndarray:
    """Add to ``mask`` the disc from each positive click in ``misses`` to it, when near."""
    if not len(misses):
        return mask
    tight = _mask_box(mask, 0)
    r = max(float(ndimage.distance_transform_edt(np.pad(mask[tight], 1)).max()), 2.0)
    # Only clicks within 2r of the mask count: they lie in its box grown by 2r.
    box = _mask_box(mask, int(np.ceil(2 * r)) + 1)
    at = np.array([box[0].start, box[1].start])
    near = misses[((misses >= at) & (misses < [box[0].stop, box[1].stop])).all(axis=1)]
    if not len(near):
        return mask
    outside = ndimage.distance_transform_edt(~mask[box])
    out = mask.copy()
    for y, x in near - at:
        d = float(outside[y, x])
        if d <= 2 * r:
            # Just wide enough to reach the mask (its nearest pixel is in the disc).
            _disc(out[box].view(np.uint8), [(int(y), int(x))], max(int(np.ceil(d)), 1), 1)
    return out


def _cut_negatives(mask: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Cut from ``mask`` the side of the negative clicks ``neg`` inside it (:func:`obey_clicks`).

    ``pos``: every positive click; those inside the mask seed the side that stays.
    """
    pos = pos[mask[tuple(pos.T)]] if len(pos) else pos
    if not len(neg) or not len(pos):
        return mask
    box = _mask_box(mask, 1)
    crop = mask[box]
    at = np.array([box[0].start, box[1].start])
    markers = np.zeros(crop.shape, np.int32)
    markers[tuple((neg - at).T)] = 2
    markers[tuple((pos - at).T)] = 1  # a click that is both: the positive wins
    # The slice's edge bounds the mask as its background does.
    dist = ndimage.distance_transform_edt(np.pad(crop, 1))[1:-1, 1:-1]
    basins = watershed(-dist, markers, mask=crop)
    out = mask.copy()
    out[box] = basins == 1
    return out


def _click_pixels(points: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Clicks ``(N, 2)`` as integer ``(y, x)`` pixels inside a slice of ``shape``."""
    return np.clip(np.rint(np.asarray(points, float)).astype(int), 0, np.array(shape) - 1)


def refiner_inputs(
    refiner: ClickRefiner,
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    prob: np.ndarray,
    selection: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    previous: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Window]:
    """Build the click refiner's input ``(in_channels, size, size)`` and its window.

    Arguments as :func:`refined_mask`; ``previous`` as :func:`.model.click_refiner.stack_inputs`.
    """
    c = refiner.config
    yx = _click_pixels(points, prob.shape)
    window = refiner_window(refiner, selection, points)
    x = stack_inputs(
        image,
        fine,
        fine_stride,
        torch.from_numpy(np.asarray(prob, np.float32)),
        torch.from_numpy(np.asarray(selection, bool)),
        window,
        yx,
        np.asarray(labels),
        c,
        previous,
    )
    return x, window


def refiner_window(refiner: ClickRefiner, selection: np.ndarray, points: np.ndarray) -> Window:
    """Return the window :func:`refiner_inputs` gives a ``(H, W)`` selection and its clicks."""
    c = refiner.config
    yx = _click_pixels(points, selection.shape)
    return window_around(selection, yx, context=c.context, min_side=c.min_side)


def refined_mask(
    refiner: ClickRefiner,
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    prob: np.ndarray,
    selection: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
    *,
    inputs: tuple[torch.Tensor, Window] | None = None,
) -> np.ndarray:
    """Redraw a selection with the click refiner, in the window around it and its clicks.

    Parameters
    ----------
    refiner : ClickRefiner
        In eval mode.
    image : torch.Tensor
        ``(C, H, W)`` the normalised slice.
    fine : torch.Tensor
        ``(Cf, h, w)`` its fine features (of the padded slice).
    fine_stride : int
        Slice pixels per fine feature cell.
    prob : np.ndarray
        ``(H, W)`` class probability.
    selection : np.ndarray
        ``(H, W)`` bool, :func:`select_object` 's answer.
    points, labels : np.ndarray
        ``(N, 2)`` ``(y, x)`` clicks on the slice and their ``(N,)`` labels.
    inputs : (torch.Tensor, Window), optional
        :func:`refiner_inputs` of exactly these arguments, when made already.

    Returns
    -------
    np.ndarray
        ``(H, W)`` bool: the parts of the refined mask that hold a positive click (the
        selection when none does). A mask that reaches its window's edge inside the slice
        is redrawn in the window around it (:func:`reaches_edge`), up to
        ``refiner.config.regrow`` times.
    """
    [mask] = refined_masks(
        refiner, image, fine, fine_stride, [(prob, selection, points, labels)], inputs=[inputs]
    )
    return mask


def refine_once(
    refiner: ClickRefiner,
    inputs: tuple[torch.Tensor, Window],
    selection: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """One refiner pass on :func:`refiner_inputs` ``inputs``: the kept mask ``(H, W)``, no redraw.

    :func:`refined_mask` redraws a mask that reaches its window's edge; this does not.
    """
    x, window = inputs
    return _kept(_refiner_logits(refiner, [x])[0], window, selection, points, labels)


def _refiner_logits(refiner: ClickRefiner, xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Run a refiner on windows ``(in_channels, size, size)`` as one batch: ``(B, size, size)``."""
    with torch.inference_mode():
        x = torch.stack(list(xs)).to(
            next(refiner.parameters()).device, memory_format=torch.channels_last
        )
        return refiner(x)


#: Logit margin by which :func:`click_threshold` puts every click on its side.
CLICK_LOGIT_MARGIN = 0.25


def click_threshold(logits: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> float:
    """Return the threshold nearest 0 that puts every click on its side of an object's logits.

    A negative click on a rim the refiner drew as the object's (or a positive one on a part
    it left out) says where this object's edge lies in its logits: the mask is drawn at the
    threshold nearest 0 with every negative click at least :data:`CLICK_LOGIT_MARGIN` below
    and every positive one as much above. Where no threshold does that (a negative click more
    probable than a positive one: a neighbour, not a rim), 0; :func:`obey_clicks` then cuts.

    Parameters
    ----------
    logits : np.ndarray
        ``(h, w)`` the object's logits.
    pos, neg : np.ndarray
        ``(N, 2)`` integer ``(y, x)`` positive and negative clicks inside ``logits``.
    """
    if not len(pos):
        return 0.0
    lo = float(logits[tuple(neg.T)].max()) + CLICK_LOGIT_MARGIN if len(neg) else -np.inf
    hi = float(logits[tuple(pos.T)].min()) - CLICK_LOGIT_MARGIN
    return float(np.clip(0.0, lo, hi)) if lo < hi else 0.0


def _kept(
    logits: torch.Tensor,
    window: Window,
    selection: np.ndarray,
    points: np.ndarray,
    labels: np.ndarray,
) -> np.ndarray:
    """Keep the parts of a refiner's window ``logits`` that hold a positive click.

    The logits are cut at :func:`click_threshold` of the clicks. Returns the parts on the
    whole slice; the selection when none does (see :func:`refined_mask`).
    """
    shape = selection.shape
    patch, (ys, xs) = paste_logits(logits, window, shape)
    # The window holds every click: components are found inside it only.
    pos = _click_pixels(points, shape)[np.asarray(labels) == 1] - (ys.start, xs.start)
    pos = pos[((pos >= 0) & (pos < patch.shape)).all(axis=1)]
    neg = _click_pixels(points, shape)[np.asarray(labels) == 0] - (ys.start, xs.start)
    neg = neg[((neg >= 0) & (neg < patch.shape)).all(axis=1)]
    tau = click_threshold(patch, pos, neg)
    kept = _connected_to(patch > tau, pos) if len(pos) else np.zeros(patch.shape, bool)
    if not kept.any():
        return np.asarray(selection, bool)
    out = np.zeros(shape, bool)
    out[ys, xs] = kept
    return out


#: Windows per refiner pass in :func:`refined_masks`.
REFINER_BATCH = 16


def reaches_edge(mask: np.ndarray, window: Window) -> bool:
    """Whether ``mask`` ``(H, W)`` touches an edge of ``window`` that lies inside the slice.

    The refiner drew the object up to the edge of what it saw: the object goes on beyond
    it (a selection much smaller than its object gives a window too small for it), and
    :func:`refined_masks` redraws it in the window around that mask.
    """
    ys, xs = window.pixel_bounds(mask.shape)
    return _touches_inner_side(mask[ys, xs], ys, xs, mask.shape)


def _touches_inner_side(crop: np.ndarray, ys: slice, xs: slice, shape: tuple[int, ...]) -> bool:
    """Whether ``crop``, a mask on the slice pixels ``ys, xs``, touches an inner side.

    An inner side of that box is one that is not an edge of the ``(H, W)`` slice ``shape``.
    """
    if not crop.size:
        return False
    h, w = shape
    return bool(
        (ys.start > 0 and crop[0].any())
        or (ys.stop < h and crop[-1].any())
        or (xs.start > 0 and crop[:, 0].any())
        or (xs.stop < w and crop[:, -1].any())
    )


def refined_masks(
    refiner: ClickRefiner,
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    selections: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    *,
    inputs: Sequence[tuple[torch.Tensor, Window] | None] | None = None,
    reprobe: Callable[[int, Window], np.ndarray | None] | None = None,
) -> list[np.ndarray]:
    """:func:`refined_mask` of several objects on one slice, their windows batched.

    Parameters
    ----------
    refiner, image, fine, fine_stride
        As :func:`refined_mask`.
    selections : iterable of (prob, selection, points, labels)
        Per object, the arguments of :func:`refined_mask` of those names. Each is held only
        until its object's passes are done: a generator need not keep them.
    inputs : sequence of (torch.Tensor, Window) or None, optional
        Per object, :func:`refiner_inputs` of its arguments when made already.
    reprobe : callable, optional
        ``reprobe(j, window)``: where object ``j`` is redrawn in a larger ``window`` (its
        mask reached the edge of the last one), the probability to read there if its ``prob``
        is not exact in that window (a probability computed around the clicks only), else
        ``None``.

    Returns
    -------
    list of np.ndarray
        ``(H, W)`` bool per object, as :func:`refined_mask` returns it.
    """
    given = iter(inputs) if inputs is not None else None
    out: list[np.ndarray] = []
    # (object, its input and window, its arguments, redraws so far); the arguments (a whole
    # slice's probability) are held only while the object waits for a pass.
    pending: list[tuple[int, tuple[torch.Tensor, Window], tuple, int]] = []
    parts = (image, fine, fine_stride)

    def flush() -> None:
        batch = pending[:REFINER_BATCH]
        del pending[:REFINER_BATCH]
        logits = _refiner_logits(refiner, [x for _, (x, _), _, _ in batch])
        for lg, (j, (_, window), item, n) in zip(logits, batch, strict=True):
            prob, sel, pts, lab = item
            out[j] = mask = _kept(lg, window, sel, pts, lab)
            if n == refiner.config.regrow or not reaches_edge(mask, window):
                continue
            # The object goes on beyond what the refiner saw: redraw it around its mask.
            if reprobe is not None:
                wider = reprobe(j, refiner_window(refiner, mask, pts))
                prob = prob if wider is None else wider
            nxt = refiner_inputs(refiner, *parts, prob, mask, pts, lab)
            pending.append((j, nxt, (prob, sel, pts, lab), n + 1))

    for j, item in enumerate(selections):
        made = next(given) if given is not None else None
        out.append(np.asarray(item[1], bool))
        pending.append((j, made or refiner_inputs(refiner, *parts, *item), item, 0))
        if len(pending) >= REFINER_BATCH:
            flush()
    while pending:
        flush()
    return out


def _connected_to(mask: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Keep the connected parts of ``mask`` that contain a point of ``pos``."""
    comp, _ = ndimage.label(mask)
    keep = np.unique(comp[tuple(pos.T)])
    return np.isin(comp, keep[keep > 0])


# ---------------------------------------------------------------------------- following
def object_order(anchors: Sequence[Key], shape: tuple[int, ...]) -> dict[Key, tuple[int, Key]]:
    """Visit order of a leading grid from annotated slices: through z first, then across t.

    Parameters
    ----------
    anchors : sequence of tuple of int
        Annotated slices (leading-axes indices).
    shape : tuple of int
        The leading shape, ``(Z,)``, ``(T,)`` or ``(T, Z)``.

    Returns
    -------
    dict
        ``{slice: (step, parent)}`` for every slice: its distance from the nearest anchor
        (steps along the last axis count 1, along earlier axes as many as the last axis is
        long, so a timepoint is finished through z before the next one starts) and the
        neighbour it follows from (itself for an anchor).
    """
    out: dict[Key, tuple[int, Key]] = {}
    frontier = sorted({tuple(a) for a in anchors})
    for a in frontier:
        out[a] = (0, a)
    weights = [int(np.prod(shape[i + 1 :])) for i in range(len(shape))]
    # Dijkstra on the grid: a step along axis i costs weights[i].
    import heapq

    heap = [(0, a) for a in frontier]
    while heap:
        d, key = heapq.heappop(heap)
        if out[key][0] < d:
            continue
        for i in reversed(range(len(shape))):
            for s in (-1, 1):
                nb = list(key)
                nb[i] += s
                if not 0 <= nb[i] < shape[i]:
                    continue
                n = tuple(nb)
                nd = d + weights[i]
                if n not in out or nd < out[n][0]:
                    out[n] = (nd, key)
                    heapq.heappush(heap, (nd, n))
    return out


@dataclass
class _Track:
    """One object's state while it is followed."""

    task: Task
    order: dict[Key, tuple[int, Key]]
    masks: dict[Key, np.ndarray]
    stopped: dict[Key, str]
    #: Its known masks (``Task.object_masks``), by slice: anchors like clicked slices.
    given: dict[Key, np.ndarray] = field(default_factory=dict)


def follow_objects(
    predictor: RevolverPredictor,
    tasks: Sequence[Task],
    indices: Sequence[int] | None = None,
    *,
    threshold: float = 0.5,
    params: FollowParams | None = None,
) -> Generator[PropagationStep, None, None]:
    """Follow object tasks from their annotated slices through the stack, slice by slice.

    Parameters
    ----------
    predictor : RevolverPredictor
        With the volume the objects were clicked on.
    tasks : sequence of Task
        Object tasks (``kind="object"``) guided on this volume, in working pixels
        (:meth:`.RevolverPredictor.work_task`); each ``label_value`` is the object's id in
        the output.
    indices : sequence of int, optional
        Flat slices to report; default all (every slice between is still visited).
    threshold : float
        Probability threshold of an object's extent.
    params : FollowParams, optional

    Yields
    ------
    PropagationStep
        In visit order: the slice's ``(H, W)`` uint32 label image in working pixels (every
        object on it so far) and, in ``events``, the objects that ended there and why.
        :meth:`.RevolverPredictor.propagate` brings the labels to data pixels.

    Raises
    ------
    ValueError
        A task that is not an object task of this volume.
    """
    params = params or FollowParams()
    info = predictor.work_info
    tracks = _tracks(tasks, info)
    report = set(info.flat_indices(indices))
    visits = sorted(
        {(step, key) for t in tracks for key, (step, _) in t.order.items()},
    )
    keys_by_step: dict[int, list[Key]] = {}
    for step, key in visits:
        keys_by_step.setdefault(step, []).append(key)
    canvas: dict[Key, np.ndarray] = {}
    lum: dict[Key, np.ndarray] = {}
    seen: set[int] = set()
    look: PixelFit | None = None
    for step in sorted(keys_by_step):
        if step == 1 and params.look is not None and predictor.follower is not None:
            # Every anchor (step 0) has its mask now: what the objects look like there.
            look = look_fit(predictor, tracks, params.look_band)
        for key in keys_by_step[step]:
            active = [t for t in tracks if t.order.get(key, (-1,))[0] == step]
            events = _visit(predictor, key, active, threshold, params, lum, look)
            labels = canvas.setdefault(key, np.zeros(info.slice_shape, np.uint32))
            for t in active:
                m = t.masks.get(key)
                if m is not None:
                    labels[m & (labels == 0)] = t.task.label_value
            k = info.flat(key)
            if k in report:
                seen.add(k)
                yield PropagationStep(key, labels.copy(), len(seen), len(report), events)


def _tracks(tasks: Sequence[Task], info: VolumeInfo) -> list[_Track]:
    """Validate object tasks and plan each one's visit order."""
    out = []
    for t in tasks:
        if t.kind != "object":
            raise ValueError(f"task {t.name!r} is a class task; follow_objects takes object tasks")
        given = _given_masks(t, info)
        anchors = [k for k in annotated_slices(t, info) if (clicks_on(t, k, info)[1] == 1).any()]
        anchors += [k for k in given if k not in anchors]
        if not anchors:
            raise ValueError(
                f"object task {t.name!r} has no positive click on this volume: guide it on the "
                "volume it is followed in"
            )
        out.append(_Track(t, object_order(anchors, info.leading_shape), {}, {}, given))
    return out


def _given_masks(task: Task, info: VolumeInfo) -> dict[Key, np.ndarray]:
    """Return the object's known masks on this volume (``Task.object_masks``), by slice.

    Raises
    ------
    ValueError
        A mask whose shape is not the volume's slice shape.
    """
    if not task.object_masks or task.source != info.fingerprint:
        return {}
    out = {}
    for k, m in task.object_masks:
        if m.shape != info.slice_shape:
            raise ValueError(
                f"object task {task.name!r}: its mask on slice {k} is {m.shape}, the volume's "
                f"slices are {info.slice_shape}"
            )
        out[tuple(int(v) for v in k)] = np.asarray(m, bool)
    return out


def clicks_on(task: Task, key: Key, info: VolumeInfo) -> tuple[np.ndarray, np.ndarray]:
    """Return the clicks of ``task`` on slice ``key``.

    Returns
    -------
    points : np.ndarray
        ``(N, 2)`` ``(y, x)``.
    labels : np.ndarray
        ``(N,)`` 1 positive, 0 negative.
    """
    sel = _on_slice(task, key, info)
    if sel is None:
        return np.zeros((0, 2)), np.zeros(0, np.int8)
    return task.points[sel, len(info.leading_shape) :], task.labels[sel]


def _on_slice(task: Task, key: Key, info: VolumeInfo) -> np.ndarray | None:
    """Return which of ``task`` 's clicks lie on slice ``key``, ``(N,)`` bool.

    ``None`` when it has no points, or points not of this volume's dimensions.
    """
    if not len(task.points) or task.points.shape[1] != info.ndim:
        return None
    lead = np.rint(task.points[:, : len(info.leading_shape)]).astype(int)
    return (lead == np.asarray(key, int)).all(axis=1)


def without_last_click(task: Task, key: Key, info: VolumeInfo) -> Task | None:
    """Return ``task`` without its last click on slice ``key`` (in the task's order).

    ``None`` where it has one click or fewer there, or none positive would be left. The
    guidance is unchanged: an object task's vectors come from its first positive click on
    each slice, which stays (clicks after it act by position only).
    """
    sel = _on_slice(task, key, info)
    here = np.flatnonzero(sel) if sel is not None else ()
    if len(here) < 2:
        return None
    keep = np.ones(len(task.points), bool)
    keep[here[-1]] = False
    if not (task.labels[here[:-1]] == 1).any():
        return None
    return replace(task, points=task.points[keep], labels=task.labels[keep])


def _visit(
    predictor: RevolverPredictor,
    key: Key,
    active: list[_Track],
    threshold: float,
    params: FollowParams,
    lum: dict[Key, np.ndarray],
    look: PixelFit | None = None,
) -> tuple[ObjectEvent, ...]:
    """Segment the active objects on one slice: clicked ones by their clicks, others followed.

    ``lum``: smoothed slices kept between visits for snapping (see :func:`_snapped`).
    ``look``: the objects' look against their surroundings (:func:`look_fit`); with it and a
    follower, the follower's masks and the look decide who goes on (``FollowParams.look``).
    """
    _anchor_masks(predictor, key, [t for t in active if t.order[key][1] == key], threshold)
    followed = [t for t in active if t.order[key][1] != key and t.order[key][1] in t.masks]
    if not followed:
        return ()
    prob = _memory_probability(predictor, key, followed)
    prev = [t.masks[t.order[key][1]] for t in followed]
    why: list[str | None] = [None] * len(followed)
    if look is not None and params.look is not None and predictor.follower is not None:
        # The follower draws every object; its mask and the object's look under it say
        # whether the object goes on.
        drawn = _follower_masks(predictor, prob, key, followed, params)
        live = [m for m in drawn if m is not None and m.any()]
        seen = np.zeros(prob.shape, np.float32)
        if live:  # the look is read under the new masks only
            seen = predictor.fit_probability(key, look, _mask_box(np.logical_or.reduce(live), 0))
        why = _look_ends(seen, drawn, prev, params)
        on = [i for i, w in enumerate(why) if w is None]
        moved: list[np.ndarray | None] | None = [drawn[i] for i in on]
    else:
        drawn = _watershed_masks(prob, key, followed, threshold, params)
        # The watershed says whether each object goes on (the end rules on the region its
        # last mask seeds); the follower (without one: the last mask) carries those that do.
        on = [i for i, (m, p) in enumerate(zip(drawn, prev, strict=True)) if _goes_on(m, p, params)]
        moved = None  # without a follower or snapping, the watershed's masks are the new ones
        if predictor.follower is not None:
            moved = _follower_masks(predictor, prob, key, [followed[i] for i in on], params)
        elif params.snap is not None:
            moved = [prev[i] for i in on]
    if moved is not None:
        if params.snap is not None:
            # Snapping moves the rims of those that go on onto the image's edges.
            moved = _snapped(predictor, key, [followed[i] for i in on], moved, params.snap, lum)
        for i, m in zip(on, moved, strict=True):
            drawn[i] = m
    events: list[ObjectEvent] = []
    for t, m, p, w in zip(followed, drawn, prev, why, strict=True):
        _advance(t, key, m, p, params, events, w)
    return tuple(events)


def _anchor_masks(
    predictor: RevolverPredictor, key: Key, anchored: list[_Track], threshold: float
) -> None:
    """Give the objects anchored on slice ``key`` their masks there: painted, else clicked."""
    for t in anchored:
        if key in t.given:
            t.masks[key] = t.given[key]
    todo = [t for t in anchored if key not in t.given]
    if todo:
        masks = predictor.object_masks(
            key, [t.task for t in todo], threshold=threshold, working=True
        )
        for t, m in zip(todo, masks, strict=True):
            t.masks[key] = m


#: Smoothed slices kept for snapping: a slice is read as a parent and as the slice itself.
SMOOTHED_KEPT = 4


def _snapped(
    predictor: RevolverPredictor,
    key: Key,
    tracks: list[_Track],
    masks: list[np.ndarray | None],
    band: float,
    lum: dict[Key, np.ndarray],
) -> list[np.ndarray | None]:
    """Snap the objects' new masks on slice ``key`` to its edges (:func:`.snap.snap_masks`).

    The kind of each object's edge is read under its mask on the slice it comes from. ``lum``
    keeps the last smoothed slices (:func:`.snap.smoothed`) from one visit to the next.
    """
    live = [i for i, m in enumerate(masks) if m is not None and m.any()]
    if not live:
        return masks

    def smoothed(k: Key) -> np.ndarray:
        if k not in lum:
            lum[k] = snap.smoothed(predictor.refiner_slice(k)[0].cpu().numpy())
            while len(lum) > SMOOTHED_KEPT:
                del lum[next(iter(lum))]
        return lum[k]

    kinds = []
    for i in live:
        parent = tracks[i].order[key][1]
        kinds.append(snap.boundary_kind(smoothed(parent), tracks[i].masks[parent]))
    drawn = snap.snap_masks(smoothed(key), [masks[i] for i in live], kinds, band)  # type: ignore[misc]
    out = list(masks)
    for i, m in zip(live, drawn, strict=True):
        out[i] = m
    return out


def innermost(mask: np.ndarray) -> tuple[int, int]:
    """Return the pixel of a non-empty ``(H, W)`` mask farthest from its boundary."""
    box = _mask_box(mask, 1)
    d = ndimage.distance_transform_edt(mask[box])
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return int(y + box[0].start), int(x + box[1].start)


def follower_inputs(
    follower: ClickRefiner,
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    prob: np.ndarray,
    previous: np.ndarray,
    previous_image: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Window]:
    """Build the follower's input for one object and its window.

    The object's mask on the neighbouring slice is the selection, its innermost point there the
    one positive click. Arguments as :func:`refined_mask`, with ``previous`` the object's
    ``(H, W)`` bool mask on the slice it is followed from (non-empty) and ``previous_image``
    that slice, normalised (read by a follower with ``previous_image`` in its config).
    """
    point = np.asarray([innermost(previous)], float)
    return refiner_inputs(
        follower,
        image,
        fine,
        fine_stride,
        prob,
        previous,
        point,
        np.ones(1, np.int8),
        previous_image if follower.config.previous_image else None,
    )


def _follower_masks(
    predictor: RevolverPredictor,
    prob: np.ndarray,
    key: Key,
    tracks: list[_Track],
    params: FollowParams,
) -> list[np.ndarray | None]:
    """Move the followed objects onto slice ``key`` with the follower (one batch for all).

    Each object's logits are drawn in the window around its previous mask; a pixel claimed by
    several objects goes to the one with the highest logit. An object's new mask is what it
    keeps that touches its previous mask's core (``None``: nothing does).
    """
    follower = predictor.follower
    assert follower is not None
    if not tracks:
        return []
    here = predictor.refiner_slice(key)
    parents = {t.order[key][1] for t in tracks}
    before = {
        k: predictor.refiner_slice(k)[0] if follower.config.previous_image else None
        for k in parents
    }
    prev = [t.masks[t.order[key][1]] for t in tracks]
    inputs = [
        follower_inputs(follower, *here, prob, m, before[t.order[key][1]])
        for t, m in zip(tracks, prev, strict=True)
    ]
    with torch.inference_mode():
        x = torch.stack([x for x, _ in inputs]).to(
            next(follower.parameters()).device, memory_format=torch.channels_last
        )
        logits = follower(x)
    best = np.zeros(prob.shape, np.float32)  # logit 0: background
    owner = np.zeros(prob.shape, np.int32)
    for i, (lg, (_, window)) in enumerate(zip(logits, inputs, strict=True), start=1):
        patch, (ys, xs) = paste_logits(lg, window, prob.shape)
        win = best[ys, xs] < patch
        owner[ys, xs][win] = i
        best[ys, xs][win] = patch[win]
    out: list[np.ndarray | None] = []
    for i, (m, (_, window)) in enumerate(zip(prev, inputs, strict=True), start=1):
        ys, xs = window.pixel_bounds(prob.shape)
        out.append(_touching_core(owner[ys, xs] == i, (ys, xs), m, params.erosion))
    return out


def follow_step(
    follower: ClickRefiner,
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    prob: np.ndarray,
    previous: np.ndarray,
    *,
    erosion: float = FollowParams.erosion,
    previous_image: torch.Tensor | None = None,
) -> np.ndarray | None:
    """Move one object onto a slice with the follower, as following does (no competitors).

    Arguments as :func:`follower_inputs`; ``erosion`` as :class:`FollowParams`.

    Returns
    -------
    np.ndarray or None
        ``(H, W)`` bool: what the follower draws that touches the previous mask's core
        (``None``: nothing does, the object ends).
    """
    x, window = follower_inputs(follower, image, fine, fine_stride, prob, previous, previous_image)
    with torch.inference_mode():
        logits = follower(x[None].to(next(follower.parameters()).device))[0]
    patch, bounds = paste_logits(logits, window, prob.shape)
    return _touching_core(patch > 0, bounds, previous, erosion)


def _touching_core(
    drawn: np.ndarray, bounds: tuple[slice, slice], previous: np.ndarray, erosion: float
) -> np.ndarray | None:
    """Keep the part of a window's mask that touches the previous mask's eroded core.

    ``drawn`` covers the slice pixels ``bounds``; ``previous`` is ``(H, W)``. Returns the kept
    part on the whole slice, or ``None`` where nothing touches the core.
    """
    core = _core(previous, erosion)[bounds]
    if not (drawn & core).any():
        return None
    new = np.zeros(previous.shape, bool)
    new[bounds] = _connected_to(drawn, np.argwhere(drawn & core))
    return new


def _core(mask: np.ndarray, erosion: float) -> np.ndarray:
    """Erode a non-empty mask by ``erosion`` of its radius (keep it if that leaves nothing)."""
    box = _mask_box(mask, 1)
    m = mask[box]
    r = float(ndimage.distance_transform_edt(m).max())
    core = ndimage.binary_erosion(m, iterations=max(1, int(erosion * r)))
    out = np.zeros(mask.shape, bool)
    out[box] = core if core.any() else m
    return out


def look_fit(predictor: RevolverPredictor, tracks: list[_Track], band: int) -> PixelFit | None:
    """Fit what the followed objects look like against their surroundings, on their anchors.

    Positives are every object's mask on the slices it was clicked (or painted) on; negatives
    the rest of those slices beyond ``band`` pixels of an object. The fit is cross-validated
    on those slices as a painted class task's is (:meth:`.RevolverPredictor.fit_labels`).

    Returns
    -------
    PixelFit or None
        ``None`` where no fit could be made, or where it does not tell the objects from their
        surroundings better than the network guided by the same masks.
    """
    labels: dict[Key, np.ndarray] = {}
    for t in tracks:
        for key, (_, parent) in t.order.items():
            if parent == key and key in t.masks:
                lab = labels.setdefault(key, np.zeros(predictor.work_info.slice_shape, np.uint8))
                lab[t.masks[key]] = 1
    for lab in labels.values():
        near = ndimage.binary_dilation(lab == 1, iterations=band) if band > 0 else lab == 1
        lab[~near] = 2
    fit = predictor.fit_labels(labels, working=True) if labels else None
    return fit if fit is not None and fit.active else None


def _memory_probability(predictor: RevolverPredictor, key: Key, tracks: list[_Track]) -> np.ndarray:
    """One head pass for all followed objects on slice ``key``, guided by their last masks."""
    info = predictor.work_info
    unions: dict[Key, np.ndarray] = {}
    for t in tracks:
        parent = t.order[key][1]
        union = unions.setdefault(parent, np.zeros(info.slice_shape, bool))
        union |= t.masks[parent]
    guidance = predictor.guidance_of([t.task for t in tracks])
    return memory_probability(predictor, key, guidance, unions.items())


def memory_probability(
    predictor: RevolverPredictor,
    key: Key,
    guidance: GuideOutput,
    parents: Iterable[tuple[Key, np.ndarray]],
) -> np.ndarray:
    """Class probability on slice ``key`` with the objects' masks on neighbouring slices.

    Parameters
    ----------
    predictor : RevolverPredictor
    key : tuple of int
        The slice to predict.
    guidance : GuideOutput
        The tasks' own guidance (their clicks).
    parents : iterable of (tuple of int, np.ndarray)
        Neighbouring slices and the ``(H, W)`` bool union of the objects' masks there: added
        to the guidance as positive dense support (the memory of their appearance) and, with
        a local-prior model, as the prior of their position.

    Returns
    -------
    np.ndarray
        ``(H, W)`` float32.
    """
    feats = predictor.features(key)
    grid = tuple(feats.fine.shape[-2:])
    stride = predictor.model.fine_stride
    total = guidance.total()
    prior_masks = torch.zeros(1, 2, *grid)
    for parent, union in parents:
        if not union.any():
            continue
        masks = dense_support(union, grid, stride)  # type: ignore[arg-type]
        # Their surroundings hold look-alikes, so no negatives from them.
        masks[1] = 0
        total = total + predictor.guide_features(predictor.features(parent), masks)
        prior_masks[0, 0] += masks[0]
    prior = local_prior(prior_masks) if predictor.model.config.local_prior else None
    return predictor.probability_with(key, total, prior)


def _watershed_masks(
    prob: np.ndarray,
    key: Key,
    tracks: list[_Track],
    threshold: float,
    params: FollowParams,
) -> list[np.ndarray | None]:
    """Joint watershed of the followed objects seeded by their eroded previous masks.

    Each object's new mask (``None``: no seed of it is probable) is the part of its watershed
    basin connected to its seeds (within ``params.reach``, when set). Per-object work runs in
    windows: the radius, core and reach around the previous mask (padded beyond what the
    erosion and dilation can reach), the basin in its bounding box; and the watershed runs
    in each part of the probable region that holds a first seed, in that part's box. Each
    equals the whole-slice result, at a fraction of the cost with many objects.
    """
    region = prob > threshold
    markers = np.zeros(prob.shape, np.int32)
    markers[prob < BACKGROUND] = 1
    reach: dict[int, np.ndarray] = {}
    seed_windows: dict[int, tuple[slice, slice]] = {}
    for i, t in enumerate(tracks, start=2):
        m = t.masks[t.order[key][1]]
        if not m.any():
            continue
        # A one-pixel ring of background makes the distances inside the box exact.
        r = float(ndimage.distance_transform_edt(m[_mask_box(m, 1)]).max())
        grow = 0 if params.reach is None else max(2, round(params.reach * r))
        win = _mask_box(m, grow + 1)
        mw = m[win]
        core = ndimage.binary_erosion(mw, iterations=max(1, int(params.erosion * r)))
        if not core.any():
            core = mw
        markers[win][core & region[win]] = i
        seed_windows[i] = win
        if params.reach is not None:
            within = np.zeros(prob.shape, bool)
            within[win] = ndimage.binary_dilation(mw, iterations=grow)
            reach[i] = within
    # Only the parts of the probable region that hold a seed matter, each on its own (the
    # watershed floods within them): each runs in its bounding box grown by one pixel, where
    # every pixel nearest to one of its pixels lies, so its basins are the whole slice's.
    parts, _ = ndimage.label(region)
    found = ndimage.find_objects(parts)
    firsts = _first_seeds(markers, seed_windows)
    by_part: dict[int, list[int]] = {}
    for i, (y, x) in firsts.items():
        by_part.setdefault(int(parts[y, x]), []).append(i)
    out: list[np.ndarray | None] = [None] * len(tracks)
    for pid, ids in by_part.items():
        win, basins = _flood_part(prob, parts, pid, found[pid - 1], markers, len(tracks) + 2)
        boxes = ndimage.find_objects(basins)
        for i in ids:
            box = boxes[i - 1] if i - 1 < len(boxes) else None
            if box is None:
                continue
            part = basins[box] == i
            if i in reach:
                part &= reach[i][win][box]
            y0, x0 = win[0].start + box[0].start, win[1].start + box[1].start
            seed = np.array([[firsts[i][0] - y0, firsts[i][1] - x0]])
            new = np.zeros(prob.shape, bool)
            new[y0 : y0 + part.shape[0], x0 : x0 + part.shape[1]] = _connected_to(part, seed)
            out[i - 2] = new
    return out


def _first_seeds(
    markers: np.ndarray, windows: dict[int, tuple[slice, slice]]
) -> dict[int, tuple[int, int]]:
    """Each seeded object's first seed on the slice (raster order), where its basin is taken.

    ``windows``: the slice window holding every seed of each object (its label in
    ``markers``); an object whose seeds were all overwritten by others' has none.
    """
    firsts = {}
    for i, win in windows.items():
        at = np.argwhere(markers[win] == i)[:1]
        if len(at):
            firsts[i] = (int(at[0, 0]) + win[0].start, int(at[0, 1]) + win[1].start)
    return firsts


def _flood_part(
    prob: np.ndarray,
    parts: np.ndarray,
    pid: int,
    found: tuple[slice, slice],
    markers: np.ndarray,
    base: int,
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Run the following watershed in part ``pid`` of the probable region, in its box.

    ``found``: the part's bounding box; ``base``: the first label of competing cores.
    Returns the box grown by one pixel and the basins (marker labels) inside it.
    """
    h, w = prob.shape
    win = (
        slice(max(0, found[0].start - 1), min(h, found[0].stop + 1)),
        slice(max(0, found[1].start - 1), min(w, found[1].stop + 1)),
    )
    inside = parts[win] == pid
    markers_w = np.where(inside | (markers[win] == 1), markers[win], 0)
    # Confident cores that no seed touches compete.
    cores, n = ndimage.label((prob[win] > CORE) & inside)
    others = np.setdiff1d(np.arange(1, n + 1), np.unique(cores[markers_w > 1]))
    sel = np.isin(cores, others)
    markers_w[sel] = cores[sel] + base
    dist = ndimage.distance_transform_edt(parts[win] > 0)
    return win, watershed(-dist, markers_w, mask=inside | (markers_w == 1))


def _look_ends(
    seen: np.ndarray,
    new: list[np.ndarray | None],
    prev: list[np.ndarray],
    params: FollowParams,
) -> list[str | None]:
    """Why each object ends with its ``new`` mask, given its look ``seen`` ``(H, W)``.

    ``None`` where it goes on: the end rules pass and the mean look probability under the new
    mask is at least ``params.look``.
    """
    assert params.look is not None
    out = []
    for m, p in zip(new, prev, strict=True):
        why = _end_reason(m, p, params)
        if why is None and (under := float(seen[m].mean())) < params.look:
            why = (
                f"what is under it no longer looks like the object ({under:.2f} by the look "
                f"fit, below {params.look:.2f})"
            )
        out.append(why)
    return out


def _advance(
    t: _Track,
    key: Key,
    new: np.ndarray | None,
    prev: np.ndarray,
    params: FollowParams,
    events: list[ObjectEvent],
    reason: str | None = None,
) -> None:
    """Move an object onto slice ``key`` with its ``new`` mask, or end it there (an event).

    ``reason``: why it ends, when that is known already; otherwise the end rules decide.
    """
    reason = reason or _end_reason(new, prev, params)
    if reason is None:
        t.masks[key] = new  # type: ignore[assignment]
    else:
        t.stopped[key] = reason
        events.append(ObjectEvent(t.task.name, t.task.label_value, key, reason))


def _goes_on(new: np.ndarray | None, prev: np.ndarray, params: FollowParams) -> bool:
    """Whether an object continues onto a slice with this ``new`` mask."""
    return _end_reason(new, prev, params) is None


def _end_reason(new: np.ndarray | None, prev: np.ndarray, params: FollowParams) -> str | None:
    """Why an object does not continue onto a slice, or ``None`` if it does."""
    if new is None or not new.any():
        return "nothing probable under the object's last position"
    # Both masks are small parts of the slice: measure them in their common bounding box.
    box = _mask_box(new | prev, 0)
    new, prev = new[box], prev[box]
    a, b = int(new.sum()), int(prev.sum())
    if a > params.max_growth * b:
        return f"area grew {a / b:.1f}x in one step"
    if b > params.max_shrink * a:
        return f"area shrank {b / a:.1f}x in one step"
    if foreground_iou(new, prev) < params.min_iou or (new & prev).sum() < params.min_overlap * a:
        return "too little overlap with the previous slice (another object)"
    return None
