"""Pairwise channel distances, accumulated in float64.

Squared distances of float32 features need that precision for the DBSCAN neighbour test to agree with
scikit-learn on ties (see ``cluster.py``), and torch's float32 sqrt on the CPU is not correctly rounded.
Shapes: B images, C rows (channels), N values per row (h*w).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._checks import check_floating, check_ndim, decide_sync_free


def _mix64(z: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): spreads every input bit over the
    word. Float bit patterns of round numbers end in long runs of zeros, which a plain multiply would keep
    in the low bits (and so collide after the sum)."""
    z = (z ^ (z >> 31)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94D049BB133111EB as int64
    return z ^ (z >> 33)


def row_hashes(x: Tensor) -> Tensor:
    """An exact 64-bit integer hash of each row's bit pattern: equal rows always hash equal, all-zero
    rows hash to 0, and different rows collide with probability ~2**-64.

    x: (B, C, N) floating -> (B, C) int64. Integer arithmetic wraps modulo 2**64 in any order, so unlike
    a floating-point product the result does not depend on where a row sits in a BLAS kernel.
    """
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[x.element_size()]
    z = _mix64((x + 0.0).view(int_type).long())  # + 0.0 turns -0.0 into +0.0
    # One odd multiplier per position (so permuted rows differ), made on the device: no host copy.
    mult = _mix64(torch.arange(1, x.shape[-1] + 1, device=x.device)) | 1
    h = (z * mult).sum(dim=2)
    return torch.where((x != 0).any(dim=2), h | 1, 0)  # all-zero rows -> 0, every other row odd


def squared_distances(x: Tensor, sync_free: bool | None = None) -> Tensor:
    """Squared Euclidean distances between rows, in float64.

    x: (B, C, N) -> (B, C, C) float64, >= 0, exactly 0 on the diagonal and between identical rows (the
    Gram formula alone can leave ~1e-13 between identical non-zero rows, which would break the eps = 0
    rule "neighbours are the exact duplicates"; such rows are found by exact integer hashes of their
    bits). Symmetric up to the rounding of the Gram matrix (see ``mirror_upper``). ``sync_free`` (None:
    on non-CPU devices) always runs the duplicate pass instead of checking for duplicates on the host.
    """
    check_ndim(x, 3, "x", "(B, C, N)")
    check_floating(x, "x")
    x64 = x.double()
    d2 = torch.bmm(x64, x64.transpose(1, 2))  # the Gram matrix, turned into d2 in place
    norms = torch.diagonal(d2, dim1=1, dim2=2).clone()
    d2.mul_(-2).add_(norms[:, :, None]).add_(norms[:, None, :]).clamp_min_(0)
    h = row_hashes(x)
    # All-zero rows are already exactly 0 apart (every product is 0). Identical live rows are rare: when
    # a host read is allowed, skip the (B, C, C) pass when there are none.
    if decide_sync_free(sync_free, x) or _has_live_duplicates(h):
        d2.masked_fill_(h[:, :, None] == h[:, None, :], 0.0)
    return d2


def _has_live_duplicates(h: Tensor) -> bool:
    """Whether some image has two equal non-zero row hashes. h: (B, C) int64. One host read."""
    sorted_h = h.sort(dim=1).values
    return bool(((sorted_h[:, 1:] == sorted_h[:, :-1]) & (sorted_h[:, 1:] != 0)).any())


def exact_sqrt(x: Tensor) -> Tensor:
    """Correctly rounded square root. torch's CPU float64 sqrt is vectorised and can be one ulp off;
    numpy's is IEEE (and CUDA's sqrt is correctly rounded). For a handful of values, not matrices."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))
    return x.sqrt()


def mirror_upper(m: Tensor) -> Tensor:
    """(B, C, C) -> the upper triangle (diagonal included) mirrored onto the lower one: exactly symmetric.

    The Gram matrix rounds (i, j) and (j, i) apart by an ulp (float64 sums in different orders, also for
    float32 features); the batched route reads the upper triangle as the distance matrix, for the
    percentile and for the neighbour relation alike.
    """
    C = m.shape[-1]
    upper = torch.ones(C, C, dtype=torch.bool, device=m.device).triu_()
    return torch.where(upper, m, m.transpose(-1, -2))


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between the C rows of each item.

    x: (B, C, N) -> (B, C, C) in x's dtype (computed in float64 and rounded once), exactly symmetric
    (``mirror_upper``), zero diagonal, exactly 0 between identical rows.
    """
    return mirror_upper(squared_distances(x)).sqrt_().to(x.dtype)
