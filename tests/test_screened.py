"""The CPU float32 route (``screened.py``): exact against brute-force float64 distances, the proven error
bound, every fallback, and the same clusters as the float64 route and as scikit-learn's DBSCAN on exact
float64 distances (the reference path) on real activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import brute_squared, rank_neighbours

from cfcam_gpu import cluster, screened
from cfcam_gpu.cluster import channel_clusters, seed_min_samples
from cfcam_gpu.dbscan_ops import dbscan_from_adjacency
from cfcam_gpu.reference import cluster_reference
from cfcam_gpu.screened import (exact_squared_distances, screened_neighbours, screened_squared_distances,
                                screening_bounds)


def brute_force(x: torch.Tensor, q: float = 25.0) -> tuple[np.float32, np.ndarray]:
    """eps and the exact neighbours (d <= eps, ties included) from V for every pair."""
    V = brute_squared(x.numpy())
    return np.percentile(np.sqrt(V).astype(np.float32), q), rank_neighbours(V, q)


def check_exact(x: torch.Tensor) -> bool:
    """Assert the screened answer equals brute force; False when the route declined (fallback)."""
    got = screened_neighbours(x, 25.0)
    if got is None:
        return False
    eps, adj, counts = got
    ref_eps, ref_adj = brute_force(x)
    assert eps.dtype == torch.float32 and eps.item() == ref_eps
    assert np.array_equal(adj.numpy(), ref_adj)
    assert np.array_equal(counts.numpy(), ref_adj.sum(axis=1))
    return True


def assert_sklearn_labels(x: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor, min_samples: int):
    """scikit-learn's DBSCAN on exact float64 distances (the reference path) gives our eps and labels."""
    ref_labels, ref_eps, ref_min_samples = cluster_reference(x.numpy())
    assert float(eps) == ref_eps and min_samples == ref_min_samples
    assert np.array_equal(labels.numpy(), ref_labels)


def features_of(acts: torch.Tensor) -> torch.Tensor:
    return acts.flatten(2).float()


@pytest.mark.parametrize("layer", ["layer3.-1", "layer4.-1"])
def test_exact_on_resnet50_activations(resnet50_features, layer):
    for x in features_of(resnet50_features[layer][0]):
        assert check_exact(x), "the screened route should not need its fallback on real activations"


def test_exact_on_lite0_activations(lite0_features):
    taken = [check_exact(x) for layer in ("conv_head", "blocks.-1") for x in features_of(lite0_features[layer][0])]
    assert all(taken)


def test_eps_zero_falls_back_and_stays_exact(lite0_features):
    """Lite0 bn2 on chelsea: over a quarter of the distances are 0 (eps = 0). Whatever the route, the
    clusters equal the float64 route's, and neighbours are the exact duplicates."""
    acts = lite0_features["bn2"][0][:1]
    x = features_of(acts)[0]
    got = screened_neighbours(x, 25.0)
    if got is not None:
        check_exact(x)
    fast = channel_clusters(acts)
    f64 = cluster._cluster_float64_batch(features_of(acts), False)
    assert fast.eps.item() == 0 and torch.equal(fast.labels, f64.labels)


