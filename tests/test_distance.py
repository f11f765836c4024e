"""distance.py: float64-accumulated pairwise distances."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from cfcam_gpu.distance import gram_squared_distances, mirror_upper, pairwise_distances, squared_distances

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


def test_mirror_upper_is_symmetric_and_keeps_the_upper_triangle(device):
    m = torch.randn(2, 9, 9, device=device)  # not symmetric
    out = mirror_upper(m)
    iu = torch.triu_indices(9, 9, device=device)
    assert torch.equal(out, out.transpose(1, 2))
    assert torch.equal(out[:, iu[0], iu[1]], m[:, iu[0], iu[1]])
    adj = mirror_upper(m > 0)
    assert adj.dtype == torch.bool and torch.equal(adj, adj.transpose(1, 2))


def test_squared_distances_exact_on_near_duplicates(device):
    """V = sum (x_i - x_j)**2 in float64 for every pair: no Gram cancellation between near-duplicates
    (the Gram formula is off by ~N 2**-53 (n_i + n_j), here far above the distance itself)."""
    g = np.random.default_rng(3)
    protos = g.standard_normal((3, 36)) * 100
    x = protos[g.integers(0, 3, size=12)] + 1e-7 * g.standard_normal((12, 36))
    d2 = squared_distances(torch.from_numpy(x)[None].to(device))[0].cpu().numpy()
    ref = np.array([[math.fsum((x[i] - x[j]) ** 2) for j in range(12)] for i in range(12)])
    np.testing.assert_allclose(d2, ref, rtol=1e-14, atol=0)
    assert np.array_equal(d2, d2.T) and (np.diag(d2) == 0).all()
    gram = gram_squared_distances(torch.from_numpy(x)[None])[0].numpy()
    assert np.abs(gram - ref).max() > 1e-3 * ref[ref > 0].min()  # what the Gram matrix would give
