"""Drop-in for pytorch-grad-cam users: its class names, constructor, call and output.

    from cfcam_gpu.compat import GradCAM, ClusteredFilteredGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:
        maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)] * len(x))  # (B, H, W) NumPy
        cam.outputs                                                                 # the model output

Every class takes ``(model, target_layers, reshape_transform=None)`` (plus our engine options as keyword
arguments) and is called with ``(input_tensor, targets=None, aug_smooth=False, eigen_smooth=False)``
(the smoothing options of every engine, see ``cfcam_gpu.smoothing``).
``targets``: anything ``cfcam_gpu.targets`` accepts, in particular a list of pytorch-grad-cam target
objects (one per image). Maps are computed by our batched engines, then scaled as pytorch-grad-cam
does: each layer's ReLU'd map min-max scaled ((m - min) / (max + 1e-7) on the unnormalised map),
resized bilinearly to the input size, averaged over layers and min-max scaled again; returned as a
float32 NumPy array (B, H, W) in [0, 1], so ``show_cam_on_image`` works on them. Differences on
purpose: a constant positive map (e.g. a 1x1 layer) is all 1 here, all 0 in pytorch-grad-cam; the
model's train/eval state is restored after each call; a wrong number of targets raises instead of
being truncated. ``ScoreCAM`` scores masked inputs with the targets (the logit by default, as
pytorch-grad-cam), ``AblationCAM`` uses pytorch-grad-cam's ablation value (see ``methods.AblationCAM``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import engine as _engine
from .compat_image import (SCALE_EPS, create_labels_legend, deprocess_image, show_cam_on_image,
                           show_factorization_on_image)
from .compat_tools import (AblationLayer, ActivationsAndGradients, DeepFeatureFactorization, GuidedBackpropReLUModel,
                           on_model_device, run_dff_on_image)
from .fuse import fuse_cams, minmax_scale
from .methods import eigen as _eigen
from .methods import fem as _fem
from .methods import finer as _finer
from .methods import fullgrad as _fullgrad
from .methods import gradient as _gradient
from .methods import perturbation as _perturbation
from .methods import random_cam as _random
from .methods import refine as _refine
from .methods import seg_eigen as _seg_eigen
from .methods import sess as _sess
from .methods import shapley as _shapley


def to_numpy_maps(result, size) -> np.ndarray:
    """CAMResult (one layer, or several in ``result.layers``) -> pytorch-grad-cam's (B, H, W) float32
    NumPy maps in [0, 1] (see the module docstring)."""
    layers = result.layers or [result]
    raw = [r.cams * r.peak[:, None, None] for r in layers]  # the unnormalised ReLU'd maps
    return fuse_cams(raw, tuple(size), eps=SCALE_EPS).clamp_(0, 1).cpu().numpy()


class _Closing:
    """``with cam:`` closes the engine held in ``self.cam`` (its hooks) on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cam.close()
        return False


