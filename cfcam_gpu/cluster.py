"""Batched DBSCAN over channels, and the seed's channel-clustering rule.

DBSCAN semantics (scikit-learn's): ``j`` is a neighbour of ``i`` iff ``dist[i, j] <= eps``; ``i`` is core
iff it has ``>= min_samples`` neighbours (itself included); clusters are the connected components of the
core points, numbered 0, 1, ... by their smallest core index; a non-core point with a core neighbour joins
the smallest-numbered cluster among its core neighbours; the rest are noise (-1).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from . import _sync
from ._checks import check_ndim, check_tensor
from .distance import mirror_upper, percentile_from_squared, squared_distances
from .screened import screened_neighbours

BACKENDS = ("torch", "sklearn", "cuml")
EPS_PERCENTILE = 25.0


def _label_dtype(C: int) -> torch.dtype:
    """Smallest integer type that holds 0..C: halves the (B, C, C) temporaries of the masked minima."""
    return torch.int16 if C < 2**15 - 1 else torch.int32


def _masked_min(adj: Tensor, values: Tensor, fill: int) -> Tensor:
    """out[b, i] = min(values[b, j] for j with adj[b, i, j]), ``fill`` where row i is empty.

    adj: (B, C, C) bool; values: (B, C) integer -> (B, C) of values' dtype.
    """
    big = torch.full((), fill, dtype=values.dtype, device=values.device)
    return torch.where(adj, values[:, None, :], big).amin(dim=2)


def max_cc_rounds(C: int) -> int:
    """Rounds after which ``connected_components`` has provably converged on C nodes.

    Every tree whose component is unfinished merges with another within two rounds (it hooks onto its
    smallest adjacent root, or a neighbour hooks onto it or onto something smaller, and it hooks next
    round), so the count of unfinished trees halves every two rounds.
    """
    return 2 * math.ceil(math.log2(max(C, 2))) + 2


def _min_label_components(adj: Tensor, active: Tensor, sync_free: bool | None) -> tuple[Tensor, Tensor]:
    """Components of the graph ``adj`` restricted to the active nodes, by min-label hooking.

    adj: (B, C, C) bool, symmetric, columns of inactive nodes all False; active: (B, C) bool ->
    (root, nearest), both (B, C) int64: root[u] = the smallest index in u's component for active u (u for
    inactive u); nearest[u] = the smallest root among u's active neighbours, C if none, for every u.
    Each round every tree root hooks onto the smallest root adjacent to its tree, then all pointers jump
    to their roots; labels only decrease and stay inside the component. The pass that finds nothing to
    hook is also the pass that yields ``nearest``. ``sync_free`` (default: on non-CPU devices) runs the
    proven bound of ``max_cc_rounds(C)`` rounds with no host synchronisation; otherwise it stops at the
    fixed point (two rounds on most DBSCAN graphs).
    """
    B, C, _ = adj.shape
    if sync_free is None:
        sync_free = not _sync.host_reads_ok(adj)
    dt = _label_dtype(C)
    parent = torch.arange(C, device=adj.device).expand(B, C).contiguous()
    # One pass gives each row's first neighbour, the masked minimum of round 0 (parent = identity), and
    # whether it has any (``max`` returns the first maximal index on every device).
    hit, first = adj.view(torch.uint8).max(dim=2)
    has_neighbour = hit.bool()
    jumps = max(1, math.ceil(math.log2(max(C, 2))))
    for round_ in range(max_cc_rounds(C)):
        if round_ == 0:
            nearest = torch.where(has_neighbour, first, C)
        else:
            if not sync_free:
                single = _single_tree(has_neighbour, active, parent)
                if single is not None:
                    return parent, single
            nearest = _masked_min(adj, parent.to(dt), C).long()
        seen = torch.where(active, torch.minimum(nearest, parent), parent)
        if not sync_free and torch.equal(seen, parent):
            return parent, nearest
        new = parent.scatter_reduce(1, parent, seen, reduce="amin", include_self=True)
        new = torch.minimum(new, seen)
        for _ in range(jumps):
            new = new.gather(1, new)
        parent = new
    return parent, _masked_min(adj, parent.to(dt), C).long()


def _single_tree(has_neighbour: Tensor, active: Tensor, parent: Tensor) -> Tensor | None:
    """The common case on DBSCAN graphs, checked with one host sync (CPU path only): when every image's
    active nodes all point to one root they form one component, so no verification pass over the
    adjacency is needed, and ``nearest`` is that root for every node with an active neighbour.
    has_neighbour, active: (B, C) bool; parent: (B, C) -> ``nearest`` (B, C), or None when some image
    has several trees."""
    C = parent.shape[1]
    lowest = torch.where(active, parent, C).amin(dim=1)
    highest = torch.where(active, parent, -1).amax(dim=1)
    if not bool(((lowest == highest) | ~active.any(dim=1)).all()):
        return None
    return torch.where(has_neighbour, lowest[:, None], C)


def connected_components(adj: Tensor, sync_free: bool | None = None) -> Tensor:
    """Smallest node index of each node's connected component.

    adj: (B, C, C) bool, symmetric -> (B, C) int64. Isolated nodes (empty rows) are their own component.
    See ``_min_label_components`` for the algorithm and ``sync_free``.
    """
    active = torch.ones(adj.shape[:2], dtype=torch.bool, device=adj.device)
    return _min_label_components(adj, active, sync_free)[0]


def dbscan_from_adjacency(adj: Tensor, min_samples: int) -> Tensor:
    """DBSCAN labels from a neighbour relation.

    adj: (B, C, C) bool, symmetric, with a true diagonal -> labels (B, C) int64, -1 = noise.
    """
    B, C, _ = adj.shape
    counts = adj.view(torch.uint8).sum(dim=2, dtype=_label_dtype(C))  # a bool sum widens to int64
    core = counts >= min_samples  # (B, C)
    core_cols = adj & core[:, None, :]  # neighbours that are core
    root, nearest = _min_label_components(core_cols, core, None)
    idx = torch.arange(C, device=adj.device)
    cluster_of_root = (core & (root == idx)).cumsum(dim=1) - 1  # (B, C): cluster number of each root
    # Clusters are numbered in order of their root (smallest core index), so the smallest root among a
    # point's core neighbours is its smallest-numbered cluster: its own for a core point, the first to
    # reach it for a border point. No core neighbour: noise.
    labels = cluster_of_root.gather(1, nearest.clamp_max(C - 1))
    return torch.where(nearest < C, labels, -1)


def dbscan(dist: Tensor, eps, min_samples: int) -> Tensor:
    """Batched exact DBSCAN on precomputed distances.

    dist: (B, C, C) symmetric distances; eps: float or (B,) tensor; min_samples >= 1 ->
    labels (B, C) int64, -1 = noise. Identical to
    ``sklearn.cluster.DBSCAN(eps, min_samples=min_samples, metric="precomputed").fit(dist[b]).labels_``
    for every b (eps = 0 is allowed here: neighbours are then the points at distance exactly 0).
    """
    check_ndim(dist, 3, "dist", "(B, C, C)")
    if dist.shape[1] != dist.shape[2]:
        raise ValueError(f"dist: expected square (B, C, C) matrices, got shape {tuple(dist.shape)}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise ValueError(f"min_samples: expected an int >= 1, got {min_samples!r}")
    eps = torch.as_tensor(eps, dtype=dist.dtype, device=dist.device)
    if eps.ndim == 0:
        eps = eps.expand(dist.shape[0])
    if eps.shape != (dist.shape[0],):
        raise ValueError(f"eps: expected a float or a ({dist.shape[0]},) tensor, got shape {tuple(eps.shape)}")
    adj = dist <= eps[:, None, None]
    adj.diagonal(dim1=1, dim2=2).fill_(True)
    return dbscan_from_adjacency(adj, min_samples)


class ChannelClusters(NamedTuple):
    """labels (B, C) int64 (-1 = noise), eps (B,) the adaptive DBSCAN radius, min_samples."""

    labels: Tensor
    eps: Tensor
    min_samples: int


def seed_min_samples(C: int) -> int:
    """The seed's rule: 5% of the channels, at least 2."""
    return max(2, int(0.05 * C))


