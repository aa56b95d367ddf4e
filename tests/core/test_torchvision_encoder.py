"""Encoders from torchvision backbones (optional dependency)."""

from __future__ import annotations

import pytest
import torch

try:
    import torchvision  # noqa: F401
except Exception as exc:  # ImportError, or a build that does not match torch failing to load
    pytest.skip(f"torchvision is not importable here: {exc}", allow_module_level=True)

from napari_revolver.core.model.registry import available_models, build_model


def test_torchvision_models_are_registered() -> None:
    assert {"tv-resnet18", "tv-vgg16"} <= set(available_models())


def test_resnet18_encoder_output_shapes() -> None:
    torch.manual_seed(0)
    model = build_model("tv-resnet18").eval()
    cfg = model.config
    with torch.no_grad():
        out = model.encode(torch.randn(1, 3, 64, 96))
    assert out.coarse.shape == (1, cfg.coarse_channels, 8, 12)
    assert out.fine.shape == (1, cfg.fine_channels, 16, 24)
    assert torch.isfinite(out.coarse).all() and torch.isfinite(out.fine).all()


def test_resnet18_guided_net_segments() -> None:
    torch.manual_seed(0)
    model = build_model("tv-resnet18").for_inference()
    with torch.no_grad():
        feats = model.encode(torch.randn(1, 3, 64, 64))
        masks = torch.zeros(1, 2, 16, 16)
        masks[0, 0, 8, 8] = 1.0
        logits = model.segment(feats, model.guide_from_masks(feats, masks))
    assert logits.shape == (1, 64, 64)
