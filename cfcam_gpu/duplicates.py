"""Exact duplicate channels, and DBSCAN when the neighbour radius is 0.

V[i, j] = 0 exactly when channels i and j are identical (``distance.sum_squared_differences``; -0.0 and
0.0 count as equal), so the C*C matrix holds Z = sum_g s_g**2 zeros, s_g the sizes of the groups of
identical channels (each channel alone is a group of 1). When the percentile's upper rank falls among
those zeros (>= 25% of the entries are 0 for the 25th percentile: many dead or duplicate channels), eps is 0
and so is the radius: a channel's neighbours are exactly its group. Then a channel is core iff its
group has >= min_samples channels, the clusters are the core groups (numbered by their smallest index),
and every other channel is noise: DBSCAN without the (C, C) matrix.

Groups come from exact 64-bit hashes of the channels' bits (``distance.row_hashes``), sorted; every
channel is then compared with its group's first channel, so a hash collision can only make the route
decline, never change an answer. Static shapes, no host read. The CPU route first bounds the zeros
cheaply (``zero_count_bound``: channels with equal maxima), hashes only the images whose
bound reaches the percentile's rank, reads ``applies`` once per batch, and sends the others on to the
screens.
Shapes: B images, C channels, N = h*w values per channel.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_ndim, check_floating
from .distance import row_hashes
from .percentile_ops import matrix_rank

# float64 features whose non-zero magnitudes are all >= this: any two different values differ by at
# least 2**-532, whose square (>= 2**-1064) does not underflow, so V = 0 only between identical channels.
# Float32 values differ by at least 2**-149 (square 2**-298 in float64): always safe.
FLOAT64_SMALLEST = 2.0**-480


class DuplicateGroups(NamedTuple):
    """first (B, C) int64: the smallest index of the channels identical to each channel; size (B, C)
    int64: how many there are (itself included); exact (B,) bool: every channel verified equal to its
    ``first`` and every value finite (False: a hash collision, a non-finite value or, for float64
    features, a non-zero magnitude below ``FLOAT64_SMALLEST``; do not use)."""

    first: Tensor
    size: Tensor
    exact: Tensor


def duplicate_groups(feats: Tensor) -> DuplicateGroups:
    """The groups of identical channels of each image. feats: (B, C, N) float -> DuplicateGroups."""
    check_ndim(feats, 3, "feats", "(B, C, N)")
    check_floating(feats, "feats")
    B, C, N = feats.shape
    hashes, order = row_hashes(feats).sort(dim=1, stable=True)  # equal hashes: ascending channel index
    pos = torch.arange(C, device=feats.device).expand(B, C)
    starts = torch.ones(B, C, dtype=torch.bool, device=feats.device)
    starts[:, 1:] = hashes[:, 1:] != hashes[:, :-1]
    run_start = torch.where(starts, pos, 0).cummax(dim=1).values  # sorted position where each run starts
    first = torch.empty_like(order).scatter_(1, order, order.gather(1, run_start))
    size = torch.zeros_like(first).scatter_add_(1, first, torch.ones_like(first)).gather(1, first)
    same = feats.gather(1, first[:, :, None].expand(B, C, N)) == feats  # NaN != NaN: declines
    exact = same.flatten(1).all(dim=1) & torch.isfinite(feats).flatten(1).all(dim=1)
    if feats.dtype == torch.float64:
        tiny = (feats != 0) & (feats.abs() < FLOAT64_SMALLEST)
        exact &= ~tiny.flatten(1).any(dim=1)
    return DuplicateGroups(first, size, exact)


def zero_count_bound(feats: Tensor) -> Tensor:
    """An upper bound on the zero entries of each image's V, without hashing: the sum of squared sizes of
    the groups of channels with equal maximum (identical channels share it, exactly). feats: (B, C, N)
    float -> (B,) int64. One exact reduction and one sort of (B, C), about 0.2 ms per image at C = 2048,
    N = 49: where it is at most the percentile's upper rank, eps is not 0 and nothing is hashed."""
    check_ndim(feats, 3, "feats", "(B, C, N)")
    high = feats.amax(dim=2).sort(dim=1).values
    starts = torch.ones_like(high, dtype=torch.bool)
    starts[:, 1:] = high[:, 1:] != high[:, :-1]
    run = starts.long().cumsum(dim=1) - 1
    sizes = torch.zeros_like(run).scatter_add_(1, run, torch.ones_like(run))
    return sizes.square().sum(dim=1)


class ZeroRadius(NamedTuple):
    """labels (B, C) int64 (-1 = noise), valid where ``applies`` (B,) bool: the image's radius is 0
    and its groups are exact."""

    labels: Tensor
    applies: Tensor


def zero_radius_clusters(feats: Tensor, q: float, min_samples: int, diagonal: bool = True) -> ZeroRadius:
    """DBSCAN labels of the images whose q-th percentile of the channel distances is 0 (module notes).

    feats: (B, C, N) float; q, diagonal: the percentile as ``percentile_ops.matrix_rank``; min_samples: int
    -> ZeroRadius. Where ``applies``, the labels equal those of the neighbour relation V <= reach
    (``cluster.py``) and eps is exactly 0 (both order statistics of the percentile are 0).
    """
    B, C, _ = feats.shape
    groups = duplicate_groups(feats)
    _, hi, _ = matrix_rank(C, q, diagonal)
    zeros = groups.size.sum(dim=1)  # Z = sum over the groups of size**2: the zero entries of V
    applies = groups.exact & (zeros > hi)
    core = groups.size >= min_samples
    idx = torch.arange(C, device=feats.device)
    cluster_of_root = (core & (groups.first == idx)).cumsum(dim=1) - 1  # clusters by smallest index
    labels = torch.where(core, cluster_of_root.gather(1, groups.first), -1)
    return ZeroRadius(labels, applies)
