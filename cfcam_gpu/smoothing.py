"""pytorch-grad-cam's two smoothings, batched: ``eigen_smooth`` and ``aug_smooth``.

- ``eigen_smooth(weighted)``: the map is the first principal component of the weighted activations
  (B, C, h, w) (what a method sums over channels: w_c A_c, or relu(g) A for LayerCAM, g A for HiResCAM)
  instead of their sum; centred over the pixels, the sign rule of ``methods.eigen`` (the projection
  correlates non-negatively with the channel-mean of the weighted activations, i.e. with the unsmoothed
  map), then ReLU and division by the max.
- ``aug_smooth(explain, images, targets)``: test-time augmentation as pytorch-grad-cam 1.5.7's default
  ``ttach`` transforms: every combination of a horizontal flip (off, on) and a multiplication of the
  input by 0.9, 1.0, 1.1 (6 copies); each copy's map is upsampled to the input size (bilinear,
  align_corners=False), min-max scaled to [0, 1] there (pytorch-grad-cam's ``scale_cam_image``),
  de-augmented (flipped back), and the maps are averaged; the mean is not rescaled (as
  pytorch-grad-cam). So an aug-smoothed result's cams are (B, H, W), at the input resolution. All copies
  of the batch go through ``explain`` as one batch of 6 B images (the engine's ``chunk_size`` bounds
  each model pass). With ``targets=None`` every copy explains its own top-1 class (as
  pytorch-grad-cam); pass targets to explain one class in all copies.
Shapes: B images, A augmented copies, C channels, H x W input, h x w feature map.
"""
from __future__ import annotations

import itertools
from typing import Callable, Sequence

import torch
from torch import Tensor

from .cam import CAMResult, unit_peak
import torch.nn.functional as F

from .methods.eigen import minmax, pca_projection, relu_max

FLIPS = (False, True)
FACTORS = (0.9, 1.0, 1.1)  # pytorch-grad-cam 1.5.7: tta.Compose([HorizontalFlip(), Multiply([0.9, 1, 1.1])])


def eigen_smooth(weighted: Tensor, sync_free: bool | None = None, with_peak: bool = False):
    """weighted activations (B, C, h, w) -> cams (B, h, w) float32 in [0, 1]: relu of the first principal
    component's projection (``methods.eigen.pca_projection``), divided by its max; with ``with_peak``
    also that max (B,), the smoothed map's ``CAMResult.peak``."""
    return relu_max(pca_projection(weighted, sync_free)[0], with_peak)


def augmentations(flips: Sequence[bool] = FLIPS, factors: Sequence[float] = FACTORS) -> list[tuple[bool, float]]:
    """The (flip, factor) pairs in ttach's order (flip outer, factor inner)."""
    if not flips or not factors:
        raise ValueError(f"flips/factors: expected at least one of each, got {tuple(flips)} and {tuple(factors)}")
    return list(itertools.product(flips, factors))


def augment(images: Tensor, augs: Sequence[tuple[bool, float]]) -> Tensor:
    """images (B, 3, H, W) -> (A * B, 3, H, W): copy a (flipped along W if asked, times its factor) in rows
    a * B .. (a + 1) * B."""
    return torch.cat([(images.flip(-1) if flip else images) * factor for flip, factor in augs])


def deaugment_mean(cams: Tensor, augs: Sequence[tuple[bool, float]]) -> Tensor:
    """cams (A * B, h, w) of ``augment``'s copies -> (B, h, w): each flipped back, then the mean over A."""
    maps = cams.reshape(len(augs), -1, *cams.shape[1:])
    return torch.stack([m.flip(-1) if flip else m for m, (flip, _) in zip(maps, augs)]).mean(dim=0)


def _repeat_targets(targets, B: int, A: int):
    """None, an int or one callable on the whole batch's output as is (it scores each row on its own);
    B per-image targets (indices or callables) repeated for the A copies (copy-major order)."""
    if targets is None or isinstance(targets, int) or (hasattr(targets, "ndim") and targets.ndim == 0):
        return targets
    if callable(targets) and not isinstance(targets, (Tensor, list, tuple)):
        return targets
    if len(targets) != B:
        raise ValueError(f"targets: expected {B} class indices (one per image), got {len(targets)}")
    if isinstance(targets, Tensor):
        return targets.repeat(A)
    return list(targets) * A


def aug_smooth(explain: Callable[[Tensor, object], CAMResult], images: Tensor, targets=None,
               flips: Sequence[bool] = FLIPS, factors: Sequence[float] = FACTORS) -> CAMResult:
    """Test-time augmentation smoothing around ``explain(images, targets) -> CAMResult``.

    images (B, 3, H, W) -> CAMResult: cams (B, H, W) the mean of the copies' maps, each upsampled to the
    input size, min-max scaled and de-augmented;
    every other field (weights, targets, logits, clusters) is the un-augmented copy's (flip off, factor
    1.0; the first copy when there is none).
    """
    augs = augmentations(flips, factors)
    B = images.shape[0]
    result = explain(augment(images, augs), _repeat_targets(targets, B, len(augs)))
    identity = next((a for a, (flip, factor) in enumerate(augs) if not flip and factor == 1.0), 0)
    smoothed = result.select(slice(identity * B, (identity + 1) * B))
    smoothed.cams = aug_mean(result.cams, tuple(images.shape[-2:]), augs)
    smoothed.peak = unit_peak(smoothed.cams)  # the mean is final: it is not divided by its max
    return smoothed


def aug_mean(cams: Tensor, size, augs: Sequence[tuple[bool, float]]) -> Tensor:
    """The maps of ``augment``'s copies (A * B, h, w) -> the smoothed maps (B, H, W): each upsampled to
    ``size`` = (H, W) (bilinear, align_corners=False), min-max scaled, de-augmented, averaged."""
    maps = cams.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return deaugment_mean(minmax(maps), augs)
