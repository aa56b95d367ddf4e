"""Encoders from torchvision backbones (optional: ``pip install napari-revolver[torchvision]``).

The paper's encoder is VGG-16 with ImageNet weights. torchvision is imported only when one of
these models is built, so the core never needs it. ImageNet weights come from a local file
(``REVOLVER_TV_WEIGHTS``) or torchvision's own cache; nothing is downloaded here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .encoder import EncoderOutput
from .guided_net import GuidedNet, ModelConfig
from .registry import register_model

logger = logging.getLogger(__name__)

#: (torchvision constructor, fine layer index, coarse layer index, fine channels, coarse channels)
_SPECS = {
    "tv-vgg16": ("vgg16", 9, 22, 128, 512),  # pool2 (stride 4), relu4_3 (stride 8)
    "tv-resnet18": ("resnet18", None, None, 64, 128),
}

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _import_torchvision() -> ModuleType:
    """Import torchvision, or raise an ``ImportError`` naming the extra to install."""
    try:
        import torchvision
    except Exception as exc:  # ImportError, or a CUDA-only build failing to load
        raise ImportError(
            "torchvision encoders need torchvision that imports with your torch build "
            f"(pip install napari-revolver[torchvision]); import failed: {exc}"
        ) from exc
    return torchvision


def _imagenet_state(tv: ModuleType, name: str) -> dict[str, torch.Tensor] | None:
    """Load ImageNet weights from ``REVOLVER_TV_WEIGHTS`` or torchvision's cache.

    Nothing is downloaded: without either, the backbone keeps random weights (``None``).
    """
    path = os.environ.get("REVOLVER_TV_WEIGHTS")
    if not path:
        enum = tv.models.get_model_weights(name).DEFAULT
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", enum.url.rsplit("/", 1)[-1])
        path = cached if os.path.exists(cached) else None
    if path is None:
        logger.warning(
            "no ImageNet weights for %s (set REVOLVER_TV_WEIGHTS or fill torchvision's "
            "cache); the backbone starts from random weights",
            name,
        )
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


class TorchvisionEncoder(nn.Module):
    """A torchvision backbone giving stride-4 fine and stride-8 coarse features.

    Inputs are our normalised slices (about [-0.5, 0.5]); they are mapped to ImageNet statistics
    before the backbone.
    """

    def __init__(self, key: str, coarse_channels: int = 64, fine_channels: int = 32) -> None:
        super().__init__()
        tv = _import_torchvision()
        name, fine_idx, coarse_idx, cf, cc = _SPECS[key]
        net = getattr(tv.models, name)(weights=None)
        state = _imagenet_state(tv, name)
        if state is not None:
            net.load_state_dict(state)
        self.name = name
        if name == "vgg16":
            feats = net.features
            self.to_fine = feats[: fine_idx + 1]
            self.to_coarse = feats[fine_idx + 1 : coarse_idx + 1]
        else:
            self.to_fine = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1)
            self.to_coarse = net.layer2
        self.fine_proj = nn.Conv2d(cf, fine_channels, 1)
        self.coarse_proj = nn.Conv2d(cc, coarse_channels, 1)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN)[None, :, None, None])
        self.register_buffer("std", torch.tensor(_IMAGENET_STD)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode normalised slices.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, 3, H, W)`` slices normalised to about [-0.5, 0.5], ``H, W`` multiples of 32.

        Returns
        -------
        EncoderOutput
            ``coarse`` ``(B, coarse_channels, H/8, W/8)`` and ``fine``
            ``(B, fine_channels, H/4, W/4)``.
        """
        h, w = x.shape[-2:]
        x = ((x + 0.5) - self.mean) / self.std
        fine = self.to_fine(x)
        coarse = self.to_coarse(fine)
        fine = F.interpolate(fine, size=(h // 4, w // 4), mode="bilinear", align_corners=False)
        coarse = F.interpolate(coarse, size=(h // 8, w // 8), mode="bilinear", align_corners=False)
        return EncoderOutput(F.relu(self.coarse_proj(coarse)), F.relu(self.fine_proj(fine)))


def _builder(key: str) -> Callable[[], GuidedNet]:
    """Return the builder of the named torchvision model."""

    def build() -> GuidedNet:
        config = ModelConfig(key=key)
        return GuidedNet(
            config, encoder=TorchvisionEncoder(key, config.coarse_channels, config.fine_channels)
        )

    return build


for _key in _SPECS:
    register_model(_key, _builder(_key))
