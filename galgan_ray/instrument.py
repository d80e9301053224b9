"""Instruments as data: a frozen :class:`BandConfig` per band, read from ``data/instruments.yaml``.

``get_band("hst", "F775W")`` and ``get_band("hsc", "i")`` are the defaults of the paper's experiment
(HST ACS F775W at 0.06"/px, HSC i at 0.18"/px). A new survey is one more YAML entry, or a
``BandConfig`` built in code / loaded from a user's YAML with :func:`galgan_ray.config.from_dict`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources

import numpy as np
import yaml

from .config import from_dict
from .errors import ConfigError
from .psf import PSFConfig, draw_psf

__all__ = ["BandConfig", "get_band", "list_bands", "HST_BANDS", "HSC_BANDS",
           "DEFAULT_HIGH", "DEFAULT_LOW"]

HST_BANDS: tuple[str, ...] = ("F435W", "F606W", "F775W", "F814W", "F850LP", "F125W", "F160W")
HSC_BANDS: tuple[str, ...] = ("g", "r", "i", "z", "y")
NJY_ZEROPOINT = 31.4  # AB magnitude of 1 nJy


@dataclass(frozen=True)
class BandConfig:
    """One band of one instrument: pixel grid, PSF, photometric zero point and depth.

    Attributes
    ----------
    survey : str
        ``hst``, ``hsc``, ``hsc_like``, ``lsst``, ``euclid``, ... (free text).
    name : str
        Band name, e.g. ``F775W`` or ``i``.
    pixel_scale_arcsec : float
    psf : PSFConfig
    zeropoint_mag : float
        AB magnitude of one image unit; 31.4 means pixels are in nJy.
    depth_5sigma_mag : float
        5-sigma point-source depth; :attr:`sky_sigma` follows from it and the PSF.
    wavelength_nm : float
    """

    survey: str = "hsc"
    name: str = "i"
    pixel_scale_arcsec: float = 0.18
    psf: PSFConfig = field(default_factory=PSFConfig)
    zeropoint_mag: float = NJY_ZEROPOINT
    depth_5sigma_mag: float = 26.2
    wavelength_nm: float = 770.0

    def __post_init__(self):
        if not self.pixel_scale_arcsec > 0:
            raise ConfigError(f"{self.survey}.{self.name}", "pixel_scale_arcsec must be > 0")

    @property
    def key(self) -> str:
        """``survey/name``, the band's identity in checkpoints and catalogs."""
        return f"{self.survey}/{self.name}"

    @property
    def to_njy(self) -> float:
        """Multiply image units by this to get nJy."""
        return 10.0 ** (-0.4 * (self.zeropoint_mag - NJY_ZEROPOINT))

    def flux_from_mag(self, mag):
        """Flux in image units of an AB magnitude."""
        return 10.0 ** (-0.4 * (mag - self.zeropoint_mag))

    def mag_from_flux(self, flux):
        """AB magnitude of a flux in image units (NaN where flux <= 0)."""
        flux = np.asarray(flux, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(flux > 0, self.zeropoint_mag - 2.5 * np.log10(flux), np.nan)

    @property
    def sky_sigma(self) -> float:
        """Sky noise per pixel (image units) that gives the 5-sigma point-source depth.

        For PSF-optimal photometry of a point source on white noise, S/N = F / (sigma * sqrt(N_eff))
        with N_eff = 1 / sum(p_i^2) of the pixelised PSF p (normalised to unit sum).
        """
        return _sky_sigma(self)


@lru_cache(maxsize=64)
def _sky_sigma(band: BandConfig) -> float:
    p = draw_psf(band.psf, pixel_scale_arcsec=band.pixel_scale_arcsec)
    n_eff = 1.0 / float((p**2).sum())
    return band.flux_from_mag(band.depth_5sigma_mag) / (5.0 * math.sqrt(n_eff))


@lru_cache(maxsize=1)
def _registry() -> dict:
    text = resources.files("galgan_ray").joinpath("data/instruments.yaml").read_text()
    return yaml.safe_load(text)


def list_bands() -> dict[str, list[str]]:
    """Surveys and their band names known to the built-in registry."""
    return {survey: list(bands) for survey, bands in _registry().items()}


def get_band(survey: str, name: str) -> BandConfig:
    """The built-in :class:`BandConfig` of ``survey``/``name`` (e.g. ``("hst", "F775W")``)."""
    reg = _registry()
    if survey not in reg:
        raise ConfigError("instruments.yaml", f"unknown survey {survey!r}; known: {sorted(reg)}")
    if name not in reg[survey]:
        raise ConfigError("instruments.yaml", f"survey {survey!r} has no band {name!r}; known: {list(reg[survey])}")
    return from_dict(BandConfig, {"survey": survey, "name": name, **reg[survey][name]},
                     where=f"instruments.yaml:{survey}.{name}")


DEFAULT_HIGH = ("hst", "F775W")
DEFAULT_LOW = ("hsc", "i")
