"""The CPU cost of clustering float64 features (the float64 route), ms per image.

    python -m bench.float64_route [--model resnet50 --layers layer4 --batch 4 --repeats 5 --threads 1]

Captures real target-layer activations (the bundled photos, as ``bench.run``), converts them to
float64 and times ``channel_clusters`` on the CPU (median of ``--repeats``), and the float32 features'
screened route in the same run for scale.
"""
from __future__ import annotations

import argparse

import torch

from . import common
from .cpu_passes import _median_ms, _print_row
from .stages import capture_features


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--layers", default="layer4")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = common.load_model(args.model)
    model.eval()
    from cfcam_gpu.cluster import channel_clusters
    from cfcam_gpu.layers import resolve_layer

    images, _ = common.make_images(args.batch)
    print(f"# {common.now_iso()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"{args.model}  batch {args.batch}")
    for short in args.layers.split(","):
        layer = common.layer_name(args.model, short)
        acts, _ = capture_features(model, resolve_layer(model, layer), images)
        acts32, acts64 = acts.float().contiguous(), acts.double().contiguous()
        fns = {"float64 features": lambda: channel_clusters(acts64),
               "float32 features": lambda: channel_clusters(acts32)}
        ms = _median_ms(fns, args.repeats)
        print(f"## {layer}  acts {tuple(acts.shape)}")
        _print_row("cluster", {k: v / args.batch for k, v in ms.items()}, "  (ms per image)")


if __name__ == "__main__":
    main()
