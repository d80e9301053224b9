"""``galgan make-sky``: write a CANDELS-like simulated sky (mosaic FITS per band + catalog)."""
from __future__ import annotations

import argparse

from ..dataset import DatasetConfig, make_sky_tiles
from ._common import add_config_arguments, config_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-sky", help="simulate a CANDELS-like HST sky: mosaics (FITS, WCS) + catalog (Guo et al. layout)",
        description="Simulate n_sky_tiles CANDELS-like HST mosaics at 0.06\"/px with a GOODS-S-style catalog "
                    "(ID, RA, DEC, CLASS_STAR, FWHM_IMAGE, FLUX_RADIUS, <band>_FLUX in uJy, ZBEST). Bands, size, "
                    "seed and tiles come from the dataset config.")
    p.add_argument("--out", required=True, help="output directory (one tile_NNN/ folder per tile)")
    add_config_arguments(p, what="dataset (DatasetConfig)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DatasetConfig, args)
    tiles = make_sky_tiles(cfg, args.out)
    print_json({"tiles": [{k: str(v) for k, v in t.items()} for t in tiles]})
    return 0
