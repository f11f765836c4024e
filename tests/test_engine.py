"""engine.py: hooks, targets, one autograd.grad to the layer; state restored; parity with independent capture
and with pytorch-grad-cam."""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cfcam_gpu import CFCAM, GradCAM, cfcam_from_features, gradcam_from_features, resolve_layer



# ----------------------------------------------------------------------------------------------------
# Small models.

class TinyNet(nn.Module):
    """conv-BN-ReLU(inplace) x 2 -> GAP -> Linear; plus a module that never runs and a tuple-output one."""

    def __init__(self, num_classes=5, width=24):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
            nn.Conv2d(16, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, num_classes)
        self.unused = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.head(self.pool(self.features(x)).flatten(1))


class TupleLayer(nn.Module):
    def forward(self, x):
        return x, x.mean()


class TupleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pair = TupleLayer()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y, _ = self.pair(self.conv(x))
        return self.head(y.mean(dim=(2, 3)))


class TokenNet(nn.Module):
    """Patch embedding to tokens (B, N, D), a token MLP (3-D output), mean over tokens, head."""

    def __init__(self, dim=16, num_classes=6):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, stride=4)
        self.block = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.relu(self.block(t))
        return self.head(t.mean(dim=1))


class SpatialLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, 4, H, W): not logits


