"""Intensity normalisation of microscopy slices into encoder input."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Preprocessing", "intensity_bounds", "normalize_slice"]


@dataclass(frozen=True)
class Preprocessing:
    """How raw slices become encoder input; part of every feature-cache signature.

    Attributes
    ----------
    low, high : float
        Percentiles mapped to 0 and 1 (robust to hot pixels and saturated spots).
    channels : int
        Encoder input channels; grayscale is replicated, RGB kept.
    invert : bool
        Reverse intensities after normalising, so dark objects on a light background
        (brightfield, H&E) look like the bright objects of fluorescence that most training
        data show; like cellpose's ``invert``.
    scale : float
        Factor each slice is resized by before normalising (:mod:`.scale`); set from the
        volume's :class:`~.volume.VolumeSpec`.
    """

    low: float = 1.0
    high: float = 99.8
    channels: int = 3
    invert: bool = False
    scale: float = 1.0

    def key(self) -> str:
        """Return a stable text form of the settings, for cache signatures.

        Returns
        -------
        str
            For example ``"pct1-99.8-c3"``, with ``"-inv"`` appended when inverting and
            ``"-x0.5"`` when resizing by 0.5.
        """
        key = f"pct{self.low:g}-{self.high:g}-c{self.channels}" + ("-inv" if self.invert else "")
        return key + (f"-x{self.scale:g}" if self.scale != 1 else "")


def intensity_bounds(
    image: np.ndarray, prep: Preprocessing = Preprocessing()
) -> tuple[float, float]:
    """Return the intensities of one slice that :func:`normalize_slice` maps to 0 and 1.

    The ``prep.low`` and ``prep.high`` percentiles, or the minimum and maximum where those
    coincide. ``image`` as :func:`normalize_slice`.
    """
    x = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(x, [prep.low, prep.high])
    if hi - lo <= 1e-12:
        lo, hi = float(x.min()), float(x.max())
    return float(lo), float(hi)


def normalize_slice(
    image: np.ndarray,
    prep: Preprocessing = Preprocessing(),
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Normalise one slice to encoder input.

    Parameters
    ----------
    image : np.ndarray
        ``(H, W)`` grayscale or ``(H, W, 3)`` RGB, any real dtype.
    prep : Preprocessing
        Percentiles and channel count.
    bounds : tuple of float, optional
        :func:`intensity_bounds` of this slice and ``prep``, when known already.

    Returns
    -------
    np.ndarray
        ``(channels, H, W)`` float32, about ``[-0.5, 0.5]`` between the percentiles. A constant
        slice (an empty frame, say) maps to zeros rather than dividing by zero.

    Raises
    ------
    ValueError
        For other shapes, or non-finite values.
    """
    if image.ndim == 3 and image.shape[-1] == 3:
        rgb = True
    elif image.ndim == 2:
        rgb = False
    else:
        raise ValueError(f"expected a (H, W) or (H, W, 3) slice, got shape {image.shape}")
    x = np.asarray(image, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("slice contains NaN or infinite values; clean or mask them first")
    lo, hi = intensity_bounds(x, prep) if bounds is None else bounds
    if hi - lo <= 1e-12:
        out = np.zeros(x.shape, np.float32)
    else:
        out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo)) - np.float32(0.5)
        if prep.invert:
            out = -out
    out = np.clip(out, np.float32(-1.0), np.float32(2.0)).astype(np.float32, copy=False)
    if rgb:
        out = np.moveaxis(out, -1, 0)
        if prep.channels != 3:
            out = out.mean(axis=0, keepdims=True).repeat(prep.channels, axis=0)
        return np.ascontiguousarray(out)
    return np.broadcast_to(out, (prep.channels, *out.shape)).copy()
