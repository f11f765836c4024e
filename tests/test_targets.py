"""targets.py: the one resolver of every kind of target (engines, metrics, compat), through the engine;
segmentation and detection targets against pytorch-grad-cam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cfcam_gpu as cg
import cfcam_gpu.compat as cc
from cfcam_gpu.targets import class_indices, resolve, resolve_targets


@pytest.mark.parametrize("targets", [3, np.int64(3), [3, 3, 3], (3, 3, 3), np.array([3, 3, 3]),
                                     torch.tensor([3, 3, 3], dtype=torch.int32)])
def test_accepted_forms(targets):
    got = class_indices(targets, 3, "cpu", num_classes=5)
    assert got.dtype == torch.long and got.tolist() == [3, 3, 3]


def test_top1_and_per_image():
    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, 0.0, 1.0]])
    assert resolve_targets(None, logits).tolist() == [1, 0]
    assert resolve_targets([2, 1], logits).tolist() == [2, 1]


@pytest.mark.parametrize("targets,exc,pattern", [
    (True, TypeError, "got a bool"),
    ([0.5, 1.0], TypeError, "integer class indices"),
    ([1, 2], ValueError, r"expected 3 class indices .* got shape \(2,\)"),
    (7, ValueError, r"class index in \[0, 5\), got 7"),
    ([0, 5, 1], ValueError, r"in \[0, 5\), got 5 for image index 1"),
    ([0, -1, 1], ValueError, r"got -1 for image index 1"),
])
def test_bad_targets_name_the_argument(targets, exc, pattern):
    with pytest.raises(exc, match=pattern):
        class_indices(targets, 3, "cpu", num_classes=5)


def test_without_num_classes_indices_are_not_bounded():
    assert class_indices([7, 9], 2, "cpu").tolist() == [7, 9]


# ----------------------------------------------------------------------------------------------------
# Every kind of target through the engine: callables, any model output, segmentation, detection.


class Net(nn.Module):
    """A small CNN with ``out`` logits."""

    def __init__(self, out=5):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 3, padding=1),
                                      nn.ReLU())
        self.head = nn.Linear(24, out)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


class Regression(Net):
    def forward(self, x):
        return super().forward(x)[:, 0]  # (B,)


class DictNet(Net):
    def forward(self, x):
        return {"logits": super().forward(x), "aux": x.mean()}


@pytest.fixture
def x():
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(2))


def test_batch_callable_equals_per_image_callables_and_indices(seeded, x):
    net = seeded(Net).eval()
    cam = cg.CFCAM(net, "features")
    by_index = cam(x, [1, 4, 2])
    per_image = cam(x, [lambda out, c=c: out[c] for c in (1, 4, 2)])
    batched = cam(x, lambda out: out.gather(1, torch.tensor([[1], [4], [2]]))[:, 0])
    for res in (per_image, batched):
        torch.testing.assert_close(res.cams, by_index.cams)
        torch.testing.assert_close(res.weights, by_index.weights)
        assert res.targets is None
    assert by_index.targets.tolist() == [1, 4, 2]


def test_softmax_callable_differs_from_logit(seeded, x):
    """A callable is the score: the softmax target is not silently the logit."""
    net = seeded(Net).eval()
    cam = cg.GradCAM(net, "features")
    logit = cam(x, [1, 1, 1]).weights
    soft = cam(x, lambda out: out.softmax(dim=1)[:, 1]).weights
    assert not torch.allclose(logit, soft)
    ref_grads = []
    for i in range(3):  # the softmax's gradient, image by image
        acts = net.features(x[i:i + 1]).detach().requires_grad_(True)
        score = net.head(acts.mean(dim=(2, 3))).softmax(dim=1)[0, 1]
        ref_grads.append(torch.autograd.grad(score, acts)[0].mean(dim=(2, 3)))
    torch.testing.assert_close(soft, torch.cat(ref_grads), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("targets,exc,pattern", [
    ("cat", TypeError, r"expected None \(top-1\), an int.*got str"),
    ({"a": 1}, TypeError, "got dict"),
    (1.5, TypeError, "got float"),
    ([lambda o: o[0], 1, 2], TypeError, "mixing callables and int"),
    ([lambda o: o[0]] * 2, ValueError, "expected 3 targets"),
    ([lambda o: o], ValueError, r"targets\[0\]: expected the callable to return one score"),
    (lambda o: o, ValueError, r"expected the callable to return \(3,\) scores"),
])
def test_bad_targets_raise(seeded, x, targets, exc, pattern):
    net = seeded(Net).eval()
    if isinstance(targets, list) and len(targets) == 1:
        targets = targets * 3
    with pytest.raises(exc, match=pattern):
        cg.GradCAM(net, "features")(x, targets)


def test_outputs_of_other_shapes(seeded, x):
    one = seeded(lambda: Net(out=1)).eval()
    res = cg.GradCAM(one, "features")(x)  # a one-logit head: the logit itself
    torch.testing.assert_close(res.cams, cg.GradCAM(one, "features")(x, lambda o: o[:, 0]).cams)
    reg = seeded(Regression).eval()
    res = cg.GradCAM(reg, "features")(x)  # a regression head (B,): explained as is
    torch.testing.assert_close(res.cams, cg.GradCAM(reg, "features")(x, lambda o: o).cams)
    dnet = seeded(DictNet).eval()
    with pytest.raises(ValueError, match=r"targets=None needs .* got a dict"):
        cg.GradCAM(dnet, "features")(x)
    with pytest.raises(ValueError, match=r"class indices need .* got a dict"):
        cg.GradCAM(dnet, "features")(x, 1)
    got = cg.GradCAM(dnet, "features")(x, lambda o: o["logits"][:, 2])
    torch.testing.assert_close(got.cams, cg.GradCAM(seeded(Net).eval(), "features")(x, 2).cams)
    assert set(got.logits) == {"logits", "aux"}


def test_resolver_splits_outputs_per_image():
    out = {"scores": torch.arange(6.0).reshape(3, 2), "pair": (torch.zeros(3), torch.ones(3, 1)),
           "loss": torch.tensor(2.0)}
    seen = []
    t = resolve([lambda o: seen.append(o) or o["scores"][1]] * 3, out)
    assert t.scores(out).tolist() == [1.0, 3.0, 5.0]
    assert seen[1]["pair"][1].shape == (1,) and seen[1]["loss"].item() == 2.0  # no batch dim: whole
    dets = [{"scores": torch.tensor([0.5, 0.2])}, {"scores": torch.tensor([0.9])}]  # one dict per image
    assert resolve([lambda o: o["scores"].sum()] * 2, dets).scores(dets).tolist() == pytest.approx([0.7, 0.9])


def test_autocast_of_the_caller_is_kept_and_maps_are_float32(seeded, x):
    net = seeded(Net).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = cg.CFCAM(net, "features")(x)
        maps = cc.GradCAM(net, [net.features])(x)
    assert res.logits.dtype == torch.bfloat16  # the model ran under the caller's autocast
    assert res.cams.dtype == torch.float32 and res.weights.dtype == torch.float32
    assert maps.dtype == np.float32 and maps.shape == (3, 12, 12)


def test_inference_mode_is_named(seeded, x):
    net = seeded(Net).eval()
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode.*outside"):
            cg.GradCAM(net, "features")(x)


# -- segmentation and detection, against pytorch-grad-cam --------------------------------------------


class OutWrapper(nn.Module):
    """pytorch-grad-cam's segmentation wrapper: model(x)["out"]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def test_segmentation_with_and_without_the_out_wrapper(seeded):
    import torchvision

    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    seg = seeded(lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=3)).eval()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        masks = (seg(x)["out"].argmax(dim=1) == 1).numpy().astype(np.float32)  # (B, H, W)
    targets = [SemanticSegmentationTarget(1, m) for m in masks]
    layer = seg.backbone["16"]
    wrapped = OutWrapper(seg)
    with pgc.GradCAM(wrapped, [layer]) as theirs:
        reference = theirs(x, targets)
    for model in (seg, wrapped):  # the dict output works as is
        with cc.GradCAM(model, [layer]) as ours:
            np.testing.assert_allclose(ours(x, targets), reference, atol=1e-3)
    mask = torch.from_numpy(masks)
    batched = cg.GradCAM(seg, layer)(x, lambda out: (out[:, 1] * mask).sum(dim=(1, 2)))  # out: the "out" entry
    torch.testing.assert_close(batched.cams, cg.GradCAM(seg, layer)(x, targets).cams)


