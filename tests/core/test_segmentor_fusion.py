"""The segmentor's folded fusion equals the paper's concatenation, in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_revolver.core.model.guide import PRIOR_CHANNELS
from napari_revolver.core.model.segmentor import Segmentor, _cosine_maps
from napari_revolver.core.model.task_fit import support_moments


def _concatenated(
    seg: Segmentor,
    coarse: torch.Tensor,
    fine: torch.Tensor,
    z_coarse: torch.Tensor,
    z_fine: torch.Tensor,
    present: torch.Tensor,
    prior: torch.Tensor | None,
    moments: torch.Tensor | None,
) -> torch.Tensor:
    """The fusion written out as the paper states it: concatenate, then 1x1 layers."""
    t = z_coarse.shape[0]
    coarse, fine = coarse.expand(t, -1, -1, -1), fine.expand(t, -1, -1, -1)
    response = filters = None
    if seg.fit is not None:
        w_fit, b_fit = seg.fit.solve(moments)
        response = seg.fit.response(coarse, fine, w_fit, b_fit)
        fine, filters = fine[:, : seg.fine_channels], fine[:, seg.fine_channels :]
        z_fine = z_fine[..., : seg.fine_channels]
    h, w = coarse.shape[-2:]
    flags = present[:, :, None, None].expand(t, 2, h, w)
    zp, zn = z_coarse[:, 0, :, None, None], z_coarse[:, 1, :, None, None]
    parts = [coarse, coarse * zp, coarse * zn, _cosine_maps(coarse, z_coarse, present), flags]
    fine_parts = [fine, _cosine_maps(fine, z_fine, present)]
    if seg.local_prior:
        if prior is None:
            prior = fine.new_zeros(1, PRIOR_CHANNELS, *fine.shape[-2:])
        prior = prior.expand(t, -1, -1, -1)
        parts.append(F.max_pool2d(prior, 2)[..., :h, :w])
        fine_parts.append(prior[:, : PRIOR_CHANNELS - 1])
    if response is not None:
        parts.append(F.avg_pool2d(response, 2)[..., :h, :w])
        fine_parts += [response, filters]
    x = seg.context(F.relu(seg.fuse(torch.cat(parts, dim=1))))
    x = F.interpolate(x, size=fine.shape[-2:], mode="bilinear", align_corners=False)
    logits = seg.refine(F.relu(seg.fine_fuse(torch.cat([x, *fine_parts], dim=1))))
    if response is not None:
        logits = logits + seg.fit.skip_weight(moments)[:, None, None, None] * response
    return logits


def _inputs(
    seg: Segmentor, n_query: int, n_tasks: int, filters: int, g: torch.Generator
) -> dict[str, torch.Tensor | None]:
    cf = seg.fine_channels + filters
    coarse = torch.randn(n_query, 64, 6, 7, generator=g)
    fine = torch.randn(n_query, cf, 12, 14, generator=g)
    fine[:, :, 0, 0] = 0.0  # a pixel with zero norm: normalize's eps path
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])[:n_tasks]
    moments = None
    if seg.fit is not None:
        masks = (torch.rand(n_tasks, 2, 12, 14, generator=g) > 0.7).float()
        support = (
            torch.randn(n_tasks, 64, 6, 7, generator=g),
            torch.randn(n_tasks, cf, 12, 14, generator=g),
        )
        moments = support_moments(*support, masks)
    return {
        "coarse": coarse,
        "fine": fine,
        "z_coarse": torch.randn(n_tasks, 2, 64, generator=g),
        "z_fine": torch.randn(n_tasks, 2, cf, generator=g),
        "present": present,
        "prior": (
            torch.rand(n_tasks, PRIOR_CHANNELS, 12, 14, generator=g) if seg.local_prior else None
        ),
        "moments": moments,
    }


@pytest.mark.parametrize(
    ("local_prior", "filters", "n_query", "n_tasks"),
    [(False, 0, 1, 1), (True, 0, 1, 3), (True, 16, 1, 3), (True, 16, 3, 3), (False, 16, 2, 2)],
)
def test_folded_fusion_equals_the_concatenation(
    local_prior: bool, filters: int, n_query: int, n_tasks: int
) -> None:
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    # In float64 the two orders of summation agree to rounding, so the check is tight.
    seg = Segmentor(local_prior=local_prior, wide_context=True, filter_channels=filters).double()
    with torch.no_grad():
        for p in seg.parameters():  # no zero-initialised block may hide a wrong fold
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    inputs = {
        k: None if v is None else v.double()
        for k, v in _inputs(seg, n_query, n_tasks, filters, g).items()
    }
    for key in ("coarse", "fine", "z_coarse", "z_fine"):
        inputs[key].requires_grad_(True)  # type: ignore[union-attr]

    wrt = [inputs["coarse"], inputs["fine"], inputs["z_coarse"], *seg.parameters()]
    folded = seg(**inputs)
    grads = torch.autograd.grad(folded.square().sum(), wrt)  # type: ignore[arg-type]
    reference = _concatenated(seg, **inputs)  # type: ignore[arg-type]
    ref_grads = torch.autograd.grad(reference.square().sum(), wrt)  # type: ignore[arg-type]

    assert folded.shape == reference.shape == (n_tasks, 1, 12, 14)
    torch.testing.assert_close(folded, reference, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_query_batch_must_be_one_or_one_per_task() -> None:
    seg = Segmentor()
    with pytest.raises(ValueError, match="one slice or one per task"):
        seg(
            torch.zeros(2, 64, 4, 4),
            torch.zeros(2, 32, 8, 8),
            torch.zeros(3, 2, 64),
            torch.zeros(3, 2, 32),
            torch.ones(3, 2),
        )
