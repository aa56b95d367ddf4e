"""Slices resized before the network, and results brought back to the data's pixels.

The network sees a fixed neighbourhood in pixels. Objects much larger than those it was
trained on do better on a binned image, very small ones on an enlarged one, as cellpose's
``diameter`` rescales images. :class:`~.volume.VolumeSpec` ``scale`` sets the factor. The
predictor then works on *working pixels* (each slice resized by ``scale``) and converts at its
public methods, once: points, painted masks and labels going in, masks, probabilities and
label images coming out. Everything a user gives or gets stays in data pixels.

A pixel's centre ``c`` in data pixels sits at ``(c + 0.5) * scale - 0.5`` in working pixels
(pixel-area alignment, as ``torch.nn.functional.interpolate(align_corners=False)``), with the
scale of each axis taken as the ratio of the rounded working size to the data's.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch and scipy are imported on use: volume.py needs check_scale only
    import torch

__all__ = [
    "MAX_SCALE",
    "MIN_SCALE",
    "check_scale",
    "labels_to_shape",
    "mask_to_shape",
    "painted_to_shape",
    "points_to_work",
    "probabilities_to_shape",
    "resize_slice",
    "work_shape",
]

#: Smallest and largest factors accepted (a tenth of the pixels per side to four times).
MIN_SCALE = 0.1
MAX_SCALE = 4.0


def check_scale(scale: float) -> float:
    """Return ``scale`` as a float, or raise ``ValueError`` naming the accepted range."""
    try:
        s = float(scale)
    except (TypeError, ValueError):
        raise ValueError(f"scale must be a number; got {scale!r}") from None
    if not (math.isfinite(s) and MIN_SCALE <= s <= MAX_SCALE):
        raise ValueError(f"scale must be between {MIN_SCALE:g} and {MAX_SCALE:g}; got {scale!r}")
    return s


def work_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """Slice shape ``(H, W)`` resized by ``scale``: each side rounded, at least 1 pixel."""
    if scale == 1:
        return (int(shape[0]), int(shape[1]))
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def points_to_work(yx: np.ndarray, data: tuple[int, int], work: tuple[int, int]) -> np.ndarray:
    """Positions ``(N, 2)`` ``(y, x)`` on a ``data`` slice to the same spots on a ``work`` one.

    Each axis by its own ratio ``work / data`` (the scale, to the rounding of
    :func:`work_shape`), as the slices are resampled; clipped to the working slice (its
    pixels' outer edges). ``yx`` itself (as float64) where the shapes are the same.
    """
    yx = np.asarray(yx, np.float64)
    if tuple(data) == tuple(work):
        return yx
    ratio = np.asarray(work, np.float64) / np.asarray(data, np.float64)
    out = (yx + 0.5) * ratio - 0.5
    return np.clip(out, -0.5, np.asarray(work, np.float64) - 0.5)


def _interpolate(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(N, C, h, w)`` float resampled to ``shape``: bilinear, antialiased when shrinking."""
    import torch.nn.functional as F

    shrink = shape[0] < x.shape[-2] or shape[1] < x.shape[-1]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False, antialias=shrink)


