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
    """
    fn = F.normalize(features, dim=1)
    zn = F.normalize(z, dim=2)
    return torch.einsum("bchw,bpc->bphw", fn, zn) * present[:, :, None, None]


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
        if coarse.shape[0] != t:
            coarse = coarse.expand(t, -1, -1, -1)
            fine = fine.expand(t, -1, -1, -1)
        response = filters = None
        if self.fit is not None:
            if moments is None:
                raise ValueError(
                    "this segmentor fits each task to its support: it needs the support "
                    "moments (GuideOutput.moments), got None"
                )
            w_fit, b_fit = self.fit.solve(moments)
            response = self.fit.response(coarse, fine, w_fit, b_fit)
            fine, filters = fine[:, : self.fine_channels], fine[:, self.fine_channels :]
            z_fine = z_fine[..., : self.fine_channels]
        h, w = coarse.shape[-2:]
        zp = z_coarse[:, 0, :, None, None]
        zn = z_coarse[:, 1, :, None, None]
        flags = present[:, :, None, None].expand(t, 2, h, w)
        parts = [coarse, coarse * zp, coarse * zn, _cosine_maps(coarse, z_coarse, present), flags]
        fine_parts = [fine, _cosine_maps(fine, z_fine, present)]
        if self.local_prior:
            if prior is None:
                prior = fine.new_zeros(1, PRIOR_CHANNELS, *fine.shape[-2:])
            prior = prior.to(fine.dtype).expand(t, -1, -1, -1)
            # Max-pooling keeps a point's footprint at full strength on the coarse grid.
            parts.append(F.max_pool2d(prior, 2)[..., :h, :w])
            fine_parts.append(prior[:, : PRIOR_CHANNELS - 1])
        if response is not None:
            parts.append(F.avg_pool2d(response, 2)[..., :h, :w])
            fine_parts += [response, filters]
        x = self.context(F.relu(self.fuse(torch.cat(parts, dim=1))))
        x = F.interpolate(x, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        x = torch.cat([x, *fine_parts], dim=1)
        logits = self.refine(F.relu(self.fine_fuse(x)))
        if response is not None:
            weight = self.fit.skip_weight(moments).to(logits.dtype)  # type: ignore[union-attr,arg-type]
            logits = logits + weight[:, None, None, None] * response
        return logits
