"""Images in: bundled sample photos, file lists, a fault-tolerant Dataset, batched preprocessing.

Model input is (B, 3, H, W) float32, resized with antialiased bilinear
interpolation (as torchvision's Resize on tensors) and normalised with a
per-channel mean / std. Display images are the same resize without the
normalisation: (B, 3, H, W) float in [0, 1], or uint8 from the Dataset.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .._checks import channel_stats

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Files are refused above this many pixels (width x height), read from the header before decoding: a
# small crafted file can claim a huge image (a 446 KB PNG of 12000 x 12000 needs ~11 GB to decode).
DEFAULT_MAX_PIXELS = 64_000_000

# RGB photos shipped inside the scikit-image wheel (no pooch download needed).
_SKIMAGE_PHOTOS = (
    "chelsea",
    "coffee",
    "astronaut",
    "rocket",
    "stereo_motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
)


def bundled_images() -> list[tuple[str, np.ndarray]]:
    """Real RGB photos from installed wheels, chelsea first: [(name, (H, W, 3) uint8)].

    scikit-image's chelsea, coffee, astronaut, rocket, ... and scikit-learn's
    china and flower. Images that would need a download are skipped.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = []
    for name in _SKIMAGE_PHOTOS:
        try:
            image = getattr(skimage.data, name)()
        except (AttributeError, ImportError, OSError, ValueError):
            continue  # not in this scikit-image version, or needs pooch / network
        if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
            image = image[0]
        images.append((name.removeprefix("stereo_"), image))
    sample = load_sample_images()
    for filename, image in zip(sample.filenames, sample.images):
        images.append((Path(filename).stem, image))
    rgb = [(name, image) for name, image in images if image.ndim == 3 and image.shape[2] == 3]
    return [(name, np.array(image, dtype=np.uint8)) for name, image in rgb]  # writable copies


def expand_paths(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files named by ``paths``: files, folders, or .txt lists of paths.

    A folder yields its image files (IMAGE_EXTENSIONS, any case), recursively,
    sorted. A .txt file yields its non-empty, non-# lines, relative ones taken
    relative to the .txt file's folder; listed folders are expanded, listed
    files are kept even if missing (the Dataset reports them). Other files are
    kept as given. Order follows the arguments; duplicates are dropped.
    Raises FileNotFoundError for a missing argument.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += _images_in(path)
        elif path.is_file() and path.suffix.lower() == ".txt":
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = path.parent / line  # an absolute `line` stays absolute
                    found += _images_in(listed) if listed.is_dir() else [listed]
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"paths: no such file or folder: {str(path)!r}")
    return list(dict.fromkeys(found))


def _images_in(folder: Path) -> list[Path]:
    """IMAGE_EXTENSIONS files under ``folder``; symbolic links that lead nowhere (broken, a loop) are kept,
    so that the Dataset reports them instead of dropping them silently."""
    return sorted(
        (
            p
            for p in folder.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or (p.is_symlink() and not p.is_dir()))
        ),
        key=lambda p: p.as_posix(),
    )


def display_images(
    images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    size: int | tuple[int, int] = (224, 224),
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Resize uint8 images to one size: (B, 3, H, W) float32 in [0, 1] on ``device``.

    ``images``: (H, W, 3) uint8 arrays or (3, H, W) uint8 tensors of any sizes,
    or a (B, 3, H, W) uint8 tensor. Bilinear with antialias, align_corners=False.
    """
    size = _check_size(size)
    if len(images) == 0:
        raise ValueError("images: expected at least one image, got none")
    if torch.is_tensor(images) and images.ndim == 4:
        _check_uint8_chw(images[0], "images[0]")
        return _resize(images.to(device).float() / 255, size)
    batch = [_resize(_to_chw(image, i).to(device)[None].float() / 255, size) for i, image in enumerate(images)]
    return torch.cat(batch)


def preprocess(
    images: Sequence[np.ndarray | torch.Tensor] | torch.Tensor,
    size: int | tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Model input from uint8 images: (B, 3, H, W) float32, resized and normalised.

    ``images`` as for ``display_images``; ``denormalize`` inverts the normalisation.
    """
    return normalize(display_images(images, size, device), mean, std)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (images - mean) / std, per channel."""
    mean_t, std_t = channel_stats(mean, std, images)
    return (images - mean_t) / std_t


def denormalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Inverse of ``normalize``: (B, 3, H, W) model input -> display images in [0, 1]."""
    mean_t, std_t = channel_stats(mean, std, batch)
    return (batch * std_t + mean_t).clamp(0, 1)


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == size:
        return images
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)


