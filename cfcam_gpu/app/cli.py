"""Command line: ``cfcam explain PATH... [options]`` (also ``python -m cfcam_gpu explain ...``).

Subcommands are registered in ``SUBCOMMANDS`` (name -> ``Subcommand``): each brings a function that adds
its arguments to its argparse sub-parser and a function that runs it and returns the exit code. Add one
with ``register_subcommand(name, help, add_arguments)`` used as a decorator on the run function, or by
putting a ``Subcommand`` in the dict before ``main`` runs. The model, device and data-loading helpers
below (``add_model_arguments``, ``load_model``, ``resolve_device``, ``make_loader``, ...) are meant to be
shared by subcommands.

Exit codes: 0 success, 1 some images failed (the rest are explained), 2 usage or configuration error
(one line on stderr, no traceback), 130 interrupted.

``explain`` also runs as several processes under ``torchrun`` (see ``distributed``): each rank explains
a shard of the sorted inputs and rank 0 merges the per-rank manifests at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from ..engine import CFCAM, GradCAM
from .data import ImageFolderDataset, Sample, bundled_images, display_images, expand_paths, normalize
from .viz import contact_sheet, overlay, save_png

PROG = "cfcam"
MANIFEST = "manifest.jsonl"
RANK_MANIFEST = "manifest.rank{rank}.jsonl"  # one per rank of a torchrun job, merged into MANIFEST at the end
_RANK_MANIFEST_RE = re.compile(r"manifest\.rank(\d+)\.jsonl")
_TEMPORARY_RE = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")  # save_npy / write_text_atomic / viz.save_png
RUN_CONFIG = "run.json"
CONTACT_SHEET = "contact_sheet.png"
SHEET_MAX_TILES = 100  # the contact sheet shows the first 100 explained images
WRITE_THREADS = max(1, min(4, os.cpu_count() or 1))  # PNG encoding releases the GIL
MAX_BATCHES_IN_FLIGHT = 4  # batches explained but not yet written (bounds host memory)
DEMO_PREFIX = "bundled:"  # manifest path of a bundled photo: "bundled:chelsea"


class CLIError(Exception):
    """A usage or configuration error: ``main`` prints ``cfcam: error: MESSAGE`` and returns ``code``."""

    def __init__(self, message: str, code: int = 2, echo: bool = True):
        super().__init__(message)
        self.code = code
        self.echo = echo  # False: not printed (under torchrun, rank 0 prints an error every rank shares)


# ---------------------------------------------------------------------------------------------------
# Subcommand registry.

@dataclass(frozen=True)
class Subcommand:
    """One subcommand: ``add_arguments(parser)`` fills its sub-parser, ``run(args) -> exit code``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def register_subcommand(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                        description: str | None = None):
    """Decorator: register ``run(args) -> int`` as subcommand ``name``."""

    def decorate(run: Callable[[argparse.Namespace], int]):
        SUBCOMMANDS[name] = Subcommand(help, add_arguments, run, description)
        return run

    return decorate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Batched CF-CAM (clustered, guided-filtered Grad-CAM) explanations.")
    try:
        from .. import __version__
    except ImportError:  # a stale editable install that sees the package as a namespace
        __version__ = "?"
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.description or sub.help,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args._run(args)
    except CLIError as error:
        if error.echo:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------------------------------------------
# Shared helpers: model, device, data.

# Library messages start with the parameter name; the CLI names the option instead.
_OPTION_FOR_PARAMETER = {"name": "--model", "weights": "--weights", "num_classes": "--num-classes",
                         "target_layer": "--layer", "targets": "--target"}


def option_message(error: BaseException) -> str:
    """'name: unknown model ...' -> '--model: unknown model ...'."""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    head, sep, rest = message.partition(": ")
    if sep and head in _OPTION_FOR_PARAMETER:
        return f"{_OPTION_FOR_PARAMETER[head]}: {rest}"
    return message


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
                            "(default: the last spatial feature map, e.g. 'bn2' for efficientnet_lite0)")
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


