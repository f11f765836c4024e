"""Helpers shared by the tests of the command line (``from helpers import ...``: pytest puts tests/ on
sys.path, since tests/ is not a package). Test files never import each other."""
from __future__ import annotations

import json
import os
from pathlib import Path

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
