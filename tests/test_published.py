"""published.py: CF-CAM as published (arXiv 2504.00060 v2) vs the per-image NumPy/scikit-learn reference
(``reference.cfcam_paper_reference``), on real activations and on synthetic edge cases."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfcam_gpu import CFCAM, cfcam_from_features
from cfcam_gpu.filters import published_filter, published_filter_mean, published_kernel
from cfcam_gpu.methods.registry import build_method, from_features_fn
from cfcam_gpu.published import cfcam_paper_from_features, important_channels
from cfcam_gpu.reference import cfcam_paper_reference, published_filter_reference
from helpers import capture_features, make_features


def assert_matches_paper_reference(res, acts: np.ndarray, grads: np.ndarray, cam_atol=1e-5):
    B = acts.shape[0]
    assert res.cams.shape == (B,) + acts.shape[2:] and res.weights.shape == acts.shape[:2]
    assert res.min_samples is None
    for b in range(B):
        ref = cfcam_paper_reference(acts[b], grads[b])
        assert np.array_equal(res.labels[b].cpu().numpy(), ref.labels), b
        assert int(res.n_clusters[b]) == ref.n_clusters, b
        assert res.eps[b].item() == ref.eps, (b, res.eps[b].item(), ref.eps)
        np.testing.assert_allclose(res.weights[b].cpu().double().numpy(), ref.weights, rtol=1e-5,
                                   atol=1e-6 * ref.weights.max())
        assert np.abs(res.cams[b].cpu().numpy() - ref.cam).max() <= cam_atol, b


# ----------------------------------------------------------------------------------------------------
# The filter.

@pytest.mark.parametrize("h,w", [(7, 7), (14, 14), (6, 9), (1, 1), (2, 3), (28, 28)])
def test_published_filter_vs_reference_and_the_authors_conv(device, h, w):
    """Our filter equals the NumPy reference, and torch's conv2d(padding="same") with the kernel as the
    authors call it (even sizes: asymmetric padding); the mean shortcut equals the filtered map's mean."""
    rng = np.random.default_rng(h * 31 + w)
    g = torch.from_numpy(rng.normal(scale=0.1, size=(4, h, w))).to(device)
    ours = published_filter(g)
    ref = np.stack([published_filter_reference(x) for x in g.cpu().numpy()])
    np.testing.assert_allclose(ours.cpu().numpy(), ref, rtol=0, atol=1e-12)
    kernel = published_kernel(g)
    with warnings.catch_warnings():  # torch warns once about even kernel sizes with "same"
        warnings.simplefilter("ignore", UserWarning)
        authors = torch.stack([F.conv2d(x[None, None], k[None, None], padding="same")[0, 0]
                               for x, k in zip(g, kernel)])
    torch.testing.assert_close(ours, authors, rtol=0, atol=1e-12)
    torch.testing.assert_close(published_filter_mean(g), ours.mean(dim=(1, 2)), rtol=0, atol=1e-12)


def test_published_kernel_definition():
    """Centre at (h/2, w/2), range weights around the mean, normalised by sum + 1e-6."""
    g = torch.zeros(1, 5, 4, dtype=torch.float64)
    k = published_kernel(g)[0]
    i, j = torch.meshgrid(torch.arange(5.0), torch.arange(4.0), indexing="ij")
    s = torch.exp(-((i - 2.5) ** 2 + (j - 2.0) ** 2) / 50).double()
    torch.testing.assert_close(k, s / (s.sum() + 1e-6))
    g[0, 0, 0] = 0.1  # far from the mean: range weight exp(-(0.1 - mean)^2 / 0.02)
    k = published_kernel(g)[0]
    mean = 0.1 / 20
    r = torch.full((5, 4), np.exp(-mean ** 2 / 0.02), dtype=torch.float64)
    r[0, 0] = np.exp(-(0.1 - mean) ** 2 / 0.02)
    torch.testing.assert_close(k, s * r / ((s * r).sum() + 1e-6))


# ----------------------------------------------------------------------------------------------------
# The CAM against the reference.

@pytest.mark.parametrize("C,h,w", [(64, 7, 7), (101, 7, 7), (48, 14, 14), (80, 5, 9), (33, 28, 28)])
def test_paper_vs_reference_synthetic(device, C, h, w):
    rng = np.random.default_rng(C + 7 * h + w)
    acts, grads = make_features(rng, 3, C, h, w)
    a, g = torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device)
    res = cfcam_from_features(a, g, variant="paper")
    assert_matches_paper_reference(res, acts, grads)
    assert (res.labels == -2).any(dim=1).all() and not res.all_noise.any()
    torch.testing.assert_close(res.weights.sum(dim=1), torch.ones(3, device=device))


@pytest.mark.parametrize("layer", ["layer3.-1", "layer4.-1"])
def test_paper_vs_reference_resnet50(resnet50_features, layer):
    acts, grads = resnet50_features[layer][0][:3], resnet50_features[layer][1][:3]
    res = cfcam_paper_from_features(acts, grads)
    assert_matches_paper_reference(res, acts.numpy(), grads.numpy())
    assert (res.n_clusters >= 1).all()


