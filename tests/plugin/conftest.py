"""Fixtures for the plugin tests: a real viewer (Xvfb on CI), the widget opened via its manifest."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

napari = pytest.importorskip("napari", reason="the plugin tests need napari (pip install .[dev])")


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every notification the widget shows, as (kind, message)."""
    from napari_revolver._napari import widget as widget_module

    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(widget_module, "_notify", lambda kind, msg: seen.append((kind, msg)))
    return seen


@pytest.fixture
def viewer(make_napari_viewer: Any) -> Any:
    return make_napari_viewer()


@pytest.fixture
def sample(viewer: Any) -> dict[str, Any]:
    """The sample with clicks, opened through the manifest."""
    layers = viewer.open_sample("napari-revolver", "nuclei_points")
    by_type = {type(layer).__name__: layer for layer in layers}
    return {"image": by_type["Image"], "truth": by_type["Labels"], "points": by_type["Points"]}


@pytest.fixture
def widget(viewer: Any, sample: dict[str, Any], notes: list[tuple[str, str]]) -> Any:
    """The Revolver dock widget, opened through the manifest, on the sample image."""
    _, w = viewer.window.add_plugin_dock_widget("napari-revolver", "Revolver")
    w.image_combo.setCurrentText(sample["image"].name)
    return w


def click_points(widget: Any, points: np.ndarray, labels: np.ndarray) -> Any:
    """Add the sample clicks to a new task's Points layer, as a user would."""
    from napari_revolver._napari import layers as L

    entry = widget.add_task("nuclei")
    for p, lab in zip(points, labels, strict=True):
        L.set_polarity(entry.points, L.POSITIVE if lab else L.NEGATIVE)
        entry.points.add(np.asarray(p)[None])
    return entry


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return float((a & b).sum() / max(1, (a | b).sum()))
