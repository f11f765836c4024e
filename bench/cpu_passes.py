"""The CPU route's choices, each measured side by side against the alternative it replaced.

    python -m bench.cpu_passes --threads 2 [--model resnet50 --layers layer3,layer4 --batch 4 --repeats 9]

Captures real target-layer activations (the bundled photos, as ``bench.run``), takes one image's
features x (C, N), and times, interleaved round-robin, each pair below; prints the median ms and the
ratio (the first entry over each). Pairs:

  gram      float64 bmm + forming d2 (``distance.gram_squared_distances``) | float32 product of augmented rows
            (``screened.screened_squared_distances``), fresh output | the same into a reused buffer
  sample    the bracket from a sorted strided sample | from two selections (``percentile_ops.sampled_bracket``)
  split     the pass after the product as torch passes (lt, le ^ lt, nonzero, row counts) | NumPy in
            ``torch.get_num_threads()`` threads, each thread's rows at once | the same a cache-sized block at
            a time (``screened.split_at_bracket``, ``SPLIT_BLOCK_BYTES``) | the torch passes fused by
            ``torch.compile`` (inductor's CPU code; compile time excluded, printed apart; skipped if it
            cannot compile here)
  sweep     product + split on the whole (C, C) matrix (the library) | row blocks of d~ made and split while in
            cache (``ROW_BLOCKS`` rows at a time), torch passes | the same blocks split by NumPy
  pct       percentile from the bracket with a bound per bracket entry (before) | from the candidates within
            2 Delta only (``screened.screened_percentile``)
  count     a bool ``sum`` | ``count_nonzero`` over a C*C mask
  rows      row counts of a (C, C) mask: bool ``sum`` | bytes summed into int16 (``dbscan_ops.row_counts``)
  reach     one search step's rows of the adjacency (a quarter of them): bool ``any`` | byte ``amax`` (the
            library) | bit-packed rows OR-ed pairwise
  dbscan    dense rounds (``dbscan_ops.dbscan_from_adjacency``) | breadth-first search (``dbscan_ops.dbscan_by_search``,
            the CPU route) | scipy ``connected_components`` of the core graph alone (when importable)

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


ROW_BLOCKS = 128  # rows per block of the ``sweep`` pair's blocked variants


def _whole_rows(split, *args):
    """``split`` with each thread's rows as one block (``SPLIT_BLOCK_BYTES`` out of the way)."""
    from cfcam_gpu import screened

    kept, screened.SPLIT_BLOCK_BYTES = screened.SPLIT_BLOCK_BYTES, 2**62
    try:
        return split(*args)
    finally:
        screened.SPLIT_BLOCK_BYTES = kept


def _blocked_sweep(P, Q, lo_v, hi_v, below, split):
    """Row blocks of d~ = P Q^T, each split (``split(block, lo_v, hi_v, below_rows)``) while in cache."""
    C = P.shape[0]
    block = P.new_empty(ROW_BLOCKS, C)
    rows, idx = [], []
    for r0 in range(0, C, ROW_BLOCKS):
        r1 = min(C, r0 + ROW_BLOCKS)
        d = block[:r1 - r0]
        torch.mm(P[r0:r1], Q.T, out=d)
        counts, i, _ = split(d, lo_v, hi_v, below[r0:r1])
        rows.append(counts)
        idx.append(i + r0 * C)
    return torch.cat(rows), torch.cat(idx)


def _bracket_sorted(flat, ranks, width):
    """What ``percentile_ops.sampled_bracket`` replaced: the same sample, sorted whole."""
    from cfcam_gpu.percentile_ops import bracket_positions, sample_step

    sample = flat[::sample_step(flat.numel(), width)].sort().values
    i_lo, i_hi = bracket_positions(sample.numel(), flat.numel(), ranks)
    return float(sample[max(0, i_lo)]), float(sample[min(sample.numel() - 1, i_hi)])


def _percentile_all_bounds(sc, q):
    """What ``screened.screened_percentile`` replaced: a bound for every bracket entry, D over all of them."""
    from cfcam_gpu import screened
    from cfcam_gpu.percentile_ops import matrix_rank, next_value

    lo, hi, _ = matrix_rank(sc.x64.shape[0], q)
    below, vals, delta = sc.n_below, sc.vals.double(), sc.bounds(sc.idx)
    s_lo = vals.kthvalue(lo - below + 1).values
    s_hi = s_lo if hi == lo else next_value(vals[None], s_lo[None], lo - below)[0]
    D = (delta - torch.maximum(s_lo - vals, vals - s_hi).clamp_min(0)).max().clamp_min(0)
    L, H = s_lo - D, s_hi + D
    window = (vals + delta >= L) & (vals - delta <= H)
    below += int(torch.count_nonzero(vals + delta < L))
    return screened.exact_squared_distances(sc.x64, sc.idx[window]).kthvalue(lo - below + 1).values


def _compiled_split():
    """The comparisons of ``screened.split_by_passes`` compiled (static shapes); None if inductor cannot."""
    def masks(flat, lo_v, hi_v):
        below = flat < lo_v
        return below, (flat <= hi_v) ^ below

    try:
        fn = torch.compile(masks, dynamic=False)
        return fn
    except Exception:  # noqa: BLE001 - a benchmark reports what it cannot run
        return None


