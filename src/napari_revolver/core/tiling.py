"""The encoder and the segmentor on slices of any size: padding, and tiles for large slices.

Both are exact where it matters: encoder tiles overlap by :data:`TILE_OVERLAP` pixels and keep
their centres; segmentor tiles overlap by :data:`HEAD_OVERLAP` coarse cells, more than the
head's receptive field, so a tiled head gives the same logits as one pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model.encoder import EncoderOutput
from .model.guide import GuideOutput
from .model.guided_net import GuidedNet

__all__ = [
    "HEAD_OVERLAP",
    "MAX_TILE_PIXELS",
    "TILE",
    "TILE_OVERLAP",
    "encode_slices",
    "feature_shapes",
    "round_up",
    "segment_slices",
]

#: Slices above this many pixels are encoded (and segmented) in tiles to bound memory.
MAX_TILE_PIXELS = 2048 * 2048
#: Tile side in pixels.
TILE = 1024
#: Overlap of encoder tiles in pixels.
TILE_OVERLAP = 96
#: Overlap of segmentor tiles, in coarse cells: the head sees 1 + 2 cells around a position,
#: 1 + 2 + 4 + 8 with the wide context, plus the fine refinement and upsampling.
HEAD_OVERLAP = 17


def round_up(n: int, m: int) -> int:
    """Round ``n`` up to a multiple of ``m``."""
    return -(-n // m) * m


def feature_shapes(
    model: GuidedNet, slice_shape: tuple[int, int]
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Shapes ``(Cc, H'/8, W'/8)`` and ``(Cf, H'/4, W'/4)`` of one slice's coarse and fine features.

    ``H', W'`` are the slice size rounded up to ``model.size_multiple``.
    """
    cfg = model.config
    h, w = (round_up(s, model.size_multiple) for s in slice_shape)
    return (cfg.coarse_channels, h // 8, w // 8), (cfg.feature_fine_channels, h // 4, w // 4)


@torch.inference_mode()
def encode_slices(
    model: GuidedNet, images: list[torch.Tensor], device: torch.device
) -> EncoderOutput:
    """Encode normalised slices of one size, padded to the encoder's size multiple.

    Parameters
    ----------
    model : GuidedNet
    images : list of torch.Tensor
        ``[(C, H, W)]`` float32, all of one size.
    device : torch.device
        Where to run the encoder.

    Returns
    -------
    EncoderOutput
        ``coarse (B, Cc, H'/8, W'/8)`` and ``fine (B, Cf, H'/4, W'/4)`` on ``device``, with
        ``H', W'`` the slice size rounded up to ``model.size_multiple``.
    """
    h, w = images[0].shape[-2:]
    m = model.size_multiple
    ph, pw = round_up(h, m), round_up(w, m)
    x = torch.stack(images).to(device)
    if (ph, pw) != (h, w):
        mode = "reflect" if ph - h < h and pw - w < w else "replicate"
        x = F.pad(x, (0, pw - w, 0, ph - h), mode=mode)
    if ph * pw <= MAX_TILE_PIXELS:
        return model.encode(x)
    return _encode_tiled(model, x)


def _encode_tiled(model: GuidedNet, x: torch.Tensor) -> EncoderOutput:
    """Encode a large padded batch ``(B, C, H, W)`` tile by tile, keeping each tile's centre."""
    b, _, h, w = x.shape
    cfg = model.config
    coarse = torch.empty(b, cfg.coarse_channels, h // 8, w // 8, device=x.device)
    fine = torch.empty(b, cfg.feature_fine_channels, h // 4, w // 4, device=x.device)
    step = TILE - 2 * TILE_OVERLAP
    for y0 in range(0, h, step):
        for x0 in range(0, w, step):
            ty0, tx0 = max(0, y0 - TILE_OVERLAP), max(0, x0 - TILE_OVERLAP)
            ty1, tx1 = min(h, y0 + step + TILE_OVERLAP), min(w, x0 + step + TILE_OVERLAP)
            f = model.encode(x[:, :, ty0:ty1, tx0:tx1])
            y1, x1 = min(h, y0 + step), min(w, x0 + step)
            for feats, out, s in ((f.coarse, coarse, 8), (f.fine, fine, 4)):
                out[:, :, y0 // s : y1 // s, x0 // s : x1 // s] = feats[
                    :, :, (y0 - ty0) // s : (y1 - ty0) // s, (x0 - tx0) // s : (x1 - tx0) // s
                ]
    return EncoderOutput(coarse, fine)


@torch.inference_mode()
def segment_slices(
    model: GuidedNet,
    feats: EncoderOutput,
    guidance: GuideOutput,
    out_size: tuple[int, int],
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segmentor logits of every (query slice, task) pair, tiled on large slices.

    Parameters
    ----------
    model : GuidedNet
    feats : EncoderOutput
        S query slices: ``coarse (S, Cc, h, w)``, ``fine (S, Cf, 2h, 2w)`` float32.
    guidance : GuideOutput
        T task vectors.
    out_size : tuple of int
        ``(H, W)`` of the slices (the padding is cropped).
    prior : torch.Tensor, optional
        ``(S * T, 3, 2h, 2w)`` local priors, slice-major.

    Returns
    -------
    torch.Tensor
        ``(S * T, H, W)`` logits, slice-major.
    """
    n_s, n_t = feats.coarse.shape[0], guidance.mass.shape[0]
    if n_s > 1 or n_t > 1:
        feats = EncoderOutput(
            feats.coarse.repeat_interleave(n_t, 0), feats.fine.repeat_interleave(n_t, 0)
        )
        guidance = guidance.repeat(n_s)
    h, w = out_size
    if h * w <= MAX_TILE_PIXELS:
        return model.segment(feats, guidance, out_size, prior=prior)
    return _segment_tiled(model, feats, guidance, out_size, prior)


def _segment_tiled(
    model: GuidedNet,
    f: EncoderOutput,
    guidance: GuideOutput,
    out_size: tuple[int, int],
    prior: torch.Tensor | None,
) -> torch.Tensor:
    """Run the segmentor tile by tile, to bound its activation memory on a large slice.

    The head sees at most 15 coarse cells around each position (16 with the fine
    refinement), so tiles overlapping by ``HEAD_OVERLAP`` coarse cells give the same result
    as one pass.
    """
    b = f.coarse.shape[0]
    hc, wc = f.coarse.shape[-2:]
    out = torch.empty(b, hc * 8, wc * 8, device=f.coarse.device)
    step = TILE // 8
    for y0 in range(0, hc, step):
        for x0 in range(0, wc, step):
            ty0, tx0 = max(0, y0 - HEAD_OVERLAP), max(0, x0 - HEAD_OVERLAP)
            ty1, tx1 = min(hc, y0 + step + HEAD_OVERLAP), min(wc, x0 + step + HEAD_OVERLAP)
            tile = EncoderOutput(
                f.coarse[:, :, ty0:ty1, tx0:tx1],
                f.fine[:, :, 2 * ty0 : 2 * ty1, 2 * tx0 : 2 * tx1],
            )
            tile_prior = (
                None if prior is None else prior[:, :, 2 * ty0 : 2 * ty1, 2 * tx0 : 2 * tx1]
            )
            logits = model.segment(tile, guidance, prior=tile_prior)
            y1, x1 = min(hc, y0 + step), min(wc, x0 + step)
            out[:, 8 * y0 : 8 * y1, 8 * x0 : 8 * x1] = logits[
                :, 8 * (y0 - ty0) : 8 * (y1 - ty0), 8 * (x0 - tx0) : 8 * (x1 - tx0)
            ]
    return out[:, : out_size[0], : out_size[1]]
