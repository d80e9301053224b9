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
from astropy.wcs import WCS

__all__ = ["make_tan_wcs", "low_res_side", "hr_to_lr_pixels", "lr_to_hr_pixels", "pixel_scale_of"]


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


def pixel_scale_of(wcs: WCS) -> float:
    """Mean pixel scale of a celestial WCS in arcsec."""
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(wcs.celestial)) * 3600.0)
