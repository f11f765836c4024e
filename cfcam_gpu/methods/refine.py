"""RefineCAM: the product of a base method's maps over several target layers (a meta-method).

As pytorch-grad-cam 1.5.7's ``RefineCAM`` (default base: Grad-CAM++): each layer's map is what the base
method alone gives for that layer (ReLU'd, min-max scaled, resized bilinearly to the input size and
min-max scaled again: ``fuse.fuse_cams`` of one layer), the maps are multiplied pixel by pixel and the
product is min-max scaled. A deep layer's coarse map masks an early layer's fine but noisy one.
All layers come from one forward and one backward pass here (pytorch-grad-cam runs one per layer).
Shapes: B images, H x W input, h_i x w_i the feature map of layer i.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..cam import CAMResult
from ..engine import CAMEngine
from ..fuse import fuse_cams, minmax_scale
from .gradient import GradCAMPlusPlus

ENGINE_OPTIONS = tuple(p for p in inspect.signature(CAMEngine.__init__).parameters
                       if p not in ("self", "model", "target_layer"))


def refine_fuse(maps: "list[Tensor]", size: tuple[int, int], eps: float = 0.0) -> Tensor:
    """One (B, h_i, w_i) unnormalised map per layer -> (B, H, W) float32 in [0, 1]: the min-max scaled
    product of each layer's ``fuse_cams([map], size, eps)``. ``eps`` 1e-7 is pytorch-grad-cam's."""
    if not maps:
        raise ValueError("maps: expected at least one layer's maps, got none")
    product = fuse_cams([maps[0]], size, eps)
    for m in maps[1:]:
        product = product * fuse_cams([m], size, eps)
    return minmax_scale(product, eps)


class RefineCAM(CAMEngine):
    """RefineCAM with the batched engine: ``RefineCAM(model, target_layers, base_method=GradCAMPlusPlus,
    **options)``; ``base_method`` is an engine class computing its map from the target-layer features
    (every method of ``cfcam_gpu.methods.METHODS`` but scorecam, ablationcam, fullgrad, sess, refinecam);
    the options of ``CAMEngine`` apply to both, the others go to the base method. ``cams`` are (B, H, W)
    at the input size, also for one layer; ``layers`` holds each layer's result of the base method."""

    def __init__(self, model: nn.Module, target_layer, base_method: type = GradCAMPlusPlus, **options):
        if not (isinstance(base_method, type) and issubclass(base_method, CAMEngine)):
            raise TypeError(f"base_method: expected a CAM engine class (e.g. cfcam_gpu.methods.GradCAMPlusPlus), "
                            f"got {base_method!r}")
        if base_method._explain_images is not CAMEngine._explain_images or issubclass(base_method, RefineCAM):
            raise ValueError(f"base_method: expected a method computed from the target layer's features, got "
                             f"{base_method.__name__}, which runs passes of its own")
        super().__init__(model, target_layer, **{k: v for k, v in options.items() if k in ENGINE_OPTIONS})
        self.base = base_method(model, target_layer, **options)
        self.uses_gradients = self.base.uses_gradients  # a gradient-free base: no graph, no backward
        self.eps = 0.0  # pytorch-grad-cam's scaling uses 1e-7 (cfcam_gpu.compat sets it)

    def _from_features(self, activations, gradients):
        return self.base._from_features(activations, gradients)

    def _smooth(self, result, activations, gradients, eigen_smooth):
        return self.base._smooth(result, activations, gradients, eigen_smooth)

    def _combine(self, acts: list, grads: list, size, eigen_smooth: bool = False) -> CAMResult:
        results = [self._smooth(self._from_features(a, g), a, g, eigen_smooth) for a, g in zip(acts, grads)]
        raw = [r.cams if r.peak is None else r.cams * r.peak[:, None, None] for r in results]
        return CAMResult(cams=refine_fuse(raw, tuple(size), self.eps),
                         weights=torch.cat([r.weights for r in results], dim=1), layers=results)
