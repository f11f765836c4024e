"""CAM methods besides CF-CAM and Grad-CAM (``cfcam_gpu.engine``), and the registry of all of them.

- ``gradient``: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM (pure functions + engines);
- ``perturbation``: Score-CAM, Ablation-CAM (extra forward passes);
- ``eigen``: EigenCAM, EigenGradCAM, KPCA-CAM and the batched (kernel) principal-component projections;
- ``fullgrad``: FullGrad (bias gradients of every layer);
- ``fem``: FEM (k-sigma activation statistics); ``shapley``: ShapleyCAM (a Hessian-vector product);
  ``finer``: Finer-CAM (a gradient method explaining the main class against its closest rivals);
- ``random_cam``: RandomCAM (random channel weights, a baseline); ``seg_eigen``: SegEigenCAM;
- ``refine``: RefineCAM (product over layers); ``sess``: SESS (scales and sliding windows), meta-methods;
- ``guided``: guided backpropagation; ``nmf``, ``dff``: Deep Feature Factorization (a torch NMF);
- ``registry``: ``METHODS``, ``build_method``, ``from_features_fn`` (and the names of the CF-CAM variants:
  exclude-dead, as published).
"""
from ..cluster import dead_channels
from .gradient import (GradCAMElementWise, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM, elementwise_cam,
                       gradcam_elementwise_from_features, gradcampp_from_features, hirescam_from_features,
                       layercam_from_features, xgradcam_from_features)
from .fem import FEM, fem_from_features, fem_weights
from .finer import FinerCAM, finer_scores
from .shapley import ShapleyCAM, shapleycam_from_features
from .eigen import (KPCACAM, EigenCAM, EigenGradCAM, eigencam_from_features, eigengradcam_from_features,
                    kernel_pca_projection, kpcacam_from_features, pca_projection)
from .fullgrad import FullGrad, fullgrad_from_gradients
from .perturbation import AblationCAM, ScoreCAM, head_after
from .dff import DeepFeatureFactorization, dff
from .guided import deprocess, guided_backprop
from .nmf import nmf
from .random_cam import RandomCAM, randomcam_from_features
from .refine import RefineCAM, refine_fuse
from .seg_eigen import SegEigenCAM, segeigencam_from_features
from .sess import SESS
from .registry import (METHODS, CFCAMExcludeDead, CFCAMPaper, build_method, cfcam_exclude_dead_from_features,
                       cfcam_paper_from_features, from_features_fn)

__all__ = [
    "AblationCAM", "CFCAMExcludeDead", "CFCAMPaper", "EigenCAM", "EigenGradCAM", "FullGrad", "GradCAMPlusPlus",
    "HiResCAM", "KPCACAM", "LayerCAM", "METHODS", "ScoreCAM", "XGradCAM", "build_method",
    "cfcam_exclude_dead_from_features", "cfcam_paper_from_features", "dead_channels", "elementwise_cam",
    "from_features_fn", "gradcampp_from_features", "head_after", "hirescam_from_features",
    "layercam_from_features", "xgradcam_from_features", "eigencam_from_features", "eigengradcam_from_features",
    "kpcacam_from_features", "pca_projection", "kernel_pca_projection", "fullgrad_from_gradients",
    "GradCAMElementWise", "gradcam_elementwise_from_features", "FEM", "fem_from_features", "fem_weights",
    "FinerCAM", "finer_scores", "ShapleyCAM", "shapleycam_from_features",
    "DeepFeatureFactorization", "RandomCAM", "RefineCAM", "SESS", "SegEigenCAM", "deprocess", "dff",
    "guided_backprop", "nmf", "randomcam_from_features", "refine_fuse", "segeigencam_from_features",
]
