"""``cfcam explain``: CF-CAM / Grad-CAM heatmaps for image files, folders, lists or the bundled photos.

The job, in order: check the options and inputs (cheap, nothing written), load the model, prepare DIR
(``outputs.prepare_output``: resume / overwrite), explain batch after batch while ``outputs.BatchWriter``
writes the previous batch's files and manifest rows, then the contact sheet and the summary.

Under ``torchrun`` each rank explains a ``distributed.shard`` of the pending inputs into its own
``manifest.rank{R}.jsonl``; rank 0 prepares DIR first and merges the manifests at the end.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import distributed, outputs, results
from .inputs import Item, short_path, collect_inputs
from .options import (PATH_HELP, PROG, CLIError, write_failed, add_data_arguments, add_model_arguments,
                      check_data_arguments, check_model_arguments, load_model, make_loader, method_names,
                      random_options, reseed, resolve_device, smoothing, uses_layer, add_smoothing_arguments)

HELP = "explain images with CF-CAM / Grad-CAM / other CAM heatmaps"
DESCRIPTION = """\
Explain images with CF-CAM (or another CAM method, --method). For each image DIR gets NAME_METHOD.png (the
heatmap over the image), NAME_METHOD.npy (the raw CAM, float32 in [0, 1], at the layer's resolution, or at
the model's input size for fullgrad, refinecam, sess and --aug-smooth) and a row in DIR/manifest.jsonl;
DIR/contact_sheet.png shows the overlays. NAME is the input's file stem (with a short hash when two inputs
share a stem).

examples:
  cfcam explain --demo --out demo
  cfcam explain photos/ --out cams --batch-size 32
  cfcam explain test/ --model resnet50 --num-classes 2 --weights best_model.pth --layer layer4
  cfcam explain list.txt --target 281 --method gradcam --json

exit status: 0 all explained, 1 some images failed (see stderr and the manifest), 2 bad usage, 3 DIR
could not be written (disk full, ...; rerun with --resume), 130 interrupted (Ctrl-C), 143 terminated
(SIGTERM)."""

AMP_CHOICES = {"off": False, "bf16": "bfloat16", "fp16": "float16"}
SHEET_MAX_TILES = 100  # the contact sheet shows the first 100 explained images


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH", help=PATH_HELP)
    parser.add_argument("--demo", action="store_true",
                        help="explain the photos bundled with scikit-image/scikit-learn (chelsea, coffee, "
                             "...) instead of PATHs")
    add_model_arguments(parser)
    group = parser.add_argument_group("CAM")
    group.add_argument("--method", choices=method_names(), default="cfcam", metavar="NAME",
                       help=f"CAM method: {', '.join(method_names())} (default cfcam); fullgrad uses no "
                            "target layer; refinecam and sess run Grad-CAM++ / Grad-CAM at the layer (sess on "
                            "patches of the image at 12 scales: many passes per image)")
    group.add_argument("--target", default="top1", metavar="top1|INT",
                       help="class to explain: 'top1' (each image's predicted class, the default) or a "
                            "class index for every image")
    add_smoothing_arguments(group)
    group.add_argument("--seed", type=int, default=0, metavar="N",
                       help="seed of the model's random weights (any model without --weights, and a new "
                            "--num-classes head) and of randomcam's channel weights: the same seed, the same "
                            "model and maps in every run (default 0; recorded in run.json, so --resume "
                            "refuses another)")
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


def _warn(message: str) -> None:
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------
# The job.

def run(args: argparse.Namespace) -> int:
    """Run ``explain`` from parsed arguments; returns the exit code."""
    try:
        ctx = distributed.context()
    except ValueError as error:
        raise CLIError(str(error)) from None
    try:
        code = _run(args, ctx)
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


class SameOnEveryRank:
    """``with SameOnEveryRank(ctx):`` a CLIError raised inside comes from the options or the inputs, which
    every rank of a torchrun job shares: only rank 0 prints it."""

    def __init__(self, ctx: distributed.Context):
        self.ctx = ctx

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if isinstance(error, CLIError) and self.ctx.rank > 0:
            error.echo = False
        return False


@dataclass
class Job:
    """What the checks and the model loading settle before anything is explained."""

    args: argparse.Namespace
    ctx: distributed.Context
    items: list[Item]
    arrays: list[np.ndarray] | None
    target: int | None
    device: torch.device
    out: Path
    config: dict
    model: torch.nn.Module = None
    info: object = None
    layer: str = ""
    reshape: object = None  # the layer's reshape_transform (transformer tokens) or None
    started: float = 0.0
    held: contextlib.ExitStack = None  # rank 0: DIR's lock (outputs.output_lock), held to the end of the run

    @property
    def keys(self) -> list[str]:
        return [item.key for item in self.items]

    @functools.cached_property
    def place(self) -> dict[str, int]:
        """Input key -> its place in the input order (manifest rows follow it)."""
        return {item.key: i for i, item in enumerate(self.items)}

    @functools.cached_property
    def key_of_file(self) -> dict[str, str]:
        """str(file) -> the input's key (the dataset reports failures by file)."""
        return {str(item.file): item.key for item in self.items if item.file is not None}


