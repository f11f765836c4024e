"""methods/eigen.py: batched (kernel) principal-component projections vs pytorch-grad-cam 1.5.7's
``get_2d_projection`` / ``get_2d_projection_kernel`` (NumPy SVD / scikit-learn KernelPCA, one image at a
time), the sign rule, the sync-free eigen solver, and EigenCAM / EigenGradCAM / KPCA-CAM engines vs
pytorch-grad-cam's classes on a seeded ResNet18."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import EigenCAM as PgcEigenCAM, EigenGradCAM as PgcEigenGradCAM, KPCA_CAM as PgcKPCA
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection, get_2d_projection_kernel

from cfcam_gpu.methods import METHODS, build_method, from_features_fn
from cfcam_gpu.methods.eigen import (EigenCAM, EigenGradCAM, KPCACAM, eigencam_from_features,
                                     kernel_pca_projection, pca_projection, top_eigenpair)

from helpers import capture_features, patch_pgc_sign, refuse_host_reads, upsampled_rescaled

SIZE = 96


@pytest.fixture(scope="module")
def feats(resnet18, x3):
    """layer3 (B, 256, 6, 6: N < C) and layer2 (B, 128, 12, 12: N > C) activations and gradients."""
    return {name: capture_features(resnet18, layer, x3)[:2]
            for name, layer in (("layer3", resnet18.layer3[-1]), ("layer2", resnet18.layer2[-1]))}


def max_rel_diff_up_to_sign(ours: np.ndarray, ref: np.ndarray) -> float:
    s = np.sign((ours * ref).sum()) or 1.0
    return float(np.abs(ours - s * ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("layer", ["layer3", "layer2"])
@pytest.mark.parametrize("sync_free", [False, True])
def test_pca_projection_equals_numpy_svd_up_to_sign(feats, layer, sync_free):
    acts, grads = feats[layer]
    for x in (acts, grads * acts):
        ref = get_2d_projection(x.numpy())
        ours, v = pca_projection(x, sync_free=sync_free)
        assert ours.shape == ref.shape and v.shape == x.shape[:2]
        for b in range(len(ref)):
            assert max_rel_diff_up_to_sign(ours[b].numpy(), ref[b]) < 2e-3


@pytest.mark.parametrize("layer", ["layer3", "layer2"])
def test_sign_rule(feats, layer):
    """The projection correlates positively with the channel-mean map, whatever the channel order (a
    permutation changes the solver's own sign choices), and is the centred features times v."""
    acts = feats[layer][0]
    p, v = pca_projection(acts)
    assert ((p * acts.mean(dim=1)).sum(dim=(1, 2)) > 0).all()
    perm = torch.randperm(acts.shape[1], generator=torch.Generator().manual_seed(0))
    for sync_free in (False, True):
        q, w = pca_projection(acts[:, perm], sync_free=sync_free)
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4 * float(p.abs().max()))
        torch.testing.assert_close(w, v[:, perm], rtol=0, atol=1e-4)
    centred = acts.flatten(2) - acts.flatten(2).mean(dim=2, keepdim=True)
    torch.testing.assert_close(torch.einsum("bcn,bc->bn", centred, v), p.flatten(1), rtol=1e-4, atol=1e-4)
    # a negated input flips the component and the reference map together: the same rule, opposite map
    torch.testing.assert_close(pca_projection(-acts)[0], -p, rtol=1e-4, atol=1e-4)


def test_sign_rule_picks_the_side_of_the_mean_map():
    """A hand-made case: one bright blob carried by most channels; the projection is positive on it."""
    h = w = 8
    blob = torch.zeros(h, w)
    blob[2:5, 3:6] = 1.0
    g = torch.Generator().manual_seed(1)
    acts = blob * torch.rand(1, 64, 1, 1, generator=g) + 0.01 * torch.rand(1, 64, h, w, generator=g)
    for sync_free in (False, True):
        p = pca_projection(acts, sync_free=sync_free)[0][0]
        assert p[blob > 0].min() > 0 > p[blob == 0].max()


def test_batched_equals_one_by_one(feats):
    acts, grads = feats["layer3"]
    for sync_free in (False, True):
        whole = pca_projection(acts, sync_free=sync_free)[0]
        kpca = kernel_pca_projection(acts, sync_free=sync_free)
        for b in range(len(acts)):
            torch.testing.assert_close(pca_projection(acts[b:b + 1], sync_free=sync_free)[0][0], whole[b],
                                       rtol=1e-5, atol=1e-5 * float(whole.abs().max()))
            torch.testing.assert_close(kernel_pca_projection(acts[b:b + 1], sync_free=sync_free)[0], kpca[b],
                                       rtol=1e-5, atol=1e-5 * float(kpca.abs().max()))


