"""road.py: ROAD vs pytorch-grad-cam 1.5.7's ``metrics.road`` (SciPy's direct solve, one image at a
time) with the imputation noise switched off, the removal masks vs its NumPy percentile rule, batching,
the noise, and no host reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics import road as pgc_road
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from cfcam_gpu.road import PERCENTILES, linear_impute, removal_mask, road

from helpers import preprocess, refuse_host_reads

SIZE = 48


@pytest.fixture(scope="module")
def x2(photos):
    return torch.stack([preprocess(photos[n], size=SIZE) for n in ("chelsea", "coffee")])


@pytest.fixture(scope="module")
def cams():
    """Two smooth blobs at the input size, the second with a flat zero region (ties at the threshold)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, SIZE), torch.linspace(-1, 1, SIZE), indexing="ij")
    a = torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) * 3)
    b = (torch.exp(-((xx + 0.4) ** 2 + (yy - 0.3) ** 2) * 8) - 0.2).clamp_min(0)
    return torch.stack([a, b / b.max()])


@pytest.fixture
def no_noise(monkeypatch):
    """pytorch-grad-cam's imputer without its random noise (its ROAD classes build their own imputers)."""
    monkeypatch.setattr(pgc_road.NoisyLinearImputer.__init__, "__defaults__", (0.0, pgc_road.neighbors_weights))


@pytest.mark.parametrize("q", [10, 20, 50, 80, 90])
@pytest.mark.parametrize("most_relevant", [True, False])
def test_removal_mask_equals_numpy_percentile_rule(cams, q, most_relevant):
    ours = removal_mask(cams, q, most_relevant)
    for b in range(2):
        values = cams[b].numpy() if most_relevant else (1 - cams[b]).numpy()
        keep = values < np.percentile(values, q)
        assert np.array_equal(~ours[b].numpy(), keep)


@pytest.mark.parametrize("q", [10, 50, 90])
@pytest.mark.parametrize("most_relevant", [True, False])
def test_imputation_equals_direct_solve(x2, cams, q, most_relevant):
    remove = removal_mask(cams, q, most_relevant)
    imputer = pgc_road.NoisyLinearImputer(noise=0.0)
    ours = linear_impute(x2, remove)
    for b in range(2):
        ref = imputer(x2[b], (~remove[b]).float())
        assert (ours[b] - ref).abs().max() < 1e-4, (b, float((ours[b] - ref).abs().max()))
        assert torch.equal(ours[b][:, ~remove[b]], x2[b][:, ~remove[b]])  # kept pixels untouched


def cascade_impute(images: torch.Tensor, remove: torch.Tensor) -> torch.Tensor:
    """The solver ``linear_impute`` used before its multigrid preconditioner (the oracle of the test
    below): plain conjugate gradients, 3 x the larger side steps on each level of a coarse-to-fine
    cascade of 2 x 2 blocks (a block known where any of its pixels is, with their mean)."""
    import torch.nn.functional as F

    k = torch.full((1, 1, 3, 3), 1 / 6)
    k[..., ::2, ::2] = 1 / 12
    k[..., 1, 1] = 0.0

    def cg(img, m, x, steps):
        s = F.conv2d(torch.ones_like(m[:1]), k, padding=1)

        def op(v):
            return m * (s * v - F.conv2d(m * v, k, padding=1))

        x = m * x
        r = m * F.conv2d((1 - m) * img, k, padding=1) - op(x)
        p, rr = r, (r * r).sum(dim=(1, 2, 3), keepdim=True)
        floor = rr * (10 * torch.finfo(x.dtype).eps) ** 2
        for _ in range(steps):
            active = rr > floor
            q = op(p)
            pq = (p * q).sum(dim=(1, 2, 3), keepdim=True)
            alpha = torch.where(active & (pq > 0), rr / torch.where(pq > 0, pq, 1.0), 0.0)
            x, r = x + alpha * p, r - alpha * q
            rr_new = (r * r).sum(dim=(1, 2, 3), keepdim=True)
            p = r + torch.where(active & (rr > 0), rr_new / torch.where(rr > 0, rr, 1.0), 0.0) * p
            rr = torch.where(active, rr_new, rr)
        return x

    def cascade(img, m):
        if min(img.shape[-2:]) >= 8:
            known = F.avg_pool2d(1 - m, 2, ceil_mode=True)
            coarse = F.avg_pool2d(img * (1 - m), 2, ceil_mode=True) / known.clamp_min(1e-12)
            start = F.interpolate(cascade(coarse, (known == 0).float()), size=img.shape[-2:], mode="bilinear",
                                  align_corners=False)
        else:
            count = (1 - m).sum(dim=(2, 3), keepdim=True).clamp_min(1)
            start = ((img * (1 - m)).sum(dim=(2, 3), keepdim=True) / count).expand_as(img)
        return torch.where(m > 0, cg(img, m, start, 3 * max(img.shape[-2:])), img)

    B, C, H, W = images.shape
    m = remove.float()[:, None].repeat_interleave(C, dim=0)
    return cascade(images.reshape(B * C, 1, H, W), m).reshape(B, C, H, W)


@pytest.mark.parametrize("q", [10, 30, 70, 90])
def test_imputation_equals_the_previous_solver(x2, cams, q):
    """The multigrid-preconditioned solver against the plain conjugate-gradient cascade it replaced (and
    both against SciPy's direct solve above): MoRF and LeRF masks, both photos at once."""
    for most_relevant in (True, False):
        remove = removal_mask(cams, q, most_relevant)
        diff = (linear_impute(x2, remove) - cascade_impute(x2, remove)).abs().max()
        assert diff < 1e-4, (q, most_relevant, float(diff))


