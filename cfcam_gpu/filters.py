"""Box and guided filters with OpenCV's symmetric border (``BORDER_REFLECT``: ``cba|abcd|dcb``), and the
"bilateral" filter of the published CF-CAM (arXiv 2504.00060 v2), as its authors' code computes it.

Shapes: M maps (e.g. B*K cluster means), P planes per map, h x w.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_floating, check_ndim, check_same_shape


def _symmetric_index(n: int, radius: int, device) -> Tensor:
    """Source index of each of the n + 2 radius padded positions, reflecting as often as needed."""
    pos = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(pos < n, pos, 2 * n - 1 - pos)


def symmetric_pad(x: Tensor, radius: int) -> Tensor:
    """(M, P, h, w) -> (M, P, h + 2r, w + 2r) with OpenCV's BORDER_REFLECT; any r >= 0, also r >= h."""
    H, W = x.shape[-2:]
    rows = _symmetric_index(H, radius, x.device)
    cols = _symmetric_index(W, radius, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def box_filter(x: Tensor, radius: int) -> Tensor:
    """Normalised (2r+1) x (2r+1) mean with symmetric border.

    x: (M, P, h, w) floating -> (M, P, h, w).
    """
    check_ndim(x, 4, "x", "(M, P, h, w)")
    if radius == 0:
        return x
    k = 2 * radius + 1
    padded = symmetric_pad(x, radius)
    out = F.avg_pool2d(padded, kernel_size=(1, k), stride=1)
    return F.avg_pool2d(out, kernel_size=(k, 1), stride=1)


def guided_filter(guide: Tensor, src: Tensor, radius: int, eps) -> Tensor:
    """Guided filter (He et al.) with ``cv2.ximgproc.guidedFilter`` semantics, single-channel guide.

    guide, src: (M, 1, h, w) floating; radius: int >= 0 (any size, also >= h); eps: float or (M,)
    tensor, used as is (not squared) -> (M, 1, h, w) in src's dtype, computed in float64.
    Where the local variance plus eps is exactly 0 (a constant window with eps = 0, where OpenCV returns
    NaN) the slope ``a`` is 0, so a constant map comes back unchanged.
    """
    check_ndim(guide, 4, "guide", "(M, 1, h, w)")
    check_ndim(src, 4, "src", "(M, 1, h, w)")
    check_floating(guide, "guide")
    check_floating(src, "src")
    check_same_shape(guide, src, "guide", "src")
    if guide.shape[1] != 1:
        raise ValueError(f"guide: expected one channel (M, 1, h, w), got shape {tuple(guide.shape)}")
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius: expected an int >= 0, got {radius!r}")
    M = guide.shape[0]
    eps = torch.as_tensor(eps, device=guide.device).double()
    if eps.ndim == 0:
        eps = eps.expand(M)
    if eps.shape != (M,):
        raise ValueError(f"eps: expected a float or a ({M},) tensor, got shape {tuple(eps.shape)}")
    if radius == 0:  # 1x1 windows: var = cov = 0, so a = 0 and q = src exactly
        return src.clone()
    out_dtype = src.dtype
    # float64 inside: var = box(I*I) - box(I)**2 cancels in near-constant windows (guide != src with eps
    # far below the variance: float32 lost 2e-2 of the map's max there), and the squares of float32
    # maps up to 3e38 stay finite. The filter is shift-equivariant (a is unchanged, q shifts with src)
    # and scale-equivariant (guide by s and eps by s**2: a scales by 1/s; src by t: q scales by t), so
    # work on maps centred on their means and scaled by powers of two (exact): a nearly constant map (the
    # usual cluster mean above a global average pool) stays put instead of amplifying rounding noise by
    # cov / var, and no float64 input in range overflows when squared.
    guide, src = guide.double(), src.double()
    shift_i = guide.mean(dim=(2, 3), keepdim=True)
    shift_p = src.mean(dim=(2, 3), keepdim=True)
    guide, src = guide - shift_i, src - shift_p
    s_i, s_p = _unit_scale(guide), _unit_scale(src)  # (M, 1, 1, 1)
    guide, src = guide * s_i, src * s_p
    eps = eps * s_i[:, 0, 0, 0] * s_i[:, 0, 0, 0]
    means = box_filter(torch.cat([guide, src, guide * guide, guide * src], dim=1), radius)
    mean_i, mean_p, mean_ii, mean_ip = means.unbind(dim=1)
    var = mean_ii - mean_i * mean_i
    cov = mean_ip - mean_i * mean_p
    denom = var + eps[:, None, None]
    zero = denom == 0
    a = torch.where(zero, 0.0, cov / torch.where(zero, 1.0, denom))
    b = mean_p - a * mean_i
    mean_a, mean_b = box_filter(torch.stack([a, b], dim=1), radius).unbind(dim=1)
    return ((mean_a * guide[:, 0] + mean_b)[:, None] / s_p + shift_p).to(out_dtype)


def _unit_scale(x: Tensor) -> Tensor:
    """(M, 1, h, w) float64 -> (M, 1, 1, 1): the power of two bringing each map's max |x| into [0.5, 1)
    (1 for an all-zero map; at most 2**1000 for tiny maps)."""
    e = torch.frexp(x.abs().amax(dim=(2, 3), keepdim=True)).exponent.clamp_min(-1000)
    return torch.ldexp(torch.ones(e.shape, dtype=x.dtype, device=x.device), -e)


# ----------------------------------------------------------------------------------------------------
# The published CF-CAM's filter: not a textbook bilateral filter. Each map g gets ONE kernel the size of
# the map, spatial weights around (h/2, w/2) (half a pixel off the centre for odd sizes) times range
# weights around the map's mean, normalised by (sum + offset), and the map is correlated with it under
# zero padding (torch's conv2d padding="same": (k-1)//2 before, the rest after).

def published_kernel(g: Tensor, sigma_spatial: float = 5.0, sigma_range: float = 0.1,
                     offset: float = 1e-6) -> Tensor:
    """(M, h, w) maps -> (M, h, w) kernels: exp(-((i - h/2)^2 + (j - w/2)^2) / (2 sigma_spatial^2)) x
    exp(-(g_ij - mean(g))^2 / (2 sigma_range^2)), divided by (its sum + offset)."""
    check_ndim(g, 3, "g", "(M, h, w)")
    check_floating(g, "g")
    H, W = g.shape[-2:]
    i = torch.arange(H, device=g.device, dtype=g.dtype)[:, None] - H / 2
    j = torch.arange(W, device=g.device, dtype=g.dtype)[None, :] - W / 2
    spatial = torch.exp(-(i * i + j * j) / (2 * sigma_spatial ** 2))
    diff = g - g.mean(dim=(1, 2), keepdim=True)
    kernel = spatial * torch.exp(-(diff * diff) / (2 * sigma_range ** 2))
    return kernel / (kernel.sum(dim=(1, 2), keepdim=True) + offset)


def published_filter(g: Tensor, **kernel_options) -> Tensor:
    """The published filter: (M, h, w) -> (M, h, w), each map correlated with its own ``published_kernel``
    (one grouped conv2d, padding "same")."""
    kernel = published_kernel(g, **kernel_options)
    N, H, W = g.shape
    top, left = (H - 1) // 2, (W - 1) // 2  # conv2d's padding="same", without its even-size warning
    padded = F.pad(g[None], (left, W - 1 - left, top, H - 1 - top))
    return F.conv2d(padded, kernel[:, None], groups=N)[0]


def _window_rows(n: int, device, dtype) -> Tensor:
    """(n, n): row u marks the input positions that kernel tap u reads over all n outputs of a "same"
    correlation with an n-tap kernel (zero padding (n-1)//2 before)."""
    before = (n - 1) // 2
    u = torch.arange(n, device=device)[:, None]
    i = torch.arange(n, device=device)[None, :]
    return ((i >= u - before) & (i <= u - before + n - 1)).to(dtype)


def published_filter_mean(g: Tensor, **kernel_options) -> Tensor:
    """Spatial mean of ``published_filter(g)`` without the H W x H W correlation: (M, h, w) -> (M,).

    The mean over the outputs of a correlation is sum_uv kernel[u, v] S[u, v] / (H W), S[u, v] the sum of
    the map over the rows and columns tap (u, v) ever reads: S = R g C^T with the 0/1 window matrices of
    ``_window_rows``. Equal in exact arithmetic; O(H W (H + W)) per map instead of O(H^2 W^2).
    """
    kernel = published_kernel(g, **kernel_options)
    H, W = g.shape[-2:]
    rows, cols = _window_rows(H, g.device, g.dtype), _window_rows(W, g.device, g.dtype)
    reads = rows @ g @ cols.T  # (M, h, w)
    return (kernel * reads).sum(dim=(1, 2)) / (H * W)
