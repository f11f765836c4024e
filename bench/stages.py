"""CF-CAM post-processing, stage by stage, on captured target-layer features.

The stages mirror ``cfcam_gpu.cluster._cluster_torch`` and ``cfcam_gpu.cam.cfcam_from_features``. On
the CPU (the screened route, image by image, ``cfcam_gpu/screened.py``; a float64 screen for float64
features):

  distances       screened.screen: d~ by one matrix product, the percentile's bracket extracted
  percentile      screened.screened_percentile: exact order statistics from the bracket's window
  dbscan          screened.screened_adjacency (in place of the screen's mask) + dbscan_ops.dbscan_by_search

elsewhere (accelerators: the sync-free all-pairs route):

  distances       cfcam_gpu.distance.squared_distances (exact V for every pair, float64)
  percentile      cfcam_gpu.percentile_ops.radius_from_squared(d2, 25, dtype): eps and the exact reach
  dbscan          the exact relation d2 <= reach, dbscan_ops.dbscan_from_adjacency

then, on both:

  filter+weights  cfcam_gpu.cam.cluster_weights (cluster means, guided filter, spatial means)
  cam             cfcam_gpu.cam.weighted_cam

and ``cfcam_from_features`` end to end (with its finiteness checks) as the post-processing total.
Each stage is guarded: if the library's API moves, that stage reports the error and the rest still run.
"""
from __future__ import annotations


import traceback
from typing import Callable

import torch
from torch import Tensor

from . import common
from .common import median, sync, time_call

STAGES = ("distances", "percentile", "dbscan", "filter+weights", "cam")


def capture_features(model, layer, images: Tensor) -> tuple[Tensor, Tensor]:
    """The floor's pass: forward with a hook, autograd.grad of the top-1 logits to the layer's output."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        logits = model(images)
    finally:
        handle.remove()
    top1 = logits.argmax(dim=1, keepdim=True)
    (grads,) = torch.autograd.grad(logits.gather(1, top1).sum(), store["a"])
    return store["a"].detach(), grads.detach()


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"


def stage_functions(acts: Tensor, grads: Tensor) -> list[tuple[str, Callable[[dict], object]]]:
    """(name, fn(state) -> output) in pipeline order; fn reads its inputs from ``state`` and stores its
    outputs there, so each stage can be re-run alone on the previous stage's real output."""
    from cfcam_gpu import cam as cam_mod
    from cfcam_gpu import cluster as cluster_mod
    from cfcam_gpu.dbscan_ops import dbscan_by_search, dbscan_from_adjacency
    from cfcam_gpu import distance as dist_mod
    from cfcam_gpu._checks import decide_sync_free
    from cfcam_gpu.percentile_ops import radius_from_squared

    feats = acts.flatten(2)
    feats = feats if feats.dtype == torch.float64 else feats.float()
    C = feats.shape[1]
    min_samples = cluster_mod.seed_min_samples(C)
    q = cluster_mod.EPS_PERCENTILE

    sync_free = decide_sync_free(None, feats)
    if cluster_mod.screened_route(feats, sync_free):  # CPU: image by image (cfcam_gpu/screened.py)
        from cfcam_gpu import screened as scr

        def distances(s):
            s["screens"] = [scr.screen(x, q) for x in feats]

        def percentile(s):
            s["eps"] = [scr.screened_percentile(sc, q) for sc in s["screens"]]

        def dbscan(s):
            nbs = [scr.screened_adjacency(sc, e) for sc, e in zip(s["screens"], s["eps"])]
            s["labels"] = torch.stack([dbscan_by_search(n.adj, n.counts, min_samples) for n in nbs])
    else:  # the all-pairs route (accelerators)
        def distances(s):
            s["d2"] = dist_mod.squared_distances(feats, sync_free)

        def percentile(s):
            s["eps"] = radius_from_squared(s["d2"], q, feats.dtype, sync_free)

        def dbscan(s):
            adj = s["d2"] <= s["eps"].reach[:, None, None]
            s["labels"] = dbscan_from_adjacency(adj, min_samples, sync_free)

    def weights(s):
        s["weights"] = cam_mod.cluster_weights(grads, s["labels"])

    def cam(s):
        s["cams"] = cam_mod.weighted_cam(acts, s["weights"])

    return list(zip(STAGES, (distances, percentile, dbscan, weights, cam)))


