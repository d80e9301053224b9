"""Survey images as surveys deliver them, brought onto a model's grid: the input of ``galgan deblend``.

:func:`read_survey_image` takes one FITS file as downloaded (gzip included):

- an HSC-SSP data-access cutout or coadd patch: an empty primary HDU, then image, mask and variance
  HDUs (named by ``EXTNAME`` or ``EXTTYPE``, else in that order), the flux unit from ``BUNIT`` or
  ``FLUXMAG0`` (counts of a magnitude-0 source: one count is ``3631e9 / FLUXMAG0`` nJy, 57.5 nJy for
  HSC's zero point 27), mask planes from the mask header's ``MP_*`` keywords (the unusable ones,
  :data:`BAD_MASK_PLANES`, mask pixels; :data:`MASK_PLANE_FLAGS` map SAT, BRIGHT_OBJECT, NO_DATA, ...
  to the catalog's flags);
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
:class:`~galgan_ray.tiles.Tile` the field pipeline processes as any other; it carries the pixel flags
of the mask planes and the input's WCS, in whose pixels the catalog reports positions. Several
images of one patch (its bands) become one tile on one grid.

:func:`read_survey_patch` is the field job's reader of one patch of files (grouped by
:func:`galgan_ray.tiles.list_tile_sources`): it takes the model's bands from it and calls the two
functions above, as ``galgan deblend`` does for one file.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from reproject import reproject_exact
from scipy import ndimage

from .checkpoint import ModelGrid
from .detect import DetectConfig
from .enhance import (PIXEL_SCALE_MAX_RATIO, Enhancer, _lr_grid, _plan_psf, _psf_axes, _psf_on_lr_grid, _to_lr_grid,
                      estimate_noise_sigma)
from .errors import InputError
from .flags import flag_bit
from .field.footprints import FootprintConfig, coadd_detection_image, plain_detections
from .geometry import pixel_scale_of
from .matching import match_peaks
from .psf import draw_psf, measure_fwhm, normalize_psf
from .sky_plane import convolve_keeping_sky, fit_sky_plane
from .tiles import Tile, normalize_band, parse_patch_source, read_url_bytes

__all__ = ["SurveyImage", "read_survey_image", "read_psf", "check_psf", "to_model_tile", "read_survey_patch",
           "patch_tile_id", "native_detections", "BAD_MASK_PLANES", "MASK_PLANE_FLAGS", "AB_NJY"]

#: The smallest side (model LR pixels, ~2.9") of an image :func:`to_model_tile` takes: below it there is no
#: room to measure a sky and a noise beside the sources (the plain detection's meshes are 2" wide).
MIN_TILE_PX = 16
#: One AB magnitude-0 source in nJy.
AB_NJY = 3631e9
#: Mask planes (HSC / Rubin names) whose pixels are not used (CR and INTRP on a coadd only record that
#: some input visit was affected there: 15-25% of a deep cutout; the pixels are good).
BAD_MASK_PLANES = ("NO_DATA", "BAD", "SAT", "SUSPECT", "UNMASKEDNAN", "EDGE")
#: Mask planes (HSC / Rubin names) -> the flag of :data:`galgan_ray.flags.FLAGS` a footprint holding
#: such pixels passes to its children (:attr:`SurveyImage.pixel_flags`). The unusable planes above
#: also make the footprint ``MASKED``; ``BRIGHT_OBJECT`` (HSC's bright-star mask) and ``SPIKE``
#: (Rubin's diffraction spikes) leave the pixels usable. Other planes (CR, INTRP, CLIPPED, REJECTED,
#: INEXACT_PSF, SENSOR_EDGE, DETECTED, ...) only record how the coadd was made.
MASK_PLANE_FLAGS: dict[str, str] = {"SAT": "SATURATED", "SUSPECT": "SATURATED", "BRIGHT_OBJECT": "BRIGHT_OBJECT",
                                    "SPIKE": "BRIGHT_OBJECT", "NO_DATA": "NO_DATA", "UNMASKEDNAN": "NO_DATA"}
#: The flags :func:`to_model_tile` carries to the model's grid (those of :data:`MASK_PLANE_FLAGS`).
_CARRIED_FLAGS = tuple(dict.fromkeys(MASK_PLANE_FLAGS.values()))
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
    pixel_flags : numpy.ndarray
        int64 ``(H, W)``: the :data:`MASK_PLANE_FLAGS` of each pixel as :data:`galgan_ray.flags.FLAGS` bits.
    band : str or None
        The filter as the file names it (``FILTER``/``BAND`` keyword, e.g. ``i`` or ``HSC-I``).
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
    pixel_flags: np.ndarray | None = None
    band: str | None = None

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


def _open_fits(path: str, data: bytes | None):
    """``fits.open`` of a path, or of the bytes of the file at ``path`` (gzip included)."""
    if data is None:
        return fits.open(path)
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return fits.open(io.BytesIO(data))


def read_psf(path: str, *, hdu: int | None = None, data: bytes | None = None) -> np.ndarray:
    """A PSF image from FITS (the first 2-D HDU, or ``hdu``): checked by :func:`check_psf`. ``data``: the
    file's bytes (read from ``path`` when None)."""
    try:
        with _open_fits(path, data) as hdul:
            cands = [h for h in hdul if getattr(h, "data", None) is not None and np.ndim(h.data) == 2]
            if hdu is not None:
                cands = [hdul[hdu]]
            if not cands:
                shapes = [np.shape(h.data) for h in hdul if getattr(h, "data", None) is not None]
                raise InputError(path, f"holds no 2-D PSF image (its HDUs hold data of shapes {shapes})")
            data = np.asarray(cands[0].data, dtype=np.float64)
    except InputError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"cannot be read as FITS ({exc})") from None
    return check_psf(data, source=path)


