"""The Revolver dock widget: points in, labels out.

The widget owns no state of its own: a :class:`~.session.Session` holds the tasks, images and
runs and emits events; the four group boxes (:mod:`.image_box`, :mod:`.tasks_box`,
:mod:`.propagate_box`, :mod:`.io_box`) listen to them. This module puts the boxes together,
keeps the slice on screen up to date (inline when its features are cached, after an encoding
run otherwise) and shows every problem once: in the status line and as one notification.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import QFrame, QLabel, QScrollArea, QVBoxLayout, QWidget

from . import layers as L
from . import workers
from .image_box import DEFAULT_WEIGHTS, ImageBox
from .io import remember_labels_reader
from .io_box import SaveLoadBox
from .propagate_box import PropagateBox
from .session import Run, Session, TaskEntry
from .tasks_box import TOGGLE_KEY, TasksBox

if TYPE_CHECKING:  # pragma: no cover
    import napari

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_WEIGHTS", "TOGGLE_KEY", "RevolverWidget", "notify"]


def notify(kind: str, message: str) -> None:
    """Show ``message`` as a napari notification (``error``, ``warning`` or ``info``)."""
    from napari.utils import notifications

    {
        "error": notifications.show_error,
        "warning": notifications.show_warning,
        "info": notifications.show_info,
    }[kind](message)


def _closer(session: Session, signals: list[tuple[Any, Any]]) -> Any:
    """Make a callable that cancels the session's run and disconnects everything, once."""

    def close(*_: Any) -> None:
        if session.viewer is None:
            return
        session.cancel_run()
        for signal, slot in signals:
            signal.disconnect(slot)
        session.close()

    return close