def _features(activations: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C, h*w), float32 unless float64 (the features scikit-learn would see)."""
    check_ndim(activations, 4, "activations", "(B, C, h, w)")
    feats = activations.flatten(2)
    return feats if feats.dtype == torch.float64 else feats.float()


# The float64 route clusters images in groups whose float64 (C, C) distance matrices fit in about this
# many bytes. CPU (float64 features, or an image the screened route declined): the passes are
# memory-bound, and small groups stay cache- and page-friendly (measured with float32 features before the
# screened route existed: 0.58x -> 0.64x the floor at ResNet50 layer4, B = 16, python -m bench.run).
# Accelerators: the group bounds the post-processing's memory whatever the batch (the (B, C, C) float64
# matrix alone is 34 GB at B = 256, C = 4096; a group of 1 GiB is 64 images at C = 2048, 16 at 4096);
# the group size follows from the shapes, so it costs no host sync.
CPU_GROUP_BYTES = 32 * 2**20
ACCELERATOR_GROUP_BYTES = 2**30


def screened_route(feats: Tensor) -> bool:
    """Whether the torch backend clusters these features (B, C, N) by ``screened.py`` (CPU, float32)."""
    return _sync.host_reads_ok(feats) and feats.dtype == torch.float32


def _cluster_torch(feats: Tensor) -> ChannelClusters:
    return _cluster_cpu_float32(feats) if screened_route(feats) else _cluster_float64(feats)


def _cluster_float64(feats: Tensor) -> ChannelClusters:
    """The batched float64 route, in groups of images (``CPU_GROUP_BYTES``, ``ACCELERATOR_GROUP_BYTES``)."""
    B, C, _ = feats.shape
    budget = CPU_GROUP_BYTES if _sync.host_reads_ok(feats) else ACCELERATOR_GROUP_BYTES
    group = max(1, budget // (C * C * 8))
    if group >= B:
        return _cluster_torch_batch(feats)
    parts = [_cluster_torch_batch(feats[i:i + group]) for i in range(0, B, group)]
    return ChannelClusters(torch.cat([p.labels for p in parts]), torch.cat([p.eps for p in parts]),
                           parts[0].min_samples)


def _cluster_cpu_float32(feats: Tensor) -> ChannelClusters:
    """CPU, float32 features: image by image, eps and neighbours screened in float32 and refined exactly
    (``screened.py``), falling back to the float64 route for an image whose preconditions fail."""
    C = feats.shape[1]
    min_samples = seed_min_samples(C)
    labels, eps = [], []
    buffer = feats.new_empty(C, C)  # d~, reused image after image
    for x in feats:
        screened = screened_neighbours(x, EPS_PERCENTILE, buffer)
        if screened is None:
            part = _cluster_torch_batch(x[None])
            labels.append(part.labels[0])
            eps.append(part.eps[0])
            continue
        e, adj = screened
        labels.append(dbscan_from_adjacency(adj[None], min_samples)[0])
        eps.append(e)
    return ChannelClusters(torch.stack(labels), torch.stack(eps), min_samples)


def _cluster_torch_batch(feats: Tensor) -> ChannelClusters:
    C = feats.shape[1]
    d2 = squared_distances(feats)  # (B, C, C) float64
    # The seed's eps: the 25th percentile of the distance matrix in the features' dtype.
    eps = percentile_from_squared(d2, EPS_PERCENTILE, feats.dtype)
    # scikit-learn compares float64 squared distances with eps**2 computed in the features' dtype.
    threshold = (eps * eps).double()
    # The upper triangle is the distance matrix, as for the percentile: exactly symmetric neighbours.
    adj = mirror_upper(d2 <= threshold[:, None, None])
    del d2
    min_samples = seed_min_samples(C)
    return ChannelClusters(dbscan_from_adjacency(adj, min_samples), eps, min_samples)


def _cluster_sklearn(feats: Tensor) -> ChannelClusters:
    from .reference import cluster_reference

    labels, eps = [], []
    for f in feats.detach().cpu().numpy():
        lab, e, min_samples = cluster_reference(f)
        labels.append(torch.from_numpy(lab).long())
        eps.append(float(e))
    return ChannelClusters(torch.stack(labels).to(feats.device),
                           torch.tensor(eps, dtype=feats.dtype, device=feats.device),
                           seed_min_samples(feats.shape[1]))


def _cluster_cuml(feats: Tensor) -> ChannelClusters:
    try:
        from cuml.cluster import DBSCAN as CuDBSCAN
    except ImportError as err:
        raise ImportError("backend='cuml' needs RAPIDS cuML (pip install cuml-cu13 libcuml-cu13, CUDA 13); "
                          "it is not importable here. Use backend='torch' (the default).") from err
    if feats.device.type != "cuda":
        raise ValueError(f"activations: backend='cuml' expects CUDA tensors, got device {feats.device}")
    d2 = squared_distances(feats)
    eps = percentile_from_squared(d2, EPS_PERCENTILE, feats.dtype)  # the same eps as the torch backend
    dist = d2.sqrt_().to(feats.dtype)
    min_samples = seed_min_samples(feats.shape[1])
    labels = []
    for b in range(feats.shape[0]):  # cuML fits one data set per call
        e = float(eps[b])
        model = CuDBSCAN(eps=e if e > 0 else 1e-30, min_samples=min_samples, metric="precomputed",
                         output_type="numpy")
        labels.append(torch.as_tensor(model.fit_predict(dist[b].contiguous())).long())
    return ChannelClusters(torch.stack(labels).to(feats.device), eps, min_samples)


def channel_clusters(activations: Tensor, backend: str = "torch") -> ChannelClusters:
    """Group each image's channels with DBSCAN using the seed's adaptive parameters.

    activations: (B, C, h, w) -> ChannelClusters(labels (B, C) int64, eps (B,), min_samples), with
    eps = 25th percentile of the (C, C) channel distance matrix and min_samples = max(2, int(0.05 C)).
    backend: "torch" (batched, any device, default), "sklearn" (per image on the CPU; the oracle) or
    "cuml" (RAPIDS, CUDA; cuML only guarantees core and noise labels equal to scikit-learn's).
    """
    check_tensor(activations, "activations")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    feats = _features(activations)
    return {"torch": _cluster_torch, "sklearn": _cluster_sklearn, "cuml": _cluster_cuml}[backend](feats)


def cluster_channels(activations: Tensor, backend: str = "torch") -> Tensor:
    """activations: (B, C, h, w) -> DBSCAN labels (B, C) int64, -1 = noise. See ``channel_clusters``."""
    return channel_clusters(activations, backend).labels
