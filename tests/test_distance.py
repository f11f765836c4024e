"""distance.py: numpy-exact percentiles and float64-accumulated pairwise distances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cfcam_gpu.distance import (pairwise_distances, percentile, percentile_from_squared, percentile_of_distances,
                                squared_distances)

SIZES = [1, 2, 3, 4, 5, 7, 8, 16, 100, 101, 1000, 1001]
QS = [0, 25, 50, 99.9, 100, 12.5, 33.3, 75]
DTYPES = [np.float32, np.float64]


def _rows(rng, n, dtype, kind):
    if kind == "normal":
        return rng.normal(size=(4, n)).astype(dtype)
    if kind == "ties":  # few distinct values: every interpolation lands between equal neighbours somewhere
        return (rng.integers(0, 4, size=(4, n)) * 0.1).astype(dtype)
    if kind == "zeros_heavy":  # like distance matrices of dead channels
        x = np.abs(rng.normal(size=(4, n))).astype(dtype)
        x[rng.random(size=x.shape) < 0.6] = 0
        return x
    raise AssertionError(kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "zeros_heavy"])
def test_percentile_equals_numpy_exactly(device, rng, dtype, kind):
    for n in SIZES:
        x = _rows(rng, n, dtype, kind)
        xt = torch.from_numpy(x).to(device)
        for q in QS:
            ours = percentile(xt, q)
            assert ours.dtype == xt.dtype and ours.shape == (x.shape[0],)
            expected = np.array([np.percentile(row, q) for row in x])
            assert expected.dtype == dtype
            got = ours.cpu().numpy()
            assert np.array_equal(got, expected), (n, q, got, expected)


def test_percentile_large_magnitudes_and_negative(device, rng):
    x = np.concatenate([rng.normal(size=(3, 57)) * 1e6, -np.abs(rng.normal(size=(3, 57)))], axis=1)
    for dtype in DTYPES:
        xd = x.astype(dtype)
        for q in (0, 1, 25, 50, 99.9, 100):
            got = percentile(torch.from_numpy(xd).to(device), q).cpu().numpy()
            assert np.array_equal(got, np.percentile(xd, q, axis=1))


@pytest.mark.parametrize("bad_q", [-1, 100.5, 1e3])
def test_percentile_rejects_q_out_of_range(bad_q):
    with pytest.raises(ValueError, match="q"):
        percentile(torch.zeros(2, 3), bad_q)


def test_percentile_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        percentile(torch.zeros(2, 3, 4), 25)
    with pytest.raises(TypeError, match="x"):
        percentile(torch.zeros(2, 3, dtype=torch.int64), 25)
    with pytest.raises(TypeError, match="x"):
        percentile(np.zeros((2, 3)), 25)
    with pytest.raises(ValueError, match="x"):
        percentile(torch.zeros(2, 0), 25)


def _symmetric_distances(rng, B, C, dtype, ties: bool):
    if ties:
        d = rng.integers(0, 4, size=(B, C, C)).astype(dtype)
    else:
        d = np.abs(rng.normal(size=(B, C, C))).astype(dtype)
    d = np.triu(d, 1)
    d = d + np.swapaxes(d, 1, 2)
    assert (d == np.swapaxes(d, 1, 2)).all() and (np.diagonal(d, axis1=1, axis2=2) == 0).all()
    return d


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_percentile_of_distances_equals_full_percentile(device, rng, dtype, ties):
    for C in [1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 33, 64]:
        d = torch.from_numpy(_symmetric_distances(rng, 3, C, dtype, ties)).to(device)
        for q in QS:
            ours = percentile_of_distances(d, q)
            full = percentile(d.flatten(1), q)
            assert ours.dtype == d.dtype
            assert torch.equal(ours, full), (C, q, ours, full)
            expected = np.array([np.percentile(m, q) for m in d.cpu().numpy()])
            assert np.array_equal(ours.cpu().numpy(), expected), (C, q)


def test_percentile_of_distances_on_pairwise_distances(device, rng):
    """On the library's own distance matrices (duplicate rows included), both routes agree exactly."""
    x = rng.normal(size=(3, 40, 9)).astype(np.float32)
    x[:, 10:20] = 0  # dead channels: many exact zero distances
    x[:, 25] = x[:, 3]
    d = pairwise_distances(torch.from_numpy(x).to(device))
    for q in QS:
        assert torch.equal(percentile_of_distances(d, q), percentile(d.flatten(1), q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pairwise_distances_vs_scipy(device, rng, dtype):
    x = rng.normal(size=(3, 50, 49)) * rng.uniform(0.1, 10, size=(3, 50, 1))
    x = x.astype(np.float32 if dtype == torch.float32 else np.float64)
    d = pairwise_distances(torch.from_numpy(x).to(device))
    assert d.dtype == dtype and d.shape == (3, 50, 50)
    for b in range(3):
        ref = cdist(x[b].astype(np.float64), x[b].astype(np.float64))
        if dtype == torch.float64:
            np.testing.assert_allclose(d[b].cpu().numpy(), ref, rtol=1e-12, atol=1e-10)
        else:  # computed in float64 and rounded once: within one float32 ulp of the exact distance
            np.testing.assert_allclose(d[b].cpu().numpy(), ref.astype(np.float32), rtol=2e-7, atol=1e-6)
        assert (torch.diagonal(d[b]) == 0).all()
        if dtype == torch.float32:
            assert torch.equal(d[b], d[b].T), "distance matrix must be exactly symmetric"


def test_pairwise_distances_float64_exactly_symmetric():
    x = np.random.default_rng(0).normal(size=(1, 512, 49))
    d = pairwise_distances(torch.from_numpy(x))
    d2 = squared_distances(torch.from_numpy(x))
    # squared_distances (internal) is symmetric up to the Gram matrix's rounding; the public distances
    # and the DBSCAN adjacency built from it are exactly symmetric.
    torch.testing.assert_close(d2, d2.transpose(1, 2), rtol=1e-14, atol=0)
    assert torch.equal(d, d.transpose(1, 2))


def test_pairwise_distances_exact_zero_for_dead_channels(device, rng):
    """All-zero (dead) channels are exact duplicates of each other: distance exactly 0, and > 0 to others."""
    x = rng.normal(size=(2, 30, 25)).astype(np.float32) * 7.3
    x[:, 20:26] = 0
    x[1, 3] = 0
    d = pairwise_distances(torch.from_numpy(x).to(device)).cpu().numpy()
    for b in range(2):
        dup = np.all(x[b][:, None, :] == x[b][None, :, :], axis=2)
        assert np.array_equal(d[b] == 0, dup)


def test_pairwise_distances_exact_zero_for_duplicate_rows(device):
    if device.type != "cpu":
        pytest.skip("the failure is measured on the CPU BLAS")
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(8, 128, 49)) * 3).astype(np.float32)
    for k in range(0, 64, 2):
        x[:, 127 - k] = x[:, k]
    d = pairwise_distances(torch.from_numpy(x).to(device)).cpu().numpy()
    d2 = squared_distances(torch.from_numpy(x).to(device)).cpu().numpy()
    for b in range(8):
        dup = np.all(x[b][:, None, :] == x[b][None, :, :], axis=2)
        assert np.array_equal(d2[b] == 0, dup), np.argwhere((d2[b] == 0) != dup)[:5]
        assert np.array_equal(d[b] == 0, dup), np.argwhere((d[b] == 0) != dup)[:5]


