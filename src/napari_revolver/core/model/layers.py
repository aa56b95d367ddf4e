"""Small building blocks shared by the encoder and the segmentor."""

from __future__ import annotations

import torch
from torch import nn


class ConvBNReLU(nn.Sequential):
    """3x3 (or kxk) convolution, batch norm and ReLU, foldable into one convolution.

    Parameters
    ----------
    cin, cout : int
        Input and output channels.
    stride, dilation, kernel : int
        Convolution geometry; padding keeps the spatial size (divided by ``stride``).
    """

    def __init__(
        self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, kernel: int = 3
    ) -> None:
        pad = dilation * (kernel - 1) // 2
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride=stride, padding=pad, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    @torch.no_grad()
    def fused(self) -> nn.Sequential:
        """Return an equivalent ``Conv2d + ReLU`` with the batch norm folded in (eval only).

        Folding saves about a third of the encoder's CPU time at inference.
        """
        conv, bn = self[0], self[1]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        fused = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=True,
        )
        fused.weight.copy_(conv.weight * scale[:, None, None, None])
        fused.bias.copy_(bn.bias - bn.running_mean * scale)
        return nn.Sequential(fused, nn.ReLU(inplace=True))


def fuse_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`ConvBNReLU` below ``module`` by its folded form, in place.

    Only valid for inference (``module.eval()``): the running statistics become constants.

    Parameters
    ----------
    module : nn.Module
        The network (or part of it) to fold.

    Returns
    -------
    nn.Module
        ``module`` itself, folded.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, ConvBNReLU):
            setattr(module, name, child.fused())
        else:
            fuse_batchnorm(child)
    return module