@pytest.mark.parametrize("N", [1, 4, 49, 196, 784])
@pytest.mark.parametrize("scale", [1e-18, 1.0, 3e12])
def test_error_bound_holds(rng, N, scale):
    """|d~ - V| <= delta for every entry, on data with a wide spread of norms and near-duplicates."""
    C = 192
    base = rng.standard_normal((C, N)) * np.exp(rng.uniform(-4, 4, size=(C, 1)))
    base[::7] = base[1::7][: len(base[::7])] * (1 + 1e-6)  # near-duplicate channels: cancellation
    x = torch.from_numpy((base * scale).astype(np.float32))
    norms = x.double().square().sum(dim=1)
    approx = screened_squared_distances(x, norms).double().view(-1)
    idx = torch.arange(C * C)
    exact = exact_squared_distances(x.double(), idx)
    delta = screening_bounds(norms, idx // C, idx % C, N)
    assert bool(((approx - exact).abs() <= delta / 2).all())  # the proven bound; delta keeps 2x spare


@pytest.mark.parametrize("kind", ["integers", "duplicates", "dead", "constant", "two_blobs"])
def test_exact_or_declines_on_tie_heavy_data(rng, kind):
    C, N = 300, 16
    if kind == "integers":
        x = rng.integers(0, 3, size=(C, N))
    elif kind == "duplicates":
        x = rng.standard_normal((40, N))[rng.integers(0, 40, size=C)]
    elif kind == "dead":
        x = rng.standard_normal((C, N)) * (rng.random((C, 1)) < 0.6)
    elif kind == "constant":
        x = np.ones((C, N))
    else:
        x = np.concatenate([rng.standard_normal((C // 2, N)), 50 + rng.standard_normal((C - C // 2, N))])
    x = torch.from_numpy(np.asarray(x, dtype=np.float32))
    check_exact(x)  # exact when taken
    ours = channel_clusters(x[None, :, :, None])  # whichever route: equal to the float64 route
    f64 = cluster._cluster_float64_batch(x[None], False)
    assert torch.equal(ours.eps, f64.eps) and torch.equal(ours.labels, f64.labels)
    assert_sklearn_labels(x, ours.eps[0], ours.labels[0], ours.min_samples)


def test_adjacency_is_symmetric_with_true_diagonal(resnet50_features):
    x = features_of(resnet50_features["layer4.-1"][0])[0]
    adj = screened_neighbours(x, 25.0).adj
    assert torch.equal(adj, adj.T) and bool(adj.diagonal().all())


def test_declines_when_the_sample_bracket_misses(resnet50_features, monkeypatch):
    """A bracket below the order statistics (what an unlucky sample would give): the route declines,
    channel_clusters falls back to the float64 route and returns the same answer."""
    acts = resnet50_features["layer3.-1"][0][:2]
    expected = channel_clusters(acts)
    monkeypatch.setattr(screened, "sampled_bracket", lambda flat, ranks, width: (-1.0, 0.0))
    assert screened_neighbours(features_of(acts)[0], 25.0) is None
    got = channel_clusters(acts)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.eps, expected.eps)


def test_declines_under_reduced_precision_matmul(resnet50_features):
    x = features_of(resnet50_features["layer3.-1"][0])[0]
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert not screened.float32_matmul_is_ieee()
        assert screened_neighbours(x, 25.0) is None
    finally:
        torch.set_float32_matmul_precision(before)
    assert screened.float32_matmul_is_ieee() and screened_neighbours(x, 25.0) is not None


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e36])
def test_declines_on_non_finite_or_huge_values(rng, value):
    x = torch.from_numpy(rng.standard_normal((64, 9)).astype(np.float32))
    x[3, 2] = value
    assert screened_neighbours(x, 25.0) is None


@pytest.mark.parametrize("layer", ["layer3.-1", "layer4.-1"])
def test_labels_equal_float64_route_and_sklearn(resnet50_features, layer):
    """End to end on real activations: the CPU float32 route gives the float64 route's eps and labels,
    and scikit-learn's labels on exact float64 distances."""
    acts = resnet50_features[layer][0]
    ours = channel_clusters(acts)
    f64 = cluster._cluster_float64_batch(features_of(acts[:2]), False)  # exact V for every pair: slow
    assert torch.equal(ours.eps[:2], f64.eps) and torch.equal(ours.labels[:2], f64.labels)
    feats = features_of(acts)
    for b in range(2):
        assert_sklearn_labels(feats[b], ours.eps[b], ours.labels[b], ours.min_samples)


def test_dbscan_on_screened_adjacency_matches_dense(resnet50_features):
    x = features_of(resnet50_features["layer3.-1"][0])[1]
    eps, adj, counts = screened_neighbours(x, 25.0)
    _, ref_adj = brute_force(x)
    C = x.shape[0]
    assert torch.equal(dbscan_from_adjacency(adj[None], seed_min_samples(C), False),
                       dbscan_from_adjacency(torch.from_numpy(ref_adj)[None], seed_min_samples(C), False))


def _random_case(seed: int) -> torch.Tensor:
    """A seeded mix of what breaks distance code: duplicates, dead rows, integer grids, near-ties, wide
    dynamic ranges, few or many features."""
    g = np.random.default_rng(seed)
    C = int(g.integers(20, 260))
    N = int(g.choice([1, 2, 3, 9, 16, 49, 196]))
    kind = seed % 5
    if kind == 0:  # integer grid: many exact ties
        x = g.integers(-2, 3, size=(C, N)).astype(np.float64)
    elif kind == 1:  # a few prototypes, duplicated and slightly perturbed
        protos = g.standard_normal((max(2, C // 10), N))
        x = protos[g.integers(0, len(protos), size=C)] * (1 + 1e-7 * g.standard_normal((C, 1)))
    elif kind == 2:  # wide dynamic range per channel
        x = g.standard_normal((C, N)) * np.exp(g.uniform(-20, 20, size=(C, 1)))
    elif kind == 3:  # ReLU-like: many exact zeros and dead channels
        x = np.maximum(g.standard_normal((C, N)), 0) * (g.random((C, 1)) < 0.7)
    else:  # clusters at very different scales
        x = np.concatenate([g.standard_normal((C // 2, N)) * 1e-3, 1e3 + g.standard_normal((C - C // 2, N))])
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_exact_or_declined(seed):
    """Whatever the data: the screened answer equals brute force, or the route declines; and
    channel_clusters equals the float64 route and scikit-learn either way."""
    x = _random_case(seed)
    check_exact(x)
    ours = channel_clusters(x[None, :, :, None])
    f64 = cluster._cluster_float64_batch(x[None], False)
    assert torch.equal(ours.eps, f64.eps) and torch.equal(ours.labels, f64.labels)
    assert_sklearn_labels(x, ours.eps[0], ours.labels[0], ours.min_samples)


@pytest.mark.parametrize("N", [1, 4, 49, 196, 784])
@pytest.mark.parametrize("scale", [1e-150, 1.0, 1e120])
def test_float64_screen_error_bound_holds(rng, N, scale):
    """The float64 screen: |d~ - V| <= delta for every entry (float64 features), near-duplicates too."""
    C = 160
    base = rng.standard_normal((C, N)) * np.exp(rng.uniform(-4, 4, size=(C, 1)))
    base[::7] = base[1::7][: len(base[::7])] * (1 + 1e-12)  # near-duplicates at float64 precision
    x = torch.from_numpy(base * scale)
    norms = x.square().sum(dim=1)
    approx = screened_squared_distances(x, norms).view(-1)
    idx = torch.arange(C * C)
    exact = exact_squared_distances(x, idx)
    delta = screening_bounds(norms, idx // C, idx % C, N, torch.float64)
    assert bool(((approx - exact).abs() <= delta / 2).all())  # the bound holds with 2x to spare


@pytest.mark.parametrize("seed", range(12))
def test_float64_screen_exact_against_brute_force(seed):
    """Float64 features through the float64 screen: eps and neighbours of V exactly (or it declines)."""
    x = _random_case(seed).double() * (1 + 1e-9 * torch.from_numpy(np.random.default_rng(seed).standard_normal(1)))
    got = screened_neighbours(x, 25.0)
    V = brute_squared(x.numpy())
    eps = np.percentile(np.sqrt(V), 25)
    if got is not None:
        assert got[0].dtype == torch.float64 and got[0].item() == eps
        assert np.array_equal(got[1].numpy(), rank_neighbours(V))
    ours = channel_clusters(x[None, :, :, None])
    assert ours.eps.item() == eps


def test_float32_image_declined_takes_the_float64_screen(resnet50_features, monkeypatch):
    """A float32 image the float32 screen declines goes to the float64 screen (not every pair): the same
    eps and labels."""
    acts = resnet50_features["layer3.-1"][0][:1]
    expected = channel_clusters(acts)
    precisions = []
    real = screened.screened_neighbours

    def spy(x, q, out=None, precision=None, *rule):
        precisions.append(precision)
        return None if precision == torch.float32 else real(x, q, out, precision, *rule)

    monkeypatch.setattr(cluster, "screened_neighbours", spy)
    got = channel_clusters(acts)
    assert precisions == [torch.float32, torch.float64]
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.eps, expected.eps)


def _split_by_torch(d: torch.Tensor, lo_v: float, hi_v: float):
    flat = d.view(-1)
    below = d < lo_v
    idx = ((flat >= lo_v) & (flat <= hi_v)).nonzero().squeeze(1)
    return below, below.sum(dim=1), idx, flat[idx]


@pytest.mark.parametrize("block_bytes", [2**12, 2**19])
def test_split_at_bracket_in_threads_and_blocks(resnet50_features, monkeypatch, block_bytes):
    """The sweep after the product, in 2 threads and in cache blocks of a few rows or many: the same
    mask, row counts, indices (ascending) and values as plain comparisons."""
    x = features_of(resnet50_features["layer3.-1"][0])[0]
    d = screened_squared_distances(x, x.double().square().sum(dim=1))
    lo_v, hi_v = (float(v) for v in d.view(-1).kthvalue(int(0.2 * d.numel())).values * torch.tensor([1.0, 1.2]))
    lo_v, hi_v = float(torch.tensor(lo_v).float()), float(torch.tensor(hi_v).float())
    monkeypatch.setattr(screened, "SPLIT_BLOCK_BYTES", block_bytes)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        below = torch.zeros_like(d, dtype=torch.bool)
        rows, idx, vals = screened.split_at_bracket(d, lo_v, hi_v, below)
    finally:
        torch.set_num_threads(threads)
    ref_below, ref_rows, ref_idx, ref_vals = _split_by_torch(d, lo_v, hi_v)
    assert torch.equal(below, ref_below) and torch.equal(rows, ref_rows)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals) and idx.numel() > 1000
    passes = torch.ones_like(below)  # the torch passes (accelerators' ``sync_free=False``): the same
    for got, ref in zip(screened.split_by_passes(d, lo_v, hi_v, passes), (rows, idx, vals)):
        assert torch.equal(got, ref)
    assert torch.equal(passes, below)


def _split_in_child(queue, d, lo_v, hi_v, below):
    torch.set_num_threads(2)  # (no torch op that would start OpenMP threads: those hang after a fork)
    queue.put(screened.split_at_bracket(d, lo_v, hi_v, below)[0].tolist())


def test_split_at_bracket_in_a_forked_child():
    """The split's threads do not survive a fork: a child (a DataLoader worker, a forked launcher) makes
    its own pool instead of waiting on its parent's for ever (keyed by the parent's pid, this hangs)."""
    import multiprocessing

    d = torch.rand(256, 256)
    below = torch.zeros_like(d, dtype=torch.bool)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        expected = screened.split_at_bracket(d, 0.3, 0.5, below)[0].tolist()
    finally:
        torch.set_num_threads(threads)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_split_in_child, args=(queue, d, 0.3, 0.5, below))
    child.start()
    try:
        got = queue.get(timeout=60)
    finally:
        child.join(timeout=10)
        child.kill()
    assert got == expected