def test_faster_rcnn_box_score_target(seeded):
    import torchvision

    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget
    from pytorch_grad_cam.utils.reshape_transforms import fasterrcnn_reshape_transform

    det = seeded(lambda: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=5, min_size=96, max_size=96, box_score_thresh=0.0,
        box_detections_per_img=10)).eval()
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        detections = det(x)
    targets = [FasterRCNNBoxScoreTarget(d["labels"][:3], d["boxes"][:3]) for d in detections]
    layer = det.backbone.body["16"]  # a tensor layer of the backbone: pytorch-grad-cam records its gradient
    with pgc.GradCAM(det, [layer]) as theirs:
        reference = theirs(x, targets)
    with cc.GradCAM(det, [layer]) as ours:
        mine = ours(x, targets)
        assert isinstance(ours.outputs, list) and len(ours.outputs) == 2
    assert reference.max() > 0.99
    np.testing.assert_allclose(mine, reference, atol=1e-3)
    # the whole FPN backbone (a dict of maps) with pytorch-grad-cam's reshape transform
    res = cg.CFCAM(det, det.backbone, reshape_transform=fasterrcnn_reshape_transform)(x, targets)
    assert res.cams.ndim == 3 and res.cams.shape[0] == 2 and torch.isfinite(res.cams).all()


def test_score_cam_classifier_output_target_is_the_logit(seeded, x):
    """Native Score-CAM: score="softmax" applies to class indices; ClassifierOutputTargets ask for the logit."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    net = seeded(Net).eval()
    soft = cg.ScoreCAM(net, "features")
    logit = cg.ScoreCAM(net, "features", score="logit")
    objects = soft(x, [ClassifierOutputTarget(c) for c in (1, 4, 2)]).weights
    torch.testing.assert_close(objects, logit(x, [1, 4, 2]).weights)
    assert not torch.allclose(objects, soft(x, [1, 4, 2]).weights)


def test_explain_with_a_callable_target(seeded, x):
    """cam.explain on the caller's own forward takes the same targets."""
    net = seeded(Net).eval()
    expected = cg.GradCAM(net, "features")(x, lambda out: out.softmax(1)[:, 3])
    with cg.GradCAM(net, "features") as cam:
        res = cam.explain(net(x), lambda out: out.softmax(1)[:, 3])
    torch.testing.assert_close(res.cams, expected.cams)
