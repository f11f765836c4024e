"""cam.py: the pure CF-CAM / Grad-CAM functions vs the per-image NumPy/scikit-learn/OpenCV reference."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfcam_gpu import (cfcam_from_features, cluster_weights, gradcam_from_features,
                       weighted_cam)
from cfcam_gpu.reference import cfcam_reference, gradcam_reference
from helpers import assert_matches_reference, make_features, ximgproc


# ----------------------------------------------------------------------------------------------------
# Parity with the reference path.

@pytest.mark.parametrize("C,h,w", [(64, 7, 7), (101, 7, 7), (48, 14, 14), (80, 5, 9), (40, 4, 4), (33, 28, 28)])
def test_cfcam_vs_reference(device, C, h, w):
    rng = np.random.default_rng(C + 7 * h + w)
    acts, grads = make_features(rng, 3, C, h, w)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert_matches_reference(res, acts, grads)
    assert (res.n_clusters >= 1).all() and not res.all_noise.any()
    peaks = res.cams.amax(dim=(1, 2)).cpu()
    assert ((peaks == 1) | (peaks == 0)).all() and (peaks == 1).any()
    assert (res.cams >= 0).all()


def test_cfcam_backend_sklearn_equals_torch(device):
    acts, grads = make_features(np.random.default_rng(1), 3, 64, 7, 7)
    a = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    b = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device),
                            backend="sklearn")
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.cams, b.cams, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=1e-9)


def test_gradcam_vs_reference(device):
    acts, grads = make_features(np.random.default_rng(2), 4, 50, 7, 9)
    res = gradcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert res.labels is None and res.n_clusters is None and res.all_noise is None
    np.testing.assert_allclose(res.weights.cpu().numpy(), grads.mean(axis=(2, 3)), rtol=1e-5, atol=1e-10)
    for b in range(4):
        np.testing.assert_allclose(res.cams[b].cpu().numpy(), gradcam_reference(acts[b], grads[b]),
                                   rtol=0, atol=1e-5)


def test_cluster_weights_definition(device):
    """Weights from the contract step by step: cluster means, guided filter (OpenCV), spatial mean."""
    rng = np.random.default_rng(3)
    B, C, h, w = 2, 12, 14, 14
    grads = rng.normal(size=(B, C, h, w)).astype(np.float32)
    labels = np.array([[0, 0, 1, -1, 1, 2, 2, 2, -1, 0, 1, 3],
                       [-1, -1, 0, 0, 0, 1, 1, -1, 0, 1, 1, 1]])
    got = cluster_weights(torch.from_numpy(grads).to(device), torch.from_numpy(labels).to(device)).cpu().numpy()
    assert got.shape == (B, C)
    for b in range(B):
        for c in range(C):
            k = labels[b, c]
            if k < 0:
                assert got[b, c] == 0
                continue
            m = grads[b][labels[b] == k].mean(axis=0)
            filt = ximgproc().guidedFilter(guide=m, src=m, radius=int(np.sqrt(h * w) / 4), eps=0.1 * float(np.var(m)))
            assert abs(got[b, c] - filt.mean()) <= 5e-4 * np.abs(m).max()


def test_weighted_cam_vs_numpy(device):
    rng = np.random.default_rng(4)
    acts = rng.normal(size=(3, 10, 5, 6)).astype(np.float32)
    wts = rng.normal(size=(3, 10)).astype(np.float32)
    wts[2] = -np.abs(wts[2])
    acts[2] = np.abs(acts[2])  # all-negative CAM: relu gives zeros, no division
    got = weighted_cam(torch.from_numpy(acts).to(device), torch.from_numpy(wts).to(device)).cpu().numpy()
    for b in range(3):
        cam = np.maximum((wts[b][:, None, None] * acts[b]).sum(0), 0)
        cam = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(got[b], cam, rtol=0, atol=1e-6)
    assert (got[2] == 0).all()


# ----------------------------------------------------------------------------------------------------
# Batch invariance.

def test_batch_of_8_equals_8_single_calls(device):
    acts, grads = make_features(np.random.default_rng(5), 8, 96, 7, 7)
    a, g = torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device)
    batch = cfcam_from_features(a, g)
    for b in range(8):
        one = cfcam_from_features(a[b:b + 1], g[b:b + 1])
        assert torch.equal(batch.labels[b], one.labels[0])
        assert batch.eps[b] == one.eps[0]
        torch.testing.assert_close(batch.cams[b], one.cams[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(batch.weights[b], one.weights[0], rtol=1e-5, atol=1e-9)
    gb = gradcam_from_features(a, g)
    for b in range(8):
        torch.testing.assert_close(gb.cams[b], gradcam_from_features(a[b:b + 1], g[b:b + 1]).cams[0],
                                   rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Edge cases: finite answers everywhere.

def test_eps_zero_many_dead_channels(device):
    rng = np.random.default_rng(6)
    acts, grads = make_features(rng, 3, 60, 7, 7, dead_frac=0.0)
    for b in range(3):
        acts[b, rng.permutation(60)[:36]] = 0  # 60% dead: > 25% of the distances are 0
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert (res.eps == 0).all()
    assert_matches_reference(res, acts, grads)
    dead = ~acts.reshape(3, 60, -1).any(axis=2)
    for b in range(3):
        lab = res.labels[b].cpu().numpy()
        assert len(set(lab[dead[b]].tolist())) == 1 and lab[dead[b]][0] >= 0
        assert (lab[~dead[b]] == -1).all()  # no duplicates among the live channels
    # all dead channels carry zero activation: the CAM is zero, and finite
    assert (res.cams == 0).all()


def test_eps_zero_with_duplicated_live_channels(device):
    rng = np.random.default_rng(7)
    acts, grads = make_features(rng, 2, 40, 7, 7, dead_frac=0.0)
    acts[:, 10:30] = 0
    acts[:, 31] = acts[:, 32] = acts[:, 33] = acts[:, 5]  # a live duplicate group: a real cluster
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert (res.eps == 0).all() and (res.n_clusters == 2).all()
    assert_matches_reference(res, acts, grads)
    w = res.weights.cpu()
    assert (w[:, [31, 32, 33]] == w[:, [5]]).all() and (w[:, 5] != 0).all()  # one cluster, one weight


def test_constant_gradients(device, guarded_reference):
    """Constant cluster means pass the guided filter unchanged: each weight is its cluster's constant."""
    rng = np.random.default_rng(8)
    acts, _ = make_features(rng, 3, 64, 7, 7)
    grads = np.broadcast_to(rng.normal(size=(3, 64, 1, 1)), acts.shape).astype(np.float32).copy()
    grads[2] = 0.25  # one image with one constant value everywhere (float32 variance exactly 0)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert torch.isfinite(res.cams).all() and torch.isfinite(res.weights).all()
    assert_matches_reference(res, acts, grads, reference=guarded_reference)
    lab = res.labels.cpu().numpy()
    w = res.weights.cpu().numpy()
    for b in range(3):
        assert (w[b][lab[b] == -1] == 0).all()
        for k in range(int(res.n_clusters[b])):
            expected = grads[b, lab[b] == k, 0, 0].astype(np.float64).mean()
            np.testing.assert_allclose(w[b][lab[b] == k], expected, rtol=1e-5, atol=1e-7)
        cam = np.maximum((w[b][:, None, None] * acts[b]).sum(0), 0)
        cam = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(res.cams[b].cpu().numpy(), cam, rtol=0, atol=1e-5)


