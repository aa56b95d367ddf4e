"""Label images: their dtype, task labels from probabilities, and instance ids across slices."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["label_dtype", "labels_from_probabilities", "offset_instances"]

_UNSIGNED = (np.uint8, np.uint16, np.uint32, np.uint64)


def label_dtype(max_value: int) -> np.dtype:
    """Return the smallest unsigned integer dtype that holds labels up to ``max_value``.

    Parameters
    ----------
    max_value : int
        The largest label (non-negative).

    Returns
    -------
    np.dtype
        uint8, uint16, uint32 or uint64.

    Raises
    ------
    ValueError
        A negative value, or one beyond uint64.
    """
    top = int(max_value)
    if top < 0:
        raise ValueError(f"labels must be non-negative; got a maximum of {top}")
    for dtype in _UNSIGNED:
        if top <= int(np.iinfo(dtype).max):
            return np.dtype(dtype)
    raise ValueError(f"maximum label {top} exceeds the uint64 maximum {np.iinfo(np.uint64).max}")


def labels_from_probabilities(
    probs: np.ndarray, values: Sequence[int], threshold: float = 0.5
) -> np.ndarray:
    """Label image from per-task probabilities: the most probable task above ``threshold`` wins.

    Parameters
    ----------
    probs : np.ndarray
        ``(T, H, W)`` float in [0, 1].
    values : sequence of int
        Label value of each task.
    threshold : float
        Minimum probability for a pixel to be labelled.

    Returns
    -------
    np.ndarray
        ``(H, W)`` of the smallest unsigned dtype holding ``max(values)``.
    """
    if probs.ndim != 3 or probs.shape[0] != len(values):
        raise ValueError(
            f"expected probabilities (T, H, W) with T == {len(values)}; got {probs.shape}"
        )
    dtype = label_dtype(max(values))
    if len(values) == 1:  # one task (every click of a single-task session): no argmax
        out = (probs[0] > threshold).astype(dtype)
        return out if values[0] == 1 else np.multiply(out, values[0], out=out)
    lut = np.asarray(values, dtype)
    out = lut[probs.argmax(axis=0)]
    out[probs.max(axis=0) <= threshold] = 0
    return out


def offset_instances(instances: np.ndarray, next_id: int) -> tuple[np.ndarray, int]:
    """Renumber one slice's instance ids to follow those already used on other slices.

    Parameters
    ----------
    instances : np.ndarray
        ``(H, W)`` ids ``1..n`` (0 background).
    next_id : int
        The first id not used yet (1 for the first slice).

    Returns
    -------
    ids : np.ndarray
        ``(H, W)`` uint32: ``instances + next_id - 1`` on objects, 0 elsewhere.
    next_id : int
        The first id still free afterwards.
    """
    if next_id < 1:
        raise ValueError(f"next_id must be >= 1; got {next_id}")
    inst = np.asarray(instances)
    n = int(inst.max(initial=0))
    if next_id - 1 + n > np.iinfo(np.uint32).max:
        raise ValueError(f"instance ids would exceed {np.iinfo(np.uint32).max}")
    out = np.where(inst > 0, inst.astype(np.uint32) + np.uint32(next_id - 1), np.uint32(0))
    return out.astype(np.uint32, copy=False), next_id + n
