"""Helpers shared by the test modules (test modules never import each other or conftest)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cfcam_gpu import cluster
from cfcam_gpu.cam import CAMResult
from cfcam_gpu.cluster import channel_clusters, seed_min_samples
from cfcam_gpu.duplicates import zero_radius_clusters


REPO = Path(__file__).resolve().parents[1]


def manifest(out: Path) -> list[dict]:
    """The rows of DIR/manifest.jsonl."""
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def subprocess_env(**extra: str) -> dict:
    """The environment for a child ``python`` / ``torchrun`` of this checkout: one thread, this tree on
    PYTHONPATH, no torchrun variables inherited."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


class MissingOracle(ImportError):
    """An oracle the test needs is not installed (conftest turns this into a skip with the reason)."""


def ximgproc():
    """``cv2.ximgproc`` (opencv-contrib), the guided-filter oracle; MissingOracle where only
    opencv-python is installed."""
    try:
        import cv2
    except ImportError as err:
        raise MissingOracle("OpenCV is not installed") from err
    if not hasattr(cv2, "ximgproc"):
        raise MissingOracle("cv2.ximgproc is missing (opencv-contrib-python-headless not installed)")
    return cv2.ximgproc


def has_ximgproc() -> bool:
    try:
        ximgproc()
    except MissingOracle:
        return False
    return True


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


PHOTO_NAMES = ("chelsea", "coffee", "astronaut", "rocket", "china", "flower")


def bundled_photos() -> dict[str, np.ndarray]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos = {name: np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
              for name in ("chelsea", "coffee", "astronaut", "rocket")}
    sample = load_sample_images()
    for fname, img in zip(sample.filenames, sample.images):
        photos["china" if "china" in fname else "flower"] = np.ascontiguousarray(img)
    return {name: photos[name] for name in PHOTO_NAMES}


def preprocess(img: np.ndarray, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float32, antialiased bilinear resize, mean/std normalised."""
    x = torch.from_numpy(np.array(img, dtype=np.float32, copy=True)).permute(2, 0, 1)[None] / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((x[0] - m) / s).contiguous()


def capture_features(model: torch.nn.Module, layer: torch.nn.Module, images: torch.Tensor, targets=None):
    """Activations and gradients of ``layer`` for the logit of ``targets`` (None: top-1).

    The hook keeps the layer's own output and hands a clone downstream, so in-place ops after the layer
    (``out += identity``, ``ReLU(inplace=True)``) do not alter what we differentiate against.
    Returns (acts (B, C, h, w), grads (B, C, h, w), targets (B,), logits (B, L)), all detached.
    """
    store = {}

    def hook(module, inputs, output):
        store["a"] = output
        return output.clone()

    handle = layer.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            logits = model(images)
            if targets is None:
                t = logits.argmax(dim=1)
            else:
                t = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=logits.device)
                t = t.reshape(-1).expand(images.shape[0])
            score = logits.gather(1, t[:, None]).sum()
            (grads,) = torch.autograd.grad(score, store["a"])
    finally:
        handle.remove()
    return store["a"].detach(), grads.detach(), t.detach(), logits.detach()


def seeded_call(factory, seed: int = 0):
    """factory() under torch.manual_seed(seed), the global RNG state restored afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return factory()
    finally:
        torch.random.set_rng_state(state)


def make_features(rng, B, C, h, w, dead_frac=0.15, n_protos=4):
    """Activations (prototype clusters, outliers, dead channels) and gradients (cluster-correlated, smooth
    plus noise, mixed signs), float32 (B, C, h, w)."""
    N = h * w
    protos = np.abs(rng.normal(size=(B, n_protos, N))) * rng.uniform(1, 5, size=(B, n_protos, 1))
    assign = rng.integers(0, n_protos, size=(B, C))
    acts = np.take_along_axis(protos, assign[:, :, None], axis=1) + rng.normal(scale=0.3, size=(B, C, N))
    out = rng.random(size=(B, C)) < 0.1
    acts[out] = rng.normal(scale=6, size=(int(out.sum()), N))
    acts = np.maximum(acts, 0)
    acts[rng.random(size=(B, C)) < dead_frac] = 0
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(xx / 1.7 + k) * np.cos(yy / 2.3 - k) for k in range(n_protos)]).reshape(n_protos, N)
    grads = base[assign] * rng.uniform(-1, 1, size=(B, C, 1)) * 1e-3 + rng.normal(scale=3e-4, size=(B, C, N))
    return (acts.reshape(B, C, h, w).astype(np.float32), grads.reshape(B, C, h, w).astype(np.float32))


