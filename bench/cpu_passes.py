"""The CPU route's choices, each measured side by side against the alternative it replaced.

    python -m bench.cpu_passes --threads 2 [--model resnet50 --layers layer3,layer4 --batch 4 --repeats 9]

Captures real target-layer activations (the bundled photos, as ``bench.run``), takes one image's
features x (C, N), and times, interleaved round-robin, each pair below; prints the median ms and the
ratio. Pairs:

  gram      float64 bmm + forming d2 (``distance.gram_squared_distances``) | float32 product of augmented rows
            (``screened.screened_squared_distances``), fresh output | the same into a reused buffer
  count     a bool ``sum`` | ``count_nonzero`` over a C*C mask
  eps       float64 Gram: gram_squared_distances + percentile_from_squared | screened route: screen +
            screened_percentile (buffer reused)
  dbscan0   round 0 of the components: masked minimum | one ``max`` over the uint8 adjacency
  dbscan    ``dbscan.dbscan_from_adjacency`` (whole DBSCAN) | scipy ``connected_components`` of the
            core graph alone (dense -> CSR), when scipy is importable

and, on the whole batch (ms per image), ``cluster``: the all-pairs route (``cluster._cluster_float64``:
exact V for every pair, the accelerators' route) | the screened route (``cluster._cluster_cpu``),
checking that both give the same eps and labels. ``--layers layer1,layer2,layer3,layer4`` repeats the
whole table per layer.
"""
from __future__ import annotations

import argparse
import time

import torch

from . import common
from .stages import capture_features


def _median_ms(fns: dict, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def pairs(x: torch.Tensor) -> dict[str, dict]:
    from cfcam_gpu import cluster, distance, screened
    from cfcam_gpu.dbscan import _masked_min, dbscan_from_adjacency
    from cfcam_gpu.percentile import percentile_from_squared

    C = x.shape[0]
    q = cluster.EPS_PERCENTILE
    norms = x.double().square().sum(dim=1)
    buf = x.new_empty(C, C)
    mask = torch.rand(C * C) < 0.25
    eps, adj = screened.screened_neighbours(x, q)
    adj = adj[None]
    parent = torch.arange(C)[None].to(torch.int16)
    out = {
        "gram": {"float64 bmm + form": lambda: distance.gram_squared_distances(x[None]),
                 "float32 augmented mm": lambda: screened.screened_squared_distances(x, norms),
                 "float32 augmented mm, out=": lambda: screened.screened_squared_distances(x, norms, buf)},
        "count": {"bool sum": lambda: int(mask.sum()), "count_nonzero": lambda: int(torch.count_nonzero(mask))},
        "eps": {"float64 Gram": lambda: percentile_from_squared(distance.gram_squared_distances(x[None]),
                                                                            q, torch.float32, False),
                "screened route": lambda: screened.screened_percentile(screened.screen(x, q, buf), q)},
        "dbscan0": {"masked minimum": lambda: _masked_min(adj, parent, C),
                    "max over uint8": lambda: adj.view(torch.uint8).max(dim=2)},
    }
    try:
        import numpy as np
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        def scipy_core_components():
            a = adj[0].numpy()
            core = a.sum(axis=1) >= cluster.seed_min_samples(C)
            return connected_components(sp.csr_matrix(a[np.ix_(core, core)]), directed=False)

        min_samples = cluster.seed_min_samples(C)
        out["dbscan"] = {"dbscan_from_adjacency": lambda: dbscan_from_adjacency(adj, min_samples, False),
                         "scipy components only": scipy_core_components}
    except ImportError:
        pass
    return out


def cluster_pair(feats: torch.Tensor) -> dict:
    """feats: (B, C, N) float32 -> the two CPU routes for the whole clustering step."""
    from cfcam_gpu import cluster

    return {"all-pairs route": lambda: cluster._cluster_float64(feats, False),
            "screened route": lambda: cluster._cluster_cpu(feats)}


def layer_arguments(description: str, repeats: int) -> argparse.ArgumentParser:
    """The options every per-layer CPU script shares: model, layers, batch, threads, repeats."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--layers", default="layer4", help="comma-separated; ResNet 'layerN' = its last block")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=repeats)
    return ap


def activations_by_layer(args):
    """Yield (layer name, activations (B, C, h, w)) of ``args.model`` for ``args.batch`` bundled photos at
    each of ``args.layers``, after setting the threads and the seed and printing the run's header."""
    from cfcam_gpu.layers import resolve_layer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = common.load_model(args.model)
    model.eval()
    images, _ = common.make_images(args.batch)
    print(f"# {common.now_iso()}  {common.machine_info(torch.device('cpu')).get('cpu_model', '')}  torch "
          f"{torch.__version__}  threads {torch.get_num_threads()}  {args.model}  batch {args.batch}")
    for short in args.layers.split(","):
        layer = common.layer_name(args.model, short)
        acts, _ = capture_features(model, resolve_layer(model, layer), images)
        yield layer, acts


def main(argv=None) -> None:
    ap = layer_arguments(__doc__.splitlines()[0], repeats=9)
    ap.add_argument("--image", type=int, default=0, help="which image of the batch the pair timings use")
    args = ap.parse_args(argv)
    for layer, acts in activations_by_layer(args):
        feats = acts.flatten(2).float().contiguous()
        x = feats[args.image]
        print(f"## {layer}  x {tuple(x.shape)}")
        for name, fns in pairs(x).items():
            _print_row(name, _median_ms(fns, args.repeats))
        routes = cluster_pair(feats)
        results = [f() for f in routes.values()]
        same = all(torch.equal(getattr(results[0], k), getattr(results[1], k)) for k in ("labels", "eps"))
        ms = _median_ms(routes, args.repeats)
        _print_row("cluster", {k: v / args.batch for k, v in ms.items()},
                   f"  (ms per image, batch {args.batch}; same eps and labels: {same})")


def _print_row(name: str, ms: dict[str, float], note: str = "") -> None:
    first = next(iter(ms.values()))
    print(f"{name:8s} " + "   ".join(f"{k}: {v:.2f} ms ({first / v:.2f}x)" for k, v in ms.items()) + note)


if __name__ == "__main__":
    main()
