"""Gradient CAM methods in the batched engine, matched to pytorch-grad-cam 1.5.7.

Each is a pure ``*_from_features(activations, gradients) -> CAMResult`` function plus a thin engine
subclass (``Cls(model, target_layer, **options)``, ``cam(images, targets)``):

    GradCAMPlusPlus  gradcampp_from_features   w_c = sum_ij relu(g) a_ij,  a = g^2 / (2 g^2 + sum(A) g^3 + eps)
    XGradCAM         xgradcam_from_features    w_c = sum_ij g A / (sum_ij A + 1e-7)
    LayerCAM         layercam_from_features    cam = sum_c relu(g) A          (element-wise weights)
    HiResCAM         hirescam_from_features    cam = sum_c g A                (element-wise weights)
    GradCAMElementWise  gradcam_elementwise_from_features  cam = sum_c relu(g A)  (element-wise weights)

Every map is relu(sum) divided by its maximum, computed in float64 on power-of-two scaled inputs
(``scaled_cam``: no overflow or underflow at any finite float32 scale); pytorch-grad-cam
min-max scales after the ReLU and resizes with cv2, so maps agree up to an affine change (the tests
compare correlations of the upsampled maps). ``CAMResult.weights`` of the element-wise methods is the
spatial mean of their element-wise weights (informational; the map uses the element-wise weights).
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import validate_features
from ..cam import CAMResult, unit_scale
from ..engine import CAMEngine

def _prepare(activations: Tensor, gradients: Tensor, check_values: bool) -> tuple[Tensor, Tensor]:
    validate_features(activations, gradients, check_values)
    dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
    return activations.to(dtype), gradients.to(dtype)


def _unit(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (B, C, h, w) -> (x * s in float64 with max |x * s| in [0.5, 1), s (B, 1, 1, 1) float64), s a
    power of two per image (``cam.unit_scale``): exact, and nothing overflows or underflows when the
    scaled values are multiplied; the scale factors are combined separately in float64."""
    x = x.double()
    s = unit_scale(x, (1, 2, 3))
    return x * s, s


def _result(cams: Tensor, peak: Tensor, weights: Tensor, like: Tensor) -> CAMResult:
    return CAMResult(cams=cams, weights=weights.to(like.dtype), peak=peak)


def scaled_cam(acts: Tensor, s_a: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """relu(sum_c w_c A_c) / its max, in float64 from power-of-two scaled factors (no overflow, and no
    term lost to underflow, for float32 input of any finite scale).

    acts: (B, C, h, w) float64 = s_a * A (``_unit``); s_a: (B, 1, 1, 1); weights: (B, C) or element-wise
    (B, C, h, w), any floating dtype -> (cams (B, h, w) float32 in [0, 1], peak (B,) float32: the max
    before the division, inf where it exceeds float32).
    """
    w, s_w = _unit(weights[:, :, None, None] if weights.dim() == 2 else weights)
    cam = (w * acts).sum(dim=1).clamp_min_(0)  # (B, h, w) float64
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cams = (cam / torch.where(peak > 0, peak, torch.ones_like(peak))).float()
    return cams, (peak.flatten() / (s_a.flatten() * s_w.flatten())).float()


def elementwise_cam(activations: Tensor, weight_maps: Tensor, with_peak: bool = False):
    """relu(sum_c W_c * A_c), divided by its max where that is > 0 (``scaled_cam``).

    activations, weight_maps: (B, C, h, w) -> (B, h, w) float32 in [0, 1] (with ``with_peak`` also the
    (B,) maxima before the division, inf where they exceed float32).
    """
    cams, peak = scaled_cam(*_unit(activations), weight_maps)
    return (cams, peak) if with_peak else cams


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
    Computed in float64 on power-of-two scaled A and g (s_A, s_g per image): a_ij = u^2 / (2 u^2 +
    S' u^3 / (s_A s_g) + eps s_g^2) with u = s_g g, S' = s_A sum A, so float32 input of any finite scale
    neither overflows nor underflows (float64 input: for scales within about 1e+-150).
    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C) in the input's
    work dtype: float64 for float64, else float32).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    (a, s_a), (u, s_g) = _unit(acts), _unit(grads)
    u2 = u * u
    denom = 2 * u2 + a.sum(dim=(2, 3), keepdim=True) * u2 * u / (s_a * s_g)
    if eps == 0:
        denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    else:
        denom = denom + eps * s_g * s_g
    alpha = torch.where(u != 0, u2 / denom, torch.zeros_like(u2))
    weights = (u.clamp_min(0) * alpha).sum(dim=(2, 3)) / s_g[:, :, 0, 0]  # (B, C) float64
    return _result(*scaled_cam(a, s_a, weights), weights, acts)


