"""The eigen family, batched: principal-component maps of the target layer's features.

    EigenCAM      eigencam_from_features      first principal component of the activations
    EigenGradCAM  eigengradcam_from_features  first principal component of gradients x activations
    KPCACAM       kpcacam_from_features       first kernel principal component of the activations

As pytorch-grad-cam 1.5.7 (``get_2d_projection``, ``get_2d_projection_kernel``): per image, the features
are read as h*w samples of C variables, centred over the pixels (each channel minus its spatial mean),
and projected on their first (kernel) principal component; the map is that projection, then ReLU and
division by the maximum (``cam.weighted_cam``'s normalisation; the projection has mean 0, so its
minimum after the ReLU is 0 and pytorch-grad-cam's min-max scaling gives the same map).

Sign: a principal component is defined up to its sign (NumPy's SVD returns either). Ours is fixed: the
projection p is oriented so that it correlates non-negatively with the channel-mean map of the
features, sum_ij p_ij * mean_c X_cij >= 0 (a tie keeps the solver's sign). For the linear PCA this
is the same as the component's channel loadings v summing to a positive number (<p, mean_c X> =
sigma_1^2 sum_c v_c / C), so bright, broadly active regions come out positive.

All images are solved at once: the smaller of the (B, h*w, h*w) Gram and the (B, C, C) covariance
matrix is formed in float64 and its top eigenvector found by ``top_eigenpair``: with host reads allowed
(the CPU default) by ``torch.linalg.eigh``; on the sync-free path (accelerators by default: ``eigh``
synchronises CUDA with the host) by repeated squaring of the trace-normalised matrix (``SQUARINGS``
matrix products, then ``REFINE`` power steps), static shapes and no host read.
Shapes: B images, C channels, h x w feature map, N = h*w pixels, M = min(N, C).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .._checks import check_ndim, check_floating, decide_sync_free, validate_features
from ..cam import CAMResult
from ..engine import CAMEngine

SQUARINGS = 24  # (lambda_2 / lambda_1) ** (2 ** 24): eigenvalue gaps down to ~1e-6 relative are resolved
REFINE = 3
KERNELS = ("sigmoid", "rbf", "poly", "linear", "cosine")


def relu_max(maps: Tensor, with_peak: bool = False):
    """relu(maps) divided by its per-image max where that is > 0: (B, h, w) -> (B, h, w) float32 in [0, 1];
    with ``with_peak`` also the (B,) maxima before the division (``CAMResult.peak``)."""
    maps = maps.float().clamp_min(0)
    peak = maps.amax(dim=(1, 2), keepdim=True)
    out = maps / torch.where(peak > 0, peak, torch.ones_like(peak))
    return (out, peak[:, 0, 0]) if with_peak else out


def minmax(maps: Tensor, eps: float = 0.0) -> Tensor:
    """(m - min) / (max - min + eps) over the last two dims; a constant map gives 0. (..., h, w)."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    span = maps.amax(dim=(-2, -1), keepdim=True) - lo + eps
    return (maps - lo) / torch.where(span > 0, span, torch.ones_like(span))


def top_eigenpair(S: Tensor, sync_free: bool, psd: bool = True, squarings: int = SQUARINGS,
                  refine: int = REFINE) -> tuple[Tensor, Tensor]:
    """The algebraically largest eigenvalue and a unit eigenvector of each symmetric matrix.

    S: (B, M, M) -> values (B,), vectors (B, M). ``sync_free=False``: ``torch.linalg.eigh``. True:
    repeated squaring T <- (T / trace T)^2 of S (``psd``) or of S + r I, r = max absolute row sum >= the
    spectral radius (indefinite S: the shift makes it PSD and keeps the order of the eigenvalues); the
    column of T with the largest diagonal is the eigenvector, polished by ``refine`` power steps. An
    all-zero matrix gives the zero vector and value 0.
    """
    if not sync_free:
        values, vectors = torch.linalg.eigh(S)
        return values[:, -1], vectors[:, :, -1]
    tiny = torch.finfo(S.dtype).tiny
    P = S
    if not psd:
        shift = S.abs().sum(dim=2).amax(dim=1)  # (B,)
        P = S + shift[:, None, None] * torch.eye(S.shape[1], dtype=S.dtype, device=S.device)
    T = P
    for _ in range(squarings):
        T = T / T.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(tiny)[:, None, None]
        T = T @ T
    j = T.diagonal(dim1=1, dim2=2).argmax(dim=1)  # (B,)
    u = T.gather(2, j[:, None, None].expand(-1, T.shape[1], 1))[..., 0]  # (B, M)
    for _ in range(1 + refine):
        u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
        u = (P @ u[..., None])[..., 0]
    u = u / u.norm(dim=1, keepdim=True).clamp_min(tiny)
    return (u * (S @ u[..., None])[..., 0]).sum(dim=1), u


