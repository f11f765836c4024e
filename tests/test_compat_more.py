"""The rest of the drop-in (RandomCAM, SegEigenCAM, RefineCAM, SESS, guided backpropagation, Deep Feature
Factorization and the image helpers) against pytorch-grad-cam 1.5.7 itself.

Real activations: three bundled photos at 64 x 64 through torchvision ResNet18 and MobileNetV3-Small with
seeded random weights. Maps agree within 2e-3. SegEigenCAM is a projection, but its sign is fixed by the
method's own rule (|min| > |max| flips), so it is compared as is, not up to sign; DFF (a non-negative
factorisation from the same seeded start) has no sign freedom either. RandomCAM's randomness is matched:
its weights come from NumPy's global generator in both, seeded before each call. SESS is deterministic.
"""
from __future__ import annotations

import copy
import inspect

import numpy as np
import pytest
import torch

pytest.importorskip("pytorch_grad_cam")
import pytorch_grad_cam as pgc  # noqa: E402
from helpers import patch_pgc_sign, preprocess  # noqa: E402
from pytorch_grad_cam.utils import image as pgc_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget, ClassifierOutputTarget  # noqa: E402

import cfcam_gpu.compat as cc  # noqa: E402
from cfcam_gpu.methods import RandomCAM as NativeRandomCAM  # noqa: E402
from cfcam_gpu.methods.dff import dff as native_dff  # noqa: E402

ATOL = 2e-3


@pytest.fixture(scope="module")
def x64(photos) -> torch.Tensor:
    """(3, 3, 64, 64): chelsea, coffee, astronaut, ImageNet normalisation."""
    return torch.stack([preprocess(photos[n], size=64) for n in ("chelsea", "coffee", "astronaut")])


@pytest.fixture(scope="module")
def mobilenet(seeded):
    import torchvision

    return seeded(lambda: torchvision.models.mobilenet_v3_small(weights=None)).eval()


def arch(request, name):
    """-> model, its last feature layer, and two layers (an earlier one first) for RefineCAM."""
    if name == "resnet18":
        m = request.getfixturevalue("resnet18")
        return m, m.layer4[-1], [m.layer3[-1], m.layer4[-1]]
    m = request.getfixturevalue("mobilenet")
    return m, m.features[-1], [m.features[-4], m.features[-1]]


ARCHS = ["resnet18", "mobilenet_v3_small"]
TARGETS = [ClassifierOutputTarget(1), ClassifierOutputSoftmaxTarget(2), ClassifierOutputTarget(3)]


def both(name, model, layers, x, targets=None, seed=None, call=None, **kwargs):
    """pytorch-grad-cam's and our class ``name`` built with ``kwargs`` on the same input."""
    out = []
    for module in (pgc, cc):
        if seed is not None:
            np.random.seed(seed)
        cam = getattr(module, name)(model, layers, **kwargs)
        out.append(cam(x, targets, **(call or {})))
    model.zero_grad(set_to_none=True)  # pytorch-grad-cam's full backward leaves .grad on the shared models
    return out


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("targets", [None, TARGETS], ids=["top1", "given"])
def test_seg_eigen_cam(request, x64, name, targets):
    model, layer, _ = arch(request, name)
    theirs, mine = both("SegEigenCAM", model, [layer], x64, targets)
    assert mine.shape == theirs.shape == (3, 64, 64) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, theirs, atol=ATOL)
    assert theirs.max() > 0.99


def test_seg_eigen_cam_smoothing_and_layers(resnet18, x64):
    """``eigen_smooth`` changes nothing (the map is a projection already), ``aug_smooth`` as there, and
    two layers fused as there."""
    two = [resnet18.layer3[-1], resnet18.layer4[-1]]
    for layers, call in (([two[1]], {"eigen_smooth": True}), ([two[1]], {"aug_smooth": True}), (two, {})):
        theirs, mine = both("SegEigenCAM", resnet18, layers, x64, TARGETS, call=call)
        np.testing.assert_allclose(mine, theirs, atol=ATOL)
        assert theirs.max() > 0.5  # (an aug-smoothed map is a mean: its max may be below 1)


