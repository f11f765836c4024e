"""cluster.py: batched exact DBSCAN vs scikit-learn, connected components vs scipy, the channel rule."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components as scipy_components
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN

from cfcam_gpu import channel_clusters, cluster_channels, dbscan
from cfcam_gpu.cluster import connected_components, seed_min_samples
from cfcam_gpu.reference import cluster_reference


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


# ----------------------------------------------------------------------------------------------------
# Channel clustering: the seed's rule (eps = 25th percentile, min_samples = max(2, int(0.05 C))).

def make_activations(rng, B, C, h, w, dead_frac=0.2, n_protos=4, dtype=np.float32, integer=False):
    """Channels = scaled prototypes + noise (clusters), some far outliers (noise), some all-zero (dead)."""
    N = h * w
    protos = np.abs(rng.normal(size=(B, n_protos, N))) * rng.uniform(1, 5, size=(B, n_protos, 1))
    assign = rng.integers(0, n_protos, size=(B, C))
    x = np.take_along_axis(protos, assign[:, :, None], axis=1)
    x = x + rng.normal(scale=0.3, size=(B, C, N))
    outliers = rng.random(size=(B, C)) < 0.1
    x[outliers] = rng.normal(scale=6, size=(int(outliers.sum()), N))
    x = np.maximum(x, 0)
    if integer:
        x = np.round(x * 2)
    dead = rng.random(size=(B, C)) < dead_frac
    x[dead] = 0
    return x.reshape(B, C, h, w).astype(dtype)


SHAPES = [(7, 7), (4, 4), (5, 4), (4, 6), (14, 14)]


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("C", [32, 63, 64, 101])
def test_cluster_channels_vs_reference_and_plain_sklearn(device, hw, C):
    rng = np.random.default_rng(C * 100 + hw[0] * 10 + hw[1])
    h, w = hw
    B = 3
    acts = make_activations(rng, B, C, h, w)
    res = channel_clusters(torch.from_numpy(acts).to(device))
    assert res.min_samples == max(2, int(0.05 * C)) == seed_min_samples(C)
    assert res.labels.shape == (B, C) and res.labels.dtype == torch.int64
    assert res.eps.dtype == torch.float32
    assert torch.equal(cluster_channels(torch.from_numpy(acts).to(device)), res.labels)
    for b in range(B):
        F_ = acts[b].reshape(C, h * w)
        ref_labels, ref_eps, ref_ms = cluster_reference(F_)
        dist = cdist(F_.astype(np.float64), F_.astype(np.float64)).astype(np.float32)
        assert ref_eps == np.percentile(dist, 25) and ref_eps > 0
        assert res.eps[b].item() == ref_eps, (b, res.eps[b].item(), ref_eps)
        assert np.array_equal(res.labels[b].cpu().numpy(), ref_labels)
        plain = DBSCAN(eps=ref_eps, min_samples=ref_ms).fit(F_).labels_
        assert np.array_equal(res.labels[b].cpu().numpy(), plain)
    assert (res.labels >= 0).any() and (res.labels == -1).any()  # the data has clusters and noise


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cluster_channels_integer_valued_ties(device, dtype):
    """Integer features: many exactly equal distances, eps equal to an existing distance."""
    rng = np.random.default_rng(31 if dtype == np.float32 else 32)
    for C, (h, w) in [(41, (4, 4)), (64, (7, 7)), (50, (3, 6))]:
        acts = make_activations(rng, 4, C, h, w, integer=True, dtype=dtype)
        res = channel_clusters(torch.from_numpy(acts).to(device))
        assert res.eps.dtype == (torch.float32 if dtype == np.float32 else torch.float64)
        for b in range(4):
            F_ = acts[b].reshape(C, h * w)
            ref_labels, ref_eps, ref_ms = cluster_reference(F_)
            if dtype == np.float32:
                assert res.eps[b].item() == ref_eps
            else:  # see test_float64_sqrt_tie_at_eps: torch's CPU float64 sqrt may be 1 ulp off
                assert abs(res.eps[b].item() - ref_eps) <= np.spacing(ref_eps)
            assert np.array_equal(res.labels[b].cpu().numpy(), ref_labels), (C, b)
            if ref_eps > 0:
                plain = DBSCAN(eps=ref_eps, min_samples=ref_ms).fit(F_).labels_
                assert np.array_equal(res.labels[b].cpu().numpy(), plain), (C, b)


def test_float64_sqrt_tie_at_eps(device):
    """Five float64 channels; the closest pair is at distance sqrt(170), which is the 25th percentile.

    Reference and scikit-learn: eps = 13.038404810405298 (correctly rounded), the pair is a cluster.
    """
    F_ = np.zeros((5, 16))
    F_[1, :2] = [13, 1]
    F_[2:, 0] = [100, 200, 300]
    ref_labels, ref_eps, ms = cluster_reference(F_)
    assert ref_labels.tolist() == [0, 0, -1, -1, -1]
    assert DBSCAN(eps=ref_eps, min_samples=ms).fit(F_).labels_.tolist() == [0, 0, -1, -1, -1]
    res = channel_clusters(torch.from_numpy(F_).reshape(1, 5, 4, 4).to(device))
    assert res.eps[0].item() == ref_eps
    assert res.labels[0].tolist() == [0, 0, -1, -1, -1]


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (3, 3)])
def test_cluster_channels_small_maps_vs_reference(device, hw):
    rng = np.random.default_rng(11)
    acts = make_activations(rng, 3, 40, *hw)
    res = channel_clusters(torch.from_numpy(acts).to(device))
    for b in range(3):
        ref_labels, ref_eps, _ = cluster_reference(acts[b].reshape(40, -1))
        assert res.eps[b].item() == ref_eps
        assert np.array_equal(res.labels[b].cpu().numpy(), ref_labels)


def test_cluster_channels_eps_zero_with_dead_channels(device):
    """60% dead channels: over a quarter of the distances are 0, eps = 0, neighbours = exact duplicates."""
    rng = np.random.default_rng(3)
    C = 50
    acts = make_activations(rng, 3, C, 7, 7, dead_frac=0.0)
    for b in range(3):
        acts[b, rng.permutation(C)[:30]] = 0
    acts[1, 7] = acts[1, 9] = acts[1, 11] = acts[1, 3]  # a duplicate group of non-zero channels
    res = channel_clusters(torch.from_numpy(acts).to(device))
    assert (res.eps == 0).all()
    for b in range(3):
        F_ = acts[b].reshape(C, -1)
        ref_labels, ref_eps, ms = cluster_reference(F_)
        assert ref_eps == 0
        got = res.labels[b].cpu().numpy()
        assert np.array_equal(got, ref_labels)
        dead = ~F_.any(axis=1)
        assert len(set(got[dead].tolist())) == 1 and got[dead][0] >= 0  # the dead channels: one cluster
        with pytest.raises(ValueError):
            DBSCAN(eps=ref_eps, min_samples=ms).fit(F_)
    assert len(set(res.labels[1].tolist()) - {-1}) == 2  # dead channels + the duplicated channel 3


def test_eps_zero_duplicate_live_channel_pairs(device):
    if device.type != "cpu":
        pytest.skip("the failure is measured on the CPU BLAS")
    mismatches = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        x = (rng.normal(size=(4, 40, 49)) * 3).astype(np.float32)
        x[:, :20] = 0  # half the channels dead: eps = 0
        for k in range(20, 40, 2):
            x[:, k + 1] = x[:, k]  # ten duplicated pairs: ten clusters of two (min_samples = 2)
        res = channel_clusters(torch.from_numpy(x).reshape(4, 40, 7, 7).to(device))
        for b in range(4):
            ref_labels, ref_eps, _ = cluster_reference(x[b])
            assert ref_eps == 0 and res.eps[b].item() == 0
            assert len(set(ref_labels.tolist())) == 11 and (ref_labels >= 0).all()
            if not np.array_equal(res.labels[b].cpu().numpy(), ref_labels):
                mismatches.append((seed, b))
    assert not mismatches


def test_backend_sklearn_equals_torch(device):
    rng = np.random.default_rng(8)
    acts = torch.from_numpy(make_activations(rng, 3, 64, 7, 7)).to(device)
    a = channel_clusters(acts, backend="torch")
    b = channel_clusters(acts, backend="sklearn")
    assert torch.equal(a.labels, b.labels)
    assert torch.equal(a.eps, b.eps)
    assert a.min_samples == b.min_samples
    assert b.labels.device == acts.device


@pytest.mark.skipif(importlib.util.find_spec("cuml") is not None, reason="cuML is installed here")
def test_backend_cuml_raises_clear_import_error():
    with pytest.raises(ImportError, match="cuml"):
        cluster_channels(torch.rand(1, 8, 4, 4), backend="cuml")


def test_unknown_backend_and_bad_activations():
    with pytest.raises(ValueError, match="backend"):
        cluster_channels(torch.rand(1, 8, 4, 4), backend="faiss")
    with pytest.raises(ValueError, match="activations"):
        cluster_channels(torch.rand(8, 4, 4))
    with pytest.raises(TypeError, match="activations"):
        cluster_channels(np.zeros((1, 8, 4, 4)))
