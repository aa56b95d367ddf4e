"""File input/output for images, label volumes and prompt points.

This module is deliberately GUI-free: it depends only on numpy, tifffile and
the Python standard library (``zarr`` is used opportunistically for lazy
reading when it is installed), so that it can be used from the command line,
from batch jobs and from tests without importing napari or Qt.

Three groups of functionality are provided:

* :func:`read_image` / :func:`to_yx_last` read a TIFF (plain, ImageJ
  hyperstack or OME-TIFF) together with its axes string and per-axis pixel
  size, and reorder axes into the ``...YX[S]`` layout used downstream.
* :func:`write_labels` writes an integer label volume as a compressed TIFF
  with the smallest unsigned dtype that holds it, atomically.
* :class:`PointTable`, :func:`read_points` and :func:`write_points` handle
  positive/negative prompt points in the CSV layout of napari's Points layer
  writer (``index,axis-0,...,axis-(D-1)`` plus property columns).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Protocol, runtime_checkable

import numpy as np
import tifffile

from .atomic import PathLike, atomic_write
from .labels import label_dtype
from .volume import VolumeSpec

__all__ = [
    "ImageData",
    "LazyArray",
    "PointTable",
    "VolumeSource",
    "default_axes",
    "open_volume",
    "read_image",
    "read_points",
    "to_yx_last",
    "write_label_pages",
    "write_label_zarr",
    "write_labels",
    "write_points",
]

logger = logging.getLogger(__name__)

# Axis order ImageJ hyperstacks can represent; anything else must be written
# as a plain ("shaped") tifffile TIFF.
_IMAGEJ_AXES = "TZCYXS"

# Mirrors tifffile's own BigTIFF threshold. tifffile only switches to BigTIFF
# automatically for *uncompressed* data, and ImageJ cannot read BigTIFF at all,
# so large volumes must be routed to the plain writer with bigtiff=True.
_BIGTIFF_THRESHOLD = 2**32 - 2**25

# ResolutionUnit value 1 (NONE): the resolution is in arbitrary units, which
# is how ImageJ and tifffile store "pixels per <unit>". INCH/CENTIMETER
# usually encode print DPI, which is not a physical pixel size.
_RESUNIT_NONE = 1

_UNSIGNED_DTYPES: tuple[np.dtype[Any], ...] = (
    np.dtype(np.uint8),
    np.dtype(np.uint16),
    np.dtype(np.uint32),
    np.dtype(np.uint64),
)

_AXIS_COLUMN = re.compile(r"^axis-(\d+)$")
_LABEL_COLUMN = "label"
_TASK_COLUMN = "task"
_INDEX_COLUMN = "index"
_POSITIVE_WORDS = frozenset({"positive", "pos", "1", "true", "+"})
_NEGATIVE_WORDS = frozenset({"negative", "neg", "0", "false", "-"})


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


@runtime_checkable
class LazyArray(Protocol):
    """Minimal array protocol satisfied by zarr arrays and numpy memmaps."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape."""
        ...

    @property
    def dtype(self) -> Any:
        """Array element type."""
        ...

    def __getitem__(self, key: Any) -> Any:
        """Index into the array, reading data on demand."""
        ...


# eq=False because element-wise array comparison has no single truth value;
# identity semantics are the only well-defined equality for these records.
@dataclass(frozen=True, eq=False)
class ImageData:
    """An image read from disk together with its axes and pixel size.

    Attributes
    ----------
    data : numpy.ndarray or LazyArray
        Pixel data, shape ``(n_0, ..., n_{k-1})`` with ``k == len(axes)``.
        A numpy array when read eagerly; a zarr array or numpy memmap when
        read with ``lazy=True`` (see :func:`read_image`).
    axes : str
        One character per dimension of ``data`` in tifffile's vocabulary,
        e.g. ``"ZYX"``, ``"TZYX"``, ``"YXS"`` (``S`` = samples/RGB,
        ``C`` = channels).
    scale : tuple of float
        Pixel size per axis, length ``len(axes)``, in the file's units.
        ``1.0`` for axes without calibration.
    path : str
        The path the image was read from.
    """

    data: np.ndarray | LazyArray
    axes: str
    scale: tuple[float, ...]
    path: str

    def __post_init__(self) -> None:
        """Check that ``axes`` and ``scale`` match the dimensions of ``data``."""
        ndim = len(self.data.shape)
        if len(self.axes) != ndim:
            raise ValueError(
                f"axes {self.axes!r} has {len(self.axes)} characters but data "
                f"has {ndim} dimensions (shape {tuple(self.data.shape)})"
            )
        if len(self.scale) != ndim:
            raise ValueError(
                f"scale has {len(self.scale)} entries but data has {ndim} "
                f"dimensions (axes {self.axes!r})"
            )


