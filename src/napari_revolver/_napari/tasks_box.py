"""The *Tasks* group: the task list, add / rename / delete, and the next point's polarity."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtGui import QColor
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
)

from . import layers as L
from .box import SessionBox
from .session import Session, TaskEntry

TOGGLE_KEY = "t"


def task_text(entry: TaskEntry, local: bool = False) -> str:
    """One line of the task list: name, kind and value, clicks, and where it was guided.

    A class task that learns from slices painted by hand also says how many, and whether its
    pixel fit counts (from the painting or the clicks); with ``local`` (click positions
    followed through the stack) the fit is off, and the line says so.
    """
    labels = L.point_labels(entry.points)
    pos = int((labels == 1).sum())
    neg = len(labels) - pos
    where = f"on {entry.image.name!r}" if entry.image is not None else "image deleted"
    reading = []
    if entry.spec.channel_axis is not None:
        reading.append(f"channel {entry.spec.channel}")
    if entry.spec.invert:
        reading.append("inverted")
    if entry.spec.scale != 1:
        reading.append(f"scale {entry.spec.scale:g}")
    read = f", {' '.join(reading)}" if reading else ""
    if entry.kind == "object":
        return f"◆ {entry.name}  (object, id {entry.label_value}; +{pos} / −{neg}; {where}{read})"
    painted = ""
    if entry.task is not None and entry.task.support_masks:
        n = len(entry.task.support_masks)
        painted = f"; {n} painted slice{'s' if n > 1 else ''}"
    fit = entry.task.pixel_fit if entry.task is not None else None
    if fit is not None and fit.active:
        painted += ", pixel fit off while following positions" if local else ", pixel fit used"
    clicks = f"+{pos} / −{neg}"
    return f"■ {entry.name}  (label {entry.label_value}; {clicks}{painted}; {where}{read})"


class TasksBox(SessionBox):
    """Shows the session's tasks and edits them; listens to the session's task events.

    Parameters are those of :class:`~.box.SessionBox` without ``title``.
    """

    def __init__(self, session: Session, report: Callable[[str, str], None]) -> None:
        super().__init__("Tasks", session, report)
        v = QVBoxLayout(self)
        self.task_list = QListWidget()
        self.task_list.setMaximumHeight(110)
        self.task_list.setToolTip(
            "Each task is one concept; its points live in its own Points layer. "
            "It is guided on the image named here and applies to others read the same way."
        )
        v.addWidget(self.task_list)
        row = QHBoxLayout()
        self.add_button = QPushButton("Add")
        self.add_button.setToolTip("A class task: everything like the clicked objects")
        self.object_button = QPushButton("New object")
        self.object_button.setToolTip(
            "An object task: the one object under the clicks, followed through z and t by "
            "Propagate; its id in the labels stays the same on every slice"
        )
        self.rename_button = QPushButton("Rename")
        self.delete_button = QPushButton("Delete")
        for b in (self.add_button, self.object_button, self.rename_button, self.delete_button):
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

        # A click changes its task's line (the point counts); the line is redrawn just after
        # the labels, not before: a list repaint costs as much as the rest of the update.
        self._changed: set[int] = set()
        self._line_timer = QTimer(self)
        self._line_timer.setSingleShot(True)
        self._line_timer.setInterval(150)
        self._line_timer.timeout.connect(self._flush_lines)

        self.add_button.clicked.connect(lambda: self.add_task())
        self.object_button.clicked.connect(lambda: self.add_object())
        self.rename_button.clicked.connect(self._rename_clicked)
        self.delete_button.clicked.connect(self.delete_task)
        self.task_list.currentRowChanged.connect(self._row_chosen)
        self.polarity_button.clicked.connect(self.toggle_polarity)
        ev = session.events
        ev.task_added.connect(self._on_task_added)
        ev.task_removed.connect(self._refresh)
        ev.task_changed.connect(self._on_task_changed)
        ev.active_changed.connect(self._on_active)
        self._refresh()

    # -------------------------------------------------------------- actions
    def add_task(self, name: str | None = None, *, kind: str = "class") -> TaskEntry | None:
        """Add a task (``kind`` class or object) with its own Points layer; it becomes active."""
        try:
            entry = self.session.add_task(name, kind=kind)
        except ValueError as exc:
            self.report("error", str(exc))
            return None
        key = TOGGLE_KEY.upper()
        self.report(
            "status",
            f"Object {entry.name!r} (id {entry.label_value}): click once on it; a negative "
            f"click ({key}) on a neighbour removes that neighbour. Propagate follows it "
            "through the stack."
            if kind == "object"
            else f"Task {entry.name!r}: click on the object (positive) or around it "
            f"(negative; press {key} or the button to switch).",
        )
        return entry

    def add_object(self, name: str | None = None) -> TaskEntry | None:
        """Add an object task (its own Points layer, its own id) and make it active."""
        return self.add_task(name, kind="object")

    def _rename_clicked(self) -> None:
        entry = self.session.active_task()
        if entry is None:
            return
        name, ok = QInputDialog.getText(self, "Rename task", "Name", text=entry.name)
        if ok:
            self.rename_task(name)

    def rename_task(self, name: str) -> None:
        """Rename the active task."""
        try:
            self.session.rename_task(self.session.active, name)
        except ValueError as exc:
            self.report("error", str(exc))

    def delete_task(self) -> None:
        """Delete the active task and its Points layer."""
        entry = self.session.active_task()
        if entry is not None:
            self.session.remove_task(entry)

    def select_task(self, index: int) -> None:
        """Make task ``index`` active, as a click in the list does."""
        self.task_list.setCurrentRow(index)

    def toggle_polarity(self) -> None:
        """Switch the next point of the active task between positive and negative."""
        self.session.toggle_polarity()

    def _row_chosen(self, row: int) -> None:
        if 0 <= row < len(self.session.tasks):
            self.session.set_active(row)

    # --------------------------------------------------------------- events
    def _on_task_added(self, entry: TaskEntry) -> None:
        try:
            entry.points.bind_key(
                TOGGLE_KEY, lambda layer: self.session.toggle_polarity(), overwrite=True
            )
        except Exception as exc:  # a napari without per-layer key bindings
            self.report("debug", f"could not bind {TOGGLE_KEY}: {exc}")
        self._refresh()

    def _on_task_changed(self, entry: TaskEntry) -> None:
        if entry not in self.session.tasks:
            return
        self._changed.add(id(entry))
        if not self._line_timer.isActive():
            self._line_timer.start()
        if entry is self.session.active_task():
            self._show_polarity(L.polarity(entry.points))

    def _flush_lines(self) -> None:
        for row, entry in enumerate(self.session.tasks):
            item = self.task_list.item(row)
            if id(entry) in self._changed and item is not None:
                text = task_text(entry, self.session.local)
                if item.text() != text:
                    item.setText(text)
                    item.setToolTip(text)  # the whole line, which the list may cut
        self._changed.clear()

    def _on_active(self, index: int) -> None:
        self.task_list.blockSignals(True)
        self.task_list.setCurrentRow(index)
        self.task_list.blockSignals(False)
        self._enable()
        entry = self.session.active_task()
        self._show_polarity(L.polarity(entry.points) if entry else L.POSITIVE)

    def _refresh(self, *_: Any) -> None:
        self.task_list.blockSignals(True)
        self.task_list.clear()
        for entry in self.session.tasks:
            item = QListWidgetItem(task_text(entry, self.session.local))
            item.setToolTip(item.text())  # the whole line, which the list may cut
            item.setForeground(QColor(entry.color))
            self.task_list.addItem(item)
        self.task_list.setCurrentRow(self.session.active)
        self.task_list.blockSignals(False)
        self._enable()
        entry = self.session.active_task()
        self._show_polarity(L.polarity(entry.points) if entry else L.POSITIVE)

    def _enable(self) -> None:
        has = self.session.active_task() is not None
        for b in (self.rename_button, self.delete_button, self.polarity_button):
            b.setEnabled(has)

    def _show_polarity(self, polarity: str) -> None:
        positive = polarity == L.POSITIVE
        self.polarity_button.setChecked(not positive)
        text = "● positive (object)" if positive else "● negative (not object)"
        if self.polarity_button.text() == text:
            return  # a restyle repaints the dock: only on a change
        color = L.POSITIVE_COLOR if positive else L.NEGATIVE_COLOR
        self.polarity_button.setText(text)
        self.polarity_button.setStyleSheet(f"color: {color}; font-weight: bold;")
