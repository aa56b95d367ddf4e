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
    """The viewer's current position in world coordinates ``(ndim_world,)``."""
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
    """A Points layer over ``image`` whose points carry a positive/negative ``label``."""
    import pandas as pd

    features = pd.DataFrame({"label": pd.Categorical([], categories=[POSITIVE, NEGATIVE])})
    layer = viewer.add_points(
        np.zeros((0, image.ndim)),
        name=name,
        features=features,
        face_color="label",
        face_color_cycle={POSITIVE: POSITIVE_COLOR, NEGATIVE: NEGATIVE_COLOR},
        border_color=edge_color,
        border_width=0.25,
        size=max(5.0, min(_data_shape(image)[-2:]) / 40),
        scale=image.scale,
        translate=image.translate,
        ndim=image.ndim,
    )
    layer.feature_defaults = {"label": POSITIVE}
    layer.mode = "add"
    return layer


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
    """Whether ``layer`` is still in ``viewer``."""
    return layer is not None and layer in viewer.layers
