"""Click refiner: one object's mask redrawn in a window zoomed on it, conditioned on the clicks.

The guided network says what looks like the object and :func:`..objects.select_object` which of
those pixels are *it*; both are blind to what a correction means at the pixel level (a negative
click on a rim the mask overshot, a positive click on a missed lobe). The refiner is the
click-conditioned head of interactive segmentation (DIOS, RITM): it sees, in a square window
around the selection and the clicks, resampled to ``size x size`` pixels,

* the normalised image (sharp edges the stride-4 features cannot place),
* the cached fine features, projected to a few channels,
* the class probability and the selection,
* the clicks as Gaussian maps at two scales, positive and negative apart,

and predicts the object's logits there, added to the selection's (a zero last layer returns
the selection unchanged). Zooming makes an object's size in the window about constant, as
RITM's zoom-in does, so small nuclei and large cells are drawn with the same receptive field.

No napari or Qt here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import ConvBNReLU

__all__ = [
    "ClickRefiner",
    "RefinerConfig",
    "Window",
    "click_maps",
    "crop_bounds",
    "crop_to",
    "deepened",
    "paste_logits",
    "sample_window",
    "window_around",
]


@dataclass(frozen=True)
class RefinerConfig:
    """Hyper-parameters of a :class:`ClickRefiner` (stored with its weights)."""

    #: Side of the window the object is resampled to, in pixels.
    size: int = 80
    image_channels: int = 3
    feature_channels: int = 32
    #: The fine features are projected to this many channels before the first convolution.
    feature_projection: int = 12
    width: int = 24
    mid_width: int = 48
    #: Dilations of the residual blocks at half resolution.
    dilations: tuple[int, ...] = (1, 2, 4)
    #: Widths (standard deviations, window pixels) of the Gaussian click maps.
    click_sigmas: tuple[float, ...] = (2.5, 10.0)
    #: The window is the selection's and the clicks' bounding square grown by this factor.
    context: float = 1.6
    #: Smallest window side, in slice pixels.
    min_side: float = 24.0
    #: Also read the image of the slice the selection comes from (a follower: two frames).
    previous_image: bool = False
    #: Times a mask that reaches its window's edge inside the slice is redrawn in the window
    #: around it (:func:`..objects.refined_masks`); a refiner trained with redraws
    #: (``ClickTrainConfig.regrow``) uses them. 0: never (files without the field).
    regrow: int = 0
    #: At a correction, the selection channel holds the object's mask after the previous
    #: click (what the user sees), not the selection: the refiner corrects its own mask, as
    #: RITM's previous-mask input does. False: the selection at every click (older files).
    previous_mask: bool = False

    def to_dict(self) -> dict[str, object]:
        """Return the configuration as built-in types, ready for JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> RefinerConfig:
        """Read a configuration written by :meth:`to_dict` (lists become tuples).

        Raises
        ------
        ValueError
            If ``d`` has a field this version does not know.
        """
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown refiner config fields {sorted(unknown)}; expected {sorted(known)}"
            )
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Window:
    """A square window of a slice, in slice pixels (``y0, x0`` its top-left corner).

    Pixel ``(i, j)`` of a window resampled to ``size`` pixels has its centre at slice position
    ``(y0 + (i + 0.5) * side / size - 0.5, x0 + (j + 0.5) * side / size - 0.5)``.
    """

    y0: float
    x0: float
    side: float

    def to_window(self, yx: np.ndarray, size: int) -> np.ndarray:
        """Slice pixel positions ``(N, 2)`` to window pixel positions at ``size``."""
        yx = np.asarray(yx, np.float64).reshape(-1, 2)
        return (yx + 0.5 - (self.y0, self.x0)) * size / self.side - 0.5

    def pixel_bounds(self, shape: tuple[int, int]) -> tuple[slice, slice]:
        """Return the slice pixels the window covers, clipped to a slice of ``shape``."""
        h, w = shape
        y0, x0 = max(0, int(np.floor(self.y0))), max(0, int(np.floor(self.x0)))
        y1 = min(h, int(np.ceil(self.y0 + self.side)))
        x1 = min(w, int(np.ceil(self.x0 + self.side)))
        return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def window_around(
    mask: np.ndarray, points: np.ndarray, *, context: float = 1.6, min_side: float = 24.0
) -> Window:
    """Place a square window around a selection and its clicks.

    Parameters
    ----------
    mask : np.ndarray
        ``(H, W)`` bool, the selection (may be empty).
    points : np.ndarray
        ``(N, 2)`` ``(y, x)`` clicks, at least one.
    context : float
        The bounding square of the mask and the clicks is grown by this factor.
    min_side : float
        Smallest side, in pixels.

    Returns
    -------
    Window
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    if not len(pts):
        raise ValueError("a window needs at least one click")
    lo, hi = pts.min(0), pts.max(0) + 1
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if len(rows):
        lo = np.minimum(lo, (rows[0], cols[0]))
        hi = np.maximum(hi, (rows[-1] + 1, cols[-1] + 1))
    side = max(float((hi - lo).max()) * context, min_side)
    centre = (lo + hi) / 2
    return Window(float(centre[0] - side / 2), float(centre[1] - side / 2), side)


def _grid(
    window: Window, size: int, extent: tuple[float, float], device: torch.device
) -> torch.Tensor:
    """``(1, size, size, 2)`` grid_sample coordinates of the window's pixel centres.

    ``extent`` is the ``(height, width)`` in slice pixels that the sampled map spans (a padded
    feature map spans its padded size).
    """
    t = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) * (window.side / size)
    ys = (window.y0 + t) / extent[0] * 2 - 1
    xs = (window.x0 + t) / extent[1] * 2 - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1)[None]


def crop_to(maps: torch.Tensor, window: Window) -> tuple[torch.Tensor, Window]:
    """Crop full-resolution ``maps`` ``(..., H, W)`` to the pixels a window resamples.

    Returns the crop (the window's pixels and the neighbours bilinear interpolation reads)
    and the window in its coordinates: :func:`sample_window` of the two equals that of the
    whole maps and the window, without touching the rest of the slice.
    """
    ys, xs = crop_bounds(window, (maps.shape[-2], maps.shape[-1]))
    return maps[..., ys, xs], Window(window.y0 - ys.start, window.x0 - xs.start, window.side)


def crop_bounds(window: Window, shape: tuple[int, int]) -> tuple[slice, slice]:
    """Return the pixels of a slice of ``shape`` that resampling a window reads.

    The window's pixels and the neighbours bilinear interpolation reads, clipped to the slice.
    """
    return Window(window.y0 - 2, window.x0 - 2, window.side + 4).pixel_bounds(shape)


def sample_window(
    maps: torch.Tensor, window: Window, size: int, extent: tuple[float, float] | None = None
) -> torch.Tensor:
    """Resample ``maps`` ``(C, h, w)`` (spanning ``extent`` slice pixels) to the window.

    Returns
    -------
    torch.Tensor
        ``(C, size, size)``; zero outside the map.
    """
    if extent is None:
        maps, window = crop_to(maps, window)
        extent = (float(maps.shape[-2]), float(maps.shape[-1]))
    grid = _grid(window, size, extent, maps.device)
    return F.grid_sample(
        maps[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )[0]


def click_maps(
    window: Window, points: np.ndarray, labels: np.ndarray, size: int, sigmas: tuple[float, ...]
) -> torch.Tensor:
    """Gaussian maps of the clicks in the window: ``(2 * len(sigmas), size, size)``.

    Channels are positive then negative for each width; each the maximum over its clicks.
    """
    yx = window.to_window(points, size)
    labels = np.asarray(labels)
    coords = np.arange(size, dtype=np.float32)
    out = np.zeros((2 * len(sigmas), size, size), np.float32)
    for polarity, value in enumerate((1, 0)):
        sel = yx[labels == value]
        if not len(sel):
            continue
        d2 = (coords[None, :, None] - sel[:, 0, None, None]) ** 2 + (
            coords[None, None, :] - sel[:, 1, None, None]
        ) ** 2
        d2 = d2.min(0)
        for i, s in enumerate(sigmas):
            out[2 * i + polarity] = np.exp(-d2 / (2 * s * s))
    return torch.from_numpy(out)


def paste_logits(
    logits: torch.Tensor, window: Window, shape: tuple[int, int]
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Resample window logits ``(size, size)`` back onto the slice pixels the window covers.

    Returns
    -------
    logits : np.ndarray
        ``(h, w)`` float32 over ``bounds``.
    bounds : tuple of slice
        The slice pixels they cover.
    """
    ys, xs = window.pixel_bounds(shape)
    if ys.stop <= ys.start or xs.stop <= xs.start:
        return np.zeros((0, 0), np.float32), (ys, xs)
    py = (torch.arange(ys.start, ys.stop, dtype=torch.float32) + 0.5 - window.y0) / window.side
    px = (torch.arange(xs.start, xs.stop, dtype=torch.float32) + 0.5 - window.x0) / window.side
    gy, gx = torch.meshgrid(py * 2 - 1, px * 2 - 1, indexing="ij")
    grid = torch.stack([gx, gy], -1)[None].to(logits.device)
    out = F.grid_sample(
        logits[None, None].float(),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )
    return out[0, 0].cpu().numpy(), (ys, xs)


class _Block(nn.Module):
    """Residual pair of dilated 3x3 convolutions."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.a = ConvBNReLU(width, width, dilation=dilation)
        self.b = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(width),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b(self.a(x)))


class ClickRefiner(nn.Module):
    """Small encoder-decoder over a window of one object (about 0.1 M parameters).

    Parameters
    ----------
    config : RefinerConfig, optional
    """

    #: Scale of the selection's logit that the prediction is added to.
    base_logit = 4.0

    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        c = config or RefinerConfig()
        self.config = c
        n_in = c.image_channels + c.feature_projection + 2 + 2 * len(c.click_sigmas)
        n_in += c.image_channels if c.previous_image else 0
        self.project = nn.Conv2d(c.feature_channels, c.feature_projection, 1)
        self.stem = nn.Sequential(ConvBNReLU(n_in, c.width), ConvBNReLU(c.width, c.width))
        self.down = ConvBNReLU(c.width, c.mid_width, stride=2)
        self.blocks = nn.Sequential(*[_Block(c.mid_width, d) for d in c.dilations])
        self.fuse = ConvBNReLU(c.mid_width + c.width, c.width)
        self.out = nn.Conv2d(c.width, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def in_channels(self) -> int:
        """Channels of the stacked inputs that :meth:`forward` takes."""
        c = self.config
        n = c.image_channels + c.feature_channels + 2 + 2 * len(c.click_sigmas)
        return n + (c.image_channels if c.previous_image else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Refine a batch of windows.

        Parameters
        ----------
        x : torch.Tensor
            ``(B, in_channels, size, size)``: image, fine features, class probability,
            selection, click maps (in that order; see :func:`stack_inputs`).

        Returns
        -------
        torch.Tensor
            ``(B, size, size)`` logits of the object.
        """
        c = self.config
        ci, cf = c.image_channels, c.feature_channels
        image, feats, rest = x[:, :ci], x[:, ci : ci + cf], x[:, ci + cf :]
        selection = rest[:, 1:2]
        h = self.stem(torch.cat([image, self.project(feats), rest], 1))
        m = self.blocks(self.down(h))
        m = F.interpolate(m, size=h.shape[-2:], mode="bilinear", align_corners=False)
        out = self.out(self.fuse(torch.cat([m, h], 1)))
        return (out + self.base_logit * (2 * selection - 1))[:, 0]


def deepened(refiner: ClickRefiner, dilations: tuple[int, ...]) -> ClickRefiner:
    """Return a copy of a refiner with residual blocks of ``dilations`` appended.

    Each new block works at half resolution after the existing ones and starts as the
    identity (its last normalisation's scale is 0), so the copy computes exactly what
    ``refiner`` does until it is trained further: a wider view of the window (dilations 8 and
    16 reach across an 80-pixel window) without starting again from nothing.

    Parameters
    ----------
    refiner : ClickRefiner
    dilations : tuple of int
        Dilations of the blocks to add, each at least 1.

    Returns
    -------
    ClickRefiner
        In the mode ``refiner`` is in, on its device.

    Raises
    ------
    ValueError
        For a dilation below 1.
    """
    bad = [d for d in dilations if int(d) < 1]
    if bad:
        raise ValueError(f"dilations must be at least 1; got {list(dilations)}")
    c = refiner.config
    grown = ClickRefiner(replace(c, dilations=(*c.dilations, *map(int, dilations))))
    grown.load_state_dict(refiner.state_dict(), strict=False)
    with torch.no_grad():
        for block in list(grown.blocks)[len(c.dilations) :]:
            block.b[1].weight.zero_()
    param = next(refiner.parameters())
    return grown.to(param.device).train(refiner.training)


def _sample_pair(
    prob: torch.Tensor, selection: torch.Tensor, window: Window, size: int
) -> torch.Tensor:
    """Resample a probability and a selection ``(H, W)`` to the window together: ``(2, s, s)``.

    Both are cropped first, so no full-slice copy is made per window.
    """
    p, local = crop_to(prob, window)
    sel, _ = crop_to(selection, window)
    return sample_window(torch.stack([p, sel.to(p.dtype)]), local, size)


def stack_inputs(
    image: torch.Tensor,
    fine: torch.Tensor,
    fine_stride: int,
    prob: torch.Tensor,
    selection: torch.Tensor,
    window: Window,
    points: np.ndarray,
    labels: np.ndarray,
    config: RefinerConfig,
    previous: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample everything the refiner reads into one window: ``(in_channels, size, size)``.

    Parameters
    ----------
    image : torch.Tensor
        ``(C, H, W)`` normalised slice.
    fine : torch.Tensor
        ``(Cf, h, w)`` fine features (of the padded slice), one cell per ``fine_stride``
        slice pixels. The refiner reads the first ``config.feature_channels``: the encoder's
        learnt channels, before any filter responses of a network with a task fit.
    prob, selection : torch.Tensor
        ``(H, W)`` class probability and selection (0/1).
    window : Window
    points, labels : np.ndarray
        ``(N, 2)`` clicks on this slice and their ``(N,)`` labels (1 positive, 0 negative).
    config : RefinerConfig
    previous : torch.Tensor, optional
        ``(C, H, W)`` the normalised slice the selection comes from; required, and read
        last, when ``config.previous_image``.
    """
    s = config.size
    extent = (float(fine.shape[-2] * fine_stride), float(fine.shape[-1] * fine_stride))
    parts = [
        sample_window(image, window, s),
        sample_window(fine[: config.feature_channels], window, s, extent),
        _sample_pair(prob, selection, window, s),
        click_maps(window, points, labels, s, config.click_sigmas),
    ]
    if config.previous_image:
        if previous is None:
            raise ValueError("this refiner reads the previous slice's image; none was given")
        parts.append(sample_window(previous, window, s))
    return torch.cat(parts)
