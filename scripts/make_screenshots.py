"""Screenshots of the plugin at work for docs/usage-napari.md (run under a display).

xvfb-run -a -s "-screen 0 1500x950x24" python scripts/make_screenshots.py [--out docs/images]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("docs/images"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_revolver._napari import layers as L

    viewer = napari.Viewer(title="napari-revolver")
    viewer.window._qt_window.resize(1500, 950)
    app = QApplication.instance()

    def pump(seconds: float = 0.3) -> None:
        end = time.time() + seconds
        while time.time() < end:
            app.processEvents()
            time.sleep(0.01)

    def idle(widget: object) -> None:
        for _ in range(3000):
            pump(0.02)
            busy = widget._worker or widget._feature_worker or widget._update_timer.isActive()  # type: ignore[attr-defined]
            if not busy:
                break
        pump(0.5)

    layers = viewer.open_sample("napari-revolver", "nuclei_points")
    image = next(layer for layer in layers if layer.name.startswith("nuclei ("))
    clicks = next(layer for layer in layers if layer.name == "nuclei points")
    _, widget = viewer.window.add_plugin_dock_widget("napari-revolver", "Revolver")
    widget.image_combo.setCurrentText(image.name)
    viewer.dims.current_step = (12, 0, 0)
    pump(1)
    viewer.window._qt_viewer.canvas.view.camera.zoom = 1.0
    viewer.reset_view()
    clicks.visible = False

    # 1. Clicks on one slice, live update of that slice.
    entry = widget.add_task("nuclei")
    labels = L.point_labels(clicks)
    for p, lab in zip(clicks.data, labels, strict=True):
        L.set_polarity(entry.points, L.POSITIVE if lab else L.NEGATIVE)
        entry.points.add(np.asarray(p)[None])
        pump(0.05)
    L.set_polarity(entry.points, L.POSITIVE)
    widget._show_polarity(L.POSITIVE)
    idle(widget)
    viewer.screenshot(str(args.out / "01-clicks-live-update.png"), canvas_only=False)

    # 2. Propagated through the stack: another slice.
    widget.propagate()
    idle(widget)
    viewer.dims.current_step = (4, 0, 0)
    pump(1)
    viewer.screenshot(str(args.out / "02-propagated-slice-4.png"), canvas_only=False)

    # 3. A second task next to the first: the background, from the sample's background clicks
    #    (positives here) and two nuclei clicks (negatives). Each pixel takes the likelier task.
    viewer.dims.current_step = (12, 0, 0)
    pump(0.5)
    background = widget.add_task("background")
    for p in clicks.data[labels == 0][:3]:
        background.points.add(np.asarray(p)[None])
        pump(0.05)
    L.set_polarity(background.points, L.NEGATIVE)
    for p in clicks.data[labels == 1][:2]:
        background.points.add(np.asarray(p)[None])
        pump(0.05)
    L.set_polarity(background.points, L.POSITIVE)
    widget._show_polarity(L.POSITIVE)
    idle(widget)
    viewer.screenshot(str(args.out / "03-two-tasks.png"), canvas_only=False)
    viewer.close()
    print(f"screenshots written to {args.out}")


if __name__ == "__main__":
    main()
