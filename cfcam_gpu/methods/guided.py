"""Guided backpropagation (Springenberg et al. 2015), batched, and the display helper of guided Grad-CAM.

``guided_backprop(model, images, targets)``: the gradient of each image's target score with respect to
the input, where every ``nn.ReLU`` module of the model also lets only positive gradients pass backward
(d relu(x) = g * (x > 0) * (g > 0)). As pytorch-grad-cam 1.5.7's ``GuidedBackpropReLUModel``, but the
model is not modified: a forward hook on each ReLU appends an identity whose backward clips the gradient
at 0, and every hook is removed afterwards (pytorch-grad-cam swaps the modules and puts back
non-inplace ``nn.ReLU``s). ReLUs called as functions (``F.relu``) are left as they are, as there.
Guided Grad-CAM is the upsampled CAM times this gradient: ``deprocess(cams[:, None] * gradients)``.
Shapes: B images, H x W input.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from .._checks import check_floating, check_ndim
from ..hooks import eval_mode
from ..targets import detach_output, resolve


class _PositiveGradient(torch.autograd.Function):
    """Identity forward; backward keeps the positive part of the incoming gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()  # a new tensor: later in-place ops of the model must not hit a custom op's view

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp_min(0)


def _guide(module, inputs, output):
    return _PositiveGradient.apply(output)


@contextlib.contextmanager
def guided_relus(model: nn.Module):
    """Inside the block every ``nn.ReLU`` of ``model`` backpropagates only positive gradients."""
    handles = [m.register_forward_hook(_guide) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def guided_backprop(model: nn.Module, images: Tensor, targets=None) -> tuple[Tensor, Tensor]:
    """images (B, 3, H, W) -> guided gradients (B, 3, H, W) in the images' dtype and the detached model
    output. targets: as ``cfcam_gpu.targets`` (None: each image's top-1 class). The model runs in eval
    mode (restored afterwards); parameters' ``.grad`` are not touched."""
    check_ndim(images, 4, "images", "(B, 3, H, W)")
    check_floating(images, "images")
    x = images.detach().requires_grad_(True)
    with eval_mode(model), guided_relus(model), torch.enable_grad():
        output = model(x)
        scores = resolve(targets, output).scores(output)
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad, detach_output(output)


def deprocess(x: Tensor) -> Tensor:
    """pytorch-grad-cam's ``deprocess_image`` per image: (x - mean) / (std + 1e-5) * 0.1 + 0.5, clipped to
    [0, 1], times 255 truncated to uint8; mean and (population) std over all of an image's values.
    x: (B, ...) -> uint8 (B, ...)."""
    flat = x.flatten(1).double()
    y = (flat - flat.mean(dim=1, keepdim=True)) / (flat.std(dim=1, correction=0, keepdim=True) + 1e-5)
    y = (y * 0.1 + 0.5).clamp(0, 1)
    return (y * 255).to(torch.uint8).reshape(x.shape)
