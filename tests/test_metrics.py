"""metrics.py on hand-computed cases: a toy model whose logit depends only on one image region, known curves,
SSIM against scikit-image, the noise model of ``robustness``."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import nn

from cfcam_gpu import CAMResult, gradcam_from_features
from cfcam_gpu import metrics as M

from helpers import make_features

S = 32  # image size
R = 8  # the region: rows 0:8, columns 0:8 (64 of 1024 pixels)


class RegionNet(nn.Module):
    """logits = (k * mean of x over the 3 x 8 x 8 top-left region, 0): p(class 0) = sigmoid(k * mean)."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k = k
        self.scale = nn.Parameter(torch.ones(()))  # so the model has a parameter (and a device)

    def forward(self, x):
        s = self.k * self.scale * x[:, :, :R, :R].mean(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def sig(v):
    return 1 / (1 + math.exp(-v))


@pytest.fixture
def toy():
    return RegionNet().eval()


def region_map(inside: float, outside: float, B: int = 1) -> torch.Tensor:
    cam = torch.full((B, S, S), float(outside))
    cam[:, :R, :R] = inside
    return cam


def images_of(value: float, B: int = 1) -> torch.Tensor:
    return torch.full((B, 3, S, S), value)


# ----------------------------------------------------------------------------------------------------
# Average drop / increase.

def test_average_drop_soft_perfect_useless_partial(toy):
    x = images_of(2.0, 3)  # p = sigmoid(2)
    cams = torch.cat([region_map(1, 0), region_map(0, 1), region_map(0.5, 1)])
    r = M.average_drop_increase(toy, x, cams, 0, mode="soft")
    p = sig(2)
    torch.testing.assert_close(r.p, torch.full((3,), p))
    torch.testing.assert_close(r.p_explanation, torch.tensor([p, 0.5, sig(1)]))
    torch.testing.assert_close(r.drop, torch.tensor([0.0, (p - 0.5) / p * 100, (p - sig(1)) / p * 100]))
    assert r.increase.tolist() == [False, False, False]


def test_increase_in_confidence(toy):
    x = images_of(-1.0)  # p = sigmoid(-1); halving the region's values raises it
    r = M.average_drop_increase(toy, x, region_map(0.5, 0), torch.tensor([0]), mode="soft")
    assert r.increase.tolist() == [True] and r.drop.tolist() == [0.0]
    torch.testing.assert_close(r.p_explanation, torch.tensor([sig(-0.5)]))


def test_average_drop_threshold_zeroes_pixels_in_pixel_space(toy):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # a black pixel is (0 - 0.5) / 0.25 = -2 here
    x = images_of(2.0, 3)
    cams = torch.cat([region_map(0.9, 0.2), region_map(0.2, 0.9), region_map(0.5, 0.5)])  # 0.5: not > 0.5
    r = M.average_drop_increase(toy, x, cams, 0, mode="threshold", mean=mean, std=std)
    p = sig(2)
    torch.testing.assert_close(r.p_explanation, torch.tensor([p, sig(-2), sig(-2)]))
    torch.testing.assert_close(r.drop, torch.tensor([0.0, (p - sig(-2)) / p * 100, (p - sig(-2)) / p * 100]))
    with pytest.raises(ValueError, match="mean/std"):
        M.average_drop_increase(toy, x, cams, 0, mode="threshold")
    with pytest.raises(ValueError, match="mode"):
        M.average_drop_increase(toy, x, cams, 0, mode="hard")


def test_low_resolution_cams_are_upsampled_bilinearly(toy):
    x = torch.randn(2, 3, S, S)
    cams = torch.rand(2, 4, 4)
    r = M.average_drop_increase(toy, x, cams, 0)
    up = torch.nn.functional.interpolate(cams[:, None], size=(S, S), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = toy(x * up).softmax(1)[:, 0]
    torch.testing.assert_close(r.p_explanation, expected)


# ----------------------------------------------------------------------------------------------------
# Deletion / insertion.

def test_auc_of_known_curves():
    torch.testing.assert_close(M.auc(torch.linspace(0, 1, 11)), torch.tensor(0.5))
    torch.testing.assert_close(M.auc(torch.full((2, 5), 0.3)), torch.full((2,), 0.3))
    x = np.linspace(0, 1, 101)
    got = float(M.auc(torch.from_numpy(x**2)))
    assert abs(got - (1 / 3 + 0.01**2 / 6)) < 1e-12  # the trapezoid rule's error for x^2
    assert abs(got - np.trapezoid(x**2, x)) < 1e-12
    curve = torch.tensor([0.9, 0.4, 0.1, 0.0])
    torch.testing.assert_close(M.auc(curve), (curve.sum() - 0.45) / 3)  # RISE's formula


def test_deletion_insertion_perfect_and_useless(toy):
    x = images_of(2.0, 2)
    cams = torch.cat([region_map(1, 0), region_map(0, 1)])
    p, steps = sig(2), 16  # 64 pixels per step: the region is one step
    r = M.deletion_insertion(toy, x, cams, 0, steps=steps, baseline="zero", batch_size=5)
    dele = torch.tensor([[p] + [0.5] * 16, [p] * 16 + [0.5]])
    ins = torch.tensor([[0.5] + [p] * 16, [0.5] * 16 + [p]])
    torch.testing.assert_close(r.deletion_curve, dele)
    torch.testing.assert_close(r.insertion_curve, ins)
    torch.testing.assert_close(r.deletion_auc, torch.tensor([(p + 16 * 0.5 - p / 2 - 0.25) / 16,
                                                             (16 * p + 0.5 - p / 2 - 0.25) / 16]))
    torch.testing.assert_close(r.insertion_auc, torch.tensor([(0.25 + 16 * p - p / 2) / 16,
                                                              (16 * 0.5 + p - 0.25 - p / 2) / 16]))
    assert r.deletion_auc[0] < r.deletion_auc[1] and r.insertion_auc[0] > r.insertion_auc[1]


def test_deletion_half_region_and_ties_by_position(toy):
    x = images_of(2.0)
    r = M.deletion_insertion(toy, x, region_map(1, 0), 0, steps=32, curves=("deletion",))
    # step 1 deletes 32 pixels: the first 4 rows of the region (ties ranked by position); mean halves
    torch.testing.assert_close(r.deletion_curve[0, :3], torch.tensor([sig(2), sig(1), 0.5]))
    assert r.insertion_curve is None and r.insertion_auc is None


def test_blur_baseline_and_batching(toy):
    x = images_of(2.0)
    r = M.deletion_insertion(toy, x, region_map(1, 0), 0, steps=4, baseline="blur")
    torch.testing.assert_close(r.deletion_curve, torch.full((1, 5), sig(2)))  # blur of a constant image
    torch.manual_seed(0)
    x = torch.randn(3, 3, S, S)
    cams = torch.rand(3, 5, 5)
    a = M.deletion_insertion(toy, x, cams, [0, 1, 0], steps=7, baseline="blur", batch_size=4)
    b = M.deletion_insertion(toy, x, cams, [0, 1, 0], steps=7, baseline="blur", batch_size=100)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)
    assert a.deletion_curve.shape == (3, 8)
    # the end points: the image itself and the baseline
    p = torch.softmax(toy(x), 1)[torch.arange(3), torch.tensor([0, 1, 0])].detach()
    torch.testing.assert_close(a.deletion_curve[:, 0], p)
    torch.testing.assert_close(a.insertion_curve[:, -1], p)


def test_gaussian_blur_is_normalised_and_smooths():
    x = torch.randn(2, 3, 20, 20)
    y = M.gaussian_blur(x)
    assert y.shape == x.shape and y.std() < x.std()
    torch.testing.assert_close(M.gaussian_blur(torch.full((1, 3, 20, 20), 0.7)), torch.full((1, 3, 20, 20), 0.7))


def test_metrics_restore_train_mode_and_validate(toy):
    toy.train()
    toy.frozen = nn.BatchNorm2d(3).eval()  # a submodule with its own mode
    M.deletion_insertion(toy, images_of(1.0), region_map(1, 0), 0, steps=2)
    M.average_drop_increase(toy, images_of(1.0), region_map(1, 0), 0)
    assert toy.training and not toy.frozen.training
    with pytest.raises(ValueError, match="cams"):
        M.deletion_insertion(toy, images_of(1.0, 2), region_map(1, 0), 0)
    with pytest.raises(ValueError, match="steps"):
        M.deletion_insertion(toy, images_of(1.0), region_map(1, 0), 0, steps=0)
    with pytest.raises(ValueError, match="baseline"):
        M.deletion_insertion(toy, images_of(1.0), region_map(1, 0), 0, baseline="noise")
    with pytest.raises(ValueError, match="targets"):
        M.average_drop_increase(toy, images_of(1.0, 2), region_map(1, 0, 2), [0, 1, 0])


# ----------------------------------------------------------------------------------------------------
# SSIM and robustness.

def _blobs(rng, B, H, W):
    yy, xx = np.mgrid[0:H, 0:W]
    maps = []
    for _ in range(B):
        cy, cx, s = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(2, 8)
        maps.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s)))
    return np.stack(maps)


