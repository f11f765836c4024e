"""Seeded fuzz of the numerics: every clustering route against each other and against an exact float64
oracle written here, and finite CAMs at every scale.

Routes: the CPU route (float32 screen; ``channel_clusters`` on CPU float32 features), the float64
all-pairs route (what an image both screens decline gets), the sync-free
route (``sync_free=True``, what accelerators run), and float64 features (the CPU's float64 screen).
The oracle: V = brute-force sum of (x_i - x_j)**2 in float64 (torch's sum over the last dimension, the
sum the library promises), eps = numpy's percentile of sqrt(V) rounded to the features' dtype, and
scikit-learn's DBSCAN (metric="precomputed") on the neighbour relation V <= eps**2 (eps squared in the
features' dtype, as scikit-learn compares for float data).
Cases: ties at eps (integer grids), dead and duplicate channels, -0.0, near-duplicate channels (1e-7
noise on a few prototypes), scales 1e-20..1e20, C 1..512, 21 map shapes, float32 and float64.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN

from cfcam_gpu import cluster
from cfcam_gpu.cam import cfcam_from_features
from cfcam_gpu.cluster import channel_clusters, seed_min_samples

SHAPES = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 7), (7, 1), (3, 3), (2, 5), (4, 4), (3, 6), (5, 5), (4, 7),
          (6, 6), (7, 7), (3, 11), (8, 8), (9, 9), (10, 10), (6, 14), (12, 12), (14, 14)]
KINDS = ("normal", "relu", "dead", "duplicates", "near_duplicates", "ties", "negative_zero", "spread")
CASES = 240


def oracle(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Exact eps and labels for one image's features x (C, N) float32 or float64."""
    C = x.shape[0]
    x64 = x.double()
    V = ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(dim=-1).numpy()  # brute force, every pair
    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    eps = np.percentile(np.sqrt(V).astype(dtype), 25)
    # eps**2 rounded to the features' precision (as scikit-learn squares it), without float32's
    # exponent limits (the library scales out of range features by powers of two, which is exact).
    threshold = round_to_precision(float(eps) * float(eps), 24) if dtype == np.float32 else eps * eps
    neighbours = V <= threshold
    # scikit-learn's own DBSCAN on that relation (distance 0 = neighbour, 1 = not); also for eps = 0,
    # which scikit-learn refuses, where the neighbours are the exact duplicates.
    labels = DBSCAN(eps=0.5, min_samples=seed_min_samples(C), metric="precomputed").fit(
        np.where(neighbours, 0.0, 1.0)).labels_
    return torch.tensor(eps, dtype=x.dtype), labels


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


def all_pairs_route(acts: torch.Tensor, monkeypatch) -> cluster.ChannelClusters:
    """channel_clusters on the CPU with both screens declining: V for every pair (the last resort)."""
    with monkeypatch.context() as m:
        m.setattr(cluster, "screened_neighbours", lambda *args, **kwargs: None)
        return channel_clusters(acts)


@pytest.mark.parametrize("chunk", range(4))
def test_every_route_equals_the_exact_oracle(chunk, monkeypatch):
    for seed in range(chunk, CASES, 4):
        acts, grads = make_case(seed)
        feats = acts.flatten(2)
        eps, labels = oracle(feats[0])
        ctx = f"seed {seed}, C {acts.shape[1]}, map {tuple(acts.shape[2:])}, {acts.dtype}"
        assert_same(channel_clusters(acts), eps, labels, f"CPU route ({ctx})")
        assert_same(channel_clusters(acts, sync_free=True), eps, labels, f"sync-free route ({ctx})")
        assert_same(all_pairs_route(acts, monkeypatch), eps, labels, f"all-pairs route ({ctx})")
        if acts.dtype == torch.float32:  # the same channels as float64 features: the float64 oracle
            eps64, labels64 = oracle(feats[0].double())
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
