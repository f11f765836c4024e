"""The numbers of ``cfcam evaluate``: every method's CAMs and per-image metrics on the same images, for
the model's top-1 classes (``score_methods``). Public core API only: the engines of ``cfcam_gpu.methods``,
``cfcam_gpu.metrics``, and the target layer's features captured with ``cfcam_gpu.hooks``.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from .. import metrics as M
from ..hooks import LeafCapture, eval_mode, forward_hook
from ..layers import resolve_layer
from ..methods import METHODS, ScoreCAM, build_method, dead_channels, from_features_fn
from ..targets import resolve_targets
from .options import method_names, random_options, reseed, uses_gradients, uses_layer

DEFAULT_METHODS = ("cfcam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam")
VARIANTS = ("scorecam_logit",)  # evaluation variants of registry methods; the rest: cfcam_gpu.methods.METHODS
# Display names (a method without one is shown by its registry name).
LABELS = {"cfcam": "CF-CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
          "layercam": "LayerCAM", "hirescam": "HiResCAM", "scorecam": "Score-CAM",
          "ablationcam": "Ablation-CAM", "cfcam_exclude_dead": "CF-CAM (dead excl.)",
          "scorecam_logit": "Score-CAM (logit)", "eigencam": "Eigen-CAM", "eigengradcam": "EigenGrad-CAM",
          "kpcacam": "KPCA-CAM", "fullgrad": "FullGrad", "cfcam-paper": "CF-CAM (published)",
          "gradcam-elementwise": "Grad-CAM element-wise", "finercam": "Finer-CAM", "shapleycam": "ShapleyCAM",
          "fem": "FEM", "randomcam": "RandomCAM", "segeigencam": "Seg-Eigen-CAM", "refinecam": "RefineCAM",
          "sess": "SESS"}


def known_methods() -> tuple[str, ...]:
    """Every name ``evaluate --methods`` accepts: the core registry's (at run time) and VARIANTS."""
    return method_names() + VARIANTS


def robustness_free(name: str) -> str | None:
    """Why the gradient-noise robustness does not apply to a method (None when it does): its engine takes
    no gradients (``uses_gradients`` False), the method has no target layer, or its map is not a function
    of the layer's activations and gradients alone (second derivatives, another class's gradients, a base
    method's fused maps)."""
    if name in VARIANTS or not getattr(METHODS[name], "uses_gradients", True):
        return "gradient-free"
    if not uses_layer(name):
        return "no target-layer gradients"
    if not uses_gradients(name):
        return "not a function of the layer's gradients alone"
    return None


SCALARS = ("average_drop", "increase_in_confidence", "average_drop_threshold",
           "increase_in_confidence_threshold", "deletion_auc", "insertion_auc")
EXTRA_METRICS = ("road",)  # evaluate --metrics: optional, slow ones
ROAD_SCALARS = ("road_combined", "road_morf", "road_lerf")


def scalar_keys(metrics: Sequence[str] = ()) -> tuple[str, ...]:
    """The per-image scalar metrics of an evaluation with the optional ``metrics``."""
    return SCALARS + (ROAD_SCALARS if "road" in metrics else ())


def build_engine(name: str, model, layer, forward_batch_size: int, device, reshape_transform=None):
    """The engine of an evaluated method (or variant): model passes ``forward_batch_size`` at a time,
    randomcam's generator on ``device`` (``random_options``), no layer for a method that takes none."""
    options = {} if reshape_transform is None or not uses_layer(name) else {"reshape_transform": reshape_transform}
    if name == "scorecam_logit":
        return ScoreCAM(model, layer, score="logit", score_batch_size=forward_batch_size, **options)
    options.update(random_options(name, device))
    if name == "scorecam":
        options["score_batch_size"] = forward_batch_size
    if name == "ablationcam":
        options["ablation_batch_size"] = max(forward_batch_size, 256)
    return build_method(name, model, layer if uses_layer(name) else None, **options)


def robustness_fn(name: str):
    """The method's pure (activations, gradients) function; None where the robustness metric does not
    apply (it then perturbs ``smoothed_map_fn``'s map)."""
    return None if robustness_free(name) else from_features_fn(name)


