"""percentile_ops.py: numpy-exact percentiles, and the percentile of distance matrices from squared distances."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cfcam_gpu.distance import squared_distances
from cfcam_gpu.percentile_ops import percentile, percentile_from_squared

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sync_free", [False, True])
def test_percentile_from_squared(device, rng, dtype, ties, sync_free):
    """Selecting on d2 and rooting only the selected values equals the percentile of the rooted matrix."""
    for C in [1, 2, 3, 4, 5, 8, 9, 31, 64]:
        d2 = torch.from_numpy(_symmetric_distances(rng, 3, C, np.float64, ties) ** 2).to(device)
        for q in QS:
            got = percentile_from_squared(d2, q, dtype, sync_free)
            assert got.dtype == dtype
            assert torch.equal(got, percentile(d2.sqrt().to(dtype).flatten(1), q)), (C, q)


def test_percentile_from_squared_equals_numpy_on_features(device, rng):
    """The seed's eps for float32 features: numpy.percentile of the float32 cdist matrix, exactly."""
    for C, N in [(33, 49), (64, 49), (50, 196)]:
        x = np.abs(rng.normal(size=(3, C, N))).astype(np.float32)
        x[:, : C // 5] = 0
        got = percentile_from_squared(squared_distances(torch.from_numpy(x).to(device)), 25, torch.float32, False)
        for b in range(3):
            dist = cdist(x[b].astype(np.float64), x[b].astype(np.float64)).astype(np.float32)
            assert got[b].item() == np.percentile(dist, 25)


@pytest.mark.parametrize("kind", ["random", "sorted", "ties"])
def test_cpu_sampled_selection_is_exact(kind):
    """The CPU selection (sample, bracket, select in the window) equals a full sort, including data
    ordered so the strided sample is biased (sorted rows) and rows with many ties."""
    from cfcam_gpu.percentile_ops import order_pair

    gen = torch.Generator().manual_seed(3)
    for M in (2**16, 100_003, 2**18):
        v = torch.rand(3, M, dtype=torch.float64, generator=gen)
        if kind == "sorted":
            v = v.sort(dim=1).values
        if kind == "ties":
            v = torch.round(v * 50)
        ref = v.sort(dim=1).values
        for rank in (0, M // 4 - 1, M // 2, M - 2):
            a, b = order_pair(v, rank)
            assert torch.equal(a, ref[:, rank]) and torch.equal(b, ref[:, rank + 1]), (M, rank)


@pytest.mark.parametrize("sync_free", [False, True])
def test_masked_percentile_is_the_percentile_of_the_alive_block(device, rng, sync_free):
    """With ``alive``, each image's percentile is numpy's over its alive x alive block alone."""
    for C in [1, 2, 5, 9, 33]:
        d2 = torch.from_numpy(_symmetric_distances(rng, 4, C, np.float64, True) ** 2).to(device)
        alive = torch.from_numpy(rng.random(size=(4, C)) < 0.7).to(device)
        alive[0] = False  # no alive channel: 0
        for q in QS:
            got = percentile_from_squared(d2, q, torch.float32, sync_free, alive)
            for b in range(4):
                keep = alive[b].cpu().numpy()
                block = np.sqrt(d2[b].cpu().numpy()[np.ix_(keep, keep)]).astype(np.float32)
                expected = np.percentile(block, q) if keep.any() else 0.0
                assert got[b].item() == expected, (C, q, b)


def _off_diagonal(block: np.ndarray) -> np.ndarray:
    return block[~np.eye(block.shape[0], dtype=bool)]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("sync_free", [False, True])
def test_percentile_without_the_diagonal(device, rng, ties, sync_free):
    """diagonal=False (the published CF-CAM's eps): numpy's percentile of the C(C-1) off-diagonal entries,
    0 where there are none (C = 1); unmasked and masked."""
    for C in [1, 2, 3, 4, 5, 8, 9, 31, 64]:
        d2 = torch.from_numpy(_symmetric_distances(rng, 3, C, np.float64, ties) ** 2).to(device)
        alive = torch.from_numpy(rng.random(size=(3, C)) < 0.7).to(device)
        alive[0] = False
        for q in QS:
            got = percentile_from_squared(d2, q, torch.float32, sync_free, diagonal=False)
            got_masked = percentile_from_squared(d2, q, torch.float32, sync_free, alive, diagonal=False)
            for b in range(3):
                full = np.sqrt(d2[b].cpu().numpy()).astype(np.float32)
                values = _off_diagonal(full)
                assert got[b].item() == (np.percentile(values, q) if values.size else 0.0), (C, q, b)
                keep = alive[b].cpu().numpy()
                values = _off_diagonal(full[np.ix_(keep, keep)])
                assert got_masked[b].item() == (np.percentile(values, q) if values.size else 0.0), (C, q, b)
