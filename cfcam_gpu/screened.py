"""The CPU route for float32 features: eps and the eps-neighbour relation from float32 distances,
screened with a proven error bound and refined exactly where that bound could change an answer.

On the CPU every pass over a (C, C) matrix is memory-bound, and a float64 Gram matrix costs twice the
float32 one in arithmetic and in traffic. Here, per image:

1. ``d~[i, j] = n_i + n_j - 2 <x_i, x_j>`` as one float32 matrix product of the augmented rows
   ``[x_i, n_i, 1] . [-2 x_j, 1, n_j]`` (n: float64 squared norms rounded to float32). The exact squared
   distance E[i, j] satisfies ``|d~ - E| <= delta[i, j] = (N + 8) 2**-22 (n_i + n_j)`` (+ an underflow
   term): a float32 dot product of length N + 2, in any summation order, FMA or not, errs by at most
   ``gamma_(N+2)`` times the sum of its terms' magnitudes (Higham, Accuracy and Stability of Numerical
   Algorithms, 2nd ed., eq. 3.5), here ``<= 2 (n_i + n_j)``, and rounding the norms adds
   ``2**-24 (n_i + n_j)``: ``(N + 2.5) 2**-23 (n_i + n_j)`` in all; ``delta`` is twice that.
   ``Delta = max delta`` over the image bounds every entry.
2. The true values are ``V[i, j] = sum_k (x_ik - x_jk)**2`` in float64: exactly symmetric, exactly 0
   between identical channels, within ``N 2**-53 E`` of E (inside delta's spare half).
3. Order statistics. A strided sample of d~ brackets the two ranks of the percentile in [lo_v, hi_v]
   (widened by 3 Delta). One sweep after the product (``split_at_bracket``) marks the entries below
   lo_v (the neighbour mask to be), counts them per row, and extracts the bracket (a few % of C*C) with
   indices and values. Let s_lo <= s_hi be the order statistics of d~. Since d~ - delta <= V <= d~ +
   delta entry by entry, V's rank-th lies between the rank-th of d~ - delta and of d~ + delta, and
   within Delta of d~'s rank-th (the same with Delta for every delta). Entries more than 2 Delta from
   [s_lo, s_hi] cannot move either, so bounds are computed only for the few thousand within: V's order
   statistics lie in [L, H], L = max(rank-th of d~ - delta, s_lo - Delta), H = min(rank-th of d~ +
   delta, s_hi + Delta), and every entry left out lies outside [L, H] in V. Entries with
   ``d~ + delta < L`` are below both, entries with ``d~ - delta > H`` above; V is computed for the rest
   (hundreds to a few thousand) and the two ranks read there. When lo_v <= L - Delta and H + Delta <=
   hi_v, the entries outside the bracket are decided too.
4. Neighbours: a pair is a neighbour iff V <= reach, V's order statistic at the lower rank
   (``percentile_ops.Radius``: exactly ``d <= eps``, ties at eps included; at least the floor's reach).
   Every entry below lo_v is a neighbour (lo_v <= reach - Delta) and every entry above hi_v is not, so
   the mask of step 3 becomes the adjacency in place: the bracket's entries with ``d~ <= reach`` are
   added, except those within delta of reach, which take ``V <= reach``; an entry further away lies on
   the same side in V. When reach +- Delta lies inside the bracket, those entries are all among the
   extracted ones (the reach of step 3 lies in [L, H], so it does; a floor's reach may not: decline).
So eps and the neighbour relation are exactly those of V, for every image.

The same screen in float64 (``precision=torch.float64``: float64 features, and float32 images the
float32 screen declined): d~ is one float64 product of the augmented rows with float64 norms, and
``|d~ - V| <= delta = (8 N + 16) 2**-53 (n_i + n_j)`` (+ an underflow term): the dot product errs by at
most ``gamma_(N+2) 2 (n_i + n_j)`` (as above, u = 2**-53), the float64 norms by ``gamma_N (n_i + n_j)``,
and V itself (float64 differences, squares and sum of float64 features) by ``gamma_(N+3) E <= gamma_(N+3)
2 (n_i + n_j)``: ``(5 N + 10) u (n_i + n_j)`` to first order, well inside delta. The rest of the
argument is unchanged; eps is rounded to the features' dtype.

Where a precondition fails (the strided-sample bracket misses the order statistics, non-finite or huge
values, float32 matrix products allowed to run in reduced precision) the image returns ``None`` and the
caller uses the float64 route; ``tests/test_screened.py`` forces each of these.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .dbscan_ops import row_counts
from .distance import exact_sqrt, sum_squared_differences
from .percentile_ops import Radius, lerp, matrix_rank, order_pair, sampled_bracket, with_floor

# Squared norms above this could overflow the screen's products: decline (the caller goes on).
MAX_NORM = {torch.float32: 2.0**100, torch.float64: 2.0**1000}


def float32_matmul_is_ieee() -> bool:
    """False when PyTorch may run float32 matrix products in TF32/bf16 (``set_float32_matmul_precision``
    below "highest", or the fp32_precision backend settings): the error bound would not hold."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    settings = [getattr(torch.backends, "fp32_precision", "none")]
    mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)
    settings.append(getattr(mkldnn_matmul, "fp32_precision", "none"))
    return all(s in ("none", "ieee") for s in settings)


