"""Every CAM method by name: the engines and, for the gradient methods, their pure functions.

Names are those of ``cfcam explain --method`` / ``cfcam evaluate --methods``.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ..cam import CAMResult, cfcam_from_features, gradcam_from_features
from ..engine import CFCAM, GradCAM, CAMEngine
from .fem import FEM, fem_from_features
from .finer import FinerCAM
from .gradient import (GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM,
                       gradcam_elementwise_from_features, gradcampp_from_features, hirescam_from_features,
                       layercam_from_features, xgradcam_from_features)
from .eigen import (EigenCAM, EigenGradCAM, KPCACAM, eigencam_from_features, eigengradcam_from_features,
                    kpcacam_from_features)
from .fullgrad import FullGrad
from .perturbation import AblationCAM, ScoreCAM
from .shapley import ShapleyCAM
from .random_cam import RandomCAM, randomcam_from_features
from .refine import RefineCAM
from .seg_eigen import SegEigenCAM, segeigencam_from_features
from .sess import SESS


def cfcam_exclude_dead_from_features(activations: Tensor, gradients: Tensor,
                                     check_values: bool = True, **options) -> CAMResult:
    """``cfcam_from_features(..., exclude_dead=True)``: all-zero channels left out of the clustering."""
    return cfcam_from_features(activations, gradients, check_values=check_values, exclude_dead=True,
                               **options)


def cfcam_paper_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True,
                              **options) -> CAMResult:
    """``cfcam_from_features(..., variant="paper")``: CF-CAM as published (``cfcam_gpu.published``)."""
    return cfcam_from_features(activations, gradients, check_values=check_values, variant="paper", **options)


class CFCAMPaper(CFCAM):
    """``CFCAM(..., variant="paper")`` under its own name: CF-CAM as published (arXiv 2504.00060 v2)."""

    def __init__(self, model: nn.Module, target_layer, **options):
        super().__init__(model, target_layer, variant="paper", **options)


class CFCAMExcludeDead(CFCAM):
    """``CFCAM(..., exclude_dead=True)`` under its own name (an evaluation variant; ``CFCAM`` stays the
    seed's method)."""

    def __init__(self, model: nn.Module, target_layer, **options):
        super().__init__(model, target_layer, exclude_dead=True, **options)


METHODS: dict[str, type] = {
    "cfcam": CFCAM,
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "cfcam_exclude_dead": CFCAMExcludeDead,
    "eigencam": EigenCAM,
    "eigengradcam": EigenGradCAM,
    "kpcacam": KPCACAM,
    "fullgrad": FullGrad,
    "cfcam-paper": CFCAMPaper,
    "gradcam-elementwise": GradCAMElementWise,
    "finercam": FinerCAM,
    "shapleycam": ShapleyCAM,
    "fem": FEM,
    "randomcam": RandomCAM,
    "segeigencam": SegEigenCAM,
    "refinecam": RefineCAM,
    "sess": SESS,
}

_FROM_FEATURES: dict[str, Callable] = {
    "cfcam": cfcam_from_features,
    "gradcam": gradcam_from_features,
    "gradcam++": gradcampp_from_features,
    "xgradcam": xgradcam_from_features,
    "layercam": layercam_from_features,
    "hirescam": hirescam_from_features,
    "cfcam_exclude_dead": cfcam_exclude_dead_from_features,
    "eigencam": eigencam_from_features,
    "eigengradcam": eigengradcam_from_features,
    "kpcacam": kpcacam_from_features,
    "cfcam-paper": cfcam_paper_from_features,
    "gradcam-elementwise": gradcam_elementwise_from_features,
    "fem": fem_from_features,
    "randomcam": randomcam_from_features,
    "segeigencam": segeigencam_from_features,
}


def _check_name(name: str) -> None:
    if name not in METHODS:
        raise ValueError(f"method: unknown CAM method {name!r}; expected one of {sorted(METHODS)}")


def build_method(name: str, model: nn.Module, target_layer, **options) -> CAMEngine:
    """``METHODS[name](model, target_layer, **options)`` with a helpful error for unknown names."""
    _check_name(name)
    return METHODS[name](model, target_layer, **options)


def from_features_fn(name: str) -> Callable | None:
    """The pure (activations, gradients) -> CAMResult function of a method; None for those that need the
    images (scorecam, ablationcam, fullgrad), second derivatives (shapleycam), their own target
    (finercam) or a base method they run themselves (refinecam, sess). eigencam, kpcacam, fem and
    randomcam ignore the gradients."""
    _check_name(name)
    return _FROM_FEATURES.get(name)
