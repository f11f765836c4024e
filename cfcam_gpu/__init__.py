"""cfcam_gpu: batched, tensor-native CF-CAM (ClusteredFilteredGradCAM) and Grad-CAM."""
from .cam import CAMResult, cfcam_from_features, cluster_weights, gradcam_from_features, weighted_cam
from .cluster import channel_clusters, cluster_channels, dbscan
from .distance import pairwise_distances, percentile
from .engine import CFCAM, GradCAM
from .layers import resolve_layer
from .filters import box_filter, guided_filter

__all__ = [
    "CAMResult", "CFCAM", "GradCAM", "box_filter", "cfcam_from_features", "channel_clusters",
    "cluster_channels", "cluster_weights", "dbscan", "gradcam_from_features", "guided_filter",
    "pairwise_distances", "percentile", "resolve_layer", "weighted_cam",
]
__version__ = "0.1.0"
