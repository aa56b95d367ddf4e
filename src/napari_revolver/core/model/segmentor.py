"""Segmentor f: fuses query features with the task vector and decodes a full-resolution mask."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .guide import PRIOR_CHANNELS
from .task_fit import TaskFit


def _cosine_maps(features: torch.Tensor, z: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every query position to each polarity's vector.

    ``features (B, C, h, w)``, ``z (B, 2, C)``, ``present (B, 2)`` -> ``(B, 2, h, w)``.
    The segmentor folds this into its fusion (:meth:`Segmentor.forward`); it is kept as the
    plain statement of what the fusion computes.
    """
    fn = F.normalize(features, dim=1)
    zn = F.normalize(z, dim=2)
    return torch.einsum("bchw,bpc->bphw", fn, zn) * present[:, :, None, None]


def _inverse_norm(features: torch.Tensor) -> torch.Tensor:
    """``1 / max(|f|, eps)`` over channels, as :func:`torch.nn.functional.normalize` divides.

    ``(B, C, h, w)`` -> ``(B, h * w, 1)``.
    """
    sq = features.square().sum(dim=1).flatten(1)
    # Clamped before the root, so a zero vector has a zero gradient (not 0 * inf).
    return sq.clamp_min(1e-24).rsqrt()[..., None]


