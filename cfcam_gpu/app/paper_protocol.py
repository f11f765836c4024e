"""``cfcam evaluate --protocol paper``: the CF-CAM authors' evaluation protocol (``cfcam_gpu.paper_metrics``)
on the images and model ``evaluate`` loaded, for every requested method, each image's top-1 class.

Per image and method: the authors' Average Drop (maps > 0.5 kept, the rest black; unclipped, and the usual
clipped term), Increase in Confidence, their "Average Increase" (maps > 0.3 pasted on a constant image),
deletion / insertion AUC (``--steps`` steps of H W // steps pixels towards / from the all-zero model input;
the authors use 100), and robustness: SSIM / MSE of the input-size map under N(0, level^2) gradient
noise, levels 1..10 (null for methods without a pure (activations, gradients) function).
Files in --out:
  paper_metrics.json  {"protocol", "steps", "levels", "n_images", "names", "targets",
                      "methods": {method: {"summary": {metric: {"mean", "ci95"}, "robustness": {level:
                      {"ssim", "mse": {"mean", "ci95"}}} or null}, "per_image": {metric: list,
                      "robustness": {level: {"ssim": list, "mse": list}} or null}}}}
  paper_metrics.md    the summary as markdown tables (mean [95% percentile-bootstrap interval])
Shapes: N images, 3 x H x W input, C x h x w target-layer features.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import paper_metrics as P
from ..hooks import LeafCapture, eval_mode, forward_hook
from ..layers import resolve_layer

from ..metrics import deletion_insertion, mean_ci
from .report import pm
from ..targets import resolve_targets
from .options import CLIError, reseed
from .scores import build_engine, robustness_fn, robustness_free

FILES = ("paper_metrics.json", "paper_metrics.md")
SCALARS = ("average_drop", "average_drop_clipped", "increase_in_confidence", "average_increase",
           "deletion_auc", "insertion_auc")
HEADERS = {"average_drop": "Avg Drop % (unclipped)", "average_drop_clipped": "Avg Drop % (clipped)",
           "increase_in_confidence": "Incr. in Conf. %", "average_increase": "Avg Increase (paste)",
           "deletion_auc": "Deletion AUC", "insertion_auc": "Insertion AUC"}


def _features(model, layer, images: torch.Tensor):
    """The layer's activations and gradients (B, C, h, w) for the top-1 logits, and the top-1 classes (B,)."""
    capture = LeafCapture()
    with forward_hook(resolve_layer(model, layer), capture), eval_mode(model):
        with torch.no_grad():
            logits = model(images)
        targets = resolve_targets(None, logits)
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), capture.output)
    return capture.output.detach(), grads, targets


