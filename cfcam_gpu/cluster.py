"""The seed's channel clustering: its constants, and the ONE place that picks how eps and the neighbour
relation are computed.

The seed's constants (``../seed``: eps = 25th percentile of the channel distances, min_samples = 5% of
the channels, at least 2; guided filter radius = a quarter of the map's scale, its eps = 10% of the
cluster mean's variance) live here and nowhere else.

Every route reads eps and the neighbour relation off the same exact squared distances V[i, j] =
sum_k (x_ik - x_jk)**2 in float64 (``distance.sum_squared_differences``), so they give the same eps and
labels. Routes of the torch backend, chosen in ``_cluster_torch`` only:
- sync-free (accelerators by default; ``sync_free=True`` anywhere): V for every pair
  (``distance.squared_distances``, blocks of static size) in groups of images of static size, no host
  read;
- CPU: image by image; where eps is 0 (the percentile's ranks fall among the zeros of V: many dead or
  duplicate channels), DBSCAN on the groups of identical channels, found by exact hashes and checked
  (``duplicates.py``, no (C, C) matrix); else a Gram matrix screened with a proven error bound and refined exactly
  (``screened.py``): in float32 for float32 features, else (float64 features, or a float32 image the
  float32 screen declined) in float64; an image both screens decline gets V for every pair. DBSCAN by
  breadth-first search on the screened neighbours (``dbscan_ops.dbscan_by_search``).
Features whose largest magnitude lies outside [2**-32, 2**32] (float32) or [2**-400, 2**400] (float64)
are first scaled by a power of two per image (exact; eps scaled back): V neither overflows nor
underflows, and the float32 screen's products stay in range. Inside those ranges nothing is scaled.
A pair is an eps-neighbour iff V <= reach, V's order statistic at the percentile's lower rank: exactly
``d <= eps``, ties at eps included, with no rounded eps or eps**2 involved (``percentile_ops.Radius``).
``exclude_dead`` leaves all-zero channels out (label -1): on the CPU each image's alive channels go
through the routes above; the sync-free route masks them with static shapes. Both give the clustering of
the alive channels alone. The published CF-CAM (``published.py``) clusters a subset the same way
(``subset_clusters``), with its own eps rule (``EpsRule``: off-diagonal percentile, floored).
Shapes: B images, C channels, h x w feature map, N = h*w.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_tensor, decide_sync_free
from .dbscan_ops import dbscan_by_search, dbscan_from_adjacency
from .distance import channel_features, squared_distances
from .duplicates import zero_count_bound, zero_radius_clusters
from .percentile_ops import matrix_rank, percentile_from_squared, radius_from_squared, with_floor
from .screened import screened_neighbours

BACKENDS = ("torch", "sklearn", "cuml")

# The seed's constants.
EPS_PERCENTILE = 25.0  # DBSCAN eps: this percentile of the (C, C) channel distance matrix
MIN_SAMPLES_FRACTION = 0.05  # DBSCAN min_samples: this fraction of the channels, at least 2
FILTER_RADIUS_FRACTION = 0.25  # guided filter radius: int(sqrt(h w) * this)
FILTER_EPS_FRACTION = 0.1  # guided filter eps: this fraction of the cluster mean's variance


class EpsRule(NamedTuple):
    """How DBSCAN's eps is read from the channel distances: the q-th percentile of the distance matrix
    (``diagonal``: with its zero diagonal, as the seed; False: the off-diagonal entries only), at least
    ``floor`` (rounded to the features' dtype)."""

    q: float = EPS_PERCENTILE
    diagonal: bool = True
    floor: float = 0.0


SEED_RULE = EpsRule()


def seed_min_samples(C: int) -> int:
    """The seed's rule: 5% of the channels, at least 2."""
    return max(2, int(MIN_SAMPLES_FRACTION * C))


def seed_filter_radius(h: int, w: int) -> int:
    """The seed's guided filter radius: a quarter of the map's spatial scale, int(sqrt(h w) / 4)."""
    return int((h * w) ** 0.5 * FILTER_RADIUS_FRACTION)


def dead_channels(activations: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C) bool: channels that are exactly zero everywhere."""
    return activations.flatten(2).abs().amax(dim=2) == 0


class ChannelClusters(NamedTuple):
    """labels (B, C) int64 (-1 = noise), eps (B,) the adaptive DBSCAN radius, min_samples (an int, or
    None with ``exclude_dead``, where it follows each image's count of alive channels)."""

    labels: Tensor
    eps: Tensor
    min_samples: int | None


# The sync-free route clusters images in groups whose float64 (C, C) matrices fit in about this many
# bytes: the group bounds the post-processing's memory whatever the batch (the (B, C, C) float64 matrix
# alone is 34 GB at B = 256, C = 4096; a group of 1 GiB is 64 images at C = 2048, 16 at 4096); the group
# size follows from the shapes, so it costs no host sync. V's differences are formed in blocks of
# ``distance.ACCELERATOR_BLOCK_BYTES`` within a group.
ACCELERATOR_GROUP_BYTES = 2**30

# Features whose largest magnitude lies outside [2**-e, 2**e], e = SCALE_EXPONENT[dtype], are scaled by
# a power of two first (module notes); MIN_SCALE_EXPONENT: the largest scaling up (2**100 and 2**1000 are
# in range). float32: eps <= 2**33 sqrt(N) then.
SCALE_EXPONENT = {torch.float32: 32, torch.float64: 400}
MIN_SCALE_EXPONENT = {torch.float32: -100, torch.float64: -1000}


def screened_route(feats: Tensor, sync_free: bool) -> bool:
    """Whether the torch backend clusters these features (B, C, N) image by image with the screens of
    ``screened.py`` (the CPU)."""
    return not sync_free


def _cluster_torch(feats: Tensor, sync_free: bool, alive: Tensor | None = None,
                   rule: EpsRule = SEED_RULE) -> ChannelClusters:
    """The route choice (module notes). feats: (B, C, N); alive: (B, C) bool or None (all channels);
    rule: how eps is read off the distances. A rule with a floor (the published variant's 1e-5) is
    stated in the features' own units, so those features are not rescaled."""
    if rule.floor:
        return _cluster_torch_unscaled(feats, sync_free, alive, rule)
    feats, scale = _power_of_two_range(feats)
    part = _cluster_torch_unscaled(feats, sync_free, alive, rule)
    eps = (part.eps.double() * scale).to(part.eps.dtype)  # exact (inf only beyond the dtype's range)
    return ChannelClusters(part.labels, eps, part.min_samples)


def _power_of_two_range(feats: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, N) float32/64 -> (feats * 2**-k, 2**k (B,) float64), k != 0 only for the images whose
    largest magnitude is outside the dtype's [2**-SCALE_EXPONENT, 2**SCALE_EXPONENT]: exact scaling (V
    scales by 4**-k, eps by 2**-k, the labels do not change), no host sync."""
    top = feats.abs().amax(dim=(1, 2))
    e = torch.frexp(top).exponent
    k = torch.where((e.abs() > SCALE_EXPONENT[feats.dtype]) & (top > 0), e, 0)
    k = k.clamp_min(MIN_SCALE_EXPONENT[feats.dtype])
    down = torch.ldexp(torch.ones_like(top), -k)
    return feats * down[:, None, None], torch.ldexp(torch.ones_like(top, dtype=torch.float64), k)


def _cluster_torch_unscaled(feats: Tensor, sync_free: bool, alive: Tensor | None = None,
                            rule: EpsRule = SEED_RULE) -> ChannelClusters:
    """The routes proper, on features already in range (see ``_cluster_torch``)."""
    if sync_free:
        return _cluster_float64(feats, True, alive, rule)
    if alive is not None:
        return _cluster_alive_cpu(feats, alive, rule)
    return _cluster_cpu(feats, rule)


def _cluster_float64(feats: Tensor, sync_free: bool, alive: Tensor | None = None,
                     rule: EpsRule = SEED_RULE) -> ChannelClusters:
    """The all-pairs route: V for every pair, in groups of images whose (C, C) float64 matrices fit in
    ``ACCELERATOR_GROUP_BYTES`` (the group size follows from the shapes: no host sync)."""
    B, C, _ = feats.shape
    budget = ACCELERATOR_GROUP_BYTES
    group = max(1, budget // (C * C * 8))
    if group >= B:
        return _cluster_float64_batch(feats, sync_free, alive, rule)
    parts = [_cluster_float64_batch(feats[i:i + group], sync_free, None if alive is None else alive[i:i + group],
                                    rule)
             for i in range(0, B, group)]
    return ChannelClusters(torch.cat([p.labels for p in parts]), torch.cat([p.eps for p in parts]),
                           parts[0].min_samples)


def _cluster_cpu(feats: Tensor, rule: EpsRule = SEED_RULE) -> ChannelClusters:
    """CPU: image by image. Where eps is 0, DBSCAN on the groups of identical channels
    (``duplicates.py``); else eps and neighbours screened and refined exactly (``screened.py``): float32
    features by a float32 screen, then (declined, or float64 features) by a float64 screen, then (both
    declined) V for every pair; labels by breadth-first search on the screened neighbours."""
    C = feats.shape[1]
    min_samples = seed_min_samples(C)
    labels, eps = [], []
    buffers = {}  # d~ per screen precision, and the neighbour mask: reused image after image
    mask = feats.new_empty(C, C, dtype=torch.bool)

    def neighbours(x: Tensor, precision: torch.dtype):
        if precision not in buffers:
            buffers[precision] = feats.new_empty(C, C, dtype=precision)
        return screened_neighbours(x, rule.q, buffers[precision], precision, rule.diagonal, rule.floor, mask)

    # eps = 0 (>= 25% of the distances are 0: many dead or duplicate channels): the groups of identical
    # channels are the neighbourhoods, no (C, C) matrix (``duplicates.py``); hashed only where a cheap
    # bound on the zeros allows eps = 0. Three host reads per batch (this CPU route only).
    zero_labels = {}
    if not rule.floor:
        maybe = (zero_count_bound(feats) > matrix_rank(C, rule.q, rule.diagonal)[1]).nonzero().squeeze(1)
        if maybe.numel():
            zero = zero_radius_clusters(feats[maybe], rule.q, min_samples, rule.diagonal)
            zero_labels = {b: zero.labels[i]
                           for i, (b, ok) in enumerate(zip(maybe.tolist(), zero.applies.tolist())) if ok}
    for b, x in enumerate(feats):
        if b in zero_labels:
            labels.append(zero_labels[b])
            eps.append(feats.new_zeros(()))
            continue
        screened = neighbours(x, torch.float32) if feats.dtype == torch.float32 else None
        if screened is None:
            screened = neighbours(x, torch.float64)
        if screened is None:
            part = _cluster_float64_batch(x[None], False, None, rule)
            labels.append(part.labels[0])
            eps.append(part.eps[0])
            continue
        labels.append(dbscan_by_search(screened.adj, screened.counts, min_samples))
        eps.append(screened.eps)
    return ChannelClusters(torch.stack(labels), torch.stack(eps), min_samples)


def _cluster_alive_cpu(feats: Tensor, alive: Tensor, rule: EpsRule = SEED_RULE) -> ChannelClusters:
    """CPU, a subset per image (``exclude_dead``, ``subset_clusters``): each image's alive channels alone
    through ``_cluster_torch``; the others -1 (eps: 0 where none is alive)."""
    labels = torch.full(alive.shape, -1, dtype=torch.long, device=feats.device)
    eps = feats.new_zeros(feats.shape[0])
    for b in range(feats.shape[0]):
        keep = alive[b]
        if bool(keep.any()):
            part = _cluster_torch_unscaled(feats[b, keep][None], False, None, rule)
            labels[b, keep] = part.labels[0]
            eps[b] = part.eps[0]
    return ChannelClusters(labels, eps, None)


def _cluster_float64_batch(feats: Tensor, sync_free: bool, alive: Tensor | None = None,
                           rule: EpsRule = SEED_RULE) -> ChannelClusters:
    C = feats.shape[1]
    d2 = squared_distances(feats, sync_free)  # (B, C, C) float64, exact V
    # eps by the rule (the seed's: the percentile of the whole distance matrix) in the features' dtype,
    # and the exact radius: d <= eps exactly iff V <= reach (``percentile_ops.Radius``).
    eps, reach = with_floor(radius_from_squared(d2, rule.q, feats.dtype, sync_free, alive, rule.diagonal),
                            rule.floor)
    if rule.floor and alive is not None:  # as the CPU route: 0 where no channel is clustered
        eps = torch.where(alive.any(dim=1), eps, torch.zeros_like(eps))
    adj = d2 <= reach[:, None, None]  # V is exactly symmetric: so is adj
    del d2
    if alive is None:
        min_samples = seed_min_samples(C)
        return ChannelClusters(dbscan_from_adjacency(adj, min_samples, sync_free), eps, min_samples)
    adj &= alive[:, :, None] & alive[:, None, :]
    adj.diagonal(dim1=1, dim2=2).fill_(True)
    per_image = (MIN_SAMPLES_FRACTION * alive.sum(dim=1).double()).floor().clamp_min(2).long()  # (B,)
    labels = dbscan_from_adjacency(adj, per_image[:, None], sync_free)
    return ChannelClusters(torch.where(alive, labels, -1), eps, None)


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
    d2 = squared_distances(feats, True)
    eps = percentile_from_squared(d2, EPS_PERCENTILE, feats.dtype, True)  # the same eps as the torch backend
    dist = d2.sqrt_().to(feats.dtype)
    min_samples = seed_min_samples(feats.shape[1])
    labels = []
    for b in range(feats.shape[0]):  # cuML fits one data set per call
        e = float(eps[b])
        model = CuDBSCAN(eps=e if e > 0 else 1e-30, min_samples=min_samples, metric="precomputed",
                         output_type="numpy")
        labels.append(torch.as_tensor(model.fit_predict(dist[b].contiguous())).long())
    return ChannelClusters(torch.stack(labels).to(feats.device), eps, min_samples)


def channel_clusters(activations: Tensor, backend: str = "torch", *, sync_free: bool | None = None,
                     exclude_dead: bool = False) -> ChannelClusters:
    """Group each image's channels with DBSCAN using the seed's adaptive parameters.

    activations: (B, C, h, w) -> ChannelClusters(labels (B, C) int64, eps (B,), min_samples), with
    eps = 25th percentile of the (C, C) channel distance matrix and min_samples = max(2, int(0.05 C)).
    backend: "torch" (batched, any device, default), "sklearn" (per image on the CPU; the oracle) or
    "cuml" (RAPIDS, CUDA; cuML only guarantees core and noise labels equal to scikit-learn's).
    sync_free: see ``_checks.decide_sync_free`` (None: decided by the device). exclude_dead: cluster
    each image's non-zero channels only (all-zero channels get -1; torch backend only).
    """
    check_tensor(activations, "activations")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    feats = channel_features(activations)
    if exclude_dead:
        if backend != "torch":
            raise ValueError(f"backend: exclude_dead supports only backend='torch', got {backend!r}")
        return _cluster_torch(feats, decide_sync_free(sync_free, feats), ~dead_channels(activations))
    if backend == "torch":
        return _cluster_torch(feats, decide_sync_free(sync_free, feats))
    return {"sklearn": _cluster_sklearn, "cuml": _cluster_cuml}[backend](feats)


def subset_clusters(activations: Tensor, keep: Tensor, rule: EpsRule, backend: str = "torch", *,
                    sync_free: bool | None = None) -> ChannelClusters:
    """DBSCAN on a subset of each image's channels, with min_samples = max(2, int(0.05 n)) for its n
    channels and eps by ``rule``: the same as clustering each image's ``keep`` channels alone.

    activations: (B, C, h, w); keep: (B, C) bool -> ChannelClusters(labels (B, C) int64, -1 = noise or
    not kept, clusters numbered by their smallest channel index; eps (B,); min_samples None: it follows
    each image's n). backend: "torch" (the routes of ``_cluster_torch``) or "sklearn" (per image, the
    oracle: ``reference.subset_cluster_reference``).
    """
    check_tensor(activations, "activations")
    feats = channel_features(activations)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.shape != feats.shape[:2]:
        raise ValueError(f"keep: expected a {tuple(feats.shape[:2])} bool tensor, got "
                         f"{tuple(keep.shape) if isinstance(keep, Tensor) else type(keep).__name__}")
    if backend == "torch":
        return _cluster_torch(feats, decide_sync_free(sync_free, feats), keep, rule)
    if backend != "sklearn":
        raise ValueError(f"backend: expected 'torch' or 'sklearn' for a subset of channels, got {backend!r}")
    from .reference import subset_cluster_reference

    labels, eps = [], []
    for f, k in zip(feats.detach().cpu().numpy(), keep.cpu().numpy()):
        lab, e = subset_cluster_reference(f, k, rule.q, rule.diagonal, rule.floor)
        labels.append(torch.from_numpy(lab).long())
        eps.append(float(e))
    return ChannelClusters(torch.stack(labels).to(feats.device),
                           torch.tensor(eps, dtype=feats.dtype, device=feats.device), None)


def cluster_channels(activations: Tensor, backend: str = "torch", **options) -> Tensor:
    """activations: (B, C, h, w) -> DBSCAN labels (B, C) int64, -1 = noise. See ``channel_clusters``."""
    return channel_clusters(activations, backend, **options).labels
