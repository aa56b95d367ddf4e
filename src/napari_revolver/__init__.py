"""napari-revolver: few-shot segmentation propagation for microscopy with guided networks.

Importing the package is cheap: torch is imported only when a model or predictor is used, and
napari/Qt only by the plugin layer (``napari_revolver._napari``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["RevolverPredictor", "Task", "VolumeSpec", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .core.predictor import RevolverPredictor
    from .core.task import Task
    from .core.volume import VolumeSpec


def __getattr__(name: str) -> Any:
    # Lazy attributes keep ``import napari_revolver`` free of torch (napari imports plugins
    # at start-up; a torch import there costs seconds).
    if name == "RevolverPredictor":
        from .core.predictor import RevolverPredictor

        return RevolverPredictor
    if name == "Task":
        from .core.task import Task

        return Task
    if name == "VolumeSpec":
        from .core.volume import VolumeSpec

        return VolumeSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
