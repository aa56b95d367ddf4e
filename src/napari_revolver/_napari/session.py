"""Per-viewer state of the plugin: images, tasks, their Points layers and the output labels.

No Qt widgets here: the dock widget drives a :class:`Session`, and long work is handed to
:mod:`.workers`. Coordinates cross from napari to the core in :mod:`.layers` only.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import layers as L

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels, Points

    from ..core.predictor import RevolverPredictor
    from ..core.task import Task

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class TaskEntry:
    """One concept the user annotates: its name, label value, colour and Points layer."""

    name: str
    label_value: int
    color: str
    points: Points
    task: Task | None = None


@dataclass(eq=False)
class ImageState:
    """A segmented image layer: its predictor (own feature cache) and output Labels layer."""

    layer: Image
    geometry: L.ImageGeometry
    predictor: RevolverPredictor
    labels: Labels | None = None
    #: Slices the user painted by hand; never overwritten unless asked.
    edited: set[tuple[int, ...]] = field(default_factory=set)
    #: Next free instance id (instance ids are unique across slices).
    next_id: int = 1


class Session:
    """The plugin's state for one viewer.

    Parameters
    ----------
    viewer : napari.Viewer
    weights : path, optional
        Checkpoint; default the shipped weights.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    """

    def __init__(
        self, viewer: napari.Viewer, weights: str | Path | None = None, device: str = "auto"
    ) -> None:
        self.viewer = viewer
        self.weights = weights
        self.device = device
        self._base: RevolverPredictor | None = None
        self.images: dict[int, ImageState] = {}
        self.image: ImageState | None = None
        self.tasks: list[TaskEntry] = []
        self.active: int = -1
        #: Output instance ids (touching objects split) instead of task label values.
        self.instances = False
        #: Clicks also act by position on other slices of their stack (follow one object).
        self.local = False

    # --------------------------------------------------------------- model
    def set_model(self, weights: str | Path | None, device: str) -> None:
        """Use other weights or another device; tasks must be guided again."""
        if (weights, device) == (self.weights, self.device) and self._base is not None:
            return
        self.weights, self.device = weights, device
        self._base = None
        for t in self.tasks:
            t.task = None
        # Each image keeps its output layer and the slices painted by hand; only the
        # predictor (and with it the feature cache) is replaced.
        for state in self.images.values():
            kwargs = _volume_kwargs(state)
            state.predictor = self.base_predictor().clone()
            state.predictor.set_volume(state.geometry.data, **kwargs)

    def base_predictor(self) -> RevolverPredictor:
        """The loaded model (loaded once, shared by every image's predictor)."""
        if self._base is None:
            from ..core.predictor import RevolverPredictor

            self._base = RevolverPredictor(self.weights, self.device)
        return self._base

    # --------------------------------------------------------------- images
    def set_image(
        self, layer: Image, channel_axis: int | None = None, channel: int | None = None
    ) -> ImageState:
        """Make ``layer`` the image being segmented (its features are kept if seen before)."""
        state = self.state_for(layer, channel_axis, channel)
        self.image = state
        return state

    def state_for(
        self, layer: Image, channel_axis: int | None = None, channel: int | None = None
    ) -> ImageState:
        """The :class:`ImageState` of ``layer``, created on first use."""
        key = id(layer)
        state = self.images.get(key)
        if (
            state is not None
            and state.geometry.channel_axis == channel_axis
            and (channel_axis is None or state.predictor._channel == (channel_axis, channel))
        ):
            return state
        geometry = L.image_geometry(layer, channel_axis)
        predictor = self.base_predictor().clone()
        kwargs: dict[str, Any] = {"rgb": geometry.rgb}
        if channel_axis is not None:
            kwargs.update(channel_axis=channel_axis, channel=channel)
        predictor.set_volume(geometry.data, **kwargs)
        state = ImageState(layer, geometry, predictor)
        # Keep writing into the output layer of an earlier model or channel choice.
        name = f"{layer.name} [revolver]"
        shape = L.labels_shape(layer, geometry)
        for existing in self.viewer.layers:
            if existing.name == name and tuple(existing.data.shape) == shape:
                state.labels = existing
                existing.events.paint.connect(lambda event, s=state: self._on_paint(s, event))
                break
        self.images[key] = state
        return state

    def use_store(self, path: str | Path | None, state: ImageState | None = None) -> ImageState:
        """Read and fill an on-disk feature store (zarr) for an image, e.g. one made by
        ``revolver precompute`` on another machine; ``None`` goes back to memory only.

        A store made for other data or another model is recomputed, never reused.
        """
        state = state or self.require_image()
        state.predictor.set_volume(state.geometry.data, store=path, **_volume_kwargs(state))
        for t in self.tasks:
            t.task = None
        return state

    def set_invert(self, on: bool, state: ImageState | None = None) -> ImageState:
        """Reverse intensities of an image (dark objects on a light background) or not.

        Its features are recomputed (in memory; an on-disk store holds the other setting's
        features) and the tasks guided again on the next update.
        """
        state = state or self.require_image()
        if state.predictor.preprocessing.invert == bool(on):
            return state
        kwargs = {**_volume_kwargs(state), "invert": bool(on)}
        state.predictor.set_volume(state.geometry.data, **kwargs)
        for t in self.tasks:
            t.task = None
        return state

    def forget_layer(self, layer: Any) -> None:
        """Drop state tied to a layer the user deleted."""
        self.images.pop(id(layer), None)
        if self.image is not None and self.image.layer is layer:
            self.image = None
        for state in self.images.values():
            if state.labels is layer:
                state.labels = None
                state.edited.clear()
        for i in reversed(range(len(self.tasks))):
            if self.tasks[i].points is layer:
                self.remove_task(i, delete_layer=False)

    def require_image(self) -> ImageState:
        if self.image is None or not L.is_alive(self.viewer, self.image.layer):
            raise ValueError("choose an image layer to segment first")
        return self.image

    # ---------------------------------------------------------------- tasks
    def add_task(self, name: str | None = None) -> TaskEntry:
        """A new task with its own Points layer over the current image; it becomes active."""
        state = self.require_image()
        used = {t.label_value for t in self.tasks}
        value = next(v for v in range(1, 10_000) if v not in used)
        name = name or f"task {value}"
        if any(t.name == name for t in self.tasks):
            raise ValueError(f"a task named {name!r} exists already")
        color = L.TASK_COLORS[(value - 1) % len(L.TASK_COLORS)]
        points = L.new_points_layer(self.viewer, f"{name} points", state.layer, color)
        entry = TaskEntry(name, value, color, points)
        self.tasks.append(entry)
        self.active = len(self.tasks) - 1
        for other in self.images.values():
            if other.labels is not None and L.is_alive(self.viewer, other.labels):
                self._recolor(other.labels)
        return entry

    def remove_task(self, index: int, *, delete_layer: bool = True) -> None:
        entry = self.tasks.pop(index)
        if delete_layer and L.is_alive(self.viewer, entry.points):
            self.viewer.layers.remove(entry.points)
        self.active = min(self.active, len(self.tasks) - 1)
        # The task's pixels go, except on slices the user painted by hand.
        for state in self.images.values():
            if state.labels is None or not L.is_alive(self.viewer, state.labels):
                continue
            data = state.labels.data
            n = state.geometry.leading_ndim
            for k in np.ndindex(*data.shape[:n]):
                if k not in state.edited:
                    plane = data[k]
                    plane[plane == entry.label_value] = 0
            state.labels.refresh()

    def rename_task(self, index: int, name: str) -> None:
        name = name.strip()
        if not name:
            raise ValueError("a task name cannot be empty")
        if any(t.name == name for i, t in enumerate(self.tasks) if i != index):
            raise ValueError(f"a task named {name!r} exists already")
        entry = self.tasks[index]
        entry.name = name
        entry.points.name = f"{name} points"
        if entry.task is not None:
            entry.task = entry.task.renamed(name)

    def active_task(self) -> TaskEntry | None:
        return self.tasks[self.active] if 0 <= self.active < len(self.tasks) else None

    def task_points(
        self, entry: TaskEntry, state: ImageState | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points of ``entry`` in the data coordinates of the image ``(N, leading + 2)``."""
        state = state or self.require_image()
        pts = np.asarray(entry.points.data, dtype=np.float64)
        if len(pts) == 0:
            return np.zeros((0, state.geometry.slice_ndim)), np.zeros(0, np.int8)
        coords = L.to_image_data(entry.points, pts, state.layer, L.world_point(self.viewer))
        return L.drop_channel(coords, state.geometry), L.point_labels(entry.points)

    def support_slices(self, entry: TaskEntry) -> set[tuple[int, ...]]:
        """Leading indices of the slices ``entry`` has points on."""
        state = self.require_image()
        pts, _ = self.task_points(entry, state)
        n = state.geometry.leading_ndim
        return {tuple(int(v) for v in np.rint(p[:n])) for p in pts}

    def guide(self, entry: TaskEntry) -> Task | None:
        """Re-guide ``entry`` from its points; ``None`` when it has no positive point yet.

        Raises
        ------
        ValueError
            Points outside the image (message names the point).
        """
        state = self.require_image()
        pts, lab = self.task_points(entry, state)
        if not (lab == 1).any():
            entry.task = None
            return None
        entry.task = state.predictor.guide(pts, lab, name=entry.name, label_value=entry.label_value)
        return entry.task

    def guided_tasks(self) -> list[Task]:
        return [t.task for t in self.tasks if t.task is not None]

    # --------------------------------------------------------------- labels
    def labels_layer(self, state: ImageState | None = None) -> Labels:
        """The output Labels layer of an image, created on first use."""
        state = state or self.require_image()
        if state.labels is not None and L.is_alive(self.viewer, state.labels):
            return state.labels
        shape = L.labels_shape(state.layer, state.geometry)
        dtype = np.uint8 if len(self.tasks) < 255 else np.uint16
        layer = self.viewer.add_labels(
            np.zeros(shape, dtype),
            name=f"{state.layer.name} [revolver]",
            opacity=0.5,
            **L.spatial_transform(state.layer, state.geometry),
        )
        layer.events.paint.connect(lambda event, s=state: self._on_paint(s, event))
        state.labels = layer
        state.edited.clear()
        self._recolor(layer)
        # Keep the task's Points layers on top so the clicks stay visible and clickable.
        for t in self.tasks:
            if L.is_alive(self.viewer, t.points):
                self.viewer.layers.move(self.viewer.layers.index(t.points), len(self.viewer.layers))
        self.viewer.layers.selection.active = (
            self.tasks[self.active].points if self.active_task() else layer
        )
        return layer

    def _recolor(self, layer: Labels) -> None:
        try:
            from napari.utils.colormaps import DirectLabelColormap

            colors: dict[Any, Any] = {None: "transparent", 0: "transparent"}
            colors.update({t.label_value: t.color for t in self.tasks})
            layer.colormap = DirectLabelColormap(color_dict=colors)
        except Exception as exc:  # older napari: keep its automatic colours
            logger.debug("could not set task colours on the labels layer: %s", exc)

    def _on_paint(self, state: ImageState, event: Any) -> None:
        n = state.geometry.leading_ndim
        # napari gives a list of (indices, old values[, new value]) per paint stroke.
        for item in getattr(event, "value", None) or []:
            indices = item[0]
            state.edited.update(
                _painted_slices(
                    indices, n, state.labels.data.shape[:n] if state.labels is not None else ()
                )
            )

    def write_slice(
        self,
        index: tuple[int, ...],
        result: np.ndarray,
        *,
        state: ImageState | None = None,
        force: bool = False,
        refresh: bool = True,
    ) -> bool:
        """Put a slice's result into the Labels layer unless the user painted that slice.

        Returns whether the slice was written.
        """
        state = state or self.require_image()
        if index in state.edited and not force:
            return False
        layer = self.labels_layer(state)
        if force:
            state.edited.discard(index)
        data = layer.data
        if result.dtype == bool:
            result = result.astype(data.dtype)
        if self.instances:
            n = int(result.max(initial=0))
            result = np.where(result > 0, result.astype(np.uint32) + (state.next_id - 1), 0)
            state.next_id += n
        top = int(result.max(initial=0))
        if top > np.iinfo(data.dtype).max:
            layer.data = data.astype(np.uint16 if top < 65536 else np.uint32)
            data = layer.data
        data[index] = result
        if refresh:
            layer.refresh()
        return True

    def predict_current(
        self, index: tuple[int, ...], state: ImageState | None = None
    ) -> np.ndarray | None:
        """Label image of every guided task on one slice (``None`` without tasks)."""
        state = state or self.require_image()
        tasks = self.guided_tasks()
        if not tasks:
            return None
        return state.predictor.predict_slice(
            index, tasks, instances=self.instances, local=self.local
        )

    def clear_slice(self, index: tuple[int, ...], state: ImageState | None = None) -> None:
        """Blank a slice's labels after the last positive point is gone."""
        state = state or self.require_image()
        if state.labels is not None and index not in state.edited:
            state.labels.data[index] = 0
            state.labels.refresh()

    def missing_features(
        self, indices: Iterable[tuple[int, ...]], state: ImageState | None = None
    ) -> list[tuple[int, ...]]:
        """Which of ``indices`` have no cached features yet."""
        state = state or self.require_image()
        info = state.predictor.info
        out = []
        for idx in indices:
            try:
                k = info.flat(idx)
            except IndexError:
                continue
            if k not in state.predictor.cache:
                out.append(idx)
        return out

    # ---------------------------------------------------------- propagation
    def propagation(
        self,
        indices: list[tuple[int, ...]] | None = None,
        *,
        state: ImageState | None = None,
        recompute_edited: bool = False,
    ) -> Generator[Any, None, None]:
        """Core generator over slices to segment (edited slices skipped unless asked)."""
        state = state or self.require_image()
        tasks = self.guided_tasks()
        if not tasks:
            raise ValueError("no task has a positive point yet: click on an object first")
        info = state.predictor.info
        if indices is None:
            indices = [info.unflat(k) for k in range(info.n_slices)]
        if not recompute_edited:
            indices = [i for i in indices if i not in state.edited]
        return state.predictor.propagate(tasks, indices, instances=self.instances, local=self.local)

    # ------------------------------------------------------------------ io
    def save_labels(self, path: str | Path, *, overwrite: bool = True) -> Path:
        from ..core.io import write_labels

        state = self.require_image()
        if state.labels is None:
            raise ValueError("there are no labels to save yet: add points or propagate first")
        axes = _axes_for(state.labels.ndim)
        return write_labels(
            path,
            np.asarray(state.labels.data),
            axes=axes,
            scale=tuple(float(s) for s in state.labels.scale),
            overwrite=overwrite,
        )

    def save_task(self, entry: TaskEntry, path: str | Path) -> Path:
        if entry.task is None:
            raise ValueError(f"task {entry.name!r} has no positive point yet; nothing to save")
        return entry.task.save(path, overwrite=True)

    def load_task(self, path: str | Path) -> TaskEntry:
        """Load a saved task: its points become a new task's Points layer on this image.

        A task guided on inverted intensities switches the image to inverted reading (and back),
        since its vectors only apply to features read that way.
        """
        from ..core.task import load_task

        task = load_task(path)
        state = self.require_image()
        name = task.name
        k = 2
        while any(t.name == name for t in self.tasks):
            name, k = f"{task.name} ({k})", k + 1
        entry = self.add_task(name)
        pts = task.points
        if len(pts) and pts.shape[1] == state.layer.ndim:
            import pandas as pd

            entry.points.data = pts
            entry.points.features = pd.DataFrame(
                {
                    "label": pd.Categorical(
                        np.where(task.labels == 1, L.POSITIVE, L.NEGATIVE),
                        categories=[L.POSITIVE, L.NEGATIVE],
                    )
                }
            )
            entry.points.refresh_colors()
        if task.invert != state.predictor.preprocessing.invert:
            # The saved vectors only mean something on intensities read the same way.
            self.set_invert(task.invert, state)
        # The saved guidance is kept as is (it may come from another image).
        entry.task = (
            task.renamed(entry.name, entry.label_value)
            if (task.model_key, task.weights_sha256)
            == (state.predictor.model_key, state.predictor.weights.sha256)
            else None
        )
        if entry.task is None:
            raise ValueError(
                f"{path} was guided with other weights ({task.model_key}, "
                f"{task.weights_sha256[:12]}); its points were loaded, add or move a "
                "point to guide it with the current weights"
            )
        return entry


def _volume_kwargs(state: ImageState) -> dict[str, Any]:
    """The ``set_volume`` arguments an image state was opened with."""
    kwargs: dict[str, Any] = {
        "rgb": state.geometry.rgb,
        "invert": state.predictor.preprocessing.invert,
    }
    channel = state.predictor._channel
    if channel is not None:
        kwargs.update(channel_axis=channel[0], channel=channel[1])
    return kwargs


def _painted_slices(
    indices: tuple[Any, ...], n: int, shape: tuple[int, ...]
) -> set[tuple[int, ...]]:
    """Leading indices touched by a paint event (napari gives slices or index arrays)."""
    if n == 0:
        return {()}
    lead = indices[:n]
    if all(not isinstance(i, slice) for i in lead):
        rows = np.stack([np.asarray(i).ravel() for i in lead], axis=1)
        return {tuple(int(v) for v in r) for r in np.unique(rows, axis=0)}
    import itertools

    ranges = []
    for i, size in zip(lead, shape, strict=False):
        if isinstance(i, slice):
            ranges.append(range(*i.indices(size)))
        else:
            ranges.append(sorted({int(v) for v in np.asarray(i).ravel()}))
    return set(itertools.product(*ranges))


def _axes_for(ndim: int) -> str:
    return {2: "YX", 3: "ZYX", 4: "TZYX"}.get(ndim, "Q" * (ndim - 2) + "YX")
