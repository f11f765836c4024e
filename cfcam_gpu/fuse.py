"""Scaling and multi-layer fusion of CAMs at the input size, the way pytorch-grad-cam aggregates layers.

Shapes: B images, H x W input, h x w feature map (one per layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def minmax_scale(maps: Tensor, eps: float = 0.0) -> Tensor:
    """(m - min) / (max(m - min) + eps) per map; (B, h, w) -> (B, h, w) float32.

    A constant map cannot be min-max scaled: a constant positive map becomes all 1 (it is the maximum
    everywhere; pytorch-grad-cam gives all 0 there, e.g. for 1x1 maps), an all-zero map stays 0.
    ``eps`` 1e-7 is pytorch-grad-cam's (on its unnormalised maps); 0 divides exactly.
    """
    maps = maps.float()
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    scaled = (maps - lo) / torch.where(span > 0, span + eps, torch.ones_like(span))
    constant = (span <= 0).expand_as(maps)
    return torch.where(constant, (hi > 0).float().expand_as(maps), scaled)


def resize(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """(B, h, w) -> (B, H, W) bilinear with half-pixel centres (OpenCV's ``resize`` INTER_LINEAR when
    upsampling; ``align_corners=False``)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def fuse_cams(maps: "list[Tensor]", size: tuple[int, int], eps: float = 0.0) -> Tensor:
    """pytorch-grad-cam's multi-layer aggregation: each layer's map ReLU'd, min-max scaled and resized to
    the input size, then the clamped mean over layers min-max scaled once more.

    maps: one (B, h_i, w_i) tensor per layer (any sizes) -> (B, H, W) float32 in [0, 1].
    """
    if not maps:
        raise ValueError("maps: expected at least one layer's maps, got none")
    per_layer = [resize(minmax_scale(m.clamp_min(0), eps), size) for m in maps]
    mean = torch.stack(per_layer, dim=1).clamp_min(0).mean(dim=1)
    return minmax_scale(mean, eps)