@pytest.mark.parametrize("name", ARCHS)
def test_random_cam_seeded_numpy(request, x64, name):
    """Seeded NumPy generator: pytorch-grad-cam's maps, for one layer and for two (one draw per layer,
    in order); another seed gives another map."""
    model, layer, two = arch(request, name)
    maps = {}
    for layers in ([layer], two):
        theirs, maps[len(layers)] = both("RandomCAM", model, layers, x64, seed=7)
        np.testing.assert_allclose(maps[len(layers)], theirs, atol=ATOL)
        assert theirs.max() > 0.99
    np.random.seed(8)
    other = cc.RandomCAM(model, [layer])(x64)
    assert np.abs(other - maps[1]).max() > 0.1  # the same layer, another seed
    theirs, mine = both("RandomCAM", model, [layer], x64, seed=9, call={"aug_smooth": True})  # one layer
    np.testing.assert_allclose(mine, theirs, atol=ATOL)


def test_native_random_cam_torch_generator(resnet18, x64):
    """The native engine draws from a torch.Generator: same seed, same maps; another seed, others."""
    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return NativeRandomCAM(resnet18, resnet18.layer4[-1], generator=g)(x64).cams
    torch.testing.assert_close(run(0), run(0))
    assert (run(0) - run(1)).abs().max() > 0.1
    with pytest.raises(TypeError, match="generator"):
        NativeRandomCAM(resnet18, resnet18.layer4[-1], generator=0)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator: expected a torch.Generator on the features' device"):
            NativeRandomCAM(resnet18, resnet18.layer4[-1], generator=torch.Generator("cuda"))(x64)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("base", [None, "GradCAM", "EigenCAM"])
def test_refine_cam(request, x64, name, base):
    """Default base (Grad-CAM++), and a base method given as pytorch-grad-cam's class."""
    model, _, two = arch(request, name)
    kwargs = {} if base is None else {"base_method": getattr(pgc, base)}
    theirs = pgc.RefineCAM(model, two, **kwargs)(x64, TARGETS)
    model.zero_grad(set_to_none=True)
    mine = cc.RefineCAM(model, two, **kwargs)(x64, TARGETS)
    assert mine.shape == theirs.shape == (3, 64, 64)
    np.testing.assert_allclose(mine, theirs, atol=ATOL)
    assert theirs.max() > 0.99


def test_refine_cam_eigen_smooth(resnet18, x64):
    """``eigen_smooth`` eigen-smooths each base map (pytorch-grad-cam 1.5.7 passes it on as aug_smooth):
    the product of pytorch-grad-cam's eigen-smoothed Grad-CAM++ maps of each layer, min-max scaled."""
    two = [resnet18.layer3[-1], resnet18.layer4[-1]]
    per_layer = [pgc.GradCAMPlusPlus(resnet18, [layer])(x64, TARGETS, eigen_smooth=True) for layer in two]
    resnet18.zero_grad(set_to_none=True)
    expected = pgc_image.scale_cam_image(per_layer[0] * per_layer[1])
    mine = cc.RefineCAM(resnet18, two)(x64, TARGETS, eigen_smooth=True)
    np.testing.assert_allclose(mine, expected, atol=ATOL)


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("options", [{}, {"pre_filter_ratio": 0.5, "pool": "max"},
                                     {"step_size": 24, "theta": 0.1, "use_softmax_scores": False,
                                      "smooth": False, "batch_size": 5}],
                         ids=["default", "prefilter+max", "overlap+theta"])
def test_sess(request, x64, name, options):
    model, layer, _ = arch(request, name)
    targets = None if options else TARGETS
    theirs, mine = both("SESS", model, [layer], x64, targets, num_scales=3, **options)
    assert mine.shape == theirs.shape == (3, 64, 64)
    np.testing.assert_allclose(mine, theirs, atol=ATOL)
    assert theirs.max() > 0.99


