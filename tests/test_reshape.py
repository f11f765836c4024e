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
    t = torch.randn(2, 3, 3, 5)  # (B, h, w, C): the middle two sizes form the square grid
    assert torch.equal(swin()(t), t.permute(0, 3, 1, 2))
    maps = t.permute(0, 3, 1, 2)  # (B, C, h, w): already a map, returned as it is
    assert swin()(maps) is maps
    with pytest.raises(ValueError, match="not a square grid"):  # (B, N, C): square unless h, w given
        swin()(t.reshape(2, 9, 5)[:, :8])
    tokens = torch.randn(2, 12, 5)
    torch.testing.assert_close(swin(3, 4)(tokens), tokens.reshape(2, 3, 4, 5).permute(0, 3, 1, 2))


def test_swin_tells_the_layout_of_a_non_square_grid_from_height_and_width():
    t = torch.randn(2, 3, 4, 5)  # (B, h, w, C), h x w = 3 x 4
    assert torch.equal(swin(3, 4)(t), t.permute(0, 3, 1, 2))
    maps = torch.randn(2, 5, 3, 4)  # (B, C, h, w)
    assert swin(3, 4)(maps) is maps
    with pytest.raises(ValueError, match=r"square grid, got \(2, 3, 4, 5\); pass height and width"):
        swin()(t)
    with pytest.raises(ValueError, match=r"the 6 x 6 grid"):
        swin(6, 6)(t)
    assert torch.equal(swin(channels_last=True)(t), t.permute(0, 3, 1, 2))  # told, no test
    assert swin(channels_last=False)(maps) is maps


def test_swin_refuses_a_shape_that_fits_both_layouts():
    with pytest.raises(ValueError, match="cannot tell .* pass channels_last"):
        swin()(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="cannot tell"):
        swin(4, 4)(torch.zeros(1, 4, 4, 4))
    t = torch.randn(1, 4, 4, 4)
    assert torch.equal(swin(channels_last=True)(t), t.permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match=r"expected \(B, h, w, C\), \(B, C, h, w\) or \(B, N, C\), got \(2, 3\)"):
        swin()(torch.zeros(2, 3))


def _tiny_swins(seeded):
    from torchvision.models.swin_transformer import SwinTransformer
    tiny = dict(embed_dim=12, depths=(1, 1), num_heads=(1, 1))
    timm_swin = seeded(lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32,
                                                 window_size=2, **tiny))
    tv_swin = seeded(lambda: SwinTransformer(patch_size=[4, 4], window_size=[2, 2], **tiny))
    # (model, the patch embedding's convolution (B, C, h, w), the next layer (B, h, w, C))
    return [(timm_swin.eval(), "patch_embed.proj", "patch_embed.norm"), (tv_swin.eval(), "features.0.0",
                                                                          "features.0.1")]


def test_swin_layers_of_both_layouts_equal_pytorch_grad_cam(seeded):
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for model, conv, norm in _tiny_swins(seeded):
        for name, theirs_transform in ((conv, None), (norm, lambda t: t.permute(0, 3, 1, 2))):
            layer = cg.resolve_layer(model, name)
            with pgc.GradCAM(model, [layer], reshape_transform=theirs_transform) as theirs:
                reference = theirs(images, [ClassifierOutputTarget(t) for t in (3, 7)])
            with cc.GradCAM(model, [layer], reshape_transform=swin()) as ours:
                mine = ours(images, [3, 7])
            assert reference.max() > 0.99
            np.testing.assert_allclose(mine, reference, atol=1e-3, err_msg=name)
            assert cg.GradCAM(model, name, reshape_transform=swin())(images, [3, 7]).cams.shape == (2, 8, 8)


def test_layer_transform_is_told_by_the_module_where_the_shape_fits_both_layouts(seeded):
    """A Swin whose channel count equals its grid (8 channels on an 8 x 8 grid): swin() cannot tell the
    layouts apart, layer_transform can (the convolution's map as it is, the norm's tokens permuted), and
    its maps equal pytorch-grad-cam's with the layout written out; a ViT convolution needs no reshape."""
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.vision_transformer import VisionTransformer

    from cfcam_gpu.reshape import layer_transform

    model = seeded(lambda: SwinTransformer(patch_size=[4, 4], window_size=[2, 2], embed_dim=8, depths=(1, 1),
                                           num_heads=(1, 1))).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="cannot tell"):
        cg.GradCAM(model, "features.0.1", reshape_transform=swin())(images, [3, 7])
    for name, theirs_transform in (("features.0.0", None), ("features.0.1", lambda t: t.permute(0, 3, 1, 2))):
        layer = cg.resolve_layer(model, name)
        transform = layer_transform(model, layer)
        assert (transform is None) == (name == "features.0.0")
        with pgc.GradCAM(model, [layer], reshape_transform=theirs_transform) as theirs:
            reference = theirs(images, [ClassifierOutputTarget(t) for t in (3, 7)])
        with cc.GradCAM(model, [layer], reshape_transform=transform) as ours:
            mine = ours(images, [3, 7])
        assert reference.max() > 0.99
        np.testing.assert_allclose(mine, reference, atol=1e-3, err_msg=name)
    tv_vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=8)
    assert layer_transform(tv_vit, tv_vit.conv_proj) is None
    tokens = torch.randn(2, 1 + 4, 8)  # the class token and a 2 x 2 grid of patches
    got = layer_transform(tv_vit, tv_vit.encoder.layers[-1].ln_1)(tokens)
    assert torch.equal(got, tokens[:, 1:].reshape(2, 2, 2, 8).permute(0, 3, 1, 2))
    assert layer_transform(torchvision_resnet(), torchvision_resnet().layer4) is None


def torchvision_resnet():
    import torchvision

    return torchvision.models.resnet18(weights=None)


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
