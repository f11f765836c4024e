"""The accelerator path, run on CPU tensors: no value is read back to the host, and the answer equals the
CPU path's. CI has no GPU; this is the CPU half of ``test_cuda_no_host_sync_between_backward_and_cams``.

``sync_free=True`` is passed (every CPU-only shortcut is skipped: static shapes, K = C clusters, the proven
number of DBSCAN rounds, kthvalue selections), as an accelerator gets by default, and every way of reading
a tensor on the host
that torch offers in Python raises: ``item``, ``tolist``, ``numpy``, ``bool``/``int``/``float``/index
conversions, ``nonzero``, ``torch.equal``. (Boolean-mask indexing is not caught here; the CUDA test with
``set_sync_debug_mode("error")`` catches everything.)
"""
from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
import torch

from cfcam_gpu.cam import cfcam_from_features
from cfcam_gpu.cluster import channel_clusters

percentile_module = importlib.import_module("cfcam_gpu.percentile_ops")  # the module, not the function

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    def refuse(name):
        def fn(*args, **kwargs):
            raise HostRead(f"host read: {name}")
        return fn

    with monkeypatch.context() as m:
        m.setattr(percentile_module, "exact_sqrt", torch.sqrt)  # the accelerator's sqrt (CUDA's is correctly rounded)
        for name in READS:
            m.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
        m.setattr(torch, "nonzero", refuse("torch.nonzero"))
        m.setattr(torch, "equal", refuse("torch.equal"))
        yield


def test_the_detector_catches_reads(monkeypatch):
    x = torch.ones(3)
    with no_host_reads(monkeypatch):
        for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: int(x[0]), lambda: x.tolist(),
                     lambda: torch.equal(x, x), lambda: x.nonzero()):
            with pytest.raises(HostRead):
                read()
    assert bool(x.all())  # restored


@pytest.mark.parametrize("layer", ["layer3.-1", "layer4.-1"])
def test_accelerator_path_on_cpu_equals_cpu_path(resnet50_features, monkeypatch, layer):
    acts, grads = resnet50_features[layer][0][:3], resnet50_features[layer][1][:3]
    expected = cfcam_from_features(acts, grads)  # the CPU path (screened route, shortcuts)
    with no_host_reads(monkeypatch):
        got = cfcam_from_features(acts, grads, check_values=False, sync_free=True)
    assert torch.equal(got.labels, expected.labels)
    assert torch.equal(got.n_clusters, expected.n_clusters)
    assert torch.equal(got.eps, expected.eps)  # V exact on both routes: the same eps to the last bit
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)


def test_accelerator_path_on_cpu_with_dead_and_duplicate_channels(lite0_features, monkeypatch):
    """Lite0 bn2 on chelsea: eps = 0, dead channels, exact duplicates (the hash pass runs on accelerators)."""
    acts, grads = lite0_features["bn2"][0][:2], lite0_features["bn2"][1][:2]
    expected = cfcam_from_features(acts, grads)
    with no_host_reads(monkeypatch):
        got = cfcam_from_features(acts, grads, check_values=False, sync_free=True)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.eps, expected.eps)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)


def test_accelerator_groups_bound_memory_and_change_nothing(resnet50_features, monkeypatch):
    """Groups of images (ACCELERATOR_GROUP_BYTES) give the same answer as the whole batch at once."""
    from cfcam_gpu import cluster

    acts = resnet50_features["layer3.-1"][0][:5, :256]
    C = acts.shape[1]
    with no_host_reads(monkeypatch):
        whole = cluster.channel_clusters(acts, sync_free=True)
        calls = []
        real = cluster._cluster_float64_batch
        monkeypatch.setattr(cluster, "_cluster_float64_batch",
                            lambda f, *args: calls.append(f.shape[0]) or real(f, *args))
        monkeypatch.setattr(cluster, "ACCELERATOR_GROUP_BYTES", 2 * C * C * 8)  # two images per group
        grouped = cluster.channel_clusters(acts, sync_free=True)
    assert calls == [2, 2, 1]
    assert torch.equal(grouped.labels, whole.labels) and torch.equal(grouped.eps, whole.eps)


def test_exclude_dead_sync_free_equals_cpu_route(lite0_features, monkeypatch):
    """exclude_dead: the masked static-shape route equals each image's alive channels clustered alone."""
    acts, grads = lite0_features["bn2"][0][:3], lite0_features["bn2"][1][:3]
    expected = cfcam_from_features(acts, grads, exclude_dead=True)
    with no_host_reads(monkeypatch):
        got = cfcam_from_features(acts, grads, check_values=False, sync_free=True, exclude_dead=True)
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.eps, expected.eps)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)


