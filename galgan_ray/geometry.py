"""Pixel grids and WCS of cutouts: the high- and low-resolution grids share one centre.

Conventions (used everywhere in galgan_ray):
- pixel coordinates are 0-based (numpy, sep); the centre of pixel (i, j) is at x=j, y=i;
- a cutout of shape (n, n) is centred at ((n-1)/2, (n-1)/2), on the same sky point in every
  resolution; FITS headers written by the package carry 1-based CRPIX as FITS requires;
- the low-resolution cutout of an (n, n) high-resolution cutout has side
  ``ceil(n * scale_high / scale_low)`` (64 px at 0.06"/px -> 22 px at 0.18"/px), so it covers the
  high-resolution cutout entirely.
"""
from __future__ import annotations

import math

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

from .errors import InputError

__all__ = ["make_tan_wcs", "low_res_side", "hr_to_lr_pixels", "lr_to_hr_pixels", "hr_to_block_pixels",
           "block_summed_wcs", "extract_box", "pixel_scale_of"]


def make_tan_wcs(ra_deg: float, dec_deg: float, *, pixel_scale_arcsec: float, shape: tuple[int, int]) -> WCS:
    """A north-up, east-left TAN WCS with the sky point (ra, dec) at the centre of an image of ``shape``."""
    ny, nx = shape
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [float(ra_deg), float(dec_deg)]
    w.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]  # FITS 1-based centre == 0-based (nx-1)/2
    s = pixel_scale_arcsec / 3600.0
    w.wcs.cd = np.array([[-s, 0.0], [0.0, s]])
    w.wcs.cunit = ["deg", "deg"]
    w.wcs.radesys = "ICRS"
    w.pixel_shape = (nx, ny)
    return w


def low_res_side(n_high: int, *, scale_high_arcsec: float, scale_low_arcsec: float) -> int:
    """Side of the low-resolution cutout that covers an ``n_high`` high-resolution cutout."""
    return int(math.ceil(n_high * scale_high_arcsec / scale_low_arcsec - 1e-9))


def hr_to_lr_pixels(x, y, *, n_high: int, n_low: int, ratio: float):
    """0-based high-res pixel coordinates -> low-res ones for co-centred cutouts (ratio = scale_low/scale_high)."""
    c_h, c_l = (n_high - 1) / 2.0, (n_low - 1) / 2.0
    return (np.asarray(x) - c_h) / ratio + c_l, (np.asarray(y) - c_h) / ratio + c_l


def lr_to_hr_pixels(x, y, *, n_high: int, n_low: int, ratio: float):
    """Inverse of :func:`hr_to_lr_pixels`."""
    c_h, c_l = (n_high - 1) / 2.0, (n_low - 1) / 2.0
    return (np.asarray(x) - c_l) * ratio + c_h, (np.asarray(y) - c_l) * ratio + c_h


def hr_to_block_pixels(v, *, factor: int):
    """0-based positions on a fine grid -> the grid of its ``factor x factor`` block sums.

    Block pixel J covers fine pixels ``factor*J .. factor*J + factor - 1`` (tiles degraded by
    :func:`galgan_ray.degrade.degrade_tile`), so its centre is fine position ``factor*J + (factor-1)/2``.
    """
    r = int(factor)
    return (np.asarray(v, dtype=np.float64) - (r - 1) / 2.0) / r


def block_summed_wcs(wcs_header: str, factor: int, *, source: str = "wcs") -> str:
    """The WCS (header text) of the ``factor x factor`` block-summed grid of an image: the same
    projection, pixel centres at block centres (:func:`hr_to_block_pixels`)."""
    r = int(factor)
    w = WCS(fits.Header.fromstring(wcs_header)).celestial.deepcopy()
    if w.sip is not None:
        raise InputError(source, "images with SIP distortion cannot be block-summed")
    crpix0 = np.asarray(w.wcs.crpix, dtype=np.float64) - 1.0  # FITS 1-based -> 0-based
    w.wcs.crpix = hr_to_block_pixels(crpix0, factor=r) + 1.0
    if w.wcs.has_cd():
        w.wcs.cd = np.asarray(w.wcs.cd) * r
    else:
        w.wcs.cdelt = np.asarray(w.wcs.cdelt) * r
    if w.pixel_shape is not None:
        w.pixel_shape = tuple(int(s) // r for s in w.pixel_shape)
    return w.to_header(relax=True).tostring()


def extract_box(arr: np.ndarray, x0: int, y0: int, size: int, fill) -> np.ndarray:
    """``arr[..., y0:y0+size, x0:x0+size]`` of any array, with ``fill`` where the box leaves it."""
    h, w = arr.shape[-2:]
    out = np.full(arr.shape[:-2] + (size, size), fill, dtype=arr.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[..., ys - y0:ye - y0, xs - x0:xe - x0] = arr[..., ys:ye, xs:xe]
    return out


def pixel_scale_of(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS in arcsec."""
    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)
