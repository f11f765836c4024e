"""What to explain: one resolver for every place that takes ``targets`` (engines, metrics, compat).

Shapes: B images, L classes.
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor


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
