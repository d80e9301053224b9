"""A CANDELS-like simulated sky: HST mosaics at 0.06"/px drawn with GalSim, and their catalog.

The simulation stands in for the CANDELS GOODS-S mosaics and the Guo et al. (2013) catalog that
Hemmati et al. (2022) cut their training galaxies from. Per object (all drawn from one seeded
generator, so the same seed gives identical galaxies whatever the band list):

1. Magnitude in ``reference_band`` from power-law number counts ``dlogN/dm = count_slope``,
   normalised to ``galaxy_density_arcmin2`` galaxies per arcmin^2 brighter than ``density_mag``.
   Positions are uniform over the mosaic plus a margin (sources just outside still shed light in).
2. Redshift from ``p(z) ~ z exp(-z / z0(m))`` (peak ``z0`` about 1 for faint galaxies, a tail past
   z = 5), capped at ``z_max``.
3. Structure: a de Vaucouleurs bulge (Sersic n = 4, truncated at 8 half-light radii) plus an
   exponential disk with random bulge-to-total ratio, a disk axis ratio from a random inclination
   (intrinsic thickness ``disk_thickness``), a position angle, and star-forming knots
   (``galsim.RandomKnots``) carrying part of the disk light. The disk half-light radius follows a
   size-magnitude and size-redshift relation with log-normal scatter.
4. Colours: each component has a power-law SED ``f_nu ~ lambda^beta`` (bulge red, disk bluer,
   knots bluest) with a 4000 A break (strong for bulges) and Lyman-alpha forest / Lyman-limit
   absorption, evaluated at each band's ``wavelength_nm``. The continuum is normalised in the
   reference band; the catalog records the fluxes actually drawn.
5. Stars (a ``star_fraction`` of the galaxy count) are point sources with flatter counts.
6. Each object is convolved with the band's HST PSF (``psf.psf_profile``), drawn (pixel-integrated)
   on a postage stamp at its sub-pixel position and added to the mosaic; then white Gaussian noise
   of ``band.sky_sigma`` is added (one generator per band: ``default_rng([seed, crc32(band)])``).

The catalog follows the layout of the CANDELS GOODS-S catalog (Guo et al. 2013): ``ID`` (1-based),
``RA``, ``DEC`` (deg), ``CLASS_STAR``, ``FWHM_IMAGE`` and ``FLUX_RADIUS`` (pixels of 0.06"),
``ACS_F775W_FLUX`` / ``WFC3_F160W_FLUX`` ... with ``..._FLUXERR`` in microJansky (measured-like:
the true flux plus Gaussian noise of the error), and the redshift in ``ZBEST`` (as in the CANDELS
photometric-redshift catalogs; here it is the true redshift, no photo-z scatter). Truth columns
follow: ``MAG_TRUE_<band>`` (AB, noise-free), ``IS_STAR``, ``X_PIX``/``Y_PIX`` (0-based mosaic
pixels), bulge/disk/knot parameters. ``FWHM_IMAGE`` and ``FLUX_RADIUS`` are analytic estimates of
what SExtractor would measure (intrinsic size in quadrature with the PSF), not measurements.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import galsim
import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from scipy.special import gammainc, gammaincinv

from .catalog import candels_flux_column
from .config import config_json
from .errors import ConfigError
from .geometry import make_tan_wcs
from .instrument import HST_BANDS, NJY_ZEROPOINT, BandConfig, get_band
from .provenance import provenance
from .psf import draw_psf, measure_fwhm, psf_profile
from .tiles import Tile, write_tile

__all__ = ["SkyConfig", "simulate_sky", "write_sky", "sky_band_configs"]


@dataclass(frozen=True)
class SkyConfig:
    """Parameters of the simulated CANDELS-like sky.

    Attributes
    ----------
    seed : int
        One seed for everything; same seed, same arrays.
    size_arcsec : float
        Side of the square mosaic (ignored when ``size_pixels`` is set).
    size_pixels : int, optional
        Side of the mosaic in pixels.
    pixel_scale_arcsec : float
        Mosaic pixel scale (CANDELS: 0.06"/px).
    ra_center_deg, dec_center_deg : float
        Centre of the mosaic (default: GOODS-S).
    survey : str
        Instrument registry key of the bands (``instrument.get_band``).
    bands : tuple of str
        Bands to draw; ``instrument.HST_BANDS`` for the paper's 7-band experiment.
    reference_band : str
        Band in which magnitudes, number counts, bulge-to-total ratios and sizes are defined
        (need not be drawn).
    galaxy_density_arcmin2 : float
        Galaxies per arcmin^2 brighter than ``density_mag`` in the reference band.
    density_mag, count_slope : float
        Normalisation magnitude and slope ``dlog10 N / dm`` of the galaxy counts.
    mag_bright, mag_faint : float
        Range of simulated reference-band magnitudes.
    star_fraction : float
        Number of stars as a fraction of the number of galaxies.
    star_count_slope : float
        ``dlog10 N / dm`` of the star counts (flatter than galaxies at high latitude).
    z0_at_mag25, z0_slope, z_max : float
        Redshifts follow ``z exp(-z/z0)`` with ``z0 = z0_at_mag25 + z0_slope (m - 25)`` (clipped
        to [0.1, 2]); draws above ``z_max`` are redrawn.
    hlr_arcsec_at_mag23 : float
        Median disk half-light radius at m = 23, z = 1.
    hlr_mag_slope, hlr_z_index, hlr_scatter_dex : float
        ``log10 r = log10 r23 + slope (m - 23) + index log10((1+z)/2) + N(0, scatter)``.
    bulge_fraction_alpha, bulge_fraction_beta : float
        Beta distribution of bulge-to-total ratios (reference band).
    disk_thickness : float
        Intrinsic axis ratio of an edge-on disk.
    knot_fraction_max : float
        Up to this fraction of the disk light is in star-forming knots.
    knots_min, knots_max : int
        Range of the number of knots per galaxy.
    knots_mag_max : float
        Only galaxies brighter than this get knots (invisible, and costly to draw, in fainter ones).
    margin_arcsec : float
        Sources are also placed this far outside the mosaic (their light spills in); only
        sources centred on the mosaic are catalogued.
    max_stamp_pixels : int
        Largest postage stamp side used to draw one object.
    add_noise : bool
        Add white Gaussian sky noise of ``band.sky_sigma``.
    catalog_bands : tuple of str
        Bands whose fluxes the catalog lists (as a multi-band CANDELS catalog does), drawn or not.
    """

    seed: int = 0
    size_arcsec: float = 60.0
    size_pixels: int | None = None
    pixel_scale_arcsec: float = 0.06
    ra_center_deg: float = 53.12
    dec_center_deg: float = -27.80
    survey: str = "hst"
    bands: tuple[str, ...] = ("F775W",)
    reference_band: str = "F775W"
    galaxy_density_arcmin2: float = 120.0
    density_mag: float = 26.5
    count_slope: float = 0.3
    mag_bright: float = 18.0
    mag_faint: float = 27.0
    star_fraction: float = 0.04
    star_count_slope: float = 0.1
    z0_at_mag25: float = 0.9
    z0_slope: float = 0.12
    z_max: float = 8.0
    hlr_arcsec_at_mag23: float = 0.45
    hlr_mag_slope: float = -0.07
    hlr_z_index: float = -0.7
    hlr_scatter_dex: float = 0.18
    bulge_fraction_alpha: float = 0.9
    bulge_fraction_beta: float = 2.2
    disk_thickness: float = 0.12
    knot_fraction_max: float = 0.3
    knots_min: int = 10
    knots_max: int = 50
    knots_mag_max: float = 25.5
    margin_arcsec: float = 2.0
    max_stamp_pixels: int = 257
    add_noise: bool = True
    catalog_bands: tuple[str, ...] = HST_BANDS

    def __post_init__(self):
        if not self.bands:
            raise ConfigError("sky.bands", "at least one band is needed")
        if not (self.mag_faint > self.mag_bright):
            raise ConfigError("sky.mag_faint", "must be fainter (larger) than mag_bright")
        if self.size_pixels is None and not self.size_arcsec > 0:
            raise ConfigError("sky.size_arcsec", f"must be > 0, got {self.size_arcsec}")
        if self.size_pixels is not None and self.size_pixels < 1:
            raise ConfigError("sky.size_pixels", f"must be >= 1, got {self.size_pixels}")
        if self.galaxy_density_arcmin2 < 0 or self.star_fraction < 0:
            raise ConfigError("sky", "densities and fractions must be >= 0")

    @property
    def shape(self) -> tuple[int, int]:
        """``(ny, nx)`` of the mosaic."""
        n = self.size_pixels or int(round(self.size_arcsec / self.pixel_scale_arcsec))
        return (n, n)


def sky_band_configs(config: SkyConfig) -> dict[str, BandConfig]:
    """The :class:`BandConfig` of each simulated band, at the mosaic's pixel scale.

    Returns
    -------
    dict of str -> BandConfig
        Band name -> registry band (``config.survey``) with ``pixel_scale_arcsec`` set to the
        mosaic's.
    """
    return {name: _at_scale(get_band(config.survey, name), config.pixel_scale_arcsec) for name in config.bands}


def _at_scale(band: BandConfig, scale: float) -> BandConfig:
    return band if band.pixel_scale_arcsec == scale else dataclasses.replace(band, pixel_scale_arcsec=scale)


# ------------------------------------------------------------------------------------------------
# Object parameters (vectorised, one generator)
# ------------------------------------------------------------------------------------------------

def _power_law_mags(rng, n, slope, lo, hi):
    """Magnitudes with N(<m) ~ 10^(slope m) between lo and hi (inverse CDF)."""
    a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


def _draw_objects(config: SkyConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([config.seed, 0])
    ny, nx = config.shape
    ps = config.pixel_scale_arcsec
    margin = config.margin_arcsec / ps
    area_arcmin2 = (nx + 2 * margin) * (ny + 2 * margin) * (ps / 60.0) ** 2

    s = config.count_slope
    per_arcmin2 = config.galaxy_density_arcmin2 * (
        10 ** (s * (config.mag_faint - config.density_mag)) - 10 ** (s * (config.mag_bright - config.density_mag)))
    n_gal = int(rng.poisson(per_arcmin2 * area_arcmin2))
    n_star = int(rng.poisson(config.star_fraction * per_arcmin2 * area_arcmin2))
    n = n_gal + n_star
    is_star = np.zeros(n, bool)
    is_star[n_gal:] = True

    mag = np.concatenate([
        _power_law_mags(rng, n_gal, s, config.mag_bright, config.mag_faint),
        _power_law_mags(rng, n_star, config.star_count_slope, config.mag_bright, config.mag_faint),
    ])
    x = rng.uniform(-0.5 - margin, nx - 0.5 + margin, n)
    y = rng.uniform(-0.5 - margin, ny - 0.5 + margin, n)

    # Redshifts: p(z) ~ z exp(-z/z0) is a Gamma(2, z0); redraw above z_max.
    z0 = np.clip(config.z0_at_mag25 + config.z0_slope * (mag - 25.0), 0.1, 2.0)
    z = rng.gamma(2.0, z0)
    for _ in range(100):
        bad = z > config.z_max
        if not bad.any():
            break
        z[bad] = rng.gamma(2.0, z0[bad])
    z = np.minimum(z, config.z_max)
    z[is_star] = 0.0

    log_r = (np.log10(config.hlr_arcsec_at_mag23) + config.hlr_mag_slope * (mag - 23.0)
             + config.hlr_z_index * np.log10((1.0 + z) / 2.0) + rng.normal(0.0, config.hlr_scatter_dex, n))
    hlr_disk = np.clip(10.0 ** log_r, 0.04, 3.0)
    hlr_bulge = hlr_disk * rng.uniform(0.2, 0.6, n)
    bt = rng.beta(config.bulge_fraction_alpha, config.bulge_fraction_beta, n)
    cos_i = rng.uniform(0.0, 1.0, n)
    q_disk = np.sqrt(cos_i**2 * (1 - config.disk_thickness**2) + config.disk_thickness**2)
    q_bulge = rng.uniform(0.6, 1.0, n)
    pa = rng.uniform(0.0, 180.0, n)
    pa_bulge = pa + rng.normal(0.0, 10.0, n)
    knot_frac = np.where((bt < 0.7) & (mag < config.knots_mag_max),
                         rng.uniform(0.0, config.knot_fraction_max, n), 0.0)
    n_knots = rng.integers(config.knots_min, config.knots_max + 1, n)
    knot_seed = rng.integers(1, 2**31 - 1, n)
    beta_bulge = rng.normal(1.8, 0.3, n)
    beta_disk = rng.normal(0.6, 0.3, n)
    beta_knots = rng.normal(-0.3, 0.2, n)
    beta_star = rng.uniform(-0.5, 2.5, n)
    # CLASS_STAR as SExtractor's neural net would give: ~1 for stars (less sure when faint),
    # 0-0.3 for galaxies (higher for compact ones).
    cs_star = np.clip(1.0 - np.abs(rng.normal(0.0, 0.02, n)) - 0.08 * np.maximum(mag - 25.0, 0.0), 0.5, 1.0)
    cs_gal = np.clip(rng.uniform(0.0, 0.05, n) + 0.25 * np.exp(-hlr_disk / 0.08), 0.0, 0.3)
    class_star = np.where(is_star, cs_star, cs_gal)
    flux_noise = rng.standard_normal((n, len(HST_BANDS) + 16))  # fixed width: independent of the band list
    for arr in (bt, knot_frac):
        arr[is_star] = 0.0
    return dict(is_star=is_star, mag=mag, x=x, y=y, z=z, hlr_disk=hlr_disk, hlr_bulge=hlr_bulge, bt=bt,
                q_disk=q_disk, q_bulge=q_bulge, pa=pa, pa_bulge=pa_bulge, knot_frac=knot_frac,
                n_knots=n_knots, knot_seed=knot_seed, beta_bulge=beta_bulge, beta_disk=beta_disk,
                beta_knots=beta_knots, beta_star=beta_star, class_star=class_star, flux_noise=flux_noise)


def _breaks(lam_nm: float, z: np.ndarray, d4000: float) -> np.ndarray:
    """Multiplicative attenuation at observed wavelength ``lam_nm``: 4000 A break and the IGM."""
    rest = lam_nm / (1.0 + z)
    out = np.where(rest < 400.0, d4000, 1.0)
    # Lyman-alpha forest (Madau 1995-like effective optical depth) and no flux below the Lyman limit.
    tau = 0.0036 * (lam_nm / 121.6) ** 3.46
    out = np.where(rest < 121.6, out * np.exp(-tau), out)
    return np.where(rest < 91.2, 0.0, out)


def _component_fluxes(p: dict, band: BandConfig, ref: BandConfig) -> dict[str, np.ndarray]:
    """Fluxes (nJy) of bulge, disk, knots and star in ``band``: continuum normalised in ``ref``."""
    f_ref = 10.0 ** (-0.4 * (p["mag"] - NJY_ZEROPOINT))
    ratio = band.wavelength_nm / ref.wavelength_nm
    z = p["z"]

    def sed(beta, d4000):
        colour = ratio**beta
        # Normalise the 4000 A break at the reference wavelength; the IGM is not normalised (a
        # galaxy that drops out of the reference band stays dark there).
        d_ref = np.where(ref.wavelength_nm / (1 + z) < 400.0, d4000, 1.0)
        return colour * _breaks(band.wavelength_nm, z, d4000) / d_ref

    gal = np.where(p["is_star"], 0.0, f_ref)
    disk_total = gal * (1 - p["bt"])
    return {
        "bulge": gal * p["bt"] * sed(p["beta_bulge"], 0.45),
        "disk": disk_total * (1 - p["knot_frac"]) * sed(p["beta_disk"], 0.8),
        "knots": disk_total * p["knot_frac"] * sed(p["beta_knots"], 0.9),
        "star": np.where(p["is_star"], f_ref * ratio ** p["beta_star"], 0.0),
    }


def _sersic_b(n: float) -> float:
    return float(gammaincinv(2 * n, 0.5))


def _composite_hlr(weights: list[np.ndarray], radii: list[np.ndarray], indices: list[float]) -> np.ndarray:
    """Half-light radius of a sum of circular Sersic profiles (bisection, vectorised)."""
    total = sum(weights)
    total = np.where(total > 0, total, 1.0)
    lo = np.zeros_like(radii[0])
    hi = np.max(np.stack(radii), axis=0) * 3.0 + 1e-6
    bs = [_sersic_b(n) for n in indices]
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        enc = sum(w * gammainc(2 * n, b * (mid / np.maximum(r, 1e-9)) ** (1.0 / n))
                  for w, r, n, b in zip(weights, radii, indices, bs)) / total
        lo = np.where(enc < 0.5, mid, lo)
        hi = np.where(enc < 0.5, hi, mid)
    return 0.5 * (lo + hi)


@lru_cache(maxsize=32)
def _psf_radii(band: BandConfig) -> tuple[float, float]:
    """(FWHM, half-light radius) in arcsec of the band's PSF as drawn with its pixel."""
    scale = band.pixel_scale_arcsec / 5.0
    img = draw_psf(band.psf, pixel_scale_arcsec=scale, size=401)
    fwhm = measure_fwhm(img, pixel_scale_arcsec=scale)
    fwhm = math.hypot(fwhm, band.pixel_scale_arcsec / 2.0)  # pixel response, roughly
    c = (img.shape[0] - 1) / 2.0
    yy, xx = np.indices(img.shape)
    r = np.hypot(yy - c, xx - c).ravel() * scale
    order = np.argsort(r)
    cum = np.cumsum(img.ravel()[order])
    hlr = float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])
    return float(fwhm), math.hypot(hlr, band.pixel_scale_arcsec / 2.0)


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------