def _to_chw(image: np.ndarray | torch.Tensor, index: int) -> torch.Tensor:
    """(H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, H, W) uint8 tensor."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"images[{index}]: expected an (H, W, 3) uint8 array, "
                f"got shape {image.shape} dtype {image.dtype}"
            )
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # a copy: may be read-only
    if torch.is_tensor(image):
        _check_uint8_chw(image, f"images[{index}]")
        return image
    raise TypeError(f"images[{index}]: expected a numpy array or tensor, got {type(image).__name__}")


def _check_uint8_chw(image: torch.Tensor, what: str) -> None:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"{what}: expected a (3, H, W) uint8 tensor, got shape {tuple(image.shape)} dtype {image.dtype}"
        )


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"size: expected (H, W) positive ints, got {size!r}")
    return pair


class Sample(NamedTuple):
    """One item of ``ImageFolderDataset``; ``ok`` False means image/display are None."""

    image: torch.Tensor | None  # (3, H, W) float32, normalised
    display: torch.Tensor | None  # (3, H, W) uint8, resized
    index: int
    ok: bool
    error: str  # "" when ok
    original: torch.Tensor | None = None  # (3, H0, W0) uint8 at the file's own size (keep_original)


class Batch(NamedTuple):
    """Good samples stacked, bad ones listed: what ``ImageFolderDataset.collate`` returns."""

    images: torch.Tensor  # (B, 3, H, W) float32, normalised
    displays: torch.Tensor  # (B, 3, H, W) uint8
    indices: torch.Tensor  # (B,) int64, positions in the dataset
    paths: list[Path]  # B paths
    failures: list[tuple[Path, str]]  # unreadable files and why
    originals: list[torch.Tensor] | None = None  # B (3, H0, W0) uint8 images at their own sizes (keep_original)


class ImageFolderDataset(Dataset):
    """Image files decoded to RGB (torchvision.io, PIL for BMP / TIFF) and resized.

    An unreadable or corrupt file does not raise: its Sample has ok=False and
    an error message. So does a file whose header claims more than
    ``max_pixels`` pixels (width x height; checked before decoding).
    Use ``DataLoader(dataset, collate_fn=dataset.collate)``.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        size: int | tuple[int, int] = (224, 224),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        keep_original: bool = False,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ):
        if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
            raise ValueError(f"max_pixels: expected a positive int, got {max_pixels!r}")
        self.max_pixels = max_pixels
        self.paths = [Path(p) for p in paths]
        self.size = _check_size(size)
        channel_stats(mean, std, torch.empty(0, 3, 1, 1))  # validate now, not in a worker
        self.mean, self.std = tuple(mean), tuple(std)
        self.keep_original = keep_original  # Sample.original: the decoded image at its own size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        path = self.paths[index]
        problem = _open_problem(path)
        if problem:
            return Sample(None, None, index, False, problem)
        try:
            image = _decode_rgb(path, self.max_pixels)
        except TooLarge as error:
            return Sample(None, None, index, False, str(error))
        except Exception as error:  # any decoder failure is reported, never raised
            return Sample(None, None, index, False, _error_message(error))
        display = _resize(image[None], self.size)  # (1, 3, H, W) in [0, 1]
        model_input = normalize(display, self.mean, self.std)[0]
        display_u8 = (display[0] * 255).round().clamp(0, 255).to(torch.uint8)
        original = (image * 255).round().clamp(0, 255).to(torch.uint8) if self.keep_original else None
        return Sample(model_input, display_u8, index, True, "", original)

    def collate(self, samples: Sequence[Sample]) -> Batch:
        """Stack the good samples; list the bad ones as (path, error)."""
        good = [s for s in samples if s.ok]
        height, width = self.size
        return Batch(
            images=torch.stack([s.image for s in good]) if good else torch.empty(0, 3, height, width),
            displays=(
                torch.stack([s.display for s in good])
                if good
                else torch.empty(0, 3, height, width, dtype=torch.uint8)
            ),
            indices=torch.tensor([s.index for s in good], dtype=torch.int64),
            paths=[self.paths[s.index] for s in good],
            failures=[(self.paths[s.index], s.error) for s in samples if not s.ok],
            originals=[s.original for s in good] if self.keep_original else None,
        )