def load_model(args: argparse.Namespace, device: torch.device):
    """build_model from --model/--weights/--num-classes -> (model, ModelInfo, layer name); CLIError on
    unknown names, missing or mismatched weights, TorchScript files and unknown layers."""
    from ..layers import resolve_layer
    from .models import build_model

    if args.num_classes is not None and args.num_classes < 1:
        raise CLIError(f"--num-classes: expected a positive int, got {args.num_classes}")
    if args.weights is not None and not Path(args.weights).is_file():
        raise CLIError(f"--weights: no such file: {args.weights!r}")
    try:
        with warnings.catch_warnings():  # torch.load's "looks like a TorchScript archive": we say it below
            warnings.filterwarnings("ignore", message=".*TorchScript archive", category=UserWarning)
            model, info = build_model(args.model, weights=args.weights, num_classes=args.num_classes,
                                      device=device)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise CLIError(option_message(error)) from None
    if isinstance(model, torch.jit.ScriptModule):
        raise CLIError(
            f"--model: {args.model!r} is a TorchScript model; CAMs need a forward hook on the target "
            "layer and TorchScript modules do not support hooks (register_forward_hook is not supported "
            "on ScriptModules). Save the eager model's state_dict() instead and pass "
            "--model ARCH --weights FILE")
    layer = args.layer or info.default_layer
    if layer is None:
        raise CLIError(f"--layer: no default target layer found for {args.model!r} (no module outputs a "
                       "(B, C, h, w) feature map); name one with --layer")
    try:
        resolve_layer(model, layer)
    except (ValueError, TypeError) as error:
        raise CLIError(option_message(error)) from None
    return model, info, layer


def add_data_arguments(parser: argparse.ArgumentParser, batch_size: int = 16) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--batch-size", type=int, default=batch_size, metavar="N",
                       help=f"images per CAM batch (default {batch_size})")
    default_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    group.add_argument("--workers", type=int, default=default_workers, metavar="N",
                       help=f"DataLoader worker processes decoding images (default {default_workers})")


def check_data_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive int, got {args.batch_size}")
    if args.workers < 0:
        raise CLIError(f"--workers: expected an int >= 0, got {args.workers}")


def make_loader(dataset, batch_size: int, workers: int, device: torch.device):
    """DataLoader over an ImageFolderDataset (or subclass) yielding data.Batch, in order."""
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=dataset.collate, pin_memory=device.type == "cuda",
                      persistent_workers=False)


class ArrayDataset(ImageFolderDataset):
    """ImageFolderDataset over in-memory (H, W, 3) uint8 arrays (the bundled photos); paths are labels."""

    def __init__(self, keys: Sequence[str], arrays: Sequence[np.ndarray], size, mean, std):
        super().__init__([Path(k) for k in keys], size, mean, std)
        self.arrays = list(arrays)

    def __getitem__(self, index: int) -> Sample:
        display = display_images([self.arrays[index]], self.size)  # (1, 3, H, W) in [0, 1], as the files
        model_input = normalize(display, self.mean, self.std)[0]
        display_u8 = (display[0] * 255).round().clamp(0, 255).to(torch.uint8)
        return Sample(model_input, display_u8, index, True, "")


# ---------------------------------------------------------------------------------------------------
# Output files.

def save_npy(array: np.ndarray, path: Path) -> Path:
    """np.save to a temporary file in the target folder, then os.replace: never a partial file."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            np.save(file, array)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "x", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def read_manifest(path: Path) -> list[dict]:
    """Rows of a manifest.jsonl; a line that is not a JSON object (an interrupted write) is dropped."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("path"), str):
            rows.append(row)
    return rows


def _row_files_exist(row: dict, out: Path) -> bool:
    files = row.get("files")
    return (isinstance(files, dict) and bool(files)
            and all(isinstance(f, str) and (out / f).is_file() for f in files.values()))


def output_names(keys: Sequence[str], stems: Sequence[str]) -> list[str]:
    """One output name per input: its stem, unique (case-insensitively) across the run.

    Inputs sharing a stem (``a/cat.png``, ``b/cat.jpg``) get ``stem_HASH``, HASH = the first 8 hex digits
    of the SHA-1 of the input's path relative to the deepest folder the clashing inputs share, so the
    names do not depend on where the data set lives or on the other inputs of the run.
    """
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem.casefold(), []).append(i)
    names = list(stems)
    for members in groups.values():
        if len(members) < 2:
            continue
        paths = [keys[i] for i in members]
        try:
            root = os.path.commonpath(paths)
        except ValueError:  # mixed drives or mixed absolute/relative: hash the whole path
            root = ""
        for i in members:
            relative = Path(os.path.relpath(keys[i], root) if root else keys[i]).as_posix()
            names[i] = f"{stems[i]}_{hashlib.sha1(relative.encode()).hexdigest()[:8]}"
    seen: dict[str, int] = {}
    for i, name in enumerate(names):  # a literal "x_1a2b3c4d" stem clashing with a hashed one
        while name.casefold() in seen:
            name = f"{name}_{i}"
        seen[name.casefold()] = i
        names[i] = name
    return names


