"""Fixed multiscale filter responses: texture and fine detail that no training has to learn.

A random-forest pixel classifier (ilastik, napari-apoc) adapts to a new modality because it
sees Gaussian-smoothed intensities, gradient magnitudes and Hessian eigenvalues at several
scales. The same responses, pooled to the fine feature grid, are cheap to compute, carry no
parameters and do not depend on the clicks, so they are cached with the learned features and
feed the per-task fit (:mod:`.task_fit`) and the segmentor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FILTER_SIGMAS", "FilterBank"]

#: Scales in image pixels of the input slice.
FILTER_SIGMAS = (1.0, 2.0, 4.0, 8.0)

#: Responses per scale: smoothed intensity, gradient magnitude, the two Hessian eigenvalues.
_PER_SCALE = 4


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Return a normalised 1D Gaussian ``(2r + 1,)`` with ``r = ceil(3 sigma)``."""
    r = max(1, math.ceil(3 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


class FilterBank(nn.Module):
    """Gaussian, gradient-magnitude and Hessian-eigenvalue responses at four scales.

    The luminance of the normalised input (the channel mean) is averaged to half resolution,
    filtered there at ``sigma / 2`` and averaged again to the fine grid (stride 4), so the
    responses line up with the encoder's fine features cell by cell. Derivatives are
    scale-normalised (multiplied by ``sigma`` and ``sigma**2``), so one object gives responses
    of the same size at the scale that fits it.

    Notes
    -----
    Input ``(B, C, H, W)`` with ``H`` and ``W`` multiples of 4 and at least 32 (the encoder's
    size multiple); output ``(B, 16, H / 4, W / 4)``. No parameters; the kernels are buffers
    that are not saved with the weights.
    """

    #: Responses of the default bank (:data:`FILTER_SIGMAS`); an instance's own count is
    #: its ``channels`` attribute.
    channels = _PER_SCALE * len(FILTER_SIGMAS)
    stride = 4

    def __init__(self, sigmas: tuple[float, ...] = FILTER_SIGMAS) -> None:
        super().__init__()
        if not sigmas or min(sigmas) <= 0:
            raise ValueError(f"filter scales must be positive; got {sigmas}")
        self.sigmas = tuple(float(s) for s in sigmas)
        self.channels = _PER_SCALE * len(self.sigmas)
        for i, s in enumerate(self.sigmas):
            self.register_buffer(f"kernel{i}", _gaussian_kernel(s / 2), persistent=False)

    def _smooth(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian of ``(B, 1, h, w)``, reflecting at the borders."""
        r = k.numel() // 2
        # Reflection needs the pad to be shorter than the image; larger pads replicate.
        mode_x = "reflect" if r < x.shape[-1] else "replicate"
        mode_y = "reflect" if r < x.shape[-2] else "replicate"
        # Shifted sums: for one channel, two to four times faster than conv2d on the CPU.
        h, w = x.shape[-2:]
        taps = k.tolist()
        p = F.pad(x, (r, r, 0, 0), mode=mode_x)
        x = sum(c * p[..., i : i + w] for i, c in enumerate(taps))
        p = F.pad(x, (0, 0, r, r), mode=mode_y)
        return sum(c * p[..., i : i + h, :] for i, c in enumerate(taps))  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter responses on the fine grid.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, C, H, W)`` normalised slices (as the encoder sees them).

        Returns
        -------
        torch.Tensor
            ``(B, channels, H / 4, W / 4)``: for each scale of the bank (by default
            :data:`FILTER_SIGMAS`), the smoothed intensity, the gradient magnitude and the
            larger and smaller Hessian eigenvalue.
        """
        lum = F.avg_pool2d(x.mean(dim=1, keepdim=True), 2)
        out = []
        for i, sigma in enumerate(self.sigmas):
            t = sigma / 2  # the scale in half-resolution pixels
            sm = self._smooth(lum, getattr(self, f"kernel{i}"))
            p = F.pad(sm, (1, 1, 1, 1), mode="replicate")
            dy = (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) * 0.5
            dx = (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) * 0.5
            dyy = p[..., 2:, 1:-1] - 2 * sm + p[..., :-2, 1:-1]
            dxx = p[..., 1:-1, 2:] - 2 * sm + p[..., 1:-1, :-2]
            dxy = (p[..., 2:, 2:] - p[..., 2:, :-2] - p[..., :-2, 2:] + p[..., :-2, :-2]) * 0.25
            grad = torch.sqrt(dx * dx + dy * dy + 1e-10) * t
            half_trace = 0.5 * (dxx + dyy) * t * t
            disc = torch.sqrt((0.5 * (dxx - dyy)) ** 2 + dxy * dxy + 1e-10) * t * t
            out += [sm, grad, half_trace + disc, half_trace - disc]
        return F.avg_pool2d(torch.cat(out, dim=1), 2)