def test_sess_non_square_windows_and_base(resnet18, x64, monkeypatch):
    """A 56 x 64 input, a smaller overlapping window, Grad-CAM++ as base (given as pytorch-grad-cam's
    class), and eigen-smoothed base maps (pytorch-grad-cam's component oriented by our sign rule)."""
    patch_pgc_sign(monkeypatch)
    x = x64[:2, :, 4:60]
    for kwargs, call in (({"num_scales": 2, "window_size": 40, "step_size": 20}, {}),
                         ({"scales": [56, 70], "base_method": pgc.GradCAMPlusPlus, "batch_size": 3}, {}),
                         ({"num_scales": 2}, {"eigen_smooth": True})):
        theirs, mine = both("SESS", resnet18, [resnet18.layer4[-1]], x, TARGETS[:2], call=call, **kwargs)
        assert mine.shape == theirs.shape == (2, 56, 64)
        np.testing.assert_allclose(mine, theirs, atol=ATOL)
        assert theirs.max() > 0.99


def test_sess_bad_input(resnet18, x64):
    cam = cc.SESS(resnet18, [resnet18.layer4[-1]], num_scales=1)
    with pytest.raises(ValueError, match="expected 3 targets"):
        cam(x64, TARGETS[:2])
    with pytest.raises(ValueError, match="pool: expected one of"):
        cc.SESS(resnet18, [resnet18.layer4[-1]], pool="median")
    with pytest.raises(ValueError, match="base_method"):
        cc.SESS(resnet18, [resnet18.layer4[-1]], base_method=cc.ScoreCAM)


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("category", [None, 5])
def test_guided_backprop(request, x64, name, category):
    """pytorch-grad-cam's (H, W, 3) input gradient for one image (it swaps the model's ReLUs, so it gets
    a copy); ours leaves the model as it was (modules, hooks, train mode). A batch is image by image."""
    model, _, _ = arch(request, name)
    theirs = pgc.GuidedBackpropReLUModel(copy.deepcopy(model))(x64[:1].clone(), category)
    kinds = [type(m) for m in model.modules()]
    model.train()
    try:
        mine = cc.GuidedBackpropReLUModel(model)(x64[:1], category)
        assert model.training
    finally:
        model.eval()
    assert [type(m) for m in model.modules()] == kinds and _hooks(model) == 0
    assert mine.shape == theirs.shape == (64, 64, 3) and mine.dtype == np.float32
    np.testing.assert_allclose(mine, theirs, atol=1e-5 * np.abs(theirs).max())
    assert np.abs(theirs).max() > 0
    batch = cc.GuidedBackpropReLUModel(model)(x64, category)
    assert batch.shape == (3, 64, 64, 3)
    for i in range(3):
        np.testing.assert_allclose(batch[i], cc.GuidedBackpropReLUModel(model)(x64[i:i + 1], category),
                                   atol=1e-6 * np.abs(batch[i]).max())


def test_guided_grad_cam_display(resnet18, x64):
    """pytorch-grad-cam's guided Grad-CAM recipe: deprocess_image of the guided gradient, and of the
    gradient times the map; equal uint8 images (at most one level apart, on rounding ties)."""
    gb = pgc.GuidedBackpropReLUModel(copy.deepcopy(resnet18))(x64[:1].clone(), None)
    cam = cc.GradCAM(resnet18, [resnet18.layer4[-1]])(x64[:1])[0]
    for value in (gb, np.stack([cam] * 3, axis=-1) * gb):
        mine, theirs = cc.deprocess_image(value), pgc_image.deprocess_image(value)
        assert mine.dtype == np.uint8 and mine.shape == theirs.shape == (64, 64, 3)
        diff = np.abs(mine.astype(int) - theirs)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
        assert theirs.min() < 100 < theirs.max()


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("B", [1, 3])
def test_deep_feature_factorization(request, x64, name, B):
    """Concepts (C, K), per-image explanations (K, H, W) and the classifier's outputs on the concepts."""
    model, layer, _ = arch(request, name)
    head = model.fc if name == "resnet18" else model.classifier
    theirs = pgc.DeepFeatureFactorization(model, layer, computation_on_concepts=head)(x64[:B], 4)
    mine = cc.DeepFeatureFactorization(model, layer, computation_on_concepts=head)(x64[:B], 4)
    assert len(mine) == 3 and mine[0].shape == theirs[0].shape and mine[0].dtype == np.float32
    np.testing.assert_allclose(mine[0], theirs[0], atol=1e-3 * np.abs(theirs[0]).max())
    assert len(mine[1]) == len(theirs[1]) == B
    for a, b in zip(mine[1], theirs[1]):
        assert a.shape == b.shape == (4, 64, 64)
        np.testing.assert_allclose(a, b, atol=ATOL)
    np.testing.assert_allclose(mine[2], theirs[2], atol=1e-3 * np.abs(theirs[2]).max())
    two = cc.DeepFeatureFactorization(model, layer)(x64[:B], 4)
    assert len(two) == 2