def assert_matches_reference(res: CAMResult, acts: np.ndarray, grads: np.ndarray, cam_atol=1e-3,
                             reference=None):
    if reference is None:
        from cfcam_gpu.reference import cfcam_reference as reference

    B = acts.shape[0]
    assert res.cams.shape == (B,) + acts.shape[2:] and res.cams.dtype == torch.float32
    assert res.weights.shape == acts.shape[:2]
    assert torch.isfinite(res.cams).all() and torch.isfinite(res.weights).all()
    for b in range(B):
        ref = reference(acts[b], grads[b])
        assert np.array_equal(res.labels[b].cpu().numpy(), ref.labels), b
        assert int(res.n_clusters[b]) == ref.n_clusters
        assert bool(res.all_noise[b]) == (ref.n_clusters == 0)
        assert res.eps[b].item() == ref.eps
        assert res.min_samples == ref.min_samples
        w, w_ref = res.weights[b].cpu().numpy(), ref.weights
        scale = max(float(np.abs(w_ref).max()), 1e-30)
        assert np.abs(w - w_ref).max() <= 1e-3 * scale, (b, np.abs(w - w_ref).max(), scale)
        assert np.abs(res.cams[b].cpu().numpy() - ref.cam).max() <= cam_atol, b




# ----------------------------------------------------------------------------------------------------
# The eigen family and smoothing: pytorch-grad-cam as oracle with our sign rule, host-read detector.

PGC_PROJECTION_MODULES = ("base_cam", "eigen_cam", "eigen_grad_cam", "layer_cam", "hirescam", "fullgrad_cam",
                          "grad_cam_elementwise")


def orient_like_ours(projection_fn):
    """pytorch-grad-cam's ``get_2d_projection``(-like) function with its arbitrary sign replaced by our
    rule: each map flipped where it correlates negatively with the channel-mean map of its input."""
    def oriented(batch, *args, **kwargs):
        p = projection_fn(batch, *args, **kwargs)
        mean_map = np.nan_to_num(np.asarray(batch, dtype=np.float64)).mean(axis=1)
        sign = np.where((p * mean_map).sum(axis=(1, 2)) < 0, -1, 1).astype(np.float32)
        return p * sign[:, None, None]
    return oriented


def patch_pgc_sign(monkeypatch) -> None:
    """Every pytorch-grad-cam module that projects on the first (kernel) principal component uses our
    sign rule for the rest of the test; the projections themselves stay theirs."""
    import importlib

    import pytorch_grad_cam.utils.svd_on_activations as svd

    linear, kernel = orient_like_ours(svd.get_2d_projection), orient_like_ours(svd.get_2d_projection_kernel)
    for name in PGC_PROJECTION_MODULES:
        monkeypatch.setattr(importlib.import_module("pytorch_grad_cam." + name), "get_2d_projection", linear)
    monkeypatch.setattr(importlib.import_module("pytorch_grad_cam.kpca_cam"), "get_2d_projection_kernel", kernel)


class HostRead(AssertionError):
    pass


HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero")


def refuse_host_reads(monkeypatch):
    """A context in which every Python-level way of reading a tensor's values on the host raises
    ``HostRead`` (``item``, ``tolist``, ``numpy``, bool/int/float/index conversions, ``nonzero``,
    ``torch.equal``). Boolean-mask indexing is not caught (the CUDA sync-debug mode catches it). The
    CPU's correctly rounded float64 square root (NumPy) is replaced by torch's, as on accelerators."""
    import contextlib
    import importlib

    percentile_module = importlib.import_module("cfcam_gpu.percentile_ops")  # the module, not the function

    @contextlib.contextmanager
    def guard():
        def refuse(name):
            def fn(*args, **kwargs):
                raise HostRead(f"host read: {name}")
            return fn

        with monkeypatch.context() as m:
            m.setattr(percentile_module, "exact_sqrt", torch.sqrt)
            for name in HOST_READS:
                m.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
            m.setattr(torch, "nonzero", refuse("torch.nonzero"))
            m.setattr(torch, "equal", refuse("torch.equal"))
            yield
    return guard()


