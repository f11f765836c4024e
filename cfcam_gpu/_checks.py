"""Argument validation. Shape, dtype and device checks never read tensor values; only the explicit
finiteness check does (it is one reduction and one host sync per call, and can be switched off)."""
from __future__ import annotations

import torch
from torch import Tensor


def decide_sync_free(sync_free: bool | None, like: Tensor) -> bool:
    """The accelerator/CPU choice, made once at the top of a public function and passed down.

    None: sync-free (static shapes, no host reads between the backward pass and the CAMs) on every
    device but the CPU, where a host read costs nothing and data-dependent shortcuts pay. True runs the
    accelerator path on any device (the tests run it on CPU tensors); False allows host reads.
    """
    if sync_free is None:
        return like.device.type != "cpu"
    if not isinstance(sync_free, bool):
        raise TypeError(f"sync_free: expected None, True or False, got {sync_free!r}")
    return sync_free


def check_tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_ndim(x: Tensor, ndim: int, name: str, layout: str) -> Tensor:
    check_tensor(x, name)
    if x.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")
    return x


def check_floating(x: Tensor, name: str) -> Tensor:
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b}: expected shape {tuple(a.shape)} (the shape of {name_a}), "
                         f"got {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_b}: expected device {a.device} (the device of {name_a}), got {b.device}")


def check_features(activations: Tensor, gradients: Tensor) -> None:
    """Both (B, C, h, w), floating, same shape and device, non-empty."""
    check_ndim(activations, 4, "activations", "(B, C, h, w)")
    check_ndim(gradients, 4, "gradients", "(B, C, h, w)")
    check_floating(activations, "activations")
    check_floating(gradients, "gradients")
    check_same_shape(activations, gradients, "activations", "gradients")
    if activations.numel() == 0:
        raise ValueError(f"activations: expected a non-empty (B, C, h, w) tensor, got shape "
                         f"{tuple(activations.shape)}")


def check_finite(x: Tensor, name: str) -> None:
    """Raise naming the first image (dim 0) that holds a NaN or an infinity. One host sync."""
    bad = ~torch.isfinite(x.flatten(1)).all(dim=1)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"{name}: expected finite values, got NaN or inf in image index "
                         f"{idx[0]}" + (f" (and {len(idx) - 1} more: {idx[1:6]})" if len(idx) > 1 else ""))


def validate_features(activations: Tensor, gradients: Tensor, check_values: bool) -> None:
    """The checks every ``*_from_features`` function makes: shapes and dtypes, then (optionally, one host
    sync) finiteness naming the image."""
    check_features(activations, gradients)
    if check_values:
        check_finite(activations, "activations")
        check_finite(gradients, "gradients")


def channel_stats(mean, std, like: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel normalisation constants as (1, C, 1, 1) tensors of ``like``'s dtype and device, with C
    = like.shape[1] values each and std > 0 (like: (B, C, H, W), possibly empty)."""
    m = torch.as_tensor(mean, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=like.dtype, device=like.device).reshape(1, -1, 1, 1)
    C = like.shape[1]
    if m.shape[1] != C or s.shape[1] != C or not bool((s > 0).all()):
        raise ValueError(f"mean/std: expected {C} values each, std > 0, got mean={tuple(m.flatten().tolist())} "
                         f"std={tuple(s.flatten().tolist())}")
    return m, s