def test_reference_constant_gradients_not_exactly_zero_variance():
    act = np.ones((2, 7, 7), np.float32)
    grad = np.full((2, 7, 7), 0.3, np.float32)
    ref = cfcam_reference(act, grad)
    assert ref.labels.tolist() == [0, 0]
    assert np.isfinite(ref.weights).all() and np.isfinite(ref.cam).all()
    np.testing.assert_allclose(ref.weights, 0.3, rtol=1e-6)
    ours = cfcam_from_features(torch.from_numpy(act)[None], torch.from_numpy(grad)[None])
    np.testing.assert_allclose(ours.weights[0].numpy(), ref.weights, rtol=1e-6)


def test_one_by_one_maps(device):
    rng = np.random.default_rng(9)
    acts = np.abs(rng.normal(size=(3, 50, 1, 1))).astype(np.float32)
    acts[:, :10] = acts[:, :1]  # ties
    grads = rng.normal(size=(3, 50, 1, 1)).astype(np.float32)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert res.cams.shape == (3, 1, 1)
    assert_matches_reference(res, acts, grads)
    # 1x1: radius 0 and eps_k = 0: the weights are the plain cluster means of the gradients
    lab = res.labels.cpu().numpy()
    for b in range(3):
        for k in range(int(res.n_clusters[b])):
            np.testing.assert_allclose(res.weights[b].cpu().numpy()[lab[b] == k],
                                       grads[b, lab[b] == k].mean(), rtol=1e-5)