class ArrayDataset(ImageFolderDataset):
    """ImageFolderDataset over in-memory (H, W, 3) uint8 arrays (the bundled photos); ``keys`` label them
    (``paths``) in batches and failures."""

    def __init__(self, keys: Sequence[str], arrays: Sequence[np.ndarray], size=(224, 224),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 keep_original: bool = False):
        super().__init__([Path(k) for k in keys], size, mean, std, keep_original)
        self.arrays = list(arrays)

    def __getitem__(self, index: int) -> Sample:
        display = display_images([self.arrays[index]], self.size)  # (1, 3, H, W) in [0, 1], as the files
        model_input = normalize(display, self.mean, self.std)[0]
        display_u8 = (display[0] * 255).round().clamp(0, 255).to(torch.uint8)
        original = _to_chw(self.arrays[index], index).clone() if self.keep_original else None
        return Sample(model_input, display_u8, index, True, "", original)


def _open_problem(path: Path) -> str:
    """Why ``path`` cannot be opened ("" when it can): missing, a broken symbolic link, a link loop, ..."""
    try:
        with open(path, "rb"):
            return ""
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "cannot open: symbolic link loop"
        if path.is_symlink() and not path.exists():
            return f"cannot open: broken symbolic link (to {os.readlink(path)!r}: {error.strerror})"
        return f"cannot open: {error.strerror or error}"


def _error_message(error: Exception) -> str:
    """"not a readable image (Image is incomplete or truncated)": the decoder's own words, without
    torchvision's C++ source location or its list of formats (which are not the ones collected)."""
    last_line = (str(error).strip().splitlines() or [""])[-1]
    detail = re.sub(r"^\w+, \S+:\d+, ", "", last_line).strip()
    if detail.startswith("Unsupported image file") or "cannot identify image file" in detail:
        detail = "unknown format: not JPEG, PNG, BMP, WebP or TIFF data"
    elif "truncated" in detail.lower():  # PIL: "Truncated File Read"; torchvision: "... incomplete or truncated"
        detail = "the file is incomplete or truncated"
    return f"not a readable image ({detail or type(error).__name__})"


class TooLarge(ValueError):
    """The file's header claims more pixels than the limit."""


# PIL modes whose pixels have no white level to scale by: refused rather than shown black or white.
_NO_WHITE_LEVEL = {"F": "32-bit floating-point", "I": "32-bit integer"}


def _pil_rgb(pil) -> torch.Tensor:
    """A PIL image (header read) -> (3, h, w) float32 in [0, 1], EXIF orientation applied. 16-bit
    grayscale is scaled by 65535 (as 16-bit PNGs are); 32-bit integer or float pixels are refused."""
    from PIL import ImageOps

    if pil.mode in _NO_WHITE_LEVEL:
        raise ValueError(f"{_NO_WHITE_LEVEL[pil.mode]} pixels have no defined white level; convert the file "
                         "to 8- or 16-bit")
    pil = ImageOps.exif_transpose(pil)
    if pil.mode.startswith("I;16"):
        gray = torch.from_numpy(np.asarray(pil).astype(np.int32)).float() / 65535
        return gray[None].expand(3, -1, -1).contiguous()
    rgb = np.asarray(pil.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def _open_header(path: Path, max_pixels: int):
    """PIL's view of the file's header (nothing decoded yet) -> the open PIL image, or None for a format
    PIL does not know (left to torchvision). TooLarge above ``max_pixels``; a file PIL recognises but
    cannot parse raises here, before a decoder library can print to stderr."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            pil = Image.open(path)
        except UnidentifiedImageError:
            return None
        except Image.DecompressionBombError as error:  # above PIL's own hard limit, which is higher
            raise TooLarge(f"too large: {error.args[0] if error.args else ''} (above the limit of "
                           f"{max_pixels} pixels, --max-pixels)") from None
    width, height = pil.size
    if width * height > max_pixels:
        pil.close()
        raise TooLarge(f"too large: {width} x {height} = {width * height} pixels, above the limit of "
                       f"{max_pixels} (--max-pixels)")
    return pil


def _decode_rgb(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """File -> (3, h, w) float32 in [0, 1], EXIF orientation applied; TooLarge above ``max_pixels``."""
    from torchvision.io import ImageReadMode, decode_image

    pil = _open_header(path, max_pixels)
    if pil is not None:
        with pil:
            if pil.format in ("BMP", "DIB", "TIFF") or path.suffix.lower() in (".bmp", ".tif", ".tiff"):
                return _pil_rgb(pil)  # not decoded by torchvision.io
    image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    # 16-bit PNGs decode to uint16; scale every integer type by its own maximum.
    return image.float() / torch.iinfo(image.dtype).max
