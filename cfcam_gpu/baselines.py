"""Baseline CAM methods in the same batched engine as ``CFCAM``, matched to pytorch-grad-cam 1.5.7.

Gradient methods are pure ``*_from_features(activations, gradients) -> CAMResult`` functions plus thin
``_CAMEngine`` subclasses (``Cls(model, target_layer, **options)``, ``cam(images, targets)``):

    GradCAMPlusPlus  gradcampp_from_features   w_c = sum_ij relu(g) a_ij,  a = g^2 / (2 g^2 + sum(A) g^3 + eps)
    XGradCAM         xgradcam_from_features    w_c = sum_ij g A / (sum_ij A + 1e-7)
    LayerCAM         layercam_from_features    cam = sum_c relu(g) A          (element-wise weights)
    HiResCAM         hirescam_from_features    cam = sum_c g A                (element-wise weights)

Gradient-free methods need extra forward passes and override ``_explain_images``:

    ScoreCAM     one masked forward per (image, channel), chunked over (image, channel) pairs
    AblationCAM  one forward of the layers *above* the target per (image, channel), channel zeroed

and ``CFCAMExcludeDead`` is CF-CAM with all-zero channels left out of the clustering (weight 0).

Every map is relu(sum) divided by its maximum (``cam.weighted_cam``'s normalisation); pytorch-grad-cam
min-max scales after the ReLU and resizes with cv2, so maps agree up to an affine change (the tests
compare correlations of the upsampled maps). ``CAMResult.weights`` of the element-wise methods is the
spatial mean of their element-wise weights (informational; the map uses the element-wise weights).
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import validate_features
from .cam import CAMResult, cfcam_from_features, cluster_weights, gradcam_from_features, weighted_cam
from .cluster import dbscan_from_adjacency
from .distance import exact_sqrt, mirror_upper, squared_distances
from .engine import CFCAM, GradCAM, _CAMEngine

__all__ = [
    "AblationCAM", "CFCAMExcludeDead", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "METHODS", "ScoreCAM",
    "XGradCAM", "build_method", "cfcam_exclude_dead_from_features", "dead_channels", "elementwise_cam",
    "from_features_fn", "gradcampp_from_features", "hirescam_from_features", "layercam_from_features",
    "xgradcam_from_features",
]


# ----------------------------------------------------------------------------------------------------
# Pure functions.

def _prepare(activations: Tensor, gradients: Tensor, check_values: bool) -> tuple[Tensor, Tensor]:
    validate_features(activations, gradients, check_values)
    dtype = torch.float64 if activations.dtype == torch.float64 else torch.float32
    return activations.to(dtype), gradients.to(dtype)


def elementwise_cam(activations: Tensor, weight_maps: Tensor) -> Tensor:
    """relu(sum_c W_c * A_c), divided by its max where that is > 0.

    activations, weight_maps: (B, C, h, w) -> (B, h, w) float32 in [0, 1].
    """
    cam = (weight_maps * activations).sum(dim=1).float().clamp_min_(0)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return cam / torch.where(peak > 0, peak, torch.ones_like(peak))


def gradcampp_from_features(activations: Tensor, gradients: Tensor, eps: float = 1e-6,
                            check_values: bool = True) -> CAMResult:
    """Grad-CAM++ (Chattopadhay et al. 2018, eq. 19), as pytorch-grad-cam computes it.

    a_ij = g^2 / (2 g^2 + (sum_ij A) g^3 + eps), 0 where g == 0; w_c = sum_ij relu(g) a_ij.
    ``eps=1e-6`` is pytorch-grad-cam's; ``eps=0`` gives the paper authors' code (a zero denominator is
    replaced by 1). Eq. 19 is the closed form for an exponential of the score, so it is the paper's
    formula up to a positive per-image factor exp(S) (gone after normalisation) only when the layers
    above the target are piecewise linear; the general form with true 2nd/3rd derivatives
    (pytorch-grad-cam issue 369) is deliberately not used. Note that eps is not scale-free: for
    gradients around 1e-3 (g^2 ~ 1e-6) it changes the a_ij noticeably.
    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    g2 = grads * grads
    sum_acts = acts.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g2 + sum_acts * g2 * grads
    if eps == 0:
        denom = torch.where(denom != 0, denom, torch.ones_like(denom))
    else:
        denom = denom + eps
    alpha = torch.where(grads != 0, g2 / denom, torch.zeros_like(g2))
    weights = (grads.clamp_min(0) * alpha).sum(dim=(2, 3))
    return CAMResult(cams=weighted_cam(acts, weights), weights=weights.float())


