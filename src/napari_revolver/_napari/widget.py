"""The Revolver dock widget: points in, labels out.

The widget owns no computation: it forwards user actions to a :class:`~.session.Session`
(state, coordinates, core calls) and hands long work to :mod:`.workers`. Every problem the user
can cause becomes a napari notification that says what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from . import layers as L
from . import workers
from .session import Session, TaskEntry

if TYPE_CHECKING:  # pragma: no cover
    import napari

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "shipped weights"
TOGGLE_KEY = "t"


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications

    {
        "error": notifications.show_error,
        "warning": notifications.show_warning,
        "info": notifications.show_info,
    }[kind](message)


class RevolverWidget(QWidget):
    """Few-shot segmentation from clicks: tasks, live update, propagation, save."""

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.session = Session(napari_viewer)
        self._worker: Any = None
        self._feature_worker: Any = None
        self._pending_update = False
        self._update_timer = QTimer(self)
        self._update_timer.setSingleShot(True)
        self._update_timer.setInterval(0)
        self._update_timer.timeout.connect(self.update_now)
        self._build()
        self._connect_viewer()
        self._refresh_images()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        root = QVBoxLayout(self)

        box = QGroupBox("Image and model")
        form = QFormLayout(box)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (2D, Z stack, time-lapse, T x Z, RGB)")
        form.addRow("Image", self.image_combo)
        chan = QHBoxLayout()
        self.channel_axis = QComboBox()
        self.channel_axis.setToolTip(
            "For a multichannel image shown as one layer: its channel axis"
        )
        self.channel_index = QSpinBox()
        self.channel_index.setToolTip("Channel to segment")
        chan.addWidget(self.channel_axis)
        chan.addWidget(QLabel("channel"))
        chan.addWidget(self.channel_index)
        form.addRow("Channel axis", chan)
        wrow = QHBoxLayout()
        self.weights_label = QLabel(DEFAULT_WEIGHTS)
        self.weights_label.setToolTip(
            "Network weights: the shipped default or a file from `revolver train`"
        )
        self.weights_button = QPushButton("Choose…")
        self.weights_default = QPushButton("Default")
        wrow.addWidget(self.weights_label, 1)
        wrow.addWidget(self.weights_button)
        wrow.addWidget(self.weights_default)
        form.addRow("Weights", wrow)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device", self.device_combo)
        srow = QHBoxLayout()
        self.store_label = QLabel("in memory")
        self.store_label.setToolTip(
            "Where this image's slice features are kept: memory only, or "
            "a zarr store reused across sessions (revolver precompute)"
        )
        self.store_button = QPushButton("Store…")
        self.store_clear = QPushButton("Memory")
        srow.addWidget(self.store_label, 1)
        srow.addWidget(self.store_button)
        srow.addWidget(self.store_clear)
        form.addRow("Features", srow)
        self.invert_check = QCheckBox("Dark objects on a light background (invert)")
        self.invert_check.setToolTip(
            "Brightfield, H&E: intensities are reversed so objects look like the bright "
            "objects of fluorescence; features are recomputed"
        )
        form.addRow(self.invert_check)
        root.addWidget(box)

        box = QGroupBox("Tasks")
        v = QVBoxLayout(box)
        self.task_list = QListWidget()
        self.task_list.setMaximumHeight(110)
        self.task_list.setToolTip(
            "Each task is one concept; its points live in its own Points layer"
        )
        v.addWidget(self.task_list)
        row = QHBoxLayout()
        self.add_button = QPushButton("Add")
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
        for b in (self.add_button, self.rename_button, self.delete_button):
            row.addWidget(b)
        v.addLayout(row)
        row = QHBoxLayout()
        self.polarity_button = QPushButton()
        self.polarity_button.setCheckable(True)
        self.polarity_button.setToolTip(
            f"Polarity of the next point (key: {TOGGLE_KEY.upper()} on a task's Points layer)"
        )
        row.addWidget(QLabel("Next point"))
        row.addWidget(self.polarity_button, 1)
        v.addLayout(row)
        self.live_check = QCheckBox("Live update of the current slice")
        self.live_check.setChecked(True)
        v.addWidget(self.live_check)
        root.addWidget(box)

        box = QGroupBox("Propagate")
        form = QFormLayout(box)
        rng = QHBoxLayout()
        self.range_start = QSpinBox()
        self.range_stop = QSpinBox()
        rng.addWidget(self.range_start)
        rng.addWidget(QLabel("to"))
        rng.addWidget(self.range_stop)
        form.addRow("Slices (first axis)", rng)
        self.recompute_check = QCheckBox("Also recompute slices I painted")
        form.addRow(self.recompute_check)
        self.local_check = QCheckBox("Follow click positions through the stack")
        self.local_check.setToolTip(
            "Clicks also act by where they are on the other slices: follows one object "
            "through z or time. Leave off for a stack of unrelated images."
        )
        self.local_check.toggled.connect(self._on_local)
        form.addRow(self.local_check)
        self.instances_check = QCheckBox("Instances (one id per object, touching ones split)")
        self.instances_check.toggled.connect(self._on_instances)
        form.addRow(self.instances_check)
        row = QHBoxLayout()
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.setToolTip("Segment every slice in the range with all tasks")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.propagate_button, 1)
        row.addWidget(self.cancel_button)
        form.addRow(row)
        row = QHBoxLayout()
        self.target_combo = QComboBox()
        self.target_combo.setToolTip("Another image of the same kind")
        self.apply_button = QPushButton("Apply tasks")
        row.addWidget(self.target_combo, 1)
        row.addWidget(self.apply_button)
        form.addRow("To image", row)
        root.addWidget(box)

        box = QGroupBox("Save and load")
        row = QHBoxLayout(box)
        self.save_labels_button = QPushButton("Save labels…")
        self.save_task_button = QPushButton("Save task…")
        self.load_task_button = QPushButton("Load task…")
        for b in (self.save_labels_button, self.save_task_button, self.load_task_button):
            row.addWidget(b)
        root.addWidget(box)

        self.status = QLabel("Choose an image, add a task, click on an object.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)

        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        self.channel_axis.currentIndexChanged.connect(self._on_image_changed)
        self.channel_index.valueChanged.connect(self._on_image_changed)
        self.weights_button.clicked.connect(self._choose_weights)
        self.weights_default.clicked.connect(lambda: self._set_weights(None))
        self.store_button.clicked.connect(self._choose_store)
        self.invert_check.toggled.connect(self.set_invert)
        self.store_clear.clicked.connect(lambda: self.set_store(None))
        self.device_combo.currentTextChanged.connect(
            lambda _: self._set_weights(self.session.weights)
        )
        self.add_button.clicked.connect(lambda: self.add_task())
        self.rename_button.clicked.connect(self._rename_clicked)
        self.delete_button.clicked.connect(self.delete_task)
        self.task_list.currentRowChanged.connect(self._on_task_selected)
        self.polarity_button.clicked.connect(self.toggle_polarity)
        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.cancel_button.clicked.connect(self.cancel)
        self.apply_button.clicked.connect(lambda: self.apply_to_target())
        self.save_labels_button.clicked.connect(self._save_labels_clicked)
        self.save_task_button.clicked.connect(self._save_task_clicked)
        self.load_task_button.clicked.connect(self._load_task_clicked)
        self._show_polarity(L.POSITIVE)

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        layers.events.inserted.connect(self._refresh_images)
        layers.events.removed.connect(self._on_layer_removed)
        layers.events.reordered.connect(self._refresh_images)
        self.viewer.dims.events.current_step.connect(self._on_step)

    def _disconnect_viewer(self) -> None:
        layers = self.viewer.layers
        for sig, slot in (
            (layers.events.inserted, self._refresh_images),
            (layers.events.removed, self._on_layer_removed),
            (layers.events.reordered, self._refresh_images),
            (self.viewer.dims.events.current_step, self._on_step),
        ):
            try:
                sig.disconnect(slot)
            except Exception:
                pass

    def closeEvent(self, event: Any) -> None:
        self.cancel()
        self._disconnect_viewer()
        super().closeEvent(event)

    # -------------------------------------------------------------- images
    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [layer for layer in self.viewer.layers if isinstance(layer, Image)]

    def _refresh_images(self, event: Any = None) -> None:
        names = [layer.name for layer in self._image_layers()]
        for combo in (self.image_combo, self.target_combo):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentText(current)
            combo.blockSignals(False)
        if self.session.image is None and names:
            self._on_image_changed()

    def _layer_named(self, name: str) -> Any:
        return next((layer for layer in self._image_layers() if layer.name == name), None)

    def _on_image_changed(self, *_: Any) -> None:
        layer = self._layer_named(self.image_combo.currentText())
        if layer is None:
            return
        if self.session.image is not None and self.session.image.layer is not layer:
            self.cancel()
        self._sync_channel_controls(layer)
        axis = self.channel_axis.currentData()
        try:
            state = self.session.set_image(
                layer, axis, self.channel_index.value() if axis is not None else None
            )
        except (ValueError, FileNotFoundError, ImportError) as exc:
            self._fail(f"Cannot use image {layer.name!r}: {exc}")
            return
        self._sync_invert(state.predictor.preprocessing.invert)
        n_lead = state.geometry.leading_ndim
        first = state.predictor.info.leading_shape[0] if n_lead else 1
        for spin in (self.range_start, self.range_stop):
            spin.blockSignals(True)
            spin.setRange(0, max(0, first - 1))
            spin.blockSignals(False)
        self.range_start.setValue(0)
        self.range_stop.setValue(max(0, first - 1))
        self._set_status(
            f"Image {layer.name!r}: {state.predictor.info.n_slices} slice(s) of "
            f"{state.predictor.info.slice_shape[0]} x {state.predictor.info.slice_shape[1]}."
        )
        self._schedule_update()

    def _sync_channel_controls(self, layer: Any) -> None:
        ndim = layer.ndim
        current = self.channel_axis.currentData()
        self.channel_axis.blockSignals(True)
        self.channel_axis.clear()
        self.channel_axis.addItem("none", None)
        if not getattr(layer, "rgb", False):
            for ax in range(max(0, ndim - 2)):
                self.channel_axis.addItem(f"axis {ax} (size {layer.data.shape[ax]})", ax)
        idx = self.channel_axis.findData(current)
        self.channel_axis.setCurrentIndex(max(0, idx))
        self.channel_axis.blockSignals(False)
        axis = self.channel_axis.currentData()
        self.channel_index.blockSignals(True)
        self.channel_index.setEnabled(axis is not None)
        self.channel_index.setRange(0, layer.data.shape[axis] - 1 if axis is not None else 0)
        self.channel_index.blockSignals(False)

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        running_on = self.session.image.layer if self.session.image is not None else None
        if layer is running_on:
            self.cancel()
        self.session.forget_layer(layer)
        self._refresh_tasks()
        self._refresh_images()

    # --------------------------------------------------------------- model
    def _choose_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Network weights", "", "safetensors (*.safetensors)"
        )
        if path:
            self._set_weights(path)

    def _set_weights(self, path: str | None) -> None:
        self.cancel()
        previous = self.session.weights, self.session.device
        try:
            self.session.set_model(path, self.device_combo.currentText())
            self.session.base_predictor()
        except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
            self._fail(f"Cannot use these weights or device: {exc}")
            self.session.set_model(*previous)
            self.device_combo.blockSignals(True)
            self.device_combo.setCurrentText(previous[1])
            self.device_combo.blockSignals(False)
            return
        self.weights_label.setText(Path(path).name if path else DEFAULT_WEIGHTS)
        self._on_image_changed()
        for entry in self.session.tasks:
            self._guide_quietly(entry)

    def set_invert(self, on: bool) -> None:
        """Reverse the current image's intensities (dark objects on a light background)."""
        self.cancel()
        try:
            self.session.set_invert(bool(on))
        except ValueError as exc:
            self._fail(f"Cannot change the image's intensities: {exc}")
            return
        # Features of the other setting cannot be reused: they are kept in memory from now on.
        self.store_label.setText("in memory")
        self._set_status(
            "Intensities reversed: dark objects are segmented like bright ones."
            if on
            else "Intensities as recorded."
        )
        for entry in self.session.tasks:
            self._guide_quietly(entry)

    def _choose_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature store (a .zarr folder)")
        if path:
            self.set_store(path)

    def set_store(self, path: str | None) -> None:
        """Keep the current image's features in a zarr store (``None``: memory only)."""
        self.cancel()
        try:
            self.session.use_store(path)
        except (ValueError, OSError) as exc:
            self._fail(f"Cannot use the feature store {path}: {exc}")
            return
        self.store_label.setText(Path(path).name if path else "in memory")
        self._set_status(
            f"Features of this image are kept in {path}."
            if path
            else "Features are kept in memory."
        )
        self._schedule_update()

    # --------------------------------------------------------------- tasks
    def add_task(self, name: str | None = None) -> TaskEntry | None:
        """Add a task with its own Points layer and make it active."""
        try:
            entry = self.session.add_task(name)
        except ValueError as exc:
            self._fail(str(exc))
            return None
        self._watch(entry)
        self._refresh_tasks()
        self.viewer.layers.selection.active = entry.points
        self._set_status(
            f"Task {entry.name!r}: click on the object (positive) or around it "
            f"(negative; press {TOGGLE_KEY.upper()} or the button to switch)."
        )
        return entry

    def _watch(self, entry: TaskEntry) -> None:
        entry.points.events.data.connect(lambda event, e=entry: self._on_points(e, event))
        try:
            entry.points.bind_key(TOGGLE_KEY, lambda layer: self.toggle_polarity(), overwrite=True)
        except Exception as exc:
            logger.debug("could not bind %s: %s", TOGGLE_KEY, exc)

    def _rename_clicked(self) -> None:
        entry = self.session.active_task()
        if entry is None:
            return
        name, ok = QInputDialog.getText(self, "Rename task", "Name", text=entry.name)
        if ok:
            self.rename_task(name)

    def rename_task(self, name: str) -> None:
        try:
            self.session.rename_task(self.session.active, name)
        except ValueError as exc:
            self._fail(str(exc))
        self._refresh_tasks()

    def delete_task(self) -> None:
        if self.session.active_task() is None:
            return
        self.cancel()
        self.session.remove_task(self.session.active)
        self._refresh_tasks()

    def select_task(self, index: int) -> None:
        self.task_list.setCurrentRow(index)

    def _on_task_selected(self, row: int) -> None:
        if 0 <= row < len(self.session.tasks):
            self.session.active = row
            entry = self.session.tasks[row]
            if L.is_alive(self.viewer, entry.points):
                self.viewer.layers.selection.active = entry.points
                entry.points.mode = "add"
            self._show_polarity(L.polarity(entry.points))

    def _refresh_tasks(self) -> None:
        self.task_list.blockSignals(True)
        self.task_list.clear()
        for entry in self.session.tasks:
            pos = int((L.point_labels(entry.points) == 1).sum())
            neg = len(entry.points.data) - pos
            item = QListWidgetItem(f"■ {entry.name}  (label {entry.label_value}; +{pos} / −{neg})")
            item.setForeground(QColor(entry.color))
            self.task_list.addItem(item)
        self.task_list.setCurrentRow(self.session.active)
        self.task_list.blockSignals(False)
        has = self.session.active_task() is not None
        for b in (self.rename_button, self.delete_button, self.save_task_button):
            b.setEnabled(has)

    def toggle_polarity(self) -> None:
        """Switch the next point of the active task between positive and negative."""
        entry = self.session.active_task()
        if entry is None:
            return
        new = L.NEGATIVE if L.polarity(entry.points) == L.POSITIVE else L.POSITIVE
        L.set_polarity(entry.points, new)
        self._show_polarity(new)

    def _show_polarity(self, polarity: str) -> None:
        positive = polarity == L.POSITIVE
        self.polarity_button.setChecked(not positive)
        color = L.POSITIVE_COLOR if positive else L.NEGATIVE_COLOR
        self.polarity_button.setText(
            "● positive (object)" if positive else "● negative (not object)"
        )
        self.polarity_button.setStyleSheet(f"color: {color}; font-weight: bold;")

    # ---------------------------------------------------------- live update
    def _on_points(self, entry: TaskEntry, event: Any) -> None:
        action = str(getattr(event, "action", "")).lower()
        if action.endswith("ing"):  # adding, changing, removing: wait for the final event
            return
        entry.task = None  # stale: re-guided on the next update
        self._refresh_tasks()
        # One event per finished gesture: update at once rather than after the events the
        # point queued (the points layer's own redraw among them), so both repaint together.
        if self.live_check.isChecked():
            self._update_timer.stop()
            self.update_now()

    def _on_step(self, event: Any = None) -> None:
        if self.session.guided_tasks() or any(len(t.points.data) for t in self.session.tasks):
            self._schedule_update()

    def _schedule_update(self) -> None:
        if self.live_check.isChecked():
            self._update_timer.start()

    def update_now(self) -> None:
        """Re-guide stale tasks and repaint the slice on screen.

        Runs inline when the features it needs are cached (guide + head only); otherwise the
        missing slices are encoded in a worker first and this runs again when it finishes.
        """
        state = self.session.image
        if state is None or not L.is_alive(self.viewer, state.layer) or not self.session.tasks:
            return
        if self._feature_worker is not None:
            self._pending_update = True
            return
        try:
            index = L.current_slice(self.viewer, state.layer, state.geometry)
            needed = {index}
            for entry in self.session.tasks:
                if entry.task is None:
                    needed |= self.session.support_slices(entry)
            missing = self.session.missing_features(sorted(needed))
        except ValueError as exc:
            self._fail(str(exc))
            return
        if missing:
            self._set_status(f"Encoding {len(missing)} slice(s)…")
            self._feature_worker = workers.features_worker(
                state.predictor, missing, on_done=self._features_done, on_error=self._worker_failed
            )
            return
        self._apply_update(index)

    def _features_done(self) -> None:
        self._feature_worker = None
        self._pending_update = False
        self.update_now()

    def _apply_update(self, index: tuple[int, ...]) -> None:
        problems = []
        for entry in self.session.tasks:
            if entry.task is not None:
                continue
            try:
                if self.session.guide(entry) is None and len(entry.points.data):
                    problems.append(
                        f"task {entry.name!r} has no positive point yet: click on the "
                        "object with the positive polarity"
                    )
            except ValueError as exc:
                problems.append(f"task {entry.name!r}: {exc}")
        for p in problems:
            _notify("warning", p)
        result = self.session.predict_current(index)
        if result is None:
            self.session.clear_slice(index)
            return
        written = self.session.write_slice(index, result)
        where = f"slice {index}" if index else "the image"
        self._set_status(
            f"Updated {where}."
            if written
            else f"{where.capitalize()} was painted by hand and is kept; propagate with "
            "'Also recompute slices I painted' to replace it."
        )

    def _guide_quietly(self, entry: TaskEntry) -> None:
        entry.task = None
        self._schedule_update()

    def _on_local(self, on: bool) -> None:
        self.session.local = bool(on)
        self._schedule_update()

    def _on_instances(self, on: bool) -> None:
        self.session.instances = bool(on)
        self._schedule_update()

    # ---------------------------------------------------------- propagation
    def propagate(self, start: int | None = None, stop: int | None = None) -> Any:
        """Segment slices ``start..stop`` (inclusive, first axis) in a worker; returns it."""
        if self._worker is not None:
            self._fail("A propagation is running; wait for it or cancel it.")
            return None
        try:
            state = self.session.require_image()
            self._guide_stale()
            info = state.predictor.info
            if info.leading_shape:
                a = self.range_start.value() if start is None else start
                b = self.range_stop.value() if stop is None else stop
                if a > b:
                    raise ValueError(
                        f"the slice range {a} to {b} is empty; the first slice must not "
                        "come after the last"
                    )
                indices = [
                    info.unflat(k) for k in range(info.n_slices) if a <= info.unflat(k)[0] <= b
                ]
            else:
                indices = [()]
            steps = self.session.propagation(
                indices, recompute_edited=self.recompute_check.isChecked()
            )
        except ValueError as exc:
            self._fail(str(exc))
            return None
        total = (
            len(indices)
            if self.recompute_check.isChecked()
            else len([i for i in indices if i not in state.edited])
        )
        return self._run(steps, total, state, f"Propagating to {total} slice(s)…")

    def _guide_stale(self) -> None:
        for entry in self.session.tasks:
            if entry.task is None and len(entry.points.data):
                self.session.guide(entry)

    def apply_to_target(self, name: str | None = None) -> Any:
        """Segment another image layer with the current tasks (guided on this image)."""
        if self._worker is not None:
            self._fail("A propagation is running; wait for it or cancel it.")
            return None
        layer = self._layer_named(name or self.target_combo.currentText())
        if layer is None:
            self._fail("Choose the image layer to apply the tasks to.")
            return None
        try:
            self.session.require_image()
            self._guide_stale()
            target = self.session.state_for(layer)
            steps = self.session.propagation(
                None, state=target, recompute_edited=self.recompute_check.isChecked()
            )
        except (ValueError, IndexError) as exc:
            self._fail(f"Cannot apply the tasks to {layer.name!r}: {exc}")
            return None
        total = target.predictor.info.n_slices
        return self._run(steps, total, target, f"Applying tasks to {layer.name!r}…")

    def _run(self, steps: Any, total: int, state: Any, message: str) -> Any:
        self.session.labels_layer(state)
        self._set_status(message)
        self.propagate_button.setEnabled(False)
        self.apply_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self._run_state = state
        self._worker = workers.propagation_worker(
            steps,
            total,
            on_step=self._on_step_result,
            on_done=self._propagation_done,
            on_error=self._worker_failed,
        )
        return self._worker

    def _on_step_result(self, step: Any) -> None:
        state = self._run_state
        if not L.is_alive(self.viewer, state.layer):
            self.cancel()
            return
        self.session.write_slice(
            step.index,
            step.result,
            state=state,
            force=True,
            refresh=step.done == step.total or step.done % 8 == 0,
        )

    def _propagation_done(self) -> None:
        worker, self._worker = self._worker, None
        self.propagate_button.setEnabled(True)
        self.apply_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        state = self._run_state
        if state.labels is not None and L.is_alive(self.viewer, state.labels):
            state.labels.refresh()
        aborted = worker is not None and getattr(worker, "abort_requested", False)
        self._set_status(
            "Propagation cancelled; slices done so far are kept."
            if aborted
            else "Propagation finished."
        )

    def cancel(self) -> None:
        """Stop a running propagation (at the next slice) and any encoding."""
        for w in (self._worker, self._feature_worker):
            if w is not None:
                w.quit()

    def _worker_failed(self, exc: Exception) -> None:
        self._feature_worker = None
        if self._worker is not None:
            self._propagation_done()
        self._fail(f"Revolver failed: {exc}")

    # ----------------------------------------------------------------- io
    def _save_labels_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Save labels", "labels.tif", "TIFF (*.tif *.tiff)"
        )
        if path:
            self.save_labels(path)

    def save_labels(self, path: str | Path) -> Path | None:
        try:
            out = self.session.save_labels(path)
        except (ValueError, OSError) as exc:
            self._fail(f"Could not save the labels: {exc}")
            return None
        self._set_status(f"Saved labels to {out}.")
        return out

    def _save_task_clicked(self) -> None:
        entry = self.session.active_task()
        if entry is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save task",
            f"{entry.name}.revolver-task.json",
            "Revolver task (*.revolver-task.json)",
        )
        if path:
            self.save_task(path)

    def save_task(self, path: str | Path) -> Path | None:
        entry = self.session.active_task()
        try:
            if entry is None:
                raise ValueError("there is no task to save")
            self._guide_stale()
            out = self.session.save_task(entry, path)
        except (ValueError, OSError) as exc:
            self._fail(f"Could not save the task: {exc}")
            return None
        self._set_status(f"Saved task {entry.name!r} to {out}.")
        return out

    def _load_task_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load task", "", "Revolver task (*.json)")
        if path:
            self.load_task(path)

    def _sync_invert(self, on: bool) -> None:
        """Show the image's invert setting without acting on it."""
        self.invert_check.blockSignals(True)
        self.invert_check.setChecked(on)
        self.invert_check.blockSignals(False)

    def load_task(self, path: str | Path) -> TaskEntry | None:
        image = self.session.image
        was_inverted = image is not None and image.predictor.preprocessing.invert
        try:
            entry = self.session.load_task(path)
        except (ValueError, OSError) as exc:
            self._refresh_tasks()
            self._fail(f"Could not load the task: {exc}")
            return None
        image = self.session.image
        if image is not None and image.predictor.preprocessing.invert != was_inverted:
            on = image.predictor.preprocessing.invert
            self._sync_invert(on)
            _notify(
                "info",
                f"Task {entry.name!r} was made on "
                f"{'inverted' if on else 'non-inverted'} intensities: the image is now read "
                f"{'inverted' if on else 'as is'} too.",
            )
        self._watch(entry)
        self._refresh_tasks()
        self._schedule_update()
        return entry

    # -------------------------------------------------------------- status
    def _set_status(self, text: str) -> None:
        self.status.setText(text)

    def _fail(self, message: str) -> None:
        self._set_status(message)
        _notify("error", message)