def stage_variant(acts: Tensor) -> str:
    """Which library functions the stages call for these features."""
    from cfcam_gpu import cluster as cluster_mod

    if cluster_mod.screened_route(acts.flatten(2), acts.device.type != "cpu"):
        return "screened.screen | screened_percentile | screened_adjacency+dbscan_by_search | " \
               "cluster_weights | weighted_cam (CPU screened route, image by image)"
    return "squared_distances (exact, all pairs) | radius_from_squared | V <= reach + dbscan_from_adjacency | " \
           "cluster_weights | weighted_cam"


def stage_breakdown(acts: Tensor, grads: Tensor, device: torch.device, repeats: int = 5,
                    warmup: int = 1) -> dict[str, object]:
    """Median seconds per stage (and per image), run in pipeline order ``repeats`` times, plus
    ``cfcam_from_features`` end to end. Returns a JSON-able dict."""
    from cfcam_gpu.cam import cfcam_from_features

    B = acts.shape[0]
    out: dict[str, object] = {"batch": B, "shape": list(acts.shape), "stages": {}}
    try:
        out["variant"] = stage_variant(acts)
    except Exception as err:  # noqa: BLE001
        out["variant"] = _error(err)
    try:
        fns = stage_functions(acts, grads)
    except Exception as err:  # noqa: BLE001
        out["error"] = _error(err)
        return out
    times: dict[str, list[float]] = {name: [] for name, _ in fns}
    cpu: dict[str, list[float]] = {name: [] for name, _ in fns}
    total_cpu: list[float] = []
    errors: dict[str, str] = {}
    total: list[float] = []
    for r in range(warmup + repeats):
        state: dict = {}
        for name, fn in fns:
            if name in errors:
                break  # later stages need this one's output
            try:
                dt, _, _ = time_call(lambda: fn(state), device)
            except Exception as err:  # noqa: BLE001
                errors[name] = _error(err)
                break
            if r >= warmup:
                times[name].append(dt)
                cpu[name].append(common.LAST_CPU_S[0])
        state.clear()  # free the stages' outputs before timing the whole call
        try:
            dt, res, _ = time_call(lambda: cfcam_from_features(acts, grads), device)
            if r >= warmup:
                total.append(dt)
                total_cpu.append(common.LAST_CPU_S[0])
            if r == warmup + repeats - 1:
                nc = res.n_clusters.float()
                out["n_clusters"] = {"mean": float(nc.mean()), "min": int(nc.min()), "max": int(nc.max())}
                if res.labels is not None:
                    out["noise_fraction"] = float((res.labels < 0).float().mean())
                if res.eps is not None:
                    out["eps_mean"] = float(res.eps.float().mean())
                out["min_samples"] = res.min_samples
            del res
        except Exception as err:  # noqa: BLE001
            errors["cfcam_from_features"] = _error(err)
    for name, ts in times.items():
        if name in errors:
            out["stages"][name] = {"error": errors[name]}
        elif ts:
            m = median(ts)
            out["stages"][name] = {"s": m, "ms_per_image": 1e3 * m / B, "repeats": len(ts),
                                   "cpu_ms_per_image": 1e3 * median(cpu[name]) / B, "times_s": ts}
        else:
            out["stages"][name] = {"skipped": "an earlier stage failed"}
    if total:
        m = median(total)
        out["cfcam_from_features"] = {"s": m, "ms_per_image": 1e3 * m / B, "repeats": len(total),
                                      "cpu_ms_per_image": 1e3 * median(total_cpu) / B, "times_s": total}
    elif "cfcam_from_features" in errors:
        out["cfcam_from_features"] = {"error": errors["cfcam_from_features"]}
    done = [v["s"] for v in out["stages"].values() if "s" in v]
    out["sum_of_stages_s"] = sum(done) if len(done) == len(STAGES) else None
    return out


