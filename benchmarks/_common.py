"""Helpers shared by the benchmark scripts (not part of the package)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


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


class RandomForestBaseline:
    """The ilastik-style pixel classifier: multiscale filter features + a random forest.

    Trained on the pixels under the clicked points (as ilastik's brush strokes), predicting
    every pixel of a slice.
    """

    def __init__(self, n_estimators: int = 100, sigma_max: float = 16.0, seed: int = 0) -> None:
        from sklearn.ensemble import RandomForestClassifier

        self.sigma_max = sigma_max
        self.forest = RandomForestClassifier(
            n_estimators=n_estimators, n_jobs=-1, random_state=seed
        )

    def features(self, image: np.ndarray) -> np.ndarray:
        from skimage.feature import multiscale_basic_features

        x = image.astype(np.float32)
        lo, hi = np.percentile(x, [1, 99.8])
        x = (x - lo) / max(hi - lo, 1e-6)
        return multiscale_basic_features(
            x,
            intensity=True,
            edges=True,
            texture=True,
            sigma_min=1,
            sigma_max=self.sigma_max,
            channel_axis=-1 if x.ndim == 3 else None,
        )

    def fit(
        self, features: list[np.ndarray], points: list[np.ndarray], labels: list[np.ndarray]
    ) -> RandomForestBaseline:
        """Fit on clicked pixels.

        ``features[i]`` ``(H, W, F)``, ``points[i]`` ``(N, 2)`` (y, x), ``labels[i]`` ``(N,)``.
        """
        xs, ys = [], []
        for f, p, lab in zip(features, points, labels, strict=True):
            yx = np.rint(p).astype(int)
            xs.append(f[yx[:, 0], yx[:, 1]])
            ys.append(lab)
        self.forest.fit(np.concatenate(xs), np.concatenate(ys))
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        h, w, nf = features.shape
        proba = self.forest.predict_proba(features.reshape(-1, nf))
        cls = list(self.forest.classes_)
        p = proba[:, cls.index(1)] if 1 in cls else np.zeros(len(proba))
        return (p > 0.5).reshape(h, w)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    pred, truth = pred > 0, truth > 0
    union = (pred | truth).sum()
    return float((pred & truth).sum() / union) if union else 1.0
