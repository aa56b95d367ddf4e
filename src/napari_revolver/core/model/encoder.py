"""Encoder phi: one 2D slice to annotation-independent features at two scales.

The features do not depend on the user's points, so the predictor computes them once per slice
and caches them (paper, sec. 4: "the guide and segmentor share the encoder").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNReLU


@dataclass(frozen=True)
class EncoderOutput:
    """Features of a batch of slices.

    Attributes
    ----------
    coarse : torch.Tensor
        ``(B, C_coarse, H / coarse_stride, W / coarse_stride)``: context features, used by the
        guide for pooling and by the segmentor for fusion.
    fine : torch.Tensor
        ``(B, C_fine, H / fine_stride, W / fine_stride)``: high-resolution features for sharp
        mask edges.
    """

    coarse: torch.Tensor
    fine: torch.Tensor

    def to(self, *args: object, **kwargs: object) -> EncoderOutput:
        """Move/cast both tensors (same arguments as :meth:`torch.Tensor.to`)."""
        return EncoderOutput(self.coarse.to(*args, **kwargs), self.fine.to(*args, **kwargs))

    def __getitem__(self, index: int | slice) -> EncoderOutput:
        """Select slices along the batch axis of both tensors."""
        return EncoderOutput(self.coarse[index], self.fine[index])

    @staticmethod
    def cat(items: list[EncoderOutput]) -> EncoderOutput:
        """Concatenate features along the batch axis.

        Parameters
        ----------
        items : list of EncoderOutput
            Features with equal channels and spatial sizes.

        Returns
        -------
        EncoderOutput
            Batch ``sum(len(i) for i in items)``, in order.
        """
        return EncoderOutput(
            torch.cat([i.coarse for i in items]), torch.cat([i.fine for i in items])
        )


class Encoder(nn.Module):
    """A small fully convolutional pyramid (stride 4 fine, stride 8 coarse with stride-32 context).

    Parameters
    ----------
    in_channels : int
        Channels of the normalised input (3: grayscale is replicated, RGB kept).
    widths : tuple of int
        Channels at strides 2, 4, 8, 16 and 32.
    coarse_channels, fine_channels : int
        Output channels of the two feature maps.

    Notes
    -----
    Input ``(B, in_channels, H, W)`` with ``H`` and ``W`` multiples of :attr:`size_multiple`.
    The stride-16 and stride-32 stages give the coarse map a receptive field of several hundred
    pixels, enough to tell a whole cell from its surroundings.
    """

    coarse_stride = 8
    fine_stride = 4
    size_multiple = 32

    def __init__(
        self,
        in_channels: int = 3,
        widths: tuple[int, int, int, int, int] = (16, 32, 64, 96, 128),
        coarse_channels: int = 64,
        fine_channels: int = 32,
    ) -> None:
        super().__init__()
        w2, w4, w8, w16, w32 = widths
        self.in_channels = in_channels
        self.coarse_channels = coarse_channels
        self.fine_channels = fine_channels
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, w2, stride=2),
            ConvBNReLU(w2, w4, stride=2),
            ConvBNReLU(w4, w4),
        )
        self.fine_out = ConvBNReLU(w4, fine_channels, kernel=1)
        self.stage8 = nn.Sequential(ConvBNReLU(w4, w8, stride=2), ConvBNReLU(w8, w8))
        self.stage16 = nn.Sequential(
            ConvBNReLU(w8, w16, stride=2), ConvBNReLU(w16, w16), ConvBNReLU(w16, w16, dilation=2)
        )
        self.stage32 = nn.Sequential(
            ConvBNReLU(w16, w32, stride=2), ConvBNReLU(w32, w32, dilation=2)
        )
        self.lat8 = nn.Conv2d(w8, coarse_channels, 1)
        self.lat16 = nn.Conv2d(w16, coarse_channels, 1)
        self.lat32 = nn.Conv2d(w32, coarse_channels, 1)
        self.coarse_out = ConvBNReLU(coarse_channels, coarse_channels)

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        """Encode a batch of normalised slices.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, in_channels, H, W)``, ``H`` and ``W`` multiples of :attr:`size_multiple`.

        Returns
        -------
        EncoderOutput
            ``coarse`` ``(B, coarse_channels, H/8, W/8)`` and ``fine``
            ``(B, fine_channels, H/4, W/4)``.
        """
        s4 = self.stem(x)
        s8 = self.stage8(s4)
        s16 = self.stage16(s8)
        s32 = self.stage32(s16)
        top = self.lat32(s32)
        top = F.interpolate(top, size=s16.shape[-2:], mode="bilinear", align_corners=False)
        top = top + self.lat16(s16)
        top = F.interpolate(top, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        coarse = self.coarse_out(top + self.lat8(s8))
        return EncoderOutput(coarse=coarse, fine=self.fine_out(s4))