def _run(args: argparse.Namespace, ctx: distributed.Context) -> int:
    job = _check(args, ctx)
    with contextlib.ExitStack() as job.held:
        return _run_locked(job)


def _run_locked(job: Job) -> int:
    args, ctx = job.args, job.ctx
    pending_all, n_skipped = _prepare_output(job)
    pending = distributed.shard(pending_all, ctx.rank, ctx.world_size)  # this rank's share of the work
    quiet = args.quiet or not ctx.is_main
    processes = f" x {ctx.world_size} processes" if ctx.distributed else ""
    if not quiet:
        tqdm.write(f"{PROG}: {args.method} on {args.model} at layer {job.layer!r}, {job.device}{processes}; "
                   f"{len(pending_all)} image(s) to explain" + (f", {n_skipped} already done" if n_skipped else "")
                   + f" -> {job.out}", file=sys.stderr)
    loop_started = time.perf_counter()
    n_ok, n_failed = _explain(job, pending, quiet)
    seconds = time.perf_counter() - loop_started
    if not ctx.is_main:
        return 1 if n_failed else 0
    return _finish(job, n_ok, n_failed, n_skipped, seconds, processes)


def _check(args: argparse.Namespace, ctx: distributed.Context) -> Job:
    """Options, inputs and DIR first (cheap, nothing written), then the model: a usage error is reported
    before any weights are read, and a typo in --model leaves DIR as it was."""
    started = time.perf_counter()
    with SameOnEveryRank(ctx):
        target = parse_target(args.target)
        check_data_arguments(args)
        check_model_arguments(args)
    # under torchrun, 'auto' / 'cuda' is this process's GPU, cuda:LOCAL_RANK
    device = resolve_device(distributed.device_spec(args.device, ctx))
    with SameOnEveryRank(ctx):
        items, arrays = collect_inputs(args)  # all of them, on every rank: the output names depend on all
        out = Path(args.out)
        outputs.check_output_folder(out)
        config = {"model": args.model, "weights": os.path.abspath(args.weights) if args.weights else None,
                  "num_classes": args.num_classes, "layer": args.layer, "method": args.method,
                  "target": "top1" if target is None else target, "amp": args.amp, **smoothing(args),
                  "seed": args.seed}
        job = Job(args, ctx, items, arrays, target, device, out, config, started=started)
        if args.layer and not uses_layer(args.method):
            raise CLIError(f"--layer: --method {args.method} uses no target layer; omit --layer")
        job.model, job.info, job.layer, job.reshape = load_model(args, device)
        if not uses_layer(args.method):
            job.layer = None
        config["layer"] = job.layer
        if target is not None and target >= job.info.num_classes:
            raise CLIError(f"--target: expected 'top1' or a class index in [0, {job.info.num_classes}) for "
                           f"{args.model!r}, got {target}")
    distributed.init(device)  # a process group only under torchrun with WORLD_SIZE > 1
    if ctx.distributed and args.weights is None:
        distributed.broadcast_module(job.model)  # random weights: every rank uses rank 0's
    return job


