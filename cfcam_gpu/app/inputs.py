"""``cfcam explain``'s inputs: one ``Item`` per image (its manifest key, output name and file), the keys
relative to the input folder (``input_keys``), and collecting them from PATHs or the bundled photos."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import outputs
from .options import CLIError, input_paths

DEMO_PREFIX = "bundled:"  # manifest path of a bundled photo: "bundled:chelsea"


@dataclass
class Item:
    key: str  # manifest path: relative to the input folder (input_keys), or "bundled:NAME"
    stem: str
    name: str = ""  # output name (outputs.output_names)
    file: Path | None = None  # the image file (None for a bundled photo)

    @property
    def shown(self) -> str:
        """How messages name the input: the file relative to the working folder, or the key."""
        return self.key if self.file is None else short_path(str(self.file))


def input_keys(arguments, files) -> list[str]:
    """The manifest path of each input file: relative (POSIX form) to the input folder, i.e. the deepest
    folder holding every PATH (a folder PATH itself, a file's or a .txt list's folder) and every file, so
    that the manifest stays valid when the input folder moves. Absolute paths where there is no common
    folder (files on several Windows drives)."""
    bases = [os.path.abspath(a) if os.path.isdir(a) else os.path.dirname(os.path.abspath(a)) for a in arguments]
    absolute = [os.path.abspath(f) for f in files]
    try:
        root = os.path.commonpath(bases + [os.path.dirname(f) for f in absolute])
    except ValueError:
        return absolute
    return [Path(os.path.relpath(f, root)).as_posix() for f in absolute]


def collect_inputs(args: argparse.Namespace) -> tuple[list[Item], list[np.ndarray] | None]:
    """-> (items, the bundled photos' arrays with --demo, else None)."""
    if args.demo:
        from .data import bundled_images

        if args.paths:
            raise CLIError("--demo: explains the bundled photos; give either PATHs or --demo, not both")
        photos = bundled_images()
        if not photos:
            raise CLIError("--demo: no bundled photos found (scikit-image / scikit-learn sample data)")
        items = [Item(DEMO_PREFIX + name, name) for name, _ in photos]
        arrays = [image for _, image in photos]
    else:
        if not args.paths:
            raise CLIError("no input: give image files, folders or .txt lists, or --demo")
        files = input_paths(args.paths)
        items = [Item(key, p.stem, file=p) for key, p in zip(input_keys(args.paths, files), files)]
        arrays = None
    for item, name in zip(items, outputs.output_names([i.key for i in items], [i.stem for i in items])):
        item.name = name
    return items, arrays


def short_path(path: str) -> str:
    """A path as messages show it: a bundled demo name as it is, else relative to the working directory."""
    if path.startswith(DEMO_PREFIX):
        return path
    try:
        return os.path.relpath(path)
    except ValueError:
        return path
