"""Click-to-repaint latency in a real napari viewer, as a ratio to the engine's own update time.

The widget is docked from the Plugins menu path, as users get it. For a 512 x 512 slice with
cached features this measures, in one run:

* quiet: from a point added to the Labels layer repainted (target: median <= 50 ms on a
  quiet 2-core machine);
* busy: the same while a propagation of another image runs in a worker (target <= 100 ms);
* the engine alone (guide + predict_slice), and the same update in a thread worker.

Every figure is also printed as a ratio to the engine median of the same run, which is what
compares across machines. Run under a display (``xvfb-run -a``):

    xvfb-run -a python benchmarks/napari_update.py [--weights W] [--size 512] [--repeat 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def pump_until(app: Any, done: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.perf_counter() + timeout
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError("the viewer did not settle")
        app.processEvents()
        time.sleep(0.0005)


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """A viewer with the stack, the widget docked, a task with two warm-up clicks."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_revolver._napari import layers as L
    from napari_revolver.core.synthetic import sample_stack

    image, truth, _, _ = sample_stack(seed=1, shape=(args.slices, args.size, args.size))
    viewer = napari.Viewer()
    viewer.add_image(image, name="stack")
    _, widget = viewer.window.add_plugin_dock_widget("napari-revolver", "Revolver")
    if args.weights:
        widget.image_box.set_weights(args.weights)
    app = QApplication.instance()
    z = args.slices // 2
    viewer.dims.current_step = (z, 0, 0)
    entry = widget.add_task("nuclei")
    session = widget.session
    fg, bg = np.argwhere(truth[z] > 0), np.argwhere(truth[z] == 0)
    # Warm up: the first clicks encode the slice (in a worker) and create the Labels layer.
    entry.points.add(np.array([[z, *fg[0]]]))
    L.set_polarity(entry.points, L.NEGATIVE)
    entry.points.add(np.array([[z, *bg[0]]]))
    pump_until(app, lambda: session.run is None and session.image.labels is not None)
    return {
        "viewer": viewer, "widget": widget, "app": app, "entry": entry, "z": z, "fg": fg,
        "bg": bg,
    }  # fmt: skip


def click_times(ctx: dict[str, Any], repeat: int, seed: int) -> list[float]:
    """Seconds from each point added to the Labels layer drawn again."""
    from napari_revolver._napari import layers as L

    app, entry, z = ctx["app"], ctx["entry"], ctx["z"]
    labels = ctx["widget"].session.image.labels
    canvas = ctx["viewer"].window._qt_viewer.canvas
    painted: list[float] = []
    original = labels.refresh

    def refresh(*a: object, **k: object) -> None:
        original(*a, **k)
        painted.append(time.perf_counter())

    labels.refresh = refresh  # type: ignore[method-assign]
    rng = np.random.default_rng(seed)
    out = []
    try:
        for i in range(repeat):
            pool = ctx["fg"] if i % 2 == 0 else ctx["bg"]
            L.set_polarity(entry.points, L.POSITIVE if i % 2 == 0 else L.NEGATIVE)
            yx = pool[rng.integers(len(pool))]
            painted.clear()
            t0 = time.perf_counter()
            entry.points.add(np.array([[z, *yx]]))
            pump_until(app, lambda: bool(painted))
            canvas.native.update()
            app.processEvents()  # the draw of the repainted layer
            out.append(time.perf_counter() - t0)
    finally:
        del labels.refresh
    return out


def busy_click_times(ctx: dict[str, Any], args: argparse.Namespace) -> tuple[list[float], int]:
    """Click times while a propagation of another image runs; returns them and its slices."""
    from napari_revolver.core.synthetic import sample_stack

    widget, viewer, app = ctx["widget"], ctx["viewer"], ctx["app"]
    other, _, _, _ = sample_stack(seed=2, shape=(args.busy_slices, args.size, args.size))
    viewer.add_image(other, name="other")
    widget.image_box.image_combo.setCurrentText("stack")
    worker = widget.propagate_box.apply_to_target("other")
    if worker is None:
        raise RuntimeError("could not start the propagation")
    run = widget.session.run
    pump_until(app, lambda: run.done > 0)
    times = click_times(ctx, args.repeat, seed=1)
    overlapped = run.done
    if not run.finished:
        widget.session.cancel_run()
    pump_until(app, lambda: widget.session.run is None)
    return times, overlapped


def engine_times(ctx: dict[str, Any], repeat: int) -> tuple[list[float], list[float]]:
    """The engine update inline, and the same in a thread worker."""
    from napari.qt.threading import create_worker

    session, z, app = ctx["widget"].session, ctx["z"], ctx["app"]
    predictor = session.image.predictor
    pts, lab = session.task_points(ctx["entry"])

    def one_update() -> np.ndarray:
        task = predictor.guide(pts, lab)
        return predictor.predict_slice((z,), task)

    engine = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        one_update()
        engine.append(time.perf_counter() - t0)
    threaded = []
    for _ in range(max(5, repeat // 3)):
        done: list[float] = []
        t0 = time.perf_counter()
        worker = create_worker(one_update)
        worker.returned.connect(lambda _r, done=done: done.append(time.perf_counter()))
        worker.start()
        pump_until(app, lambda done=done: bool(done))
        threaded.append(done[0] - t0)
    return engine, threaded


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--weights", default=None)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--busy-slices", type=int, default=400, help="slices of the busy run")
    ap.add_argument("--no-busy", action="store_true", help="skip the busy measurement")
    args = ap.parse_args()

    ctx = setup(args)
    quiet = click_times(ctx, args.repeat, seed=0)
    engine, threaded = engine_times(ctx, args.repeat)
    busy, overlapped = ([], 0) if args.no_busy else busy_click_times(ctx, args)
    e = median_ms(engine)
    print(f"slice {args.size}x{args.size}, features cached, {args.repeat} clicks per figure")
    print(f"engine update (guide + predict_slice), median {e:7.1f} ms")
    print(
        f"click -> labels repainted, quiet,      median {median_ms(quiet):7.1f} ms "
        f"= {median_ms(quiet) / e:.2f} x engine (target <= 50 ms)"
    )
    if busy:
        print(
            f"click -> labels repainted, propagating, median {median_ms(busy):7.1f} ms "
            f"= {median_ms(busy) / e:.2f} x engine (target <= 100 ms; "
            f"{overlapped} slices propagated meanwhile)"
        )
    print(
        f"same update in a napari thread worker, median {median_ms(threaded):7.1f} ms "
        f"(+{median_ms(threaded) - e:.1f} ms over inline)"
    )
    ctx["viewer"].close()


if __name__ == "__main__":
    main()