@pytest.mark.parametrize("sigma,dtype", [(1.5, np.float32), (1.0, np.float64), (2.0, np.float32)])
def test_ssim_matches_skimage(sigma, dtype):
    rng = np.random.default_rng(int(sigma * 10))
    x = np.concatenate([rng.random((2, 24, 30)), _blobs(rng, 2, 24, 30)]).astype(dtype)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(dtype)
    y[3] = _blobs(rng, 1, 24, 30)[0]
    got = M.ssim(torch.from_numpy(x), torch.from_numpy(y), sigma=sigma).numpy()
    ref = [structural_similarity(x[b], y[b], gaussian_weights=True, sigma=sigma, use_sample_covariance=False,
                                 data_range=1.0) for b in range(4)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-10)


def test_ssim_edge_cases():
    x = torch.rand(2, 16, 16)
    torch.testing.assert_close(M.ssim(x, x), torch.ones(2, dtype=torch.float64))
    zeros = torch.zeros(1, 12, 12)
    assert float(M.ssim(zeros, zeros)) == 1.0
    with pytest.raises(ValueError, match="window"):
        M.ssim(torch.rand(1, 7, 7), torch.rand(1, 7, 7))
    with pytest.raises(ValueError, match="shape"):
        M.ssim(torch.rand(1, 12, 12), torch.rand(1, 12, 13))


