"""The *Save and load* group: labels as TIFF, tasks as ``.revolver-task.json``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from qtpy.QtWidgets import QFileDialog, QHBoxLayout, QPushButton

from .box import SessionBox
from .io import LABELS_SUFFIXES, TASK_SUFFIX
from .session import Session, TaskEntry


class SaveLoadBox(SessionBox):
    """Saves the labels and the active task, loads tasks.

    Parameters are those of :class:`~.box.SessionBox` without ``title``.
    """

    def __init__(self, session: Session, report: Callable[[str, str], None]) -> None:
        super().__init__("Save and load", session, report)
        row = QHBoxLayout(self)
        self.save_labels_button = QPushButton("Save labels…")
        self.save_task_button = QPushButton("Save task…")
        self.load_task_button = QPushButton("Load task…")
        for b in (self.save_labels_button, self.save_task_button, self.load_task_button):
            row.addWidget(b)
        self.save_labels_button.clicked.connect(self._save_labels_clicked)
        self.save_task_button.clicked.connect(self._save_task_clicked)
        self.load_task_button.clicked.connect(self._load_task_clicked)
        session.events.active_changed.connect(
            lambda _: self.save_task_button.setEnabled(session.active_task() is not None)
        )
        self.save_task_button.setEnabled(False)

    def _save_labels_clicked(self) -> None:
        image = self.session.image
        stem = image.layer.name if image is not None else "labels"
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save labels",
            f"{stem}{LABELS_SUFFIXES[0]}",
            "Label TIFF (*.labels.tif *.tif *.tiff)",
        )
        if path:
            self.save_labels(path)

    def save_labels(self, path: str | Path) -> Path | None:
        """Write the current image's labels (smallest integer type, axes, pixel size)."""
        try:
            out = self.session.save_labels(path)
        except (ValueError, OSError) as exc:
            self.report("error", f"Could not save the labels: {exc}")
            return None
        self.report("status", f"Saved labels to {out}.")
        return out

    def _save_task_clicked(self) -> None:
        entry = self.session.active_task()
        if entry is None:
            return
        path, _ = QFileDialog.getSaveFileName(
            self, "Save task", f"{entry.name}{TASK_SUFFIX}", f"Revolver task (*{TASK_SUFFIX})"
        )
        if path:
            self.save_task(path)

    def save_task(self, path: str | Path) -> Path | None:
        """Write the active task (guided first if its points changed)."""
        entry = self.session.active_task()
        try:
            if entry is None:
                raise ValueError("there is no task to save")
            for problem in self.session.guide_stale():
                self.report("warning", problem)
            out = self.session.save_task(entry, path)
        except (ValueError, OSError) as exc:
            self.report("error", f"Could not save the task: {exc}")
            return None
        self.report("status", f"Saved task {entry.name!r} to {out}.")
        return out

    def _load_task_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load task", "", "Revolver task (*.json)")
        if path:
            self.load_task(path)

    def load_task(self, path: str | Path) -> TaskEntry | None:
        """Add a saved task on the current image; it keeps its reading (invert, scale)."""
        try:
            entry = self.session.load_task(path)
        except (ValueError, OSError) as exc:
            self.report("error", f"Could not load the task: {exc}")
            return None
        image = self.session.image
        if image is not None and entry.spec.invert != image.spec.invert:
            how = "inverted" if entry.spec.invert else "as recorded"
            self.report(
                "info",
                f"Task {entry.name!r} was guided on "
                f"{'inverted' if entry.spec.invert else 'non-inverted'} intensities: it reads "
                f"images {how}, whatever this image's own setting.",
            )
        if image is not None and entry.spec.scale != image.spec.scale:
            self.report(
                "info",
                f"Task {entry.name!r} was guided on slices resized by {entry.spec.scale:g}: it "
                f"reads images at that scale, whatever this image's own ({image.spec.scale:g}).",
            )
        return entry