def check_psf(psf: np.ndarray, *, source: str, max_offset_px: float = 0.25) -> np.ndarray:
    """A usable PSF: finite, odd and square after trimming, negative wings clipped to 0, unit sum, and
    centred (its centroid within ``max_offset_px`` of the central pixel; a larger offset is shifted
    out: its whole pixels exactly, what remains by sub-pixel interpolation)."""
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
    around = np.hypot(yy - py, xx - px) <= max(3.0, n / 6.0)  # the centroid in a window about the peak
    iy, ix = (int(round(float((p * around * v).sum() / (p * around).sum()) - c)) for v in (yy, xx))
    if math.hypot(dy, dx) > max_offset_px and (iy or ix):  # whole pixels moved back exactly, not interpolated
        q = np.zeros_like(p)
        q[max(-iy, 0):n - max(iy, 0), max(-ix, 0):n - max(ix, 0)] = p[max(iy, 0):n - max(-iy, 0),
                                                                      max(ix, 0):n - max(-ix, 0)]
        p = q / q.sum()
        dy, dx = offset(p)
    for _ in range(4):  # the centroid is taken in a window around the centre: iterate the shift out
        if math.hypot(dx, dy) <= (max_offset_px if _ == 0 else 0.02):
            break
        p = np.clip(ndimage.shift(p, (-dy, -dx), order=3, mode="constant"), 0.0, None)
        p /= p.sum()
        dy, dx = offset(p)
    return p


def read_survey_image(path: str, *, psf: str | np.ndarray | None = None, psf_pixel_scale_arcsec: float | None = None,
                      data: bytes | None = None) -> SurveyImage:
    """Read one survey image as downloaded (module docstring). Errors name the file and the problem.
    ``data``: the file's bytes (read from ``path`` when None: a local path)."""
    try:
        hdul = _open_fits(path, data)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(path, f"cannot be read as FITS ({exc})") from None
    with hdul, warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*truncated.*")  # astropy only warns otherwise
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
            band = next((str(h[k]).strip() for h in (img_hdu.header, hdus[0].header) for k in ("FILTER", "BAND")
                         if str(h.get(k, "")).strip()), None)
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
        except Warning as exc:
            raise InputError(path, f"is truncated ({exc})") from None
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
    pixel_flags = np.zeros(data.shape, np.int64)
    for name, flag in MASK_PLANE_FLAGS.items():
        if name in planes:
            pixel_flags |= np.where((mask >> planes[name]) & 1, np.int64(flag_bit(flag)), np.int64(0))
    pixel_flags |= np.where(~np.isfinite(data), np.int64(flag_bit("NO_DATA")), np.int64(0))
    scale_psf = float(psf_pixel_scale_arcsec or pixel_scale_of(wcs))
    return SurveyImage(image=image, variance=variance, bad=bad, mask=mask, mask_planes=planes, wcs=wcs,
                       psf=psf_img, psf_pixel_scale_arcsec=scale_psf, unit_to_njy=float(factor),
                       unit_source=unit_source, source=path, pixel_flags=pixel_flags, band=band)