def _prepare_output(job: Job) -> tuple[list[int], int]:
    """Rank 0 prepares DIR (checks, run.json, resume: merges what a previous run left); the others wait for
    its outcome: an error every rank raises, or the inputs already done. -> (indices to explain, n done)."""
    outcome: tuple[str, int] | list[int] | None = None
    if job.ctx.is_main:
        try:
            job.held.enter_context(outputs.output_lock(job.out))
            kept = outputs.prepare_output(job.out, job.args.resume, job.args.overwrite, job.config,
                                          order=job.keys)
        except OSError as error:
            failed = write_failed(job.out, error, "nothing was explained")
            distributed.broadcast_object((str(failed), failed.code))
            raise failed from None
        except CLIError as error:
            distributed.broadcast_object((str(error), error.code))
            raise
        done_keys = {row["path"] for row in kept}
        outcome = [i for i, key in enumerate(job.keys) if key in done_keys]
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, tuple):
        raise CLIError(outcome[0], outcome[1], echo=False)
    done = set(outcome)
    pending_all = [i for i in range(len(job.items)) if i not in done]
    return pending_all, len(job.items) - len(pending_all)


def _explain(job: Job, pending: list[int], quiet: bool) -> tuple[int, int]:
    """Explain this rank's ``pending`` inputs into its manifest -> (n ok, n failed) over every rank."""
    from .data import ArrayDataset, ImageFolderDataset

    from ..methods import build_method

    args, ctx, info = job.args, job.ctx, job.info
    options = {} if job.reshape is None or job.layer is None else {"reshape_transform": job.reshape}
    engine = build_method(args.method, job.model, job.layer, amp=AMP_CHOICES[args.amp],
                          channels_last=args.channels_last, compile=args.compile, **options,
                          **random_options(args.method, job.device))
    if job.arrays is not None:
        dataset = ArrayDataset([job.items[i].key for i in pending], [job.arrays[i] for i in pending],
                               info.input_size, info.mean, info.std, keep_original=True)
    else:
        dataset = ImageFolderDataset([job.items[i].file for i in pending], **info.preprocess,
                                     keep_original=True,  # overlays at each image's own size
                                     max_pixels=args.max_pixels)
    progress = tqdm(total=len(pending), file=sys.stderr, unit="img", dynamic_ncols=True,
                    desc=f"rank 0 of {ctx.world_size}" if ctx.distributed else None,
                    disable=quiet or not sys.stderr.isatty())
    loader = make_loader(dataset, args.batch_size, args.workers, job.device) if pending else ()
    manifest_path = job.out / (outputs.RANK_MANIFEST.format(rank=ctx.rank) if ctx.distributed
                               else outputs.MANIFEST)
    writer = outputs.BatchWriter(manifest_path, on_commit=lambda rows: progress.update(len(rows)))
    try:
        with writer:
            for batch in loader:
                writer.submit(*_explain_batch(job, engine, batch, pending))
    except OSError as error:
        done = writer.counts["ok"] + writer.counts["error"]
        raise write_failed(job.out, error, f"stopped with {len(pending) - done} of {len(pending)} image(s) not "
                                           "done; rerun with --resume once DIR can be written") from None
    finally:
        progress.close()
        engine.close()
    counts = writer.counts
    if not ctx.distributed:
        return counts["ok"], counts["error"]
    distributed.barrier()  # every rank's rows are committed to its manifest
    totals = distributed.all_reduce_sum(torch.tensor([counts["ok"], counts["error"]], dtype=torch.int64))
    n_ok, n_failed = (int(n) for n in totals.tolist())
    return n_ok, n_failed