@pytest.mark.parametrize("C", [1, 2, 3, 4])
def test_tiny_channel_counts_all_noise(device, C):
    rng = np.random.default_rng(10 + C)
    acts = np.abs(rng.normal(size=(2, C, 5, 4))).astype(np.float32) + 0.1  # distinct channels
    grads = rng.normal(size=(2, C, 5, 4)).astype(np.float32)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert res.all_noise.all() and (res.n_clusters == 0).all()
    assert (res.labels == -1).all() and (res.weights == 0).all() and (res.cams == 0).all()
    assert_matches_reference(res, acts, grads)


def test_two_duplicate_channels_form_a_cluster(device):
    rng = np.random.default_rng(11)
    acts = np.abs(rng.normal(size=(1, 2, 6, 6))).astype(np.float32)
    acts[0, 1] = acts[0, 0]
    grads = rng.normal(size=(1, 2, 6, 6)).astype(np.float32)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert res.eps[0] == 0 and res.labels[0].tolist() == [0, 0] and not res.all_noise[0]
    assert_matches_reference(res, acts, grads)


def test_non_square_maps(device):
    acts, grads = make_features(np.random.default_rng(12), 2, 70, 6, 11)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert res.cams.shape == (2, 6, 11)
    assert_matches_reference(res, acts, grads)
    assert res.upsample((60, 110)).shape == (2, 60, 110)


def test_float64_inputs(device):
    acts, grads = make_features(np.random.default_rng(13), 2, 64, 7, 7)
    res = cfcam_from_features(torch.from_numpy(acts).double().to(device), torch.from_numpy(grads).double().to(device))
    assert res.cams.dtype == torch.float32 and torch.isfinite(res.cams).all()
    ref = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    assert torch.equal(res.labels, ref.labels)  # well-separated data: same partition in either precision
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(device, dtype):
    """Autocast-style half inputs: clustering and filtering run in float32 on the same values."""
    acts, grads = make_features(np.random.default_rng(15), 2, 48, 7, 7)
    a, g = torch.from_numpy(acts).to(device).to(dtype), torch.from_numpy(grads * 1e3).to(device).to(dtype)
    res = cfcam_from_features(a, g)
    ref = cfcam_from_features(a.float(), g.float())
    assert res.cams.dtype == torch.float32 and res.eps.dtype == torch.float32
    assert torch.equal(res.labels, ref.labels)
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# upsample.

