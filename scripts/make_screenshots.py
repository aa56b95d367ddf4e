"""Screenshots of the plugin at work for docs/usage-napari.md (run under a display).

xvfb-run -a -s "-screen 0 1500x950x24" python scripts/make_screenshots.py [--out docs/images]

The widget is docked from the Plugins menu path and the sample with clicks is opened, as a new
user does; its nine clicks are the ready task ``nuclei``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np


def pump(app: Any, seconds: float = 0.3) -> None:
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def idle(app: Any, widget: Any) -> None:
    for _ in range(3000):
        pump(app, 0.02)
        if widget.session.run is None and not widget._update_timer.isActive():
            break
    pump(app, 0.5)


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
    viewer.open_sample("napari-revolver", "nuclei_points")
    _, widget = viewer.window.add_plugin_dock_widget("napari-revolver", "Revolver")
    viewer.dims.current_step = (12, 0, 0)
    pump(app, 1)
    viewer.reset_view()
    session = widget.session
    [nuclei] = session.tasks

    # 1. The sample's clicks on one slice as a task, live update of that slice.
    widget.update_now()
    idle(app, widget)
    viewer.screenshot(str(args.out / "01-clicks-live-update.png"), canvas_only=False)

    # 2. Propagation under way: the progress bar with the slice count and the time left.
    shots: list[int] = []

    def midway(run: Any) -> None:
        if run.kind == "propagate" and run.done >= run.total // 2 and not shots:
            shots.append(run.done)
            widget.propagate_box._last_progress = 0.0
            widget.propagate_box._on_progress(run)
            pump(app, 0.05)
            viewer.screenshot(str(args.out / "02-propagating.png"), canvas_only=False)

    session.events.run_progressed.connect(midway)
    widget.propagate()
    idle(app, widget)
    session.events.run_progressed.disconnect(midway)

    # 3. A slice corrected by hand: painted slices are marked on the strip and kept.
    viewer.dims.current_step = (4, 0, 0)
    pump(app, 0.5)
    labels = session.image.labels
    labels.brush_size = 12
    for y, x in ((60, 60), (66, 64), (72, 68), (78, 72)):
        labels.paint((4, y, x), nuclei.label_value, refresh=True)
    viewer.layers.selection.active = labels
    pump(app, 0.5)
    viewer.screenshot(str(args.out / "03-painted-slice-4.png"), canvas_only=False)

    # 4. A second task next to the first: the background, from the sample's background
    #    clicks (positives here) and two nuclei clicks (negatives).
    viewer.dims.current_step = (12, 0, 0)
    pump(app, 0.5)
    points = nuclei.points.data
    polarity = L.point_labels(nuclei.points)
    background = widget.add_task("background")
    for p in points[polarity == 0][:3]:
        background.points.add(np.asarray(p)[None])
        pump(app, 0.05)
    L.set_polarity(background.points, L.NEGATIVE)
    for p in points[polarity == 1][:2]:
        background.points.add(np.asarray(p)[None])
        pump(app, 0.05)
    L.set_polarity(background.points, L.POSITIVE)
    session.set_active(1)
    idle(app, widget)
    pump(app, 0.5)
    viewer.screenshot(str(args.out / "04-two-tasks.png"), canvas_only=False)

    # 5. An object: one click on the largest nucleus of slice 12, followed through z with
    #    one id, beside the class task.
    widget.tasks_box.delete_task()  # the background task
    from scipy import ndimage

    truth = np.asarray(viewer.layers["ground truth"].data)
    flat, n = ndimage.label(truth[12] > 0)
    sizes = ndimage.sum(np.ones_like(flat), flat, index=range(1, n + 1))
    depth = ndimage.distance_transform_edt(flat == 1 + int(np.argmax(sizes)))
    yx = np.unravel_index(np.argmax(depth), depth.shape)
    cell = widget.add_object()
    cell.points.add(np.array([[12, *yx]]))
    idle(app, widget)
    widget.propagate()
    idle(app, widget)
    viewer.dims.current_step = (13, 0, 0)
    pump(app, 0.5)
    viewer.screenshot(str(args.out / "05-object.png"), canvas_only=False)

    # 6. The same at scale 0.5: the network sees slices of 128 x 128, the labels stay in the
    #    image's 256 x 256 pixels, and the task list says so.
    widget.image_box.scale_spin.setValue(0.5)
    idle(app, widget)
    widget.propagate()
    idle(app, widget)
    pump(app, 0.5)
    viewer.screenshot(str(args.out / "06-scale.png"), canvas_only=False)
    viewer.close()
    print(f"screenshots written to {args.out}")


if __name__ == "__main__":
    main()
