"""cfcam_gpu.compat: pytorch-grad-cam's calling convention, checked against pytorch-grad-cam itself."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import GradCAM as PGCGradCAM  # noqa: E402
from pytorch_grad_cam.utils.image import show_cam_on_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

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


def test_one_target_layer_only(resnet18):
    with pytest.raises(ValueError, match="exactly one layer"):
        GradCAMCompat(model=resnet18, target_layers=[resnet18.layer3[-1], resnet18.layer4[-1]])
