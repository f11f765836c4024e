"""Pairwise channel distances and numpy-exact batched percentiles.

Distances are accumulated in float64: squared distances of float32 features need that precision for the
DBSCAN neighbour test to agree with scikit-learn on ties (see ``cluster.py``), and torch's float32 sqrt on
the CPU is not correctly rounded.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from . import _sync
from ._checks import check_floating, check_ndim, check_tensor


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


def squared_distances(x: Tensor) -> Tensor:
    """Squared Euclidean distances between rows, in float64.

    x: (B, C, N) -> (B, C, C) float64, >= 0, exactly 0 on the diagonal and between identical rows (the
    Gram formula alone can leave ~1e-13 between identical non-zero rows, which would break the eps = 0
    rule "neighbours are the exact duplicates"; such rows are found by exact integer hashes of their
    bits). Symmetric up to the rounding of the Gram matrix (see ``mirror_upper``).
    """
    check_ndim(x, 3, "x", "(B, C, N)")
    check_floating(x, "x")
    x64 = x.double()
    d2 = torch.bmm(x64, x64.transpose(1, 2))  # the Gram matrix, turned into d2 in place
    norms = torch.diagonal(d2, dim1=1, dim2=2).clone()
    d2.mul_(-2).add_(norms[:, :, None]).add_(norms[:, None, :]).clamp_min_(0)
    h = row_hashes(x)
    # All-zero rows are already exactly 0 apart (every product is 0). Identical live rows are rare: on
    # the CPU (where a host sync is free) skip the (B, C, C) pass when there are none.
    sorted_h = h.sort(dim=1).values
    live_dups = (sorted_h[:, 1:] == sorted_h[:, :-1]) & (sorted_h[:, 1:] != 0)
    if not _sync.host_reads_ok(x) or bool(live_dups.any()):
        d2.masked_fill_(h[:, :, None] == h[:, None, :], 0.0)
    return d2


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


def _upper(m: Tensor) -> Tensor:
    """(B, C, C) -> (B, C(C-1)/2) strict upper triangle, row-major."""
    C = m.shape[1]
    iu = torch.triu_indices(C, C, offset=1, device=m.device)
    return m[:, iu[0], iu[1]]


def _next_value(values: Tensor, a: Tensor, rank: int) -> Tensor:
    """Given a = the rank-th smallest (0-based) of each row, the (rank+1)-th smallest, in two cheap passes
    instead of a second selection. values: (B, M); a: (B,) -> (B,)."""
    more_equal = (values <= a[:, None]).sum(dim=1) > rank + 1
    above = torch.where(values > a[:, None], values, torch.full((), float("inf"), dtype=values.dtype,
                                                                 device=values.device)).amin(dim=1)
    return torch.where(more_equal, a, above)


SAMPLE = 16384  # entries in the strided sample that brackets order statistics (CPU)
SAMPLE_SIGMAS = 5.0  # bracket half-width, in binomial standard deviations of the sample rank


def sampled_bracket(row: Tensor, ranks: tuple[int, int], width: int = 1) -> tuple[float, float]:
    """CPU: values that bracket the order statistics at the 0-based ``ranks`` (lo <= hi) of ``row`` (M,)
    with high probability, read from a sorted strided sample ``SAMPLE_SIGMAS`` binomial deviations
    beyond the ranks (-inf / inf where that runs off the sample). ``width``: the row length when ``row``
    is a flattened matrix; the stride shares no factor with it (else it would revisit few columns)."""
    M = row.numel()
    step = max(1, M // SAMPLE)
    while math.gcd(step, width) != 1:
        step += 1
    sample = row[::step].sort().values
    S = sample.numel()
    p_lo, p_hi = ranks[0] / M, ranks[1] / M
    margin = int(SAMPLE_SIGMAS * math.sqrt(S * max(p_lo * (1 - p_lo), 1.0 / S))) + 4
    i_lo, i_hi = int(p_lo * S) - margin, int(p_hi * S) + margin + 1
    lo_v = float(sample[i_lo]) if i_lo >= 0 else -math.inf
    hi_v = float(sample[i_hi]) if i_hi < S else math.inf
    return lo_v, hi_v


def _pair_by_sampling(values: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """CPU: the rank-th and (rank+1)-th smallest (0-based) of each row, selected from a narrow window.

    values: (B, M) -> (B,), (B,). ``sampled_bracket`` brackets the two ranks; one counting pass and one
    selection pass then leave a few thousand candidates. If the bracket misses (only on adversarially
    ordered data) the row falls back to ``kthvalue``: the answer is always exact. Cheaper than
    ``kthvalue`` plus ``_next_value`` on the CPU (see the percentile stage of ``python -m bench.run``).
    """
    B, M = values.shape
    nxt = min(rank + 1, M - 1)
    firsts, seconds = [], []
    for row in values:
        lo_v, hi_v = sampled_bracket(row, (rank, nxt))
        below_mask = row < lo_v
        below = int(torch.count_nonzero(below_mask))
        window = row[(row <= hi_v) != below_mask]  # lo_v <= value <= hi_v
        if below <= rank and nxt < below + window.numel():
            row, offset = window, below
        else:
            offset = 0
        firsts.append(row.kthvalue(rank - offset + 1).values)
        seconds.append(row.kthvalue(nxt - offset + 1).values)
    return torch.stack(firsts), torch.stack(seconds)


def _symmetric_order_stats(m: Tensor, lo: int, hi: int) -> tuple[Tensor, Tensor]:
    """Values at 0-based ranks lo <= hi = lo or lo + 1 of all C*C entries of symmetric, non-negative,
    zero-diagonal matrices m (B, C, C), read from the strict upper triangle only: the sorted matrix is C
    zeros followed by every off-diagonal value twice."""
    B, C, _ = m.shape
    zero = m.new_zeros(B)
    if hi < C:
        return zero, zero
    upper = _upper(m)
    r_hi = (hi - C) // 2
    if lo < C:
        return zero, upper.kthvalue(r_hi + 1, dim=1).values
    r_lo = (lo - C) // 2
    if _sync.host_reads_ok(m) and upper.shape[1] >= 2**16:
        a, b = _pair_by_sampling(upper, r_lo)
        return a, (a if r_hi == r_lo else b)
    a = upper.kthvalue(r_lo + 1, dim=1).values
    return a, (a if r_hi == r_lo else _next_value(upper, a, r_lo))


def percentile_of_distances(dist: Tensor, q: float) -> Tensor:
    """Percentile over all C*C entries of symmetric, zero-diagonal, non-negative distance matrices.

    dist: (B, C, C) -> (B,). Same value as ``percentile(dist.flatten(1), q)``, selecting from the strict
    upper triangle only.
    """
    lo, hi, g = _linear_rank(dist.shape[1] ** 2, float(q))
    a, b = _symmetric_order_stats(dist, lo, hi)
    return a if g == 0.0 else _lerp(a, b, g)


def percentile_from_squared(d2: Tensor, q: float, dtype: torch.dtype) -> Tensor:
    """Percentile of the distance matrices sqrt(d2) rounded to ``dtype``, without forming them.

    d2: (B, C, C) float64 squared distances -> (B,) in ``dtype``. Equals
    ``percentile(d2.sqrt().to(dtype).flatten(1), q)``: rounding a square root is monotone, so the order
    statistics are selected on d2 and only the two selected values are rooted and rounded.
    """
    lo, hi, g = _linear_rank(d2.shape[1] ** 2, float(q))
    a, b = _symmetric_order_stats(d2, lo, hi)
    a, b = exact_sqrt(a).to(dtype), exact_sqrt(b).to(dtype)
    return a if g == 0.0 else _lerp(a, b, g)
