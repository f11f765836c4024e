"""Faithfulness and robustness metrics for CAMs, batched on the model's device.

- ``average_drop_increase``: Average Drop / Increase in Confidence (Grad-CAM++ paper, ``mode="soft"``),
  or the CF-CAM authors' thresholded variant (``mode="threshold"``).
- ``deletion_insertion``: RISE's deletion and insertion curves and their areas (trapezoid rule).
- ``robustness``: SSIM and MSE between a gradient CAM and the CAM recomputed with Gaussian noise on the
  target-layer gradients; ``ssim`` is a batched, gaussian-window SSIM equal to scikit-image's
  ``structural_similarity(gaussian_weights=True, use_sample_covariance=False, data_range=...)``.
- ``mean_ci``: mean and a 95% confidence interval of per-image values (Student t or percentile bootstrap).

Every model pass runs in eval mode under ``no_grad`` (the model's train/eval state is restored) in chunks
of ``batch_size`` images; there is no per-image Python loop. CAMs may be given at the layer's resolution
(B, h, w) or the input's (B, H, W); they are upsampled bilinearly (align_corners=False) to the input size.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import channel_stats, check_floating, check_ndim
from .hooks import eval_mode
from .targets import metric_classes

__all__ = [
    "DeletionInsertion", "DropIncrease", "Robustness", "auc", "average_drop_increase", "deletion_insertion",
    "gaussian_blur", "mean_ci", "robustness", "ssim",
]


class DropIncrease(NamedTuple):
    """Per image: drop (B,) in percent, increase (B,) bool, p (B,) and p_explanation (B,) probabilities."""

    drop: Tensor
    increase: Tensor
    p: Tensor
    p_explanation: Tensor


class DeletionInsertion(NamedTuple):
    """Per image AUCs (B,) and curves (B, steps + 1) of the target's probability; a curve not asked for
    is None (and its AUC too)."""

    deletion_auc: Tensor | None
    insertion_auc: Tensor | None
    deletion_curve: Tensor | None
    insertion_curve: Tensor | None


class Robustness(NamedTuple):
    """Per image SSIM (B,) and MSE (B,) between the clean and the noisy CAM."""

    ssim: Tensor
    mse: Tensor


# ----------------------------------------------------------------------------------------------------
# Helpers.

def check_metric_inputs(images: Tensor, cams, targets) -> tuple[Tensor, Tensor]:
    """images (B, 3, H, W), cams (B, h, w) or (B, 1, h, w) (NumPy maps, e.g. from ``cfcam_gpu.compat``,
    accepted), targets as ``road``/``average_drop_increase`` take them -> (cams as a tensor, class
    indices (B,))."""
    check_ndim(images, 4, "images", "(B, 3, H, W)")
    check_floating(images, "images")
    if isinstance(cams, np.ndarray):
        cams = torch.from_numpy(np.ascontiguousarray(cams))
    if not isinstance(cams, Tensor) or cams.ndim not in (3, 4) or (cams.ndim == 4 and cams.shape[1] != 1):
        raise ValueError(f"cams: expected (B, h, w) maps (a tensor or NumPy array), got "
                         f"{tuple(cams.shape) if isinstance(cams, Tensor) else type(cams).__name__}")
    if cams.shape[0] != images.shape[0]:
        raise ValueError(f"cams: expected {images.shape[0]} maps (one per image), got {cams.shape[0]}")
    return cams, metric_classes(targets, images.shape[0], images.device)


def upsample_cams(cams: Tensor, size) -> Tensor:
    """(B, h, w) or (B, 1, h, w) -> (B, H, W) float32 on the same device."""
    cams = cams.reshape(cams.shape[0], 1, *cams.shape[-2:]).float()
    if tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=False)
    return cams[:, 0]


def check_batch_size(batch_size) -> int:
    """``batch_size`` if it is an int >= 1, else ValueError naming it."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    return batch_size


def class_probabilities(model: nn.Module, make_inputs: Callable[[Tensor], Tensor], n: int, targets: Tensor,
                        batch_size: int, device) -> Tensor:
    """Softmax probability (n,) of targets[i] (targets (n,)) for input i of n, built ``batch_size`` at a
    time by make_inputs(indices) -> (S, 3, H, W). Eval mode, no_grad, every submodule's mode restored."""
    out = torch.empty(n, device=device)
    with eval_mode(model), torch.no_grad():
        for i in range(0, n, batch_size):
            idx = torch.arange(i, min(i + batch_size, n), device=device)
            logits = model(make_inputs(idx)).float()
            out[idx] = logits.softmax(dim=1).gather(1, targets[idx][:, None])[:, 0]
    return out


