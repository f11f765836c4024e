"""Per-image CF-CAM with NumPy, scikit-learn and OpenCV, following the seed step by step.

This is the oracle the tests compare the batched tensor path against; it is not meant to be fast.
Needs the ``ref`` extra: scikit-learn and opencv-contrib-python-headless (``cv2.ximgproc``).
Differences from the seed script, all deliberate and documented in the README:
- the distance matrix is computed in float64 (``scipy.spatial.distance.cdist`` of the features cast to
  float64: no Gram matrix, so no cancellation between near-duplicate channels; the seed's broadcast
  needs C*C*h*w floats and sums in float32); DBSCAN runs on it (``metric="precomputed"``) with eps =
  ``numpy.percentile`` of it in float64, so a pair exactly at eps is a neighbour whatever the features'
  dtype (scikit-learn on float32 features compares with eps**2 rounded to float32 and drops some of
  them); the eps returned is the percentile of the distances rounded to the features' dtype;
- eps = 0 (scikit-learn refuses it) means "neighbours = exact duplicates";
- a constant cluster mean (OpenCV returns NaN for it) is returned unchanged.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"cfcam_gpu.reference needs {module}: pip install 'cfcam-gpu[ref]'") from err


def cluster_reference(features: np.ndarray) -> tuple[np.ndarray, np.floating, int]:
    """features: (C, N) -> (labels (C,), eps, min_samples) with the seed's adaptive DBSCAN."""
    C = features.shape[0]
    dtype = np.float64 if features.dtype == np.float64 else np.float32
    dist = _distances(features.astype(dtype, copy=False))
    min_samples = max(2, int(0.05 * C))
    labels = _dbscan(dist, np.percentile(dist, 25), min_samples)
    return labels, np.percentile(dist.astype(dtype), 25), min_samples


def _distances(feats: np.ndarray) -> np.ndarray:
    """(C, N) -> (C, C) float64 Euclidean distances, ``cdist`` of the features cast to float64."""
    from scipy.spatial.distance import cdist

    f64 = feats.astype(np.float64)
    return cdist(f64, f64)