def xgradcam_from_features(activations: Tensor, gradients: Tensor, eps: float = 1e-7,
                           check_values: bool = True) -> CAMResult:
    """XGrad-CAM (Fu et al. 2020): w_c = sum_ij g A / (sum_ij A + eps), eps 1e-7 as pytorch-grad-cam.

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    weights = (grads * acts / (acts.sum(dim=(2, 3), keepdim=True) + eps)).sum(dim=(2, 3))
    return CAMResult(cams=weighted_cam(acts, weights), weights=weights.float())


def layercam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """LayerCAM (Jiang et al. 2021): cam = relu(sum_c relu(g) A). weights: spatial mean of relu(g).

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    w = grads.clamp_min(0)
    return CAMResult(cams=elementwise_cam(acts, w), weights=w.mean(dim=(2, 3)).float())


def hirescam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True) -> CAMResult:
    """HiResCAM (Draelos & Carin 2020): cam = relu(sum_c g A). weights: spatial mean of g.

    activations, gradients: (B, C, h, w) -> CAMResult (cams (B, h, w), weights (B, C)).
    """
    acts, grads = _prepare(activations, gradients, check_values)
    return CAMResult(cams=elementwise_cam(acts, grads), weights=grads.mean(dim=(2, 3)).float())


# ----------------------------------------------------------------------------------------------------
# CF-CAM with dead channels left out of the clustering.

