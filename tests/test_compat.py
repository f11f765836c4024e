"""cfcam_gpu.compat: pytorch-grad-cam's calling convention, checked against pytorch-grad-cam itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("pytorch_grad_cam")
import pytorch_grad_cam as pgc
from helpers import patch_pgc_sign  # noqa: E402
from pytorch_grad_cam import GradCAM as PGCGradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import (BinaryClassifierOutputTarget, ClassifierOutputReST,  # noqa: E402
                                                  ClassifierOutputSoftmaxTarget, ClassifierOutputTarget)

import cfcam_gpu.compat as cc  # noqa: E402
from cfcam_gpu.compat import ClusteredFilteredGradCAM, GradCAMCompat  # noqa: E402
from cfcam_gpu.app.data import IMAGENET_MEAN, IMAGENET_STD, bundled_images, display_images, normalize  # noqa: E402


@pytest.fixture(scope="module")
def batch():
    """Three bundled photos: display images (3, 3, 224, 224) in [0, 1] and the normalised model input."""
    photos = dict(bundled_images())
    display = display_images([photos[name] for name in ("chelsea", "coffee", "rocket")], (224, 224))
    return display, normalize(display, IMAGENET_MEAN, IMAGENET_STD)


TARGETS = [ClassifierOutputTarget(281), ClassifierOutputTarget(967), ClassifierOutputTarget(812)]


@pytest.mark.parametrize("cls", [ClusteredFilteredGradCAM, GradCAMCompat])
def test_pytorch_grad_cam_convention(resnet18, batch, cls):
    display, x = batch
    with cls(model=resnet18, target_layers=[resnet18.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=TARGETS)
        top1 = cam(input_tensor=x)  # targets=None: each image's top-1 class, as pytorch-grad-cam
    for out in (maps, top1):
        assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == (3, 224, 224)
        assert out.min() >= 0 and out.max() <= 1
    rgb = display.permute(0, 2, 3, 1).numpy().astype(np.float32)
    for i in range(3):
        visual = show_cam_on_image(rgb[i], maps[i], use_rgb=True)
        assert visual.shape == (224, 224, 3) and visual.dtype == np.uint8


def test_int_targets_equal_classifier_output_targets(resnet18, batch):
    _, x = batch
    with ClusteredFilteredGradCAM(model=resnet18, target_layers=[resnet18.layer4[-1]]) as cam:
        a = cam(input_tensor=x, targets=TARGETS)
        b = cam(input_tensor=x, targets=[281, 967, 812])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("targets", [TARGETS, None], ids=["explicit", "top1"])
def test_gradcam_compat_matches_pytorch_grad_cam(resnet18, batch, targets):
    _, x = batch
    layer = resnet18.layer4[-1]
    with GradCAMCompat(model=resnet18, target_layers=[layer]) as ours:
        mine = ours(input_tensor=x, targets=targets)
    with PGCGradCAM(model=resnet18, target_layers=[layer]) as theirs:
        reference = theirs(input_tensor=x, targets=targets)
    assert reference.shape == mine.shape == (3, 224, 224)
    n_compared = 0
    for i in range(3):
        if reference[i].max() == 0:  # the weighted sum is <= 0 everywhere: both give an all-zero map
            assert mine[i].max() == 0
            continue
        corr = np.corrcoef(mine[i].ravel(), reference[i].ravel())[0, 1]
        assert corr > 0.999, (i, corr)
        n_compared += 1
    assert n_compared >= 2  # (with these seeded weights coffee's map for class 967 is the all-zero one)


@pytest.mark.parametrize("cls", [ClusteredFilteredGradCAM, GradCAMCompat])
def test_wrong_target_count_raises(resnet18, batch, cls):
    _, x = batch
    with cls(model=resnet18, target_layers=[resnet18.layer4[-1]]) as cam:
        with pytest.raises(ValueError, match="expected 3 targets"):
            cam(input_tensor=x, targets=TARGETS[:2])
        with pytest.raises(ValueError, match="expected 3 targets"):
            cam(input_tensor=x, targets=TARGETS + [ClassifierOutputTarget(1)])


def pgc_and_ours(name, model, layers, x, targets, call=None, **kwargs):
    """Class ``name`` of pytorch-grad-cam and ours built with ``kwargs``, called with ``call`` options."""
    with getattr(pgc, name)(model, layers, **kwargs) as theirs:
        reference = theirs(x, targets, **(call or {}))
    model.zero_grad(set_to_none=True)  # its full backward leaves .grad on shared (session) models
    with getattr(cc, name)(model, layers, **kwargs) as ours:
        mine = ours(x, targets, **(call or {}))
    return mine, reference


GRADIENT = ["GradCAM", "GradCAMPlusPlus", "XGradCAM", "LayerCAM", "HiResCAM"]
MIXED = [ClassifierOutputTarget(281), ClassifierOutputSoftmaxTarget(967), ClassifierOutputReST(812)]


@pytest.fixture(scope="module")
def small(batch):
    """The three photos at 64 x 64 (resnet18's layer4 is 2 x 2 there, layer3 4 x 4)."""
    return torch.nn.functional.interpolate(batch[1], size=(64, 64), mode="bilinear", align_corners=False)


@pytest.mark.parametrize("name", GRADIENT)
@pytest.mark.parametrize("layer", ["layer4.1", "layer3.1", "layer2"])
@pytest.mark.parametrize("targets", [None, MIXED], ids=["top1", "mixed"])
def test_gradient_classes_equal_pytorch_grad_cam(resnet18, small, name, layer, targets):
    """Maps equal pytorch-grad-cam's within 1e-3, whatever the target class (logit, softmax, ReST)."""
    module = resnet18.get_submodule(layer)
    mine, reference = pgc_and_ours(name, resnet18, [module], small, targets)
    assert mine.shape == reference.shape == (3, 64, 64) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, reference, atol=1e-3)
    assert reference.max() > 0.99  # not trivially all-zero


