"""Command line: `kerasreg` (also `python -m kerasreg`)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from kerasreg import __version__

    parser = argparse.ArgumentParser(
        prog="kerasreg",
        description="Weight regularization tools for Keras 3 models.",
    )
    parser.add_argument(
        "--version", action="version", version=f"kerasreg {__version__}"
    )
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return 0