def _channel_stats(mean, std, like: Tensor) -> tuple[Tensor, Tensor]:
    if mean is None or std is None:
        raise ValueError("mean/std: mode='threshold' zeroes pixels in pixel space and needs the model's "
                         "normalisation: pass mean=(r, g, b) and std=(r, g, b)")
    return channel_stats(mean, std, like)


# ----------------------------------------------------------------------------------------------------
# Average drop / increase in confidence.

def average_drop_increase(model: nn.Module, images: Tensor, cams: Tensor, targets, mode: str = "soft",
                          mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                          threshold: float = 0.5, batch_size: int = 64) -> DropIncrease:
    """Per-image drop = relu(p - p') / p x 100 and increase = p' > p.

    p: softmax probability of the target on the image; p' on the explanation image:
    ``mode="soft"`` (Grad-CAM++ paper): the model input multiplied by the upsampled CAM;
    ``mode="threshold"`` (CF-CAM authors): pixels whose upsampled CAM is > ``threshold`` kept, the rest
    set to 0 in pixel space (black) before normalisation; needs the model's ``mean`` and ``std``.
    images: (B, 3, H, W) model input; cams: (B, h, w) in [0, 1] (tensor or NumPy); targets: int or B
    indices (or B ClassifierOutputTargets).
    Means over images give "Average Drop" (%) and "Increase in Confidence" (x 100 for %).
    """
    cams, t = check_metric_inputs(images, cams, targets)
    batch_size = check_batch_size(batch_size)
    if mode not in ("soft", "threshold"):
        raise ValueError(f"mode: expected 'soft' or 'threshold', got {mode!r}")
    maps = upsample_cams(cams.to(images.device), images.shape[-2:])[:, None].to(images.dtype)  # (B, 1, H, W)
    if mode == "soft":
        explanation = lambda idx: images[idx] * maps[idx]  # noqa: E731
    else:
        m, s = _channel_stats(mean, std, images)
        keep = (maps > threshold).to(images.dtype)
        # pixel = x s + m; kept pixels unchanged, the rest black: (0 - m) / s after normalisation
        explanation = lambda idx: keep[idx] * images[idx] + (1 - keep[idx]) * (-m / s)  # noqa: E731
    B = images.shape[0]
    p = class_probabilities(model, lambda idx: images[idx], B, t, batch_size, images.device)
    p_exp = class_probabilities(model, explanation, B, t, batch_size, images.device)
    drop = (p - p_exp).clamp_min(0) / p * 100
    return DropIncrease(drop, p_exp > p, p, p_exp)


# ----------------------------------------------------------------------------------------------------
# Deletion / insertion.

def auc(curves: Tensor) -> Tensor:
    """Area under curves sampled at steps+1 equally spaced points of [0, 1] (trapezoid rule).

    curves: (..., steps + 1) -> (...). Equals RISE's (sum - first/2 - last/2) / steps.
    """
    n = curves.shape[-1] - 1
    if n < 1:
        raise ValueError(f"curves: expected at least 2 points, got {curves.shape[-1]}")
    return (curves.sum(dim=-1) - (curves[..., 0] + curves[..., -1]) / 2) / n


