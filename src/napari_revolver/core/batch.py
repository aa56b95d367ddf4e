"""Segmentation of large stacks on a Dask cluster, resumable, into a zarr store.

The client splits the slices into chunks; every Dask task opens the image itself (lazily, one
slice at a time), runs the network on its chunk and writes each slice straight into the output
zarr array, then marks it done. The weights and tasks travel to each worker once
(``Client.scatter(..., broadcast=True)``) and the model is built once per worker process.
Failed tasks are retried by Dask; a run that is killed leaves a valid store whose ``done``
flags tell the next run what is left, so no slice is computed twice and none is missing.

Output layout (a zarr group): ``labels`` ``(*leading, Y, X)`` one chunk per slice, ``done``
``(n_slices,)`` bool, and attributes with a signature of the image, tasks, weights and
threshold; resuming with a different signature is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .task import Task

logger = logging.getLogger(__name__)

__all__ = ["BatchJob", "batch_signature", "open_client", "run_batch"]

BATCH_FORMAT_VERSION = 1

# Per-worker-process caches: a Dask worker runs many chunk tasks; building the model or
# re-opening the image for each would dominate small chunks. Keyed by content, so they can
# never serve stale objects.
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


@dataclass(frozen=True)
class BatchJob:
    """What to segment and where to write it.

    Attributes
    ----------
    image : str
        TIFF, zarr array or OME-Zarr image, read lazily.
    output : str
        Zarr group to create (or resume).
    tasks : tuple of Task
    weights : str or None
        Checkpoint path (default: shipped weights).
    channel : int or None
        Channel of a multichannel image.
    threshold : float
    chunk : int
        Slices per Dask task.
    batch_size : int
        Slices per network batch inside a task.
    local : bool
        Annotations also act by position on other slices (see ``RevolverPredictor.propagate``).
    invert : bool
        Dark objects on a light background: intensities reversed.
    """

    image: str
    output: str
    tasks: tuple[Task, ...]
    weights: str | None = None
    channel: int | None = None
    threshold: float = 0.5
    chunk: int = 8
    batch_size: int = 4
    local: bool = False
    invert: bool = False


def _open_volume(path: str, channel: int | None) -> tuple[Any, dict[str, Any]]:
    """The image as a lazy array plus ``set_volume`` arguments."""
    from .io import open_volume

    src = open_volume(path, channel)
    return src.data, src.volume_kwargs


def batch_signature(job: BatchJob, fingerprint: str, weights_sha: str) -> str:
    """Identity of a batch run's result: resuming is allowed only with the same signature."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "image": fingerprint,
                "weights": weights_sha,
                "threshold": job.threshold,
                "channel": job.channel,
                "local": job.local,
                "invert": job.invert,
                "format": BATCH_FORMAT_VERSION,
            },
            sort_keys=True,
        ).encode()
    )
    for t in job.tasks:
        h.update(json.dumps(t.to_dict(), sort_keys=True).encode())
    return h.hexdigest()


def _predictor_on_worker(weights: bytes, sha: str, device: str, batch_size: int) -> Any:
    from .predictor import RevolverPredictor

    with _MODELS_LOCK:
        base = _MODELS.get(sha)
        if base is None:
            import os
            import tempfile

            # safetensors loads from a path; the bytes came from the client (workers may not
            # see the client's files).
            fd, tmp = tempfile.mkstemp(suffix=".safetensors")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(weights)
                base = RevolverPredictor(tmp, device, batch_size=batch_size, cache_bytes=1 << 20)
            finally:
                os.unlink(tmp)
            _MODELS[sha] = base
    return base.clone()


def _segment_chunk(job: BatchJob, slices: list[int], weights: bytes, sha: str, device: str) -> int:
    """Dask task: segment ``slices`` (flat numbers) and write them into the output store."""
    import zarr

    predictor = _predictor_on_worker(weights, sha, device, job.batch_size)
    data, kwargs = _open_volume(job.image, job.channel)
    predictor.set_volume(data, invert=job.invert, **kwargs)
    group = zarr.open_group(job.output, mode="r+")
    labels, done = group["labels"], group["done"]
    tasks = list(job.tasks)
    count = 0
    for step in predictor.propagate(
        tasks, slices, threshold=job.threshold, cache=False, local=job.local
    ):
        labels[step.index] = step.result
        done[predictor.info.flat(step.index)] = True
        count += 1
    return count


def open_client(scheduler: str) -> tuple[Any, Any]:
    """A ``distributed.Client`` for ``local:N`` or an address, and the local cluster (or None)."""
    return _client(scheduler)


def _client(scheduler: str) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError as exc:
            raise ValueError(
                f"--scheduler local:N needs a number of workers; got {scheduler!r}"
            ) from exc
        if n < 1:
            raise ValueError(f"a local cluster needs at least 1 worker; got {n}")
        cluster = LocalCluster(
            n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
        )
        return Client(cluster), cluster
    return Client(scheduler), None


