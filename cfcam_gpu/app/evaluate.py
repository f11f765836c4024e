"""``cfcam evaluate``: faithfulness and robustness of CF-CAM and the other CAM methods on the same images.

    cfcam evaluate --demo --out docs/evaluation --methods cfcam,gradcam,gradcam++,scorecam
    cfcam evaluate photos/ --model resnet50 --weights best.pth --layer layer4 --out eval

``add_arguments(parser)`` fills the sub-parser, ``run(args) -> int`` runs the job (0 ok, 1 some images could
not be read, 2 usage error: a ``CLIError``, as for ``explain``). The numbers come from ``scores``, the files
from ``report``:
  metrics.json      {method: {"average_drop", "increase_in_confidence", "average_drop_threshold",
                    "increase_in_confidence_threshold", "deletion_auc", "insertion_auc": {"mean", "ci95"},
                    "robustness": {sigma: {"ssim", "mse"}} (null for gradient-free methods),
                    "n_images", "seconds_per_image"}}; ci95 = [low, high], 95% percentile-bootstrap interval of
                    the mean (2000 resamples, seeded), always within the quantity's possible range
                    with --metrics road also "road_combined", "road_morf", "road_lerf"
  metrics.md        the same as markdown tables (mean [low, high])
  per_image.json    every per-image value, the targets and class names, CF-CAM's cluster counts
  curves.npz        deletion / insertion curves per method, (N, steps + 1)
  deletion_insertion.png, robustness.png   matplotlib plots (Agg)
  comparison.png    rows: images, columns: the input and each method's overlay, labelled
Every method explains each image's top-1 class of the model.

Under ``torchrun`` (WORLD_SIZE > 1) every rank evaluates its ``distributed.shard`` of the images and rank 0
gathers the per-image values and writes what one process writes (the same numbers); one process is the
case of one rank holding every image.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import distributed, outputs
from .options import (PATH_HELP, CLIError, write_failed, add_max_pixels_argument, add_model_arguments, check_max_pixels,
                      check_model_arguments, input_paths, load_model, resolve_device, smoothing,
                      add_smoothing_arguments)
from .paper_protocol import FILES as PAPER_FILES
from .report import FILES, write_report
from .scores import DEFAULT_METHODS, EXTRA_METRICS, known_methods, scalar_keys

DEFAULT_SIGMAS = "0.25,0.5,1,2,4"
HELP = "compare CAM methods: Average Drop/Increase, deletion/insertion AUC, robustness"
DESCRIPTION = """\
Evaluate CAM methods on the same images: Average Drop / Increase in Confidence (soft, and thresholded
at CAM > 0.5), deletion / insertion AUC, robustness to gradient noise (SSIM, MSE), with 95% CIs; plots
and a comparison grid. Every method explains each image's top-1 class.