class _GridPlanner:
    """What :func:`galgan_ray.enhance._plan_psf` reads of an :class:`~galgan_ray.enhance.Enhancer`, from a
    :class:`~galgan_ray.checkpoint.ModelGrid` alone (the field job's readers hold no model)."""

    def __init__(self, grid: ModelGrid):
        self.grid = grid
        self.bands_low = grid.low
        self.pixel_scale_low_arcsec = float(grid.low[0].pixel_scale_arcsec)

    def psf_fwhm_low_arcsec(self, band: int = 0) -> float:
        return float(measure_fwhm(self.grid.psf_low(band), pixel_scale_arcsec=self.pixel_scale_low_arcsec))


def to_model_tile(images: SurveyImage | Sequence[SurveyImage], *, enhancer: Enhancer | None = None,
                  model: ModelGrid | None = None, tile_id: int = 0, source: str | None = None,
                  footprints: FootprintConfig | None = None, detect: DetectConfig | None = None
                  ) -> tuple[Tile, dict[str, Any]]:
    """Survey images on the model's LR grid, PSF-matched, as one :class:`Tile` (module docstring).

    Parameters
    ----------
    images : SurveyImage or sequence of SurveyImage
        One image per band of the model, in the model's band order (the bands of one patch: they share
        the sky; the grid is made from the first one's WCS).
    enhancer : Enhancer, optional
    model : ModelGrid, optional
        The model's grids (one of ``enhancer`` and ``model`` is needed).
    tile_id : int
    source : str, optional
        The tile's source (default: the first image's).
    footprints, detect : FootprintConfig, DetectConfig, optional
        The plain detection's settings (the field config's; default: the defaults), for
        :attr:`Tile.detections` (:func:`native_detections`).

    Returns
    -------
    tile : Tile
        ``mask`` marks the unusable pixels per band, ``pixel_flags`` the :data:`MASK_PLANE_FLAGS` (OR of
        the bands), ``detections`` the plain detection of the images as delivered.
    info : dict
        ``psf`` (the first band's PSF plan: action, FWHMs), ``warnings``, ``sigma_lr`` (measured), ``wcs_lr``,
        ``unit``, ``pixel_scale_in_arcsec``, ``shape_lr``, ``bad_fraction``, and ``bands`` (one dict of
        ``psf``, ``sigma_lr``, ``unit``, ``source`` per band).
    """
    if model is None and enhancer is None:
        raise TypeError("to_model_tile needs an enhancer or a model grid")
    grid: ModelGrid = model if model is not None else enhancer.grid
    planner = enhancer if enhancer is not None else _GridPlanner(grid)
    ims = [images] if isinstance(images, SurveyImage) else list(images)
    # the sky's clipped plane (level and gradient) out first, on the file's own pixels: every step after
    # (resampling, PSF matching, the noise estimate, the plain detection, the background) then sees the
    # same pixels whatever residual plane the coadd's sky subtraction left (the mesh background removes
    # the rest of the sky as before)
    ims = [replace(si, image=np.where(si.bad, 0.0, si.image - fit_sky_plane(si.image, ~si.bad, level=True)))
           for si in ims]
    if len(ims) != len(grid.low):
        what = "one image holds one band" if len(ims) == 1 else f"{len(ims)} images"
        raise InputError(ims[0].source, f"{what}; the model takes {len(grid.low)} "
                                        f"({', '.join(grid.band_keys_low)})")
    for si, key in zip(ims, grid.band_keys_low):  # g fluxes written as the model's i would be silently wrong
        have, want = _band_token(si.band), _band_token(key)
        if have and want and have != want:
            raise InputError(si.source, f"is band {si.band!r} ({have}); the model takes {key!r} ({want}): its "
                                        f"fluxes would be written as {want}'s (give an image of band {want}, or a "
                                        f"model of band {have})")
    s_lr = float(grid.low[0].pixel_scale_arcsec)
    for si in ims:  # a WCS in the wrong units (CD in arcsec read as degrees) would ask for a grid of millions of px
        if not (np.isfinite(si.pixel_scale_arcsec)
                and s_lr / PIXEL_SCALE_MAX_RATIO <= si.pixel_scale_arcsec <= s_lr * PIXEL_SCALE_MAX_RATIO):
            raise InputError(si.source, f"wrong pixel scale for the model: the WCS gives "
                                        f"{si.pixel_scale_arcsec:.4g}\"/px, more than {PIXEL_SCALE_MAX_RATIO:g}x from "
                                        f"the model's {s_lr}\"/px input (CD/CDELT in the wrong units?)")
    first = ims[0]
    wcs_lr = _lr_grid(first.wcs, first.image.shape, s_lr)
    shape_lr = (int(wcs_lr.pixel_shape[1]), int(wcs_lr.pixel_shape[0]))
    if min(shape_lr) < MIN_TILE_PX:
        raise InputError(first.source, f"is {shape_lr[1]}x{shape_lr[0]} px on the model's {s_lr}\"/px grid, smaller "
                                       f"than {MIN_TILE_PX} px a side: too small to measure its sky and noise")
    planes, variances, masks, per_band = [], [], [], []
    pixel_flags = np.zeros(shape_lr, np.int64)
    warnings_: list[str] = []
    for b, si in enumerate(ims):
        lr, foot = _to_lr_grid(si.image[None], si.wcs, wcs_lr, shape_lr, surface_brightness=False)
        # the unusable pixels and each carried flag, resampled together: a model pixel any of them overlaps
        flags_in = si.pixel_flags if si.pixel_flags is not None else np.zeros(si.image.shape, np.int64)
        carried = [f for f in _CARRIED_FLAGS if np.any(flags_in & flag_bit(f))]
        stack = np.stack([si.bad] + [(flags_in & flag_bit(f)) != 0 for f in carried]).astype(np.float64)
        over, _ = reproject_exact((stack, si.wcs), wcs_lr, shape_out=(len(stack), *shape_lr))
        over = np.asarray(over)
        bad_lr = (np.nan_to_num(over[0], nan=1.0) > 1e-3) | (foot <= 0.999)
        over = np.nan_to_num(over, nan=0.0) > 1e-3
        flag_lr = over[1:]
        plan, kernel, msg = _plan_psf(si.psf, scale_psf=si.psf_pixel_scale_arcsec, enhancer=planner, band=b,
                                      source=f"{si.source} PSF", axes=_psf_axes(si.wcs, si.image.shape, wcs_lr))
        if plan.action == "no-psf":
            warnings_.append(f"{si.source}: no PSF given: the image is taken to have the model's PSF")
        if plan.action == "broader":  # every row of the tile says so (PSF_BROADER), not only this warning
            pixel_flags |= np.int64(flag_bit("PSF_BROADER"))
        if msg:
            warnings_.append(msg)
        img = lr[0]
        if kernel is not None:
            img = convolve_keeping_sky(img, kernel, ~bad_lr)
            grow = max((kernel.shape[0] // 2) // 2, 1)
            bad_lr = ndimage.binary_dilation(bad_lr, iterations=grow)  # matched pixels near holes
            flag_lr = np.stack([ndimage.binary_dilation(f, iterations=grow) for f in flag_lr]) if len(flag_lr) \
                else flag_lr
        for f, plane in zip(carried, flag_lr):
            pixel_flags |= np.where(plane, np.int64(flag_bit(f)), np.int64(0))
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
        if (bad_lr | ~np.isfinite(var)).all():
            raise InputError(si.source, "has no usable pixels on the model's grid")
        planes.append(np.where(bad_lr, 0.0, img))
        variances.append(var)
        masks.append(bad_lr)
        per_band.append({"source": si.source, "band": si.band, "unit": si.unit_source, "sigma_lr": float(sigma),
                         "psf": {"action": plan.action, "fwhm_input_arcsec": plan.fwhm_input_arcsec,
                                 "fwhm_model_arcsec": plan.fwhm_model_arcsec,
                                 "fwhm_matched_arcsec": plan.fwhm_matched_arcsec}})
    psf_lr = np.stack([np.asarray(draw_psf(grid.low[b].psf, pixel_scale_arcsec=s_lr, size=27), dtype=np.float64)
                       for b in range(len(ims))])
    ny, nx = shape_lr
    mask = np.stack(masks)
    tile = Tile(tile_id=int(tile_id), source=source or first.source, image=np.stack(planes).astype(np.float32),
                variance=np.stack(variances).astype(np.float32), mask=mask.astype(np.int32), psf=psf_lr,
                wcs_header=wcs_lr.to_header(relax=True).tostring(), bands=tuple(grid.band_keys_low),
                inner=(-0.5, nx - 0.5, -0.5, ny - 0.5), pixel_flags=pixel_flags if pixel_flags.any() else None,
                input_wcs_header=first.wcs.to_header(relax=True).tostring(),
                detections=native_detections(ims, wcs_lr, grid=grid, footprints=footprints or FootprintConfig(),
                                             detect=detect or DetectConfig()))
    info = {"psf": per_band[0]["psf"], "warnings": warnings_, "sigma_lr": per_band[0]["sigma_lr"], "wcs_lr": wcs_lr,
            "unit": per_band[0]["unit"], "pixel_scale_in_arcsec": first.pixel_scale_arcsec, "shape_lr": shape_lr,
            "bad_fraction": float(mask.all(axis=0).mean()), "bands": per_band}
    return tile, info


def _band_token(name: str | None) -> str:
    """A survey band a name or FILTER value says (``HSC-G`` -> ``g``, Rubin's ``i_39`` -> ``i``), or ``""``
    when it names none this rule knows (then nothing is checked against it)."""
    token = normalize_band(name).split("_")[0]
    return token if re.fullmatch(r"[ugrizy]|nb?\d{3,4}", token) else ""


def _native_psf(si: SurveyImage, scale: float, grid: ModelGrid, band: int) -> np.ndarray:
    """The PSF of an image at its own pixel scale (the model's, drawn there, when the image has none)."""
    if si.psf is None:
        fwhm = float(measure_fwhm(grid.psf_low(band), pixel_scale_arcsec=float(grid.low[band].pixel_scale_arcsec)))
        return np.asarray(draw_psf(grid.low[band].psf, pixel_scale_arcsec=scale,
                                   size=max(int(math.ceil(6.0 * fwhm / scale)) | 1, 15)), dtype=np.float64)
    psf = normalize_psf(np.asarray(si.psf, dtype=np.float64), source=f"{si.source} PSF")
    if abs(si.psf_pixel_scale_arcsec / scale - 1.0) <= 1e-3:
        return psf
    size = max(int(math.ceil(psf.shape[0] * si.psf_pixel_scale_arcsec / scale)) | 1, 15)
    return _psf_on_lr_grid(psf, si.psf_pixel_scale_arcsec, scale, size)


def native_detections(images: Sequence[SurveyImage], wcs_lr: WCS, *, grid: ModelGrid, footprints: FootprintConfig,
                      detect: DetectConfig) -> np.ndarray:
    """``(D, 2)`` positions on the model's LR grid ``wcs_lr`` of the plain detection of ``images`` as
    delivered: on their own pixels, with their own PSF (:attr:`Tile.detections`).

    :func:`galgan_ray.field.footprints.plain_detections` (the field's plain detection, the real-sky
    benchmark's detector) on the inverse-variance coadd of the bands when they share one pixel grid
    (the bands of a patch), else on each band, a detection farther than half the PSF's FWHM from every
    earlier band's added. A survey's own catalog of the image is made on these pixels: resampling and
    PSF-matching to the model's grid correlate the noise and change what SExtractor's deblending
    splits, so a detection of the tile would be a different catalog. Positions go through RA/Dec.
    """
    ims = list(images)
    ref = ims[0]
    same = all(si.image.shape == ref.image.shape and si.wcs.wcs.compare(ref.wcs.wcs, tolerance=1e-9) for si in ims)
    groups = [list(range(len(ims)))] if same else [[b] for b in range(len(ims))]
    out = np.zeros((0, 2))
    for g in groups:
        w0 = ims[g[0]].wcs
        scale = float(pixel_scale_of(w0))
        planes = np.stack([np.where(ims[b].bad, 0.0, ims[b].image) for b in g])
        var = []
        for b in g:  # the coadd's weights (one band: only where it is usable matters)
            si = ims[b]
            if si.variance is not None:
                v = np.asarray(si.variance, dtype=np.float64)
            else:
                v = np.full(si.image.shape, estimate_noise_sigma(si.image, mask=si.bad) ** 2 if len(g) > 1 else 1.0)
            var.append(np.where(si.bad | ~(v > 0), np.inf, v))
        det, dvar = coadd_detection_image(planes, np.stack(var))
        bad = ~np.isfinite(dvar)
        psfs = [_native_psf(ims[b], scale, grid, b) for b in g]
        n = max(p.shape[0] for p in psfs)
        psf = np.mean([np.pad(p, (n - p.shape[0]) // 2) for p in psfs], axis=0)
        xy = plain_detections(det, bad=bad, psf=psf, detect=detect, cfg=footprints, pixel_scale_arcsec=scale)
        if not len(xy):
            continue
        ra, dec = w0.pixel_to_world_values(xy[:, 0], xy[:, 1])
        x, y = wcs_lr.world_to_pixel_values(ra, dec)
        new = np.column_stack([x, y]).astype(np.float64)
        if len(out):
            radius = 0.5 * float(measure_fwhm(psf, pixel_scale_arcsec=scale)) / float(pixel_scale_of(wcs_lr))
            new = new[~match_peaks(out, new, radius_px=max(radius, 1e-3))["peak_matched"]]
        out = np.vstack([out, new])
    return out


def patch_tile_id(key: str) -> int:
    """The ``tileId`` of a survey patch: 36 bits of the SHA-1 of its key (:func:`galgan_ray.tiles.patch_source`),
    the same on every run and worker (object ids are ``tileId << 24 | n``)."""
    return int(hashlib.sha1(key.encode()).hexdigest()[:9], 16)


def read_survey_patch(source: str, *, model: ModelGrid, storage_options: Mapping | None = None,
                      footprints: FootprintConfig | None = None, detect: DetectConfig | None = None
                      ) -> tuple[Tile, dict[str, Any]]:
    """One survey patch (a :func:`galgan_ray.tiles.patch_source`: its bands' images and PSF files) as the
    model's tile, through :func:`read_survey_image` and :func:`to_model_tile` (``galgan deblend``'s path).

    The model's bands are taken from the patch by name (``hsc_udeep/i`` takes the patch's ``i``,
    ``HSC-I`` or ``i`` as the file names it); a patch of one band of unknown name serves a one-band
    model. A band the model does not take is left out (``info["unused_bands"]``).

    Raises
    ------
    InputError
        Naming the patch or the file: a band the model takes is missing, an image has no PSF (no PSF
        file by the naming rule, no PSF HDU), or any problem of the files themselves.
    """
    key, files = parse_patch_source(source)
    want = [normalize_band(k) for k in model.band_keys_low]
    if len(files) == 1 and len(want) == 1 and "" in files:
        files = {want[0]: files[""]}
    missing = [b for b in want if b not in files]
    if missing:
        raise InputError(key, f"the model takes band(s) {want}; the patch has {sorted(files)} "
                              f"(missing {missing})")
    images = []
    for b in want:
        img_url, psf_url = files[b]
        opts = dict(storage_options or {})
        psf = read_psf(psf_url, data=read_url_bytes(psf_url, storage_options=opts)) if psf_url else None
        si = read_survey_image(img_url, psf=psf, data=read_url_bytes(img_url, storage_options=opts))
        if si.psf is None:
            raise InputError(img_url, "has no PSF: no PSF file beside it by the naming rule (a name with a 'psf' "
                                      "token, the same band and first token) and no PSF HDU")
        images.append(si)
    tile, info = to_model_tile(images, model=model, tile_id=patch_tile_id(key), source=source,
                               footprints=footprints, detect=detect)
    info["unused_bands"] = sorted(set(files) - set(want))
    info["patch"] = key
    return tile, info
