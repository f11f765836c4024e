"""cluster.py: the seed's channel clustering (eps = 25th percentile, min_samples = max(2, int(0.05 C))) on
every route, vs scikit-learn and the reference path; exclude_dead."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN

from cfcam_gpu import channel_clusters, cluster_channels
from cfcam_gpu.cluster import seed_min_samples
from cfcam_gpu.reference import cluster_reference


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
            if ref_eps > 0:  # plain scikit-learn on the features in float64 (exact here: small integers)
                F64 = F_.astype(np.float64)
                eps64 = np.percentile(cdist(F64, F64), 25)
                plain = DBSCAN(eps=eps64, min_samples=ref_ms, algorithm="brute").fit(F64).labels_
                assert np.array_equal(res.labels[b].cpu().numpy(), plain), (C, b)


def test_plain_sklearn_on_float32_features_drops_a_tie_at_eps(device):
    """scikit-learn's ``DBSCAN(eps).fit(F)`` on float32 features compares with eps**2 rounded to float32,
    which can fall below the squared distance of a pair at exactly eps. Ten constant channels: channel 9
    is exactly eps from channels 0, 1 and 6; we (and the exact relation) make it a neighbour, plain
    scikit-learn on the float32 features does not. A deliberate difference (README, Numerical guarantees)."""
    v = [0.0, -0.0, -0.7808110117912292, 0.18614567816257477, -0.9464244246482849, 1.7024022340774536,
         0.0, 0.21985125541687012, 0.10474739968776703, 0.07653622329235077]
    F_ = np.repeat(np.asarray(v, dtype=np.float32)[:, None], 36, axis=1)
    D = cdist(F_.astype(np.float64), F_.astype(np.float64))
    eps = np.percentile(D, 25)
    assert D[9, 0] == eps  # the tie: exactly at eps
    res = channel_clusters(torch.from_numpy(F_).reshape(1, 10, 4, 9).to(device))
    assert res.labels[0].tolist() == [0, 0, -1, 1, -1, -1, 0, 1, 0, 0]
    assert res.eps[0].item() == np.float32(eps)
    plain32 = DBSCAN(eps=float(res.eps[0]), min_samples=res.min_samples).fit(F_).labels_
    assert plain32.tolist() == [0, 0, -1, 1, -1, -1, 0, 1, 2, 2]
    exact = DBSCAN(eps=eps, min_samples=res.min_samples, metric="precomputed").fit(D).labels_
    assert exact.tolist() == res.labels[0].tolist()


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


def test_host_reads_allowed_on_every_device(rng, device):
    """``sync_free=False`` takes the screened route on any device (on an accelerator its sweep runs as
    torch passes): the same eps and labels as the all-pairs route on the CPU and as scikit-learn."""
    acts = torch.from_numpy(make_activations(rng, 2, 300, 7, 7))
    expected = channel_clusters(acts, sync_free=True)
    got = channel_clusters(acts.to(device), sync_free=False)
    assert torch.equal(got.labels.cpu(), expected.labels) and torch.equal(got.eps.cpu(), expected.eps)
    for b in range(2):
        feats = acts[b].flatten(1).numpy()
        ref = DBSCAN(eps=float(expected.eps[b]), min_samples=expected.min_samples).fit(feats).labels_
        assert np.array_equal(expected.labels[b].numpy(), ref)
