"""``galgan enhance``: apply a super-resolution model to a FITS image of any size, pixel scale and WCS."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from .. import __version__
from ..errors import InputError
from ..support_map import SupportConfig
from ._common import add_precision_argument

__all__ = ["register", "run", "read_image", "read_psf_planes", "write_enhanced", "add_support_cards"]

#: Plane order of HSC coadd cubes (as in ../shared/data/hsc_hst_pairs): a 1-band model made for an
#: HSC band takes that plane of a 5-plane cube by default.
_HSC_CUBE_ORDER = ("g", "r", "i", "z", "y")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "enhance", help="enhance a ground-based FITS image to HST-like resolution with a trained SR model",
        description="Resample a FITS image (2-D, or a plane of a cube) with a celestial WCS onto the model's "
                    "low-resolution grid, match its PSF to the model's, enhance it tile by tile and write the "
                    "high-resolution image with its WCS (same units per output pixel as the input).")
    p.add_argument("image", metavar="IN.fits", help="input FITS image with a celestial WCS")
    p.add_argument("--out", required=True, metavar="OUT.fits", help="enhanced image (overwritten)")
    p.add_argument("--psf", metavar="PSF.fits", help="PSF of the input (2-D, or a cube with the same planes); "
                                                     "narrower PSFs are matched to the model's, broader ones warned")
    p.add_argument("--psf-pixel-scale", type=float, metavar="ARCSEC",
                   help="pixel scale of the PSF image (default: the input image's)")
    p.add_argument("--model", default="default", metavar="default|default-7band|PATH",
                   help="SR checkpoint (default: the shipped 1-band model)")
    p.add_argument("--hdu", type=int, default=None, metavar="N", help="HDU of the image (default: first with data)")
    p.add_argument("--band-index", default=None, metavar="K[,K...]",
                   help="plane(s) of a cube to use, in the model's band order (default: the HSC plane of the "
                        "model's band for a 5-plane grizy cube, e.g. 2 = i; all planes when their number equals "
                        "the model's bands)")
    p.add_argument("--sigma", type=float, default=None, metavar="S",
                   help="noise sigma per pixel on the model grid (default: estimated from the image)")
    p.add_argument("--overlap", type=int, default=6, metavar="PX", help="tile overlap in model input pixels")
    p.add_argument("--surface-brightness", action="store_true",
                   help="the image is surface brightness (e.g. MJy/sr), not flux per pixel")
    p.add_argument("--support-snr", type=float, default=SupportConfig.detect_snr, metavar="S",
                   help="keep the model's output only where the low-resolution image detects a source (a "
                        "matched-filter peak of S/N >= S, grown to its %g-sigma isophote and one PSF FWHM); "
                        "elsewhere write the data themselves, bicubic-upsampled (default %%(default)s)"
                        % SupportConfig.grow_snr)
    p.add_argument("--no-support-gate", action="store_true",
                   help="write the model's output everywhere, noise peaks turned into sources included")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    add_precision_argument(p)
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------------
# I/O
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _strict_fits():
    """A context in which astropy's warning about a truncated file is an error (otherwise it only
    warns, and the half-read array fails later with an unrelated message)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*truncated.*")
        yield


