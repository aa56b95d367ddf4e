"""Tests for the guided network: encoder, guide, segmentor and batch-norm folding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from napari_revolver.core.model.encoder import Encoder, EncoderOutput
from napari_revolver.core.model.guide import Guide, GuideOutput, dense_masks, point_masks
from napari_revolver.core.model.guided_net import GuidedNet
from napari_revolver.core.model.registry import available_models, build_model


@pytest.mark.parametrize("key", ["revolver-s", "revolver-tiny"])
@pytest.mark.parametrize(("h", "w"), [(64, 64), (32, 96)])
def test_encoder_output_shapes_have_coarse_stride_8_and_fine_stride_4(
    key: str, h: int, w: int
) -> None:
    torch.manual_seed(0)
    model = build_model(key).eval()
    cfg = model.config
    with torch.no_grad():
        out = model.encode(torch.randn(2, cfg.in_channels, h, w))
    assert isinstance(out, EncoderOutput)
    assert out.coarse.shape == (2, cfg.coarse_channels, h // 8, w // 8)
    assert out.fine.shape == (2, cfg.feature_fine_channels, h // 4, w // 4)
    assert Encoder.coarse_stride == 8 and Encoder.fine_stride == 4
    assert model.fine_stride == 4 and model.size_multiple == 32
    assert torch.isfinite(out.coarse).all() and torch.isfinite(out.fine).all()


def test_build_model_rejects_unknown_key_and_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'nope'.*revolver-tiny"):
        build_model("nope")
    assert {"revolver-s", "revolver-tiny"} <= set(available_models())


def test_encoder_output_cat_and_indexing_concatenate_along_batch() -> None:
    a = EncoderOutput(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 4, 4))
    b = EncoderOutput(torch.ones(2, 4, 2, 2), torch.ones(2, 2, 4, 4))
    cat = EncoderOutput.cat([a, b])
    assert cat.coarse.shape == (3, 4, 2, 2) and cat.fine.shape == (3, 2, 4, 4)
    assert cat[1:].coarse.eq(1).all() and cat[:1].fine.eq(0).all()


# --------------------------------------------------------------------------- point / dense masks


def test_point_masks_mass_equals_number_of_points_per_polarity() -> None:
    pts = torch.tensor([[10.0, 10.0], [30.0, 50.0], [5.0, 60.0], [40.0, 20.0], [33.0, 33.0]])
    labels = torch.tensor([1, 1, 1, 0, 0])
    masks = point_masks(pts, labels, (16, 16), stride=4)
    assert masks.shape == (2, 16, 16)
    assert masks.dtype == torch.float32
    torch.testing.assert_close(masks.sum(dim=(1, 2)), torch.tensor([3.0, 2.0]))
    assert (masks >= 0).all()


@pytest.mark.parametrize(("y", "x"), [(0, 0), (9, 22), (26, 41), (63, 63)])
def test_point_mask_footprint_peaks_at_the_cell_holding_the_point(y: int, x: int) -> None:
    masks = point_masks(torch.tensor([[float(y), float(x)]]), torch.tensor([1]), (16, 16), stride=4)
    pos = masks[0]
    peak = divmod(int(pos.argmax()), 16)
    assert peak == (y // 4, x // 4)
    assert masks[1].sum() == 0
    torch.testing.assert_close(pos.sum(), torch.tensor(1.0))


def test_point_masks_without_points_are_zero() -> None:
    masks = point_masks(torch.zeros(0, 2), torch.zeros(0), (8, 8), stride=4)
    assert masks.shape == (2, 8, 8)
    assert masks.abs().sum() == 0


def test_dense_masks_are_area_fractions_inside_and_outside() -> None:
    mask = torch.zeros(8, 8)
    mask[:4, :4] = 1  # cell (0, 0) full
    mask[4:6, 4:8] = 1  # cell (1, 1) half
    m = dense_masks(mask, 4)
    assert m.shape == (2, 2, 2)
    torch.testing.assert_close(m[0], torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    torch.testing.assert_close(m[0] + m[1], torch.ones(2, 2))


# --------------------------------------------------------------------------------------- guide


def _guide_on_random_features(seed: int, masks: torch.Tensor) -> GuideOutput:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 6, 4, 4, generator=g)
    fine = torch.randn(1, 3, 8, 8, generator=g)
    return Guide()(coarse, fine, masks[None])


def test_guide_merged_by_addition_equals_mass_weighted_average_of_means() -> None:
    m1 = point_masks(torch.tensor([[3.0, 3.0], [20.0, 8.0]]), torch.tensor([1, 0]), (8, 8), 4)
    m2 = point_masks(
        torch.tensor([[10.0, 25.0], [25.0, 25.0], [5.0, 28.0], [14.0, 2.0]]),
        torch.tensor([1, 1, 1, 0]),
        (8, 8),
        4,
    )
    g1, g2 = _guide_on_random_features(1, m1), _guide_on_random_features(2, m2)
    merged = g1 + g2
    zc, zf, present = merged.vectors()
    (zc1, zf1, _), (zc2, zf2, _) = g1.vectors(), g2.vectors()
    w1 = g1.mass[..., None]
    w2 = g2.mass[..., None]
    torch.testing.assert_close(zc, (w1 * zc1 + w2 * zc2) / (w1 + w2))
    torch.testing.assert_close(zf, (w1 * zf1 + w2 * zf2) / (w1 + w2))
    torch.testing.assert_close(merged.mass, torch.tensor([[4.0, 2.0]]))
    torch.testing.assert_close(present, torch.ones(1, 2))


def test_guide_coarse_and_fine_masses_agree() -> None:
    masks = point_masks(torch.tensor([[13.0, 17.0]]), torch.tensor([1]), (8, 8), 4)
    coarse = torch.ones(1, 2, 4, 4)
    fine = torch.ones(1, 2, 8, 8)
    out = Guide()(coarse, fine, masks[None])
    # Features of ones: each sum equals the mask mass on its grid.
    torch.testing.assert_close(out.sum_coarse[0, 0], torch.ones(2))
    torch.testing.assert_close(out.sum_fine[0, 0], torch.ones(2))


def test_guide_slice_with_only_positives_has_present_flags_one_zero() -> None:
    masks = point_masks(torch.tensor([[4.0, 4.0], [12.0, 20.0]]), torch.tensor([1, 1]), (8, 8), 4)
    zc, zf, present = _guide_on_random_features(0, masks).vectors()
    torch.testing.assert_close(present, torch.tensor([[1.0, 0.0]]))
    assert zc[0, 1].abs().sum() == 0 and zf[0, 1].abs().sum() == 0
    assert zc[0, 0].abs().sum() > 0


# ------------------------------------------------------------------------------ guided network


def _randomise_batchnorms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))


def test_for_inference_folding_batchnorm_keeps_encoder_output(tiny_model: GuidedNet) -> None:
    _randomise_batchnorms(tiny_model)
    reference = copy.deepcopy(tiny_model).eval()
    fused = copy.deepcopy(tiny_model).for_inference()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = reference.encode(x), fused.encode(x)
    torch.testing.assert_close(b.coarse, a.coarse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.fine, a.fine, atol=1e-4, rtol=1e-4)
    assert not fused.training
    assert not any(p.requires_grad for p in fused.parameters())
    # Idempotent: a second call changes nothing.
    assert fused.for_inference() is fused
    with torch.no_grad():
        torch.testing.assert_close(fused.encode(x).coarse, b.coarse)


def test_forward_in_training_mode_gives_logits_and_gradients_reach_encoder(
    tiny_model: GuidedNet,
) -> None:
    tiny_model.train()
    g = torch.Generator().manual_seed(0)
    support = torch.randn(2, 3, 64, 64, generator=g)
    query = torch.randn(2, 3, 64, 64, generator=g)
    masks = torch.stack(
        [
            point_masks(
                torch.tensor([[20.0, 20.0], [50.0, 40.0]]), torch.tensor([1, 0]), (16, 16), 4
            ),
            point_masks(torch.tensor([[10.0, 30.0]]), torch.tensor([1]), (16, 16), 4),
        ]
    )
    logits = tiny_model(support, masks, query)
    assert logits.shape == (2, 64, 64)
    target = (torch.rand(2, 64, 64, generator=g) > 0.5).float()
    torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
    enc_grads = [p.grad for p in tiny_model.encoder.parameters() if p.requires_grad]
    assert enc_grads and all(gr is not None for gr in enc_grads)
    assert sum(float(gr.abs().sum()) for gr in enc_grads) > 0
    seg_grads = [p.grad for p in tiny_model.segmentor.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in seg_grads)


def test_segment_broadcasts_one_query_over_several_tasks_and_crops(tiny_model: GuidedNet) -> None:
    model = tiny_model.for_inference()
    with torch.no_grad():
        feats = model.encode(torch.randn(1, 3, 64, 64))
        masks = torch.stack(
            [
                point_masks(torch.tensor([[20.0, 20.0]]), torch.tensor([1]), (16, 16), 4),
                point_masks(
                    torch.tensor([[40.0, 40.0], [5.0, 5.0]]), torch.tensor([1, 0]), (16, 16), 4
                ),
                point_masks(torch.tensor([[30.0, 10.0]]), torch.tensor([1]), (16, 16), 4),
            ]
        )
        guidance = model.guide_from_masks(EncoderOutput.cat([feats] * 3), masks)
        logits = model.segment(feats, guidance, (50, 61))
        full = model.segment(feats, guidance)
    assert logits.shape == (3, 50, 61)
    assert full.shape == (3, 64, 64)
    torch.testing.assert_close(full[:, :50, :61], logits)
    # Different guidance, different logits.
    assert not torch.allclose(logits[0], logits[1])


def test_torchvision_model_without_torchvision_raises_helpful_import_error() -> None:
    try:
        import torchvision  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("torchvision is importable; tests/core/test_torchvision_encoder.py covers it")
    with pytest.raises(ImportError, match=r"napari-revolver\[torchvision\]"):
        build_model("tv-resnet18")
