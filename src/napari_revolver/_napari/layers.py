"""Adaptors between napari layers and the core (world -> data coordinates happen here, once).

Core functions take arrays in image *data* pixels. napari layers may carry scale, translate
(or a full affine) and may differ in dimensionality from the image they annotate (a 2D Points
layer over a 3D stack, say). Everything that crosses that boundary goes through this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels, Points

POSITIVE, NEGATIVE = "positive", "negative"
POSITIVE_COLOR = "#2ee65a"
NEGATIVE_COLOR = "#ff3b3b"
#: Distinct colours for tasks (label colours follow napari's own label colormap).
TASK_COLORS = ("#ffd11a", "#1ad1ff", "#ff7ae6", "#9cff3d", "#ff9e3d", "#b38cff", "#3dffc5")


@dataclass(frozen=True)
class ImageGeometry:
    """What the core needs to know about an image layer.

    Attributes
    ----------
    data : array-like
        The layer's data (level 0 of a multiscale image).
    rgb : bool
        Whether the last axis is RGB(A).
    leading_ndim : int
        Number of slice-indexing axes (Z, T, ...).
    channel_axis : int or None
        Axis holding channels to choose from, for multichannel data shown as one layer.
    """

    data: Any
    rgb: bool
    leading_ndim: int
    channel_axis: int | None = None

    @property
    def slice_ndim(self) -> int:
        """Dimensionality of point coordinates in the core (leading axes + y, x)."""
        return self.leading_ndim + 2


def image_geometry(layer: Image, channel_axis: int | None = None) -> ImageGeometry:
    """Describe an image layer for the core; raises ``ValueError`` for unusable layers."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    rgb = bool(getattr(layer, "rgb", False))
    ndim = layer.ndim  # excludes the RGB axis
    if ndim < 2:
        raise ValueError(f"layer {layer.name!r} has {ndim} dimension(s); an image needs at least 2")
    if channel_axis is not None:
        if rgb:
            raise ValueError("an RGB layer has no separate channel axis to choose")
        if not 0 <= channel_axis < ndim - 2:
            raise ValueError(
                f"channel axis must be one of the leading axes 0..{ndim - 3} of "
                f"{layer.name!r}; got {channel_axis}"
            )
        return ImageGeometry(data, False, ndim - 3, channel_axis)
    return ImageGeometry(data, rgb, ndim - 2)


def world_point(viewer: napari.Viewer) -> np.ndarray:
    """Return the viewer's current position in world coordinates ``(ndim_world,)``."""
    return np.asarray(viewer.dims.point, dtype=np.float64)


def to_image_data(
    layer: Any, coords: np.ndarray, image: Image, viewer_point: np.ndarray
) -> np.ndarray:
    """Map data coordinates of ``layer`` to data coordinates of ``image``.

    Parameters
    ----------
    layer : napari layer
        Layer the coordinates belong to (a Points layer, say).
    coords : np.ndarray
        ``(N, layer.ndim)`` data coordinates of ``layer``.
    image : napari.layers.Image
        Target image layer.
    viewer_point : np.ndarray
        ``(ndim_world,)`` current world position; fills axes the layer lacks (a 2D Points
        layer over a 3D stack annotates the slice on screen).

    Returns
    -------
    np.ndarray
        ``(N, image.ndim)`` data coordinates of ``image``, not rounded.
    """
    coords = np.atleast_2d(np.asarray(coords, dtype=np.float64))
    if _same_grid(layer, image):
        # A task's Points layer is made on its image's grid: data pixels are shared.
        return coords.copy()
    out = np.empty((len(coords), image.ndim))
    n_world = len(viewer_point)
    for i, c in enumerate(coords):
        world = np.asarray(layer.data_to_world(c), dtype=np.float64)
        # Layers are aligned on their trailing (spatial) axes, as in napari's own dims model.
        full = viewer_point.copy()
        k = min(len(world), n_world)
        full[n_world - k :] = world[len(world) - k :]
        out[i] = np.asarray(image.world_to_data(full[n_world - image.ndim :]), dtype=np.float64)
    return out


