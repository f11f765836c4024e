"""CAM methods besides CF-CAM and Grad-CAM (``cfcam_gpu.engine``), and the registry of all of them.

- ``gradient``: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM (pure functions + engines);
- ``perturbation``: Score-CAM, Ablation-CAM (extra forward passes);
- ``registry``: ``METHODS``, ``build_method``, ``from_features_fn`` (and the names of the CF-CAM variants: exclude-dead, as published).
"""
from ..cluster import dead_channels
from .gradient import (GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM, elementwise_cam, gradcampp_from_features,
                       hirescam_from_features, layercam_from_features, xgradcam_from_features)
from .perturbation import AblationCAM, ScoreCAM, head_after
from .registry import (METHODS, CFCAMExcludeDead, CFCAMPaper, build_method, cfcam_exclude_dead_from_features,
                       cfcam_paper_from_features, from_features_fn)

__all__ = [
    "AblationCAM", "CFCAMExcludeDead", "CFCAMPaper", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "METHODS", "ScoreCAM",
    "XGradCAM", "build_method", "cfcam_exclude_dead_from_features", "cfcam_paper_from_features",
    "dead_channels", "elementwise_cam",
    "from_features_fn", "gradcampp_from_features", "head_after", "hirescam_from_features",
    "layercam_from_features", "xgradcam_from_features",
]