def read_image(path: PathLike, *, lazy: bool = False) -> ImageData:
    """Read the first image series of a TIFF file.

    Parameters
    ----------
    path : str or os.PathLike
        Path to a TIFF, ImageJ hyperstack or OME-TIFF file.
    lazy : bool, optional
        If True, avoid loading the pixels into memory: a zarr array is
        returned when ``zarr`` is installed, otherwise a read-only numpy
        memmap when the data are uncompressed and contiguous, otherwise the
        data are read eagerly after all (logged at INFO level).

    Returns
    -------
    ImageData
        ``data`` has the shape of ``tifffile.TiffFile(path).series[0]``
        (size-1 dimensions squeezed, as tifffile does), ``axes`` its
        normalised axes string (a single leading unknown axis ``I``/``Q`` is
        reported as ``Z``) and ``scale`` the per-axis pixel size taken from
        OME ``PhysicalSize*``, ImageJ ``spacing``/``finterval`` plus the
        resolution tags, or the ``scale`` written by :func:`write_labels`.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is a directory or cannot be parsed as a TIFF.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image file not found: {p}")
    if p.is_dir():
        if _is_zarr(p):
            return _read_zarr(p)
        raise ValueError(
            f"{p} is not a readable TIFF or zarr: expected a file or a zarr folder, "
            "got a plain directory"
        )

    try:
        with tifffile.TiffFile(p) as tif:
            if not tif.series:
                raise ValueError("file contains no image series")
            series = tif.series[0]
            _check_complete(tif, series, p)
            raw_axes = str(series.axes)
            shape = tuple(int(n) for n in series.shape)
            scale = _read_scale(tif, raw_axes)
            data: np.ndarray | LazyArray | None = None if lazy else series.asarray()
    except PermissionError:
        # Not a format problem; the caller needs the original OSError.
        raise
    except Exception as exc:
        # tifffile signals malformed input with a variety of exception types
        # (TiffFileError, struct.error, IndexError, ...); callers should only
        # have to handle one.
        raise ValueError(f"{p} is not a readable TIFF: {exc}") from exc

    if data is None:
        data = _open_lazy(p, shape)

    return ImageData(data=data, axes=_normalise_axes(raw_axes), scale=scale, path=str(p))


def _check_complete(tif: tifffile.TiffFile, series: Any, path: Path) -> None:
    """Refuse a TIFF whose image data end before what its metadata promise (a cut file).

    tifffile falls back to the pages it can read (often only the first) with a log message;
    segmenting that would silently treat one plane as the whole stack.
    """
    size = path.stat().st_size
    found = int(np.prod(series.shape))
    if tif.is_imagej:
        images = int((tif.imagej_metadata or {}).get("images", 0) or 0)
        page = int(np.prod(tif.pages.first.shape))
        if images * page > found:
            raise ValueError(
                f"the file is truncated or corrupt: its ImageJ metadata describe {images} "
                f"planes, the file holds {found // max(page, 1)}"
            )
    offset = getattr(series, "dataoffset", None)
    if offset is not None and offset + series.nbytes > size:
        raise ValueError(
            f"the file is truncated or corrupt: its image data end at byte "
            f"{offset + series.nbytes}, the file has {size} bytes"
        )


@dataclass(frozen=True, eq=False)
class VolumeSource:
    """An image file opened lazily for segmentation.

    Attributes
    ----------
    data : array-like
        ``(..., Y, X[, S|C])``, read one slice at a time.
    spec : VolumeSpec
        How the predictor reads ``data`` (RGB, channel, invert): pass it to
        ``RevolverPredictor.set_volume(data, spec)``.
    axes : str
        Axes of the label image (``data``'s without channels or samples), e.g. ``"TZYX"``.
    scale : tuple of float
        Pixel size per axis of ``axes``.
    """

    data: Any
    spec: VolumeSpec
    axes: str
    scale: tuple[float, ...]


def open_volume(
    path: PathLike, channel: int | None = None, *, invert: bool = False, scale: float = 1.0
) -> VolumeSource:
    """Open a TIFF or zarr image lazily with its axes ordered for the predictor.

    Parameters
    ----------
    path : str or os.PathLike
        TIFF (ImageJ or OME axes honoured), zarr array or OME-Zarr image (level 0).
    channel : int, optional
        The channel to segment of a multichannel image (not needed for a single channel).
    invert : bool
        Dark objects on a light background: intensities reversed (see :class:`VolumeSpec`).
    scale : float
        Factor slices are resized by before the network (see :class:`VolumeSpec`).

    Returns
    -------
    VolumeSource
        RGB is detected from the samples axis.

    Raises
    ------
    ValueError
        Several channels and no ``channel``, or a ``channel`` for an image without channels.
    """
    img = read_image(path, lazy=True)
    data, axes = to_yx_last(img.data, img.axes)
    spec = VolumeSpec(rgb=axes.endswith("S"), invert=bool(invert), scale=float(scale))
    if "C" in axes:
        n = int(data.shape[axes.index("C")])
        if channel is None and n == 1:
            channel = 0  # a single channel needs no choice
        if channel is None:
            raise ValueError(
                f"{path} has {n} channels (axes {axes}); choose one with channel=N (0 to {n - 1})"
            )
        spec = replace(spec, channel_axis=axes.index("C"), channel=channel)
    elif channel is not None:
        raise ValueError(
            f"channel={channel} was given but {path} has no channel axis (axes {axes})"
        )
    label_axes = axes.replace("C", "").replace("S", "")
    by_axis = (
        dict(zip(img.axes, img.scale, strict=False)) if len(img.scale) == len(img.axes) else {}
    )
    scale = tuple(float(by_axis.get(a, 1.0)) for a in label_axes)
    return VolumeSource(data, spec, label_axes, scale)


def default_axes(ndim: int, *, labels: bool = True) -> str:
    """Axes assumed for an array without axis metadata.

    Parameters
    ----------
    ndim : int
        Number of dimensions.
    labels : bool
        For a label image (no channels): only 2-D ``YX``, 3-D ``ZYX`` and 4-D ``TZYX`` are
        known. For an image, 5-D is ``TCZYX`` and more leading axes are unknown (``Q``).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        A label image of another dimensionality (its axes must be given).
    """
    known = {2: "YX", 3: "ZYX", 4: "TZYX"} if labels else {2: "YX", 3: "ZYX", 4: "TZYX", 5: "TCZYX"}
    if ndim in known:
        return known[ndim]
    if labels or ndim < 2:
        raise ValueError(
            f"cannot infer axes for {ndim}-D labels (defaults exist for 2-D, 3-D, 4-D); "
            "pass axes explicitly"
        )
    return "Q" * (ndim - 2) + "YX"


def _is_zarr(p: Path) -> bool:
    return any((p / name).exists() for name in ("zarr.json", ".zarray", ".zgroup"))


def _read_zarr(p: Path) -> ImageData:
    """Open a zarr array, or level 0 of an OME-Zarr multiscale image, lazily.

    Axes come from the OME-NGFF ``multiscales`` metadata (names such as t, c, z, y, x) and
    the pixel size from level 0's ``scale`` transformation; a plain array gets default axes.
    """
    import zarr

    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:
        raise ValueError(f"{p} is not a readable zarr store: {exc}") from exc
    axes = None
    scale: tuple[float, ...] | None = None
    if isinstance(node, zarr.Group):
        attrs = dict(node.attrs)
        ome = attrs.get("ome", attrs)
        multiscales = ome.get("multiscales") if isinstance(ome, dict) else None
        if not multiscales:
            raise ValueError(
                f"{p} is a zarr group without OME-Zarr 'multiscales' metadata; "
                "point to the array itself"
            )
        ms = multiscales[0]
        level0 = ms["datasets"][0]
        node = node[level0["path"]]
        names = [a["name"] if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
        if names:
            axes = "".join(n[:1].upper() for n in names)
        for t in level0.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = tuple(float(v) for v in t["scale"])
    ndim = len(node.shape)
    if axes is None or len(axes) != ndim:
        axes = default_axes(ndim, labels=False)
    if scale is None or len(scale) != ndim:
        scale = (1.0,) * ndim
    return ImageData(data=node, axes=axes, scale=scale, path=str(p))


def to_yx_last(data: np.ndarray | LazyArray, axes: str) -> tuple[np.ndarray | LazyArray, str]:
    """Reorder axes so that Y, X come last, followed by a samples/channel axis.

    Non-spatial axes keep their relative order at the front. If ``S`` is
    present it becomes the last axis; otherwise ``C`` does, if present (when
    both exist, ``C`` stays among the leading axes).

    Parameters
    ----------
    data : numpy.ndarray or LazyArray
        Array of shape ``(n_0, ..., n_{k-1})`` with ``k == len(axes)``.
    axes : str
        Axes of ``data``; must contain ``Y`` and ``X`` and no duplicates.

    Returns
    -------
    array : numpy.ndarray or LazyArray
        ``data`` transposed to the new order. A view for numpy inputs and
        ``data`` itself when no reordering is needed. Array-likes without
        ``transpose`` are materialised with :func:`numpy.asarray`.
    axes : str
        The reordered axes, e.g. ``"ZYXS"``, ``"TZYX"``, ``"YXC"``.

    Raises
    ------
    ValueError
        If ``axes`` does not match ``data.ndim``, has duplicates or lacks
        ``Y``/``X``.
    """
    ndim = len(data.shape)
    if len(axes) != ndim:
        raise ValueError(
            f"axes {axes!r} has {len(axes)} characters but data has {ndim} "
            f"dimensions (shape {tuple(data.shape)})"
        )
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} contains duplicate axis letters")
    missing = [a for a in "YX" if a not in axes]
    if missing:
        raise ValueError(f"axes {axes!r} must contain 'Y' and 'X'; missing {''.join(missing)!r}")

    trailing = next((a for a in "SC" if a in axes), "")
    tail = "YX" + trailing
    new_axes = "".join(a for a in axes if a not in tail) + tail
    if new_axes == axes:
        return data, axes

    order = tuple(axes.index(a) for a in new_axes)
    if isinstance(data, np.ndarray):
        return np.transpose(data, order), new_axes
    if type(data).__module__.split(".")[0] == "dask":
        return data.transpose(order), new_axes  # type: ignore[union-attr]
    # zarr arrays and other array-likes: a view that reads only what is indexed.
    return LazyTransposed(data, order), new_axes


class LazyTransposed:
    """Axis-permuted view of an array-like that reads only the indexed part.

    ``view[i, j]`` with integer (or slice) indices over the leading axes of the permuted order
    reads the matching block of the underlying array and permutes its remaining axes.
    """

    def __init__(self, array: Any, order: Sequence[int]) -> None:
        self.array = array
        self.order = tuple(int(o) for o in order)
        self.shape = tuple(int(array.shape[o]) for o in self.order)
        self.dtype = array.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > self.ndim:
            raise IndexError("LazyTransposed supports integers and slices only")
        full = list(key) + [slice(None)] * (self.ndim - len(key))
        source: list[Any] = [slice(None)] * self.ndim
        for new_axis, src_axis in enumerate(self.order):
            source[src_axis] = full[new_axis]
        block = np.asarray(self.array[tuple(source)])
        # Axes that survive (sliced, not integer-indexed), in source order, to the new order.
        kept_src = [a for a in range(self.ndim) if not isinstance(source[a], (int, np.integer))]
        kept_new = [a for a in self.order if a in kept_src]
        return np.transpose(block, [kept_src.index(a) for a in kept_new])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.transpose(np.asarray(self.array), self.order)
        return out.astype(dtype) if dtype is not None else out


def _normalise_axes(axes: str) -> str:
    """Map a lone leading unknown axis (``I``/``Q``) to ``Z``.

    tifffile labels a stack of pages without metadata ``I`` or ``Q``; for a
    single such axis in front of the image plane the only sensible reading
    for segmentation is a Z stack. Several unknown axes are ambiguous and left
    untouched.
    """
    if axes and axes[0] in "IQ" and sum(a in "IQ" for a in axes) == 1 and "Z" not in axes:
        return "Z" + axes[1:]
    return axes


def _open_lazy(path: Path, shape: tuple[int, ...]) -> np.ndarray | LazyArray:
    """Open series 0 of ``path`` without reading it, if the format allows."""
    try:
        import zarr  # optional dependency
    except ImportError:
        zarr = None

    if zarr is not None:
        store = None
        try:
            store = tifffile.imread(path, aszarr=True, series=0, level=0)
            arr = zarr.open(store, mode="r")
        except Exception as exc:
            # tifffile releases require specific zarr major versions; a
            # mismatch must degrade to memmap, not break reading.
            if store is not None:
                store.close()
            logger.info("zarr could not open %s lazily (%s); trying memmap", path, exc)
        else:
            if tuple(arr.shape) == shape:
                return arr
            store.close()
            logger.info(
                "zarr view of %s has shape %s, expected %s; trying memmap",
                path,
                tuple(arr.shape),
                shape,
            )

    try:
        mm = tifffile.memmap(path, mode="r", series=0)
    except ValueError as exc:
        logger.info("%s cannot be memory-mapped (%s); reading eagerly", path, exc)
    else:
        if tuple(mm.shape) == shape:
            return mm
        return mm.reshape(shape)

    return tifffile.imread(path, series=0)


def _read_scale(tif: tifffile.TiffFile, axes: str) -> tuple[float, ...]:
    """Best-effort per-axis pixel size; never raises (metadata is optional)."""
    scale = dict.fromkeys(axes, 1.0)
    try:
        if tif.is_ome and tif.ome_metadata:
            scale.update(_ome_scale(tif.ome_metadata))
        elif tif.is_imagej:
            scale.update(_resolution_scale(tif.pages[0], require_unitless=False))
            meta = tif.imagej_metadata or {}
            if "spacing" in meta:
                scale["Z"] = float(meta["spacing"])
            if "finterval" in meta:
                scale["T"] = float(meta["finterval"])
        else:
            scale.update(_resolution_scale(tif.pages[0], require_unitless=True))
            shaped = tif.shaped_metadata
            if shaped and isinstance(shaped[0], dict):
                written = shaped[0].get("scale")
                if isinstance(written, list) and len(written) == len(axes):
                    scale.update(zip(axes, (float(s) for s in written), strict=True))
    except Exception as exc:
        logger.warning(
            "ignoring unreadable calibration metadata in %s: %s", tif.filehandle.path, exc
        )
        scale = dict.fromkeys(axes, 1.0)

    # Keys may have been added for axes the series does not have (e.g. Z
    # spacing of a squeezed single slice); only the series' own axes count.
    result = []
    for a in axes:
        value = scale.get(a, 1.0)
        result.append(value if math.isfinite(value) and value > 0 else 1.0)
    return tuple(result)


def _resolution_scale(page: Any, *, require_unitless: bool) -> dict[str, float]:
    """Pixel size along X/Y from the XResolution/YResolution tags."""
    if "XResolution" not in page.tags or "YResolution" not in page.tags:
        return {}
    if require_unitless and int(page.resolutionunit) != _RESUNIT_NONE:
        return {}
    xres, yres = page.resolution
    out: dict[str, float] = {}
    if xres > 0:
        out["X"] = 1.0 / xres
    if yres > 0:
        out["Y"] = 1.0 / yres
    return out


def _ome_scale(ome_xml: str) -> dict[str, float]:
    """Pixel size from the first ``Pixels`` element of an OME-XML string."""
    root = ET.fromstring(ome_xml)
    pixels = next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return {}
    attributes = {
        "X": "PhysicalSizeX",
        "Y": "PhysicalSizeY",
        "Z": "PhysicalSizeZ",
        "T": "TimeIncrement",
    }
    return {
        axis: float(pixels.attrib[name])
        for axis, name in attributes.items()
        if name in pixels.attrib
    }


# --------------------------------------------------------------------------- #
# Label volumes
# --------------------------------------------------------------------------- #


def write_labels(
    path: PathLike,
    labels: np.ndarray,
    *,
    axes: str | None = None,
    scale: tuple[float, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label volume as a zlib-compressed TIFF, atomically.

    The data are cast to the smallest unsigned integer dtype that holds the
    largest label. ImageJ hyperstack metadata is written when the result is
    uint8/uint16, ``axes`` is in ImageJ's ``TZCYXS`` order without ``S`` and
    the data fit in a classic (non-Big) TIFF; otherwise a plain tifffile TIFF
    with ``{"axes": axes, "scale": [...]}`` metadata is written.

    Parameters
    ----------
    path : str or os.PathLike
        Target file. Its parent directory must exist.
    labels : numpy.ndarray
        Label image of shape ``(..., Y, X)`` with ``ndim >= 2``: bool,
        unsigned/signed integers (non-negative) or floats holding
        non-negative integer values.
    axes : str, optional
        One letter per dimension. Defaults to ``"YX"``, ``"ZYX"`` or
        ``"TZYX"`` for 2-D, 3-D and 4-D input respectively.
    scale : tuple of float, optional
        Pixel size per axis, length ``labels.ndim``, all positive. Stored in
        the resolution tags (Y, X), ImageJ ``spacing`` (Z) / ``finterval``
        (T), and in the plain-TIFF metadata.
    overwrite : bool, optional
        Replace an existing file at ``path``.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FileExistsError, FileNotFoundError
        As :func:`.atomic.atomic_write`: an existing ``path`` without ``overwrite``, or a
        missing parent directory.
    ValueError
        If ``labels`` has negative or non-integer values, an unsupported
        dtype, fewer than 2 dimensions, or ``axes``/``scale`` do not match
        ``labels.ndim``.

    Notes
    -----
    The data are written to a temporary sibling (:mod:`.atomic`) and renamed over ``path``
    only when complete, so an interruption (including Ctrl-C or SIGKILL) never leaves a
    truncated target.
    """
    arr = np.asarray(labels)
    if arr.ndim < 2:
        raise ValueError(f"labels must have at least 2 dimensions (Y, X); got shape {arr.shape}")
    axes = default_axes(arr.ndim) if axes is None else axes
    _validate_axes(axes, arr.ndim)
    scale_t = _validate_scale(scale, arr.ndim)
    arr = _minimal_unsigned(arr)

    kwargs = _tiff_options(arr.shape, arr.dtype, axes, scale_t)
    logger.debug("writing labels %s %s axes=%s to %s", arr.shape, arr.dtype, axes, path)

    def _write(fh: IO[Any]) -> None:
        tifffile.imwrite(fh, arr, **kwargs)

    return atomic_write(path, _write, binary=True, overwrite=overwrite)


def _tiff_options(
    shape: tuple[int, ...], dtype: np.dtype[Any], axes: str, scale_t: tuple[float, ...] | None
) -> dict[str, Any]:
    """tifffile.imwrite options for a label volume: compression, axes, pixel size, format."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    use_imagej = (
        np.dtype(dtype) in (np.dtype(np.uint8), np.dtype(np.uint16))
        and "S" not in axes
        and axes.endswith("YX")
        and _is_ordered_subsequence(axes, _IMAGEJ_AXES)
        and nbytes < _BIGTIFF_THRESHOLD
    )
    kwargs: dict[str, Any] = {
        "compression": "zlib",
        # Without an explicit photometric tifffile guesses RGB for a leading
        # or trailing dimension of size 3/4 (e.g. a 3-slice Z stack).
        "photometric": "minisblack",
    }
    if scale_t is not None:
        kwargs["resolution"] = (1.0 / scale_t[axes.index("X")], 1.0 / scale_t[axes.index("Y")])
        kwargs["resolutionunit"] = _RESUNIT_NONE
    if use_imagej:
        metadata: dict[str, Any] = {"axes": axes}
        if scale_t is not None and "Z" in axes:
            metadata["spacing"] = scale_t[axes.index("Z")]
        if scale_t is not None and "T" in axes:
            metadata["finterval"] = scale_t[axes.index("T")]
        kwargs.update(imagej=True, metadata=metadata)
    else:
        metadata = {"axes": axes}
        if scale_t is not None:
            metadata["scale"] = list(scale_t)
        kwargs.update(metadata=metadata, bigtiff=nbytes >= _BIGTIFF_THRESHOLD)
    return kwargs


def write_label_pages(
    path: PathLike,
    pages: Iterable[np.ndarray],
    shape: tuple[int, ...],
    dtype: Any,
    *,
    axes: str | None = None,
    scale: tuple[float, ...] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label volume page by page, never holding more than one page in memory.

    Parameters
    ----------
    path : str or os.PathLike
        Target TIFF; written to a temporary sibling and renamed when complete.
    pages : iterable of np.ndarray
        ``(Y, X)`` planes in C order of the leading axes of ``shape``; consumed lazily.
    shape : tuple of int
        Full shape ``(..., Y, X)``.
    dtype : dtype
        Unsigned integer dtype of every page (values must fit).
    axes, scale, overwrite
        As for :func:`write_labels`.

    Raises
    ------
    ValueError
        If a page has the wrong shape, or ``dtype`` is not unsigned.
    """
    dtype = np.dtype(dtype)
    if dtype not in _UNSIGNED_DTYPES:
        raise ValueError(f"dtype must be an unsigned integer type; got {dtype}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dimensions (Y, X); got {shape}")
    axes = default_axes(len(shape)) if axes is None else axes
    _validate_axes(axes, len(shape))
    scale_t = _validate_scale(scale, len(shape))
    kwargs = _tiff_options(shape, dtype, axes, scale_t)
    n_pages = int(np.prod(shape[:-2])) if len(shape) > 2 else 1

    def checked() -> Iterator[np.ndarray]:
        count = 0
        for page in pages:
            page = np.asarray(page)
            if page.shape != shape[-2:]:
                raise ValueError(f"page {count} has shape {page.shape}; expected {shape[-2:]}")
            count += 1
            yield page.astype(dtype, copy=False)
        if count != n_pages:
            raise ValueError(f"got {count} pages; expected {n_pages} for shape {shape}")

    def _write(fh: IO[Any]) -> None:
        tifffile.imwrite(fh, checked(), shape=shape, dtype=dtype, **kwargs)

    return atomic_write(path, _write, binary=True, overwrite=overwrite)


def write_label_zarr(
    path: PathLike,
    pages: Iterable[np.ndarray],
    shape: tuple[int, ...],
    dtype: Any,
    *,
    overwrite: bool = False,
) -> Path:
    """Write a label volume page by page into a zarr array, one chunk per page.

    Parameters
    ----------
    path : str or os.PathLike
        Target zarr folder. Its parent directory must exist.
    pages : iterable of np.ndarray
        ``(Y, X)`` planes in C order of the leading axes of ``shape``; consumed lazily.
    shape : tuple of int
        Full shape ``(..., Y, X)``.
    dtype : dtype
        dtype of the array (page values must fit).
    overwrite : bool, optional
        Replace an existing file or folder at ``path``.

    Returns
    -------
    pathlib.Path
        The zarr array, complete.

    Raises
    ------
    FileExistsError, FileNotFoundError
        As for :func:`.atomic.atomic_directory`.
    ValueError
        If a page has the wrong shape, or there are more or fewer pages than ``shape`` holds.

    Notes
    -----
    The array is built in a temporary sibling folder and renamed when complete
    (:func:`napari_revolver.core.atomic.atomic_directory`), so an interruption leaves no
    partial output under ``path``.
    """
    import zarr

    from .atomic import atomic_directory

    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must have at least 2 dimensions (Y, X); got {shape}")
    lead = shape[:-2]
    n = int(np.prod(lead)) if lead else 1

    def build(tmp: Path) -> None:
        arr = zarr.create_array(
            str(tmp),
            shape=shape,
            chunks=(1,) * len(lead) + shape[-2:],
            dtype=np.dtype(dtype),
            fill_value=0,
            overwrite=True,
        )
        count = 0
        for count, page in enumerate(pages, start=1):
            page = np.asarray(page)
            if page.shape != shape[-2:]:
                raise ValueError(f"page {count - 1} has shape {page.shape}; expected {shape[-2:]}")
            if count > n:
                raise ValueError(f"got more than {n} pages for shape {shape}")
            arr[np.unravel_index(count - 1, lead) if lead else ()] = page
        if count != n:
            raise ValueError(f"got {count} pages; expected {n} for shape {shape}")

    return atomic_directory(path, build, overwrite=overwrite)


def _validate_axes(axes: str, ndim: int) -> None:
    if len(axes) != ndim:
        raise ValueError(
            f"axes {axes!r} has {len(axes)} characters but labels have {ndim} dimensions"
        )
    if not (axes.isascii() and axes.isalpha() and axes.isupper()):
        raise ValueError(f"axes {axes!r} must consist of upper-case letters such as 'TZYX'")
    if len(set(axes)) != len(axes):
        raise ValueError(f"axes {axes!r} contains duplicate axis letters")


def _validate_scale(scale: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if scale is None:
        return None
    values = tuple(float(s) for s in scale)
    if len(values) != ndim:
        raise ValueError(f"scale has {len(values)} entries but labels have {ndim} dimensions")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"scale entries must be positive finite numbers; got {values}")
    return values


def _is_ordered_subsequence(axes: str, order: str) -> bool:
    positions = [order.find(a) for a in axes]
    return all(p >= 0 for p in positions) and positions == sorted(positions)


def _minimal_unsigned(arr: np.ndarray) -> np.ndarray:
    """Cast ``arr`` to the smallest unsigned integer dtype holding its values."""
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise ValueError(
            f"labels must be bool, integer or integer-valued float; got dtype {arr.dtype}"
        )
    if arr.size == 0:
        return arr.astype(np.uint8)

    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise ValueError("float labels contain NaN or infinity; expected integer values")
        if not np.array_equal(arr, np.floor(arr)):
            raise ValueError("float labels contain non-integer values; expected integer values")

    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise ValueError(f"labels must be non-negative; found minimum value {lo}")
    # As Python numbers: numpy would round uint64 max to float.
    return arr.astype(label_dtype(int(hi)), copy=False)


# --------------------------------------------------------------------------- #
# Points
# --------------------------------------------------------------------------- #


# eq=False: see ImageData.
@dataclass(frozen=True, eq=False)
class PointTable:
    """Prompt points with positive/negative labels and optional task names.

    Parameters are copied and stored read-only.

    Attributes
    ----------
    points : numpy.ndarray
        Shape ``(N, D)``, float64: point coordinates in data pixels, one
        column per image axis (napari's ``axis-0 .. axis-(D-1)``).
    labels : numpy.ndarray
        Shape ``(N,)``, int8: ``1`` for positive, ``0`` for negative points.
    tasks : tuple of str
        Length ``N``: task name per point, ``""`` when the point belongs to
        no named task. May be given as ``()`` for ``N > 0``, meaning no task
        for every point.
    """

    points: np.ndarray
    labels: np.ndarray
    tasks: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        """Validate and copy the fields: points ``(N, D)``, labels ``(N,)``, tasks ``N`` or 0."""
        points = np.array(self.points, dtype=np.float64, copy=True)
        if points.ndim != 2 or points.shape[1] < 1:
            raise ValueError(f"points must have shape (N, D) with D >= 1; got shape {points.shape}")
        n = points.shape[0]

        raw_labels = np.asarray(self.labels)
        if raw_labels.shape != (n,):
            raise ValueError(
                f"labels must have shape ({n},) to match points; got shape {raw_labels.shape}"
            )
        if raw_labels.size and not np.all(np.isin(raw_labels, (0, 1))):
            bad = np.unique(raw_labels[~np.isin(raw_labels, (0, 1))])
            raise ValueError(f"labels must be 0 (negative) or 1 (positive); got {bad.tolist()}")
        labels = raw_labels.astype(np.int8, copy=True)

        tasks = tuple(self.tasks) if self.tasks else ("",) * n
        if len(tasks) != n:
            raise ValueError(f"tasks must have {n} entries to match points; got {len(tasks)}")
        if not all(isinstance(t, str) for t in tasks):
            raise ValueError("tasks must be strings ('' for no task)")

        points.setflags(write=False)
        labels.setflags(write=False)
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "tasks", tasks)

    def __len__(self) -> int:
        """Return the number of points ``N``."""
        return int(self.points.shape[0])

    @property
    def ndim(self) -> int:
        """Dimensionality ``D`` of the point coordinates."""
        return int(self.points.shape[1])

    def task_names(self) -> list[str]:
        """Return the distinct task names in order of first appearance.

        Returns
        -------
        list of str
            Unique entries of ``tasks``; includes ``""`` if some points have
            no task.
        """
        return list(dict.fromkeys(self.tasks))

    def select(self, task: str) -> PointTable:
        """Return the points belonging to one task.

        Parameters
        ----------
        task : str
            Task name; ``""`` selects points without a task.

        Returns
        -------
        PointTable
            Shape ``(M, D)`` subset in original order; ``M == 0`` if no point
            has this task.
        """
        mask = np.fromiter((t == task for t in self.tasks), dtype=bool, count=len(self))
        return PointTable(
            points=self.points[mask],
            labels=self.labels[mask],
            tasks=tuple(t for t, keep in zip(self.tasks, mask, strict=True) if keep),
        )