def _samples(x: Tensor) -> tuple[Tensor, Tensor]:
    """(B, C, h, w) -> centred samples (B, N, C) float64 (NaN read as 0, as pytorch-grad-cam) and the
    channel-mean map (B, N) that orients the component."""
    X = x.flatten(2).transpose(1, 2).double()
    X = torch.where(torch.isnan(X), torch.zeros_like(X), X)
    return X - X.mean(dim=1, keepdim=True), X.mean(dim=2)


def _orient(p: Tensor, reference: Tensor) -> Tensor:
    """The sign rule: p (B, N) flipped where it correlates negatively with reference (B, N) -> (B,) of +-1."""
    return torch.where((p * reference).sum(dim=1) < 0, -1.0, 1.0).to(p.dtype)


def pca_projection(x: Tensor, sync_free: bool | None = None) -> tuple[Tensor, Tensor]:
    """First principal component of each image's features, oriented by the sign rule.

    x: (B, C, h, w) -> projection (B, h, w) (mean 0; pytorch-grad-cam's ``get_2d_projection`` up to the
    sign) and the component's unit channel loadings v (B, C), projection = centred features @ v;
    both in x's floating dtype (float32 for half precision).
    """
    check_ndim(x, 4, "x", "(B, C, h, w)")
    check_floating(x, "x")
    sync_free = decide_sync_free(sync_free, x)
    B, C, h, w = x.shape
    Xc, mean_map = _samples(x)
    tiny = torch.finfo(Xc.dtype).tiny
    if h * w <= C:  # the Gram matrix of the pixels is the smaller one
        _, u = top_eigenpair(Xc @ Xc.transpose(1, 2), sync_free)
        v = (Xc.transpose(1, 2) @ u[..., None])[..., 0]
        v = v / v.norm(dim=1, keepdim=True).clamp_min(tiny)
    else:
        _, v = top_eigenpair(Xc.transpose(1, 2) @ Xc, sync_free)
    p = (Xc @ v[..., None])[..., 0]  # (B, N)
    sign = _orient(p, mean_map)[:, None]
    dtype = x.dtype if x.dtype == torch.float64 else torch.float32
    return (p * sign).to(dtype).reshape(B, h, w), (v * sign).to(dtype)


def _kernel(Xc: Tensor, kernel: str, gamma: float, degree: int, coef0: float) -> Tensor:
    """scikit-learn's pairwise kernels between the rows of Xc (B, N, C) -> (B, N, N)."""
    if kernel == "rbf":
        return torch.exp(-gamma * torch.cdist(Xc, Xc).square())
    dot = Xc @ Xc.transpose(1, 2)
    if kernel == "linear":
        return dot
    if kernel == "cosine":
        norm = Xc.norm(dim=2).clamp_min(torch.finfo(Xc.dtype).tiny)
        return dot / (norm[:, :, None] * norm[:, None, :])
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    return torch.tanh(gamma * dot + coef0)


def kernel_pca_projection(x: Tensor, kernel: str = "sigmoid", gamma: float | None = None, degree: int = 3,
                          coef0: float = 1.0, sync_free: bool | None = None) -> Tensor:
    """First kernel principal component of each image's centred features, oriented by the sign rule.

    As ``KernelPCA(n_components=1, kernel, gamma, degree, coef0).fit_transform`` (scikit-learn's defaults:
    gamma = 1 / C, degree 3, coef0 1) on the (N, C) samples centred over the pixels: the kernel matrix
    (B, N, N) is double-centred, its largest eigenvalue lambda and unit eigenvector a give the projection
    a * sqrt(lambda) (0 where lambda <= 0; scikit-learn raises there). Cost O(N^3) per image.
    x: (B, C, h, w) -> (B, h, w) in x's floating dtype (float32 for half precision).
    """
    check_ndim(x, 4, "x", "(B, C, h, w)")
    check_floating(x, "x")
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    sync_free = decide_sync_free(sync_free, x)
    B, C, h, w = x.shape
    Xc, mean_map = _samples(x)
    K = _kernel(Xc, kernel, 1.0 / C if gamma is None else float(gamma), degree, coef0)
    K = K - K.mean(dim=1, keepdim=True) - K.mean(dim=2, keepdim=True) + K.mean(dim=(1, 2), keepdim=True)
    K = (K + K.transpose(1, 2)) / 2
    value, a = top_eigenpair(K, sync_free, psd=False)
    p = a * value.clamp_min(0).sqrt()[:, None]
    p = p * _orient(p, mean_map)[:, None]
    return p.to(x.dtype if x.dtype == torch.float64 else torch.float32).reshape(B, h, w)


