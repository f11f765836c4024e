"""Exact DBSCAN on a neighbour relation (scikit-learn's semantics): batched rounds with no loop over images
and no host read (``dbscan_from_adjacency``), and a breadth-first search for one image where host reads
are free (``dbscan_by_search``, the CPU route).

``j`` is a neighbour of ``i`` iff ``dist[i, j] <= eps``; ``i`` is core iff it has ``>= min_samples``
neighbours (itself included); clusters are the connected components of the core points, numbered 0, 1,
... by their smallest core index; a non-core point with a core neighbour joins the smallest-numbered
cluster among its core neighbours; the rest are noise (-1). Components by min-label hooking and pointer
jumping (the model: torchvision's ``batched_nms``, many groups in one kernel).
Shapes: B images, C points (channels).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_ndim, decide_sync_free


def _label_dtype(C: int) -> torch.dtype:
    """Smallest integer type that holds 0..C: halves the (B, C, C) temporaries of the masked minima."""
    return torch.int16 if C < 2**15 - 1 else torch.int32


def row_counts(adj: Tensor) -> Tensor:
    """(..., C, C) bool -> (..., C) in ``_label_dtype(C)``: the True in each row, summed as bytes into a
    small integer type (a bool sum widens to int64: 2-4x slower, ``python -m bench.cpu_passes``, pair
    ``rows``)."""
    return adj.view(torch.uint8).sum(dim=-1, dtype=_label_dtype(adj.shape[-1]))


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


def _min_label_components(adj: Tensor, active: Tensor, sync_free: bool) -> tuple[Tensor, Tensor]:
    """Components of the graph ``adj`` restricted to the active nodes, by min-label hooking.

    adj: (B, C, C) bool, symmetric, columns of inactive nodes all False; active: (B, C) bool ->
    (root, nearest), both (B, C) int64: root[u] = the smallest index in u's component for active u (u for
    inactive u); nearest[u] = the smallest root among u's active neighbours, C if none, for every u.
    Each round every tree root hooks onto the smallest root adjacent to its tree, then all pointers jump
    to their roots; labels only decrease and stay inside the component. The pass that finds nothing to
    hook is also the pass that yields ``nearest``. ``sync_free`` runs the proven bound of
    ``max_cc_rounds(C)`` rounds with no host synchronisation; otherwise it stops at the fixed point (two
    rounds on most DBSCAN graphs).
    """
    B, C, _ = adj.shape
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
    See ``_min_label_components`` for the algorithm; ``sync_free`` as ``_checks.decide_sync_free``.
    """
    active = torch.ones(adj.shape[:2], dtype=torch.bool, device=adj.device)
    return _min_label_components(adj, active, decide_sync_free(sync_free, adj))[0]


def dbscan_from_adjacency(adj: Tensor, min_samples, sync_free: bool) -> Tensor:
    """DBSCAN labels from a neighbour relation.

    adj: (B, C, C) bool, symmetric, with a true diagonal; min_samples: int or (B, 1) int64 tensor (one
    per image) -> labels (B, C) int64, -1 = noise.
    """
    B, C, _ = adj.shape
    counts = row_counts(adj)
    core = counts >= min_samples  # (B, C)
    core_cols = adj & core[:, None, :]  # neighbours that are core
    root, nearest = _min_label_components(core_cols, core, sync_free)
    idx = torch.arange(C, device=adj.device)
    cluster_of_root = (core & (root == idx)).cumsum(dim=1) - 1  # (B, C): cluster number of each root
    # Clusters are numbered in order of their root (smallest core index), so the smallest root among a
    # point's core neighbours is its smallest-numbered cluster: its own for a core point, the first to
    # reach it for a border point. No core neighbour: noise.
    labels = cluster_of_root.gather(1, nearest.clamp_max(C - 1))
    return torch.where(nearest < C, labels, -1)


# ``dbscan_by_search`` hands a graph over to ``dbscan_from_adjacency`` after this many search steps (a
# graph of many small clusters: a step per cluster and per level would cost more than the dense rounds).
MAX_SEARCH_STEPS = 64


def dbscan_by_search(adj: Tensor, counts: Tensor, min_samples: int) -> Tensor:
    """CPU, one image: DBSCAN labels by breadth-first search over the core points (host reads allowed).

    adj: (C, C) bool, symmetric, true diagonal; counts: (C,) int, its row counts -> labels (C,) int64,
    equal to ``dbscan_from_adjacency``'s. Clusters grow in order of their smallest core point (the
    numbering above); each step reads the rows of the core points reached last, so the search reads each
    core row once, where the dense rounds read the whole (C, C) matrix several times. A border point joins
    the first cluster that reaches it: the smallest-numbered among its core neighbours. After
    ``MAX_SEARCH_STEPS`` steps the dense rounds take over (same labels).
    """
    C = adj.shape[0]
    rows = adj.view(torch.uint8)  # a byte maximum over rows: 5-9x faster than a bool ``any`` (bench ``reach``)
    core = counts >= min_samples
    labels = torch.full((C,), -1, dtype=torch.long, device=adj.device)
    todo = core.clone()  # core points in no cluster yet
    steps, cluster = 0, 0
    while True:
        start = todo.nonzero()[:1, 0]  # (1,) the smallest core point left, or (0,)
        if start.numel() == 0:
            return labels
        todo[start] = False
        labels[start] = cluster
        frontier = start
        while frontier.numel():
            steps += 1
            if steps > MAX_SEARCH_STEPS:
                return dbscan_from_adjacency(adj[None], min_samples, False)[0]
            reach = rows.index_select(0, frontier).amax(dim=0).bool()  # (C,) neighbours of the frontier
            labels.masked_fill_(reach & (labels < 0), cluster)
            frontier = (reach & todo).nonzero().squeeze(1)
            todo[frontier] = False
        cluster += 1


def dbscan(dist: Tensor, eps, min_samples: int, sync_free: bool | None = None) -> Tensor:
    """Batched exact DBSCAN on precomputed distances.

    dist: (B, C, C) symmetric distances; eps: float or (B,) tensor; min_samples >= 1 ->
    labels (B, C) int64, -1 = noise. Identical to
    ``sklearn.cluster.DBSCAN(eps, min_samples=min_samples, metric="precomputed").fit(dist[b]).labels_``
    for every b (eps = 0 is allowed here: neighbours are then the points at distance exactly 0).
    ``sync_free`` as ``_checks.decide_sync_free``.
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
    return dbscan_from_adjacency(adj, min_samples, decide_sync_free(sync_free, dist))