@pytest.fixture(autouse=True, scope="module")
def _no_tf32():
    """On CUDA, cuDNN's default TF32 convolutions would make two forward passes differ at 1e-3; compare
    the engine with an independent capture in full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def tiny(seeded, device):
    model = seeded(TinyNet).to(device).eval()
    # non-trivial BatchNorm statistics so eval and train mode differ
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def tiny_images(device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g).to(device)


@pytest.fixture(scope="module")
def resnet18_cpu(seeded):
    return seeded(lambda: torchvision.models.resnet18(weights=None)).eval()


@pytest.fixture
def resnet18(resnet18_cpu, device):
    return copy.deepcopy(resnet18_cpu).to(device)


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def assert_clean(model: nn.Module, training: bool | None = None):
    """No hook left on any module, no parameter gradient, and (optionally) the train/eval mode."""
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert len(getattr(m, attr)) == 0, f"{attr} left on {name or 'model'}"
    assert len(torch.nn.modules.module._global_forward_hooks) == 0
    assert len(torch.nn.modules.module._global_backward_hooks) == 0
    for name, p in model.named_parameters():
        assert p.grad is None, f"{name}.grad was set"
    if training is not None:
        assert model.training is training
        assert all(m.training is training for m in model.modules())


def _gradcam_results_close(res, acts, grads, atol=1e-5):
    ref = gradcam_from_features(acts, grads)
    torch.testing.assert_close(res.weights, ref.weights, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=atol)


def _cfcam_results_close(res, acts, grads, atol=1e-5):
    ref = cfcam_from_features(acts, grads)
    assert torch.equal(res.labels, ref.labels)
    assert torch.equal(res.eps, ref.eps)
    torch.testing.assert_close(res.weights, ref.weights, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.cams, ref.cams, rtol=0, atol=atol)


# ----------------------------------------------------------------------------------------------------
# Layer resolution.

def test_resolve_layer_names(resnet18):
    m = resnet18
    assert resolve_layer(m, "layer4") is m.layer4
    assert resolve_layer(m, "layer4.1") is m.layer4[1]
    assert resolve_layer(m, "layer4.-1") is m.layer4[-1]
    assert resolve_layer(m, "layer4.-2") is m.layer4[0]
    assert resolve_layer(m, "layer3.0.bn2") is m.layer3[0].bn2
    assert resolve_layer(m, m.layer2[0]) is m.layer2[0]


@pytest.mark.parametrize("bad,exc,pattern", [
    ("layer9", ValueError, r"target_layer.*layer9"),
    ("layer4.7", ValueError, r"target_layer.*7"),
    ("layer4.-3", ValueError, r"target_layer.*-3"),
    ("layer4.1.nope", ValueError, r"target_layer.*nope"),
    ("", (ValueError, TypeError), "target_layer"),
    (3, TypeError, "target_layer"),
    (nn.Conv2d(1, 1, 1), ValueError, "target_layer"),
])
def test_resolve_layer_errors(resnet18, bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        CFCAM(resnet18, bad)
    assert_clean(resnet18, training=False)


def test_unknown_layer_lists_children(resnet18):
    with pytest.raises(ValueError, match="layer4") as info:
        GradCAM(resnet18, "layer5")
    assert "conv1" in str(info.value) and "fc" in str(info.value)


def test_model_must_be_module():
    with pytest.raises(TypeError, match="model"):
        CFCAM(lambda x: x, "layer4")


# ----------------------------------------------------------------------------------------------------
# Parity with independently captured features.

@pytest.mark.parametrize("layer", ["layer4", "layer4.1", "layer4.-1", "layer3.-1"])
def test_resnet18_matches_independent_capture(resnet18, device, layer, capture):
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)).to(device)
    acts, grads, t, logits = capture(resnet18, resolve_layer(resnet18, layer), x)
    res = CFCAM(resnet18, layer)(x)
    assert torch.equal(res.targets, t)
    torch.testing.assert_close(res.logits, logits, rtol=1e-5, atol=1e-5)
    _cfcam_results_close(res, acts, grads)
    g = GradCAM(resnet18, layer)(x)
    _gradcam_results_close(g, acts, grads)
    assert_clean(resnet18, training=False)


def test_layer4_name_and_last_block_agree(resnet18, device):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)
    a = CFCAM(resnet18, "layer4")(x)
    b = CFCAM(resnet18, resnet18.layer4[-1])(x)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.cams, b.cams)


@pytest.mark.parametrize("targets", [None, 2, [0, 4, 1], "tensor", "np"])
def test_targets_forms(tiny, tiny_images, device, targets, capture):
    if targets == "tensor":
        targets, expected = torch.tensor([3, 3, 0]), [3, 3, 0]
    elif targets == "np":
        targets, expected = np.array([1, 2, 3]), [1, 2, 3]
    elif targets is None:
        expected = None
    elif isinstance(targets, int):
        expected = [targets] * 3
    else:
        expected = targets
    acts, grads, t, logits = capture(tiny, tiny.features, tiny_images, expected)
    res = CFCAM(tiny, "features")(tiny_images, targets)
    if expected is None:
        assert torch.equal(res.targets, logits.argmax(dim=1))
    else:
        assert res.targets.tolist() == expected
    assert res.targets.dtype == torch.int64 and res.targets.device == tiny_images.device
    _cfcam_results_close(res, acts, grads)
    assert_clean(tiny, training=False)


def test_gradient_is_of_the_selected_logit(tiny, tiny_images, capture):
    """Different targets give different gradients; each matches torch.autograd.grad of that logit."""
    res = [GradCAM(tiny, "features.5")(tiny_images, k) for k in range(3)]
    for k in range(3):
        acts, grads, _, _ = capture(tiny, tiny.features[5], tiny_images, k)
        _gradcam_results_close(res[k], acts, grads)
    assert not torch.allclose(res[0].weights, res[1].weights)


# ----------------------------------------------------------------------------------------------------
# Targets: errors.

@pytest.mark.parametrize("targets,exc,pattern", [
    ([1, 2], ValueError, r"targets.*3"),
    ([1, 2, 3, 4], ValueError, r"targets.*3"),
    (torch.tensor([[1, 2, 3]]), ValueError, "targets"),
    (5, ValueError, r"targets.*\[0, 5\)"),
    (-1, ValueError, "targets"),
    ([0, 7, 1], ValueError, r"targets.*7.*image index 1"),
    ([0, 1, -2], ValueError, r"targets.*image index 2"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, "targets"),
    (True, TypeError, "targets"),
    ([True, False, True], TypeError, "targets"),
])
def test_bad_targets_raise_and_leave_model_clean(tiny, tiny_images, targets, exc, pattern):
    tiny.train()
    for engine in (CFCAM(tiny, "features"), GradCAM(tiny, "features")):
        with pytest.raises(exc, match=pattern):
            engine(tiny_images, targets)
        assert_clean(tiny, training=True)


# ----------------------------------------------------------------------------------------------------
# Layers whose output is not a (B, C, h, w) tensor; layers that do not run; bad images.

def test_token_layer_mentions_reshape_transform(seeded, device):
    model = seeded(TokenNet).to(device).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).to(device)
    model.train()
    for engine in (CFCAM(model, "block"), GradCAM(model, model.block)):
        with pytest.raises(ValueError, match="reshape_transform"):
            engine(x)
        assert_clean(model, training=True)


def test_token_layer_with_reshape_transform(seeded, device, capture):
    model = seeded(TokenNet).to(device).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)).to(device)

    def to_maps(t):
        return t.reshape(t.shape[0], 4, 4, t.shape[2]).permute(0, 3, 1, 2)

    res = CFCAM(model, "block", reshape_transform=to_maps)(x)
    acts, grads, _, _ = capture(model, model.block, x)
    assert res.cams.shape == (2, 4, 4)
    _cfcam_results_close(res, to_maps(acts), to_maps(grads))
    assert_clean(model, training=False)


def test_linear_layer_output_is_rejected(tiny, tiny_images):
    tiny.train()
    with pytest.raises(ValueError, match=r"\(B, C, h, w\).*reshape_transform"):
        GradCAM(tiny, "head")(tiny_images)
    assert_clean(tiny, training=True)


def test_layer_that_does_not_run(tiny, tiny_images):
    tiny.train()
    with pytest.raises(ValueError, match="target_layer.*did not run"):
        CFCAM(tiny, "unused")(tiny_images)
    assert_clean(tiny, training=True)


def test_tuple_output_layer(seeded, device):
    model = seeded(TupleNet).to(device).train()
    with pytest.raises(ValueError, match="target_layer.*tuple"):
        CFCAM(model, "pair")(torch.rand(2, 3, 8, 8, device=device))
    assert_clean(model, training=True)


def test_model_not_returning_logits(seeded, device):
    model = seeded(SpatialLogits).to(device).train()
    with pytest.raises(ValueError, match="logits"):
        CFCAM(model, "conv")(torch.rand(2, 3, 8, 8, device=device))
    assert_clean(model, training=True)


def test_bad_images(tiny, tiny_images):
    tiny.train()
    with pytest.raises(ValueError, match="images"):
        CFCAM(tiny, "features")(tiny_images[0])
    with pytest.raises(TypeError, match="images"):
        CFCAM(tiny, "features")((tiny_images * 100).long())
    bad = tiny_images.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"image index 1"):
        CFCAM(tiny, "features")(bad)
    assert_clean(tiny, training=True)


# ----------------------------------------------------------------------------------------------------
# Model state: eval during the call, the user's mode afterwards, no parameter gradients, grad mode.

def test_train_mode_is_restored_and_eval_is_used(tiny, tiny_images):
    bn_state = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        eval_logits = tiny.eval()(tiny_images)
    tiny.train()
    res = CFCAM(tiny, "features")(tiny_images)
    assert_clean(tiny, training=True)
    torch.testing.assert_close(res.logits, eval_logits, rtol=1e-5, atol=1e-5)  # BatchNorm ran in eval mode
    with torch.no_grad():
        train_logits = copy.deepcopy(tiny).train()(tiny_images)
    assert (train_logits - eval_logits).abs().max() > 1e-2  # the check above can tell the modes apart
    for k, v in tiny.state_dict().items():  # running statistics untouched
        assert torch.equal(v, bn_state[k]), k
    # batch items are independent (eval-mode BatchNorm): one image alone gives the same map
    tiny.train()
    one = CFCAM(tiny, "features")(tiny_images[1:2])
    torch.testing.assert_close(one.cams[0], res.cams[1], rtol=0, atol=1e-5)
    assert_clean(tiny, training=True)


def test_mixed_submodule_modes_are_restored(tiny, tiny_images):
    tiny.train()
    tiny.features[1].eval()  # a frozen BatchNorm, as in fine-tuning
    modes = {name: m.training for name, m in tiny.named_modules()}
    CFCAM(tiny, "features")(tiny_images)
    assert {name: m.training for name, m in tiny.named_modules()} == modes


def test_parameters_and_grad_mode_untouched(tiny, tiny_images):
    flags = [p.requires_grad for p in tiny.parameters()]
    assert torch.is_grad_enabled()
    res = CFCAM(tiny, "features")(tiny_images)
    assert torch.is_grad_enabled()
    assert torch.isfinite(res.cams).all()
    assert [p.requires_grad for p in tiny.parameters()] == flags
    assert_clean(tiny, training=False)
    assert not res.cams.requires_grad and not res.weights.requires_grad


def test_call_under_callers_no_grad(tiny, tiny_images):
    expected = GradCAM(tiny, "features")(tiny_images)
    with torch.no_grad():
        res = GradCAM(tiny, "features")(tiny_images)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(res.cams, expected.cams)
    assert_clean(tiny, training=False)


def test_frozen_parameters_still_work(tiny, tiny_images, capture):
    for p in tiny.parameters():
        p.requires_grad_(False)
    res = CFCAM(tiny, "features")(tiny_images)
    for p in tiny.parameters():
        p.requires_grad_(True)
    acts, grads, _, _ = capture(tiny, tiny.features, tiny_images)
    _cfcam_results_close(res, acts, grads)


def test_context_manager_and_reuse(tiny, tiny_images):
    with CFCAM(tiny, "features") as cam:
        a = cam(tiny_images)
        b = cam(tiny_images)
    assert torch.equal(a.cams, b.cams) and torch.equal(a.labels, b.labels)
    assert_clean(tiny, training=False)


# ----------------------------------------------------------------------------------------------------
# In-place operations after the target layer.

def test_layer_followed_by_inplace_relu(tiny, tiny_images, capture):
    """features.4 is a BatchNorm followed by ReLU(inplace=True): the engine must see the pre-ReLU map."""
    acts, grads, _, _ = capture(tiny, tiny.features[4], tiny_images)
    assert (acts < 0).any()  # pre-ReLU values: a capture spoiled by the in-place ReLU would have none
    res = CFCAM(tiny, "features.4")(tiny_images)
    _cfcam_results_close(res, acts, grads)
    g = GradCAM(tiny, "features.4")(tiny_images)
    _gradcam_results_close(g, acts, grads)
    # and the model's own output is unchanged by the hook's clone
    with torch.no_grad():
        torch.testing.assert_close(res.logits, tiny(tiny_images), rtol=1e-6, atol=1e-6)
    assert_clean(tiny, training=False)


def test_resnet18_bn2_followed_by_inplace_add_and_relu(resnet18, device, capture):
    """layer4.1.bn2: `out += identity` then ReLU(inplace=True) act on the hooked output."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)).to(device)
    acts, grads, _, _ = capture(resnet18, resnet18.layer4[1].bn2, x)
    assert (acts < 0).any()
    res = CFCAM(resnet18, "layer4.1.bn2")(x)
    _cfcam_results_close(res, acts, grads)
    assert_clean(resnet18, training=False)


