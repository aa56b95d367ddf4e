"""A per-task discriminative fit: closed-form ridge regression on the support's features.

The pooled task vectors of the guide (paper sec. 4.2) saturate: past a few clicks, more support
barely changes a mean. A linear model fitted to the support pixels keeps improving as the support
grows, up to the dense mask, and in closed form it is cheap and differentiable, so it trains end
to end in the episodes (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form
solvers"; Lee et al. 2019, "MetaOptNet").

What the guide keeps are the *second moments* of the support features under each polarity's
mask (a Gram matrix per polarity, augmented with a constant so that it also holds the sums and
the mass). Moments of several support slices merge by adding, exactly as the guide's sums do,
and the solve needs nothing else::

    x = [fine features, fixed filter responses, coarse features upsampled]   (D per fine cell)
    G_p = sum_i m_p(i) [x_i, 1] [x_i, 1]^T                                    (D+1, D+1)

    each polarity present weighs one half; targets +1 (positive) and -1 (negative)
    C = weighted covariance of x,  c = weighted covariance of x and the target
    w = (C + lambda * diag(C))^-1 c,   b = mean target - mean(x) . w
    lambda = k / (1 + support mass) + floor                                   (k, floor learnt)

The response ``r = x . w + b`` on the query is about +1 on what looks like the positives and
-1 on what looks like the negatives; the segmentor takes it as an input beside the pooled
vectors. Ridge scaled by each feature's own variance does not care about the features' units,
and a strength falling with the support mass lets one or two clicks stay close to a difference
of means while a dense mask fits a full discriminant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TaskFit", "fit_inputs", "support_moments"]

#: Bound of the response (a soft clip): keeps far-off query features from dominating the head.
RESPONSE_BOUND = 3.0


def fit_inputs(coarse: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Stack the per-cell feature vectors of the fit: fine features, coarse ones upsampled.

    Parameters
    ----------
    coarse : torch.Tensor
        ``(B, C_coarse, h, w)``.
    fine : torch.Tensor
        ``(B, C_fine, 2h, 2w)`` (with the filter responses, where the model has them).

    Returns
    -------
    torch.Tensor
        ``(B, C_fine + C_coarse, 2h, 2w)``.
    """
    up = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([fine, up], dim=1)


