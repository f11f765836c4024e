"""ShapleyCAM (Cai 2025, arXiv 2501.06261) as pytorch-grad-cam 1.5.7 computes it, batched.

Grad-CAM with the gradient replaced by a second-order estimate of each channel's Shapley value: with
g = dS/dA and the Hessian-vector product H A = d(g . A)/dA (the derivative of the gradients in the
direction of the activations, the activations of the layers below held fixed),
w_c = mean_ij (g - H A / 2)_cij, cam = relu(sum_c w_c A_c) divided by its max. Where the layers above
the target are piecewise linear in A (ReLU networks scored by a logit) H A is 0 and ShapleyCAM is
Grad-CAM; a softmax target makes it differ. One forward, one backward with ``create_graph`` and one
Hessian-vector product for the whole batch (each target layer gets its own).
Shapes: B images, C channels, h x w feature map.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..cam import CAMResult, gradcam_from_features
from ..engine import CAMEngine


def shapleycam_from_features(activations: Tensor, gradients: Tensor, hessian_product: Tensor,
                             check_values: bool = True) -> CAMResult:
    """ShapleyCAM from the activations A, gradients g and the Hessian-vector product H A.

    activations, gradients, hessian_product: (B, C, h, w) -> CAMResult with cams (B, h, w), weights (B, C)
    the spatial means of g - H A / 2, peak (B,).
    """
    if hessian_product.shape != gradients.shape:
        raise ValueError(f"hessian_product: expected the gradients' shape {tuple(gradients.shape)}, got "
                         f"{tuple(hessian_product.shape)}")
    return gradcam_from_features(activations, gradients - 0.5 * hessian_product, check_values)


class ShapleyCAM(CAMEngine):
    """ShapleyCAM with the batched engine. The captured "gradients" it hands to the map are g - H A / 2
    (so ``eigen_smooth`` projects the Shapley weights x activations, as pytorch-grad-cam). The target
    layer must output one tensor."""

    def _gradients(self, scores: Tensor, outputs: list) -> list:
        if not all(isinstance(o, Tensor) for o in outputs):
            raise ValueError("target_layer: ShapleyCAM needs the layer to output one tensor (B, C, h, w), "
                             "got a dict")
        if not scores.requires_grad:
            raise ValueError("target_layer: the target scores do not depend on the layer's output; "
                             "pick a layer on the path from the input to the model output")
        grads = torch.autograd.grad(scores.sum(), outputs, create_graph=True, allow_unused=True)
        out = []
        for n, (acts, g) in enumerate(zip(outputs, grads)):
            if g is None:
                raise ValueError(f"target_layer: the target scores do not depend on the output of target "
                                 f"layer {n}; pick a layer on the path from the input to the model output")
            hvp = None
            if g.requires_grad:  # else the gradient is constant in A (a linear head): H A = 0
                hvp = torch.autograd.grad(g, acts, grad_outputs=acts.detach(), retain_graph=True,
                                          allow_unused=True)[0]
            out.append(g.detach() if hvp is None else (g - 0.5 * hvp).detach())
        return out

    def _from_features(self, activations, gradients):
        return gradcam_from_features(activations, gradients, check_values=self.check_values)
