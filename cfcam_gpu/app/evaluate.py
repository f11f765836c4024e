"""``cfcam evaluate``: faithfulness and robustness of CF-CAM and the baselines on the same images.

    python -m cfcam_gpu.evaluate --demo --out docs/evaluation --methods cfcam,gradcam,gradcam++,scorecam
    python -m cfcam_gpu.evaluate photos/ --model resnet50 --weights best.pth --layer layer4 --out eval

For the CLI: ``add_arguments(parser)`` fills an argparse (sub-)parser and ``run(args) -> int`` runs it
(0 ok, 1 some images could not be read, 2 usage error). ``main(argv)`` is both, for ``python -m``.

DIR gets
  metrics.json      {method: {"average_drop", "increase_in_confidence", "average_drop_threshold",
                    "increase_in_confidence_threshold", "deletion_auc", "insertion_auc": {"mean", "ci95"},
                    "robustness": {sigma: {"ssim", "mse"}} (null for gradient-free methods),
                    "n_images", "seconds_per_image"}}; ci95 = [low, high], Student-t interval of the mean
  metrics.md        the same as markdown tables (mean +- 95% CI half-width)
  per_image.json    every per-image value, the targets and class names, CF-CAM's cluster counts
  curves.npz        deletion / insertion curves per method, (N, steps + 1)
  deletion_insertion.png, robustness.png   matplotlib plots (Agg)
  comparison.png    rows: images, columns: the input and each method's overlay, labelled
Every method explains each image's top-1 class of the model.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import metrics as M
from ..methods import ScoreCAM, build_method, dead_channels, from_features_fn

ALL_METHODS = ("cfcam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam")
EXTRA_METHODS = ("cfcam_exclude_dead", "scorecam_logit")
LABELS = {"cfcam": "CF-CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
          "layercam": "LayerCAM", "hirescam": "HiResCAM", "scorecam": "Score-CAM",
          "ablationcam": "Ablation-CAM", "cfcam_exclude_dead": "CF-CAM (dead excl.)",
          "scorecam_logit": "Score-CAM (logit)"}
SCALARS = ("average_drop", "increase_in_confidence", "average_drop_threshold",
           "increase_in_confidence_threshold", "deletion_auc", "insertion_auc")
DEFAULT_SIGMAS = "0.25,0.5,1,2,4"


class EvaluateError(Exception):
    """A usage or configuration error: one line on stderr, exit code 2."""


# ---------------------------------------------------------------------------------------------------
# Arguments.

DESCRIPTION = """\
Evaluate CAM methods on the same images: Average Drop / Increase in Confidence (soft, and thresholded
at CAM > 0.5), deletion / insertion AUC, robustness to gradient noise (SSIM, MSE), with 95% CIs; plots
and a comparison grid. Every method explains each image's top-1 class.

