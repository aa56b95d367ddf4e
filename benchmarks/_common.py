"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

# The random-forest baseline lives in the library (napari-revolver[bench]); re-exported here.
from napari_revolver.core.evaluate import RandomForestBaseline

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


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred > 0, truth > 0
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0
