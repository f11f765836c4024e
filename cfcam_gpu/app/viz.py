"""Heatmap overlays as OpenCV draws them (COLORMAP_JET), PNG output, contact sheets.

``overlay`` reproduces, batched on the input's device, the usual OpenCV recipe
    heat = cv2.applyColorMap(np.uint8(255 * cv2.resize(cam, (W, H))), cv2.COLORMAP_JET)
    out = alpha * heat + (1 - alpha) * image
without OpenCV: the JET lookup table is computed here the way OpenCV builds it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .outputs import write_atomic


def _build_jet_lut() -> np.ndarray:
    """(256, 3) uint8 RGB, equal to OpenCV's COLORMAP_JET table.

    OpenCV (imgproc/src/colormap.cpp, class Jet) stores GNU Octave's jet,
        r = clip(1.5 - |4x - 3|), g = clip(1.5 - |4x - 2|), b = clip(1.5 - |4x - 1|),
    sampled at x = i / 255 as float32, re-interpolates it linearly at its own 256
    float32 breakpoints, and converts with convertTo(CV_8U, 255): a float32
    multiply and round-half-to-even. The re-interpolation evaluates point i on
    the segment [i - 1, i] as y[i-1] + (x[i] - x[i-1]) * (y[i] - y[i-1]) / (x[i] - x[i-1]),
    which in float32 is not always exactly y[i]; it is reproduced here because it
    changes one entry of the rounded table.
    """
    f32 = np.float32
    x = np.arange(256) / 255.0
    table = np.stack([np.clip(1.5 - np.abs(4 * x - c), 0, 1) for c in (3, 2, 1)], axis=1).astype(f32)
    breakpoints = np.arange(256, dtype=f32) * (f32(1) / f32(255))
    dx = (breakpoints[1:] - breakpoints[:-1])[:, None]
    values = table.copy()
    values[1:] = table[:-1] + dx * (table[1:] - table[:-1]) / dx
    return np.clip(np.rint(values * f32(255)), 0, 255).astype(np.uint8)


_JET_LUT = _build_jet_lut()


def jet_lut() -> torch.Tensor:
    """OpenCV's COLORMAP_JET as a (256, 3) uint8 tensor, RGB order (OpenCV gives BGR)."""
    return torch.from_numpy(_JET_LUT.copy())


def overlay(images: torch.Tensor, cams: torch.Tensor, alpha: float = 0.4) -> torch.Tensor:
    """Blend JET-coloured CAMs over images: (B, 3, H, W) float in [0, 1].

    images: (B, 3, H, W) float in [0, 1] (or uint8). cams: (B, h, w) or
    (B, 1, h, w) in [0, 1], upsampled bilinearly (align_corners=False, as
    cv2.resize INTER_LINEAR) to (H, W), quantised as np.uint8(255 * cam) and
    coloured with OpenCV's JET. Result: alpha * heat + (1 - alpha) * images,
    on the images' device, in the images' float dtype.
    """
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got {_describe(images)}")
    if not torch.is_tensor(cams) or cams.ndim not in (3, 4) or (cams.ndim == 4 and cams.shape[1] != 1):
        raise ValueError(f"cams: expected a (B, h, w) tensor, got {_describe(cams)}")
    if cams.shape[0] != images.shape[0]:
        raise ValueError(f"cams: expected batch size {images.shape[0]} like images, got {cams.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: expected a value in [0, 1], got {alpha!r}")

    if images.dtype == torch.uint8:
        images = images.float() / 255
    cams = cams.reshape(cams.shape[0], 1, *cams.shape[-2:]).to(images.device, torch.float32)
    cams = F.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)
    index = (torch.nan_to_num(cams[:, 0], nan=0.0).clamp(0, 1) * 255).floor().long()  # (B, H, W)
    lut = torch.from_numpy(_JET_LUT).to(images.device, images.dtype) / 255
    heat = lut[index].permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    return alpha * heat + (1 - alpha) * images


