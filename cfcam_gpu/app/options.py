"""What ``explain`` and ``evaluate`` share: the error type, the model / device / data options and their
checks, the input paths, and loading the model.

The checks run cheapest first, so that a usage error is reported before any weights are read: option
values and input paths (``input_paths``), the output folder (``outputs.check_output_folder``), then
``load_model`` builds the architecture, checks the target layer, and only then loads ``--weights``.
Heavy libraries (timm, torchvision's model zoo) are imported by ``load_model``, not by this module.
"""
from __future__ import annotations

import argparse
import inspect
import os
import warnings
from pathlib import Path

import torch

from .data import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS

PROG = "cfcam"
PATH_HELP = (f"image files, folders or .txt lists of paths; folders are searched recursively for "
             f"{' '.join(IMAGE_EXTENSIONS)} files (any case; other files, e.g. .gif, are not collected)")


# Exit statuses besides 0 (done), 1 (some inputs failed, the rest done) and 2 (usage or configuration).
EXIT_WRITE_FAILED = 3  # DIR could not be written (disk full, ...): the run stopped, --resume finishes it
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT)
EXIT_TERMINATED = 143  # SIGTERM


def write_failed(out, error: OSError, what: str) -> "CLIError":
    """The CLIError (exit 3) for a failed write into DIR: ``what`` says what was left undone."""
    return CLIError(f"--out: writing to {str(out)!r} failed ({error.strerror or error}); {what}",
                    EXIT_WRITE_FAILED)


class CLIError(Exception):
    """A usage or configuration error: ``cli.main`` prints ``cfcam: error: MESSAGE`` and returns ``code``."""

    def __init__(self, message: str, code: int = 2, echo: bool = True):
        super().__init__(message)
        self.code = code
        self.echo = echo  # False: not printed (under torchrun, rank 0 prints an error every rank shares)


# Library messages start with the parameter name; the CLI names the option instead.
_OPTION_FOR_PARAMETER = {"name": "--model", "weights": "--weights", "num_classes": "--num-classes",
                         "target_layer": "--layer", "targets": "--target", "paths": "PATH"}


def option_message(error: BaseException) -> str:
    """'name: unknown model ...' -> '--model: unknown model ...' (the first line only)."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head, sep, rest = message.partition(": ")
    if sep and head in _OPTION_FOR_PARAMETER:
        return f"{_OPTION_FOR_PARAMETER[head]}: {rest}"
    return message


# ---------------------------------------------------------------------------------------------------
# CAM methods: the names and what they need, read from the core's registry at run time.

def method_names() -> tuple[str, ...]:
    """Every name of ``cfcam_gpu.methods.METHODS``, in the registry's order."""
    from ..methods import METHODS

    return tuple(METHODS)


def uses_layer(name: str) -> bool:
    """False for a method whose engine takes no target layer (its ``target_layer`` defaults to None, e.g.
    fullgrad, which uses every bias layer and returns maps at the input size)."""
    from ..methods import METHODS

    parameter = inspect.signature(METHODS[name].__init__).parameters.get("target_layer")
    return parameter is None or parameter.default is not None


def random_options(name: str, device) -> dict:
    """{"generator": a torch.Generator on ``device``} for a method that draws random numbers (its engine
    takes a ``generator``: randomcam), else {}; ``reseed`` seeds it before each batch."""
    from ..methods import METHODS

    if "generator" not in inspect.signature(METHODS[name].__init__).parameters:
        return {}
    return {"generator": torch.Generator(device)}


def reseed(engine, seed: int, index: int) -> None:
    """Seed an engine's generator (``random_options``) from the run's ``seed`` and ``index`` (the batch's
    first image, or the batch, in the run's order): the same command draws the same numbers for that batch
    in every run."""
    generator = getattr(engine, "generator", None)
    if generator is not None:
        generator.manual_seed(seed * 1_000_003 + index)