def _dbscan(dist: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """scikit-learn's DBSCAN on a (C, C) float64 distance matrix -> labels (C,) int64; eps = 0 (which
    scikit-learn refuses): neighbours = exact duplicates."""
    cluster = _require("sklearn.cluster")
    if eps > 0:
        model = cluster.DBSCAN(eps=float(eps), min_samples=min_samples, metric="precomputed")
        return model.fit(dist).labels_.astype(np.int64)
    model = cluster.DBSCAN(eps=0.5, min_samples=min_samples, metric="precomputed")
    return model.fit((dist != 0).astype(np.float64)).labels_.astype(np.int64)


def guided_filter_reference(guide: np.ndarray, src: np.ndarray, radius: int, eps: float) -> np.ndarray:
    """OpenCV's ``ximgproc.guidedFilter`` on (h, w) float32 maps."""
    cv2 = _require("cv2")
    if not hasattr(cv2, "ximgproc"):
        raise ImportError("cfcam_gpu.reference needs cv2.ximgproc (opencv-contrib-python-headless; only "
                          "opencv-python is installed): pip install 'cfcam-gpu[ref]'")
    return cv2.ximgproc.guidedFilter(guide=guide.astype(np.float32), src=src.astype(np.float32),
                                     radius=int(radius), eps=float(eps))


def cfcam_reference(activation: np.ndarray, gradient: np.ndarray) -> SimpleNamespace:
    """CF-CAM for one image.

    activation, gradient: (C, h, w) float arrays -> namespace with cam (h, w) float32 in [0, 1],
    labels (C,), weights (C,), n_clusters, eps, min_samples. Float64 activations are clustered in
    float64 (as scikit-learn does), anything else in float32; the gradients likewise.
    """
    act = np.asarray(activation)
    act = act.astype(np.float64 if act.dtype == np.float64 else np.float32, copy=False)
    grad = np.asarray(gradient)
    grad = grad.astype(np.float64 if grad.dtype == np.float64 else np.float32, copy=False)
    C, h, w = act.shape
    labels, eps, min_samples = cluster_reference(act.reshape(C, h * w))
    n_clusters = len(set(labels.tolist()) - {-1})
    filtered = np.zeros_like(grad)
    radius = int(np.sqrt(h * w) / 4)
    for k in range(n_clusters):
        mean_k = np.mean(grad[labels == k], axis=0)
        eps_k = 0.1 * np.var(mean_k)
        if np.ptp(mean_k) == 0:  # constant map (float32 var may still be ~1e-17): OpenCV gives NaN
            smoothed = mean_k
        else:
            smoothed = guided_filter_reference(mean_k, mean_k, radius, eps_k).astype(grad.dtype)
        filtered[labels == k] = smoothed
    weights = np.mean(filtered, axis=(1, 2))
    cam = np.maximum(np.sum(weights[:, None, None] * act, axis=0), 0)
    if cam.max() > 0:
        cam = cam / cam.max()
    return SimpleNamespace(cam=cam.astype(np.float32), labels=labels, weights=weights, n_clusters=n_clusters,
                           eps=eps, min_samples=min_samples)


def gradcam_reference(activation: np.ndarray, gradient: np.ndarray) -> np.ndarray:
    """Plain Grad-CAM for one image: (C, h, w) twice -> (h, w) in [0, 1]."""
    act = np.asarray(activation, dtype=np.float32)
    weights = np.mean(np.asarray(gradient, dtype=np.float32), axis=(1, 2))
    cam = np.maximum(np.sum(weights[:, None, None] * act, axis=0), 0)
    return (cam / cam.max() if cam.max() > 0 else cam).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# CF-CAM as published (arXiv 2504.00060 v2 and the authors' cfcam.py), written from its description.
# Deliberate differences from the authors' script, as for the seed: distances in float64 and DBSCAN on
# them (theirs: a float32 broadcast), channel norms in float64, and a subset of fewer than two channels
# has eps = the floor (theirs: an error).

def subset_cluster_reference(features: np.ndarray, keep: np.ndarray, q: float = 25.0, diagonal: bool = True,
                             floor: float = 0.0) -> tuple[np.ndarray, np.floating]:
    """DBSCAN on the ``keep`` channels of one image. features: (C, N); keep: (C,) bool -> (labels (C,)
    int64, -1 = noise or not kept; eps: the q-th percentile of the kept channels' distance matrix (without
    its diagonal when ``diagonal`` is False; 0 if that leaves nothing), at least ``floor``; 0 when no
    channel is kept). min_samples = max(2, int(0.05 n)) for the n kept channels."""
    dtype = np.float64 if features.dtype == np.float64 else np.float32
    labels = np.full(features.shape[0], -1, dtype=np.int64)
    idx = np.flatnonzero(keep)
    n = idx.size
    if n == 0:
        return labels, dtype(0)
    dist = _distances(features[idx].astype(dtype, copy=False))
    values = dist.ravel() if diagonal else dist[~np.eye(n, dtype=bool)]
    eps64 = max(np.percentile(values, q) if values.size else 0.0, float(dtype(floor)))
    eps = dtype(max(np.percentile(values.astype(dtype), q) if values.size else dtype(0), floor))
    labels[idx] = _dbscan(dist, eps64, max(2, int(0.05 * n)))
    return labels, eps


def published_filter_reference(grad: np.ndarray, sigma_spatial: float = 5.0, sigma_range: float = 0.1,
                               offset: float = 1e-6) -> np.ndarray:
    """The published "bilateral" filter of one (h, w) map, in float64: one map-sized kernel, spatial
    weights around (h/2, w/2) times range weights around the map's mean, normalised by (sum + offset),
    correlated with the map under zero padding of (k-1)//2 before and the rest after (torch's
    ``conv2d(padding="same")``)."""
    g = np.asarray(grad, dtype=np.float64)
    h, w = g.shape
    i, j = np.mgrid[0:h, 0:w].astype(np.float64)
    spatial = np.exp(-((i - h / 2) ** 2 + (j - w / 2) ** 2) / (2 * sigma_spatial ** 2))
    kernel = spatial * np.exp(-((g - g.mean()) ** 2) / (2 * sigma_range ** 2))
    kernel = kernel / (kernel.sum() + offset)
    top, left = (h - 1) // 2, (w - 1) // 2
    padded = np.pad(g, ((top, h - 1 - top), (left, w - 1 - left)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w))  # (h, w, h, w)
    return np.einsum("yxuv,uv->yx", windows, kernel)


def cfcam_paper_reference(activation: np.ndarray, gradient: np.ndarray) -> SimpleNamespace:
    """CF-CAM as published, for one image.

    activation, gradient: (C, h, w) -> namespace with cam (h, w) float32 in [0, 1] (divided by its max at
    the layer's resolution), labels (C,) (-2 important, -1 noise, k >= 0 cluster), important (C,) bool,
    raw (C,) the weights before the softmax, weights (C,) the softmax weights (0 for noise), n_clusters,
    eps, min_samples.
    """
    act = np.asarray(activation, dtype=np.float32)
    grad = np.asarray(gradient, dtype=np.float32)
    C, h, w = act.shape
    feats = act.reshape(C, h * w)
    norms = np.sqrt(np.sum(feats.astype(np.float64) ** 2, axis=1))
    important = norms >= np.percentile(norms, 75)
    labels, eps = subset_cluster_reference(feats, ~important, q=25.0, diagonal=False, floor=1e-5)
    n_clusters = int(labels.max()) + 1 if labels.size else 0
    raw = np.zeros(C, dtype=np.float64)
    raw[important] = grad[important].mean(axis=(1, 2))
    for k in range(n_clusters):
        raw[labels == k] = published_filter_reference(grad[labels == k].mean(axis=0)).mean()
    kept = important | (labels >= 0)
    z = np.exp(raw[kept] - raw[kept].max())
    weights = np.zeros(C, dtype=np.float64)
    weights[kept] = z / z.sum()
    cam = np.maximum(np.tensordot(weights, act.astype(np.float64), axes=1), 0)
    if cam.max() > 0:
        cam = cam / cam.max()
    return SimpleNamespace(cam=cam.astype(np.float32), labels=np.where(important, -2, labels), important=important,
                           raw=raw, weights=weights, n_clusters=n_clusters, eps=eps,
                           min_samples=max(2, int(0.05 * int((~important).sum()))))
