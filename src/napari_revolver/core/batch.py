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
from typing import TYPE_CHECKING, Any

import numpy as np

from .compat import check_tasks
from .labels import label_dtype
from .task import Task
from .volume import VolumeInfo, check_and_fingerprint, describe_volume

if TYPE_CHECKING:  # pragma: no cover
    from .predictor import RevolverPredictor

logger = logging.getLogger(__name__)

__all__ = ["BatchJob", "batch_signature", "open_client", "run_batch"]

#: 2: the image fingerprint is of the volume as read (RGB samples, the chosen channel).
BATCH_FORMAT_VERSION = 2

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
    scale : float
        Factor slices are resized by before the network (``VolumeSpec.scale``).
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
    scale: float = 1.0


def batch_signature(job: BatchJob, fingerprint: str, weights_sha: str) -> str:
    """Identify a batch run's result: resuming is allowed only with the same signature.

    Parameters
    ----------
    job : BatchJob
    fingerprint : str
        Data identity of the image as read (``RevolverPredictor.fingerprint``).
    weights_sha : str
        sha256 of the weights.

    Returns
    -------
    str
        Hex sha256.
    """
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
                **({"scale": job.scale} if job.scale != 1 else {}),
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

    from .io import open_volume

    predictor = _predictor_on_worker(weights, sha, device, job.batch_size)
    src = open_volume(job.image, job.channel, invert=job.invert, scale=job.scale)
    predictor.set_volume(src.data, src.spec)
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
    """Open a ``distributed.Client`` for ``local:N`` or a scheduler address.

    Parameters
    ----------
    scheduler : str
        ``local:N`` starts a local cluster of N single-threaded worker processes; anything
        else is a scheduler address (``tcp://host:8786``).

    Returns
    -------
    client : distributed.Client
    cluster : distributed.LocalCluster or None
        The local cluster to close after the client, if one was started.

    Raises
    ------
    ValueError
        ``local:N`` without a positive number.
    """
    return _client(scheduler)


def _client(scheduler: str) -> tuple[Any, Any]:
    from distributed import Client, LocalCluster

    if scheduler.startswith("local:"):
        try:
            n = int(scheduler.split(":", 1)[1])
        except ValueError as exc:
            raise ValueError(
                f"scheduler 'local:N' needs a number of workers N; got {scheduler!r}"
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
    predictor: RevolverPredictor | None = None,
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
    predictor : RevolverPredictor, optional
        A predictor with ``job.image`` set as its volume and ``job.weights`` loaded: its
        geometry, fingerprint and weights are used as they are. Without it the image is
        opened and checked here (no model is loaded on the client).

    Returns
    -------
    Path
        The output store, complete.

    Raises
    ------
    ValueError
        An output store of another run without ``overwrite``; tasks guided with other weights;
        slices still missing at the end.
    """
    if not job.tasks:
        raise ValueError("no task given")
    if job.chunk < 1:
        raise ValueError(f"chunk must be >= 1 slice; got {job.chunk}")
    weights, sha = _weights_bytes(job, predictor)
    check_tasks(job.tasks, None, sha)
    info = predictor.info if predictor is not None else _volume_info(job)
    out = Path(job.output)
    group = _output_store(job, out, info, batch_signature(job, info.fingerprint, sha), overwrite)
    todo = [int(k) for k in np.flatnonzero(~np.asarray(group["done"][:]))]
    total = info.n_slices
    if progress:
        progress(total - len(todo), total)
    if todo:
        _run_chunks(job, todo, total, weights, sha, scheduler, device, retries, progress, client)
    missing = int((~np.asarray(group["done"][:])).sum())
    if missing:
        raise ValueError(f"{missing} slice(s) are still missing in {out}; run again to resume")
    return out


def _weights_bytes(job: BatchJob, predictor: RevolverPredictor | None) -> tuple[bytes, str]:
    """Read the checkpoint's bytes (sent to the workers) and hash them, once."""
    from .weights import default_weights_path

    if predictor is not None:
        path = Path(predictor.weights.path)
    else:
        path = Path(job.weights) if job.weights else default_weights_path()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    weights = path.read_bytes()
    sha = hashlib.sha256(weights).hexdigest()
    if predictor is not None and sha != predictor.weights.sha256:
        raise ValueError(f"{path} changed since the predictor loaded it")
    return weights, sha


def _volume_info(job: BatchJob) -> VolumeInfo:
    """Geometry and fingerprint of the job's image, with the checks of ``set_volume``."""
    from .io import open_volume

    src = open_volume(job.image, job.channel, invert=job.invert, scale=job.scale)
    info, spec = describe_volume(src.data, src.spec)
    return check_and_fingerprint(src.data, info, spec)


def _output_store(
    job: BatchJob, out: Path, info: VolumeInfo, signature: str, overwrite: bool
) -> Any:
    """Open the run's output group, creating it (or replacing another run's, if allowed)."""
    import shutil

    import zarr

    if out.exists():
        try:
            stored = dict(zarr.open_group(str(out), mode="r").attrs)
        except Exception:  # not a store of ours
            stored = {}
        if stored.get("signature") != signature:
            if not overwrite:
                raise ValueError(
                    f"{out} exists and holds another run's output; pass overwrite=True "
                    "to replace it (a store of the same run resumes)"
                )
            shutil.rmtree(out) if out.is_dir() else out.unlink()
    if not out.exists():
        shape = (*info.leading_shape, *info.slice_shape)
        group = zarr.open_group(str(out), mode="w")
        group.create_array(
            "labels",
            shape=shape,
            chunks=(1,) * (len(shape) - 2) + shape[-2:],
            dtype=label_dtype(max(t.label_value for t in job.tasks)),
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
    return zarr.open_group(str(out), mode="r+")


def _run_chunks(
    job: BatchJob,
    todo: list[int],
    total: int,
    weights: bytes,
    sha: str,
    scheduler: str,
    device: str,
    retries: int,
    progress: Callable[[int, int], None] | None,
    client: Any,
) -> None:
    """Submit the slices still to do in chunks and wait for them, reporting progress."""
    from distributed import as_completed

    own = client is None
    client, cluster = _client(scheduler) if own else (client, None)
    finished = total - len(todo)
    try:
        [w_future] = client.scatter([weights], broadcast=True)
        job_future = client.scatter(job, broadcast=True)
        chunks = [todo[i : i + job.chunk] for i in range(0, len(todo), job.chunk)]
        futures = [
            client.submit(
                _segment_chunk, job_future, c, w_future, sha, device, retries=retries, pure=False
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