class _Compat(_Closing):
    engine = _engine.CFCAM
    fixed: dict = {}

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, **options):
        layers = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
        self.model, self.target_layers, self.outputs = model, layers, None
        self.cam = self.engine(model, layers, reshape_transform=reshape_transform, **{**self.fixed, **options})

    def __call__(self, input_tensor: torch.Tensor, targets=None, aug_smooth: bool = False,
                 eigen_smooth: bool = False) -> np.ndarray:
        input_tensor = on_model_device(self.model, input_tensor)
        result = self.cam(input_tensor, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
        self.outputs = result.logits
        if aug_smooth:  # already pytorch-grad-cam's mean of scaled maps at the input size, not rescaled
            return result.cams.clamp(0, 1).cpu().numpy()
        return self._to_numpy(result, input_tensor.shape[-2:])

    def _to_numpy(self, result, size) -> np.ndarray:
        return to_numpy_maps(result, size)


class ClusteredFilteredGradCAM(_Compat):
    """CF-CAM with pytorch-grad-cam's interface."""

    engine = _engine.CFCAM


class GradCAM(_Compat):
    """pytorch_grad_cam.GradCAM's interface over our batched Grad-CAM."""

    engine = _engine.GradCAM


GradCAMCompat = GradCAM  # the earlier name


class GradCAMPlusPlus(_Compat):
    """pytorch_grad_cam.GradCAMPlusPlus's interface."""

    engine = _gradient.GradCAMPlusPlus


class XGradCAM(_Compat):
    """pytorch_grad_cam.XGradCAM's interface."""

    engine = _gradient.XGradCAM


class LayerCAM(_Compat):
    """pytorch_grad_cam.LayerCAM's interface."""

    engine = _gradient.LayerCAM


class HiResCAM(_Compat):
    """pytorch_grad_cam.HiResCAM's interface."""

    engine = _gradient.HiResCAM


class GradCAMElementWise(_Compat):
    """pytorch_grad_cam.GradCAMElementWise's interface: relu(sum_c relu(g A))."""

    engine = _gradient.GradCAMElementWise


class ShapleyCAM(_Compat):
    """pytorch_grad_cam.ShapleyCAM's interface: Grad-CAM weights from g - H A / 2."""

    engine = _shapley.ShapleyCAM


class FEM(_Compat):
    """pytorch_grad_cam.FEM's interface: ``k`` (2) the threshold in standard deviations; gradient-free,
    ``eigen_smooth`` changes nothing (as in pytorch-grad-cam)."""

    engine = _fem.FEM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, k: float = 2, **options):
        super().__init__(model, target_layers, reshape_transform, k=k, **options)


class EigenCAM(_Compat):
    """pytorch_grad_cam.EigenCAM's interface: the activations' first principal component."""

    engine = _eigen.EigenCAM


class EigenGradCAM(_Compat):
    """pytorch_grad_cam.EigenGradCAM's interface: the first principal component of g A."""

    engine = _eigen.EigenGradCAM


class KPCA_CAM(_Compat):  # noqa: N801 (pytorch-grad-cam's name)
    """pytorch_grad_cam.KPCA_CAM's interface: ``kernel`` ("sigmoid") and ``gamma`` (None: 1 / C) as
    scikit-learn's KernelPCA."""

    engine = _eigen.KPCACAM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, kernel: str = "sigmoid",
                 gamma: float | None = None, **options):
        super().__init__(model, target_layers, reshape_transform, kernel=kernel, gamma=gamma, **options)


class FullGrad(_Compat):
    """pytorch_grad_cam.FullGrad's interface; ``target_layers`` is ignored (every Conv2d and BatchNorm2d
    with a bias is used, as pytorch-grad-cam), so an empty list is fine."""

    engine = _fullgrad.FullGrad

    def __init__(self, model: nn.Module, target_layers=(), reshape_transform=None, **options):
        self.model, self.target_layers, self.outputs = model, [], None
        self.cam = self.engine(model, None, reshape_transform=reshape_transform, **options)

    def _to_numpy(self, result, size) -> np.ndarray:
        """The map is at the input size already: min-max scaled once, as pytorch-grad-cam's FullGrad."""
        raw = result.cams * result.peak[:, None, None]
        return minmax_scale(raw, SCALE_EPS).clamp_(0, 1).cpu().numpy()


class FinerCAM(_Compat):
    """pytorch_grad_cam.FinerCAM's interface: ``FinerCAM(model, target_layers, reshape_transform=None,
    base_method=GradCAM)``, called with ``(input_tensor, targets=None, eigen_smooth=False, alpha=1,
    comparison_categories=None, target_idx=None)``. With ``targets=None`` each image's main class is its
    top-1 class (or ``target_idx``) compared with the classes at ``comparison_categories`` ([1, 2, 3])
    in the order of their logit's distance to it; given targets are explained as they are by the base
    method (as pytorch-grad-cam)."""

    engine = _finer.FinerCAM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, base_method=None, **options):
        super().__init__(model, target_layers, reshape_transform, base=_engine_of(base_method, GradCAM.engine),
                         **options)

    def __call__(self, input_tensor: torch.Tensor, targets=None, eigen_smooth: bool = False, alpha: float = 1,
                 comparison_categories=None, target_idx: int | None = None) -> np.ndarray:
        self.cam.alpha = float(alpha)
        self.cam.comparison_categories = tuple(_finer.COMPARISONS if comparison_categories is None
                                               else comparison_categories)
        if targets is None and target_idx is not None:
            targets = int(target_idx)
        return super().__call__(input_tensor, targets, aug_smooth=False, eigen_smooth=eigen_smooth)


