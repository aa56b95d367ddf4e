"""Snapping followed masks to the image's edges: a seeded watershed in a band around each mask.

A mask carried from one slice to the next (by the follower, or unchanged) is right in its core
and wrong at its rim, where the object has grown, shrunk or moved a little. The image says where
the rim is: on the bright wall of a membrane-stained cell, in the dark membrane around an EM
organelle, or at the step in intensity around a nucleus. Each object's mask is redrawn by a
watershed on that landscape, seeded by the mask's core (eroded by ``band`` of its radius) and by
everything beyond the mask dilated by the same amount: the rim settles on the edge inside the
band, and nothing moves farther than the band.

Which landscape an object's edge is (:func:`boundary_kind`) is read from the slice it comes from,
under its mask there: a *ridge* (the rim brighter than inside and outside: cell walls,
membranes), a *valley* (darker than both) or a *step* (between the two: nuclei, blobs; the
gradient magnitude). Objects of one kind whose bands overlap are snapped in one watershed, so
that two touching objects share the edge between them.

No napari or Qt here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

__all__ = [
    "BoundaryKind",
    "boundary_kind",
    "bounding_box",
    "edge_landscape",
    "smoothed",
    "snap_masks",
]

BoundaryKind = Literal["ridge", "valley", "step"]

#: Smoothing of the image before its edges are read (pixels): noise makes no edge.
SIGMA = 1.0


def smoothed(image: np.ndarray) -> np.ndarray:
    """Return the Gaussian-smoothed luminance of an ``(H, W)`` or ``(C, H, W)`` slice."""
    image = np.asarray(image, np.float32)
    lum = image.mean(axis=0) if image.ndim == 3 else image
    return ndimage.gaussian_filter(lum, SIGMA)


def edge_landscape(lum: np.ndarray, kind: BoundaryKind) -> np.ndarray:
    """Return the watershed landscape of one kind of edge on a smoothed slice ``(H, W)``.

    A ridge is the bright line itself, a valley the dark one (the slice negated), a step the
    gradient magnitude.
    """
    if kind == "ridge":
        return lum
    if kind == "valley":
        return -lum
    if kind == "step":
        return np.hypot(ndimage.sobel(lum, 0), ndimage.sobel(lum, 1))
    raise ValueError(f"kind must be 'ridge', 'valley' or 'step'; got {kind!r}")


def _radius(mask: np.ndarray) -> float:
    """Largest distance from a pixel of a non-empty ``(H, W)`` mask to its outside."""
    # A one-pixel ring of outside around the bounding box makes the distances exact.
    return float(ndimage.distance_transform_edt(np.pad(mask[bounding_box(mask, 0)], 1)).max())


def bounding_box(mask: np.ndarray, pad: int) -> tuple[slice, slice]:
    """Return the bounding box of a non-empty ``(H, W)`` mask grown by ``pad`` pixels, clipped."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        slice(max(0, rows[0] - pad), min(h, rows[-1] + pad + 1)),
        slice(max(0, cols[0] - pad), min(w, cols[-1] + pad + 1)),
    )


def boundary_kind(lum: np.ndarray, mask: np.ndarray) -> BoundaryKind:
    """Read what kind of edge bounds an object: a ridge, a valley or a step.

    Parameters
    ----------
    lum : np.ndarray
        ``(H, W)`` the smoothed slice (:func:`smoothed`) the mask was drawn on.
    mask : np.ndarray
        ``(H, W)`` bool, the object there (non-empty).

    Returns
    -------
    {"ridge", "valley", "step"}
        ``"ridge"`` where the mask's rim (a tenth of its radius either side of its edge) is on
        average brighter than both its inside and a ring outside it, ``"valley"`` where it is
        darker than both, else ``"step"``.
    """
    mask = np.asarray(mask, bool)
    if mask.shape != lum.shape or not mask.any():
        raise ValueError(
            f"expected a non-empty mask of the slice's shape {lum.shape}; got {mask.shape} "
            f"with {int(mask.sum())} pixels"
        )
    w = max(1, round(0.1 * _radius(mask)))
    box = bounding_box(mask, 4 * w + 2)
    m, im = mask[box], lum[box]
    inside = ndimage.distance_transform_edt(m)
    outside = ndimage.distance_transform_edt(~m)
    core = inside > 2 * w
    rim = (inside > 0) & (inside <= w) | (outside > 0) & (outside <= w)
    ring = (outside > 2 * w) & (outside <= 4 * w)
    if not core.any() or not ring.any():
        return "step"
    r, i, o = float(im[rim].mean()), float(im[core].mean()), float(im[ring].mean())
    if r > max(i, o):
        return "ridge"
    if r < min(i, o):
        return "valley"
    return "step"