def profile_postprocessing(acts: Tensor, grads: Tensor, device: torch.device, rows: int = 25) -> dict:
    """torch.profiler over one ``cfcam_from_features`` call (after a warm-up), with the stages of
    ``stage_functions`` as record_function ranges in a second, staged run. Returns the tables as text."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from cfcam_gpu.cam import cfcam_from_features

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = {}
    try:
        cfcam_from_features(acts, grads)
        sync(device)
        with profile(activities=activities, record_shapes=False) as prof:
            cfcam_from_features(acts, grads)
            sync(device)
        out["ops"] = prof.key_averages().table(sort_by=sort, row_limit=rows)
        fns = stage_functions(acts, grads)
        state: dict = {}
        with profile(activities=activities) as prof2:
            for name, fn in fns:
                with record_function(f"stage:{name}"):
                    fn(state)
            sync(device)
        ka = prof2.key_averages(group_by_stack_n=0)
        stage_rows = [e for e in ka if e.key.startswith("stage:")]
        out["stages"] = {e.key[6:]: {"cpu_ms": e.cpu_time_total / 1e3,
                                     **({"cuda_ms": getattr(e, "device_time_total", 0) / 1e3}
                                        if device.type == "cuda" else {})}
                         for e in stage_rows}
    except Exception as err:  # noqa: BLE001
        out["error"] = _error(err) + "\n" + traceback.format_exc(limit=3)
    return out


def sync_debug_checks(model, layer, images: Tensor) -> list[dict]:
    """CUDA only: run CF-CAM under ``torch.cuda.set_sync_debug_mode("error")``; report, never raise.

    Three variants: the engine as users call it (finiteness checks on), the engine with
    ``check_values=False``, and ``cfcam_from_features(check_values=False)`` on captured features (the
    post-processing alone). A failure names the first cfcam_gpu frame that synchronised."""
    import cfcam_gpu
    from cfcam_gpu.cam import cfcam_from_features

    acts, grads = capture_features(model, layer, images)
    variants: list[tuple[str, Callable[[], object]]] = [
        ("CFCAM(model, layer)(images)", lambda: cfcam_gpu.CFCAM(model, layer)(images))]
    try:
        engine = cfcam_gpu.CFCAM(model, layer, check_values=False)
        variants.append(("CFCAM(model, layer, check_values=False)(images)", lambda: engine(images)))
    except TypeError as err:
        variants.append(("CFCAM(..., check_values=False)", lambda e=err: (_ for _ in ()).throw(e)))
    variants.append(("cfcam_from_features(acts, grads, check_values=False)",
                     lambda: cfcam_from_features(acts, grads, check_values=False)))
    results = []
    for name, fn in variants:
        rec: dict[str, object] = {"call": name}
        try:
            fn()  # warm-up outside the debug mode
            torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001
            rec.update(passed=False, error="warm-up failed: " + _error(err))
            results.append(rec)
            continue
        try:
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            rec["passed"] = True
        except Exception as err:  # noqa: BLE001
            torch.cuda.set_sync_debug_mode(0)
            rec.update(passed=False, error=_error(err))
            frames = [f for f in traceback.extract_tb(err.__traceback__) if "cfcam_gpu" in f.filename]
            if frames:
                f = frames[-1]
                rec["where"] = f"{f.filename.rsplit('cfcam_gpu', 1)[-1].lstrip('/')}:{f.lineno} {f.name}: " \
                               f"{(f.line or '').strip()}"
            torch.cuda.synchronize()
        results.append(rec)
    return results
