"""ROAD: RemOve And Debias (Rong et al. 2022), batched on the model's device.

As pytorch-grad-cam 1.5.7's ``metrics.road``: for a percentile q, the pixels whose (upsampled) CAM value
is >= the q-th percentile of the image's CAM (numpy's linear rule) are removed ("most relevant first",
MoRF; "least relevant first", LeRF, does the same on 1 - CAM) and replaced by the noisy linear
imputation: every removed pixel is the weighted mean of its 8 neighbours (weights 1/6 for the 4 direct,
1/12 for the 4 diagonal ones; neighbours outside the image left out), kept pixels fixed, plus
``noise`` x N(0, 1) per removed value (0.01, as pytorch-grad-cam). The score is the target's logit
(``score="logit"``, pytorch-grad-cam's ClassifierOutputTarget) or softmax probability (``"softmax"``) on
the imputed image minus that on the image. ``ROADCombined`` = (mean LeRF - mean MoRF) / 2 over the
percentiles (10, 20, ..., 90 by default).

The imputation is a sparse linear system per image (pytorch-grad-cam solves it with SciPy's ``spsolve``,
one image at a time on the host). Here it is solved for all images and colour channels at once on the
image grid (the system is symmetric positive definite on the removed pixels: a weighted graph Laplacian
with the kept pixels as boundary) by conjugate gradients preconditioned with one multigrid V-cycle:
grids halved down to 8 pixels a side (a coarse pixel is removed iff its whole 2 x 2 block is), damped
Jacobi before and after each coarse correction, bilinear prolongation (the edge repeated past the
border) and its transpose as restriction, the coarsest grid solved by a Cholesky factorisation. A fixed
number of steps (``ITERATIONS``; static, no host read; a system that has converged stops moving).
The neighbour sum is formed as ([1 2 1] x [1 2 1] - 4 at the centre) / 12, so its weights sum to 1
exactly, as s does in the image's interior (a 3 x 3 kernel of float32 1/6 and 1/12 sums to 1 + 3e-8:
that shifts the nearly singular system far from the kept pixels, by up to 6e-4 at 224 x 224).
Measured against SciPy's float64 direct solve: within 1e-4 at 48 x 48 and 2e-5 at 96 x 96 with 90%
removed (tested), 1.6e-5 at 224 x 224 (``python -m bench.road``).
Shapes: B images, H x W input, P percentiles.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hooks import eval_mode
from .metrics import check_batch_size, check_metric_inputs, upsample_cams
from .percentile_ops import percentile

PERCENTILES = (10, 20, 30, 40, 50, 60, 70, 80, 90)


class ROAD(NamedTuple):
    """Per image and percentile: morf (B, P) and lerf (B, P) score changes (imputed minus original);
    combined (B,) = (lerf.mean(1) - morf.mean(1)) / 2 (pytorch-grad-cam's ROADCombined)."""

    morf: Tensor
    lerf: Tensor
    combined: Tensor


def _smooth_121(v: Tensor) -> Tensor:
    """v[j-1] + 2 v[j] + v[j+1] along the last dimension, zero beyond the ends."""
    out = 2 * v
    out[..., 1:] += v[..., :-1]
    out[..., :-1] += v[..., 1:]
    return out


def _neighbour_sum(x: Tensor) -> Tensor:
    """(N, 1, H, W) -> the weighted sum of the 8 neighbours (1/6 direct, 1/12 diagonal), zero outside
    the image: ([1 2 1] x [1 2 1] - 4 at the centre) / 12, in two separable passes (2.5x cheaper than a
    3 x 3 ``conv2d`` of one channel on the CPU)."""
    return (_smooth_121(_smooth_121(x).transpose(-1, -2)).transpose(-1, -2) - 4 * x) / 12


class _Level(NamedTuple):
    """One grid of the multigrid hierarchy: m (N, 1, h, w) 1 on the unknown pixels; s (1, 1, h, w) the
    in-image neighbours' weight sums (the diagonal); inv (N, 1, h, w) = m / s (the Jacobi step)."""

    m: Tensor
    s: Tensor
    inv: Tensor


def _apply(v: Tensor, level: _Level) -> Tensor:
    """The system's operator on the unknown pixels, s v - sum_j w_ij v_j over unknown j; 0 elsewhere.
    Symmetric positive definite on the unknowns (a weighted graph Laplacian with the kept pixels as
    boundary; semi-definite where a grid has no kept pixel). v: (N, 1, h, w), zero on the kept pixels.
    Reads the level's m and s only."""
    return level.m * (level.s * v - _neighbour_sum(v))


def _prolong_last(c: Tensor, n: int) -> Tensor:
    """Cell-centred linear 2x interpolation along the last dimension, the edge value repeated past both
    ends (3/4 of the own coarse value, 1/4 of the nearer neighbour's): (..., nc) -> (..., n), n <= 2 nc."""
    left = torch.cat([c[..., :1], c[..., :-1]], dim=-1)
    right = torch.cat([c[..., 1:], c[..., -1:]], dim=-1)
    return torch.stack([0.75 * c + 0.25 * left, 0.75 * c + 0.25 * right], dim=-1).flatten(-2)[..., :n]


def _restrict_last(f: Tensor, nc: int) -> Tensor:
    """The transpose of ``_prolong_last``: (..., n) -> (..., nc)."""
    g = F.pad(f, (0, 2 * nc - f.shape[-1])).unflatten(-1, (nc, 2))
    even, odd = g[..., 0], g[..., 1]
    out = 0.75 * (even + odd)
    out[..., 1:] += 0.25 * odd[..., :-1]
    out[..., :-1] += 0.25 * even[..., 1:]
    out[..., 0] += 0.25 * even[..., 0]  # the repeated edge values
    out[..., -1] += 0.25 * odd[..., -1]
    return out


def _prolong(e: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear 2x interpolation, the edge repeated past the border (as ``F.interpolate(...,
    "bilinear", align_corners=False)``: constants stay constant up to the border, where the image's
    edges leave the system free): (N, 1, hc, wc) -> (N, 1, h, w) = ``size``."""
    return _prolong_last(_prolong_last(e, size[1]).transpose(-1, -2), size[0]).transpose(-1, -2)


def _restrict(r: Tensor, size: tuple[int, int]) -> Tensor:
    """The transpose of ``_prolong``: (N, 1, h, w) -> (N, 1, hc, wc) = ``size`` (ceil(h/2), ceil(w/2))."""
    return _restrict_last(_restrict_last(r, size[1]).transpose(-1, -2), size[0]).transpose(-1, -2)


# Grids are halved (ceil) while their larger side exceeds this; the coarsest is solved exactly (dense).
COARSEST_SIDE = 8
JACOBI_WEIGHT = 0.8  # damped Jacobi (D^-1 A has eigenvalues in [0, 4/3] for this stencil)
SMOOTHING_STEPS = 1  # Jacobi steps before and after each coarse correction


def _levels(m: Tensor) -> list[_Level]:
    """The hierarchy, finest first: a coarse pixel is unknown iff its 2 x 2 block (inside the image) is."""
    levels = []
    while True:
        s = _neighbour_sum(torch.ones_like(m[:1]))
        levels.append(_Level(m, s, torch.where(s > 0, m / s.clamp_min(1e-30), 0.0)))  # s = 0: a 1 x 1 image
        if max(m.shape[-2:]) <= COARSEST_SIDE:
            return levels
        m = -F.max_pool2d(-m, 2, ceil_mode=True)


def _coarsest_inverse(level: _Level) -> Tensor:
    """(N, n, n) inverse of each system's operator on the coarsest grid (n = h w pixels, at most
    ``COARSEST_SIDE``**2), with the identity on the kept pixels (decoupled from the unknown ones), by a
    float64 Cholesky factorisation (no host read). Positive definite wherever a system keeps a pixel (every
    unknown region then touches a kept one, here as on the finer grids); a 1e-12 shift of the diagonal
    (whose entries are at most 1) covers a grid with none (its right-hand side is 0)."""
    N, _, h, w = level.m.shape
    n = h * w
    basis = torch.eye(n, dtype=level.m.dtype, device=level.m.device).reshape(n, 1, h, w)
    cols = _apply((level.m[:, None] * basis[None]).reshape(N * n, 1, h, w),
                  level._replace(m=level.m.repeat_interleave(n, dim=0)))  # one copy per basis vector
    a = cols.reshape(N, n, n).double() + torch.diag_embed((1 - level.m).reshape(N, n).double())
    a = (a + a.transpose(1, 2)) / 2 + 1e-12 * torch.eye(n, dtype=a.dtype, device=a.device)
    factor = torch.linalg.cholesky_ex(a).L
    return torch.cholesky_inverse(factor).to(level.m.dtype)


def _v_cycle(r: Tensor, levels: list[_Level], coarsest: Tensor) -> Tensor:
    """One symmetric multigrid V-cycle for A e = r (the preconditioner of ``_solve``): damped Jacobi
    before and after the coarse correction, restriction the transpose of the prolongation, the coarsest
    grid solved exactly. r: (N, 1, h, w), zero on the kept pixels -> e, the same."""
    level = levels[0]
    if len(levels) == 1:
        N, _, h, w = r.shape
        return (coarsest @ r.reshape(N, h * w, 1)).reshape(N, 1, h, w) * level.m
    e = JACOBI_WEIGHT * level.inv * r
    for _ in range(SMOOTHING_STEPS - 1):
        e = e + JACOBI_WEIGHT * level.inv * (r - _apply(e, level))
    size = levels[1].m.shape[-2:]
    coarse_r = _restrict(r - _apply(e, level), size) * levels[1].m
    e = e + level.m * _prolong(_v_cycle(coarse_r, levels[1:], coarsest), r.shape[-2:])
    for _ in range(SMOOTHING_STEPS):
        e = e + JACOBI_WEIGHT * level.inv * (r - _apply(e, level))
    return e


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(dim=(1, 2, 3), keepdim=True)


def _solve(img: Tensor, m: Tensor, iterations: int) -> Tensor:
    """Conjugate gradients preconditioned by a multigrid V-cycle, ``iterations`` steps on every (N,)
    system s x_i - sum_j w_ij x_j = sum_known w_ij img_j over the unknown pixels (m = 1), from x = 0
    there; a system that has converged stops moving (no host read). img, m: (N, 1, H, W) -> (N, 1, H, W)
    with the kept pixels of img."""
    levels = _levels(m)
    coarsest = _coarsest_inverse(levels[-1])
    fine = levels[0]

    def precondition(r):
        return _v_cycle(r, levels, coarsest)

    def safe_div(a, b):
        return torch.where(b > 0, a / torch.where(b > 0, b, torch.ones_like(b)), torch.zeros_like(a))

    x = torch.zeros_like(img)
    r = m * _neighbour_sum((1 - m) * img)
    z = precondition(r)
    p = z
    rz = _dot(r, z)
    floor = rz * (4 * torch.finfo(img.dtype).eps) ** 2
    for _ in range(iterations):
        active = rz > floor
        q = _apply(p, fine)
        alpha = torch.where(active, safe_div(rz, _dot(p, q)), 0.0)
        x = x + alpha * p
        r = r - alpha * q
        z = precondition(r)
        rz_new = _dot(r, z)
        p = z + torch.where(active, safe_div(rz_new, rz), 0.0) * p
        rz = torch.where(active, rz_new, rz)
    return torch.where(m > 0, x, img)


# Preconditioned steps: on a 224 x 224 photo with 10..90% of the pixels removed, 12 bring the float32
# solution within 1e-5 of where 40 steps end (10: 7e-5, 8: 1e-3; ``python -m bench.road --sweep``).
ITERATIONS = 12


def linear_impute(images: Tensor, remove: Tensor, iterations: int | None = None) -> Tensor:
    """The noise-free ROAD imputation of the removed pixels.

    images: (B, 3, H, W); remove: (B, H, W) bool, True where a pixel is replaced -> (B, 3, H, W): kept
    pixels unchanged, removed ones solving s_i x_i = sum_j w_ij x_j (j the in-image neighbours, s_i = sum_j
    w_ij), for every (image, channel) at once: ``iterations`` (None: ``ITERATIONS``) steps of conjugate
    gradients preconditioned by a multigrid V-cycle (``_solve``). Float32 or better.
    """
    B, Cin, H, W = images.shape
    dtype = torch.float64 if images.dtype == torch.float64 else torch.float32
    img = images.to(dtype).reshape(B * Cin, 1, H, W)
    m = remove.to(dtype)[:, None].repeat_interleave(Cin, dim=0)  # (B*3, 1, H, W), 1 = unknown
    steps = ITERATIONS if iterations is None else iterations
    return _solve(img, m, steps).reshape(B, Cin, H, W).to(images.dtype)


def removal_mask(cams: Tensor, q: float, most_relevant: bool) -> Tensor:
    """cams (B, H, W) -> (B, H, W) bool, True where removed: value >= the q-th percentile of the image's
    values (numpy's linear rule), on the CAM for MoRF and on 1 - CAM for LeRF (as pytorch-grad-cam)."""
    values = cams if most_relevant else 1 - cams
    threshold = percentile(values.flatten(1), q)
    return values >= threshold[:, None, None]


def _scores(model: nn.Module, images: Tensor, targets: Tensor, score: str, batch_size: int) -> Tensor:
    out = []
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size]).float()
        if score == "softmax":
            logits = logits.softmax(dim=1)
        out.append(logits.gather(1, targets[i:i + batch_size, None])[:, 0])
    return torch.cat(out)