def run_batch(
    job: BatchJob,
    scheduler: str = "local:2",
    *,
    device: str = "cpu",
    overwrite: bool = False,
    retries: int = 2,
    progress: Callable[[int, int], None] | None = None,
    client: Any = None,
) -> Path:
    """Segment every slice of ``job.image`` on a Dask cluster into ``job.output``.

    Parameters
    ----------
    job : BatchJob
    scheduler : str
        ``local:N`` for a local cluster of N worker processes, or a scheduler address
        (``tcp://host:8786``).
    device : str
        Device on the workers.
    overwrite : bool
        Replace an output store that belongs to another run (a store of the same run resumes).
    retries : int
        Retries of a failed chunk before the run fails.
    progress : callable, optional
        ``progress(done, total)`` in slices.
    client : distributed.Client, optional
        An open client to use instead of ``scheduler`` (several runs on one cluster).

    Returns
    -------
    Path
        The output store, complete.

    Raises
    ------
    ValueError
        An output store of another run without ``overwrite``; slices still missing at the end.
    """
    import shutil

    import zarr
    from distributed import as_completed

    from .features import data_fingerprint
    from .predictor import RevolverPredictor
    from .weights import default_weights_path, sha256_file

    if not job.tasks:
        raise ValueError("no task given")
    if job.chunk < 1:
        raise ValueError(f"chunk must be >= 1 slice; got {job.chunk}")
    weights_path = Path(job.weights) if job.weights else default_weights_path()
    if not weights_path.exists():
        raise FileNotFoundError(f"weights file {weights_path} does not exist")
    weights = weights_path.read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    if sha != sha256_file(weights_path):  # pragma: no cover (file changed while reading)
        raise ValueError(f"{weights_path} changed while it was read")
    for t in job.tasks:
        if t.weights_sha256 != sha:
            raise ValueError(
                f"task {t.name!r} was guided with other weights "
                f"({t.weights_sha256[:12]}) than {weights_path} ({sha[:12]})"
            )

    # Geometry from a client-side predictor (reads three slices, loads the model once here
    # to validate the image with the same checks as a single-process run).
    data, kwargs = _open_volume(job.image, job.channel)
    probe = RevolverPredictor(weights_path, "cpu", cache_bytes=1 << 20)
    info = probe.set_volume(data, invert=job.invert, **kwargs)
    signature = batch_signature(job, data_fingerprint(data), sha)
    out = Path(job.output)
    shape = (*info.leading_shape, *info.slice_shape)
    dtype = np.uint8 if max(t.label_value for t in job.tasks) < 256 else np.uint16
    if out.exists():
        try:
            stored = dict(zarr.open_group(str(out), mode="r").attrs)
        except Exception:
            stored = {}
        if stored.get("signature") != signature:
            if not overwrite:
                raise ValueError(
                    f"{out} exists and holds another run's output; pass overwrite "
                    "to replace it (a store of the same run resumes)"
                )
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not out.exists():
        group = zarr.open_group(str(out), mode="w")
        group.create_array(
            "labels",
            shape=shape,
            chunks=(1,) * (len(shape) - 2) + shape[-2:],
            dtype=dtype,
            fill_value=0,
        )
        group.create_array(
            "done", shape=(info.n_slices,), chunks=(1,), dtype=bool, fill_value=False
        )
        group.attrs.update(
            {
                "format": "napari-revolver batch",
                "format_version": BATCH_FORMAT_VERSION,
                "signature": signature,
                "image": str(job.image),
                "tasks": [t.name for t in job.tasks],
                "label_values": [t.label_value for t in job.tasks],
            }
        )
    group = zarr.open_group(str(out), mode="r+")
    done = np.asarray(group["done"][:])
    todo = [int(k) for k in np.flatnonzero(~done)]
    total = info.n_slices
    finished = total - len(todo)
    if progress:
        progress(finished, total)
    if todo:
        own = client is None
        client, cluster = _client(scheduler) if own else (client, None)
        try:
            [w_future] = client.scatter([weights], broadcast=True)
            job_future = client.scatter(job, broadcast=True)
            chunks = [todo[i : i + job.chunk] for i in range(0, len(todo), job.chunk)]
            futures = [
                client.submit(
                    _segment_chunk,
                    job_future,
                    c,
                    w_future,
                    sha,
                    device,
                    retries=retries,
                    pure=False,
                )
                for c in chunks
            ]
            for fut in as_completed(futures):
                finished += fut.result()
                if progress:
                    progress(finished, total)
        finally:
            if own:
                client.close()
                if cluster is not None:
                    cluster.close()
    missing = int((~np.asarray(group["done"][:])).sum())
    if missing:
        raise ValueError(f"{missing} slice(s) are still missing in {out}; run again to resume")
    return out
