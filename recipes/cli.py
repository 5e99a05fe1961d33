"""The ``rxt`` command line.

Usage::

    rxt --version
    rxt COMMAND [ARGS...]

Subcommands are registered in :func:`build_parser` (``subparsers.add_parser(...)`` with
``set_defaults(func=...)``; ``func(args)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

PACKAGE_NAME = "rxt-hf"


def package_version() -> str:
    """Installed version of ``rxt-hf`` (falls back to ``recipes.__version__`` when run from a source tree)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version(PACKAGE_NAME)
    except PackageNotFoundError:
        from recipes import __version__

        return __version__


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The top-level parser and its subcommand registry."""
    parser = argparse.ArgumentParser(
        prog="rxt",
        description="Reactive Transformer (RxT) for Hugging Face: train, evaluate and talk to RxT models.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"{PACKAGE_NAME} {package_version()}",
        help="print the package version and exit",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser, subparsers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rxt`` console script; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    known = sorted(subparsers.choices)
    if argv and not argv[0].startswith("-") and argv[0] not in subparsers.choices:
        available = ", ".join(known) if known else "none in this version"
        parser.error(f"unknown subcommand {argv[0]!r} (available subcommands: {available}). Run 'rxt --help'.")
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