def snap_masks(
    lum: np.ndarray,
    masks: Sequence[np.ndarray],
    kinds: Sequence[BoundaryKind],
    band: float,
) -> list[np.ndarray]:
    """Redraw masks on the edges of a slice, each within a band around it.

    Parameters
    ----------
    lum : np.ndarray
        ``(H, W)`` the smoothed slice (:func:`smoothed`).
    masks : sequence of np.ndarray
        ``(H, W)`` bool, non-empty: where each object is expected on the slice.
    kinds : sequence of str
        The kind of each object's edge (:func:`boundary_kind`).
    band : float
        Half-width of the band, as a share of each mask's radius (at least one pixel).

    Returns
    -------
    list of np.ndarray
        ``(H, W)`` bool per mask, disjoint: the mask's core, grown to the edge (empty only
        where objects of another kind took all of it).
    """
    if len(masks) != len(kinds):
        raise ValueError(f"expected one kind per mask; got {len(masks)} masks, {len(kinds)} kinds")
    out: list[np.ndarray] = [np.zeros(m.shape, bool) for m in masks]
    taken: np.ndarray | None = None
    kind: BoundaryKind
    for kind in ("ridge", "valley", "step"):
        group = [i for i, k in enumerate(kinds) if k == kind]
        if not group:
            continue
        claimed = _snap_group(edge_landscape(lum, kind), masks, group, band, taken, out)
        taken = claimed if taken is None else taken | claimed
    return out


def _snap_group(
    land: np.ndarray,
    masks: Sequence[np.ndarray],
    group: list[int],
    band: float,
    taken: np.ndarray | None,
    out: list[np.ndarray],
) -> np.ndarray:
    """Snap the masks ``group`` (of one kind) on ``land`` into ``out``; return what they claim.

    ``taken``: pixels claimed by objects of another kind already (background here).
    """
    markers = np.zeros(land.shape, np.int32)
    allowed = np.zeros(land.shape, bool)
    for i in group:
        m = np.asarray(masks[i], bool)
        k = max(1, round(band * _radius(m)))
        box = bounding_box(m, k + 1)
        inside = ndimage.distance_transform_edt(m[box])
        core = inside > k
        if not core.any():
            core = inside >= inside.max()
        allowed[box] |= ndimage.distance_transform_edt(~m[box]) <= k
        markers[box][core] = i + 2
    markers[~allowed] = 1
    if taken is not None:
        markers[taken & (markers == 0)] = 1
    claimed = np.zeros(land.shape, bool)
    # Each cluster of overlapping bands in its own box: together they are a fraction of the
    # slice.
    clusters, _ = ndimage.label(allowed)
    for n, box in enumerate(ndimage.find_objects(clusters), start=1):
        box = tuple(slice(max(0, b.start - 1), b.stop + 1) for b in box)
        here = clusters[box] == n
        seeds = np.where(here | (markers[box] == 1), markers[box], 1)  # other clusters: outside
        basins = np.where(here, watershed(land[box], seeds), 0)
        claimed[box] |= basins > 1
        for i in np.unique(basins[basins > 1]):
            out[int(i) - 2][box] |= basins == i
    if taken is not None:
        for i in group:
            out[i] &= ~taken
    return claimed
