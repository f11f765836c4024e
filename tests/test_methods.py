"""methods/: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM, Score-CAM, Ablation-CAM vs pytorch-grad-cam on a
seeded ResNet18; CF-CAM without dead channels vs the per-image reference; engine hygiene."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam import (AblationCAM as PgcAblationCAM, GradCAMPlusPlus as PgcGradCAMPlusPlus,
                              HiResCAM as PgcHiResCAM, LayerCAM as PgcLayerCAM, ScoreCAM as PgcScoreCAM,
                              XGradCAM as PgcXGradCAM)
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget

from cfcam_gpu import GradCAM, cfcam_from_features
from cfcam_gpu import methods as bl
from cfcam_gpu.methods import perturbation
from cfcam_gpu.reference import cfcam_reference

from helpers import make_features, preprocess

SIZE = 96


def top1(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def pgc_maps(cls, model, layer, x, targets, target_cls=ClassifierOutputTarget, **kw):
    with cls(model, [layer], **kw) as cam:
        return cam(input_tensor=x, targets=[target_cls(int(t)) for t in targets])


def assert_correlated(ours: np.ndarray, ref: np.ndarray, min_corr=0.999):
    """Per image: Pearson correlation > min_corr; every map must be non-constant (a meaningful test)."""
    assert ours.shape == ref.shape
    for b in range(len(ours)):
        assert ours[b].std() > 0 and ref[b].std() > 0, f"image {b}: degenerate map"
        corr = np.corrcoef(ours[b].ravel(), ref[b].ravel())[0, 1]
        assert corr > min_corr, (b, corr)


GRADIENT_METHODS = [
    (bl.GradCAMPlusPlus, PgcGradCAMPlusPlus),
    (bl.XGradCAM, PgcXGradCAM),
    (bl.LayerCAM, PgcLayerCAM),
    (bl.HiResCAM, PgcHiResCAM),
]


@pytest.mark.parametrize("ours_cls,pgc_cls", GRADIENT_METHODS, ids=lambda c: getattr(c, "__name__", ""))
def test_gradient_methods_match_pytorch_grad_cam(resnet18, x3, ours_cls, pgc_cls):
    layer = resnet18.layer4[-1]
    t = top1(resnet18, x3)
    res = ours_cls(resnet18, layer)(x3, t)
    assert res.cams.shape == (3, 3, 3) and res.weights.shape == (3, 512)
    assert torch.equal(res.targets, t)
    assert float(res.cams.min()) >= 0 and torch.allclose(res.cams.amax(dim=(1, 2)), torch.ones(3))
    ref = pgc_maps(pgc_cls, resnet18, layer, x3, t)
    assert_correlated(res.upsample(SIZE).numpy(), ref)


def test_gradient_methods_on_an_inner_layer(resnet18, x3):
    """layer3 (6 x 6 maps, 256 channels), explicit non-top-1 targets."""
    layer = resnet18.layer3[-1]
    t = torch.tensor([1, 281, 999])
    for ours_cls, pgc_cls in GRADIENT_METHODS:
        res = ours_cls(resnet18, layer)(x3, t)
        assert_correlated(res.upsample(SIZE).numpy(), pgc_maps(pgc_cls, resnet18, layer, x3, t))


def test_pure_functions_by_formula():
    """The formulas on random features, against NumPy written from pytorch-grad-cam's source."""
    rng = np.random.default_rng(0)
    A = np.abs(rng.normal(size=(2, 7, 4, 5))).astype(np.float32)
    G = (rng.normal(size=(2, 7, 4, 5)) * 1e-2).astype(np.float32)
    G[0, 0, 0, 0] = 0
    a, g = torch.from_numpy(A), torch.from_numpy(G)

    def finish(cam):
        cam = np.maximum(cam, 0)
        return cam / cam.max(axis=(1, 2), keepdims=True)

    sum_a = A.sum(axis=(2, 3), keepdims=True)
    aij = np.where(G != 0, G**2 / (2 * G**2 + sum_a * G**3 + 1e-6), 0)
    w = (np.maximum(G, 0) * aij).sum(axis=(2, 3))
    np.testing.assert_allclose(bl.gradcampp_from_features(a, g).weights.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(bl.gradcampp_from_features(a, g).cams.numpy(),
                               finish((w[:, :, None, None] * A).sum(1)), atol=1e-6)
    denom = 2 * G**2 + sum_a * G**3
    w0 = (np.maximum(G, 0) * np.where(G != 0, G**2 / np.where(denom != 0, denom, 1), 0)).sum(axis=(2, 3))
    np.testing.assert_allclose(bl.gradcampp_from_features(a, g, eps=0).weights.numpy(), w0, rtol=1e-5)
    wx = (G * A / (sum_a + 1e-7)).sum(axis=(2, 3))
    np.testing.assert_allclose(bl.xgradcam_from_features(a, g).weights.numpy(), wx, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(bl.layercam_from_features(a, g).cams.numpy(),
                               finish((np.maximum(G, 0) * A).sum(1)), atol=1e-6)
    np.testing.assert_allclose(bl.hirescam_from_features(a, g).cams.numpy(), finish((G * A).sum(1)), atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# Score-CAM and Ablation-CAM: layer3 (256 channels) at 64 px keeps the masked forwards cheap.

@pytest.fixture(scope="module")
def with_dead(resnet18):
    """ResNet18 whose layer3[-1] has 40 all-zero output channels (relu(-100 + identity) = 0)."""
    model = copy.deepcopy(resnet18)
    bn = model.layer3[-1].bn2
    with torch.no_grad():
        bn.weight[:40] = 0
        bn.bias[:40] = -100
    return model


@pytest.fixture(scope="module")
def x2(photos):
    return torch.stack([preprocess(photos[n], size=64) for n in ("chelsea", "coffee")])


def test_scorecam_matches_pytorch_grad_cam(with_dead, x2):
    layer = with_dead.layer3[-1]
    t = top1(with_dead, x2)
    cam = bl.ScoreCAM(with_dead, layer, score_batch_size=48)
    res = cam(x2, t)
    acts = GradCAM(with_dead, layer)._features(x2, t)[0]
    assert int(bl.dead_channels(acts).sum()) >= 80  # the shortcut for all-zero channels is exercised
    ref = pgc_maps(PgcScoreCAM, with_dead, layer, x2, t, ClassifierOutputSoftmaxTarget)
    assert_correlated(res.upsample(64).numpy(), ref)
    torch.testing.assert_close(res.weights.sum(1), torch.ones(2))  # softmax over channels


def test_scorecam_logit_matches_pytorch_grad_cam_default(resnet18, x2):
    layer = resnet18.layer3[-1]
    t = torch.tensor([3, 500])
    res = bl.ScoreCAM(resnet18, layer, score="logit", score_batch_size=100)(x2[:1], t[:1])
    ref = pgc_maps(PgcScoreCAM, resnet18, layer, x2[:1], t[:1], ClassifierOutputTarget)
    assert_correlated(res.upsample(64).numpy(), ref)


def test_scorecam_chunking_and_paper_weights(resnet18, x2):
    layer = resnet18.layer3[-1]
    a = bl.ScoreCAM(resnet18, layer, score_batch_size=512)(x2, 7)
    b = bl.ScoreCAM(resnet18, layer, score_batch_size=37)(x2, 7)  # chunks straddle the two images
    torch.testing.assert_close(a.weights, b.weights, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(a.cams, b.cams, rtol=0, atol=1e-4)
    raw = bl.ScoreCAM(resnet18, layer, channel_softmax=False)(x2, 7)
    torch.testing.assert_close(raw.weights.softmax(1), a.weights, rtol=1e-4, atol=1e-7)
    assert float(raw.weights.min()) >= 0 and float(raw.weights.max()) <= 1  # probabilities


def test_ablationcam_matches_pytorch_grad_cam(with_dead, x2):
    layer = with_dead.layer3[-1]
    t = top1(with_dead, x2)
    cam = bl.AblationCAM(with_dead, layer, ablation_batch_size=100)
    res = cam(x2, t)
    assert cam.uses_head  # only layer4 + head re-run
    ref = pgc_maps(PgcAblationCAM, with_dead, layer, x2, t)
    assert_correlated(res.upsample(64).numpy(), ref)
    assert (res.weights[:, :40] == 0).all()  # dead channels: ablating them changes nothing


def test_ablationcam_head_equals_full_forward_fallback(resnet18, x2, monkeypatch):
    layer = resnet18.layer4[0]
    head = bl.AblationCAM(resnet18, layer, ablation_batch_size=300)(x2, 5)
    monkeypatch.setattr(perturbation, "head_after", lambda model, layer: None)
    cam = bl.AblationCAM(resnet18, layer, ablation_batch_size=300)
    full = cam(x2, 5)
    assert not cam.uses_head
    torch.testing.assert_close(head.weights, full.weights, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(head.cams, full.cams, rtol=0, atol=1e-4)


def test_head_after_cuts_where_it_can(resnet18):
    x = torch.randn(2, 3, 64, 64)
    store = {}
    handle = resnet18.layer4.register_forward_hook(lambda m, i, o: store.setdefault("a", o))
    with torch.no_grad():
        logits = resnet18(x)
    handle.remove()
    head = bl.head_after(resnet18, resnet18.layer4)
    with torch.no_grad():
        torch.testing.assert_close(head(store["a"]), logits, rtol=1e-5, atol=1e-5)
    # inside a residual block the identity skips over the layer: no cut
    assert bl.head_after(resnet18, resnet18.layer4[-1].conv2) is None


def test_ablationcam_with_a_layer_inside_a_residual_block(resnet18, x2):
    """No fx cut where the block's identity skips over the layer, or where the layer runs twice: the whole
    model is re-run with the layer's output replaced."""
    assert bl.head_after(resnet18, resnet18.layer4[0].relu) is None  # called twice in BasicBlock
    cam = bl.AblationCAM(resnet18, resnet18.layer3[-1].conv1, ablation_batch_size=512)
    res = cam(x2[:1], 3)
    assert not cam.uses_head and torch.isfinite(res.cams).all() and res.cams.shape == (1, 4, 4)


def test_gradient_free_methods_restore_model_state(resnet18, x2):
    model = copy.deepcopy(resnet18).train()
    model.bn1.eval()  # a frozen BatchNorm keeps its own mode
    for cls in (bl.ScoreCAM, bl.AblationCAM):
        layer = model.layer4[-1]
        cam = cls(model, layer, **({"score_batch_size": 512} if cls is bl.ScoreCAM else {}))
        res = cam(x2[:1], 0)
        assert not model.bn1.training
        assert all(m.training for m in model.modules() if m is not model.bn1)
        assert not layer._forward_hooks and all(p.grad is None for p in model.parameters())
        assert res.cams.shape == (1, 2, 2)
        with pytest.raises(ValueError, match="needs the input images"):
            cam._from_features(torch.ones(1, 2, 2, 2), torch.ones(1, 2, 2, 2))


def test_option_errors(resnet18):
    with pytest.raises(ValueError, match="score_batch_size"):
        bl.ScoreCAM(resnet18, "layer4", score_batch_size=0)
    with pytest.raises(ValueError, match="score"):
        bl.ScoreCAM(resnet18, "layer4", score="prob")
    with pytest.raises(ValueError, match="reshape_transform"):
        bl.AblationCAM(resnet18, "layer4", reshape_transform=lambda t: t)
    with pytest.raises(ValueError, match="unknown CAM method"):
        bl.build_method("gradcam+++", resnet18, "layer4")
    assert bl.from_features_fn("scorecam") is None and bl.from_features_fn("gradcam++") is not None


# ----------------------------------------------------------------------------------------------------
# CF-CAM with dead channels excluded.

@pytest.mark.parametrize("seed,B,C,h,w", [(0, 3, 64, 7, 7), (1, 2, 101, 7, 7), (2, 3, 48, 14, 14), (3, 2, 80, 5, 9)])
def test_exclude_dead_equals_reference_on_alive_channels(seed, B, C, h, w):
    acts, grads = make_features(np.random.default_rng(seed), B, C, h, w, dead_frac=0.4)
    res = bl.cfcam_exclude_dead_from_features(torch.from_numpy(acts), torch.from_numpy(grads))
    for b in range(B):
        alive = np.abs(acts[b]).reshape(C, -1).max(1) > 0
        ref = cfcam_reference(acts[b][alive], grads[b][alive])
        labels = res.labels[b].numpy()
        assert np.array_equal(labels[alive], ref.labels) and (labels[~alive] == -1).all()
        assert res.eps[b].item() == ref.eps
        assert int(res.n_clusters[b]) == ref.n_clusters
        assert (res.weights[b].numpy()[~alive] == 0).all()
        np.testing.assert_allclose(res.weights[b].numpy()[alive], ref.weights, rtol=0,
                                   atol=1e-3 * np.abs(ref.weights).max())
        np.testing.assert_allclose(res.cams[b].numpy(), ref.cam, rtol=0, atol=1e-4)


def test_exclude_dead_without_dead_channels_is_cfcam():
    acts, grads = make_features(np.random.default_rng(9), 3, 64, 7, 7, dead_frac=0.0)
    acts = acts + 1e-3  # no all-zero channel at all
    a, g = torch.from_numpy(acts), torch.from_numpy(grads)
    ours, seed = bl.cfcam_exclude_dead_from_features(a, g), cfcam_from_features(a, g)
    assert torch.equal(ours.labels, seed.labels) and torch.equal(ours.eps, seed.eps)
    torch.testing.assert_close(ours.cams, seed.cams)


def test_exclude_dead_engine_and_degenerate_images(resnet18, x2):
    res = bl.CFCAMExcludeDead(resnet18, "layer4")(x2)
    assert res.cams.shape == (2, 2, 2) and res.min_samples is None
    acts = torch.zeros(2, 30, 4, 4)
    acts[1, :1] = 1.0  # one alive channel: eps 0, min_samples 2 -> all noise
    out = bl.cfcam_exclude_dead_from_features(acts, torch.randn(2, 30, 4, 4))
    assert (out.labels == -1).all() and (out.cams == 0).all() and (out.n_clusters == 0).all()
    with pytest.raises(ValueError, match="backend"):
        bl.CFCAMExcludeDead(resnet18, "layer4", backend="sklearn")


# ----------------------------------------------------------------------------------------------------
# Extreme scales: power-of-two scaling inside the gradient family, against NumPy float64 formulas.

def _formula_maps(name: str, A: np.ndarray, G: np.ndarray):
    """(weights (B, C) or None, cams (B, h, w)) in float64 from pytorch-grad-cam's formulas."""
    sum_a = A.sum(axis=(2, 3), keepdims=True)
    if name == "gradcampp":
        with np.errstate(divide="ignore", invalid="ignore"):
            aij = np.where(G != 0, G**2 / (2 * G**2 + sum_a * G**3 + 1e-6), 0)
        w = (np.maximum(G, 0) * aij).sum(axis=(2, 3))
        cam = (w[:, :, None, None] * A).sum(1)
    elif name == "xgradcam":
        w = (G * A / (sum_a + 1e-7)).sum(axis=(2, 3))
        cam = (w[:, :, None, None] * A).sum(1)
    elif name == "elementwise":
        w, cam = G.mean(axis=(2, 3)), np.maximum(G * A, 0).sum(1)
    else:
        W = np.maximum(G, 0) if name == "layercam" else G
        w, cam = W.mean(axis=(2, 3)), (W * A).sum(1)
    cam = np.maximum(cam, 0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return w, cam / np.where(peak > 0, peak, 1)


@pytest.fixture(scope="module")
def resnet18_layer4(resnet18, x3, capture):
    acts, grads, _, _ = capture(resnet18, resnet18.layer4[-1], x3)
    return acts.double(), grads.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["gradcampp", "xgradcam", "layercam", "hirescam", "elementwise"])
def test_gradient_family_at_extreme_scales(resnet18_layer4, name, dtype):
    """Real ResNet18 layer4 features scaled by 1e-30 .. 1e30 (activations and gradients independently):
    finite CAMs equal to the float64 formulas on the same (rounded) values, weights too where float32
    holds them."""
    fn = {"gradcampp": bl.gradcampp_from_features, "xgradcam": bl.xgradcam_from_features,
          "layercam": bl.layercam_from_features, "hirescam": bl.hirescam_from_features,
          "elementwise": bl.gradcam_elementwise_from_features}[name]
    for sa in (1e-30, 1.0, 1e30):
        for sg in (1e-30, 1.0, 1e30):
            a, g = (resnet18_layer4[0] * sa).to(dtype), (resnet18_layer4[1] * sg).to(dtype)
            res = fn(a, g)
            w_ref, cam_ref = _formula_maps(name, a.double().numpy(), g.double().numpy())
            assert np.isfinite(cam_ref).all() and cam_ref.max() == 1, (sa, sg)
            assert torch.isfinite(res.cams).all(), (name, sa, sg)
            np.testing.assert_allclose(res.cams.numpy(), cam_ref, rtol=0, atol=2e-5, err_msg=f"{sa} {sg}")
            held = (np.abs(w_ref) > 1e-37) & (np.abs(w_ref) < 1e37)
            np.testing.assert_allclose(res.weights.double().numpy()[held], w_ref[held], rtol=1e-4,
                                       err_msg=f"{sa} {sg}")


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: a model with it above the layer cannot be differentiated there."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("backward ran")


class _Head(torch.nn.Module):
    """_NoBackward, recording whether grad mode was on or its input was in a graph."""

    def __init__(self):
        super().__init__()
        self.graph = []

    def forward(self, x):
        self.graph.append(torch.is_grad_enabled() or x.requires_grad)
        return _NoBackward.apply(x)


@pytest.mark.parametrize("name", ["eigencam", "kpcacam", "fem", "randomcam", "scorecam", "ablationcam",
                                  "refinecam"])
def test_gradient_free_methods_record_no_graph_and_run_no_backward(resnet18, x2, name):
    """EigenCAM, KPCA-CAM, FEM, RandomCAM, Score-CAM, Ablation-CAM and RefineCAM over EigenCAM need no
    gradients: with a head whose backward fails they give the maps they give on the plain model (Grad-CAM
    fails there), no graph reaches the head, and ``explain`` (where a method offers it) works on a forward
    run under torch.no_grad."""
    from cfcam_gpu.methods import METHODS, EigenCAM

    head = _Head()
    broken = torch.nn.Sequential(resnet18, head).eval()
    options = {"generator": torch.Generator()} if name == "randomcam" else {}
    if name == "refinecam":
        options["base_method"] = EigenCAM

    def run(model):
        if name == "randomcam":
            options["generator"].manual_seed(0)
        return METHODS[name](model, resnet18.layer4, **options)(x2, [281, 282]).cams

    torch.testing.assert_close(run(broken), run(resnet18), rtol=0, atol=0)
    assert head.graph and not any(head.graph)
    with pytest.raises(RuntimeError, match="backward ran"):
        METHODS["gradcam"](broken, resnet18.layer4)(x2, [281, 282])
    if name in ("scorecam", "ablationcam", "refinecam"):  # need the images / fuse at the input size: no explain
        return
    with METHODS[name](broken, resnet18.layer4, **options) as cam:
        if name == "randomcam":
            options["generator"].manual_seed(0)
        with torch.no_grad():
            logits = broken(x2)
        torch.testing.assert_close(cam.explain(logits, [281, 282]).cams, run(resnet18), rtol=0, atol=0)
