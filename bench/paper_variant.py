"""The published CF-CAM (``variant="paper"``) against the seed variant and Grad-CAM on the pretrained
EfficientNet-Lite0, with the authors' protocol (``cfcam_gpu.paper_metrics``).

    python -m bench.paper_variant --images 16 --curve-images 8 --threads 2 --json /tmp/paper_variant.json

Per layer (default ``bn2`` and ``blocks.6``) and method: all-zero maps, the top-1 class's map against the
second class's (Pearson correlation at the layer's resolution: near 1 means the map hardly depends on the
class), the authors' Average Drop (unclipped and clipped), their Average Increase, deletion / insertion
AUCs (100 steps of 1% to the zero input; on the first ``--curve-images`` images), and robustness (SSIM /
MSE at noise levels 1..10 on the gradients, before every method's weights). Images: the photos bundled
with scikit-image / scikit-learn (``bench.common.make_images``: cycled, mirrored on the second pass).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import make_images
from cfcam_gpu import cfcam_from_features, gradcam_from_features, resolve_layer
from cfcam_gpu import paper_metrics as P
from cfcam_gpu.models import LITE0_MEAN, LITE0_STD, load_efficientnet_lite0

METHODS = {
    "cfcam (seed)": lambda a, g: cfcam_from_features(a, g),
    "cfcam-paper": lambda a, g: cfcam_from_features(a, g, variant="paper"),
    "gradcam": lambda a, g: gradcam_from_features(a, g),
}


def capture(model, layer, images, rank: int = 0):
    """Activations and gradients of ``layer`` for the logit of each image's class at ``rank`` (0: top-1).
    -> acts, grads (B, C, h, w), targets (B,)."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        with torch.enable_grad():
            logits = model(images)
            targets = logits.argsort(dim=1, descending=True)[:, rank]
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grads.detach(), targets


def correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of (B, ...) maps; NaN where a map is constant."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    x, y = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
    return (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1))


def nanmean(t: torch.Tensor) -> float:
    t = t.double()
    return float(t[torch.isfinite(t)].mean()) if torch.isfinite(t).any() else float("nan")


def evaluate_layer(model, layer_name: str, images: torch.Tensor, curve_images: int, levels) -> dict:
    layer = resolve_layer(model, layer_name)
    acts, grads, targets = capture(model, layer, images)
    acts2, grads2, _ = capture(model, layer, images, rank=1)
    size = tuple(images.shape[-2:])
    out = {"shape": list(acts.shape)}
    for name, fn in METHODS.items():
        t0 = time.perf_counter()
        res = fn(acts, grads)
        cams = res.cams
        row = {"all_zero_maps": int((cams.amax(dim=(1, 2)) == 0).sum()), "images": cams.shape[0]}
        row["top1_vs_top2_corr"] = nanmean(correlation(cams, fn(acts2, grads2).cams))
        drop = P.paper_average_drop(model, images, cams, targets, mean=LITE0_MEAN, std=LITE0_STD)
        row["average_drop_pct"] = nanmean(drop.drop)
        row["average_drop_clipped_pct"] = nanmean(drop.drop_clipped)
        row["increase_in_confidence_pct"] = 100 * float(drop.increase.double().mean())
        row["average_increase"] = nanmean(P.paper_average_increase(model, images, cams, targets).increase)
        n = min(curve_images, cams.shape[0])
        if n:
            curves = P.paper_deletion_insertion(model, images[:n], cams[:n], targets[:n], batch_size=128)
            row["deletion_auc"] = nanmean(curves.deletion_auc)
            row["insertion_auc"] = nanmean(curves.insertion_auc)
        rob = P.paper_robustness(fn, acts, grads, size, levels, generator=torch.Generator().manual_seed(0))
        row["robustness_ssim"] = {str(k): round(nanmean(v.ssim), 4) for k, v in rob.items()}
        row["robustness_mse"] = {str(k): round(nanmean(v.mse), 5) for k, v in rob.items()}
        if res.labels is not None:
            row["mean_clusters"] = float(res.n_clusters.double().mean())
            row["noise_fraction"] = float((res.labels == -1).double().mean())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = row
        print(layer_name, name, json.dumps(row), flush=True)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="bn2,blocks.6")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--curve-images", type=int, default=8, help="0: no deletion / insertion curves")
    p.add_argument("--levels", default="1,2,3,4,5,6,7,8,9,10", help="robustness noise levels")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_efficientnet_lite0("cpu")
    images, what = make_images(args.images, norm=(LITE0_MEAN, LITE0_STD))
    result = {"images": what, "n_images": args.images, "curve_images": args.curve_images, "levels": args.levels,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    for layer in args.layers.split(","):
        result[layer] = evaluate_layer(model, layer, images, args.curve_images,
                                       [float(v) for v in args.levels.split(",")])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
