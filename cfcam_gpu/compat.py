"""Drop-in for pytorch-grad-cam users: the calling convention of ``pytorch_grad_cam.GradCAM``.

    from cfcam_gpu.compat import ClusteredFilteredGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with ClusteredFilteredGradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)] * len(x))  # (B, H, W) NumPy

The maps are upsampled (bilinear) to the input size and lie in [0, 1], so pytorch-grad-cam's
``show_cam_on_image`` works on them.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .engine import CFCAM, GradCAM


def _target_indices(targets, batch: int):
    """None, or one ClassifierOutputTarget-like object (with ``.category``) or int per image."""
    if targets is None:
        return None
    targets = list(targets)
    if len(targets) != batch:
        raise ValueError(f"targets: expected {batch} targets (one per image), got {len(targets)}")
    out = []
    for i, t in enumerate(targets):
        category = getattr(t, "category", t)
        if isinstance(category, torch.Tensor) and category.numel() == 1:
            category = int(category)
        if isinstance(category, bool) or not isinstance(category, (int, np.integer)):
            raise TypeError(f"targets[{i}]: expected a ClassifierOutputTarget or an int class index, got "
                            f"{type(t).__name__}; other pytorch-grad-cam targets are not supported")
        out.append(int(category))
    return out


class _Compat:
    engine = CFCAM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, **options):
        layers = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
        if len(layers) != 1:
            raise ValueError(f"target_layers: expected exactly one layer, got {len(layers)}")
        self.model = model
        self.cam = self.engine(model, layers[0], reshape_transform=reshape_transform, **options)

    def __call__(self, input_tensor: torch.Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        if aug_smooth or eigen_smooth:
            raise ValueError("aug_smooth/eigen_smooth: expected False, got True (not supported)")
        result = self.cam(input_tensor, _target_indices(targets, input_tensor.shape[0]))
        return result.upsample(tuple(input_tensor.shape[-2:])).clamp_(0, 1).cpu().numpy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cam.close()
        return False


class ClusteredFilteredGradCAM(_Compat):
    """CF-CAM with pytorch-grad-cam's interface; returns NumPy (B, H, W) float32 in [0, 1]."""

    engine = CFCAM


class GradCAMCompat(_Compat):
    """Our Grad-CAM with pytorch-grad-cam's interface."""

    engine = GradCAM