@pytest.mark.parametrize("name", ["GradCAM", "LayerCAM", "HiResCAM"])
def test_several_layers_equal_pytorch_grad_cam(resnet18, small, name):
    layers = [resnet18.layer2, resnet18.layer4[-1]]
    mine, reference = pgc_and_ours(name, resnet18, layers, small, MIXED)
    np.testing.assert_allclose(mine, reference, atol=1e-3)


def test_batch_of_one_and_vgg11(seeded, small):
    import torchvision

    vgg = seeded(torchvision.models.vgg11).eval()
    for name in ("GradCAM", "GradCAMPlusPlus"):
        mine, reference = pgc_and_ours(name, vgg, [vgg.features[-1]], small[:1], None)
        assert mine.shape == (1, 64, 64)
        np.testing.assert_allclose(mine, reference, atol=1e-3)


def test_one_channel_input(seeded):
    import torchvision

    def gray_resnet():
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        return net.eval()

    net = seeded(gray_resnet)
    x = torch.randn(2, 1, 48, 48, generator=torch.Generator().manual_seed(3))
    for name in ("GradCAM", "XGradCAM"):
        mine, reference = pgc_and_ours(name, net, [net.layer3], x, None)
        np.testing.assert_allclose(mine, reference, atol=1e-3)


class SmallNet(nn.Module):
    """Two conv stages (the second without ReLU, so its minimum is negative, and with ``linear`` nothing
    clips it before the head) and a linear head."""

    def __init__(self, out=4, linear=False):
        super().__init__()
        self.linear = linear
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.mid = nn.Conv2d(12, 10, 3, padding=1)
        self.head = nn.Linear(10, out)

    def forward(self, x):
        y = self.mid(self.stem(x))
        return self.head((y if self.linear else torch.relu(y)).mean(dim=(2, 3)))


@pytest.mark.parametrize("layer", ["stem", "mid"])
@pytest.mark.parametrize("targets", [None, [ClassifierOutputSoftmaxTarget(1), ClassifierOutputTarget(3)]],
                         ids=["top1", "softmax+logit"])