def _parse_indices(text: str | None, source: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError as exc:
        raise InputError("--band-index", f"expected integers separated by commas, got {text!r}") from exc


def _default_planes(n_planes: int, bands_low: tuple, source: str) -> list[int]:
    n_model = len(bands_low)
    if n_planes == n_model:
        return list(range(n_planes))
    if n_model == 1 and n_planes == len(_HSC_CUBE_ORDER) and bands_low[0].name in _HSC_CUBE_ORDER:
        return [_HSC_CUBE_ORDER.index(bands_low[0].name)]
    raise InputError(source, f"is a cube of {n_planes} planes and the model takes {n_model} band(s) "
                             f"({', '.join(b.key for b in bands_low)}); choose plane(s) with --band-index")


def read_image(path: str, *, hdu: int | None = None, band_index: list[int] | None = None,
               bands_low: tuple = ()) -> tuple[np.ndarray, Any, Any, dict[str, Any]]:
    """Read the image to enhance from a FITS file.

    Parameters
    ----------
    path : str
    hdu : int, optional
        HDU index; default the first HDU holding an image.
    band_index : list of int, optional
        Planes of a cube, in the model's band order.
    bands_low : tuple of BandConfig
        The model's input bands (for the default plane choice and the band count).

    Returns
    -------
    image : numpy.ndarray
        ``(C, H, W)`` float64.
    wcs : astropy.wcs.WCS
        Celestial WCS.
    header : astropy.io.fits.Header
        The image HDU's header.
    info : dict
        ``hdu``, ``planes`` (list of int, or None for a 2-D image).

    Raises
    ------
    InputError
        Naming the file: unreadable, no image, wrong rank, no celestial WCS, bad plane index.
    """
    try:
        with _strict_fits(), fits.open(path) as hdul:
            hdul.readall()  # every HDU's header: a file truncated after the image is refused too, as deblend does
            if hdu is None:
                idx = next((i for i, h in enumerate(hdul) if getattr(h, "data", None) is not None
                            and getattr(h, "is_image", False)), None)
                if idx is None:
                    raise InputError(path, "holds no image HDU")
            else:
                idx = hdu
                if not 0 <= idx < len(hdul):
                    raise InputError(path, f"has {len(hdul)} HDU(s), --hdu {idx} does not exist")
            h = hdul[idx]
            if h.data is None or not getattr(h, "is_image", False):
                raise InputError(path, f"HDU {idx} holds no image")
            data = np.asarray(h.data, dtype=np.float64)
            header = h.header.copy()
            band = next((str(x.header[k]).strip() for x in (h, hdul[0]) for k in ("FILTER", "BAND")
                         if str(x.header.get(k, "")).strip()), None)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(path, f"cannot read FITS: no such file ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001 - astropy raises OSError, TypeError, VerifyWarning... on bad files
        raise InputError(path, f"cannot read FITS: not a readable FITS file (corrupt or truncated?): "
                               f"{type(exc).__name__}: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)  # harmless fixes (DATE-OBS, MJD-OBS, ...)
            wcs = WCS(header)
    except Exception as exc:  # noqa: BLE001 - astropy raises many kinds for broken headers
        raise InputError(path, f"HDU {idx}: unreadable WCS ({exc})") from exc
    if not wcs.has_celestial or wcs.wcs.ctype[0] == "":
        raise InputError(path, f"HDU {idx} has no celestial WCS (RA/Dec CTYPE/CRVAL/CD keywords); "
                               f"cannot place the image on the sky")
    wcs = wcs.celestial
    planes = None
    if data.ndim == 2:
        if band_index not in (None, [0]):
            raise InputError(path, f"is a 2-D image; --band-index {band_index} does not apply")
        data = data[None]
    elif data.ndim == 3:
        planes = band_index if band_index is not None else _default_planes(data.shape[0], bands_low, path)
        bad = [k for k in planes if not 0 <= k < data.shape[0]]
        if bad:
            raise InputError(path, f"cube has {data.shape[0]} planes, --band-index {bad} is out of range")
        data = data[planes]
    else:
        raise InputError(path, f"HDU {idx} has shape {data.shape}; expected a 2-D image or a (planes, y, x) cube")
    if not np.isfinite(data).any():
        raise InputError(path, f"HDU {idx} has no finite pixels (all NaN/inf)")
    return data, wcs, header, {"hdu": idx, "planes": planes, "band": band}


def read_psf_planes(path: str, *, planes: list[int] | None, n_bands: int) -> np.ndarray:
    """PSF image(s) from FITS: ``(n, n)`` or the cube planes matching the image's, as ``(C, n, n)``,
    each checked as ``galgan deblend`` checks its PSF (:func:`galgan_ray.survey.check_psf`: trimmed to
    odd and square, negative wings clipped, re-centred or refused when off-centre)."""
    from ..survey import check_psf  # here: it imports the field pipeline

    stack = _read_psf_stack(path, planes=planes, n_bands=n_bands)
    return np.stack([check_psf(p, source=path) for p in stack])


def _read_psf_stack(path: str, *, planes: list[int] | None, n_bands: int) -> np.ndarray:
    try:
        with _strict_fits(), fits.open(path) as hdul:
            data = next((np.asarray(h.data, dtype=np.float64) for h in hdul if getattr(h, "data", None) is not None
                         and getattr(h, "is_image", False)), None)
    except FileNotFoundError as exc:
        raise InputError(path, f"cannot read FITS: no such file ({exc.strerror})") from None
    except Exception as exc:  # noqa: BLE001
        raise InputError(path, f"cannot read FITS: not a readable FITS file (corrupt or truncated?): "
                               f"{type(exc).__name__}: {exc}") from None
    if data is None:
        raise InputError(path, "holds no PSF image")
    if not np.all(np.isfinite(data)):
        raise InputError(path, f"PSF has {int((~np.isfinite(data)).sum())} non-finite (NaN/inf) pixel(s)")
    if data.ndim == 2:
        return np.broadcast_to(data, (n_bands, *data.shape)).copy()
    if data.ndim == 3:
        if planes is None:
            if data.shape[0] != n_bands:
                raise InputError(path, f"PSF cube has {data.shape[0]} planes for a {n_bands}-band 2-D image")
            return data
        bad = [k for k in planes if not 0 <= k < data.shape[0]]
        if bad:
            raise InputError(path, f"PSF cube has {data.shape[0]} planes, plane(s) {bad} requested")
        return data[planes]
    raise InputError(path, f"PSF has shape {data.shape}; expected 2-D or a cube")


def _support_text(sup: dict | None) -> str:
    if sup is None:
        return "no support gate (the model's output everywhere)"
    return (f"enhanced where the data detect a source: {sup['n_regions']} region(s), "
            f"{100 * sup['fraction_supported']:.1f}% of the image (S/N >= {sup['detect_snr']:g}); "
            f"bicubic-upsampled data elsewhere")


def add_support_cards(hdr, sup: dict | None) -> None:
    """The support gate's FITS keywords (``galgan enhance`` and ``galgan deblend --enhanced``): ``GGSUPP``
    and, when gated, ``GGSUPSN``, ``GGSUPGR``, ``GGSUPFR`` (fraction enhanced), ``GGSUPNR`` (regions)."""
    hdr["GGSUPP"] = (sup is not None, "output gated by the LR data's support")
    if sup is not None:
        hdr["GGSUPSN"] = (sup["detect_snr"], "support: matched-filter S/N of a detected peak")
        hdr["GGSUPGR"] = (sup["grow_snr"], "support: isophote S/N a region is grown to")
        hdr["GGSUPFR"] = (round(sup["fraction_supported"], 5), "fraction of the image enhanced")
        hdr["GGSUPNR"] = (sup["n_regions"], "regions the LR data detect")


def write_enhanced(path: str, image_hr: np.ndarray, wcs_hr, *, info: dict, header_in=None,
                   source: str = "", planes: list[int] | None = None) -> None:
    """Write the enhanced image with its WCS, the input's BUNIT and provenance keywords (overwrites)."""
    hdr = wcs_hr.to_header()
    if header_in is not None and "BUNIT" in header_in:
        hdr["BUNIT"] = (header_in["BUNIT"], "copied from the input (per output pixel)")
    hdr["GGVERS"] = (__version__, "galgan-ray version")
    hdr["GGMODEL"] = (os.path.basename(info["checkpoint"]), "SR checkpoint file")
    if info.get("sha256"):
        hdr["GGSHA256"] = (str(info["sha256"])[:16], "checkpoint SHA-256 (first 16 hex)")
    hdr["GGBNDLO"] = (",".join(info["bands_low"]), "model input bands")
    hdr["GGBNDHI"] = (",".join(info["bands_high"]), "model output bands")
    hdr["GGSCLIN"] = (round(info["pixel_scale_in_arcsec"], 6), "[arcsec] input pixel scale")
    hdr["GGSCLLR"] = (info["pixel_scale_lr_arcsec"], "[arcsec] model input pixel scale")
    hdr["GGSIGSRC"] = (info["sigma_source"], "noise sigma given or estimated")
    hdr["GGOVERLP"] = (info["overlap_px"], "tile overlap (model input px)")
    hdr["GGNTILE"] = (info["n_tiles"], "tiles enhanced")
    for b, (sig, p) in enumerate(zip(info["sigma_lr"], info["psf"])):
        hdr[f"GGSIG{b}"] = (float(sig), f"noise sigma per model-grid px, band {b}")
        hdr[f"GGPSF{b}"] = (p["action"], f"PSF handling, band {b}")
        for key, name, what in (("fwhm_input_arcsec", "GGFWI", "input"), ("fwhm_model_arcsec", "GGFWM", "model"),
                                ("fwhm_matched_arcsec", "GGFWO", "matched")):
            v = p.get(key)
            if v is not None and np.isfinite(v):
                hdr[f"{name}{b}"] = (round(float(v), 4), f"[arcsec] {what} PSF FWHM, band {b}")
    add_support_cards(hdr, info.get("support"))
    hdr.add_history(f"galgan enhance {__version__}: {source}" + (f" planes {planes}" if planes is not None else ""))
    hdr.add_history(f"model {info['checkpoint']} sha256 {info.get('sha256')}")
    hdr.add_history(f"bands {','.join(info['bands_low'])} -> {','.join(info['bands_high'])}, "
                    f"{info['pixel_scale_lr_arcsec']}\"/px -> {info['pixel_scale_hr_arcsec']}\"/px")
    hdr.add_history(f"noise sigma per model-grid px ({info['sigma_source']}): "
                    + ", ".join(f"{s:.6g}" for s in info["sigma_lr"]))
    for p in info["psf"]:
        hdr.add_history(_psf_text(p))
    for w in info["warnings"]:
        hdr.add_history(f"WARNING {w}")
    data = image_hr.astype(np.float32)
    fits.PrimaryHDU(data=data, header=hdr).writeto(path, overwrite=True)


def _psf_text(p: dict) -> str:
    if p["action"] == "no-psf":
        return f"{p['band']}: no PSF given, assumed to match the model's ({p['fwhm_model_arcsec']:.3f}\")"
    if p["action"] == "matched":
        return (f"{p['band']}: PSF matched {p['fwhm_input_arcsec']:.3f}\" -> {p['fwhm_matched_arcsec']:.3f}\" "
                f"(model {p['fwhm_model_arcsec']:.3f}\")")
    if p["action"] == "broader":
        return f"{p['band']}: PSF {p['fwhm_input_arcsec']:.3f}\" broader than the model's {p['fwhm_model_arcsec']:.3f}\""
    return f"{p['band']}: PSF {p['fwhm_input_arcsec']:.3f}\" ~ model {p['fwhm_model_arcsec']:.3f}\", used as is"


# ----------------------------------------------------------------------------------------------
# Command
# ----------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    # Imported here: galgan_ray.enhance pulls in scipy.signal (~0.5 s), and every `galgan` command imports
    # this module to register itself.
    from ..enhance import Enhancer, enhance_image
    from ..storage import check_writable

    check_writable(args.out, key="--out", folder=False)  # before any work
    enhancer = Enhancer(args.model, device=args.device, precision=args.precision)
    planes_arg = _parse_indices(args.band_index, args.image)
    image, wcs, header, rinfo = read_image(args.image, hdu=args.hdu, band_index=planes_arg,
                                           bands_low=enhancer.bands_low)
    if image.shape[0] != enhancer.n_bands:
        raise InputError(args.image, f"{image.shape[0]} band(s) selected, the model {args.model} takes "
                                     f"{enhancer.n_bands} ({', '.join(enhancer.band_keys_low)})")
    if enhancer.n_bands == 1 and rinfo["planes"] is None:  # as galgan deblend: a g image is not the i model's
        from ..survey import _band_token

        have, want = _band_token(rinfo["band"]), _band_token(enhancer.band_keys_low[0])
        if have and want and have != want:
            raise InputError(args.image, f"is band {rinfo['band']!r} ({have}); the model {args.model} takes "
                                         f"{enhancer.band_keys_low[0]!r} ({want}): give an image of band {want}, "
                                         f"or a model of band {have}")
    psf = None
    if args.psf:
        psf = read_psf_planes(args.psf, planes=rinfo["planes"], n_bands=enhancer.n_bands)
    image_hr, wcs_hr, info = enhance_image(
        image if enhancer.n_bands > 1 else image[0], wcs, enhancer=enhancer, sigma=args.sigma, psf=psf,
        psf_pixel_scale_arcsec=args.psf_pixel_scale, overlap_px=args.overlap,
        surface_brightness=args.surface_brightness, source=args.image,
        support=None if args.no_support_gate else SupportConfig(detect_snr=args.support_snr,
                                                                grow_snr=min(SupportConfig.grow_snr, args.support_snr)))
    write_enhanced(args.out, image_hr, wcs_hr, info=info, header_in=header, source=args.image,
                   planes=rinfo["planes"])
    ny, nx = image.shape[1:]
    psf_txt = "; ".join(_psf_text(p) for p in info["psf"])
    print(f"{args.image} ({nx}x{ny} @ {info['pixel_scale_in_arcsec']:.3f}\"/px) -> {args.out} "
          f"({info['shape_hr'][1]}x{info['shape_hr'][0]} @ {info['pixel_scale_hr_arcsec']}\"/px, "
          f"{','.join(info['bands_high'])}); sigma {info['sigma_source']} "
          f"{', '.join(f'{s:.4g}' for s in info['sigma_lr'])}; {psf_txt}; {info['n_tiles']} tiles; "
          f"{_support_text(info.get('support'))}")
    for w in info["warnings"]:
        print(f"galgan enhance: warning: {w}", file=sys.stderr)
    return 0