def xgradcam_from_features(activations: Tensor, gradients: Tensor, eps: float = 1e-7,
                           check_values: bool = True) -> CAMResult:
    """XGrad-CAM (Fu et al. 2020): w_c = sum_ij g A / (sum_ij A + eps), eps 1e-7 as pytorch-grad-cam.

    Computed in float64 on power-of-two scaled A and g (as ``gradcampp_from_features``):
    w_c = sum u a / (s_g (sum a + eps s_A)) with a = s_A A, u = s_g g.
    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    (a, s_a), (u, s_g) = _unit(acts), _unit(grads)
    weights = (u * a).sum(dim=(2, 3)) / (s_g[:, :, 0, 0] * (a.sum(dim=(2, 3)) + eps * s_a[:, :, 0, 0]))
    return _result(*scaled_cam(a, s_a, weights), weights, acts)


def layercam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """LayerCAM (Jiang et al. 2021): cam = relu(sum_c relu(g) A). weights: spatial mean of relu(g).

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    w = grads.clamp_min(0)
    return _result(*elementwise_cam(acts, w, with_peak=True), spatial_mean(w), acts)


def hirescam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """HiResCAM (Draelos & Carin 2020): cam = relu(sum_c g A). weights: spatial mean of g.

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    return _result(*elementwise_cam(acts, grads, with_peak=True), spatial_mean(grads), acts)


def spatial_mean(x: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C) mean over h x w, taken on a power-of-two scaled copy so it is finite."""
    s = unit_scale(x, (1, 2, 3))
    return ((x * s).mean(dim=(2, 3)).double() / s[:, :, 0, 0].double()).to(x.dtype)


def gradcam_elementwise_from_features(activations: Tensor, gradients: Tensor,
                                      check_values: bool = True) -> CAMResult:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): cam = relu(sum_c relu(g A)).
    weights: spatial mean of g (informational).

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    (a, s_a), (u, s_g) = _unit(acts), _unit(grads)
    cam = (u * a).clamp_min(0).sum(dim=1)  # (B, h, w) float64, power-of-two scaled: no overflow
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cams = (cam / torch.where(peak > 0, peak, torch.ones_like(peak))).float()
    peak = (peak.flatten() / (s_a.flatten() * s_g.flatten())).float()
    return _result(cams, peak, spatial_mean(grads), acts)


class GradCAMPlusPlus(CAMEngine):
    """Grad-CAM++ with the batched engine; ``eps`` as ``gradcampp_from_features`` (1e-6: pytorch-grad-cam)."""

    def __init__(self, model: nn.Module, target_layer, eps: float = 1e-6, **options):
        super().__init__(model, target_layer, **options)
        self.eps = eps

    def _from_features(self, activations, gradients):
        return gradcampp_from_features(activations, gradients, eps=self.eps, check_values=self.check_values)


class XGradCAM(CAMEngine):
    """XGrad-CAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return xgradcam_from_features(activations, gradients, check_values=self.check_values)


class LayerCAM(CAMEngine):
    """LayerCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return layercam_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return gradients.float().clamp_min(0) * activations.float()


class HiResCAM(CAMEngine):
    """HiResCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return hirescam_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return gradients.float() * activations.float()


class GradCAMElementWise(CAMEngine):
    """Element-wise Grad-CAM with the batched engine; ``eigen_smooth`` projects relu(g A)."""

    def _from_features(self, activations, gradients):
        return gradcam_elementwise_from_features(activations, gradients, check_values=self.check_values)

    def _weighted_activations(self, activations, gradients, result):
        return (gradients.float() * activations.float()).clamp_min(0)
