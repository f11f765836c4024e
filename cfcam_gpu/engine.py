"""Model-facing engine: hooks on the target layer, targets, one ``autograd.grad`` to that layer.

The classes are thin: they capture (activations, gradients) and hand them to the pure functions in
``cam.py``. The model runs in eval mode (BatchNorm makes batch items independent only there, and leaves
its running statistics alone) and its train/eval state is restored afterwards; parameters' ``.grad``
are never touched; every hook is removed when a call returns or raises. A call holds the model's lock
(``hooks.model_lock``) throughout: engines sharing a model in several threads take turns.

With ``compile`` the model pass goes through ``torch.compile``. The capture hooks are wrapped in
``torch.compiler.disable``: the layer output has to become a leaf that autograd sees, which cannot happen
inside one compiled graph, so dynamo splits the forward there. Measured on torch 2.14.1 (CPU): the graph
breaks at the call in the model's code that leads to the target layer; what comes before and after that
call is compiled, the call itself runs eagerly and dynamo compiles the user-code frames inside it on their
own (ResNet-18 at ``layer4[-1]``: stem to layer3, each layer4 block and the head compiled, 4 frames; a
target inside a plain ``nn.Sequential`` of torch.nn layers leaves that Sequential eager). A second call
with the same input shapes compiles nothing; a new batch size compiles once more (dynamic shapes), then
no more. Dynamo does not guard on module hooks by default: code compiled while the target layer had no
capture hook (Score-CAM's masked forwards through the same compiled model) would be reused with the hook
silently skipped, so the engine's compiled calls turn hook guards on (``_forward``); a new hook per call
then still causes no recompilation.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_floating, check_ndim
from .cam import VARIANTS, CAMResult, cfcam_from_features, gradcam_from_features, unit_peak
from .fuse import fuse_cams
from .hooks import LeafCapture, PipelineCapture, capture_hook, eval_mode, forward_hook, model_lock
from .layers import resolve_layer
from .targets import detach_output, output_batch_size, resolve

TOKENS_HINT = ("for transformer tokens (B, N, D) pass reshape_transform=lambda t: "
               "t[:, 1:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2) (drop the class token, "
               "then (B, D, h, w))")


AMP_DTYPES = {True: torch.bfloat16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}

COMPILE_KEYS = tuple(name for name in inspect.signature(torch.compile).parameters if name != "model")


def compile_options(compile) -> dict | None:
    """compile: False (off), True (``torch.compile`` defaults) or a dict of its keyword arguments
    -> the keyword arguments, or None when off."""
    if compile is False:
        return None
    if compile is True:
        return {}
    if not isinstance(compile, dict):
        raise TypeError(f"compile: expected False, True or a dict of torch.compile keyword arguments, got "
                        f"{compile!r}")
    unknown = sorted(str(k) for k in compile if k not in COMPILE_KEYS)
    if unknown:
        raise ValueError(f"compile: expected torch.compile keyword arguments ({', '.join(COMPILE_KEYS)}), "
                         f"got {', '.join(unknown)}")
    if compile.get("fullgraph"):
        raise ValueError("compile: expected fullgraph False, got True; the capture at the target layer "
                         "is a graph break by design")
    return dict(compile)


class CAMEngine:
    """Common engine; subclasses choose the pure function that turns features into maps.

    ``target_layer``: a module or dotted name, or a list of them. With several layers each layer's CAM
    is computed from one forward and one backward pass and they are fused at the input size as
    pytorch-grad-cam does (each map ReLU'd, min-max scaled, resized bilinearly to H x W; the mean over
    layers min-max scaled again: ``fuse.fuse_cams``), so ``result.cams`` is (B, H, W) and
    ``result.layers`` holds each layer's own result.
    Options: ``reshape_transform`` (callable mapping the layer output and its gradient to (B, C, h, w);
    presets in ``cfcam_gpu.reshape``), ``check_values`` (raise on NaN/inf naming the image; one host
    sync), ``amp`` (False: the model runs in the caller's precision, under the caller's
    ``torch.autocast`` if any; True/"bfloat16" or "float16": autocast for the model pass only; either
    way clustering, filtering, ``cams`` and ``weights`` are float32 or better), ``channels_last``
    (converts the model in place and feeds channels-last images), ``chunk_size`` (explain at most that
    many images per pass; results equal the unchunked call), ``compile`` (False, True or a dict of
    ``torch.compile`` keyword arguments such as ``{"backend": "aot_eager"}``: the model pass of
    ``cam(images)`` runs through ``torch.compile(model, **kwargs)``, made once here; the first call per
    input shape compiles, later ones reuse it; the graph breaks at the target layer, see the module
    docstring; ``fullgraph=True`` is refused). ``torch.compile`` leaves the model object in place and sets
    only its ``_is_torch_compile`` attribute. ``explain`` runs no forward of its own, so ``compile`` does not
    apply there. Targets: see ``cfcam_gpu.targets``.
    """

    uses_gradients = True  # False: a gradient-free method; no graph is recorded and no backward runs

    def __init__(self, model: nn.Module, target_layer, reshape_transform: Callable | None = None,
                 check_values: bool = True, amp=False, channels_last: bool = False,
                 chunk_size: int | None = None, compile=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if amp is not False and amp not in AMP_DTYPES:
            raise ValueError(f"amp: expected False, True, 'bfloat16' or 'float16', got {amp!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: expected None or an int >= 1, got {chunk_size!r}")
        compile_kwargs = compile_options(compile)
        layers = list(target_layer) if isinstance(target_layer, (list, tuple)) else [target_layer]
        if not layers:
            raise ValueError("target_layer: expected a layer or a non-empty list of layers, got []")
        self.model = model
        self.target_layers = [resolve_layer(model, layer) for layer in layers]
        self.target_layer = self.target_layers[0]
        self.reshape_transform = reshape_transform
        self.check_values = check_values
        self.amp_dtype = AMP_DTYPES.get(amp) if amp is not False else None
        self.channels_last = channels_last
        self.chunk_size = chunk_size
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # the wrapper shares the model's modules; compilation itself happens on the first call
        self._compiled = None if compile_kwargs is None else torch.compile(model, **compile_kwargs)
        self._pipelines: list[PipelineCapture] | None = None
        self._pipeline_handles: list = []

    def _forward(self, images: Tensor):
        """The model pass: the model itself, or its compiled wrapper. Compiled code is cached per code
        object; by default dynamo does not guard on hooks, so code compiled while the target layer had
        no capture hook (Score-CAM's masked forwards, a caller's own compiled runs) would be reused
        with the hook silently skipped. Guarding on hooks here keeps the two apart (a recompile)."""
        if self._compiled is None:
            return self.model(images)
        import torch._dynamo  # already imported by torch.compile

        with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
            return self._compiled(images)

    # -- context manager: a persistent hook for explain() -------------------------------------------
    def __enter__(self):
        self._pipelines = [PipelineCapture() for _ in self.target_layers]
        self._pipeline_handles = [layer.register_forward_hook(capture_hook(p))
                                  for layer, p in zip(self.target_layers, self._pipelines)]
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Remove the hooks installed by ``with``; idempotent."""
        for handle in self._pipeline_handles:
            handle.remove()
        self._pipeline_handles, self._pipelines = [], None

    def _autocast(self, images: Tensor):
        """The engine's ``amp`` for a model pass; without ``amp`` the caller's autocast state stays."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(images.device.type, dtype=self.amp_dtype)

    def _from_features(self, activations: Tensor, gradients: Tensor | None) -> CAMResult:
        raise NotImplementedError

    def _to_maps(self, acts, grads) -> tuple[Tensor, Tensor | None]:
        """The layer output and its gradient (any structure; the gradient None for a gradient-free method)
        -> float32 (or float64) (B, C, h, w) maps (the gradient's None when it was)."""
        if self.reshape_transform is not None:
            acts = self.reshape_transform(acts)
            grads = None if grads is None else self.reshape_transform(grads)
        if not isinstance(acts, Tensor) or acts.ndim != 4:
            got = tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__
            raise ValueError(f"target_layer: expected the layer output to be (B, C, h, w), got shape "
                             f"{got}; {TOKENS_HINT}; presets: cfcam_gpu.reshape")
        if acts.dtype != torch.float64:  # bf16/fp16 from autocast: every result is float32
            acts, grads = acts.float(), (None if grads is None else grads.float())
        return acts, grads

    def _gradients(self, scores: Tensor, outputs: list) -> list:
        """d scores.sum() / d each captured layer output (a tensor or a dict of tensors)."""
        if not scores.requires_grad:
            raise ValueError("target_layer: the target scores do not depend on the layer's output; "
                             "pick a layer on the path from the input to the model output")
        leaves = [list(o.values()) if isinstance(o, dict) else [o] for o in outputs]
        flat = torch.autograd.grad(scores.sum(), [t for group in leaves for t in group], allow_unused=True)
        grads, i = [], 0
        for n, (out, group) in enumerate(zip(outputs, leaves)):
            got = [torch.zeros_like(t) if g is None else g for t, g in zip(group, flat[i:i + len(group)])]
            if isinstance(out, Tensor) and flat[i] is None:
                raise ValueError(f"target_layer: the target scores do not depend on the output of target "
                                 f"layer {n}; pick a layer on the path from the input to the model output")
            grads.append(type(out)(zip(out.keys(), got)) if isinstance(out, dict) else got[0])
            i += len(group)
        return grads

    def _capture(self, images: Tensor, targets):
        """images (B, 3, H, W) -> per layer activations and gradients (B, C, h, w; None for a gradient-free
        method), the resolved Target, the detached model output."""
        captures = [LeafCapture(grad=self.uses_gradients) for _ in self.target_layers]
        with contextlib.ExitStack() as stack:
            for layer, capture in zip(self.target_layers, captures):
                stack.enter_context(forward_hook(layer, capture))
            stack.enter_context(eval_mode(self.model))
            with torch.no_grad(), self._autocast(images):
                output = self._forward(images)
            if any(c.output is None for c in captures):
                hint = ("; with compile, code dynamo compiled elsewhere without this hook may have been "
                        "reused: try torch._dynamo.reset()") if self._compiled is not None else ""
                raise ValueError("target_layer: the layer did not run during the forward pass; "
                                 "pick a layer on the path from the input to the logits" + hint)
            target = resolve(targets, output)
            grads = [None] * len(captures)
            if self.uses_gradients:
                with torch.enable_grad():  # also when the caller runs us under torch.no_grad()
                    grads = self._gradients(target.scores(output), [c.output for c in captures])
        maps = [self._to_maps(detach_output(c.output), g) for c, g in zip(captures, grads)]
        return [m[0] for m in maps], [m[1] for m in maps], target, detach_output(output)

    def _capture_one(self, images: Tensor, targets):
        """The first target layer's activations (B, C, h, w), gradients (B, C, h, w; None when
        ``uses_gradients`` is False), the Target, the model output."""
        acts, grads, target, output = self._capture(images, targets)
        return acts[0], grads[0], target, output

    def _features(self, images: Tensor, targets):
        """-> activations (B, C, h, w), gradients (B, C, h, w; None when ``uses_gradients`` is False) of the
        first layer, target class indices (B,) (None for callable targets), the model output (logits (B, L)
        for classifiers)."""
        acts, grads, target, output = self._capture_one(images, targets)
        return acts, grads, target.indices, output

    def _weighted_activations(self, activations: Tensor, gradients: Tensor, result: CAMResult) -> Tensor:
        """What ``eigen_smooth`` projects instead of summing over channels: weights x activations
        (B, C, h, w). Methods with element-wise weights override it."""
        return result.weights[:, :, None, None].float() * activations.float()

    def _smooth(self, result: CAMResult, activations: Tensor, gradients: Tensor, eigen_smooth: bool) -> CAMResult:
        """The hook where a map is made from features: with ``eigen_smooth`` the first principal component
        of the weighted activations replaces their sum (``smoothing.eigen_smooth``)."""
        if eigen_smooth:
            from .smoothing import eigen_smooth as project  # smoothing imports the methods, which import us
            result.cams, result.peak = project(self._weighted_activations(activations, gradients, result),
                                               getattr(self, "sync_free", None), with_peak=True)
        return result

    def from_features(self, activations: Tensor, gradients: Tensor | None,
                      eigen_smooth: bool = False) -> CAMResult:
        """The engine's map of features already captured at its (first) target layer, as ``__call__``
        makes it after the backward pass (``eigen_smooth`` as there).

        activations, gradients: (B, C, h, w) (gradients may be None where ``uses_gradients`` is False)
        -> CAMResult with cams (B, h, w).
        """
        return self._smooth(self._from_features(activations, gradients), activations, gradients, eigen_smooth)

    def _combine(self, acts: list, grads: list, size, eigen_smooth: bool = False) -> CAMResult:
        results = [self._smooth(self._from_features(a, g), a, g, eigen_smooth) for a, g in zip(acts, grads)]
        return combine_layers(results, size)

    def _explain_images(self, images: Tensor, targets, eigen_smooth: bool = False) -> CAMResult:
        acts, grads, target, output = self._capture(images, targets)
        result = self._combine(acts, grads, images.shape[-2:], eigen_smooth)
        result.targets, result.logits = target.indices, output
        return result

    def __call__(self, images: Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> CAMResult:
        """images: (B, 3, H, W) on the model's device; targets: see ``cfcam_gpu.targets`` (None: top-1).

        Returns the CAMResult with cams (B, h, w) at the layer's resolution (several layers: (B, H, W)),
        targets (B,), logits (the model output). With ``chunk_size`` the batch is explained chunk by chunk
        (bounded memory, same results). ``eigen_smooth``: the map is the first principal component of the
        weighted activations; ``aug_smooth``: the mean of the maps of flipped and scaled copies, all
        copies in one batch; its cams are (B, H, W), at the input resolution (``smoothing``, as
        pytorch-grad-cam).
        """
        check_not_inference_mode()
        check_ndim(images, 4, "images", "(B, 3, H, W)")
        check_floating(images, "images")
        if images.shape[0] == 0:  # refused before any forward, whatever the targets
            raise ValueError(f"images: expected at least one image (B >= 1), got shape {tuple(images.shape)}")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with model_lock(self.model):  # hooks, mode and forward: one engine call per model at a time
            if aug_smooth:
                from .smoothing import aug_smooth as smooth
                return smooth(lambda x, t: self._explain_batch(x, t, eigen_smooth), images, targets)
            return self._explain_batch(images, targets, eigen_smooth)

    def _explain_batch(self, images: Tensor, targets, eigen_smooth: bool) -> CAMResult:
        B = images.shape[0]
        if self.chunk_size is None or B <= self.chunk_size:
            return self._explain_images(images, targets, eigen_smooth)
        per_image = isinstance(targets, (list, tuple, np.ndarray, Tensor))
        if per_image and len(targets) != B:
            raise ValueError(f"targets: expected {B} class indices (one per image), got {len(targets)}")
        parts = [self._explain_images(images[i:i + self.chunk_size],
                                      targets[i:i + self.chunk_size] if per_image else targets, eigen_smooth)
                 for i in range(0, B, self.chunk_size)]
        return CAMResult.cat(parts)

    def explain(self, logits, targets=None, eigen_smooth: bool = False) -> CAMResult:
        """CAMs for a forward pass the caller already ran inside ``with cam:`` (no second forward).

        logits: the model output from that forward ((B, L) logits, or any output with callable targets),
        computed with grad enabled (a gradient-free method, ``uses_gradients`` False, takes no gradient
        and accepts a forward under ``torch.no_grad``) -> CAMResult (several layers: fused at the largest
        layer's size, as there are no images here); ``eigen_smooth`` as in ``__call__`` (``aug_smooth``
        needs forwards of its own, so it is not offered here). The ``compile`` option does not apply (the
        forward is the caller's). A model the caller compiled works when its first compiled run is inside the
        ``with`` block: dynamo does not guard on hooks, so code compiled before the hook existed never
        calls it (explain then says no forward pass was captured).
        """
        check_not_inference_mode()
        if self._pipelines is None:
            raise ValueError("explain: expected to be called inside `with CFCAM(model, layer) as cam:` "
                             "after `logits = model(x)`; no hook is installed")
        captured = [p.output for p in self._pipelines]
        if any(c is None for c in captured):
            raise ValueError("explain: no forward pass of the model was captured at the target layer; "
                             "run `logits = model(x)` inside the `with` block first")
        B = output_batch_size(logits)
        if B != captured[0].shape[0]:
            raise ValueError(f"logits: expected {captured[0].shape[0]} rows (the captured batch), got {B}")
        target = resolve(targets, logits)
        grads = [None] * len(captured)
        if self.uses_gradients:
            scores = target.scores(logits)
            if not all(c.requires_grad for c in captured) or not scores.requires_grad:
                raise ValueError("explain: the captured forward ran without gradients (under torch.no_grad "
                                 "or torch.inference_mode); run it with grad enabled")
            grads = self._gradients(scores, captured)
        for p in self._pipelines:
            p.output = None
        maps = [self._to_maps(c.detach(), g) for c, g in zip(captured, grads)]
        size = max((tuple(a.shape[-2:]) for a, _ in maps), key=lambda s: s[0] * s[1])  # no images here
        result = self._combine([m[0] for m in maps], [m[1] for m in maps], size, eigen_smooth)
        result.targets, result.logits = target.indices, detach_output(logits)
        return result


def combine_layers(results: "list[CAMResult]", size) -> CAMResult:
    """One result per target layer -> the result: the only one as is, or several fused at ``size`` (H, W)
    (``fuse.fuse_cams``) with the layers' weights side by side and each layer's result in ``layers``;
    a fused map is final, so its peak is ``unit_peak``."""
    if len(results) == 1:
        return results[0]
    cams = fuse_cams([r.cams for r in results], size)
    return CAMResult(cams=cams, weights=torch.cat([r.weights for r in results], dim=1), layers=results,
                     peak=unit_peak(cams))


def check_not_inference_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise RuntimeError("torch.inference_mode is on: a CAM needs gradients, which inference mode forbids "
                           "(tensors made there can never require grad); call the CAM outside "
                           "`with torch.inference_mode():` (under torch.no_grad() it works)")


class CFCAM(CAMEngine):
    """CF-CAM: DBSCAN-clustered, guided-filtered Grad-CAM, for a whole batch in one call.

    ``CFCAM(model, target_layer, backend="torch", exclude_dead=False, sync_free=None, variant="seed",
    **options)`` (``exclude_dead``, ``sync_free`` and ``variant`` ("seed", or "paper": CF-CAM as published)
    as ``cfcam_from_features``; options: see ``CAMEngine``);
    ``cam(images, targets)`` -> CAMResult; ``with CFCAM(...) as cam: cam.explain(model(x))``.
    """

    def __init__(self, model: nn.Module, target_layer, backend: str = "torch", exclude_dead: bool = False,
                 sync_free: bool | None = None, variant: str = "seed", **options):
        super().__init__(model, target_layer, **options)
        if variant not in VARIANTS:
            raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
        if exclude_dead and (backend != "torch" or variant != "seed"):
            raise ValueError(f"exclude_dead: supported only with backend='torch' and variant='seed', got "
                             f"backend={backend!r}, variant={variant!r}")
        if variant == "paper" and backend not in ("torch", "sklearn"):
            raise ValueError(f"backend: variant='paper' supports 'torch' and 'sklearn', got {backend!r}")
        self.backend, self.exclude_dead, self.sync_free = backend, exclude_dead, sync_free
        self.variant = variant

    def _from_features(self, activations, gradients):
        return cfcam_from_features(activations, gradients, backend=self.backend,
                                   check_values=self.check_values, sync_free=self.sync_free,
                                   exclude_dead=self.exclude_dead, variant=self.variant)


class GradCAM(CAMEngine):
    """Plain Grad-CAM with the same engine and normalisation as CFCAM."""

    def _from_features(self, activations, gradients):
        return gradcam_from_features(activations, gradients, check_values=self.check_values)
