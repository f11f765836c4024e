"""Deep Feature Factorization (Collins et al. 2018), batched: the non-negative factorisation of a layer's
activations into K concepts shared by the whole batch.

As pytorch-grad-cam 1.5.7 (``feature_factorization.deep_feature_factorization.dff``): the activations
(B, C, h, w) are read as C channels x (B h w) pixel values (NaN read as 0), each channel shifted by its
minimum so that it is non-negative, and factorised by NMF (``nmf.nmf``: scikit-learn's coordinate
descent with ``init="random"``, ``random_state=0``) into W (C, K) and H (K, B h w). The concepts are the
channel embeddings W + the shift (C, K); the explanations are H as per-image maps (B, K, h, w). The
factorisation is joint over the batch, so an image's maps depend on the other images (as there).
Components come out in the order of the solver (no sorting), as scikit-learn's.
Shapes: B images, C channels, h x w feature map, K components, H x W input.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import check_ndim, check_floating
from ..fuse import minmax_scale, resize
from ..hooks import eval_mode, forward_hook
from ..layers import resolve_layer
from .nmf import nmf


def dff(activations: Tensor, n_components: int = 5, max_iter: int = 200, tol: float = 1e-4,
        random_state: int = 0, sync_free: bool | None = None) -> tuple[Tensor, Tensor]:
    """activations (B, C, h, w) -> concepts (C, K) and explanations (B, K, h, w), float32 (float64 input:
    float64)."""
    check_ndim(activations, 4, "activations", "(B, C, h, w)")
    check_floating(activations, "activations")
    B, C, h, w = activations.shape
    X = activations.transpose(0, 1).reshape(C, B * h * w)
    X = X if X.dtype == torch.float64 else X.float()
    X = torch.where(torch.isnan(X), torch.zeros_like(X), X)
    offset = X.amin(dim=1, keepdim=True)
    W, H = nmf(X - offset, n_components, max_iter, tol, random_state, sync_free)
    return W + offset, H.reshape(n_components, B, h, w).transpose(0, 1)


def scale_explanations(explanations: Tensor, size: tuple[int, int], eps: float = 0.0) -> Tensor:
    """(B, K, h, w) -> (B, K, H, W): each map min-max scaled, then resized bilinearly (pytorch-grad-cam's
    ``scale_cam_image``; ``eps`` 1e-7 is its)."""
    B, K, h, w = explanations.shape
    flat = explanations.reshape(B * K, h, w)
    if eps == 0:
        scaled = minmax_scale(flat)
    else:
        shifted = flat - flat.amin(dim=(1, 2), keepdim=True)
        scaled = shifted / (shifted.amax(dim=(1, 2), keepdim=True) + eps)
    return resize(scaled, tuple(size)).reshape(B, K, *size)


class DeepFeatureFactorization:
    """``DeepFeatureFactorization(model, target_layer, reshape_transform=None, computation_on_concepts=None,
    max_iter=200, tol=1e-4, random_state=0)``; ``dff(images, n_components=16)`` -> concepts (C, K),
    explanations (B, K, H, W) in [0, 1] at the input size and, with ``computation_on_concepts`` (e.g.
    the model's classifier head), its output on the concepts (K, C) -> (K, L). One forward pass without
    gradients; the hook is removed and the model's mode restored afterwards."""

    def __init__(self, model: nn.Module, target_layer, reshape_transform: Callable | None = None,
                 computation_on_concepts: Callable | None = None, max_iter: int = 200, tol: float = 1e-4,
                 random_state: int = 0, sync_free: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model, self.target_layer = model, resolve_layer(model, target_layer)
        self.reshape_transform, self.computation_on_concepts = reshape_transform, computation_on_concepts
        self.max_iter, self.tol, self.random_state, self.sync_free = max_iter, tol, random_state, sync_free
        self.eps = 0.0  # pytorch-grad-cam's scaling uses 1e-7 (cfcam_gpu.compat sets it)

    def activations(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> the target layer's activations (B, C, h, w)."""
        check_ndim(images, 4, "images", "(B, 3, H, W)")
        got = []
        with eval_mode(self.model), torch.no_grad(), forward_hook(self.target_layer, lambda m, i, o: got.append(o)):
            self.model(images)
        if not got:
            raise ValueError("target_layer: the layer did not run during the forward pass; pick a layer on "
                             "the path from the input to the output")
        acts = got[0] if self.reshape_transform is None else self.reshape_transform(got[0])
        if not isinstance(acts, Tensor) or acts.ndim != 4:
            shape = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"target_layer: expected the layer output to be (B, C, h, w), got {shape}; "
                             f"pass a reshape_transform (presets: cfcam_gpu.reshape)")
        return acts

    def __call__(self, images: Tensor, n_components: int = 16):
        concepts, explanations = dff(self.activations(images), n_components, self.max_iter, self.tol,
                                     self.random_state, self.sync_free)
        maps = scale_explanations(explanations, tuple(images.shape[-2:]), self.eps)
        if self.computation_on_concepts is None:
            return concepts, maps
        with torch.no_grad():
            outputs = self.computation_on_concepts(concepts.T.float().contiguous())
        return concepts, maps, outputs
