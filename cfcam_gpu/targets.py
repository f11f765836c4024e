"""What to explain: one resolver for every place that takes ``targets`` (engines, metrics, compat).

``targets`` may be
- None: each image's top-1 class of a (B, L) output; a one-logit head (B, 1) or a regression head (B,)
  is explained as is (the score is the output itself);
- an int (every image) or B class indices (a sequence, NumPy array or (B,) tensor) into a (B, L) output;
- a list of B callables, pytorch-grad-cam's convention: ``targets[i](output_i)`` gets image i's model
  output (a tensor row, a dict of rows, image i's element of a per-image list) and returns one score
  (a tensor with one element). Every class in ``pytorch_grad_cam.utils.model_targets`` works;
- one callable given the whole batch's output, returning (B,) scores (no Python loop per image).
  Perturbation methods call it on batches of perturbed copies, so it must score each row on its own.
Anything else is a TypeError. A dict output with an "out" tensor (torchvision's segmentation models:
{"out", "aux"}) is explained through its "out" entry, as pytorch-grad-cam's segmentation wrapper
``model(x)["out"]`` does; every other output is handed to the targets as the model returns it.
Shapes: B images, L classes, S rows of a perturbed batch.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor

ACCEPTED = ("None (top-1), an int, B class indices (a sequence, NumPy array or (B,) tensor), a list of B "
            "callables (one per image, each given that image's output) or one callable given the batch's "
            "output and returning (B,) scores")


def class_indices(targets, B: int, device, num_classes: int | None = None) -> Tensor:
    """targets: an int (every image) or B class indices (a sequence, NumPy array or tensor) -> (B,) int64.

    With ``num_classes`` (L) every index must lie in [0, L) (one host sync when a tensor is given).
    """
    if isinstance(targets, bool):
        raise TypeError(f"targets: expected None, an int or {B} class indices, got a bool")
    if isinstance(targets, numbers.Integral):  # a Python or NumPy integer
        targets = int(targets)
        if num_classes is not None and not 0 <= targets < num_classes:
            raise ValueError(f"targets: expected a class index in [0, {num_classes}), got {targets}")
        return torch.full((B,), targets, dtype=torch.long, device=device)
    if isinstance(targets, (list, tuple)) and not targets:  # no images: [] is no indices, not float
        targets = torch.zeros(0, dtype=torch.long, device=device)
    t = targets if isinstance(targets, Tensor) else torch.as_tensor(targets, device=device)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"targets: expected integer class indices, got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != B:
        raise ValueError(f"targets: expected {B} class indices (one per image), got shape {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.long)
    if num_classes is not None:
        bad = (t < 0) | (t >= num_classes)
        if bool(bad.any()):  # one host sync, only when the caller passes explicit targets
            i = int(torch.nonzero(bad)[0])
            raise ValueError(f"targets: expected class indices in [0, {num_classes}), got {int(t[i])} for "
                             f"image index {i}")
    return t


def resolve_targets(targets, logits: Tensor) -> Tensor:
    """targets: None (top-1), an int (every image) or B class indices; logits (B, L) -> (B,) int64 on the
    logits' device."""
    B, L = logits.shape
    if targets is None:
        return logits.argmax(dim=1)
    return class_indices(targets, B, logits.device, L)


# -- model outputs of any structure ---------------------------------------------------------------------
def output_batch_size(output) -> int | None:
    """B of a model output: a tensor's first dim, a dict's/sequence's first tensor's, or a per-image list's
    length; None when there is no tensor."""
    if isinstance(output, Tensor):
        return output.shape[0] if output.ndim else None
    if isinstance(output, dict):
        for v in output.values():
            n = output_batch_size(v)
            if n is not None:
                return n
        return None
    if isinstance(output, (list, tuple)):
        if output and all(isinstance(o, dict) for o in output):
            return len(output)  # detection models: one dict per image
        for v in output:
            n = output_batch_size(v)
            if n is not None:
                return n
    return None


