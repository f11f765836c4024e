"""Real activations: ResNet50 (random weights, seed 0) and pretrained EfficientNet-Lite0 on bundled photos.

Partitions identical to the reference path (scipy's cdist, numpy's percentile, scikit-learn's DBSCAN on
the precomputed float64 distances) and to the exact relation ``d <= eps`` on the brute-force float64
squared distances; CAMs within 1e-3 of ``cfcam_reference``; the eps == 0 case that real photos produce.
(Plain ``DBSCAN(eps).fit(F)`` on the float32 features differs on some of these layers: it compares with
eps**2 rounded to float32 and drops pairs at exactly eps; see test_cluster.)
Features are captured once per session in conftest (our own hooks + autograd.grad of the top-1 logit).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.cluster import DBSCAN

from cfcam_gpu import CFCAM, GradCAM, cfcam_from_features, gradcam_from_features
import cfcam_gpu.reference as reference_module
from cfcam_gpu.reference import gradcam_reference
from helpers import brute_squared, dbscan_labels, rank_neighbours


pytestmark = pytest.mark.slow


def _check_against_reference(acts: torch.Tensor, grads: torch.Tensor, device, cfcam_reference):
    """One batched call vs per-image reference and the exact rank relation. Returns the result.

    ``cfcam_reference``: the reference function (the ``guarded_reference`` fixture, see conftest)."""
    res = cfcam_from_features(acts.to(device), grads.to(device))
    assert torch.isfinite(res.cams).all() and torch.isfinite(res.weights).all()
    a = acts.numpy()
    g = grads.numpy()
    B, C, h, w = a.shape
    for b in range(B):
        ref = cfcam_reference(a[b], g[b])
        name = f"photo {b}"
        labels = res.labels[b].cpu().numpy()
        assert res.eps[b].item() == ref.eps, (name, res.eps[b].item(), ref.eps)
        assert res.min_samples == ref.min_samples == max(2, int(0.05 * C))
        assert np.array_equal(labels, ref.labels), (name, np.flatnonzero(labels != ref.labels)[:10])
        assert int(res.n_clusters[b]) == ref.n_clusters
        cam_err = np.abs(res.cams[b].cpu().numpy() - ref.cam).max()
        assert cam_err <= 1e-3, (name, cam_err)
        w_ref = ref.weights
        w_err = np.abs(res.weights[b].cpu().numpy() - w_ref).max()
        assert w_err <= 1e-3 * max(np.abs(w_ref).max(), 1e-30), (name, w_err, np.abs(w_ref).max())
        exact = dbscan_labels(rank_neighbours(brute_squared(a[b].reshape(C, h * w))), ref.min_samples)
        assert np.array_equal(labels, exact), (name, np.flatnonzero(labels != exact)[:10])
    return res


# ----------------------------------------------------------------------------------------------------
# ResNet50, random weights.

@pytest.mark.parametrize("layer,shape", [("layer3.-1", (1024, 14, 14)), ("layer4.-1", (2048, 7, 7))])
def test_resnet50_random_matches_reference(resnet50_features, device, guarded_reference, layer, shape):
    acts, grads, _, _ = resnet50_features[layer]
    assert acts.shape == (6,) + shape and acts.dtype == torch.float32
    res = _check_against_reference(acts, grads, device, guarded_reference)
    assert (res.eps > 0).all()
    assert (res.n_clusters >= 1).all()
    g = gradcam_from_features(acts.to(device), grads.to(device))
    for b in range(6):
        np.testing.assert_allclose(g.cams[b].cpu().numpy(), gradcam_reference(acts[b].numpy(), grads[b].numpy()),
                                   rtol=0, atol=1e-5)


def test_resnet50_engine_matches_captured_features(resnet50_random, resnet50_features, image_batch):
    """CFCAM end to end on two photos equals the pure function on independently captured features."""
    acts, grads, targets, logits = resnet50_features["layer4.-1"]
    res = CFCAM(resnet50_random, "layer4.-1")(image_batch[:2])
    ref = cfcam_from_features(acts[:2], grads[:2])
    assert torch.equal(res.targets, targets[:2])
    # the engine's no-grad forward may pick other CPU kernels than a grad-recording one: 1e-5-level drift
    torch.testing.assert_close(res.logits, logits[:2], rtol=1e-4, atol=1e-4)
    assert torch.equal(res.labels, ref.labels)
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=1e-4)
    for p in resnet50_random.parameters():
        assert p.grad is None


# ----------------------------------------------------------------------------------------------------
# EfficientNet-Lite0, pretrained.

def test_lite0_predictions_are_sensible(lite0_features, photo_names):
    _, _, targets, _ = lite0_features["bn2"]
    assert targets[photo_names.index("chelsea")].item() in (281, 282, 283, 284, 285)  # a cat
    assert targets[photo_names.index("coffee")].item() == 967  # espresso


@pytest.mark.parametrize("layer,C", [("bn2", 1280), ("conv_head", 1280), ("blocks.-1", 320)])
def test_lite0_matches_reference(lite0_features, device, guarded_reference, layer, C):
    acts, grads, _, _ = lite0_features[layer]
    assert acts.shape == (6, C, 7, 7)
    _check_against_reference(acts, grads, device, guarded_reference)


def test_lite0_eps_zero_on_first_bundled_photo(lite0_features, device, guarded_reference, photo_names):
    """bn2 (conv_head -> BN -> ReLU6) zeroes whole channels: on chelsea over a quarter of the channel
    distances are 0, so eps = 0. scikit-learn refuses eps = 0; our path answers, without NaN, with the
    documented rule (neighbours = exact duplicates: the dead channels form one cluster)."""
    chelsea = photo_names.index("chelsea")
    assert chelsea == 0
    acts, grads, _, _ = lite0_features["bn2"]
    F_ = acts[chelsea].reshape(1280, 49).numpy()
    dist = cdist(F_.astype(np.float64), F_.astype(np.float64)).astype(np.float32)
    assert (dist == 0).mean() > 0.25 and np.percentile(dist, 25) == 0
    res = cfcam_from_features(acts[chelsea:chelsea + 1].to(device), grads[chelsea:chelsea + 1].to(device))
    assert res.eps[0].item() == 0
    assert torch.isfinite(res.cams).all() and torch.isfinite(res.weights).all()
    with pytest.raises(ValueError, match="eps"):
        DBSCAN(eps=float(res.eps[0]), min_samples=res.min_samples).fit(F_)
    labels = res.labels[0].cpu().numpy()
    dead = ~F_.any(axis=1)
    assert dead.mean() > 0.5
    assert len(set(labels[dead].tolist())) == 1 and labels[dead][0] >= 0
    ref = guarded_reference(acts[chelsea].numpy(), grads[chelsea].numpy())
    assert np.array_equal(labels, ref.labels)
    assert np.abs(res.cams[0].cpu().numpy() - ref.cam).max() <= 1e-3
    # the other candidate last layers are not degenerate on the same photo
    for layer in ("conv_head", "blocks.-1"):
        a = lite0_features[layer][0][chelsea]
        assert cfcam_from_features(a[None], lite0_features[layer][1][chelsea][None]).eps[0] > 0


def test_lite0_eps_zero_also_with_its_own_normalisation(efficientnet_lite0, photos, capture, preprocess_photo):
    """The eps = 0 case does not hinge on the ImageNet mean/std: with the TF-Lite (0.5, 0.5) normalisation
    the chelsea bn2 map is degenerate too; the engine answers end to end without NaN."""
    x = torch.stack([preprocess_photo(photos["chelsea"], mean=(0.5,) * 3, std=(0.5,) * 3)])
    acts, grads, t, _ = capture(efficientnet_lite0, efficientnet_lite0.bn2, x)
    res = CFCAM(efficientnet_lite0, "bn2")(x)
    assert res.eps[0].item() == 0 and torch.isfinite(res.cams).all()
    assert torch.equal(res.targets, t)
    ref = cfcam_from_features(acts, grads)
    assert torch.equal(res.labels, ref.labels)
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=1e-5)
    g = GradCAM(efficientnet_lite0, "bn2")(x)
    assert torch.isfinite(g.cams).all()
    for p in efficientnet_lite0.parameters():
        assert p.grad is None


def test_reference_is_finite_on_resnet50_layer4(resnet50_features, photo_names):
    acts, grads, _, _ = resnet50_features["layer4.-1"]
    assert bool((grads == grads[:, :, :1, :1]).all())  # spatially constant gradients
    b = photo_names.index("astronaut")
    ref = reference_module.cfcam_reference(acts[b].numpy(), grads[b].numpy())
    assert np.isfinite(ref.weights).all() and np.isfinite(ref.cam).all()
