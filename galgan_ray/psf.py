"""PSF images: drawn from an analytic profile (GalSim) or read from FITS, and their FWHM measured.

All PSF images here are odd-sized, centred on the central pixel, and normalised to unit sum.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .errors import InputError
from .instrument import PSFConfig

__all__ = ["draw_psf", "psf_profile", "read_psf", "measure_fwhm", "normalize_psf", "psf_fwhm_arcsec"]


def psf_profile(psf: PSFConfig):
    """The GalSim profile of an analytic PSF (or an InterpolatedImage of a FITS PSF)."""
    import galsim

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
    from astropy.io import fits

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


def measure_fwhm(image: np.ndarray, *, pixel_scale_arcsec: float = 1.0) -> float:
    """FWHM of a centred, peaked image, from the area above half maximum (sub-pixel accurate).

    Uses the radial profile around the flux-weighted peak, interpolated to half the maximum,
    which is robust for Airy rings and Moffat wings alike.
    """
    img = np.asarray(image, dtype=np.float64)
    ny, nx = img.shape
    iy, ix = np.unravel_index(np.argmax(img), img.shape)
    # Refine the centre with a 3x3 centroid around the peak.
    y0, y1, x0, x1 = max(iy - 1, 0), min(iy + 2, ny), max(ix - 1, 0), min(ix + 2, nx)
    sub = img[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    cy, cx = (sub * yy).sum() / sub.sum(), (sub * xx).sum() / sub.sum()
    # Peak value from a quadratic fit would be best; with the profile interpolation below, use the
    # azimuthal average in fine radial bins instead of the single brightest pixel.
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = np.hypot(yy - cy, xx - cx).ravel()
    v = img.ravel()
    order = np.argsort(r)
    r, v = r[order], v[order]
    edges = np.arange(0, r.max() + 0.5, 0.5)
    idx = np.digitize(r, edges) - 1
    counts = np.bincount(idx, minlength=len(edges))
    sums = np.bincount(idx, weights=v, minlength=len(edges))
    rsum = np.bincount(idx, weights=r, minlength=len(edges))
    ok = counts > 0
    prof, rad = sums[ok] / counts[ok], rsum[ok] / counts[ok]
    peak = prof[0] if rad[0] < 0.5 else img.max()
    half = peak / 2.0
    below = np.nonzero(prof < half)[0]
    if len(below) == 0 or below[0] == 0:
        return float("nan")
    j = below[0]
    r_half = rad[j - 1] + (half - prof[j - 1]) * (rad[j] - rad[j - 1]) / (prof[j] - prof[j - 1])
    return float(2.0 * r_half * pixel_scale_arcsec)


def psf_fwhm_arcsec(psf: PSFConfig, *, pixel_scale_arcsec: float) -> float:
    """FWHM of a PSF as drawn on a grid: GalSim's own value for analytic profiles, else measured."""
    if psf.kind in ("moffat", "kolmogorov", "gaussian"):
        return float(psf.fwhm_arcsec)
    return measure_fwhm(draw_psf(psf, pixel_scale_arcsec=pixel_scale_arcsec), pixel_scale_arcsec=pixel_scale_arcsec)
