"""The files of ``cfcam evaluate``: metrics.json, metrics.md (tables), per_image.json, curves.npz, the plots
(deletion_insertion.png, robustness.png, matplotlib imported only here) and comparison.png. Every file is
written with ``outputs.write_atomic``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import metrics as M
from .outputs import write_atomic, write_text_atomic
from .scores import LABELS, ROAD_SCALARS, SCALARS, robustness_free

FILES = ("metrics.json", "metrics.md", "per_image.json", "curves.npz", "deletion_insertion.png", "robustness.png",
         "comparison.png")


RESAMPLES = 2000  # percentile-bootstrap resamples of every interval (seeded: the same files for the same values)
INTERVAL = f"95% percentile-bootstrap interval of the mean ({RESAMPLES} resamples, seeded)"


def _stat(values) -> dict:
    """{"mean", "ci95": [low, high]}: the interval lies within the values' range, so within the
    quantity's possible one (percentages in [0, 100], AUCs in [0, 1], SSIM in [-1, 1], MSE >= 0)."""
    m, lo, hi = M.mean_ci(values, method="bootstrap", resamples=RESAMPLES, seed=0)
    clean = lambda v: None if not math.isfinite(v) else v  # noqa: E731
    return {"mean": clean(m), "ci95": [clean(lo), clean(hi)]}


def summarize(result: dict, methods: Sequence[str]) -> dict:
    """{method: {metric: {"mean", "ci95"}, "robustness": {sigma: {"ssim", "mse"}} | None, ...}}."""
    summary = {}
    N = len(result["targets"])
    for name in methods:
        per = result["per_image"][name]
        entry = {k: _stat(per[k]) for k in SCALARS + ROAD_SCALARS if k in per}
        rob = per["robustness"]
        entry["robustness"] = None if rob is None else {
            f"{s:g}": {"ssim": _stat(v["ssim"]), "mse": _stat(v["mse"])} for s, v in rob.items()}
        entry["n_images"] = N
        entry["seconds_per_image"] = result["seconds"][name]["cam"] / N
        summary[name] = entry
    return summary



