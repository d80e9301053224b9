"""``galgan make-blends``: blends of two (or more) galaxies with truth, plus isolated galaxies."""
from __future__ import annotations

import argparse
from dataclasses import replace

from ..dataset import DatasetConfig, make_blend_set, real_galaxy_set, write_blend_set
from ..errors import InputError
from ..figures import plot_blend_set
from ..provenance import provenance
from ..shards import read_shards
from ._common import add_config_arguments, config_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-blends", help="build blends (random shifts/rotations) and isolated galaxies with full truth",
        description="Build n_blends blends and n_isolated single galaxies from a galaxy set (cutout shards from "
                    "make-cutouts) or from real HST stamps in GalSim RealGalaxyCatalog format, degrade them to "
                    "HSC-like images and write batches + truth tables (blends, sources) as Parquet shards. "
                    "Optionally draw a figure of a few blends in high and low resolution.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--cutouts", metavar="URL", help="galaxy-set shards (e.g. OUT/test of make-cutouts)")
    src.add_argument("--real-galaxies", metavar="CATALOG",
                     help="GalSim RealGalaxyCatalog file; its stamps are read from the same directory")
    p.add_argument("--real-band", default="hst/F814W", help="band of the real stamps (default hst/F814W)")
    p.add_argument("--out", required=True, help="output URL")
    p.add_argument("--figure", metavar="PNG", help="also write a figure of example blends (high vs low)")
    add_config_arguments(p, what="dataset (DatasetConfig: blends, n_blends, n_isolated, seed, bands)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DatasetConfig, args)
    if args.cutouts:
        galaxies, _ = read_shards(args.cutouts)
    else:
        galaxies, _ = real_galaxy_set(args.real_galaxies, band=args.real_band, seed=cfg.seed)
        cfg = replace(cfg, bands=replace(cfg.bands, high=(args.real_band,)))
    if len(galaxies.get("image_hr", ())) < cfg.blends.n_galaxies:
        raise InputError(args.cutouts or args.real_galaxies, "has too few galaxies to build blends")
    made = make_blend_set(galaxies, bands=cfg.bands, blends=cfg.blends, n_blends=cfg.n_blends,
                          n_isolated=cfg.n_isolated, seed=cfg.seed)
    written = write_blend_set(made, args.out, metadata=provenance(cfg, source=args.cutouts or args.real_galaxies))
    if args.figure:
        plot_blend_set(made, out=args.figure)
        written["figure"] = args.figure
    n_flag = int((made["blend_batch"]["flags"] != 0).sum()) if "blend_batch" in made else 0
    print_json({"n_blends": cfg.n_blends, "n_isolated": cfg.n_isolated, "flagged_blends": n_flag, "written": written})
    return 0
