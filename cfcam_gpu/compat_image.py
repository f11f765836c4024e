"""Image helpers of the drop-in, as ``pytorch_grad_cam.utils.image``: the same names, arguments and output.

``deprocess_image`` (guided backpropagation for display), ``show_cam_on_image`` (a map over a photo),
``show_factorization_on_image`` and ``create_labels_legend`` (Deep Feature Factorization). NumPy in,
NumPy out, one image (H, W, 3) at a time; OpenCV (the ``ref`` extra) and matplotlib (the ``app`` extra)
are imported only when a function needs them.
"""
from __future__ import annotations

import numpy as np
import torch

from .methods import guided as _guided

COLORMAP_JET = 2  # cv2.COLORMAP_JET


SCALE_EPS = 1e-7  # pytorch-grad-cam's scale_cam_image: (m - min) / (max + SCALE_EPS)


def deprocess_image(img: np.ndarray) -> np.ndarray:
    """(img - mean) / (std + 1e-5) * 0.1 + 0.5 over all of the array's values, clipped to [0, 1], times 255
    as uint8, same shape. Guided Grad-CAM: ``deprocess_image(np.stack([cam] * 3, axis=-1) * gb)``."""
    arr = np.ascontiguousarray(img)
    return _guided.deprocess(torch.from_numpy(arr).reshape(1, -1)).reshape(arr.shape).numpy()


def show_cam_on_image(img: np.ndarray, mask: np.ndarray, use_rgb: bool = False, colormap: int = COLORMAP_JET,
                      image_weight: float = 0.5) -> np.ndarray:
    """img (H, W, 3) float in [0, 1], mask (H, W) in [0, 1] -> uint8 (H, W, 3): the mask through an OpenCV
    colormap (BGR unless ``use_rgb``) blended as image_weight * img + (1 - image_weight) * heatmap, then
    divided by its maximum."""
    import cv2

    img = np.asarray(img)
    if img.max() > 1:
        raise ValueError(f"img: expected float values in [0, 1], got a maximum of {img.max()!r}")
    if not 0 <= image_weight <= 1:
        raise ValueError(f"image_weight: expected a number in [0, 1], got {image_weight!r}")
    heat = cv2.applyColorMap(np.uint8(255 * mask), colormap)
    if use_rgb:
        heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)
    blend = (1 - image_weight) * (np.float32(heat) / 255) + image_weight * img
    return np.uint8(255 * (blend / blend.max()))


def create_labels_legend(concept_scores: np.ndarray, labels: dict, top_k: int = 2) -> list[str]:
    """concept_scores (K, L) -> one legend string per concept: its ``top_k`` categories, best first, each
    as "name:score" (at most the first three comma-separated parts of the name), one per line."""
    scores = np.asarray(concept_scores)
    legend = []
    for row in scores:
        best = np.argsort(row)[::-1][:top_k]
        legend.append("\n".join(f"{','.join(labels[c].split(',')[:3])}:{row[c]:.2f}" for c in best))
    return legend


def _component_colors(n: int) -> list[np.ndarray]:
    from matplotlib import colormaps

    cmap = colormaps["gist_rainbow"]
    return [np.array(cmap(t)) for t in np.arange(0, 1, 1.0 / n)]


def show_factorization_on_image(img: np.ndarray, explanations: np.ndarray, colors=None, image_weight: float = 0.5,
                                concept_labels: list | None = None) -> np.ndarray:
    """img (H, W, 3) RGB float in [0, 1], explanations (K, H, W) in [0, 1] -> uint8 (H, W, 3), or
    (H, 2 W, 3) with the legend of ``concept_labels`` on the right. Each pixel shows the colour of its
    strongest component (``colors``: K RGB(A) colours in [0, 1]; default matplotlib's gist_rainbow) with
    the brightness (HSV value) of that component's map there, blended with the image."""
    import cv2

    explanations = np.asarray(explanations)
    K, H, W = explanations.shape
    colors = _component_colors(K) if colors is None else colors
    rgb = np.uint8(np.array([np.asarray(c)[:3] for c in colors]) * 255)[None]  # (1, K, 3)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[0]  # (K, 3)
    winner = explanations.argmax(axis=0)
    value = np.take_along_axis(explanations, winner[None], axis=0)[0]
    painted = hsv[winner]
    painted[..., 2] = np.uint8(255 * value)
    mask = np.float32(cv2.cvtColor(painted, cv2.COLOR_HSV2RGB)) / 255
    result = np.uint8((img * image_weight + mask * (1 - image_weight)) * 255)
    if concept_labels is None:
        return result
    return np.hstack((result, _legend(colors, concept_labels, result.shape[0], result.shape[1])))


def _legend(colors, concept_labels: list, H: int, W: int) -> np.ndarray:
    """A (H, W, 3) uint8 picture of the colour legend, drawn by matplotlib."""
    import cv2
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    dpi = plt.rcParams["figure.dpi"]
    fig = plt.figure(figsize=(W / dpi, H / dpi))
    try:
        n = len(concept_labels)
        lines = [Line2D([0], [0], color=colors[i], lw=5 * H / 256) for i in range(n)]
        plt.legend(lines, concept_labels, mode="expand", fancybox=True, shadow=True,
                   fontsize=int(14 * H / 256 / max(1, n / 6)))
        plt.tight_layout(pad=0, w_pad=0, h_pad=0)
        plt.axis("off")
        fig.canvas.draw()
        picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    finally:
        plt.close(fig)
    return cv2.resize(picture, (W, H))
