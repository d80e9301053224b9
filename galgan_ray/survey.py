"""Survey images as surveys deliver them, brought onto a model's grid: the input of ``galgan deblend``.

:func:`read_survey_image` takes one FITS file as downloaded (gzip included):

- an HSC-SSP data-access cutout or coadd patch: an empty primary HDU, then image, mask and variance
  HDUs (named by ``EXTNAME`` or ``EXTTYPE``, else in that order), the flux unit from ``BUNIT`` or
  ``FLUXMAG0`` (counts of a magnitude-0 source: one count is ``3631e9 / FLUXMAG0`` nJy, 57.5 nJy for
  HSC's zero point 27), mask planes from the mask header's ``MP_*`` keywords;
- a Rubin ``deep_coadd``-style file (``IMAGE``/``MASK``/``VARIANCE`` HDUs, nJy);
- a plain image with a celestial WCS (no variance: the noise is measured on the image).

A file whose flux unit cannot be known (no ``BUNIT`` it understands, no ``FLUXMAG0``) is refused: a
flux 57x off is worse than an error. The PSF comes from a separate FITS (HSC's PSF picker) or a
``PSF`` HDU; it is checked (finite, centred to 0.25 px or re-centred, negative wings clipped).

:func:`to_model_tile` resamples the image flux-conservingly onto the model's LR grid (north-up TAN,
the model's pixel scale; :func:`galgan_ray.enhance.enhance_image`'s steps 1-2), matches its PSF to the
model's, carries the mask (a model pixel is unusable when any unusable input pixel overlaps it) and
the variance, and scales the variance so that its median is the noise measured on the resampled,
PSF-matched image (which holds the correlation the warping and matching add). The result is a
:class:`~galgan_ray.tiles.Tile` the field pipeline processes as any other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_exact
from scipy import ndimage
from scipy.signal import fftconvolve

from .checkpoint import ModelGrid
from .enhance import Enhancer, _lr_grid, _plan_psf, _to_lr_grid, estimate_noise_sigma
from .errors import InputError
from .geometry import pixel_scale_of
from .psf import draw_psf
from .tiles import Tile

__all__ = ["SurveyImage", "read_survey_image", "read_psf", "to_model_tile", "BAD_MASK_PLANES", "AB_NJY"]

#: One AB magnitude-0 source in nJy.
AB_NJY = 3631e9
#: Mask planes (HSC / Rubin names) whose pixels are not used (CR and INTRP on a coadd only record that
#: some input visit was affected there: 15-25% of a deep cutout; the pixels are good).
BAD_MASK_PLANES = ("NO_DATA", "BAD", "SAT", "SUSPECT", "UNMASKEDNAN", "EDGE")
_NJY_UNITS = {"njy": 1.0, "nanojansky": 1.0, "ujy": 1e3, "microjansky": 1e3, "mjy": 1e6, "jy": 1e9}


@dataclass(frozen=True, eq=False)
class SurveyImage:
    """One survey image, in nJy per pixel, with what the pipeline needs to trust it.

    Attributes
    ----------
    image : numpy.ndarray
        float64 ``(H, W)``, nJy per pixel, 0 where unusable.
    variance : numpy.ndarray or None
        float64 ``(H, W)`` nJy^2 (``inf`` where unusable), or None when the file has none.
    bad : numpy.ndarray
        bool ``(H, W)``: unusable pixels (non-finite, or a mask plane of :data:`BAD_MASK_PLANES`).
    mask : numpy.ndarray
        int32 ``(H, W)``: the file's mask bits (0 without a mask).
    mask_planes : dict of str to int
        Plane name -> bit number, from ``MP_*`` keywords.
    wcs : astropy.wcs.WCS
        Celestial WCS of the image.
    psf : numpy.ndarray or None
        Unit-sum, centred PSF image.
    psf_pixel_scale_arcsec : float
    unit_to_njy : float
        What one file unit is in nJy, and ``unit_source`` where that came from.
    source : str
    """

    image: np.ndarray
    variance: np.ndarray | None
    bad: np.ndarray
    mask: np.ndarray
    mask_planes: dict[str, int]
    wcs: WCS
    psf: np.ndarray | None
    psf_pixel_scale_arcsec: float
    unit_to_njy: float
    unit_source: str
    source: str

    @property
    def pixel_scale_arcsec(self) -> float:
        return float(pixel_scale_of(self.wcs))


def _hdu_kind(hdu) -> str | None:
    for key in ("EXTNAME", "EXTTYPE"):
        v = str(hdu.header.get(key, "")).strip().upper()
        if v in ("IMAGE", "SCI", "MASK", "VARIANCE", "PSF"):
            return "IMAGE" if v == "SCI" else v
    return None


def _unit_factor(headers: list, source: str) -> tuple[float, str]:
    for h in headers:
        bunit = str(h.get("BUNIT", "")).strip()
        if bunit:
            key = bunit.lower().replace(" ", "").split("/")[0]
            if key in _NJY_UNITS:
                return _NJY_UNITS[key], f"BUNIT = {bunit!r}"
    for h in headers:
        if "FLUXMAG0" in h:
            f0 = float(h["FLUXMAG0"])
            if not f0 > 0:
                raise InputError(source, f"FLUXMAG0 = {f0} is not a positive flux")
            return AB_NJY / f0, f"FLUXMAG0 = {f0:.6g} (zero point {2.5 * math.log10(f0):.3f} mag)"
    for h in headers:
        if "MAGZERO" in h or "PHOTZP" in h:
            zp = float(h.get("PHOTZP", h.get("MAGZERO")))
            return 10.0 ** (-0.4 * (zp - 31.4)), f"zero point {zp:.3f} mag"
    raise InputError(source, "the flux unit is unknown: no BUNIT in nJy/uJy/Jy, no FLUXMAG0, no MAGZERO/PHOTZP "
                             "(refusing to guess: an HSC count is 57.5 nJy)")


def _mask_planes(header) -> dict[str, int]:
    return {k[3:]: int(v) for k, v in header.items() if k.startswith("MP_")}


def read_psf(path: str, *, hdu: int | None = None) -> np.ndarray:
    """A PSF image from FITS (the first 2-D HDU, or ``hdu``): checked by :func:`check_psf`."""
    try:
        with fits.open(path) as hdul:
            cands = [h for h in hdul if getattr(h, "data", None) is not None and np.ndim(h.data) == 2]
            if hdu is not None:
                cands = [hdul[hdu]]
            if not cands:
                raise InputError(path, "holds no 2-D PSF image")
            data = np.asarray(cands[0].data, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as FITS ({exc})") from None
    return check_psf(data, source=path)


def check_psf(psf: np.ndarray, *, source: str, max_offset_px: float = 0.25) -> np.ndarray:
    """A usable PSF: finite, odd and square after trimming, negative wings clipped to 0, unit sum, and
    centred (its centroid within ``max_offset_px`` of the central pixel; a larger offset is shifted
    out by sub-pixel interpolation)."""
    p = np.asarray(psf, dtype=np.float64)
    if p.ndim != 2 or min(p.shape) < 3:
        raise InputError(source, f"PSF must be a 2-D image of at least 3x3 px, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise InputError(source, "PSF has non-finite pixels")
    n = min(p.shape) - (1 - min(p.shape) % 2)
    y0, x0 = (p.shape[0] - n) // 2, (p.shape[1] - n) // 2
    p = np.clip(p[y0:y0 + n, x0:x0 + n], 0.0, None)  # negative wings (coadd PSF models have them) clipped
    if not p.sum() > 0:
        raise InputError(source, "PSF has no positive flux")
    p /= p.sum()
    yy, xx = np.mgrid[:n, :n]
    c = (n - 1) / 2.0
    core = np.hypot(yy - c, xx - c) <= max(3.0, n / 6.0)

    def offset(img):
        w = img * core
        return (w * yy).sum() / w.sum() - c, (w * xx).sum() / w.sum() - c

    py, px = np.unravel_index(np.argmax(p), p.shape)
    if max(abs(py - c), abs(px - c)) > n / 4.0:
        raise InputError(source, f"PSF is off-centre: it peaks at pixel ({px}, {py}), "
                                 f"{max(abs(py - c), abs(px - c)):.0f} px from the centre of its {n}x{n} image")
    dy, dx = offset(p)
    for _ in range(4):  # the centroid is taken in a window around the centre: iterate the shift out
        if math.hypot(dx, dy) <= (max_offset_px if _ == 0 else 0.02):
            break
        p = np.clip(ndimage.shift(p, (-dy, -dx), order=3, mode="constant"), 0.0, None)
        p /= p.sum()
        dy, dx = offset(p)
    return p


def read_survey_image(path: str, *, psf: str | np.ndarray | None = None, psf_pixel_scale_arcsec: float | None = None
                      ) -> SurveyImage:
    """Read one survey image as downloaded (module docstring). Errors name the file and the problem."""
    try:
        hdul = fits.open(path)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot be read as FITS ({exc})") from None
    with hdul:
        try:
            hdus = [h for h in hdul]
            kinds = {}
            for i, h in enumerate(hdus):
                k = _hdu_kind(h)
                if k and k not in kinds:
                    kinds[k] = i
            images = [i for i, h in enumerate(hdus) if getattr(h, "data", None) is not None
                      and getattr(h, "is_image", False) and np.ndim(h.data) == 2]
            if not images:
                raise InputError(path, "holds no 2-D image HDU")
            i_img = kinds.get("IMAGE", images[0])
            rest = [i for i in images if i != i_img]
            # unnamed HSC cutouts: image, mask, variance in this order
            i_mask = kinds.get("MASK", next((i for i in rest if np.issubdtype(hdus[i].data.dtype, np.integer)), None))
            i_var = kinds.get("VARIANCE", next((i for i in rest if i != i_mask
                                                and np.issubdtype(hdus[i].data.dtype, np.floating)), None))
            img_hdu = hdus[i_img]
            data = np.asarray(img_hdu.data, dtype=np.float64)
            wcs = WCS(img_hdu.header)
            if not wcs.has_celestial:
                raise InputError(path, "has no celestial WCS (CTYPE/CRVAL/CD keywords) in its image HDU")
            wcs = wcs.celestial
            factor, unit_source = _unit_factor([img_hdu.header, hdus[0].header], path)
            mask = np.zeros(data.shape, np.int32)
            planes: dict[str, int] = {}
            if i_mask is not None:
                mask = np.asarray(hdus[i_mask].data).astype(np.int64).astype(np.int32)
                planes = _mask_planes(hdus[i_mask].header)
                if mask.shape != data.shape:
                    raise InputError(path, f"mask HDU shape {mask.shape} differs from the image's {data.shape}")
            variance = None
            if i_var is not None:
                variance = np.asarray(hdus[i_var].data, dtype=np.float64) * factor**2
                if variance.shape != data.shape:
                    raise InputError(path, f"variance HDU shape {variance.shape} differs from the image's {data.shape}")
            psf_img = None
            if psf is None and "PSF" in kinds:
                psf_img = check_psf(np.asarray(hdus[kinds["PSF"]].data, dtype=np.float64), source=f"{path}[PSF]")
        except InputError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(path, f"is not a readable survey image ({type(exc).__name__}: {exc})") from None
    if isinstance(psf, str):
        psf_img = read_psf(psf)
    elif psf is not None:
        psf_img = check_psf(psf, source=f"{path} PSF")
    bad_bits = 0
    for name in BAD_MASK_PLANES:
        if name in planes:
            bad_bits |= 1 << planes[name]
    if not planes and i_mask is not None:
        bad_bits = -1  # a mask without plane names: any set bit is unusable
    bad = ~np.isfinite(data) | ((mask & bad_bits) != 0)
    if variance is not None:
        bad |= ~(np.isfinite(variance) & (variance > 0))
    if bad.all():
        raise InputError(path, "has no usable pixels (all masked or non-finite)")
    image = np.where(bad, 0.0, data * factor)
    if variance is not None:
        variance = np.where(bad, np.inf, variance)
    scale_psf = float(psf_pixel_scale_arcsec or pixel_scale_of(wcs))
    return SurveyImage(image=image, variance=variance, bad=bad, mask=mask, mask_planes=planes, wcs=wcs,
                       psf=psf_img, psf_pixel_scale_arcsec=scale_psf, unit_to_njy=float(factor),
                       unit_source=unit_source, source=path)


def to_model_tile(si: SurveyImage, *, enhancer: Enhancer, tile_id: int = 0) -> tuple[Tile, dict[str, Any]]:
    """The survey image on the model's LR grid, PSF-matched, as a :class:`Tile` (module docstring).

    Returns
    -------
    tile : Tile
    info : dict
        ``psf`` (the PSF plan: action, FWHMs), ``warnings``, ``sigma_lr`` (measured), ``wcs_lr``.
    """
    grid: ModelGrid = enhancer.grid
    if len(grid.low) != 1:
        raise InputError(si.source, f"one image holds one band; the model takes {len(grid.low)} "
                                    f"({', '.join(grid.band_keys_low)})")
    s_lr = enhancer.pixel_scale_low_arcsec
    wcs_lr = _lr_grid(si.wcs, si.image.shape, s_lr)
    shape_lr = (int(wcs_lr.pixel_shape[1]), int(wcs_lr.pixel_shape[0]))
    lr, foot = _to_lr_grid(si.image[None], si.wcs, wcs_lr, shape_lr, surface_brightness=False)
    bad_lr, _ = reproject_exact((si.bad.astype(np.float64), si.wcs), wcs_lr, shape_out=shape_lr)
    bad_lr = (np.nan_to_num(bad_lr, nan=1.0) > 1e-3) | (foot <= 0.999)
    warnings_: list[str] = []
    plan, kernel, msg = _plan_psf(si.psf, scale_psf=si.psf_pixel_scale_arcsec, enhancer=enhancer, band=0,
                                  source=f"{si.source} PSF")
    if plan.action == "no-psf":
        warnings_.append("no PSF given: the image is taken to have the model's PSF")
    if msg:
        warnings_.append(msg)
    img = lr[0]
    if kernel is not None:
        img = fftconvolve(img, kernel, mode="same")
        half = kernel.shape[0] // 2
        bad_lr = ndimage.binary_dilation(bad_lr, iterations=max(half // 2, 1))  # matched pixels near holes
    sigma = estimate_noise_sigma(img, mask=bad_lr)
    if not sigma > 0:
        raise InputError(si.source, "the noise measured on the image is 0 (a noiseless image?)")
    if si.variance is not None:
        var_in = np.where(si.bad, np.nan, si.variance)
        v, _ = reproject_exact((np.nan_to_num(var_in, nan=0.0), si.wcs), wcs_lr, shape_out=shape_lr)
        v = np.nan_to_num(v, nan=0.0)
        med = np.median(v[~bad_lr & (v > 0)]) if np.any(~bad_lr & (v > 0)) else 0.0
        var = v * (sigma**2 / med) if med > 0 else np.full(shape_lr, sigma**2)
    else:
        var = np.full(shape_lr, sigma**2)
    var = np.where(bad_lr | ~(var > 0), np.inf, var)
    img = np.where(bad_lr, 0.0, img)
    psf_lr = np.asarray(draw_psf(grid.low[0].psf, pixel_scale_arcsec=s_lr, size=27), dtype=np.float64)
    ny, nx = shape_lr
    tile = Tile(tile_id=int(tile_id), source=si.source, image=img[None].astype(np.float32),
                variance=var[None].astype(np.float32), mask=bad_lr[None].astype(np.int32), psf=psf_lr[None],
                wcs_header=wcs_lr.to_header(relax=True).tostring(), bands=tuple(grid.band_keys_low),
                inner=(-0.5, nx - 0.5, -0.5, ny - 0.5))
    info = {"psf": {"action": plan.action, "fwhm_input_arcsec": plan.fwhm_input_arcsec,
                    "fwhm_model_arcsec": plan.fwhm_model_arcsec, "fwhm_matched_arcsec": plan.fwhm_matched_arcsec},
            "warnings": warnings_, "sigma_lr": float(sigma), "wcs_lr": wcs_lr, "unit": si.unit_source,
            "pixel_scale_in_arcsec": si.pixel_scale_arcsec, "shape_lr": shape_lr,
            "bad_fraction": float(bad_lr.mean())}
    return tile, info
