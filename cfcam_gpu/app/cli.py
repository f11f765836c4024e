"""Command line: ``cfcam COMMAND ...`` (also ``python -m cfcam_gpu COMMAND ...``).

``SUBCOMMANDS`` is the one table of subcommands (name -> ``Subcommand``): each brings a function that
adds its arguments to its argparse sub-parser and a function that runs it and returns the exit code.
The jobs live in their own modules (``explain``, ``evaluate``); the options they share in ``options``.

Exit codes: 0 success, 1 some images failed (the rest are done), 2 usage or configuration error (one
line on stderr, no traceback), 3 the output folder could not be written (disk full, ...: the run
stopped), 130 interrupted (Ctrl-C, SIGINT), 143 terminated (SIGTERM, handled as Ctrl-C is: what is
written is recorded, temporary files are removed).

Importing this module (and ``cfcam --help``) loads torch but none of the heavy libraries (timm,
torchvision's models, scikit-learn, scikit-image, SciPy, OpenCV, matplotlib, torch._dynamo).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import require_extra

require_extra()  # a clear message naming the app extra, before the imports that need it

from . import evaluate, explain  # noqa: E402
from .options import EXIT_INTERRUPTED, EXIT_TERMINATED, PROG, CLIError  # noqa: E402

__all__ = ["CLIError", "PROG", "SUBCOMMANDS", "Subcommand", "Terminated", "build_parser", "main"]


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM while a command runs: every clean-up that Ctrl-C gets runs."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises ``Terminated`` inside the block (main thread only); the previous handler after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: ``add_arguments(parser)`` fills its sub-parser, ``run(args) -> exit code``."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


SUBCOMMANDS: dict[str, Subcommand] = {
    "explain": Subcommand(explain.HELP, explain.add_arguments, explain.run, explain.DESCRIPTION),
    "evaluate": Subcommand(evaluate.HELP, evaluate.add_arguments, evaluate.run, evaluate.DESCRIPTION),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Batched CF-CAM (clustered, guided-filtered Grad-CAM) explanations.")
    try:
        from .. import __version__
    except ImportError:  # a stale editable install that sees the package as a namespace
        __version__ = "?"
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.description or sub.help,
                                           formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        with sigterm_as_interrupt():
            return args._run(args)
    except CLIError as error:
        if error.echo:
            print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.code
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
