"""Gradient CAM methods in the batched engine, matched to pytorch-grad-cam 1.5.7.

Each is a pure ``*_from_features(activations, gradients) -> CAMResult`` function plus a thin engine
subclass (``Cls(model, target_layer, **options)``, ``cam(images, targets)``):

    GradCAMPlusPlus  gradcampp_from_features   w_c = sum_ij relu(g) a_ij,  a = g^2 / (2 g^2 + sum(A) g^3 + eps)
    XGradCAM         xgradcam_from_features    w_c = sum_ij g A / (sum_ij A + 1e-7)
    LayerCAM         layercam_from_features    cam = sum_c relu(g) A          (element-wise weights)
    HiResCAM         hirescam_from_features    cam = sum_c g A                (element-wise weights)
    GradCAMElementWise  gradcam_elementwise_from_features  cam = sum_c relu(g A)  (element-wise weights)

Every map is relu(sum) divided by its maximum (``cam.weighted_cam``'s normalisation); pytorch-grad-cam
min-max scales after the ReLU and resizes with cv2, so maps agree up to an affine change (the tests
compare correlations of the upsampled maps). ``CAMResult.weights`` of the element-wise methods is the
spatial mean of their element-wise weights (informational; the map uses the element-wise weights).
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import validate_features
from ..cam import CAMResult, normalise, weighted_cam
from ..engine import _CAMEngine

def _prepare(activations: Tensor, gradients: Tensor, check_values: bool) -> tuple[Tensor, Tensor]:
    validate_features(activations, gradients, check_values)
    dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
    return activations.to(dtype), gradients.to(dtype)


def _result(cams: Tensor, peak: Tensor, weights: Tensor) -> CAMResult:
    return CAMResult(cams=cams, weights=weights.float(), peak=peak)


def elementwise_cam(activations: Tensor, weight_maps: Tensor, with_peak: bool = False):
    """relu(sum_c W_c * A_c), divided by its max where that is > 0.

    activations, weight_maps: (B, C, h, w) -> (B, h, w) float32 in [0, 1] (with ``with_peak`` also the
    (B,) maxima before the division).
    """
    return normalise((weight_maps * activations).sum(dim=1).float().clamp_min_(0), with_peak)


def gradcampp_from_features(activations: Tensor, gradients: Tensor, eps: float = 1e-6,
                            check_values: bool = True) -> CAMResult:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19), as pytorch-grad-cam computes it.

    a_ij = g^2 / (2 g^2 + (sum_ij A) g^3 + eps), 0 where g == 0; w_c = sum_ij relu(g) a_ij.
    ``eps=1e-6`` is pytorch-grad-cam's; ``eps=0`` gives the paper authors' code (a zero denominator is
    replaced by 1). Eq. 19 is the closed form for an exponential of the score, so it is the paper's
    formula up to a positive per-image factor exp(S) (gone after normalisation) only when the layers
    above the target are piecewise linear; the general form with true 2nd/3rd derivatives
    (pytorch-grad-cam issue 369) is deliberately not used. Note that eps is not scale-free: for
    gradients around 1e-3 (g^2 ~ 1e-6) it changes the a_ij noticeably.
    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    g2 = grads * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_acts * g2 * grads
    if eps == 0:
        denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    else:
        denom = denom + eps
    alpha = torch.where(grads != 0, g2 / denom, torch.zeros_like(g2))
    weights = (grads.clamp_min(0) * alpha).sum(dim=(2, 3))
    return _result(*weighted_cam(acts, weights, with_peak=True), weights)


def xgradcam_from_features(activations: Tensor, gradients: Tensor, eps: float = 1e-7,
                           check_values: bool = True) -> CAMResult:
    """XGrad-CAM (Fu et al. 2020): w_c = sum_ij g A / (sum_ij A + eps), eps 1e-7 as pytorch-grad-cam.

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    weights = (grads * acts / (acts.sum(dim=(2, 3), keepdim=True) + eps)).sum(dim=(2, 3))
    return _result(*weighted_cam(acts, weights, with_peak=True), weights)


def layercam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """LayerCAM (Jiang et al. 2021): cam = relu(sum_c relu(g) A). weights: spatial mean of relu(g).

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    w = grads.clamp_min(0)
    return _result(*elementwise_cam(acts, w, with_peak=True), w.mean(dim=(2, 3)))


def hirescam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """HiResCAM (Draelos & Carin 2020): cam = relu(sum_c g A). weights: spatial mean of g.

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    return _result(*elementwise_cam(acts, grads, with_peak=True), grads.mean(dim=(2, 3)))


def gradcam_elementwise_from_features(activations: Tensor, gradients: Tensor,
                                      check_values: bool = True) -> CAMResult:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): cam = relu(sum_c relu(g A)).
    weights: spatial mean of g (informational).

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    cams, peak = normalise((grads * acts).clamp_min(0).sum(dim=1), with_peak=True)
    return _result(cams, peak, grads.mean(dim=(2, 3)))


class GradCAMPlusPlus(_CAMEngine):
    """Grad-CAM++ with the batched engine; ``eps`` as ``gradcampp_from_features`` (1e-6: pytorch-grad-cam)."""

    def __init__(self, model: nn.Module, target_layer, eps: float = 1e-6, **options):
        super().__init__(model, target_layer, **options)
        self.eps = eps

    def _from_features(self, activations, gradients):
        return gradcampp_from_features(activations, gradients, eps=self.eps, check_values=self.check_values)


class XGradCAM(_CAMEngine):
    """XGrad-CAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return xgradcam_from_features(activations, gradients, check_values=self.check_values)


class LayerCAM(_CAMEngine):
    """LayerCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return layercam_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return gradients.float().clamp_min(0) * activations.float()


class HiResCAM(_CAMEngine):
    """HiResCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return hirescam_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return gradients.float() * activations.float()


class GradCAMElementWise(_CAMEngine):
    """Element-wise Grad-CAM with the batched engine; ``eigen_smooth`` projects relu(g A)."""

    def _from_features(self, activations, gradients):
        return gradcam_elementwise_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return (gradients.float() * activations.float()).clamp_min(0)
