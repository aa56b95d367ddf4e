"""Fixtures for the plugin tests: a real viewer (Xvfb on CI), the widget docked from the
Plugins menu path, as users get it (napari hands it a proxy of the viewer)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the plugin tests need napari (pip install .[dev])")

WAIT_MS = 60_000


@pytest.fixture(autouse=True)
def napari_settings(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """napari's settings for this test, saved in its own folder, never in the user's file.

    ``make_napari_viewer`` resets napari's settings and the widget records a reader
    preference; napari saves its settings on every change, to ``NAPARI_CONFIG`` or the user's
    settings file unless told otherwise. The previous settings object is put back afterwards.
    """
    from napari import settings

    monkeypatch.setattr(settings, "_SETTINGS", None)
    return settings.get_settings(tmp_path / "napari-settings" / "settings.yaml")


@pytest.fixture
def notes() -> Any:
    """Every napari notification shown during the test, as (severity, message)."""
    from napari.utils.notifications import notification_manager

    seen: list[tuple[str, str]] = []

    def record(notification: Any) -> None:
        seen.append((str(notification.severity).lower(), str(notification.message)))

    notification_manager.notification_ready.connect(record)
    yield seen
    notification_manager.notification_ready.disconnect(record)


@pytest.fixture
def viewer(make_napari_viewer: Any) -> Any:
    return make_napari_viewer()


@pytest.fixture
def sample(viewer: Any) -> dict[str, Any]:
    """The sample with clicks, opened through the manifest."""
    layers = viewer.open_sample("napari-revolver", "nuclei_points")
    by_type = {type(layer).__name__: layer for layer in layers}
    return {"image": by_type["Image"], "truth": by_type["Labels"], "points": by_type["Points"]}


def dock(viewer: Any) -> Any:
    """The Revolver widget, docked from the Plugins menu path."""
    _, w = viewer.window.add_plugin_dock_widget("napari-revolver", "Revolver")
    return w


@pytest.fixture
def widget(viewer: Any, sample: dict[str, Any], notes: list[tuple[str, str]]) -> Any:
    """The Revolver dock widget on the sample image (its clicks are task ``nuclei``)."""
    w = dock(viewer)
    w.image_box.image_combo.setCurrentText(sample["image"].name)
    return w


def wait_idle(qtbot: Any, widget: Any) -> None:
    qtbot.waitUntil(
        lambda: widget.session.run is None and not widget._update_timer.isActive(),
        timeout=WAIT_MS,
    )


def click_points(widget: Any, points: np.ndarray, labels: np.ndarray, name: str) -> Any:
    """Add clicks to a new task's Points layer, as a user would."""
    from napari_revolver._napari import layers as L

    entry = widget.add_task(name)
    for p, lab in zip(points, labels, strict=True):
        L.set_polarity(entry.points, L.POSITIVE if lab else L.NEGATIVE)
        entry.points.add(np.asarray(p)[None])
    return entry


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float((a & b).sum() / max(1, (a | b).sum()))


def errors(notes: list[tuple[str, str]]) -> list[str]:
    return [m for k, m in notes if k == "error"]
