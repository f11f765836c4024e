"""filters.py: box and guided filters vs OpenCV (symmetric BORDER_REFLECT border)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cfcam_gpu import box_filter, guided_filter
from helpers import ximgproc

SIZES = [(7, 7), (14, 14), (28, 28), (8, 8), (5, 9), (9, 4), (1, 1), (1, 6), (2, 2)]
RADII = [0, 1, 2, 3, 10]


def _maps(rng, n, h, w, kind="normal"):
    if kind == "normal":
        x = rng.normal(size=(n, h, w))
    elif kind == "smooth":  # gradient-like: smooth plus noise, different offsets and scales
        yy, xx = np.mgrid[0:h, 0:w]
        x = np.stack([np.sin(xx / 2.0 + k) * np.cos(yy / 3.0) + 0.3 * rng.normal(size=(h, w))
                      for k in range(n)]) * rng.uniform(1e-3, 10, size=(n, 1, 1))
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


def _close_to_opencv(ours: np.ndarray, ref: np.ndarray, src: np.ndarray, rtol=5e-4):
    assert np.isfinite(ours).all()
    scale = max(float(np.abs(src).max()), float(np.abs(ref).max()), 1e-30)
    err = float(np.abs(ours - ref).max())
    assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"


# ----------------------------------------------------------------------------------------------------
# Box filter.

@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("radius", RADII)
def test_box_filter_vs_opencv_reflect(device, rng, h, w, radius):
    x = _maps(rng, 3, h, w)
    ours = box_filter(torch.from_numpy(x)[:, None].to(device), radius)[:, 0].cpu().numpy()
    assert ours.shape == x.shape
    k = 2 * radius + 1
    for i in range(3):
        ref = cv2.blur(x[i], (k, k), borderType=cv2.BORDER_REFLECT)
        ref2 = cv2.boxFilter(x[i], -1, (k, k), normalize=True, borderType=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(ours[i], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[i], ref2, rtol=1e-5, atol=1e-5)


def test_box_filter_border_is_reflect_not_reflect101(device):
    """A one-hot edge pixel: with BORDER_REFLECT the edge pixel is repeated (counts twice near the edge)."""
    x = torch.zeros(1, 1, 5, 5, dtype=torch.float64, device=device)
    x[0, 0, 0, 0] = 9.0
    out = box_filter(x, 1)[0, 0].cpu()
    # top-left output: window rows {-1,0,1} -> {0,0,1}, cols likewise: the pixel is counted 4 times
    assert out[0, 0].item() == pytest.approx(4.0)
    assert out[0, 1].item() == pytest.approx(2.0)
    assert out[1, 1].item() == pytest.approx(1.0)
    assert out[2, 2].item() == 0.0


def test_box_filter_multichannel_batched(device, rng):
    x = rng.normal(size=(2, 3, 6, 5)).astype(np.float64)
    ours = box_filter(torch.from_numpy(x).to(device), 2).cpu().numpy()
    for n in range(2):
        for c in range(3):
            np.testing.assert_allclose(ours[n, c], cv2.blur(x[n, c], (5, 5), borderType=cv2.BORDER_REFLECT),
                                       rtol=1e-12, atol=1e-12)


def test_box_filter_bad_input():
    with pytest.raises(ValueError, match="x"):
        box_filter(torch.zeros(5, 5), 1)


# ----------------------------------------------------------------------------------------------------
# Guided filter.

@pytest.mark.parametrize("h,w", SIZES)
@pytest.mark.parametrize("radius", RADII)
@pytest.mark.parametrize("self_guided", [True, False])
def test_guided_filter_vs_opencv(device, rng, h, w, radius, self_guided):
    n = 4
    guide = _maps(rng, n, h, w, "smooth")
    src = guide if self_guided else _maps(rng, n, h, w, "smooth")
    eps = [0.1 * float(np.var(g)) if h * w > 1 else 0.3 for g in guide]
    eps[1] = 1e-2
    eps[2] = 1.0
    if radius == 0 or h * w == 1:
        eps[3] = 0.5  # eps = 0 needs a non-degenerate window (see the dedicated tests)
    ours = guided_filter(torch.from_numpy(guide)[:, None].to(device), torch.from_numpy(src)[:, None].to(device),
                         radius, torch.tensor(eps, dtype=torch.float32, device=device))
    assert ours.shape == (n, 1, h, w)
    ours = ours[:, 0].cpu().numpy()
    for i in range(n):
        ref = ximgproc().guidedFilter(guide=guide[i], src=src[i], radius=radius, eps=eps[i])
        _close_to_opencv(ours[i], ref, src[i])


@pytest.mark.parametrize("h,w", [(7, 7), (14, 14), (28, 28), (6, 11), (12, 5)])
@pytest.mark.parametrize("radius", [1, 3, 10])
@pytest.mark.parametrize("self_guided", [True, False])
def test_guided_filter_eps_zero_non_constant(device, rng, h, w, radius, self_guided):
    guide = _maps(rng, 3, h, w, "normal")
    src = guide if self_guided else _maps(rng, 3, h, w, "normal")
    ours = guided_filter(torch.from_numpy(guide)[:, None].to(device), torch.from_numpy(src)[:, None].to(device),
                         radius, 0.0)[:, 0].cpu().numpy()
    for i in range(3):
        ref = ximgproc().guidedFilter(guide=guide[i], src=src[i], radius=radius, eps=0.0)
        assert np.isfinite(ref).all()
        _close_to_opencv(ours[i], ref, src[i])
    if self_guided:  # eps = 0, guide = src: a = 1, b = 0 everywhere, the filter is the identity
        np.testing.assert_allclose(ours, guide, rtol=1e-4, atol=1e-4 * np.abs(guide).max())


def test_guided_filter_large_radius_equals_global_when_reflected(device, rng):
    """r >= h is legal: 10 on 7x7 (the window covers several reflections), vs OpenCV and a float64 oracle."""
    g = _maps(rng, 1, 7, 7, "smooth")[0]
    eps = 0.1 * float(np.var(g))
    ours = guided_filter(torch.from_numpy(g)[None, None].to(device), torch.from_numpy(g)[None, None].to(device),
                         10, eps)[0, 0].cpu().numpy()
    _close_to_opencv(ours, ximgproc().guidedFilter(guide=g, src=g, radius=10, eps=eps), g)
    # float64 oracle straight from the definition with numpy's symmetric padding
    def box(a):
        p = np.pad(a, 10, mode="symmetric")
        k = 21
        c = np.cumsum(np.cumsum(np.pad(p, ((1, 0), (1, 0))), 0), 1)
        return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / k**2
    I = g.astype(np.float64)
    var = box(I * I) - box(I) ** 2
    a = var / (var + eps)
    b = box(I) - a * box(I)
    q = box(a) * I + box(b)
    np.testing.assert_allclose(ours, q, rtol=0, atol=1e-5 * np.abs(g).max())


@pytest.mark.parametrize("value", [0.3, -2.5, 0.0, 1e-20])
@pytest.mark.parametrize("radius", [0, 1, 3, 10])
def test_guided_filter_constant_map_eps_zero_returns_map(device, value, radius):
    c = np.full((7, 7), value, dtype=np.float32)
    ref = ximgproc().guidedFilter(guide=c, src=c, radius=radius, eps=0.0)
    if value != 0:
        assert np.isnan(ref).any()  # what the library defines away
    x = torch.from_numpy(c)[None, None].to(device)
    out = guided_filter(x, x, radius, 0.0)[0, 0].cpu().numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, c, rtol=1e-6, atol=0)


def test_guided_filter_radius_zero_eps_zero_returns_src(device, rng):
    """radius 0, eps 0: var = cov = 0 in every 1x1 window, a = 0, q = src (OpenCV: NaN)."""
    g = _maps(rng, 2, 7, 7)
    p = _maps(rng, 2, 7, 7)
    out = guided_filter(torch.from_numpy(g)[:, None].to(device), torch.from_numpy(p)[:, None].to(device),
                        0, 0.0)[:, 0].cpu().numpy()
    np.testing.assert_array_equal(out, p)


def test_guided_filter_constant_guide_eps_zero(device, rng):
    """A constant guide with eps = 0 and a different source: a = 0, q = box(box(src)), finite."""
    g = np.full((2, 9, 9), 0.3, dtype=np.float32)
    p = _maps(rng, 2, 9, 9)
    out = guided_filter(torch.from_numpy(g)[:, None].to(device), torch.from_numpy(p)[:, None].to(device),
                        2, 0.0)[:, 0].cpu().numpy()
    for i in range(2):
        expected = cv2.blur(cv2.blur(p[i], (5, 5), borderType=cv2.BORDER_REFLECT), (5, 5),
                            borderType=cv2.BORDER_REFLECT)
        np.testing.assert_allclose(out[i], expected, rtol=1e-5, atol=1e-5)


def test_guided_filter_per_map_eps_mixed_with_constant_maps(device, rng):
    """Per-map eps tensor: constant maps with eps 0 stay constant, others follow OpenCV with their own eps."""
    maps = _maps(rng, 5, 14, 14, "smooth")
    maps[1] = 0.7
    maps[3] = 0.0
    eps = np.array([0.1 * float(np.var(m.astype(np.float64))) for m in maps], dtype=np.float32)
    eps[1] = eps[3] = 0
    x = torch.from_numpy(maps)[:, None].to(device)
    out = guided_filter(x, x, 3, torch.from_numpy(eps).to(device))[:, 0].cpu().numpy()
    assert np.isfinite(out).all()
    for i in range(5):
        if eps[i] == 0:
            np.testing.assert_allclose(out[i], maps[i], rtol=1e-6, atol=0)
        else:
            _close_to_opencv(out[i], ximgproc().guidedFilter(guide=maps[i], src=maps[i], radius=3,
                                                               eps=float(eps[i])), maps[i])


def test_guided_filter_float64(device, rng):
    g = _maps(rng, 2, 14, 14, "smooth").astype(np.float64)
    out = guided_filter(torch.from_numpy(g)[:, None].to(device), torch.from_numpy(g)[:, None].to(device), 3, 0.05)
    assert out.dtype == torch.float64
    for i in range(2):
        ref = ximgproc().guidedFilter(guide=g[i].astype(np.float32), src=g[i].astype(np.float32), radius=3,
                                        eps=0.05)
        _close_to_opencv(out[i, 0].cpu().numpy(), ref, g[i])


def test_guided_filter_bad_inputs():
    x = torch.rand(2, 1, 5, 5)
    with pytest.raises(ValueError, match="guide"):
        guided_filter(torch.rand(5, 5), x, 1, 0.1)
    with pytest.raises(ValueError, match="src"):
        guided_filter(x, torch.rand(2, 1, 5, 6), 1, 0.1)
    with pytest.raises(ValueError, match="guide"):
        guided_filter(torch.rand(2, 3, 5, 5), torch.rand(2, 3, 5, 5), 1, 0.1)
    with pytest.raises(TypeError, match="guide"):
        guided_filter(x.long(), x, 1, 0.1)
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="radius"):
            guided_filter(x, x, bad, 0.1)
    with pytest.raises(ValueError, match="eps"):
        guided_filter(x, x, 1, torch.ones(3))


def _guided_float64(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """The definition in float64 with numpy's symmetric padding (= BORDER_REFLECT), no centring."""
    def box(a):
        p = np.pad(a, radius, mode="symmetric")
        k = 2 * radius + 1
        h, w = a.shape
        return sum(p[i:i + h, j:j + w] for i in range(k) for j in range(k)) / k**2
    I, p = guide.astype(np.float64), src.astype(np.float64)
    mean_i, mean_p = box(I), box(p)
    a = (box(I * p) - mean_i * mean_p) / (box(I * I) - mean_i**2 + eps)
    b = mean_p - a * mean_i
    return box(a) * I + box(b)