def uses_gradients(name: str) -> bool:
    """True when the method's map is a function of the target layer's gradients (its pure
    (activations, gradients) function needs them): what evaluate's gradient-noise robustness measures.
    Methods with no such function (scorecam, ablationcam, fullgrad) or whose function ignores the gradients
    (``gradients=None`` by default: eigencam, kpcacam) -> False."""
    from ..methods import from_features_fn

    fn = from_features_fn(name)
    if fn is None:
        return False
    parameters = list(inspect.signature(fn).parameters.values())  # (activations, gradients, ...)
    return len(parameters) > 1 and parameters[1].default is not None


def add_smoothing_arguments(group) -> None:
    group.add_argument("--aug-smooth", action="store_true",
                       help="average the maps of 6 copies of each image (mirrored or not, x 0.9, 1.0, 1.1 "
                            "intensity), as pytorch-grad-cam: 6x the work; maps at the input size")
    group.add_argument("--eigen-smooth", action="store_true",
                       help="the first principal component of the weighted activations instead of their sum")


def smoothing(args: argparse.Namespace) -> dict:
    """--aug-smooth / --eigen-smooth as the engines' keyword arguments (they change the maps)."""
    return {"aug_smooth": bool(args.aug_smooth), "eigen_smooth": bool(args.eigen_smooth)}


# ---------------------------------------------------------------------------------------------------
# Model and device.

def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                       help="'efficientnet_lite0' (pretrained ImageNet, the default), a torchvision or timm "
                            "model name ('resnet50', 'timm:convnext_tiny'); only efficientnet_lite0 comes "
                            "with weights, others are random unless --weights is given")
    group.add_argument("--weights", metavar="FILE", help="state dict (.pth) to load into --model")
    group.add_argument("--num-classes", type=int, metavar="N",
                       help="number of classes of --model (e.g. 2 for a fine-tuned binary ResNet)")
    group.add_argument("--layer", metavar="NAME",
                       help="dotted target layer, e.g. 'layer4', 'layer4.-1', 'features.8' "
                            "(default: the model's last spatial feature map, e.g. 'layer4' for ResNets; "
                            "'blocks.6' for efficientnet_lite0; for ViT/DeiT the last block's norm1 and for Swin "
                            "the last stage, their tokens laid on the patch grid, also for a --layer you name)")
    group.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                       help="'auto' (cuda if available, else cpu), 'cpu', 'cuda' or 'cuda:N' (default auto)")