def road(model: nn.Module, images: Tensor, cams: Tensor, targets, percentiles: Sequence[float] = PERCENTILES,
         score: str = "logit", noise: float = 0.01, generator: torch.Generator | None = None,
         iterations: int | None = None, batch_size: int = 64) -> ROAD:
    """ROAD MoRF and LeRF score changes for every image and percentile, and their combination.

    images: (B, 3, H, W) model input; cams: (B, h, w) or (B, H, W) (upsampled bilinearly to the input,
    as in ``metrics``; NumPy maps accepted); targets: an int, B class indices or ClassifierOutputTargets;
    ``noise`` (std of the Gaussian noise added to imputed values; 0 for the deterministic imputation),
    ``generator`` for that noise; ``iterations`` preconditioned conjugate-gradient steps (None:
    ``ITERATIONS``; ``linear_impute``);
    ``batch_size`` images per model pass. Eval mode, no_grad, the model's train/eval state restored.
    No host read.
    """
    cams, t = check_metric_inputs(images, cams, targets)
    check_batch_size(batch_size)
    if score not in ("logit", "softmax"):
        raise ValueError(f"score: expected 'logit' or 'softmax', got {score!r}")
    if not percentiles or not all(0 <= float(q) <= 100 for q in percentiles):
        raise ValueError(f"percentiles: expected values in [0, 100], got {tuple(percentiles)}")
    maps = upsample_cams(cams, images.shape[-2:])
    results = {True: [], False: []}
    with eval_mode(model), torch.no_grad():
        base = _scores(model, images, t, score, batch_size)
        for most_relevant in (True, False):
            for q in percentiles:
                remove = removal_mask(maps, float(q), most_relevant)
                imputed = linear_impute(images, remove, iterations)
                if noise:
                    z = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
                    imputed = imputed + noise * z * remove[:, None].to(images.dtype)
                results[most_relevant].append(_scores(model, imputed, t, score, batch_size) - base)
    morf, lerf = torch.stack(results[True], dim=1), torch.stack(results[False], dim=1)
    return ROAD(morf=morf, lerf=lerf, combined=(lerf.mean(dim=1) - morf.mean(dim=1)) / 2)
