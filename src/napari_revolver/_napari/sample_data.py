"""Sample data for napari's File > Open Sample menu (plain LayerData tuples; no napari import)."""

from __future__ import annotations

from typing import Any

import numpy as np

LayerData = tuple[Any, dict[str, Any], str]


def nuclei_stack() -> list[LayerData]:
    """The synthetic nuclei stack alone, to annotate from scratch."""
    from ..core.synthetic import sample_stack

    image, _, _, _ = sample_stack()
    return [(image, {"name": "nuclei (synthetic)", "colormap": "gray"}, "image")]


def nuclei_stack_with_points() -> list[LayerData]:
    """The synthetic nuclei stack with clicks on its middle slice and the ground truth."""
    from ..core.synthetic import sample_stack

    image, labels, points, point_labels = sample_stack()
    colors = np.where(point_labels[:, None] == 1, [[0.0, 0.9, 0.2, 1.0]], [[0.95, 0.15, 0.15, 1.0]])
    return [
        (image, {"name": "nuclei (synthetic)", "colormap": "gray"}, "image"),
        (labels, {"name": "ground truth", "visible": False, "opacity": 0.5}, "labels"),
        (
            points,
            {
                "name": "nuclei points",
                "properties": {"label": np.where(point_labels == 1, "positive", "negative")},
                "face_color": colors,
                "size": 7,
            },
            "points",
        ),
    ]
