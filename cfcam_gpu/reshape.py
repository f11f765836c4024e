"""``reshape_transform`` presets for transformer token layouts, and the default layer per model family.

    import cfcam_gpu as cg
    cam = cg.CFCAM(vit, "blocks.-1.norm1", reshape_transform=cg.reshape.vit())
    layer, transform = cg.reshape.default_target(model)   # e.g. ("blocks.-1.norm1", vit(prefix_tokens=1))
    cam = cg.GradCAM(model, layer, reshape_transform=transform)

Shapes: B images, N tokens, D (= C) channels, h x w token grid.
"""
from __future__ import annotations

import math
from typing import Callable

from torch import Tensor, nn

from .layers import resolve_layer


def _grid(n: int, height: int | None, width: int | None, what: str) -> tuple[int, int]:
    if height is not None and width is not None:
        if height * width != n:
            raise ValueError(f"{what}: expected {height} x {width} = {height * width} patch tokens, got {n}")
        return height, width
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{what}: {n} patch tokens are not a square grid; pass height and width")
    return side, side


def vit(height: int | None = None, width: int | None = None, prefix_tokens: int = 1) -> Callable:
    """ViT/DeiT tokens (B, N, D) -> (B, D, h, w): the first ``prefix_tokens`` tokens (class token; 2 for
    DeiT distilled; plus register tokens where a model has them) dropped, the rest laid on the h x w
    patch grid (square when height/width are not given). Works for timm and torchvision ViTs."""
    def transform(t: Tensor) -> Tensor:
        if not isinstance(t, Tensor) or t.ndim != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"reshape_transform: vit expected tokens (B, N, D), got {got}")
        patches = t[:, prefix_tokens:]
        h, w = _grid(patches.shape[1], height, width, "reshape_transform: vit")
        return patches.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
    return transform


def swin(height: int | None = None, width: int | None = None, channels_last: bool | None = None) -> Callable:
    """Swin layer output -> (B, C, h, w), the layout told from the shape.

    A token list (B, N, C) (older timm) is laid on the h x w grid. A 4-D output is either channels-last
    tokens (B, h, w, C) (timm >= 0.9 and torchvision stages, blocks and norms), which are permuted, or
    already a map (B, C, h, w) (the patch embedding's convolution, e.g. timm ``patch_embed.proj``,
    torchvision ``features.0.0``), which is returned as it is. The grid is (height, width) when both are
    given, else square: (B, h, w, C) when the middle two sizes form the grid, (B, C, h, w) when the last
    two do. ``channels_last=True`` / ``False`` skips the test and says which (needed when C == h == w, or
    for a non-square grid whose height and width are not given). Anything else: ValueError.
    """
    what = "reshape_transform: swin"

    def transform(t: Tensor) -> Tensor:
        if isinstance(t, Tensor) and t.ndim == 3:
            h, w = _grid(t.shape[1], height, width, what)
            return t.reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)
        if not isinstance(t, Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{what} expected (B, h, w, C), (B, C, h, w) or (B, N, C), got {got}")
        last = channels_last if channels_last is not None else _is_channels_last(tuple(t.shape), height, width)
        return t.permute(0, 3, 1, 2) if last else t
    return transform


def _is_channels_last(shape: tuple[int, ...], height: int | None, width: int | None) -> bool:
    """(B, a, b, c): True for tokens (B, h, w, C), False for a map (B, C, h, w); ValueError when the
    shape fits both or neither."""
    _, a, b, c = shape
    given = height is not None and width is not None
    tokens = (a, b) == (height, width) if given else a == b
    maps = (b, c) == (height, width) if given else b == c
    grid = f"the {height} x {width} grid" if given else "a square grid"
    if tokens != maps:
        return tokens
    if tokens:
        raise ValueError(f"reshape_transform: swin cannot tell (B, h, w, C) from (B, C, h, w) in {shape} "
                         f"(channels = grid size); pass channels_last=True or False")
    raise ValueError(f"reshape_transform: swin expected (B, h, w, C) or (B, C, h, w) on {grid}, got {shape}; "
                     f"pass height and width, or channels_last=True or False")


def _family(model: nn.Module) -> tuple[str, str]:
    cls = type(model)
    return cls.__module__.split(".")[0], cls.__name__


# The default layer of each transformer family (``default_target``).
TRANSFORMER_LAYERS = {"timm_vit": "blocks.-1.norm1", "torchvision_vit": "encoder.layers.-1.ln_1",
                      "timm_swin": "layers.-1", "torchvision_swin": "features.-1"}


def _transformer_family(model: nn.Module) -> str | None:
    """The key of TRANSFORMER_LAYERS for a timm/torchvision ViT, DeiT or Swin; None for other models."""
    package, name = _family(model)
    if package == "timm" and name in ("VisionTransformer", "VisionTransformerDistilled"):
        return "timm_vit"
    if package == "torchvision" and name == "VisionTransformer":
        return "torchvision_vit"
    if package in ("timm", "torchvision") and name == "SwinTransformer":
        return f"{package}_swin"
    return None


def default_target(model: nn.Module) -> tuple[str, Callable | None]:
    """(layer name, reshape_transform or None) commonly explained for a model family.

    timm VisionTransformer / VisionTransformerDistilled (vit_*, deit_*): "blocks.-1.norm1" with
    ``vit(prefix_tokens=model.num_prefix_tokens)`` (the last block's output feeds the head only through
    the class token, so its patch tokens get no gradient; the input of the last attention does);
    torchvision VisionTransformer (vit_*): "encoder.layers.-1.ln_1" with ``vit()``; timm and torchvision
    SwinTransformer (swin_*): the last stage, "layers.-1" / "features.-1", with ``swin(channels_last=True)``
    (``layer_transform``); torchvision
    ResNet "layer4", VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt "features.-1" (timm ResNet
    "layer4"), no reshape. Other models: ValueError.
    """
    family = _transformer_family(model)
    if family is not None:
        layer = TRANSFORMER_LAYERS[family]
        return layer, layer_transform(model, resolve_layer(model, layer))
    package, name = _family(model)
    if name == "ResNet" and package in ("timm", "torchvision"):
        return "layer4", None
    if package == "torchvision" and name in ("VGG", "DenseNet", "MobileNetV2", "MobileNetV3", "EfficientNet",
                                             "ConvNeXt"):
        return "features.-1", None
    raise ValueError(f"model: no default target layer for {package}.{name}; supported: timm and torchvision "
                     f"ViT/DeiT/Swin/ResNet, torchvision VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt; "
                     f"pass the layer (and a reshape_transform) yourself")


def layer_transform(model: nn.Module, layer: nn.Module) -> Callable | None:
    """The reshape_transform for ``layer``, a module of ``model``, told by the module rather than guessed
    from its output's shape: None for a convolution (``nn.Conv2d``, e.g. the patch embedding's
    ``patch_embed.proj``: it outputs a map (B, C, h, w) already) and for models of no transformer family
    ``default_target`` knows; ``vit(prefix_tokens=...)`` for any other layer of a timm or torchvision
    ViT/DeiT; ``swin(channels_last=True)`` for any other layer of a timm or torchvision Swin (tokens
    (B, h, w, C), or (B, N, C) in older timm), so a grid as large as the channel count is no ambiguity."""
    family = None if isinstance(layer, nn.Conv2d) else _transformer_family(model)
    if family == "timm_vit":
        return vit(prefix_tokens=int(getattr(model, "num_prefix_tokens", 1)))
    if family == "torchvision_vit":
        return vit(prefix_tokens=1)
    if family in ("timm_swin", "torchvision_swin"):
        return swin(channels_last=True)
    return None