def _gaussian_kernel1d(sigma: float, radius: int, dtype, device) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def gaussian_blur(images: Tensor, kernel_size: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of (B, C, H, W), reflect padding (RISE's insertion substrate: klen 11,
    sigma 5; RISE pads with zeros)."""
    r = kernel_size // 2
    k = _gaussian_kernel1d(sigma, r, images.dtype, images.device)
    C = images.shape[1]
    x = F.pad(images, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)


def deletion_insertion(model: nn.Module, images: Tensor, cams: Tensor, targets, steps: int = 100,
                       baseline: str = "zero", curves: Sequence[str] = ("deletion", "insertion"),
                       batch_size: int = 64, pixels_per_step: int | None = None) -> DeletionInsertion:
    """RISE deletion / insertion: probability of the target as the most salient pixels are removed or added.

    Pixels are ranked by the upsampled CAM (descending, ties by position). At step k = 0..steps the top
    round(k H W / steps) pixels (``pixels_per_step`` p: k p pixels, and all of them at the last step,
    as the CF-CAM authors with p = H W // 100) are replaced by the baseline (deletion: curve starts at
    p(image)) or
    copied into the baseline (insertion: ends at p(image)). ``baseline``: "zero" (zeros of the model
    input, i.e. the normalisation mean colour, RISE's deletion substrate) or "blur" (``gaussian_blur`` of
    the image, RISE's insertion substrate). Low deletion AUC and high insertion AUC are better.
    All (image, step) pairs run ``batch_size`` at a time.
    Returns DeletionInsertion: AUCs (B,) and curves (B, steps + 1) for each of ``curves``.
    """
    cams, t = check_metric_inputs(images, cams, targets)
    batch_size = check_batch_size(batch_size)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if baseline not in ("zero", "blur"):
        raise ValueError(f"baseline: expected 'zero' or 'blur', got {baseline!r}")
    curves = tuple(curves)
    if not curves or any(c not in ("deletion", "insertion") for c in curves):
        raise ValueError(f"curves: expected 'deletion' and/or 'insertion', got {curves!r}")
    B, _, H, W = images.shape
    N = H * W
    saliency = upsample_cams(cams.to(images.device), (H, W)).flatten(1)  # (B, N)
    order = torch.argsort(saliency, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=images.device).expand(B, N))
    k = torch.arange(steps + 1, device=images.device)
    if pixels_per_step is None:
        counts = torch.round(k.double() * N / steps).long()
    else:
        if isinstance(pixels_per_step, bool) or not isinstance(pixels_per_step, int) or pixels_per_step < 0:
            raise ValueError(f"pixels_per_step: expected None or an int >= 0, got {pixels_per_step!r}")
        counts = torch.where(k == steps, N, (k * pixels_per_step).clamp_max(N))
    base = torch.zeros_like(images) if baseline == "zero" else gaussian_blur(images)
    targets_rep = t.repeat_interleave(steps + 1)

    def make(kind):
        def inputs(idx):  # idx over the B * (steps + 1) (image, step) pairs
            b, k = idx // (steps + 1), idx % (steps + 1)
            top = (rank[b] < counts[k][:, None]).view(-1, 1, H, W)  # the pixels removed / inserted
            if kind == "deletion":
                return torch.where(top, base[b], images[b])
            return torch.where(top, images[b], base[b])
        return inputs

    out = {}
    for kind in ("deletion", "insertion"):
        if kind in curves:
            probs = class_probabilities(model, make(kind), B * (steps + 1), targets_rep, batch_size, images.device)
            out[kind] = probs.view(B, steps + 1)
    d, i = out.get("deletion"), out.get("insertion")
    return DeletionInsertion(None if d is None else auc(d), None if i is None else auc(i), d, i)


# ----------------------------------------------------------------------------------------------------
# SSIM and robustness.

def ssim(x: Tensor, y: Tensor, data_range: float = 1.0, sigma: float = 1.5, K1: float = 0.01,
         K2: float = 0.03, window: str = "gaussian") -> Tensor:
    """Mean SSIM of each pair of maps with a Gaussian window (Wang et al. 2004), batched.

    x, y: (B, H, W) -> (B,). Equals ``skimage.metrics.structural_similarity(x[b], y[b],
    gaussian_weights=True, sigma=sigma, use_sample_covariance=False, data_range=data_range)``: window
    radius int(3.5 sigma + 0.5) (11 taps for sigma 1.5), SSIM averaged over the pixels at least one
    radius from the border (so the padding never matters). Float32 unless the input is float64.
    ``window="uniform"``: scikit-image's defaults instead (``structural_similarity(x, y,
    data_range=...)``: a 7 x 7 mean, sample covariance; what the CF-CAM authors' robustness test uses).
    """
    if window not in ("gaussian", "uniform"):
        raise ValueError(f"window: expected 'gaussian' or 'uniform', got {window!r}")
    check_ndim(x, 3, "x", "(B, H, W)")
    check_ndim(y, 3, "y", "(B, H, W)")
    if x.shape != y.shape:
        raise ValueError(f"y: expected shape {tuple(x.shape)} like x, got {tuple(y.shape)}")
    r = int(3.5 * sigma + 0.5) if window == "gaussian" else 3
    if min(x.shape[-2:]) < 2 * r + 1:
        raise ValueError(f"x: SSIM's {2 * r + 1}x{2 * r + 1} {window} window (sigma {sigma}) exceeds the "
                         f"{tuple(x.shape[-2:])} maps; upsample them (robustness(size=...)) or lower sigma")
    dtype = torch.float64 if x.dtype == torch.float64 or y.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype)[:, None], y.to(dtype)[:, None]
    if window == "gaussian":
        k, cov_norm = _gaussian_kernel1d(sigma, r, dtype, x.device), 1.0
    else:
        n = (2 * r + 1) ** 2  # sample covariance over the 7 x 7 window
        k, cov_norm = torch.full((2 * r + 1,), 1 / (2 * r + 1), dtype=dtype, device=x.device), n / (n - 1)
    kx, ky = k.view(1, 1, 1, -1), k.view(1, 1, -1, 1)

    def filt(z):  # "valid" separable Gaussian: only the cropped interior is ever used
        return F.conv2d(F.conv2d(z, kx), ky)

    ux, uy = filt(x), filt(y)
    vx = (filt(x * x) - ux * ux) * cov_norm
    vy = (filt(y * y) - uy * uy) * cov_norm
    vxy = (filt(x * y) - ux * uy) * cov_norm
    C1, C2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return s.flatten(1).double().mean(dim=1)


def robustness(cam_fn_from_features: Callable, acts: Tensor, grads: Tensor, sigmas: Sequence[float],
               generator: torch.Generator | None = None, size=None, relative: bool = True,
               window: str = "gaussian") -> dict[float, Robustness]:
    """Stability of a gradient CAM under noise on the target-layer gradients.

    For each sigma: noisy gradients = grads + N(0, (sigma * std_b)^2), std_b the standard deviation of
    image b's gradients (over C, h, w) (``relative=False``: N(0, sigma^2), the CF-CAM authors' absolute
    levels); the CAM is recomputed from (acts, noisy grads) and compared with the clean CAM: SSIM
    (``ssim`` with ``window``, data_range 1) and MSE, per image. ``cam_fn_from_features``:
    (acts, grads) -> CAMResult (e.g. ``cfcam_from_features``). ``size``: (H, W) to upsample both CAMs to
    first (bilinear), e.g. the input size; None compares them at the layer's resolution (SSIM then needs
    maps of at least 11 x 11). ``generator``: a torch.Generator on the gradients' device, for
    reproducible noise. Returns {sigma: Robustness(ssim (B,), mse (B,))}.
    """
    clean = cam_fn_from_features(acts, grads).cams
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        clean = upsample_cams(clean, size)
    scale = grads.flatten(1).float().std(dim=1).to(grads.dtype)[:, None, None, None]  # (B, 1, 1, 1)
    if not relative:
        scale = torch.ones_like(scale)
    out = {}
    for sigma in sigmas:
        noise = torch.randn(grads.shape, generator=generator, device=grads.device, dtype=grads.dtype)
        noisy = cam_fn_from_features(acts, grads + noise * (float(sigma) * scale)).cams
        if size is not None:
            noisy = upsample_cams(noisy, size)
        out[sigma] = Robustness(ssim(clean, noisy, window=window),
                                ((clean.double() - noisy.double()) ** 2).flatten(1).mean(1))
    return out


# ----------------------------------------------------------------------------------------------------
# Summary statistics.

def mean_ci(values, confidence: float = 0.95, method: str = "t", resamples: int = 2000,
            seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): a confidence interval of the mean of the finite values.

    ``method="t"``: Student t (symmetric, can leave the values' possible range for skewed or bounded
    data); ``"bootstrap"``: percentile bootstrap, ``resamples`` resamples drawn by NumPy's generator
    seeded with ``seed`` (reproducible), the interval clipped to [min, max] of the values (where every
    resampled mean lies; only rounding can step outside) and widened to hold the mean, so it stays within
    any bounds the values respect (a percentage in [0, 100], an SSIM in [-1, 1], an MSE >= 0).
    low = high = mean for a single value; all NaN for none.
    """
    if method not in ("t", "bootstrap"):
        raise ValueError(f"method: expected 't' or 'bootstrap', got {method!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence!r}")
    v = torch.as_tensor(values, dtype=torch.float64).flatten().cpu()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if n == 1:
        return m, m, m
    if method == "bootstrap":
        return (m, *_bootstrap_interval(v.numpy(), m, confidence, resamples, seed))
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * float(v.std(unbiased=True)) / math.sqrt(n)
    return m, m - half, m + half


def _bootstrap_interval(v: np.ndarray, m: float, confidence: float, resamples: int,
                        seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean of v (n,), in chunks of at most ~4M drawn indices."""
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples: expected an int >= 1, got {resamples!r}")
    rng = np.random.default_rng(seed)
    n, chunk = v.size, max(1, 4_000_000 // v.size)
    means = np.concatenate([v[rng.integers(0, n, size=(min(chunk, resamples - i), n))].mean(axis=1)
                            for i in range(0, resamples, chunk)])
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    lo, hi = float(np.clip(lo, v.min(), v.max())), float(np.clip(hi, v.min(), v.max()))
    return min(lo, m), max(hi, m)
