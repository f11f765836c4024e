"""SegEigenCAM (Chung & Ying 2025, "Seg-Eigen-CAM"), batched, as pytorch-grad-cam 1.5.7 computes it.

The map is the first principal component of |gradients| x activations (element-wise; eq. 10 of the
paper), centred over the pixels (``eigen.pca_projection``), with the paper's sign correction (eq. 13):
the projection is negated where |min| > |max|, so the larger excursion is positive. That rule fixes
the sign whatever the solver returns (only an exact tie |min| == |max| keeps our orientation, see
``eigen``), so maps equal pytorch-grad-cam's, not only up to sign. Then ReLU and division by the max.
``eigen_smooth`` changes nothing (the map already is a projection), as in pytorch-grad-cam.
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._checks import validate_features
from ..cam import CAMResult, normalise
from .eigen import EigenEngine, pca_projection


def sign_corrected(projection: Tensor) -> Tensor:
    """(B, h, w) -> (B, h, w): each map negated where |min| > |max| (eq. 13)."""
    lo = projection.amin(dim=(1, 2), keepdim=True).abs()
    hi = projection.amax(dim=(1, 2), keepdim=True).abs()
    return torch.where(lo > hi, -projection, projection)


def segeigencam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True,
                              *, sync_free: bool | None = None) -> CAMResult:
    """activations, gradients: (B, C, h, w) -> CAMResult with cams (B, h, w), peak (B,) and weights (B, C) =
    the component's channel loadings, signed as the map."""
    validate_features(activations, gradients, check_values)
    projection, v = pca_projection(gradients.abs() * activations, sync_free)
    corrected = sign_corrected(projection)
    flip = (corrected != projection).flatten(1).any(dim=1)
    cams, peak = normalise(corrected.clamp_min(0), with_peak=True)
    return CAMResult(cams=cams, weights=torch.where(flip[:, None], -v, v).float(), peak=peak)


class SegEigenCAM(EigenEngine):
    """SegEigenCAM with the batched engine (``sync_free`` as ``eigen.pca_projection``)."""

    def _from_features(self, activations, gradients):
        return segeigencam_from_features(activations, gradients, check_values=self.check_values,
                                         sync_free=self.sync_free)
