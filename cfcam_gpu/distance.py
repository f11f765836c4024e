"""Pairwise channel distances and numpy-exact batched percentiles.

Distances are accumulated in float64: squared distances of float32 features need that precision for the
DBSCAN neighbour test to agree with scikit-learn on ties (see ``cluster.py``), and torch's float32 sqrt on
the CPU is not correctly rounded.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_floating, check_ndim, check_tensor


def squared_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances between rows, in float64.

    x: (B, C, N) -> (B, C, C) float64, >= 0, exactly 0 on the diagonal and between identical rows.

    Uses the Gram matrix G = x x^T with the norms read off its own diagonal, so identical rows give
    G_ii + G_jj - 2 G_ij = 0 exactly (``torch.cdist`` computes the norms separately and does not).
    """
    check_ndim(x, 3, "x", "(B, C, N)")
    check_floating(x, "x")
    x64 = x.double()
    gram = torch.bmm(x64, x64.transpose(1, 2))
    norms = torch.diagonal(gram, dim1=1, dim2=2)
    d2 = (norms[:, :, None] + norms[:, None, :]).sub_(gram, alpha=2).clamp_min_(0)
    d2.diagonal(dim1=1, dim2=2).zero_()
    return d2


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between the C rows of each item.

    x: (B, C, N) -> (B, C, C) in x's dtype (computed in float64 and rounded once), zero diagonal.
    """
    return squared_distances(x).sqrt_().to(x.dtype)


def _linear_rank(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' method: the two 0-based ranks to read and the interpolation weight."""
    virtual = (n - 1) * (q / 100.0)
    lo = int(math.floor(virtual))
    hi = min(lo + 1, n - 1)
    return lo, hi, virtual - lo


def _lerp(a: Tensor, b: Tensor, g: float) -> Tensor:
    """numpy's ``_lerp``: a + (b - a) g, or b - (b - a)(1 - g) when g >= 0.5 (exact at both ends)."""
    diff = b - a
    return b - diff * (1.0 - g) if g >= 0.5 else a + diff * g


def percentile(x: Tensor, q: float) -> Tensor:
    """Per-row q-th percentile with numpy's default linear interpolation, bit for bit.

    x: (B, M) floating -> (B,) in x's dtype. ``q`` in [0, 100]. Equals
    ``numpy.percentile(x[b].numpy(), q)`` for every row (for finite values).
    """
    check_tensor(x, "x")
    check_ndim(x, 2, "x", "(B, M)")
    check_floating(x, "x")
    if x.shape[1] == 0:
        raise ValueError(f"x: expected at least one value per row, got shape {tuple(x.shape)}")
    if not 0.0 <= float(q) <= 100.0:
        raise ValueError(f"q: expected a percentile in [0, 100], got {q}")
    lo, hi, g = _linear_rank(x.shape[1], float(q))
    a = x.kthvalue(lo + 1, dim=1).values
    if g == 0.0:
        return a
    b = x.kthvalue(hi + 1, dim=1).values
    return _lerp(a, b, g)


def percentile_of_distances(dist: Tensor, q: float) -> Tensor:
    """Percentile over all C*C entries of symmetric, zero-diagonal, non-negative distance matrices.

    dist: (B, C, C) -> (B,). Same value as ``percentile(dist.flatten(1), q)`` but selects from the strict
    upper triangle only: the sorted full matrix is C zeros followed by every off-diagonal value twice.
    """
    B, C, _ = dist.shape
    lo, hi, g = _linear_rank(C * C, float(q))
    if C == 1:
        return dist.new_zeros(B)
    iu = torch.triu_indices(C, C, offset=1, device=dist.device)
    upper = dist[:, iu[0], iu[1]]  # (B, C(C-1)/2)

    def value_at(rank: int) -> Tensor:
        if rank < C:
            return dist.new_zeros(B)
        return upper.kthvalue((rank - C) // 2 + 1, dim=1).values

    a = value_at(lo)
    if g == 0.0:
        return a
    b = a if (hi < C) == (lo < C) and (hi - C) // 2 == (lo - C) // 2 else value_at(hi)
    return _lerp(a, b, g)
