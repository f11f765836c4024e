"""The cost of reading each file's header with Pillow before decoding (the pixel limit, fake-PNG check):
``cfcam_gpu.app.data._decode_rgb`` against torchvision's ``decode_image`` alone, on the bundled photos
saved as PNG and JPEG at their own sizes, the two alternated round by round.

    python -m bench.decode_header --rounds 7

Prints the median seconds per image of each and their ratio (header + decode / decode alone).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from torchvision.io import ImageReadMode, decode_image

    from cfcam_gpu.app.data import _decode_rgb, bundled_images

    with tempfile.TemporaryDirectory() as folder:
        files = []
        for name, image in bundled_images():
            for suffix in (".png", ".jpg"):
                path = Path(folder) / f"{name}{suffix}"
                Image.fromarray(image).save(path)
                files.append(path)

        def decode_only():
            for path in files:
                image = decode_image(str(path), mode=ImageReadMode.RGB, apply_exif_orientation=True)
                image.float() / 255

        def with_header():
            for path in files:
                _decode_rgb(path)

        times = {"decode only": [], "header + decode": []}
        for _ in range(args.rounds):
            for label, fn in (("decode only", decode_only), ("header + decode", with_header)):
                start = time.perf_counter()
                fn()
                times[label].append((time.perf_counter() - start) / len(files))
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{cpu}\n{load}\n{len(files)} files (bundled photos as PNG and JPEG), {args.rounds} alternated rounds")
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, median in medians.items():
        print(f"{label:16s} {median * 1e3:8.2f} ms/image (median)")
    print(f"ratio header + decode / decode only: {medians['header + decode'] / medians['decode only']:.3f}")


if __name__ == "__main__":
    main()
