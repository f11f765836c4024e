"""Model-facing engine: hooks on the target layer, targets, one ``autograd.grad`` to that layer.

The classes are thin: they capture (activations, gradients) and hand them to the pure functions in
``cam.py``. The model runs in eval mode (BatchNorm makes batch items independent only there) and its
train/eval state is restored afterwards; parameters' ``.grad`` are never touched; every hook is removed
when a call returns or raises.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_floating, check_ndim, check_tensor
from .cam import CAMResult, cfcam_from_features, gradcam_from_features

TOKENS_HINT = ("for transformer tokens (B, N, D) pass reshape_transform=lambda t: "
               "t[:, 1:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2) (drop the class token, "
               "then (B, D, h, w))")


def resolve_layer(model: nn.Module, layer) -> nn.Module:
    """A module of ``model`` given as a module or a dotted name: "layer4", "layer4.2", "layer4.-1"."""
    if isinstance(layer, nn.Module):
        if not any(m is layer for m in model.modules()):
            raise ValueError(f"target_layer: expected a submodule of the model, got a {type(layer).__name__} "
                             "that is not inside it")
        return layer
    if not isinstance(layer, str) or not layer:
        raise TypeError(f"target_layer: expected a module or a dotted name like 'layer4.-1', got {layer!r}")
    module, path = model, []
    for part in layer.split("."):
        children = dict(module.named_children())
        if part.lstrip("-").isdigit() and not part in children:
            try:
                module = list(module.children())[int(part)]
            except IndexError:
                raise ValueError(f"target_layer: index {part} out of range in {'.'.join(path) or 'the model'} "
                                 f"({len(children)} children) for {layer!r}") from None
        elif part in children:
            module = children[part]
        else:
            names = list(children)
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise ValueError(f"target_layer: unknown layer {layer!r}: no child {part!r} in "
                             f"{'.'.join(path) or 'the model'}; expected one of: {shown or '(no children)'}")
        path.append(part)
    return module


def resolve_targets(targets, logits: Tensor) -> Tensor:
    """targets: None (top-1), an int (every image) or B class indices -> (B,) int64 on the logits' device."""
    B, K = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    if isinstance(targets, bool):
        raise TypeError(f"targets: expected None, an int or {B} class indices, got a bool")
    if isinstance(targets, int):
        if not 0 <= targets < K:
            raise ValueError(f"targets: expected a class index in [0, {K}), got {targets}")
        return torch.full((B,), targets, dtype=torch.long, device=logits.device)
    t = torch.as_tensor(targets, device=logits.device) if not isinstance(targets, Tensor) else targets
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"targets: expected integer class indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"targets: expected {B} class indices (one per image), got shape {tuple(t.shape)}")
    t = t.to(device=logits.device, dtype=torch.long)
    bad = (t < 0) | (t >= K)
    if bool(bad.any()):  # one host sync, only when the caller passes explicit targets
        i = int(torch.nonzero(bad)[0])
        raise ValueError(f"targets: expected class indices in [0, {K}), got {int(t[i])} for image index {i}")
    return t


class _Capture:
    """Forward hook that keeps the layer's output as a graph leaf and turns grad mode back on there.

    The model runs under ``no_grad``; at the target layer the output is detached into a leaf that requires
    grad, so autograd records only the layers above it: no graph, no saved tensors and no backward below
    the layer, whatever the parameters' requires_grad.
    """

    def __init__(self):
        self.output: Tensor | None = None

    def __call__(self, module, inputs, output):
        if not isinstance(output, Tensor):
            raise ValueError(f"target_layer: expected the layer to output a tensor (B, C, h, w), got "
                             f"{type(output).__name__}; pick a layer that returns one tensor")
        torch.set_grad_enabled(True)
        leaf = output.detach().requires_grad_(True)
        self.output = leaf
        return leaf.clone()  # later in-place ops (ReLU(inplace=True), +=) must not touch the leaf


class _CAMEngine:
    """Common engine; subclasses choose the pure function that turns features into maps."""

    def __init__(self, model: nn.Module, target_layer, reshape_transform: Callable | None = None,
                 check_values: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.target_layer = resolve_layer(model, target_layer)
        self.reshape_transform = reshape_transform
        self.check_values = check_values

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _from_features(self, activations: Tensor, gradients: Tensor) -> CAMResult:
        raise NotImplementedError

    def _features(self, images: Tensor, targets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images (B, 3, H, W) -> activations, gradients (B, C, h, w), targets (B,), logits (B, K)."""
        check_ndim(images, 4, "images", "(B, 3, H, W)")
        check_floating(images, "images")
        capture = _Capture()
        was_training = self.model.training
        handle = self.target_layer.register_forward_hook(capture)
        try:
            self.model.eval()
            with torch.no_grad():
                logits = self.model(images)
                if capture.output is None:
                    raise ValueError("target_layer: the layer did not run during the forward pass; "
                                     "pick a layer on the path from the input to the logits")
                if not isinstance(logits, Tensor) or logits.ndim != 2:
                    raise ValueError("model: expected the model to return logits (B, K), got "
                                     f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
                target_idx = resolve_targets(targets, logits)
                score = logits.gather(1, target_idx[:, None]).sum()
                if not score.requires_grad:
                    raise ValueError("target_layer: the logits do not depend on the layer's output; "
                                     "pick a layer on the path from the input to the logits")
                (grads,) = torch.autograd.grad(score, capture.output)
        finally:
            handle.remove()
            self.model.train(was_training)
        acts = capture.output.detach()
        if self.reshape_transform is not None:
            acts, grads = self.reshape_transform(acts), self.reshape_transform(grads)
        if acts.ndim != 4:
            raise ValueError(f"target_layer: expected the layer output to be (B, C, h, w), got shape "
                             f"{tuple(acts.shape)}; {TOKENS_HINT}")
        return acts, grads, target_idx, logits.detach()

    def __call__(self, images: Tensor, targets=None) -> CAMResult:
        """images: (B, 3, H, W) on the model's device; targets: None (top-1), an int, or B class indices.

        Returns the CAMResult with cams (B, h, w) at the layer's resolution, targets (B,), logits (B, K).
        """
        acts, grads, target_idx, logits = self._features(images, targets)
        result = self._from_features(acts, grads)
        result.targets, result.logits = target_idx, logits
        return result


class CFCAM(_CAMEngine):
    """CF-CAM: DBSCAN-clustered, guided-filtered Grad-CAM, for a whole batch in one call.

    ``CFCAM(model, target_layer, backend="torch", reshape_transform=None, check_values=True)``;
    ``cam(images, targets)`` -> CAMResult. Use as a context manager or directly.
    """

    def __init__(self, model: nn.Module, target_layer, backend: str = "torch", **options):
        super().__init__(model, target_layer, **options)
        self.backend = backend

    def _from_features(self, activations, gradients):
        return cfcam_from_features(activations, gradients, backend=self.backend,
                                   check_values=self.check_values)


class GradCAM(_CAMEngine):
    """Plain Grad-CAM with the same engine and normalisation as CFCAM."""

    def _from_features(self, activations, gradients):
        return gradcam_from_features(activations, gradients, check_values=self.check_values)