def to_uint8_image(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """One image as a (H, W, 3) or (H, W) uint8 array.

    Accepts a tensor (3, H, W) / (H, W) or an array (H, W, 3) / (H, W); floats
    are taken to be in [0, 1] and rounded.
    """
    if torch.is_tensor(image):
        image = image.detach().cpu()
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image: expected a numpy array or tensor, got {type(image).__name__}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ValueError(f"image: expected (H, W, 3) or (H, W) (tensor: (3, H, W)), got {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


def save_png(image: np.ndarray | torch.Tensor, path: str | Path) -> Path:
    """Write one image (see ``to_uint8_image``) as a PNG, atomically; returns the path.

    ``outputs.write_atomic``: the PNG is written to a temporary file in the
    target folder (created if needed) and renamed over ``path``, so readers
    never see a partial file.
    """
    array = to_uint8_image(image)
    return write_atomic(path, lambda file: Image.fromarray(array).save(file, format="PNG"))


def save_overlays(overlays: torch.Tensor, paths: Sequence[str | Path]) -> list[Path]:
    """Write (B, 3, H, W) overlays in [0, 1] to B PNG files, atomically."""
    if len(overlays) != len(paths):
        raise ValueError(f"paths: expected {len(overlays)} paths, one per overlay, got {len(paths)}")
    overlays = overlays.detach().cpu()
    return [save_png(image, path) for image, path in zip(overlays, paths)]


LABEL_SIZE = 11  # label font size in pixels


@functools.lru_cache(maxsize=1)
def label_font() -> tuple[ImageFont.ImageFont, Callable[[str], bool]]:
    """(font, has_glyph): DejaVu Sans as matplotlib ships it (Latin, Greek, Cyrillic, ...; imported here,
    lazily), or, without it, Pillow's default font with ASCII only. ``has_glyph(char)``: whether the font
    draws that character (else it would be an empty box)."""
    try:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=False)
        face = FT2Font(path)
        return ImageFont.truetype(path, LABEL_SIZE), lambda ch: face.get_char_index(ord(ch)) != 0
    except (ImportError, ValueError, OSError, RuntimeError):
        return ImageFont.load_default(), lambda ch: " " <= ch <= "~"


def renderable(text: str) -> str:
    """``text`` on one line, with every character the label font cannot draw replaced by '?', a visible
    mark instead of an empty box ("café 猫" -> "café ?" with DejaVu Sans); line breaks, tabs and other
    control characters (a file name may hold them) become '?' too."""
    _, has_glyph = label_font()
    return "".join(ch if ch.isprintable() and (ch == " " or has_glyph(ch)) else "?" for ch in str(text))


def contact_sheet(
    overlays: torch.Tensor | Sequence[np.ndarray],
    labels: Sequence[str],
    ncols: int | None = None,
    pad: int = 4,
) -> np.ndarray:
    """A grid of tiles with a text label under each: (H, W, 3) uint8, white background.

    overlays: (B, 3, h, w) tensor in [0, 1] (or uint8), or B arrays of one size.
    ncols: tiles per row, default ceil(sqrt(B)). Labels too wide are cut; characters the label font
    lacks are shown as '?' (``renderable``).
    """
    tiles = [to_uint8_image(tile) for tile in overlays]
    if not tiles:
        raise ValueError("overlays: expected at least one image, got none")
    if len(labels) != len(tiles):
        raise ValueError(f"labels: expected {len(tiles)} labels, one per overlay, got {len(labels)}")
    if len({tile.shape for tile in tiles}) != 1:
        raise ValueError(f"overlays: expected images of one size, got {sorted({t.shape for t in tiles})}")
    ncols = ncols or math.ceil(math.sqrt(len(tiles)))
    if not isinstance(ncols, int) or ncols < 1:
        raise ValueError(f"ncols: expected a positive int, got {ncols!r}")

    font = label_font()[0]
    text_height = font.getbbox("Ágy")[3]
    height, width = tiles[0].shape[:2]
    cell_w, cell_h = width + pad, height + text_height + 2 * pad
    nrows = math.ceil(len(tiles) / ncols)
    sheet = Image.new("RGB", (ncols * cell_w + pad, nrows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        x, y = pad + (i % ncols) * cell_w, pad + (i // ncols) * cell_h
        sheet.paste(Image.fromarray(tile).convert("RGB"), (x, y))
        text = renderable(label)
        while text and draw.textlength(text, font=font) > width:
            text = text[:-1]
        draw.text((x, y + height + pad // 2), text, fill="black", font=font)
    return np.asarray(sheet).copy()


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"shape {tuple(value.shape)} dtype {value.dtype}"
    return type(value).__name__