def rank_manifests(out: Path, names: Sequence[str] | None = None) -> list[Path]:
    """DIR's per-rank manifests (``manifest.rank{R}.jsonl``, left by a torchrun job), by rank; ``names``:
    DIR's file names if already listed."""
    if names is None:
        names = os.listdir(out) if out.is_dir() else []
    found = [(int(m.group(1)), name) for name in names if (m := _RANK_MANIFEST_RE.fullmatch(name))]
    return [out / name for _, name in sorted(found)]


def _in_order(rows: list[dict], order: Sequence[str] | None) -> list[dict]:
    """``rows`` sorted by their path's place in ``order`` (paths not in it last, as they were)."""
    if order is None:
        return rows
    index = {key: i for i, key in enumerate(order)}
    return sorted(rows, key=lambda row: index.get(row["path"], len(index)))


def gather_manifests(out: Path, order: Sequence[str] | None = None, rank_files: list[Path] | None = None
                     ) -> tuple[list[dict], list[Path], bool]:
    """The rows of DIR's manifest and of any per-rank manifests, one per path (a per-rank row replaces the
    merged one), in ``order`` -> (rows, the per-rank files, whether any file had content)."""
    manifest = out / MANIFEST
    rank_files = rank_manifests(out) if rank_files is None else rank_files
    files = ([manifest] if manifest.is_file() else []) + rank_files
    has_rows = any(path.stat().st_size > 0 for path in files)
    rows: dict[str, dict] = {}
    for path in files:
        for row in read_manifest(path):
            rows.pop(row["path"], None)
            rows[row["path"]] = row
    return _in_order(list(rows.values()), order), rank_files, has_rows


def merge_manifests(out: Path, order: Sequence[str] | None = None) -> list[dict]:
    """Fold DIR's per-rank manifests into DIR/manifest.jsonl (rows in ``order``, atomically), then delete
    them; returns the rows. Nothing happens when there are no per-rank manifests."""
    rows, rank_files, _ = gather_manifests(out, order)
    if rank_files:
        write_text_atomic(out / MANIFEST, "".join(json.dumps(row) + "\n" for row in rows))
        for path in rank_files:
            path.unlink(missing_ok=True)
    return rows


def prepare_output(out: Path, resume: bool, overwrite: bool, config: dict,
                   order: Sequence[str] | None = None) -> list[dict]:
    """Create/check DIR; returns the manifest rows to keep (resume) and rewrites the manifest to them.

    The rows of a torchrun job that did not finish (per-rank manifests) count as DIR's: they are merged
    into DIR/manifest.jsonl, kept rows sorted by their path's place in ``order`` (the inputs) if given.
    Temporary files an abruptly killed run left behind are deleted.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out: {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cfcam-write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise CLIError(f"--out: cannot write to {str(out)!r} ({error.strerror or error})") from None
    manifest = out / MANIFEST
    names = os.listdir(out)  # once: DIR can hold millions of files
    previous, rank_files, has_rows = gather_manifests(out, order, rank_manifests(out, names))
    if overwrite:
        for row in previous:
            for name in (row.get("files") or {}).values():
                if isinstance(name, str) and "/" not in name and "\\" not in name:
                    (out / name).unlink(missing_ok=True)
        for path in [out / name for name in (MANIFEST, RUN_CONFIG, CONTACT_SHEET)] + rank_files:
            path.unlink(missing_ok=True)
        previous, rank_files, has_rows = [], [], False
    elif has_rows and not resume:
        what = (f"{MANIFEST} is not empty" if manifest.is_file() and manifest.stat().st_size > 0 else
                "the per-rank manifests of an unfinished torchrun job")
        raise CLIError(f"--out: {str(out)!r} already holds a run ({what}); pass --resume to explain only "
                       "the images not done yet, --overwrite to start over, or another --out")
    if resume and (out / RUN_CONFIG).is_file():
        try:
            old = json.loads((out / RUN_CONFIG).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, OSError):
            old = {}
        changed = [f"{key} {old.get(key)!r} -> {value!r}" for key, value in config.items()
                   if key in old and old[key] != value]
        if changed:
            raise CLIError(f"--resume: {str(out)!r} was made with other settings ({'; '.join(changed)}); "
                           "rerun with the same options, or pass --overwrite or another --out")
    for name in names:  # a killed run's half-written files (the names save_npy & co. use)
        if _TEMPORARY_RE.fullmatch(name) and (out / name).is_file():
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / RUN_CONFIG, json.dumps(config, indent=2) + "\n")
    kept = [row for row in previous if row.get("status") == "ok" and _row_files_exist(row, out)]
    if has_rows or rank_files:  # compact: drop error rows, rows whose files are gone, half-written lines
        write_text_atomic(manifest, "".join(json.dumps(row) + "\n" for row in kept))
        for path in rank_files:
            path.unlink(missing_ok=True)
    return kept


# ---------------------------------------------------------------------------------------------------
# explain

EXPLAIN_DESCRIPTION = """\
Explain images with CF-CAM (or Grad-CAM). For each image DIR gets NAME_cfcam.png (the heatmap over the
resized image), NAME_cfcam.npy (the raw CAM, float32 in [0, 1], at the layer's resolution) and a row in
DIR/manifest.jsonl; DIR/contact_sheet.png shows the overlays. NAME is the input's file stem (with a short
hash when two inputs share a stem).

