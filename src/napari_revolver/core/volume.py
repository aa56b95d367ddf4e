"""What a volume is to the predictor: its geometry, how it is read, and slice access.

A volume is ``(..., Y, X)`` or ``(..., Y, X, 3|4)`` for RGB(A); every leading axis (Z, T,
image index) indexes 2D slices. How it is read (RGB or not, which channel of a multichannel
image, inverted intensities) is one frozen :class:`VolumeSpec`, passed whole from the file or
the layer to the predictor, to a batch job or to a feature-store signature.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .scale import check_scale

__all__ = [
    "ChannelView",
    "Index",
    "VolumeInfo",
    "VolumeSpec",
    "channel_view",
    "check_and_fingerprint",
    "check_points",
    "describe_volume",
    "read_raw_slice",
    "read_slice",
]

Index = int | tuple[int, ...]


@dataclass(frozen=True)
class VolumeSpec:
    """How an array is read as a volume of 2D slices.

    Attributes
    ----------
    rgb : bool or None
        Whether the last axis holds RGB(A) samples; ``None`` guesses as napari does (a last
        axis of size 3 or 4 on an array of 3 or more dimensions).
    channel_axis : int or None
        Axis holding the channels of a multichannel array; ``None`` for none.
    channel : int or None
        The channel to segment; required with ``channel_axis``.
    invert : bool
        Reverse intensities after normalising, for dark objects on a light background
        (brightfield, H&E). Tasks guided with one setting apply only with the same.
    scale : float
        Each slice is resized by this factor in y and x (never along z or t) before the
        network (:mod:`.scale`): below 1 for objects larger than the network's view (0.5 bins
        2 x 2), above 1 for tiny ones.
        Points, masks and results stay in data pixels. Tasks guided with one scale apply only
        with the same.
    """

    rgb: bool | None = None
    channel_axis: int | None = None
    channel: int | None = None
    invert: bool = False
    scale: float = 1.0

    def resolved(self, shape: tuple[int, ...]) -> VolumeSpec:
        """Check this spec against an array shape and fill in ``rgb`` and the channel axis.

        Parameters
        ----------
        shape : tuple of int
            Shape of the array as given, channels included.

        Returns
        -------
        VolumeSpec
            ``rgb`` a bool and ``channel_axis`` non-negative.

        Raises
        ------
        ValueError
            A channel out of range or missing, ``rgb=True`` without a samples axis, or a
            ``scale`` out of range.
        """
        spec = replace(self, scale=check_scale(self.scale))
        if spec.channel_axis is not None:
            if not -len(shape) <= spec.channel_axis < len(shape):
                raise ValueError(
                    f"channel_axis must be in [{-len(shape)}, {len(shape) - 1}] for an array "
                    f"of shape {shape}; got {spec.channel_axis}"
                )
            ax = spec.channel_axis % len(shape)
            if spec.channel is None or not 0 <= spec.channel < shape[ax]:
                raise ValueError(
                    f"channel must be in [0, {shape[ax] - 1}] for channel_axis "
                    f"{spec.channel_axis}; got {spec.channel}"
                )
            spec = replace(spec, channel_axis=ax)
            shape = shape[:ax] + shape[ax + 1 :]
        elif spec.channel is not None:
            raise ValueError(f"channel={spec.channel} was given without a channel_axis")
        rgb = spec.rgb
        if rgb is None:
            rgb = len(shape) >= 3 and shape[-1] in (3, 4)
        if rgb and (len(shape) < 3 or shape[-1] not in (3, 4)):
            raise ValueError(f"rgb=True needs a last axis of size 3 or 4; got shape {shape}")
        return replace(spec, rgb=bool(rgb))


@dataclass(frozen=True)
class VolumeInfo:
    """Geometry of the volume set on a predictor.

    Attributes
    ----------
    shape : tuple of int
        Shape of the array as read: without its channel axis, if it has one.
    leading_shape : tuple of int
        Shape of the slice-indexing axes (``()`` for a single 2D image).
    slice_shape : tuple of int
        ``(H, W)``.
    rgb : bool
        Whether the last axis holds RGB(A) samples.
    fingerprint : str
        Cheap data identity used by feature-cache signatures (of the channel read, if any).
    """

    shape: tuple[int, ...]
    leading_shape: tuple[int, ...]
    slice_shape: tuple[int, int]
    rgb: bool
    fingerprint: str

    @property
    def n_slices(self) -> int:
        """Number of 2D slices: the product of the leading shape."""
        return int(np.prod(self.leading_shape)) if self.leading_shape else 1

    @property
    def ndim(self) -> int:
        """Dimensionality of point coordinates: leading axes + 2."""
        return len(self.leading_shape) + 2

    def flat(self, index: Index) -> int:
        """Flat slice number of ``index`` (an int is taken as already flat).

        Raises
        ------
        IndexError
            An index out of range, or with the wrong number of axes.
        """
        if isinstance(index, (int, np.integer)):
            k = int(index)
            if not 0 <= k < self.n_slices:
                raise IndexError(f"slice {k} is out of range for {self.n_slices} slices")
            return k
        index = tuple(int(i) for i in index)
        if len(index) != len(self.leading_shape):
            raise IndexError(
                f"slice index {index} has {len(index)} axes; this volume has "
                f"{len(self.leading_shape)} leading axes {self.leading_shape}"
            )
        for i, n in zip(index, self.leading_shape, strict=True):
            if not 0 <= i < n:
                raise IndexError(
                    f"slice index {index} is out of range for leading shape {self.leading_shape}"
                )
        return int(np.ravel_multi_index(index, self.leading_shape)) if index else 0

    def unflat(self, k: int) -> tuple[int, ...]:
        """Leading-axes index of flat slice ``k``."""
        return (
            tuple(int(i) for i in np.unravel_index(k, self.leading_shape))
            if self.leading_shape
            else ()
        )

    def flat_indices(self, indices: Any = None) -> list[int]:
        """Flat numbers of ``indices`` (ints or leading-axes tuples); all slices for ``None``."""
        if indices is None:
            return list(range(self.n_slices))
        return [self.flat(i) for i in indices]


class ChannelView:
    """Lazy selection of one channel of a multichannel array.

    Parameters
    ----------
    array : array-like
        Any array with ``shape``, ``dtype`` and integer/slice indexing (numpy, dask, zarr).
    axis : int
        Non-negative axis of the channels.
    channel : int
        Channel to select.
    """

    def __init__(self, array: Any, axis: int, channel: int) -> None:
        self.array, self.axis, self.channel = array, axis, channel
        shape = tuple(array.shape)
        self.shape = shape[:axis] + shape[axis + 1 :]
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, idx: Any) -> np.ndarray:
        """Read ``idx`` of the selected channel (only that part of the array)."""
        idx = tuple(idx) if isinstance(idx, tuple) else (idx,)
        full = list(idx[: self.axis]) + [self.channel] + list(idx[self.axis :])
        if len(idx) < self.axis:
            full = list(idx) + [slice(None)] * (self.axis - len(idx)) + [self.channel]
        return np.asarray(self.array[tuple(full)])


def channel_view(array: Any, spec: VolumeSpec) -> Any:
    """Return the array as the predictor reads it: one channel of it with a ``channel_axis``.

    Parameters
    ----------
    array : array-like
        ``(..., Y, X[, S])`` with a channel axis somewhere if ``spec.channel_axis`` is set.
    spec : VolumeSpec
        A resolved spec (see :meth:`VolumeSpec.resolved`).

    Returns
    -------
    array-like
        ``array`` itself, or a lazy :class:`ChannelView`.
    """
    if spec.channel_axis is None:
        return array
    return ChannelView(array, spec.channel_axis, int(spec.channel))  # type: ignore[arg-type]


def describe_volume(array: Any, spec: VolumeSpec) -> tuple[VolumeInfo, VolumeSpec]:
    """Validate an array against a spec and describe its slices.

    The fingerprint is left empty: it needs the data read (see :func:`check_and_fingerprint`).

    Parameters
    ----------
    array : array-like
        ``(..., Y, X)`` or ``(..., Y, X, 3|4)``, optionally with a channel axis.
    spec : VolumeSpec

    Returns
    -------
    info : VolumeInfo
        With ``fingerprint=""``.
    spec : VolumeSpec
        Resolved.

    Raises
    ------
    ValueError
        Fewer than 2 dimensions, an unsupported dtype, slices under 8 x 8 pixels, an empty
        array, or a spec that does not fit the shape.
    """
    shape = tuple(int(s) for s in getattr(array, "shape", ()))
    dtype = np.dtype(getattr(array, "dtype", np.float64))
    if len(shape) < 2:
        raise ValueError(
            f"expected an image with at least 2 dimensions (..., Y, X); got shape {shape}"
        )
    if dtype.kind not in "buif":
        raise ValueError(
            f"expected a real-valued image (bool, integer or float); got dtype {dtype}"
        )
    spec = spec.resolved(shape)
    view = shape
    if spec.channel_axis is not None:
        view = shape[: spec.channel_axis] + shape[spec.channel_axis + 1 :]
    spatial = view[-3:-1] if spec.rgb else view[-2:]
    leading = view[:-3] if spec.rgb else view[:-2]
    if min(spatial) < 8:
        raise ValueError(
            f"slices must be at least 8x8 pixels; got (Y, X) = {spatial} from shape {shape}"
        )
    if any(n == 0 for n in leading):
        raise ValueError(f"the image is empty: shape {shape}")
    info = VolumeInfo(view, leading, (int(spatial[0]), int(spatial[1])), bool(spec.rgb), "")
    return info, spec


def read_raw_slice(array: Any, info: VolumeInfo, spec: VolumeSpec, k: int) -> np.ndarray:
    """Slice ``k`` as stored: ``(H, W)`` or ``(H, W, S)``, of the selected channel if any.

    Parameters
    ----------
    array : array-like
        The volume as given (channels included).
    info : VolumeInfo
    spec : VolumeSpec
        Resolved.
    k : int
        Flat slice number.

    Returns
    -------
    np.ndarray
        Only this slice is read from lazy data.
    """
    idx = info.unflat(k)
    if spec.channel_axis is not None:
        return np.asarray(channel_view(array, spec)[idx])
    return np.asarray(array[idx] if idx else array)


def read_slice(array: Any, info: VolumeInfo, spec: VolumeSpec, k: int) -> np.ndarray:
    """Slice ``k`` as the encoder reads it: ``(H, W)`` or ``(H, W, 3)`` numpy.

    Parameters
    ----------
    array, info, spec, k
        As for :func:`read_raw_slice`.

    Returns
    -------
    np.ndarray
        Bool data comes back as uint8; RGBA drops its alpha.
    """
    plane = read_raw_slice(array, info, spec, k)
    if info.rgb:
        plane = plane[..., :3]
    if plane.dtype == bool:
        plane = plane.astype(np.uint8)
    return plane


def check_and_fingerprint(array: Any, info: VolumeInfo, spec: VolumeSpec) -> VolumeInfo:
    """Read the first, middle and last slices once: refuse unusable data, fingerprint the rest.

    Parameters
    ----------
    array : array-like
        The volume as given.
    info : VolumeInfo
        From :func:`describe_volume`.
    spec : VolumeSpec
        Resolved.

    Returns
    -------
    VolumeInfo
        ``info`` with its fingerprint (see :func:`.features.fingerprint_planes`).

    Raises
    ------
    ValueError
        NaN or infinite values, or a constant image.
    """
    from .features import fingerprint_planes

    picks = sorted({0, info.n_slices // 2, info.n_slices - 1})
    planes = []
    constant = True
    lo = 0.0
    for k in picks:
        raw = read_raw_slice(array, info, spec, k)
        plane = raw[..., :3] if info.rgb else raw
        if plane.dtype.kind == "f" and not np.isfinite(plane).all():
            raise ValueError(
                f"slice {info.unflat(k)} contains NaN or infinite values; replace them "
                "(e.g. numpy.nan_to_num) before segmenting"
            )
        lo, hi = float(plane.min()), float(plane.max())
        constant = constant and lo == hi
        planes.append(raw)
    if constant:
        raise ValueError(
            f"the image is constant (every sampled pixel is {lo:g}); nothing to segment"
        )
    source = channel_view(array, spec)
    fingerprint = fingerprint_planes(tuple(source.shape), source.dtype, planes)
    return replace(info, fingerprint=fingerprint)


def check_points(points: Any, labels: Any, info: VolumeInfo) -> tuple[np.ndarray, np.ndarray]:
    """Validate point annotations against a volume.

    Parameters
    ----------
    points : array-like
        ``(N, ndim)`` data-pixel coordinates, leading axes first and ``(y, x)`` last; a single
        point may be given as ``(ndim,)``.
    labels : array-like
        ``(N,)``: 1 (or True) positive, 0 (or False) negative.
    info : VolumeInfo

    Returns
    -------
    points : np.ndarray
        ``(N, ndim)`` float64.
    labels : np.ndarray
        ``(N,)`` int8.

    Raises
    ------
    ValueError
        Wrong shapes, label values other than 0/1, no positive point, non-finite coordinates,
        or points outside the volume (naming the first).
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1 and pts.size == info.ndim:
        pts = pts[None]
    if pts.ndim != 2 or pts.shape[1] != info.ndim:
        axes = "leading, " * len(info.leading_shape) + "y, x"
        raise ValueError(
            f"points must have shape (N, {info.ndim}) as ({axes}) for an image with "
            f"slice axes {info.leading_shape} and slices {info.slice_shape}; "
            f"got shape {pts.shape}"
        )
    lab = _check_labels(labels, len(pts))
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    bounds = np.asarray((*info.leading_shape, *info.slice_shape), np.float64)
    outside = ((pts < -0.5) | (pts >= bounds - 0.5)).any(axis=1)
    if outside.any():
        i = int(np.argmax(outside))
        raise ValueError(
            f"{int(outside.sum())} point(s) lie outside the image; point {i} is at "
            f"{pts[i].tolist()}, valid ranges are [0, {(bounds - 1).tolist()}]"
        )
    return pts, lab


def _check_labels(labels: Any, n: int) -> np.ndarray:
    """Point labels ``(n,)`` as int8 0/1 with at least one positive."""
    lab = np.asarray(labels)
    if lab.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the points; got {lab.shape}")
    if lab.dtype == bool:
        lab = lab.astype(np.int8)
    if not np.isin(lab, (0, 1)).all():
        raise ValueError(
            f"labels must be 1 (positive) or 0 (negative); got values {np.unique(lab).tolist()}"
        )
    lab = lab.astype(np.int8)
    if n == 0 or not (lab == 1).any():
        raise ValueError("no positive point: give at least one point labelled 1 on the object")
    return lab