def screening_bounds(norms: Tensor, i: Tensor, j: Tensor, N: int,
                     precision: torch.dtype = torch.float32) -> Tensor:
    """delta[i, j] >= |d~[i, j] - V[i, j]| (module notes) for a screen in ``precision``.
    norms: (C,) float64; i, j: (M,) -> (M,)."""
    if precision == torch.float64:
        return (norms[i] + norms[j]).mul_((8 * N + 16) * 2.0**-53).add_((8 * N + 16) * 2.0**-1070)
    return (norms[i] + norms[j]).mul_((N + 8) * 2.0**-22).add_((N + 2) * 2.0**-140)


def exact_squared_distances(x64: Tensor, flat_idx: Tensor) -> Tensor:
    """V at flat indices i * C + j. x64: (C, N) float64; flat_idx: (M,) int64 -> (M,) float64."""
    C = x64.shape[0]
    return sum_squared_differences(x64[flat_idx // C], x64[flat_idx % C])


def screened_squared_distances(x: Tensor, norms: Tensor, out: Tensor | None = None) -> Tensor:
    """d~ = n_i + n_j - 2 <x_i, x_j> in x's dtype, one matrix product with no pass to form it.

    x: (C, N) float32 (or float64); norms: (C,) float64 -> (C, C) in x's dtype, written to ``out`` when
    given (one buffer for all the images of a batch).
    """
    n, ones = norms.to(x.dtype)[:, None], x.new_ones(x.shape[0], 1)
    return torch.mm(torch.cat([x, n, ones], dim=1), torch.cat([x * -2, ones, n], dim=1).T, out=out)


def _count(mask: Tensor) -> int:
    """Number of True in a bool tensor (``count_nonzero``: 2-4x faster than a bool ``sum`` over a C*C mask
    at C = 2048, ``python -m bench.cpu_passes``)."""
    return int(torch.count_nonzero(mask))


class Screened(NamedTuple):
    """One image's screen and the part of it near the percentile (module notes, 3).

    x64: (C, N) float64 features; norms: (C,) their squared norms; below: (C, C) bool, d~ < lo_v
    (``screened_adjacency`` turns it into the adjacency in place); below_rows: (C,) int64 its row counts;
    lo_v, hi_v: the bracket (values of the screen's dtype); n_below: entries under lo_v; idx: (M,)
    ascending flat indices of the bracket's entries, vals: (M,) their d~ (the screen's dtype); Delta: the
    image's largest bound; dtype: the features' dtype (eps is rounded to it); precision: the screen's.
    """

    dtype: torch.dtype
    precision: torch.dtype
    x64: Tensor
    norms: Tensor
    below: Tensor
    below_rows: Tensor
    lo_v: float
    hi_v: float
    n_below: int
    idx: Tensor
    vals: Tensor
    Delta: float

    def bounds(self, flat_idx: Tensor) -> Tensor:
        """delta at flat indices (M,) -> (M,) float64 (``screening_bounds``)."""
        C, N = self.x64.shape
        return screening_bounds(self.norms, flat_idx // C, flat_idx % C, N, self.precision)

    def near(self, lo: float, hi: float) -> tuple[int, Tensor]:
        """(entries with d~ < lo, positions (K,) in idx/vals of those with lo <= d~ <= hi), the bounds
        moved outward past any rounding to the screen's dtype: the count may miss a few, the positions
        may hold a few more."""
        under = self.vals < _widen(lo, -1)
        return _count(under), ((self.vals <= _widen(hi, 1)) & ~under).nonzero().squeeze(1)


def _widen(v: float, side: int) -> float:
    """v moved outward by 2**-20 of its magnitude (past float32 rounding) on ``side`` (-1 down, +1 up)."""
    return v + side * abs(v) * 2.0**-20


def screen(x: Tensor, q: float, out: Tensor | None = None, precision: torch.dtype | None = None,
           diagonal: bool = True, mask: Tensor | None = None) -> Screened | None:
    """Distances stage: d~ for one image, the entries below its q-th percentile's bracket and the
    bracket itself (module notes, 3).

    x: (C, N) float32 or float64 -> Screened, or None when a precondition fails (the caller goes on).
    out: an optional (C, C) buffer in ``precision`` for d~; mask: an optional (C, C) bool buffer (the
    result's ``below`` is it); one of each serves all the images of a batch. precision: the screen's
    dtype, float32 or float64 (None: x's dtype). ``diagonal``: as ``percentile_ops.matrix_rank`` (False: the
    percentile of the off-diagonal entries).
    """
    C, N = x.shape
    precision = x.dtype if precision is None else precision
    x64 = x.double()
    norms = x64.square().sum(dim=1)
    if precision == torch.float32 and not float32_matmul_is_ieee():
        return None
    if not bool(norms.max() <= MAX_NORM[precision]):  # also catches NaN
        return None
    flat = screened_squared_distances(x.to(precision), norms, out).view(-1)
    top = norms.argmax()
    Delta = float(screening_bounds(norms, top, top, N, precision))
    lo, hi, _ = matrix_rank(C, q, diagonal)
    lo_v, hi_v = sampled_bracket(flat, (lo, hi), width=C)
    # 3 Delta more on each side: the windows of screened_percentile and screened_adjacency then fit
    # whenever the sample bracketed the ranks (module notes, 3 and 4).
    lo_v, hi_v = (float(torch.tensor(v, dtype=torch.float64).to(precision))  # exactly what is compared
                  for v in (lo_v - 3 * Delta, hi_v + 3 * Delta))
    below = torch.empty(C, C, dtype=torch.bool, device=x.device) if mask is None else mask
    below_rows, idx, vals = split_at_bracket(flat.view(C, C), lo_v, hi_v, below)
    return Screened(x.dtype, precision, x64, norms, below, below_rows, lo_v, hi_v, int(below_rows.sum()),
                    idx, vals, Delta)


# The split reads d~ this many bytes of rows at a time: its comparisons, extraction and counts then find
# each block in the core's cache after the first pass brought it in (``python -m bench.cpu_passes``).
SPLIT_BLOCK_BYTES = 2**19


def _split_rows(d: np.ndarray, lo_v, hi_v, below: np.ndarray, r0: int, r1: int):
    """Rows r0:r1 of ``split_at_bracket``, a cache-sized block at a time (NumPy, which lets other threads
    run meanwhile) -> (row counts, flat indices, values)."""
    C = d.shape[1]
    step = max(1, SPLIT_BLOCK_BYTES // (C * d.itemsize))
    inside = np.empty((min(step, r1 - r0), C), dtype=bool)
    count_dtype = np.int16 if C < 2**15 else np.int32
    counts, idx, vals = [], [], []
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        rows, low, ins = d[a:b], below[a:b], inside[:b - a]
        np.less(rows, lo_v, out=low)
        np.less_equal(rows, hi_v, out=ins)
        np.bitwise_xor(ins, low, out=ins)  # lo_v <= d~ <= hi_v
        i = np.flatnonzero(ins)
        counts.append(low.view(np.uint8).sum(axis=1, dtype=count_dtype))
        idx.append(i + a * C)
        vals.append(rows.reshape(-1).take(i))
    return counts, idx, vals


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (process id, workers): a forked child makes its own


def split_by_passes(d: Tensor, lo_v: float, hi_v: float, below: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``split_at_bracket`` as whole-matrix torch passes, on any device (what the NumPy sweep replaced on
    the CPU)."""
    flat = d.view(-1)
    torch.lt(flat, lo_v, out=below.view(-1))
    idx = torch.le(flat, hi_v).bitwise_xor_(below.view(-1)).nonzero().squeeze(1)
    return row_counts(below).long(), idx, flat.index_select(0, idx)


def split_at_bracket(d: Tensor, lo_v: float, hi_v: float, below: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The one pass over d~ after the product: ``below`` (C, C) bool <- d~ < lo_v, and the bracket.

    d: (C, C) float32/64 on the CPU; lo_v, hi_v: values of d's dtype -> (row counts of ``below`` (C,)
    int64, ascending flat indices (M,) of the entries with lo_v <= d~ <= hi_v, their values (M,)).
    NumPy's comparisons, ``flatnonzero`` and ``take`` on cache-sized row blocks, the rows shared among
    ``torch.get_num_threads()`` threads (``python -m bench.cpu_passes``, pairs ``split`` and ``sweep``).
    """
    C = d.shape[0]
    if d.device.type != "cpu":  # (``sync_free=False`` on an accelerator): the same passes in torch
        return split_by_passes(d, lo_v, hi_v, below)
    dn, bn = d.numpy(), below.numpy()
    lo, hi = dn.dtype.type(lo_v), dn.dtype.type(hi_v)
    workers = max(1, min(torch.get_num_threads(), C // 64))
    if workers == 1:
        parts = [_split_rows(dn, lo, hi, bn, 0, C)]
    else:
        key = (os.getpid(), workers)
        if key not in _POOLS:
            _POOLS[key] = ThreadPoolExecutor(workers, thread_name_prefix="cfcam-split")
        step = -(-C // workers)
        parts = list(_POOLS[key].map(lambda r0: _split_rows(dn, lo, hi, bn, r0, min(C, r0 + step)),
                                     range(0, C, step)))
    counts, idx, vals = (np.concatenate([piece for p in parts for piece in p[k]]) for k in range(3))
    return torch.from_numpy(counts.astype(np.int64)), torch.from_numpy(idx), torch.from_numpy(vals)


def screened_percentile(sc: Screened, q: float, diagonal: bool = True) -> Radius | None:
    """Percentile stage: the q-th percentile (numpy's linear rule) of the C*C entries of sqrt(V) rounded
    to the features' dtype, exactly, and the exact neighbour radius (module notes, 3);
    ``diagonal=False``: of the off-diagonal entries (``percentile_ops.matrix_rank``). -> Radius(eps () in that
    dtype, reach () float64), or None (decline)."""
    lo, hi, g = matrix_rank(sc.x64.shape[0], q, diagonal)
    below, vals, Delta = sc.n_below, sc.vals, sc.Delta
    if not (below <= lo and hi < below + vals.numel()):
        return None
    s_lo, s_next = order_pair(vals[None], lo - below)
    s_lo, s_hi = float(s_lo), float(s_lo if hi == lo else s_next)
    # Every bound is at most Delta: entries more than 2 Delta from [s_lo, s_hi] are on the same side of
    # V's order statistics as of d~'s; the others (``cand``) get their own bounds.
    under, cand = sc.near(s_lo - 2 * Delta, s_hi + 2 * Delta)
    below += under
    if not (below <= lo and hi < below + cand.numel()):
        return None
    ci, cv = sc.idx.index_select(0, cand), vals.index_select(0, cand).double()
    delta = sc.bounds(ci)
    # V's order statistics lie between those of d~ - delta and of d~ + delta, and within Delta of d~'s
    # (module notes, 3): the entries left out of ``cand`` stay outside [L, H].
    L = max(float((cv - delta).kthvalue(lo - below + 1).values), s_lo - Delta)
    H = min(float((cv + delta).kthvalue(hi - below + 1).values), s_hi + Delta)
    if not (sc.lo_v <= L - Delta and H + Delta <= sc.hi_v):
        return None
    window = (cv + delta >= L) & (cv - delta <= H)
    below += _count(cv + delta < L)
    exact = exact_squared_distances(sc.x64, ci.index_select(0, window.nonzero().squeeze(1)))
    if not (below <= lo and hi < below + exact.numel()):
        return None
    a = exact.kthvalue(lo - below + 1).values
    b = a if hi == lo else exact.kthvalue(hi - below + 1).values
    if not (L <= a and b <= H):  # proven (module notes, 3); a cheap guard all the same
        return None
    eps_a, eps_b = exact_sqrt(a).to(sc.dtype), exact_sqrt(b).to(sc.dtype)
    return Radius(eps_a if g == 0.0 else lerp(eps_a, eps_b, g), a)


class Neighbours(NamedTuple):
    """eps () in the features' dtype; adj (C, C) bool, symmetric, true diagonal; counts (C,) int64 its
    row counts (each channel's neighbours, itself included)."""

    eps: Tensor
    adj: Tensor
    counts: Tensor


def screened_adjacency(sc: Screened, radius: Radius) -> Neighbours | None:
    """Neighbours stage: adj = V <= radius.reach, exactly (module notes, 4), made in place of
    ``sc.below`` (every entry below lo_v is a neighbour, every entry above hi_v is not); the row counts
    come with it. None: decline."""
    threshold = float(radius.reach)
    if not (sc.lo_v <= threshold - sc.Delta and threshold + sc.Delta <= sc.hi_v):
        return None
    C = sc.x64.shape[0]
    near = sc.vals <= threshold
    _, pos = sc.near(threshold - sc.Delta, threshold + sc.Delta)  # every entry within its delta, and more
    gap = (sc.vals.index_select(0, pos).double() - threshold).abs_()
    band = pos[gap <= sc.bounds(sc.idx.index_select(0, pos))]
    near[band] = exact_squared_distances(sc.x64, sc.idx.index_select(0, band)) <= threshold
    chosen = sc.idx.index_select(0, near.nonzero().squeeze(1))  # ascending
    adj = sc.below
    adj.view(-1).index_fill_(0, chosen, True)
    row_starts = torch.arange(0, C * C + 1, C, device=chosen.device)
    counts = sc.below_rows + torch.searchsorted(chosen, row_starts).diff()
    diagonal = adj.diagonal()
    counts += (~diagonal).long()
    diagonal.fill_(True)
    return Neighbours(radius.eps, adj, counts)


def screened_neighbours(x: Tensor, q: float, out: Tensor | None = None,
                        precision: torch.dtype | None = None, diagonal: bool = True,
                        floor: float = 0.0, mask: Tensor | None = None) -> Neighbours | None:
    """eps and the eps-neighbour relation of one image's channels, exact for V (see the module notes).

    x: (C, N) float32 or float64 -> Neighbours (eps () in x's dtype, adj (C, C) bool, counts (C,)); see
    ``screened_percentile`` and ``screened_adjacency``; ``out``, ``precision``, ``diagonal`` and ``mask``
    (then the adjacency) as in ``screen``; eps is at least ``floor`` (rounded to x's dtype). None when a
    precondition fails: the caller goes on (a float64 screen, then every pair exactly).
    """
    sc = screen(x, q, out, precision, diagonal, mask)
    radius = None if sc is None else screened_percentile(sc, q, diagonal)
    return None if radius is None else screened_adjacency(sc, with_floor(radius, floor))
