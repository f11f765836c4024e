"""FullGrad (Srinivas & Fleuret 2019) as pytorch-grad-cam 1.5.7 computes it, batched.

The map sums, at the input resolution, the input-gradient term |dS/dx * x| (each of its 3 channels on
its own) and for every ``nn.Conv2d`` and ``nn.BatchNorm2d`` with a bias (exactly those types, as
pytorch-grad-cam; a BatchNorm's bias is its eval-mode shift b - mean * w / sqrt(var + eps)) the bias term
|b_c * dS/dz_c| of its output z. Every channel map is min-max scaled on its own, (m - min) /
(max - min + 1e-7) (pytorch-grad-cam's epsilon), and bilinearly upsampled; the total is min-max scaled
to [0, 1]. There is no target layer: every bias layer that runs is used (a layer called twice counts
twice). One forward and one ``autograd.grad`` to the input and every bias layer's output for the whole
batch. ``eigen_smooth`` (as pytorch-grad-cam): the per-term maps (3 + L of them) are min-max scaled,
shrunk to (H // 8, W // 8), projected on their first principal component (sign rule of
``methods.eigen``), min-max scaled and upsampled back.
Shapes: B images, C channels, H x W input, h x w feature map, L bias layers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cam import CAMResult
from ..engine import CAMEngine
from ..hooks import eval_mode, forward_hook
from ..targets import resolve
from .eigen import minmax, pca_projection

CHANNEL_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image epsilon


def bias_of(layer: nn.Module) -> Tensor | None:
    """The additive bias (C,) of a Conv2d or (eval-mode) BatchNorm2d, detached; None for other layers or
    layers without one (a BatchNorm without affine parameters or running statistics)."""
    if type(layer) is nn.Conv2d and layer.bias is not None:
        return layer.bias.detach()
    if type(layer) is nn.BatchNorm2d and layer.bias is not None and layer.running_mean is not None:
        scale = layer.weight.detach() / torch.sqrt(layer.running_var + layer.eps)
        return layer.bias.detach() - layer.running_mean * scale
    return None


def _resize(maps: Tensor, size) -> Tensor:
    """(B, K, h, w) -> (B, K, *size), bilinear, align_corners=False (OpenCV's INTER_LINEAR)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def fullgrad_from_gradients(images: Tensor, input_grads: Tensor, biases: list[Tensor],
                            layer_grads: list[Tensor], eigen_smooth: bool = False,
                            sync_free: bool | None = None, with_peak: bool = False):
    """FullGrad maps from the gradients of the score.

    images, input_grads: (B, 3, H, W); biases[l]: (C_l,); layer_grads[l]: (B, C_l, h_l, w_l), the score's
    gradient at bias layer l's output -> (B, H, W) float32 in [0, 1]; with ``with_peak`` also the (B,)
    span (max - min) of the total before its min-max scaling (``CAMResult.peak``: cams * peak is the
    total up to an offset).
    """
    size = images.shape[-2:]
    terms = [minmax((input_grads.float() * images.float()).abs(), CHANNEL_EPS)]  # (B, 3, H, W)
    for bias, grads in zip(biases, layer_grads):
        per_channel = minmax((bias.float()[None, :, None, None] * grads.float()).abs(), CHANNEL_EPS)
        terms.append(_resize(per_channel.sum(dim=1, keepdim=True), size))  # resize is linear: sum first
    if not eigen_smooth:
        total = sum(t.sum(dim=1) for t in terms)
    else:
        stack = torch.cat(terms, dim=1)  # (B, 3 + L, H, W)
        small = _resize(minmax(stack, CHANNEL_EPS), (size[0] // 8, size[1] // 8))
        projection = minmax(pca_projection(small, sync_free)[0], CHANNEL_EPS)
        total = _resize(projection[:, None], size)[:, 0]
    cams = minmax(total)
    if not with_peak:
        return cams
    return cams, total.amax(dim=(1, 2)) - total.amin(dim=(1, 2))


class FullGrad(CAMEngine):
    """FullGrad with the batched engine: ``FullGrad(model, target_layer=None, **options)``; the target
    layer is not used (every bias layer is). ``cam(images, targets, eigen_smooth=...)`` -> CAMResult with
    cams (B, H, W) at the input resolution and an empty weights (B, 0). ``explain`` is not available (the
    gradient with respect to the input is needed)."""

    def __init__(self, model: nn.Module, target_layer=None, sync_free: bool | None = None, **options):
        super().__init__(model, model if target_layer is None else target_layer, **options)
        self.sync_free = sync_free

    def _from_features(self, activations, gradients):
        raise ValueError("FullGrad needs the input images (gradients at the input and at every bias layer); "
                         "call cam(images, targets) instead of explain() or *_from_features")

    def explain(self, logits, targets=None, eigen_smooth=False):
        return self._from_features(None, None)

    def _explain_images(self, images: Tensor, targets, eigen_smooth: bool = False) -> CAMResult:
        captured: list[tuple[Tensor, Tensor]] = []

        def hook(module, inputs, output):
            captured.append((output, bias_of(module)))
            return output.clone()  # in-place ops after the layer (ReLU(inplace=True)) must not touch it

        layers = [m for m in self.model.modules() if bias_of(m) is not None]
        with contextlib.ExitStack() as stack, eval_mode(self.model):
            for layer in layers:
                stack.enter_context(forward_hook(layer, hook))
            with torch.enable_grad(), self._autocast(images):
                x = images.detach().requires_grad_(True)
                logits = self._forward(x)
                target = resolve(targets, logits)  # every kind of target, as the other engines
                grads = torch.autograd.grad(target.scores(logits).sum(), [x] + [out for out, _ in captured])
        biases = [bias_of_layer for _, bias_of_layer in captured]
        cams, peak = fullgrad_from_gradients(images, grads[0], biases, list(grads[1:]), eigen_smooth,
                                             self.sync_free, with_peak=True)
        return CAMResult(cams=cams, weights=cams.new_zeros(images.shape[0], 0), targets=target.indices,
                         logits=logits.detach(), peak=peak)
