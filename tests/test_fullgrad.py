"""methods/fullgrad.py vs pytorch-grad-cam 1.5.7's FullGrad on a seeded ResNet18 whose BatchNorm
statistics and shifts are randomised too (a freshly initialised BatchNorm has bias 0, mean 0, var 1: its
FullGrad bias would be 0 and the layer terms vanish)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam import FullGrad as PgcFullGrad
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cfcam_gpu.methods import METHODS, build_method
from cfcam_gpu.methods.fullgrad import FullGrad, bias_of

from helpers import patch_pgc_sign, preprocess, refuse_host_reads, seeded_call

SIZE = 64


@pytest.fixture(scope="module")
def model():
    import torchvision

    def build():
        m = torchvision.models.resnet18(weights=None).eval()
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.BatchNorm2d):
                    mod.running_mean.uniform_(-0.5, 0.5)
                    mod.running_var.uniform_(0.5, 2.0)
                    mod.bias.uniform_(-0.5, 0.5)
        return m
    return seeded_call(build)


@pytest.fixture(scope="module")
def x3(photos):
    return torch.stack([preprocess(photos[n], size=SIZE) for n in ("chelsea", "coffee", "astronaut")])


@pytest.fixture(scope="module")
def targets(model, x3):
    with torch.no_grad():
        return model(x3).argmax(1).tolist()


@pytest.mark.parametrize("eigen", [False, True])
def test_matches_pytorch_grad_cam(model, x3, targets, monkeypatch, eigen):
    patch_pgc_sign(monkeypatch)
    with PgcFullGrad(model, []) as cam:
        ref = cam(input_tensor=x3, targets=[ClassifierOutputTarget(t) for t in targets], eigen_smooth=eigen)
    assert METHODS["fullgrad"] is FullGrad
    res = build_method("fullgrad", model, None)(x3, targets, eigen_smooth=eigen)
    assert res.cams.shape == (3, SIZE, SIZE) and res.weights.shape == (3, 0)
    for b in range(3):
        assert ref[b].std() > 0.05
        assert np.abs(res.cams[b].numpy() - ref[b]).max() < 2e-3, b


def test_layer_terms_matter(model, x3, targets):
    """The bias terms are in the map: with every bias layer's shift zeroed only the input term is left."""
    res = FullGrad(model)(x3, targets)
    import copy

    zeroed = copy.deepcopy(model)
    for mod in zeroed.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.bias.data.zero_()
            mod.running_mean.zero_()
    other = FullGrad(zeroed)(x3, targets)
    assert (res.cams - other.cams).abs().max() > 0.1


def test_batched_equals_one_by_one_and_state_restored(model, x3, targets):
    for p in model.parameters():
        p.grad = None  # pytorch-grad-cam's backward in an earlier test filled them
    model.train()
    try:
        cam = FullGrad(model)
        whole = cam(x3, targets)
        assert model.training and all(m.training for m in model.modules())
        assert all(not m._forward_hooks for m in model.modules())
        assert all(p.grad is None for p in model.parameters())
        for b in range(3):
            torch.testing.assert_close(cam(x3[b:b + 1], targets[b:b + 1]).cams[0], whole.cams[b], rtol=0, atol=1e-5)
    finally:
        model.eval()


def test_bias_of():
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        bn.weight.fill_(2.0)
        bn.bias.fill_(0.5)
    x = torch.zeros(1, 4, 1, 1)
    torch.testing.assert_close(bias_of(bn), bn(x).flatten())  # the output for a zero input
    assert bias_of(torch.nn.Conv2d(3, 4, 3, bias=False)) is None
    assert bias_of(torch.nn.ReLU()) is None
    assert bias_of(torch.nn.BatchNorm2d(4, affine=False)) is None


def test_explain_is_refused(model):
    with pytest.raises(ValueError, match="FullGrad needs the input images"):
        FullGrad(model).explain(torch.zeros(1, 1000))


def test_sync_free_reads_nothing(model, x3, monkeypatch):
    expected = FullGrad(model)(x3, None, eigen_smooth=True)
    with refuse_host_reads(monkeypatch):
        got = FullGrad(model, check_values=False, sync_free=True)(x3, None, eigen_smooth=True)
    torch.testing.assert_close(got.cams, expected.cams, rtol=0, atol=1e-4)


def test_callable_targets_equal_class_indices(model, x3, targets):
    """FullGrad reads targets through the one resolver: a batch callable, per-image pytorch-grad-cam
    targets and class indices give the same maps."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cfcam_gpu.methods import FullGrad

    idx = torch.as_tensor(targets)
    by_index = FullGrad(model)(x3, targets).cams
    by_batch = FullGrad(model)(x3, lambda out: out.gather(1, idx[:, None])[:, 0]).cams
    by_each = FullGrad(model)(x3, [ClassifierOutputTarget(int(t)) for t in targets]).cams
    torch.testing.assert_close(by_batch, by_index, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_each, by_index, rtol=0, atol=1e-6)