def _finish(job: Job, n_ok: int, n_failed: int, n_skipped: int, seconds: float, processes: str) -> int:
    """Rank 0: one manifest in input order, the contact sheet, the summary -> the exit code."""
    args, out, layer = job.args, job.out, job.layer
    # one manifest.jsonl in input order (a resumed run appended its rows; torchrun: one file per rank)
    try:
        rows = {row["path"]: row for row in outputs.merge_manifests(out, order=job.keys)}
    except OSError as error:
        raise write_failed(out, error, "the images are explained but the manifest is not in input order; "
                                       "rerun with --resume to finish it") from None
    ok_rows = [rows[key] for key in job.keys if key in rows and rows[key].get("status") == "ok"]
    sheet_rows = ok_rows[:SHEET_MAX_TILES]
    n_blank = sum(bool(row.get("blank")) for row in ok_rows)
    if n_blank:
        why = (": no channel cluster has a positive weight with non-zero activations (e.g. only dead, all-zero "
               "channels clustered)" if args.method == "cfcam" else "")
        print(f"{PROG}: warning: {n_blank} of {len(ok_rows)} CAMs are all zero (blank heatmaps) at layer "
              f"{layer!r}{why}; try another --layer or --method", file=sys.stderr)
    if sheet_rows:
        try:
            results.write_contact_sheet(out, sheet_rows, job.info.input_size, args.method)
        except OSError as error:
            raise write_failed(out, error, f"the images are explained (see {outputs.MANIFEST}) but not "
                                           f"{outputs.CONTACT_SHEET}; rerun with --resume to write it") from None
    summary = {"n_images": len(job.items), "n_ok": n_ok, "n_failed": n_failed, "n_skipped": n_skipped,
               "n_blank": n_blank,
               "seconds": round(seconds, 3), "images_per_s": round(n_ok / seconds, 2) if seconds > 0 else None,
               "total_seconds": round(time.perf_counter() - job.started, 3), "out": str(out.resolve()),
               "manifest": str((out / outputs.MANIFEST).resolve()),
               "contact_sheet": str((out / outputs.CONTACT_SHEET).resolve()) if sheet_rows else None,
               "model": args.model, "layer": layer, "method": args.method, "target": job.config["target"],
               "device": str(job.device), "batch_size": args.batch_size, "workers": args.workers,
               "world_size": job.ctx.world_size}
    if args.json:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        rate = f" ({summary['images_per_s']} images/s)" if n_ok else ""
        print(f"{PROG}: {n_ok} explained, {n_failed} failed, {n_skipped} already done in {seconds:.1f} s"
              f"{rate}{processes} -> {out}", file=sys.stderr)
    return 1 if n_failed else 0


# ---------------------------------------------------------------------------------------------------
# One batch.

def _explain_batch(job: Job, engine, batch, pending: list[int]):
    """One data.Batch -> (manifest rows, [(path, array) to write])."""
    rows = [{"path": job.key_of_file.get(str(path), str(path)), "status": "error", "error": message}
            for path, message in batch.failures]
    for path, message in batch.failures:
        _warn(f"skipped {short_path(str(path))}: {message}")
    files: list[tuple[Path, np.ndarray]] = []
    if not len(batch.indices):
        return rows, files
    batch_items = [job.items[pending[int(j)]] for j in batch.indices]
    images = batch.images.to(job.device, non_blocking=True)
    reseed(engine, job.args.seed, pending[int(batch.indices[0])])  # randomcam: seeded by --seed and the batch
    for where, result in results.cams_by_group(engine, images, job.target, len(batch_items),
                                               smoothing(job.args)):
        part = batch_items[where]
        if isinstance(result, Exception):
            message = f"{type(result).__name__}: {str(result).strip().splitlines()[0] if str(result) else ''}"
            for item in part:
                _warn(f"failed {item.shown}: {message}")
                rows.append({"path": item.key, "status": "error", "error": message})
            continue
        part_rows, part_files = results.explained(result, batch.originals[where], part, job.info, job.out,
                                                  job.args.method)
        rows += part_rows
        files += part_files
    rows.sort(key=lambda row: job.place.get(row["path"], len(job.place)))  # input order, failures too
    return rows, files
