"""The CF-CAM authors' evaluation protocol (arXiv 2504.00060 v2; their ``metrics/ad.py``, ``ai.py``,
``auc.py``, ``robust.py``), batched on the model's device, built on ``metrics``.

Every map is first brought to the input the way the published CF-CAM returns it: bilinear upsampling
(align_corners=False), then divided by its max where that is > 0 (``input_maps``); thresholds then mean
the same for every method.
- ``paper_average_drop``: pixels with map > 0.5 kept, the rest black in pixel space
  (``metrics.average_drop_increase(mode="threshold")``); their drop is not clipped at 0 (``drop``), the
  usual Average Drop is (``drop_clipped``).
- ``paper_average_increase``: their "Average Increase" is another quantity: pixels with map > 0.3 pasted on
  a constant image whose model-input value is (0.485, 0.456, 0.406) (the ImageNet mean given to the
  normalised tensor, not the mean colour), increase = p(pasted) - p(constant image).
- ``paper_deletion_insertion``: 100 steps of H W // 100 pixels (all of them at the last step), towards /
  from the all-zero model input, trapezoid AUC (``metrics.deletion_insertion``).
- ``paper_robustness``: SSIM (scikit-image's default 7 x 7 uniform window) and MSE between the clean map
  and the map with N(0, level^2) noise on the target-layer gradients, levels 1..10 (absolute, not scaled
  by the gradients' spread). The noise enters every method's weights the same way; in the authors'
  code it reaches Grad-CAM's and Grad-CAM++'s weights but is added to CF-CAM's filtered gradients after
  its weights were computed, so it never changes CF-CAM's map there.
Shapes: B images, H x W input, h x w feature map, C channels.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import (DeletionInsertion, Robustness, check_batch_size, check_metric_inputs, class_probabilities,
                      average_drop_increase, deletion_insertion, robustness)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NOISE_LEVELS = tuple(float(level) for level in range(1, 11))


class PaperDrop(NamedTuple):
    """Per image: drop (B,) in percent as the authors compute it (negative where confidence rose),
    drop_clipped (B,) the usual Average Drop term, increase (B,) bool, p (B,), p_explanation (B,)."""

    drop: Tensor
    drop_clipped: Tensor
    increase: Tensor
    p: Tensor
    p_explanation: Tensor


class PaperIncrease(NamedTuple):
    """Per image: increase (B,) = p_inserted - p_constant, and the two probabilities (B,)."""

    increase: Tensor
    p_inserted: Tensor
    p_constant: Tensor


def input_maps(cams: Tensor, size) -> Tensor:
    """(B, h, w) maps -> (B, H, W) float32: bilinear (align_corners=False) to ``size``, divided by each
    map's max where it is > 0 (the published CF-CAM's output)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    maps = cams.reshape(cams.shape[0], 1, *cams.shape[-2:]).float()
    if tuple(maps.shape[-2:]) != size:
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    peak = maps.amax(dim=(1, 2, 3), keepdim=True)
    return (maps / torch.where(peak > 0, peak, torch.ones_like(peak)))[:, 0]


def paper_average_drop(model: nn.Module, images: Tensor, cams: Tensor, targets, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, threshold: float = 0.5, batch_size: int = 64) -> PaperDrop:
    """Average Drop with the authors' mask. images: (B, 3, H, W) model input (normalised by ``mean``,
    ``std``); cams: (B, h, w); targets: int or B indices -> PaperDrop (means over images: the scores)."""
    r = average_drop_increase(model, images, input_maps(cams, images.shape[-2:]), targets, mode="threshold",
                              mean=mean, std=std, threshold=threshold, batch_size=batch_size)
    return PaperDrop((r.p - r.p_explanation) / r.p * 100, r.drop, r.increase, r.p, r.p_explanation)


def paper_average_increase(model: nn.Module, images: Tensor, cams: Tensor, targets, threshold: float = 0.3,
                           fill: Sequence[float] = IMAGENET_MEAN, batch_size: int = 64) -> PaperIncrease:
    """The authors' "Average Increase" (module notes): pixels with map > ``threshold`` pasted onto the
    constant model input ``fill`` (one value per colour channel, in the model's input space).
    images: (B, 3, H, W); cams: (B, h, w) -> PaperIncrease."""
    cams, t = check_metric_inputs(images, cams, targets)
    batch_size = check_batch_size(batch_size)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=images.device)
    if fill_t.shape != (images.shape[1],):
        raise ValueError(f"fill: expected {images.shape[1]} values (one per input channel), got {tuple(fill)}")
    constant = fill_t.view(1, -1, 1, 1).expand_as(images)
    keep = input_maps(cams.to(images.device), images.shape[-2:])[:, None] > threshold  # (B, 1, H, W)
    B = images.shape[0]
    p_in = class_probabilities(model, lambda idx: torch.where(keep[idx], images[idx], constant[idx]), B, t,
                          batch_size, images.device)
    p_const = class_probabilities(model, lambda idx: constant[idx], B, t, batch_size, images.device)
    return PaperIncrease(p_in - p_const, p_in, p_const)


def paper_deletion_insertion(model: nn.Module, images: Tensor, cams: Tensor, targets,
                             batch_size: int = 64) -> DeletionInsertion:
    """Deletion and insertion as the authors run them: 100 steps of H W // 100 pixels ranked by the
    input-size map, towards / from the all-zero model input, trapezoid AUCs. -> DeletionInsertion."""
    H, W = images.shape[-2:]
    return deletion_insertion(model, images, input_maps(cams.to(images.device), (H, W)), targets, steps=100,
                              baseline="zero", batch_size=batch_size, pixels_per_step=H * W // 100)


def paper_robustness(cam_fn_from_features: Callable, acts: Tensor, grads: Tensor, size,
                     levels: Sequence[float] = NOISE_LEVELS,
                     generator: torch.Generator | None = None) -> dict[float, Robustness]:
    """SSIM (uniform 7 x 7 window) and MSE between each method's clean input-size map and its map with
    N(0, level^2) noise added to the gradients ``grads`` (B, C, h, w) before its weights, for each level.
    ``cam_fn_from_features``: (acts, grads) -> CAMResult; ``size``: the input (H, W).
    -> {level: Robustness(ssim (B,), mse (B,))}."""
    def maps(a: Tensor, g: Tensor) -> SimpleNamespace:
        return SimpleNamespace(cams=input_maps(cam_fn_from_features(a, g).cams, size))

    return robustness(maps, acts, grads, levels, generator, relative=False, window="uniform")