def upsampled_rescaled(cams: torch.Tensor, size) -> np.ndarray:
    """Our (B, h, w) maps as pytorch-grad-cam returns them: bilinear to the input size, then min-max
    scaled there (its scale_cam_image after the resize); maps already at the input size are only
    scaled."""
    maps = cams[:, None].float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
    maps = maps[:, 0]
    lo = maps.amin(dim=(1, 2), keepdim=True)
    span = maps.amax(dim=(1, 2), keepdim=True) - lo
    return ((maps - lo) / torch.where(span > 0, span, torch.ones_like(span))).numpy()


# ----------------------------------------------------------------------------------------------------
# The exact eps-neighbour relation, written independently of the library. numpy's percentile reads the
# order statistics a <= b at ranks lo, lo + 1 and returns a + g (b - a), 0 <= g < 1: no distance lies
# strictly between a and b, so ``d <= eps`` holds exactly for the pairs with d <= a, i.e. V <= V[lo].

def lower_rank(n: int, q: float = 25.0) -> int:
    """numpy's linear rule: the 0-based lower rank of the q-th percentile of n values."""
    return int(np.floor((n - 1) * (q / 100.0)))


def brute_squared(x: np.ndarray) -> np.ndarray:
    """(C, N) -> (C, C) float64 V = sum_k (x_ik - x_jk)**2, differences and squares in float64, the sum
    over the last axis by torch (the summation the library promises)."""
    x64 = torch.from_numpy(np.asarray(x, dtype=np.float64))
    return ((x64[:, None, :] - x64[None, :, :]) ** 2).sum(dim=-1).numpy()


def rank_neighbours(V: np.ndarray, q: float = 25.0) -> np.ndarray:
    """(C, C) squared distances (any ordered type, float64 or Python ints) -> (C, C) bool: V <= its
    order statistic at the percentile's lower rank over all C*C entries."""
    flat = sorted(V.ravel().tolist())
    return np.asarray(V <= flat[lower_rank(len(flat), q)], dtype=bool)


def exact_integer_squared(x: np.ndarray) -> np.ndarray:
    """(C, N) float32/float64 -> (C, C) object array of Python ints: the squared distances in exact
    rational arithmetic, all scaled by one power of four (which leaves their order unchanged)."""
    f = np.asarray(x, dtype=np.float64)
    mant, expo = np.frexp(f)
    ints, exps = (mant * 2.0**53).astype(np.int64), expo.astype(np.int64) - 53
    base = int(exps[f != 0].min()) if (f != 0).any() else 0
    X = np.empty(f.shape, dtype=object)
    for idx, m in np.ndenumerate(ints):
        X[idx] = int(m) << int(exps[idx] - base) if m else 0
    return ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=-1)


def dbscan_labels(neighbours: np.ndarray, min_samples: int) -> np.ndarray:
    """scikit-learn's DBSCAN labels (its numbering) for a given (C, C) bool neighbour relation."""
    from sklearn.cluster import DBSCAN

    return DBSCAN(eps=0.5, min_samples=min_samples, metric="precomputed").fit(
        np.where(neighbours, 0.0, 1.0)).labels_


def write_png(path, image, size: int = 96):
    """image (H, W, 3) uint8 resized to size x size (bilinear) and saved as PNG at path (parents made)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).resize((size, size), Image.BILINEAR).save(path, format="PNG")
    return path


# Clustering oracles and routes shared by test_fuzz.py and test_duplicates.py.

def rank_oracle(x: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """eps and labels for one image's features x (C, N) float32 or float64: the rank relation on the
    brute-force float64 V, scikit-learn's DBSCAN labels (also for eps = 0, which scikit-learn refuses:
    the neighbours are then the exact duplicates)."""
    V = brute_squared(x.numpy())
    dtype = np.float64 if x.dtype == torch.float64 else np.float32
    eps = np.percentile(np.sqrt(V).astype(dtype), 25)
    return torch.tensor(eps, dtype=x.dtype), dbscan_labels(rank_neighbours(V), seed_min_samples(x.shape[0]))


def declined(feats, *args, **kwargs):
    """``cluster.zero_radius_clusters`` declining every image (the eps = 0 route off)."""
    got = zero_radius_clusters(feats, *args, **kwargs)
    return got._replace(applies=torch.zeros_like(got.applies))


def all_pairs_route(acts: torch.Tensor, monkeypatch) -> cluster.ChannelClusters:
    """channel_clusters on the CPU with the eps = 0 route and both screens declining: V for every pair
    (the last resort)."""
    with monkeypatch.context() as m:
        m.setattr(cluster, "screened_neighbours", lambda *args, **kwargs: None)
        m.setattr(cluster, "zero_radius_clusters", declined)
        return channel_clusters(acts)