def test_dff_without_host_reads_equals_the_stopping_run(resnet18, x64):
    """The accelerator route (all sweeps, factors frozen once converged) equals the early stop, on CPU."""
    acts = cc.ActivationsAndGradients(resnet18, [resnet18.layer4[-1]], None)
    with torch.no_grad():
        acts(x64)
    a = acts.activations[0]
    acts.release()
    stop, free = native_dff(a, 4, sync_free=False), native_dff(a, 4, sync_free=True)
    for s, f in zip(stop, free):
        torch.testing.assert_close(s, f)


def test_run_dff_on_image(resnet18, x64, photos, monkeypatch):
    """The photo, its coloured components and the legend, as pytorch-grad-cam draws them (its helper
    needs ``model.config.id2label`` and matplotlib's old ``cm.get_cmap``, supplied here)."""
    import matplotlib
    from PIL import Image

    monkeypatch.setattr(matplotlib.cm, "get_cmap", lambda name: matplotlib.colormaps[name], raising=False)
    labels = {i: f"class {i}, sort {i}, more, rest" for i in range(1000)}
    monkeypatch.setattr(resnet18, "config", type("Config", (), {"id2label": labels})(), raising=False)
    pil = Image.fromarray(photos["chelsea"]).resize((64, 64))
    x = preprocess(np.asarray(pil), size=64)
    theirs = pgc.run_dff_on_image(resnet18, resnet18.layer4[-1], resnet18.fc, pil, x, reshape_transform=None,
                                  n_components=3)
    mine = cc.run_dff_on_image(resnet18, resnet18.layer4[-1], resnet18.fc, pil, x, n_components=3)
    assert mine.shape == theirs.shape == (64, 192, 3) and mine.dtype == np.uint8
    np.testing.assert_array_equal(mine[:, :128], theirs[:, :128])  # the photo and the components
    assert np.abs(mine[:, 128:].astype(int) - theirs[:, 128:]).mean() < 1  # the legend (text rendering)


def test_image_helpers(photos, rng):
    rgb = np.float32(preprocess(photos["coffee"], 64, mean=(0, 0, 0), std=(1, 1, 1)).permute(1, 2, 0))
    mask = rng.random((64, 64)).astype(np.float32)
    for kwargs in ({}, {"use_rgb": True, "image_weight": 0.3}):
        np.testing.assert_array_equal(cc.show_cam_on_image(rgb, mask, **kwargs),
                                      pgc_image.show_cam_on_image(rgb, mask, **kwargs))
    explanations = rng.random((4, 64, 64)).astype(np.float32)
    colors = [np.array(c) for c in ((1, 0, 0, 1), (0, 1, 0, 1), (0, 0, 1, 1), (1, 1, 0, 1))]
    np.testing.assert_array_equal(cc.show_factorization_on_image(rgb, explanations, colors),
                                  pgc_image.show_factorization_on_image(rgb, explanations.copy(), colors))
    scores, labels = rng.random((3, 5)), {i: f"c{i}, a, b, d" for i in range(5)}
    assert cc.create_labels_legend(scores, labels, 3) == pgc_image.create_labels_legend(scores, labels, 3)
    with pytest.raises(ValueError, match="img: expected float values in"):
        cc.show_cam_on_image(rgb * 255, mask)