def _identity_cam(acts, grads):
    """The 'CAM' is the first gradient channel itself: robustness then measures the noise directly."""
    return CAMResult(cams=grads[:, 0], weights=grads.mean(dim=(2, 3)))


def test_robustness_noise_is_sigma_times_the_gradients_std():
    torch.manual_seed(0)
    B = 8
    scale = torch.logspace(-4, 0, B, dtype=torch.float64)[:, None, None, None]
    grads = torch.randn(B, 1, 32, 32, dtype=torch.float64) * scale
    acts = torch.ones_like(grads)
    g = torch.Generator().manual_seed(1)
    out = M.robustness(_identity_cam, acts, grads, [0.0, 0.5], g)
    assert list(out) == [0.0, 0.5]
    assert (out[0.0].mse == 0).all() and torch.allclose(out[0.0].ssim, torch.ones(B, dtype=torch.float64))
    ratio = out[0.5].mse / (0.5 * grads.flatten(1).std(dim=1)) ** 2
    assert abs(float(ratio.mean()) - 1) < 0.1 and float((ratio - 1).abs().max()) < 0.35


def test_robustness_reproducible_and_monotone_on_gradcam():
    acts, grads = make_features(np.random.default_rng(0), 4, 32, 7, 7)
    a, gr = torch.from_numpy(acts), torch.from_numpy(grads)
    run = lambda seed: M.robustness(gradcam_from_features, a, gr, [0.1, 1.0, 5.0],  # noqa: E731
                                    torch.Generator().manual_seed(seed), size=(28, 28))
    r1, r2, r3 = run(0), run(0), run(1)
    torch.testing.assert_close(r1[1.0].ssim, r2[1.0].ssim)
    assert not torch.equal(r1[1.0].mse, r3[1.0].mse)
    ssim_means = [float(r1[s].ssim.mean()) for s in (0.1, 1.0, 5.0)]
    mse_means = [float(r1[s].mse.mean()) for s in (0.1, 1.0, 5.0)]
    assert ssim_means[0] > ssim_means[1] > ssim_means[2] and mse_means[0] < mse_means[1] < mse_means[2]
    assert r1[0.1].ssim.shape == (4,) and (r1[0.1].ssim <= 1 + 1e-9).all()
    with pytest.raises(ValueError, match="window"):  # 7 x 7 maps without size=
        M.robustness(gradcam_from_features, a, gr, [0.1])


def test_mean_ci_is_student_t():
    v = [1.0, 2.0, 4.0, 7.0]
    m, lo, hi = M.mean_ci(v)
    ref = stats.t.interval(0.95, 3, loc=np.mean(v), scale=stats.sem(v))
    assert m == 3.5 and abs(lo - ref[0]) < 1e-12 and abs(hi - ref[1]) < 1e-12
    assert M.mean_ci([2.0]) == (2.0, 2.0, 2.0)
    assert all(math.isnan(u) for u in M.mean_ci([]))
    assert M.mean_ci([1.0, float("nan"), 3.0])[0] == 2.0


def test_numpy_maps_equal_tensor_maps():
    """Maps from cfcam_gpu.compat (NumPy) are accepted as they are."""
    import numpy as np

    from cfcam_gpu.metrics import average_drop_increase

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    x = torch.rand(2, 3, 8, 8)
    cams = torch.rand(2, 4, 4)
    a = average_drop_increase(net, x, cams, [0, 2])
    b = average_drop_increase(net, x, cams.numpy().astype(np.float32), [0, 2])
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v)


def test_mean_ci_bootstrap_stays_in_the_values_range_and_is_seeded():
    rng = np.random.default_rng(3)
    v = np.r_[np.zeros(9), 100.0]  # a 0/100 quantity: the t interval goes below 0
    assert M.mean_ci(v)[1] < 0
    m, lo, hi = M.mean_ci(v, method="bootstrap")
    assert m == 10.0 and 0.0 <= lo <= m <= hi <= 100.0
    assert M.mean_ci(v, method="bootstrap") == (m, lo, hi)  # seeded
    # the percentile rule against a direct NumPy resampling with the same generator
    x = rng.random(37)
    idx = np.random.default_rng(5).integers(0, 37, size=(500, 37))
    expected = np.quantile(x[idx].mean(axis=1), [0.025, 0.975])
    _, lo, hi = M.mean_ci(x, method="bootstrap", resamples=500, seed=5)
    assert (lo, hi) == pytest.approx(tuple(expected), abs=1e-12)
    assert M.mean_ci([2.0], method="bootstrap") == (2.0, 2.0, 2.0)
    with pytest.raises(ValueError, match="method"):
        M.mean_ci(v, method="normal")
