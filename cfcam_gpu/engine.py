"""Model-facing engine: hooks on the target layer, targets, one ``autograd.grad`` to that layer.

The classes are thin: they capture (activations, gradients) and hand them to the pure functions in
``cam.py``. The model runs in eval mode (BatchNorm makes batch items independent only there) and its
train/eval state is restored afterwards; parameters' ``.grad`` are never touched; every hook is removed
when a call returns or raises.

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

import inspect
import numbers
from typing import Callable

import torch
from torch import Tensor, nn

from ._checks import check_floating, check_ndim
from .cam import VARIANTS, CAMResult, cfcam_from_features, gradcam_from_features
from .hooks import LeafCapture, PipelineCapture, capture_hook, eval_mode, forward_hook
from .layers import resolve_layer
from .targets import resolve_targets

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


class _CAMEngine:
    """Common engine; subclasses choose the pure function that turns features into maps.

    Options: ``reshape_transform`` (callable mapping the layer output and its gradient to (B, C, h, w)),
    ``check_values`` (raise on NaN/inf naming the image; one host sync), ``amp`` (False, True/"bfloat16"
    or "float16": autocast for the model pass only; clustering and filtering run in float32 or better),
    ``channels_last`` (converts the model in place and feeds channels-last images), ``chunk_size``
    (explain at most that many images per pass; results equal the unchunked call), ``compile`` (False,
    True or a dict of ``torch.compile`` keyword arguments such as ``{"backend": "aot_eager"}``: the model
    pass of ``cam(images)`` runs through ``torch.compile(model, **kwargs)``, made once here; the first call
    per input shape compiles, later ones reuse it; the graph breaks at the target layer, see the module
    docstring; ``fullgraph=True`` is refused). ``torch.compile`` leaves the model object in place and sets
    only its ``_is_torch_compile`` attribute. ``explain`` runs no forward of its own, so ``compile`` does not
    apply there.
    """

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
        self.model = model
        self.target_layer = resolve_layer(model, target_layer)
        self.reshape_transform = reshape_transform
        self.check_values = check_values
        self.amp_dtype = AMP_DTYPES.get(amp) if amp is not False else None
        self.channels_last = channels_last
        self.chunk_size = chunk_size
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # the wrapper shares the model's modules; compilation itself happens on the first call
        self._compiled = None if compile_kwargs is None else torch.compile(model, **compile_kwargs)
        self._pipeline: PipelineCapture | None = None
        self._pipeline_handle = None

    def _forward(self, images: Tensor) -> Tensor:
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
        self._pipeline = PipelineCapture()
        self._pipeline_handle = self.target_layer.register_forward_hook(capture_hook(self._pipeline))
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self) -> None:
        """Remove the hook installed by ``with``; idempotent."""
        if self._pipeline_handle is not None:
            self._pipeline_handle.remove()
        self._pipeline_handle, self._pipeline = None, None

    def _autocast(self, images: Tensor):
        """The engine's ``amp`` for a model pass (autocast off when ``amp`` is off)."""
        return torch.autocast(images.device.type, dtype=self.amp_dtype or torch.bfloat16,
                              enabled=self.amp_dtype is not None)

    def _from_features(self, activations: Tensor, gradients: Tensor) -> CAMResult:
        raise NotImplementedError

    def _to_maps(self, acts: Tensor, grads: Tensor) -> tuple[Tensor, Tensor]:
        if self.reshape_transform is not None:
            acts, grads = self.reshape_transform(acts), self.reshape_transform(grads)
        if acts.ndim != 4:
            raise ValueError(f"target_layer: expected the layer output to be (B, C, h, w), got shape "
                             f"{tuple(acts.shape)}; {TOKENS_HINT}")
        return acts, grads

    def _features(self, images: Tensor, targets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """images (B, 3, H, W) -> activations, gradients (B, C, h, w), targets (B,), logits (B, K)."""
        capture = LeafCapture()
        with forward_hook(self.target_layer, capture), eval_mode(self.model):
            with torch.no_grad(), self._autocast(images):
                logits = self._forward(images)
            if capture.output is None:
                hint = ("; with compile, code dynamo compiled elsewhere without this hook may have been "
                        "reused: try torch._dynamo.reset()") if self._compiled is not None else ""
                raise ValueError("target_layer: the layer did not run during the forward pass; "
                                 "pick a layer on the path from the input to the logits" + hint)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError("model: expected the model to return logits (B, L), got "
                                 f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}")
            target_idx = resolve_targets(targets, logits)
            if not logits.requires_grad:
                raise ValueError("target_layer: the logits do not depend on the layer's output; "
                                 "pick a layer on the path from the input to the logits")
            with torch.enable_grad():  # also when the caller runs us under torch.no_grad()
                (grads,) = torch.autograd.grad(logits.gather(1, target_idx[:, None]).sum(), capture.output)
        acts, grads = self._to_maps(capture.output.detach(), grads)
        return acts, grads, target_idx, logits.detach()

    def _explain_images(self, images: Tensor, targets) -> CAMResult:
        acts, grads, target_idx, logits = self._features(images, targets)
        result = self._from_features(acts, grads)
        result.targets, result.logits = target_idx, logits
        return result

    def __call__(self, images: Tensor, targets=None) -> CAMResult:
        """images: (B, 3, H, W) on the model's device; targets: None (top-1), an int, or B class indices.

        Returns the CAMResult with cams (B, h, w) at the layer's resolution, targets (B,), logits (B, K).
        With ``chunk_size`` the batch is explained chunk by chunk (bounded memory, same results).
        """
        check_ndim(images, 4, "images", "(B, 3, H, W)")
        check_floating(images, "images")
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        B = images.shape[0]
        if self.chunk_size is None or B <= self.chunk_size:
            return self._explain_images(images, targets)
        per_image = not (targets is None or isinstance(targets, numbers.Integral))
        if per_image and len(targets) != B:
            raise ValueError(f"targets: expected {B} class indices (one per image), got {len(targets)}")
        parts = [self._explain_images(images[i:i + self.chunk_size],
                                      targets[i:i + self.chunk_size] if per_image else targets)
                 for i in range(0, B, self.chunk_size)]
        return CAMResult.cat(parts)

    def explain(self, logits: Tensor, targets=None) -> CAMResult:
        """CAMs for a forward pass the caller already ran inside ``with cam:`` (no second forward).

        logits: (B, K) from that forward, computed with grad enabled -> CAMResult. The ``compile`` option
        does not apply (the forward is the caller's). A model the caller compiled works when its first
        compiled run is inside the ``with`` block: dynamo does not guard on hooks, so code compiled
        before the hook existed never calls it (explain then says no forward pass was captured).
        """
        if self._pipeline is None:
            raise ValueError("explain: expected to be called inside `with CFCAM(model, layer) as cam:` "
                             "after `logits = model(x)`; no hook is installed")
        captured = self._pipeline.output
        if captured is None:
            raise ValueError("explain: no forward pass of the model was captured at the target layer; "
                             "run `logits = model(x)` inside the `with` block first")
        check_ndim(logits, 2, "logits", "(B, K)")
        if not captured.requires_grad or not logits.requires_grad:
            raise ValueError("explain: the captured forward ran without gradients (under torch.no_grad "
                             "or torch.inference_mode); run it with grad enabled")
        if logits.shape[0] != captured.shape[0]:
            raise ValueError(f"logits: expected {captured.shape[0]} rows (the captured batch), got "
                             f"{logits.shape[0]}")
        target_idx = resolve_targets(targets, logits)
        (grads,) = torch.autograd.grad(logits.gather(1, target_idx[:, None]).sum(), captured)
        self._pipeline.output = None
        acts, grads = self._to_maps(captured.detach(), grads)
        result = self._from_features(acts, grads)
        result.targets, result.logits = target_idx, logits.detach()
        return result


class CFCAM(_CAMEngine):
    """CF-CAM: DBSCAN-clustered, guided-filtered Grad-CAM, for a whole batch in one call.

    ``CFCAM(model, target_layer, backend="torch", exclude_dead=False, sync_free=None, variant="seed",
    **options)`` (``exclude_dead``, ``sync_free`` and ``variant`` ("seed", or "paper": CF-CAM as published)
    as ``cfcam_from_features``; options: see ``_CAMEngine``);
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


class GradCAM(_CAMEngine):
    """Plain Grad-CAM with the same engine and normalisation as CFCAM."""

    def _from_features(self, activations, gradients):
        return gradcam_from_features(activations, gradients, check_values=self.check_values)
