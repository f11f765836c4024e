"""cfcam_gpu: batched, tensor-native CF-CAM (ClusteredFilteredGradCAM) and Grad-CAM.

The core (this package's top level and ``methods``) needs only torch and numpy; the command line, model
loading, data, drawing, reports and torchrun live in ``cfcam_gpu.app``, which the core never imports.
Shapes everywhere: B images, C channels, H x W input, h x w feature map, K clusters, L classes.
"""
from .cam import CAMResult, cfcam_from_features, cluster_weights, gradcam_from_features, weighted_cam
from .cluster import channel_clusters, cluster_channels
from .dbscan_ops import dbscan
from .distance import pairwise_distances
from .engine import CFCAM, GradCAM
from .filters import box_filter, guided_filter
from .fuse import fuse_cams, minmax_scale
from .layers import resolve_layer
from .methods import (KPCACAM, METHODS, AblationCAM, CFCAMExcludeDead, EigenCAM, EigenGradCAM, FullGrad,
                      GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM, build_method)
from .percentile_ops import percentile
from . import reshape  # noqa: E402  (cfcam_gpu.reshape.vit(), .swin(), .default_target(model))
from .targets import Target, resolve

__all__ = [
    "AblationCAM", "CAMResult", "CFCAM", "CFCAMExcludeDead", "EigenCAM", "EigenGradCAM", "FullGrad", "GradCAM",
    "GradCAMPlusPlus", "HiResCAM", "KPCACAM", "LayerCAM", "METHODS", "ScoreCAM", "Target", "XGradCAM",
    "box_filter", "build_method", "cfcam_from_features", "channel_clusters", "cluster_channels",
    "cluster_weights", "dbscan", "fuse_cams", "gradcam_from_features", "guided_filter", "minmax_scale",
    "pairwise_distances", "percentile", "reshape", "resolve", "resolve_layer", "weighted_cam",
]
__version__ = "0.1.0"