def features(model, layer, images: torch.Tensor, reshape_transform=None, targets: torch.Tensor | None = None):
    """The target layer's activations and gradients (B, C, h, w) for the logits of ``targets`` (B,) (None:
    the top-1 classes), those classes (B,) and the logits (B, L): one forward pass (eval mode, no graph
    below the layer), one backward. ``reshape_transform`` maps the layer's output and its gradient to
    (B, C, h, w) (transformer tokens)."""
    capture = LeafCapture()
    with forward_hook(resolve_layer(model, layer), capture), eval_mode(model):
        with torch.no_grad():
            logits = model(images)
        if capture.output is None:
            raise ValueError("target_layer: expected the layer to run in the model's forward pass")
        targets = resolve_targets(targets, logits)
        with torch.enable_grad():
            (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), capture.output)
    acts = capture.output.detach()
    if reshape_transform is not None:
        acts, grads = reshape_transform(acts), reshape_transform(grads)
    if acts.ndim != 4:
        raise ValueError("target_layer: expected the layer to output a (B, C, h, w) feature map")
    return acts, grads, targets, logits.detach()


def global_spans(positions: Sequence[int], batch_size: int, total: int) -> list:
    """[(i, j, (batch, rows, size))]: images[i:j] are the rows ``rows`` of global batch ``batch`` (of
    ``size`` images) of a list of ``total``; ``positions``: the images' places in that list, ascending."""
    spans = []
    for k, p in enumerate(positions):
        batch = p // batch_size
        if spans and spans[-1][2][0] == batch:
            i, _, (_, rows, size) = spans[-1]
            rows.append(p - batch * batch_size)
            spans[-1] = (i, k + 1, (batch, rows, size))
        else:
            spans.append((k, k + 1, (batch, [p - batch * batch_size], min(batch_size, total - batch * batch_size))))
    return spans


def smoothed_map_fn(engine, model, layer, x: torch.Tensor, targets: torch.Tensor, acts, grads,
                    aug_smooth: bool = False, eigen_smooth: bool = False, reshape_transform=None):
    """What the robustness metric perturbs, for the map the evaluation asked for: (fn, acts, grads,
    copies) with ``fn(acts, grads).cams`` equal to ``engine(x, targets, aug_smooth, eigen_smooth).cams``.

    Without ``aug_smooth``: the engine's map of the given features (acts, grads (B, C, h, w)), copies = 1.
    With it: the features of the A augmented copies of x (``smoothing.augment``, (A * B, C, h, w),
    copy-major, every copy explaining ``targets``), copies = A, and fn averages the copies' maps as
    ``smoothing.aug_smooth`` does ((B, H, W)); the noise then perturbs every copy's gradients."""
    def plain(a, g):
        return engine.from_features(a, g, eigen_smooth)

    if not aug_smooth:
        return plain, acts, grads, 1
    from ..smoothing import aug_mean, augment, augmentations

    augs = augmentations()
    acts, grads, _, _ = features(model, layer, augment(x, augs), reshape_transform, targets.repeat(len(augs)))

    def smoothed(a, g):
        result = plain(a, g)
        result.cams = aug_mean(result.cams, x.shape[-2:], augs)
        return result

    return smoothed, acts, grads, len(augs)


def _robustness(fn, acts, grads, sigmas, generator, size, rows: list[int], n: int, copies: int = 1) -> dict:
    """``metrics.robustness`` for rows ``rows`` of a batch of ``n``, with the noise the whole batch draws.

    A share of a batch (under torchrun) is padded to ``n`` rows (copies of its first row) so that
    ``metrics.robustness`` draws the noise of the whole batch; the rows' own values are kept. With
    ``copies`` > 1 (aug smoothing), acts and grads hold ``copies`` blocks of len(rows) rows (copy-major)
    and fn maps ``copies`` * n rows to n maps."""
    if rows == list(range(n)):
        return M.robustness(fn, acts, grads, sigmas, generator, size=size)
    index = torch.as_tensor(rows, device=grads.device)
    blocks = torch.cat([index + a * n for a in range(copies)])
    padded_acts = acts[:1].repeat(n * copies, *([1] * (acts.ndim - 1)))
    padded_grads = grads[:1].repeat(n * copies, *([1] * (grads.ndim - 1)))
    padded_acts[blocks], padded_grads[blocks] = acts, grads
    result = M.robustness(fn, padded_acts, padded_grads, sigmas, generator, size=size)
    return {s: M.Robustness(r.ssim[index], r.mse[index]) for s, r in result.items()}


