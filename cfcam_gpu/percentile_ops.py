"""numpy-exact batched percentiles, and the percentile of distance matrices without forming them.

``percentile`` equals ``numpy.percentile`` (the default linear rule) bit for bit. The seed's eps is a
percentile over all C*C entries of a symmetric, zero-diagonal distance matrix; it is selected on the
strict upper triangle of the squared distances and only the two selected values are rooted. The
published CF-CAM (``published.py``) takes it over the C*(C-1) off-diagonal entries instead
(``diagonal=False``): the same order statistics, the ranks shifted past the C zeros (``matrix_rank``).

The neighbour radius, exactly (``Radius.reach``). numpy's rule reads the order statistics a <= b at
ranks lo and lo + 1 and returns eps = a + g (b - a) with 0 <= g < 1, so in exact arithmetic a <= eps < b
when a < b, and eps = a when a = b. No distance lies strictly between a and b (they are consecutive in
the sorted matrix), so ``d <= eps`` holds exactly for the distances d <= a and for no other: the
eps-neighbours are the pairs with V <= V_lo, the squared distance at rank lo. That test involves no
rounding at all (no square root, no rounded eps, no rounded eps**2), so a pair at distance exactly eps
is always a neighbour; the returned eps (rounded to the features' dtype, as numpy computes it on the
rounded distances) is a report of the radius, not what decides a pair. A floor f (``EpsRule.floor``)
adds the pairs with d <= f: V <= the largest float64 at most f**2 (``floor_reach``).
Shapes: B images (rows), M values per row, C channels.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import check_floating, check_ndim, check_tensor
from .distance import exact_sqrt


def linear_rank(n: int, q: float) -> tuple[int, int, float]:
    """numpy's 'linear' method: the two 0-based ranks to read and the interpolation weight."""
    virtual = (n - 1) * (q / 100.0)
    lo = int(math.floor(virtual))
    hi = min(lo + 1, n - 1)
    return lo, hi, virtual - lo


def matrix_rank(n: int, q: float, diagonal: bool = True) -> tuple[int, int, float]:
    """numpy's linear rule for the q-th percentile of a symmetric, zero-diagonal n x n matrix: the two
    0-based ranks to read in the order of all n*n entries (n zeros first, then every off-diagonal value
    twice) and the interpolation weight. ``diagonal=False``: the percentile of the n(n-1) off-diagonal
    entries alone (their order is the same one past the n zeros); with fewer than two entries there are
    none, and the ranks point at a zero (the percentile is 0)."""
    if diagonal:
        return linear_rank(n * n, q)
    if n < 2:
        return 0, 0, 0.0
    lo, hi, g = linear_rank(n * (n - 1), q)
    return lo + n, hi + n, g


def lerp(a: Tensor, b: Tensor, g: float) -> Tensor:
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
    lo, hi, g = linear_rank(x.shape[1], float(q))
    a = x.kthvalue(lo + 1, dim=1).values
    if g == 0.0:
        return a
    b = x.kthvalue(hi + 1, dim=1).values
    return lerp(a, b, g)


def upper_triangle(m: Tensor) -> Tensor:
    """(B, C, C) -> (B, C(C-1)/2) strict upper triangle, row-major."""
    C = m.shape[1]
    iu = torch.triu_indices(C, C, offset=1, device=m.device)
    return m[:, iu[0], iu[1]]


def next_value(values: Tensor, a: Tensor, rank: int) -> Tensor:
    """Given a = the rank-th smallest (0-based) of each row, the (rank+1)-th smallest, in two cheap passes
    instead of a second selection. values: (B, M); a: (B,) -> (B,)."""
    more_equal = (values <= a[:, None]).sum(dim=1) > rank + 1
    above = torch.where(values > a[:, None], values, torch.full((), float("inf"), dtype=values.dtype,
                                                                 device=values.device)).amin(dim=1)
    return torch.where(more_equal, a, above)


SAMPLE = 16384  # entries in the strided sample that brackets order statistics (CPU)
SAMPLE_SIGMAS = 5.0  # bracket half-width, in binomial standard deviations of the sample rank


