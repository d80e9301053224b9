"""PSF images: drawn from an analytic profile (GalSim) or read from FITS, and their FWHM measured.

All PSF images here are odd-sized, centred on the central pixel, and normalised to unit sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple

import galsim
import numpy as np
from astropy.io import fits

from .errors import ConfigError, InputError

__all__ = ["PSFConfig", "draw_psf", "psf_profile", "read_psf", "measure_fwhm", "normalize_psf", "psf_fwhm_arcsec"]


@dataclass(frozen=True)
class PSFConfig:
    """A point-spread function: analytic (GalSim profile) or an image read from FITS.

    Attributes
    ----------
    kind : {"airy", "moffat", "kolmogorov", "gaussian", "fits"}
    fwhm_arcsec : float
        FWHM for moffat / kolmogorov / gaussian profiles.
    beta : float
        Moffat index.
    lam_nm, diam_m, obscuration : float
        Airy diffraction pattern of a telescope (``airy``).
    jitter_fwhm_arcsec : float
        Gaussian convolved with an Airy pattern: pointing jitter and charge diffusion.
    path : str
        FITS file with the PSF image (``fits``); ``hdu`` selects the extension, ``index`` a
        plane of a cube.
    pixel_scale_arcsec : float
        Sampling of the FITS PSF image.
    """

    kind: Literal["airy", "moffat", "kolmogorov", "gaussian", "fits"] = "moffat"
    fwhm_arcsec: float = 0.6
    beta: float = 3.5
    lam_nm: float = 775.0
    diam_m: float = 2.4
    obscuration: float = 0.33
    jitter_fwhm_arcsec: float = 0.0
    path: str | None = None
    hdu: int = 0
    index: int = 0
    pixel_scale_arcsec: float | None = None

    def __post_init__(self):
        if self.kind == "fits" and (not self.path or not self.pixel_scale_arcsec):
            raise ConfigError("psf", "kind 'fits' needs both path and pixel_scale_arcsec")
        if self.kind in ("moffat", "kolmogorov", "gaussian") and not self.fwhm_arcsec > 0:
            raise ConfigError("psf.fwhm_arcsec", f"must be > 0, got {self.fwhm_arcsec}")


def psf_profile(psf: PSFConfig):
    """The GalSim profile of an analytic PSF (or an InterpolatedImage of a FITS PSF)."""
    if psf.kind == "moffat":
        return galsim.Moffat(beta=psf.beta, fwhm=psf.fwhm_arcsec)
    if psf.kind == "kolmogorov":
        return galsim.Kolmogorov(fwhm=psf.fwhm_arcsec)
    if psf.kind == "gaussian":
        return galsim.Gaussian(fwhm=psf.fwhm_arcsec)
    if psf.kind == "airy":
        prof = galsim.Airy(lam=psf.lam_nm, diam=psf.diam_m, obscuration=psf.obscuration, scale_unit="arcsec")
        if psf.jitter_fwhm_arcsec > 0:
            prof = galsim.Convolve(prof, galsim.Gaussian(fwhm=psf.jitter_fwhm_arcsec))
        return prof
    if psf.kind == "fits":
        img = read_psf(psf.path, hdu=psf.hdu, index=psf.index)
        # The FITS image is the pixel-convolved (effective) PSF: undo nothing, draw with method='no_pixel'.
        return galsim.InterpolatedImage(galsim.Image(img, scale=psf.pixel_scale_arcsec), x_interpolant="lanczos5")
    raise InputError("psf.kind", f"unknown PSF kind {psf.kind!r}")


def normalize_psf(image: np.ndarray, *, source: str = "psf") -> np.ndarray:
    """Check a PSF image (finite, positive sum, 2-D) and return it as float64 with unit sum."""
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise InputError(source, f"PSF must be a 2-D image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise InputError(source, "PSF has non-finite pixels")
    total = image.sum()
    if not total > 0:
        raise InputError(source, f"PSF sums to {total}, not a positive number")
    return image / total


def read_psf(path: str, *, hdu: int = 0, index: int = 0) -> np.ndarray:
    """Read a PSF image from a FITS file (plane ``index`` of a cube), normalised to unit sum."""
    try:
        with fits.open(path) as hdul:
            data = hdul[hdu].data
    except (OSError, IndexError, ValueError) as exc:
        raise InputError(str(path), f"cannot read a PSF from HDU {hdu}: {exc}") from exc
    if data is None:
        raise InputError(str(path), f"HDU {hdu} holds no image")
    data = np.asarray(data, dtype=np.float64)
    if data.ndim == 3:
        data = data[index]
    return normalize_psf(data, source=str(path))


@lru_cache(maxsize=256)
def _draw_cached(psf: PSFConfig, pixel_scale_arcsec: float, size: int | None) -> np.ndarray:
    prof = psf_profile(psf)
    # A FITS PSF already includes its pixel response; an analytic one is integrated over our pixels.
    method = "no_pixel" if psf.kind == "fits" else "auto"
    if size is None:
        size = int(np.ceil(8 * max(_nominal_fwhm(psf), 2 * pixel_scale_arcsec) / pixel_scale_arcsec)) | 1
        size = max(size, 15)
    img = prof.drawImage(nx=size, ny=size, scale=pixel_scale_arcsec, method=method).array
    out = normalize_psf(img)
    out.setflags(write=False)
    return out


def _nominal_fwhm(psf: PSFConfig) -> float:
    if psf.kind == "airy":
        return max(1.03 * psf.lam_nm * 1e-9 / psf.diam_m * 206265.0, psf.jitter_fwhm_arcsec) * 1.5
    if psf.kind == "fits":
        return 1.0
    return psf.fwhm_arcsec


def draw_psf(psf: PSFConfig, *, pixel_scale_arcsec: float, size: int | None = None) -> np.ndarray:
    """Draw a PSF on a pixel grid: odd ``size`` square, centred, unit sum (read-only array).

    Parameters
    ----------
    psf : PSFConfig
    pixel_scale_arcsec : float
        The grid the image is drawn on.
    size : int, optional
        Side in pixels (made odd); by default about 8 FWHM, at least 15 px.

    Returns
    -------
    numpy.ndarray
        float64 ``(size, size)`` image with unit sum.
    """
    if size is not None:
        size = int(size) | 1
    return _draw_cached(psf, float(pixel_scale_arcsec), size)


def _peak_centroid(image: np.ndarray) -> tuple[float, float]:
    """``(y, x)`` centroid (0-based px) of the 3x3 pixels around the brightest pixel of ``image``."""
    ny, nx = image.shape
    iy, ix = np.unravel_index(np.argmax(image), image.shape)
    y0, y1, x0, x1 = max(iy - 1, 0), min(iy + 2, ny), max(ix - 1, 0), min(ix + 2, nx)
    sub = image[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    return (sub * yy).sum() / sub.sum(), (sub * xx).sum() / sub.sum()


class _HalfMaximum(NamedTuple):
    """Where the azimuthal profile of a peaked image falls to half its peak (:func:`_half_maximum`).

    Attributes
    ----------
    ring : numpy.ndarray
        ``(H * W,)`` ring of each pixel (raster order); rings are 0.5 px wide around :func:`_peak_centroid`.
    counts : numpy.ndarray
        Pixels per ring.
    rings : numpy.ndarray
        The non-empty rings, inward out; ``profile`` and ``radius`` are theirs.
    profile, radius : numpy.ndarray
        Mean pixel value and mean radius (px) of each non-empty ring.
    peak_from_ring : bool
        The peak is the mean of the innermost ring (it lies within 0.5 px of the centre); otherwise the
        brightest pixel.
    peak : float
    j : int
        First ring (index into ``rings``) below half the peak; the half maximum lies between rings
        ``j - 1`` and ``j``.
    radius_px : float
        Half-maximum radius, interpolated linearly between those two rings.
    """

    ring: np.ndarray
    counts: np.ndarray
    rings: np.ndarray
    profile: np.ndarray
    radius: np.ndarray
    peak_from_ring: bool
    peak: float
    j: int
    radius_px: float


def _half_maximum(image: np.ndarray, *, sum_by_radius: bool = False) -> _HalfMaximum | None:
    """The half-maximum radius of a centred, peaked image from its azimuthal profile in 0.5 px rings
    around :func:`_peak_centroid` (:func:`measure_fwhm`, and the FWHM constraint of
    :func:`galgan_ray.gmm.fit_psf_mixture`). None when the profile never falls below half the peak, or
    already does in the innermost ring.

    ``sum_by_radius`` adds the pixels of each ring in order of radius instead of raster order: the
    order :func:`measure_fwhm` has always used (the ring sums, and so the FWHM, differ in the last bits).
    """
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    cy, cx = _peak_centroid(img)
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(yy - cy, xx - cx).ravel()
    v = img.ravel()
    edges = np.arange(0, r.max() + 0.5, 0.5)
    ring = np.digitize(r, edges) - 1
    order = np.argsort(r) if sum_by_radius else slice(None)
    counts = np.bincount(ring, minlength=len(edges))
    sums = np.bincount(ring[order], weights=v[order], minlength=len(edges))
    rsum = np.bincount(ring[order], weights=r[order], minlength=len(edges))
    rings = np.nonzero(counts > 0)[0]
    prof, rad = sums[rings] / counts[rings], rsum[rings] / counts[rings]
    peak_from_ring = bool(rad[0] < 0.5)
    peak = prof[0] if peak_from_ring else img.max()
    half = peak / 2.0
    below = np.nonzero(prof < half)[0]
    if len(below) == 0 or below[0] == 0:
        return None
    j = int(below[0])
    r_half = rad[j - 1] + (half - prof[j - 1]) * (rad[j] - rad[j - 1]) / (prof[j] - prof[j - 1])
    return _HalfMaximum(ring, counts, rings, prof, rad, peak_from_ring, peak, j, r_half)


def measure_fwhm(image: np.ndarray, *, pixel_scale_arcsec: float = 1.0) -> float:
    """FWHM of a centred, peaked image, from the area above half maximum (sub-pixel accurate).

    Uses the radial profile around the flux-weighted peak, interpolated to half the maximum,
    which is robust for Airy rings and Moffat wings alike.
    """
    hm = _half_maximum(image, sum_by_radius=True)
    if hm is None:
        return float("nan")
    return float(2.0 * hm.radius_px * pixel_scale_arcsec)


def psf_fwhm_arcsec(psf: PSFConfig, *, pixel_scale_arcsec: float) -> float:
    """FWHM of a PSF as drawn on a grid: GalSim's own value for analytic profiles, else measured."""
    if psf.kind in ("moffat", "kolmogorov", "gaussian"):
        return float(psf.fwhm_arcsec)
    return measure_fwhm(draw_psf(psf, pixel_scale_arcsec=pixel_scale_arcsec), pixel_scale_arcsec=pixel_scale_arcsec)