def test_upsample_bilinear(device):
    acts, grads = make_features(np.random.default_rng(14), 2, 40, 7, 7)
    res = cfcam_from_features(torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device))
    up = res.upsample((224, 200))
    assert up.shape == (2, 224, 200) and up.device == res.cams.device
    expected = F.interpolate(res.cams[:, None], size=(224, 200), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(up, expected, rtol=0, atol=0)
    for b in range(2):  # independent oracle: OpenCV's bilinear resize (half-pixel centres)
        cv = cv2.resize(res.cams[b].cpu().numpy(), (200, 224), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(up[b].cpu().numpy(), cv, rtol=0, atol=1e-5)
    assert res.upsample(32).shape == (2, 32, 32)


# ----------------------------------------------------------------------------------------------------
# Bad input.

def test_bad_inputs(device):
    a = torch.rand(3, 8, 5, 5, device=device)
    g = torch.rand(3, 8, 5, 5, device=device)
    for fn in (cfcam_from_features, gradcam_from_features):
        with pytest.raises(ValueError, match="activations"):
            fn(a[0], g[0])
        with pytest.raises(ValueError, match="gradients"):
            fn(a, g[:, :, :4])
        with pytest.raises(ValueError, match="gradients"):
            fn(a, g[:2])
        with pytest.raises(TypeError, match="activations"):
            fn(a.long(), g)
        with pytest.raises(TypeError, match="gradients"):
            fn(a, g.int())
        with pytest.raises(TypeError, match="activations"):
            fn(a.cpu().numpy(), g)
        with pytest.raises(ValueError, match="activations"):
            fn(a[:, :0], g[:, :0])
        bad = a.clone()
        bad[2, 3, 1, 1] = float("nan")
        with pytest.raises(ValueError, match=r"activations.*image index 2"):
            fn(bad, g)
        badg = g.clone()
        badg[1, 0, 0, 0] = float("inf")
        with pytest.raises(ValueError, match=r"gradients.*image index 1"):
            fn(a, badg)
    with pytest.raises(ValueError, match="backend"):
        cfcam_from_features(a, g, backend="nope")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mismatched_devices():
    with pytest.raises(ValueError, match="gradients.*device"):
        cfcam_from_features(torch.rand(1, 4, 3, 3), torch.rand(1, 4, 3, 3, device="cuda"))


# ----------------------------------------------------------------------------------------------------
# No NaN from finite input (power-of-two scaling before squaring or multiplying).

def _two_identical_channels():
    acts = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(1, 2, 1, 1)
    grads = torch.tensor([1, -1, 2, .5, 0, 1, 3, -2, 1, 1, 0, 2, -1, 0, 1, 2.0]).reshape(1, 1, 4, 4)
    return acts, grads.repeat(1, 2, 1, 1)


@pytest.mark.parametrize("dtype,act_scale,grad_scale", [
    (torch.float32, 1.0, 5e18), (torch.float32, 1.0, 1.5e19), (torch.float32, 1e19, 1e19),
    (torch.float32, 2e37, 1e38), (torch.float64, 1e20, 1e20), (torch.float64, 1.0, 1e150),
    (torch.float64, 1e150, 1e150), (torch.float64, 1e-300, 1e-300)])
def test_finite_maps_for_finite_inputs_at_any_scale(device, dtype, act_scale, grad_scale):
    """Two identical channels (one cluster); gradients up to the dtype's range: finite weights, the same
    CAM as at scale 1 (the normalised CAM is scale-invariant), and check_values accepts finite values."""
    acts, grads = _two_identical_channels()
    acts, grads = acts.to(device, dtype), grads.to(device, dtype)  # scaled in the dtype itself
    base = cfcam_from_features(acts, grads)
    res = cfcam_from_features(acts * act_scale, grads * grad_scale)
    assert torch.isfinite(res.weights).all() and torch.isfinite(res.cams).all()
    assert res.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(res.cams, base.cams, rtol=0, atol=1e-6)
    torch.testing.assert_close(res.weights.double() / grad_scale, base.weights.double(), rtol=1e-6, atol=0)
    g = gradcam_from_features(acts * act_scale, grads * grad_scale)
    assert torch.isfinite(g.weights).all() and torch.isfinite(g.cams).all()


def test_check_values_rejects_only_nan_and_inf():
    acts, grads = _two_identical_channels()
    acts, grads = acts.double(), grads.double() * 1e150
    cfcam_from_features(acts, grads)  # finite: accepted
    for bad in (float("nan"), float("inf")):
        g = grads.clone()
        g[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="image index 0"):
            cfcam_from_features(acts, g)


def test_scaling_changes_nothing_in_the_normal_range(device):
    """Power-of-two scaling is exact: a power-of-two multiple of the inputs gives the same CAM and
    labels bit for bit, and the weights scaled exactly."""
    acts, grads = make_features(np.random.default_rng(21), 3, 64, 7, 7)
    a, g = torch.from_numpy(acts).to(device), torch.from_numpy(grads).to(device)
    base = cfcam_from_features(a, g)
    res = cfcam_from_features(a * 2.0**40, g * 2.0**-30)
    assert torch.equal(res.labels, base.labels) and torch.equal(res.cams, base.cams)
    assert torch.equal(res.weights, base.weights * 2.0**-30)


def test_reference_clusters_float64_in_float64():
    """cfcam_reference follows the input's dtype, as scikit-learn does: float64 activations give the
    float64 eps and labels of cfcam_from_features on float64 features (float32 ones: the float32 eps).
    (scikit-learn's own distances come from a Gram matrix, inexact between near-duplicate channels, so
    the data here keeps clusters apart by more than its rounding.)"""
    rng = np.random.default_rng(22)
    for _ in range(8):
        protos = rng.standard_normal((3, 36))
        act = (protos[rng.integers(0, 3, size=24)] + 0.05 * rng.standard_normal((24, 36))).reshape(24, 6, 6)
        grad = rng.standard_normal((24, 6, 6))
        ref = cfcam_reference(act, grad)
        ours = cfcam_from_features(torch.from_numpy(act)[None], torch.from_numpy(grad)[None])
        assert isinstance(ref.eps, np.float64) and ours.eps.dtype == torch.float64
        assert ours.eps[0].item() == pytest.approx(ref.eps, rel=1e-15)  # scipy sums in its own order
        assert np.array_equal(ours.labels[0].numpy(), ref.labels)
        ref32 = cfcam_reference(act.astype(np.float32), grad)
        ours32 = cfcam_from_features(torch.from_numpy(act).float()[None], torch.from_numpy(grad)[None])
        assert isinstance(ref32.eps, np.float32) and ours32.eps[0].item() == ref32.eps