examples:
  cfcam explain --demo --out demo
  cfcam explain photos/ --out cams --batch-size 32
  cfcam explain test/ --model resnet50 --num-classes 2 --weights best_model.pth --layer layer4
  cfcam explain list.txt --target 281 --method gradcam --json

exit status: 0 all explained, 1 some images failed (see stderr and the manifest), 2 bad usage."""


AMP_CHOICES = {"off": False, "bf16": "bfloat16", "fp16": "float16"}


def add_explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="image files, folders (searched recursively) or .txt lists of paths")
    parser.add_argument("--demo", action="store_true",
                        help="explain the photos bundled with scikit-image/scikit-learn (chelsea, coffee, "
                             "...) instead of PATHs")
    add_model_arguments(parser)
    group = parser.add_argument_group("CAM")
    group.add_argument("--method", choices=("cfcam", "gradcam"), default="cfcam",
                       help="cfcam (default) or plain gradcam")
    group.add_argument("--target", default="top1", metavar="top1|INT",
                       help="class to explain: 'top1' (each image's predicted class, the default) or a "
                            "class index for every image")
    group = parser.add_argument_group("speed")
    group.add_argument("--amp", choices=tuple(AMP_CHOICES), default="off",
                       help="autocast the model pass to bf16 or fp16 (clustering and filtering stay float32 "
                            "or better; default off)")
    group.add_argument("--channels-last", action="store_true",
                       help="run the model in the channels-last memory format")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model pass (the first batch of each shape compiles; on the "
                            "CPU this needs a C++ compiler)")
    add_data_arguments(parser)
    group = parser.add_argument_group("output")
    group.add_argument("--out", default="out", metavar="DIR", help="output folder (default: out)")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="keep the images DIR's manifest lists as ok (with their files); explain the rest")
    mode.add_argument("--overwrite", action="store_true", help="delete DIR's previous outputs first")
    group.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    group.add_argument("--json", action="store_true", help="print a JSON summary on stdout")


def parse_target(spec: str) -> int | None:
    """'top1' -> None; 'INT' -> the class index; CLIError otherwise."""
    text = spec.strip().lower()
    if text in ("top1", "top-1"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise CLIError(f"--target: expected 'top1' or a class index, got {spec!r}") from None
    if value < 0:
        raise CLIError(f"--target: expected a class index >= 0, got {value}")
    return value


@dataclass
class _Item:
    key: str  # manifest path: absolute file path, or "bundled:NAME"
    stem: str
    name: str = ""


def _collect_inputs(args: argparse.Namespace):
    """-> (items, arrays or None)."""
    if args.demo:
        if args.paths:
            raise CLIError("--demo: explains the bundled photos; give either PATHs or --demo, not both")
        photos = bundled_images()
        if not photos:
            raise CLIError("--demo: no bundled photos found (scikit-image / scikit-learn sample data)")
        items = [_Item(DEMO_PREFIX + name, name) for name, _ in photos]
        arrays = [image for _, image in photos]
    else:
        if not args.paths:
            raise CLIError("no input: give image files, folders or .txt lists, or --demo")
        try:
            paths = expand_paths(args.paths)
        except (FileNotFoundError, OSError) as error:
            raise CLIError(option_message(error).replace("paths: ", "PATH: ", 1)) from None
        if not paths:
            raise CLIError(f"no images found in {' '.join(args.paths)} (looked for .jpg .jpeg .png .bmp .webp "
                           ".tif .tiff files)")
        items = [_Item(os.path.abspath(p), p.stem) for p in paths]
        arrays = None
    for item, name in zip(items, output_names([i.key for i in items], [i.stem for i in items])):
        item.name = name
    return items, arrays


def _short(path: str) -> str:
    if path.startswith(DEMO_PREFIX):
        return path
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


def _config_message(error: Exception) -> str:
    message = option_message(error)
    if "for transformer tokens" in message:  # the library's reshape_transform hint: no CLI option for it
        message = message.split("; for transformer tokens")[0] + (
            "; pick a layer that outputs a spatial feature map (B, C, h, w), e.g. the default (omit --layer)")
    return message


def _is_config_error(error: Exception) -> bool:
    return isinstance(error, (ValueError, TypeError)) and str(error).startswith(
        ("target_layer:", "model:", "targets:"))


@register_subcommand("explain", "explain images with CF-CAM / Grad-CAM heatmaps", add_explain_arguments,
                     EXPLAIN_DESCRIPTION)
def run_explain(args: argparse.Namespace) -> int:
    try:
        ctx = distributed.context()
    except ValueError as error:
        raise CLIError(str(error)) from None
    try:
        code = _run_explain(args, ctx)
        if ctx.distributed:
            # The other ranks wait here until rank 0 has merged the manifests and written its files:
            # a rank that exits early with status 1 would make torchrun stop rank 0 mid-write.
            distributed.barrier()
        return code
    except CLIError as error:
        if ctx.rank > 0 and error.echo:  # an error of this rank alone: say which
            raise CLIError(f"rank {ctx.rank}: {error}", error.code) from None
        raise
    finally:
        distributed.destroy()


class _SameOnEveryRank:
    """``with _SameOnEveryRank(ctx):`` a CLIError raised inside comes from the options or the inputs, which
    every rank of a torchrun job shares: only rank 0 prints it."""

    def __init__(self, ctx: distributed.Context):
        self.ctx = ctx

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, CLIError) and self.ctx.rank > 0:
            error.echo = False
        return False


def _run_explain(args: argparse.Namespace, ctx: distributed.Context) -> int:
    started = time.perf_counter()
    with _SameOnEveryRank(ctx):
        target = parse_target(args.target)
        check_data_arguments(args)
    # under torchrun, 'auto' / 'cuda' is this process's GPU, cuda:LOCAL_RANK
    device = resolve_device(distributed.device_spec(args.device, ctx))
    with _SameOnEveryRank(ctx):
        items, arrays = _collect_inputs(args)  # all of them, on every rank: the output names depend on all
        out = Path(args.out)
        config = {"model": args.model, "weights": os.path.abspath(args.weights) if args.weights else None,
                  "num_classes": args.num_classes, "layer": args.layer, "method": args.method,
                  "target": "top1" if target is None else target, "amp": args.amp}
        # Check the model before touching DIR, so a typo in --model leaves DIR as it was.
        model, info, layer = load_model(args, device)
        config["layer"] = layer
        if target is not None and target >= info.num_classes:
            raise CLIError(f"--target: expected 'top1' or a class index in [0, {info.num_classes}) for "
                           f"{args.model!r}, got {target}")
    distributed.init(device)  # a process group only under torchrun with WORLD_SIZE > 1
    if ctx.distributed and args.weights is None:
        distributed.broadcast_module(model)  # random weights: every rank uses rank 0's
    keys = [item.key for item in items]

    # Rank 0 prepares DIR (checks, run.json, resume: merges what a previous run left); the others wait for
    # its outcome: an error every rank raises, or the indices of the inputs already done.
    outcome: tuple[str, int] | list[int] | None = None
    if ctx.is_main:
        try:
            kept = prepare_output(out, args.resume, args.overwrite, config, order=keys)
        except CLIError as error:
            distributed.broadcast_object((str(error), error.code))
            raise
        done_keys = {row["path"] for row in kept}
        outcome = [i for i, key in enumerate(keys) if key in done_keys]
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, tuple):
        raise CLIError(outcome[0], outcome[1], echo=False)
    done = set(outcome)
    pending_all = [i for i in range(len(items)) if i not in done]
    n_skipped = len(items) - len(pending_all)
    pending = distributed.shard(pending_all, ctx.rank, ctx.world_size)  # this rank's share of the work
    manifest_path = out / (RANK_MANIFEST.format(rank=ctx.rank) if ctx.distributed else MANIFEST)

    quiet = args.quiet or not ctx.is_main
    log = (lambda message: None) if quiet else (lambda message: tqdm.write(message, file=sys.stderr))
    processes = f" x {ctx.world_size} processes" if ctx.distributed else ""
    log(f"{PROG}: {args.method} on {args.model} at layer {layer!r}, {device}{processes}; {len(pending_all)} "
        f"image(s) to explain" + (f", {n_skipped} already done" if n_skipped else "") + f" -> {out}")

    engine_class = CFCAM if args.method == "cfcam" else GradCAM
    engine = engine_class(model, layer, amp=AMP_CHOICES[args.amp], channels_last=args.channels_last,
                          compile=args.compile)
    if arrays is not None:
        dataset = ArrayDataset([items[i].key for i in pending], [arrays[i] for i in pending],
                               info.input_size, info.mean, info.std)
    else:
        dataset = ImageFolderDataset([Path(items[i].key) for i in pending], **info.preprocess)
    counts = {"ok": 0, "error": 0}
    loop_started = time.perf_counter()
    progress = tqdm(total=len(pending), file=sys.stderr, unit="img", dynamic_ncols=True,
                    desc=f"rank 0 of {ctx.world_size}" if ctx.distributed else None,
                    disable=quiet or not sys.stderr.isatty())
    loader = make_loader(dataset, args.batch_size, args.workers, device) if pending else ()
    try:
        with open(manifest_path, "a", encoding="utf-8") as manifest, \
                ThreadPoolExecutor(max_workers=WRITE_THREADS, thread_name_prefix="cfcam-write") as writer:
            _explain_loop(loader, engine, items, pending, target, info, device, out, args.method, writer,
                          manifest, counts, progress)
    except OSError as error:
        raise CLIError(f"--out: writing to {str(out)!r} failed ({error})", code=1) from None
    finally:
        progress.close()
        engine.close()
    if ctx.distributed:
        distributed.barrier()  # every rank's rows are committed to its manifest
        totals = distributed.all_reduce_sum(torch.tensor([counts["ok"], counts["error"]], dtype=torch.int64))
        n_ok, n_failed = (int(n) for n in totals.tolist())
    else:
        n_ok, n_failed = counts["ok"], counts["error"]
    seconds = time.perf_counter() - loop_started
    if not ctx.is_main:
        return 1 if n_failed else 0

    if ctx.distributed:  # one manifest.jsonl, in input order, as one process writes it
        rows = {row["path"]: row for row in merge_manifests(out, order=keys)}
    else:
        rows = {row["path"]: row for row in read_manifest(out / MANIFEST)}
    ok_rows = [rows[item.key] for item in items if item.key in rows and rows[item.key].get("status") == "ok"]
    sheet_rows = ok_rows[:SHEET_MAX_TILES]
    n_blank = sum(bool(row.get("blank")) for row in ok_rows)
    if n_blank:
        print(f"{PROG}: warning: {n_blank} of {len(ok_rows)} CAMs are all zero (blank heatmaps): no channel "
              f"cluster at layer {layer!r} has a positive weight with non-zero activations (e.g. only dead, "
              "all-zero channels clustered); try another --layer or --method gradcam", file=sys.stderr)
    if sheet_rows:
        _write_contact_sheet(out, sheet_rows)

    summary = {"n_images": len(items), "n_ok": n_ok, "n_failed": n_failed, "n_skipped": n_skipped,
               "n_blank": n_blank,
               "seconds": round(seconds, 3), "images_per_s": round(n_ok / seconds, 2) if seconds > 0 else None,
               "total_seconds": round(time.perf_counter() - started, 3), "out": str(out.resolve()),
               "manifest": str((out / MANIFEST).resolve()),
               "contact_sheet": str((out / CONTACT_SHEET).resolve()) if sheet_rows else None,
               "model": args.model, "layer": layer, "method": args.method, "target": config["target"],
               "device": str(device), "batch_size": args.batch_size, "workers": args.workers,
               "world_size": ctx.world_size}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        rate = f" ({summary['images_per_s']} images/s)" if n_ok else ""
        print(f"{PROG}: {n_ok} explained, {n_failed} failed, {n_skipped} already done in {seconds:.1f} s"
              f"{rate}{processes} -> {out}", file=sys.stderr)
    return 1 if n_failed else 0


def _explain_loop(loader, engine, items, pending, target, info, device, out, method, writer, manifest,
                  counts, progress) -> None:
    """Explain batch after batch; the files are written by ``writer`` threads while the next batch runs.

    A batch's manifest rows are appended (flushed, fsynced) once all its files are written, in batch order,
    so an ok row always names files that exist. On an error or Ctrl-C the batches already written are
    still committed.
    """
    in_flight: deque[tuple[list[dict], list[Future]]] = deque()

    def commit() -> None:
        rows, futures = in_flight.popleft()
        for future in futures:
            future.result()  # re-raises a failed write
        for row in rows:
            manifest.write(json.dumps(row) + "\n")
        manifest.flush()
        os.fsync(manifest.fileno())
        for row in rows:
            counts["ok" if row["status"] == "ok" else "error"] += 1
        progress.update(len(rows))
        _test_hook_die(counts["ok"] + counts["error"])

    try:
        for batch in loader:
            rows = [{"path": str(path), "status": "error", "error": message} for path, message in batch.failures]
            for path, message in batch.failures:
                tqdm.write(f"{PROG}: warning: skipped {_short(str(path))}: {message}", file=sys.stderr)
            files: list[tuple[Path, np.ndarray]] = []
            if len(batch.indices):
                batch_items = [items[pending[int(j)]] for j in batch.indices]
                explained, files = _explain_batch(engine, batch, batch_items, target, info, device, out,
                                                  method)
                rows += explained
            in_flight.append((rows, [writer.submit(_write_file, path, array) for path, array in files]))
            while len(in_flight) > MAX_BATCHES_IN_FLIGHT or (in_flight and all(
                    f.done() for f in in_flight[0][1])):
                commit()
        while in_flight:
            commit()
    except BaseException:
        while in_flight and all(f.done() or f.cancel() for f in in_flight[0][1]):
            try:
                commit()
            except Exception:  # noqa: BLE001 - the original error is the one to report
                break
        raise


def _test_hook_die(n_committed: int) -> None:
    """Test hook (tests/test_distributed.py kills a rank mid-run with it; unset, it does nothing): with
    CFCAM_TEST_DIE_AFTER=N in the environment, the process of rank CFCAM_TEST_DIE_RANK (default 0) exits at
    once with status 1 (os._exit: no cleanup, as if killed) when N or more of its images are committed."""
    after = os.environ.get("CFCAM_TEST_DIE_AFTER")
    if after and n_committed >= int(after) and \
            distributed.context().rank == int(os.environ.get("CFCAM_TEST_DIE_RANK", "0")):
        os._exit(1)


def _write_file(path: Path, array: np.ndarray) -> None:
    if path.suffix == ".npy":
        save_npy(array, path)
    else:
        save_png(array, path)


def _explain_batch(engine, batch, batch_items, target, info, device, out, method):
    """CAMs of the good images of one batch -> (manifest rows, [(path, array) to write]).

    If the batch fails as a whole (a NaN in one image, out of memory), its images are explained one by one
    so that only the culprits get error rows. Configuration errors (the layer does not output a feature
    map, ...) stop the run with exit 2.
    """
    images = batch.images.to(device, non_blocking=True)
    displays = batch.displays.to(device, non_blocking=True)
    try:
        groups = [(slice(0, len(batch_items)), engine(images, target))]
    except Exception as error:  # noqa: BLE001 - retried per image below
        if _is_config_error(error):
            raise CLIError(_config_message(error)) from None
        if len(batch_items) == 1:
            groups = [(slice(0, 1), error)]
        else:
            groups = []
            for i in range(len(batch_items)):
                try:
                    groups.append((slice(i, i + 1), engine(images[i:i + 1], target)))
                except Exception as single_error:  # noqa: BLE001 - reported in the manifest
                    if _is_config_error(single_error):
                        raise CLIError(_config_message(single_error)) from None
                    groups.append((slice(i, i + 1), single_error))
    rows, files = [], []
    for where, result in groups:
        part = batch_items[where]
        if isinstance(result, Exception):
            message = f"{type(result).__name__}: {str(result).strip().splitlines()[0] if str(result) else ''}"
            for item in part:
                tqdm.write(f"{PROG}: warning: failed {_short(item.key)}: {message}", file=sys.stderr)
                rows.append({"path": item.key, "status": "error", "error": message})
            continue
        part_rows, part_files = _outputs(result, displays[where], part, info, out, method)
        rows += part_rows
        files += part_files
    return rows, files


def _outputs(result, displays, items, info, out, method):
    """Manifest rows and (path, array) files for one CAMResult; arrays are on the CPU, ready to write."""
    overlays = overlay(displays, result.cams)  # bilinear to the display size, JET, 0.4 heat + 0.6 image
    # to uint8 on the device (as viz.to_uint8_image rounds), then one copy of (B, H, W, 3) to the host
    overlays = (overlays * 255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    probs = result.logits.float().softmax(dim=1)
    top_p, top_i = probs.max(dim=1)
    stats = {"top_i": top_i, "top_p": top_p, "target": result.targets,
             "target_p": probs.gather(1, result.targets[:, None])[:, 0],
             "blank": result.cams.flatten(1).amax(dim=1) <= 0}
    if result.labels is not None:
        stats.update(n_clusters=result.n_clusters, noise=(result.labels < 0).sum(dim=1), eps=result.eps)
    stats = {key: value.cpu().tolist() for key, value in stats.items()}
    cams = result.cams.float().cpu().numpy()
    overlays = overlays.cpu().numpy()
    rows, files = [], []
    for i, item in enumerate(items):
        overlay_name, cam_name = f"{item.name}_{method}.png", f"{item.name}_{method}.npy"
        files += [(out / overlay_name, overlays[i]), (out / cam_name, np.ascontiguousarray(cams[i]))]
        predicted, tgt = stats["top_i"][i], stats["target"][i]
        rows.append({
            "path": item.key, "status": "ok", "error": None,
            "predicted": predicted, "predicted_name": info.class_names[predicted],
            "probability": round(stats["top_p"][i], 6),
            "target": tgt, "target_name": info.class_names[tgt],
            "target_probability": round(stats["target_p"][i], 6),
            "n_clusters": stats["n_clusters"][i] if "n_clusters" in stats else None,
            "noise_channels": stats["noise"][i] if "noise" in stats else None,
            "eps": round(stats["eps"][i], 6) if "eps" in stats else None,
            "blank": stats["blank"][i],  # an all-zero CAM: no positive evidence at this layer
            "cam_shape": list(cams[i].shape),
            "files": {"overlay": overlay_name, "cam": cam_name},
        })
    return rows, files


def _write_contact_sheet(out: Path, rows: list[dict]) -> None:
    from PIL import Image

    tiles, labels = [], []
    for row in rows:
        try:
            with Image.open(out / row["files"]["overlay"]) as image:
                tiles.append(np.asarray(image.convert("RGB")))
        except OSError:
            continue
        label = f"{row['predicted_name']} {row['probability']:.2f}"
        if row.get("target") != row.get("predicted"):
            label += f" -> {row['target_name']}"
        name = Path(row["files"]["overlay"]).stem.rsplit("_", 1)[0]
        labels.append(f"{label} | {name}")
    if tiles and len({tile.shape for tile in tiles}) == 1:
        save_png(contact_sheet(tiles, labels), out / CONTACT_SHEET)


# ---------------------------------------------------------------------------------------------------
# `cfcam evaluate`: faithfulness and robustness metrics (cfcam_gpu.evaluate).

def _register_evaluate() -> None:
    from . import evaluate

    SUBCOMMANDS["evaluate"] = Subcommand("compare CAM methods: Average Drop/Increase, deletion/insertion AUC, "
                                         "robustness", evaluate.add_arguments, evaluate.run,
                                         evaluate.DESCRIPTION)


_register_evaluate()
