"""fuse.py: min-max scaling and multi-layer fusion, against pytorch-grad-cam's own NumPy functions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cfcam_gpu as cg
from cfcam_gpu.fuse import fuse_cams, minmax_scale

pgc_image = pytest.importorskip("pytorch_grad_cam.utils.image")


def pgc_aggregate(maps, size):
    """pytorch-grad-cam's BaseCAM.compute_cam_per_layer + aggregate_multi_layers on (B, h, w) maps."""
    per_layer = [pgc_image.scale_cam_image(np.maximum(m, 0), size[::-1])[:, None] for m in maps]
    return pgc_image.scale_cam_image(np.maximum(np.concatenate(per_layer, axis=1), 0).mean(axis=1))


def test_fuse_equals_pytorch_grad_cam(rng):
    maps = [rng.normal(size=(3, 7, 7)).astype(np.float32), rng.normal(size=(3, 14, 14)).astype(np.float32) * 5]
    got = fuse_cams([torch.from_numpy(m) for m in maps], (56, 56), eps=1e-7).numpy()
    np.testing.assert_allclose(got, pgc_aggregate(maps, (56, 56)), atol=1e-5)


def test_constant_maps():
    maps = torch.tensor([[[2.0]], [[0.0]]])  # 1x1 maps: ours 1 where positive (pytorch-grad-cam: 0)
    assert minmax_scale(maps).flatten().tolist() == [1.0, 0.0]
    assert fuse_cams([maps], (4, 4)).shape == (2, 4, 4)
    with pytest.raises(ValueError, match="maps"):
        fuse_cams([], (4, 4))


def test_engine_with_two_layers(resnet18):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = [resnet18.layer3, resnet18.layer4]
    both = cg.GradCAM(resnet18, layers)(x, [1, 2])
    alone = [cg.GradCAM(resnet18, layer)(x, [1, 2]) for layer in layers]
    assert both.cams.shape == (2, 64, 64) and both.weights.shape == (2, 256 + 512)
    for mine, single in zip(both.layers, alone):
        torch.testing.assert_close(mine.cams, single.cams)
    torch.testing.assert_close(both.cams, fuse_cams([a.cams for a in alone], (64, 64)))
    chunked = cg.GradCAM(resnet18, layers, chunk_size=1)(x, [1, 2])
    torch.testing.assert_close(chunked.cams, both.cams)
    assert torch.equal(both.peak, (both.cams.amax(dim=(1, 2)) > 0).float())  # a fused map is final


@pytest.mark.parametrize("name", ["ScoreCAM", "AblationCAM"])
def test_perturbation_methods_with_two_layers(name):
    """Each layer explained on its own (as alone), then fused: the same as fusing the single-layer maps."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Conv2d(6, 5, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 3)).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    layers = [net[1], net[4]]
    both = getattr(cg, name)(net, layers)(x, [0, 2])
    alone = [getattr(cg, name)(net, layer)(x, [0, 2]) for layer in layers]
    assert both.cams.shape == (2, 12, 12) and both.weights.shape == (2, 6 + 5)
    for mine, single in zip(both.layers, alone):
        torch.testing.assert_close(mine.cams, single.cams)
    torch.testing.assert_close(both.cams, fuse_cams([a.cams for a in alone], (12, 12)))
