"""The CPU clustering step (eps and labels, ``cluster._cluster_torch``) and the whole post-processing
(``cam.cfcam_from_features``) of this checkout against another checkout's, side by side in one process.

    git worktree add /tmp/before <commit>
    python -m bench.against_checkout /tmp/before --threads 2 [--layers layer3,layer4 --batch 16 --repeats 7]

The other checkout's ``cfcam_gpu`` is loaded under another name, so both run on the same captured
features (the bundled photos through ``--model``, as ``bench.run``), interleaved round-robin; prints the
median ms per image of each, the ratio, and whether eps and labels agree.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import torch

from .cpu_passes import activations_by_layer, layer_arguments


def load_checkout(path: Path, name: str = "cfcam_gpu_other"):
    """Import ``path/cfcam_gpu`` as the package ``name`` (its relative imports stay inside it)."""
    spec = importlib.util.spec_from_file_location(name, path / "cfcam_gpu" / "__init__.py",
                                                  submodule_search_locations=[str(path / "cfcam_gpu")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> None:
    ap = layer_arguments(__doc__.splitlines()[0], repeats=7)
    ap.add_argument("other", type=Path, help="another checkout of this repository")
    args = ap.parse_args(argv)
    other = load_checkout(args.other.resolve())
    import cfcam_gpu
    from cfcam_gpu import cam, cluster

    other_cluster = sys.modules[other.__name__ + ".cluster"]
    other_cam = sys.modules[other.__name__ + ".cam"]
    print(f"# this checkout: {Path(cfcam_gpu.__file__).parent.parent}   other: {args.other}")
    for layer, acts in activations_by_layer(args):
        feats = acts.flatten(2).float().contiguous()
        grads = torch.randn_like(acts)
        fns = {"other: clustering": lambda: other_cluster._cluster_torch(feats, False),
               "this: clustering": lambda: cluster._cluster_torch(feats, False),
               "other: post-processing": lambda: other_cam.cfcam_from_features(acts, grads, sync_free=False),
               "this: post-processing": lambda: cam.cfcam_from_features(acts, grads, sync_free=False)}
        results = {k: f() for k, f in fns.items()}
        same = all(torch.equal(getattr(results["other: clustering"], k), getattr(results["this: clustering"], k))
                   for k in ("labels", "eps"))
        times = {k: [] for k in fns}
        for _ in range(args.repeats):
            for k, f in fns.items():
                t = time.perf_counter()
                f()
                times[k].append((time.perf_counter() - t) / feats.shape[0] * 1e3)
        ms = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"## {layer}  features {tuple(feats.shape)}  same eps and labels: {same}")
        for what in ("clustering", "post-processing"):
            a, b = ms[f"other: {what}"], ms[f"this: {what}"]
            print(f"{what:16s} other {a:7.2f} ms/img   this {b:7.2f} ms/img   this is {a / b:.2f}x faster")


if __name__ == "__main__":
    main()