def read_points(path: PathLike) -> PointTable:
    """Read prompt points from a napari-style Points CSV.

    The header must contain ``axis-0 .. axis-(D-1)`` (consecutive, any
    position). An ``index`` column and unknown columns are ignored. A
    ``label`` column holds ``positive``/``negative`` (also ``pos``/``neg``,
    ``1``/``0``, ``true``/``false``, ``+``/``-``, case-insensitive); if it is
    missing, all points are positive and a warning is logged, which is what
    a CSV saved by napari itself looks like. An optional ``task`` column holds
    task names.

    Parameters
    ----------
    path : str or os.PathLike
        CSV file (UTF-8, an optional BOM is accepted).

    Returns
    -------
    PointTable
        ``points`` shape ``(N, D)``, ``N >= 1``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the header lacks axis columns or has gaps/duplicates, a row has
        the wrong number of fields, a coordinate is not a finite number, a
        label is not recognised, or the table has no data rows. Row numbers
        in messages count data rows from 1 (the header is line 1 of the file).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"points file not found: {p}")

    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{p} is empty; expected a header like 'index,axis-0,axis-1,label'")
        columns = [c.strip() for c in header]
        axis_cols, label_col, task_col = _parse_header(columns, p)

        coords: list[list[float]] = []
        labels: list[int] = []
        tasks: list[str] = []
        row_number = 0
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            row_number += 1
            where = f"{p} row {row_number} (line {reader.line_num})"
            if len(row) != len(columns):
                raise ValueError(
                    f"{where}: expected {len(columns)} fields to match the header, got {len(row)}"
                )
            coords.append([_parse_coordinate(row[i], columns[i], where) for i in axis_cols])
            labels.append(1 if label_col is None else _parse_label(row[label_col], where))
            tasks.append("" if task_col is None else row[task_col].strip())

    if not coords:
        raise ValueError(f"{p} contains no points (only a header)")
    if label_col is None:
        logger.warning(
            "%s has no 'label' column; treating all %d points as positive", p, len(coords)
        )
    return PointTable(
        points=np.asarray(coords, dtype=np.float64),
        labels=np.asarray(labels, dtype=np.int8),
        tasks=tuple(tasks),
    )


def write_points(path: PathLike, table: PointTable, *, overwrite: bool = False) -> Path:
    """Write prompt points as a napari-style Points CSV, atomically.

    Columns are ``index,axis-0,...,axis-(D-1),label`` plus ``task`` when any
    point has a non-empty task name. Labels are written as
    ``positive``/``negative``. napari's Points reader loads the file with
    ``label`` (and ``task``) as point features.

    Parameters
    ----------
    path : str or os.PathLike
        Target ``.csv`` file. Its parent directory must exist.
    table : PointTable
        Points of shape ``(N, D)`` with ``N >= 1``.
    overwrite : bool, optional
        Whether an existing file may be replaced.

    Returns
    -------
    pathlib.Path
        The CSV written.

    Raises
    ------
    FileExistsError, FileNotFoundError
        As for :func:`write_labels`.
    ValueError
        If ``table`` is empty: :func:`read_points` rejects header-only files,
        so writing one would produce a file that cannot be read back.
    """
    if len(table) == 0:
        raise ValueError(f"refusing to write {path}: the point table contains no points")
    with_tasks = any(table.tasks)
    header = [_INDEX_COLUMN, *(f"axis-{k}" for k in range(table.ndim)), _LABEL_COLUMN]
    if with_tasks:
        header.append(_TASK_COLUMN)

    def _write(fh: IO[Any]) -> None:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for i, (coord, label, task) in enumerate(
            zip(table.points, table.labels, table.tasks, strict=True)
        ):
            # repr() of a Python float is the shortest string that round-trips.
            row = [str(i), *(repr(float(c)) for c in coord)]
            row.append("positive" if label == 1 else "negative")
            if with_tasks:
                row.append(task)
            writer.writerow(row)

    return atomic_write(path, _write, binary=False, overwrite=overwrite)


def _parse_header(columns: list[str], path: Path) -> tuple[list[int], int | None, int | None]:
    """Locate axis, label and task columns; return their indices."""
    duplicates = sorted({c for c in columns if columns.count(c) > 1})
    if duplicates:
        raise ValueError(f"{path}: duplicate column names in header: {duplicates}")

    axis_positions: dict[int, int] = {}
    for i, name in enumerate(columns):
        m = _AXIS_COLUMN.match(name)
        if m:
            axis_positions[int(m.group(1))] = i
    if not axis_positions:
        raise ValueError(
            f"{path}: header has no coordinate columns; expected 'axis-0', 'axis-1', ... "
            f"but found {columns}"
        )
    expected = list(range(len(axis_positions)))
    if sorted(axis_positions) != expected:
        raise ValueError(
            f"{path}: coordinate columns must be consecutive from axis-0; expected "
            f"{[f'axis-{k}' for k in expected]}, found "
            f"{[f'axis-{k}' for k in sorted(axis_positions)]}"
        )
    axis_cols = [axis_positions[k] for k in expected]

    label_col = columns.index(_LABEL_COLUMN) if _LABEL_COLUMN in columns else None
    task_col = columns.index(_TASK_COLUMN) if _TASK_COLUMN in columns else None
    ignored = [
        c
        for i, c in enumerate(columns)
        if i not in axis_cols and i != label_col and i != task_col and c != _INDEX_COLUMN
    ]
    if ignored:
        logger.debug("%s: ignoring extra columns %s", path, ignored)
    return axis_cols, label_col, task_col


def _parse_coordinate(value: str, column: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{where}, column {column!r}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where}, column {column!r}: expected a finite number, got {value!r}")
    return number


def _parse_label(value: str, where: str) -> int:
    word = value.strip().lower()
    if word in _POSITIVE_WORDS:
        return 1
    if word in _NEGATIVE_WORDS:
        return 0
    # Numeric features may have been round-tripped through napari as floats.
    with contextlib.suppress(ValueError):
        number = float(word)
        if number in (0.0, 1.0):
            return int(number)
    raise ValueError(
        f"{where}, column 'label': unknown label value {value!r}; expected one of "
        "positive/negative, pos/neg, 1/0, true/false, +/-"
    )
