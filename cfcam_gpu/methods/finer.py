"""Finer-CAM (Zhang et al. 2025, arXiv 2501.11309) as pytorch-grad-cam 1.5.7 computes it, batched.

A gradient method (Grad-CAM by default) explaining, instead of the main class's logit y_m, its
weighted difference from the classes most easily confused with it:
S = sum_k p_k (y_m - alpha y_k) / (sum_k p_k + 1e-9), p = softmax(y) (differentiated too), k over the
``comparison_categories`` (1, 2, 3 by default) places of the classes sorted by |y - y_m| (place 0 is the
main class itself, ties in the original order). The main class is each image's top-1 class, or the
class index given as target. Everything is computed on the output's device from the batch's logits
(no host read).
Shapes: B images, L classes, K comparison classes.
"""
from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from ..engine import CAMEngine
from ..targets import class_indices, primary_output

COMPARISONS = (1, 2, 3)  # pytorch-grad-cam's default places
FINER_EPS = 1e-9


def finer_scores(logits: Tensor, main: Tensor | None = None, comparison_categories: Sequence[int] = COMPARISONS,
                 alpha: float = 1.0) -> tuple[Tensor, Tensor]:
    """logits (B, L); main: (B,) class indices or None (top-1) -> Finer-CAM's scores (B,) (differentiable
    in the logits) and the main classes (B,) int64."""
    if logits.ndim != 2:
        raise ValueError(f"logits: expected (B, L) class scores, got shape {tuple(logits.shape)}")
    B, L = logits.shape
    places = [int(c) for c in comparison_categories if 0 <= int(c) < L]
    if not places:
        raise ValueError(f"comparison_categories: expected places in [0, {L}) (the classes sorted by their "
                         f"logit's distance to the main class), got {list(comparison_categories)}")
    y = logits.detach()
    main = y.argmax(dim=1) if main is None else main
    distance = (y - y.gather(1, main[:, None])).abs().scatter(1, main[:, None], -1.0)  # the main class first
    order = distance.argsort(dim=1, stable=True)
    others = order[:, places]  # (B, K)
    p = logits.softmax(dim=1).gather(1, others)
    difference = logits.gather(1, main[:, None]) - alpha * logits.gather(1, others)
    return (p * difference).sum(dim=1) / (p.sum(dim=1) + FINER_EPS), main


def _is_callable_target(targets) -> bool:
    return (callable(targets) and not isinstance(targets, (Tensor,))) or (
        isinstance(targets, (list, tuple)) and any(callable(t) for t in targets))


class FinerCAM(CAMEngine):
    """Finer-CAM over a gradient method: ``FinerCAM(model, target_layer, base="gradcam", alpha=1.0,
    comparison_categories=(1, 2, 3), **options)``; ``base``: a method name of ``METHODS`` or an engine
    class that works from (activations, gradients) (not scorecam, ablationcam, fullgrad or finercam);
    options go to the base method. ``cam(images, targets)``: targets None (each image's top-1 class is
    the main class) or class indices (the main classes); callable targets are explained as given (the
    base method alone). ``result.targets`` holds the main classes."""

    def __init__(self, model: nn.Module, target_layer, base="gradcam", alpha: float = 1.0,
                 comparison_categories: Sequence[int] = COMPARISONS, **options):
        from .registry import METHODS  # the registry imports this module

        cls = METHODS.get(base) if isinstance(base, str) else base
        if not (isinstance(cls, type) and issubclass(cls, CAMEngine)) or issubclass(cls, FinerCAM) \
                or cls._explain_images is not CAMEngine._explain_images:
            raise ValueError(f"base: expected the name or engine class of a method that works from the target "
                             f"layer's activations and gradients (e.g. 'gradcam', 'gradcam++', 'layercam'), "
                             f"got {base!r}")
        self.base = cls(model, target_layer, **options)
        vars(self).update(vars(self.base))  # the same model, layers and options as the base engine
        self.alpha, self.comparison_categories = float(alpha), tuple(comparison_categories)

    def _from_features(self, activations, gradients):
        return self.base._from_features(activations, gradients)

    def _weighted_activations(self, activations, gradients, result):
        return self.base._weighted_activations(activations, gradients, result)

    def _smooth(self, result, activations, gradients, eigen_smooth):
        return self.base._smooth(result, activations, gradients, eigen_smooth)

    def _finer_target(self, targets, record: dict):
        def score(output):
            logits = primary_output(output)
            main = None if targets is None else class_indices(targets, logits.shape[0], logits.device,
                                                              logits.shape[1])
            scores, record["main"] = finer_scores(logits, main, self.comparison_categories, self.alpha)
            return scores
        return score

    def _explain_images(self, images: Tensor, targets, eigen_smooth: bool = False):
        if _is_callable_target(targets):
            return super()._explain_images(images, targets, eigen_smooth)
        record: dict = {}
        result = super()._explain_images(images, self._finer_target(targets, record), eigen_smooth)
        result.targets = record["main"]
        return result

    def explain(self, logits, targets=None, eigen_smooth: bool = False):
        if _is_callable_target(targets):
            return super().explain(logits, targets, eigen_smooth)
        record: dict = {}
        result = super().explain(logits, self._finer_target(targets, record), eigen_smooth)
        result.targets = record["main"]
        return result
