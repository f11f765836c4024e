"""dbscan_ops.py: batched DBSCAN vs scikit-learn on tie-heavy graphs; connected components vs scipy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components as scipy_components
from sklearn.cluster import DBSCAN

import sys

from cfcam_gpu.dbscan_ops import connected_components, dbscan, dbscan_by_search, dbscan_from_adjacency


def sk_labels(dist: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """scikit-learn's labels on a precomputed matrix; eps == 0 emulated as "neighbours = exact duplicates"."""
    if eps == 0:
        return DBSCAN(eps=0.5, min_samples=min_samples, metric="precomputed").fit(
            (dist != 0).astype(np.float64)).labels_
    return DBSCAN(eps=float(eps), min_samples=min_samples, metric="precomputed").fit(dist).labels_


# ----------------------------------------------------------------------------------------------------
# Tie-heavy random graphs.

def _random_integer_matrix(rng, C):
    """Symmetric, zero diagonal, small integer entries (zeros off the diagonal = duplicate points)."""
    top = int(rng.integers(1, 6))
    d = rng.integers(0, top + 1, size=(C, C)).astype(np.float64)
    if rng.random() < 0.5:
        d[d == 0] = 1  # keep some matrices free of off-diagonal zeros
    d = np.triu(d, 1)
    return d + d.T


def _grid_points_matrix(rng, C):
    """Manhattan distances of integer points in a few blobs on a small grid: clusters, border points, ties."""
    dim = int(rng.integers(1, 3))
    n_blobs = int(rng.integers(1, 4))
    centres = rng.integers(0, 12, size=(n_blobs, dim))
    pts = centres[rng.integers(0, n_blobs, size=C)] + rng.integers(-2, 3, size=(C, dim))
    return np.abs(pts[:, None, :] - pts[None, :, :]).sum(-1).astype(np.float64)


def _two_cluster_border_matrix(rng, C):
    """Two dense 1-D groups with a shared border point between them, then random extra points, permuted.

    Positions 0,0,1,1,2 | 4 | 6,7,7,8,8 with eps = 2, min_samples = 4: the point at 4 has 3 neighbours
    (2, 4, 6), is not core, and touches one core point of each cluster.
    """
    pos = [0, 0, 1, 1, 2, 4, 6, 7, 7, 8, 8]
    extra = max(0, C - len(pos))
    pos = np.array(pos + list(rng.integers(-10, 20, size=extra)))[:max(C, len(pos))]
    pos = pos[rng.permutation(len(pos))]
    return np.abs(pos[:, None] - pos[None, :]).astype(np.float64)


GENERATORS = [_random_integer_matrix, _grid_points_matrix, _two_cluster_border_matrix]


def _eps_from_values(rng, d):
    """An eps equal to an existing distance most of the time (ties at the threshold), else in between."""
    vals = np.unique(d)
    e = float(rng.choice(vals))
    if rng.random() < 0.2:
        e += 0.5
    return e if e > 0 else 1.0


def test_dbscan_matches_sklearn_on_tie_heavy_random_graphs(device):
    rng = np.random.default_rng(2024)
    n_items = 0
    for call in range(70):
        gen = GENERATORS[call % len(GENERATORS)]
        C = int(rng.integers(1, 61)) if gen is not _two_cluster_border_matrix else int(rng.integers(11, 40))
        B = int(rng.integers(1, 6))
        mats = np.stack([gen(rng, C) for _ in range(B)])
        C = mats.shape[1]
        min_samples = 4 if gen is _two_cluster_border_matrix and call % 2 else int(rng.integers(1, 8))
        if gen is _two_cluster_border_matrix and call % 2:
            eps = np.full(B, 2.0)
        else:
            eps = np.array([_eps_from_values(rng, m) for m in mats])
        labels = dbscan(torch.from_numpy(mats).to(device), torch.from_numpy(eps).to(device), min_samples)
        assert labels.dtype == torch.int64 and labels.shape == (B, C)
        for b in range(B):
            expected = sk_labels(mats[b], eps[b], min_samples)
            assert np.array_equal(labels[b].cpu().numpy(), expected), (call, b, C, eps[b], min_samples)
            n_items += 1
    assert n_items >= 200


