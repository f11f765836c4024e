"""Pairwise channel distances, accumulated in float64.

The exact squared distance of two rows is V = sum_k (x_ik - x_jk)**2 in float64
(``sum_squared_differences``): every route of the clustering reads eps and the neighbours off V (the CPU
routes refine a screened Gram matrix with it, the accelerator route computes it for every pair). Squared
distances of float32 features need float64 for the DBSCAN neighbour test to agree with scikit-learn on
ties (see ``cluster.py``), and torch's float32 sqrt on the CPU is not correctly rounded.
Shapes: B images, C rows (channels), N values per row (h*w).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ._checks import check_floating, check_ndim, decide_sync_free


def channel_features(activations: Tensor) -> Tensor:
    """The rows the distances are taken between: (B, C, h, w) -> (B, C, h*w), float32 unless float64
    (the features scikit-learn would see)."""
    check_ndim(activations, 4, "activations", "(B, C, h, w)")
    feats = activations.flatten(2)
    return feats if feats.dtype == torch.float64 else feats.float()


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


def gram_squared_distances(x: Tensor, sync_free: bool | None = None) -> Tensor:
    """Squared Euclidean distances between rows by the float64 Gram matrix, ``n_i + n_j - 2 x_i.x_j``.

    x: (B, C, N) -> (B, C, C) float64, >= 0, exactly 0 on the diagonal and between identical rows (the
    Gram formula alone can leave ~1e-13 between identical non-zero rows; such rows are found by exact
    integer hashes of their bits). Fast, but NOT exact: the formula cancels between near-duplicate rows
    (relative error up to ~N 2**-53 (n_i + n_j) / d2) and rounds (i, j) and (j, i) apart (see
    ``mirror_upper``). The clustering uses ``squared_distances``; this one is kept for comparison.
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


def sum_squared_differences(a: Tensor, b: Tensor) -> Tensor:
    """V = sum_k (a_k - b_k)**2 in float64 over the last dimension: THE exact squared distance.

    a, b: broadcastable (..., N) float64 -> (...) float64. Every route that promises exactness computes
    V with this one function (the CPU screened route for its refined entries, the all-pairs routes for
    every entry), so they agree bit for bit on the same device. V is exactly symmetric (a - b = -(b - a)
    exactly) and exactly 0 between identical rows (and between -0.0 and 0.0).
    """
    return (a - b).square_().sum(dim=-1)


# Elements of the (rows, C, N) float64 difference block that ``squared_distances`` forms at a time.
CPU_BLOCK_BYTES = 2**23  # cache-sized: 8 rows of C = 2048, N = 49 (8 rows: 0.47 s per image there,
ACCELERATOR_BLOCK_BYTES = 2**28  # 32 rows: 0.96 s, 128 rows: 2.7 s on the CPU); accelerators: big blocks


def squared_distances(x: Tensor, sync_free: bool | None = None) -> Tensor:
    """Exact squared Euclidean distances between rows: V[i, j] = sum_k (x_ik - x_jk)**2 in float64
    (``sum_squared_differences``) for every pair.

    x: (B, C, N) -> (B, C, C) float64, exactly symmetric, exactly 0 on the diagonal and between
    identical rows. No Gram matrix, so no cancellation between near-duplicate rows. Computed in blocks
    of rows whose (rows, C, N) differences fill about ``CPU_BLOCK_BYTES`` on the CPU,
    ``ACCELERATOR_BLOCK_BYTES`` elsewhere; the blocks follow from the shapes (static, no host sync), so
    ``sync_free`` changes nothing here (kept for callers). Costs C*C*N float64 differences per image:
    on the CPU about 8x the Gram matrix (the CPU clustering refines only the entries that need it,
    ``screened.py``).
    """
    check_ndim(x, 3, "x", "(B, C, N)")
    check_floating(x, "x")
    B, C, N = x.shape
    x64 = x.double()
    budget = CPU_BLOCK_BYTES if x.device.type == "cpu" else ACCELERATOR_BLOCK_BYTES  # a size, not a route
    rows = max(1, budget // max(1, C * N * 8))  # rows of one image per block
    images = max(1, rows // max(C, 1))  # whole images per block where they fit
    out = x64.new_empty(B, C, C)
    if images > 1 or rows >= C:
        for b in range(0, B, images):
            part = x64[b:b + images]
            out[b:b + images] = sum_squared_differences(part[:, :, None, :], part[:, None])
        return out
    for b in range(B):
        for i in range(0, C, rows):
            out[b, i:i + rows] = sum_squared_differences(x64[b, i:i + rows, None, :], x64[b, None])
    return out


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

    x: (B, C, N) -> (B, C, C) in x's dtype: sqrt of the exact ``squared_distances`` rounded once,
    exactly symmetric, zero diagonal, exactly 0 between identical rows.
    """
    return squared_distances(x).sqrt_().to(x.dtype)