def pairs(x: torch.Tensor) -> dict[str, dict]:
    from cfcam_gpu import cluster, distance, screened
    from cfcam_gpu.dbscan_ops import _masked_min, dbscan_by_search, dbscan_from_adjacency, row_counts
    from cfcam_gpu.percentile_ops import matrix_rank, sampled_bracket

    C = x.shape[0]
    q = cluster.EPS_PERCENTILE
    norms = x.double().square().sum(dim=1)
    buf = x.new_empty(C, C)
    below = torch.empty(C, C, dtype=torch.bool)
    mask = torch.rand(C * C) < 0.25
    eps, adj, counts = screened.screened_neighbours(x, q)
    d = screened.screened_squared_distances(x, norms, buf)
    flat = d.view(-1)
    lo, hi, _ = matrix_rank(C, q)
    lo_v, hi_v = sampled_bracket(flat, (lo, hi), C)
    n32, ones = norms.float()[:, None], x.new_ones(C, 1)
    P, Q = torch.cat([x, n32, ones], dim=1), torch.cat([x * -2, ones, n32], dim=1)
    sc = screened.screen(x, q)  # screened_percentile reads it only
    frontier = torch.arange(0, C, 4)
    packed = adj.contiguous().view(torch.int64)

    def or_rows(rows):
        w = packed.index_select(0, rows)
        while w.shape[0] > 1:
            half = w.shape[0] // 2
            top = w[:half] | w[half:2 * half]
            if w.shape[0] % 2:
                top[0] |= w[-1]
            w = top
        return w[0].view(torch.bool)

    def np_split(block, lo_v, hi_v, low):
        return screened.split_at_bracket(block, lo_v, hi_v, low)

    out = {
        "gram": {"float64 bmm + form": lambda: distance.gram_squared_distances(x[None]),
                 "float32 augmented mm": lambda: screened.screened_squared_distances(x, norms),
                 "float32 augmented mm, out=": lambda: screened.screened_squared_distances(x, norms, buf)},
        "sample": {"sorted sample": lambda: _bracket_sorted(flat, (lo, hi), C),
                   "two selections": lambda: sampled_bracket(flat, (lo, hi), C)},
        "split": {"torch passes": lambda: screened.split_by_passes(d, lo_v, hi_v, below),
                  "NumPy in threads, whole rows": lambda: _whole_rows(screened.split_at_bracket, d, lo_v, hi_v, below),
                  "NumPy in threads, cache blocks": lambda: screened.split_at_bracket(d, lo_v, hi_v, below)},
        "sweep": {"whole matrix": lambda: screened.split_at_bracket(
                      screened.screened_squared_distances(x, norms, buf), lo_v, hi_v, below),
                  f"blocks of {ROW_BLOCKS} rows, torch": lambda: _blocked_sweep(P, Q, lo_v, hi_v, below,
                                                                                screened.split_by_passes),
                  f"blocks of {ROW_BLOCKS} rows, NumPy": lambda: _blocked_sweep(P, Q, lo_v, hi_v, below, np_split)},
        "pct": {"a bound per bracket entry": lambda: _percentile_all_bounds(sc, q),
                "candidates within 2 Delta": lambda: screened.screened_percentile(sc, q)},
        "count": {"bool sum": lambda: int(mask.sum()), "count_nonzero": lambda: int(torch.count_nonzero(mask))},
        "rows": {"bool sum": lambda: adj.sum(dim=1), "bytes into int16": lambda: row_counts(adj)},
        "reach": {"bool any": lambda: adj.index_select(0, frontier).any(dim=0),
                  "byte amax": lambda: adj.view(torch.uint8).index_select(0, frontier).amax(dim=0),
                  "bit-packed OR": lambda: or_rows(frontier)},
    }
    compiled = _compiled_split()
    if compiled is not None:
        try:
            t = time.perf_counter()
            compiled(flat, lo_v, hi_v)
            print(f"# torch.compile of the split's passes: {time.perf_counter() - t:.1f} s to compile")

            def compiled_split():
                low, inside = compiled(flat, lo_v, hi_v)
                return low.view(C, C).view(torch.uint8).sum(dim=1, dtype=torch.int16), inside.nonzero()

            out["split"]["torch.compile"] = compiled_split
        except Exception as err:  # noqa: BLE001
            print(f"# torch.compile of the split's passes failed here: {type(err).__name__}")
    min_samples = cluster.seed_min_samples(C)
    out["dbscan"] = {"dense rounds": lambda: dbscan_from_adjacency(adj[None], min_samples, False),
                     "breadth-first search": lambda: dbscan_by_search(adj, counts, min_samples)}
    try:
        import numpy as np
        import scipy.sparse as sp
        from scipy.sparse.csgraph import connected_components

        def scipy_core_components():
            a = adj.numpy()
            core = a.sum(axis=1) >= min_samples
            return connected_components(sp.csr_matrix(a[np.ix_(core, core)]), directed=False)

        out["dbscan"]["scipy components only"] = scipy_core_components
    except ImportError:
        pass
    out["dbscan0"] = {"masked minimum": lambda: _masked_min(adj[None], torch.arange(C)[None].to(torch.int16), C),
                      "max over uint8": lambda: adj[None].view(torch.uint8).max(dim=2)}
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