def _same_grid(layer: Any, image: Any) -> bool:
    """Whether two layers share data coordinates (same dimensions and data-to-world map)."""
    if layer.ndim != image.ndim:
        return False
    a, b = layer.affine, image.affine
    return bool(
        np.array_equal(layer.scale, image.scale)
        and np.array_equal(layer.translate, image.translate)
        and np.array_equal(np.asarray(a.affine_matrix), np.asarray(b.affine_matrix))
        and np.array_equal(np.asarray(layer.rotate), np.asarray(image.rotate))
        and np.array_equal(np.asarray(layer.shear), np.asarray(image.shear))
    )


def point_labels(layer: Points) -> np.ndarray:
    """``(N,)`` int8 labels (1 positive, 0 negative) from a Points layer's ``label`` feature.

    Points without the feature count as positive (a plain Points layer means "this").
    """
    n = len(layer.data)
    feats = getattr(layer, "features", None)
    if feats is None or "label" not in feats or len(feats) != n:
        return np.ones(n, np.int8)
    values = np.asarray(feats["label"]).astype(str)
    return (values != NEGATIVE).astype(np.int8)


def current_slice(viewer: napari.Viewer, image: Image, geometry: ImageGeometry) -> tuple[int, ...]:
    """Leading-axes index (channel axis removed) of the slice on screen, clipped to the image."""
    if geometry.leading_ndim == 0:
        return ()
    pos = np.asarray(image.world_to_data(world_point(viewer)[-image.ndim :]), dtype=np.float64)
    shape = np.asarray(_data_shape(image)[: image.ndim], dtype=np.int64)
    if geometry.channel_axis is not None:
        pos = np.delete(pos, geometry.channel_axis)
        shape = np.delete(shape, geometry.channel_axis)
    lead = np.rint(pos[: geometry.leading_ndim]).astype(int)
    return tuple(int(v) for v in np.clip(lead, 0, shape[: geometry.leading_ndim] - 1))


def _data_shape(image: Image) -> tuple[int, ...]:
    data = image.data[0] if getattr(image, "multiscale", False) else image.data
    return tuple(int(s) for s in data.shape)


def new_points_layer(viewer: napari.Viewer, name: str, image: Image, edge_color: str) -> Points:
    """Add a Points layer over ``image`` whose points carry a positive/negative ``label``."""
    layer = viewer.add_points(
        np.zeros((0, image.ndim)),
        name=name,
        size=max(5.0, min(_data_shape(image)[-2:]) / 40),
        scale=image.scale,
        translate=image.translate,
        ndim=image.ndim,
    )
    style_task_points(layer, edge_color)
    return layer


def style_task_points(layer: Points, edge_color: str) -> None:
    """Make ``layer`` a task's Points layer: a ``label`` feature coloured by polarity.

    Points without the feature (a plain Points layer) become positive.
    """
    import pandas as pd

    labels = np.where(point_labels(layer) == 1, POSITIVE, NEGATIVE)
    layer.features = pd.DataFrame(
        {"label": pd.Categorical(labels, categories=[POSITIVE, NEGATIVE])}
    )
    layer.face_color_cycle = {POSITIVE: POSITIVE_COLOR, NEGATIVE: NEGATIVE_COLOR}
    layer.face_color = "label"
    layer.border_color = edge_color
    layer.border_width = 0.25
    layer.feature_defaults = {"label": POSITIVE}
    layer.mode = "add"


def set_points(layer: Points, points: np.ndarray, labels: np.ndarray) -> None:
    """Replace a task layer's points ``(N, layer.ndim)`` and their labels ``(N,)`` (1/0)."""
    import pandas as pd

    with layer.events.data.blocker():
        layer.data = np.asarray(points, dtype=np.float64)
    layer.features = pd.DataFrame(
        {
            "label": pd.Categorical(
                np.where(np.asarray(labels) == 1, POSITIVE, NEGATIVE),
                categories=[POSITIVE, NEGATIVE],
            )
        }
    )
    layer.refresh_colors()


