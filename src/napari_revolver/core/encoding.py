"""The encoder side of the predictor: a volume, read one slice at a time, and its features.

Features do not depend on annotations, so each slice is encoded once, on first use, and kept in
a byte-bounded memory cache and optionally an on-disk store (:mod:`.features`). Everything a
click needs afterwards is cheap: see :class:`~.predictor.RevolverPredictor`.
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .device import resolve_device
from .features import FeatureCache, FeatureSignature, FeatureStore
from .model.encoder import EncoderOutput
from .model.guided_net import GuidedNet
from .preprocess import Preprocessing, intensity_bounds, normalize_slice
from .scale import resize_slice, work_shape
from .tiling import encode_slices, feature_shapes
from .volume import (
    Index,
    VolumeInfo,
    VolumeSpec,
    check_and_fingerprint,
    describe_volume,
    read_slice,
)
from .weights import LoadedWeights, in_memory_weights, load_weights

__all__ = ["VolumeEncoder"]


class VolumeEncoder:
    """A model's encoder applied to one volume, slice by slice, with cached features.

    Parameters are those of :class:`~.predictor.RevolverPredictor`, which adds the guide and
    the segmentor.
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
            weights = in_memory_weights(model.to(self.device).for_inference())
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
        self._work: VolumeInfo | None = None
        self.cache = FeatureCache(cache_bytes)
        #: Each slice's intensity bounds (:func:`.preprocess.intensity_bounds`), by the
        #: percentiles and the flat slice: a slice is normalised again for every fit and step
        #: of following that reads its pixels.
        self._bounds: dict[tuple[float, float, int], tuple[float, float]] = {}

    def clone(self) -> VolumeEncoder:
        """Make a predictor for another volume, sharing this one's model and weights.

        Tasks guided with either apply to both; each keeps its own volume and feature cache.
        """
        return type(self)(
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
    def work_info(self) -> VolumeInfo:
        """Geometry of the volume as the network sees it: slices resized by ``spec.scale``.

        The same as :attr:`info` at scale 1. The predictor computes in these working pixels
        and converts at its public methods (:mod:`.scale`).
        """
        if self._work is None:
            raise RuntimeError("no volume set; call set_volume(array) first")
        return self._work

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
        scale: float | None = None,
    ) -> VolumeInfo:
        """Set the image data to segment; features are computed lazily, per slice, on use.

        Parameters
        ----------
        array : array-like
            ``(..., Y, X)`` grayscale or ``(..., Y, X, 3|4)`` RGB(A); numpy, dask or zarr
            (read one slice at a time, never whole).
        spec : VolumeSpec, optional
            How to read it: RGB, the channel of a multichannel array, inverted intensities,
            the factor slices are resized by before the network. Default: RGB guessed as
            napari does, no channel axis, and the ``invert`` and ``scale`` of the
            ``preprocessing`` the predictor was made with.
        store : path, optional
            On-disk feature store (zarr) to read and fill, reused across runs.
        on_mismatch : {"recompute", "raise"}
            What to do when ``store`` holds features of other data or another model.
        rgb, channel_axis, channel, invert, scale : optional
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
            spec = VolumeSpec(invert=self._preprocessing.invert, scale=self._preprocessing.scale)
        overrides = {
            "rgb": rgb,
            "channel_axis": channel_axis,
            "channel": channel,
            "invert": invert,
            "scale": scale,
        }
        spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
        info, spec = describe_volume(array, spec)
        info = check_and_fingerprint(array, info, spec)
        with self._lock:
            self._volume, self._info, self._spec = array, info, spec
            shape = work_shape(info.slice_shape, spec.scale)
            self._work = replace(info, shape=(*info.leading_shape, *shape), slice_shape=shape)
            self._bounds = {}
            self.preprocessing = replace(self._preprocessing, invert=spec.invert, scale=spec.scale)
            feature_store = self._open_store(store, on_mismatch) if store is not None else None
            self.cache = FeatureCache(self.cache_bytes, feature_store)
        return info

    def adopt_features(self, other: VolumeEncoder) -> int:
        """Take over the features ``other`` has computed, if they are of this volume as read.

        The same data opened again (another array or layer of the same pixels, read the
        same way, with the same model): its slices need not be encoded a second time.

        Parameters
        ----------
        other : VolumeEncoder
            Another predictor, typically of a layer that was deleted.

        Returns
        -------
        int
            Slices taken over; 0 when ``other`` has no volume or its features depend on
            something else (data, reading, model or weights: :meth:`signature`).
        """
        if other is self or not (self.has_volume and other.has_volume):
            return 0
        if other.signature() != self.signature():
            return 0
        with self._lock, other._lock:
            n = self.cache.adopt(other.cache)
            self._bounds.update(other._bounds)
        return n

    def _open_store(
        self, path: str | Path, on_mismatch: Literal["recompute", "raise"]
    ) -> FeatureStore:
        coarse, fine = feature_shapes(self.model, self.work_info.slice_shape)
        return FeatureStore(path, self.signature(), self.info.n_slices, coarse, fine, on_mismatch)

    def signature(self) -> FeatureSignature:
        """Describe what the current volume's features depend on (the cache key)."""
        info = self.info
        return FeatureSignature(
            info.fingerprint,
            self.model_key,
            self.weights.sha256,
            self.preprocessing.key(),
            self.work_info.slice_shape,
        )

    def _read(self, k: int) -> np.ndarray:
        """Slice ``k`` as ``(H, W)`` or ``(H, W, 3)`` numpy (reads one slice of lazy data).

        In working pixels: resized by ``spec.scale`` (:attr:`work_info`).
        """
        image = read_slice(self._volume, self.info, self.spec, k)
        return resize_slice(image, self.work_info.slice_shape)

    def reset(self) -> None:
        """Forget the volume and its cached features."""
        with self._lock:
            self._volume = self._info = self._spec = self._work = None
            self._bounds = {}
            self.cache = FeatureCache(self.cache_bytes)

    # ---------------------------------------------------------------- features
    def _prepare(self, k: int) -> torch.Tensor:
        try:
            image = self._read(k)
            prep = self.preprocessing
            key = (prep.low, prep.high, k)
            if key not in self._bounds:
                self._bounds[key] = intensity_bounds(image, prep)
            x = normalize_slice(image, prep, self._bounds[key])
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
            where ``H', W'`` are the slice size in working pixels (:attr:`work_info`) rounded
            up to a multiple of 32.
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