def test_imputation_at_96_is_close_to_the_direct_solve(photos):
    """90% of a 96 x 96 photo removed around a kept blob (LeRF at q = 10: the slowest case, far from the
    kept pixels): float32 within 2e-5 of SciPy's float64 direct solve (measured 9e-6; the cascade it
    replaced: 7.6e-5, its stencil's float32 weights summing to 1 + 3e-8 while their sum rounds to 1)."""
    x = preprocess(photos["astronaut"], size=96)[None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 96), torch.linspace(-1, 1, 96), indexing="ij")
    remove = removal_mask(torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) * 3)[None], 10, False)
    ref = pgc_road.NoisyLinearImputer(noise=0.0)(x[0], (~remove[0]).float())
    assert (linear_impute(x, remove)[0] - ref).abs().max() < 2e-5


def test_imputation_odd_sizes_float64_and_everything_removed(photos):
    """A 37 x 53 image (odd sides: ragged coarse grids) in float64 against SciPy's direct solve; with
    every pixel removed (nothing to impute from) the result is 0 and finite, as the previous solver's."""
    x = preprocess(photos["coffee"], size=53)[None, :, 8:45].double()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 37), torch.linspace(-1, 1, 53), indexing="ij")
    remove = (torch.sin(3 * xx) * torch.cos(2 * yy) > -0.2)[None]
    ref = pgc_road.NoisyLinearImputer(noise=0.0)(x[0].float(), (~remove[0]).float())
    assert (linear_impute(x, remove)[0].float() - ref).abs().max() < 1e-4
    everything = linear_impute(x.float(), torch.ones_like(remove))
    assert torch.equal(everything, torch.zeros_like(everything))


def test_road_matches_pytorch_grad_cam(resnet18, x2, cams, no_noise):
    with torch.no_grad():
        targets = resnet18(x2).argmax(1).tolist()
    pgc_targets = [ClassifierOutputTarget(t) for t in targets]
    qs = (10, 50, 90)
    ours = road(resnet18, x2, cams, targets, percentiles=qs, noise=0.0)
    assert ours.morf.shape == (2, 3) and ours.lerf.shape == (2, 3) and ours.combined.shape == (2,)
    for j, q in enumerate(qs):
        morf = pgc_road.ROADMostRelevantFirst(q)(x2, cams.numpy(), pgc_targets, resnet18)
        lerf = pgc_road.ROADLeastRelevantFirst(q)(x2, cams.numpy(), pgc_targets, resnet18)
        np.testing.assert_allclose(ours.morf[:, j].numpy(), morf, rtol=0, atol=2e-3 * np.abs(morf).max() + 1e-3)
        np.testing.assert_allclose(ours.lerf[:, j].numpy(), lerf, rtol=0, atol=2e-3 * np.abs(lerf).max() + 1e-3)
    combined = pgc_road.ROADCombined(percentiles=list(qs))(x2, cams.numpy(), pgc_targets, resnet18)
    np.testing.assert_allclose(ours.combined.numpy(), combined, rtol=0, atol=2e-3 * np.abs(combined).max() + 1e-3)
    assert np.abs(combined).max() > 0.05  # a meaningful comparison
    assert PERCENTILES == (10, 20, 30, 40, 50, 60, 70, 80, 90)  # ROADCombined's default


def test_batched_equals_one_by_one_low_res_cams_and_state(resnet18, x2, cams):
    """(B, h, w) maps are upsampled first; each image alone gives its row; eval mode restored."""
    small = torch.nn.functional.avg_pool2d(cams[:, None], 8)[:, 0]
    resnet18.train()
    try:
        whole = road(resnet18, x2, small, [1, 2], percentiles=(20, 70), noise=0.0)
        assert resnet18.training
    finally:
        resnet18.eval()
    for b in range(2):
        alone = road(resnet18, x2[b:b + 1], small[b:b + 1], [1, 2][b], percentiles=(20, 70), noise=0.0)
        torch.testing.assert_close(alone.morf[0], whole.morf[b], rtol=0, atol=1e-4)
        torch.testing.assert_close(alone.lerf[0], whole.lerf[b], rtol=0, atol=1e-4)


def test_noise_is_seeded_and_only_on_removed_pixels(resnet18, x2, cams):
    def run(seed):
        return road(resnet18, x2, cams, 3, percentiles=(50,), generator=torch.Generator().manual_seed(seed),
                    score="softmax")
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.morf, b.morf) and not torch.equal(a.morf, c.morf)
    clean = road(resnet18, x2, cams, 3, percentiles=(50,), noise=0.0, score="softmax")
    assert not torch.equal(a.morf, clean.morf)


def test_no_host_reads(resnet18, x2, cams, monkeypatch):
    expected = road(resnet18, x2, cams, [1, 2], percentiles=(30,), noise=0.0)
    with refuse_host_reads(monkeypatch):
        got = road(resnet18, x2, cams, [1, 2], percentiles=(30,), noise=0.0)
    torch.testing.assert_close(got.combined, expected.combined)


def test_errors_name_the_argument(resnet18, x2, cams):
    with pytest.raises(ValueError, match="score: expected"):
        road(resnet18, x2, cams, 1, score="prob")
    with pytest.raises(ValueError, match="percentiles: expected"):
        road(resnet18, x2, cams, 1, percentiles=(120,))
    with pytest.raises(ValueError, match="cams: expected 2 maps"):
        road(resnet18, x2, cams[:1], 1)
