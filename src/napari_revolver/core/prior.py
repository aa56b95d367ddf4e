"""Annotations as maps on the fine feature grid: the local prior and dense support masks.

The local prior tells the segmentor where a task's clicks are, beside the features.

A task's annotations always act by position on their own slice (a negative click removes what
is around it). With ``local`` they also act on every other slice of the volume they were made
on, from the nearest annotated slice(s): that follows one object through z or time. They never
act on another volume (tasks record the fingerprint of theirs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .model.guide import local_prior, point_masks
from .task import Task
from .volume import VolumeInfo

__all__ = [
    "annotated_slices",
    "dense_support",
    "label_support",
    "local_priors",
    "prior_sources",
    "task_prior",
]

Key = tuple[int, ...]


def annotated_slices(task: Task, info: VolumeInfo) -> set[Key]:
    """Leading indices of the slices of a volume that carry ``task``'s annotations.

    Parameters
    ----------
    task : Task
    info : VolumeInfo
        The volume the task is applied to.

    Returns
    -------
    set of tuple of int
        Empty when the task was guided on another volume.
    """
    if task.source != info.fingerprint:
        return set()
    n_lead = len(info.leading_shape)
    keys = {tuple(int(v) for v in k) for k, _ in task.support_masks}
    if len(task.points) and task.points.shape[1] == info.ndim:
        keys |= {tuple(r) for r in np.rint(task.points[:, :n_lead]).astype(int).tolist()}
    return keys


def prior_sources(keys: set[Key], key: Key, local: bool) -> tuple[Key, ...]:
    """Of the annotated slices ``keys``, those whose positions apply to slice ``key``.

    Parameters
    ----------
    keys : set of tuple of int
        Annotated slices (:func:`annotated_slices`).
    key : tuple of int
        The query slice.
    local : bool
        Whether annotations act on other slices than their own.

    Returns
    -------
    tuple of tuple of int
        The slice itself if annotated; with ``local``, otherwise the nearest annotated slices
        (an object drifts, so the closest annotation says most about where it is); else none.
    """
    if key in keys:
        return (key,)
    if not local or not keys:
        return ()
    here = np.asarray(key, float)
    dist = {k: float(np.linalg.norm(np.asarray(k, float) - here)) for k in keys}
    best = min(dist.values())
    return tuple(sorted(k for k, d in dist.items() if d == best))


def task_prior(
    task: Task,
    info: VolumeInfo,
    sources: tuple[Key, ...],
    grid: tuple[int, int],
    fine_stride: int,
) -> torch.Tensor:
    """Build the prior maps of ``task``'s annotations on slices ``sources``.

    Parameters
    ----------
    task : Task
    info : VolumeInfo
    sources : tuple of tuple of int
        Annotated slices whose points and support masks count.
    grid : tuple of int
        ``(h, w)`` of the fine feature grid.
    fine_stride : int
        Pixels per fine cell.

    Returns
    -------
    torch.Tensor
        ``(3, h, w)``: positive and negative footprints and the on flag.
    """
    n_lead = len(info.leading_shape)
    masks = torch.zeros(2, *grid)
    if len(task.points) and task.points.shape[1] == info.ndim:
        lead = np.rint(task.points[:, :n_lead]).astype(int)
        sel = np.array([tuple(r) in sources for r in lead.tolist()], bool)
        if task.kind == "object":
            # An object's negative clicks are competitor seeds (.objects), not a prior.
            sel &= task.labels == 1
        if sel.any():
            masks += point_masks(
                torch.from_numpy(task.points[sel, n_lead:]),
                torch.from_numpy(task.labels[sel]),
                grid,
                fine_stride,
            )
    for k, m in task.support_masks:
        if tuple(int(v) for v in k) in sources and m.shape[-2:] == grid:
            masks += torch.from_numpy(m)
    return local_prior(masks[None])[0]


def local_priors(
    tasks: Sequence[Task],
    info: VolumeInfo,
    ks: Sequence[int],
    local: bool,
    grid: tuple[int, int],
    fine_stride: int,
) -> torch.Tensor | None:
    """Local priors of every (slice, task) pair, slice-major, or ``None`` where none applies.

    Parameters
    ----------
    tasks : sequence of Task
    info : VolumeInfo
        The volume being segmented.
    ks : sequence of int
        Flat slice numbers.
    local : bool
        See :func:`prior_sources`.
    grid, fine_stride
        As for :func:`task_prior`.

    Returns
    -------
    torch.Tensor or None
        ``(S * T, 3, h, w)`` (zeros for pairs without a prior), ``None`` if no pair has one.
    """
    # Annotated slices of each task on this volume, found once per call.
    annotated = [annotated_slices(t, info) for t in tasks]
    memo: dict[tuple[int, tuple[Key, ...]], torch.Tensor] = {}
    rows: list[torch.Tensor | None] = []
    for k in ks:
        key = info.unflat(k)
        for i, t in enumerate(tasks):
            sources = prior_sources(annotated[i], key, local)
            if not sources:
                rows.append(None)
                continue
            if (i, sources) not in memo:
                memo[(i, sources)] = task_prior(t, info, sources, grid, fine_stride)
            rows.append(memo[(i, sources)])
    if all(r is None for r in rows):
        return None
    zero = torch.zeros(3, *grid)
    return torch.stack([zero if r is None else r for r in rows])


def label_support(labels: np.ndarray, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Guide masks of painted labels on the padded fine grid.

    Parameters
    ----------
    labels : np.ndarray
        ``(H, W)``: 1 foreground, 2 background, anything else not annotated.
    grid : tuple of int
        ``(h, w)`` of the fine feature grid (``h * stride >= H``).
    stride : int
        Pixels per fine cell.

    Returns
    -------
    torch.Tensor
        ``(2, h, w)``: the fraction of each cell painted foreground, and background.
    """
    h, w = grid
    full = np.zeros((2, h * stride, w * stride), np.float32)
    full[0, : labels.shape[0], : labels.shape[1]] = labels == 1
    full[1, : labels.shape[0], : labels.shape[1]] = labels == 2
    return F.avg_pool2d(torch.from_numpy(full)[None], stride)[0]


def dense_support(mask: np.ndarray, grid: tuple[int, int], stride: int) -> torch.Tensor:
    """Guide masks of a dense support mask on the padded fine grid.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)``, foreground where > 0 and background elsewhere.
    grid : tuple of int
        ``(h, w)`` of the fine feature grid (``h * stride >= H``).
    stride : int
        Pixels per fine cell.

    Returns
    -------
    torch.Tensor
        ``(2, h, w)`` foreground and background fractions; padding counts as neither.
    """
    return label_support(np.where(np.asarray(mask) > 0, 1, 2), grid, stride)