def score_paper(model, layer, images: torch.Tensor, methods, mean, std, steps: int = 100, batch_size: int = 8,
                forward_batch_size: int = 64, seed: int = 0, levels=P.NOISE_LEVELS, log=None) -> dict:
    """Per-image values of the authors' protocol for every method on ``images`` (N, 3, H, W) (model input,
    normalised by ``mean``, ``std``), ``batch_size`` images per CAM batch. The gradient noise restarts
    from ``seed`` for every method (every method sees the same draws).
    -> {"targets": list, "per_image": {method: {metric: list, "robustness": {level: {"ssim", "mse"}} or None}}}."""
    log = log or (lambda *a: None)
    N, _, H, W = images.shape
    fb = forward_batch_size
    batches = [(i, min(i + batch_size, N)) for i in range(0, N, batch_size)]
    feats = [_features(model, layer, images[i:j]) for i, j in batches]
    generator = torch.Generator(images.device)
    out = {"targets": torch.cat([f[2] for f in feats]).tolist(), "per_image": {}}
    for name in methods:
        engine = build_engine(name, model, layer, fb, images.device)
        fn = robustness_fn(name)  # None where gradient noise does not reach the map
        per = {k: [] for k in SCALARS}
        robust = {lv: {"ssim": [], "mse": []} for lv in levels}
        generator.manual_seed(seed)
        for k, ((i, j), (acts, grads, tgt)) in enumerate(zip(batches, feats)):
            x = images[i:j]
            reseed(engine, seed, k)  # randomcam: its weights seeded by (seed, batch)
            cams = engine(x, tgt).cams
            drop = P.paper_average_drop(model, x, cams, tgt, mean=mean, std=std, batch_size=fb)
            paste = P.paper_average_increase(model, x, cams, tgt, batch_size=fb)
            curves = deletion_insertion(model, x, P.input_maps(cams, (H, W)), tgt, steps=steps, baseline="zero",
                                        batch_size=fb, pixels_per_step=max(1, H * W // steps))
            per["average_drop"] += drop.drop.tolist()
            per["average_drop_clipped"] += drop.drop_clipped.tolist()
            per["increase_in_confidence"] += (drop.increase.double() * 100).tolist()
            per["average_increase"] += paste.increase.tolist()
            per["deletion_auc"] += curves.deletion_auc.tolist()
            per["insertion_auc"] += curves.insertion_auc.tolist()
            if fn is not None:
                for lv, r in P.paper_robustness(fn, acts, grads, (H, W), levels, generator=generator).items():
                    robust[lv]["ssim"] += r.ssim.tolist()
                    robust[lv]["mse"] += r.mse.tolist()
        per["robustness"] = robust if fn is not None else None
        out["per_image"][name] = per
        log(f"paper protocol: {name} done")
    return out


def _stat(values) -> dict:
    m, low, high = mean_ci(values, method="bootstrap")
    clean = lambda v: v if math.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    return {"mean": clean(m), "ci95": [clean(low), clean(high)]}


def _clean(values: list) -> list:
    return [v if isinstance(v, (int, bool)) or math.isfinite(v) else None for v in values]


def summarize(result: dict, names, steps: int, levels) -> dict:
    """score_paper's result -> the paper_metrics.json document (means, 95% CIs, per-image values)."""
    doc = {"protocol": "paper (arXiv 2504.00060 v2)", "steps": steps, "levels": list(levels),
           "n_images": len(result["targets"]), "names": list(names), "targets": result["targets"], "methods": {}}
    for name, per in result["per_image"].items():
        rob = per["robustness"]
        doc["methods"][name] = {
            "summary": {**{k: _stat(per[k]) for k in SCALARS},
                        "robustness": None if rob is None else
                        {str(lv): {m: _stat(v[m]) for m in ("ssim", "mse")} for lv, v in rob.items()}},
            "per_image": {**{k: _clean(per[k]) for k in SCALARS},
                          "robustness": None if rob is None else
                          {str(lv): {m: _clean(v[m]) for m in ("ssim", "mse")} for lv, v in rob.items()}}}
    return doc


def _fmt(stat: dict, digits: int = 3) -> str:
    return pm(stat, digits)


def markdown(doc: dict) -> str:
    """The summary of a paper_metrics.json document as markdown tables."""
    lines = ["# CAM evaluation with the CF-CAM authors' protocol", "",
             f"{doc['n_images']} images, each explained for its top-1 class; mean [95% percentile-bootstrap interval]. "
             f"Deletion / insertion: {doc['steps']} steps towards / from the all-zero model input. "
             "Robustness: N(0, level²) noise on the target-layer gradients.", "",
             "| Method | " + " | ".join(HEADERS[k] for k in SCALARS) + " |",
             "|---" * (len(SCALARS) + 1) + "|"]
    for name, m in doc["methods"].items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m["summary"][k]) for k in SCALARS) + " |")
    levels = [str(lv) for lv in doc["levels"]]
    for metric in ("ssim", "mse"):
        lines += ["", f"## Robustness: {metric.upper()} by noise level", "",
                  "| Method | " + " | ".join(levels) + " |", "|---" * (len(levels) + 1) + "|"]
        for name, m in doc["methods"].items():
            rob = m["summary"]["robustness"]
            cells = [f"n/a ({robustness_free(name)})"] * len(levels) if rob is None else [
                _fmt(rob[lv][metric], 4) for lv in levels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(args, ctx, model, info, layer, images, names, methods, device, forward_batch_size, out: Path,
             log) -> None:
    """``evaluate --protocol paper|both``: the authors' protocol on ``images`` (N, 3, H, W, CPU), written
    to ``out``/paper_metrics.json and .md. One process only (CLIError under torchrun)."""
    if ctx.distributed:
        raise CLIError(f"--protocol: {args.protocol!r} runs in one process; run it without torchrun "
                       f"(got WORLD_SIZE={ctx.world_size}), or use --protocol default")
    held = [name for name in FILES if (out / name).exists()]
    if held and not args.overwrite:
        raise CLIError(f"--out: {str(out)!r} already holds {held[0]}; pass --overwrite to replace it, "
                       "or another --out")
    levels = P.NOISE_LEVELS
    result = score_paper(model, layer, images.to(device), methods, info.mean, info.std, steps=args.steps,
                         batch_size=args.batch_size, forward_batch_size=forward_batch_size, seed=args.seed,
                         levels=levels, log=log)
    doc = summarize(result, names, args.steps, levels)
    (out / FILES[0]).write_text(json.dumps(doc, indent=1))
    (out / FILES[1]).write_text(markdown(doc))
    log(f"paper protocol: wrote {out / FILES[0]}, {out / FILES[1]}")