def _project(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-task 1x1 projection of features, pixels-major.

    ``features (B, C, h, w)`` with ``B`` 1 or ``T``, ``weight (T, K, C)`` -> ``(T, h * w, K)``.
    A matrix product over channels with the pixels as rows: much faster on the CPU than a
    1x1 convolution over a concatenation, and its result is already channels-last.
    """
    b, c = features.shape[:2]
    rows = features.permute(0, 2, 3, 1).reshape(b, -1, c)
    return torch.matmul(rows, weight.transpose(1, 2))


def _to_map(rows: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``(T, h * w, K)`` -> ``(T, K, h, w)`` in channels-last memory (no copy)."""
    return rows.reshape(rows.shape[0], h, w, rows.shape[-1]).permute(0, 3, 1, 2)


def _fused_rows(
    features: torch.Tensor,
    direct: torch.Tensor,
    w_cos: torch.Tensor,
    z: torch.Tensor,
    present: torch.Tensor,
) -> torch.Tensor:
    """``direct . f + w_cos . cos(f, z)`` at every pixel, without building the cosine maps.

    ``features (B, C, h, w)`` (``B`` 1 or ``T``), ``direct (T, K, C)``, ``w_cos (K, 2)``,
    ``z (T, 2, C)``, ``present (T, 2)`` -> ``(T, h * w, K)``. The cosine is linear in
    ``f / |f|``, so its weights fold into the task's normalised vectors and one projection
    gives both terms; only the per-pixel norm is left to divide by.
    """
    k = direct.shape[1]
    zhat = F.normalize(z, dim=2) * present[..., None]
    scaled = torch.einsum("kp,tpc->tkc", w_cos, zhat)
    both = _project(features, torch.cat([direct, scaled], dim=1))
    return both[..., :k] + both[..., k:] * _inverse_norm(features)


class _WideContext(nn.Module):
    """A residual dilated 3x3 block: reaches further across the coarse grid.

    Its output layer starts at zero, so adding the block to a trained head leaves the head's
    output unchanged until training moves it.
    """

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.out = nn.Conv2d(width, width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Widen the context of ``(B, width, h, w)`` features (same shape out)."""
        return F.relu(x + self.out(F.relu(self.conv(x))))


#: Dilations of the wide-context blocks, in coarse cells.
WIDE_DILATIONS = (4, 8)


class Segmentor(nn.Module):
    """Feature fusion of query features with the tiled task vector (paper sec. 4.3).

    The fusion input at every coarse position is ``[f, f*z+, f*z-, cos(f, z+), cos(f, z-),
    present+, present-]``: the products let a 1x1 layer compare query and support feature by
    feature, the cosines give a task-agnostic similarity. Two 3x3 layers add spatial context;
    the result is upsampled to the fine grid, fused with the fine features and their
    similarity to the fine task vector, and decoded to one logit per pixel.

    With ``local_prior``, both fusions also see where the annotations are (the positive and
    negative footprints and an on/off flag, :func:`~napari_revolver.core.model.guide.local_prior`):
    on the annotated slice itself, and on neighbouring slices of the same stack when the user
    asks to follow positions, a click then acts on its surroundings as well as through z.

    With ``wide_context``, two residual blocks dilated 4 and 8 coarse cells widen the head's
    view from 7 to 31 coarse cells (about 250 pixels), so a click can speak for the whole
    object it lies in.

    With ``filter_channels`` (the per-task fit), ``fine`` carries that many fixed filter
    responses after the learnt fine features (:class:`.filters.FilterBank`), the task's
    ridge fit (:class:`.task_fit.TaskFit`) is solved from the support's moments and its
    response on the query enters both fusions and, through a learnt gain, the logits; the
    filter responses enter the fine fusion. These inputs come last in each fusion and the gain
    starts at zero, so weights trained without them load with zeros there and behave as before.

    Everything before the fusion is annotation-independent and cached per slice, so a click
    costs only this module (about 0.25 GMAC for a 512x512 slice).
    """

    def __init__(
        self,
        coarse_channels: int = 64,
        fine_channels: int = 32,
        width: int = 48,
        fine_width: int = 24,
        local_prior: bool = False,
        wide_context: bool = False,
        filter_channels: int = 0,
    ) -> None:
        super().__init__()
        c = coarse_channels
        self.local_prior = local_prior
        self.fine_channels = fine_channels
        self.filter_channels = filter_channels
        self.fit = TaskFit() if filter_channels else None
        extra_coarse, extra_fine = (PRIOR_CHANNELS, PRIOR_CHANNELS - 1) if local_prior else (0, 0)
        if self.fit is not None:
            extra_coarse += 1
            extra_fine += 1 + filter_channels
        self.fuse = nn.Conv2d(3 * c + 4 + extra_coarse, width, 1)
        self.context = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            *([_WideContext(width, d) for d in WIDE_DILATIONS] if wide_context else []),
        )
        self.fine_fuse = nn.Conv2d(width + fine_channels + 2 + extra_fine, fine_width, 1)
        self.refine = nn.Sequential(
            nn.Conv2d(fine_width, fine_width, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(fine_width, 1, 1),
        )

    def fit_columns(self) -> dict[str, int]:
        """Input columns of each fusion that read the per-task fit: the last ones.

        Returns
        -------
        dict of str to int
            Per fusion layer name (``fuse``, ``fine_fuse``), how many of its last input
            channels carry the fit's response (and, in the fine fusion, the filter responses).
            Empty for a segmentor without the fit.
        """
        if self.fit is None:
            return {}
        return {"fuse": 1, "fine_fuse": 1 + self.filter_channels}

    def forward(
        self,
        coarse: torch.Tensor,
        fine: torch.Tensor,
        z_coarse: torch.Tensor,
        z_fine: torch.Tensor,
        present: torch.Tensor,
        prior: torch.Tensor | None = None,
        moments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits on the fine grid.

        Parameters
        ----------
        coarse : torch.Tensor
            ``(B, C_coarse, h, w)`` query features (``B`` may be 1 and broadcast over tasks).
        fine : torch.Tensor
            ``(B, C_fine, 2h, 2w)``.
        z_coarse, z_fine : torch.Tensor
            ``(T, 2, C_coarse)`` and ``(T, 2, C_fine)`` task vectors, ``T == B`` or ``B == 1``.
        present : torch.Tensor
            ``(T, 2)`` polarity presence flags.
        prior : torch.Tensor, optional
            ``(T or 1, 3, 2h, 2w)`` local prior on the fine grid (see
            :func:`~napari_revolver.core.model.guide.local_prior`); ``None`` means no local
            information (all zeros). Ignored by a segmentor built without ``local_prior``.
        moments : torch.Tensor, optional
            ``(T, 2, D + 1, D + 1)`` support moments (:func:`.task_fit.support_moments`);
            required by a segmentor with the per-task fit, ignored by others.

        Returns
        -------
        torch.Tensor
            ``(T, 1, 2h, 2w)`` logits on the fine grid (stride ``Encoder.fine_stride``).
        """
        t = z_coarse.shape[0]
        if coarse.shape[0] not in (1, t) or fine.shape[0] != coarse.shape[0]:
            raise ValueError(
                f"query features must be one slice or one per task ({t} tasks); got "
                f"coarse {tuple(coarse.shape)} and fine {tuple(fine.shape)}"
            )
        response = filters = None
        if self.fit is not None:
            if moments is None:
                raise ValueError(
                    "this segmentor fits each task to its support: it needs the support "
                    "moments (GuideOutput.moments), got None"
                )
            w_fit, b_fit = self.fit.solve(moments)
            response = self.fit.response(
                coarse.expand(t, -1, -1, -1), fine.expand(t, -1, -1, -1), w_fit, b_fit
            )
            fine, filters = fine[:, : self.fine_channels], fine[:, self.fine_channels :]
            z_fine = z_fine[..., : self.fine_channels]
        h, w = coarse.shape[-2:]
        extra, fine_extra = [], []
        if self.local_prior:
            if prior is None:
                prior = fine.new_zeros(1, PRIOR_CHANNELS, *fine.shape[-2:])
            prior = prior.to(fine.dtype).expand(t, -1, -1, -1)
            # Max-pooling keeps a point's footprint at full strength on the coarse grid.
            extra.append(F.max_pool2d(prior, 2)[..., :h, :w])
            fine_extra.append(prior[:, : PRIOR_CHANNELS - 1])
        if response is not None:
            extra.append(F.avg_pool2d(response, 2)[..., :h, :w])
            fine_extra += [response, filters.expand(t, -1, -1, -1)]  # type: ignore[union-attr]
        x = self.context(F.relu(self._fuse_coarse(coarse, z_coarse, present, extra)))
        logits = self.refine(F.relu(self._fuse_fine(x, fine, z_fine, present, fine_extra)))
        if response is not None:
            weight = self.fit.skip_weight(moments).to(logits.dtype)  # type: ignore[union-attr,arg-type]
            logits = logits + weight[:, None, None, None] * response
        return logits

    def _fuse_coarse(
        self,
        coarse: torch.Tensor,
        z: torch.Tensor,
        present: torch.Tensor,
        extra: list[torch.Tensor],
    ) -> torch.Tensor:
        """Compute the coarse fusion, ``fuse([f, f*z+, f*z-, cos+, cos-, present, extra])``.

        ``cos+`` and ``cos-`` are :func:`_cosine_maps`. Every input but ``extra`` is linear in
        ``f`` or in ``f / |f|`` with per-task factors, so the 1x1 layer's weights are folded
        with the task vectors first and applied to the features once. Returns
        ``(T, width, h, w)``, channels-last, equal to the concatenation's.
        """
        c = coarse.shape[1]
        weight = self.fuse.weight[:, :, 0, 0]
        direct = (
            weight[:, :c]
            + weight[:, c : 2 * c] * z[:, 0, None]
            + weight[:, 2 * c : 3 * c] * z[:, 1, None]
        )
        rows = _fused_rows(coarse, direct, weight[:, 3 * c : 3 * c + 2], z, present)
        bias = self.fuse.bias + present @ weight[:, 3 * c + 2 : 3 * c + 4].T  # (T, width)
        rows = rows + bias[:, None]
        if extra:
            rows = rows + _project(torch.cat(extra, dim=1), weight[None, :, 3 * c + 4 :])
        return _to_map(rows, *coarse.shape[-2:])

    def _fuse_fine(
        self,
        x: torch.Tensor,
        fine: torch.Tensor,
        z: torch.Tensor,
        present: torch.Tensor,
        extra: list[torch.Tensor],
    ) -> torch.Tensor:
        """Compute the fine fusion ``fine_fuse([up(x), f, cos(f, z+), cos(f, z-), extra])``.

        Bilinear upsampling and a 1x1 layer are both linear (and the upsampling weights sum to
        one), so the coarse context ``x`` is projected before it is upsampled, at a quarter of
        the pixels. Returns ``(T, fine_width, 2h, 2w)``, channels-last.
        """
        width, cf = x.shape[1], fine.shape[1]
        weight = self.fine_fuse.weight[:, :, 0, 0]
        up = _to_map(_project(x, weight[None, :, :width]), *x.shape[-2:])
        up = F.interpolate(up, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        direct = weight[None, :, width : width + cf].expand(z.shape[0], -1, -1)
        rows = _fused_rows(fine, direct, weight[:, width + cf : width + cf + 2], z, present)
        rows = rows + self.fine_fuse.bias
        if extra:
            rows = rows + _project(torch.cat(extra, dim=1), weight[None, :, width + cf + 2 :])
        return _to_map(rows, *fine.shape[-2:]) + up
