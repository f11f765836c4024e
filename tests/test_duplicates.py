"""The eps = 0 route (``cfcam_gpu.duplicates``): groups of identical channels against NumPy's exact row
equality, labels against the brute-force relation + scikit-learn's DBSCAN and against the all-pairs and
sync-free routes, on seeded duplicate-heavy features and on EfficientNet-Lite0's ``bn2`` activations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cfcam_gpu import cluster, duplicates
from cfcam_gpu.cluster import channel_clusters, seed_min_samples
from cfcam_gpu.duplicates import duplicate_groups, zero_count_bound, zero_radius_clusters

from helpers import all_pairs_route, brute_squared, rank_oracle, refuse_host_reads


def duplicate_heavy(seed: int, dtype=torch.float32, C: int | None = None) -> torch.Tensor:
    """(1, C, h, w): a few distinct channels (zeros, +-0.0, small integers: ties between groups) copied
    into many groups of varied sizes, so that >= 25% of the distances are 0 on most seeds."""
    g = np.random.default_rng(500 + seed)
    C = int(g.choice([4, 9, 16, 25, 40, 64, 97])) if C is None else C
    h, w = [(1, 1), (2, 3), (3, 3), (4, 4)][seed % 4]
    distinct = g.integers(-1, 2, size=(int(g.integers(1, max(2, C // 3))), h * w)).astype(np.float64)
    distinct[0] = 0.0
    x = distinct[np.minimum(g.geometric(0.3, size=C) - 1, len(distinct) - 1)]
    x[(x == 0) & (g.random(x.shape) < 0.5)] = -0.0
    x = x * 2.0 ** int(g.integers(-60, 61))
    return torch.from_numpy(x).to(dtype).reshape(1, C, h, w)


def test_groups_equal_numpy_row_equality():
    for seed in range(40):
        feats = duplicate_heavy(seed).flatten(2)
        got = duplicate_groups(feats)
        x = feats[0].numpy() + 0.0  # -0.0 and 0.0 are one value
        _, inverse, counts = np.unique(x, axis=0, return_inverse=True, return_counts=True)
        first = np.array([np.flatnonzero(inverse == inverse[i])[0] for i in range(len(x))])
        assert bool(got.exact[0])
        assert got.first[0].tolist() == first.tolist(), seed
        assert got.size[0].tolist() == counts[inverse.ravel()].tolist(), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_labels_equal_the_exact_relation_and_every_route(dtype, monkeypatch):
    applied = 0
    for seed in range(60):
        acts = duplicate_heavy(seed, dtype)
        feats = acts.flatten(2)
        eps, labels = rank_oracle(feats[0])
        zero = zero_radius_clusters(feats, 25.0, seed_min_samples(feats.shape[1]))
        assert bool(zero.applies[0]) == bool(eps == 0), seed  # it applies exactly where eps is 0
        if eps == 0:
            applied += 1
            assert zero.labels[0].tolist() == labels.tolist(), seed
        for route, got in [("CPU", channel_clusters(acts)), ("sync-free", channel_clusters(acts, sync_free=True)),
                           ("all-pairs", all_pairs_route(acts, monkeypatch))]:
            assert got.labels[0].tolist() == labels.tolist(), (seed, route)
            assert torch.equal(got.eps[0], eps), (seed, route)  # numpy's percentile, in the features' dtype
    assert applied >= 30, applied


def test_batched_equals_looped_and_no_host_read(monkeypatch):
    feats = torch.cat([duplicate_heavy(s, C=40).flatten(2) for s in (3, 7, 11, 15, 19, 23)])  # 4 x 4 maps
    with refuse_host_reads(monkeypatch):
        batched = zero_radius_clusters(feats, 25.0, seed_min_samples(feats.shape[1]))
    for b in range(feats.shape[0]):
        one = zero_radius_clusters(feats[b:b + 1], 25.0, seed_min_samples(feats.shape[1]))
        assert torch.equal(batched.labels[b], one.labels[0]) and torch.equal(batched.applies[b], one.applies[0])


def test_the_cheap_bound_holds_and_skips_the_hashes(monkeypatch):
    """zero_count_bound >= the zeros of V (brute force) on duplicate-heavy and on spread features; on
    features without duplicates the CPU route never hashes."""
    for seed in range(30):
        for acts in (duplicate_heavy(seed), torch.randn(1, 12, 3, 3) * (seed % 3)):
            feats = acts.flatten(2)
            zeros = int((brute_squared(feats[0].numpy()) == 0).sum())
            assert int(zero_count_bound(feats)[0]) >= zeros, seed
    spread = torch.randn(3, 64, 4, 4).relu()
    assert torch.equal(zero_count_bound(spread.flatten(2)), torch.full((3,), 64))
    calls = []
    monkeypatch.setattr(cluster, "zero_radius_clusters", lambda *a, **k: calls.append(a))
    channel_clusters(spread)
    assert not calls


def test_a_hash_collision_declines(monkeypatch):
    """Every channel hashed alike: the check against each group's first channel catches it, and the CPU
    route still gives the exact labels (through the screens)."""
    acts = duplicate_heavy(6)  # 4 distinct channels among 40
    _, labels = rank_oracle(acts.flatten(2)[0])
    assert bool(zero_radius_clusters(acts.flatten(2), 25.0, 2).applies[0])  # the route applies to it
    monkeypatch.setattr(duplicates, "row_hashes", lambda x: torch.zeros(x.shape[:2], dtype=torch.long))
    assert not bool(zero_radius_clusters(acts.flatten(2), 25.0, 2).applies.any())
    assert channel_clusters(acts).labels[0].tolist() == labels.tolist()


def test_non_finite_and_tiny_float64_values_decline():
    x = torch.zeros(1, 8, 4)
    x[0, 0, 0] = float("nan")
    assert not bool(duplicate_groups(x).exact[0])
    x[0, 0, 0] = float("inf")
    assert not bool(duplicate_groups(x).exact[0])
    tiny = torch.zeros(1, 8, 4, dtype=torch.float64)
    tiny[0, 0, 0] = 2.0**-600  # V between channel 0 and the zero channels would underflow to 0
    assert not bool(duplicate_groups(tiny).exact[0])


def test_the_cpu_route_takes_it_on_lite0_bn2(lite0_features, monkeypatch):
    """The bundled photos at EfficientNet-Lite0's head: the images whose eps is 0 take this route, and
    its labels equal the all-pairs route's and the sync-free route's."""
    acts = lite0_features["bn2"][0]
    feats = acts.flatten(2)
    zero = zero_radius_clusters(feats, 25.0, seed_min_samples(feats.shape[1]))
    base = all_pairs_route(acts, monkeypatch)
    assert bool(zero.applies.any()) and torch.equal(zero.applies, base.eps == 0)
    assert torch.equal(zero.labels[zero.applies], base.labels[zero.applies])
    for got in (channel_clusters(acts), channel_clusters(acts, sync_free=True)):
        assert torch.equal(got.labels, base.labels) and torch.equal(got.eps, base.eps)


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="feats"):
        duplicate_groups(torch.zeros(4, 5))
    with pytest.raises(TypeError, match="feats"):
        duplicate_groups(torch.zeros(1, 4, 5, dtype=torch.long))


@pytest.mark.parametrize("q", [25.0, 40.0])
def test_other_percentiles_and_off_diagonal_eps_equal_the_reference(q, monkeypatch):
    """The route under another eps rule (the q-th percentile of the off-diagonal distances, no floor, as
    ``subset_clusters`` takes it): eps and labels equal the per-image scikit-learn reference's."""
    from cfcam_gpu.cluster import EpsRule, subset_clusters

    applied = []
    real = cluster.zero_radius_clusters

    def counted(*args, **kwargs):
        got = real(*args, **kwargs)
        applied.append(int(got.applies.sum()))
        return got

    monkeypatch.setattr(cluster, "zero_radius_clusters", counted)
    rule = EpsRule(q=q, diagonal=False, floor=0.0)
    for seed in range(20):
        acts = duplicate_heavy(seed)
        keep = torch.ones(acts.shape[:2], dtype=torch.bool)
        got, want = subset_clusters(acts, keep, rule), subset_clusters(acts, keep, rule, backend="sklearn")
        assert torch.equal(got.labels, want.labels) and torch.equal(got.eps, want.eps.to(got.eps.dtype)), seed
    assert sum(applied) >= 5  # the eps = 0 route decided some of them