def test_score_and_ablation_equal_pytorch_grad_cam(seeded, layer, targets):
    """Score-CAM with the targets' own scores (the logit by default); Ablation-CAM with pytorch-grad-cam's
    ablation value (at "mid" the minimum is negative: min - k * 1e7 in groups of batch_size)."""
    net = seeded(SmallNet).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    module = net.get_submodule(layer)
    for name, kwargs in (("ScoreCAM", {}), ("AblationCAM", {"batch_size": 4})):
        mine, reference = pgc_and_ours(name, net, [module], x, targets, **kwargs)
        np.testing.assert_allclose(mine, reference, atol=1e-3, err_msg=name)


def test_ablation_value_option(seeded):
    """Where the ablated layer reaches the head linearly the ablation value matters: pytorch-grad-cam's
    value (the compat default) matches it, our native 0 does not."""
    net = seeded(lambda: SmallNet(linear=True)).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with pgc.AblationCAM(net, [net.mid], batch_size=4) as theirs:
        reference = theirs(x, None)
    with cc.AblationCAM(net, [net.mid], batch_size=4) as ours:
        np.testing.assert_allclose(ours(x, None), reference, atol=1e-3)
    with cc.AblationCAM(net, [net.mid], batch_size=4, ablation_value="zero") as ours:
        assert np.abs(ours(x, None) - reference).max() > 0.1


def test_score_cam_batch_size_and_outputs(seeded):
    net = seeded(SmallNet).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    cam = cc.ScoreCAM(net, [net.stem])
    cam.batch_size = 5
    assert cam.cam.score_batch_size == 5
    maps = cam(x)
    torch.testing.assert_close(cam.outputs, net(x))
    assert maps.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="batch_size"):
        cam.batch_size = 0


def test_binary_classifier_targets(seeded):
    """A one-logit head: BinaryClassifierOutputTarget(0) explains the negated logit (not the logit)."""
    net = seeded(lambda: SmallNet(out=1)).eval()
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    for category in (0, 1):
        targets = [BinaryClassifierOutputTarget(category)] * 3
        mine, reference = pgc_and_ours("GradCAM", net, [net.mid], x, targets)
        np.testing.assert_allclose(mine, reference, atol=1e-3)
    with cc.GradCAM(net, [net.mid]) as cam:
        positive = cam(x, [BinaryClassifierOutputTarget(1)] * 3)
        negative = cam(x, [BinaryClassifierOutputTarget(0)] * 3)
    assert not np.allclose(positive, negative)


@pytest.mark.parametrize("flags", [{"eigen_smooth": True}, {"aug_smooth": True},
                                   {"aug_smooth": True, "eigen_smooth": True}], ids=["eigen", "aug", "both"])
def test_smoothing_flags_equal_pytorch_grad_cam(resnet18, small, monkeypatch, flags):
    """aug_smooth / eigen_smooth in the drop-in's call: pytorch-grad-cam's maps (its principal component
    oriented by our sign rule) within 2e-3."""
    patch_pgc_sign(monkeypatch)
    layers = [resnet18.layer3[-1]]
    with pgc.GradCAM(resnet18, layers) as theirs:
        reference = theirs(small, None, **flags)
    with cc.GradCAM(resnet18, layers) as ours:
        mine = ours(small, None, **flags)
        plain = ours(small, None)
    assert mine.shape == reference.shape and not np.allclose(mine, plain, atol=1e-2)
    np.testing.assert_allclose(mine, reference, atol=2e-3)


NEW = ["GradCAMElementWise", "FEM", "ShapleyCAM", "FinerCAM", "EigenCAM", "EigenGradCAM", "KPCA_CAM", "FullGrad"]


def test_every_class_is_exported():
    for name in GRADIENT + NEW + ["ScoreCAM", "AblationCAM", "ClusteredFilteredGradCAM"]:
        assert callable(getattr(cc, name)) and hasattr(pgc, name) or name == "ClusteredFilteredGradCAM"


