"""The predictor: encode once per slice, answer many cheap guide and predict calls.

Shaped after segment-anything's ``SamPredictor``: :meth:`RevolverPredictor.set_volume` fixes the
data, :meth:`~RevolverPredictor.guide` turns points into a :class:`~.task.Task`, and
:meth:`~RevolverPredictor.predict_slice` / :meth:`~RevolverPredictor.propagate` apply tasks to
slices. Encoder features are cached per slice (:mod:`.features`), so a new click re-runs only
the guide and the segmentor.

Conventions: a volume is ``(..., Y, X)`` or ``(..., Y, X, 3)`` for RGB; every leading axis
(Z, T, image index) indexes 2D slices. Points are ``(N, ndim)`` in data pixels, leading
coordinates first, ``(y, x)`` last, as napari's Points layers hold them.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Generator, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .compat import check_tasks
from .device import resolve_device
from .features import FeatureCache, FeatureSignature, FeatureStore
from .labels import labels_from_probabilities
from .model.encoder import EncoderOutput
from .model.guide import GuideOutput, point_masks
from .model.guided_net import GuidedNet
from .preprocess import Preprocessing, normalize_slice
from .prior import dense_support, local_priors
from .propagation import PropagationStep, finish_slice
from .task import Task
from .tiling import encode_slices, feature_shapes, segment_slices
from .volume import (
    Index,
    VolumeInfo,
    VolumeSpec,
    check_and_fingerprint,
    check_points,
    describe_volume,
    read_slice,
)
from .weights import LoadedWeights, load_weights

logger = logging.getLogger(__name__)

__all__ = [
    "PropagationStep",
    "RevolverPredictor",
    "VolumeInfo",
    "VolumeSpec",
    "labels_from_probabilities",
]


class RevolverPredictor:
    """Few-shot segmentation of a volume from point annotations.

    Parameters
    ----------
    weights : str, Path or LoadedWeights, optional
        A checkpoint written by ``revolver train``, or weights loaded already (shared, not
        reloaded); default the weights shipped in the package.
    device : {"auto", "cpu", "cuda", "mps"}
        ``auto`` picks CUDA, then MPS, then CPU.
    model : GuidedNet, optional
        Use this model instead of loading weights (tests, experiments).
    cache_bytes : int
        Memory budget of the per-slice feature cache.
    batch_size : int
        Slices per encoder / segmentor batch during propagation.
    preprocessing : Preprocessing, optional
        Intensity normalisation; its ``invert`` is the default of :meth:`set_volume`.

    Examples
    --------
    >>> from napari_revolver import RevolverPredictor
    >>> predictor = RevolverPredictor()
    >>> predictor.set_volume(stack)                       # (Z, Y, X)
    >>> task = predictor.guide(points, labels)            # points (N, 3) as (z, y, x)
    >>> mask = predictor.predict_slice(5, task)           # (Y, X) bool
    >>> for step in predictor.propagate(task):            # every slice, with progress
    ...     out[step.index] = step.result
    """

    def __init__(
        self,
        weights: str | Path | LoadedWeights | None = None,
        device: str = "auto",
        *,
        model: GuidedNet | None = None,
        cache_bytes: int = 1 << 30,
        batch_size: int = 4,
        preprocessing: Preprocessing | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.device = resolve_device(device)
        if model is not None:
            if weights is not None:
                raise ValueError("pass either weights or model, not both")
            model = model.to(self.device).for_inference()
            weights = LoadedWeights(model, "<in-memory model>", _model_digest(model), {})
        elif not isinstance(weights, LoadedWeights):
            weights = load_weights(weights, self.device)
        self.weights = weights
        self.model = weights.model.to(self.device)
        #: How slices are normalised; ``invert`` follows the volume's :class:`VolumeSpec`.
        self.preprocessing = preprocessing or Preprocessing(channels=self.model.config.in_channels)
        self._preprocessing = self.preprocessing
        self.batch_size = batch_size
        self.cache_bytes = cache_bytes
        self._lock = threading.RLock()
        self._volume: Any = None
        self._info: VolumeInfo | None = None
        self._spec: VolumeSpec | None = None
        self.cache = FeatureCache(cache_bytes)

    def clone(self) -> RevolverPredictor:
        """Make a predictor for another volume, sharing this one's model and weights.

        Tasks guided with either apply to both; each keeps its own volume and feature cache.
        """
        return RevolverPredictor(
            self.weights,
            str(self.device),
            cache_bytes=self.cache_bytes,
            batch_size=self.batch_size,
            preprocessing=self._preprocessing,
        )

    @property
    def has_volume(self) -> bool:
        """Whether :meth:`set_volume` has been called (and not :meth:`reset`)."""
        return self._info is not None

    # ------------------------------------------------------------------ volume
    @property
    def info(self) -> VolumeInfo:
        """Geometry of the current volume; raises ``RuntimeError`` before :meth:`set_volume`."""
        if self._info is None:
            raise RuntimeError("no volume set; call set_volume(array) first")
        return self._info

    @property
    def model_key(self) -> str:
        """Architecture key of the loaded model (e.g. ``revolver-s``)."""
        return self.model.config.key

    @property
    def spec(self) -> VolumeSpec:
        """How the current volume is read (resolved: ``rgb`` is a bool)."""
        if self._spec is None:
            raise RuntimeError("no volume set; call set_volume(array) first")
        return self._spec

    @property
    def fingerprint(self) -> str:
        """Data identity of the current volume as read (channel view, samples axis)."""
        return self.info.fingerprint

    def set_volume(
        self,
        array: Any,
        spec: VolumeSpec | None = None,
        *,
        store: str | Path | None = None,
        on_mismatch: Literal["recompute", "raise"] = "recompute",
        rgb: bool | None = None,
        channel_axis: int | None = None,
        channel: int | None = None,
        invert: bool | None = None,
    ) -> VolumeInfo:
        """Set the image data to segment; features are computed lazily, per slice, on use.

        Parameters
        ----------
        array : array-like
            ``(..., Y, X)`` grayscale or ``(..., Y, X, 3|4)`` RGB(A); numpy, dask or zarr
            (read one slice at a time, never whole).
        spec : VolumeSpec, optional
            How to read it: RGB, the channel of a multichannel array, inverted intensities.
            Default: RGB guessed as napari does, no channel axis, and the ``invert`` of the
            ``preprocessing`` the predictor was made with.
        store : path, optional
            On-disk feature store (zarr) to read and fill, reused across runs.
        on_mismatch : {"recompute", "raise"}
            What to do when ``store`` holds features of other data or another model.
        rgb, channel_axis, channel, invert : optional
            Fields of ``spec`` given one by one (they override ``spec``'s).

        Returns
        -------
        VolumeInfo

        Raises
        ------
        ValueError
            Unsupported dimensions or dtype, empty or constant data, a spec that does not fit.
        """
        if spec is None:
            spec = VolumeSpec(invert=self._preprocessing.invert)
        overrides = {"rgb": rgb, "channel_axis": channel_axis, "channel": channel, "invert": invert}
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        info, spec = describe_volume(array, spec)
        info = check_and_fingerprint(array, info, spec)
        with self._lock:
            self._volume, self._info, self._spec = array, info, spec
            self.preprocessing = replace(self._preprocessing, invert=spec.invert)
            feature_store = self._open_store(store, on_mismatch) if store is not None else None
            self.cache = FeatureCache(self.cache_bytes, feature_store)
        return info

    def _open_store(
        self, path: str | Path, on_mismatch: Literal["recompute", "raise"]
    ) -> FeatureStore:
        coarse, fine = feature_shapes(self.model, self.info.slice_shape)
        return FeatureStore(path, self.signature(), self.info.n_slices, coarse, fine, on_mismatch)

    def signature(self) -> FeatureSignature:
        """Describe what the current volume's features depend on (the cache key)."""
        info = self.info
        return FeatureSignature(
            info.fingerprint,
            self.model_key,
            self.weights.sha256,
            self.preprocessing.key(),
            info.slice_shape,
        )

    def _read(self, k: int) -> np.ndarray:
        """Slice ``k`` as ``(H, W)`` or ``(H, W, 3)`` numpy (reads one slice of lazy data)."""
        return read_slice(self._volume, self.info, self.spec, k)

    def reset(self) -> None:
        """Forget the volume and its cached features."""
        with self._lock:
            self._volume = self._info = self._spec = None
            self.cache = FeatureCache(self.cache_bytes)

    # ---------------------------------------------------------------- features
    def _prepare(self, k: int) -> torch.Tensor:
        try:
            x = normalize_slice(self._read(k), self.preprocessing)
        except ValueError as exc:
            raise ValueError(f"slice {self.info.unflat(k)}: {exc}") from exc
        return torch.from_numpy(x)

    def _encode(self, images: list[torch.Tensor]) -> EncoderOutput:
        """Encode normalised slices ``[(C, H, W)]`` of one size; returns padded features."""
        return encode_slices(self.model, images, self.device)

    def _features(self, ks: Sequence[int], remember: bool = True) -> EncoderOutput:
        """Features of flat slices ``ks``, from the cache or encoded in one batch.

        Newly encoded slices are cached unless ``remember`` is False and there is no store;
        either way they carry the cache's float16 rounding, so results never depend on
        whether a slice was cached.
        """
        with self._lock:
            found = {k: self.cache.get(k) for k in ks}
        missing = [k for k, f in found.items() if f is None]
        if missing:
            f = self._encode([self._prepare(k) for k in missing])
            with self._lock:
                for j, k in enumerate(missing):
                    if remember or self.cache.store is not None:
                        found[k] = self.cache.put(k, f[j : j + 1])
                    else:
                        found[k] = f[j : j + 1].to("cpu", torch.float16)
        return EncoderOutput.cat([found[k] for k in ks])  # type: ignore[misc]

    def features(self, index: Index) -> EncoderOutput:
        """Return a slice's features: cached, or computed and cached on first use.

        Returns
        -------
        EncoderOutput
            float16 on the CPU: ``coarse (1, C, H'/8, W'/8)`` and ``fine (1, Cf, H'/4, W'/4)``
            where ``H', W'`` are the slice size rounded up to a multiple of 32.
        """
        return self._features([self.info.flat(index)])

    def precompute(
        self, indices: Iterable[Index] | None = None, *, batch_size: int | None = None
    ) -> Generator[tuple[int, int], None, None]:
        """Encode slices not yet cached, yielding ``(done, total)`` after each batch.

        With an on-disk store this is resumable: slices already stored are skipped.
        """
        ks = self.info.flat_indices(indices)
        todo = [k for k in ks if k not in self.cache]
        bs = batch_size or self.batch_size
        done = len(ks) - len(todo)
        yield done, len(ks)
        for i in range(0, len(todo), bs):
            self._features(todo[i : i + bs])
            done += len(todo[i : i + bs])
            yield done, len(ks)

    # ------------------------------------------------------------------- guide
    @torch.inference_mode()
    def guide(self, points: Any, labels: Any, *, name: str = "task", label_value: int = 1) -> Task:
        """Turn point annotations into a task.

        Parameters
        ----------
        points : array-like
            ``(N, ndim)`` data-pixel coordinates: leading axes (z, t, ...) then ``(y, x)``.
            Points on several slices are all support (multi-shot, merged by annotation mass).
        labels : array-like
            ``(N,)``: 1 positive, 0 negative. At least one positive is required; negatives are
            optional.
        name : str
            Task name.
        label_value : int
            Value of the task in label images.

        Returns
        -------
        Task
        """
        info = self.info
        pts, lab = check_points(points, labels, info)
        n_lead = len(info.leading_shape)
        slices = np.rint(pts[:, :n_lead]).astype(int)
        total: GuideOutput | None = None
        for key in sorted({tuple(r) for r in slices.tolist()}):
            sel = (slices == np.asarray(key, int)).all(axis=1)
            f = self.features(key)
            grid = tuple(f.fine.shape[-2:])
            masks = point_masks(
                torch.from_numpy(pts[sel, n_lead:]),
                torch.from_numpy(lab[sel]),
                grid,
                self.model.fine_stride,
            )
            g = self._guide_features(f, masks)
            total = g if total is None else total + g
        assert total is not None
        return self._task(total, name, label_value, pts, lab)

    @torch.inference_mode()
    def guide_mask(
        self, index: Index, mask: np.ndarray, *, name: str = "task", label_value: int = 1
    ) -> Task:
        """Turn a dense support mask ``(H, W)`` on slice ``index`` into a task (the densest shot).

        Raises
        ------
        ValueError
            A mask of another shape than the slices, or an empty one.
        """
        info = self.info
        mask = np.asarray(mask)
        if mask.shape != info.slice_shape:
            raise ValueError(f"mask must have the slice shape {info.slice_shape}; got {mask.shape}")
        if not mask.any():
            raise ValueError("the support mask is empty: it needs at least one foreground pixel")
        f = self.features(index)
        masks = dense_support(mask, tuple(f.fine.shape[-2:]), self.model.fine_stride)
        g = self._guide_features(f, masks)
        key = info.unflat(info.flat(index))
        return self._task(
            g,
            name,
            label_value,
            np.zeros((0, info.ndim)),
            np.zeros(0, np.int8),
            ((key, masks.numpy().astype(np.float32)),),
        )

    def _guide_features(self, f: EncoderOutput, masks: torch.Tensor) -> GuideOutput:
        return self.model.guide_from_masks(
            f.to(self.device, torch.float32), masks[None].to(self.device)
        )

    def _task(
        self,
        g: GuideOutput,
        name: str,
        label_value: int,
        pts: np.ndarray,
        lab: np.ndarray,
        support_masks: tuple[tuple[tuple[int, ...], np.ndarray], ...] = (),
    ) -> Task:
        return Task(
            name=name,
            sum_coarse=g.sum_coarse[0].float().cpu().numpy(),
            sum_fine=g.sum_fine[0].float().cpu().numpy(),
            mass=g.mass[0].float().cpu().numpy(),
            points=pts,
            labels=lab,
            model_key=self.model_key,
            weights_sha256=self.weights.sha256,
            label_value=label_value,
            source=self.info.fingerprint,
            support_masks=support_masks,
            invert=self.preprocessing.invert,
        )

    def _guidance(self, tasks: Sequence[Task]) -> GuideOutput:
        check_tasks(tasks, self.model_key, self.weights.sha256, self.preprocessing.invert)
        d = self.device
        return GuideOutput(
            torch.from_numpy(np.stack([t.sum_coarse for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.sum_fine for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.mass for t in tasks])).to(d),
        )

    # ----------------------------------------------------------------- predict
    @torch.inference_mode()
    def _probabilities(
        self,
        feats: EncoderOutput,
        tasks: Sequence[Task],
        guidance: GuideOutput,
        ks: Sequence[int],
        local: bool,
    ) -> torch.Tensor:
        """``(S, T, H, W)`` probabilities of T tasks on the S slices ``ks`` (features ``feats``)."""
        n_s, n_t = feats.coarse.shape[0], guidance.mass.shape[0]
        prior = None
        if self.model.config.local_prior:
            grid = tuple(feats.fine.shape[-2:])
            prior = local_priors(tasks, self.info, ks, local, grid, self.model.fine_stride)  # type: ignore[arg-type]
            prior = None if prior is None else prior.to(self.device)
        f = feats.to(self.device, torch.float32)
        logits = segment_slices(self.model, f, guidance, self.info.slice_shape, prior)
        return torch.sigmoid(logits).reshape(n_s, n_t, *logits.shape[-2:])

    def predict_proba(
        self, index: Index, tasks: Task | Sequence[Task], *, local: bool = False
    ) -> np.ndarray:
        """Foreground probability of each task on one slice: ``(T, H, W)`` float32.

        ``local``: see :meth:`propagate`.
        """
        tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not tasks:
            raise ValueError("no task given")
        k = self.info.flat(index)
        probs = self._probabilities(self._features([k]), tasks, self._guidance(tasks), [k], local)
        return probs[0].cpu().numpy()

    def predict_slice(
        self,
        index: Index,
        task: Task | Sequence[Task],
        *,
        threshold: float = 0.5,
        instances: bool = False,
        local: bool = False,
    ) -> np.ndarray:
        """Segment one slice.

        Parameters
        ----------
        index : int or tuple of int
            The slice (flat number or leading-axes index; ``0`` or ``()`` for a 2D image).
        task : Task or sequence of Task
            One task gives a ``(H, W)`` bool mask; several give a ``(H, W)`` label image with
            each task's ``label_value`` where it is the most probable task above ``threshold``.
        threshold : float
            Probability threshold.
        instances : bool
            Return instance ids (connected components, touching objects split) instead.
        local : bool
            Let annotations on other slices act by position too (see :meth:`propagate`).

        Returns
        -------
        np.ndarray
            ``(H, W)`` bool mask, or unsigned label image.
        """
        probs = self.predict_proba(index, task, local=local)
        return finish_slice(
            probs,
            [task] if isinstance(task, Task) else list(task),
            threshold,
            instances,
            "labels" if not isinstance(task, Task) else "mask",
        )

    def propagate(
        self,
        tasks: Task | Sequence[Task],
        indices: Iterable[Index] | None = None,
        *,
        threshold: float = 0.5,
        output: Literal["labels", "masks", "probabilities"] = "labels",
        instances: bool = False,
        batch_size: int | None = None,
        cache: bool = True,
        local: bool = False,
    ) -> Generator[PropagationStep, None, None]:
        """Apply tasks to many slices, yielding each slice's result as it is ready.

        Slices are processed in batches; features are computed for slices that have none
        (and cached, unless ``cache=False``). Each slice's result depends only on that slice
        and the tasks, so the order of ``indices`` does not change any result. Stop iterating
        to cancel.

        Parameters
        ----------
        tasks : Task or sequence of Task
        indices : iterable of int or tuple, optional
            Slices to segment; default all.
        threshold : float
            Probability threshold.
        output : {"labels", "masks", "probabilities"}
            ``labels``: ``(H, W)`` label image (one task: 0/label_value); ``masks``:
            ``(T, H, W)`` bool; ``probabilities``: ``(T, H, W)`` float32.
        instances : bool
            With ``labels``: instance ids instead of task values.
        batch_size : int, optional
            Slices per batch (default the predictor's).
        cache : bool
            Keep newly computed features in memory (and in the store). A one-pass run over a
            long stack passes ``False``: memory then stays at one batch, whatever the length.
        local : bool
            Where the clicks are matters, not only what they are on. Annotations always act
            by position on their own slice (a negative click removes what is around it);
            with ``local`` they also act on every other slice of the volume they were made
            on, from the nearest annotated slice, which follows one object through z or
            time. Leave it off for a collection of unrelated images stacked together; it
            has no effect on other volumes.

        Yields
        ------
        PropagationStep
        """
        task_list = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not task_list:
            raise ValueError("no task given")
        if output not in ("labels", "masks", "probabilities"):
            raise ValueError(f"output must be 'labels', 'masks' or 'probabilities'; got {output!r}")
        guidance = self._guidance(task_list)
        ks = self.info.flat_indices(indices)
        bs = batch_size or self.batch_size
        total = len(ks)
        for i in range(0, total, bs):
            batch = ks[i : i + bs]
            feats = self._features(batch, remember=cache)
            probs = self._probabilities(feats, task_list, guidance, batch, local).cpu().numpy()
            for j, k in enumerate(batch):
                res = finish_slice(probs[j], task_list, threshold, instances, output)
                yield PropagationStep(self.info.unflat(k), res, i + j + 1, total)

    def segment(self, tasks: Task | Sequence[Task], **kwargs: Any) -> np.ndarray:
        """Propagate to every slice and return the stacked result ``(*leading, H, W)``."""
        info = self.info
        out: np.ndarray | None = None
        for step in self.propagate(tasks, **kwargs):
            if out is None:
                out = np.zeros((*info.leading_shape, *step.result.shape), step.result.dtype)
            out[step.index] = step.result
        assert out is not None
        return out


def _model_digest(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's parameters (stands in for a weights-file sha256)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
