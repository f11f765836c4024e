"""ROAD's imputation (``cfcam_gpu.road``) of this checkout against another checkout's, side by side in one
process, per image at 224 x 224.

    git archive <commit> | tar -x -C /tmp/before        # any earlier checkout
    python -m bench.road /tmp/before --threads 1 [--images 1 --rounds 2 --size 224]
    python -m bench.road /tmp/before --sweep          # this checkout's error and cost per step count

On the bundled photos (``--images`` of them, one at a time) with a smooth CAM: the 18 imputations ROAD
makes per image (MoRF and LeRF at the 9 percentiles, noise off), and ``road()`` end to end with ResNet50
(random weights, ``torch.manual_seed(0)``), each timed for both checkouts, alternated (A B B A ...);
prints the median CPU seconds per image of each, the ratio, and the largest differences between the two
(imputed pixels; ROAD scores).
"""
from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

import torch

from .against_checkout import load_checkout
from . import common
from .common import make_images


def smooth_cam(size: int) -> torch.Tensor:
    """(1, size, size): a Gaussian blob off centre (a CAM as bilinear upsampling makes them)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return torch.exp(-((xx - 0.2) ** 2 + (yy + 0.1) ** 2) * 3)[None]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", type=Path, help="another checkout of this repository (the 'before')")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per checkout (alternated)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--no-road", action="store_true", help="time the imputations only")
    ap.add_argument("--sweep", action="store_true",
                    help="this checkout only: distance to 40 steps and CPU time per solve, for 8, 10, 12, 16 steps")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import torchvision

    import cfcam_gpu.road as this

    other = importlib.import_module(load_checkout(args.other.resolve()).__name__ + ".road")
    print(f"# {common.now_iso()}  threads {args.threads}  size {args.size}  "
          f"load average {common.loadavg()}")
    print(f"# this: {Path(this.__file__).parent.parent}   other: {args.other}")
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    images, what = make_images(args.images, args.size)
    print(f"# images: {what}")
    cam = smooth_cam(args.size)
    masks = [(q, most) for most in (True, False) for q in this.PERCENTILES]

    def impute(module, x):
        return [module.linear_impute(x, module.removal_mask(cam, q, most)) for q, most in masks]

    def run_road(module, x):
        return module.road(model, x, cam, 0, noise=0.0)

    if args.sweep:
        x = images[:1]
        ends = [this.linear_impute(x, this.removal_mask(cam, q, most), 40) for q, most in masks]
        for steps in (8, 10, 12, 16):
            t = time.process_time()
            got = [this.linear_impute(x, this.removal_mask(cam, q, most), steps) for q, most in masks]
            seconds = (time.process_time() - t) / len(masks)
            diff = max(float((a - b).abs().max()) for a, b in zip(got, ends))
            print(f"{steps:3d} steps: max |x - x_40| {diff:.1e}   {seconds:.3f} s CPU per imputation")
        return
    stages = [("imputations", impute)] + ([] if args.no_road else [("road()", run_road)])
    for name, fn in stages:
        times = {"other": [], "this": []}
        results = {}
        for r in range(args.rounds):
            order = [("other", other), ("this", this)] if r % 2 == 0 else [("this", this), ("other", other)]
            for who, module in order:
                for x in images:
                    t = time.process_time()
                    results[who] = fn(module, x[None])
                    times[who].append(time.process_time() - t)
        med = {k: common.median(v) for k, v in times.items()}
        if name == "imputations":
            diff = max(float((a - b).abs().max()) for a, b in zip(results["this"], results["other"]))
        else:
            diff = max(float((getattr(results["this"], k) - getattr(results["other"], k)).abs().max())
                       for k in ("morf", "lerf", "combined"))
        print(f"{name:12s} other {med['other']:7.2f} s/img   this {med['this']:6.2f} s/img   "
              f"ratio {med['other'] / med['this']:5.1f}x   max |this - other| {diff:.1e}   "
              f"(CPU time, median of {len(times['this'])})")
    print(f"# load average after {common.loadavg()}")


if __name__ == "__main__":
    main()