def test_published_variant_through_the_drop_in(resnet18, small):
    """``ClusteredFilteredGradCAM(..., variant="paper")``: the published CF-CAM with pytorch-grad-cam's
    scaling, equal to the native engine's map scaled the same way."""
    import cfcam_gpu as cg

    layers = [resnet18.layer3[-1]]
    with cc.ClusteredFilteredGradCAM(resnet18, layers, variant="paper") as cam:
        maps = cam(small, None)
    native = cg.CFCAM(resnet18, layers, variant="paper")(small)
    expected = cc.to_numpy_maps(native, small.shape[-2:])
    assert maps.shape == (len(small), *small.shape[-2:]) and np.isfinite(maps).all()
    np.testing.assert_allclose(maps, expected, atol=1e-6)
    assert maps.max() > 0.99


@pytest.fixture(scope="module")
def resnet18_10(seeded):
    """torchvision ResNet18 with a 10-class head, seeded weights."""
    import torchvision

    return seeded(lambda: torchvision.models.resnet18(weights=None, num_classes=10)).eval()


@pytest.mark.parametrize("flags", [{"eigen_smooth": True}, {"aug_smooth": True},
                                   {"aug_smooth": True, "eigen_smooth": True}], ids=["eigen", "aug", "both"])
@pytest.mark.parametrize("n_layers", [1, 2])
def test_smoothing_where_the_plain_map_is_zero(resnet18_10, x3, monkeypatch, flags, n_layers):
    """Targets 1, 2, 3: the plain Grad-CAM of image 1 is all zero, its eigen-smoothed map is not; the
    drop-in's map must be pytorch-grad-cam's (the scale of every transformed map, ``CAMResult.peak``,
    taken after the transformation), for one layer and fused layers."""
    patch_pgc_sign(monkeypatch)
    layers = [resnet18_10.layer4[-1], resnet18_10.layer3[-1]][:n_layers]
    targets = [ClassifierOutputTarget(c) for c in (1, 2, 3)]
    with pgc.GradCAM(resnet18_10, layers) as theirs:
        reference = theirs(x3, targets, **flags)
        plain = theirs(x3, targets)
    with cc.GradCAM(resnet18_10, layers) as ours:
        mine = ours(x3, targets, **flags)
    if n_layers == 1:
        assert plain[1].max() == 0  # the reported case
    if flags.get("eigen_smooth"):  # the plain map is zero in every copy: aug_smooth alone keeps it zero
        assert reference[1].max() > 0.5
    assert reference.max() > 0.5  # (an aug-smoothed map is a mean: its max may be below 1)
    np.testing.assert_allclose(mine, reference, atol=2e-3)



# ----------------------------------------------------------------------------------------------------
# The classes added for the complete drop-in, on real activations of two architectures.

def architecture(request, name):
    """("resnet18" | "lite0") -> the model and its last feature layer: seeded ResNet18 at ``layer4[-1]``,
    the pretrained EfficientNet-Lite0 (ReLU6, depthwise convolutions) at ``bn2``."""
    model = request.getfixturevalue("resnet18" if name == "resnet18" else "efficientnet_lite0")
    # pytorch-grad-cam calls backward(), which fills the shared models' parameter .grad: cleared after
    request.addfinalizer(lambda: model.zero_grad(set_to_none=True))
    return (model, [model.layer4[-1]]) if name == "resnet18" else (model, [model.bn2])


