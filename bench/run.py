"""Side-by-side throughput of CF-CAM, its floor and the baselines, in one process, on the same inputs.

    python -m bench.run --device cpu --model resnet50 --layer layer4 --batch 16 --threads 2 \
        --repeats 5 --warmup 1 --ref-images 2 --json out.json \
        --methods floor,cfcam,gradcam,pgc_gradcam,pgc_gradcampp,reference

Methods (every one gets the same images and the same target-layer module):
  floor          model.eval(); forward (grad mode on, as usual) with a hook on the layer, then
                 torch.autograd.grad(logits.gather(1, top1).sum(), activations): the least any
                 gradient CAM must do.
  cfcam          cfcam_gpu.CFCAM(model, layer)(images), end to end.
  gradcam        cfcam_gpu.GradCAM(model, layer)(images).
  pgc_gradcam    pytorch_grad_cam.GradCAM(model, [layer])(images, targets=None) (full backward,
                 NumPy post-processing, CAMs upsampled to the image); constructed per call, in a
                 ``with`` block, so its hooks never run during the other methods.
  pgc_gradcampp  pytorch_grad_cam.GradCAMPlusPlus, likewise.
  reference      per image: the floor at batch 1, then cfcam_gpu.reference.cfcam_reference on the
                 NumPy copies; only --ref-images images per call (images/s counts those).
  cfcam_postloop (experiment, only when listed) the engine's batched forward + autograd.grad, then
                 cfcam_from_features on --postloop-chunk images at a time (CAMResult.cat).
  eigencam, eigengradcam, kpcacam, fullgrad, gradcam_aug, gradcam_eigen, gradcam_elementwise, finercam,
  shapleycam, fem, randomcam, segeigencam, refinecam, sess (sess: num_scales=2)  (only when listed) our method
                 (``_aug``: aug_smooth=True, ``_eigen``: eigen_smooth=True) via
                 cfcam_gpu.methods.build_method; ``pgc_<name>`` the same with pytorch-grad-cam's class
                 (EigenCAM, EigenGradCAM, KPCA_CAM, FullGrad, GradCAM), like pgc_gradcam.
  --variant NAME:KEY=VAL,...  adds a CF-CAM method NAME built with those CFCAM options, timed in the
                 same rounds (A/B of options such as chunk_size, check_values, amp, channels_last).

Timing: ``--warmup`` unrecorded rounds, then ``--repeats`` rounds; each round calls every method
once (round-robin; the starting method rotates each round), gc.collect() before each call, CUDA
synchronised around it. images/s = batch / median seconds. A batch list (``--batch 1,16,64``) runs
each size in turn in the same process; the JSON is rewritten after each.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
import traceback

import torch

from .common import (LAST_CPU_S, NORMALISATION, MemoryMeter, layer_name, load_model, loadavg, machine_info, make_images,
                     median, now_iso, sync, time_call)
from .stages import capture_features, profile_postprocessing, stage_breakdown, sync_debug_checks

ALL_METHODS = ("floor", "cfcam", "gradcam", "pgc_gradcam", "pgc_gradcampp", "reference")
# Not in the default list; ask for them with --methods (experiments for the CPU path).
# The eigen family and the smoothings: ours and pytorch-grad-cam's, side by side (name: our registry name,
# pytorch-grad-cam's class, the call's keyword arguments).
PAIRED = {"eigencam": ("eigencam", "EigenCAM", {}), "eigengradcam": ("eigengradcam", "EigenGradCAM", {}),
          "kpcacam": ("kpcacam", "KPCA_CAM", {}), "fullgrad": ("fullgrad", "FullGrad", {}),
          "gradcam_aug": ("gradcam", "GradCAM", {"aug_smooth": True}),
          "gradcam_eigen": ("gradcam", "GradCAM", {"eigen_smooth": True}),
          "gradcam_elementwise": ("gradcam-elementwise", "GradCAMElementWise", {}),
          "finercam": ("finercam", "FinerCAM", {}), "shapleycam": ("shapleycam", "ShapleyCAM", {}),
          "fem": ("fem", "FEM", {}), "randomcam": ("randomcam", "RandomCAM", {}),
          "segeigencam": ("segeigencam", "SegEigenCAM", {}), "refinecam": ("refinecam", "RefineCAM", {}),
          "sess": ("sess", "SESS", {})}
# Constructor options of both sides of a pair (SESS at 2 scales: 5 patches per 224 x 224 image, not 129).
PAIRED_OPTIONS = {"sess": {"num_scales": 2}}
EXTRA_METHODS = ("cfcam_postloop",) + tuple(PAIRED) + tuple("pgc_" + n for n in PAIRED)


# --------------------------------------------------------------------------------------------- methods
def build_methods(names, model, layer, device, ref_images, cfcam_options=None, variants=None,
                  postloop_chunk=1):
    """{name: fn(images) -> object} for the available methods, and {name: why it is skipped}."""
    import cfcam_gpu

    methods, skipped = {}, {}

    def floor(images):
        return capture_features(model, layer, images)

    cfcam = cfcam_gpu.CFCAM(model, layer, **(cfcam_options or {}))
    gradcam = cfcam_gpu.GradCAM(model, layer, **{k: v for k, v in (cfcam_options or {}).items() if k != "backend"})

    def pgc(cls, fullgrad=False, build=None, **call_kwargs):
        def run(images):
            cam = cls(model=model, target_layers=[] if fullgrad else [layer], **(build or {}))
            if not hasattr(cam, "__exit__"):  # (its RefineCAM is no context manager)
                return cam(input_tensor=images, targets=None, **call_kwargs)
            with cam:
                out = cam(input_tensor=images, targets=None, **call_kwargs)
            return out
        return run

    def ours(registry_name, build=None, **call_kwargs):
        from cfcam_gpu.methods import build_method

        engine = build_method(registry_name, model, None if registry_name == "fullgrad" else layer, **(build or {}))
        return lambda images: engine(images, **call_kwargs)

    def reference(images):
        from cfcam_gpu.reference import cfcam_reference

        out = []
        for i in range(min(ref_images, images.shape[0])):
            acts, grads = capture_features(model, layer, images[i:i + 1])
            out.append(cfcam_reference(acts[0].float().cpu().numpy(), grads[0].float().cpu().numpy()).cam)
        return out

    for name in names:
        if name == "floor":
            methods[name] = floor
        elif name == "cfcam":
            methods[name] = _with_post_timer(lambda x: cfcam(x), device)
        elif name == "gradcam":
            methods[name] = lambda x: gradcam(x)
        elif name in ("pgc_gradcam", "pgc_gradcampp"):
            try:
                import pytorch_grad_cam

                cls = pytorch_grad_cam.GradCAM if name == "pgc_gradcam" else pytorch_grad_cam.GradCAMPlusPlus
                methods[name] = pgc(cls)
            except Exception as err:  # noqa: BLE001
                skipped[name] = f"pytorch_grad_cam not importable ({type(err).__name__}: {err})"
        elif name in PAIRED:
            registry_name, _, call_kwargs = PAIRED[name]
            methods[name] = ours(registry_name, PAIRED_OPTIONS.get(name), **call_kwargs)
        elif name.startswith("pgc_") and name[4:] in PAIRED:
            registry_name, cls_name, call_kwargs = PAIRED[name[4:]]
            try:
                import pytorch_grad_cam

                methods[name] = pgc(getattr(pytorch_grad_cam, cls_name), registry_name == "fullgrad",
                                    PAIRED_OPTIONS.get(name[4:]), **call_kwargs)
            except Exception as err:  # noqa: BLE001
                skipped[name] = f"pytorch_grad_cam not importable ({type(err).__name__}: {err})"
        elif name == "cfcam_postloop":
            methods[name] = _postloop(cfcam, postloop_chunk)
        elif name in (variants or {}):
            methods[name] = (lambda eng: (lambda x: eng(x)))(cfcam_gpu.CFCAM(model, layer, **variants[name]))
        elif name == "reference":
            why = _reference_missing()
            if why:
                skipped[name] = why
            elif ref_images < 1:
                skipped[name] = "--ref-images 0"
            else:
                methods[name] = reference
        else:
            raise SystemExit(f"--methods: unknown method {name!r}; expected some of "
                             f"{', '.join(ALL_METHODS + EXTRA_METHODS)} or a --variant name")
    return methods, skipped


POST_S = [None]  # seconds cfcam_from_features took inside the last timed CF-CAM call


def _with_post_timer(call, device):
    """Time the engine's post-processing inside the end-to-end call: ``cfcam_gpu.engine`` looks
    ``cfcam_from_features`` up in its module globals, so a timing wrapper is swapped in for the call
    (synchronised on CUDA, which adds one sync between the model pass and the post-processing)."""
    try:
        import cfcam_gpu.engine as eng
    except ImportError:
        return call
    orig = getattr(eng, "cfcam_from_features", None)
    if orig is None:
        return call

    def timed(*a, **k):
        sync(device)
        t0 = time.perf_counter()
        out = orig(*a, **k)
        sync(device)
        POST_S[0] = (POST_S[0] or 0.0) + time.perf_counter() - t0  # summed over chunks
        return out

    def run(images):
        POST_S[0] = None
        eng.cfcam_from_features = timed
        try:
            return call(images)
        finally:
            eng.cfcam_from_features = orig
    return run


def _postloop(engine, chunk):
    """Batched model pass through the engine, post-processing ``chunk`` images at a time."""
    from cfcam_gpu.cam import CAMResult, cfcam_from_features

    def run(images):
        acts, grads, _, _ = engine._features(images, None)  # private: an experiment, may break
        parts = [cfcam_from_features(acts[i:i + chunk], grads[i:i + chunk])
                 for i in range(0, acts.shape[0], chunk)]
        return CAMResult.cat(parts) if hasattr(CAMResult, "cat") else parts
    return run


def _reference_missing() -> str | None:
    try:
        import sklearn.cluster  # noqa: F401
        import cv2
        from cfcam_gpu.reference import cfcam_reference  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"reference path not importable ({type(err).__name__}: {err})"
    if not hasattr(cv2, "ximgproc"):
        return "cv2.ximgproc missing (opencv-contrib-python-headless not installed)"
    return None


def _items(name, batch, ref_images):
    return min(ref_images, batch) if name == "reference" else batch


# --------------------------------------------------------------------------------------------- one batch
def bench_batch(args, model, layer, device, batch, with_reference):
    images, images_desc = make_images(batch, args.size, args.images, seed=0, norm=NORMALISATION[args.model])
    images = images.to(device)
    names = [m for m in args.methods if with_reference or m != "reference"]
    methods, skipped = build_methods(names, model, layer, device, args.ref_images, args.cfcam_options,
                                     args.variants, args.postloop_chunk)
    if not with_reference and "reference" in args.methods:
        skipped["reference"] = f"only run at --ref-batch {args.ref_batch}"
    meter = MemoryMeter(device)
    times = {m: [] for m in methods}
    cpu_times = {m: [] for m in methods}
    post_times = []  # (post-processing s, end-to-end s) inside each timed CF-CAM call
    mems = {m: [] for m in methods}
    load_before = loadavg()
    errors = {}
    order = list(methods)
    t_start = time.perf_counter()
    rounds_done = 0
    for r in range(args.warmup + args.repeats):
        k = r % max(len(order), 1)
        for name in order[k:] + order[:k]:
            if name in errors:
                continue
            try:
                dt, out, mem = time_call(lambda: methods[name](images), device, meter)
                del out
            except Exception as err:  # noqa: BLE001
                errors[name] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                if args.verbose:
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            finally:
                if name.startswith("pgc"):
                    model.zero_grad(set_to_none=True)  # pytorch-grad-cam leaves parameter .grad behind
            if r >= args.warmup:
                times[name].append(dt)
                cpu_times[name].append(LAST_CPU_S[0])
                if name == "cfcam" and POST_S[0] is not None:
                    post_times.append((POST_S[0], dt))
                mems[name].append(mem)
        if r >= args.warmup:
            rounds_done += 1
        if args.budget and time.perf_counter() - t_start > args.budget and rounds_done >= 1:
            print(f"  [budget {args.budget}s reached after {rounds_done} timed rounds]", file=sys.stderr)
            break

    results = {}
    for name in methods:
        if name in errors and not times[name]:
            results[name] = {"error": errors[name]}
            continue
        ts = times[name]
        items = _items(name, batch, args.ref_images)
        med = median(ts)
        peak = max(m["peak_bytes"] for m in mems[name])
        extra = max(m["extra_bytes"] for m in mems[name])
        results[name] = {"images": items, "times_s": ts, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                         "images_per_s": items / med, "ms_per_image": 1e3 * med / items,
                         "images_per_s_best": items / min(ts), "cpu_times_s": cpu_times[name],
                         "cpu_ms_per_image": 1e3 * median(cpu_times[name]) / items,
                         "peak_mem_bytes": peak, "extra_peak_mem_bytes": extra}
        if name in errors:
            results[name]["error"] = errors[name]
    if post_times and "median_s" in results.get("cfcam", {}):
        results["cfcam"]["post_in_call_s"] = [p for p, _ in post_times]
        results["cfcam"]["post_in_call_median_s"] = median([p for p, _ in post_times])
        results["cfcam"]["post_share_in_call_median"] = median([p / t for p, t in post_times])
    for name, why in skipped.items():
        results[name] = {"skipped": why}
    _ratios(results)

    run = {"batch": batch, "images": images_desc, "memory_meter": meter.kind, "rounds": rounds_done,
           "loadavg_before": load_before, "loadavg_after": loadavg(), "device": str(device),
           "threads": torch.get_num_threads(), "methods": results}

    if not args.no_stages:
        acts, grads = capture_features(model, layer, images)
        run["stages"] = stage_breakdown(acts, grads, device, repeats=args.stage_repeats or args.repeats,
                                        warmup=1)
        e2e = results.get("cfcam", {}).get("median_s")
        post = run["stages"].get("cfcam_from_features", {}).get("s")
        if e2e and post:
            run["stages"]["post_share_of_cfcam"] = post / e2e
        floor_s = results.get("floor", {}).get("median_s")
        post_in = results.get("cfcam", {}).get("post_in_call_median_s") or post
        if e2e and post_in and floor_s:
            run["stages"]["cfcam_minus_floor_minus_post_s"] = e2e - floor_s - post_in
        if args.profile:
            run["profile"] = profile_postprocessing(acts, grads, device)
        del acts, grads
    if device.type == "cuda" and not args.no_sync_check:
        run["sync_debug"] = sync_debug_checks(model, layer, images)
    return run


def _ratios(results):
    floor = results.get("floor", {}).get("images_per_s")
    pgc = results.get("pgc_gradcam", {}).get("images_per_s")
    floor_mem = results.get("floor", {}).get("peak_mem_bytes")
    for r in results.values():
        ips = r.get("images_per_s")
        if ips is None:
            continue
        r["x_floor"] = ips / floor if floor else None
        r["x_pgc_gradcam"] = ips / pgc if pgc else None
        r["mem_x_floor"] = r["peak_mem_bytes"] / floor_mem if floor_mem else None


# --------------------------------------------------------------------------------------------- printing
def _f(x, fmt):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_run(run, header):
    mb = 2.0 ** 20
    print(f"\n== {header}  batch {run['batch']}  ({run['rounds']} timed rounds; images: {run['images']})")
    la = run.get("loadavg_before") or [0]
    if run.get("device", "cpu").startswith("cpu") and la[0] > (run.get("threads") or 1) + 0.5:
        print(f"   WARNING: load average {la[0]} > {run.get('threads')} threads: other jobs share these cores; "
              "wall times are inflated (see best i/s and cpu ms/img)")
    print(f"   memory: {run['memory_meter']}; load average before {run.get('loadavg_before')} "
          f"after {run.get('loadavg_after')}")
    cols = f"{'method':<15}{'images/s':>10}{'ms/img':>9}{'min..max s/call':>17}{'best i/s':>9}" \
           f"{'cpu ms/img':>11}{'x floor':>8}{'x pgc':>7}{'peak MB':>9}{'+MB':>7}{'mem x fl':>9}"
    print(cols)
    print("-" * len(cols))
    for name, r in run["methods"].items():
        if "images_per_s" not in r:
            print(f"{name:<15}  {'skipped: ' + r['skipped'] if 'skipped' in r else 'ERROR: ' + r['error']}")
            continue
        rng = f"{r['min_s']:.3f}..{r['max_s']:.3f}"
        note = f"  ({r['images']} img/call)" if name == "reference" else ""
        print(f"{name:<15}{r['images_per_s']:>10.2f}{r['ms_per_image']:>9.1f}{rng:>17}"
              f"{r['images_per_s_best']:>9.2f}{r['cpu_ms_per_image']:>11.1f}"
              f"{_f(r['x_floor'], '.3f'):>8}{_f(r['x_pgc_gradcam'], '.2f'):>7}"
              f"{r['peak_mem_bytes'] / mb:>9.0f}{r['extra_peak_mem_bytes'] / mb:>7.0f}"
              f"{_f(r['mem_x_floor'], '.2f'):>9}{note}")
    st = run.get("stages")
    if st:
        print(f"\n   CF-CAM post-processing on captured features {tuple(st.get('shape', ()))}, "
              f"ms per image (median wall | median process CPU time):")
        if "error" in st:
            print(f"   ERROR: {st['error']}")
        for name, s in st.get("stages", {}).items():
            val = f"{s['ms_per_image']:9.2f} | {s['cpu_ms_per_image']:8.2f}" if "ms_per_image" in s \
                else "      n/a  " + s.get("error", s.get("skipped", ""))
            print(f"   {name:<22}{val}")
        if st.get("sum_of_stages_s") is not None:
            print(f"   {'sum of stages':<22}{1e3 * st['sum_of_stages_s'] / run['batch']:9.2f}")
        tot = st.get("cfcam_from_features", {})
        if "ms_per_image" in tot:
            print(f"   {'cfcam_from_features':<22}{tot['ms_per_image']:9.2f} | {tot['cpu_ms_per_image']:8.2f}"
                  "   (post-processing total, checks on)")
        cf = run["methods"].get("cfcam", {})
        if cf.get("post_share_in_call_median") is not None:
            print(f"   post-processing share of CF-CAM end to end, measured inside the timed calls: "
                  f"{100 * cf['post_share_in_call_median']:.1f}% "
                  f"({1e3 * cf['post_in_call_median_s'] / run['batch']:.1f} ms/img of "
                  f"{cf['ms_per_image']:.1f})")
        if st.get("post_share_of_cfcam") is not None:
            print(f"   cfcam_from_features above / CF-CAM end-to-end median: "
                  f"{100 * st['post_share_of_cfcam']:.1f}% (separate runs: noisy on a shared CPU)")
        if st.get("cfcam_minus_floor_minus_post_s") is not None:
            print(f"   CF-CAM - floor - post-processing: "
                  f"{1e3 * st['cfcam_minus_floor_minus_post_s'] / run['batch']:.2f} ms/img (what the engine's "
                  "model pass adds to the floor; negative: it is cheaper)")
        if "n_clusters" in st:
            nc = st["n_clusters"]
            print(f"   clusters per image: mean {nc['mean']:.1f} (min {nc['min']}, max {nc['max']}); "
                  f"noise fraction {st.get('noise_fraction', float('nan')):.2f}; min_samples {st.get('min_samples')}")
    prof = run.get("profile")
    if prof:
        if "error" in prof:
            print(f"\n   profile ERROR: {prof['error']}")
        else:
            print("\n   torch.profiler, one cfcam_from_features call:")
            print(prof["ops"])
    for rec in run.get("sync_debug", []):
        status = "PASSED" if rec.get("passed") else "FAILED"
        extra = "" if rec.get("passed") else f": {rec.get('error', '')}" + \
            (f"  [at {rec['where']}]" if rec.get("where") else "")
        print(f"   sync_debug_mode('error') {status}  {rec['call']}{extra}")


# --------------------------------------------------------------------------------------------- main
def _literal(text: str):
    import ast

    low = text.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--model", default="resnet50", choices=["resnet50", "efficientnet_lite0"])
    p.add_argument("--layer", default=None,
                   help="dotted target layer; default layer4 (ResNet, meaning layer4.-1) / bn2 (EfficientNet)")
    p.add_argument("--batch", default="16", help="batch size, or a comma list run in turn: 1,16,64,256")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported); default 5")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first; default 1")
    p.add_argument("--ref-images", type=int, default=2, help="images per reference call; default 2")
    p.add_argument("--ref-batch", type=int, default=None,
                   help="with a batch list, run the reference only at this batch size")
    p.add_argument("--methods", default=",".join(ALL_METHODS), help="comma list of " + ",".join(ALL_METHODS))
    p.add_argument("--images", default="real", choices=["real", "random"],
                   help="bundled photos (skimage/sklearn) or seeded random pixels; default real")
    p.add_argument("--size", type=int, default=224, help="image side; default 224")
    p.add_argument("--weights", default=None, help="optional state dict for the model")
    p.add_argument("--stage-repeats", type=int, default=None, help="repeats of the stage breakdown")
    p.add_argument("--no-stages", action="store_true", help="skip the post-processing stage breakdown")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one post-processing call")
    p.add_argument("--no-sync-check", action="store_true", help="CUDA: skip the sync_debug_mode check")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds per batch size; stop adding timed rounds once spent (>= 1 round)")
    p.add_argument("--cfcam-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="option for cfcam_gpu.CFCAM/GradCAM, repeatable: chunk_size=4, amp=bfloat16, "
                        "channels_last=true, check_values=false, backend=sklearn (values parsed as Python "
                        "literals where possible)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VAL,...",
                   help="extra CF-CAM method NAME with these CFCAM options, e.g. cfcam_c4:chunk_size=4")
    p.add_argument("--postloop-chunk", type=int, default=1,
                   help="images per cfcam_from_features call in the cfcam_postloop experiment; default 1")
    p.add_argument("--json", default=None, help="write all results and machine info here")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failing methods")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.batches = [int(b) for b in str(args.batch).split(",") if b.strip()]
    args.variants = {}
    for item in args.variant:
        name, _, opts = item.partition(":")
        if not name or name in ALL_METHODS + EXTRA_METHODS:
            p.error(f"--variant: expected NAME:KEY=VAL,... with a new NAME, got {item!r}")
        args.variants[name] = {k.strip(): _literal(v.strip()) for k, _, v in
                               (o.partition("=") for o in opts.split(",") if o.strip())}
        if name not in args.methods:
            args.methods.append(name)
    args.cfcam_options = {}
    for item in args.cfcam_opt:
        key, _, value = item.partition("=")
        if not key or not _:
            p.error(f"--cfcam-opt: expected KEY=VALUE, got {item!r}")
        args.cfcam_options[key.strip()] = _literal(value.strip())
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False on this machine")
    import cfcam_gpu

    model, source = load_model(args.model, args.weights)
    model = model.to(device).eval()
    lname = layer_name(args.model, args.layer)
    layer = cfcam_gpu.resolve_layer(model, lname)
    report = {
        "date": now_iso(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "bench.run"] + sys.argv[1:])
        if argv is None else "bench.run.main(" + repr(argv) + ")",
        "machine": machine_info(device),
        "config": {"device": str(device), "model": args.model, "model_source": source, "layer": lname,
                   "layer_module": type(layer).__name__, "batches": args.batches, "threads": args.threads,
                   "repeats": args.repeats, "warmup": args.warmup, "ref_images": args.ref_images,
                   "methods": args.methods, "images": args.images, "size": args.size,
                   "cfcam_options": args.cfcam_options, "variants": args.variants,
                   "postloop_chunk": args.postloop_chunk},
        "runs": [],
    }
    print(f"# {report['date']}  {report['machine']['device_name']}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  model {args.model} ({source})  layer {lname}")
    for batch in args.batches:
        with_ref = args.ref_batch is None or args.ref_batch == batch
        t0 = time.perf_counter()
        try:
            run = bench_batch(args, model, layer, device, batch, with_ref)
        except Exception as err:  # noqa: BLE001 (e.g. out of memory at a large batch: record, go on)
            traceback.print_exc()
            run = {"batch": batch, "error": f"{type(err).__name__}: {err}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        run["wall_s"] = time.perf_counter() - t0
        report["runs"].append(run)
        if "methods" in run:
            print_run(run, f"{args.model} {lname} on {device}")
        else:
            print(f"\n== batch {batch}: ERROR {run['error']}")
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)
    if args.json:
        print(f"\n# wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
