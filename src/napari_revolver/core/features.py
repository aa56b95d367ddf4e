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
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
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
    "StoreLocked",
    "data_fingerprint",
    "fingerprint_planes",
]

# 2: crc32c-checksummed chunks, NaN fill, a lock file and a generation token.
STORE_FORMAT_VERSION = 2

# The lock file inside a store (never removed; see _StoreLock).
LOCK_NAME = ".revolver-lock"


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
        """Return the signature as JSON-friendly values (``slice_shape`` as a list)."""
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


class StoreLocked(RuntimeError):
    """Another process has held a feature store's lock for longer than the time allowed."""


class _StoreLock:
    """Advisory lock on a feature store, shared by readers and exclusive to a writer.

    The lock is ``fcntl.flock`` on a file inside the store that is never removed (removing it
    would let two processes lock two different files). It is re-entrant within one
    :class:`FeatureStore`; threads of one process are serialised by a ``threading.RLock``,
    since ``flock`` does not tell them apart. Where ``fcntl`` does not exist (Windows) only
    the threads of one process are serialised.
    """

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = float(timeout)
        self._thread_lock = threading.RLock()
        self._fh: Any = None
        self._depth = 0
        self._exclusive = False

    @contextmanager
    def hold(self, exclusive: bool) -> Iterator[None]:
        """Hold the lock (upgraded to exclusive if asked) for the ``with`` block."""
        with self._thread_lock:
            outer = self._depth > 0
            upgraded = exclusive and outer and not self._exclusive
            if not outer or upgraded:
                self._acquire(exclusive)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if not outer:
                    self._release()
                elif upgraded:
                    self._acquire(False)  # back to the outer block's shared lock

    def _acquire(self, exclusive: bool) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            self._exclusive = exclusive
            return
        if self._fh is None:
            self._fh = open(self.path, "a+b")  # kept open for the lock's life
        flag = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fh.fileno(), flag | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLocked(
                        f"feature store {self.path.parent} is locked by {self.holder()} for "
                        f"more than {self.timeout:g} s; wait for it to finish, or use another "
                        "store"
                    ) from None
                time.sleep(0.02)
        self._exclusive = exclusive
        if exclusive:
            with suppress(OSError):
                self._fh.seek(0)
                self._fh.truncate()
                self._fh.write(
                    f"{os.getpid()} {socket.gethostname()} {' '.join(sys.argv)}".encode()
                )
                self._fh.flush()

    def _release(self) -> None:
        self._exclusive = False
        if self._fh is None:
            return
        import fcntl

        fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)

    def holder(self) -> str:
        """Describe the process that last took the lock exclusively."""
        try:
            text = self.path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        pid, _, rest = text.partition(" ")
        host, _, command = rest.partition(" ")
        if not pid.isdigit():
            return "another process"
        return f"process {pid} on {host} ({command})" if command else f"process {pid} on {host}"

    def close(self) -> None:
        """Close the lock file (the lock must not be held)."""
        with self._thread_lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class FeatureStore:
    """Features of every slice of one volume in a zarr group, one chunk per slice.

    Layout: arrays ``coarse (N, C, h, w)`` and ``fine (N, Cf, 2h, 2w)`` in float16, ``done (N,)``
    bool, and the signature in the group attributes. Slices are written as they are computed,
    so an interrupted precompute resumes where it stopped.

    Parameters
    ----------
    path : str or Path
        The store's folder, created if missing (with its parents).
    signature : FeatureSignature
        What the features depend on; a store holding other features is not reused.
    n_slices : int
        Number of slices ``N`` of the volume.
    coarse_shape : tuple of int
        ``(C, h, w)`` of one slice's coarse features.
    fine_shape : tuple of int
        ``(Cf, 2h, 2w)`` of one slice's fine features.
    on_mismatch : {"recompute", "raise"}
        What to do with a store of other data, another model, an older format or an unreadable
        one: empty it and recompute, or raise :class:`SignatureMismatch`.
    lock_timeout : float
        Seconds to wait for another process's lock before raising :class:`StoreLocked`.

    Raises
    ------
    SignatureMismatch
        If ``path`` exists and is not a feature store, or (with ``on_mismatch="raise"``) holds
        other features.
    StoreLocked
        If another process holds the store's lock for longer than ``lock_timeout``.

    Notes
    -----
    The store heals: chunks carry a crc32c checksum, and a chunk that cannot be read
    (checksum mismatch, failed decompression, truncated or missing file) makes :meth:`read`
    clear that slice's ``done`` flag, log a warning and return ``None``, so the slice is
    encoded again and rewritten.

    Several processes may fill one store at once: every write holds an exclusive lock
    (``fcntl.flock`` on a file in the store), every read a shared one, and a slice is marked
    done only after its chunks are written. Each slice may be computed more than once, never
    stored half-written or lost. A process whose store is emptied by another for other
    features stops using it, with a warning, and keeps its features in memory.
    """

    def __init__(
        self,
        path: str | Path,
        signature: FeatureSignature,
        n_slices: int,
        coarse_shape: tuple[int, int, int],
        fine_shape: tuple[int, int, int],
        on_mismatch: Literal["recompute", "raise"] = "recompute",
        *,
        lock_timeout: float = 120.0,
    ) -> None:
        self.path = Path(path)
        self.signature = signature
        self.n_slices = int(n_slices)
        self.coarse_shape = tuple(int(s) for s in coarse_shape)
        self.fine_shape = tuple(int(s) for s in fine_shape)
        self._check_is_store()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = _StoreLock(self.path / LOCK_NAME, lock_timeout)
        self._detached = False
        with self._lock.hold(exclusive=True):
            self._remove_partial_chunks()
            problems = self._problems()
            if problems:
                if on_mismatch == "raise":
                    raise SignatureMismatch(
                        f"feature store {self.path} does not match this volume/model: "
                        + "; ".join(problems)
                    )
                logger.warning(
                    "feature store %s is stale (%s); recomputing", self.path, "; ".join(problems)
                )
                self._create()

    # ------------------------------------------------------------------------ opening
    def _check_is_store(self) -> None:
        """Refuse a path that holds something other than a feature store."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise SignatureMismatch(f"{p} exists and is not a feature store (it is a file)")
        if p.is_dir():
            names = {c.name for c in p.iterdir()}
            if names and not names & {"zarr.json", LOCK_NAME}:
                raise SignatureMismatch(
                    f"{p} exists and is not a feature store (no zarr.json; it holds "
                    f"{', '.join(sorted(names)[:3])}{', ...' if len(names) > 3 else ''})"
                )

    def _problems(self) -> list[str]:
        """Open an existing store; list how it differs from this one (``[]``: reuse it)."""
        import zarr

        if not (self.path / "zarr.json").exists():
            self._create()
            return []
        try:
            group = zarr.open_group(str(self.path), mode="r+")
            stored = dict(group.attrs)
        except Exception as exc:  # unreadable metadata: ours (the lock file is there) but broken
            return [f"unreadable store metadata ({exc})"]
        problems = self.signature.differences(stored.get("signature", {}))
        if stored.get("format_version") != STORE_FORMAT_VERSION:
            problems.append(
                f"format_version: stored {stored.get('format_version')!r}, "
                f"current {STORE_FORMAT_VERSION}"
            )
        if stored.get("n_slices") != self.n_slices:
            problems.append(f"n_slices: stored {stored.get('n_slices')}, current {self.n_slices}")
        if problems:
            return problems
        try:
            arrays = {name: group[name] for name in ("coarse", "fine", "done")}
        except Exception as exc:
            return [f"unreadable array metadata ({exc})"]
        expected = {
            "coarse": (self.n_slices, *self.coarse_shape),
            "fine": (self.n_slices, *self.fine_shape),
            "done": (self.n_slices,),
        }
        for name, shape in expected.items():
            if tuple(arrays[name].shape) != shape:
                problems.append(f"{name} shape: stored {arrays[name].shape}, current {shape}")
        if not problems:
            self._adopt(group, str(stored.get("generation", "")))
        return problems

    def _create(self) -> None:
        """Empty the folder (all but the lock file) and create the arrays; hold the lock."""
        import zarr
        from zarr.codecs import Crc32cCodec, ZstdCodec

        for child in self.path.iterdir():
            if child.name == LOCK_NAME:
                continue
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        group = zarr.open_group(str(self.path), mode="a")
        # crc32c last, so the checksum covers the bytes on disk; NaN fill, so a chunk that is
        # missing reads as all-NaN and is told apart from computed features.
        codecs = [ZstdCodec(level=0), Crc32cCodec()]
        for name, shape in (("coarse", self.coarse_shape), ("fine", self.fine_shape)):
            group.create_array(
                name,
                shape=(self.n_slices, *shape),
                chunks=(1, *shape),
                dtype="float16",
                fill_value=np.nan,
                compressors=codecs,
            )
        group.create_array(
            "done",
            shape=(self.n_slices,),
            chunks=(self.n_slices,),
            dtype="bool",
            fill_value=False,
            compressors=codecs,
        )
        generation = uuid.uuid4().hex
        meta = {
            "format": "napari-revolver features",
            "format_version": STORE_FORMAT_VERSION,
            "signature": self.signature.to_dict(),
            "n_slices": self.n_slices,
            "generation": generation,
        }
        group.attrs.update(json.loads(json.dumps(meta)))
        self._adopt(group, generation)

    def _adopt(self, group: Any, generation: str) -> None:
        self._group = group
        self._coarse, self._fine, self._done = group["coarse"], group["fine"], group["done"]
        self._generation = generation
        self._meta_stat = self._stat_meta()

    def _stat_meta(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path / "zarr.json")
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _remove_partial_chunks(self) -> None:
        """Remove zarr's temporary chunk files left by a killed writer (lock held exclusively).

        Every write of this store holds the exclusive lock, so while it is held here no other
        process is writing: any temporary file is a killed process's.
        """
        for folder, _, files in os.walk(self.path):
            for name in files:
                if name.endswith(".partial"):
                    stale = Path(folder) / name
                    with suppress(OSError):
                        stale.unlink()
                        logger.warning("removed %s, left by a killed writer", stale)

    # ------------------------------------------------------------------------- access
    def _current(self) -> bool:
        """Whether the store on disk is still the one opened (lock held); detach if not."""
        if self._detached:
            return False
        stat = self._stat_meta()
        if stat is not None and stat == self._meta_stat:
            return True
        generation = None
        with suppress(Exception):
            import zarr

            generation = zarr.open_group(str(self.path), mode="r").attrs.get("generation")
        if generation == self._generation:
            self._meta_stat = stat
            return True
        self._detached = True
        logger.warning(
            "feature store %s was replaced or removed (last written by %s); features of this "
            "volume are kept in memory only from now on",
            self.path,
            self._lock.holder(),
        )
        return False

    def done(self) -> np.ndarray:
        """Return which slices are stored.

        Returns
        -------
        np.ndarray
            ``(N,)`` bool.
        """
        with self._lock.hold(exclusive=False):
            if not self._current():
                return np.zeros(self.n_slices, bool)
            return self._done_flags()

    def _done_flags(self) -> np.ndarray:
        """``(N,)`` bool, rebuilt from the chunks if the flags themselves are unreadable."""
        try:
            return np.asarray(self._done[:], dtype=bool)
        except Exception as exc:
            with self._lock.hold(exclusive=True):
                return self._rebuild_done(exc)

    def _rebuild_done(self, exc: Exception) -> np.ndarray:
        try:  # another process may have rebuilt them while this one waited for the lock
            return np.asarray(self._done[:], dtype=bool)
        except Exception:
            pass
        flags = np.array(
            [not isinstance(self._read_chunks(k), str) for k in range(self.n_slices)], bool
        )
        logger.warning(
            "feature store %s: the done flags were unreadable (%s); rebuilt from the %d of %d "
            "slices whose chunks verify",
            self.path,
            exc,
            int(flags.sum()),
            self.n_slices,
        )
        self._done[:] = flags
        return flags

    def __contains__(self, index: int) -> bool:
        """Whether slice ``index`` is marked done (its chunks are checked by :meth:`read`)."""
        return bool(self.done()[index])

    def _read_chunks(self, index: int) -> tuple[np.ndarray, np.ndarray] | str:
        """Both chunks of slice ``index``, or why they cannot be used."""
        try:
            coarse = np.asarray(self._coarse[index])
            fine = np.asarray(self._fine[index])
        except Exception as exc:  # checksum, decompression, truncated file, I/O error
            return f"{type(exc).__name__}: {exc}"
        if np.isnan(coarse).all() or np.isnan(fine).all():
            return "its chunk is missing"
        return coarse, fine

    def read(self, index: int) -> EncoderOutput | None:
        """Return the features of slice ``index``, or ``None`` if it must be computed.

        Parameters
        ----------
        index : int
            Flat slice number, ``0 <= index < N``.

        Returns
        -------
        EncoderOutput or None
            float16 CPU tensors ``(1, C, h, w)`` and ``(1, Cf, 2h, 2w)``; ``None`` if the slice
            is not stored, or its chunks are unreadable: its ``done`` flag is then cleared and
            a warning logged.
        """
        with self._lock.hold(exclusive=False):
            if not self._current() or not self._done_flags()[index]:
                return None
            got = self._read_chunks(index)
            if isinstance(got, str):
                with self._lock.hold(exclusive=True):
                    got = self._read_chunks(index)  # another process may have rewritten it
                    if isinstance(got, str):
                        logger.warning(
                            "feature store %s: slice %d is unreadable (%s); computing it again",
                            self.path,
                            index,
                            got,
                        )
                        self._done[index] = False
                        return None
        return EncoderOutput(torch.from_numpy(got[0])[None], torch.from_numpy(got[1])[None])

    def write(self, index: int, feats: EncoderOutput) -> None:
        """Store slice ``index``.

        The ``done`` flag is set last, so a crash never marks a half-written slice as done.

        Parameters
        ----------
        index : int
            Flat slice number, ``0 <= index < N``.
        feats : EncoderOutput
            Features ``(1, C, h, w)`` and ``(1, Cf, 2h, 2w)``, stored as float16.
        """
        coarse = feats.coarse[0].to(torch.float16).numpy()
        fine = feats.fine[0].to(torch.float16).numpy()
        with self._lock.hold(exclusive=True):
            if not self._current():
                return
            self._coarse[index] = coarse
            self._fine[index] = fine
            self._done[index] = True


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
        """Bytes of features held in memory."""
        return self._bytes

    def __len__(self) -> int:
        """Return the number of slices held in memory."""
        return len(self._items)

    def __contains__(self, index: int) -> bool:
        """Whether slice ``index`` is in memory or marked done in the store."""
        return index in self._items or (self.store is not None and index in self.store)

    def get(self, index: int) -> EncoderOutput | None:
        """Return the cached features of slice ``index`` (float16, CPU), or ``None``.

        Parameters
        ----------
        index : int
            Flat slice number.

        Returns
        -------
        EncoderOutput or None
            ``(1, C, h, w)`` and ``(1, Cf, 2h, 2w)`` tensors; ``None`` if the slice is neither in
            memory nor readable from the store (an unreadable stored slice is then marked to be
            computed again, with a warning).
        """
        f = self._items.get(index)
        if f is not None:
            self._items.move_to_end(index)
            self.hits += 1
            return f
        f = self.store.read(index) if self.store is not None else None
        if f is not None:
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

    def adopt(self, other: FeatureCache) -> int:
        """Take over the slices ``other`` holds in memory (features of the same data).

        They are added least recently used first, within this cache's budget, and written to
        its store if it has one. Returns the number of slices taken over.
        """
        items = list(other._items.items())
        for k, f in items:
            self.put(k, f)
        return len(items)

    def clear(self) -> None:
        """Forget everything held in memory (the store stays)."""
        self._items.clear()
        self._bytes = 0
