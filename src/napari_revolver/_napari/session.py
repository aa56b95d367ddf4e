"""Per-viewer state of the plugin as an evented model: tasks, images, painted slices, runs.

No Qt here. :class:`Session` owns the tasks, the active task, the slices painted by hand and
which image (read how) each task was guided on; it emits a psygnal event for every change, and
the dock widget only listens. It tracks layers through the viewer's own layer events, by the
identity of the layers behind napari's plugin proxies. Long work is described by a
:class:`Run` (a core generator plus its progress); :mod:`.workers` runs it in a thread, and
:meth:`Session.run_inline` runs it here, for scripts and tests. Coordinates cross from napari to
the core in :mod:`.layers` only.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalGroup

from ..core.labels import label_dtype, offset_instances
from ..core.volume import VolumeSpec
from . import layers as L

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image, Labels, Points

    from ..core.predictor import RevolverPredictor
    from ..core.task import Task

logger = logging.getLogger(__name__)

#: Metadata key marking a Points layer as a Revolver task (sample data, task files).
TASK_METADATA = "revolver_task"


@dataclass(eq=False)
class TaskEntry:
    """One concept the user annotates.

    Attributes
    ----------
    name, label_value, color
        Shown in the task list; ``label_value`` is the task's value in the Labels layer.
    points : napari.layers.Points
        The task's clicks (the layer itself, never a proxy of it).
    image : napari.layers.Image or None
        The image the task is guided on (``None`` once that layer is deleted: the next edit
        of the points guides it on the current image).
    spec : VolumeSpec
        How images are read for this task (channel, invert); ``rgb`` is left to each image.
        Applying the task to another image reads that image the same way.
    task : Task or None
        The guidance; ``None`` while stale (points or painted slices changed since it was
        guided). A class task is guided by its points and by the slices of its image painted
        by hand (:meth:`Session.painted_support`).
    kind : {"class", "object"}
        ``class``: everything like the clicked objects. ``object``: the one object under the
        clicks, followed through the stack; its ``label_value`` is its id.
    """

    name: str
    label_value: int
    color: str
    points: Points
    image: Image | None
    spec: VolumeSpec
    task: Task | None = None
    #: Whether the user was told that some of this task's points are outside its image.
    warned_outside: bool = False
    kind: str = "class"
    #: The pixel fit of a class task with what it was fitted on: the slices painted by hand
    #: (refitted only when the painting changes, not at every click), else the clicks.
    pixel_fit: tuple[tuple[Any, ...], Any] | None = None


@dataclass(eq=False)
class ImageState:
    """A segmented image layer: how it is read, its predictors, its output Labels layer."""

    layer: Image
    geometry: L.ImageGeometry
    #: How the image is read for tasks guided on it (the image controls of the widget).
    spec: VolumeSpec
    #: One predictor (and feature cache) per way of reading the image, keyed by resolved spec.
    predictors: dict[VolumeSpec, RevolverPredictor] = field(default_factory=dict)
    store: str | Path | None = None
    labels: Labels | None = None
    #: Slices the user painted by hand; never overwritten unless asked.
    painted: set[tuple[int, ...]] = field(default_factory=set)
    #: For each painted slice, the label values of the tasks there were when it was last
    #: painted: it is the truth for those tasks only (a task added later was not painted).
    painted_for: dict[tuple[int, ...], frozenset[int]] = field(default_factory=dict)
    #: Checksum of each slice as last written by the plugin (unpainted state of the slice).
    written: dict[tuple[int, ...], int] = field(default_factory=dict)
    #: The painted slices and their checksums when class tasks last learnt from them.
    painted_key: tuple[tuple[tuple[int, ...], int], ...] = ()
    #: Next free instance id (instance ids are unique across slices).
    next_id: int = 1

    @property
    def predictor(self) -> RevolverPredictor:
        """The predictor reading the image with its own spec."""
        return self.predictors[self.spec]


@dataclass(eq=False)
class Run:
    """Long work on one image: encoding slices or propagating tasks.

    Attributes
    ----------
    kind : {"encode", "propagate"}
    state : ImageState
    steps : generator
        Yields one item per slice; stopping it cancels.
    total, done : int
        Slice count and progress.
    description : str
        What the run does, as prose.
    """

    kind: str
    state: ImageState
    steps: Generator[Any, None, None]
    total: int
    description: str
    done: int = 0
    started: float = field(default_factory=time.perf_counter)
    #: What the run noticed on the way: objects that ended, as ``(name, reason, index)``.
    notes: list[tuple[str, str, tuple[int, ...]]] = field(default_factory=list)
    #: What ``total`` counts: slices, or slice steps when classes and objects both pass.
    unit: str = "slices"
    #: Slices the run covers (``total`` when each is visited once).
    slices: int = 0
    cancelled: bool = False
    failed: str | None = None
    finished: bool = False

    def seconds_left(self) -> float | None:
        """Estimated time to finish (``None`` before the first slice)."""
        if self.done == 0:
            return None
        per = (time.perf_counter() - self.started) / self.done
        return per * (self.total - self.done)


class SessionEvents(SignalGroup):
    """What a :class:`Session` tells its listeners."""

    task_added = Signal(object)  #: TaskEntry
    task_removed = Signal(object)  #: TaskEntry
    task_changed = Signal(object)  #: TaskEntry: name, points, polarity or guidance changed
    task_stale = Signal(object)  #: TaskEntry: its points changed; it must be guided again
    active_changed = Signal(int)  #: index of the active task (-1: none)
    image_changed = Signal(object)  #: ImageState or None
    painted_changed = Signal(object)  #: ImageState whose hand-painted slices changed
    run_started = Signal(object)  #: Run
    run_progressed = Signal(object)  #: Run
    run_finished = Signal(object)  #: Run (``run.cancelled`` says how it ended)
    run_failed = Signal(object, str)  #: Run, what failed (as prose)
    warned = Signal(str)  #: a problem to show once (points outside the image, ...)
    status = Signal(str)  #: what just happened, as prose


class Session:
    """The plugin's state for one viewer.

    Parameters
    ----------
    viewer : napari.Viewer or napari.components.ViewerModel
        The viewer, as napari hands it to the plugin (a proxy is unwrapped).
    weights : path, optional
        Checkpoint; default the shipped weights.
    device : str
        ``auto``, ``cpu``, ``cuda`` or ``mps``.
    """

    def __init__(
        self, viewer: napari.Viewer, weights: str | Path | None = None, device: str = "auto"
    ) -> None:
        self.events = SessionEvents()
        self.viewer = L.unwrap(viewer)
        self.weights = weights
        self.device = device
        self._base: RevolverPredictor | None = None
        self.images: dict[int, ImageState] = {}
        #: The predictors (and features) of the last image deleted while tasks were guided
        #: on it: the same data opened again takes its features over instead of encoding
        #: them again. Forgotten once no task is left without its image.
        self._released: list[RevolverPredictor] = []
        self.image: ImageState | None = None
        self.tasks: list[TaskEntry] = []
        self.active: int = -1
        self.run: Run | None = None
        #: Output instance ids (touching objects split) instead of task label values.
        self.instances = False
        #: Clicks also act by position on other slices of their stack (follow one object).
        self.local = False
        layers = self.viewer.layers
        layers.events.removed.connect(self._on_layer_removed)
        layers.events.inserted.connect(self._on_layer_inserted)
        for layer in list(layers):
            self._adopt_if_task(layer)

    def close(self) -> None:
        """Stop listening to the viewer and stop telling listeners (the widget was closed)."""
        if self.viewer is None:
            return
        self.cancel_run()
        self.events.disconnect()
        layers = self.viewer.layers
        layers.events.removed.disconnect(self._on_layer_removed)
        layers.events.inserted.disconnect(self._on_layer_inserted)
        for entry in self.tasks:
            entry.points.events.data.disconnect(self._points_changed)
        for state in self.images.values():
            self._unwatch_labels(state)
        self.viewer = None  # type: ignore[assignment]

    # --------------------------------------------------------------- model
    def set_model(self, weights: str | Path | None, device: str) -> None:
        """Use other weights or another device; tasks are guided again from their points."""
        if (weights, device) == (self.weights, self.device) and self._base is not None:
            return
        self.weights, self.device = weights, device
        self._base = None
        self._released = []  # features of the old model
        self.base_predictor()
        # Each image keeps its output layer and the slices painted by hand; only the
        # predictors (and with them the feature caches) are replaced.
        for state in self.images.values():
            state.predictors.clear()
            self.predictor_for(state, state.spec)
        self._mark_all_stale()

    def base_predictor(self) -> RevolverPredictor:
        """Return the loaded model (loaded once, shared by every image's predictors)."""
        if self._base is None:
            from ..core.predictor import RevolverPredictor

            self._base = RevolverPredictor(self.weights, self.device)
        return self._base

    def predictor_for(self, state: ImageState, spec: VolumeSpec) -> RevolverPredictor:
        """Return the predictor reading ``state``'s image as ``spec`` says, made on first use.

        Raises
        ------
        ValueError
            ``spec`` does not fit the image (a channel axis it lacks, a channel out of range).
        """
        spec = self._image_spec(state, spec)
        predictor = state.predictors.get(spec)
        if predictor is None:
            predictor = self.base_predictor().clone()
            store = state.store if spec == state.spec else None
            predictor.set_volume(state.geometry.data, spec, store=store)
            for old in self._released:
                if predictor.adopt_features(old):
                    break
            state.predictors[spec] = predictor
        return predictor

    @staticmethod
    def _image_spec(state: ImageState, spec: VolumeSpec) -> VolumeSpec:
        """``spec`` for this image: its RGB setting, checked against its channel axis."""
        if spec.channel_axis != state.geometry.channel_axis:
            raise ValueError(
                f"it reads channel {spec.channel} of axis {spec.channel_axis}, and "
                f"{state.layer.name!r} is read "
                + (
                    "without a channel axis"
                    if state.geometry.channel_axis is None
                    else f"with channel axis {state.geometry.channel_axis}"
                )
            )
        return replace(spec, rgb=state.geometry.rgb)

    # --------------------------------------------------------------- images
    def set_image(
        self, layer: Image, channel_axis: int | None = None, channel: int | None = None
    ) -> ImageState:
        """Make ``layer`` the image being segmented (features are kept if seen before).

        Tasks guided on this image follow a change of its channel.
        """
        layer = L.unwrap(layer)
        state = self.state_for(layer, channel_axis, channel)
        if state is not self.image:
            self.image = state
            self.events.image_changed.emit(state)
        return state

    def state_for(
        self, layer: Image, channel_axis: int | None = None, channel: int | None = None
    ) -> ImageState:
        """Return the :class:`ImageState` of ``layer``, created (or re-read) on first use."""
        layer = L.unwrap(layer)
        old = self.images.get(id(layer))
        invert = old.spec.invert if old is not None else False
        scale = old.spec.scale if old is not None else 1.0
        spec = VolumeSpec(
            None, channel_axis, channel if channel_axis is not None else None, invert, scale
        )
        if old is not None and replace(old.spec, rgb=None) == spec:
            return old
        geometry = L.image_geometry(layer, channel_axis)
        state = ImageState(layer, geometry, replace(spec, rgb=geometry.rgb))
        if old is not None:
            state.store = old.store if old.geometry.channel_axis == channel_axis else None
        self.predictor_for(state, state.spec)
        if old is not None and old.geometry.channel_axis == channel_axis:
            # Same geometry: keep the output layer and the painted slices.
            state.labels, state.painted, state.written = old.labels, old.painted, old.written
            state.painted_for = old.painted_for
            state.next_id = old.next_id
            self._unwatch_labels(old)
            if state.labels is not None:
                self._watch_labels(state)
        else:
            self._reuse_labels_layer(state)
        self.images[id(layer)] = state
        if self.image is old and old is not None:
            self.image = state
        self._rebind(old, state)
        if old is None:
            self._reattach(state)
        return state

    def _reattach(self, state: ImageState) -> None:
        """Tasks whose image was deleted take up ``state``'s layer if it holds the same data.

        The same file opened again after its layer was deleted: objects go on being followed
        in it, and every task's line names it again. The output layer and those tasks' Points
        layers are raised above the image (a new layer lands on top and would hide them).
        """
        orphans = self._orphans()
        if not orphans:
            return
        same = []
        for entry in orphans:
            try:
                fingerprint = self.predictor_for(state, entry.spec).info.fingerprint
            except ValueError:  # read with a channel this image lacks
                continue
            if entry.task.source == fingerprint:  # type: ignore[union-attr]
                entry.image = state.layer
                same.append(entry)
        self._raise_over(state, same)
        for entry in same:
            self.events.task_changed.emit(entry)
        self._release_if_unused()

    def _orphans(self) -> list[TaskEntry]:
        """Return the guided tasks whose image was deleted."""
        return [t for t in self.tasks if t.image is None and t.task is not None]

    def _release_if_unused(self) -> None:
        """Forget the deleted image's predictors once no task is left without an image."""
        if not self._orphans():
            self._released = []

    def _raise_over(self, state: ImageState, entries: list[TaskEntry]) -> None:
        """Move ``state``'s output layer, then ``entries``' Points layers, above its image."""
        layers = self.viewer.layers
        if not L.is_alive(self.viewer, state.layer):
            return
        if state.labels is not None and L.is_alive(self.viewer, state.labels):
            at, image = layers.index(state.labels), layers.index(state.layer)
            if at < image:
                layers.move(at, image + 1)
        for entry in entries:
            if L.is_alive(self.viewer, entry.points):
                if layers.index(entry.points) < layers.index(state.layer):
                    layers.move(layers.index(entry.points), len(layers))

    def _rebind(self, old: ImageState | None, new: ImageState) -> None:
        """Tasks guided on ``old`` read the image as ``new`` does from now on."""
        if old is None:
            return
        for entry in self.tasks:
            if entry.image is old.layer:
                entry.spec = replace(new.spec, rgb=None)
                self._stale(entry)

    def _reuse_labels_layer(self, state: ImageState) -> None:
        # Keep writing into the output layer of an earlier model or channel choice.
        name = f"{state.layer.name} [revolver]"
        shape = L.labels_shape(state.layer, state.geometry)
        for existing in self.viewer.layers:
            if existing.name == name and tuple(existing.data.shape) == shape:
                state.labels = existing
                self._watch_labels(state)
                self._raise_over(state, [])
                break

    def use_store(self, path: str | Path | None, state: ImageState | None = None) -> ImageState:
        """Read and fill an on-disk feature store (zarr) for an image; ``None``: memory only.

        The store may come from ``revolver precompute`` on another machine.

        A store made for other data or another model is recomputed, never reused.
        """
        state = state or self.require_image()
        state.store = path
        state.predictors.pop(state.spec, None)
        self.predictor_for(state, state.spec)
        return state

    def set_invert(self, on: bool, state: ImageState | None = None) -> ImageState:
        """Read an image with reversed intensities (dark objects on a light background) or not.

        Tasks guided on this image are guided again, on features of the new reading; tasks
        guided on other images keep theirs (and read this image as they were guided).
        """
        return self._read_as(state or self.require_image(), invert=bool(on))

    def set_scale(self, scale: float, state: ImageState | None = None) -> ImageState:
        """Resize an image's slices by ``scale`` before the network (``VolumeSpec.scale``).

        Below 1 for objects larger than the network's view, above 1 for tiny ones; points
        and results stay in the image's pixels. Tasks guided on this image are guided again,
        on features of the new scale; tasks guided on other images keep theirs.

        Raises
        ------
        ValueError
            A scale out of range (:func:`.core.scale.check_scale`).
        """
        from ..core.scale import check_scale

        return self._read_as(state or self.require_image(), scale=check_scale(scale))

    def _read_as(self, state: ImageState, **changes: Any) -> ImageState:
        """Read an image another way (``VolumeSpec`` fields); re-guide its own tasks."""
        new = replace(state.spec, **changes)
        if new == state.spec:
            return state
        old_spec, state.spec = state.spec, new
        # An on-disk store holds the other setting's features: this reading stays in memory.
        state.store = None
        state.predictors.pop(old_spec, None)
        self.predictor_for(state, state.spec)
        for entry in self.tasks:
            if entry.image is state.layer:
                entry.spec = replace(entry.spec, **changes)
                self._stale(entry)
        return state

    def require_image(self) -> ImageState:
        """Return the current image's state; ``ValueError`` (what to do) when there is none."""
        if self.image is None or not L.is_alive(self.viewer, self.image.layer):
            raise ValueError("choose an image layer to segment first")
        return self.image

    # ---------------------------------------------------------- layer events
    def _on_layer_removed(self, event: Any) -> None:
        layer = L.unwrap(event.value)
        if self.run is not None and layer in (self.run.state.layer, self.run.state.labels):
            self.cancel_run()
        self._forget_image(layer)
        for other in self.images.values():
            if other.labels is layer:
                self._forget_labels(other)
        for entry in list(self.tasks):
            if entry.points is layer:
                self.remove_task(entry, delete_layer=False)

    def _forget_image(self, layer: Any) -> None:
        state = self.images.get(id(layer))
        if state is None or state.layer is not layer:
            return
        del self.images[id(layer)]
        self._unwatch_labels(state)
        orphaned = False
        for entry in self.tasks:
            if entry.image is layer:
                entry.image = None
                orphaned = True
                self.events.task_changed.emit(entry)  # its line says the image is gone
        if orphaned:
            self._released = list(state.predictors.values())
        if self.image is state:
            self.image = None
            self.events.image_changed.emit(None)

    def _forget_labels(self, state: ImageState) -> None:
        self._unwatch_labels(state)
        state.labels = None
        state.written.clear()
        if state.painted:
            state.painted.clear()
            self.events.painted_changed.emit(state)

    def _on_layer_inserted(self, event: Any) -> None:
        self._adopt_if_task(L.unwrap(event.value))

    def _adopt_if_task(self, layer: Any) -> None:
        """Take up a Points layer marked as a task (sample data, a task file)."""
        from napari.layers import Points

        meta = getattr(layer, "metadata", None) or {}
        if not isinstance(layer, Points) or TASK_METADATA not in meta:
            return
        if any(t.points is layer for t in self.tasks):
            return
        info = meta[TASK_METADATA] if isinstance(meta[TASK_METADATA], dict) else {}
        name = self.unique_name(str(info.get("name") or layer.name.removesuffix(" points")))
        image = self._image_named(info.get("image"))
        try:
            self.adopt_points(
                layer,
                name,
                image=image,
                invert=bool(info.get("invert", False)),
                scale=float(info.get("scale", 1.0)),
                kind=str(info.get("kind", "class")),
            )
        except ValueError as exc:
            self.events.warned.emit(f"Points layer {layer.name!r} is not used as a task: {exc}")

    def _image_named(self, name: Any) -> Image | None:
        from napari.layers import Image

        for layer in self.viewer.layers:
            if isinstance(layer, Image) and layer.name == name:
                return layer
        return None

    # ---------------------------------------------------------------- tasks
    def _new_task_fields(self, name: str | None, kind: str = "class") -> tuple[str, int, str]:
        if kind not in ("class", "object"):
            raise ValueError(f"a task's kind is 'class' or 'object'; got {kind!r}")
        used = {t.label_value for t in self.tasks}
        value = next(v for v in range(1, 10_000) if v not in used)
        name = (name or f"{'object' if kind == 'object' else 'task'} {value}").strip()
        if any(t.name == name for t in self.tasks):
            raise ValueError(f"a task named {name!r} exists already")
        return name, value, L.TASK_COLORS[(value - 1) % len(L.TASK_COLORS)]

    def unique_name(self, name: str) -> str:
        """``name``, or ``name (2)``, ``name (3)``, ... if a task has it already."""
        out, k = name, 2
        while any(t.name == out for t in self.tasks):
            out, k = f"{name} ({k})", k + 1
        return out

    def add_task(self, name: str | None = None, *, kind: str = "class") -> TaskEntry:
        """Add a task with its own Points layer over the current image; it becomes active.

        ``kind="object"``: the one object under the clicks, followed through the stack
        (:mod:`napari_revolver.core.objects`); its label value is the object's id.
        """
        state = self.require_image()
        name, value, color = self._new_task_fields(name, kind)
        points = L.unwrap(L.new_points_layer(self.viewer, f"{name} points", state.layer, color))
        entry = TaskEntry(
            name, value, color, points, state.layer, replace(state.spec, rgb=None), kind=kind
        )
        self._add_entry(entry)
        return entry

    def adopt_points(
        self,
        layer: Points,
        name: str,
        *,
        image: Image | None = None,
        invert: bool = False,
        scale: float = 1.0,
        kind: str = "class",
    ) -> TaskEntry:
        """Make an existing Points layer a task (its ``label`` feature gives the polarity).

        Raises
        ------
        ValueError
            A ``scale`` out of range, or a ``kind`` other than class and object.
        """
        from ..core.scale import check_scale

        scale = check_scale(scale)
        layer = L.unwrap(layer)
        if image is None and self.image is not None:
            image = self.image.layer
        base = self.images.get(id(image)) if image is not None else None
        name, value, color = self._new_task_fields(name, kind)
        spec = replace(base.spec, rgb=None) if base is not None else VolumeSpec()
        spec = replace(spec, invert=invert, scale=scale)
        entry = TaskEntry(name, value, color, layer, image, spec, kind=kind)
        L.style_task_points(layer, color)
        self._add_entry(entry)
        return entry

    def _add_entry(self, entry: TaskEntry) -> None:
        self.tasks.append(entry)
        entry.points.events.data.connect(self._points_changed)
        self.events.task_added.emit(entry)
        self.set_active(len(self.tasks) - 1)
        for other in self.images.values():
            if other.labels is not None:
                self._recolor(other.labels)

    def remove_task(self, entry: TaskEntry | int, *, delete_layer: bool = True) -> None:
        """Forget a task; its pixels go, except on slices painted by hand."""
        if isinstance(entry, int):
            entry = self.tasks[entry]
        if entry not in self.tasks:
            return
        if self.run is not None:
            self.cancel_run()
        self.tasks.remove(entry)
        entry.points.events.data.disconnect(self._points_changed)
        if delete_layer and L.is_alive(self.viewer, entry.points):
            self.viewer.layers.remove(entry.points)
        for state in self.images.values():
            if state.labels is not None:
                self._erase_value(state, entry.label_value)
        self._release_if_unused()
        self.events.task_removed.emit(entry)
        self.set_active(min(self.active, len(self.tasks) - 1))

    def _erase_value(self, state: ImageState, value: int) -> None:
        assert state.labels is not None
        data = state.labels.data
        n = state.geometry.leading_ndim
        for k in np.ndindex(*data.shape[:n]):
            if k not in state.painted:
                plane = data[k]
                plane[plane == value] = 0
                state.written[k] = _checksum(plane)
        state.labels.refresh()

    def rename_task(self, index: int, name: str) -> None:
        """Rename a task and its Points layer; ``ValueError`` for an empty or taken name."""
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
        self.events.task_changed.emit(entry)

    def set_active(self, index: int) -> None:
        """Make task ``index`` the one clicks go to (``-1``: none); its layer is selected."""
        index = index if 0 <= index < len(self.tasks) else -1
        changed = index != self.active
        self.active = index
        entry = self.active_task()
        if entry is not None and L.is_alive(self.viewer, entry.points):
            self.viewer.layers.selection.active = entry.points
            entry.points.mode = "add"
        if changed or entry is not None:
            self.events.active_changed.emit(index)

    def active_task(self) -> TaskEntry | None:
        """Return the task clicks go to, if any."""
        return self.tasks[self.active] if 0 <= self.active < len(self.tasks) else None

    def toggle_polarity(self, entry: TaskEntry | None = None) -> str | None:
        """Switch the next point of a task (default the active one); returns the new polarity."""
        entry = entry or self.active_task()
        if entry is None:
            return None
        new = L.NEGATIVE if L.polarity(entry.points) == L.POSITIVE else L.POSITIVE
        L.set_polarity(entry.points, new)
        self.events.task_changed.emit(entry)
        return new

    def _points_changed(self, event: Any) -> None:
        action = str(getattr(event, "action", "")).lower()
        if action.endswith("ing"):  # adding, changing, removing: wait for the final event
            return
        source = L.unwrap(getattr(event, "source", None))
        entry = next((t for t in self.tasks if t.points is source), None)
        if entry is None:
            return
        if entry.image is None or not L.is_alive(self.viewer, entry.image):
            # Its image is gone: the points now guide it on the image on screen.
            entry.image = self.image.layer if self.image is not None else None
        self._stale(entry)

    def _stale(self, entry: TaskEntry) -> None:
        entry.task = None
        self.events.task_stale.emit(entry)
        self.events.task_changed.emit(entry)

    def _mark_all_stale(self) -> None:
        for entry in self.tasks:
            self._stale(entry)

    def image_state_of(self, entry: TaskEntry) -> ImageState:
        """Return the state of the image ``entry`` is guided on; ``ValueError`` when it is gone."""
        if entry.image is None or not L.is_alive(self.viewer, entry.image):
            raise ValueError(
                f"task {entry.name!r} has lost the image it was guided on: move or add a point "
                "to guide it on the image on screen"
            )
        state = self.images.get(id(entry.image))
        if state is None or state.layer is not entry.image:
            state = self.state_for(entry.image)
        return state

    def task_points(
        self, entry: TaskEntry, state: ImageState | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Points of ``entry`` in data pixels of an image ``(N, leading + 2)`` and labels.

        Default: the image the task is guided on. Points outside it are left out.
        """
        state = state or self.image_state_of(entry)
        pts = np.asarray(entry.points.data, dtype=np.float64)
        if len(pts) == 0:
            return np.zeros((0, state.geometry.slice_ndim)), np.zeros(0, np.int8)
        coords = L.to_image_data(entry.points, pts, state.layer, L.world_point(self.viewer))
        coords = L.drop_channel(coords, state.geometry)
        labels = L.point_labels(entry.points)
        keep = L.inside_image(coords, L.labels_shape(state.layer, state.geometry))
        if not keep.all():
            if not entry.warned_outside:
                entry.warned_outside = True
                self.events.warned.emit(
                    f"Task {entry.name!r}: {int((~keep).sum())} point(s) lie outside "
                    f"{state.layer.name!r} and are left out."
                )
        else:
            entry.warned_outside = False
        return coords[keep], labels[keep]

    def support_slices(self, entry: TaskEntry) -> set[tuple[int, ...]]:
        """Leading indices of the slices ``entry`` has points on, in its own image."""
        state = self.image_state_of(entry)
        pts, _ = self.task_points(entry, state)
        n = state.geometry.leading_ndim
        return {tuple(int(v) for v in np.rint(p[:n])) for p in pts}

    def guide(self, entry: TaskEntry) -> Task | None:
        """Guide ``entry`` again; ``None`` when it has no positive point (or painted pixel) yet.

        A class task learns from its points and from the slices painted by hand
        (:meth:`painted_support`); an object task from its points.
        """
        state = self.image_state_of(entry)
        pts, lab = self.task_points(entry, state)
        painted = self.painted_support(entry, state) if entry.kind == "class" else {}
        if not (lab == 1).any() and not any((p == 1).any() for p in painted.values()):
            entry.task = None
            return None
        predictor = self.predictor_for(state, entry.spec)
        if painted:
            entry.task = predictor.guide_labels(
                painted,
                points=pts if len(pts) else None,
                point_labels=lab,
                name=entry.name,
                label_value=entry.label_value,
                fit=self._pixel_fit(entry, predictor, painted=painted),
            )
        else:
            fit = (
                self._pixel_fit(entry, predictor, clicks=(pts, lab))
                if entry.kind == "class"
                else None
            )
            entry.task = predictor.guide(
                pts, lab, name=entry.name, label_value=entry.label_value, kind=entry.kind, fit=fit
            )
        self.events.task_changed.emit(entry)
        return entry.task

    def painted_support(
        self, entry: TaskEntry, state: ImageState | None = None
    ) -> dict[tuple[int, ...], np.ndarray]:
        """Return the slices painted by hand as a class task's support, ``{slice: (H, W)}``.

        A painted slice is the user's truth for every class task there was when it was last
        painted: 1 (foreground) where it holds the task's value, 2 (background) everywhere
        else. A task added afterwards does not learn from it (nobody painted that task there,
        so its pixels are not background for it) until the slice is painted again.
        """
        state = state or self.image_state_of(entry)
        if not state.painted or state.labels is None or not L.is_alive(self.viewer, state.labels):
            return {}
        data = state.labels.data
        return {
            k: np.where(np.asarray(data[k]) == entry.label_value, 1, 2).astype(np.uint8)
            for k in sorted(state.painted)
            if entry.label_value in state.painted_for.get(k, ())
        }

    def _painted_on(self, entry: TaskEntry) -> bool:
        """Whether ``entry``'s image has slices painted by hand."""
        state = self.images.get(id(entry.image))
        return state is not None and state.layer is entry.image and bool(state.painted)

    def _pixel_fit(
        self,
        entry: TaskEntry,
        predictor: RevolverPredictor,
        *,
        painted: dict[tuple[int, ...], np.ndarray] | None = None,
        clicks: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Any:
        """Return the pixel fit of a class task, cached while what it learns from holds.

        With ``painted`` slices the fit comes from them alone (so clicks stay cheap); without,
        from the ``clicks``, where they show that the network fails them
        (:meth:`RevolverPredictor.fit_clicks`).
        """
        if painted:
            key: tuple[Any, ...] = (
                id(predictor),
                "painted",
                *((k, _checksum(v)) for k, v in painted.items()),
            )
        else:
            assert clicks is not None
            pts, lab = (np.ascontiguousarray(a) for a in clicks)
            key = (id(predictor), "clicks", pts.tobytes(), lab.tobytes())
        if entry.pixel_fit is None or entry.pixel_fit[0] != key:
            if painted:
                entry.pixel_fit = (key, predictor.fit_labels(painted))
            else:
                entry.pixel_fit = (key, predictor.fit_clicks(pts, lab))
        return entry.pixel_fit[1]

    def _painting_changed(self, state: ImageState, *, stroke: bool = False) -> None:
        """Guide the class tasks of an image again if what was painted by hand changed.

        Class tasks learn from the painted slices. napari reports a data change on every
        slice change too, so the painted slices' checksums say whether anything changed;
        a ``stroke`` (napari's paint event, sent once a mouse stroke is written) always does.
        """
        data = state.labels.data if state.labels is not None else None
        key = tuple((k, _checksum(data[k])) for k in sorted(state.painted) if data is not None)
        if key == state.painted_key and not stroke:
            return
        state.painted_key = key
        for entry in self.tasks:
            if entry.kind == "class" and entry.image is state.layer:
                self._stale(entry)

    def guide_stale(self) -> list[str]:
        """Guide every stale task that has points; returns the problems, as prose."""
        problems = []
        for entry in self.tasks:
            if entry.task is not None:
                continue
            if not len(entry.points.data) and not (
                entry.kind == "class" and entry.image is not None and self._painted_on(entry)
            ):
                continue
            try:
                if self.guide(entry) is None:
                    problems.append(
                        f"Task {entry.name!r} has no positive point yet: click on the object "
                        "with the positive polarity."
                    )
            except ValueError as exc:
                problems.append(f"Task {entry.name!r}: {exc}")
        return problems

    def guided_tasks(self) -> list[TaskEntry]:
        """Tasks with guidance, in list order."""
        return [t for t in self.tasks if t.task is not None]

    # --------------------------------------------------------------- labels
    def labels_layer(self, state: ImageState | None = None) -> Labels:
        """Return the output Labels layer of an image, created on first use."""
        state = state or self.require_image()
        if state.labels is not None and L.is_alive(self.viewer, state.labels):
            return state.labels
        shape = L.labels_shape(state.layer, state.geometry)
        dtype = label_dtype(max((t.label_value for t in self.tasks), default=1))
        layer = L.unwrap(
            self.viewer.add_labels(
                np.zeros(shape, dtype),
                name=f"{state.layer.name} [revolver]",
                opacity=0.5,
                **L.spatial_transform(state.layer, state.geometry),
            )
        )
        state.labels = layer
        state.written.clear()
        if state.painted:
            state.painted.clear()
            self.events.painted_changed.emit(state)
        self._watch_labels(state)
        self._recolor(layer)
        # Keep the task's Points layers on top so the clicks stay visible and clickable.
        for t in self.tasks:
            if L.is_alive(self.viewer, t.points):
                self.viewer.layers.move(self.viewer.layers.index(t.points), len(self.viewer.layers))
        active = self.active_task()
        self.viewer.layers.selection.active = active.points if active else layer
        return layer

    def _watch_labels(self, state: ImageState) -> None:
        assert state.labels is not None
        state.labels.events.paint.connect(self._on_paint)
        state.labels.events.set_data.connect(self._on_labels_data)

    def _unwatch_labels(self, state: ImageState) -> None:
        if state.labels is not None:
            state.labels.events.paint.disconnect(self._on_paint)
            state.labels.events.set_data.disconnect(self._on_labels_data)

    def _state_of_labels(self, layer: Any) -> ImageState | None:
        layer = L.unwrap(layer)
        return next((s for s in self.images.values() if s.labels is layer), None)

    def _recolor(self, layer: Labels) -> None:
        try:
            from napari.utils.colormaps import DirectLabelColormap

            colors: dict[Any, Any] = {None: "transparent", 0: "transparent"}
            colors.update({t.label_value: t.color for t in self.tasks})
            layer.colormap = DirectLabelColormap(color_dict=colors)
        except Exception as exc:  # older napari: keep its automatic colours
            logger.debug("could not set task colours on the labels layer: %s", exc)

    def _task_values(self) -> frozenset[int]:
        """Return the label values of the tasks there are now (what a painting teaches)."""
        return frozenset(t.label_value for t in self.tasks)

    def _on_paint(self, event: Any) -> None:
        state = self._state_of_labels(event.source)
        if state is None or state.labels is None:
            return
        n = state.geometry.leading_ndim
        before = set(state.painted)
        # napari gives a list of history atoms per stroke; each starts with its indices.
        touched: set[tuple[int, ...]] = set()
        for item in getattr(event, "value", None) or []:
            touched |= _painted_slices(item[0], n, state.labels.data.shape[:n])
        state.painted.update(touched)
        state.painted_for.update(dict.fromkeys(touched, self._task_values()))
        if state.painted != before:
            self.events.painted_changed.emit(state)
        if touched:
            self._painting_changed(state, stroke=True)

    def _on_labels_data(self, event: Any) -> None:
        """After an undo or redo: a slice is painted when it differs from what was written."""
        state = self._state_of_labels(event.source)
        if state is None or state.labels is None or not L.is_alive(self.viewer, state.layer):
            return
        data = state.labels.data
        check = set(state.painted)
        if state.geometry.leading_ndim:
            check.add(L.current_slice(self.viewer, state.layer, state.geometry))
        changed = False
        for k in check:
            painted = _checksum(data[k]) != state.written.get(k, _zero_checksum(data[k]))
            if painted != (k in state.painted):
                (state.painted.add if painted else state.painted.discard)(k)
                if painted and k not in state.painted_for:  # painted back by a redo
                    state.painted_for[k] = self._task_values()
                changed = True
        if changed:
            self.events.painted_changed.emit(state)
        self._painting_changed(state)

    def forget_painted(self, state: ImageState | None = None) -> None:
        """Let live updates and propagation write over the slices painted by hand again.

        Class tasks stop learning from those slices.
        """
        state = state or self.require_image()
        if state.painted:
            state.painted.clear()
            self.events.painted_changed.emit(state)
            self._painting_changed(state)

    def write_slice(
        self,
        index: tuple[int, ...],
        result: np.ndarray,
        *,
        state: ImageState | None = None,
        force: bool = False,
        refresh: bool = True,
        renumber: bool = True,
    ) -> bool:
        """Put a slice's result into the Labels layer unless the user painted that slice.

        Only the slice on screen is redrawn (``refresh``); returns whether it was written.
        ``renumber``: with instances on, give the slice's instances new ids (a result of
        :meth:`compose` has them already).
        """
        state = state or self.require_image()
        if index in state.painted and not force:
            return False
        layer = self.labels_layer(state)
        if force and index in state.painted:
            state.painted.discard(index)
            self.events.painted_changed.emit(state)
        data = layer.data
        if self.instances and renumber:
            result, state.next_id = offset_instances(result, state.next_id)
        top = int(result.max(initial=0))
        if top > np.iinfo(data.dtype).max:
            layer.data = data.astype(label_dtype(top))
            data = layer.data
            state.written = {k: _checksum(data[k]) for k in state.written}
        data[index] = result
        state.written[index] = _checksum(data[index])
        if refresh and self._on_screen(state, index):
            L.refresh_slice(layer)
        return True

    def _on_screen(self, state: ImageState, index: tuple[int, ...]) -> bool:
        if not state.geometry.leading_ndim or self.viewer.dims.ndisplay == 3:
            return True
        return L.current_slice(self.viewer, state.layer, state.geometry) == index

    def clear_slice(self, index: tuple[int, ...], state: ImageState | None = None) -> None:
        """Blank a slice's labels after the last positive point is gone."""
        state = state or self.require_image()
        if state.labels is not None and index not in state.painted:
            state.labels.data[index] = 0
            state.written[index] = _checksum(state.labels.data[index])
            L.refresh_slice(state.labels)

    # ------------------------------------------------------------ predicting
    def _groups(
        self, state: ImageState, kind: str = "class"
    ) -> list[tuple[RevolverPredictor, list[Task]]]:
        """Guided tasks of one kind grouped by how they read ``state``'s image (one predictor each).

        Tasks that cannot read this image (another channel axis) are left out with a warning.
        An object lives in the image it was clicked on: object tasks of other images are left
        out.
        """
        groups: dict[VolumeSpec, list[Task]] = {}
        for entry in self.guided_tasks():
            if entry.kind != kind or (kind == "object" and entry.image is not state.layer):
                continue
            try:
                spec = self._image_spec(state, entry.spec)
            except ValueError as exc:
                self.events.warned.emit(f"Task {entry.name!r} is not applied: {exc}.")
                continue
            assert entry.task is not None
            groups.setdefault(spec, []).append(entry.task)
        return [(self.predictor_for(state, spec), tasks) for spec, tasks in groups.items()]

    def missing_features(
        self, indices: Iterable[tuple[int, ...]], state: ImageState | None = None
    ) -> list[tuple[RevolverPredictor, tuple[int, ...]]]:
        """``(predictor, index)`` pairs without cached features, for the tasks of an image.

        Covers the slices ``indices`` of ``state`` for every reading its tasks need, and the
        support slices of stale tasks on the images they are guided on.
        """
        state = state or self.require_image()
        readings = {state.spec} | {
            self._image_spec(state, t.spec)
            for t in self.tasks
            if (t.task is not None or len(t.points.data))
            and t.spec.channel_axis == state.geometry.channel_axis
        }
        jobs = [(self.predictor_for(state, spec), idx) for spec in readings for idx in indices]
        for entry in self.tasks:
            if entry.task is None and len(entry.points.data):
                try:
                    own = self.image_state_of(entry)
                    support = self.support_slices(entry)
                except ValueError:
                    continue
                predictor = self.predictor_for(own, entry.spec)
                jobs.extend((predictor, idx) for idx in sorted(support))
        out, seen = [], set()
        for predictor, idx in jobs:
            key = (id(predictor), idx)
            if key in seen:
                continue
            seen.add(key)
            try:
                k = predictor.info.flat(idx)
            except IndexError:
                continue
            if k not in predictor.cache:
                out.append((predictor, idx))
        return out

    def predict(self, index: tuple[int, ...], state: ImageState | None = None) -> np.ndarray | None:
        """Label image of every guided class task on one slice of an image.

        ``None`` without class tasks. Object tasks are added by :meth:`compose`.
        """
        state = state or self.require_image()
        groups = self._groups(state)
        if not groups:
            return None
        probs = [p.predict_proba(index, tasks, local=self.local) for p, tasks in groups]
        return self._labels(probs, [t for _, tasks in groups for t in tasks])

    def object_values(self) -> set[int]:
        """Label values of the object tasks (their ids)."""
        return {t.label_value for t in self.tasks if t.kind == "object"}

    def clicked_objects(
        self,
        index: tuple[int, ...],
        state: ImageState,
        groups: list[tuple[RevolverPredictor, list[Task]]],
        changed: set[int] | None = None,
    ) -> tuple[np.ndarray | None, set[int]]:
        """Select anew the objects clicked on slice ``index``.

        Parameters
        ----------
        index : tuple of int
        state : ImageState
        groups : list
            The object tasks of ``state`` by reading (``_groups(state, "object")``).
        changed : set of int, optional
            Ids of the objects whose clicks changed: only these, and clicked objects the
            layer does not show on this slice yet, are selected again (one head pass each);
            default all.

        Returns
        -------
        ids : np.ndarray or None
            ``(H, W)`` ids of the objects selected (0 elsewhere); ``None`` when none was.
        selected : set of int
            Their ids.
        """
        from ..core.objects import clicks_on

        shown: set[int] = set()
        if changed is not None and state.labels is not None:
            shown = set(np.unique(np.asarray(state.labels.data[index])).tolist())
        out, selected = None, set()
        for predictor, tasks in groups:
            key = predictor.info.unflat(predictor.info.flat(index))
            for task in tasks:
                value = task.label_value
                if changed is not None and value not in changed and value in shown:
                    continue
                if not (clicks_on(task, key, predictor.info)[1] == 1).any():
                    continue
                if out is None:
                    out = np.zeros(predictor.info.slice_shape, np.uint32)
                out[predictor.object_mask(index, task)] = value
                selected.add(value)
        return out, selected

    def compose(
        self,
        index: tuple[int, ...],
        classes: np.ndarray | None,
        objects: np.ndarray | None,
        state: ImageState,
        *,
        replaced: set[int] | frozenset[int] = frozenset(),
    ) -> np.ndarray:
        """One slice of the output: class labels with object ids over them.

        Parameters
        ----------
        index : tuple of int
        classes : np.ndarray or None
            ``(H, W)`` class labels (instances are given new ids here); ``None`` keeps the
            class pixels the layer has on that slice.
        objects : np.ndarray or None
            ``(H, W)`` object ids (0 elsewhere), drawn over the layer's other object pixels.
        state : ImageState
        replaced : set of int
            Ids ``objects`` stands for: their old pixels go, wherever ``objects`` puts them.
        """
        values = np.fromiter(self.object_values(), np.int64)
        current = None
        if state.labels is not None and L.is_alive(self.viewer, state.labels):
            current = np.asarray(state.labels.data[index])
        if current is None:
            shape = (classes if classes is not None else objects).shape  # type: ignore[union-attr]
            current = np.zeros(shape, np.uint8)
        is_object = np.isin(current, values)
        if classes is None:
            classes = np.where(is_object, 0, current)
        elif self.instances:
            classes, state.next_id = offset_instances(classes, state.next_id)
        kept = np.where(is_object & ~np.isin(current, list(replaced)), current, 0)
        objects = kept if objects is None else np.where(objects > 0, objects, kept)
        top = max(int(classes.max(initial=0)), int(objects.max(initial=0)))
        out = classes.astype(label_dtype(top))
        out[objects > 0] = objects[objects > 0]
        return out

    def _labels(self, probs: list[np.ndarray], tasks: list[Task]) -> np.ndarray:
        from ..core.instances import mask_to_instances
        from ..core.predictor import labels_from_probabilities

        labels = labels_from_probabilities(
            np.concatenate(probs, axis=0), [t.label_value for t in tasks]
        )
        return mask_to_instances(labels > 0) if self.instances else labels

    def update_slice(self, index: tuple[int, ...] | None = None) -> str:
        """Guide stale tasks and repaint one slice (default the one on screen) of the image.

        Features must be cached (see :meth:`missing_features`). Returns what happened, as
        prose; problems with tasks are emitted as ``warned``.
        """
        state = self.require_image()
        if index is None:
            index = L.current_slice(self.viewer, state.layer, state.geometry)
        changed = {t.label_value for t in self.tasks if t.kind == "object" and t.task is None}
        for problem in self.guide_stale():
            self.events.warned.emit(problem)
        result = self.predict(index, state)
        renumber = True
        where = L.slice_text(index)
        groups = self._groups(state, "object")
        if groups and index not in state.painted:
            objects, selected = self.clicked_objects(index, state, groups, changed)
            if result is None and objects is None and state.labels is None:
                return f"No object is clicked on {where}; propagate to follow the objects here."
            result = self.compose(index, result, objects, state, replaced=changed | selected)
            renumber = False
        if result is None:
            self.clear_slice(index, state)
            return self._blank_reason(where, state)
        if self.write_slice(index, result, state=state, renumber=renumber):
            return f"Updated {where}."
        return (
            f"{where[0].upper()}{where[1:]} was painted by hand and is kept; propagate with "
            "'Also recompute slices I painted' to replace it."
        )

    def _blank_reason(self, where: str, state: ImageState) -> str:
        """Say why slice ``where`` of ``state``'s image has no result."""
        others = [
            e for e in self.tasks if e.kind == "object" and (L.point_labels(e.points) == 1).any()
        ]
        if others and all(e.image is not state.layer for e in others):
            gone = [e.name for e in others if e.image is None]
            elsewhere = sorted({e.image.name for e in others if e.image is not None})
            why = []
            if gone:
                why.append(
                    f"the image of {', '.join(map(repr, gone))} was deleted (add a point to an "
                    f"object's layer to guide it on {state.layer.name!r})"
                )
            if elsewhere:
                why.append(
                    f"the objects were clicked on {', '.join(map(repr, elsewhere))}, and an "
                    "object lives in the image it was clicked on (choose that image)"
                )
            return (
                f"{where[0].upper()}{where[1:]} is blank: {'; '.join(why)}. A new object can "
                "be started here."
            )
        return f"No task has a positive point yet; {where} is blank."

    # ---------------------------------------------------------------- runs
    def encoding(self, jobs: list[tuple[RevolverPredictor, tuple[int, ...]]]) -> Run:
        """Make a run that encodes the slices of ``jobs`` (from :meth:`missing_features`)."""
        state = self.require_image()

        def steps() -> Generator[tuple[int, ...], None, None]:
            for predictor, idx in jobs:
                predictor.features(idx)
                yield idx

        n = len(jobs)
        return self._start(Run("encode", state, steps(), n, f"Encoding {n} slice(s)"))

    def propagation(
        self,
        first: int | None = None,
        last: int | None = None,
        *,
        state: ImageState | None = None,
        recompute_painted: bool = False,
    ) -> Run:
        """Make a run that segments slices ``first..last`` (first axis, inclusive) of an image.

        Every guided task takes part, each reading the image as it was guided (the image
        need not be the one the tasks were guided on). Painted slices are skipped unless
        ``recompute_painted``.

        Raises
        ------
        ValueError
            No guided task, an empty range, or a task that cannot read the image.
        """
        state = state or self.require_image()
        for problem in self.guide_stale():
            self.events.warned.emit(problem)
        if not self.guided_tasks():
            raise ValueError("no task has a positive point yet: click on an object first")
        indices = self._run_indices(state, first, last, recompute_painted)
        groups = self._groups(state)
        followed = [
            (p, [self._with_painted(state, t) for t in ts])
            for p, ts in self._groups(state, "object")
        ]
        elsewhere = [
            t.name for t in self.guided_tasks() if t.kind == "object" and t.image is not state.layer
        ]
        if elsewhere:
            self.events.warned.emit(
                f"Objects are followed in the image they were clicked on; "
                f"{', '.join(map(repr, elsewhere))} left out of {state.layer.name!r}."
            )
        if not groups and not followed:
            raise ValueError(f"no task can be applied to {state.layer.name!r}")
        tasks = [t for _, ts in groups for t in ts]
        gens = [
            p.propagate(ts, indices, output="probabilities", local=self.local) for p, ts in groups
        ]
        ended: list[tuple[str, str, tuple[int, ...]]] = []

        def steps() -> Iterator[tuple[tuple[int, ...], np.ndarray, frozenset[int] | None]]:
            # The class pass (None), then each object pass with the ids it stands for, every
            # object from its clicked slices outward, in visit order.
            for parts in zip(*gens, strict=True):
                yield parts[0].index, self._labels([s.result for s in parts], tasks), None
            for predictor, objects in followed:
                ids = frozenset(t.label_value for t in objects)
                for step in predictor.propagate(objects, indices):
                    ended.extend((e.task, e.reason, e.index) for e in step.events)
                    yield step.index, step.result, ids

        total = len(indices) * ((1 if groups else 0) + len(followed))
        name = state.layer.name
        where = "" if state is self.image else f" of {name!r}"
        passes = (["classes"] if groups else []) + [f"{len(ts)} object(s)" for _, ts in followed]
        what = f" ({', then '.join(passes)})" if followed else ""
        run = Run(
            "propagate",
            state,
            steps(),
            total,
            f"Propagating to {len(indices)} slice(s){where}{what}",
            notes=ended,
            unit="steps" if total != len(indices) else "slices",
            slices=len(indices),
        )
        return self._start(run)

    def _with_painted(self, state: ImageState, task: Task) -> Task:
        """``task`` with its pixels on the slices painted by hand as known masks (anchors)."""
        if not state.painted or state.labels is None:
            return task
        data = state.labels.data
        masks = []
        for k in sorted(state.painted):
            mask = np.asarray(data[k]) == task.label_value
            if mask.any():
                masks.append((k, mask))
        return replace(task, object_masks=tuple(masks)) if masks else task

    def _run_indices(
        self, state: ImageState, first: int | None, last: int | None, recompute_painted: bool
    ) -> list[tuple[int, ...]]:
        """List the slices a propagation of ``state`` visits (see :meth:`propagation`)."""
        info = state.predictor.info
        indices = [info.unflat(k) for k in range(info.n_slices)]
        if info.leading_shape and (first is not None or last is not None):
            a = 0 if first is None else first
            b = info.leading_shape[0] - 1 if last is None else last
            if a > b:
                raise ValueError(
                    f"the slice range {a} to {b} is empty; the first slice must not come "
                    "after the last"
                )
            indices = [i for i in indices if a <= i[0] <= b]
        if not recompute_painted:
            indices = [i for i in indices if i not in state.painted]
        return indices

    def _start(self, run: Run) -> Run:
        if self.run is not None and not self.run.finished:
            raise ValueError("a run is in progress; wait for it or cancel it")
        self.run = run
        self.events.run_started.emit(run)
        return run

    def run_step(self, run: Run, item: Any) -> None:
        """Apply one step of a run on the main thread (a propagated slice is written)."""
        if run is not self.run or run.finished or self.viewer is None:
            return
        if run.kind == "propagate":
            index, result, ids = item
            if not L.is_alive(self.viewer, run.state.layer):
                self.cancel_run()
                return
            if self.object_values():
                # Class and object pixels share the layer: each pass replaces its own.
                if ids is None:
                    result = self.compose(index, result, None, run.state)
                else:
                    result = self.compose(index, None, result, run.state, replaced=ids)
                self.write_slice(index, result, state=run.state, force=True, renumber=False)
            else:
                self.write_slice(index, result, state=run.state, force=True)
        run.done += 1
        self.events.run_progressed.emit(run)

    def finish_run(self, run: Run) -> None:
        """End a run that stopped (done or cancelled); a failed run has ended already."""
        if run.finished:
            return
        run.finished = True
        if self.run is run:
            self.run = None
        if self.viewer is None:  # closed
            return
        state = run.state
        if run.kind == "propagate" and state.labels is not None:
            if L.is_alive(self.viewer, state.labels):
                state.labels.refresh()
        if run.kind == "propagate":
            ended = f" Objects ended: {_ends_text(run.notes)}." if run.notes else ""
            self.events.status.emit(
                f"Propagation cancelled after {run.done} of {run.total} {run.unit}; they are kept."
                if run.cancelled
                else f"Propagated to {run.slices or run.done} slice(s).{ended}"
            )
        self.events.run_finished.emit(run)

    def fail_run(self, run: Run, exc: BaseException) -> None:
        """End a run with an error: one ``run_failed`` event saying what failed."""
        if run.finished:
            return
        run.finished, run.failed = True, str(exc)
        if self.run is run:
            self.run = None
        if self.viewer is None:  # closed: nobody to tell
            return
        what = "Encoding slices" if run.kind == "encode" else "Propagation"
        where = run.state.layer.name
        message = f"{what} of {where!r} failed after {run.done} of {run.total} {run.unit}: {exc}"
        logger.debug("run failed", exc_info=exc)
        self.events.run_failed.emit(run, message)

    def cancel_run(self) -> None:
        """Ask the running run to stop (a worker stops at the next slice)."""
        if self.run is not None:
            self.run.cancelled = True

    def run_inline(self, run: Run) -> Run:
        """Run ``run`` to its end on this thread (scripts, tests; the widget uses a worker)."""
        try:
            for item in run.steps:
                if run.cancelled:
                    break
                self.run_step(run, item)
        except Exception as exc:
            self.fail_run(run, exc)
        else:
            self.finish_run(run)
        return run

    # ------------------------------------------------------------------ io
    def save_labels(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the current image's labels as a TIFF with axes and pixel size."""
        from .io import write_labels_layer

        state = self.require_image()
        if state.labels is None:
            raise ValueError("there are no labels to save yet: add points or propagate first")
        return write_labels_layer(path, state.labels, overwrite=overwrite)

    def save_task(self, entry: TaskEntry, path: str | Path) -> Path:
        """Write a task file (guidance, points, provenance)."""
        if entry.task is None:
            raise ValueError(f"task {entry.name!r} has no positive point yet; nothing to save")
        return entry.task.save(path, overwrite=True)

    def load_task(self, path: str | Path) -> TaskEntry:
        """Load a saved task: its points become a new task's Points layer on this image.

        The task keeps the reading it was guided with (invert, scale), whatever the current
        image's own setting, so its saved vectors keep their meaning.
        """
        from ..core.task import load_task

        task = load_task(path)
        state = self.require_image()
        entry = self.add_task(self.unique_name(task.name), kind=task.kind)
        entry.spec = replace(entry.spec, invert=task.invert, scale=task.scale)
        if len(task.points) and task.points.shape[1] == state.layer.ndim:
            L.set_points(entry.points, task.points, task.labels)
        # The saved guidance is kept as is (it may come from another image).
        predictor = self.predictor_for(state, entry.spec)
        same_model = (task.model_key, task.weights_sha256) == (
            predictor.model_key,
            predictor.weights.sha256,
        )
        entry.task = task.renamed(entry.name, entry.label_value) if same_model else None
        self.events.task_changed.emit(entry)
        if entry.task is None:
            raise ValueError(
                f"{path} was guided with other weights ({task.model_key}, "
                f"{task.weights_sha256[:12]}); its points were loaded, add or move a "
                "point to guide it with the current weights"
            )
        return entry


def _ends_text(ends: list[tuple[str, str, tuple[int, ...]]]) -> str:
    """Where objects ended, as prose, one clause per object and reason.

    ``[("cell", "r", (6,)), ("cell", "r", (17,))]`` -> ``cell at slices 6 and 17 (r)``.
    """
    groups: dict[tuple[str, str], list[tuple[int, ...]]] = {}
    for name, reason, index in ends:
        groups.setdefault((name, reason), []).append(index)
    clauses = []
    for (name, reason), where in groups.items():
        text = L.slices_text(where)
        if len(where) == 2:
            text = text.replace(", ", " and ")
        clauses.append(f"{name} at slice{'s' if len(where) > 1 else ''} {text} ({reason})")
    return "; ".join(clauses)


def _checksum(plane: np.ndarray) -> int:
    """Checksum of a label slice's values and dtype (a dtype change reads as a change)."""
    a = np.ascontiguousarray(np.asarray(plane))
    return zlib.crc32(a.view(np.uint8), zlib.crc32(a.dtype.str.encode()))


def _zero_checksum(plane: np.ndarray) -> int:
    return _checksum(np.zeros(np.shape(plane), np.asarray(plane).dtype))


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
