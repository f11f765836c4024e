"""CAM methods besides CF-CAM and Grad-CAM (``cfcam_gpu.engine``), and the registry of all of them.

- ``gradient``: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM (pure functions + engines);
- ``perturbation``: Score-CAM, Ablation-CAM (extra forward passes);
- ``eigen``: EigenCAM, EigenGradCAM, KPCA-CAM and the batched (kernel) principal-component projections;
- ``fullgrad``: FullGrad (bias gradients of every layer);
- ``registry``: ``METHODS``, ``build_method``, ``from_features_fn`` (and the names of the CF-CAM variants:
  exclude-dead, as published).
"""
from ..cluster import dead_channels
from .gradient import (GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM, elementwise_cam, gradcampp_from_features,
                       hirescam_from_features, layercam_from_features, xgradcam_from_features)
from .eigen import (KPCACAM, EigenCAM, EigenGradCAM, eigencam_from_features, eigengradcam_from_features,
                    kernel_pca_projection, kpcacam_from_features, pca_projection)
from .fullgrad import FullGrad, fullgrad_from_gradients
from .perturbation import AblationCAM, ScoreCAM, head_after
from .registry import (METHODS, CFCAMExcludeDead, CFCAMPaper, build_method, cfcam_exclude_dead_from_features,
                       cfcam_paper_from_features, from_features_fn)

__all__ = [
    "AblationCAM", "CFCAMExcludeDead", "CFCAMPaper", "EigenCAM", "EigenGradCAM", "FullGrad", "GradCAMPlusPlus",
    "HiResCAM", "KPCACAM", "LayerCAM", "METHODS", "ScoreCAM", "XGradCAM", "build_method",
    "cfcam_exclude_dead_from_features", "cfcam_paper_from_features", "dead_channels", "elementwise_cam",
    "from_features_fn", "gradcampp_from_features", "head_after", "hirescam_from_features",
    "layercam_from_features", "xgradcam_from_features", "eigencam_from_features", "eigengradcam_from_features",
    "kpcacam_from_features", "pca_projection", "kernel_pca_projection", "fullgrad_from_gradients",
]
