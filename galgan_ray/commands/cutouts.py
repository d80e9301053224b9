"""``galgan make-cutouts``: paper cuts, declination split and 64x64 cutouts from mosaics + catalog."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..catalog import CatalogColumns
from ..config import load_config, to_dict
from ..dataset import DatasetConfig, build_galaxy_sets, clean_neighbours
from ..errors import InputError
from ..provenance import provenance
from ..shards import write_shards
from ._common import add_config_arguments, config_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-cutouts", help="cut 64x64 HST-resolution galaxy cutouts (paper cuts, dec split) into shards",
        description="Read one mosaic per band and a catalog (a real CANDELS mosaic + Guo et al. catalog, or "
                    "the output of make-sky), apply the paper's cuts (F160W < 25, CLASS_STAR < 0.95, z < 5), "
                    "split train/test by declination and write the cutouts as Parquet shards "
                    "(OUT/train, OUT/test). Cutouts that run off the mosaic are padded and flagged EDGE.")
    p.add_argument("--sky", nargs="+", metavar="DIR",
                   help="make-sky tile folder(s) (sky_<band>.fits + sky_catalog.fits)")
    p.add_argument("--mosaic", nargs="+", metavar="BAND=FITS", default=[],
                   help="a user's mosaic per band, e.g. F775W=goodss_acs_f775w.fits (with --catalog)")
    p.add_argument("--catalog", help="catalog file for --mosaic (FITS/CSV/Parquet)")
    p.add_argument("--columns", metavar="YAML", help="CatalogColumns mapping for a real catalog's column names")
    p.add_argument("--out", required=True, help="output URL (local path, file://, s3://, memory://)")
    add_config_arguments(p, what="dataset (DatasetConfig: bands, selection, test_fraction)")
    p.set_defaults(func=run)


def _tiles_from_args(args) -> list[dict]:
    tiles = []
    for d in args.sky or []:
        d = Path(d)
        t = {"catalog": d / "sky_catalog.fits"}
        t.update({f.stem[len("sky_"):]: f for f in d.glob("sky_*.fits") if f.stem != "sky_catalog"})
        tiles.append(t)
    if args.mosaic:
        if not args.catalog:
            raise InputError("--mosaic", "needs --catalog")
        t = {"catalog": args.catalog}
        for item in args.mosaic:
            if "=" not in item:
                raise InputError(f"--mosaic {item}", "expected BAND=FITS, e.g. F775W=mosaic.fits")
            band, path = item.split("=", 1)
            t[band] = path
        tiles.append(t)
    if not tiles:
        raise InputError("make-cutouts", "give --sky DIR or --mosaic BAND=FITS --catalog FILE")
    return tiles


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(DatasetConfig, args)
    columns = load_config(CatalogColumns, args.columns) if args.columns else CatalogColumns()
    train, test, info = build_galaxy_sets(_tiles_from_args(args), bands=cfg.bands, columns=columns,
                                          selection=cfg.selection, test_fraction=cfg.test_fraction)
    meta = {**provenance(cfg), "bands": list(cfg.bands.high), "band_configs": info["band_configs"],
            "dec_split_deg": info["dec_split_deg"], "selection_counts": info["selection_counts"],
            "columns": to_dict(columns)}
    out = args.out.rstrip("/")
    for part, gs in (("train", train), ("test", test)):
        if gs and cfg.clean_neighbours:
            gs, replaced = clean_neighbours(gs, seed=cfg.seed)
            info[f"cleaned_pixels_{part}"] = int(replaced.sum())
        if gs:
            write_shards(gs, f"{out}/{part}", metadata={**meta, "part": part})
    print_json({k: info[k] for k in ("selection_counts", "dec_split_deg", "n_train", "n_test", "cutout_counts")}
               | {"out": out})
    return 0