SOFT = [ClassifierOutputSoftmaxTarget(1), ClassifierOutputTarget(2), ClassifierOutputSoftmaxTarget(3)]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("arch", ["resnet18", "lite0"])
@pytest.mark.parametrize("targets", [None, SOFT], ids=["top1", "softmax+logit"])
@pytest.mark.parametrize("eigen_smooth", [False, True], ids=["plain", "eigen"])
def test_new_classes_equal_pytorch_grad_cam(request, x3, monkeypatch, name, arch, targets, eigen_smooth):
    """Maps within 2e-3 of pytorch-grad-cam's (its principal components oriented by our sign rule, the
    projection methods' only freedom) on photos through seeded ResNet18 and pretrained EfficientNet-Lite0."""
    patch_pgc_sign(monkeypatch)
    model, layers = architecture(request, arch)
    if targets is not None and arch == "lite0":  # the photos' own classes (Egyptian cat, ...) in a real model
        targets = [type(t)(c) for t, c in zip(targets, (285, 823, 430))]
    mine, reference = pgc_and_ours(name, model, layers, x3, targets, {"eigen_smooth": eigen_smooth})
    assert mine.shape == reference.shape == (3, 96, 96) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, reference, atol=2e-3)
    assert reference.max() > 0.99


def test_shapley_cam_uses_the_hessian(resnet18, x3):
    """Through a linear head a logit has no curvature in layer4's output: ShapleyCAM is Grad-CAM there; a
    softmax target has, and ShapleyCAM (equal to pytorch-grad-cam, above) differs from Grad-CAM."""
    layers = [resnet18.layer4[-1]]
    with cc.ShapleyCAM(resnet18, layers) as shapley, cc.GradCAM(resnet18, layers) as grad:
        np.testing.assert_allclose(shapley(x3, [1, 2, 3]), grad(x3, [1, 2, 3]), atol=1e-6)
        soft = [ClassifierOutputSoftmaxTarget(c) for c in (1, 2, 3)]
        assert np.abs(shapley(x3, soft) - grad(x3, soft)).max() > 0.05


@pytest.mark.parametrize("call", [{"target_idx": 5}, {"alpha": 0.5, "comparison_categories": [1, 4]},
                                  {"eigen_smooth": True, "comparison_categories": [2]}],
                         ids=["target_idx", "alpha+places", "eigen"])
@pytest.mark.parametrize("base", ["GradCAM", "GradCAMPlusPlus", "LayerCAM"])
def test_finer_cam_options_equal_pytorch_grad_cam(resnet18, x3, monkeypatch, call, base):
    patch_pgc_sign(monkeypatch)
    layers = [resnet18.layer4[-1]]
    with pgc.FinerCAM(resnet18, layers, base_method=getattr(pgc, base)) as theirs:
        reference = theirs(x3, **call)
    with cc.FinerCAM(resnet18, layers, base_method=getattr(cc, base)) as ours:
        mine = ours(x3, **call)
        plain = cc.GradCAM(resnet18, layers)(x3, [5] * 3 if "target_idx" in call else None)
    np.testing.assert_allclose(mine, reference, atol=2e-3)
    assert np.abs(mine - plain).max() > 0.05  # the comparison classes change the map


def test_finer_cam_given_targets_are_the_base_methods(resnet18, x3):
    layers = [resnet18.layer4[-1]]
    with cc.FinerCAM(resnet18, layers) as finer, cc.GradCAM(resnet18, layers) as grad:
        np.testing.assert_array_equal(finer(x3, SOFT), grad(x3, SOFT))
    with pytest.raises(ValueError, match="base_method"):
        cc.FinerCAM(resnet18, layers, base_method=cc.ScoreCAM)


def test_fem_and_kpca_options_equal_pytorch_grad_cam(resnet18, x3, monkeypatch):
    patch_pgc_sign(monkeypatch)
    layers = [resnet18.layer3[-1]]
    for name, kwargs in (("FEM", {"k": 1}), ("KPCA_CAM", {"kernel": "rbf", "gamma": 0.01})):
        mine, reference = pgc_and_ours(name, resnet18, layers, x3, None, **kwargs)
        np.testing.assert_allclose(mine, reference, atol=2e-3, err_msg=name)
        assert reference.max() > 0.99