def _search_labels(d: np.ndarray, eps: float, min_samples: int) -> torch.Tensor:
    adj = torch.from_numpy(d <= eps) if eps > 0 else torch.from_numpy(d == 0)
    adj.diagonal().fill_(True)
    return dbscan_by_search(adj, adj.sum(dim=1), min_samples)


def test_dbscan_by_search_matches_sklearn_on_tie_heavy_random_graphs():
    """The CPU route's breadth-first search: scikit-learn's labels on every generator, border points and
    clusters numbered as scikit-learn numbers them."""
    rng = np.random.default_rng(2025)
    for call in range(90):
        gen = GENERATORS[call % len(GENERATORS)]
        d = gen(rng, int(rng.integers(1, 61)) if gen is not _two_cluster_border_matrix else int(rng.integers(11, 40)))
        min_samples = int(rng.integers(1, 8))
        eps = _eps_from_values(rng, d)
        got = _search_labels(d, eps, min_samples)
        assert got.dtype == torch.int64
        assert np.array_equal(got.numpy(), sk_labels(d, eps, min_samples)), (call, eps, min_samples)


def test_dbscan_by_search_hands_many_small_clusters_to_the_dense_rounds(monkeypatch):
    """Many small clusters take a search step each: past MAX_SEARCH_STEPS the dense rounds finish the job
    (the spy proves that path ran), with scikit-learn's labels all the same."""
    pos = np.repeat(np.arange(0, 400, 10), 3)[np.random.default_rng(3).permutation(120)]  # 40 clusters of 3
    d = np.abs(pos[:, None] - pos[None, :]).astype(np.float64)
    module = sys.modules["cfcam_gpu.dbscan_ops"]
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return dbscan_from_adjacency(*args)

    monkeypatch.setattr(module, "MAX_SEARCH_STEPS", 8)
    monkeypatch.setattr(module, "dbscan_from_adjacency", spy)
    got = _search_labels(d, 1.0, 3)
    assert calls == [(1, 120, 120)]
    assert np.array_equal(got.numpy(), sk_labels(d, 1.0, 3))
    assert int(got.max()) == 39


def test_dbscan_border_point_joins_smallest_cluster(device):
    """The explicit border case: the point at 4 joins the smallest-numbered of its two clusters."""
    pos = np.array([6, 7, 7, 8, 8, 4, 0, 0, 1, 1, 2])  # cluster of 6..8 gets the smaller number (index 0)
    d = np.abs(pos[:, None] - pos[None, :]).astype(np.float64)
    expected = sk_labels(d, 2.0, 4)
    assert expected.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    got = dbscan(torch.from_numpy(d)[None].to(device), 2.0, 4)[0].cpu().numpy()
    assert np.array_equal(got, expected)
    # reversed order: now the 0..2 group is cluster 0, and the border point follows it
    d_rev = d[::-1, ::-1].copy()
    expected_rev = sk_labels(d_rev, 2.0, 4)
    got_rev = dbscan(torch.from_numpy(d_rev)[None].to(device), 2.0, 4)[0].cpu().numpy()
    assert np.array_equal(got_rev, expected_rev)
    assert got_rev.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]


def test_dbscan_scalar_eps_float32_and_batch_independence(device):
    rng = np.random.default_rng(7)
    mats = np.stack([_grid_points_matrix(rng, 37) for _ in range(6)])
    together = dbscan(torch.from_numpy(mats).float().to(device), 3.0, 3).cpu()
    for b in range(6):
        alone = dbscan(torch.from_numpy(mats[b:b + 1]).float().to(device), 3.0, 3).cpu()
        assert torch.equal(together[b], alone[0])
        assert np.array_equal(together[b].numpy(), sk_labels(mats[b], 3.0, 3))


