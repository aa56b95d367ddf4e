"""Instance ids linked through z and t: overlap matching between neighbouring slices.

Class tasks with ``instances=True`` give each slice its own instances (:mod:`.instances`). The
:class:`InstanceLinker` renumbers them as slices arrive so that an object keeps its id from
one slice to the next: an instance takes the id of the instance it overlaps most on the
neighbouring slice already seen (through z first: ``(t, z - 1)``; else across t:
``(t - 1, z)``), one to one, when their IoU is at least ``min_iou``; otherwise it gets a new id.
"""

from __future__ import annotations

import numpy as np

from .volume import VolumeInfo

__all__ = ["InstanceLinker", "match_instances"]


def match_instances(
    current: np.ndarray, previous: np.ndarray, *, min_iou: float = 0.3
) -> dict[int, int]:
    """Match the instances of two neighbouring slices by overlap, one to one.

    Parameters
    ----------
    current, previous : np.ndarray
        ``(H, W)`` instance ids, 0 background.
    min_iou : float
        Pairs below this IoU are not matched.

    Returns
    -------
    dict of int to int
        ``{current id: previous id}``, greedy by decreasing IoU.
    """
    if current.shape != previous.shape:
        raise ValueError(
            f"current and previous must have one shape; got {current.shape} and {previous.shape}"
        )
    both = (current > 0) & (previous > 0)
    if not both.any():
        return {}
    a, b = current[both].astype(np.int64), previous[both].astype(np.int64)
    pairs, inter = np.unique(np.stack([a, b]), axis=1, return_counts=True)
    ca = dict(zip(*np.unique(current[current > 0], return_counts=True), strict=True))
    cb = dict(zip(*np.unique(previous[previous > 0], return_counts=True), strict=True))
    scored = []
    for (i, j), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        iou = n / (ca[i] + cb[j] - n)
        if iou >= min_iou:
            scored.append((iou, i, j))
    out: dict[int, int] = {}
    used: set[int] = set()
    for _, i, j in sorted(scored, reverse=True):
        if i not in out and j not in used:
            out[i] = j
            used.add(j)
    return out


class InstanceLinker:
    """Renumber per-slice instances so that ids persist through z and t.

    Parameters
    ----------
    info : VolumeInfo
        The volume; its leading axes are ``(Z,)``, ``(T,)`` or ``(T, Z)`` (or more).
    min_iou : float
        See :func:`match_instances`.

    Notes
    -----
    Slices may come in any order; each links to a neighbour seen before it, so the flat order
    of :meth:`RevolverPredictor.propagate` links every slice. Memory: the last slices of one
    step of the first axis (a timepoint of a ``(T, Z)`` stack).
    """

    def __init__(self, info: VolumeInfo, *, min_iou: float = 0.3) -> None:
        self.info = info
        self.min_iou = min_iou
        self.next_id = 1
        self._seen: dict[tuple[int, ...], np.ndarray] = {}

    def _neighbours(self, key: tuple[int, ...]) -> list[tuple[int, ...]]:
        out = []
        for axis in reversed(range(len(key))):
            for step in (-1, 1):
                nb = list(key)
                nb[axis] += step
                if tuple(nb) in self._seen:
                    out.append(tuple(nb))
            if out:
                break
        return out

    def link(self, key: tuple[int, ...], instances: np.ndarray) -> np.ndarray:
        """Renumber one slice's instances.

        Parameters
        ----------
        key : tuple of int
            The slice's leading-axes index.
        instances : np.ndarray
            ``(H, W)`` ids ``1..n`` of this slice alone.

        Returns
        -------
        np.ndarray
            ``(H, W)`` uint32 ids linked to the neighbouring slices.
        """
        inst = np.asarray(instances)
        lut = np.zeros(int(inst.max(initial=0)) + 1, np.uint32)
        taken: set[int] = set()
        for nb in self._neighbours(key):
            for i, j in match_instances(inst, self._seen[nb], min_iou=self.min_iou).items():
                if not lut[i] and j not in taken:
                    lut[i] = j
                    taken.add(j)
        for i in np.unique(inst[inst > 0]):
            if not lut[i]:
                lut[i] = self.next_id
                self.next_id += 1
        out = lut[inst]
        self._seen[key] = out
        self._forget(key)
        return out

    def _forget(self, key: tuple[int, ...]) -> None:
        """Drop slices no later neighbour can need (two steps back along the first axis)."""
        if not key:
            return
        old = [k for k in self._seen if k[0] < key[0] - 1]
        for k in old:
            del self._seen[k]
