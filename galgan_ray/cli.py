"""The ``galgan`` console command. Each sub-command lives in ``galgan_ray/commands/<noun>.py`` with a
``register(subparsers)`` function; this module only collects them and turns errors into messages."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import InputError
from .progress import set_progress

__all__ = ["main", "build_parser"]

# Command modules, in the order `galgan --help` lists them (data -> learn -> measure -> scale).
_COMMAND_MODULES = ("sky", "cutouts", "blends", "figures", "train", "sample", "enhance", "evaluate",
                    "photometry", "deblend", "flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galgan",
        description="galgan-ray: simulate HST/HSC galaxy blends, enhance ground-based images with GANs, "
                    "and measure how many blends the enhancement recovers.")
    parser.add_argument("--version", action="version", version=f"galgan-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars (default: bars on standard error when it is a terminal; "
                             "GALGAN_PROGRESS=0/1 forces them off/on)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"galgan_ray.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    before = set_progress(False) if args.quiet else None
    try:
        return int(args.func(args) or 0)
    except InputError as exc:
        print(f"galgan {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.quiet:
            set_progress(before)  # main() may be called in-process (tests): -q lasts one command


if __name__ == "__main__":
    sys.exit(main())
