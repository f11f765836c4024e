"""Per-image CF-CAM with NumPy, scikit-learn and OpenCV, following the seed step by step.

This is the oracle the tests compare the batched tensor path against; it is not meant to be fast.
Needs the ``ref`` extra: scikit-learn and opencv-contrib-python-headless (``cv2.ximgproc``).
Differences from the seed script, all deliberate and documented in the README:
- the distance matrix is computed in float64 and rounded once to the features' dtype (the seed's
  broadcast needs C*C*h*w floats and sums in float32);
- DBSCAN runs with ``algorithm="brute"`` (what scikit-learn's "auto" picks for h*w > 15 anyway);
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
    from scipy.spatial.distance import cdist

    cluster = _require("sklearn.cluster")
    C = features.shape[0]
    dtype = np.float64 if features.dtype == np.float64 else np.float32
    feats = features.astype(dtype, copy=False)
    dist = cdist(feats.astype(np.float64), feats.astype(np.float64)).astype(dtype)
    eps = np.percentile(dist, 25)
    min_samples = max(2, int(0.05 * C))
    if eps > 0:
        labels = cluster.DBSCAN(eps=eps, min_samples=min_samples, algorithm="brute").fit(feats).labels_
    else:  # neighbours = exact duplicates
        labels = cluster.DBSCAN(eps=0.5, min_samples=min_samples, metric="precomputed").fit(
            (dist != 0).astype(np.float64)).labels_
    return labels.astype(np.int64), eps, min_samples


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
