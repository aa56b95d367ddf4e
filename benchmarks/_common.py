"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

# The random-forest baseline lives in the library (napari-revolver[bench]), and so does the
# one IoU of the package; both are re-exported here.
from napari_revolver.core.evaluate import RandomForestBaseline
from napari_revolver.core.evaluate import foreground_iou as iou

__all__ = ["RandomForestBaseline", "iou", "median_ms", "timeit"]


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeat`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)
