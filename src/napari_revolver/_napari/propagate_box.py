"""The *Propagate* group: slice range, painted-slice marks, options, progress, apply elsewhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QRectF, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QWidget,
)

from . import layers as L
from . import workers
from .box import SessionBox
from .image_box import image_layers
from .session import ImageState, Run, Session

PAINTED_COLOR = QColor("#ff9e3d")


class SliceStrip(QWidget):
    """One cell per slice of the first axis: painted slices marked, the one on screen framed.

    Clicking a cell shows that slice (``slice_clicked``).
    """

    slice_clicked = Signal(int)

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.painted: set[int] = set()
        self.current = -1
        self.setMinimumHeight(14)
        self.setMaximumHeight(14)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Slices along the first axis; orange: painted by hand (kept)")

    def set_state(self, n: int, painted: set[int], current: int) -> None:
        """Show ``n`` slices, ``painted`` marked and ``current`` framed."""
        if (n, painted, current) != (self.n, self.painted, self.current):
            self.n, self.painted, self.current = n, set(painted), current
            self.update()

    def _cell(self, i: int) -> QRectF:
        w = self.width() / max(1, self.n)
        return QRectF(i * w, 0, max(1.0, w - 1), self.height() - 1)

    def paintEvent(self, event: Any) -> None:
        """Draw the cells."""
        p = QPainter(self)
        p.fillRect(self.rect(), QColor(60, 64, 72))
        for i in sorted(self.painted):
            p.fillRect(self._cell(i), PAINTED_COLOR)
        if 0 <= self.current < self.n:
            p.setPen(QPen(QColor("white"), 1.5))
            p.drawRect(self._cell(self.current))
        p.end()

    def mousePressEvent(self, event: Any) -> None:
        """Jump to the clicked slice."""
        if self.n:
            x = event.position().x() if hasattr(event, "position") else event.x()
            self.slice_clicked.emit(min(self.n - 1, max(0, int(x / self.width() * self.n))))


class PropagateBox(SessionBox):
    """Starts and cancels runs, shows their progress; listens to the session's run events.

    Parameters are those of :class:`~.box.SessionBox` without ``title``.
    """

    def __init__(self, session: Session, report: Callable[[str, str], None]) -> None:
        super().__init__("Propagate", session, report)
        self.worker: Any = None
        self._last_progress = 0.0
        form = QFormLayout(self)
        rng = QHBoxLayout()
        self.range_start = QSpinBox()
        self.range_stop = QSpinBox()
        rng.addWidget(self.range_start)
        rng.addWidget(QLabel("to"))
        rng.addWidget(self.range_stop)
        form.addRow("Slices (first axis)", rng)
        self.strip = SliceStrip()
        form.addRow("", self.strip)
        prow = QHBoxLayout()
        self.painted_label = QLabel("Slices painted by hand: none")
        self.painted_label.setWordWrap(True)
        self.forget_button = QPushButton("Forget")
        self.forget_button.setToolTip("Let propagation write over the painted slices again")
        prow.addWidget(self.painted_label, 1)
        prow.addWidget(self.forget_button)
        form.addRow(prow)
        self.recompute_check = QCheckBox("Also recompute slices I painted")
        form.addRow(self.recompute_check)
        self.local_check = QCheckBox("Follow click positions through the stack")
        self.local_check.setToolTip(
            "Clicks also act by where they are on the other slices: follows one object "
            "through z or time. Leave off for a stack of unrelated images."
        )
        form.addRow(self.local_check)
        self.instances_check = QCheckBox("Instances (one id per object, touching ones split)")
        form.addRow(self.instances_check)
        row = QHBoxLayout()
        self.propagate_button = QPushButton("Propagate")
        self.propagate_button.setToolTip("Segment every slice in the range with all tasks")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        row.addWidget(self.propagate_button, 1)
        row.addWidget(self.cancel_button)
        form.addRow(row)
        self.progress = QProgressBar()
        self.progress.setTextVisible(True)
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.eta_label = QLabel("")
        prog = QHBoxLayout()
        prog.addWidget(self.progress, 1)
        prog.addWidget(self.eta_label)
        form.addRow(prog)
        row = QHBoxLayout()
        self.target_combo = QComboBox()
        self.target_combo.setToolTip("Another image of the same kind")
        self.apply_button = QPushButton("Apply tasks")
        row.addWidget(self.target_combo, 1)
        row.addWidget(self.apply_button)
        form.addRow("To image", row)

        self.propagate_button.clicked.connect(lambda: self.propagate())
        self.cancel_button.clicked.connect(session.cancel_run)
        self.apply_button.clicked.connect(lambda: self.apply_to_target())
        self.forget_button.clicked.connect(lambda: session.forget_painted())
        self.local_check.toggled.connect(lambda on: setattr(session, "local", bool(on)))
        self.instances_check.toggled.connect(lambda on: setattr(session, "instances", bool(on)))
        self.strip.slice_clicked.connect(self._jump)
        ev = session.events
        ev.run_started.connect(self._on_started)
        ev.run_progressed.connect(self._on_progress)
        ev.run_finished.connect(self._on_ended)
        ev.run_failed.connect(lambda run, _msg: self._on_ended(run))
        ev.painted_changed.connect(self._on_painted)
        ev.image_changed.connect(self._on_image)

    # -------------------------------------------------------------- actions
    def propagate(self, start: int | None = None, stop: int | None = None) -> Any:
        """Segment slices ``start..stop`` (inclusive, first axis) in a worker; returns it."""
        try:
            state = self.session.require_image()
            ranged = bool(state.geometry.leading_ndim)
            run = self.session.propagation(
                (self.range_start.value() if start is None else start) if ranged else None,
                (self.range_stop.value() if stop is None else stop) if ranged else None,
                recompute_painted=self.recompute_check.isChecked(),
            )
        except ValueError as exc:
            self.report("error", str(exc))
            return None
        return self._start(run)

    def apply_to_target(self, name: str | None = None) -> Any:
        """Segment another image layer with the tasks, each reading it as it was guided."""
        layer = next(
            (
                x
                for x in image_layers(self.session.viewer)
                if x.name == (name or self.target_combo.currentText())
            ),
            None,
        )
        if layer is None:
            self.report("error", "Choose the image layer to apply the tasks to.")
            return None
        try:
            target = self.session.state_for(layer)
            run = self.session.propagation(
                state=target, recompute_painted=self.recompute_check.isChecked()
            )
        except (ValueError, IndexError) as exc:
            self.report("error", f"Cannot apply the tasks to {layer.name!r}: {exc}")
            return None
        return self._start(run)

    def _start(self, run: Run) -> Any:
        self.worker = workers.start(self.session, run)
        return self.worker

    def _jump(self, i: int) -> None:
        state = self.session.image
        if state is None:
            return
        viewer, layer = self.session.viewer, state.layer
        ax = 1 if state.geometry.channel_axis == 0 else 0
        point = list(layer.world_to_data(list(viewer.dims.point)[-layer.ndim :]))
        point[ax] = i
        world = layer.data_to_world(point)
        viewer.dims.set_point(viewer.dims.ndim - layer.ndim + ax, world[ax])

    # --------------------------------------------------------------- events
    def _on_started(self, run: Run) -> None:
        self.propagate_button.setEnabled(False)
        self.apply_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.progress.setRange(0, max(1, run.total))
        self.progress.setValue(0)
        self._last_progress = 0.0
        self.progress.setFormat(f"{run.description}: %v / %m")
        self.eta_label.setText("")
        self.report("status", f"{run.description}…")

    def _on_progress(self, run: Run) -> None:
        # A repaint of the bar costs milliseconds on the main thread, which live clicks
        # share: at most a few per second.
        now = time.perf_counter()
        if now - self._last_progress < 0.25 and run.done < run.total:
            return
        self._last_progress = now
        self.progress.setValue(run.done)
        left = run.seconds_left()
        self.eta_label.setText("" if left is None else f"{_duration(left)} left")

    def _on_ended(self, run: Run) -> None:
        self.propagate_button.setEnabled(True)
        self.apply_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.worker = None
        if run.failed:
            self.progress.setFormat("failed")
        elif run.cancelled:
            self.progress.setValue(run.done)
            self.progress.setFormat(f"cancelled at %v / %m {run.unit}")
        else:
            self.progress.setValue(self.progress.maximum())
            self.progress.setFormat(f"done: %v / %m {run.unit}")
        self.eta_label.setText("")

    def _on_image(self, state: ImageState | None) -> None:
        if state is None:
            self.strip.set_state(0, set(), -1)
            return
        lead = state.predictor.info.leading_shape
        first = lead[0] if lead else 1
        for spin in (self.range_start, self.range_stop):
            spin.blockSignals(True)
            spin.setRange(0, max(0, first - 1))
            spin.blockSignals(False)
        self.range_start.setValue(0)
        self.range_stop.setValue(max(0, first - 1))
        self._on_painted(state)

    def _on_painted(self, state: ImageState) -> None:
        if state is not self.session.image:
            return
        painted = L.slices_text(sorted(state.painted))
        self.painted_label.setText(f"Slices painted by hand: {painted}")
        self.forget_button.setEnabled(bool(state.painted))
        self.show_slice()

    def show_slice(self) -> None:
        """Update the strip for the image's painted slices and the slice on screen."""
        state = self.session.image
        if state is None or not state.geometry.leading_ndim:
            self.strip.set_state(0, set(), -1)
            return
        first = state.predictor.info.leading_shape[0]
        current = L.current_slice(self.session.viewer, state.layer, state.geometry)[0]
        self.strip.set_state(first, {k[0] for k in state.painted}, current)

    def refresh_targets(self, *_: Any) -> None:
        """Fill the target list from the viewer's Image layers."""
        names = [x.name for x in image_layers(self.session.viewer)]
        current = self.target_combo.currentText()
        self.target_combo.blockSignals(True)
        self.target_combo.clear()
        self.target_combo.addItems(names)
        if current in names:
            self.target_combo.setCurrentText(current)
        self.target_combo.blockSignals(False)


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s} s" if s < 60 else f"{s // 60} min {s % 60:02d} s"