def _galaxy_profiles(p: dict, i: int, gsparams):
    """Achromatic unit-flux GalSim profiles (bulge, disk, knots) of galaxy ``i``."""
    beta_d = galsim.Angle(float(p["pa"][i]), galsim.degrees)
    beta_b = galsim.Angle(float(p["pa_bulge"][i]), galsim.degrees)
    rb, rd = float(p["hlr_bulge"][i]), float(p["hlr_disk"][i])
    bulge = galsim.DeVaucouleurs(half_light_radius=rb, trunc=8.0 * rb, gsparams=gsparams).shear(
        q=float(p["q_bulge"][i]), beta=beta_b) if p["bt"][i] > 0 else None
    disk = galsim.Exponential(half_light_radius=rd, gsparams=gsparams).shear(q=float(p["q_disk"][i]), beta=beta_d)
    knots = None
    if p["knot_frac"][i] > 0:
        knots = galsim.RandomKnots(int(p["n_knots"][i]), half_light_radius=rd, flux=1.0,
                                   rng=galsim.BaseDeviate(int(p["knot_seed"][i])), gsparams=gsparams)
        knots = knots.shear(q=float(p["q_disk"][i]), beta=beta_d)
    return bulge, disk, knots


def _stamp_half(p: dict, i: int, ps: float, cap: int) -> int:
    if p["is_star"][i]:
        extent = 3.0 if p["mag"][i] < 21 else 1.2
    else:
        extent = max(6.0 * p["hlr_disk"][i], 8.0 * p["hlr_bulge"][i] if p["bt"][i] > 0.05 else 0.0) + 0.5
    return int(min(max(np.ceil(extent / ps), 12), (cap - 1) // 2))


def simulate_sky(config: SkyConfig = SkyConfig()) -> tuple[dict[str, np.ndarray], WCS, Table]:
    """Simulate CANDELS-like HST mosaics and their catalog.

    Parameters
    ----------
    config : SkyConfig
        Field size and centre, bands, galaxy population, seed.

    Returns
    -------
    images : dict of str -> numpy.ndarray
        Band name -> float32 ``(ny, nx)`` mosaic in nJy per pixel (zero point 31.4), with noise.
    wcs : astropy.wcs.WCS
        North-up TAN WCS of the mosaics (``geometry.make_tan_wcs``), same for every band.
    catalog : astropy.table.Table
        One row per object centred on the mosaic, CANDELS (Guo et al. 2013) layout: ``ID``,
        ``RA``, ``DEC`` (deg), ``CLASS_STAR``, ``FWHM_IMAGE``, ``FLUX_RADIUS`` (px),
        ``<INSTR>_<BAND>_FLUX`` and ``<INSTR>_<BAND>_FLUXERR`` (uJy) per drawn band, ``ZBEST``;
        truth: ``MAG_TRUE_<BAND>`` (AB), ``IS_STAR``, ``X_PIX``, ``Y_PIX`` (0-based pixels),
        ``HLR_TRUE_ARCSEC`` (intrinsic, reference band), ``BULGE_TO_TOTAL``, ``HLR_BULGE_ARCSEC``,
        ``HLR_DISK_ARCSEC``, ``Q_BULGE``, ``Q_DISK``, ``PA_DEG``, ``KNOT_FRACTION``, ``N_KNOTS``.
        ``meta`` holds the config as JSON (``SKYCONF``) and the reference band.
    """
    ny, nx = config.shape
    ps = config.pixel_scale_arcsec
    wcs = make_tan_wcs(config.ra_center_deg, config.dec_center_deg, pixel_scale_arcsec=ps, shape=(ny, nx))
    bands = sky_band_configs(config)
    ref = get_band(config.survey, config.reference_band)
    p = _draw_objects(config)
    n = len(p["mag"])
    gsparams = galsim.GSParams(maximum_fft_size=8192, folding_threshold=5e-3)

    fluxes = {name: _component_fluxes(p, band, ref) for name, band in bands.items()}
    profiles = [None if p["is_star"][i] else _galaxy_profiles(p, i, gsparams) for i in range(n)]
    images: dict[str, np.ndarray] = {}
    for name, band in bands.items():
        mosaic = galsim.ImageF(galsim.BoundsI(0, nx - 1, 0, ny - 1), scale=ps)
        psf = psf_profile(band.psf).withGSParams(gsparams)
        comp = fluxes[name]
        for i in range(n):
            if p["is_star"][i]:
                obj = psf.withFlux(float(comp["star"][i]))
            else:
                parts = [prof * float(comp[key][i]) for prof, key in zip(profiles[i], ("bulge", "disk", "knots"))
                         if prof is not None and comp[key][i] > 0]
                if not parts:
                    continue
                obj = galsim.Convolve(galsim.Add(parts) if len(parts) > 1 else parts[0], psf, gsparams=gsparams)
            h = _stamp_half(p, i, ps, config.max_stamp_pixels)
            ix, iy = int(np.floor(p["x"][i] + 0.5)), int(np.floor(p["y"][i] + 0.5))
            bounds = galsim.BoundsI(ix - h, ix + h, iy - h, iy + h)
            overlap = bounds & mosaic.bounds
            if not overlap.isDefined():
                continue
            stamp = galsim.ImageF(bounds, scale=ps)
            # The odd stamp's true centre is the integer pixel (ix, iy); the offset puts the object
            # at its exact 0-based position.
            obj.drawImage(stamp, offset=(p["x"][i] - ix, p["y"][i] - iy))
            mosaic[overlap] += stamp[overlap]
        arr = mosaic.array.astype(np.float32, copy=True)
        if config.add_noise:
            noise_rng = np.random.default_rng([config.seed, 1, zlib.crc32(name.encode())])
            arr += noise_rng.normal(0.0, band.sky_sigma, arr.shape).astype(np.float32)
        images[name] = arr

    # The catalog lists every band a CANDELS catalog would (the paper's F160W cut needs F160W even
    # when only F775W is drawn); fluxes follow the same SED recipe as the drawn mosaics.
    cat_bands = dict(bands)
    for name in config.catalog_bands:
        if name not in cat_bands:
            cat_bands[name] = _at_scale(get_band(config.survey, name), ps)
            fluxes[name] = _component_fluxes(p, cat_bands[name], ref)
    catalog = _build_catalog(config, p, fluxes, cat_bands, ref, wcs)
    return images, wcs, catalog


def _build_catalog(config, p, fluxes, bands, ref, wcs) -> Table:
    ny, nx = config.shape
    ps = config.pixel_scale_arcsec
    inside = (p["x"] >= -0.5) & (p["x"] < nx - 0.5) & (p["y"] >= -0.5) & (p["y"] < ny - 0.5)
    idx = np.nonzero(inside)[0]
    ra, dec = wcs.pixel_to_world_values(p["x"][idx], p["y"][idx])

    # Intrinsic sizes in the reference band (circularised), then observed ~ in quadrature with the PSF.
    ref_flux = _component_fluxes(p, ref, ref)
    rb = p["hlr_bulge"] * np.sqrt(p["q_bulge"])
    rd = p["hlr_disk"] * np.sqrt(p["q_disk"])
    hlr = _composite_hlr([ref_flux["bulge"], ref_flux["disk"] + ref_flux["knots"]], [rb, rd], [4.0, 1.0])
    hlr = np.where(p["is_star"], 0.0, hlr)
    psf_fwhm, psf_hlr = _psf_radii(_at_scale(ref, ps))
    # Intrinsic FWHM: exponential disk FWHM = 0.826 hlr; a de Vaucouleurs core is point-like.
    fwhm_int = np.where(p["bt"] < 0.5, 0.826 * rd, 0.0)
    fwhm_int = np.where(p["is_star"], 0.0, fwhm_int)
    fwhm_px = np.hypot(fwhm_int, psf_fwhm) / ps
    flux_radius_px = np.hypot(hlr, psf_hlr) / ps

    t = Table()
    t["ID"] = np.arange(1, len(idx) + 1, dtype=np.int64)
    t["RA"] = ra
    t["DEC"] = dec
    t["RA"].unit = t["DEC"].unit = "deg"
    t["CLASS_STAR"] = p["class_star"][idx].astype(np.float32)
    t["FWHM_IMAGE"] = fwhm_px[idx].astype(np.float32)
    t["FWHM_IMAGE"].unit = "pix"
    t["FLUX_RADIUS"] = flux_radius_px[idx].astype(np.float32)
    t["FLUX_RADIUS"].unit = "pix"
    # Errors: sky noise in a circular aperture of radius 2 FLUX_RADIUS (at least 2 px).
    ap_pix = np.pi * np.maximum(2.0 * flux_radius_px[idx], 2.0) ** 2
    for j, (name, band) in enumerate(bands.items()):
        total = sum(fluxes[name].values())[idx]  # nJy
        err = band.sky_sigma * band.to_njy * np.sqrt(ap_pix)
        k = HST_BANDS.index(name) if name in HST_BANDS else len(HST_BANDS) + (zlib.crc32(name.encode()) % 16)
        col = candels_flux_column(name)
        t[col] = ((total + err * p["flux_noise"][idx, k]) / 1000.0).astype(np.float64)
        t[col].unit = "uJy"
        t[col + "ERR"] = (err / 1000.0).astype(np.float64)
        t[col + "ERR"].unit = "uJy"
    t["ZBEST"] = p["z"][idx].astype(np.float32)
    for name in bands:
        total = sum(fluxes[name].values())[idx]
        with np.errstate(divide="ignore"):
            t[f"MAG_TRUE_{name}"] = np.where(total > 0, NJY_ZEROPOINT - 2.5 * np.log10(np.maximum(total, 1e-30)),
                                             np.inf).astype(np.float32)
    t["IS_STAR"] = p["is_star"][idx]
    t["X_PIX"] = p["x"][idx]
    t["Y_PIX"] = p["y"][idx]
    t["HLR_TRUE_ARCSEC"] = hlr[idx].astype(np.float32)
    t["BULGE_TO_TOTAL"] = p["bt"][idx].astype(np.float32)
    t["HLR_BULGE_ARCSEC"] = np.where(p["is_star"], 0.0, p["hlr_bulge"])[idx].astype(np.float32)
    t["HLR_DISK_ARCSEC"] = np.where(p["is_star"], 0.0, p["hlr_disk"])[idx].astype(np.float32)
    t["Q_BULGE"] = p["q_bulge"][idx].astype(np.float32)
    t["Q_DISK"] = p["q_disk"][idx].astype(np.float32)
    t["PA_DEG"] = p["pa"][idx].astype(np.float32)
    t["KNOT_FRACTION"] = p["knot_frac"][idx].astype(np.float32)
    t["N_KNOTS"] = np.where(p["knot_frac"] > 0, p["n_knots"], 0)[idx].astype(np.int32)
    t.meta["SKYCONF"] = config_json(config)
    t.meta["REFBAND"] = config.reference_band
    t.meta["ZCOLUMN"] = "ZBEST"
    return t


def write_sky(config: SkyConfig, out_dir: str | Path, *, overwrite: bool = True) -> dict[str, Path]:
    """Simulate the sky and write one mosaic FITS per band plus the catalog FITS.

    Each mosaic is a primary HDU with a TAN WCS (FITS 1-based ``CRPIX``), ``BUNIT = 'nJy'``,
    ``FILTER``, ``INSTRUME``, ``MAGZERO = PHOTZP = 31.4``, ``SKYSIGMA`` (the noise per pixel) and
    the config as JSON in the long-string card ``SKYCONF`` (provenance in ``PROVENAN``).

    Parameters
    ----------
    config : SkyConfig
    out_dir : str or Path
        Created if needed.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    dict of str -> Path
        Band name -> ``sky_<band>.fits``, and ``"catalog"`` -> ``sky_catalog.fits``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, wcs, catalog = simulate_sky(config)
    bands = sky_band_configs(config)
    prov = json.dumps(provenance(), sort_keys=True)
    paths: dict[str, Path] = {}
    for name, arr in images.items():
        hdr = wcs.to_header()
        hdr["BUNIT"] = ("nJy", "per pixel")
        hdr["TELESCOP"] = "HST"
        hdr["INSTRUME"] = candels_flux_column(name).split("_")[0]
        hdr["FILTER"] = name
        hdr["MAGZERO"] = (NJY_ZEROPOINT, "AB magnitude of one image unit")
        hdr["PHOTZP"] = (NJY_ZEROPOINT, "AB magnitude of one image unit")
        hdr["PIXSCALE"] = (config.pixel_scale_arcsec, "arcsec/pixel")
        hdr["SKYSIGMA"] = (bands[name].sky_sigma if config.add_noise else 0.0, "added noise per pixel, image units")
        hdr["SIMULATD"] = (True, "galgan_ray.sky simulation")
        hdr["SKYCONF"] = config_json(config)
        hdr["PROVENAN"] = prov
        path = out / f"sky_{name}.fits"
        fits.PrimaryHDU(arr, header=hdr).writeto(path, overwrite=overwrite)
        paths[name] = path
    path = out / "sky_catalog.fits"
    catalog.write(path, overwrite=overwrite)
    paths["catalog"] = path
    return paths


# ------------------------------------------------------------------------------------------------
# Simulated fields: the sky cut into survey tiles (the field job's default input)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FieldSimConfig:
    """A small simulated field: one CANDELS-like HST mosaic cut into overlapping tiles.

    Attributes
    ----------
    seed : int
        Seed of the sky (galaxies and HST noise).
    n_tiles_x, n_tiles_y : int
        Tiles along x (RA) and y (Dec).
    tile_inner_arcsec : float
        Side of each tile's inner (owned) region; rounded to whole low-resolution pixels.
    border_arcsec : float
        Overlap border on each side of a tile (rounded likewise); should exceed half a 22 px
        cutout (2"), plus the degradation kernel (1.9"), so owned sources never touch the tile edge.
    ra_center_deg, dec_center_deg : float
        Centre of the field.
    hr_band : str
        Band key of the HST-like mosaic (``survey/name``).
    lr_pixel_scale_arcsec : float
        The low-resolution grid the tiles will be degraded to (tile sides are whole multiples of it).
    galaxy_density_arcmin2, mag_bright, mag_faint, star_fraction : float
        Passed to :class:`galgan_ray.sky.SkyConfig`.
    """

    seed: int = 0
    n_tiles_x: int = 2
    n_tiles_y: int = 2
    tile_inner_arcsec: float = 32.4
    border_arcsec: float = 3.96
    ra_center_deg: float = 150.1
    dec_center_deg: float = 2.2
    hr_band: str = "hst/F775W"
    lr_pixel_scale_arcsec: float = 0.18
    galaxy_density_arcmin2: float = 120.0
    mag_bright: float = 18.0
    mag_faint: float = 27.0
    star_fraction: float = 0.04

    def __post_init__(self):
        if self.n_tiles_x < 1 or self.n_tiles_y < 1:
            raise ConfigError("simulate.n_tiles_x", "need at least one tile along each axis")
        if not self.tile_inner_arcsec > 0 or self.border_arcsec < 0:
            raise ConfigError("simulate.tile_inner_arcsec", "need tile_inner_arcsec > 0 and border_arcsec >= 0")
        if "/" not in self.hr_band:
            raise ConfigError("simulate.hr_band", f"expected survey/name, got {self.hr_band!r}")


def make_simulated_field(config: FieldSimConfig, out_url: str, *, storage_options: Mapping | None = None
                         ) -> dict[str, Any]:
    """Simulate an HST-like field and write it as overlapping high-resolution tiles with truth.

    The mosaic covers ``n * inner + 2 * border`` on each side; tile ``(i, j)`` (``TILEID = j *
    n_tiles_x + i``) covers inner region ``(i, j)`` plus the border, so neighbours overlap by two
    borders and share those pixels exactly. Each tile's ``TRUTH`` holds the catalogued sources
    centred on it; ``TRACTX0/TRACTY0`` place it on the mosaic grid.

    Parameters
    ----------
    config : FieldSimConfig
    out_url : str
        Directory URL; tiles are written as ``tile_<TILEID>.fits``.
    storage_options : mapping, optional
        fsspec options (e.g. ``endpoint_url``).

    Returns
    -------
    dict
        ``tiles``: list of tile URLs; ``n_truth``: catalogued sources; ``area_deg2``: the union
        of the inner regions; ``hr_pixel_scale_arcsec``; ``seconds``.
    """
    t0 = time.perf_counter()
    survey, name = config.hr_band.split("/", 1)
    band = get_band(survey, name)
    s_hr = band.pixel_scale_arcsec
    ratio = config.lr_pixel_scale_arcsec / s_hr
    r = int(round(ratio))
    if abs(ratio - r) > 1e-6:
        raise ConfigError("simulate.lr_pixel_scale_arcsec", f"must be a whole multiple of the HR scale {s_hr}\"")
    inner_lr = int(round(config.tile_inner_arcsec / config.lr_pixel_scale_arcsec))
    border_lr = int(round(config.border_arcsec / config.lr_pixel_scale_arcsec))
    inner, border = inner_lr * r, border_lr * r  # HR px
    tile_px = inner + 2 * border
    nx_px, ny_px = config.n_tiles_x * inner + 2 * border, config.n_tiles_y * inner + 2 * border
    n_side = max(nx_px, ny_px)
    sky_cfg = SkyConfig(seed=config.seed, size_pixels=n_side, pixel_scale_arcsec=s_hr,
                        ra_center_deg=config.ra_center_deg, dec_center_deg=config.dec_center_deg, survey=survey,
                        bands=(name,), reference_band=name, galaxy_density_arcmin2=config.galaxy_density_arcmin2,
                        mag_bright=config.mag_bright, mag_faint=config.mag_faint, star_fraction=config.star_fraction,
                        catalog_bands=(name,))
    images, wcs, cat = simulate_sky(sky_cfg)
    mosaic = images[name]
    psf = draw_psf(band.psf, pixel_scale_arcsec=s_hr)
    sigma_hr = band.sky_sigma
    mag = np.asarray(cat[f"MAG_TRUE_{name}"], dtype=np.float64)
    truth_all = {
        "truthId": np.asarray(cat["ID"], dtype=np.int64),
        "ra": np.asarray(cat["RA"], dtype=np.float64), "dec": np.asarray(cat["DEC"], dtype=np.float64),
        "x": np.asarray(cat["X_PIX"], dtype=np.float64), "y": np.asarray(cat["Y_PIX"], dtype=np.float64),
        "mag": mag.astype(np.float32),
        "flux_njy": np.where(np.isfinite(mag), 10.0 ** (-0.4 * (mag - NJY_ZEROPOINT)), 0.0),
        "hlr_arcsec": np.asarray(cat["HLR_TRUE_ARCSEC"], dtype=np.float32),
        "flux_radius_arcsec": (np.asarray(cat["FLUX_RADIUS"]) * s_hr).astype(np.float32),
        "fwhm_arcsec": (np.asarray(cat["FWHM_IMAGE"]) * s_hr).astype(np.float32),
        "redshift": np.asarray(cat["ZBEST"], dtype=np.float32),
        "is_star": np.asarray(cat["IS_STAR"], dtype=bool),
    }
    urls = []
    for j in range(config.n_tiles_y):
        for i in range(config.n_tiles_x):
            x0, y0 = i * inner, j * inner
            tid = j * config.n_tiles_x + i
            tw = make_tan_wcs(config.ra_center_deg, config.dec_center_deg, pixel_scale_arcsec=s_hr,
                              shape=(n_side, n_side))
            tw.wcs.crpix = np.asarray(tw.wcs.crpix) - [x0, y0]
            tw.pixel_shape = (tile_px, tile_px)
            img = mosaic[y0:y0 + tile_px, x0:x0 + tile_px].astype(np.float32)[None]
            sel = ((truth_all["x"] >= x0 - 0.5) & (truth_all["x"] < x0 + tile_px - 0.5)
                   & (truth_all["y"] >= y0 - 0.5) & (truth_all["y"] < y0 + tile_px - 0.5))
            truth = {k: v[sel] for k, v in truth_all.items()}
            truth["x"] = truth["x"] - x0
            truth["y"] = truth["y"] - y0
            lo, hi = border - 0.5, border + inner - 0.5
            tile = Tile(tile_id=tid, source="", image=img, variance=np.full_like(img, sigma_hr**2),
                        mask=np.zeros(img.shape, np.int32), psf=psf[None].astype(np.float64),
                        wcs_header=tw.to_header(relax=True).tostring(), bands=(config.hr_band,),
                        inner=(lo, hi, lo, hi), tract_origin=(x0, y0), truth=truth, simulated=True)
            url = out_url.rstrip("/") + f"/tile_{tid:06d}.fits"
            urls.append(write_tile(tile, url, storage_options=storage_options))
    area = (config.n_tiles_x * inner * s_hr / 3600.0) * (config.n_tiles_y * inner * s_hr / 3600.0)
    inside = ((truth_all["x"] >= border - 0.5) & (truth_all["x"] < border + config.n_tiles_x * inner - 0.5)
              & (truth_all["y"] >= border - 0.5) & (truth_all["y"] < border + config.n_tiles_y * inner - 0.5))
    return {"tiles": urls, "n_truth": int(inside.sum()), "area_deg2": float(area), "hr_pixel_scale_arcsec": s_hr,
            "tile_side_arcsec": tile_px * s_hr, "seconds": time.perf_counter() - t0}
