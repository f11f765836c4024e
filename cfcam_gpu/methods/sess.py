"""SESS (Tyagi et al. 2022, "Saliency Enhancing with Scaling and Sliding"), batched: a meta-method that
runs a base CAM method on patches of the image at several scales and fuses the patch maps.

As pytorch-grad-cam 1.5.7's ``SESS``, for every image of the batch at once:
1. the image is resized (bilinear, antialiased, torchvision's rule: the shorter side becomes the scale)
   to each scale (default: ``num_scales`` scales from the window size in steps of
   round(``scale_step_ratio`` * window)); a square window (default: the shorter side of the input)
   slides over it with ``step_size`` (default: the window; the last window of a row or column is
   shifted back inside). The geometry depends only on the input shape, so all B images share it.
2. every patch is scored: the target of the whole image (None: its top-1 class) on the softmax of the
   patch's output (``use_softmax_scores``) or on the output itself, clipped at 0; the lowest
   ``pre_filter_ratio`` of an image's patches are dropped; patch weight = score / the image's best
   score (all 1 where that is 0).
3. the base method's map of every patch (pytorch-grad-cam's scaling at the window size, see
   ``patch_maps``) times its weight is pasted into a zero canvas of its scaled image and the canvas is
   resized (bilinear, half-pixel centres) to the input size. Canvas and resize are one product
   R_h[:, y:y+win] @ map @ R_w[:, x:x+win]^T with the resize matrices R (``bilinear_matrix``), so no
   canvas is ever built.
4. fusion: ``pool="mean"``: per pixel the mean of the pasted maps that exceed ``theta`` there (0 where
   none does); ``"max"``: their maximum. With ``smooth`` a Gaussian blur (11 x 11, sigma 5, reflected
   border as OpenCV's default), then min-max scaling per image.
Patches run ``batch_size`` at a time through the model (scores) and the base method (maps); their
order does not change the result except for ties in the pre-filter's ranking (a stable sort here).
Shapes: B images, P patches per image, H x W input, S x S window.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_floating, check_ndim
from ..cam import CAMResult
from ..engine import CAMEngine
from ..fuse import fuse_cams, minmax_scale
from ..hooks import eval_mode
from ..targets import Target, detach_output, primary_output, resolve

POOLS = ("mean", "max")
BLUR_SIZE, BLUR_SIGMA = 11, 5.0


def window_starts(length: int, step: int, window: int) -> list[int]:
    """Start offsets of the windows along one side; the last one shifted back inside."""
    starts = []
    for start in range(0, length, step):
        if start + window >= length:
            starts.append(max(length - window, 0))
            break
        starts.append(start)
    return starts


def resized_size(h: int, w: int, short: int) -> tuple[int, int]:
    """torchvision's ``resize(img, short)`` output size: the shorter side becomes ``short``."""
    if w <= h:
        return int(short * h / w), short
    return short, int(short * w / h)


def default_scales(window: int, num_scales: int, scale_step_ratio: float) -> list[int]:
    step = int(round(window * scale_step_ratio))
    return [window + step * i for i in range(num_scales)]