def output_row(output, i: int, B: int):
    """Image i's part of a model output: a tensor's row i, a dict of rows, image i's element of a per-image
    list (B elements that are not all batch tensors), or a sequence of rows. Tensors without a batch
    dimension (a scalar loss, a (K,) summary) are handed over whole."""
    if isinstance(output, Tensor):
        return output[i] if output.ndim and output.shape[0] == B else output
    if isinstance(output, dict):
        return {k: output_row(v, i, B) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        batched = all(isinstance(o, Tensor) and o.ndim and o.shape[0] == B for o in output)
        if len(output) == B and not batched:
            return output[i]
        return type(output)(output_row(o, i, B) for o in output)
    return output


def primary_output(output):
    """The part of a model output the targets see: a dict's "out" tensor (segmentation models), else all."""
    if isinstance(output, dict) and isinstance(output.get("out"), Tensor):
        return output["out"]
    return output


def describe(output) -> str:
    if isinstance(output, Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    return f"a {type(output).__name__}"


def _one_score(value, i: int) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"targets[{i}]: expected the callable to return one score (a tensor with one "
                         f"element, differentiable in the model output), got {got}")
    return value.reshape(())


def _is_pgc_classifier_target(t) -> bool:
    """pytorch-grad-cam's ClassifierOutputTarget (out[category]): exactly a class index, so it is run as one."""
    cls = type(t)
    return cls.__name__ == "ClassifierOutputTarget" and cls.__module__.startswith("pytorch_grad_cam") \
        and isinstance(getattr(t, "category", None), (numbers.Integral, np.integer)) \
        and not isinstance(t.category, bool)


@dataclass
class Target:
    """A resolved ``targets`` for one batch of B images.

    kind: "index" (class indices into a (B, L) output), "value" (the (B,) or (B, 1) output itself),
    "each" (B per-image callables) or "batch" (one callable on the whole output).
    indices: (B,) int64 for "index" (and "value" of a (B, 1) head: zeros), else None.
    logit: the indices came from ClassifierOutputTargets, which ask for the logit itself (Score-CAM's
    ``score`` option then does not apply a softmax).
    """

    kind: str
    B: int
    indices: Tensor | None = None
    fns: list | None = None
    fn: Callable | None = None
    logit: bool = False

    def scores(self, output) -> Tensor:
        """The (B,) scores of the model output of the B images (what the gradients are taken of)."""
        if self.kind == "index":  # no index tensor built on the host: nothing to copy, no sync
            return primary_output(output).gather(1, self.indices[:, None])[:, 0]
        return self.rows(output, torch.arange(self.B))

    def rows(self, output, b: Tensor) -> Tensor:
        """Scores of an output whose row s belongs to image b[s] (perturbed copies): (S,)."""
        output = primary_output(output)
        if self.kind == "index":
            return output.gather(1, self.indices[b.to(self.indices.device)][:, None])[:, 0]
        if self.kind == "value":
            return output.reshape(output.shape[0])
        if self.kind == "batch":
            S = b.shape[0]
            got = self.fn(output)
            if not isinstance(got, Tensor) or got.numel() != S or got.ndim > 2:
                shape = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
                raise ValueError(f"targets: expected the callable to return ({S},) scores (one per row of "
                                 f"the output), got {shape}")
            return got.reshape(S)
        S = b.shape[0]
        rows = b.tolist()  # per-image callables: a Python loop anyway
        return torch.stack([_one_score(self.fns[img](output_row(output, s, S)), img)
                            for s, img in enumerate(rows)])


def resolve(targets, output) -> Target:
    """targets (see the module docstring) for a model output -> Target. Raises TypeError for anything
    not accepted and ValueError when the targets do not fit the output."""
    output = primary_output(output)
    B = output_batch_size(output)
    if B is None:
        raise ValueError(f"model: expected the model to return tensors with a batch dimension, got "
                         f"{describe(output)}")
    if targets is None:
        if not isinstance(output, Tensor) or output.ndim not in (1, 2):
            raise ValueError(f"targets=None needs the model to return logits (B, L), (B, 1) or a regression "
                             f"output (B,), got {describe(output)}; pass targets (a callable) for other "
                             f"outputs")
        if output.ndim == 1 or output.shape[1] == 1:
            t = Target("value", B, torch.zeros(B, dtype=torch.long, device=output.device))
        else:
            t = Target("index", B, output.argmax(dim=1))
    elif callable(targets) and not isinstance(targets, (Tensor, np.ndarray)):
        t = Target("batch", B, fn=targets)
    elif isinstance(targets, (list, tuple)) and any(callable(x) for x in targets):
        bad = [i for i, x in enumerate(targets) if not callable(x)]
        if bad:
            raise TypeError(f"targets: expected {ACCEPTED}; got a list mixing callables and "
                            f"{type(targets[bad[0]]).__name__} (at index {bad[0]})")
        if len(targets) != B:
            raise ValueError(f"targets: expected {B} targets (one per image), got {len(targets)}")
        if all(_is_pgc_classifier_target(x) for x in targets):
            t = _index_target([int(x.category) for x in targets], output, B)
            t.logit = True
            return t
        else:
            t = Target("each", B, fns=list(targets))
    elif isinstance(targets, (bool, numbers.Integral, list, tuple, np.ndarray, Tensor)):
        return _index_target(targets, output, B)
    else:
        raise TypeError(f"targets: expected {ACCEPTED}; got {type(targets).__name__}")
    return t


def _index_target(targets, output, B: int) -> Target:
    if not isinstance(output, Tensor) or output.ndim != 2:
        if isinstance(targets, bool):
            class_indices(targets, B, "cpu")  # the bool error
        raise ValueError(f"targets: class indices need the model to return logits (B, L), got "
                         f"{describe(output)}; pass a callable target for other outputs")
    return Target("index", B, class_indices(targets, B, output.device, output.shape[1]))


def detach_output(output):
    """A model output (tensors, dicts, lists, tuples) with every tensor detached."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, dict):
        return type(output)((k, detach_output(v)) for k, v in output.items())
    if isinstance(output, (list, tuple)):
        return type(output)(detach_output(v) for v in output)
    return output


def metric_classes(targets, B: int, device) -> Tensor:
    """Targets for the faithfulness metrics, which score a class's softmax probability: an int, B class
    indices or B pytorch-grad-cam ClassifierOutputTargets -> (B,) int64. Other callables: TypeError."""
    if isinstance(targets, (list, tuple)) and any(callable(x) for x in targets):
        if not all(_is_pgc_classifier_target(x) for x in targets):
            raise TypeError("targets: the metrics score a class's softmax probability; expected an int, B class "
                            "indices or ClassifierOutputTargets, got other callables")
        targets = [int(x.category) for x in targets]
    return class_indices(targets, B, device)
