"""``galgan plot-blends``: the paper's Fig. 4 (first columns) from a blend set written by make-blends."""
from __future__ import annotations

import argparse

from ..dataset import read_blend_set
from ..figures import plot_blend_set


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot-blends", help="PNG of example blends in high and low resolution, truth marked",
                       description="Draw the first N blends of a blend set (make-blends output) at HST-like and "
                                   "HSC-like resolution with the true galaxy positions marked.")
    p.add_argument("--blends", required=True, metavar="URL", help="make-blends output")
    p.add_argument("--out", required=True, metavar="PNG")
    p.add_argument("--n", type=int, default=6, help="number of blends (rows)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    made = read_blend_set(args.blends)
    print(plot_blend_set(made, out=args.out, n_show=args.n))
    return 0
