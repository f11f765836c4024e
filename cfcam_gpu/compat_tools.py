"""pytorch-grad-cam's classes that are not CAM methods, with its interfaces: guided backpropagation,
Deep Feature Factorization (and ``run_dff_on_image``), and the ``AblationLayer`` / ``ActivationsAndGradients``
helpers. Re-exported by ``cfcam_gpu.compat``; the computations are ``cfcam_gpu.methods.guided`` and
``cfcam_gpu.methods.dff``. Shapes: B images, C channels, K concepts, L classes, H x W the input."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .compat_image import SCALE_EPS, create_labels_legend, show_factorization_on_image
from .methods import guided as _guided
from .methods.dff import DeepFeatureFactorization as _NativeDFF


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (where pytorch-grad-cam puts inputs); None without any."""
    param = next(model.parameters(), None)
    return None if param is None else param.device


def on_model_device(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x moved to ``model_device(model)``; as is for a model without parameters."""
    device = model_device(model)
    return x if device is None else x.to(device)


class GuidedBackpropReLUModel:
    """pytorch_grad_cam.GuidedBackpropReLUModel's interface: ``GuidedBackpropReLUModel(model, device=None)``
    (a device moves the model there), called with ``(input_img, target_category=None)`` -> the guided
    gradient of the input as float32 NumPy (H, W, 3) for a batch of one image, as pytorch-grad-cam
    (``target_category``: a class index; None: the top-1 class). For B > 1 images the result is
    (B, H, W, 3), each image with its own top-1 class (pytorch-grad-cam returns image 0's only). The model
    is not modified: its ``nn.ReLU`` modules are guided by hooks during the call, which are removed
    afterwards, and its train/eval state is restored (``cfcam_gpu.methods.guided``)."""

    def __init__(self, model: nn.Module, device=None):
        self.model = model
        if device is not None:
            self.device = torch.device(device)
            self.model = model.to(self.device)
        else:
            self.device = model_device(model) or torch.device("cpu")

    def __call__(self, input_img: torch.Tensor, target_category=None) -> np.ndarray:
        x = input_img.to(self.device)
        if target_category is not None and not isinstance(target_category, (list, tuple)):
            target_category = int(target_category)  # one class for every image: no index list to copy
        grad, _ = _guided.guided_backprop(self.model, x, target_category)
        out = grad.permute(0, 2, 3, 1).float().cpu().numpy()
        return out[0] if len(out) == 1 else out


class DeepFeatureFactorization:
    """pytorch_grad_cam.DeepFeatureFactorization's interface: ``DeepFeatureFactorization(model,
    target_layer, reshape_transform=None, computation_on_concepts=None)`` called with ``(input_tensor,
    n_components=16)`` -> concepts (C, K) float32 NumPy, a list of B explanation arrays (K, H, W) in [0, 1]
    and, with ``computation_on_concepts``, its outputs on the concepts (K, L) NumPy. The factorisation
    (scikit-learn's NMF, ``init="random"``, ``random_state=0``) runs in torch on the activations' device
    (``cfcam_gpu.methods.dff``); the model runs in eval mode (restored afterwards)."""

    def __init__(self, model: nn.Module, target_layer, reshape_transform=None, computation_on_concepts=None,
                 **options):
        self.model = model
        self.dff = _NativeDFF(model, target_layer, reshape_transform, computation_on_concepts,
                                                 **options)
        self.dff.eps = SCALE_EPS

    def __call__(self, input_tensor: torch.Tensor, n_components: int = 16):
        input_tensor = on_model_device(self.model, input_tensor)
        out = self.dff(input_tensor, n_components)
        concepts, maps = out[0].float().cpu().numpy(), list(out[1].float().cpu().numpy())
        if len(out) == 2:
            return concepts, maps
        return concepts, maps, out[2].float().cpu().numpy()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False



def run_dff_on_image(model: nn.Module, target_layer, classifier, img_pil, img_tensor: torch.Tensor,
                     reshape_transform=None, n_components: int = 5, top_k: int = 2,
                     labels: dict | None = None) -> np.ndarray:
    """pytorch_grad_cam's ``run_dff_on_image``: Deep Feature Factorization of one image (img_tensor
    (3, H, W), img_pil the same photo as a PIL image or (H, W, 3) uint8 array), its concepts classified by
    ``classifier`` (concepts (K, C) -> (K, L) logits) -> uint8 (H, 3 W, 3): the photo, the components
    coloured on it, and their legend (each concept's ``top_k`` classes with softmax scores). ``labels``
    (class index -> name) defaults to ``model.config.id2label`` (Hugging Face models), as there."""
    if labels is None:
        labels = getattr(getattr(model, "config", None), "id2label", None)
        if labels is None:
            raise ValueError("labels: expected a dict of class names, or a model with config.id2label, got neither")
    photo = np.asarray(img_pil)
    dff = DeepFeatureFactorization(model, target_layer, reshape_transform, computation_on_concepts=classifier)
    _, explanations, outputs = dff(img_tensor[None], n_components)
    scores = torch.softmax(torch.from_numpy(outputs), dim=-1).numpy()
    picture = show_factorization_on_image(photo / 255, explanations[0], image_weight=0.3,
                                          concept_labels=create_labels_legend(scores, labels, top_k))
    return np.hstack((photo, picture))



class AblationLayer(nn.Module):
    """pytorch_grad_cam.AblationLayer's name: ``AblationCAM(..., ablation_layer=AblationLayer())`` is the
    default channel ablation (``methods.AblationCAM``). A marker only; the ablation itself is batched in
    the engine."""


class ActivationsAndGradients:
    """pytorch_grad_cam.ActivationsAndGradients's interface: ``ActivationsAndGradients(model, target_layers,
    reshape_transform, detach=True)``; calling it with ``x`` runs the model and returns its output, filling
    ``activations`` (one per layer, in the order of the layers) and, after a backward pass, ``gradients``
    (same order). With ``detach`` they are detached copies on the CPU (``reshape_transform`` applied),
    as there; ``clear()`` empties both lists in place, ``release()`` clears them and removes the hooks."""

    def __init__(self, model: nn.Module, target_layers, reshape_transform=None, detach: bool = True):
        self.model, self.reshape_transform, self.detach = model, reshape_transform, detach
        self.activations: list = []
        self.gradients: list = []
        layers = list(target_layers) if isinstance(target_layers, (list, tuple)) else [target_layers]
        self.handles = [layer.register_forward_hook(self._hook) for layer in layers]

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        if not self.detach:
            return t
        t = t if self.reshape_transform is None else self.reshape_transform(t)
        return t.detach().cpu()

    def _hook(self, module, inputs, output):
        self.activations.append(self._keep(output))
        if isinstance(output, torch.Tensor) and output.requires_grad:
            # backward reaches the layers last to first: each gradient goes in front
            output.register_hook(lambda g: self.gradients.insert(0, self._keep(g)))

    def __call__(self, x: torch.Tensor):
        self.activations, self.gradients = [], []
        return self.model(x)

    def clear(self) -> None:
        self.activations.clear()
        self.gradients.clear()

    def release(self) -> None:
        self.clear()
        for handle in self.handles:
            handle.remove()
        self.handles = []


__all__ = ["AblationLayer", "ActivationsAndGradients", "DeepFeatureFactorization", "GuidedBackpropReLUModel",
           "on_model_device", "run_dff_on_image"]