def resolve_device(spec: str) -> torch.device:
    """'auto' -> cuda if available else cpu; 'cpu', 'cuda', 'cuda:N'."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or (spec.startswith("cuda:") and spec[5:].isdigit()):
        if not torch.cuda.is_available():
            raise CLIError(f"--device: {spec!r} asked for, but CUDA is not available here; use --device cpu")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device: no {spec!r}; {torch.cuda.device_count()} CUDA device(s) visible")
        return device
    raise CLIError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")


def check_model_arguments(args: argparse.Namespace) -> None:
    """The checks that need no model: --num-classes, the --weights file exists."""
    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes: expected a positive int, got {args.num_classes}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise CLIError(f"--weights: no such file: {args.weights!r}")


def default_target(model: torch.nn.Module, info) -> tuple[str | None, object]:
    """(default layer, reshape_transform or None): ``cfcam_gpu.reshape.default_target`` for the families
    it knows (ViT/DeiT/Swin get their token reshape), else the probed last (B, C, h, w) feature map
    (``ModelInfo.default_layer``; None for a model whose last layers output tokens)."""
    from ..reshape import default_target as family_target

    try:
        layer, transform = family_target(model)
    except ValueError:
        return info.default_layer, None
    return layer, transform


def load_model(args: argparse.Namespace, device: torch.device):
    """--model/--weights/--num-classes/--layer -> (model, ModelInfo, layer name, reshape_transform).

    The architecture is built (random, or the packaged efficientnet_lite0 weights; random weights drawn
    from ``args.seed`` when it is set, so every run builds the same model) and the layer checked
    before ``--weights`` is read. The default layer (``default_target``); a layer of a transformer family
    gets the reshape its module calls for (``reshape.layer_transform``: none for a convolution). CLIError
    on unknown names, TorchScript models (CAMs need forward hooks), unknown layers, no default layer, and
    missing or mismatched weights.
    """
    from ..layers import resolve_layer
    from ..reshape import layer_transform
    from .models import build_model, load_weights

    check_model_arguments(args)
    seed = getattr(args, "seed", None)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            if seed is not None:
                torch.manual_seed(seed)  # random weights (and a new head) are the same in every run
            model, info = build_model(args.model, num_classes=args.num_classes, device=device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise CLIError(option_message(error)) from None
    if isinstance(model, torch.jit.ScriptModule):
        raise CLIError(
            f"--model: {args.model!r} is a TorchScript model; CAMs need a forward hook on the target "
            "layer and TorchScript modules do not support hooks (register_forward_hook is not supported "
            "on ScriptModules). Save the eager model's state_dict() instead and pass "
            "--model ARCH --weights FILE")
    default_layer, transform = default_target(model, info)
    layer = args.layer or default_layer
    if layer is None:
        raise CLIError(f"--layer: no default target layer found for {args.model!r} (its last layers do not "
                       "output a (B, C, h, w) feature map; token layouts are reshaped for ViT, DeiT and Swin "
                       "only); name a layer that outputs (B, C, h, w) with --layer")
    try:
        module = resolve_layer(model, layer)
    except (ValueError, TypeError) as error:
        raise CLIError(option_message(error)) from None
    if transform is not None:  # a transformer family: the reshape the layer itself calls for
        transform = layer_transform(model, module)
    if args.weights is not None:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
                load_weights(model, args.weights)
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise CLIError(option_message(error)) from None
    return model, info, layer, transform


# ---------------------------------------------------------------------------------------------------
# Inputs and data loading.

def input_paths(paths) -> list[Path]:
    """The image files named by PATH... (files, folders searched recursively, .txt lists), sorted per
    argument; CLIError when one is missing or none is found."""
    from .data import expand_paths

    try:
        found = expand_paths(paths)
    except (FileNotFoundError, OSError) as error:
        raise CLIError(option_message(error)) from None
    if not found:
        raise CLIError(f"no images found in {' '.join(map(str, paths))} (looked for "
                       f"{' '.join(IMAGE_EXTENSIONS)} files)")
    return found


def add_data_arguments(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                       help=f"images per CAM batch (default {batch_size})")
    default_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    group.add_argument("--workers", type=int, default=default_workers, metavar="N",
                       help=f"DataLoader worker processes decoding images (default {default_workers})")
    add_max_pixels_argument(group)


def add_max_pixels_argument(group) -> None:
    group.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                       help="refuse image files whose header claims more than N pixels (width x height), "
                            f"with an error row (default {DEFAULT_MAX_PIXELS})")


def check_max_pixels(args: argparse.Namespace) -> None:
    if args.max_pixels < 1:
        raise CLIError(f"--max-pixels: expected a positive int, got {args.max_pixels}")


def check_data_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive int, got {args.batch_size}")
    if args.workers < 0:
        raise CLIError(f"--workers: expected an int >= 0, got {args.workers}")
    check_max_pixels(args)


def quiet_worker(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C and SIGTERM: the main process handles them and stops its workers
    (which also stop by themselves when the main process is gone), so a signal sent to the whole process
    group prints no traceback per worker, and no worker dies under the loader's feet."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, batch_size: int, workers: int, device: torch.device):
    """DataLoader over an ImageFolderDataset (or ArrayDataset) yielding data.Batch, in order; its worker
    processes ignore Ctrl-C and SIGTERM (``quiet_worker``)."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=dataset.collate, pin_memory=device.type == "cuda",
                      persistent_workers=False, worker_init_fn=quiet_worker if workers else None)