@pytest.mark.parametrize("kernel", ["sigmoid", "rbf", "poly", "cosine"])
def test_kernel_pca_matches_scikit_learn(feats, kernel):
    acts = feats["layer3"][0]
    ref = get_2d_projection_kernel(acts.numpy(), kernel=kernel)
    for sync_free in (False, True):
        ours = kernel_pca_projection(acts, kernel=kernel, sync_free=sync_free).numpy()
        for b in range(len(ref)):
            corr = np.corrcoef(ours[b].ravel(), ref[b].ravel())[0, 1]
            assert abs(corr) > 0.99, (b, corr)
            if kernel == "sigmoid":  # pytorch-grad-cam's default: equal up to the sign
                assert max_rel_diff_up_to_sign(ours[b], ref[b]) < 2e-3


def test_top_eigenpair_sync_free_equals_eigh():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 30, 30, generator=g, dtype=torch.float64)
    S = A + A.transpose(1, 2)  # indefinite
    P = A @ A.transpose(1, 2)  # PSD
    for M, psd in ((S, False), (P, True)):
        val_ref, vec_ref = top_eigenpair(M, sync_free=False)
        val, vec = top_eigenpair(M, sync_free=True, psd=psd)
        torch.testing.assert_close(val, val_ref, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(vec * torch.sign((vec * vec_ref).sum(1, keepdim=True)), vec_ref,
                                   rtol=0, atol=1e-6)
    zero_val, zero_vec = top_eigenpair(torch.zeros(2, 5, 5, dtype=torch.float64), sync_free=True)
    assert (zero_val == 0).all() and (zero_vec == 0).all()


def test_degenerate_inputs_give_zero_maps():
    """Constant channels (nothing to project) and NaN (read as 0, as pytorch-grad-cam) stay finite."""
    x = torch.ones(2, 16, 4, 4)
    x[1, :, 0, 0] = float("nan")
    for sync_free in (False, True):
        p, v = pca_projection(x[:1], sync_free=sync_free)
        assert (p == 0).all()
        assert torch.isfinite(pca_projection(x, sync_free=sync_free)[0]).all()
        assert torch.isfinite(kernel_pca_projection(x, sync_free=sync_free)).all()
    res = eigencam_from_features(x[:1], None)
    assert (res.cams == 0).all()


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        pca_projection(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="kernel: expected one of"):
        kernel_pca_projection(torch.zeros(1, 2, 3, 3), kernel="laplacian")


ENGINES = [("eigencam", EigenCAM, PgcEigenCAM, {}), ("eigengradcam", EigenGradCAM, PgcEigenGradCAM, {}),
           ("kpcacam", KPCACAM, PgcKPCA, {})]


@pytest.mark.parametrize("name,ours_cls,pgc_cls,kw", ENGINES)
def test_engines_match_pytorch_grad_cam(resnet18, x3, monkeypatch, name, ours_cls, pgc_cls, kw):
    """Each image within 2e-3 of pytorch-grad-cam's map, their projection oriented by our sign rule."""
    patch_pgc_sign(monkeypatch)
    layer = resnet18.layer3[-1]
    with torch.no_grad():
        targets = resnet18(x3).argmax(1).tolist()
    with pgc_cls(resnet18, [layer], **kw) as cam:
        ref = cam(input_tensor=x3, targets=[ClassifierOutputTarget(t) for t in targets])
    assert METHODS[name] is ours_cls
    res = build_method(name, resnet18, layer)(x3, targets)
    assert res.cams.shape == (3, 6, 6) and res.weights.shape == (3, 256)
    ours = upsampled_rescaled(res.cams, x3.shape[-2:])
    for b in range(3):
        assert ref[b].std() > 0.05, "degenerate oracle map"
        assert np.abs(ours[b] - ref[b]).max() < 2e-3, (b, np.abs(ours[b] - ref[b]).max())


def test_registry_pure_functions(feats):
    acts, grads = feats["layer3"]
    for name in ("eigencam", "eigengradcam", "kpcacam"):
        res = from_features_fn(name)(acts, grads)
        assert res.cams.shape == (3, 6, 6) and float(res.cams.amax()) == 1.0
    assert from_features_fn("fullgrad") is None


def test_engine_sync_free_path_reads_nothing_and_equals_the_cpu_path(resnet18, x3, monkeypatch):
    """targets=None: explicit class indices are range-checked on the host (targets.py), top-1 is not."""
    layer = resnet18.layer3[-1]
    targets = None
    for cls in (EigenCAM, EigenGradCAM, KPCACAM):
        expected = cls(resnet18, layer)(x3, targets)
        with refuse_host_reads(monkeypatch):
            got = cls(resnet18, layer, check_values=False, sync_free=True)(x3, targets)
        torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-4)