def _padded(rows: list[int], n: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A share of a batch of ``n`` (its rows ``rows``) padded to the whole batch with copies of its first
    row, so that random draws over the batch are those of the whole batch."""
    if rows == list(range(n)):
        return tensors
    index = torch.as_tensor(rows, device=tensors[0].device)
    out = []
    for t in tensors:
        full = t[:1].repeat(n, *([1] * (t.ndim - 1)))
        full[index] = t
        out.append(full)
    return tuple(out)


def _road(model, x, cams, tgt, rows: list[int], n: int, seed: int, batch: int, batch_size: int) -> dict:
    """ROAD (``cfcam_gpu.road``, noise 0.01, the default percentiles) for the rows ``rows`` of global batch
    ``batch`` (of ``n`` images): its noise is seeded by (seed, batch) and drawn for the whole batch, so each
    image gets its one-process value under torchrun. -> {road_combined, road_morf, road_lerf: lists}
    (MoRF / LeRF: the mean over the percentiles of the target logit's change)."""
    from .. import road as road_module

    generator = torch.Generator(x.device).manual_seed(seed * 1_000_003 + batch)
    images, maps, targets = _padded(rows, n, x, cams.float(), tgt)
    result = road_module.road(model, images, maps, targets, noise=0.01, generator=generator, batch_size=batch_size)
    keep = torch.as_tensor(rows, device=x.device) if rows != list(range(n)) else slice(None)
    return {"road_combined": result.combined[keep].tolist(), "road_morf": result.morf[keep].mean(1).tolist(),
            "road_lerf": result.lerf[keep].mean(1).tolist()}


def _explain_rows(engine, x, tgt, rows: list[int], n: int, seed: int, batch: int, **options):
    """``engine(x, tgt, **options)`` for rows ``rows`` of global batch ``batch`` (of ``n`` images). An engine
    that draws random numbers (randomcam) is seeded by (seed, batch) and, for a share of the batch, run on
    the batch padded as ``_padded`` pads it, so each image gets its one-process draw under torchrun."""
    if getattr(engine, "generator", None) is None:
        return engine(x, tgt, **options)
    reseed(engine, seed, batch)
    if rows == list(range(n)):
        return engine(x, tgt, **options)
    return engine(*_padded(rows, n, x, tgt), **options).select(torch.as_tensor(rows, device=x.device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def score_methods(model, layer, images: torch.Tensor, methods: Sequence[str], mean, std, positions: Sequence[int],
                  total: int, steps: int = 50, sigmas: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                  batch_size: int = 8, forward_batch_size: int = 64, seed: int = 0, log=None,
                  aug_smooth: bool = False, eigen_smooth: bool = False, metrics: Sequence[str] = (),
                  reshape_transform=None) -> dict:
    """Per-image metrics of every method on ``images`` (N, 3, H, W) for the model's top-1 classes.

    ``images`` are the images at places ``positions`` (ascending) of a list of ``total`` (all of them in
    one process; one rank's share under torchrun). They are batched as that whole list is (batch k:
    places [k * batch_size, (k + 1) * batch_size)) and each image gets the gradient noise it gets when the
    whole list is evaluated in one process, so every per-image value is the one-process value.
    ``aug_smooth`` / ``eigen_smooth`` go to every engine call, and the robustness metric measures that
    smoothed map (``smoothed_map_fn``: with ``aug_smooth`` the noise is added to the gradients of every
    augmented copy). ``metrics``: the
    optional ones (EXTRA_METRICS) to add, e.g. ("road",). ``reshape_transform``: the layer's (tokens ->
    (B, C, h, w)), for the engines and the captured features.

    Returns {"targets", "probs", "per_image": {method: {metric: list}}, "curves": {method: {...}},
    "seconds": {method: {"cam", "metrics"}}, "cams": {method: (N, h, w) CPU tensor}, "clusters": {...}}.
    """
    log = log or (lambda *a: None)
    N, _, H, W = images.shape
    fb = forward_batch_size
    spans = global_spans(positions, batch_size, total)
    feats = [features(model, layer, images[i:j], reshape_transform) for i, j, _ in spans]
    targets = torch.cat([f[2] for f in feats])
    probs = torch.cat([f[3].float().softmax(1).gather(1, f[2][:, None])[:, 0] for f in feats])
    generator = torch.Generator(images.device)
    out = {"targets": targets.cpu(), "probs": probs.cpu(), "per_image": {}, "curves": {}, "seconds": {},
           "cams": {}, "clusters": {}}
    for name in methods:
        engine = build_engine(name, model, layer, forward_batch_size, images.device, reshape_transform)
        per, curves = {k: [] for k in scalar_keys(metrics)}, {"deletion": [], "insertion": []}
        robust = {s: {"ssim": [], "mse": []} for s in sigmas}
        cams_all, clusters, t_cam, t_metrics = [], {"n_clusters": [], "noise": [], "dead": []}, 0.0, 0.0
        fn = robustness_fn(name)
        generator.manual_seed(seed)
        next_batch = 0  # global batches whose noise is drawn
        for (i, j, (batch, rows, size)), (acts, grads, tgt, _) in zip(spans, feats):
            x = images[i:j]
            t0 = time.perf_counter()
            res = _explain_rows(engine, x, tgt, rows, size, seed, batch, aug_smooth=aug_smooth,
                                eigen_smooth=eigen_smooth)
            cams = res.cams
            _sync(x.device)
            t1 = time.perf_counter()
            soft = M.average_drop_increase(model, x, cams, tgt, "soft", batch_size=fb)
            hard = M.average_drop_increase(model, x, cams, tgt, "threshold", mean=mean, std=std, batch_size=fb)
            dele = M.deletion_insertion(model, x, cams, tgt, steps, baseline="zero", curves=("deletion",),
                                        batch_size=fb)
            ins = M.deletion_insertion(model, x, cams, tgt, steps, baseline="blur", curves=("insertion",),
                                       batch_size=fb)
            per["average_drop"] += soft.drop.tolist()
            per["increase_in_confidence"] += (soft.increase.double() * 100).tolist()
            per["average_drop_threshold"] += hard.drop.tolist()
            per["increase_in_confidence_threshold"] += (hard.increase.double() * 100).tolist()
            per["deletion_auc"] += dele.deletion_auc.tolist()
            per["insertion_auc"] += ins.insertion_auc.tolist()
            if "road" in metrics:
                for key, values in _road(model, x, cams, tgt, rows, size, seed, batch, fb).items():
                    per[key] += values
            curves["deletion"].append(dele.deletion_curve.cpu())
            curves["insertion"].append(ins.insertion_curve.cpu())
            if fn is not None:
                cam_fn, r_acts, r_grads, copies = smoothed_map_fn(engine, model, layer, x, tgt, acts, grads,
                                                                  aug_smooth, eigen_smooth, reshape_transform)
                for skipped in range(next_batch, batch):  # batches of other ranks alone: the same draws
                    n = min(batch_size, total - skipped * batch_size) * copies
                    for _ in sigmas:
                        torch.randn((n, *r_grads.shape[1:]), generator=generator, device=r_grads.device,
                                    dtype=r_grads.dtype)
                next_batch = batch + 1
                for s, r in _robustness(cam_fn, r_acts, r_grads, sigmas, generator, (H, W), rows, size,
                                        copies).items():
                    robust[s]["ssim"] += r.ssim.tolist()
                    robust[s]["mse"] += r.mse.tolist()
            if res.n_clusters is not None:
                clusters["n_clusters"] += res.n_clusters.tolist()
                clusters["noise"] += (res.labels < 0).sum(1).tolist()
                clusters["dead"] += dead_channels(acts).sum(1).tolist()
            _sync(x.device)
            t_metrics += time.perf_counter() - t1
            t_cam += t1 - t0
            cams_all.append(cams.float().cpu())
        per["robustness"] = {s: v for s, v in robust.items()} if fn is not None else None
        out["per_image"][name] = per
        out["curves"][name] = {k: torch.cat(v).numpy() for k, v in curves.items()}
        out["seconds"][name] = {"cam": t_cam, "metrics": t_metrics}
        out["cams"][name] = torch.cat(cams_all)
        if clusters["n_clusters"]:
            out["clusters"][name] = clusters
        log(f"{name}: CAMs {t_cam:.1f} s ({t_cam / N:.2f} s/image), metrics {t_metrics:.1f} s")
    return out
