"""FEM, the Feature Explanation Method (Fuad et al. 2020), as pytorch-grad-cam 1.5.7 computes it, batched.

Gradient-free: a channel's weight is the fraction of its pixels above its own k-sigma threshold,
w_c = mean_ij [A_cij > mean_ij A_c + k std_ij A_c] (population std, k = 2 by default), and
cam = relu(sum_c w_c A_c), divided by its max (``cam.weighted_cam``). ``eigen_smooth`` does not apply
(as in pytorch-grad-cam, the map is always the weighted sum).
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import validate_features
from ..cam import CAMResult, weighted_cam
from ..engine import CAMEngine

K_SIGMA = 2.0  # pytorch-grad-cam's default k


def fem_weights(activations: Tensor, k: float = K_SIGMA) -> Tensor:
    """activations (B, C, h, w) -> (B, C) float32 (float64 for float64 input): the fraction of each
    channel's pixels strictly above its spatial mean + k * its spatial (population) standard deviation."""
    acts = activations if activations.dtype == torch.float64 else activations.float()
    mean = acts.mean(dim=(2, 3), keepdim=True)
    std = acts.std(dim=(2, 3), keepdim=True, correction=0)
    return (acts > mean + k * std).to(acts.dtype).mean(dim=(2, 3))


def fem_from_features(activations: Tensor, gradients: Tensor | None = None, check_values: bool = True,
                      *, k: float = K_SIGMA) -> CAMResult:
    """FEM from the target layer's activations; gradients are ignored (may be None).

    activations: (B, C, h, w) -> CAMResult with cams (B, h, w), weights (B, C) (``fem_weights``), peak (B,).
    """
    validate_features(activations, activations if gradients is None else gradients, check_values)
    weights = fem_weights(activations, k)
    cams, peak = weighted_cam(activations, weights, with_peak=True)
    return CAMResult(cams=cams, weights=weights, peak=peak)


class FEM(CAMEngine):
    """FEM with the batched engine; ``k`` the threshold in standard deviations (2, pytorch-grad-cam's);
    gradient-free (no backward pass)."""

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer, k: float = K_SIGMA, **options):
        super().__init__(model, target_layer, **options)
        self.k = float(k)

    def _from_features(self, activations, gradients):
        return fem_from_features(activations, gradients, check_values=self.check_values, k=self.k)

    def _smooth(self, result, activations, gradients, eigen_smooth):
        return result
