"""The `panoptic-deeplab` command line: a thin layer over the Python API.

Each verb is a pair of functions, ``_add_<verb>(subparsers)`` and ``_run_<verb>(args) -> int``,
listed in ``COMMANDS``. Heavy imports happen inside the run functions so that ``--help`` is fast.

Exit codes: 0 success, 1 the work found problems (e.g. ``validate`` reported errors), 2 bad usage or
bad input (a clear message is printed to stderr), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def _parse_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} is not of the form HxW, e.g. 256x512") from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return h, w


# Each entry: (verb, add_parser, run). Filled below the command definitions.
COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None], Callable[[argparse.Namespace], int]]] = []


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="panoptic-deeplab",
        description="Panoptic-DeepLab: train, evaluate and run bottom-up panoptic segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for _, add_parser, run in COMMANDS:
        add_parser(sub)
        # the last parser added is the one for this verb
        list(sub.choices.values())[-1].set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