def test_squared_distances_vs_numpy(device, rng):
    x = rng.normal(size=(2, 12, 7))
    d2 = squared_distances(torch.from_numpy(x).to(device)).cpu().numpy()
    ref = ((x[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(d2, ref, rtol=1e-10, atol=1e-12)
    assert (d2 >= 0).all()


def test_distance_bad_inputs():
    with pytest.raises(ValueError, match="x"):
        pairwise_distances(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="x"):
        pairwise_distances(torch.zeros(1, 4, 5, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
def test_percentile_from_squared(device, rng, dtype, ties):
    """Selecting on d2 and rooting only the selected values equals the percentile of the rooted matrix."""
    for C in [1, 2, 3, 4, 5, 8, 9, 31, 64]:
        d2 = torch.from_numpy(_symmetric_distances(rng, 3, C, np.float64, ties) ** 2).to(device)
        for q in QS:
            got = percentile_from_squared(d2, q, dtype)
            assert got.dtype == dtype
            assert torch.equal(got, percentile(d2.sqrt().to(dtype).flatten(1), q)), (C, q)


def test_percentile_from_squared_equals_numpy_on_features(device, rng):
    """The seed's eps for float32 features: numpy.percentile of the float32 cdist matrix, exactly."""
    for C, N in [(33, 49), (64, 49), (50, 196)]:
        x = np.abs(rng.normal(size=(3, C, N))).astype(np.float32)
        x[:, : C // 5] = 0
        got = percentile_from_squared(squared_distances(torch.from_numpy(x).to(device)), 25, torch.float32)
        for b in range(3):
            dist = cdist(x[b].astype(np.float64), x[b].astype(np.float64)).astype(np.float32)
            assert got[b].item() == np.percentile(dist, 25)


@pytest.mark.parametrize("kind", ["random", "sorted", "ties"])
def test_cpu_sampled_selection_is_exact(kind):
    """The CPU selection (sample, bracket, select in the window) equals a full sort, including data
    ordered so the strided sample is biased (sorted rows) and rows with many ties."""
    from cfcam_gpu.distance import _pair_by_sampling

    gen = torch.Generator().manual_seed(3)
    for M in (2**16, 100_003, 2**18):
        v = torch.rand(3, M, dtype=torch.float64, generator=gen)
        if kind == "sorted":
            v = v.sort(dim=1).values
        if kind == "ties":
            v = torch.round(v * 50)
        ref = v.sort(dim=1).values
        for rank in (0, M // 4 - 1, M // 2, M - 2):
            a, b = _pair_by_sampling(v, rank)
            assert torch.equal(a, ref[:, rank]) and torch.equal(b, ref[:, rank + 1]), (M, rank)


def test_mirror_upper_is_symmetric_and_keeps_the_upper_triangle(device):
    from cfcam_gpu.distance import mirror_upper

    m = torch.randn(2, 9, 9, device=device)  # not symmetric
    out = mirror_upper(m)
    iu = torch.triu_indices(9, 9, device=device)
    assert torch.equal(out, out.transpose(1, 2))
    assert torch.equal(out[:, iu[0], iu[1]], m[:, iu[0], iu[1]])
    adj = mirror_upper(m > 0)
    assert adj.dtype == torch.bool and torch.equal(adj, adj.transpose(1, 2))
