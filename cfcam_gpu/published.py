"""CF-CAM as published (arXiv 2504.00060 v2; the authors' ``cfcam.py``), next to the seed's description.

Per image, activations A and gradients G (C, h, w):
1. Important channels: L2 norm of each channel >= the 75th percentile of the norms (numpy's linear rule).
2. DBSCAN on the other channels only: eps = the 25th percentile of their pairwise distances without the
   diagonal, at least 1e-5; min_samples = max(2, int(0.05 n)) for their n (``cluster.subset_clusters``
   with ``PAPER_RULE``).
3. Raw weights: an important channel's own spatial mean gradient; each cluster's mean gradient goes
   through the published "bilateral" filter (``filters.published_filter``) and every member gets the
   filtered map's spatial mean; noise channels are dropped.
4. Softmax of the raw weights over the kept channels (important + clustered); CAM = ReLU(sum of softmax
   weight x activation map), divided by its max where that is > 0.
The authors normalise after upsampling to the input; here, as for every method, the CAM is normalised at
the layer's resolution: ``result.upsample(size)`` divided by its max is their map (the two differ by a
per-image factor only). Gradient means are ~1e-4..1e-6 on real models, so the softmax is all but uniform:
the map is close to ReLU of the kept channels' mean activation, whatever the class.
Shapes: B images, C channels, h x w feature map, K clusters.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._checks import decide_sync_free, validate_features
from .cam import CAMResult, cluster_means, n_cluster_slots, spread_to_channels, weighted_cam
from .cluster import EpsRule, subset_clusters
from .distance import channel_features
from .filters import published_filter_mean
from .percentile_ops import percentile

IMPORTANT_PERCENTILE = 75.0  # channels with an L2 norm at or above this percentile are "important"
PAPER_RULE = EpsRule(q=25.0, diagonal=False, floor=1e-5)  # DBSCAN eps over the other channels
IMPORTANT = -2  # the label of an important channel


def important_channels(activations: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C) bool: channel L2 norm (float64) >= the 75th percentile of the image's norms.
    At least one channel per image (the largest norm) is important."""
    norms = channel_features(activations).double().square().sum(dim=2).sqrt()  # (B, C)
    return norms >= percentile(norms, IMPORTANT_PERCENTILE)[:, None]


def paper_raw_weights(gradients: Tensor, labels: Tensor, sync_free: bool) -> Tensor:
    """Weights before the softmax. gradients: (B, C, h, w); labels: (B, C) (-2 important, -1 noise,
    k >= 0 cluster) -> (B, C) float32: an important channel's spatial mean gradient, a clustered channel's
    filtered cluster mean's spatial mean, 0 for noise. ``sync_free``: K = C cluster slots (static shapes)."""
    B, C, h, w = gradients.shape
    K = n_cluster_slots(labels, sync_free)
    means = cluster_means(gradients, labels, K).reshape(B * K, h, w)
    cluster_w = published_filter_mean(means).reshape(B, K)
    own = gradients.float().mean(dim=(2, 3))
    return torch.where(labels == IMPORTANT, own, spread_to_channels(cluster_w, labels))


def cfcam_paper_from_features(activations: Tensor, gradients: Tensor, backend: str = "torch",
                              check_values: bool = True, *, sync_free: bool | None = None) -> CAMResult:
    """CF-CAM as published, for a batch (module notes).

    activations, gradients: (B, C, h, w) -> CAMResult with cams (B, h, w) in [0, 1], weights (B, C) the
    softmax weights (0 for noise channels), labels (B, C) (-2 important, -1 noise, k >= 0 cluster),
    n_clusters (B,), eps (B,) (0 where every channel is important), min_samples None (it follows each
    image's count of clustered channels). ``backend``: "torch" or "sklearn" (the clustering per image on
    the CPU, the oracle). ``check_values`` and ``sync_free`` as ``cam.cfcam_from_features``.
    """
    validate_features(activations, gradients, check_values)
    sync_free = decide_sync_free(sync_free, activations)
    important = important_channels(activations)
    clusters = subset_clusters(activations, ~important, PAPER_RULE, backend, sync_free=sync_free)
    labels = torch.where(important, IMPORTANT, clusters.labels)
    raw = paper_raw_weights(gradients, labels, sync_free)
    kept = labels != -1
    weights = torch.where(kept, raw, float("-inf")).softmax(dim=1)
    n_clusters = labels.amax(dim=1).clamp_min(-1) + 1
    cams, peak = weighted_cam(activations, weights, with_peak=True)
    return CAMResult(cams=cams, weights=weights, labels=labels, peak=peak,
                     n_clusters=n_clusters, eps=clusters.eps, min_samples=None)
