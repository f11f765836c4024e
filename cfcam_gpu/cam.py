"""Pure CAM functions on target-layer features: activations and gradients in, maps out.

Shapes: B images, C channels, h x w feature map, K clusters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import decide_sync_free, validate_features
from .cluster import FILTER_EPS_FRACTION, channel_clusters, seed_filter_radius
from .filters import guided_filter


@dataclass
class CAMResult:
    """CAMs for a batch.

    cams: (B, h, w) float32 in [0, 1]; weights: (B, C) channel weights. CF-CAM also fills
    labels: (B, C) int64 DBSCAN channel clusters (-1 = noise; -2 = an important channel of the published
    variant), n_clusters: (B,), eps: (B,) DBSCAN radius, min_samples (None where it varies per image).
    peak: (B,) the maximum of relu(weighted sum) before the division (0 for an all-zero map), so
    ``cams * peak[:, None, None]`` is the unnormalised map; every transformation of a map sets it anew
    (eigen_smooth: the max of the relu'd projection; fused layers, aug_smooth: ``unit_peak``). The engine
    adds targets: (B,) class indices (None for callable targets) and logits: the model output (B, L) (any
    structure the model
    returns, detached). With several target layers cams are the fused maps (B, H, W) at the input size,
    weights the layers' weights side by side (B, C_1 + C_2 + ...), ``layers`` each layer's own result.
    """

    cams: Tensor
    weights: Tensor
    labels: Tensor | None = None
    n_clusters: Tensor | None = None
    eps: Tensor | None = None
    min_samples: int | None = None
    targets: Tensor | None = None
    logits: Tensor | None = None
    peak: Tensor | None = None
    layers: "list[CAMResult] | None" = None

    @staticmethod
    def cat(parts: "list[CAMResult]") -> "CAMResult":
        """Concatenate per-chunk results along the batch dimension."""
        first = parts[0]
        fields = {}
        for name in ("cams", "weights", "labels", "n_clusters", "eps", "targets", "peak"):
            values = [getattr(p, name) for p in parts]
            fields[name] = None if values[0] is None else torch.cat(values)
        fields["logits"] = cat_outputs([p.logits for p in parts])
        if first.layers is not None:
            fields["layers"] = [CAMResult.cat([p.layers[i] for p in parts]) for i in range(len(first.layers))]
        return CAMResult(min_samples=first.min_samples, **fields)

    def select(self, rows) -> "CAMResult":
        """The result of the images ``rows`` (a slice or a (B',) index tensor): every per-image tensor
        field, and each layer's result, restricted to them (a logits structure that is no tensor is kept)."""
        fields = {name: (value[rows] if isinstance(value, Tensor) else value) for name, value in vars(self).items()}
        if self.layers is not None:
            fields["layers"] = [layer.select(rows) for layer in self.layers]
        return CAMResult(**fields)

    @property
    def all_noise(self) -> Tensor | None:
        """(B,) bool: every channel was DBSCAN noise, so every weight is 0 and the CAM is all zeros (never
        with the published variant, whose important channels, label -2, always count)."""
        if self.n_clusters is None:
            return None
        return (self.n_clusters == 0) & ~(self.labels == -2).any(dim=1)

    def upsample(self, size) -> Tensor:
        """(B, h, w) -> (B, H, W) bilinear (align_corners=False), e.g. to the input image size."""
        if isinstance(size, int):
            size = (size, size)
        return F.interpolate(self.cams[:, None], size=tuple(size), mode="bilinear",
                             align_corners=False)[:, 0]


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype weights are computed and returned in: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def unit_scale(x: Tensor, dim) -> Tensor:
    """Per slice along ``dim`` (kept), the power of two s that brings max |x| into [0.5, 1) (1 for an
    all-zero slice), in x's dtype (tiny slices are scaled up at most by 2**126 in float32, 2**1022 in
    float64). Multiplying by s is exact (barring subnormals), so scale-invariant results are unchanged
    while nothing overflows when squared or multiplied. x: floating -> like x.amax(dim)."""
    # max |x| as max(max x, -min x): two reads of x, no |x| copy (the same value, NaN and inf included)
    top = torch.maximum(x.amax(dim=dim, keepdim=True), x.amin(dim=dim, keepdim=True).neg())
    e = torch.frexp(top).exponent
    e = e.clamp_min(-(math.frexp(torch.finfo(x.dtype).max)[1] - 2))  # 2**126 float32, 2**1022 float64
    return torch.ldexp(torch.ones(e.shape, dtype=x.dtype, device=x.device), -e)


def weighted_cam(activations: Tensor, weights: Tensor, with_peak: bool = False):
    """relu(sum_c w_c A_c), divided by its max where that is > 0.

    activations: (B, C, h, w); weights: (B, C) -> (B, h, w) float32 in [0, 1]; with ``with_peak`` the
    tuple (cams, peak (B,) float32: the maximum before the division, inf where it exceeds float32). Both
    inputs are first scaled by a power of two per image (``unit_scale``; the normalised CAM does not
    change), so any finite input in its dtype's range gives a finite CAM.
    """
    acts = activations if activations.dtype == torch.float64 else activations.float()
    w = weights if weights.dtype == torch.float64 else weights.float()
    s_a, s_w = unit_scale(acts, (1, 2, 3)), unit_scale(w, 1)
    cam = torch.einsum("bc,bchw->bhw", (w * s_w).float(), (acts * s_a).float()).clamp_min_(0)
    cams, peak = normalise(cam, with_peak=True)
    if not with_peak:
        return cams
    return cams, (peak.double() / (s_a.flatten().double() * s_w.flatten().double())).float()


def cat_outputs(values: list):
    """Concatenate chunks of model outputs along the batch: tensors, dicts, tuples, per-image lists."""
    first = values[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(values)
    if isinstance(first, dict):
        return type(first)((k, cat_outputs([v[k] for v in values])) for k in first)
    if isinstance(first, tuple):
        return type(first)(cat_outputs([v[i] for v in values]) for i in range(len(first)))
    return [item for v in values for item in v]


def unit_peak(cams: Tensor) -> Tensor:
    """The peak of maps that are final as they are (fused, aug-smoothed, FullGrad's): (B, h, w) -> (B,)
    float32, 1 where a map is not all zero, 0 where it is, so ``cams * peak`` is the map itself."""
    return (cams.amax(dim=(-2, -1)) > 0).float()


def normalise(cam: Tensor, with_peak: bool = False):
    """relu'd maps (B, h, w) divided by their max where that is > 0 -> (B, h, w) float32 in [0, 1];
    with ``with_peak`` also the (B,) maxima."""
    cam = cam.float()
    peak = cam.amax(dim=(1, 2), keepdim=True)
    out = cam / torch.where(peak > 0, peak, torch.ones_like(peak))
    return (out, peak[:, 0, 0]) if with_peak else out


def cluster_weights(gradients: Tensor, labels: Tensor, *, sync_free: bool | None = None) -> Tensor:
    """CF-CAM channel weights from clustered, guided-filtered mean gradients.

    gradients: (B, C, h, w); labels: (B, C) int64 (-1 = noise) -> weights (B, C), float64 for float64
    gradients, else float32. The gradients are scaled by a power of two per image before the cluster
    means are formed and squared (``unit_scale``) and the weights scaled back exactly, so every finite
    input gives finite weights (unless a weight itself exceeds the dtype's range).
    Cluster k's mean gradient m_k (h, w) is guided-filtered with itself as guide, radius
    int(sqrt(h w) / 4) and eps 0.1 var(m_k); a channel's weight is the spatial mean of its cluster's
    filtered map, 0 for noise. ``sync_free`` (None: on non-CPU devices) bounds the clusters by K = C, so
    every shape is static (no host sync); the cluster sums then take B * C * h * w floats, as much as the
    gradients (the engine's ``chunk_size`` bounds both). Otherwise K is read from the labels: filtering
    only the clusters that exist saves filtering C - K empty maps.
    """
    B, C, h, w = gradients.shape
    K = n_cluster_slots(labels, decide_sync_free(sync_free, labels))
    grads = gradients.to(work_dtype(gradients))
    scale = unit_scale(grads, (1, 2, 3))  # (B, 1, 1, 1): nothing overflows when squared
    means = cluster_means(grads * scale, labels, K).reshape(B * K, 1, h, w)  # (B*K, 1, h, w)
    eps = FILTER_EPS_FRACTION * means.flatten(1).var(dim=1, unbiased=False)
    filtered = guided_filter(means, means, seed_filter_radius(h, w), eps)
    cluster_w = filtered.mean(dim=(1, 2, 3)).reshape(B, K)  # (B, K)
    cluster_w = (cluster_w.double() / scale.reshape(B, 1).double()).to(grads.dtype)  # exact, then rounded once
    return spread_to_channels(cluster_w, labels)


def n_cluster_slots(labels: Tensor, sync_free: bool) -> int:
    """K, the clusters to make room for: C when sync-free (static shapes), else the largest label + 1
    (one host read). labels: (B, C)."""
    return labels.shape[1] if sync_free else max(1, int(labels.max()) + 1)


def cluster_means(gradients: Tensor, labels: Tensor, K: int) -> Tensor:
    """Mean gradient of each cluster. gradients: (B, C, h, w); labels: (B, C) int64 (< 0: in no cluster)
    -> (B, K, h, w) float32 (float64 for float64 gradients), zero for an empty cluster."""
    B, C, h, w = gradients.shape
    grads = gradients.to(work_dtype(gradients)).flatten(2)  # (B, C, N)
    slot = torch.where(labels >= 0, labels, K)  # noise -> the spare slot K
    sums = grads.new_zeros(B, K + 1, h * w).scatter_add_(1, slot[:, :, None].expand(-1, -1, h * w), grads)
    counts = grads.new_zeros(B, K + 1).scatter_add_(1, slot, torch.ones_like(grads[:, :, 0]))
    return (sums[:, :K] / counts[:, :K, None].clamp_min(1)).reshape(B, K, h, w)


def spread_to_channels(cluster_values: Tensor, labels: Tensor) -> Tensor:
    """Each channel gets its cluster's value, 0 outside every cluster. cluster_values: (B, K);
    labels: (B, C) -> (B, C)."""
    K = cluster_values.shape[1]
    slot = torch.where(labels >= 0, labels, 0).clamp_max(K - 1)
    return torch.where(labels >= 0, cluster_values.gather(1, slot), 0.0)


VARIANTS = ("seed", "paper")


def cfcam_from_features(activations: Tensor, gradients: Tensor, backend: str = "torch",
                        check_values: bool = True, *, sync_free: bool | None = None,
                        exclude_dead: bool = False, variant: str = "seed") -> CAMResult:
    """CF-CAM for a batch from target-layer activations and gradients.

    activations, gradients: (B, C, h, w) -> CAMResult with cams (B, h, w) in [0, 1], labels (B, C),
    weights (B, C), n_clusters (B,), eps (B,). ``backend`` picks the DBSCAN implementation ("torch",
    "sklearn", "cuml"). ``check_values`` raises on NaN/inf naming the image (one host sync).
    ``sync_free``: None decides by the device (no host read between the features and the CAMs on
    accelerators); True runs that path on any device. ``exclude_dead``: all-zero channels are left out
    of the clustering (weight 0), the same as running each image's alive channels alone.
    ``variant``: "seed" (the description above, the default) or "paper": CF-CAM as published
    (``published.cfcam_paper_from_features``; exclude_dead does not apply).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if variant == "paper":
        if exclude_dead:
            raise ValueError("exclude_dead: expected False with variant='paper' (the published variant "
                             "has its own channel selection), got True")
        from .published import cfcam_paper_from_features

        return cfcam_paper_from_features(activations, gradients, backend, check_values, sync_free=sync_free)
    validate_features(activations, gradients, check_values)
    sync_free = decide_sync_free(sync_free, activations)
    clusters = channel_clusters(activations, backend, sync_free=sync_free, exclude_dead=exclude_dead)
    weights = cluster_weights(gradients, clusters.labels, sync_free=sync_free)
    n_clusters = (clusters.labels.amax(dim=1) + 1)
    cams, peak = weighted_cam(activations, weights, with_peak=True)
    return CAMResult(cams=cams, weights=weights, labels=clusters.labels, peak=peak,
                     n_clusters=n_clusters, eps=clusters.eps, min_samples=clusters.min_samples)


def gradcam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """Plain Grad-CAM: weights = spatial mean of the gradients; same normalisation as CF-CAM.

    activations, gradients: (B, C, h, w) -> CAMResult with cams (B, h, w) and weights (B, C) (float64
    for float64 gradients, else float32; the mean is taken scaled by a power of two, so it is finite).
    """
    validate_features(activations, gradients, check_values)
    grads = gradients.to(work_dtype(gradients))
    scale = unit_scale(grads, (1, 2, 3))
    weights = ((grads * scale).mean(dim=(2, 3)).double() / scale[:, :, 0, 0].double()).to(grads.dtype)
    cams, peak = weighted_cam(activations, weights, with_peak=True)
    return CAMResult(cams=cams, weights=weights, peak=peak)