def bilinear_matrix(out_size: int, in_size: int, device=None) -> Tensor:
    """(out_size, in_size) float32 matrix R with R @ v the bilinear resize of v (half-pixel centres,
    ``align_corners=False``, no antialiasing: OpenCV's INTER_LINEAR and torch's interpolate)."""
    scale = in_size / out_size
    src = ((torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    l1 = (src - i0).clamp(0, 1)
    R = torch.zeros(out_size, in_size, dtype=torch.float64, device=device)
    rows = torch.arange(out_size, device=device)
    R.index_put_((rows, i0), 1 - l1, accumulate=True)
    R.index_put_((rows, i1), l1, accumulate=True)
    return R.float()


def gaussian_blur(maps: Tensor, size: int = BLUR_SIZE, sigma: float = BLUR_SIGMA) -> Tensor:
    """(B, H, W) -> (B, H, W): OpenCV's ``GaussianBlur(ksize=(size, size), sigma)`` with its default border
    (reflect-101: torch's "reflect" padding); needs H, W > size // 2."""
    r = size // 2
    if min(maps.shape[-2:]) <= r:
        raise ValueError(f"smooth: expected maps larger than {r} pixels on each side for the {size} x {size} "
                         f"blur, got {tuple(maps.shape[-2:])}")
    x = torch.arange(size, dtype=torch.float64, device=maps.device) - r
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = (g / g.sum()).to(maps.dtype)
    y = F.pad(maps[:, None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, size))
    return F.conv2d(y, g.view(1, 1, size, 1))[:, 0]


def patch_maps(result: CAMResult, size: tuple[int, int], eps: float = 0.0, aug_smooth: bool = False) -> Tensor:
    """A base method's CAMResult -> pytorch-grad-cam's maps (N, S, S) in [0, 1] at ``size``: each layer's
    unnormalised map fused as ``fuse.fuse_cams`` (``eps`` 1e-7: pytorch-grad-cam's); an aug-smoothed
    result is already that map."""
    if aug_smooth:
        return result.cams.clamp(0, 1)
    layers = result.layers or [result]
    raw = [r.cams if r.peak is None else r.cams * r.peak[:, None, None] for r in layers]
    return fuse_cams(raw, tuple(size), eps).clamp_(0, 1)


def _patch_targets(target: Target, b: Tensor):
    """The targets of patches whose image is b (N,), for the base method. Class indices go as one
    callable on the whole output: they were checked against the output once already, and checking them
    again for every chunk of patches would read the device each time."""
    if target.kind == "index":
        return lambda output: target.rows(output, b)
    if target.kind == "each":
        return [target.fns[i] for i in b.tolist()]
    if target.kind == "batch":
        return target.fn
    return None


class SESS:
    """SESS over a batched base method: ``SESS(model, target_layer, base_method=GradCAM, scales=None,
    num_scales=12, scale_step_ratio=2/7, window_size=None, step_size=None, pre_filter_ratio=0.0, theta=0.0,
    pool="mean", smooth=True, use_softmax_scores=True, batch_size=32, **options)`` (options: the base
    method's, see ``CAMEngine``); ``cam(images, targets=None, aug_smooth=False, eigen_smooth=False)``
    -> CAMResult with cams (B, H, W) at the input size, weights (B, P) the patch weights (0 for the
    dropped ones), targets, logits of the whole images. See the module docstring."""

    def __init__(self, model: nn.Module, target_layer, base_method: type | None = None, scales=None,
                 num_scales: int = 12, scale_step_ratio: float = 2.0 / 7.0, window_size: int | None = None,
                 step_size: int | None = None, pre_filter_ratio: float = 0.0, theta: float = 0.0,
                 pool: str = "mean", smooth: bool = True, use_softmax_scores: bool = True,
                 batch_size: int = 32, **options):
        from ..engine import GradCAM

        base_method = GradCAM if base_method is None else base_method
        if not (isinstance(base_method, type) and issubclass(base_method, CAMEngine)):
            raise TypeError(f"base_method: expected a CAM engine class (e.g. cfcam_gpu.GradCAM), got "
                            f"{base_method!r}")
        if pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {pool!r}")
        if not 0.0 <= pre_filter_ratio < 1.0:
            raise ValueError(f"pre_filter_ratio: expected a number in [0, 1), got {pre_filter_ratio!r}")
        if isinstance(num_scales, bool) or not isinstance(num_scales, int) or num_scales < 1:
            raise ValueError(f"num_scales: expected an int >= 1, got {num_scales!r}")
        for name, value in (("window_size", window_size), ("step_size", step_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
        self.base = base_method(model, target_layer, **options)
        self.model = model
        self.scales = None if scales is None else [int(s) for s in scales]
        self.num_scales, self.scale_step_ratio = num_scales, scale_step_ratio
        self.window_size, self.step_size = window_size, step_size
        self.pre_filter_ratio, self.theta, self.pool = pre_filter_ratio, theta, pool
        self.smooth, self.use_softmax_scores, self.batch_size = smooth, use_softmax_scores, batch_size
        self.eps = 0.0  # pytorch-grad-cam's scaling uses 1e-7 (cfcam_gpu.compat sets it)

    # -- geometry ------------------------------------------------------------------------------------
    def geometry(self, H: int, W: int) -> tuple[int, list[tuple[int, int, int, int]]]:
        """-> window S, and per patch (scaled height, scaled width, y, x) of its top-left corner."""
        window = self.window_size if self.window_size is not None else min(H, W)
        step = self.step_size if self.step_size is not None else window
        scales = self.scales if self.scales is not None else default_scales(window, self.num_scales,
                                                                             self.scale_step_ratio)
        patches = []
        for scale in scales:
            if scale < window:
                raise ValueError(f"scales: expected every scale >= the window size {window}, got {scale}")
            sh, sw = resized_size(H, W, scale)
            patches += [(sh, sw, y, x) for y in window_starts(sh, step, window)
                        for x in window_starts(sw, step, window)]
        return window, patches

    def _crops(self, images: Tensor, window: int, patches: list, chunk: int):
        """Yield (patch indices, crops (q * B, 3, S, S) patch-major) over the patches, ``chunk`` patches
        at a time, resizing the images once per scale."""
        scaled, key = None, None
        for start in range(0, len(patches), chunk):
            idx = list(range(start, min(start + chunk, len(patches))))
            crops = []
            for p in idx:
                sh, sw, y, x = patches[p]
                if key != (sh, sw):
                    key = (sh, sw)
                    scaled = images if (sh, sw) == tuple(images.shape[-2:]) else F.interpolate(
                        images, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
                crops.append(scaled[:, :, y:y + window, x:x + window])
            yield idx, torch.cat(crops)

    # -- the method ----------------------------------------------------------------------------------
    def __call__(self, images: Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> CAMResult:
        check_ndim(images, 4, "images", "(B, 3, H, W)")
        check_floating(images, "images")
        images = images.detach()
        B, _, H, W = images.shape
        window, patches = self.geometry(H, W)
        P, chunk = len(patches), max(1, self.batch_size // B)
        with eval_mode(self.model), torch.no_grad(), self.base._autocast(images):
            output = self.model(images)
            target = resolve(targets, output)
            b_all = torch.arange(B, device=images.device)
            scores = torch.empty(P, B, device=images.device)
            for idx, crops in self._crops(images, window, patches, chunk):
                out = primary_output(self.model(crops))
                if self.use_softmax_scores:
                    out = torch.softmax(out.float(), dim=-1)
                scores[idx[0]:idx[-1] + 1] = target.rows(out, b_all.repeat(len(idx))).float().reshape(len(idx), B)
        scores = scores.T.clamp_min(0)  # (B, P)
        rank = scores.argsort(dim=1, stable=True).argsort(dim=1)
        keep = rank >= int(P * self.pre_filter_ratio)
        best = scores.amax(dim=1, keepdim=True)
        weights = torch.where(best > 0, scores / torch.where(best > 0, best, torch.ones_like(best)),
                              torch.ones_like(scores)) * keep

        R_h = {sh: bilinear_matrix(H, sh, images.device) for sh, _, _, _ in patches}
        R_w = {sw: bilinear_matrix(W, sw, images.device) for _, sw, _, _ in patches}
        total = torch.zeros(B, H, W, device=images.device)
        counts = torch.zeros(B, H, W, device=images.device)
        for idx, crops in self._crops(images, window, patches, chunk):
            q = len(idx)
            b = b_all.repeat(q)
            result = self.base(crops, _patch_targets(target, b), aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
            maps = patch_maps(result, (window, window), self.eps, aug_smooth).reshape(q, B, window, window)
            maps = maps * weights[:, idx].T[:, :, None, None]
            A = torch.stack([R_h[patches[p][0]][:, patches[p][2]:patches[p][2] + window] for p in idx])
            C = torch.stack([R_w[patches[p][1]][:, patches[p][3]:patches[p][3] + window] for p in idx])
            pasted = A[:, None] @ maps @ C[:, None].transpose(-1, -2)  # (q, B, H, W)
            if self.pool == "max":
                total = torch.maximum(total, pasted.amax(dim=0))
            else:
                over = (pasted > self.theta) & keep[:, idx].T[:, :, None, None]
                total += torch.where(over, pasted, torch.zeros_like(pasted)).sum(dim=0)
                counts += over.sum(dim=0)
        cam = total if self.pool == "max" else torch.where(counts > 0, total / counts.clamp_min(1), 0.0)
        if self.smooth:
            cam = gaussian_blur(cam)
        return CAMResult(cams=minmax_scale(cam, self.eps), weights=weights, targets=target.indices,
                         logits=detach_output(output))

    def close(self) -> None:
        self.base.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