def resize_slice(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample one slice to ``shape``: bilinear, averaging over the pixels when shrinking.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` or ``(H, W, C)``, any real dtype.
    shape : tuple of int
        ``(h, w)`` wanted.

    Returns
    -------
    np.ndarray
        ``(h, w)`` or ``(h, w, C)`` float32 (``image`` itself when the shape is unchanged).
    """
    if image.shape[:2] == tuple(shape):
        return image
    import torch

    x = torch.from_numpy(np.asarray(image, np.float32))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = _interpolate(x, shape)[0]
    out = y[0] if image.ndim == 2 else y.permute(1, 2, 0)
    return np.ascontiguousarray(out.numpy())


def probabilities_to_shape(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample probabilities ``(..., h, w)`` to ``(..., H, W)`` (bilinear), float32."""
    if probs.shape[-2:] == tuple(shape):
        return probs
    import torch

    lead = probs.shape[:-2]
    x = torch.from_numpy(np.ascontiguousarray(probs, np.float32)).reshape(-1, 1, *probs.shape[-2:])
    return _interpolate(x, shape).reshape(*lead, *shape).numpy()


def mask_to_shape(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample a bool mask to ``shape``: a pixel is in where at least half of it is."""
    if mask.shape == tuple(shape):
        return np.asarray(mask, bool)
    return probabilities_to_shape(np.asarray(mask, np.float32), shape) >= 0.5


def painted_to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample painted labels (0 not annotated, 1 foreground, 2 background) to ``shape``.

    A pixel takes the painted value covering most of it, where that covers at least a
    quarter: a one-pixel brush stroke survives binning 2 x 2.
    """
    if labels.shape == tuple(shape):
        return labels
    fg = probabilities_to_shape(np.stack([labels == 1, labels == 2]).astype(np.float32), shape)
    out = np.where(fg[0] >= fg[1], 1, 2).astype(labels.dtype)
    out[np.maximum(fg[0], fg[1]) < 0.25] = 0
    return out


def _axis_weights(n_out: int, n_in: int, start: int, stop: int, offset: int) -> tuple:
    """Linear interpolation indices and weights of output pixels ``start:stop`` on an axis.

    Output pixel ``i``'s centre lies at ``(i + 0.5) * n_in / n_out - 0.5`` input pixels, read
    from an input crop beginning at ``offset`` (clamped to the crop's edges).
    """
    pos = (np.arange(start, stop) + 0.5) * (n_in / n_out) - 0.5 - offset
    lo = np.floor(pos).astype(int)
    w = (pos - lo).astype(np.float32)
    return lo, w


def labels_to_shape(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resample an instance label image to ``shape``, each object's outline interpolated.

    Every object's indicator is resampled bilinearly in its own box, and a pixel takes the
    object that covers at least half of it (the objects partition the image, so at most one
    does). Enlarged 2 x, outlines stay smooth rather than becoming 2-pixel steps.

    Parameters
    ----------
    labels : np.ndarray
        ``(h, w)`` integer labels, 0 background.
    shape : tuple of int
        ``(H, W)`` wanted.

    Returns
    -------
    np.ndarray
        ``(H, W)`` of ``labels``' dtype.
    """
    if labels.shape == tuple(shape):
        return labels
    from scipy import ndimage

    h, w = labels.shape
    big_h, big_w = shape
    out = np.zeros(shape, labels.dtype)
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape)
    if ids[0] != 0:  # no background: every object one up, 0 left for none
        ids, compact = np.concatenate([[0], ids]).astype(labels.dtype), compact + 1
    for j, box in enumerate(ndimage.find_objects(compact), start=1):
        if box is None:
            continue
        # One input pixel of context, then the output pixels whose centres fall in the crop.
        y0, y1 = max(0, box[0].start - 1), min(h, box[0].stop + 1)
        x0, x1 = max(0, box[1].start - 1), min(w, box[1].stop + 1)
        crop = (compact[y0:y1, x0:x1] == j).astype(np.float32)
        oy0 = max(0, math.floor(y0 * big_h / h))
        oy1 = min(big_h, math.ceil(y1 * big_h / h))
        ox0 = max(0, math.floor(x0 * big_w / w))
        ox1 = min(big_w, math.ceil(x1 * big_w / w))
        ly, wy = _axis_weights(big_h, h, oy0, oy1, y0)
        lx, wx = _axis_weights(big_w, w, ox0, ox1, x0)
        ch, cw = crop.shape
        ya, yb = np.clip(ly, 0, ch - 1), np.clip(ly + 1, 0, ch - 1)
        xa, xb = np.clip(lx, 0, cw - 1), np.clip(lx + 1, 0, cw - 1)
        rows = crop[ya] * (1 - wy)[:, None] + crop[yb] * wy[:, None]
        val = rows[:, xa] * (1 - wx)[None] + rows[:, xb] * wx[None]
        region = out[oy0:oy1, ox0:ox1]
        region[val >= 0.5] = ids[j]
    return out
