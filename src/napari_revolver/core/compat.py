"""Whether a task applies to a predictor's weights and to the way its volume is read."""

from __future__ import annotations

from collections.abc import Iterable

from .task import Task

__all__ = ["TaskMismatch", "check_tasks"]


class TaskMismatch(ValueError):
    """A task was guided with other weights, or on intensities read another way.

    Attributes
    ----------
    task : str
        The task's name.
    field : {"weights", "invert", "scale"}
        What differs.
    guided, current : object
        The task's value and the predictor's.
    """

    def __init__(self, message: str, task: str, field: str, guided: object, current: object):
        super().__init__(message)
        self.task, self.field, self.guided, self.current = task, field, guided, current


def check_tasks(
    tasks: Iterable[Task],
    model_key: str | None,
    weights_sha256: str,
    invert: bool | None = None,
    scale: float | None = None,
) -> None:
    """Refuse tasks that do not apply to these weights (and, if given, this way of reading).

    Parameters
    ----------
    tasks : iterable of Task
    model_key : str or None
        Architecture of the weights in use; ``None`` compares the weights' sha256 only.
    weights_sha256 : str
        Their sha256.
    invert : bool, optional
        Whether the volume's intensities are reversed; ``None`` skips that check.
    scale : float, optional
        The factor the volume's slices are resized by; ``None`` skips that check.

    Raises
    ------
    TaskMismatch
        For the first task that does not apply, naming what to change.
    """
    for t in tasks:
        key = t.model_key if model_key is None else model_key
        if (t.model_key, t.weights_sha256) != (key, weights_sha256):
            raise TaskMismatch(
                f"task {t.name!r} was guided with model {t.model_key} (weights "
                f"{t.weights_sha256[:12]}), these are {key} weights "
                f"{weights_sha256[:12]}; guide it again with these weights",
                t.name,
                "weights",
                (t.model_key, t.weights_sha256),
                (model_key, weights_sha256),
            )
        if invert is not None and t.invert != invert:
            how = "reversed" if t.invert else "unchanged"
            this = "reversed" if invert else "unchanged"
            raise TaskMismatch(
                f"task {t.name!r} was guided on intensities {how} (invert={t.invert}), this "
                f"volume is read with intensities {this} (invert={invert}); open the volume "
                f"with set_volume(..., invert={t.invert})",
                t.name,
                "invert",
                t.invert,
                invert,
            )
        if scale is not None and t.scale != scale:
            raise TaskMismatch(
                f"task {t.name!r} was guided on slices resized by {t.scale:g} (scale), this "
                f"volume is read at scale {scale:g}; open the volume with "
                f"set_volume(..., scale={t.scale:g})",
                t.name,
                "scale",
                t.scale,
                scale,
            )