class RevolverWidget(QWidget):
    """Few-shot segmentation from clicks: tasks, live update, propagation, save.

    Parameters
    ----------
    napari_viewer : napari.Viewer
        As napari gives it to a plugin widget (a proxy is fine).
    """

    def __init__(self, napari_viewer: napari.Viewer) -> None:
        super().__init__()
        try:  # File > Open of a .labels.tif file picks this plugin's reader, not napari's
            remember_labels_reader()
        except OSError as exc:  # the settings file could not be written: this session only
            logger.warning("Could not save napari's reader preference: %s", exc)
        self.session = Session(napari_viewer)
        self.viewer = self.session.viewer
        self._worker: Any = None
        self._pending_update = False
        self._update_timer = QTimer(self)
        self._update_timer.setSingleShot(True)
        self._update_timer.setInterval(0)
        self._update_timer.timeout.connect(self.update_now)
        self._thumbnail_timer = QTimer(self)
        self._thumbnail_timer.setSingleShot(True)
        self._thumbnail_timer.setInterval(400)
        self._thumbnail_timer.timeout.connect(self._refresh_thumbnail)

        # The boxes scroll in a short window rather than being squeezed: a long status (the
        # objects that ended, by name) would otherwise crush the buttons above it.
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        self.scroll = QScrollArea(self)
        self.scroll.setWidgetResizable(True)
        self.scroll.setFrameShape(QFrame.Shape.NoFrame)
        content = QWidget()
        root = QVBoxLayout(content)
        self.image_box = ImageBox(self.session, self.report)
        self.tasks_box = TasksBox(self.session, self.report)
        self.propagate_box = PropagateBox(self.session, self.report)
        self.io_box = SaveLoadBox(self.session, self.report)
        for box in (self.image_box, self.tasks_box, self.propagate_box, self.io_box):
            root.addWidget(box)
        self.status = QLabel("Choose an image, add a task, click on an object.")
        self.status.setWordWrap(True)
        root.addWidget(self.status)
        root.addStretch(1)
        self.scroll.setWidget(content)
        # As wide as the boxes and a vertical scroll bar: never a horizontal one.
        self.scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        bar = self.scroll.verticalScrollBar().sizeHint().width()
        self.scroll.setMinimumWidth(content.minimumSizeHint().width() + bar)
        outer.addWidget(self.scroll)

        ev = self.session.events
        ev.task_stale.connect(self._on_stale)
        ev.task_added.connect(lambda _: self._schedule_update())
        ev.task_removed.connect(self._on_task_removed)
        ev.image_changed.connect(lambda _: self._schedule_update())
        ev.run_finished.connect(self._on_run_finished)
        ev.run_failed.connect(self._on_run_failed)
        ev.warned.connect(lambda message: self.report("warning", message))
        ev.status.connect(lambda message: self.report("status", message))
        self.propagate_box.local_check.toggled.connect(lambda _: self._schedule_update())
        # The task list says whether a pixel fit counts, which following positions turns off.
        self.propagate_box.local_check.toggled.connect(lambda _: self.tasks_box._refresh())
        self.propagate_box.instances_check.toggled.connect(lambda _: self._schedule_update())
        self.tasks_box.live_check.toggled.connect(lambda _: self._schedule_update())
        self._connect_viewer()
        # When napari deletes the dock widget (the viewer closes), nothing may call into it.
        self.destroyed.connect(_closer(self.session, self._viewer_signals()))
        self._refresh_layers()
        if self.session.tasks:  # a task taken up from the layers (the sample with clicks)
            self.session.set_active(len(self.session.tasks) - 1)
            self.tasks_box._refresh()
            self._schedule_update()

    # ------------------------------------------------------------- viewer
    def _viewer_signals(self) -> list[tuple[Any, Any]]:
        layers = self.viewer.layers
        return [
            (layers.events.inserted, self._refresh_layers),
            (layers.events.removed, self._refresh_layers),
            (layers.events.reordered, self._refresh_layers),
            (self.viewer.dims.events.current_step, self._on_step),
        ]

    def _connect_viewer(self) -> None:
        for signal, slot in self._viewer_signals():
            signal.connect(slot)

    def closeEvent(self, event: Any) -> None:
        """Stop work and listening when the dock widget is closed."""
        _closer(self.session, self._viewer_signals())()
        super().closeEvent(event)

    def _refresh_layers(self, *_: Any) -> None:
        self.image_box.refresh_layers()
        self.propagate_box.refresh_targets()

    def _on_step(self, event: Any = None) -> None:
        self.propagate_box.show_slice()
        if any(len(t.points.data) for t in self.session.tasks):
            self._schedule_update()

    # ------------------------------------------------------- live update
    def _on_stale(self, entry: TaskEntry) -> None:
        # A finished point gesture: update at once rather than after the events the point
        # queued (the Points layer's own redraw among them), so both repaint together.
        if entry is self.session.active_task() and self.tasks_box.live_check.isChecked():
            self._update_timer.stop()
            self.update_now()
        else:
            self._schedule_update()

    def _on_task_removed(self, entry: TaskEntry) -> None:
        self._schedule_update()

    def _schedule_update(self) -> None:
        if self.tasks_box.live_check.isChecked():
            self._update_timer.start()

    def update_now(self, *, quiet: bool = False) -> None:
        """Guide stale tasks and repaint the slice on screen (``quiet``: keep the status).

        Runs inline when the features it needs are cached (guide + head only); otherwise the
        missing slices are encoded in a worker first and this runs again when it finishes.
        """
        session = self.session
        state = session.image
        if state is None or not L.is_alive(self.viewer, state.layer) or not session.tasks:
            return
        if session.run is not None and session.run.kind == "encode":
            self._pending_update = True
            return
        try:
            index = L.current_slice(self.viewer, state.layer, state.geometry)
            missing = session.missing_features([index])
            if missing:
                if session.run is not None:  # a propagation: encode after it
                    self._pending_update = True
                else:
                    self._worker = workers.start(session, session.encoding(missing))
                return
            text = session.update_slice(index)
            if not quiet:
                self.report("status", text)
        except ValueError as exc:
            self.report("error", str(exc))
            return
        self._thumbnail_timer.start()

    def _refresh_thumbnail(self) -> None:
        state = self.session.image
        if state is not None and state.labels is not None:
            state.labels.refresh(data_displayed=False, extent=False, highlight=False)

    def _on_run_finished(self, run: Run) -> None:
        self._worker = None
        if run.kind == "encode" and not run.cancelled:
            self.update_now()
        elif self._pending_update:
            self._pending_update = False
            # A finished propagation wrote the slice on screen already, unless a task
            # changed meanwhile.
            stale = any(t.task is None and len(t.points.data) for t in self.session.tasks)
            if run.kind != "propagate" or run.cancelled or stale:
                # The run's own message (cancelled, done) stays in the status line.
                QTimer.singleShot(0, lambda: self.update_now(quiet=True))

    def _on_run_failed(self, run: Run, message: str) -> None:
        self._worker = None
        self._pending_update = False
        self.report("error", message)

    # ------------------------------------------------------------- report
    def report(self, kind: str, message: str) -> None:
        """Show a result in the status line; a problem also as one notification."""
        if kind == "debug":
            logger.debug(message)
            return
        self.status.setText(message)
        if kind in ("error", "warning", "info"):
            notify(kind, message)

    # ------------------------------------------------ shortcuts to the boxes
    def add_task(self, name: str | None = None) -> TaskEntry | None:
        """Add a task (see :meth:`TasksBox.add_task`)."""
        return self.tasks_box.add_task(name)

    def add_object(self, name: str | None = None) -> TaskEntry | None:
        """Add an object task (see :meth:`TasksBox.add_object`)."""
        return self.tasks_box.add_object(name)

    def propagate(self, start: int | None = None, stop: int | None = None) -> Any:
        """Propagate in a worker (see :meth:`PropagateBox.propagate`); returns the worker."""
        return self.propagate_box.propagate(start, stop)