examples:
  cfcam evaluate --demo --out docs/evaluation --methods cfcam,gradcam,gradcam++,scorecam,ablationcam
  cfcam evaluate photos/ --model resnet50 --weights best.pth --layer layer4 --out eval --steps 50"""



def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``evaluate``'s arguments to ``parser`` (a sub-parser of the cfcam CLI)."""
    parser.add_argument("paths", nargs="*", metavar="PATH", help=PATH_HELP)
    parser.add_argument("--demo", action="store_true",
                        help="use efficientnet_lite0 and the photos bundled with scikit-image/scikit-learn")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), metavar="LIST",
                        help=f"comma-separated, from {', '.join(known_methods())} "
                             f"(default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--metrics", default="", metavar="LIST",
                        help=f"optional metrics to add, comma-separated: {', '.join(EXTRA_METRICS)} (ROAD, "
                             "RemOve And Debias: slow on the CPU); default none")
    add_model_arguments(parser)
    group = parser.add_argument_group("evaluation")
    group.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per CAM batch (default 8)")
    group.add_argument("--forward-batch-size", type=int, metavar="N",
                       help="inputs per model pass in the metrics and Score-CAM (default: 8 on the CPU, where "
                            "bigger batches are slower, 64 on accelerators)")
    group.add_argument("--steps", type=int, default=50, metavar="N",
                       help="deletion / insertion steps (default 50; curves have N + 1 points)")
    group.add_argument("--sigmas", default=DEFAULT_SIGMAS, metavar="LIST",
                       help=f"gradient-noise levels, x the gradients' std (default {DEFAULT_SIGMAS})")
    group.add_argument("--max-images", type=int, metavar="N", help="evaluate at most the first N images")
    group.add_argument("--grid-images", type=int, default=6, metavar="N",
                       help="rows of comparison.png (default 6)")
    group.add_argument("--seed", type=int, default=0,
                       help="seed of the gradient noise, of a model's random weights and of randomcam's "
                            "channel weights (default 0)")
    add_max_pixels_argument(group)
    add_smoothing_arguments(group)
    group.add_argument("--protocol", choices=("default", "paper", "both"), default="default",
                       help="'paper': the CF-CAM authors' protocol alone (paper_metrics.json/.md), 'both': "
                            "it and the default metrics (default: 'default')")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the evaluation DIR already holds (without it, such a DIR is refused)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def parse_methods(spec: str) -> list[str]:
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    known = known_methods()
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise CLIError(f"--methods: unknown method(s) {bad or spec!r}; expected names from {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_metrics(spec: str) -> list[str]:
    names = list(dict.fromkeys(m.strip().lower() for m in spec.split(",") if m.strip()))
    bad = [m for m in names if m not in EXTRA_METRICS]
    if bad:
        raise CLIError(f"--metrics: unknown metric(s) {bad}; expected names from {', '.join(EXTRA_METRICS)} "
                       "(the standard metrics are always computed)")
    return names


def parse_sigmas(spec: str) -> list[float]:
    try:
        sigmas = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise CLIError(f"--sigmas: expected comma-separated numbers, got {spec!r}") from None
    if any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise CLIError(f"--sigmas: expected finite values >= 0, got {spec!r}")
    return sigmas


def check_arguments(args) -> None:
    for name in ("batch_size", "forward_batch_size", "steps", "grid_images", "max_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.demo and args.paths:
        raise CLIError("--demo: expected either --demo or PATHs, not both")
    if not args.demo and not args.paths:
        raise CLIError("PATH: expected image files or folders, or --demo")
    check_max_pixels(args)
    check_model_arguments(args)


# ---------------------------------------------------------------------------------------------------
# The job.

def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; returns the exit code (0, 1 some images unreadable); a
    CLIError for usage errors. Under torchrun every rank returns the same exit code, and an error (the
    options and inputs are every rank's) is printed by rank 0 alone."""
    try:
        ctx = distributed.context()
    except ValueError as error:
        raise CLIError(str(error)) from None
    try:
        return _run(args, ctx)
    except CLIError as error:
        if not ctx.is_main:
            error.echo = False
        raise
    finally:
        distributed.destroy()


def _run(args, ctx) -> int:
    t_start = time.perf_counter()
    check_arguments(args)
    methods, sigmas = parse_methods(args.methods), parse_sigmas(args.sigmas)
    args.metrics = parse_metrics(args.metrics) if isinstance(args.metrics, str) else list(args.metrics)
    paths = None if args.demo else input_paths(args.paths)
    out = Path(args.out)
    outputs.check_output_folder(out)
    held = [name for name in FILES + PAPER_FILES if (out / name).exists()]
    if held and not args.overwrite:
        raise CLIError(f"--out: {str(out)!r} already holds an evaluation ({held[0]}); pass --overwrite to "
                       "replace it, or another --out")
    device = resolve_device(distributed.device_spec(args.device, ctx))
    forward_batch_size = args.forward_batch_size or (8 if device.type == "cpu" else 64)
    processes = f" x {ctx.world_size} processes" if ctx.distributed else ""
    log = (lambda *a: None) if args.quiet or not ctx.is_main else (
        lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True))
    if args.demo:
        args.model = "efficientnet_lite0"
    model, info, layer, reshape = load_model(args, device)
    distributed.init(device)
    if ctx.distributed and args.weights is None:
        distributed.broadcast_module(model)  # random weights: every rank uses rank 0's
    images, displays, names, positions, total, failures = _load_shard(args, paths, info, ctx)
    if ctx.is_main:
        outputs.make_output_folder(out)
        for name in (FILES + PAPER_FILES) if args.overwrite else ():  # no stale file of a previous evaluation survives
            (out / name).unlink(missing_ok=True)
        for path, error in failures:
            print(f"cfcam evaluate: skipped {path}: {error}", file=sys.stderr)
    log(f"{total} images, model {info.name}, layer {layer}, methods {','.join(methods)}, device {device}"
        + processes)
    if args.protocol != "default":  # the CF-CAM authors' protocol: paper_metrics.json / .md
        from . import paper_protocol
        paper_protocol.evaluate(args, ctx, model, info, layer, images, names, methods, device,
                                forward_batch_size, out, log)
        if args.protocol == "paper":
            return 1 if failures else 0
    part = _evaluate_share(args, model, info, (layer, reshape), images, displays, names, positions, total,
                           methods, sigmas, forward_batch_size, device, log)
    parts = distributed.all_gather_object(part)
    code = 1 if failures else 0
    if not ctx.is_main:
        distributed.barrier()  # a rank that exits non-zero makes torchrun stop the others: wait for rank 0
        return code
    # gradient-free methods have robustness None on every rank; the others on the ranks with images
    sigmas_present = {name: next((list(p["per_image"][name]["robustness"]) for p in parts
                                  if p["per_image"][name]["robustness"] is not None), None) for name in methods}
    result, names, grid_displays = _merge(parts, methods, sigmas_present, scalar_keys(args.metrics))
    try:
        write_report(out, args, methods, sigmas, result, names, grid_displays, info, layer, device,
                     forward_batch_size, t_start, log, processes=processes, skipped=failures)
    except OSError as error:
        distributed.barrier()
        raise write_failed(out, error, "the report is incomplete; rerun with --overwrite") from None
    distributed.barrier()
    return code


def _evaluate_share(args, model, info, target, images, displays, names, positions, total, methods, sigmas,
                    forward_batch_size, device, log) -> dict:
    """This rank's share of the per-image values (and its rows of the comparison grid); ``target``:
    (layer, reshape_transform or None)."""
    from .scores import score_methods

    layer, reshape = target
    rows = min(args.grid_images, total)
    if not positions:  # nothing to do here (fewer images than ranks)
        return {"positions": [], "names": [], "targets": [], "probs": [],
                "per_image": {name: {**{k: [] for k in scalar_keys(args.metrics)}, "robustness": None}
                              for name in methods},
                "curves": {name: {k: np.zeros((0, args.steps + 1), np.float32) for k in ("deletion", "insertion")}
                           for name in methods},
                "seconds": {name: {"cam": 0.0, "metrics": 0.0} for name in methods}, "clusters": {}, "grid": {}}
    result = score_methods(model, layer, images.to(device), methods, info.mean, info.std, positions, total,
                           steps=args.steps, sigmas=sigmas, batch_size=args.batch_size,
                           forward_batch_size=forward_batch_size, seed=args.seed, log=log, metrics=args.metrics,
                           reshape_transform=reshape, **smoothing(args))
    return {"positions": positions, "names": names, "targets": result["targets"].tolist(),
            "probs": result["probs"].tolist(), "per_image": result["per_image"], "curves": result["curves"],
            "seconds": result["seconds"], "clusters": result["clusters"],
            "grid": {p: (displays[k], {name: result["cams"][name][k] for name in methods})
                     for k, p in enumerate(positions) if p < rows}}


def _load_shard(args, paths, info, ctx):
    """This rank's images, each input decoded once, by the rank whose ``shard`` holds it.

    Every rank decodes its shard of the inputs (in order, at most --max-images readable ones) and the
    ranks share which files decoded; the images kept are the first --max-images readable ones of the
    whole list, and the failures those one process meets. Returns (images (n, 3, H, W) CPU, displays,
    names, positions: the images' places among all the images kept, n_total, failures: every rank's
    (path, error), in input order)."""
    from . import data

    if args.demo:
        bundled = data.bundled_images()[: args.max_images]
        keys = names = [name for name, _ in bundled]

        def decode(i):  # the display stays float (not rounded to uint8 as from a file)
            display = data.display_images([bundled[i][1]], info.input_size)
            return data.normalize(display, info.mean, info.std)[0], display[0], None
    else:
        keys, names = [str(p) for p in paths], [p.stem for p in paths]
        dataset = data.ImageFolderDataset(paths, info.input_size, info.mean, info.std,
                                          max_pixels=args.max_pixels)

        def decode(i):
            sample = dataset[i]
            return (sample.image, sample.display.float() / 255, None) if sample.ok else (None, None, sample.error)
    mine: dict[int, tuple] = {}  # input index -> (image, display, name)
    status: list[tuple[int, str | None]] = []  # (input index, error or None), decoded here
    for i in distributed.shard(range(len(keys)), ctx.rank, ctx.world_size):
        image, display, error = decode(i)
        status.append((i, error))
        if error is not None:
            continue
        mine[i] = (image, display, names[i])
        if args.max_images is not None and len(mine) >= args.max_images:
            break  # the first --max-images readable images of the list are among every rank's first ones
    decoded = sorted(x for part in distributed.all_gather_object(status) for x in part)
    readable = [i for i, error in decoded if error is None]
    if args.max_images is not None and len(readable) > args.max_images:
        readable = readable[: args.max_images]
    if not readable:
        first = next((error for _, error in decoded), "?")
        raise CLIError(f"PATH: none of the {len(keys)} files could be read; first error: {first}")
    cutoff = readable[-1] if args.max_images is not None and len(readable) == args.max_images else len(keys)
    failures = [(keys[i], error) for i, error in decoded if error is not None and i < cutoff]
    place = {i: p for p, i in enumerate(readable)}
    kept = [i for i in sorted(mine) if i in place]
    images = torch.stack([mine[i][0] for i in kept]) if kept else None
    displays = torch.stack([mine[i][1] for i in kept]) if kept else None
    return images, displays, [mine[i][2] for i in kept], [place[i] for i in kept], len(readable), failures


def _merge(parts: list[dict], methods, sigmas_present: dict, keys) -> tuple[dict, list, torch.Tensor]:
    """Every rank's share of ``evaluate``'s result -> the result for all images in list order (cams and
    displays: the grid rows only), names, displays."""
    positions = [p for part in parts for p in part["positions"]]
    order = np.argsort(positions, kind="stable").tolist()

    def cat(lists):
        flat = [x for values in lists for x in values]
        return [flat[k] for k in order]

    result = {"targets": torch.tensor(cat([part["targets"] for part in parts]), dtype=torch.int64),
              "probs": torch.tensor(cat([part["probs"] for part in parts]), dtype=torch.float32),
              "per_image": {}, "curves": {}, "seconds": {}, "cams": {}, "clusters": {}}
    names = cat([part["names"] for part in parts])
    for name in methods:
        pers = [part["per_image"][name] for part in parts]
        per = {k: cat([p[k] for p in pers]) for k in keys}
        if sigmas_present[name]:
            per["robustness"] = {s: {m: cat([p["robustness"][s][m] for p in pers]) for m in ("ssim", "mse")}
                                 for s in sigmas_present[name]}
        else:
            per["robustness"] = None
        result["per_image"][name] = per
        result["curves"][name] = {k: np.concatenate([part["curves"][name][k] for part in parts])[order]
                                  for k in ("deletion", "insertion")}
        result["seconds"][name] = {k: sum(part["seconds"][name][k] for part in parts) for k in ("cam", "metrics")}
        clusters = [part["clusters"].get(name) for part in parts]
        if any(c and c["n_clusters"] for c in clusters):
            result["clusters"][name] = {k: cat([c[k] if c else [] for c in clusters])
                                        for k in ("n_clusters", "noise", "dead")}
    grid = sorted((p, row) for part in parts for p, row in part["grid"].items())
    result["cams"] = {name: torch.stack([row[1][name] for _, row in grid]) for name in methods}
    displays = torch.stack([row[0] for _, row in grid])
    return result, names, displays



def main(argv: Sequence[str] | None = None) -> int:
    """``cfcam evaluate ARGS`` (``python -m cfcam_gpu.app.evaluate ARGS``)."""
    from .cli import main as cli_main

    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