class ScoreCAM(_Compat):
    """pytorch_grad_cam.ScoreCAM's interface: masked inputs scored by the targets (default: the top-1
    logit), a softmax over channels; ``batch_size`` masked inputs per forward (16, settable later as in
    pytorch-grad-cam: ``cam.batch_size = 64``)."""

    engine = _perturbation.ScoreCAM
    fixed = {"score": "logit", "channel_softmax": True}

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, batch_size: int = 16,
                 **options):
        super().__init__(model, target_layers, reshape_transform, score_batch_size=batch_size, **options)

    @property
    def batch_size(self) -> int:
        return self.cam.score_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {value!r}")
        self.cam.score_batch_size = value


class AblationCAM(_Compat):
    """pytorch_grad_cam.AblationCAM's interface with its ablation value (``ablation_value=
    "pytorch-grad-cam"``: 0 for layers whose minimum is 0, else min - k * 1e7 in groups of ``batch_size``).
    ``ablation_layer``: None or ``AblationLayer()`` (the same); ``ratio_channels_to_ablate`` other than 1.0
    is not offered."""

    engine = _perturbation.AblationCAM

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, ablation_layer=None,
                 batch_size: int = 32, ratio_channels_to_ablate: float = 1.0, **options):
        if ablation_layer is not None and type(ablation_layer) is not AblationLayer:
            raise ValueError(f"ablation_layer: expected None or cfcam_gpu.compat.AblationLayer() (channel "
                             f"ablation), got {type(ablation_layer).__name__}")
        if ratio_channels_to_ablate != 1.0:
            raise ValueError(f"ratio_channels_to_ablate: expected 1.0 (every channel), got "
                             f"{ratio_channels_to_ablate!r}")
        options.setdefault("ablation_value", "pytorch-grad-cam")
        super().__init__(model, target_layers, reshape_transform, pgc_batch_size=batch_size, **options)

    @property
    def batch_size(self) -> int:
        """Ablations per group (pytorch-grad-cam's batch size, which sets its ablation value); settable
        later, ``cam.batch_size = 32``."""
        return self.cam.pgc_batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"batch_size: expected an int >= 1, got {value!r}")
        self.cam.pgc_batch_size = value


def _engine_of(base_method, default):
    """A ``base_method`` given as one of our drop-in classes, or a pytorch-grad-cam class of the same name
    -> our engine class (a method computed from the target layer's features)."""
    if base_method is None:
        return default
    ours = globals().get(getattr(base_method, "__name__", ""))
    if isinstance(ours, type) and issubclass(ours, _Compat) \
            and ours.engine._explain_images is _engine.CAMEngine._explain_images:
        return ours.engine
    raise ValueError(f"base_method: expected a gradient or activation CAM class of cfcam_gpu.compat (e.g. GradCAM, "
                     f"GradCAMPlusPlus, EigenCAM), got {base_method!r}")


class _NumpyRandomCAM(_random.RandomCAM):
    """RandomCAM whose weights come from NumPy's global generator, one (B, C) draw per layer in the order
    of the layers, as pytorch-grad-cam: ``np.random.seed`` reproduces its maps."""

    def draw_weights(self, B: int, C: int, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.random.uniform(-1, 1, size=(B, C))).to(like.device)


