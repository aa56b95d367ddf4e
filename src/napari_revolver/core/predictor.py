"""The predictor: encode once per slice, answer many cheap guide and predict calls.

Shaped after segment-anything's ``SamPredictor``: :meth:`RevolverPredictor.set_volume` fixes the
data, :meth:`~RevolverPredictor.guide` turns points into a :class:`~.task.Task`, and
:meth:`~RevolverPredictor.predict_slice` / :meth:`~RevolverPredictor.propagate` apply tasks to
slices. Encoder features are cached per slice (:mod:`.features`), so a new click re-runs only
the guide and the segmentor.

Conventions: a volume is ``(..., Y, X)`` or ``(..., Y, X, 3)`` for RGB; every leading axis
(Z, T, image index) indexes 2D slices. Points are ``(N, ndim)`` in data pixels, leading
coordinates first, ``(y, x)`` last, as napari's Points layers hold them.

With ``set_volume(..., scale=s)`` the network sees each slice resized by ``s`` (:mod:`.scale`):
the predictor computes in those *working pixels* and converts once at its public methods, so
points, painted masks and every result stay in data pixels. The few methods the follower calls
with ``working=True``, or documented as in working pixels, are the exception.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from . import objects
from .compat import check_tasks
from .encoding import VolumeEncoder
from .labels import labels_from_probabilities
from .model.click_refiner import ClickRefiner, Window, crop_bounds
from .model.encoder import EncoderOutput
from .model.guide import GuideOutput, point_masks
from .pixel_fit import (
    FitInputs,
    PixelFit,
    fit_features,
    fit_inputs,
    validated_click_fit,
    validated_fit,
)
from .prior import label_support, local_priors
from .propagation import PropagationStep, finish_slice
from .scale import (
    labels_to_shape,
    mask_to_shape,
    painted_to_shape,
    points_to_work,
    probabilities_to_shape,
)
from .snap import bounding_box
from .task import Task
from .tiling import HEAD_OVERLAP, segment_slices
from .tracking import InstanceLinker
from .volume import (
    Index,
    VolumeInfo,
    VolumeSpec,
    check_points,
)

#: Annotations the network is guided by at once when validating a pixel fit (memory bound).
_FOLD_BATCH = 8
#: Side in coarse cells of a head window exact at one click (:func:`_head_window`): the head's
#: receptive field, plus two cells for the click's footprint, on each side.
_FOCUS_SIDE = 2 * (HEAD_OVERLAP + 2) + 1
#: Support slices whose pixel-fit inputs are kept (about 8 MB each at 512 x 512).
_FIT_INPUTS_KEPT = 2
#: A click fit's network scores on its clicks are read in one window per click when the
#: windows cover less than this share of the support slices (:meth:`RevolverPredictor.fit_clicks`).
CLICK_WINDOWS_SHARE = 0.5
#: Slice pixels around an object task's clicks in which its clicked slice's head pass is
#: exact (:meth:`RevolverPredictor.object_masks`); an object reaching further is redone on
#: the whole slice.
OBJECT_REACH = 96
#: Object windows covering more than this share of the slice are run on the whole slice.
OBJECT_WINDOW_SHARE = 0.6
#: Object tasks per head pass on a clicked slice (:meth:`RevolverPredictor.object_masks`).
OBJECT_HEAD_BATCH = 4
#: Bytes of object probabilities kept (:meth:`RevolverPredictor._object_probabilities`, one
#: object's at a time): a negative click changes neither an object's guide (its first
#: positive click) nor its local prior (its positive clicks), so the next click's head pass
#: is the last one's. The most recent is always kept.
OBJECT_PROBS_KEPT_BYTES = 64 * 2**20
#: Bytes of clicked-slice object masks kept (each cropped to its box): following an object
#: starts from the mask shown while it was clicked, not from a second head pass.
OBJECT_MASKS_KEPT_BYTES = 64 * 2**20

logger = logging.getLogger(__name__)

__all__ = [
    "PropagationStep",
    "RevolverPredictor",
    "VolumeInfo",
    "VolumeSpec",
    "labels_from_probabilities",
]


#: Pixels around a box that a pixel fit's probability there depends on: the widest filter
#: (sigma 16 px, three sigmas), the fit's smoothing (2 fine cells, three sigmas) and the
#: coarse features' interpolation, with room to spare.
FIT_REACH = 96


def _reads_inside(window: Window, box: tuple[int, int, int, int], shape: tuple[int, int]) -> bool:
    """Whether resampling ``window`` reads only slice pixels inside ``box`` ``(y0, y1, x0, x1)``."""
    y0, y1, x0, x1 = box
    ys, xs = crop_bounds(window, shape)
    return y0 <= ys.start and ys.stop <= y1 and x0 <= xs.start and xs.stop <= x1


class RevolverPredictor(VolumeEncoder):
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

    Attributes
    ----------
    refiner : ClickRefiner or None
        Redraws an object from its clicks after the selection (:func:`.objects.refined_mask`);
        the weights' own (``weights.refiner``) by default. ``None``: selection only.
    corrector : ClickRefiner or None
        Redraws an object at its corrections: every click on a slice after the object's first
        there. The weights' own (``weights.corrector``) by default; ``None``: :attr:`refiner`
        draws those too. Without a refiner it is not used.
    follower : ClickRefiner or None
        Moves followed objects from slice to slice (:func:`.objects.follow_objects`), the
        weights' own (``weights.follower``) by default. ``None``: each object's last mask is
        carried over and snapped to the image's edges (with ``follow_params.snap=None``, the
        watershed's mask instead).
    follow_params : FollowParams
        How object tasks are followed (end rules, snapping to edges; see
        :class:`.objects.FollowParams`).

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refiner: ClickRefiner | None = None
        self._follower: ClickRefiner | None = None
        self._corrector: ClickRefiner | None = None
        #: Clicked-slice object masks by :meth:`_object_key`: the box and the mask in it
        #: (``None``: empty), least recently used first.
        self._object_kept: OrderedDict[bytes, tuple[tuple[slice, slice], np.ndarray] | None] = (
            OrderedDict()
        )
        #: Guards both: the plugin's live clicks and its propagation worker share a predictor.
        self._kept_lock = threading.Lock()
        #: One object's probability on a clicked slice and its exact box, by
        #: :meth:`_object_probs_key`, least recently used first.
        self._object_probs: OrderedDict[bytes, tuple[np.ndarray, tuple[int, int, int, int]]] = (
            OrderedDict()
        )
        self.refiner = self.weights.refiner
        self.corrector = self.weights.corrector
        self.follower = self.weights.follower
        self.follow_params = objects.FollowParams()
        self._last_slice: tuple[tuple[object, ...], torch.Tensor] | None = None
        #: What pixel fits read on the last few support slices (clicks on one slice refit).
        self._fit_inputs: dict[tuple[object, ...], torch.Tensor] = {}

    @property
    def refiner(self) -> ClickRefiner | None:
        """The click refiner of object clicks, or ``None`` (see the class docstring)."""
        return self._refiner

    @refiner.setter
    def refiner(self, refiner: ClickRefiner | None) -> None:
        self._refiner = self._checked(refiner, "click refiner")
        self.forget_object_masks()  # they were drawn by the refiner before

    @property
    def corrector(self) -> ClickRefiner | None:
        """The click refiner of corrections, or ``None`` (see the class docstring)."""
        return self._corrector

    @corrector.setter
    def corrector(self, corrector: ClickRefiner | None) -> None:
        self._corrector = self._checked(corrector, "corrections refiner")
        self.forget_object_masks()  # corrections were drawn by another refiner before

    def _redrawer(self, correction: bool) -> ClickRefiner | None:
        """Return the refiner that redraws an object at a ``correction``, or at its first click."""
        if self.refiner is None:
            return None
        return self.corrector if correction and self.corrector is not None else self.refiner

    @property
    def follower(self) -> ClickRefiner | None:
        """The follower of object tasks through z and t, or ``None`` (see the class docstring)."""
        return self._follower

    @follower.setter
    def follower(self, follower: ClickRefiner | None) -> None:
        self._follower = self._checked(follower, "follower")

    def _checked(self, refiner: ClickRefiner | None, what: str) -> ClickRefiner | None:
        """Check that a refiner reads these weights' fine features; move it, in eval mode.

        A refiner reads the encoder's learnt fine channels, or those and the filter responses
        of a network with a task fit.
        """
        if refiner is None:
            return None
        cfg = self.model.config
        want = sorted({cfg.fine_channels, cfg.feature_fine_channels})
        got = refiner.config.feature_channels
        if got not in want:
            raise ValueError(
                f"the {what} reads {got} feature channels; these weights have "
                + " or ".join(map(str, want))
            )
        return refiner.to(self.device).eval()

    # ------------------------------------------------------------------- guide
    @torch.inference_mode()
    def guide(
        self,
        points: Any,
        labels: Any,
        *,
        name: str = "task",
        label_value: int = 1,
        kind: Literal["class", "object"] = "class",
        fit: bool | PixelFit | None = False,
    ) -> Task:
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
        kind : {"class", "object"}
            ``class``: everything like the positives. ``object``: the one object under the
            positive clicks, followed through the stack by :meth:`propagate` (negatives act
            by position only; see :mod:`.objects`).
        fit : bool or PixelFit or None
            Class tasks only. ``True``: let the clicks decide whether a per-task pixel fit
            replaces the network (:meth:`fit_clicks`; one network pass over the support, and
            where the network gets its own clicks wrong about one more per held-out click).
            A :class:`~.pixel_fit.PixelFit`: use that one (from an earlier :meth:`fit_clicks`
            of the same clicks). ``False`` or ``None`` (default): the network alone, the
            cheapest click.

        Returns
        -------
        Task
            ``Task.pixel_fit`` is set where ``fit`` made one.
        """
        if kind not in ("class", "object"):
            raise ValueError(f"kind must be 'class' or 'object'; got {kind!r}")
        if kind == "object" and fit not in (False, None):
            raise ValueError("a pixel fit is for class tasks; object tasks follow their object")
        info = self.info
        pts, lab = check_points(points, labels, info)
        n_lead = len(info.leading_shape)
        slices = np.rint(pts[:, :n_lead]).astype(int)
        total: GuideOutput | None = None
        for key in sorted({tuple(r) for r in slices.tolist()}):
            sel = (slices == np.asarray(key, int)).all(axis=1)
            if kind == "object":
                # The object's appearance is what its first positive click on a slice
                # shows; corrections and negatives act by position only (.objects).
                first = np.flatnonzero(sel & (lab == 1))[:1]
                if not len(first):
                    continue
                sel = np.isin(np.arange(len(sel)), first)
            f = self.features(key)
            grid = tuple(f.fine.shape[-2:])
            masks = point_masks(
                torch.from_numpy(self._work_yx(pts[sel, n_lead:])),
                torch.from_numpy(lab[sel]),
                grid,
                self.model.fine_stride,
            )
            g = self._guide_features(f, masks)
            total = g if total is None else total + g
        assert total is not None
        pixel_fit = fit if isinstance(fit, PixelFit) else None
        if fit is True:
            pixel_fit = self.fit_clicks(pts, lab)
        return replace(
            self._task(total, name, label_value, pts, lab), kind=kind, pixel_fit=pixel_fit
        )

    @torch.inference_mode()
    def fit_clicks(self, points: Any, labels: Any) -> PixelFit | None:
        """Fit a per-task pixel model to clicks, kept where held-out clicks show it helps.

        See :func:`.pixel_fit.validated_click_fit`: the network (guided by the clicks) and the
        fit are compared on each click held out in turn, only where the network gets more
        than :data:`.pixel_fit.CLICK_MARGIN` of its own clicks wrong.

        Parameters
        ----------
        points, labels : array-like
            As for :meth:`guide`.

        Returns
        -------
        PixelFit or None
            ``None``: the network alone (it reproduces its clicks, or fewer than
            :data:`.pixel_fit.MIN_CLICKS` clicks of a class).
        """
        info = self.info
        pts, lab = check_points(points, labels, info)
        n_lead = len(info.leading_shape)
        slices = [tuple(r) for r in np.rint(pts[:, :n_lead]).astype(int).tolist()]
        keys = sorted(set(slices))
        feats = [self.features(k) for k in keys]
        stride = self.model.fine_stride
        footprints = []
        for row, key in zip(pts, slices, strict=True):
            grid = tuple(feats[keys.index(key)].fine.shape[-2:])
            yx = self._work_yx(row[None, n_lead:])
            one = point_masks(torch.tensor(yx), torch.ones(1), grid, stride)  # yx may be read-only
            footprints.append((keys.index(key), one[0]))
        # One head window per click costs less than a pass over the slices when the slices
        # are large and the clicks few (the windows are exact at the clicks).
        shapes = [f.coarse.shape[-2:] for f in feats]
        windows = sum(
            min(_FOCUS_SIDE, shapes[i][0]) * min(_FOCUS_SIDE, shapes[i][1]) for i, _ in footprints
        )
        slices = sum(h * w for h, w in shapes)
        return validated_click_fit(
            lambda: [self._fit_features(info.flat(k), f) for k, f in zip(keys, feats, strict=True)],
            footprints,
            lab,
            lambda folds, focus: self._support_logits(feats, folds, focus),
            clicks_in_windows=windows < CLICK_WINDOWS_SHARE * slices,
        )

    def guide_mask(
        self, index: Index, mask: np.ndarray, *, name: str = "task", label_value: int = 1
    ) -> Task:
        """Turn a dense support mask ``(H, W)`` on slice ``index`` into a task (the densest shot).

        Every pixel is annotated: foreground where ``mask > 0``, background elsewhere. As
        :meth:`guide_labels`, the task gets a validated pixel fit (:mod:`.pixel_fit`).

        Raises
        ------
        ValueError
            A mask of another shape than the slices, or an empty one.
        """
        mask = np.asarray(mask)
        if mask.shape != self.info.slice_shape:
            raise ValueError(
                f"mask must have the slice shape {self.info.slice_shape}; got {mask.shape}"
            )
        if not mask.any():
            raise ValueError("the support mask is empty: it needs at least one foreground pixel")
        labels = np.where(mask > 0, 1, 2).astype(np.uint8)
        return self.guide_labels({index: labels}, name=name, label_value=label_value)

    @torch.inference_mode()
    def guide_labels(
        self,
        labels: Mapping[Index, np.ndarray],
        *,
        points: Any = None,
        point_labels: Any = None,
        name: str = "task",
        label_value: int = 1,
        fit: bool | PixelFit | None = True,
    ) -> Task:
        """Turn painted labels on one or more slices (and clicks) into a class task.

        Parameters
        ----------
        labels : mapping of index to np.ndarray
            Per support slice, ``(H, W)`` integer labels: 1 foreground, 2 background, 0 not
            annotated (ilastik's convention for two classes): brush strokes, or a painted slice.
        points, point_labels : array-like, optional
            Clicks guiding the task too, as for :meth:`guide`.
        name, label_value
            As for :meth:`guide`.
        fit : bool or PixelFit or None
            ``True``: fit a per-task pixel model to the painted cells and let cross-validation
            on them decide whether, and how much, it counts beside the network
            (:meth:`fit_labels`). A :class:`~.pixel_fit.PixelFit`: use that one (from an
            earlier :meth:`fit_labels` of the same labels). ``False`` or ``None``: the network
            alone.

        Returns
        -------
        Task
            ``Task.pixel_fit`` is set where the painted cells allowed a fit.

        Raises
        ------
        ValueError
            Labels of another shape than the slices, values other than 0, 1 and 2, or no
            foreground in the labels nor the clicks.
        """
        keys, feats, masks = self._label_masks(labels)
        has_points = points is not None and len(np.asarray(points))
        if not has_points and not any(bool((m[0] > 0).any()) for m in masks):
            raise ValueError("the labels have no foreground (1): a task needs some")
        pts, lab = np.zeros((0, self.info.ndim)), np.zeros(0, np.int8)
        total: GuideOutput | None = None
        if has_points:
            clicked = self.guide(points, point_labels, name=name, label_value=label_value)
            pts, lab, total = clicked.points, clicked.labels, self._guidance([clicked])
        for f, m in zip(feats, masks, strict=True):
            g = self._guide_features(f, m)
            total = g if total is None else total + g
        if total is None:
            raise ValueError("no support slice given, and no clicks")
        pixel_fit = fit if isinstance(fit, PixelFit) else None
        if fit is True and keys:
            pixel_fit = self._validated_fit(keys, feats, masks)
        support = tuple((k, m.numpy().astype(np.float32)) for k, m in zip(keys, masks, strict=True))
        task = self._task(total, name, label_value, pts, lab, support)
        return replace(task, pixel_fit=pixel_fit)

    @torch.inference_mode()
    def fit_labels(
        self, labels: Mapping[Index, np.ndarray], *, working: bool = False
    ) -> PixelFit | None:
        """Fit a per-task pixel model to painted labels, weighted by cross-validation.

        See :mod:`.pixel_fit`: the network (guided by the painted labels alone) and the fit are
        compared on held-out quadrants of the painted slices.

        Parameters
        ----------
        labels : mapping of index to np.ndarray
            As for :meth:`guide_labels`.
        working : bool
            The labels are in working pixels (:attr:`work_info`), as the follower gives them.

        Returns
        -------
        PixelFit or None
            ``None`` with fewer than :data:`.pixel_fit.MIN_CELLS` painted feature cells per
            class (or too few painted quadrants to compare on).
        """
        keys, feats, masks = self._label_masks(labels, working)
        return self._validated_fit(keys, feats, masks) if feats else None

    def _validated_fit(
        self,
        keys: Sequence[tuple[int, ...]],
        feats: Sequence[EncoderOutput],
        masks: Sequence[torch.Tensor],
    ) -> PixelFit | None:
        return validated_fit(
            [self._fit_features(self.info.flat(k), f) for k, f in zip(keys, feats, strict=True)],
            masks,
            lambda fold: self._support_logits(feats, [fold])[0],
        )

    def _fit_features(self, k: int, feats: EncoderOutput) -> torch.Tensor:
        """Return what pixel fits read on flat slice ``k`` (features ``feats``, batch 1).

        The last :data:`_FIT_INPUTS_KEPT` slices are kept: each click on a slice fits again.

        Returns
        -------
        torch.Tensor
            ``(D, h, w)``, see :func:`.pixel_fit.fit_features`.
        """
        key = (self.info.fingerprint, k, self.preprocessing.key())
        if key not in self._fit_inputs:
            while len(self._fit_inputs) >= _FIT_INPUTS_KEPT:
                self._fit_inputs.pop(next(iter(self._fit_inputs)))
            self._fit_inputs[key] = fit_features(feats, self._prepare(k)[None])[0]
        return self._fit_inputs[key]

    def _label_masks(
        self, labels: Mapping[Index, np.ndarray], working: bool = False
    ) -> tuple[list[tuple[int, ...]], list[EncoderOutput], list[torch.Tensor]]:
        """Check painted labels; return their slices, features and fine-grid masks.

        ``labels`` in data pixels, or in working pixels with ``working``.
        """
        info = self.work_info if working else self.info
        keys, feats, masks = [], [], []
        for index, lab in labels.items():
            lab = np.asarray(lab)
            if lab.shape != info.slice_shape:
                raise ValueError(
                    f"labels must have the slice shape {info.slice_shape}; got {lab.shape} "
                    f"on slice {index}"
                )
            bad = np.setdiff1d(np.unique(lab), [0, 1, 2])
            if len(bad):
                raise ValueError(
                    f"labels must be 0 (not annotated), 1 (foreground) or 2 (background); "
                    f"slice {index} has {bad[:5].tolist()}"
                )
            lab = painted_to_shape(lab, self.work_info.slice_shape)
            keys.append(info.unflat(info.flat(index)))
            feats.append(self.features(index))
            grid = tuple(feats[-1].fine.shape[-2:])
            masks.append(label_support(lab, grid, self.model.fine_stride))  # type: ignore[arg-type]
        return keys, feats, masks

    def _support_logits(
        self,
        feats: Sequence[EncoderOutput],
        folds: Sequence[Sequence[torch.Tensor]],
        focus: Sequence[tuple[int, tuple[int, int]]] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Return the network's logits on the support slices under each of several annotations.

        Parameters
        ----------
        feats : sequence of EncoderOutput
            The support slices' features (batch 1 each).
        folds : sequence of sequence of torch.Tensor
            Per annotation, one ``(2, h, w)`` mask per support slice.
        focus : sequence of (int, (int, int)), optional
            Per annotation, the support slice and fine cell ``(y, x)`` where its logits are
            read: the head runs only on a window around that cell reaching past its receptive
            field (:data:`.tiling.HEAD_OVERLAP`), so the logits there are those of a whole
            pass; elsewhere they are 0. ``None``: whole support slices.

        Returns
        -------
        list of list of torch.Tensor
            Per annotation, per support slice, the ``(h, w)`` logits at cell resolution of
            the network guided by that annotation alone.
        """
        stride = self.model.fine_stride
        xs = [f.to(self.device, torch.float32, memory_format=torch.channels_last) for f in feats]
        out: list[list[torch.Tensor]] = []
        for start in range(0, len(folds), _FOLD_BATCH):
            batch = folds[start : start + _FOLD_BATCH]
            n = len(batch)
            guidance = None
            for i, x in enumerate(xs):
                masks = torch.stack([fold[i] for fold in batch]).to(self.device)
                g = self.model.guide(
                    x.coarse.expand(n, -1, -1, -1), x.fine.expand(n, -1, -1, -1), masks
                )
                guidance = g if guidance is None else guidance + g
            assert guidance is not None
            if focus is None:
                per_slice = [
                    F.avg_pool2d(self.model.segment(x, guidance)[:, None], stride)[:, 0].cpu()
                    for x in xs
                ]
                out.extend([maps[b].float() for maps in per_slice] for b in range(n))
                continue
            windows = [_head_window(xs[i], cell) for i, cell in focus[start : start + n]]
            crops = EncoderOutput.cat(
                [
                    EncoderOutput(
                        xs[i].coarse[..., y0 // 2 : y1 // 2, x0 // 2 : x1 // 2],
                        xs[i].fine[..., y0:y1, x0:x1],
                    )
                    for (i, _), (y0, y1, x0, x1) in zip(
                        focus[start : start + n], windows, strict=True
                    )
                ]
            )
            logits = F.avg_pool2d(self.model.segment(crops, guidance)[:, None], stride)[:, 0]
            for b, ((i, _), (y0, y1, x0, x1)) in enumerate(
                zip(focus[start : start + n], windows, strict=True)
            ):
                maps = [torch.zeros(x.fine.shape[-2:]) for x in xs]
                maps[i][y0:y1, x0:x1] = logits[b].float().cpu()
                out.append(maps)
        return out

    def guide_features(self, f: EncoderOutput, masks: torch.Tensor) -> GuideOutput:
        """Pool features ``f`` (batch 1) under guide masks ``(2, h, w)`` on the fine grid."""
        return self._guide_features(f, masks)

    def guidance_of(self, tasks: Sequence[Task]) -> GuideOutput:
        """Return the guidance of ``tasks`` (batch T) on this predictor's device, checked."""
        return self._guidance(tasks)

    @torch.inference_mode()
    def probability_with(
        self, index: Index, guidance: GuideOutput, prior: torch.Tensor | None = None
    ) -> np.ndarray:
        """Probability ``(H, W)`` on one slice under one guidance and an optional prior.

        ``prior`` is ``(1, 3, h, w)`` (:func:`.model.guide.local_prior`). In working pixels
        (:attr:`work_info`), as the follower reads it.
        """
        f = self.features(index).to(self.device, torch.float32)
        prior = None if prior is None else prior.to(self.device)
        logits = segment_slices(self.model, f, guidance, self.work_info.slice_shape, prior)
        return torch.sigmoid(logits)[0].cpu().numpy()

    def object_mask(self, index: Index, task: Task, *, threshold: float = 0.5) -> np.ndarray:
        """Select an object task's object on one of its clicked slices: ``(H, W)`` bool."""
        return self.object_masks(index, [task], threshold=threshold)[0]

    def object_masks(
        self,
        index: Index,
        tasks: Sequence[Task],
        *,
        threshold: float = 0.5,
        working: bool = False,
    ) -> list[np.ndarray]:
        """:meth:`object_mask` of several object tasks clicked on one slice.

        On a large slice the head runs in a window around each object's clicks
        (:data:`OBJECT_REACH` pixels plus the head's receptive field), where it is exact; an
        object whose selection or refiner window reaches beyond it is redone in a wider
        window, then on the whole slice. The masks are those of the whole slice.

        The masks are kept (:data:`OBJECT_MASKS_KEPT_BYTES`): asked again for an object
        with the same clicks and guidance on the same slice of the same volume (following
        it from the slice it was clicked on), the mask it got is returned without another
        head pass.

        ``working``: the tasks are in working pixels (:meth:`work_task`) and so are the masks,
        as the follower calls it.

        Returns
        -------
        list of np.ndarray
            ``(H, W)`` bool per task: the selection, redrawn by :attr:`refiner` if there is one,
            and made to agree with every click on the slice (:func:`.objects.obey_clicks`).

        Raises
        ------
        ValueError
            A task without a positive click on this slice.
        """
        if not working:
            work = [self.work_task(t) for t in tasks]
            masks = self.object_masks(index, work, threshold=threshold, working=True)
            return [mask_to_shape(m, self.info.slice_shape) for m in masks]
        key = self.info.unflat(self.info.flat(index))
        clicks = [objects.clicks_on(t, key, self.info) for t in tasks]
        for t, (_, lab) in zip(tasks, clicks, strict=True):
            if not (lab == 1).any():
                raise ValueError(
                    f"object task {t.name!r} has no positive click on slice {key}; "
                    "use propagate(task) to follow it there"
                )
        k = self.info.flat(key)
        ids = [self._object_key(t, k, threshold) for t in tasks]
        out: list[np.ndarray | None] = [self._kept_object(i) for i in ids]
        todo = [j for j, m in enumerate(out) if m is None]
        if todo:
            previous = self._previous_masks(key, [tasks[j] for j in todo], threshold)
            masks = self._new_object_masks(
                k, [tasks[j] for j in todo], [clicks[j] for j in todo], threshold, previous
            )
            for j, m in zip(todo, masks, strict=True):
                self._keep_object(ids[j], m)
                out[j] = m
        return out  # type: ignore[return-value]

    def _previous_masks(
        self, key: tuple[int, ...], tasks: Sequence[Task], threshold: float
    ) -> list[np.ndarray | None]:
        """Return each task's mask on slice ``key`` before its last click there.

        For a refiner that reads it (``RefinerConfig.previous_mask``); ``None`` where there is
        none, or the refiner does not read it. A mask is a function of the clicks in their
        order: the one before the last click is that of the task without it (kept from when
        it was shown, or computed the same way).
        """
        out: list[np.ndarray | None] = [None] * len(tasks)
        redrawer = self._redrawer(correction=True)
        if redrawer is None or not redrawer.config.previous_mask:
            return out
        k = self.info.flat(key)
        before = [objects.without_last_click(t, key, self.info) for t in tasks]
        todo = [j for j, t in enumerate(before) if t is not None]
        # Masks not kept further back (a task loaded with many clicks, a click deleted) are
        # computed oldest first, so each finds its own previous one kept: no deep recursion.
        # The walk stops at the first kept mask: as a user clicks, the one just before.
        for j in todo:
            back: list[Task] = []
            t = before[j]
            while t is not None and self._object_key(t, k, threshold) not in self._object_kept:
                back.append(t)
                t = objects.without_last_click(t, key, self.info)
            for t in reversed(back[1:]):  # back[0], before[j] itself, is computed below
                self.object_masks(key, [t], threshold=threshold, working=True)
        if todo:
            masks = self.object_masks(
                key, [before[j] for j in todo], threshold=threshold, working=True
            )
            for j, m in zip(todo, masks, strict=True):
                out[j] = m if m.any() else None
        return out

    def _new_object_masks(
        self,
        k: int,
        tasks: Sequence[Task],
        clicks: Sequence[tuple[np.ndarray, np.ndarray]],
        threshold: float,
        previous: Sequence[np.ndarray | None] | None = None,
    ) -> list[np.ndarray]:
        """Compute :meth:`object_masks` on flat slice ``k`` (nothing kept is read).

        ``previous``: per task, its mask before its last click (:meth:`_previous_masks`),
        which the refiner reads in place of the selection. An object's first click on the
        slice is redrawn by :attr:`refiner`, its corrections by :attr:`corrector` if set.
        """
        previous = previous if previous is not None else [None] * len(tasks)
        # A correction is any click on the slice after the object's first there: drawn by
        # the corrector where there is one, every first click by the refiner.
        correcting = [len(lab) > 1 for _, lab in clicks]
        boxes: dict[int, tuple[int, int, int, int]] = {}  # where a probability is exact
        args = (k, tasks, clicks, threshold, previous, correcting)

        def reprobe(j: int, window: Window) -> np.ndarray | None:
            # A redraw reading beyond the box of its probability: the whole slice's.
            if _reads_inside(window, boxes[j], self.work_info.slice_shape):
                return None
            return self._object_probabilities(k, [tasks[j]], [clicks[j]], None)[0][0]

        if self.refiner is None:
            masks = [sel for _, sel, _, _ in self._selections(*args, range(len(tasks)), boxes)]
        else:
            # Each refiner redraws the windows of many objects in one pass.
            here = self.refiner_slice(self.info.unflat(k))
            masks = [np.zeros(0, bool)] * len(tasks)
            # One pass per refiner: without a corrector, first clicks and corrections share it.
            groups: dict[int, tuple[ClickRefiner, list[int]]] = {}
            for j in sorted(range(len(tasks)), key=correcting.__getitem__):  # first clicks first
                r = self._redrawer(correcting[j])
                assert r is not None
                groups.setdefault(id(r), (r, []))[1].append(j)
            for refiner, which in groups.values():
                drawn = objects.refined_masks(
                    refiner,
                    *here,
                    self._selections(*args, which, boxes),
                    reprobe=lambda i, window, which=which: reprobe(which[i], window),
                )
                for j, m in zip(which, drawn, strict=True):
                    masks[j] = m
        # Every click is obeyed, whatever the network drew.
        return [
            objects.obey_clicks(m, pts, lab) for m, (pts, lab) in zip(masks, clicks, strict=True)
        ]

    def _selections(
        self,
        k: int,
        tasks: Sequence[Task],
        clicks: Sequence[tuple[np.ndarray, np.ndarray]],
        threshold: float,
        previous: Sequence[np.ndarray | None],
        correcting: Sequence[bool],
        which: Sequence[int],
        boxes: dict[int, tuple[int, int, int, int]],
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield the selections of tasks ``which`` on flat slice ``k`` for their refiner.

        Per task ``(prob, selection, points, labels)`` as :func:`.objects.refined_masks` reads
        them; each task's box where its probability is exact goes into ``boxes``.
        """
        for i in range(0, len(which), OBJECT_HEAD_BATCH):
            # A few tasks per head pass: faster than one at a time, and than one batch of
            # many, whose activations outgrow the caches (50 objects on a 512 x 512
            # slice: 364 ms one by one, 272 ms by 4, 497 ms by 16).
            batch = which[i : i + OBJECT_HEAD_BATCH]
            near = self._object_probabilities(
                k, [tasks[j] for j in batch], [clicks[j] for j in batch], OBJECT_REACH
            )
            for j, (prob, box) in zip(batch, near, strict=True):
                (pts, lab), prev = clicks[j], previous[j]
                found = self._selection_in(prob, box, pts, lab, threshold, prev, correcting[j])
                # An object reaching beyond its box: a wider one, then the whole slice.
                for reach in (OBJECT_REACH * 3, None):
                    if found is not None:
                        break
                    [(prob, box)] = self._object_probabilities(k, [tasks[j]], [(pts, lab)], reach)
                    found = self._selection_in(prob, box, pts, lab, threshold, prev, correcting[j])
                assert found is not None
                boxes[j] = box
                yield prob, *found

    def forget_object_masks(self) -> None:
        """Forget the kept clicked-slice object masks and probabilities (computed anew).

        Nothing else needs it: a mask is only read back for the same volume, slice, clicks
        and guidance, a probability for the same guidance and positive clicks. Timing a
        click that repeats the same clicks does.
        """
        with self._kept_lock:
            self._object_kept.clear()
            self._object_probs.clear()

    def _object_key(self, task: Task, k: int, threshold: float) -> bytes:
        """Digest of everything an object's mask on flat slice ``k`` depends on.

        The volume and its reading, the slice, the threshold, and the task's guidance and
        clicks (the refiner is the predictor's: setting another one forgets every mask).
        """
        parts = (self.info.fingerprint, self.preprocessing.key(), k, float(threshold))
        return _task_digest(task, parts, (task.points, task.labels))

    def _kept_object(self, key: bytes) -> np.ndarray | None:
        """Return a kept clicked-slice mask as a new ``(H, W)`` array (``None``: not kept)."""
        with self._kept_lock:
            if key not in self._object_kept:
                return None
            self._object_kept.move_to_end(key)
            kept = self._object_kept[key]
        mask = np.zeros(self.work_info.slice_shape, bool)
        if kept is not None:
            box, crop = kept
            mask[box] = crop
        return mask

    def _keep_object(self, key: bytes, mask: np.ndarray) -> None:
        """Keep a clicked-slice mask, cropped; forget the oldest beyond the memory budget.

        The budget is :data:`OBJECT_MASKS_KEPT_BYTES`; the most recent mask is always kept.
        """
        kept = None
        if mask.any():
            box = bounding_box(mask, 0)
            kept = (box, mask[box].copy())
        with self._kept_lock:
            self._object_kept[key] = kept
            self._object_kept.move_to_end(key)
            size = sum(v[1].nbytes for v in self._object_kept.values() if v is not None)
            while size > OBJECT_MASKS_KEPT_BYTES and len(self._object_kept) > 1:
                _, old = self._object_kept.popitem(last=False)
                size -= 0 if old is None else old[1].nbytes

    def _selection_in(
        self,
        prob: np.ndarray,
        box: tuple[int, int, int, int],
        points: np.ndarray,
        labels: np.ndarray,
        threshold: float,
        previous: np.ndarray | None = None,
        correction: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Select an object from a probability exact only in ``box`` (see ``object_masks``).

        Returns the selection and the clicks that decide it (the refiner sees those only:
        :func:`.objects.select_in_box`); ``None`` where the selection, or what the refiner
        that redraws it (:meth:`_redrawer` of ``correction``) reads, could depend on the
        probability outside the box. ``previous``: the mask before the last click, returned
        in place of the selection (a refiner that reads it redraws that).
        """
        y0, y1, x0, x1 = box
        h, w = prob.shape
        found = objects.select_in_box(
            prob[y0:y1, x0:x1],
            box,
            prob.shape,
            points,
            labels,
            threshold=threshold,
            bound=objects.SELECT_BOUND,
        )
        if found is None:
            return None
        sel, deciding = found
        if previous is not None:
            sel = previous
        points, labels = points[deciding], labels[deciding]
        redrawer = self._redrawer(correction)
        if redrawer is None or box == (0, h, 0, w):
            return sel, points, labels
        window = objects.refiner_window(redrawer, sel, points)
        return (sel, points, labels) if _reads_inside(window, box, sel.shape) else None

    def _object_probabilities(
        self,
        k: int,
        tasks: Sequence[Task],
        clicks: Sequence[tuple[np.ndarray, np.ndarray]],
        reach: int | None,
    ) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
        """:meth:`_probabilities_around`, one object's kept for the clicks that keep it.

        An object's probability depends on its guide (its first positive click) and its local
        prior (its positive clicks), not on its negative clicks: after a negative click it is
        read back (:data:`OBJECT_PROBS_KEPT_BYTES`) instead of running the head again.
        Several objects at once (following, objects clicked together) are computed.
        """
        if len(tasks) != 1:
            return self._probabilities_around(k, tasks, clicks, reach)
        key = self._object_probs_key(k, tasks[0], reach)
        with self._kept_lock:
            kept = self._object_probs.get(key)
            if kept is not None:
                self._object_probs.move_to_end(key)
        if kept is None:
            [kept] = self._probabilities_around(k, tasks, clicks, reach)
            with self._kept_lock:
                self._object_probs[key] = kept
                size = sum(p.nbytes for p, _ in self._object_probs.values())
                while size > OBJECT_PROBS_KEPT_BYTES and len(self._object_probs) > 1:
                    _, (old, _) = self._object_probs.popitem(last=False)
                    size -= old.nbytes
        prob, box = kept
        return [(prob.copy(), box)]  # a copy: what is kept does not change

    def _object_probs_key(self, k: int, task: Task, reach: int | None) -> bytes:
        """Digest of everything an object's probability on flat slice ``k`` depends on.

        The volume and its reading, the slice, the window's reach and the refiners' view
        (:meth:`_redraw_context`), and the task's guidance, positive clicks and support masks
        (its local prior); its negative clicks do not count.
        """
        parts = (
            self.info.fingerprint,
            self.preprocessing.key(),
            k,
            reach,
            self._redraw_context(),
            OBJECT_WINDOW_SHARE,
        )
        positive = task.points[task.labels == 1] if len(task.points) else task.points
        support = [a for at, m in task.support_masks for a in (np.asarray(at), m)]
        return _task_digest(task, parts, (positive, *support))

    def _redraw_context(self) -> float:
        """Return the widest view of the refiners that may redraw an object (1 without any)."""
        return max(
            (r.config.context for r in map(self._redrawer, (False, True)) if r is not None),
            default=1.0,
        )

    @torch.inference_mode()
    def _probabilities_around(
        self,
        k: int,
        tasks: Sequence[Task],
        clicks: Sequence[tuple[np.ndarray, np.ndarray]],
        reach: int | None,
    ) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
        """Probability of object tasks on flat slice ``k``, computed around their clicks.

        The head runs on one window per task: the clicks' bounding box grown by ``reach``
        pixels, plus :data:`.tiling.HEAD_OVERLAP` coarse cells, where the head is exact only
        in the inner box. It runs on the whole slice when ``reach`` is ``None``, when the
        windows would cover most of the slice, or when a task has a pixel fit.

        Returns
        -------
        list of (np.ndarray, tuple of int)
            Per task, the ``(H, W)`` float32 probability (0 outside its window) and the box
            ``(y0, y1, x0, x1)`` of slice pixels where it equals the whole slice's.
        """
        feats = self._features([k])
        hc, wc = feats.coarse.shape[-2:]
        h, w = self.work_info.slice_shape
        context = self._redraw_context()
        # Around the positive clicks: a negative click far from them decides nothing.
        boxes = [_click_cells(pts[lab == 1], reach or 0, context, (hc, wc)) for pts, lab in clicks]
        side_y = min(hc, max(b[1] - b[0] for b in boxes) + 2 * HEAD_OVERLAP)
        side_x = min(wc, max(b[3] - b[2] for b in boxes) + 2 * HEAD_OVERLAP)
        fits = any(t.pixel_fit is not None and t.pixel_fit.active for t in tasks)
        if reach is None or fits or side_y * side_x > OBJECT_WINDOW_SHARE * hc * wc:
            probs = self.predict_proba(self.info.unflat(k), tasks, working=True)
            return [(p, (0, h, 0, w)) for p in probs]
        prior = None
        if self.model.config.local_prior:
            grid = tuple(feats.fine.shape[-2:])
            stride = self.model.fine_stride
            prior = local_priors(tasks, self.info, [k], False, grid, stride)  # type: ignore[arg-type]
        windows = []
        for cy0, cy1, cx0, cx1 in boxes:
            y0 = min(max((cy0 + cy1 - side_y) // 2, 0), hc - side_y)
            x0 = min(max((cx0 + cx1 - side_x) // 2, 0), wc - side_x)
            windows.append((y0, y0 + side_y, x0, x0 + side_x))
        # Cropped before they are converted: on a large slice most of it is never read.
        crops = EncoderOutput.cat(
            [
                EncoderOutput(
                    feats.coarse[..., y0:y1, x0:x1],
                    feats.fine[..., 2 * y0 : 2 * y1, 2 * x0 : 2 * x1],
                )
                for y0, y1, x0, x1 in windows
            ]
        ).to(self.device, torch.float32, memory_format=torch.channels_last)
        if prior is not None:
            prior = torch.cat(
                [
                    prior[i : i + 1, :, 2 * y0 : 2 * y1, 2 * x0 : 2 * x1]
                    for i, (y0, y1, x0, x1) in enumerate(windows)
                ]
            ).to(self.device)
        probs = torch.sigmoid(self.model.segment(crops, self._guidance(tasks), prior=prior))
        probs = probs.float().cpu().numpy()
        out = []
        for p, (y0, y1, x0, x1) in zip(probs, windows, strict=True):
            full = np.zeros((h, w), np.float32)
            py1, px1 = min(8 * y1, h), min(8 * x1, w)
            full[8 * y0 : py1, 8 * x0 : px1] = p[: py1 - 8 * y0, : px1 - 8 * x0]
            # Exact where the head's whole receptive field lies in the window.
            ey0 = 8 * (y0 + HEAD_OVERLAP) if y0 > 0 else 0
            ex0 = 8 * (x0 + HEAD_OVERLAP) if x0 > 0 else 0
            ey1 = min(8 * (y1 - HEAD_OVERLAP), h) if y1 < hc else h
            ex1 = min(8 * (x1 - HEAD_OVERLAP), w) if x1 < wc else w
            out.append((full, (ey0, ey1, ex0, ex1)))
        return out

    def refiner_slice(self, index: Index) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return a slice as the refiners read it, in working pixels (:attr:`work_info`).

        Returns
        -------
        image : torch.Tensor
            ``(C, H, W)`` the normalised slice (kept for the next call on the same slice).
        fine : torch.Tensor
            ``(Cf, h, w)`` its cached fine features.
        fine_stride : int
            Slice pixels per fine feature cell.
        """
        k = self.info.flat(index)
        key = (self.info.fingerprint, k, self.preprocessing.key())
        if self._last_slice is None or self._last_slice[0] != key:
            self._last_slice = (key, self._prepare(k))
        fine = self.features(self.info.unflat(k)).fine[0]
        return self._last_slice[1], fine, self.model.fine_stride

    def work_task(self, task: Task) -> Task:
        """Return ``task`` in working pixels (:attr:`work_info`); itself at scale 1.

        Its clicks' ``(y, x)`` and its known object masks on this volume are resized by the
        volume's ``scale`` (:mod:`.scale`); what the predictor computes reads these. Tasks
        given to and returned by the public methods are in data pixels.
        """
        s = self.preprocessing.scale
        if s == 1:
            return task
        shape, data = self.work_info.slice_shape, self.info.slice_shape
        pts = np.array(task.points, np.float64)
        if len(pts) and pts.shape[1] == self.info.ndim:
            pts[:, -2:] = points_to_work(pts[:, -2:], data, shape)
        known = task.object_masks if task.source == self.info.fingerprint else ()
        masks = tuple((k, mask_to_shape(m, shape) if m.shape == data else m) for k, m in known)
        return replace(task, points=pts, object_masks=masks)

    def _work_yx(self, yx: np.ndarray) -> np.ndarray:
        """Data-pixel ``(N, 2)`` ``(y, x)`` in working pixels (float64)."""
        return points_to_work(yx, self.info.slice_shape, self.work_info.slice_shape)

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
        vectors = {
            k: getattr(g, k)[0].float().cpu().numpy() for k in ("sum_coarse", "sum_fine", "mass")
        }
        if g.moments is not None:
            vectors["moments"] = g.moments[0].float().cpu().numpy()
        provenance = {"model_key": self.model_key, "weights_sha256": self.weights.sha256}
        return Task(
            name=name,
            points=pts,
            labels=lab,
            label_value=label_value,
            source=self.info.fingerprint,
            support_masks=support_masks,
            invert=self.preprocessing.invert,
            scale=self.preprocessing.scale,
            **vectors,
            **provenance,
        )

    def _guidance(self, tasks: Sequence[Task]) -> GuideOutput:
        prep = self.preprocessing
        check_tasks(tasks, self.model_key, self.weights.sha256, prep.invert, prep.scale)
        d = self.device
        moments = None
        if self.model.config.task_fit:
            missing = [t.name for t in tasks if t.moments is None]
            if missing:
                raise ValueError(
                    f"tasks {missing} have no support moments, which these weights need; "
                    "guide them again with this predictor"
                )
            moments = torch.from_numpy(np.stack([t.moments for t in tasks])).to(d)  # type: ignore[arg-type]
        return GuideOutput(
            torch.from_numpy(np.stack([t.sum_coarse for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.sum_fine for t in tasks])).to(d),
            torch.from_numpy(np.stack([t.mass for t in tasks])).to(d),
            moments,
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
        # Channels-last: the segmentor reads the features pixel by pixel (see its fusion).
        f = feats.to(self.device, torch.float32, memory_format=torch.channels_last)
        logits = segment_slices(self.model, f, guidance, self.work_info.slice_shape, prior)
        # A pixel fit models what a class looks like; a task followed by position (``local``,
        # one object through z or t) keeps the network, whose prior carries the positions.
        fits = [None if local else t.pixel_fit for t in tasks]
        if any(p is not None and p.active for p in fits):
            cells = fit_inputs(f, torch.stack([self._prepare(k) for k in ks]))
            for j, p in enumerate(fits):
                if p is not None and p.active:
                    logits[j::n_t] = p.combine(logits[j::n_t], self._fit_logits(p, cells))
        return torch.sigmoid(logits).reshape(n_s, n_t, *logits.shape[-2:])

    def _fit_logits(
        self, fit: PixelFit, cells: FitInputs, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """Return a pixel fit's logits ``(S, H, W)`` on ``cells``, in pixels.

        ``size``: the ``(H, W)`` pixels the cells cover (default the slice shape).
        """
        h, w = size or self.work_info.slice_shape
        return F.interpolate(
            fit.logits(cells)[:, None],
            scale_factor=self.model.fine_stride,
            mode="bilinear",
            align_corners=False,
        )[:, 0, :h, :w]

    @torch.inference_mode()
    def fit_probability(
        self, index: Index, fit: PixelFit, box: tuple[slice, slice] | None = None
    ) -> np.ndarray:
        """Return a pixel fit's own probability ``(H, W)`` on one slice (no network mixed in).

        In working pixels (:attr:`work_info`), ``box`` too, as the follower reads it.

        Parameters
        ----------
        index : int or tuple of int
            The slice.
        fit : PixelFit
            Made on this network's features (:meth:`fit_labels`).
        box : (slice, slice), optional
            The pixels that are needed: the fit is read in this box grown by
            :data:`FIT_REACH` pixels, where it is the whole slice's (to float rounding), and
            is 0 outside it. Default: the whole slice.
        """
        k = self.info.flat(index)
        f = self.features(index).to(self.device, torch.float32)
        image = self._prepare(k)
        h, w = self.work_info.slice_shape
        box = box or (slice(0, h), slice(0, w))
        # Grown by the reach, on the coarse grid (a whole number of cells of every grid); to
        # the slice's end where it reaches it (the features there are padded as a whole).
        fine = self.model.fine_stride
        unit = fine * f.fine.shape[-2] // f.coarse.shape[-2]
        lo, hi = [], []
        for b, n in zip(box, (h, w), strict=True):
            lo.append(max(0, (b.start - FIT_REACH) // unit * unit))
            end = -(-(b.stop + FIT_REACH) // unit) * unit
            hi.append(None if end >= n else end)
        (y0, x0), (y1, x1) = lo, hi
        crop = EncoderOutput(
            f.coarse[..., y0 // unit : y1 and y1 // unit, x0 // unit : x1 and x1 // unit],
            f.fine[..., y0 // fine : y1 and y1 // fine, x0 // fine : x1 and x1 // fine],
        )
        cells = fit_inputs(crop, image[None, :, y0:y1, x0:x1])
        y1, x1 = y1 or h, x1 or w
        logits = self._fit_logits(fit, cells, (y1 - y0, x1 - x0))[0]
        out = np.zeros((h, w), np.float32)
        out[y0:y1, x0:x1] = torch.sigmoid(logits).cpu().numpy()
        return out

    def predict_proba(
        self,
        index: Index,
        tasks: Task | Sequence[Task],
        *,
        local: bool = False,
        working: bool = False,
    ) -> np.ndarray:
        """Foreground probability of each task on one slice: ``(T, H, W)`` float32.

        ``local``: see :meth:`propagate`. ``working``: the tasks and the probabilities are in
        working pixels (:attr:`work_info`).
        """
        tasks = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not tasks:
            raise ValueError("no task given")
        if not working:
            tasks = [self.work_task(t) for t in tasks]
        k = self.info.flat(index)
        probs = self._probabilities(self._features([k]), tasks, self._guidance(tasks), [k], local)
        out = probs[0].cpu().numpy()
        return out if working else probabilities_to_shape(out, self.info.slice_shape)

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
        task_list = [task] if isinstance(task, Task) else list(task)
        if _kinds(task_list) == "object":
            return self._predict_objects(index, task_list, threshold, isinstance(task, Task))
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
            With ``labels``: instance ids instead of task values, linked through z and t by
            overlap with the neighbouring slice (:mod:`.tracking`).
        batch_size : int, optional
            Slices per batch (default the predictor's).
        cache : bool
            Keep newly computed features in memory (and in the store). A one-pass run over a
            long stack passes ``False``: memory then stays at one batch, whatever the length.
        local : bool
            Annotations act by position on their own slice always; with ``local`` also on
            every other slice of their volume, from the nearest annotated slice (following one
            object through z or time; see :mod:`.prior`). Leave it off for a collection of
            unrelated images stacked together.
            A task's pixel fit (``Task.pixel_fit``) is not used with ``local``: it models
            what a class looks like, while ``local`` follows one object by position.

        Yields
        ------
        PropagationStep
        """
        task_list = [tasks] if isinstance(tasks, Task) else list(tasks)
        if not task_list:
            raise ValueError("no task given")
        if output not in ("labels", "masks", "probabilities"):
            raise ValueError(f"output must be 'labels', 'masks' or 'probabilities'; got {output!r}")
        if _kinds(task_list) == "object":
            if output != "labels":
                raise ValueError(f"object tasks give output='labels'; got {output!r}")
            self._guidance(task_list)  # the compatibility check
            work = [self.work_task(t) for t in task_list]
            steps = objects.follow_objects(
                self, work, indices, threshold=threshold, params=self.follow_params
            )
            for step in steps:
                yield replace(step, result=labels_to_shape(step.result, self.info.slice_shape))
            return
        guidance = self._guidance(task_list)
        task_list = [self.work_task(t) for t in task_list]
        linker = InstanceLinker(self.info) if instances and output == "labels" else None
        ks = self.info.flat_indices(indices)
        bs = batch_size or self.batch_size
        total = len(ks)
        for i in range(0, total, bs):
            batch = ks[i : i + bs]
            feats = self._features(batch, remember=cache)
            probs = self._probabilities(feats, task_list, guidance, batch, local).cpu().numpy()
            probs = probabilities_to_shape(probs, self.info.slice_shape)
            for j, k in enumerate(batch):
                res = finish_slice(probs[j], task_list, threshold, instances, output)
                key = self.info.unflat(k)
                if linker is not None:
                    res = linker.link(key, res)
                yield PropagationStep(key, res, i + j + 1, total)

    def _predict_objects(
        self, index: Index, tasks: list[Task], threshold: float, one: bool
    ) -> np.ndarray:
        """Object tasks on one slice: clicked objects directly, others followed there."""
        key = self.info.unflat(self.info.flat(index))
        if one and (objects.clicks_on(tasks[0], key, self.info)[1] == 1).any():
            return self.object_mask(index, tasks[0], threshold=threshold)
        result = None
        for step in self.propagate(tasks, [key], threshold=threshold):
            result = step.result
        assert result is not None
        return result == tasks[0].label_value if one else result

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


def _task_digest(task: Task, parts: Sequence[object], arrays: Sequence[np.ndarray | None]) -> bytes:
    """Digest of ``parts`` (by ``repr``), ``task``'s guidance and reading, and ``arrays``.

    The task's kind, model, weights, polarity, guide sums and pixel fit always count.
    """
    h = hashlib.blake2b(digest_size=20)
    for part in (*parts, task.kind, task.model_key, task.weights_sha256, task.invert):
        h.update(repr(part).encode())
    for a in (task.sum_coarse, task.sum_fine, task.mass, task.moments, *arrays):
        a = np.ascontiguousarray(np.zeros(0) if a is None else a)
        h.update(repr((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    if task.pixel_fit is not None:
        h.update(repr(task.pixel_fit.to_dict()).encode())
    return h.digest()


def _kinds(tasks: Sequence[Task]) -> str:
    """``"class"`` or ``"object"``: the one kind of ``tasks`` (mixing them is refused)."""
    kinds = {t.kind for t in tasks}
    if len(kinds) > 1:
        raise ValueError("tasks mix kind='class' and kind='object'; apply them separately")
    return kinds.pop()


def _head_window(f: EncoderOutput, cell: tuple[int, int]) -> tuple[int, int, int, int]:
    """Fine-grid window ``(y0, y1, x0, x1)`` around ``cell`` in which the head is exact there.

    The window reaches :data:`.tiling.HEAD_OVERLAP` coarse cells (plus two for a click's
    footprint) beyond the cell on each side, clipped to the slice and kept at one size (so
    windows batch), and its corners are on the coarse grid.
    """
    hc, wc = f.coarse.shape[-2:]
    reach = _FOCUS_SIDE // 2
    box = []
    for c, size in ((cell[0] // 2, hc), (cell[1] // 2, wc)):
        side = min(_FOCUS_SIDE, size)
        lo = min(max(c - reach, 0), size - side)
        box += [2 * lo, 2 * (lo + side)]
    return box[0], box[1], box[2], box[3]


def _click_cells(
    points: np.ndarray, reach: int, context: float, grid: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Coarse cells ``(y0, y1, x0, x1)`` around an object's clicks that its head pass needs.

    The clicks' box grown by ``reach`` pixels, and by what a refiner window around the clicks
    (a square ``context`` times their box's longer side, read with a 2-pixel margin) adds.
    """
    yx = np.asarray(points, float).reshape(-1, 2)
    lo, hi = yx.min(0), yx.max(0) + 1
    span = hi - lo
    grow = reach + np.maximum(span.max() * context - span, 0) / 2 + 2
    lo = np.floor((lo - grow) / 8).astype(int)
    hi = np.ceil((hi + grow) / 8).astype(int)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, grid)
    return int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1])