@pytest.mark.parametrize("name", ["ScoreCAM", "AblationCAM"])
def test_perturbation_classes_with_several_layers(request, seeded, name):
    """Score-CAM and Ablation-CAM with two target layers: each layer perturbed on its own, then fused, as
    pytorch-grad-cam: a small two-stage net (a negative layer minimum at "mid") and ResNet18."""
    net = seeded(SmallNet).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    mine, reference = pgc_and_ours(name, net, [net.stem, net.mid], x, None)
    np.testing.assert_allclose(mine, reference, atol=2e-3)
    resnet = request.getfixturevalue("resnet18")
    photo = torch.nn.functional.interpolate(request.getfixturevalue("x3")[:1], size=(32, 32), mode="bilinear",
                                            align_corners=False)
    mine, reference = pgc_and_ours(name, resnet, [resnet.layer2, resnet.layer3], photo, SOFT[:1])
    assert mine.shape == (1, 32, 32) and reference.max() > 0.99
    np.testing.assert_allclose(mine, reference, atol=2e-3)


# ----------------------------------------------------------------------------------------------------
# pytorch-grad-cam's own usage examples (its README and example script), with only the import changed.

def test_readme_usage_block(resnet18, batch):
    """The README's first example: construct once in a ``with`` block, call with ClassifierOutputTargets,
    take image 0's map, overlay it, read the model outputs."""
    from cfcam_gpu.compat import (AblationCAM, EigenCAM, FullGrad, GradCAM, GradCAMPlusPlus, HiResCAM,
                                  ScoreCAM, XGradCAM)

    display, x = batch
    model = resnet18
    target_layers = [model.layer4[-1]]
    input_tensor = torch.nn.functional.interpolate(x[:1], size=(64, 64), mode="bilinear", align_corners=False)
    rgb_img = torch.nn.functional.interpolate(display[:1], size=(64, 64), mode="bilinear",
                                              align_corners=False)[0].permute(1, 2, 0).numpy()
    targets = [ClassifierOutputTarget(281)]
    for cls in (GradCAM, HiResCAM, ScoreCAM, GradCAMPlusPlus, AblationCAM, XGradCAM, EigenCAM, FullGrad):
        with cls(model=model, target_layers=target_layers) as cam:
            grayscale_cam = cam(input_tensor=input_tensor, targets=targets)
            grayscale_cam = grayscale_cam[0, :]
            visualization = show_cam_on_image(rgb_img, grayscale_cam, use_rgb=True)
            model_outputs = cam.outputs
        assert grayscale_cam.shape == (64, 64) and visualization.shape == (64, 64, 3)
        torch.testing.assert_close(model_outputs, model(input_tensor))


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "scorecam", "gradcam++", "ablationcam", "xgradcam",
                                    "eigencam", "eigengradcam", "layercam", "fullgrad", "gradcamelementwise"])
def test_example_script_loop(seeded, monkeypatch, method):
    """The example script's loop: a class picked by name, ``cam.batch_size = 32`` set on every class,
    top-1 targets, both smoothings; equal to pytorch-grad-cam's maps."""
    methods = {"gradcam": "GradCAM", "hirescam": "HiResCAM", "scorecam": "ScoreCAM", "gradcam++": "GradCAMPlusPlus",
               "ablationcam": "AblationCAM", "xgradcam": "XGradCAM", "eigencam": "EigenCAM",
               "eigengradcam": "EigenGradCAM", "layercam": "LayerCAM", "fullgrad": "FullGrad",
               "gradcamelementwise": "GradCAMElementWise"}
    patch_pgc_sign(monkeypatch)
    net = seeded(lambda: SmallNet(linear=True)).eval()
    input_tensor = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    maps = []
    for module in (pgc, cc):
        with getattr(module, methods[method])(model=net, target_layers=[net.mid]) as cam:
            cam.batch_size = 4
            maps.append(cam(input_tensor=input_tensor, targets=None, aug_smooth=True, eigen_smooth=True))
    reference, mine = maps
    assert mine.shape == (1, 16, 16) and reference.max() > 0.5
    np.testing.assert_allclose(mine, reference, atol=2e-3)
