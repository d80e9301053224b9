"""``galgan flags``: decode a catalog's ``flags`` value into flag names, or list every flag bit."""
from __future__ import annotations

import argparse

from ..errors import InputError
from ..flags import FLAGS, describe_flags

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flags", help="decode a catalog flags value (or list every flag bit)",
                       description="Print the names of the flags set in each VALUE (decimal, or 0x... hex), "
                                   "or with no VALUE the table of every bit, its name and its meaning.")
    p.add_argument("values", nargs="*", help="flags values, e.g. 4104 or 0x1008")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.values:
        for f in FLAGS:
            print(f"{f.bit:>3}  {f.value:>6}  {f.name:<16} {f.description}")
        return 0
    known = sum(f.value for f in FLAGS)
    for text in args.values:
        try:
            value = int(text, 0)
        except ValueError:
            raise InputError(f"flags value {text!r}", "is not an integer (decimal or 0x hex)") from None
        if value < 0:
            raise InputError(f"flags value {text!r}", "must be >= 0")
        names = describe_flags(value)
        unknown = value & ~known
        extra = [f"unknown bits 0x{unknown:x}"] if unknown else []
        print(f"{value}: {', '.join(names + extra) if (names or extra) else 'none'}")
    return 0
