"""Drop-in for pytorch-grad-cam users: its class names, constructor, call and output.

    from cfcam_gpu.compat import GradCAM, ClusteredFilteredGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)] * len(x))  # (B, H, W) NumPy
        cam.outputs                                                                 # the model output

Every class takes ``(model, target_layers, reshape_transform=None)`` (plus our engine options as keyword
arguments) and is called with ``(input_tensor, targets=None, aug_smooth=False, eigen_smooth=False)``
(the smoothing options of every engine, see ``cfcam_gpu.smoothing``).
``targets``: anything ``cfcam_gpu.targets`` accepts, in particular a list of pytorch-grad-cam target
objects (one per image). Maps are computed by our batched engines, then scaled as pytorch-grad-cam
does: each layer's ReLU'd map min-max scaled ((m - min) / (max + 1e-7) on the unnormalised map),
resized bilinearly to the input size, averaged over layers and min-max scaled again; returned as a
float32 NumPy array (B, H, W) in [0, 1], so ``show_cam_on_image`` works on them. Differences on
purpose: a constant positive map (e.g. a 1x1 layer) is all 1 here, all 0 in pytorch-grad-cam; the
model's train/eval state is restored after each call; a wrong number of targets raises instead of
being truncated. ``ScoreCAM`` scores masked inputs with the targets (the logit by default, as
pytorch-grad-cam), ``AblationCAM`` uses pytorch-grad-cam's ablation value (see ``methods.AblationCAM``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import engine as _engine
from .fuse import fuse_cams
from .methods import gradient as _gradient
from .methods import perturbation as _perturbation

SCALE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image


def to_numpy_maps(result, size) -> np.ndarray:
    """CAMResult (one layer, or several in ``result.layers``) -> pytorch-grad-cam's (B, H, W) float32
    NumPy maps in [0, 1] (see the module docstring)."""
    layers = result.layers or [result]
    raw = [r.cams * r.peak[:, None, None] for r in layers]  # the unnormalised ReLU'd maps
    return fuse_cams(raw, tuple(size), eps=SCALE_EPS).clamp_(0, 1).cpu().numpy()


class _Compat:
    engine = _engine.CFCAM
    fixed: dict = {}

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, **options):
        layers = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
        self.model, self.target_layers, self.outputs = model, layers, None
        self.cam = self.engine(model, layers, reshape_transform=reshape_transform, **{**self.fixed, **options})

    def __call__(self, input_tensor: torch.Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        param = next(self.model.parameters(), None)
        if param is not None:
            input_tensor = input_tensor.to(param.device)
        result = self.cam(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
        self.outputs = result.logits
        if aug_smooth:  # already pytorch-grad-cam's mean of scaled maps at the input size, not rescaled
            return result.cams.clamp(0, 1).cpu().numpy()
        return to_numpy_maps(result, input_tensor.shape[-2:])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cam.close()
        return False


class ClusteredFilteredGradCAM(_Compat):
    """CF-CAM with pytorch-grad-cam's interface."""

    engine = _engine.CFCAM


class GradCAM(_Compat):
    """pytorch_grad_cam.GradCAM's interface over our batched Grad-CAM."""

    engine = _engine.GradCAM


GradCAMCompat = GradCAM  # the earlier name


class GradCAMPlusPlus(_Compat):
    """pytorch_grad_cam.GradCAMPlusPlus's interface."""

    engine = _gradient.GradCAMPlusPlus


class XGradCAM(_Compat):
    """pytorch_grad_cam.XGradCAM's interface."""

    engine = _gradient.XGradCAM


class LayerCAM(_Compat):
    """pytorch_grad_cam.LayerCAM's interface."""

    engine = _gradient.LayerCAM


class HiResCAM(_Compat):
    """pytorch_grad_cam.HiResCAM's interface."""

    engine = _gradient.HiResCAM


class ScoreCAM(_Compat):
    """pytorch_grad_cam.ScoreCAM's interface: masked inputs scored by the targets (default: the top-1
    logit), a softmax over channels; ``batch_size`` masked inputs per forward (16, settable later as in
    pytorch-grad-cam: ``cam.batch_size = 64``)."""

    engine = _perturbation.ScoreCAM
    fixed = {"score": "logit", "channel_softmax": True}

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, batch_size: int = 16,
                 **options):
        super().__init__(model, target_layers, reshape_transform, score_batch_size=batch_size, **options)

    @property
    def batch_size(self) -> int:
        return self.cam.score_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {value!r}")
        self.cam.score_batch_size = value


class AblationCAM(_Compat):
    """pytorch_grad_cam.AblationCAM's interface with its ablation value (``ablation_value=
    "pytorch-grad-cam"``: 0 for layers whose minimum is 0, else min - k * 1e7 in groups of ``batch_size``).
    ``ablation_layer`` and ``ratio_channels_to_ablate`` other than 1.0 are not offered."""

    engine = _perturbation.AblationCAM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, batch_size: int = 32,
                 ratio_channels_to_ablate: float = 1.0, **options):
        if ratio_channels_to_ablate != 1.0:
            raise ValueError(f"ratio_channels_to_ablate: expected 1.0 (every channel), got "
                             f"{ratio_channels_to_ablate!r}")
        options.setdefault("ablation_value", "pytorch-grad-cam")
        super().__init__(model, target_layers, reshape_transform, pgc_batch_size=batch_size, **options)
