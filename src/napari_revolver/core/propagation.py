"""Propagation results: one step per slice, and a slice's output from its probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .instances import mask_to_instances
from .labels import labels_from_probabilities
from .task import Task

__all__ = ["ObjectEvent", "PropagationStep", "finish_slice"]


@dataclass(frozen=True)
class ObjectEvent:
    """A followed object ended: it is not continued onto slice ``index`` (nor beyond it).

    Attributes
    ----------
    task : str
        The object task's name.
    label_value : int
        Its id in the label images.
    index : tuple of int
        The slice it did not continue onto.
    reason : str
        Why, in words (nothing probable there, an area jump, too little overlap).
    """

    task: str
    label_value: int
    index: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class PropagationStep:
    """One slice's result, yielded by :meth:`RevolverPredictor.propagate`.

    Attributes
    ----------
    index : tuple of int
        Leading-axes index of the slice.
    result : np.ndarray
        ``(H, W)`` labels (or ``(T, H, W)`` masks / probabilities, per ``output``).
    done, total : int
        Progress.
    events : tuple of ObjectEvent
        Object tasks that ended on this slice (empty for class tasks).
    """

    index: tuple[int, ...]
    result: np.ndarray
    done: int
    total: int
    events: tuple[ObjectEvent, ...] = field(default=())


def finish_slice(
    probs: np.ndarray, tasks: Sequence[Task], threshold: float, instances: bool, output: str
) -> np.ndarray:
    """Turn one slice's probabilities into the output ``propagate`` was asked for.

    Parameters
    ----------
    probs : np.ndarray
        ``(T, H, W)`` float32, one map per task.
    tasks : sequence of Task
        The T tasks (their ``label_value``).
    threshold : float
        Probability threshold.
    instances : bool
        Instance ids (connected components, touching objects split) instead of task values.
    output : {"labels", "mask", "masks", "probabilities"}
        ``labels`` ``(H, W)`` unsigned; ``mask`` ``(H, W)`` bool of the one task; ``masks``
        ``(T, H, W)`` bool; ``probabilities`` ``probs`` itself.

    Returns
    -------
    np.ndarray
    """
    if output == "probabilities":
        return probs
    if output == "masks":
        return probs > threshold
    if output == "mask" and not instances:
        return probs[0] > threshold
    labels = labels_from_probabilities(probs, [t.label_value for t in tasks], threshold)
    return mask_to_instances(labels > 0) if instances else labels