def near_duplicates(seed: int, dtype=torch.float32) -> torch.Tensor:
    """12 channels drawn from 3 random prototypes of 36 values plus 1e-7 noise: the Gram matrix's
    distances n_i + n_j - 2 x_i.x_j cancel here (they gave a different eps and labels)."""
    g = np.random.default_rng(seed)
    protos = g.standard_normal((3, 36))
    x = protos[g.integers(0, 3, size=12)] + 1e-7 * g.standard_normal((12, 36))
    return torch.from_numpy(x).to(dtype).reshape(1, 12, 6, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_duplicate_channels_same_eps_and_labels(monkeypatch, dtype):
    """The sync-free route computes V exactly for every pair: the CPU route's eps to the last bit and
    its labels, on every seed (the Gram route differed on 25 of 200 float32 seeds)."""
    acts = torch.cat([near_duplicates(seed, dtype) for seed in range(200)])
    expected = channel_clusters(acts)
    with no_host_reads(monkeypatch):
        got = channel_clusters(acts, sync_free=True)
    assert torch.equal(got.labels, expected.labels)
    # The detector swaps in torch's CPU sqrt (an accelerator's is correctly rounded; this one can be an
    # ulp off, which float64 eps shows): bit equality with the real sqrt, outside the detector.
    torch.testing.assert_close(got.eps, expected.eps, rtol=3e-16, atol=0)
    assert torch.equal(channel_clusters(acts, sync_free=True).eps, expected.eps)
    x = acts[0].flatten(1).double()
    exact = ((x[:, None] - x[None]) ** 2).sum(-1).sqrt().to(dtype).flatten().numpy()
    assert expected.eps[0].item() == np.percentile(exact, 25)


@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_adversarial_cases_without_host_reads(monkeypatch, rng, scale):
    """Ties (integer grids), dead and duplicate channels, -0.0, near-duplicates, wide spreads, at tiny
    and huge scales: the same eps (bit for bit), labels and CAMs as the CPU route, with no host read."""
    C, h, w = 40, 5, 5
    g = rng
    x = np.concatenate([
        g.integers(0, 3, size=(10, h * w)).astype(np.float64),  # ties at eps
        np.zeros((5, h * w)),  # dead
        np.repeat(g.standard_normal((1, h * w)), 5, axis=0),  # duplicates
        g.standard_normal((1, h * w)) + 1e-7 * g.standard_normal((10, h * w)),  # near-duplicates
        g.standard_normal((10, h * w)) * np.exp(g.uniform(-6, 6, size=(10, 1)))])  # spread
    x[10:15, :3] = -0.0
    for dtype in (torch.float32, torch.float64):
        acts = torch.from_numpy(x * scale).to(dtype).reshape(1, C, h, w).repeat(2, 1, 1, 1)
        acts[1] = acts[1].flip(0)
        grads = torch.from_numpy(g.standard_normal((2, C, h, w)) * scale).to(dtype)
        expected = cfcam_from_features(acts, grads)
        with no_host_reads(monkeypatch):
            got = cfcam_from_features(acts, grads, check_values=False, sync_free=True)
        assert torch.equal(got.labels, expected.labels)
        torch.testing.assert_close(got.eps, expected.eps, rtol=3e-16, atol=0)  # the detector's sqrt
        assert torch.equal(cfcam_from_features(acts, grads, sync_free=True).eps, expected.eps)
        assert torch.isfinite(got.cams).all() and torch.isfinite(got.weights).all()
        torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layer", ["bn2", "blocks.-1"])
def test_published_variant_sync_free_equals_cpu_route(lite0_features, monkeypatch, layer):
    """variant="paper": important channels, the masked clustering of the rest (off-diagonal eps, floor),
    the K = C filtered cluster means and the softmax, with no host read; equal to the CPU route."""
    acts, grads = lite0_features[layer][0][:3], lite0_features[layer][1][:3]
    expected = cfcam_from_features(acts, grads, variant="paper")
    with no_host_reads(monkeypatch):
        got = cfcam_from_features(acts, grads, check_values=False, sync_free=True, variant="paper")
    assert torch.equal(got.labels, expected.labels) and torch.equal(got.eps, expected.eps)
    assert torch.equal(got.n_clusters, expected.n_clusters)
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)
