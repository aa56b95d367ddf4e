"""Guide g: late fusion of the annotations with the support features, pooled into a task vector.

Positive and negative annotations become soft masks on the fine feature grid (a small Gaussian
footprint per point, or an area-downsampled dense mask). The masks multiply the support features
(late fusion) and are pooled globally, positives and negatives separately, at both feature scales.

The guide keeps *sums* and *masses* rather than means: several support slices merge by adding
both, which is exactly averaging weighted by annotation mass (paper, sec. 4.2), and a slice with
only positives or only negatives contributes to one polarity only (mixed shot).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .task_fit import support_moments

#: Footprint of one point, in fine-grid cells (one cell = ``Encoder.fine_stride`` pixels).
DEFAULT_SIGMA_CELLS = 0.75

POSITIVE, NEGATIVE = 0, 1

#: Channels of a local prior: positive, negative, on/off flag.
PRIOR_CHANNELS = 3

#: Gain from footprint weight to prior strength: one point's peak (about 0.28 on the fine
#: grid) becomes about 1.
PRIOR_GAIN = 4.0


@dataclass(frozen=True)
class GuideOutput:
    """Pooled guidance of a batch of tasks.

    Attributes
    ----------
    sum_coarse : torch.Tensor
        ``(B, 2, C_coarse)``: mask-weighted sums of coarse features, ``[:, 0]`` positive,
        ``[:, 1]`` negative.
    sum_fine : torch.Tensor
        ``(B, 2, C_fine)``: the same for the fine features.
    mass : torch.Tensor
        ``(B, 2)``: total mask weight per polarity (about the number of points).
    moments : torch.Tensor or None
        ``(B, 2, D + 1, D + 1)``: second moments of the support features under each
        polarity's mask, for the per-task fit (:func:`.task_fit.support_moments`); ``None``
        for models without the fit.
    """

    sum_coarse: torch.Tensor
    sum_fine: torch.Tensor
    mass: torch.Tensor
    moments: torch.Tensor | None = None

    def __add__(self, other: GuideOutput) -> GuideOutput:
        """Pool two annotations together (sums, masses and moments add, as for one mask)."""
        moments = (
            None if self.moments is None or other.moments is None else self.moments + other.moments
        )
        return GuideOutput(
            self.sum_coarse + other.sum_coarse,
            self.sum_fine + other.sum_fine,
            self.mass + other.mass,
            moments,
        )

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> GuideOutput:
        return GuideOutput(
            fn(self.sum_coarse),
            fn(self.sum_fine),
            fn(self.mass),
            None if self.moments is None else fn(self.moments),
        )

    def repeat(self, n: int) -> GuideOutput:
        """Return the ``B`` tasks repeated ``n`` times along the batch (batch ``n * B``)."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def total(self) -> GuideOutput:
        """Return the ``B`` tasks pooled into one (batch 1), as one merged annotation."""
        return self._map(lambda t: t.sum(0, keepdim=True))

    def vectors(self, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean features per polarity and presence flags.

        Returns
        -------
        z_coarse : torch.Tensor
            ``(B, 2, C_coarse)``, zero where a polarity has no annotation.
        z_fine : torch.Tensor
            ``(B, 2, C_fine)``.
        present : torch.Tensor
            ``(B, 2)`` float, 1 where the polarity has annotation mass.
        """
        present = (self.mass > eps).to(self.sum_coarse.dtype)
        denom = self.mass.clamp_min(eps)[..., None]
        return self.sum_coarse / denom, self.sum_fine / denom, present


def point_masks(
    points_yx: torch.Tensor,
    labels: torch.Tensor,
    grid_shape: tuple[int, int],
    stride: int,
    sigma_cells: float = DEFAULT_SIGMA_CELLS,
) -> torch.Tensor:
    """Rasterise point annotations into positive/negative footprints on a feature grid.

    Parameters
    ----------
    points_yx : torch.Tensor
        ``(N, 2)`` float, point positions ``(y, x)`` in image pixels (pixel centres at integers).
    labels : torch.Tensor
        ``(N,)``, 1 positive, 0 negative.
    grid_shape : tuple of int
        ``(h, w)`` of the feature grid.
    stride : int
        Image pixels per grid cell.
    sigma_cells : float
        Standard deviation of each footprint, in grid cells.

    Returns
    -------
    torch.Tensor
        ``(2, h, w)`` float32; each point's footprint sums to 1, so the mass of a polarity is
        its number of points.
    """
    h, w = grid_shape
    out = torch.zeros(2, h, w, dtype=torch.float32, device=points_yx.device)
    if points_yx.numel() == 0:
        return out
    # Grid coordinates of the points: cell k covers pixels [k*stride, (k+1)*stride).
    g = (points_yx.to(torch.float32) + 0.5) / stride - 0.5
    ys = torch.arange(h, dtype=torch.float32, device=points_yx.device)
    xs = torch.arange(w, dtype=torch.float32, device=points_yx.device)
    wy = torch.exp(-0.5 * ((ys[None, :] - g[:, :1]) / sigma_cells) ** 2)  # (N, h)
    wx = torch.exp(-0.5 * ((xs[None, :] - g[:, 1:]) / sigma_cells) ** 2)  # (N, w)
    wy = wy / wy.sum(dim=1, keepdim=True).clamp_min(1e-12)
    wx = wx / wx.sum(dim=1, keepdim=True).clamp_min(1e-12)
    positive = (labels > 0).to(torch.float32)
    sel = torch.stack([positive, 1.0 - positive], dim=1)  # (N, 2)
    # sum_n sel[n, p] * wy[n, :, None] * wx[n, None, :]
    return torch.einsum("np,ny,nx->pyx", sel, wy, wx)


def dense_masks(mask: torch.Tensor, stride: int) -> torch.Tensor:
    """Area-downsample a dense binary support mask to positive/negative weights.

    Parameters
    ----------
    mask : torch.Tensor
        ``(H, W)`` bool or float in [0, 1]; ``H`` and ``W`` multiples of ``stride``.
    stride : int
        Image pixels per grid cell.

    Returns
    -------
    torch.Tensor
        ``(2, H / stride, W / stride)`` float32: fraction of each cell inside / outside.
    """
    m = mask.to(torch.float32)[None, None]
    pos = F.avg_pool2d(m, stride)[0, 0]
    return torch.stack([pos, 1.0 - pos])


def local_prior(masks_fine: torch.Tensor, on: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Where the annotations are, as segmentor input (the local mode).

    Parameters
    ----------
    masks_fine : torch.Tensor
        ``(B, 2, h, w)`` positive/negative annotation weights on the fine grid, from
        :func:`point_masks` or :func:`dense_masks`, of annotations that are spatially aligned
        with the query (the same slice, or a neighbouring slice of the same stack).
    on : torch.Tensor or float
        ``(B,)`` or scalar in ``[0, 1]``: whether the positions apply to the query at all.

    Returns
    -------
    torch.Tensor
        ``(B, 3, h, w)``: footprints scaled so one point peaks near 1 (clipped to ``[0, 1]``)
        and masked by ``on``, then the ``on`` flag as a constant channel.
    """
    on = torch.as_tensor(on, dtype=masks_fine.dtype, device=masks_fine.device)
    on = on.reshape(-1, 1, 1, 1).expand(masks_fine.shape[0], 1, *masks_fine.shape[-2:])
    prior = (masks_fine * PRIOR_GAIN).clamp(0.0, 1.0) * on
    return torch.cat([prior, on], dim=1)


class Guide(nn.Module):
    """Masked global pooling of support features (late fusion, paper sec. 4.2).

    The guide has no parameters of its own: the segmentor learns how to use the pooled
    vectors. Keeping it parameter-free makes merging shots an exact weighted average.

    Parameters
    ----------
    moments : bool
        Also keep the second moments of the support features for the per-task fit
        (:mod:`.task_fit`).
    """

    def __init__(self, moments: bool = False) -> None:
        super().__init__()
        self.moments = moments

    def forward(
        self, features_coarse: torch.Tensor, features_fine: torch.Tensor, masks_fine: torch.Tensor
    ) -> GuideOutput:
        """Pool support features under the annotation masks.

        Parameters
        ----------
        features_coarse : torch.Tensor
            ``(B, C_coarse, h, w)`` support features.
        features_fine : torch.Tensor
            ``(B, C_fine, 2h, 2w)``.
        masks_fine : torch.Tensor
            ``(B, 2, 2h, 2w)`` positive/negative weights on the fine grid.

        Returns
        -------
        GuideOutput
            Sums over each support slice (add outputs to merge shots).
        """
        masks_fine = masks_fine.to(features_fine.dtype)
        # Sum-pooling keeps the mass of a footprint equal on both grids.
        masks_coarse = F.avg_pool2d(masks_fine, 2) * 4.0
        sum_fine = torch.einsum("bchw,bphw->bpc", features_fine, masks_fine)
        sum_coarse = torch.einsum("bchw,bphw->bpc", features_coarse, masks_coarse)
        moments = (
            support_moments(features_coarse, features_fine, masks_fine) if self.moments else None
        )
        return GuideOutput(sum_coarse, sum_fine, masks_fine.sum(dim=(2, 3)), moments)
