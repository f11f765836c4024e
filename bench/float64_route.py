"""The CPU cost of clustering float64 features (the float64 route), ms per image.

    python -m bench.float64_route [--model resnet50 --layers layer4 --batch 4 --repeats 5 --threads 1]

Captures real target-layer activations (the bundled photos, as ``bench.run``), converts them to
float64 and times ``channel_clusters`` on the CPU (median of ``--repeats``), and the float32 features'
screened route in the same run for scale.
"""
from __future__ import annotations

from .cpu_passes import _median_ms, _print_row, activations_by_layer, layer_arguments


def main(argv=None) -> None:
    args = layer_arguments(__doc__.splitlines()[0], repeats=5).parse_args(argv)
    from cfcam_gpu.cluster import channel_clusters

    for layer, acts in activations_by_layer(args):
        acts32, acts64 = acts.float().contiguous(), acts.double().contiguous()
        fns = {"float64 features": lambda: channel_clusters(acts64),
               "float32 features": lambda: channel_clusters(acts32)}
        ms = _median_ms(fns, args.repeats)
        print(f"## {layer}  acts {tuple(acts.shape)}")
        _print_row("cluster", {k: v / args.batch for k, v in ms.items()}, "  (ms per image)")


if __name__ == "__main__":
    main()
