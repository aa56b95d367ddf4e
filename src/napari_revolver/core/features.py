"""Per-slice feature cache: memory LRU bounded in bytes, plus an optional on-disk zarr store.

Encoder features do not depend on annotations, so each slice is encoded once and reused by
every click and every task. Entries are keyed by a :class:`FeatureSignature`; a store whose
signature differs from the current one is recomputed (``on_mismatch="recompute"``) or refused
(``"raise"``), never silently reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .. import __version__
from .model.encoder import EncoderOutput

logger = logging.getLogger(__name__)

__all__ = [
    "FeatureCache",
    "FeatureSignature",
    "FeatureStore",
    "SignatureMismatch",
    "data_fingerprint",
    "fingerprint_planes",
]

STORE_FORMAT_VERSION = 1


class SignatureMismatch(ValueError):
    """An on-disk feature store belongs to other data, another model or other preprocessing."""


def data_fingerprint(volume: Any, n_samples: int = 3, *, rgb: bool = False) -> str:
    """Identify a volume cheaply: shape, dtype and a strided sample of a few slices.

    Hashing a whole multi-gigabyte volume on every open costs more than encoding it; a strided
    sample of the first, middle and last slices catches a different file or a changed one in
    practice, and reads only three slices of a lazy array.

    Parameters
    ----------
    volume : array-like
        ``(..., Y, X[, C])`` numpy, dask or zarr array.
    n_samples : int
        3 samples the first, middle and last slices; fewer samples only the first.
    rgb : bool
        Whether the last axis holds RGB(A) samples (so slices are ``(Y, X, C)``, not rows).

    Returns
    -------
    str
        32 hex digits.
    """
    plane_ndim = 3 if rgb else 2
    lead = tuple(volume.shape[:-plane_ndim]) if volume.ndim >= plane_ndim else ()
    n = int(np.prod(lead)) if lead else 1
    picks = sorted({0, n // 2, n - 1}) if n_samples >= 3 else [0]
    planes = [np.asarray(volume[np.unravel_index(k, lead) if lead else ()]) for k in picks]
    return fingerprint_planes(tuple(volume.shape), volume.dtype, planes)


def fingerprint_planes(shape: tuple[int, ...], dtype: Any, planes: Sequence[np.ndarray]) -> str:
    """Compute the fingerprint of :func:`data_fingerprint` from slices already read.

    Parameters
    ----------
    shape : tuple of int
        Shape of the whole volume.
    dtype : dtype
        Its dtype.
    planes : sequence of np.ndarray
        Its first, middle and last slices (the distinct ones, in that order).

    Returns
    -------
    str
        32 hex digits.
    """
    h = hashlib.sha256()
    h.update(repr((tuple(int(s) for s in shape), str(dtype))).encode())
    for plane in planes:
        h.update(np.ascontiguousarray(plane[::7, ::7]).tobytes())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class FeatureSignature:
    """Everything the cached features depend on."""

    data: str
    model_key: str
    weights_sha256: str
    preprocessing: str
    slice_shape: tuple[int, int]
    package_version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slice_shape"] = list(self.slice_shape)
        return d

    def differences(self, other: dict[str, Any]) -> list[str]:
        """Human-readable fields where ``other`` (a stored signature) differs."""
        mine = self.to_dict()
        return [
            f"{k}: stored {other.get(k)!r}, current {v!r}"
            for k, v in mine.items()
            if other.get(k) != v
        ]


class FeatureStore:
    """Features of every slice of one volume in a zarr group, one chunk per slice.

    Layout: arrays ``coarse (N, C, h, w)`` and ``fine (N, Cf, 2h, 2w)`` in float16, ``done (N,)``
    bool, and the signature in the group attributes. Slices are written as they are computed,
    so an interrupted precompute resumes where it stopped.
    """

    def __init__(
        self,
        path: str | Path,
        signature: FeatureSignature,
        n_slices: int,
        coarse_shape: tuple[int, int, int],
        fine_shape: tuple[int, int, int],
        on_mismatch: Literal["recompute", "raise"] = "recompute",
    ) -> None:
        import zarr

        self.path = Path(path)
        self.signature = signature
        meta = {
            "format": "napari-revolver features",
            "format_version": STORE_FORMAT_VERSION,
            "signature": signature.to_dict(),
            "n_slices": n_slices,
        }
        if self.path.exists():
            try:
                group = zarr.open_group(str(self.path), mode="r+")
                stored = dict(group.attrs)
            except Exception as exc:  # not a zarr group at all
                raise SignatureMismatch(
                    f"{self.path} exists and is not a feature store ({exc})"
                ) from exc
            problems = signature.differences(stored.get("signature", {}))
            if stored.get("format_version") != STORE_FORMAT_VERSION:
                problems.append(
                    f"format_version: stored {stored.get('format_version')!r}, "
                    f"current {STORE_FORMAT_VERSION}"
                )
            if stored.get("n_slices") != n_slices:
                problems.append(f"n_slices: stored {stored.get('n_slices')}, current {n_slices}")
            if problems:
                if on_mismatch == "raise":
                    raise SignatureMismatch(
                        f"feature store {self.path} does not match this volume/model: "
                        + "; ".join(problems)
                    )
                logger.warning(
                    "feature store %s is stale (%s); recomputing", self.path, "; ".join(problems)
                )
                shutil.rmtree(self.path)
            else:
                self._group = group
                return
        group = zarr.open_group(str(self.path), mode="w")
        group.create_array(
            "coarse", shape=(n_slices, *coarse_shape), chunks=(1, *coarse_shape), dtype="float16"
        )
        group.create_array(
            "fine", shape=(n_slices, *fine_shape), chunks=(1, *fine_shape), dtype="float16"
        )
        group.create_array(
            "done", shape=(n_slices,), chunks=(n_slices,), dtype="bool", fill_value=False
        )
        group.attrs.update(json.loads(json.dumps(meta)))
        self._group = group

    def done(self) -> np.ndarray:
        """``(N,)`` bool: slices already stored."""
        return np.asarray(self._group["done"][:])

    def __contains__(self, index: int) -> bool:
        return bool(self._group["done"][index])

    def read(self, index: int) -> EncoderOutput:
        """Features of slice ``index`` as float16 CPU tensors ``(1, C, h, w)``."""
        return EncoderOutput(
            torch.from_numpy(np.asarray(self._group["coarse"][index]))[None],
            torch.from_numpy(np.asarray(self._group["fine"][index]))[None],
        )

    def write(self, index: int, feats: EncoderOutput) -> None:
        """Store slice ``index``.

        The ``done`` flag is set last, so a crash never marks a half-written slice as done.
        """
        self._group["coarse"][index] = feats.coarse[0].to(torch.float16).numpy()
        self._group["fine"][index] = feats.fine[0].to(torch.float16).numpy()
        self._group["done"][index] = True


class FeatureCache:
    """LRU of per-slice features in memory (float16, CPU), backed by an optional store.

    Parameters
    ----------
    max_bytes : int
        Memory budget; least recently used slices are evicted beyond it.
    store : FeatureStore, optional
        Read before computing, written after.
    """

    def __init__(self, max_bytes: int = 1 << 30, store: FeatureStore | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive; got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.store = store
        self._items: OrderedDict[int, EncoderOutput] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(f: EncoderOutput) -> int:
        return f.coarse.numel() * f.coarse.element_size() + f.fine.numel() * f.fine.element_size()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, index: int) -> bool:
        return index in self._items or (self.store is not None and index in self.store)

    def get(self, index: int) -> EncoderOutput | None:
        """Cached features of slice ``index`` (float16, CPU) or ``None``."""
        f = self._items.get(index)
        if f is not None:
            self._items.move_to_end(index)
            self.hits += 1
            return f
        if self.store is not None and index in self.store:
            f = self.store.read(index)
            self._remember(index, f)
            self.hits += 1
            return f
        self.misses += 1
        return None

    def put(self, index: int, feats: EncoderOutput) -> EncoderOutput:
        """Cache features ``(1, C, h, w)`` of slice ``index``; returns the stored float16 copy."""
        f = EncoderOutput(
            feats.coarse.detach().to("cpu", torch.float16),
            feats.fine.detach().to("cpu", torch.float16),
        )
        if self.store is not None:
            self.store.write(index, f)
        self._remember(index, f)
        return f

    def _remember(self, index: int, f: EncoderOutput) -> None:
        if index in self._items:
            self._bytes -= self._size(self._items.pop(index))
        self._items[index] = f
        self._bytes += self._size(f)
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= self._size(old)

    def clear(self) -> None:
        """Forget everything held in memory (the store stays)."""
        self._items.clear()
        self._bytes = 0
