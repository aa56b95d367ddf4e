"""npe2 reader for saved tasks and writer for label layers (no Qt)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TASK_SUFFIX = ".revolver-task.json"


def get_task_reader(path: str | list[str]) -> Callable[[str], list[Any]] | None:
    """npe2 reader contribution: a saved task becomes a Points layer with its clicks."""
    if isinstance(path, list) or not str(path).endswith(TASK_SUFFIX):
        return None
    return read_task


def read_task(path: str) -> list[tuple[Any, dict[str, Any], str]]:
    from ..core.task import load_task
    from .layers import NEGATIVE, NEGATIVE_COLOR, POSITIVE, POSITIVE_COLOR

    task = load_task(path)
    labels = np.where(task.labels == 1, POSITIVE, NEGATIVE)
    colors = np.where(
        task.labels[:, None] == 1, [list(_rgba(POSITIVE_COLOR))], [list(_rgba(NEGATIVE_COLOR))]
    )
    return [
        (
            task.points,
            {
                "name": f"{task.name} points",
                "features": {"label": labels},
                "face_color": colors,
                "metadata": {"revolver_task": str(path)},
            },
            "points",
        )
    ]


def _rgba(hex_color: str) -> tuple[float, float, float, float]:
    h = hex_color.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)) + (1.0,)  # type: ignore[return-value]


def write_labels_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """npe2 writer contribution: a Labels layer to a compressed TIFF with axes and scale."""
    from ..core.io import write_labels

    arr = np.asarray(data)
    axes = {2: "YX", 3: "ZYX", 4: "TZYX"}.get(arr.ndim)
    scale = meta.get("scale")
    out = write_labels(
        Path(path),
        arr,
        axes=axes,
        scale=tuple(float(s) for s in scale) if scale is not None and axes else None,
        overwrite=True,
    )
    return [str(out)]