class RandomCAM(_Compat):
    """pytorch_grad_cam.RandomCAM's interface: channel weights uniform in [-1, 1), drawn from NumPy's
    global generator (``np.random.seed(s)`` before a call gives pytorch-grad-cam's map for the same seed;
    with ``aug_smooth`` and several layers the same values are drawn in another order, one draw per layer
    for all augmented copies, so those maps differ). The native ``cfcam_gpu.methods.RandomCAM`` takes a
    ``torch.Generator`` on the device instead."""

    engine = _NumpyRandomCAM


class SegEigenCAM(_Compat):
    """pytorch_grad_cam.SegEigenCAM's interface: the sign-corrected first principal component of
    |gradients| x activations; ``eigen_smooth`` changes nothing (as in pytorch-grad-cam)."""

    engine = _seg_eigen.SegEigenCAM


class RefineCAM(_Closing):
    """pytorch_grad_cam.RefineCAM's interface: ``RefineCAM(model, target_layers, reshape_transform=None,
    base_method=GradCAMPlusPlus, **kwargs)`` called with ``(input_tensor, targets=None, eigen_smooth=False)``
    -> (B, H, W) float32 NumPy: the min-max scaled product over the layers of the base method's map of
    each layer alone. ``eigen_smooth`` eigen-smooths the base maps (pytorch-grad-cam 1.5.7 hands it to
    its base method's ``aug_smooth`` position, so there it aug-smooths instead). All layers come from one
    forward and backward pass."""

    native, default_base = _refine.RefineCAM, _gradient.GradCAMPlusPlus

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, base_method=None, **kwargs):
        layers = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
        self.model, self.target_layers, self.outputs = model, layers, None
        base = _engine_of(base_method, self.default_base)
        self.cam = self.native(model, layers, base_method=base, reshape_transform=reshape_transform, **kwargs)
        self.cam.eps = SCALE_EPS

    def __call__(self, input_tensor: torch.Tensor, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        input_tensor = on_model_device(self.model, input_tensor)
        result = self.cam(input_tensor, targets, eigen_smooth=eigen_smooth)
        self.outputs = result.logits
        return result.cams.clamp(0, 1).cpu().numpy()

    forward = __call__


class SESS(RefineCAM):
    """pytorch_grad_cam.SESS's interface: ``SESS(model, target_layers, reshape_transform=None,
    base_method=GradCAM, scales=None, num_scales=12, scale_step_ratio=2/7, window_size=None,
    step_size=None, pre_filter_ratio=0.0, theta=0.0, pool="mean", smooth=True, use_softmax_scores=True,
    batch_size=32, **kwargs)`` called with ``(input_tensor, targets=None, eigen_smooth=False)`` -> (B, H, W)
    float32 NumPy (``cfcam_gpu.methods.sess``). Deterministic: the same patches, scores and fusion as
    pytorch-grad-cam, for all images of the batch at once (``batch_size`` patches per pass, as there)."""

    native, default_base = _sess.SESS, _engine.GradCAM

    def __call__(self, input_tensor: torch.Tensor, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        if targets is not None and len(targets) != len(input_tensor):
            raise ValueError(f"targets: expected {len(input_tensor)} targets (one per image), got {len(targets)}")
        if targets is not None and all(t is None for t in targets):
            targets = None
        return super().__call__(input_tensor, targets, eigen_smooth)

    forward = __call__


__all__ = [
    "AblationCAM", "AblationLayer", "ActivationsAndGradients", "ClusteredFilteredGradCAM",
    "DeepFeatureFactorization", "EigenCAM", "EigenGradCAM", "FEM", "FinerCAM", "FullGrad", "GradCAM",
    "GradCAMCompat", "GradCAMElementWise", "GradCAMPlusPlus", "GuidedBackpropReLUModel", "HiResCAM", "KPCA_CAM",
    "LayerCAM", "RandomCAM", "RefineCAM", "SESS", "ScoreCAM", "SegEigenCAM", "ShapleyCAM", "XGradCAM",
    "create_labels_legend", "deprocess_image", "run_dff_on_image", "show_cam_on_image",
    "on_model_device", "show_factorization_on_image", "to_numpy_maps",
]
