"""``galgan deblend``: one survey image in, its deblended catalog out (the single-image form of the field job)."""
from __future__ import annotations

import argparse
import json
from importlib import resources

import numpy as np
import yaml
from astropy.io import fits

from ..config import from_dict
from ..enhance import Enhancer, gate_enhanced
from ..errors import InputError
from ..field import FieldConfig, enhancer_noise_scale, process_tile
from ..field.cutouts import median_sigma
from ..flags import flag_bit
from ..geometry import make_tan_wcs
from ..provenance import provenance
from ..schema import band_name, catalog_table
from ..storage import StorageConfig, check_writable, parquet_bytes, write_bytes_atomic
from ..support_map import SupportConfig
from ..survey import read_survey_image, to_model_tile
from ._common import add_precision_argument
from .enhance import add_support_cards

__all__ = ["register", "run", "deblend_file", "default_field_config"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "deblend", help="deblend one survey image (e.g. an HSC cutout as downloaded) into a catalog",
        description="Read one FITS image as a survey delivers it (HSC data-access cutouts and coadd patches, Rubin "
                    "deep_coadd-style files, gzip), bring it onto the model's grid (resampling, PSF matching), and "
                    "run the field job's steps on it: footprints, seam-free enhancement, children, photometry, the "
                    "support test. Writes the catalog in the field job's schema (positions x, y in the input "
                    "image's pixels, coord_ra/coord_dec from its WCS, fluxes in nJy).")
    p.add_argument("image", metavar="IMAGE.fits", help="the image as downloaded")
    p.add_argument("--psf", metavar="PSF.fits", help="its PSF (e.g. from the HSC PSF picker); default a PSF HDU")
    p.add_argument("--psf-pixel-scale", type=float, metavar="ARCSEC", help="default: the image's pixel scale")
    p.add_argument("--out", required=True, metavar="CATALOG.parquet", help="the catalog (local path or URL)")
    p.add_argument("--enhanced", metavar="ENHANCED.fits",
                   help="also write the enhanced image with its WCS (as galgan enhance: the model's output where the "
                        "low-resolution data detect a source, the bicubic-upsampled data elsewhere)")
    p.add_argument("--no-support-gate", action="store_true",
                   help="--enhanced: the model's output everywhere (noise peaks turned into sources included)")
    p.add_argument("--model", default="default", metavar="default|PATH", help="SR checkpoint")
    p.add_argument("--config", metavar="FIELD.yaml",
                   help="a field job config whose `field:` section sets the science (default: the shipped one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    add_precision_argument(p)
    p.set_defaults(func=run)


def default_field_config(path: str | None = None) -> FieldConfig:
    """The ``field:`` section of a field job config (default: the shipped ``field_default.yaml``)."""
    if path is None:
        text = resources.files("galgan_ray").joinpath("data", "field_default.yaml").read_text()
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as exc:
            raise InputError(path, f"cannot be read ({exc.strerror})") from None
    data = yaml.safe_load(text) or {}
    return from_dict(FieldConfig, data.get("field", {}), where="field")


def deblend_file(image: str, *, psf: str | None = None, psf_pixel_scale_arcsec: float | None = None,
                 model: str = "default", config: FieldConfig | None = None, device: str | None = None,
                 enhancer: Enhancer | None = None, noise=None, precision: str = "fp32"):
    """Deblend one file: ``(catalog columns with x, y in the input's pixels, summary dict, state, enhancer)``.

    The field job's path for one image: :func:`galgan_ray.survey.read_survey_image`,
    :func:`galgan_ray.survey.to_model_tile` and :func:`galgan_ray.field.process_tile` (the job reads a
    patch of files with :func:`galgan_ray.survey.read_survey_patch`, then runs the same stages).
    """
    config = config or default_field_config()
    si = read_survey_image(image, psf=psf, psf_pixel_scale_arcsec=psf_pixel_scale_arcsec)
    enh = enhancer or Enhancer(model, device=device, precision=precision)
    tile, info = to_model_tile(si, enhancer=enh, footprints=config.footprints, detect=config.detect)
    noise = noise if noise is not None else enhancer_noise_scale(enh, config)
    res = process_tile(tile, model=enh.grid, enhance_fn=enh.enhance_plane, rho=noise, config=config)
    cols = dict(res.catalog.columns)  # x, y in the input image's pixels (the tile carries its WCS)
    b = band_name(tile.bands[0])
    flux, err = cols[f"{b}_gmmFlux"], cols[f"{b}_gmmFluxErr"]
    summary = {"image": image, "psf": psf, "model": str(enh.checkpoint), "unit": info["unit"],
               "pixel_scale_in_arcsec": info["pixel_scale_in_arcsec"], "sigma_lr_njy": info["sigma_lr"],
               "psf_plan": info["psf"], "warnings": info["warnings"], "rows": int(len(cols["objectId"])),
               "footprints": int(res.stats.n_footprints), "newly_resolved": int(res.stats.n_newly_resolved),
               "unsupported_dropped": int(res.stats.n_unsupported) if not config.keep_unsupported else 0,
               "unsupported_kept": int(res.stats.n_unsupported) if config.keep_unsupported else 0,
               "median_snr": float(np.median(flux / err)) if len(flux) else None,
               "low_snr_rows": int(np.sum((cols["flags"] & flag_bit("LOW_SNR")) != 0)),
               "star_rows": int(np.sum((cols["flags"] & flag_bit("STAR")) != 0)),
               "deblend_added_rows": int(np.sum((cols["flags"] & flag_bit("DEBLEND_ADDED")) != 0))}
    return cols, summary, res, enh


def run(args: argparse.Namespace) -> int:
    config = default_field_config(args.config)
    out = check_writable(args.out, StorageConfig(), key="--out", folder=False)  # before any work
    if args.enhanced:
        check_writable(args.enhanced, key="--enhanced", folder=False)
    cols, summary, res, enh = deblend_file(args.image, psf=args.psf, psf_pixel_scale_arcsec=args.psf_pixel_scale,
                                           model=args.model, config=config, device=args.device,
                                           precision=args.precision)
    meta = {b"galgan_deblend": json.dumps({"summary": summary, "provenance": provenance()}, default=str).encode()}
    table = catalog_table(cols, bands=res.tile.bands, metadata=meta)
    write_bytes_atomic(out, parquet_bytes(table), StorageConfig())
    if args.enhanced:
        # the enhanced tile again (the pipeline keeps only the cutouts' views), on the HR grid that
        # enhance_image gives the same LR grid: co-centred, factor times finer
        tile = res.tile
        sigma = median_sigma(tile.variance)
        plane = enh.enhance_plane(tile.image, sigma)
        sup = None
        if not args.no_support_gate:  # as galgan enhance writes it: the model's output where the data detect a source
            valid = np.all(np.isfinite(tile.variance), axis=0)
            plane, sup = gate_enhanced(plane, tile.image, enhancer=enh, valid=valid, sigma_lr=sigma,
                                       support=SupportConfig())
        ny, nx = tile.shape
        ra, dec = tile.wcs.wcs.crval
        hdr = make_tan_wcs(float(ra), float(dec), pixel_scale_arcsec=enh.pixel_scale_high_arcsec,
                           shape=(enh.factor * ny, enh.factor * nx)).to_header()
        hdr["BUNIT"] = ("nJy", "per output pixel")
        add_support_cards(hdr, sup)
        fits.PrimaryHDU(plane[0].astype(np.float32), header=hdr).writeto(args.enhanced, overwrite=True)
    s = summary
    print(f"galgan deblend {args.image}: {s['rows']} sources in {s['footprints']} footprints "
          f"({s['newly_resolved']} newly resolved blends; {s['unsupported_dropped']} enhanced children the "
          f"low-resolution pixels do not support left out); units {s['unit']}; noise {s['sigma_lr_njy']:.4g} nJy "
          f"per model pixel; PSF {s['psf_plan']['action']} (FWHM {s['psf_plan']['fwhm_input_arcsec']:.3f}\" -> "
          f"model {s['psf_plan']['fwhm_model_arcsec']:.3f}\") -> {args.out}")
    if s["star_rows"]:
        print(f"  {s['star_rows']} star(s) (saturated, or bright and point-like): one row each, flagged STAR, "
              f"not deblended")
    if s["deblend_added_rows"]:
        print(f"  {s['deblend_added_rows']} row(s) only deblending finds (no object of the plain low-resolution "
              f"detection): flagged DEBLEND_ADDED, each at S/N >= {config.measure.support_snr_added:g}")
    for w in s["warnings"]:
        print(f"  warning: {w}")
    return 0