def dead_channels(activations: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, C) bool: channels that are exactly zero everywhere."""
    return activations.flatten(2).abs().amax(dim=2) == 0


def _masked_percentile_from_squared(d2: Tensor, alive: Tensor, q: float, dtype: torch.dtype) -> Tensor:
    """Per image, numpy's linear-interpolation percentile of sqrt(d2) (rounded to ``dtype``) over the
    alive x alive block (Ca^2 entries, diagonal included, as ``np.percentile(dist, q)`` on the alive
    channels' distance matrix). d2: (B, C, C) float64; alive: (B, C) bool -> (B,) in ``dtype``
    (0 where fewer than one alive channel)."""
    B, C, _ = d2.shape
    pair = alive[:, :, None] & alive[:, None, :]
    values = torch.where(pair, d2, torch.full((), float("inf"), dtype=d2.dtype, device=d2.device))
    values = values.flatten(1).sort(dim=1).values  # finite entries first
    n = alive.sum(dim=1).to(torch.float64) ** 2
    virtual = (n - 1).clamp_min(0) * (q / 100.0)
    lo = virtual.floor()
    hi = torch.minimum(lo + 1, (n - 1).clamp_min(0))
    g = (virtual - lo).to(dtype)
    a = exact_sqrt(values.gather(1, lo.long()[:, None])[:, 0]).to(dtype)
    b = exact_sqrt(values.gather(1, hi.long()[:, None])[:, 0]).to(dtype)
    diff = b - a
    out = torch.where(g >= 0.5, b - diff * (1 - g), a + diff * g)
    return torch.where(n > 0, out, torch.zeros_like(out))


def cfcam_exclude_dead_from_features(activations: Tensor, gradients: Tensor,
                                     check_values: bool = True) -> CAMResult:
    """CF-CAM with the all-zero ("dead") channels removed before clustering; they get weight 0.

    Per image, the seed's adaptive DBSCAN runs on the Ca alive channels only: eps = 25th percentile of
    their (Ca, Ca) distance matrix, min_samples = max(2, int(0.05 Ca)); dead channels are labelled -1.
    Equal to running ``cfcam_from_features`` on each image's alive channels alone. Batched: per-image
    eps and min_samples are tensors, no host sync beyond the CPU's own.
    activations, gradients: (B, C, h, w) -> CAMResult (labels, n_clusters, eps (B,); min_samples None
    because it differs per image).
    """
    validate_features(activations, gradients, check_values)
    feats = activations.flatten(2)
    feats = feats if feats.dtype == torch.float64 else feats.float()
    B, C, _ = feats.shape
    alive = ~dead_channels(activations)
    d2 = mirror_upper(squared_distances(feats))  # the upper triangle is the matrix, as in cluster.py
    eps = _masked_percentile_from_squared(d2, alive, 25.0, feats.dtype)
    threshold = (eps * eps).double()
    adj = (d2 <= threshold[:, None, None]) & alive[:, :, None] & alive[:, None, :]
    del d2
    adj.diagonal(dim1=1, dim2=2).fill_(True)
    min_samples = (0.05 * alive.sum(dim=1).to(torch.float64)).floor().clamp_min(2).long()  # (B,)
    labels = dbscan_from_adjacency(adj, min_samples[:, None])  # broadcasts in the core-point test
    labels = torch.where(alive, labels, -1)
    weights = cluster_weights(gradients, labels)
    return CAMResult(cams=weighted_cam(activations, weights), weights=weights, labels=labels,
                     n_clusters=labels.amax(dim=1) + 1, eps=eps, min_samples=None)


# ----------------------------------------------------------------------------------------------------
# Engines for the gradient methods.

class GradCAMPlusPlus(_CAMEngine):
    """Grad-CAM++ with the batched engine; ``eps`` as ``gradcampp_from_features`` (1e-6: pytorch-grad-cam)."""

    def __init__(self, model: nn.Module, target_layer, eps: float = 1e-6, **options):
        super().__init__(model, target_layer, **options)
        self.eps = eps

    def _from_features(self, activations, gradients):
        return gradcampp_from_features(activations, gradients, eps=self.eps, check_values=self.check_values)


class XGradCAM(_CAMEngine):
    """XGrad-CAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return xgradcam_from_features(activations, gradients, check_values=self.check_values)


class LayerCAM(_CAMEngine):
    """LayerCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return layercam_from_features(activations, gradients, check_values=self.check_values)


class HiResCAM(_CAMEngine):
    """HiResCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return hirescam_from_features(activations, gradients, check_values=self.check_values)


class CFCAMExcludeDead(CFCAM):
    """CF-CAM whose clustering ignores all-zero channels (``cfcam_exclude_dead_from_features``).

    An evaluation variant; ``CFCAM`` stays the seed's method. Only the torch DBSCAN backend.
    """

    def __init__(self, model: nn.Module, target_layer, **options):
        if options.pop("backend", "torch") != "torch":
            raise ValueError("backend: CFCAMExcludeDead supports only backend='torch'")
        super().__init__(model, target_layer, backend="torch", **options)

    def _from_features(self, activations, gradients):
        return cfcam_exclude_dead_from_features(activations, gradients, check_values=self.check_values)


# ----------------------------------------------------------------------------------------------------
# Gradient-free methods: extra forward passes.

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
    """Model passes in eval mode under no_grad and the engine's autocast, state restored afterwards."""

    def _no_grad_forward(self, fn: Callable, *args) -> Tensor:
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            device_type = args[0].device.type
            with torch.no_grad(), torch.autocast(device_type, dtype=self.amp_dtype or torch.bfloat16,
                                                 enabled=self.amp_dtype is not None):
                out = fn(*args)
        finally:
            for module, training in modes:  # every submodule's own mode, as the engine does
                module.training = training
        return out.float()

    def _from_features(self, activations, gradients):
        raise ValueError(f"{type(self).__name__} needs the input images for its extra forward passes; "
                         "call cam(images, targets) instead of explain() or *_from_features")


class ScoreCAM(_ForwardMixin, _CAMEngine):
    """Score-CAM (Wang et al. 2020) as pytorch-grad-cam computes it, batched.

    For every (image, channel): the channel map is upsampled to the input size (bilinear,
    ``align_corners=True`` like pytorch-grad-cam's UpsamplingBilinear2d), min-max normalised
    ((a - min) / (max - min + 1e-8)), multiplied into the input, and the masked input is scored:
    ``score="softmax"`` (default; the Score-CAM paper's softmax probability of the target, =
    pytorch-grad-cam with ClassifierOutputSoftmaxTarget) or ``"logit"`` (pytorch-grad-cam's default
    ClassifierOutputTarget). ``channel_softmax=True`` (pytorch-grad-cam) turns the C scores into weights
    with a softmax over channels; ``False`` uses the scores as weights (the paper's official code).
    Masked forwards run ``score_batch_size`` (image, channel) pairs at a time (default 16, as
    pytorch-grad-cam; on the CPU 8-16 is fastest, accelerators like more); all-zero channels give
    the all-zero masked input, which is scored once for the whole batch (exact, not an approximation).
    """

    def __init__(self, model: nn.Module, target_layer, score_batch_size: int = 16, score: str = "softmax",
                 channel_softmax: bool = True, **options):
        super().__init__(model, target_layer, **options)
        if isinstance(score_batch_size, bool) or not isinstance(score_batch_size, int) or score_batch_size < 1:
            raise ValueError(f"score_batch_size: expected an int >= 1, got {score_batch_size!r}")
        if score not in ("softmax", "logit"):
            raise ValueError(f"score: expected 'softmax' or 'logit', got {score!r}")
        self.score_batch_size, self.score, self.channel_softmax = score_batch_size, score, channel_softmax

    def _target_score(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        if self.score == "softmax":
            logits = logits.softmax(dim=1)
        return logits.gather(1, target[:, None])[:, 0]

    def _explain_images(self, images: Tensor, targets) -> CAMResult:
        acts, _, target_idx, logits = self._features(images, targets)
        scores = self.channel_scores(images, acts, target_idx)
        weights = scores.softmax(dim=1) if self.channel_softmax else scores
        return CAMResult(cams=weighted_cam(acts, weights), weights=weights, targets=target_idx,
                         logits=logits)

    def channel_scores(self, images: Tensor, acts: Tensor, target_idx: Tensor) -> Tensor:
        """The target's score for every masked input: (B, C)."""
        B, C = acts.shape[:2]
        H, W = images.shape[-2:]
        dead = dead_channels(acts)
        zero_input = torch.zeros_like(images[:1])
        zero_logits = self._no_grad_forward(self._forward, zero_input)
        scores = self._target_score(zero_logits.expand(B, -1), target_idx)[:, None].repeat(1, C)
        flat = scores.view(-1)
        for b, c in _pair_chunks(B, C, self.score_batch_size, images.device, keep=~dead):
            up = F.interpolate(acts[b, c][:, None].float(), size=(H, W), mode="bilinear",
                               align_corners=True)  # (S, 1, H, W)
            lo = up.amin(dim=(2, 3), keepdim=True)
            hi = up.amax(dim=(2, 3), keepdim=True)
            masked = images[b] * ((up - lo) / (hi - lo + 1e-8)).to(images.dtype)
            out = self._no_grad_forward(self._forward, masked)
            flat[b * C + c] = self._target_score(out, target_idx[b])
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


class AblationCAM(_ForwardMixin, _CAMEngine):
    """Ablation-CAM (Desai & Ramaswamy 2020) as pytorch-grad-cam defines it, batched.

    w_c = (y - y_c) / y, y the target's logit, y_c the logit with channel c of the target layer's output
    set to 0; cam = relu(sum_c w_c A_c). Only the layers above the target are re-run (a torch.fx cut of
    the model, see ``head_after``, checked against the real logits); where the model cannot be cut the
    whole model is re-run with a forward hook replacing the layer output (pytorch-grad-cam's way).
    (image, channel) pairs run ``ablation_batch_size`` at a time; all-zero channels are not re-run
    (ablating them changes nothing: weight 0).
    Differences from pytorch-grad-cam: the ablated channel is always set to 0 (pytorch-grad-cam uses
    min - 1e7, cumulatively, when the layer's minimum is not 0, i.e. for layers without a final ReLU);
    ``ratio_channels_to_ablate`` is not offered (always all channels); no ``reshape_transform``.
    """

    def __init__(self, model: nn.Module, target_layer, ablation_batch_size: int = 256, **options):
        super().__init__(model, target_layer, **options)
        if self.reshape_transform is not None:
            raise ValueError("reshape_transform: AblationCAM ablates the layer's own (B, C, h, w) output "
                             "and does not support reshape_transform")
        if (isinstance(ablation_batch_size, bool) or not isinstance(ablation_batch_size, int)
                or ablation_batch_size < 1):
            raise ValueError(f"ablation_batch_size: expected an int >= 1, got {ablation_batch_size!r}")
        self.ablation_batch_size = ablation_batch_size
        self._head: nn.Module | None | bool = False  # False: not built yet
        self.uses_head = False

    def _full_forward(self, images: Tensor, feats: Tensor) -> Tensor:
        handle = self.target_layer.register_forward_hook(lambda module, inputs, output: feats)
        try:
            return self.model(images)
        finally:
            handle.remove()

    def _head_fn(self, images: Tensor, acts: Tensor, logits: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        if self._head is False:
            self._head = head_after(self.model, self.target_layer)
            if self._head is not None:
                check = self._no_grad_forward(self._head, acts)
                scale = logits.abs().amax().clamp_min(1e-6)
                if check.shape != logits.shape or (check - logits).abs().amax() > 1e-3 * scale:
                    warnings.warn("AblationCAM: the traced head does not reproduce the logits; re-running "
                                  "the whole model per ablation instead", RuntimeWarning, stacklevel=3)
                    self._head = None
        self.uses_head = self._head is not None
        if self._head is not None:
            head = self._head
            return lambda b, feats: self._no_grad_forward(head, feats)
        return lambda b, feats: self._no_grad_forward(self._full_forward, images[b], feats)

    def _explain_images(self, images: Tensor, targets) -> CAMResult:
        acts, _, target_idx, logits = self._features(images, targets)
        B, C = acts.shape[:2]
        run = self._head_fn(images, acts, logits)
        original = logits.float().gather(1, target_idx[:, None])[:, 0]  # (B,)
        ablated = original[:, None].repeat(1, C)
        flat = ablated.view(-1)
        for b, c in _pair_chunks(B, C, self.ablation_batch_size, images.device, keep=~dead_channels(acts)):
            feats = acts[b].clone()
            feats[torch.arange(b.numel(), device=b.device), c] = 0
            out = run(b, feats)
            flat[b * C + c] = out.gather(1, target_idx[b][:, None])[:, 0]
        weights = (original[:, None] - ablated) / original[:, None]
        return CAMResult(cams=weighted_cam(acts, weights), weights=weights, targets=target_idx, logits=logits)


# ----------------------------------------------------------------------------------------------------
# Registry.

METHODS: dict[str, type] = {
    "cfcam": CFCAM,
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
    "cfcam_exclude_dead": CFCAMExcludeDead,
}

_FROM_FEATURES: dict[str, Callable] = {
    "cfcam": cfcam_from_features,
    "gradcam": gradcam_from_features,
    "gradcam++": gradcampp_from_features,
    "xgradcam": xgradcam_from_features,
    "layercam": layercam_from_features,
    "hirescam": hirescam_from_features,
    "cfcam_exclude_dead": cfcam_exclude_dead_from_features,
}


def build_method(name: str, model: nn.Module, target_layer, **options) -> _CAMEngine:
    """``METHODS[name](model, target_layer, **options)`` with a helpful error for unknown names."""
    if name not in METHODS:
        raise ValueError(f"method: unknown CAM method {name!r}; expected one of {sorted(METHODS)}")
    return METHODS[name](model, target_layer, **options)


def from_features_fn(name: str) -> Callable | None:
    """The pure (activations, gradients) -> CAMResult function of a gradient method; None for the
    gradient-free ones (scorecam, ablationcam)."""
    if name not in METHODS:
        raise ValueError(f"method: unknown CAM method {name!r}; expected one of {sorted(METHODS)}")
    return _FROM_FEATURES.get(name)
