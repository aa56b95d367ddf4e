"""Sample data for napari's File > Open Sample menu (plain LayerData tuples; no napari import)."""

from __future__ import annotations

from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]


def nuclei_stack() -> list[LayerData]:
    """Make the synthetic nuclei stack alone, to annotate from scratch."""
    from ..core.synthetic import sample_stack

    image, _, _, _ = sample_stack()
    return [(image, {"name": "nuclei (synthetic)", "colormap": "gray"}, "image")]


def nuclei_stack_with_points() -> list[LayerData]:
    """Make the synthetic nuclei stack, its ground truth (hidden) and a ready task of nine clicks.

    The clicks' Points layer is marked as a task, so the dock widget takes it up as task
    ``nuclei`` on the stack (docked before or after the sample is opened).
    """
    from ..core.synthetic import sample_stack
    from .session import TASK_METADATA

    image, labels, points, point_labels = sample_stack()
    name = "nuclei (synthetic)"
    return [
        (image, {"name": name, "colormap": "gray"}, "image"),
        (labels, {"name": "ground truth", "visible": False, "opacity": 0.5}, "labels"),
        (
            points,
            {
                "name": "nuclei points",
                "features": {"label": np.where(point_labels == 1, "positive", "negative")},
                "face_color": np.where(
                    point_labels[:, None] == 1, [[0.18, 0.9, 0.35, 1.0]], [[1.0, 0.23, 0.23, 1.0]]
                ),
                "size": 7,
                "metadata": {TASK_METADATA: {"name": "nuclei", "image": name}},
            },
            "points",
        ),
    ]
