"""paper_metrics.py (the CF-CAM authors' protocol) and the metrics options it uses, on hand-computed cases
and against per-image loops written from the authors' description."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity
from torch import nn

from cfcam_gpu import CAMResult, cfcam_from_features, gradcam_from_features
from cfcam_gpu import metrics as M
from cfcam_gpu import paper_metrics as P

S, R = 20, 5  # image size; the toy model reads the top-left R x R region


class RegionNet(nn.Module):
    """logits = (mean of x over the 3 x R x R top-left region + bias per colour, 0)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -0.5, 2.0]))

    def forward(self, x):
        s = (x[:, :, :R, :R].mean(dim=(2, 3)) * self.w).sum(dim=1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


@pytest.fixture
def toy():
    return RegionNet().eval()


def test_input_maps_upsample_then_divide_by_the_max():
    cams = torch.rand(3, 4, 5) * torch.tensor([1.0, 0.3, 0.0])[:, None, None]
    got = P.input_maps(cams, (16, 20))
    up = F.interpolate(cams[:, None], size=(16, 20), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(got[:2], up[:2] / up[:2].amax(dim=(1, 2), keepdim=True))
    assert (got[2] == 0).all() and (got[:2].amax(dim=(1, 2)) == 1).all()


def test_paper_average_drop_is_unclipped(toy):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(0))
    cams = torch.zeros(2, S, S)
    cams[0, :R, :R] = 0.4  # becomes 1 after input_maps: region kept
    cams[1, R:, R:] = 0.2  # region blacked out
    r = P.paper_average_drop(toy, x, cams, 0, mean=mean, std=std)
    with torch.no_grad():
        p = toy(x).softmax(1)[:, 0]
        black = x.clone()
        black[1, :, :R, :R] = -2.0
        p_exp = toy(black).softmax(1)[:, 0]
    torch.testing.assert_close(r.p_explanation, p_exp)
    torch.testing.assert_close(r.drop, (p - p_exp) / p * 100)
    torch.testing.assert_close(r.drop_clipped, ((p - p_exp) / p * 100).clamp_min(0))


def test_paper_average_increase(toy):
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(1))
    cams = torch.zeros(2, S, S)
    cams[0, :2, :2] = 1.0  # 4 pixels of the region pasted
    cams[1, :, :] = 0.25  # a constant map is 1 everywhere after input_maps: everything pasted
    r = P.paper_average_increase(toy, x, cams, 0)
    fill = torch.tensor(P.IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, S, S)
    pasted = fill.expand(2, 3, S, S).clone()
    pasted[0, :, :2, :2] = x[0, :, :2, :2]
    pasted[1] = x[1]
    with torch.no_grad():
        p_in = toy(pasted).softmax(1)[:, 0]
        p_c = toy(fill).softmax(1)[:, 0].expand(2)
    torch.testing.assert_close(r.p_inserted, p_in)
    torch.testing.assert_close(r.increase, p_in - p_c)


def _authors_deletion_insertion(model, x, cam):
    """One image, the authors' loop as described: ranks by the map (descending, no ties here), k * (N //
    100) pixels at step k < 100, all at step 100, towards / from zeros; numpy's trapezoid on [0, 1]."""
    N = cam.numel()
    order = torch.argsort(cam.flatten(), descending=True)
    step = N // 100
    dels, ins = [], []
    for k in range(101):
        n = N if k == 100 else k * step
        mask = torch.ones(N)
        mask[order[:n]] = 0
        mask = mask.view(1, 1, *cam.shape)
        with torch.no_grad():
            dels.append(float(model(x * mask).softmax(1)[0, 0]))
            ins.append(float(model(x * (1 - mask)).softmax(1)[0, 0]))
    grid = np.linspace(0, 1, 101)
    return np.trapezoid(dels, grid), np.trapezoid(ins, grid)


def test_paper_deletion_insertion_equals_the_authors_loop(toy):
    x = torch.randn(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    cams = torch.rand(2, S, S, generator=torch.Generator().manual_seed(3))  # distinct values: no ties
    r = P.paper_deletion_insertion(toy, x, cams, 0, batch_size=50)
    for b in range(2):
        d, i = _authors_deletion_insertion(toy, x[b:b + 1], P.input_maps(cams[b:b + 1], (S, S))[0])
        assert abs(float(r.deletion_auc[b]) - d) < 1e-6 and abs(float(r.insertion_auc[b]) - i) < 1e-6
    assert r.deletion_curve.shape == (2, 101)


def test_pixels_per_step_counts(toy):
    """pixels_per_step p: k p pixels, all of them at the last step (400 pixels: p = 3 leaves 103 for it)."""
    x = torch.ones(1, 3, S, S)
    cam = torch.zeros(1, S, S)
    cam[0, :R, :R] = torch.arange(1.0, R * R + 1).view(R, R)  # the region first
    r = M.deletion_insertion(toy, x, cam, 0, steps=10, pixels_per_step=3, curves=("deletion",))
    removed = torch.tensor([min(3 * k, R * R) for k in range(10)] + [R * R], dtype=torch.float32)
    s = (1 - removed / (R * R)) * 2.5  # region mean times sum of the weights
    torch.testing.assert_close(r.deletion_curve[0], torch.sigmoid(s))
    with pytest.raises(ValueError, match="pixels_per_step"):
        M.deletion_insertion(toy, x, cam, 0, pixels_per_step=-1)


def test_ssim_uniform_window_equals_skimage_default():
    rng = np.random.default_rng(5)
    x = rng.random((3, 16, 22))
    y = np.clip(x + rng.normal(0, 0.2, x.shape), 0, 1)
    got = M.ssim(torch.from_numpy(x), torch.from_numpy(y), window="uniform").numpy()
    ref = [structural_similarity(x[b], y[b], data_range=1.0) for b in range(3)]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="window"):
        M.ssim(torch.from_numpy(x), torch.from_numpy(y), window="box")


def test_robustness_absolute_noise():
    """relative=False: the noise's standard deviation is the level itself."""
    grads = torch.randn(4, 1, 32, 32, dtype=torch.float64) * 1e-3
    ident = lambda a, g: CAMResult(cams=g[:, 0], weights=g.mean(dim=(2, 3)))  # noqa: E731
    out = M.robustness(ident, torch.ones_like(grads), grads, [0.5], torch.Generator().manual_seed(0),
                       relative=False)
    assert abs(float(out[0.5].mse.mean()) / 0.25 - 1) < 0.05


def test_paper_robustness_noise_reaches_every_method(lite0_features):
    """Noise before the weights: Grad-CAM degrades at level 1 (gradients ~1e-4); the published CF-CAM,
    whose softmax weights are all but uniform, moves too, only far less."""
    acts, grads = lite0_features["blocks.-1"][0][:2], lite0_features["blocks.-1"][1][:2]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    grad_r = P.paper_robustness(gradcam_from_features, acts, grads, (56, 56), levels=[1.0], generator=gen())
    paper_fn = lambda a, g: cfcam_from_features(a, g, variant="paper")  # noqa: E731
    paper_r = P.paper_robustness(paper_fn, acts, grads, (56, 56), levels=[1.0], generator=gen())
    assert (paper_r[1.0].mse > 0).all() and (grad_r[1.0].mse > 10 * paper_r[1.0].mse).all()
    assert math.isfinite(float(paper_r[1.0].ssim.mean()))