def pm(stat: dict, digits: int = 2) -> str:
    """A statistic {"mean", "ci95": (lo, hi)} as "mean [lo, hi]" text ("n/a" without a mean)."""
    m, (lo, hi) = stat["mean"], stat["ci95"]
    if m is None:
        return "n/a"
    if lo is None or hi is None:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def markdown(summary: dict, result: dict, context: dict) -> str:
    methods = list(summary)
    lines = [f"# CAM evaluation: {context['model']} / {context['layer']}", "",
             f"{context['n_images']} images ({context['source']}), each explained for the model's top-1 class; "
             f"mean [{INTERVAL}]. Deletion: zero (mean-colour) baseline; insertion: blurred "
             f"image; {context['steps']} steps. Robustness: Gaussian noise of sigma x std(gradients) on the "
             f"target-layer gradients, CAMs compared at the input size (SSIM: Gaussian window 1.5)"
             + ("; of the smoothed maps (with --aug-smooth, the noise is on every augmented copy's gradients)"
                if context.get("smoothed") else "") + ".", "",
             "| Method | Avg Drop % ↓ | Increase % ↑ | Avg Drop % (CAM>0.5) ↓ | Increase % (CAM>0.5) ↑ "
             "| Deletion AUC ↓ | Insertion AUC ↑ | s / image |",
             "|---|---|---|---|---|---|---|---|"]
    for name in methods:
        e = summary[name]
        lines.append(f"| {LABELS.get(name, name)} | {pm(e['average_drop'])} | {pm(e['increase_in_confidence'])} "
                     f"| {pm(e['average_drop_threshold'])} | {pm(e['increase_in_confidence_threshold'])} "
                     f"| {pm(e['deletion_auc'], 3)} | {pm(e['insertion_auc'], 3)} | {e['seconds_per_image']:.3f} |")
    if all("road_combined" in e for e in summary.values()):
        lines += ["", "ROAD (RemOve And Debias, noisy linear imputation, noise 0.01; percentiles 10, 20, ..., 90): "
                  "change of the target logit when the most (MoRF ↓) or least (LeRF ↑) relevant pixels are "
                  "imputed; combined = (LeRF - MoRF) / 2 ↑:", "",
                  "| Method | ROAD combined ↑ | MoRF ↓ | LeRF ↑ |", "|---|---|---|---|"]
        for name in methods:
            e = summary[name]
            lines.append(f"| {LABELS.get(name, name)} | {pm(e['road_combined'], 3)} | {pm(e['road_morf'], 3)} "
                         f"| {pm(e['road_lerf'], 3)} |")
    sigmas = next((list(e["robustness"]) for e in summary.values() if e["robustness"]), [])
    if sigmas:
        lines += ["", "Robustness to gradient noise (SSIM ↑ / MSE ↓ between the clean and the noisy CAM):", "",
                  "| Method | " + " | ".join(f"SSIM σ={s}" for s in sigmas) + " | "
                  + " | ".join(f"MSE σ={s}" for s in sigmas) + " |",
                  "|---|" + "---|" * (2 * len(sigmas))]
        for name in methods:
            rob = summary[name]["robustness"]
            if rob is None:
                cells = [f"n/a ({robustness_free(name)})"] + ["—"] * (2 * len(sigmas) - 1)
                lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
                continue
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(pm(rob[s]["ssim"], 3) for s in sigmas) + " | "
                         + " | ".join(pm(rob[s]["mse"], 4) for s in sigmas) + " |")
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
    _save_figure(fig, out / "deletion_insertion.png")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, e in summary.items():
        if e["robustness"] is None:
            continue
        sig = [float(s) for s in e["robustness"]]
        for ax, key in zip(axes, ("ssim", "mse")):
            stats = [e["robustness"][s][key] for s in e["robustness"]]
            mean = np.array([s["mean"] for s in stats], dtype=float)
            err = np.array([[s["mean"] - s["ci95"][0], s["ci95"][1] - s["mean"]] if s["ci95"][0] is not None
                            else [0, 0] for s in stats]).T  # (2, n): the asymmetric bootstrap interval
            ax.errorbar(sig, mean, yerr=err, marker="o", capsize=3, label=LABELS.get(name, name))
    for ax, title in zip(axes, ("SSIM(clean, noisy CAM) ↑", "MSE(clean, noisy CAM) ↓")):
        ax.set_title(title)
        ax.set_xlabel("gradient noise sigma (x std of the gradients)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out / "robustness.png")
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    write_atomic(path, lambda file: fig.savefig(file, format="png", dpi=110))


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


def write_report(out, args, methods, sigmas, result, names, displays, info, layer, device, forward_batch_size,
                 t_start, log, processes: str = "", skipped: Sequence[tuple[str, str]] = ()) -> None:
    """metrics.json, metrics.md, per_image.json, curves.npz, the plots and comparison.png. ``displays`` and
    ``result["cams"]`` need only the first ``--grid-images`` rows; ``skipped``: the (path, error) of the
    inputs that could not be read."""
    from .viz import save_png

    summary = summarize(result, methods)
    classes = [info.class_names[t] for t in result["targets"].tolist()]
    write_text_atomic(out / "metrics.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    per_image = {
        "images": names, "targets": result["targets"].tolist(), "classes": classes,
        "probabilities": result["probs"].tolist(),
        "methods": {name: {k: (_finite(v) if k != "robustness" else
                               (None if v is None else {f"{s:g}": {m: _finite(x) for m, x in d.items()}
                                                        for s, d in v.items()}))
                           for k, v in result["per_image"][name].items()} for name in methods},
        "clusters": result["clusters"], "seconds": result["seconds"],
        "skipped": [{"path": path, "error": error} for path, error in skipped],
    }
    write_text_atomic(out / "per_image.json", json.dumps(per_image, indent=1, default=_json_default) + "\n")
    curves = {f"{name}__{kind}": c for name, d in result["curves"].items() for kind, c in d.items()}
    write_atomic(out / "curves.npz", lambda file: np.savez_compressed(file, **curves))
    _plots(out, summary, result, args.steps)
    grid = comparison_grid(displays, result["cams"], names, classes, result["probs"].tolist(), args.grid_images)
    save_png(grid, out / "comparison.png")
    context = {"model": info.name, "layer": layer, "n_images": len(names),
               "smoothed": args.aug_smooth or args.eigen_smooth,
               "source": "bundled scikit-image / scikit-learn photos" if args.demo else "PATHs",
               "steps": args.steps, "device": str(device) + processes, "threads": torch.get_num_threads(),
               "seconds": time.perf_counter() - t_start,
               "options": f"--methods {','.join(methods)} --steps {args.steps} "
                          f"--sigmas {','.join(f'{s:g}' for s in sigmas)} "
                          f"--batch-size {args.batch_size} --forward-batch-size {forward_batch_size} --seed {args.seed}"
                          + (f" --max-images {args.max_images}" if args.max_images else "")
                          + (f" --metrics {','.join(args.metrics)}" if args.metrics else "")
                          + (" --aug-smooth" if args.aug_smooth else "")
                          + (" --eigen-smooth" if args.eigen_smooth else "")}
    write_text_atomic(out / "metrics.md", markdown(summary, result, context))
    log(f"wrote {out}/metrics.json, metrics.md, per_image.json, curves.npz, deletion_insertion.png, "
        f"robustness.png, comparison.png in {context['seconds']:.0f} s")