@pytest.mark.parametrize("layer", ["bn2", "blocks.-1"])
def test_paper_vs_reference_lite0(lite0_features, layer):
    """Lite0 bn2 (ReLU6): many dead and duplicate channels among the clustered ones."""
    acts, grads = lite0_features[layer][0][:3], lite0_features[layer][1][:3]
    res = cfcam_paper_from_features(acts, grads)
    assert_matches_paper_reference(res, acts.numpy(), grads.numpy())


def test_batch_equals_one_by_one_and_sklearn_backend(lite0_features):
    acts, grads = lite0_features["blocks.-1"][0], lite0_features["blocks.-1"][1]
    whole = cfcam_paper_from_features(acts, grads)
    for b in range(acts.shape[0]):
        one = cfcam_paper_from_features(acts[b:b + 1], grads[b:b + 1])
        assert torch.equal(one.labels[0], whole.labels[b]) and torch.equal(one.eps[0], whole.eps[b])
        torch.testing.assert_close(one.cams[0], whole.cams[b], rtol=0, atol=1e-6)
    sk = cfcam_paper_from_features(acts[:2], grads[:2], backend="sklearn")
    assert torch.equal(sk.labels, whole.labels[:2]) and torch.equal(sk.eps, whole.eps[:2])
    torch.testing.assert_close(sk.cams, whole.cams[:2], rtol=0, atol=1e-6)


def test_important_channels_are_the_top_quarter_by_norm(resnet50_features):
    acts = resnet50_features["layer4.-1"][0][:2]
    got = important_channels(acts)
    for b in range(2):
        norms = np.linalg.norm(acts[b].flatten(1).double().numpy(), axis=1)
        assert np.array_equal(got[b].numpy(), norms >= np.percentile(norms, 75))


def test_float32_features_route_equals_float64_route(resnet50_features):
    """The CPU float32 (screened) route and the float64 route agree on the published eps rule."""
    acts, grads = resnet50_features["layer4.-1"][0][:2], resnet50_features["layer4.-1"][1][:2]
    a = cfcam_paper_from_features(acts, grads)
    b = cfcam_paper_from_features(acts.double(), grads.double())
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.cams, b.cams, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Edge cases.

@pytest.mark.parametrize("sync_free", [False, True])
def test_every_channel_important_and_tiny_subsets(sync_free):
    """Equal norms (every channel important: nothing clustered, eps 0), two channels (one clustered
    alone: noise, eps the floor), one channel."""
    acts = torch.ones(1, 6, 4, 4)
    grads = torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    res = cfcam_paper_from_features(acts, grads, sync_free=sync_free)
    assert (res.labels == -2).all() and res.eps.item() == 0 and int(res.n_clusters[0]) == 0
    assert not res.all_noise.any()
    torch.testing.assert_close(res.weights, grads.mean(dim=(2, 3)).softmax(dim=1))
    for C in (1, 2, 3):
        a = torch.arange(1.0, C + 1).reshape(1, C, 1, 1).expand(1, C, 3, 3).contiguous()
        g = torch.randn(1, C, 3, 3, generator=torch.Generator().manual_seed(C))
        res = cfcam_paper_from_features(a, g, sync_free=sync_free)
        assert_matches_paper_reference(res, a.numpy(), g.numpy())


def test_all_dead_activations_give_zero_maps():
    res = cfcam_paper_from_features(torch.zeros(2, 8, 5, 5), torch.randn(2, 8, 5, 5))
    assert (res.cams == 0).all() and (res.labels == -2).all()


def test_variant_errors():
    a = torch.rand(1, 8, 4, 4)
    with pytest.raises(ValueError, match="variant"):
        cfcam_from_features(a, a, variant="published")
    with pytest.raises(ValueError, match="exclude_dead"):
        cfcam_from_features(a, a, variant="paper", exclude_dead=True)
    with pytest.raises(ValueError, match="backend"):
        cfcam_from_features(a, a, variant="paper", backend="cuml")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ValueError, match="variant"):
        CFCAM(model, model[0], variant="nope")
    with pytest.raises(ValueError, match="exclude_dead"):
        CFCAM(model, model[0], variant="paper", exclude_dead=True)


# ----------------------------------------------------------------------------------------------------
# Engine and registry.

def test_engine_and_registry(resnet18, image_batch):
    images = image_batch[:3]
    acts, grads, targets, _ = capture_features(resnet18, resnet18.layer4[-1], images)
    expected = cfcam_paper_from_features(acts, grads)
    for cam in (CFCAM(resnet18, "layer4.-1", variant="paper"), build_method("cfcam-paper", resnet18, "layer4.-1")):
        got = cam(images)
        assert torch.equal(got.targets, targets) and torch.equal(got.labels, expected.labels)
        torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)
    fn = from_features_fn("cfcam-paper")
    torch.testing.assert_close(fn(acts, grads).cams, expected.cams, rtol=0, atol=0)
    seed = CFCAM(resnet18, "layer4.-1")(images)
    assert not torch.equal(seed.cams, expected.cams)
