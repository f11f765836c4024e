"""smoothing.py and the engines' ``eigen_smooth`` / ``aug_smooth`` options vs pytorch-grad-cam 1.5.7
(its ``eigen_smooth`` / ``aug_smooth`` with ttach's default transforms) on a seeded ResNet18, plus batched
== one-by-one, chunking, the targets rule and no host reads on the sync-free path."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (EigenCAM as PgcEigenCAM, GradCAM as PgcGradCAM,
                              GradCAMPlusPlus as PgcGradCAMPlusPlus, HiResCAM as PgcHiResCAM,
                              LayerCAM as PgcLayerCAM, XGradCAM as PgcXGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cfcam_gpu import CFCAM, GradCAM
from cfcam_gpu.methods import AblationCAM, EigenCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM
from cfcam_gpu.smoothing import augment, augmentations, deaugment_mean, eigen_smooth

from helpers import capture_features, patch_pgc_sign, refuse_host_reads, upsampled_rescaled

SIZE = 96


@pytest.fixture(scope="module")
def targets(resnet18, x3):
    with torch.no_grad():
        return resnet18(x3).argmax(1).tolist()


def pgc_maps(cls, model, layer, x, targets, **kw):
    with cls(model, [layer]) as cam:
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets], **kw)


def assert_close_maps(ours: np.ndarray, ref: np.ndarray, atol=2e-3):
    assert ours.shape == ref.shape
    for b in range(len(ref)):
        assert ref[b].std() > 0.02, f"image {b}: degenerate oracle map"
        assert np.abs(ours[b] - ref[b]).max() < atol, (b, np.abs(ours[b] - ref[b]).max())


EIGEN_SMOOTH = [(GradCAM, PgcGradCAM), (GradCAMPlusPlus, PgcGradCAMPlusPlus), (XGradCAM, PgcXGradCAM),
                (LayerCAM, PgcLayerCAM), (HiResCAM, PgcHiResCAM)]


@pytest.mark.parametrize("ours_cls,pgc_cls", EIGEN_SMOOTH, ids=[c.__name__ for c, _ in EIGEN_SMOOTH])
def test_eigen_smooth_matches_pytorch_grad_cam(resnet18, x3, targets, monkeypatch, ours_cls, pgc_cls):
    patch_pgc_sign(monkeypatch)
    layer = resnet18.layer3[-1]
    ref = pgc_maps(pgc_cls, resnet18, layer, x3, targets, eigen_smooth=True)
    plain = ours_cls(resnet18, layer)(x3, targets)
    res = ours_cls(resnet18, layer)(x3, targets, eigen_smooth=True)
    assert not torch.allclose(res.cams, plain.cams, atol=1e-2)  # the option changes the map
    assert torch.equal(res.weights, plain.weights) and torch.equal(res.targets, plain.targets)
    assert_close_maps(upsampled_rescaled(res.cams, x3.shape[-2:]), ref)


def test_eigen_smooth_is_the_projection_of_the_weighted_activations(resnet18, x3, targets):
    """CF-CAM and Ablation-CAM (no pytorch-grad-cam oracle for CF-CAM; Ablation-CAM's is slow): the map
    is ``eigen_smooth(weights x activations)`` of the same call; ``explain`` gives the same."""
    layer = resnet18.layer3[-1]
    acts, _, _, _ = capture_features(resnet18, layer, x3, targets)
    for cls, opts in ((CFCAM, {}), (AblationCAM, {"ablation_batch_size": 256})):
        res = cls(resnet18, layer, **opts)(x3, targets, eigen_smooth=True)
        expected = eigen_smooth(res.weights[:, :, None, None] * acts)
        torch.testing.assert_close(res.cams, expected, rtol=0, atol=1e-5)
    with CFCAM(resnet18, layer) as cam:
        explained = cam.explain(resnet18(x3), targets, eigen_smooth=True)
    torch.testing.assert_close(explained.cams, CFCAM(resnet18, layer)(x3, targets, eigen_smooth=True).cams,
                               rtol=0, atol=1e-5)


AUG = [(GradCAM, PgcGradCAM, False), (GradCAM, PgcGradCAM, True), (EigenCAM, PgcEigenCAM, False)]


@pytest.mark.parametrize("ours_cls,pgc_cls,eigen", AUG, ids=["gradcam", "gradcam-eigen", "eigencam"])
def test_aug_smooth_matches_pytorch_grad_cam(resnet18, x3, targets, monkeypatch, ours_cls, pgc_cls, eigen):
    patch_pgc_sign(monkeypatch)
    layer = resnet18.layer3[-1]
    ref = pgc_maps(pgc_cls, resnet18, layer, x3, targets, aug_smooth=True, eigen_smooth=eigen)
    res = ours_cls(resnet18, layer)(x3, targets, aug_smooth=True, eigen_smooth=eigen)
    assert res.cams.shape == (3, SIZE, SIZE)
    assert_close_maps(res.cams.numpy(), ref)
    plain = ours_cls(resnet18, layer)(x3, targets)
    torch.testing.assert_close(res.logits, plain.logits)  # the un-augmented copy's fields
    torch.testing.assert_close(res.weights, plain.weights)


def test_aug_smooth_one_forward_chunking_and_batching(resnet18, x3, targets, monkeypatch):
    """All 6 B copies in one model pass; chunk_size splits them with the same result; each image alone
    gives its row of the batch; CF-CAM works too."""
    layer = resnet18.layer3[-1]
    calls = []
    handle = resnet18.register_forward_pre_hook(lambda m, inp: calls.append(inp[0].shape[0]))
    try:
        whole = CFCAM(resnet18, layer)(x3, targets, aug_smooth=True)
    finally:
        handle.remove()
    assert calls == [18]
    chunked = CFCAM(resnet18, layer, chunk_size=5)(x3, targets, aug_smooth=True)
    torch.testing.assert_close(chunked.cams, whole.cams, rtol=0, atol=1e-5)
    for b in range(3):
        alone = CFCAM(resnet18, layer)(x3[b:b + 1], targets[b:b + 1], aug_smooth=True)
        torch.testing.assert_close(alone.cams[0], whole.cams[b], rtol=0, atol=1e-5)
        assert torch.equal(alone.labels[0], whole.labels[b])


def test_aug_smooth_targets(resnet18, x3, targets):
    """None: each copy its own top-1 (pytorch-grad-cam); an int or B indices: that class in every copy."""
    layer = resnet18.layer3[-1]
    cam = GradCAM(resnet18, layer)
    x2, t2 = x3[:2], targets[:2]
    torch.testing.assert_close(cam(x2, torch.tensor(t2), aug_smooth=True).cams, cam(x2, t2, aug_smooth=True).cams)
    assert cam(x2, 5, aug_smooth=True).targets.tolist() == [5, 5]
    with pytest.raises(ValueError, match="targets: expected 2 class indices"):
        cam(x2, targets, aug_smooth=True)


def test_augment_and_deaugment_are_inverse():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 8, 10, generator=g)
    augs = augmentations()
    assert augs == [(False, 0.9), (False, 1.0), (False, 1.1), (True, 0.9), (True, 1.0), (True, 1.1)]
    copies = augment(images, augs)
    assert copies.shape == (12, 3, 8, 10)
    torch.testing.assert_close(copies[3 * 2 + 1], images[1].flip(-1) * 0.9)  # copy 3 = (flip, 0.9)
    maps = images[:, 0]
    torch.testing.assert_close(deaugment_mean(augment(maps[:, None], augs)[:, 0] / torch.tensor(
        [f for _, f in augs]).repeat_interleave(2)[:, None, None], augs), maps)


def test_sync_free_smoothing_reads_nothing(resnet18, x3, monkeypatch):
    layer = resnet18.layer3[-1]
    expected = GradCAM(resnet18, layer)(x3, None, aug_smooth=True, eigen_smooth=True)
    cam = CFCAM(resnet18, layer, check_values=False, sync_free=True)
    cf_expected = CFCAM(resnet18, layer)(x3, None, eigen_smooth=True)
    with refuse_host_reads(monkeypatch):
        got = GradCAM(resnet18, layer, check_values=False)(x3, None, aug_smooth=True, eigen_smooth=True)
        cf = cam(x3, None, eigen_smooth=True)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-5)
    torch.testing.assert_close(cf.cams, cf_expected.cams, rtol=0, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_in_eigen_smoothing_fullgrad_and_road():
    """On CUDA (sync-free by default), with targets=None and check_values=False, nothing synchronises
    with the host: EigenCAM, KPCA-CAM, CF-CAM with eigen_smooth and aug_smooth, FullGrad with eigen_smooth,
    and ROAD (set_sync_debug_mode('error') raises on any sync)."""
    import torchvision

    from cfcam_gpu.methods import FullGrad, KPCACAM
    from cfcam_gpu.road import road

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    x = torch.randn(4, 3, 112, 112, device="cuda")
    runs = [lambda: EigenCAM(model, "layer4.-1", check_values=False)(x).cams,
            lambda: KPCACAM(model, "layer3.-1", check_values=False)(x).cams,
            lambda: CFCAM(model, "layer4.-1", check_values=False)(x, aug_smooth=True, eigen_smooth=True).cams,
            lambda: FullGrad(model, check_values=False)(x, eigen_smooth=True).cams]
    cams = torch.rand(4, 7, 7, device="cuda")
    targets = torch.zeros(4, dtype=torch.long, device="cuda")
    runs.append(lambda: road(model, x, cams, targets, percentiles=(20, 80), noise=0.0).combined)
    expected = [run() for run in runs]  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [run() for run in runs]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