def eigencam_from_features(activations: Tensor, gradients: Tensor | None = None, check_values: bool = True,
                           *, sync_free: bool | None = None) -> CAMResult:
    """EigenCAM (Muhammad & Yeasin 2020): the activations' first principal component; gradient-free.

    activations: (B, C, h, w); gradients: ignored (may be None) -> CAMResult with cams (B, h, w) and
    weights (B, C) = the component's channel loadings v (sign rule applied).
    """
    validate_features(activations, activations if gradients is None else gradients, check_values)
    projection, v = pca_projection(activations, sync_free)
    cams, peak = relu_max(projection, with_peak=True)
    return CAMResult(cams=cams, weights=v.float(), peak=peak)


def eigengradcam_from_features(activations: Tensor, gradients: Tensor, check_values: bool = True,
                               *, sync_free: bool | None = None) -> CAMResult:
    """EigenGradCAM: the first principal component of gradients x activations (element-wise).

    activations, gradients: (B, C, h, w) -> CAMResult with cams (B, h, w), weights (B, C) = loadings v.
    """
    validate_features(activations, gradients, check_values)
    projection, v = pca_projection(gradients * activations, sync_free)
    cams, peak = relu_max(projection, with_peak=True)
    return CAMResult(cams=cams, weights=v.float(), peak=peak)


def kpcacam_from_features(activations: Tensor, gradients: Tensor | None = None, check_values: bool = True,
                          *, kernel: str = "sigmoid", gamma: float | None = None, degree: int = 3,
                          coef0: float = 1.0, sync_free: bool | None = None) -> CAMResult:
    """KPCA-CAM (Karmani et al. 2024): the activations' first kernel principal component; gradient-free.

    activations: (B, C, h, w); gradients ignored -> CAMResult with cams (B, h, w) and weights (B, C) =
    the spatial mean of the activations (informational: a kernel component has no channel loadings).
    """
    validate_features(activations, activations if gradients is None else gradients, check_values)
    projection = kernel_pca_projection(activations, kernel, gamma, degree, coef0, sync_free)
    cams, peak = relu_max(projection, with_peak=True)
    return CAMResult(cams=cams, weights=activations.float().mean(dim=(2, 3)), peak=peak)


class EigenEngine(CAMEngine):
    """The eigen methods are already a principal-component map: ``eigen_smooth`` changes nothing (as in
    pytorch-grad-cam). ``sync_free`` as ``pca_projection``."""

    def __init__(self, model: nn.Module, target_layer, sync_free: bool | None = None, **options):
        super().__init__(model, target_layer, **options)
        self.sync_free = sync_free

    def _smooth(self, result, activations, gradients, eigen_smooth):
        return result


class EigenCAM(EigenEngine):
    """EigenCAM with the batched engine (gradient-free: no backward pass)."""

    uses_gradients = False

    def _from_features(self, activations, gradients):
        return eigencam_from_features(activations, gradients, check_values=self.check_values,
                                      sync_free=self.sync_free)


class EigenGradCAM(EigenEngine):
    """EigenGradCAM with the batched engine."""

    def _from_features(self, activations, gradients):
        return eigengradcam_from_features(activations, gradients, check_values=self.check_values,
                                          sync_free=self.sync_free)


class KPCACAM(EigenEngine):
    """KPCA-CAM with the batched engine; ``kernel`` ("sigmoid", pytorch-grad-cam's default), ``gamma``
    (None: 1 / C), ``degree``, ``coef0`` as scikit-learn's ``KernelPCA``; gradient-free (no backward pass)."""

    uses_gradients = False

    def __init__(self, model: nn.Module, target_layer, kernel: str = "sigmoid", gamma: float | None = None,
                 degree: int = 3, coef0: float = 1.0, **options):
        super().__init__(model, target_layer, **options)
        if kernel not in KERNELS:
            raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
        self.kernel, self.gamma, self.degree, self.coef0 = kernel, gamma, degree, coef0

    def _from_features(self, activations, gradients):
        return kpcacam_from_features(activations, gradients, check_values=self.check_values, kernel=self.kernel,
                                     gamma=self.gamma, degree=self.degree, coef0=self.coef0,
                                     sync_free=self.sync_free)