def support_moments(coarse: torch.Tensor, fine: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted second moments of the support features, per polarity.

    Parameters
    ----------
    coarse, fine : torch.Tensor
        Support features, see :func:`fit_inputs`.
    masks : torch.Tensor
        ``(B, 2, 2h, 2w)`` positive and negative annotation weights on the fine grid.

    Returns
    -------
    torch.Tensor
        ``(B, 2, D + 1, D + 1)`` with ``D = C_fine + C_coarse``: ``sum_i m_p(i) a_i a_i^T``
        with ``a_i = [x_i, 1]``, so the last row holds the sums and ``[-1, -1]`` the mass.
    """
    if coarse.shape[0] == 1 and not torch.is_grad_enabled():
        coarse, fine, masks = _annotated_window(coarse, fine, masks)
    x = fit_inputs(coarse, fine).flatten(2)  # (B, D, N)
    m = masks.to(x.dtype).flatten(2)  # (B, 2, N)
    a = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)  # (B, D+1, N)
    if a.shape[0] == 1 and not torch.is_grad_enabled():
        keep = (m[0] > 0).any(dim=0)
        a, m = a[:, :, keep], m[:, :, keep]
    # (B, 2, D+1, N) @ (B, 1, N, D+1): two matrix products, no (D, N, D) intermediate.
    return (a[:, None] * m[:, :, None]) @ a.transpose(1, 2)[:, None]


def _annotated_window(
    coarse: torch.Tensor, fine: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop one support slice's features to the cells its annotations touch.

    A few clicks touch a few hundred cells of a slice: only those enter the moments. The
    window keeps one coarse cell around them, so the coarse features upsampled inside it equal
    those upsampled over the whole slice at every annotated cell (bilinear upsampling by 2 reads
    the two nearest coarse cells; the window's own edges, where it clamps, carry no annotation
    unless they are the slice's edges too).
    """
    hit = (masks[0] > 0).any(dim=0)
    rows, cols = torch.nonzero(hit.any(dim=1)), torch.nonzero(hit.any(dim=0))
    if not len(rows):
        return coarse[..., :1, :1], fine[..., :2, :2], masks[..., :2, :2] * 0
    hc, wc = coarse.shape[-2:]
    y0, y1 = max(0, int(rows[0]) // 2 - 1), min(hc, int(rows[-1]) // 2 + 2)
    x0, x1 = max(0, int(cols[0]) // 2 - 1), min(wc, int(cols[-1]) // 2 + 2)
    fine_window = (..., slice(2 * y0, 2 * y1), slice(2 * x0, 2 * x1))
    return coarse[..., y0:y1, x0:x1], fine[fine_window], masks[fine_window]


class TaskFit(nn.Module):
    """Ridge regression of the support's labels on its features, solved per task.

    Four scalars are learnt: the ridge strength per unit of support, its floor (see the
    module docstring), and the gain of the response's skip to the logits and how it grows with
    the support mass. Everything else is the support's moments.
    """

    def __init__(self, strength: float = 4.0, floor: float = 0.01) -> None:
        super().__init__()
        self.log_strength = nn.Parameter(torch.tensor(math.log(strength)))
        self.log_floor = nn.Parameter(torch.tensor(math.log(floor)))
        #: Weight of the response added straight to the segmentor's logits (a skip past the
        #: head): ``gain + gain_mass * log(1 + support mass)``, so the fit can count for more
        #: the more support it was fitted on. Both start at zero, so weights trained without
        #: the fit behave as before.
        self.gain = nn.Parameter(torch.zeros(()))
        self.gain_mass = nn.Parameter(torch.zeros(()))

    def skip_weight(self, moments: torch.Tensor) -> torch.Tensor:
        """Weight ``(T,)`` of each task's response in the logits, from its support mass.

        Parameters
        ----------
        moments : torch.Tensor
            ``(T, 2, D + 1, D + 1)`` support moments.
        """
        mass = moments[:, :, -1, -1].sum(dim=1).clamp_min(0.0)
        return self.gain + self.gain_mass * torch.log1p(mass)

    def solve(self, moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit each task's linear model.

        Parameters
        ----------
        moments : torch.Tensor
            ``(T, 2, D + 1, D + 1)`` from :func:`support_moments` (summed over support slices).

        Returns
        -------
        w : torch.Tensor
            ``(T, D)`` weights.
        b : torch.Tensor
            ``(T,)`` offsets. A task without annotations gets zeros; one with a single polarity
            a constant response of +1 or -1.
        """
        g = moments.to(torch.float64)
        d = g.shape[-1] - 1
        mass = g[:, :, d, d]  # (T, 2)
        present = (mass > 1e-6).to(g.dtype)
        share = present / present.sum(dim=1, keepdim=True).clamp_min(1.0)  # 1/2 each, or 1
        norm = g / mass.clamp_min(1e-6)[..., None, None]
        m = (norm * share[..., None, None]).sum(dim=1)  # (T, D+1, D+1) weighted moments
        sign = torch.tensor([1.0, -1.0], dtype=g.dtype, device=g.device)
        t = (norm[..., :, d] * (share * sign)[..., None]).sum(dim=1)  # (T, D+1): E[a y]
        mu = m[:, :d, d]
        cov = m[:, :d, :d] - mu[:, :, None] * mu[:, None, :]
        cxy = t[:, :d] - mu * t[:, d : d + 1]
        lam = torch.exp(self.log_strength.to(g.dtype)) / (1.0 + mass.sum(dim=1)) + torch.exp(
            self.log_floor.to(g.dtype)
        )
        var = torch.diagonal(cov, dim1=1, dim2=2).clamp_min(0.0)
        reg = lam[:, None] * (var + 1e-3 * var.mean(dim=1, keepdim=True)) + 1e-8
        w = torch.linalg.solve(cov + torch.diag_embed(reg), cxy[..., None])[..., 0]
        b = t[:, d] - (mu * w).sum(dim=1)
        return w.to(moments.dtype), b.to(moments.dtype)

    @staticmethod
    def response(
        coarse: torch.Tensor, fine: torch.Tensor, w: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """Evaluate the fitted model on query features.

        Parameters
        ----------
        coarse, fine : torch.Tensor
            ``(T, C_coarse, h, w)`` and ``(T, C_fine, 2h, 2w)`` query features.
        w, b : torch.Tensor
            ``(T, D)`` and ``(T,)`` from :meth:`solve`.

        Returns
        -------
        torch.Tensor
            ``(T, 1, 2h, 2w)``, softly bounded to ``(-3, 3)``.
        """
        cf = fine.shape[1]
        w = w.to(fine.dtype)
        r_fine = torch.einsum("tchw,tc->thw", fine, w[:, :cf])
        r_coarse = torch.einsum("tchw,tc->thw", coarse, w[:, cf:])[:, None]
        # Bilinear upsampling is linear: upsampling the coarse part of the response equals the
        # response on the upsampled coarse features the moments were taken on.
        r_coarse = F.interpolate(
            r_coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False
        )
        r = r_fine[:, None] + r_coarse + b.to(fine.dtype)[:, None, None, None]
        return RESPONSE_BOUND * torch.tanh(r / RESPONSE_BOUND)
