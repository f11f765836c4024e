"""The ``compile`` option: results equal the uncompiled engine, compilations stay bounded, hooks are removed,
modes restored, bad values refused. Mostly ``aot_eager`` (fast); one test with the default inductor backend."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torchvision
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from cfcam_gpu import CFCAM, GradCAM

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
RESULT_FIELDS = ("cams", "weights", "targets", "logits")


class Net(nn.Module):
    """conv-BN-ReLU -> conv (the target) -> ReLU(inplace) -> GAP -> Linear; the target is called from this
    forward, so everything but that call lands in compiled graphs."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def _images(b, size, seed):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test counts its own compilations."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def net(seeded):
    model = seeded(Net).eval()
    with torch.no_grad():  # BatchNorm statistics that make eval and train mode differ
        model.bn1.running_mean.uniform_(-0.2, 0.2)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


def assert_clean(model: nn.Module):
    """No hook left on any module and no parameter gradient."""
    for name, m in model.named_modules():
        for attr in HOOK_DICTS:
            assert len(getattr(m, attr)) == 0, f"{attr} left on {name or 'model'}"
    assert all(p.grad is None for p in model.parameters())


def assert_same(res, ref, atol=1e-5):
    for name in RESULT_FIELDS:
        torch.testing.assert_close(getattr(res, name), getattr(ref, name), rtol=0, atol=atol)
    if getattr(ref, "labels", None) is not None:  # CF-CAM's clusters
        assert torch.equal(res.labels, ref.labels)


@pytest.mark.parametrize("which", ["net", "resnet18"])
def test_equals_uncompiled_and_compiles_once(seeded, which, net):
    model, layer, size = (net, "conv2", 16) if which == "net" else (
        seeded(lambda: torchvision.models.resnet18(weights=None)).eval(), "layer4.-1", 64)
    model.train()
    next(model.children()).eval()  # a mixed state, restored as it was
    modes = [m.training for m in model.modules()]
    keys = set(vars(model))
    counter = CompileCounterWithBackend("aot_eager")
    plain = CFCAM(model, layer)
    compiled = CFCAM(model, layer, compile={"backend": counter})
    frames = []
    for seed in range(3):  # different batches of one shape
        x = _images(3, size, seed)
        assert_same(compiled(x), plain(x))
        frames.append(counter.frame_count)
        assert_clean(model)
        assert [m.training for m in model.modules()] == modes
        assert torch.is_grad_enabled()
    assert frames[0] > 0 and frames == [frames[0]] * 3, frames
    assert set(vars(model)) - keys <= {"_is_torch_compile"}  # torch.compile's own flag, nothing else


def test_gradcam_targets_and_a_second_batch_size(net):
    counter = CompileCounterWithBackend("aot_eager")
    plain, compiled = GradCAM(net, "conv2"), GradCAM(net, "conv2", compile={"backend": counter})
    assert_same(compiled(_images(4, 16, 0), [0, 1, 2, 3]), plain(_images(4, 16, 0), [0, 1, 2, 3]))
    once = counter.frame_count
    assert_same(compiled(_images(2, 16, 1), 3), plain(_images(2, 16, 1), 3))  # a new shape may compile
    twice = counter.frame_count
    assert_same(compiled(_images(2, 16, 2)), plain(_images(2, 16, 2)))
    assert counter.frame_count == twice <= 2 * once
    assert_clean(net)


@pytest.mark.parametrize("options", [{"amp": "bfloat16"}, {"channels_last": True},
                                     {"chunk_size": 2}])
def test_with_amp_channels_last_and_chunks(net, options):
    x = _images(4, 16, 3)
    ref = CFCAM(net, "conv2", **options)(x)
    res = CFCAM(net, "conv2", compile={"backend": "aot_eager"}, **options)(x)
    assert_same(res, ref)
    assert_clean(net)


def test_with_block_and_explain(net):
    x = _images(3, 16, 4)
    ref = CFCAM(net, "conv2")(x)
    with CFCAM(net, "conv2", compile={"backend": "aot_eager"}) as cam:
        assert_same(cam(x), ref)
        assert_same(cam.explain(net(x)), ref)  # the caller's eager forward: compile does not apply
        # a model the caller compiled and first ran inside the block: the hook breaks the graph there
        assert_same(cam.explain(torch.compile(net, backend="aot_eager")(x)), ref)
    assert_clean(net)


@pytest.mark.parametrize("bad, exc, match", [
    (None, TypeError, "got None"), (1, TypeError, "got 1"), ("inductor", TypeError, "got 'inductor'"),
    ({"backend": "aot_eager", "bogus": 1}, ValueError, "got bogus"),
    ({"fullgraph": True}, ValueError, "fullgraph")])
def test_bad_compile_values(net, bad, exc, match):
    with pytest.raises(exc, match=f"compile: expected .*{match}"):
        CFCAM(net, "conv2", compile=bad)


def _cxx_failure(err: BaseException | None) -> BaseException | None:
    """The C++ build error behind an inductor failure (missing or broken compiler), else None."""
    from torch._inductor.exc import CppCompileError, InvalidCxxCompiler

    while err is not None and not isinstance(err, (CppCompileError, InvalidCxxCompiler)):
        err = err.__cause__ or getattr(err, "inner_exception", None)
    return err


def test_default_inductor_backend(net):
    x = _images(2, 16, 5)
    ref = CFCAM(net, "conv2")(x)
    cam = CFCAM(net, "conv2", compile=True)
    try:
        res = cam(x)
    except Exception as err:
        cause = _cxx_failure(err)
        if cause is not None:
            pytest.skip(f"inductor cannot build C++ here: {type(cause).__name__}: {str(cause)[:200]}")
        raise
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it did compile
    assert_same(res, ref)
    assert_same(cam(_images(2, 16, 6)), CFCAM(net, "conv2")(_images(2, 16, 6)))
    assert_clean(net)


def test_scorecam_masked_forwards_use_the_compiled_model(net):
    """Score-CAM's extra forwards run through the compiled model too (same scores as uncompiled)."""
    from cfcam_gpu.methods import ScoreCAM

    counter = CompileCounterWithBackend("aot_eager")
    x = _images(2, 16, 0)
    ref = ScoreCAM(net, "conv2", score_batch_size=8)(x)
    before = counter.frame_count
    res = ScoreCAM(net, "conv2", score_batch_size=8, compile={"backend": counter})(x)
    assert_same(res, ref)
    assert counter.frame_count > before
    calls = []
    handle = net.head.register_forward_hook(lambda *a: calls.append(1))
    try:  # the compiled forwards still call the model's own modules (hooks see them)
        ScoreCAM(net, "conv2", score_batch_size=8, compile={"backend": counter})(x)
    finally:
        handle.remove()
    assert len(calls) >= 1 + 2 * 12 // 8
    assert_clean(net)
    # Code compiled while the target had no capture hook (the masked forwards) must not be reused by a
    # later call that needs the hook (dynamo skips hook guards by default: "the layer did not run").
    assert_same(CFCAM(net, "conv2", compile={"backend": counter})(x), CFCAM(net, "conv2")(x))