def refresh_slice(layer: Labels) -> None:
    """Redraw the slice of ``layer`` on screen after its data changed in place.

    Only the displayed slice is read again; the thumbnail, the extent (unchanged) and the
    highlight are left, which is most of what a full ``refresh()`` costs per click.
    """
    layer.refresh(thumbnail=False, highlight=False, extent=False)


def set_polarity(layer: Points, polarity: str) -> None:
    """Make ``polarity`` the label of the next point added to ``layer``."""
    if polarity not in (POSITIVE, NEGATIVE):
        raise ValueError(f"polarity must be {POSITIVE!r} or {NEGATIVE!r}; got {polarity!r}")
    layer.feature_defaults = {"label": polarity}


def polarity(layer: Points) -> str:
    """Label the next point added to ``layer`` will get."""
    defaults = getattr(layer, "feature_defaults", None)
    if defaults is not None and "label" in defaults and len(defaults):
        return str(np.asarray(defaults["label"])[0])
    return POSITIVE


def labels_shape(image: Image, geometry: ImageGeometry) -> tuple[int, ...]:
    """Shape of the label image that matches ``image`` (without RGB or channel axes)."""
    shape = list(_data_shape(image))
    if geometry.rgb:
        shape = shape[:-1]
    if geometry.channel_axis is not None:
        del shape[geometry.channel_axis]
    return tuple(shape)


def spatial_transform(image: Image, geometry: ImageGeometry) -> dict[str, Sequence[float]]:
    """``scale`` and ``translate`` for a layer matching ``image`` minus its channel axis."""
    scale, translate = list(image.scale), list(image.translate)
    if geometry.channel_axis is not None:
        del scale[geometry.channel_axis]
        del translate[geometry.channel_axis]
    return {"scale": scale, "translate": translate}


def drop_channel(coords: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Remove the channel coordinate from image-data points ``(N, image.ndim)``."""
    if geometry.channel_axis is None:
        return coords
    return np.delete(coords, geometry.channel_axis, axis=1)


def is_alive(viewer: napari.Viewer, layer: Labels | Points | Image | None) -> bool:
    """Whether ``layer`` is still in ``viewer`` (compared by identity, proxies unwrapped)."""
    if layer is None:
        return False
    layer = unwrap(layer)
    return any(unwrap(other) is layer for other in unwrap(viewer).layers)


def unwrap(obj: Any) -> Any:
    """Return the napari object behind the proxies napari hands to plugins.

    A widget docked from the Plugins menu gets the viewer wrapped in a proxy, and every layer
    reached through it is wrapped again, in a new proxy each time: identity comparisons only
    hold between the objects behind them.
    """
    import wrapt

    while issubclass(type(obj), wrapt.ObjectProxy):
        obj = obj.__wrapped__
    return obj


def inside_image(coords: np.ndarray, bounds: Sequence[int]) -> np.ndarray:
    """``(N,)`` bool: which data-pixel points ``(N, D)`` fall inside an image of ``bounds``.

    A point counts as inside when it rounds to a valid pixel (the core's own rule).
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(len(coords), -1)
    b = np.asarray(bounds, dtype=np.float64)
    return ((coords >= -0.5) & (coords < b - 0.5)).all(axis=1)


def slice_text(index: Sequence[int]) -> str:
    """Write a slice index as prose: ``(12,)`` -> ``slice 12``; ``()`` -> ``the image``."""
    if not len(index):
        return "the image"
    return "slice " + ", ".join(str(int(i)) for i in index)


def slices_text(indices: Sequence[Sequence[int]], limit: int = 8) -> str:
    """Several slice indices as prose with runs: ``[(1,), (2,), (3,), (7,)]`` -> ``1-3, 7``."""
    items = sorted(tuple(int(v) for v in i) for i in indices)
    if not items:
        return "none"
    if len(items[0]) != 1:
        words = [", ".join(map(str, i)) for i in items]
        more = f" and {len(words) - limit} more" if len(words) > limit else ""
        return "; ".join(words[:limit]) + more
    runs: list[tuple[int, int]] = []
    for (v,) in items:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    words = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    more = f" and {len(words) - limit} more" if len(words) > limit else ""
    return ", ".join(words[:limit]) + more
