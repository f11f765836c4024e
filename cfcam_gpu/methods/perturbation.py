"""Gradient-free CAM methods: extra forward passes per (image, channel), batched over pairs.

    ScoreCAM     one masked forward per (image, channel), chunked over (image, channel) pairs
    AblationCAM  one forward of the layers *above* the target per (image, channel), channel zeroed

Both override the engine's ``_explain_images`` (they need the images, not only the features). With
several target layers each layer is explained on its own (its own masked inputs or ablations), and the
maps are fused as the engine fuses layers (``engine.combine_layers``), as pytorch-grad-cam does.
Shapes: B images, C channels, H x W input, h x w feature map, L classes.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..cam import CAMResult, weighted_cam
from ..cluster import dead_channels
from ..engine import CAMEngine, combine_layers
from ..hooks import eval_mode, forward_hook
from ..targets import Target

def _pair_chunks(B: int, C: int, chunk: int, device, keep: Tensor | None = None):
    """Yield (b, c) index tensors over the B*C (image, channel) pairs, ``chunk`` at a time; with ``keep``
    (B, C) bool only the kept pairs (one host sync to list them)."""
    if keep is None:
        flat = torch.arange(B * C, device=device)
    else:
        flat = torch.nonzero(keep.flatten()).flatten()
    for i in range(0, flat.numel(), chunk):
        idx = flat[i:i + chunk]
        yield idx // C, idx % C


class _ForwardMixin:
    """Model passes in eval mode under no_grad and the engine's autocast, state restored afterwards; the
    maps come from those passes, so the capture takes no gradient (``uses_gradients`` False)."""

    uses_gradients = False

    def _no_grad_forward(self, fn: Callable, *args):
        with eval_mode(self.model), torch.no_grad(), self._autocast(args[0]):
            return fn(*args)

    def _from_features(self, activations, gradients):
        raise ValueError(f"{type(self).__name__} needs the input images for its extra forward passes; "
                         "call cam(images, targets) instead of explain() or *_from_features")


class ScoreCAM(_ForwardMixin, CAMEngine):
    """Score-CAM (Wang et al. 2020) as pytorch-grad-cam computes it, batched.

    For every (image, channel): the channel map is upsampled to the input size (bilinear,
    ``align_corners=True`` like pytorch-grad-cam's UpsamplingBilinear2d), min-max normalised
    ((a - min) / (max - min + 1e-8)), multiplied into the input, and the masked input is scored:
    ``score="softmax"`` (default; the Score-CAM paper's softmax probability of the target, =
    pytorch-grad-cam with ClassifierOutputSoftmaxTarget) or ``"logit"`` (pytorch-grad-cam's default
    ClassifierOutputTarget); ``score`` applies to class-index targets (None, ints), a callable target
    (one per image or one for the batch) is its own score. ``channel_softmax=True`` (pytorch-grad-cam)
    turns the C scores into weights with a softmax over channels; ``False`` uses the scores as weights
    (the paper's official code).
    Masked forwards run ``score_batch_size`` (image, channel) pairs at a time (default 16, as
    pytorch-grad-cam; on the CPU 8-16 is fastest, accelerators like more); all-zero channels give
    the all-zero masked input, which is scored once per image (exact, not an approximation).
    """

    def __init__(self, model: nn.Module, target_layer, score_batch_size: int = 16, score: str = "softmax",
                 channel_softmax: bool = True, **options):
        super().__init__(model, target_layer, **options)
        if isinstance(score_batch_size, bool) or not isinstance(score_batch_size, int) or score_batch_size < 1:
            raise ValueError(f"score_batch_size: expected an int >= 1, got {score_batch_size!r}")
        if score not in ("softmax", "logit"):
            raise ValueError(f"score: expected 'softmax' or 'logit', got {score!r}")
        self.score_batch_size, self.score, self.channel_softmax = score_batch_size, score, channel_softmax

    def _target_score(self, output, target: Target, b: Tensor) -> Tensor:
        """Scores (S,) of the masked outputs, row s from image b[s]: ``score`` applies to class-index
        targets; a callable target is its own score (ClassifierOutputTarget: the logit)."""
        if target.kind == "index" and self.score == "softmax" and not target.logit:
            output = output.float().softmax(dim=1)
        return target.rows(output, b).float()

    def _explain_images(self, images: Tensor, targets, eigen_smooth: bool = False) -> CAMResult:
        layers_acts, layers_grads, target, output = self._capture(images, targets)
        results = []
        for acts, grads in zip(layers_acts, layers_grads):
            scores = self.channel_scores(images, acts, target)
            weights = scores.softmax(dim=1) if self.channel_softmax else scores
            cams, peak = weighted_cam(acts, weights, with_peak=True)
            results.append(self._smooth(CAMResult(cams=cams, weights=weights, peak=peak), acts, grads,
                                        eigen_smooth))
        result = combine_layers(results, images.shape[-2:])
        result.targets, result.logits = target.indices, output
        return result

    def channel_scores(self, images: Tensor, acts: Tensor, target: Target) -> Tensor:
        """The target's score for every masked input: (B, C)."""
        B, C = acts.shape[:2]
        H, W = images.shape[-2:]
        dead = dead_channels(acts)
        everyone = torch.arange(B, device=images.device)
        zero_out = self._no_grad_forward(self._forward, torch.zeros_like(images))  # all-zero masks
        scores = self._target_score(zero_out, target, everyone)[:, None].repeat(1, C)
        flat = scores.view(-1)
        for b, c in _pair_chunks(B, C, self.score_batch_size, images.device, keep=~dead):
            up = F.interpolate(acts[b, c][:, None].float(), size=(H, W), mode="bilinear",
                               align_corners=True)  # (S, 1, H, W)
            lo = up.amin(dim=(2, 3), keepdim=True)
            hi = up.amax(dim=(2, 3), keepdim=True)
            masked = images[b] * ((up - lo) / (hi - lo + 1e-8)).to(images.dtype)
            out = self._no_grad_forward(self._forward, masked)
            flat[b * C + c] = self._target_score(out, target, b)
        return scores


def _strict_ancestors(model: nn.Module, layer: nn.Module) -> set[int]:
    return {id(m) for m in model.modules() if m is not layer and any(s is layer for s in m.modules())}


def head_after(model: nn.Module, layer: nn.Module) -> nn.Module | None:
    """A GraphModule computing the logits from ``layer``'s output alone, or None where that cannot be cut.

    Traces with torch.fx only the modules on the path from the root to the layer (every other module is a
    leaf, so their internals need not be traceable), replaces the layer's call by an input, and drops
    everything below. None if tracing fails, the layer is called more than once, or anything after the
    layer still needs the model input (a skip connection around the layer).
    """
    import torch.fx as fx

    spine = _strict_ancestors(model, layer)

    class _SpineTracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return id(m) not in spine

    try:
        tracer = _SpineTracer()
        graph = tracer.trace(model)
        gm = fx.GraphModule(tracer.root, graph)
        calls = [n for n in graph.nodes if n.op == "call_module" and gm.get_submodule(n.target) is layer]
        if len(calls) != 1:
            return None
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_before(next(iter(graph.nodes))):
            features = graph.placeholder("target_layer_output")
        calls[0].replace_all_uses_with(features)
        graph.eliminate_dead_code()
        for node in inputs:
            if node.users:
                return None
            graph.erase_node(node)
        graph.lint()
        gm.recompile()
        return gm
    except Exception:  # untraceable model: the caller falls back to full forwards
        return None


class AblationCAM(_ForwardMixin, CAMEngine):
    """Ablation-CAM (Desai & Ramaswamy 2020) as pytorch-grad-cam defines it, batched.

    w_c = (y - y_c) / y, y the target's logit, y_c the logit with channel c of the target layer's output
    set to 0; cam = relu(sum_c w_c A_c). Only the layers above the target are re-run (a torch.fx cut of
    the model, see ``head_after``, checked against the real logits); where the model cannot be cut the
    whole model is re-run with a forward hook replacing the layer output (pytorch-grad-cam's way).
    (image, channel) pairs run ``ablation_batch_size`` at a time; all-zero channels are not re-run
    (ablating them changes nothing: weight 0).
    ``ablation_value``: "zero" (default, the paper: the channel is set to 0) or "pytorch-grad-cam" (its
    AblationLayer: 0 where the image's layer minimum is 0, else ``min - k * 1e7`` with k = 1, 2, ... the
    channel's place in its group of ``pgc_batch_size`` channels, because pytorch-grad-cam lowers the
    minimum cumulatively within each batch of ablations; for layers without a final ReLU).
    ``ratio_channels_to_ablate`` is not offered (always all channels); no ``reshape_transform``.
    """

    def __init__(self, model: nn.Module, target_layer, ablation_batch_size: int = 256,
                 ablation_value: str = "zero", pgc_batch_size: int = 32, **options):
        super().__init__(model, target_layer, **options)
        if ablation_value not in ("zero", "pytorch-grad-cam"):
            raise ValueError(f"ablation_value: expected 'zero' or 'pytorch-grad-cam', got {ablation_value!r}")
        self.ablation_value, self.pgc_batch_size = ablation_value, pgc_batch_size
        if self.reshape_transform is not None:
            raise ValueError("reshape_transform: AblationCAM ablates the layer's own (B, C, h, w) output "
                             "and does not support reshape_transform")
        if (isinstance(ablation_batch_size, bool) or not isinstance(ablation_batch_size, int)
                or ablation_batch_size < 1):
            raise ValueError(f"ablation_batch_size: expected an int >= 1, got {ablation_batch_size!r}")
        self.ablation_batch_size = ablation_batch_size
        self._heads: list = [False] * len(self.target_layers)  # per layer; False: not built yet
        self.uses_head = False

    def _full_forward(self, images: Tensor, feats: Tensor, layer: nn.Module) -> Tensor:
        with forward_hook(layer, lambda module, inputs, output: feats):
            return self.model(images)

    def _head_fn(self, images: Tensor, acts: Tensor, logits, n: int = 0) -> Callable[[Tensor, Tensor], Tensor]:
        """The forward of target layer n's ablated features: its traced head, or the whole model."""
        layer = self.target_layers[n]
        if self._heads[n] is False and not isinstance(logits, Tensor):
            self._heads[n] = None  # a structured output: re-run the whole model
        if self._heads[n] is False:
            self._heads[n] = head_after(self.model, layer)
            if self._heads[n] is not None:
                check = self._no_grad_forward(self._heads[n], acts)
                check = check.float() if isinstance(check, Tensor) else check
                scale = logits.abs().amax().clamp_min(1e-6)
                if (not isinstance(check, Tensor) or check.shape != logits.shape
                        or (check - logits.float()).abs().amax() > 1e-3 * scale):
                    warnings.warn("AblationCAM: the traced head does not reproduce the logits; re-running "
                                  "the whole model per ablation instead", RuntimeWarning, stacklevel=3)
                    self._heads[n] = None
        head = self._heads[n]
        self.uses_head = head is not None
        if head is not None:
            return lambda b, feats: self._no_grad_forward(head, feats)
        return lambda b, feats: self._no_grad_forward(self._full_forward, images[b], feats, layer)

    def _values(self, acts: Tensor) -> Tensor:
        """(B, C) the value each ablated channel is set to."""
        B, C = acts.shape[:2]
        if self.ablation_value == "zero":
            return acts.new_zeros(B, C)
        low = acts.flatten(1).amin(dim=1)[:, None]  # (B, 1)
        k = (torch.arange(C, device=acts.device) % self.pgc_batch_size + 1).to(acts.dtype)
        return torch.where(low == 0, torch.zeros_like(low), low - k * 1e7)

    def _explain_images(self, images: Tensor, targets, eigen_smooth: bool = False) -> CAMResult:
        layers_acts, layers_grads, target, output = self._capture(images, targets)
        everyone = torch.arange(images.shape[0], device=images.device)
        original = target.rows(output, everyone).float()  # (B,)
        results = [self._smooth(self._ablate(images, acts, target, output, original, n), acts, grads, eigen_smooth)
                   for n, (acts, grads) in enumerate(zip(layers_acts, layers_grads))]
        result = combine_layers(results, images.shape[-2:])
        result.targets, result.logits = target.indices, output
        return result

    def _ablate(self, images: Tensor, acts: Tensor, target: Target, output, original: Tensor,
                n: int) -> CAMResult:
        """Target layer n's map: acts (B, C, h, w), original (B,) the target's scores -> CAMResult."""
        B, C = acts.shape[:2]
        run = self._head_fn(images, acts, output, n)
        ablated = original[:, None].repeat(1, C)
        flat = ablated.view(-1)
        values = self._values(acts)
        keep = ~dead_channels(acts) if self.ablation_value == "zero" else None
        for b, c in _pair_chunks(B, C, self.ablation_batch_size, images.device, keep=keep):
            feats = acts[b].clone()
            feats[torch.arange(b.numel(), device=b.device), c] = values[b, c][:, None, None]
            flat[b * C + c] = target.rows(run(b, feats), b).float()
        weights = (original[:, None] - ablated) / original[:, None]
        cams, peak = weighted_cam(acts, weights, with_peak=True)
        return CAMResult(cams=cams, weights=weights, peak=peak)