def sample_step(M: int, width: int = 1) -> int:
    """The stride of ``sampled_bracket``'s sample of M values: about ``SAMPLE`` of them, sharing no factor
    with ``width`` (the row length of a flattened matrix; a shared factor would revisit few columns)."""
    step = max(1, M // SAMPLE)
    while math.gcd(step, width) != 1:
        step += 1
    return step


def bracket_positions(S: int, M: int, ranks: tuple[int, int]) -> tuple[int, int]:
    """0-based positions in a sorted evenly spread sample of S of M values that bracket the ``ranks``,
    ``SAMPLE_SIGMAS`` binomial deviations beyond them (may run off the sample: < 0 or >= S)."""
    p_lo, p_hi = ranks[0] / M, ranks[1] / M
    margin = int(SAMPLE_SIGMAS * math.sqrt(S * max(p_lo * (1 - p_lo), 1.0 / S))) + 4
    return int(p_lo * S) - margin, int(p_hi * S) + margin + 1


def sampled_bracket(row: Tensor, ranks: tuple[int, int], width: int = 1) -> tuple[float, float]:
    """CPU: values that bracket the order statistics at the 0-based ``ranks`` (lo <= hi) of ``row`` (M,)
    with high probability, read from a sorted strided sample ``SAMPLE_SIGMAS`` binomial deviations
    beyond the ranks (-inf / inf where that runs off the sample). ``width``: the row length when ``row``
    is a flattened matrix; the stride shares no factor with it (else it would revisit few columns)."""
    M = row.numel()
    sample = row[::sample_step(M, width)].contiguous()
    S = sample.numel()
    i_lo, i_hi = bracket_positions(S, M, ranks)
    # two selections: a sort of the sample costs 2-2.6x more (``python -m bench.cpu_passes``, ``sample``)
    lo_v = float(sample.kthvalue(i_lo + 1).values) if i_lo >= 0 else -math.inf
    hi_v = float(sample.kthvalue(i_hi + 1).values) if i_hi < S else math.inf
    return lo_v, hi_v


def order_pair(values: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """CPU: the rank-th and (rank+1)-th smallest (0-based) of each row, selected from a narrow window.

    values: (B, M) -> (B,), (B,). ``sampled_bracket`` brackets the two ranks; one counting pass and one
    selection pass then leave a few thousand candidates. If the bracket misses (only on adversarially
    ordered data) the row falls back to ``kthvalue``: the answer is always exact. Cheaper than
    ``kthvalue`` plus ``next_value`` on the CPU (see the percentile stage of ``python -m bench.run``).
    """
    B, M = values.shape
    nxt = min(rank + 1, M - 1)
    firsts, seconds = [], []
    for row in values:
        lo_v, hi_v = sampled_bracket(row, (rank, nxt))
        below_mask = row < lo_v
        below = int(torch.count_nonzero(below_mask))
        window = row.index_select(0, ((row <= hi_v) != below_mask).nonzero().squeeze(1))  # lo_v <= v <= hi_v
        if below <= rank and nxt < below + window.numel():
            row, offset = window, below
        else:
            offset = 0
        firsts.append(row.kthvalue(rank - offset + 1).values)
        seconds.append(row.kthvalue(nxt - offset + 1).values)
    return torch.stack(firsts), torch.stack(seconds)


def _symmetric_order_stats(m: Tensor, lo: int, hi: int, sync_free: bool) -> tuple[Tensor, Tensor]:
    """Values at 0-based ranks lo <= hi = lo or lo + 1 of all C*C entries of symmetric, non-negative,
    zero-diagonal matrices m (B, C, C), read from the strict upper triangle only: the sorted matrix is C
    zeros followed by every off-diagonal value twice. Without ``sync_free`` large rows are selected from a
    sampled window (``order_pair``)."""
    B, C, _ = m.shape
    zero = m.new_zeros(B)
    if hi < C:
        return zero, zero
    upper = upper_triangle(m)
    r_hi = (hi - C) // 2
    if lo < C:
        return zero, upper.kthvalue(r_hi + 1, dim=1).values
    r_lo = (lo - C) // 2
    if not sync_free and upper.shape[1] >= 2**16:
        a, b = order_pair(upper, r_lo)
        return a, (a if r_hi == r_lo else b)
    a = upper.kthvalue(r_lo + 1, dim=1).values
    return a, (a if r_hi == r_lo else next_value(upper, a, r_lo))


class Radius(NamedTuple):
    """DBSCAN's radius read off squared distances V (module notes). eps: (B,) the percentile of sqrt(V)
    rounded to the features' dtype, as numpy computes it (what is reported); reach: (B,) float64, V at the
    percentile's lower rank (at least ``floor_reach``): a pair is an eps-neighbour iff V <= reach."""

    eps: Tensor
    reach: Tensor


def floor_reach(floor: float, dtype: torch.dtype) -> float:
    """The largest float64 t with t <= f**2 exactly, f = ``floor`` rounded to ``dtype`` (float32 or
    float64): V <= t iff sqrt(V) <= f, for every float64 V. Host arithmetic on a constant (no tensor)."""
    f = float(np.asarray(floor, dtype=np.float32 if dtype == torch.float32 else np.float64))
    t = f * f
    return t if Fraction(t) <= Fraction(f) ** 2 else math.nextafter(t, 0.0)


def with_floor(radius: Radius, floor: float) -> Radius:
    """The radius at least ``floor`` (in the features' units, rounded to eps's dtype): eps clamped, reach
    raised to ``floor_reach``. No host read."""
    if not floor:
        return radius
    return Radius(radius.eps.clamp_min(floor), radius.reach.clamp_min(floor_reach(floor, radius.eps.dtype)))


def radius_from_squared(d2: Tensor, q: float, dtype: torch.dtype, sync_free: bool,
                        alive: Tensor | None = None, diagonal: bool = True) -> Radius:
    """eps and the exact neighbour radius of the distance matrices sqrt(d2), without forming them.

    d2: (B, C, C) float64 squared distances -> Radius(eps (B,) in ``dtype``, reach (B,) float64). eps
    equals ``percentile(d2.sqrt().to(dtype).flatten(1), q)``: rounding a square root is monotone, so the
    order statistics are selected on d2 and only the two selected values are rooted and rounded; reach
    is d2's order statistic at the lower rank (module notes). Only the upper triangle (diagonal
    included) is read. ``alive`` (B, C) bool: of each image's alive x alive block instead (0 where no
    channel is alive; see ``_masked_radius``). ``diagonal=False``: of the off-diagonal entries only
    (``matrix_rank``; 0 where there are none).
    """
    if alive is not None:
        return _masked_radius(d2, alive, q, dtype, diagonal)
    lo, hi, g = matrix_rank(d2.shape[1], float(q), diagonal)
    a2, b2 = _symmetric_order_stats(d2, lo, hi, sync_free)
    a, b = exact_sqrt(a2).to(dtype), exact_sqrt(b2).to(dtype)
    return Radius(a if g == 0.0 else lerp(a, b, g), a2)


def percentile_from_squared(d2: Tensor, q: float, dtype: torch.dtype, sync_free: bool,
                            alive: Tensor | None = None, diagonal: bool = True) -> Tensor:
    """Percentile of the distance matrices sqrt(d2) rounded to ``dtype``: ``radius_from_squared(...).eps``.
    d2: (B, C, C) float64 -> (B,) in ``dtype``."""
    return radius_from_squared(d2, q, dtype, sync_free, alive, diagonal).eps


def _masked_radius(d2: Tensor, alive: Tensor, q: float, dtype: torch.dtype, diagonal: bool = True) -> Radius:
    """Per image, numpy's linear percentile of sqrt(d2) (rounded to ``dtype``) over the n x n block of
    the n alive channels (diagonal included), and its reach (``Radius``), with static shapes: the other
    entries become +inf and sort last, and the ranks are tensors. The block sorted is n zeros, then every
    value of its strict upper triangle twice. d2: (B, C, C) float64; alive: (B, C) bool -> Radius((B,),
    (B,)), 0 where n = 0. One sort of the upper triangle: for the sync-free route (accelerators).
    ``diagonal=False``: over the block's n(n-1) off-diagonal entries (``matrix_rank``), 0 where n < 2."""
    inf = torch.full((), math.inf, dtype=d2.dtype, device=d2.device)
    pair = alive[:, :, None] & alive[:, None, :]
    values = upper_triangle(torch.where(pair, d2, inf)).sort(dim=1).values  # (B, C(C-1)/2)
    n = alive.sum(dim=1)
    n2 = n * n if diagonal else n * (n - 1)  # entries the percentile is taken over
    virtual = (n2 - 1).clamp_min(0).double() * (q / 100.0)  # numpy's rule, in float64 as numpy
    lo = virtual.floor().long()
    hi = torch.minimum(lo + 1, (n2 - 1).clamp_min(0))
    g64 = virtual - lo.double()  # numpy's weight, in float64; 1 - g is formed there too (as ``lerp``)
    g, rest = g64.to(dtype), (1 - g64).to(dtype)
    if not diagonal:  # past the n zeros of the diagonal; no entries (n < 2): a zero
        offset = torch.where(n2 > 0, n, 0)
        lo, hi = lo + offset, hi + offset

    def order_stat(rank: Tensor) -> Tensor:  # squared
        k = ((rank - n) // 2).clamp(0, max(values.shape[1] - 1, 0))
        v = values.gather(1, k[:, None])[:, 0] if values.shape[1] else torch.zeros_like(virtual)
        return torch.where(rank < n, 0.0, v)

    a2 = order_stat(lo)
    a, b = exact_sqrt(a2).to(dtype), exact_sqrt(order_stat(hi)).to(dtype)
    diff = b - a
    out = torch.where(g64 >= 0.5, b - diff * rest, a + diff * g)
    return Radius(torch.where(n > 0, out, torch.zeros_like(out)), torch.where(n > 0, a2, torch.zeros_like(a2)))
