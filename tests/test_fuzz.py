"""Seeded fuzz of the numerics: every clustering route against each other and against exact oracles
written here, and finite CAMs at every scale.

Routes: the CPU route (float32 screen; ``channel_clusters`` on CPU float32 features), the float64
all-pairs route (what an image both screens decline gets), the sync-free route (``sync_free=True``,
what accelerators run), and float64 features (the CPU's float64 screen).
The neighbour relation is ``d <= eps`` exactly: numpy's percentile is a + g (b - a) with 0 <= g < 1
between consecutive order statistics a <= b, so the eps-neighbours are the pairs with V <= V[lo], the
squared distance at the lower rank (``helpers.rank_neighbours``), ties at eps included.
Oracles: (1) general cases: V = brute-force float64 sum of (x_i - x_j)**2 (the sum the library
promises), eps = numpy's percentile of sqrt(V) rounded to the features' dtype, scikit-learn's DBSCAN
(metric="precomputed") on the rank relation; (2) tie cases: the same relation on the squared distances
in exact integer arithmetic (``helpers.exact_integer_squared``), and scipy's cdist + numpy's percentile
+ scikit-learn's DBSCAN on the precomputed float64 distances (``reference.cluster_reference``).
Cases: (1) dead and duplicate channels, -0.0, near-duplicate channels (1e-7 noise on a few
prototypes), channels at very different scales, scales 1e-20..1e20, C 1..512, 21 map shapes;
(2) ties at eps: constant maps with duplicated values and signed zeros (the kind of a float32 tie that
rounding eps**2 to float32 drops), integer lattices with duplicated rows, odd C (the percentile lands
on an order statistic: eps equals a distance exactly), scaled by 2**-90..2**90; float32 and float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cfcam_gpu.cam import cfcam_from_features
from cfcam_gpu.cluster import channel_clusters, seed_min_samples
from cfcam_gpu.reference import cluster_reference

from helpers import (all_pairs_route, brute_squared, dbscan_labels, exact_integer_squared, rank_neighbours,
                     rank_oracle)

SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 7), (7, 1), (3, 3), (2, 5), (4, 4), (3, 6), (5, 5), (4, 7),
          (6, 6), (7, 7), (3, 11), (8, 8), (9, 9), (10, 10), (6, 14), (12, 12), (14, 14)]
KINDS = ("normal", "relu", "dead", "duplicates", "near_duplicates", "ties", "negative_zero", "spread")
CASES = 240


def rounded_square_labels(x: torch.Tensor) -> np.ndarray:
    """The labels of the relation the float32 routes once used: V <= eps**2 with eps**2 rounded to the
    features' precision (scikit-learn's comparison for float features). Drops some pairs at exactly eps."""
    V = brute_squared(x.numpy())
    eps = float(rank_oracle(x)[0])
    threshold = round_to_precision(eps * eps, 24) if x.dtype == torch.float32 else eps * eps
    return dbscan_labels(V <= threshold, seed_min_samples(x.shape[0]))


def round_to_precision(v: float, bits: int) -> float:
    """v rounded to the nearest number with a ``bits``-bit significand (ties to even), any exponent."""
    m, e = math.frexp(v)
    return math.ldexp(float(np.round(m * 2.0**bits)), e - bits)


def make_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded adversarial (activations (1, C, h, w), gradients) pair; float32 or float64."""
    g = np.random.default_rng(1000 + seed)
    C = int(g.choice([1, 2, 3, 5, 8, 12, 20, 33, 48, 64, 96, 130] + [256, 512] * (seed % 23 == 0)))
    h, w = SHAPES[seed % len(SHAPES)]
    N = h * w
    kind = KINDS[seed % len(KINDS)]
    if kind == "normal":
        x = g.standard_normal((C, N))
    elif kind == "relu":
        x = np.maximum(g.standard_normal((C, N)) + g.uniform(-1, 1, size=(C, 1)), 0)
    elif kind == "dead":
        x = np.abs(g.standard_normal((C, N))) * (g.random((C, 1)) < 0.5)
    elif kind == "duplicates":
        x = g.standard_normal((max(1, C // 4), N))[g.integers(0, max(1, C // 4), size=C)]
    elif kind == "near_duplicates":
        protos = g.standard_normal((int(g.integers(1, 5)), N))
        x = protos[g.integers(0, len(protos), size=C)] + 1e-7 * g.standard_normal((C, N))
    elif kind == "ties":  # small integers: many distances exactly equal to eps
        x = g.integers(0, 3, size=(C, N)).astype(np.float64)
    elif kind == "negative_zero":
        x = np.maximum(g.standard_normal((C, N)), 0)
        x[x == 0] = -0.0 if seed % 2 else 0.0
        x[g.random((C, N)) < 0.3] = -0.0
    else:  # channels at very different scales
        x = g.standard_normal((C, N)) * np.exp(g.uniform(-8, 8, size=(C, 1)))
    scale = 10.0 ** g.uniform(-20, 20) if seed % 3 else 1.0
    dtype = torch.float64 if seed % 4 == 3 else torch.float32
    acts = torch.from_numpy(x * scale).to(dtype).reshape(1, C, h, w)
    grads = torch.from_numpy(g.standard_normal((1, C, h, w)) * 10.0 ** g.uniform(-20, 20)).to(dtype)
    return acts, grads


def assert_same(got, eps, labels, route):
    assert torch.equal(got.eps[0], eps), f"{route}: eps {got.eps[0].item()!r} != exact {eps.item()!r}"
    assert np.array_equal(got.labels[0].numpy(), labels), f"{route}: labels differ from the oracle"


@pytest.mark.parametrize("chunk", range(4))
def test_every_route_equals_the_exact_oracle(chunk, monkeypatch):
    for seed in range(chunk, CASES, 4):
        acts, grads = make_case(seed)
        feats = acts.flatten(2)
        eps, labels = rank_oracle(feats[0])
        ctx = f"seed {seed}, C {acts.shape[1]}, map {tuple(acts.shape[2:])}, {acts.dtype}"
        assert_same(channel_clusters(acts), eps, labels, f"CPU route ({ctx})")
        assert_same(channel_clusters(acts, sync_free=True), eps, labels, f"sync-free route ({ctx})")
        assert_same(all_pairs_route(acts, monkeypatch), eps, labels, f"all-pairs route ({ctx})")
        if acts.dtype == torch.float32:  # the same channels as float64 features: the float64 oracle
            eps64, labels64 = rank_oracle(feats[0].double())
            assert_same(channel_clusters(acts.double()), eps64, labels64, f"float64 features ({ctx})")


@pytest.mark.parametrize("chunk", range(2))
def test_cams_and_weights_finite_at_every_scale(chunk):
    """Finite maps from every finite input, CPU and sync-free; the CAM is in [0, 1]."""
    for seed in range(chunk, CASES, 8):
        acts, grads = make_case(seed)
        for sync_free in (False, True):
            res = cfcam_from_features(acts, grads, sync_free=sync_free)
            assert torch.isfinite(res.weights).all() and torch.isfinite(res.cams).all(), seed
            assert bool((res.cams >= 0).all() and (res.cams <= 1).all()), seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exponent", [-60, 60, 120])
def test_huge_and_tiny_scales_keep_labels(dtype, exponent):
    """A power-of-two scale changes neither the labels nor the CAM, and eps scales exactly, up to the
    dtype's range (float64: 2**+-1000 as well, beyond any float32)."""
    acts, grads = make_case(5)
    acts, grads = acts.to(dtype), grads.to(dtype)
    exponents = [exponent] + ([-1000, 900] if dtype == torch.float64 else [])
    base = cfcam_from_features(acts, grads)
    for e in exponents:
        s = math.ldexp(1.0, e)
        for sync_free in (False, True):
            res = cfcam_from_features(acts * s, grads * s, sync_free=sync_free)
            assert torch.equal(res.labels, base.labels), (e, sync_free)
            assert res.eps.item() == base.eps.item() * s, (e, sync_free)
            torch.testing.assert_close(res.cams, base.cams, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Ties at eps, against the relation in exact integer arithmetic.

TIE_KINDS = ("constant_maps", "lattice", "signed_zeros", "on_order_statistic")
TIE_CASES = 200


def make_tie_case(seed: int) -> torch.Tensor:
    """Seeded features (1, C, h, w) with many distances exactly equal to eps, float32 or float64, scaled
    by a power of two in 2**-90..2**90 (exact: the order of the distances is unchanged)."""
    g = np.random.default_rng(7000 + seed)
    kind = TIE_KINDS[seed % len(TIE_KINDS)]
    C = int(g.choice([2, 3, 4, 6, 8, 10, 12, 16, 24, 40]))
    if kind == "on_order_statistic":  # odd C: (C*C - 1) / 4 is whole, the percentile is a distance
        C = int(g.choice([3, 5, 7, 9, 11, 13, 17, 25, 33, 41]))
    h, w = SHAPES[int(g.integers(0, 14))]
    N = h * w
    if kind == "constant_maps":  # as the reproducer: one float32 value per channel, duplicates, +-0
        v = g.standard_normal(C).astype(np.float32).astype(np.float64)
        v[g.random(C) < 0.3] = 0.0
        copies = g.random(C) < 0.4
        v[copies] = v[g.integers(0, C, size=int(copies.sum()))]
        v[(v == 0) & (g.random(C) < 0.5)] = -0.0
        x = np.repeat(v[:, None], N, axis=1)
    else:
        x = g.integers(-2, 3, size=(C, N)).astype(np.float64)
        if kind == "signed_zeros":
            x[g.random((C, N)) < 0.6] = 0.0
            x[(x == 0) & (g.random((C, N)) < 0.5)] = -0.0
        copies = g.random(C) < 0.3
        x[copies] = x[g.integers(0, C, size=int(copies.sum()))]
    x = x * 2.0 ** int(g.integers(-90, 91))
    dtype = torch.float64 if seed % 3 == 2 else torch.float32
    return torch.from_numpy(x).to(dtype).reshape(1, C, h, w)


def exact_oracle(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """eps (numpy's percentile of the rounded distances) and the labels of ``d <= eps`` decided on the
    squared distances in exact integer arithmetic, for features x (C, N)."""
    eps, _ = rank_oracle(x)
    return eps, dbscan_labels(rank_neighbours(exact_integer_squared(x.numpy())), seed_min_samples(x.shape[0]))


def test_the_reported_float32_tie(monkeypatch):
    """Ten constant float32 channels; channel 9 is exactly eps from channels 0, 1 and 6 (0.0, -0.0,
    0.0), so it is their neighbour on every route, as in exact arithmetic and as scipy's cdist +
    numpy's percentile + scikit-learn's DBSCAN on the precomputed distances decide."""
    v = [0.0, -0.0, -0.7808110117912292, 0.18614567816257477, -0.9464244246482849, 1.7024022340774536,
         0.0, 0.21985125541687012, 0.10474739968776703, 0.07653622329235077]
    acts = torch.tensor(v)[:, None, None].expand(10, 4, 9)[None].contiguous()
    expected = [0, 0, -1, 1, -1, -1, 0, 1, 0, 0]
    assert exact_oracle(acts.flatten(2)[0])[1].tolist() == expected
    assert cluster_reference(acts.flatten(2)[0].numpy())[0].tolist() == expected
    assert rounded_square_labels(acts.flatten(2)[0]).tolist() != expected  # what float32 eps**2 gives
    for route, got in [("CPU", channel_clusters(acts)), ("sync-free", channel_clusters(acts, sync_free=True)),
                       ("all-pairs", all_pairs_route(acts, monkeypatch)),
                       ("float64", channel_clusters(acts.double()))]:
        assert got.labels[0].tolist() == expected, route


@pytest.mark.parametrize("chunk", range(2))
def test_ties_at_eps_equal_the_exact_relation_on_every_route(chunk, monkeypatch):
    """Every route's labels equal the exact relation's, and so do the reference path's; the generator
    produces cases where rounding eps**2 to the features' precision gives other labels (the regression
    these cases are here to catch)."""
    caught = 0
    for seed in range(chunk, TIE_CASES, 2):
        acts = make_tie_case(seed)
        feats = acts.flatten(2)[0]
        eps, labels = exact_oracle(feats)
        ctx = f"tie seed {seed}, C {acts.shape[1]}, map {tuple(acts.shape[2:])}, {acts.dtype}"
        assert np.array_equal(cluster_reference(feats.numpy())[0], labels), f"reference path ({ctx})"
        assert_same(channel_clusters(acts), eps, labels, f"CPU route ({ctx})")
        assert_same(channel_clusters(acts, sync_free=True), eps, labels, f"sync-free route ({ctx})")
        assert_same(all_pairs_route(acts, monkeypatch), eps, labels, f"all-pairs route ({ctx})")
        if acts.dtype == torch.float32:
            eps64, labels64 = exact_oracle(feats.double())
            assert np.array_equal(labels64, labels)  # the same channels: the same exact relation
            assert_same(channel_clusters(acts.double()), eps64, labels64, f"float64 features ({ctx})")
        caught += not np.array_equal(rounded_square_labels(feats), labels)
    assert caught >= 3, caught
