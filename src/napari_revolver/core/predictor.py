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

import logging
import threading
from collections.abc import Generator, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .device import resolve_device
from .features import FeatureCache, FeatureSignature, FeatureStore
from .instances import mask_to_instances
from .model.encoder import EncoderOutput
from .model.guide import GuideOutput, dense_masks, local_prior, point_masks
from .model.guided_net import GuidedNet
from .preprocess import Preprocessing, normalize_slice
from .task import Task
from .volume import (
    Index,
    VolumeInfo,
    VolumeSpec,
    check_and_fingerprint,
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

#: Slices above this many pixels are encoded in overlapping tiles to bound memory.
MAX_TILE_PIXELS = 2048 * 2048
TILE = 1024
TILE_OVERLAP = 96
#: Overlap of segmentor tiles, in coarse cells: the head sees 1 + 2 cells around a position,
#: 1 + 2 + 4 + 8 with the wide context, plus the fine refinement and upsampling.
HEAD_OVERLAP = 17


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
    """

    index: tuple[int, ...]
    result: np.ndarray
    done: int
    total: int


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
    dtype = np.uint8 if max(values) < 256 else np.uint16 if max(values) < 65536 else np.uint32
    lut = np.asarray(values, dtype)
    best = probs.argmax(axis=0)
    out = lut[best]
    out[probs.max(axis=0) <= threshold] = 0
    return out


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
        info = self.info
        h, w = (_round_up(s, self.model.size_multiple) for s in info.slice_shape)
        cfg = self.model.config
        return FeatureStore(
            path,
            self.signature(),
            info.n_slices,
            (cfg.coarse_channels, h // 8, w // 8),
            (cfg.fine_channels, h // 4, w // 4),
            on_mismatch,
        )

    def signature(self) -> FeatureSignature:
        """What the current volume's features depend on."""
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

    @torch.inference_mode()
    def _encode(self, images: list[torch.Tensor]) -> EncoderOutput:
        """Encode normalised slices ``[(C, H, W)]`` of one size; returns padded features."""
        h, w = images[0].shape[-2:]
        m = self.model.size_multiple
        ph, pw = _round_up(h, m), _round_up(w, m)
        x = torch.stack(images).to(self.device)
        if (ph, pw) != (h, w):
            mode = "reflect" if ph - h < h and pw - w < w else "replicate"
            x = F.pad(x, (0, pw - w, 0, ph - h), mode=mode)
        if ph * pw <= MAX_TILE_PIXELS:
            return self.model.encode(x)
        return self._encode_tiled(x)

    def _encode_tiled(self, x: torch.Tensor) -> EncoderOutput:
        """Encode a large padded batch tile by tile, keeping each tile's centre."""
        b, _, h, w = x.shape
        cfg = self.model.config
        coarse = torch.empty(b, cfg.coarse_channels, h // 8, w // 8, device=x.device)
        fine = torch.empty(b, cfg.fine_channels, h // 4, w // 4, device=x.device)
        step = TILE - 2 * TILE_OVERLAP
        for y0 in range(0, h, step):
            for x0 in range(0, w, step):
                ty0, tx0 = max(0, y0 - TILE_OVERLAP), max(0, x0 - TILE_OVERLAP)
                ty1, tx1 = min(h, y0 + step + TILE_OVERLAP), min(w, x0 + step + TILE_OVERLAP)
                f = self.model.encode(x[:, :, ty0:ty1, tx0:tx1])
                y1, x1 = min(h, y0 + step), min(w, x0 + step)
                for feats, out, s in ((f.coarse, coarse, 8), (f.fine, fine, 4)):
                    out[:, :, y0 // s : y1 // s, x0 // s : x1 // s] = feats[
                        :, :, (y0 - ty0) // s : (y1 - ty0) // s, (x0 - tx0) // s : (x1 - tx0) // s
                    ]
        return EncoderOutput(coarse, fine)

    def features(self, index: Index) -> EncoderOutput:
        """Cached features of a slice (computed on first use), float16 on the CPU.

        Returns
        -------
        EncoderOutput
            ``coarse (1, C, H'/8, W'/8)`` and ``fine (1, Cf, H'/4, W'/4)`` where ``H', W'`` are
            the slice size rounded up to a multiple of 32.
        """
        k = self.info.flat(index)
        with self._lock:
            f = self.cache.get(k)
        if f is None:
            f = self._encode([self._prepare(k)])
            with self._lock:
                f = self.cache.put(k, f)
        return f

    def precompute(
        self, indices: Iterable[Index] | None = None, *, batch_size: int | None = None
    ) -> Generator[tuple[int, int], None, None]:
        """Encode slices not yet cached, yielding ``(done, total)`` after each batch.

        With an on-disk store this is resumable: slices already stored are skipped.
        """
        ks = self._flat_indices(indices)
        todo = [k for k in ks if k not in self.cache]
        bs = batch_size or self.batch_size
        total = len(ks)
        done = total - len(todo)
        yield done, total
        for i in range(0, len(todo), bs):
            batch = todo[i : i + bs]
            f = self._encode([self._prepare(k) for k in batch])
            with self._lock:
                for j, k in enumerate(batch):
                    self.cache.put(k, f[j : j + 1])
            done += len(batch)
            yield done, total

    def _flat_indices(self, indices: Iterable[Index] | None) -> list[int]:
        info = self.info
        if indices is None:
            return list(range(info.n_slices))
        return [info.flat(i) for i in indices]

    # ------------------------------------------------------------------- guide
    def _check_points(self, points: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
        info = self.info
        pts = np.asarray(points, dtype=np.float64)
        if pts.ndim == 1 and pts.size == info.ndim:
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != info.ndim:
            axes = "".join(f"{a}, " for a in ("leading",) * len(info.leading_shape)) + "y, x"
            raise ValueError(
                f"points must have shape (N, {info.ndim}) as ({axes}) for an image with "
                f"slice axes {info.leading_shape} and slices {info.slice_shape}; "
                f"got shape {pts.shape}"
            )
        lab = np.asarray(labels)
        if lab.shape != (len(pts),):
            raise ValueError(
                f"labels must have shape ({len(pts)},) to match the points; got {lab.shape}"
            )
        if lab.dtype == bool:
            lab = lab.astype(np.int8)
        if not np.isin(lab, (0, 1)).all():
            raise ValueError(
                f"labels must be 1 (positive) or 0 (negative); got values {np.unique(lab).tolist()}"
            )
        lab = lab.astype(np.int8)
        if len(pts) == 0 or not (lab == 1).any():
            raise ValueError("no positive point: click at least one point on the object to segment")
        if not np.isfinite(pts).all():
            raise ValueError("points contain NaN or infinite coordinates")
        bounds = np.asarray((*info.leading_shape, *info.slice_shape), np.float64)
        outside = ((pts < -0.5) | (pts >= bounds - 0.5)).any(axis=1)
        if outside.any():
            i = int(np.argmax(outside))
            raise ValueError(
                f"{int(outside.sum())} point(s) lie outside the image; point {i} is at "
                f"{pts[i].tolist()}, valid ranges are [0, {(bounds - 1).tolist()}]"
            )
        return pts, lab

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
        pts, lab = self._check_points(points, labels)
        info = self.info
        n_lead = len(info.leading_shape)
        slices = np.rint(pts[:, :n_lead]).astype(int) if n_lead else np.zeros((len(pts), 0), int)
        total: GuideOutput | None = None
        for key in sorted({tuple(s) for s in slices.tolist()}):
            sel = (
                np.all(slices == np.asarray(key, int), axis=1)
                if n_lead
                else np.ones(len(pts), bool)
            )
            f = self.features(key)
            masks = point_masks(
                torch.from_numpy(pts[sel, n_lead:]),
                torch.from_numpy(lab[sel]),
                tuple(f.fine.shape[-2:]),
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
        """A task from a dense support mask ``(H, W)`` on slice ``index`` (the densest shot)."""
        info = self.info
        mask = np.asarray(mask)
        if mask.shape != info.slice_shape:
            raise ValueError(f"mask must have the slice shape {info.slice_shape}; got {mask.shape}")
        if not mask.any():
            raise ValueError("the support mask is empty: it needs at least one foreground pixel")
        f = self.features(index)
        h, w = f.fine.shape[-2:]
        s = self.model.fine_stride
        full = np.zeros((h * s, w * s), np.float32)
        full[: mask.shape[0], : mask.shape[1]] = mask > 0
        masks = dense_masks(torch.from_numpy(full), s)
        # Padding is neither foreground nor background.
        valid = np.zeros_like(full)
        valid[: mask.shape[0], : mask.shape[1]] = 1
        masks = masks * F.avg_pool2d(torch.from_numpy(valid)[None, None], s)[0]
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

    def _annotated_slices(self, task: Task) -> set[tuple[int, ...]]:
        """Slices of the current volume that carry ``task``'s annotations."""
        n_lead = len(self.info.leading_shape)
        keys = {tuple(int(v) for v in k) for k, _ in task.support_masks}
        if len(task.points) and task.points.shape[1] == self.info.ndim:
            keys |= {tuple(r) for r in np.rint(task.points[:, :n_lead]).astype(int).tolist()}
        return keys

    @staticmethod
    def _prior_sources(
        keys: set[tuple[int, ...]], key: tuple[int, ...], local: bool
    ) -> tuple[tuple[int, ...], ...]:
        """Of the annotated slices ``keys``, those whose positions apply to slice ``key``.

        The slice itself if annotated; with ``local``, otherwise the nearest annotated slices
        (an object drifts, so the closest annotation says most about where it is).
        """
        if key in keys:
            return (key,)
        if not local or not keys:
            return ()
        here = np.asarray(key, float)
        dist = {k: float(np.linalg.norm(np.asarray(k, float) - here)) for k in keys}
        best = min(dist.values())
        return tuple(sorted(k for k, d in dist.items() if d == best))

    def _local_prior(
        self, task: Task, sources: tuple[tuple[int, ...], ...], grid: tuple[int, int]
    ) -> torch.Tensor:
        """``(3, h, w)`` prior from ``task``'s annotations on slices ``sources``."""
        n_lead = len(self.info.leading_shape)
        masks = torch.zeros(2, *grid)
        if len(task.points) and task.points.shape[1] == self.info.ndim:
            lead = np.rint(task.points[:, :n_lead]).astype(int)
            sel = np.array([tuple(r) in sources for r in lead.tolist()], bool)
            if sel.any():
                masks += point_masks(
                    torch.from_numpy(task.points[sel, n_lead:]),
                    torch.from_numpy(task.labels[sel]),
                    grid,
                    self.model.fine_stride,
                )
        for k, m in task.support_masks:
            if tuple(int(v) for v in k) in sources and m.shape[-2:] == grid:
                masks += torch.from_numpy(m)
        return local_prior(masks[None])[0]

    def _priors(
        self, tasks: Sequence[Task], ks: Sequence[int], local: bool, grid: tuple[int, int]
    ) -> torch.Tensor | None:
        """Local priors ``(S * T, 3, h, w)`` for slices ``ks`` and ``tasks``, or ``None``.

        A task's positions apply to the slices it annotates and, with ``local``, to every other
        slice of the volume it was annotated on, from the nearest annotated slice(s). They
        never apply to another volume, nor with weights that predate the local prior.
        """
        if not self.model.config.local_prior:
            return None
        # Slices carrying each task's annotations, on this volume only (computed once per call).
        annotated = [
            self._annotated_slices(t) if t.source == self.info.fingerprint else set() for t in tasks
        ]
        memo: dict[tuple[int, tuple[tuple[int, ...], ...]], torch.Tensor] = {}
        rows: list[torch.Tensor | None] = []
        for k in ks:
            key = self.info.unflat(k)
            for i, t in enumerate(tasks):
                sources = self._prior_sources(annotated[i], key, local)
                if not sources:
                    rows.append(None)
                    continue
                if (i, sources) not in memo:
                    memo[(i, sources)] = self._local_prior(t, sources, grid)
                rows.append(memo[(i, sources)])
        if all(r is None for r in rows):
            return None
        zero = torch.zeros(3, *grid)
        return torch.stack([zero if r is None else r for r in rows]).to(self.device)

    def _guidance(self, tasks: Sequence[Task]) -> GuideOutput:
        for t in tasks:
            if (t.model_key, t.weights_sha256) != (self.model_key, self.weights.sha256):
                raise ValueError(
                    f"task {t.name!r} was guided with model {t.model_key} (weights "
                    f"{t.weights_sha256[:12]}), this predictor runs {self.model_key} (weights "
                    f"{self.weights.sha256[:12]}); guide it again with these weights"
                )
            if t.invert != self.preprocessing.invert:
                how = "reversed" if t.invert else "unchanged"
                this = "reversed" if self.preprocessing.invert else "unchanged"
                raise ValueError(
                    f"task {t.name!r} was guided on intensities {how} (invert={t.invert}), this "
                    f"volume is read with intensities {this} (invert={self.preprocessing.invert});"
                    f" open the volume with set_volume(..., invert={t.invert}) (CLI: "
                    f"{'--invert' if t.invert else 'no --invert'}; widget: the invert checkbox)"
                )
        d = self.device
        return GuideOutput(
            torch.from_numpy(np.stack([t.sum_coarse for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.sum_fine for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.mass for t in tasks])).to(d),
        )

    # ----------------------------------------------------------------- predict
    @torch.inference_mode()
    def _probabilities(
        self, feats: EncoderOutput, guidance: GuideOutput, prior: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(S, T, H, W)`` probabilities for S slices' features and T tasks.

        ``prior`` is ``(S * T, 3, h, w)``, slice-major, or ``None`` (see :meth:`_priors`).
        """
        n_s, n_t = feats.coarse.shape[0], guidance.mass.shape[0]
        f = feats.to(self.device, torch.float32)
        if n_s > 1 or n_t > 1:
            f = EncoderOutput(f.coarse.repeat_interleave(n_t, 0), f.fine.repeat_interleave(n_t, 0))
            guidance = GuideOutput(
                guidance.sum_coarse.repeat(n_s, 1, 1),
                guidance.sum_fine.repeat(n_s, 1, 1),
                guidance.mass.repeat(n_s, 1),
            )
        h, w = self.info.slice_shape
        if h * w <= MAX_TILE_PIXELS:
            logits = self.model.segment(f, guidance, (h, w), prior=prior)
        else:
            logits = self._segment_tiled(f, guidance, (h, w), prior)
        return torch.sigmoid(logits).reshape(n_s, n_t, *logits.shape[-2:])

    def _segment_tiled(
        self,
        f: EncoderOutput,
        guidance: GuideOutput,
        out_size: tuple[int, int],
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The segmentor on a large slice, tile by tile, to bound its activation memory.

        The head sees at most 15 coarse cells around each position (16 with the fine
        refinement), so tiles overlapping by ``HEAD_OVERLAP`` coarse cells give the same
        result as one pass.
        """
        b = f.coarse.shape[0]
        hc, wc = f.coarse.shape[-2:]
        out = torch.empty(b, hc * 8, wc * 8, device=f.coarse.device)
        step = TILE // 8
        for y0 in range(0, hc, step):
            for x0 in range(0, wc, step):
                ty0, tx0 = max(0, y0 - HEAD_OVERLAP), max(0, x0 - HEAD_OVERLAP)
                ty1, tx1 = min(hc, y0 + step + HEAD_OVERLAP), min(wc, x0 + step + HEAD_OVERLAP)
                tile = EncoderOutput(
                    f.coarse[:, :, ty0:ty1, tx0:tx1],
                    f.fine[:, :, 2 * ty0 : 2 * ty1, 2 * tx0 : 2 * tx1],
                )
                tile_prior = (
                    None if prior is None else prior[:, :, 2 * ty0 : 2 * ty1, 2 * tx0 : 2 * tx1]
                )
                logits = self.model.segment(tile, guidance, prior=tile_prior)
                y1, x1 = min(hc, y0 + step), min(wc, x0 + step)
                out[:, 8 * y0 : 8 * y1, 8 * x0 : 8 * x1] = logits[
                    :, 8 * (y0 - ty0) : 8 * (y1 - ty0), 8 * (x0 - tx0) : 8 * (x1 - tx0)
                ]
        return out[:, : out_size[0], : out_size[1]]

    def predict_proba(
        self, index: Index, tasks: Task | Sequence[Task], *, local: bool = False
    ) -> np.ndarray:
        """Foreground probability of each task on one slice: ``(T, H, W)`` float32.

        ``local``: see :meth:`propagate`.
        """
        tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not tasks:
            raise ValueError("no task given")
        feats = self.features(index)
        prior = self._priors(tasks, [self.info.flat(index)], local, tuple(feats.fine.shape[-2:]))
        return self._probabilities(feats, self._guidance(tasks), prior)[0].cpu().numpy()

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
        return self._finish(
            probs,
            [task] if isinstance(task, Task) else list(task),
            threshold,
            instances,
            "labels" if not isinstance(task, Task) else "mask",
        )

    def _finish(
        self, probs: np.ndarray, tasks: list[Task], threshold: float, instances: bool, output: str
    ) -> np.ndarray:
        if output == "probabilities":
            return probs
        if output == "masks":
            return probs > threshold
        if output == "mask" and not instances:
            return probs[0] > threshold
        labels = labels_from_probabilities(probs, [t.label_value for t in tasks], threshold)
        if not instances:
            return labels
        return mask_to_instances(labels > 0)

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
        ks = self._flat_indices(indices)
        bs = batch_size or self.batch_size
        total = len(ks)
        for i in range(0, total, bs):
            batch = ks[i : i + bs]
            feats = self._batch_features(batch, remember=cache)
            prior = self._priors(task_list, batch, local, tuple(feats.fine.shape[-2:]))
            probs = self._probabilities(feats, guidance, prior).cpu().numpy()
            for j, k in enumerate(batch):
                res = self._finish(probs[j], task_list, threshold, instances, output)
                yield PropagationStep(self.info.unflat(k), res, i + j + 1, total)

    def _batch_features(self, batch: list[int], remember: bool = True) -> EncoderOutput:
        with self._lock:
            cached = {k: self.cache.get(k) for k in batch}
        missing = [k for k, f in cached.items() if f is None]
        if missing:
            f = self._encode([self._prepare(k) for k in missing])
            with self._lock:
                for j, k in enumerate(missing):
                    if remember or self.cache.store is not None:
                        cached[k] = self.cache.put(k, f[j : j + 1])
                    else:
                        # Same float16 rounding as cached features: results do not depend
                        # on whether a slice was cached.
                        cached[k] = EncoderOutput(
                            f.coarse[j : j + 1].to("cpu", torch.float16),
                            f.fine[j : j + 1].to("cpu", torch.float16),
                        )
        return EncoderOutput.cat([cached[k] for k in batch])  # type: ignore[misc]

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


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _model_digest(model: torch.nn.Module) -> str:
    """Content hash of an in-memory model's parameters (stands in for a weights-file sha256)."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