examples:
  cfcam evaluate --demo --out docs/evaluation --methods cfcam,gradcam,gradcam++,scorecam,ablationcam
  cfcam evaluate photos/ --model resnet50 --weights best.pth --layer layer4 --out eval --steps 50"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``evaluate``'s arguments to ``parser`` (a sub-parser of the cfcam CLI, or a new parser)."""
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="image files, folders (searched recursively) or .txt lists of paths")
    parser.add_argument("--demo", action="store_true",
                        help="use efficientnet_lite0 and the photos bundled with scikit-image/scikit-learn")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), metavar="LIST",
                        help=f"comma-separated, from {', '.join(ALL_METHODS + EXTRA_METHODS)} "
                             f"(default: {','.join(ALL_METHODS)})")
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="efficientnet_lite0", metavar="NAME",
                       help="model name for cfcam_gpu.models.build_model (default efficientnet_lite0)")
    group.add_argument("--weights", metavar="FILE", help="state dict (.pth) to load into --model")
    group.add_argument("--num-classes", type=int, metavar="N", help="number of classes of --model")
    group.add_argument("--layer", metavar="NAME", help="dotted target layer (default: the model's last "
                                                       "spatial feature map, 'bn2' for efficientnet_lite0)")
    group.add_argument("--device", default="auto", metavar="auto|cpu|cuda", help="default auto")
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
    group.add_argument("--seed", type=int, default=0, help="seed of the gradient noise (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _parse_methods(spec: str) -> list[str]:
    names = [m.strip().lower() for m in spec.split(",") if m.strip()]
    known = ALL_METHODS + EXTRA_METHODS
    bad = [m for m in names if m not in known]
    if bad or not names:
        raise EvaluateError(f"--methods: unknown method(s) {bad or spec!r}; expected names from {', '.join(known)}")
    return list(dict.fromkeys(names))


def _parse_sigmas(spec: str) -> list[float]:
    try:
        sigmas = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise EvaluateError(f"--sigmas: expected comma-separated numbers, got {spec!r}") from None
    if any(not math.isfinite(s) or s < 0 for s in sigmas):
        raise EvaluateError(f"--sigmas: expected finite values >= 0, got {spec!r}")
    return sigmas


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EvaluateError(f"--device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvaluateError(f"--device: {spec!r} asked for, but CUDA is not available here; use --device cpu")
    return device


def _check_args(args) -> None:
    for name in ("batch_size", "forward_batch_size", "steps", "grid_images"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvaluateError(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.max_images is not None and args.max_images < 1:
        raise EvaluateError(f"--max-images: expected a positive int, got {args.max_images}")
    if args.demo and args.paths:
        raise EvaluateError("--demo: expected either --demo or PATHs, not both")
    if not args.demo and not args.paths:
        raise EvaluateError("PATH: expected image files or folders, or --demo")


# ---------------------------------------------------------------------------------------------------
# Inputs.

def _load_model(args, device):
    from ..layers import resolve_layer
    from .models import build_model

    name = "efficientnet_lite0" if args.demo else args.model
    try:
        model, info = build_model(name, weights=args.weights, num_classes=args.num_classes, device=device)
        layer = args.layer or info.default_layer
        if layer is None:
            raise ValueError(f"--layer: no default target layer for {name!r}; name one with --layer")
        resolve_layer(model, layer)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise EvaluateError(str(error).splitlines()[0]) from None
    return model, info, layer


def _input_paths(args: argparse.Namespace) -> list:
    """The sorted image files named by PATH... (files, folders, .txt lists); a clear error if none."""
    from . import data

    try:
        paths = data.expand_paths(args.paths)
    except FileNotFoundError as error:
        raise EvaluateError(f"PATH: {error}") from None
    if not paths:
        raise EvaluateError(f"PATH: no image files found in {args.paths}")
    return paths


def _load_images(args, info, device):
    """-> (images (N, 3, H, W) normalised on device, displays (N, 3, H, W) float [0, 1], names, failures)."""
    from . import data

    if args.demo:
        bundled = data.bundled_images()[: args.max_images]
        names = [name for name, _ in bundled]
        arrays = [array for _, array in bundled]
        displays = data.display_images(arrays, info.input_size)
        return data.normalize(displays, info.mean, info.std).to(device), displays, names, []
    paths = _input_paths(args)
    dataset = data.ImageFolderDataset(paths, info.input_size, info.mean, info.std)
    images, displays, names, failures = [], [], [], []
    for i in range(len(dataset)):  # decoding; stops once --max-images readable images are found
        sample = dataset[i]
        if not sample.ok:
            failures.append((str(dataset.paths[i]), sample.error))
            continue
        images.append(sample.image)
        displays.append(sample.display.float() / 255)
        names.append(dataset.paths[i].stem)
        if args.max_images is not None and len(images) >= args.max_images:
            break
    if not images:
        raise EvaluateError(f"PATH: none of the {len(dataset)} files could be read; first error: "
                            f"{failures[0][1] if failures else '?'}")
    return torch.stack(images).to(device), torch.stack(displays), names, failures


def _engine(name: str, model, layer, forward_batch_size: int):
    if name == "scorecam_logit":
        return ScoreCAM(model, layer, score="logit", score_batch_size=forward_batch_size)
    options = {}
    if name == "scorecam":
        options["score_batch_size"] = forward_batch_size
    if name == "ablationcam":
        options["ablation_batch_size"] = max(forward_batch_size, 256)
    return build_method(name, model, layer, **options)


def _fn(name: str):
    return None if name == "scorecam_logit" else from_features_fn(name)


# ---------------------------------------------------------------------------------------------------
# Evaluation.

def evaluate(model, layer, images: torch.Tensor, methods: Sequence[str], mean, std, steps: int = 50,
             sigmas: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0), batch_size: int = 8,
             forward_batch_size: int = 64, seed: int = 0, log=None, positions: Sequence[int] | None = None,
             total: int | None = None) -> dict:
    """Per-image metrics of every method on ``images`` (N, 3, H, W) for the model's top-1 classes.

    Returns {"targets", "probs", "per_image": {method: {metric: list}}, "curves": {method: {...}},
    "seconds": {method: {"cam", "metrics"}}, "cams": {method: (N, h, w) CPU tensor}, "clusters": {...}}.

    ``positions`` (ascending) and ``total``: ``images`` are the images at these places of a list of ``total``
    (one rank's share, under torchrun). The images are then batched as that whole list would be (batch k:
    places [k * batch_size, (k + 1) * batch_size)) and each image gets the gradient noise it gets when the
    whole list is evaluated in one process, so every per-image value is the one-process value.
    """
    from ..engine import GradCAM

    log = log or (lambda *a: None)
    N, _, H, W = images.shape
    fb = forward_batch_size
    probe = GradCAM(model, layer)
    if positions is None:
        spans = [(i, min(i + batch_size, N), None) for i in range(0, N, batch_size)]
    else:
        spans = _global_spans(positions, batch_size, total)
    features = [probe._features(images[i:j], None) for i, j, _ in spans]
    targets = torch.cat([f[2] for f in features])
    probs = torch.cat([f[3].float().softmax(1).gather(1, f[2][:, None])[:, 0] for f in features])
    generator = torch.Generator(images.device)
    out = {"targets": targets.cpu(), "probs": probs.cpu(), "per_image": {}, "curves": {}, "seconds": {},
           "cams": {}, "clusters": {}}
    for name in methods:
        engine = _engine(name, model, layer, forward_batch_size)
        per, curves = {k: [] for k in SCALARS}, {"deletion": [], "insertion": []}
        robust = {s: {"ssim": [], "mse": []} for s in sigmas}
        cams_all, clusters, t_cam, t_metrics = [], {"n_clusters": [], "noise": [], "dead": []}, 0.0, 0.0
        fn = _fn(name)
        generator.manual_seed(seed)
        next_batch = 0  # global batches whose noise is drawn (positions given)
        for (i, j, span), (acts, grads, tgt, _) in zip(spans, features):
            x = images[i:j]
            t0 = time.perf_counter()
            res = engine(x, tgt)
            cams = res.cams
            _sync(x.device)
            t1 = time.perf_counter()
            soft = M.average_drop_increase(model, x, cams, tgt, "soft", batch_size=fb)
            hard = M.average_drop_increase(model, x, cams, tgt, "threshold", mean=mean, std=std, batch_size=fb)
            dele = M.deletion_insertion(model, x, cams, tgt, steps, baseline="zero", curves=("deletion",),
                                        batch_size=fb)
            ins = M.deletion_insertion(model, x, cams, tgt, steps, baseline="blur", curves=("insertion",),
                                       batch_size=fb)
            per["average_drop"] += soft.drop.tolist()
            per["increase_in_confidence"] += (soft.increase.double() * 100).tolist()
            per["average_drop_threshold"] += hard.drop.tolist()
            per["increase_in_confidence_threshold"] += (hard.increase.double() * 100).tolist()
            per["deletion_auc"] += dele.deletion_auc.tolist()
            per["insertion_auc"] += ins.insertion_auc.tolist()
            curves["deletion"].append(dele.deletion_curve.cpu())
            curves["insertion"].append(ins.insertion_curve.cpu())
            if fn is not None:
                if span is None:
                    rob = M.robustness(fn, acts, grads, sigmas, generator, size=(H, W))
                else:
                    batch, rows, size = span
                    for skipped in range(next_batch, batch):  # batches of other ranks alone: same draws
                        n = min(batch_size, total - skipped * batch_size)
                        for _ in sigmas:
                            torch.randn((n, *grads.shape[1:]), generator=generator, device=grads.device,
                                        dtype=grads.dtype)
                    next_batch = batch + 1
                    rob = _robustness_rows(fn, acts, grads, sigmas, generator, (H, W), rows, size)
                for s, r in rob.items():
                    robust[s]["ssim"] += r.ssim.tolist()
                    robust[s]["mse"] += r.mse.tolist()
            if res.n_clusters is not None:
                clusters["n_clusters"] += res.n_clusters.tolist()
                clusters["noise"] += (res.labels < 0).sum(1).tolist()
                clusters["dead"] += dead_channels(acts).sum(1).tolist()
            _sync(x.device)
            t_metrics += time.perf_counter() - t1
            t_cam += t1 - t0
            cams_all.append(cams.float().cpu())
        per["robustness"] = {s: v for s, v in robust.items()} if fn is not None else None
        out["per_image"][name] = per
        out["curves"][name] = {k: torch.cat(v).numpy() for k, v in curves.items()}
        out["seconds"][name] = {"cam": t_cam, "metrics": t_metrics}
        out["cams"][name] = torch.cat(cams_all)
        if clusters["n_clusters"]:
            out["clusters"][name] = clusters
        log(f"{name}: CAMs {t_cam:.1f} s ({t_cam / N:.2f} s/image), metrics {t_metrics:.1f} s")
    return out


def _global_spans(positions: Sequence[int], batch_size: int, total: int) -> list:
    """[(i, j, (batch, rows, size))]: images[i:j] are the rows ``rows`` of global batch ``batch`` (of
    ``size`` images) of a list of ``total``; ``positions``: the images' places in that list, ascending."""
    spans = []
    for k, p in enumerate(positions):
        batch = p // batch_size
        if spans and spans[-1][2][0] == batch:
            i, _, (_, rows, size) = spans[-1]
            rows.append(p - batch * batch_size)
            spans[-1] = (i, k + 1, (batch, rows, size))
        else:
            spans.append((k, k + 1, (batch, [p - batch * batch_size], min(batch_size, total - batch * batch_size))))
    return spans


def _robustness_rows(fn, acts, grads, sigmas, generator, size, rows, n) -> dict:
    """``M.robustness`` for rows ``rows`` of a batch of ``n``: the noise is drawn for all ``n`` (as the
    whole batch draws it) and the rows' noise is used."""
    clean = M._upsample(fn(acts, grads).cams, size)
    scale = grads.flatten(1).float().std(dim=1).to(grads.dtype)[:, None, None, None]
    index = torch.as_tensor(rows, device=grads.device)
    out = {}
    for sigma in sigmas:
        noise = torch.randn((n, *grads.shape[1:]), generator=generator, device=grads.device, dtype=grads.dtype)
        noisy = M._upsample(fn(acts, grads + noise[index] * (float(sigma) * scale)).cams, size)
        out[sigma] = M.Robustness(M.ssim(clean, noisy), ((clean.double() - noisy.double()) ** 2).flatten(1).mean(1))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stat(values) -> dict:
    m, lo, hi = M.mean_ci(values)
    clean = lambda v: None if not math.isfinite(v) else v  # noqa: E731
    return {"mean": clean(m), "ci95": [clean(lo), clean(hi)]}


def summarize(result: dict, methods: Sequence[str]) -> dict:
    """{method: {metric: {"mean", "ci95"}, "robustness": {sigma: {"ssim", "mse"}} | None, ...}}."""
    summary = {}
    N = len(result["targets"])
    for name in methods:
        per = result["per_image"][name]
        entry = {k: _stat(per[k]) for k in SCALARS}
        rob = per["robustness"]
        entry["robustness"] = None if rob is None else {
            f"{s:g}": {"ssim": _stat(v["ssim"]), "mse": _stat(v["mse"])} for s, v in rob.items()}
        entry["n_images"] = N
        entry["seconds_per_image"] = result["seconds"][name]["cam"] / N
        summary[name] = entry
    return summary


# ---------------------------------------------------------------------------------------------------
# Reports.

def _pm(stat: dict, digits: int = 2) -> str:
    m, (lo, hi) = stat["mean"], stat["ci95"]
    if m is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def markdown(summary: dict, result: dict, context: dict) -> str:
    methods = list(summary)
    lines = [f"# CAM evaluation: {context['model']} / {context['layer']}", "",
             f"{context['n_images']} images ({context['source']}), each explained for the model's top-1 class; "
             f"mean ± 95% CI half-width (Student t). Deletion: zero (mean-colour) baseline; insertion: blurred "
             f"image; {context['steps']} steps. Robustness: Gaussian noise of sigma x std(gradients) on the "
             f"target-layer gradients, CAMs compared at the input size (SSIM: Gaussian window 1.5).", "",
             "| Method | Avg Drop % ↓ | Increase % ↑ | Avg Drop % (CAM>0.5) ↓ | Increase % (CAM>0.5) ↑ "
             "| Deletion AUC ↓ | Insertion AUC ↑ | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for name in methods:
        e = summary[name]
        lines.append(f"| {LABELS.get(name, name)} | {_pm(e['average_drop'])} | {_pm(e['increase_in_confidence'])} "
                     f"| {_pm(e['average_drop_threshold'])} | {_pm(e['increase_in_confidence_threshold'])} "
                     f"| {_pm(e['deletion_auc'], 3)} | {_pm(e['insertion_auc'], 3)} | {e['seconds_per_image']:.3f} |")
    sigmas = next((list(e["robustness"]) for e in summary.values() if e["robustness"]), [])
    if sigmas:
        lines += ["", "Robustness to gradient noise (SSIM ↑ / MSE ↓ between the clean and the noisy CAM):", "",
                  "| Method | " + " | ".join(f"SSIM σ={s}" for s in sigmas) + " | "
                  + " | ".join(f"MSE σ={s}" for s in sigmas) + " |",
                  "|---|" + "---|" * (2 * len(sigmas))]
        for name in methods:
            rob = summary[name]["robustness"]
            if rob is None:
                cells = ["n/a (gradient-free)"] + ["—"] * (2 * len(sigmas) - 1)
                lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
                continue
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(_pm(rob[s]["ssim"], 3) for s in sigmas) + " | "
                         + " | ".join(_pm(rob[s]["mse"], 4) for s in sigmas) + " |")
    if result["clusters"]:
        lines += ["", "DBSCAN channel clusters per image (mean [min, max]):", "",
                  "| Method | clusters | noise channels | dead (all-zero) channels |", "|---|---|---|---|"]
        for name, c in result["clusters"].items():
            def fmt(v):
                return f"{np.mean(v):.1f} [{min(v)}, {max(v)}]"
            lines.append(f"| {LABELS.get(name, name)} | {fmt(c['n_clusters'])} | {fmt(c['noise'])} | "
                         f"{fmt(c['dead'])} |")
    lines += ["", f"Seconds per image: CAM computation only, device {context['device']}, "
                  f"{context['threads']} CPU thread(s); total run {context['seconds']:.0f} s. "
                  f"Options: `{context['options']}`.", ""]
    return "\n".join(lines)


def _plots(out: Path, summary: dict, result: dict, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    x = np.linspace(0, 1, steps + 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in summary:
        label = LABELS.get(name, name)
        for ax, kind in zip(axes, ("deletion", "insertion")):
            curve = result["curves"][name][kind].mean(axis=0)
            ax.plot(x, curve, label=f"{label} ({summary[name][kind + '_auc']['mean']:.3f})")
    for ax, kind in zip(axes, ("Deletion (AUC ↓)", "Insertion (AUC ↑)")):
        ax.set_title(kind)
        ax.set_xlabel("fraction of pixels deleted" if kind.startswith("Del") else "fraction of pixels inserted")
        ax.set_ylabel("probability of the target class (mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "deletion_insertion.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, e in summary.items():
        if e["robustness"] is None:
            continue
        sig = [float(s) for s in e["robustness"]]
        for ax, key in zip(axes, ("ssim", "mse")):
            stats = [e["robustness"][s][key] for s in e["robustness"]]
            mean = np.array([s["mean"] for s in stats], dtype=float)
            err = np.array([(s["ci95"][1] - s["ci95"][0]) / 2 if s["ci95"][0] is not None else 0 for s in stats])
            ax.errorbar(sig, mean, yerr=err, marker="o", capsize=3, label=LABELS.get(name, name))
    for ax, title in zip(axes, ("SSIM(clean, noisy CAM) ↑", "MSE(clean, noisy CAM) ↓")):
        ax.set_title(title)
        ax.set_xlabel("gradient noise sigma (x std of the gradients)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "robustness.png", dpi=110)
    plt.close(fig)


def comparison_grid(displays: torch.Tensor, cams: dict, names: Sequence[str], classes: Sequence[str],
                    probs: Sequence[float], rows: int) -> np.ndarray:
    """(H, W, 3) uint8: one row per image (its class and probability under the input), one column per
    method (labelled), JET overlays as in ``viz.overlay``."""
    from .viz import contact_sheet, overlay

    rows = min(rows, len(names))
    tiles, labels = [], []
    for r in range(rows):
        tiles.append(displays[r])
        labels.append(f"{names[r]}: {classes[r]} ({probs[r]:.2f})")
        for name, maps in cams.items():
            tiles.append(overlay(displays[r:r + 1], maps[r:r + 1])[0])
            labels.append(f"{LABELS.get(name, name)}")
    return contact_sheet(torch.stack(tiles), labels, ncols=1 + len(cams))


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(type(value).__name__)


def _finite(values):
    return [v if math.isfinite(v) else None for v in values]


# ---------------------------------------------------------------------------------------------------
# Entry points.

def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; returns the exit code (0, 1 some images unreadable, 2 usage).

    Under ``torchrun`` (WORLD_SIZE > 1) every rank evaluates its ``distributed.shard`` of the images and
    rank 0 gathers the per-image values and writes what one process writes (the same numbers); the other
    ranks write and print nothing, and every rank returns the same exit code."""
    from . import distributed

    try:
        ctx = distributed.context()
    except ValueError as error:
        print(f"cfcam evaluate: error: {error}", file=sys.stderr)
        return 2
    try:
        return _run(args) if not ctx.distributed else _run_distributed(args, ctx)
    except EvaluateError as error:
        if ctx.is_main:  # the options and inputs are every rank's: rank 0 says it
            print(f"cfcam evaluate: error: {error}", file=sys.stderr)
        return 2
    finally:
        if ctx.distributed:
            distributed.destroy()


def _setup(args, device_spec: str | None = None):
    _check_args(args)
    methods = _parse_methods(args.methods)
    sigmas = _parse_sigmas(args.sigmas)
    device = _device(device_spec or args.device)
    forward_batch_size = args.forward_batch_size or (8 if device.type == "cpu" else 64)
    return methods, sigmas, device, forward_batch_size


def _make_out(args, write: bool = True) -> Path:
    out = Path(args.out)
    if write:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EvaluateError(f"--out: cannot create {str(out)!r} ({error.strerror or error})") from None
    return out


def _logger(quiet: bool):
    return (lambda *a: None) if quiet else (lambda msg: print(f"[evaluate] {msg}", file=sys.stderr, flush=True))


def _run(args) -> int:
    t_start = time.perf_counter()
    methods, sigmas, device, forward_batch_size = _setup(args)
    out = _make_out(args)
    log = _logger(args.quiet)
    model, info, layer = _load_model(args, device)
    images, displays, names, failures = _load_images(args, info, device)
    for path, error in failures:
        print(f"cfcam evaluate: skipped {path}: {error}", file=sys.stderr)
    log(f"{len(names)} images, model {info.name}, layer {layer}, methods {','.join(methods)}, device {device}")
    result = evaluate(model, layer, images, methods, info.mean, info.std, steps=args.steps, sigmas=sigmas,
                      batch_size=args.batch_size, forward_batch_size=forward_batch_size, seed=args.seed,
                      log=log)
    _write(out, args, methods, sigmas, result, names, displays, info, layer, device, forward_batch_size,
           t_start, log)
    return 1 if failures else 0


def _write(out, args, methods, sigmas, result, names, displays, info, layer, device, forward_batch_size,
           t_start, log, processes: str = "") -> None:
    """metrics.json, metrics.md, per_image.json, curves.npz, the plots and comparison.png. ``displays`` and
    ``result["cams"]`` need only the first ``--grid-images`` rows."""
    from .viz import save_png

    summary = summarize(result, methods)
    classes = [info.class_names[t] for t in result["targets"].tolist()]
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=_json_default) + "\n")
    per_image = {
        "images": names, "targets": result["targets"].tolist(), "classes": classes,
        "probabilities": result["probs"].tolist(),
        "methods": {name: {k: (_finite(v) if k != "robustness" else
                               (None if v is None else {f"{s:g}": {m: _finite(x) for m, x in d.items()}
                                                        for s, d in v.items()}))
                           for k, v in result["per_image"][name].items()} for name in methods},
        "clusters": result["clusters"], "seconds": result["seconds"],
    }
    (out / "per_image.json").write_text(json.dumps(per_image, indent=1, default=_json_default) + "\n")
    np.savez_compressed(out / "curves.npz", **{f"{name}__{kind}": c for name, d in result["curves"].items()
                                               for kind, c in d.items()})
    _plots(out, summary, result, args.steps)
    grid = comparison_grid(displays, result["cams"], names, classes, result["probs"].tolist(), args.grid_images)
    save_png(grid, out / "comparison.png")
    context = {"model": info.name, "layer": layer, "n_images": len(names),
               "source": "bundled scikit-image / scikit-learn photos" if args.demo else "PATHs",
               "steps": args.steps, "device": str(device) + processes, "threads": torch.get_num_threads(),
               "seconds": time.perf_counter() - t_start,
               "options": f"--methods {','.join(methods)} --steps {args.steps} "
                          f"--sigmas {','.join(f'{s:g}' for s in sigmas)} "
                          f"--batch-size {args.batch_size} --forward-batch-size {forward_batch_size} --seed {args.seed}"
                          + (f" --max-images {args.max_images}" if args.max_images else "")}
    (out / "metrics.md").write_text(markdown(summary, result, context))
    log(f"wrote {out}/metrics.json, metrics.md, per_image.json, curves.npz, deletion_insertion.png, "
        f"robustness.png, comparison.png in {context['seconds']:.0f} s")


# ---------------------------------------------------------------------------------------------------
# Several processes (torchrun).

def _load_shard(args, info, ctx):
    """This rank's images, as ``_load_images`` would load them in one process and ``shard`` splits them.

    Every rank lists the inputs, decodes its ``shard`` of them (in order, at most --max-images readable
    ones) and the ranks share which files decoded; the images kept are the first --max-images readable
    ones of the whole list, and the failures those one process meets. Returns (images (n, 3, H, W) CPU,
    displays, names, positions: the images' places among all the images kept, n_total, failures: every
    rank's (path, error), in input order)."""
    from . import data, distributed

    if args.demo:
        bundled = data.bundled_images()[: args.max_images]
        keys = [name for name, _ in bundled]
        load = lambda i: (bundled[i][0], bundled[i][1], None)
    else:
        paths = _input_paths(args)
        keys = [str(p) for p in paths]
        dataset = data.ImageFolderDataset(paths, info.input_size, info.mean, info.std)
    mine: dict[int, tuple] = {}  # input index -> (image, display, name)
    status: list[tuple[int, str | None]] = []  # (input index, error or None), decoded here
    for i in distributed.shard(range(len(keys)), ctx.rank, ctx.world_size):
        if args.demo:
            name, array, _ = load(i)
            display = data.display_images([array], info.input_size)
            mine[i] = (data.normalize(display, info.mean, info.std)[0], display[0], name)
            status.append((i, None))
        else:
            sample = dataset[i]
            if not sample.ok:
                status.append((i, sample.error))
                continue
            mine[i] = (sample.image, sample.display.float() / 255, dataset.paths[i].stem)
            status.append((i, None))
        if args.max_images is not None and len(mine) >= args.max_images:
            break  # the first --max-images readable images of the list are among every rank's first ones
    decoded = sorted(x for part in distributed.all_gather_object(status) for x in part)
    readable = [i for i, error in decoded if error is None]
    if args.max_images is not None and len(readable) > args.max_images:
        readable = readable[: args.max_images]
    if not readable:
        first = next((error for _, error in decoded), "?")
        raise EvaluateError(f"PATH: none of the {len(keys)} files could be read; first error: {first}")
    cutoff = readable[-1] if args.max_images is not None and len(readable) == args.max_images else len(keys)
    failures = [(keys[i], error) for i, error in decoded if error is not None and i < cutoff]
    place = {i: p for p, i in enumerate(readable)}
    kept = [i for i in sorted(mine) if i in place]
    images = torch.stack([mine[i][0] for i in kept]) if kept else None
    displays = torch.stack([mine[i][1] for i in kept]) if kept else None
    return images, displays, [mine[i][2] for i in kept], [place[i] for i in kept], len(readable), failures


def _merge(parts: list[dict], methods, sigmas_present: dict) -> tuple[dict, list, torch.Tensor]:
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
        per = {k: cat([p[k] for p in pers]) for k in SCALARS}
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


def _run_distributed(args, ctx) -> int:
    from . import distributed

    t_start = time.perf_counter()
    methods, sigmas, device, forward_batch_size = _setup(args, distributed.device_spec(args.device, ctx))
    out = _make_out(args, write=ctx.is_main)
    log = _logger(args.quiet or not ctx.is_main)
    model, info, layer = _load_model(args, device)
    distributed.init(device)
    if args.weights is None:
        distributed.broadcast_module(model)  # random weights: every rank uses rank 0's
    images, displays, names, positions, total, failures = _load_shard(args, info, ctx)
    if ctx.is_main:
        for path, error in failures:
            print(f"cfcam evaluate: skipped {path}: {error}", file=sys.stderr)
    log(f"{total} images, model {info.name}, layer {layer}, methods {','.join(methods)}, device {device} "
        f"x {ctx.world_size} processes")
    rows = min(args.grid_images, total)
    if positions:
        result = evaluate(model, layer, images.to(device), methods, info.mean, info.std, steps=args.steps,
                          sigmas=sigmas, batch_size=args.batch_size, forward_batch_size=forward_batch_size,
                          seed=args.seed, log=log, positions=positions, total=total)
        part = {"positions": positions, "names": names, "targets": result["targets"].tolist(),
                "probs": result["probs"].tolist(), "per_image": result["per_image"], "curves": result["curves"],
                "seconds": result["seconds"], "clusters": result["clusters"],
                "grid": {p: (displays[k], {name: result["cams"][name][k] for name in methods})
                         for k, p in enumerate(positions) if p < rows}}
    else:  # nothing to do here (fewer images than ranks)
        part = {"positions": [], "names": [], "targets": [], "probs": [],
                "per_image": {name: {**{k: [] for k in SCALARS}, "robustness": None} for name in methods},
                "curves": {name: {k: np.zeros((0, args.steps + 1), np.float32) for k in ("deletion", "insertion")}
                           for name in methods},
                "seconds": {name: {"cam": 0.0, "metrics": 0.0} for name in methods}, "clusters": {}, "grid": {}}
    parts = distributed.all_gather_object(part)
    code = 1 if failures else 0
    if not ctx.is_main:
        distributed.barrier()  # a rank that exits non-zero makes torchrun stop the others: wait for rank 0
        return code
    # gradient-free methods have robustness None on every rank; the others on the ranks with images
    sigmas_present = {name: next((list(p["per_image"][name]["robustness"]) for p in parts
                                  if p["per_image"][name]["robustness"] is not None), None) for name in methods}
    result, names, grid_displays = _merge(parts, methods, sigmas_present)
    _write(out, args, methods, sigmas, result, names, grid_displays, info, layer, device, forward_batch_size,
           t_start, log, processes=f" x {ctx.world_size} processes")
    distributed.barrier()
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cfcam_gpu.evaluate", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return run(args)
    except KeyboardInterrupt:
        print("cfcam evaluate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
