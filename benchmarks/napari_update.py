"""Click-to-repaint latency in a real napari viewer, beside the engine's own update time.

Target: median <= 100 ms from a point added to the Labels layer repainted, for a 512x512 slice
with cached features. Also measures what a napari thread worker adds to the same update, which
is why the widget runs cached updates inline. Run under a display (``xvfb-run -a``):

    xvfb-run -a python benchmarks/napari_update.py [--weights W] [--size 512] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()

    import napari
    from napari.qt.threading import create_worker
    from qtpy.QtWidgets import QApplication

    from napari_revolver._napari import layers as L
    from napari_revolver._napari.widget import RevolverWidget
    from napari_revolver.core.synthetic import sample_stack

    image, truth, _, _ = sample_stack(seed=1, shape=(args.slices, args.size, args.size))
    viewer = napari.Viewer()
    viewer.add_image(image, name="stack")
    widget = RevolverWidget(viewer)
    if args.weights:
        widget._set_weights(args.weights)
    viewer.window.add_dock_widget(widget, name="Revolver")
    app = QApplication.instance()
    z = args.slices // 2
    viewer.dims.current_step = (z, 0, 0)
    entry = widget.add_task("nuclei")
    rng = np.random.default_rng(0)
    fg = np.argwhere(truth[z] > 0)
    bg = np.argwhere(truth[z] == 0)

    def settle(timeout: float = 30.0) -> None:
        end = time.perf_counter() + timeout
        while time.perf_counter() < end:
            app.processEvents()
            if widget._feature_worker is None and not widget._update_timer.isActive():
                return
            time.sleep(0.001)

    # Warm up: first clicks encode the slice (in a worker) and create the Labels layer.
    entry.points.add(np.array([[z, *fg[0]]]))
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[z, *bg[0]]]))
    settle()
    labels = widget.session.image.labels
    painted: list[float] = []
    original_refresh = labels.refresh

    def refresh(*a: object, **k: object) -> None:
        original_refresh(*a, **k)
        painted.append(time.perf_counter())

    labels.refresh = refresh  # type: ignore[method-assign]
    canvas = viewer.window._qt_viewer.canvas

    gui: list[float] = []
    for i in range(args.repeat):
        pol = L.POSITIVE if i % 2 == 0 else L.NEGATIVE
        L.set_polarity(entry.points, pol)
        yx = (fg if pol == L.POSITIVE else bg)[
            rng.integers(len(fg) if pol == L.POSITIVE else len(bg))
        ]
        painted.clear()
        t0 = time.perf_counter()
        entry.points.add(np.array([[z, *yx]]))
        while not painted:
            app.processEvents()
        canvas.native.update()
        app.processEvents()  # the draw of the repainted layer
        gui.append(time.perf_counter() - t0)

    predictor = widget.session.image.predictor
    pts, lab = widget.session.task_points(entry)
    engine = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        task = predictor.guide(pts, lab)
        predictor.predict_slice((z,), task)
        engine.append(time.perf_counter() - t0)

    def one_update() -> np.ndarray:
        task = predictor.guide(pts, lab)
        return predictor.predict_slice((z,), task)

    threaded = []
    for _ in range(max(5, args.repeat // 3)):
        done: list[float] = []
        t0 = time.perf_counter()
        worker = create_worker(one_update)
        worker.returned.connect(lambda _r, done=done: done.append(time.perf_counter()))
        worker.start()
        while not done:
            app.processEvents()
            time.sleep(0.0005)
        threaded.append(done[0] - t0)

    med = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    print(f"slice {args.size}x{args.size}, features cached, {args.repeat} clicks")
    print(f"click -> labels repainted in the viewer, median {med(gui):7.1f} ms  (target <= 100 ms)")
    print(f"engine update (guide + predict_slice), median {med(engine):7.1f} ms")
    print(
        f"same update in a napari thread worker, median {med(threaded):7.1f} ms "
        f"(+{med(threaded) - med(engine):.1f} ms over inline)"
    )
    viewer.close()


if __name__ == "__main__":
    main()
