"""reshape.py: ViT/Swin token layouts and default layers, checked against pytorch-grad-cam on timm models."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cfcam_gpu as cg
import cfcam_gpu.compat as cc
from cfcam_gpu.reshape import default_target, swin, vit

pytest.importorskip("pytorch_grad_cam")
timm = pytest.importorskip("timm")
import pytorch_grad_cam as pgc  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def test_vit_layout():
    t = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # class token + 2 x 2 patches
    maps = vit()(t)
    assert maps.shape == (2, 3, 2, 2)
    assert torch.equal(maps[1, 2, 1, 0], t[1, 1 + 2, 2])  # patch (row 1, col 0) is token 1 + 2
    assert vit(prefix_tokens=2, height=1, width=3)(torch.zeros(2, 5, 3)).shape == (2, 3, 1, 3)
    with pytest.raises(ValueError, match="not a square grid"):
        vit()(torch.zeros(2, 4, 3))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        vit()(torch.zeros(2, 3, 4, 4))


def test_swin_layout():
    t = torch.randn(2, 3, 4, 5)  # (B, h, w, C)
    assert torch.equal(swin()(t), t.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="not a square grid"):  # (B, N, C): square unless h, w given
        swin()(t.reshape(2, 12, 5))
    assert swin(3, 4)(t.reshape(2, 12, 5)).shape == (2, 5, 3, 4)
    torch.testing.assert_close(swin(3, 4)(t.reshape(2, 12, 5)), t.permute(0, 3, 1, 2))


def test_default_target_families():
    import torchvision
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    assert default_target(torchvision.models.resnet18(weights=None))[0] == "layer4"
    tv_vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)
    name, transform = default_target(tv_vit)
    assert name == "encoder.layers.-1.ln_1" and transform is not None
    res = cg.GradCAM(tv_vit, name, reshape_transform=transform)(torch.randn(2, 3, 32, 32), [0, 1])
    assert res.cams.shape == (2, 2, 2)
    tv_swin = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2])
    name, transform = default_target(tv_swin)
    assert name == "features.-1"
    assert cg.GradCAM(tv_swin, name, reshape_transform=transform)(torch.randn(2, 3, 32, 32)).cams.shape == (2, 4, 4)
    name, _ = default_target(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False))
    assert name == "blocks.-1.norm1"
    with pytest.raises(ValueError, match="no default target layer"):
        default_target(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_name", ["vit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_transformers_equal_pytorch_grad_cam(seeded, images, model_name):
    model = seeded(lambda: timm.create_model(model_name, pretrained=False)).eval()
    layer_name, transform = default_target(model)
    layer = cg.resolve_layer(model, layer_name)
    targets = [3, 7]
    with pgc.GradCAM(model, [layer], reshape_transform=transform) as theirs:
        reference = theirs(images, [ClassifierOutputTarget(t) for t in targets])
    with cc.GradCAM(model, [layer], reshape_transform=transform) as ours:
        mine = ours(images, targets)
    assert reference.max() > 0.99
    np.testing.assert_allclose(mine, reference, atol=1e-3)
    native = cg.CFCAM(model, layer_name, reshape_transform=transform)(images, targets)
    assert native.cams.shape == ((2, 14, 14) if "vit" in model_name else (2, 7, 7))
    assert native.cams.dtype == torch.float32 and torch.isfinite(native.cams).all()
