"""What a batch of explained images becomes: the engine's results (the whole batch, or image by image
when it fails as a whole), each image's manifest row and files (overlay PNG, raw CAM, at the layer's
resolution or the input's), and its tile on the contact sheet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .options import CLIError, option_message
from .outputs import CONTACT_SHEET, is_plain_name


def _config_message(error: Exception) -> str:
    message = option_message(error)
    if "for transformer tokens" in message:  # the library's reshape_transform hint: no CLI option for it
        message = message.split("; for transformer tokens")[0] + (
            "; pick a layer that outputs a spatial feature map (B, C, h, w), e.g. the default (omit --layer)")
    return message


def _is_config_error(error: Exception) -> bool:
    return isinstance(error, (ValueError, TypeError)) and str(error).startswith(
        ("target_layer:", "model:", "targets:", "reshape_transform:"))


def cams_by_group(engine, images: torch.Tensor, target, n: int, options: dict) -> list[tuple[slice, object]]:
    """[(rows, CAMResult or the exception)]: the whole batch, or, if it fails as a whole (a NaN in one
    image, out of memory), image by image so that only the culprits fail. Configuration errors (the
    layer does not output a feature map, ...) stop the run with exit 2."""
    try:
        return [(slice(0, n), engine(images, target, **options))]
    except Exception as error:  # noqa: BLE001 - retried per image below
        if _is_config_error(error):
            raise CLIError(_config_message(error)) from None
        if n == 1:
            return [(slice(0, 1), error)]
    groups = []
    for i in range(n):
        try:
            groups.append((slice(i, i + 1), engine(images[i:i + 1], target, **options)))
        except Exception as single_error:  # noqa: BLE001 - reported in the manifest
            if _is_config_error(single_error):
                raise CLIError(_config_message(single_error)) from None
            groups.append((slice(i, i + 1), single_error))
    return groups


def overlay_at_size(original: torch.Tensor, cam: torch.Tensor) -> np.ndarray:
    """One overlay at the image's own size, as the seed draws it (the CAM upsampled bilinearly to the
    original width and height, JET, 0.4 heat + 0.6 image): original (3, H0, W0) uint8, cam (h, w) ->
    (H0, W0, 3) uint8, computed on the CAM's device and rounded there (as viz.to_uint8_image rounds)."""
    from .viz import overlay

    blended = overlay(original[None].to(cam.device, non_blocking=True), cam[None])[0]
    return (blended * 255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().cpu().numpy()


def explained(result, originals, items, info, out, method):
    """Manifest rows and (path, array) files for one CAMResult; ``originals``: the images at their own
    sizes, (3, H0, W0) uint8 each. The arrays are on the CPU, ready to write."""
    overlays = [overlay_at_size(original, cam) for original, cam in zip(originals, result.cams)]
    probs = result.logits.float().softmax(dim=1)
    top_p, top_i = probs.max(dim=1)
    stats = {"top_i": top_i, "top_p": top_p, "target": result.targets,
             "target_p": probs.gather(1, result.targets[:, None])[:, 0],
             "blank": result.cams.flatten(1).amax(dim=1) <= 0}
    if result.labels is not None:
        stats.update(n_clusters=result.n_clusters, noise=(result.labels < 0).sum(dim=1), eps=result.eps)
    stats = {key: value.cpu().tolist() for key, value in stats.items()}
    cams = result.cams.float().cpu().numpy()
    rows, files = [], []
    for i, item in enumerate(items):
        overlay_name, cam_name = f"{item.name}_{method}.png", f"{item.name}_{method}.npy"
        files += [(out / overlay_name, overlays[i]), (out / cam_name, np.ascontiguousarray(cams[i]))]
        predicted, tgt = stats["top_i"][i], stats["target"][i]
        rows.append({
            "path": item.key, "status": "ok", "error": None,
            "predicted": predicted, "predicted_name": info.class_names[predicted],
            "probability": round(stats["top_p"][i], 6),
            "target": tgt, "target_name": info.class_names[tgt],
            "target_probability": round(stats["target_p"][i], 6),
            "n_clusters": stats["n_clusters"][i] if "n_clusters" in stats else None,
            "noise_channels": stats["noise"][i] if "noise" in stats else None,
            "eps": round(stats["eps"][i], 6) if "eps" in stats else None,
            "blank": stats["blank"][i],  # an all-zero CAM: no positive evidence at this layer
            "cam_shape": list(cams[i].shape),
            "files": {"overlay": overlay_name, "cam": cam_name},
        })
    return rows, files


def output_name(row: dict, method: str) -> str:
    """A manifest row's output NAME: its overlay file NAME_METHOD.png less the method (which may hold '_')."""
    stem, suffix = Path(row["files"]["overlay"]).stem, f"_{method}"
    return stem[: -len(suffix)] if stem.endswith(suffix) else stem


def write_contact_sheet(out: Path, rows: list[dict], size: tuple[int, int], method: str) -> None:
    """The first explained images' overlays in a grid, labelled with the class, its probability, the target
    when it is not the predicted class, and the output name -> DIR/contact_sheet.png. Tiles are the
    overlays resized to ``size`` (H, W), the model's input size; only files inside DIR are read."""
    from PIL import Image

    from .viz import contact_sheet, save_png

    tiles, labels = [], []
    for row in rows:
        if not is_plain_name(row["files"]["overlay"]):
            continue
        try:
            with Image.open(out / row["files"]["overlay"]) as image:
                tile = image.convert("RGB")
                if tile.size != (size[1], size[0]):
                    tile = tile.resize((size[1], size[0]), Image.BILINEAR)
                tiles.append(np.asarray(tile))
        except OSError:
            continue
        label = f"{row['predicted_name']} {row['probability']:.2f}"
        if row.get("target") != row.get("predicted"):
            label += f" -> {row['target_name']}"
        name = output_name(row, method)
        labels.append(f"{label} | {name}")
    if tiles and len({tile.shape for tile in tiles}) == 1:
        save_png(contact_sheet(tiles, labels), out / CONTACT_SHEET)