def test_activations_and_gradients(resnet18, x64):
    layers = [resnet18.layer3[-1], resnet18.layer4[-1]]
    got = []
    for cls in (pgc.ActivationsAndGradients, cc.ActivationsAndGradients):
        ag = cls(resnet18, layers, None)
        ag(x64)[:, 3].sum().backward()
        got.append((list(ag.activations), list(ag.gradients)))  # release() empties them in place
        ag.release()
    resnet18.zero_grad(set_to_none=True)
    assert _hooks(resnet18) == 0
    for theirs, mine in zip(*got):
        assert len(mine) == len(theirs) == 2
        for a, b in zip(mine, theirs):
            assert a.device.type == "cpu" and not a.requires_grad
            torch.testing.assert_close(a, b)


def test_ablation_layer(seeded, x64):
    import torchvision

    model = seeded(lambda: torchvision.models.resnet18(weights=None, num_classes=10)).eval()
    x = x64[:2, :, :32, :32]
    plain = cc.AblationCAM(model, [model.layer4[-1]])(x)
    np.testing.assert_array_equal(cc.AblationCAM(model, [model.layer4[-1]], ablation_layer=cc.AblationLayer())(x),
                                  plain)
    with pytest.raises(ValueError, match="ablation_layer: expected None or"):
        cc.AblationCAM(model, [model.layer4[-1]], ablation_layer=pgc.AblationLayerVit())


NOT_OFFERED = {"AblationLayerVit", "AblationLayerFasterRCNN"}  # transformer / detection ablation layers


def test_every_public_class_of_pytorch_grad_cam_is_offered():
    """Every class pytorch_grad_cam's package exports is in cfcam_gpu.compat's __all__ (the two
    special-purpose ablation layers aside, see the drop-in page)."""
    public = {n for n, v in vars(pgc).items() if inspect.isclass(v) and not n.startswith("_")}
    assert len(public) >= 25
    assert public - set(cc.__all__) == NOT_OFFERED
    for name in set(cc.__all__):
        assert hasattr(cc, name), name
    for name in ("deprocess_image", "show_cam_on_image", "show_factorization_on_image", "create_labels_legend",
                 "run_dff_on_image"):
        assert callable(getattr(cc, name))


def test_native_accelerator_paths_read_nothing_and_equal_the_cpu_paths(resnet18, x64, monkeypatch):
    """The natives' accelerator route (``sync_free=True``) on CPU tensors: no host read (top-1 targets,
    no value checks), and the CPU route's maps."""
    from helpers import refuse_host_reads

    from cfcam_gpu.methods import SESS, DeepFeatureFactorization, RefineCAM, SegEigenCAM

    layer, two = resnet18.layer4[-1], [resnet18.layer3[-1], resnet18.layer4[-1]]
    expected = [SegEigenCAM(resnet18, layer)(x64).cams, RefineCAM(resnet18, two)(x64).cams,
                NativeRandomCAM(resnet18, layer, generator=torch.Generator().manual_seed(3))(x64).cams,
                DeepFeatureFactorization(resnet18, layer, sync_free=False)(x64, 4)[1],
                SESS(resnet18, layer, num_scales=2)(x64).cams]
    with refuse_host_reads(monkeypatch):
        got = [SegEigenCAM(resnet18, layer, check_values=False, sync_free=True)(x64).cams,
               RefineCAM(resnet18, two, check_values=False)(x64).cams,
               NativeRandomCAM(resnet18, layer, check_values=False,
                               generator=torch.Generator().manual_seed(3))(x64).cams,
               DeepFeatureFactorization(resnet18, layer, sync_free=True)(x64, 4)[1],
               SESS(resnet18, layer, num_scales=2, check_values=False)(x64).cams]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4)