def test_dbscan_eps_zero_means_exact_duplicates(device):
    rng = np.random.default_rng(99)
    for C in (1, 2, 3, 10, 31, 60):
        B = 4
        mats = np.stack([_random_integer_matrix(rng, C) for _ in range(B)])
        for min_samples in (1, 2, 3, 5):
            got = dbscan(torch.from_numpy(mats).to(device), 0.0, min_samples).cpu().numpy()
            for b in range(B):
                assert np.array_equal(got[b], sk_labels(mats[b], 0.0, min_samples)), (C, min_samples, b)
    with pytest.raises(ValueError):  # what the emulation works around
        DBSCAN(eps=0.0, min_samples=2, metric="precomputed").fit(np.zeros((3, 3)))


def test_dbscan_bad_inputs():
    d = torch.zeros(2, 4, 4)
    with pytest.raises(ValueError, match="dist"):
        dbscan(torch.zeros(4, 4), 1.0, 2)
    with pytest.raises(ValueError, match="dist"):
        dbscan(torch.zeros(2, 4, 5), 1.0, 2)
    with pytest.raises(TypeError, match="dist"):
        dbscan(np.zeros((2, 4, 4)), 1.0, 2)
    for bad in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="min_samples"):
            dbscan(d, 1.0, bad)
    with pytest.raises(ValueError, match="eps"):
        dbscan(d, torch.ones(3), 2)
    with pytest.raises(ValueError, match="eps"):
        dbscan(d, torch.ones(2, 1), 2)


# ----------------------------------------------------------------------------------------------------
# Connected components.

def _min_index_components(adj: np.ndarray) -> np.ndarray:
    n, lab = scipy_components(csr_matrix(adj), directed=False)
    mins = np.array([np.flatnonzero(lab == k).min() for k in range(n)])
    return mins[lab]


def test_connected_components_vs_scipy(device):
    rng = np.random.default_rng(5)
    for C in (1, 2, 3, 8, 17, 40, 64):
        for p in (0.0, 0.02, 0.08, 0.3):
            B = 3
            a = rng.random(size=(B, C, C)) < p
            a = np.triu(a, 1)
            a = a | np.swapaxes(a, 1, 2)
            got = connected_components(torch.from_numpy(a).to(device)).cpu().numpy()
            for b in range(B):
                assert np.array_equal(got[b], _min_index_components(a[b])), (C, p, b)


def test_connected_components_sync_free_path(device):
    """The fixed-round (no host sync) variant used on accelerators gives the same components."""
    rng = np.random.default_rng(15)
    for C in (2, 9, 40, 64):
        a = rng.random(size=(4, C, C)) < 0.05
        a = np.triu(a, 1)
        a = a | np.swapaxes(a, 1, 2)
        at = torch.from_numpy(a).to(device)
        free = connected_components(at, sync_free=True).cpu().numpy()
        synced = connected_components(at, sync_free=False).cpu().numpy()
        assert np.array_equal(free, synced)
        for b in range(4):
            assert np.array_equal(free[b], _min_index_components(a[b]))


def test_connected_components_long_permuted_paths(device):
    """Worst case for label propagation: long chains visited in random order."""
    rng = np.random.default_rng(6)
    C = 60
    mats = []
    for split in (60, 30, 17):
        order = rng.permutation(C)
        a = np.zeros((C, C), bool)
        for k in range(C - 1):
            if (k + 1) % split:  # break the chain every `split` nodes
                a[order[k], order[k + 1]] = a[order[k + 1], order[k]] = True
        mats.append(a)
    a = np.stack(mats)
    for sync_free in (False, True):
        got = connected_components(torch.from_numpy(a).to(device), sync_free=sync_free).cpu().numpy()
        for b in range(len(mats)):
            assert np.array_equal(got[b], _min_index_components(a[b]))