def test_guided_filter_guide_not_src_near_constant_window(device):
    """The reproducer: a nearly constant window near 0 in a guide far from its mean, eps far below the
    variance. Centring float32 maps on their global mean lost it (-0.6754, -0.1819)."""
    guide = np.array([[-2, -3, 0, -0.002]], dtype=np.float32)
    src = np.array([[1, -1, -1, 0]], dtype=np.float32)
    ours = guided_filter(torch.from_numpy(guide)[None, None].to(device), torch.from_numpy(src)[None, None].to(device),
                         1, 1e-10)[0, 0].cpu().numpy()
    truth = _guided_float64(guide, src, 1, 1e-10)
    ref = ximgproc().guidedFilter(guide=guide, src=src, radius=1, eps=1e-10)
    np.testing.assert_allclose(ours, truth, rtol=0, atol=1e-6)
    _close_to_opencv(ours, ref, src)
    np.testing.assert_allclose(ours[0, 2:], [-0.6905, -0.1668], atol=1e-4)


@pytest.mark.parametrize("kind", ["plateaus", "near_zero_plateau", "steps", "smooth_offset"])
def test_guided_filter_guide_not_src_vs_opencv_and_float64(device, rng, kind):
    """Random guide != src cases with near-constant windows and eps far below the variance: within 5e-4
    of the map's max of OpenCV wherever OpenCV is finite, and of the float64 definition."""
    n_cases = 0
    for case in range(24):
        h, w = [(7, 7), (14, 14), (1, 9), (5, 11), (28, 28), (4, 4)][case % 6]
        radius = [1, 2, 3, 10][case % 4]
        if kind == "plateaus":  # a few constant regions with tiny noise
            guide = np.repeat(rng.normal(size=(h, 1)), w, axis=1) + 1e-4 * rng.normal(size=(h, w))
        elif kind == "near_zero_plateau":  # large values and a near-constant patch near 0
            guide = rng.normal(scale=3, size=(h, w))
            guide[: max(1, h // 2), : max(1, w // 2)] = 1e-3 * rng.normal(size=(max(1, h // 2), max(1, w // 2)))
        elif kind == "steps":
            guide = np.where(rng.random((h, w)) < 0.5, -2.0, 0.0) + 1e-3 * rng.normal(size=(h, w))
        else:
            yy, xx = np.mgrid[0:h, 0:w]
            guide = 5 + np.sin(xx / 3.0) * np.cos(yy / 2.0) + 1e-3 * rng.normal(size=(h, w))
        guide = guide.astype(np.float32)
        src = rng.normal(size=(h, w)).astype(np.float32)
        eps = float(np.var(guide.astype(np.float64))) * [1e-10, 1e-6, 1e-3, 0.1][case % 4]
        ours = guided_filter(torch.from_numpy(guide)[None, None].to(device),
                             torch.from_numpy(src)[None, None].to(device), radius, eps)[0, 0].cpu().numpy()
        truth = _guided_float64(guide, src, radius, eps)
        ref = ximgproc().guidedFilter(guide=guide, src=src, radius=radius, eps=eps)
        _close_to_opencv(ours, truth, src, rtol=1e-5)
        if np.isfinite(ref).all() and np.abs(ref - truth).max() <= 5e-4 * np.abs(src).max():
            _close_to_opencv(ours, ref, src)
            n_cases += 1
    assert n_cases >= 18  # OpenCV (float32 var = box(I*I) - box(I)**2) is itself inexact in a few
