"""RandomCAM: channel weights drawn uniformly from [-1, 1), a baseline for sanity checks of saliency metrics.

As pytorch-grad-cam 1.5.7's ``RandomCAM``: cam = relu(sum_c w_c A_c) with w (B, C) ~ U(-1, 1), divided by its
maximum. The weights come from a ``torch.Generator`` on the activations' device (or torch's global
generator), so a seeded generator reproduces a run; ``cfcam_gpu.compat.RandomCAM`` draws them from
NumPy's global generator instead, as pytorch-grad-cam does, so ``np.random.seed`` reproduces its maps.
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_ndim, validate_features
from ..cam import CAMResult, weighted_cam
from ..engine import CAMEngine


def random_weights(B: int, C: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, C) float32 weights uniform in [-1, 1) on ``like``'s device (``generator`` on that device)."""
    if generator is not None and generator.device.type != like.device.type:
        raise ValueError(f"generator: expected a torch.Generator on the features' device {like.device}, got one "
                         f"on {generator.device}")
    u = torch.rand(B, C, generator=generator, device=like.device, dtype=torch.float32)
    return u * 2 - 1


def randomcam_from_features(activations: Tensor, gradients: Tensor | None = None, check_values: bool = True,
                            *, weights: Tensor | None = None,
                            generator: torch.Generator | None = None) -> CAMResult:
    """RandomCAM on features: activations (B, C, h, w) (gradients ignored, may be None); ``weights`` (B, C)
    given, or drawn by ``random_weights`` with ``generator`` -> CAMResult (cams (B, h, w), weights, peak)."""
    validate_features(activations, activations if gradients is None else gradients, check_values)
    B, C = activations.shape[:2]
    if weights is None:
        weights = random_weights(B, C, activations, generator)
    check_ndim(weights, 2, "weights", "(B, C)")
    if tuple(weights.shape) != (B, C):
        raise ValueError(f"weights: expected shape {(B, C)} (one weight per image and channel), got "
                         f"{tuple(weights.shape)}")
    cams, peak = weighted_cam(activations, weights.to(activations.device), with_peak=True)
    return CAMResult(cams=cams, weights=weights.float(), peak=peak)


class RandomCAM(CAMEngine):
    """RandomCAM with the batched engine; ``generator``: a ``torch.Generator`` on the model's device
    (None: torch's global generator). One draw of (B, C) weights per target layer and call; gradient-free
    (no backward pass)."""

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer, generator: torch.Generator | None = None, **options):
        super().__init__(model, target_layer, **options)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
        self.generator = generator

    def draw_weights(self, B: int, C: int, like: Tensor) -> Tensor:
        """The (B, C) weights of one layer (a subclass may draw them elsewhere)."""
        return random_weights(B, C, like, self.generator)

    def _from_features(self, activations, gradients):
        weights = self.draw_weights(activations.shape[0], activations.shape[1], activations)
        return randomcam_from_features(activations, gradients, check_values=self.check_values, weights=weights)