def test_resnet50_layer4_and_bn3(resnet50_random, image_batch, device, capture):
    model = copy.deepcopy(resnet50_random).to(device) if device.type != "cpu" else resnet50_random
    x = torch.nn.functional.interpolate(image_batch[:2], size=(160, 160), mode="bilinear").to(device)
    for name, layer in (("layer4.-1", model.layer4[-1]), ("layer4.2.bn3", model.layer4[2].bn3)):
        acts, grads, _, _ = capture(model, layer, x)
        res = CFCAM(model, name)(x)
        _cfcam_results_close(res, acts, grads, atol=1e-4)
        assert_clean(model, training=False)
    assert (acts < 0).any()


# ----------------------------------------------------------------------------------------------------
# Grad-CAM vs pytorch-grad-cam.

def test_gradcam_vs_pytorch_grad_cam(seeded):
    from pytorch_grad_cam import GradCAM as PGCGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = seeded(lambda: torchvision.models.resnet18(weights=None), seed=1).eval()
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    targets = [1, 500, 999]
    ours = GradCAM(model, "layer4.-1")(x, targets)
    assert_clean(model, training=False)
    with PGCGradCAM(model=model, target_layers=[model.layer4[-1]]) as pgc:
        theirs = pgc(input_tensor=x, targets=[ClassifierOutputTarget(t) for t in targets])
    assert theirs.shape == (3, 224, 224)
    up = ours.upsample(224).numpy()
    for b in range(3):
        corr = np.corrcoef(up[b].ravel(), theirs[b].ravel())[0, 1]
        assert corr > 0.999, (b, corr)
        # their pipeline from our feature-level map: min-max, cv2 resize, min-max again
        cam = ours.cams[b].numpy()
        cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
        cam = cv2.resize(np.float32(cam), (224, 224))
        cam = (cam - cam.min()) / (1e-7 + (cam - cam.min()).max())
        np.testing.assert_allclose(cam, theirs[b], rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# chunk_size and explain().

def test_chunk_size_equals_unchunked(tiny, device):
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7)).to(device)
    targets = [0, 1, 2, 3, 4]
    full = CFCAM(tiny, "features")(x, targets)
    chunked = CFCAM(tiny, "features", chunk_size=2)(x, targets)
    for name in ("cams", "weights", "labels", "n_clusters", "eps", "targets", "logits"):
        torch.testing.assert_close(getattr(chunked, name), getattr(full, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        CFCAM(tiny, "features", chunk_size=2)(x, [0, 1, 2])
    assert_clean(tiny, training=False)


def test_channels_last_option(tiny, tiny_images):
    expected = CFCAM(tiny, "features")(tiny_images)
    other = copy.deepcopy(tiny)
    res = CFCAM(other, "features", channels_last=True)(tiny_images)
    assert torch.equal(res.labels, expected.labels)
    torch.testing.assert_close(res.cams, expected.cams, rtol=0, atol=1e-5)
    assert_clean(other, training=False)


def test_explain_on_callers_forward(tiny, tiny_images):
    expected = CFCAM(tiny, "features")(tiny_images, [1, 2, 3])
    with CFCAM(tiny, "features") as cam:
        logits = tiny(tiny_images)
        res = cam.explain(logits, [1, 2, 3])
    assert_clean(tiny, training=False)
    assert torch.equal(res.labels, expected.labels)
    torch.testing.assert_close(res.cams, expected.cams, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="explain"):
        CFCAM(tiny, "features").explain(logits.detach())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_host_sync_between_backward_and_cams():
    """Issue 3: on CUDA, with targets=None and check_values=False, nothing after the forward pass
    synchronises with the host (set_sync_debug_mode('error') raises on any sync)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    x = torch.randn(4, 3, 112, 112, device="cuda")
    cam = CFCAM(model, "layer4.-1", check_values=False)
    expected = cam(x)  # warm-up (lazy CUDA init may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = cam(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(result.cams, expected.cams)
