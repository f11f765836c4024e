"""Gradient-free engines (EigenCAM, KPCA-CAM, FEM, RandomCAM) without and with the graph and backward pass
they used to run, side by side in one process.

    python -m bench.gradient_free --threads 2 [--model resnet50 --layers layer2,layer3,layer4 --batch 8
                                   --repeats 7 --methods eigencam,kpcacam,fem,randomcam]

"now" is the engine as shipped (``uses_gradients = False``: one ``no_grad`` forward, the layer's output
kept); "before" is the same engine with ``uses_gradients = True``, which records the graph above the
layer and runs ``torch.autograd.grad`` of the target logits to it, as every engine did before. Both get
the same images (the bundled photos, as ``bench.run``), interleaved round-robin (the first of each round
alternates); prints the median ms per image of each, before / now, and whether the maps are equal.
"""
from __future__ import annotations

import argparse

import torch

from . import common


def _pair(cls):
    """(the engine class, the same class with the graph and the backward pass of the gradient methods)."""
    return cls, type(f"{cls.__name__}WithBackward", (cls,), {"uses_gradients": True})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", choices=("resnet50", "efficientnet_lite0"))
    ap.add_argument("--layers", default="layer2,layer3,layer4")
    ap.add_argument("--methods", default="eigencam,kpcacam,fem,randomcam")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from cfcam_gpu.methods import METHODS

    model, source = common.load_model(args.model)
    images, what = common.make_images(args.batch, norm=common.NORMALISATION[args.model])
    device = torch.device("cpu")
    print(f"# {common.machine_info(device)['cpu_model']}; torch {torch.__version__}; threads "
          f"{torch.get_num_threads()}; load average {common.loadavg()}")
    print(f"# {source}; {what}; batch {args.batch}; median of {args.repeats} rounds")
    print("| layer | method | before ms/img | now ms/img | before / now | maps equal |")
    print("|---|---|---|---|---|---|")
    for layer in args.layers.split(","):
        for name in args.methods.split(","):
            now_cls, before_cls = _pair(METHODS[name])
            engines = {}
            for label, cls in (("before", before_cls), ("now", now_cls)):
                options = {"generator": torch.Generator()} if name == "randomcam" else {}
                engines[label] = cls(model, layer, **options)

            def run(label):
                engine = engines[label]
                if name == "randomcam":
                    engine.generator.manual_seed(0)
                return engine(images).cams

            maps = {label: run(label) for label in engines}  # warm-up, and the maps compared
            times = {label: [] for label in engines}
            for r in range(args.repeats):
                for label in (("before", "now") if r % 2 == 0 else ("now", "before")):
                    seconds, _, _ = common.time_call(lambda: run(label), device)
                    times[label].append(seconds)
            ms = {k: common.median(v) * 1e3 / args.batch for k, v in times.items()}
            equal = torch.equal(maps["before"], maps["now"])
            print(f"| {layer} | {name} | {ms['before']:.1f} | {ms['now']:.1f} | "
                  f"{ms['before'] / ms['now']:.2f}x | {equal} |", flush=True)
    print(f"# load average after: {common.loadavg()}")


if __name__ == "__main__":
    main()
