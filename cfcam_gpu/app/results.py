"""What an explained image becomes: its manifest row and files (overlay PNG, raw CAM), and its tile on
the contact sheet."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .outputs import CONTACT_SHEET


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


def write_contact_sheet(out: Path, rows: list[dict], size: tuple[int, int]) -> None:
    from PIL import Image

    from .viz import contact_sheet, save_png

    """The first explained images' overlays in a grid, labelled with the class, its probability, the target
    when it is not the predicted class, and the output name -> DIR/contact_sheet.png. Tiles are the
    overlays resized to ``size`` (H, W), the model's input size."""
    tiles, labels = [], []
    for row in rows:
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
        name = Path(row["files"]["overlay"]).stem.rsplit("_", 1)[0]
        labels.append(f"{label} | {name}")
    if tiles and len({tile.shape for tile in tiles}) == 1:
        save_png(contact_sheet(tiles, labels), out / CONTACT_SHEET)
