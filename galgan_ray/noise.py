"""The noise of transformed images, calibrated one way for every detector that looks at them.

A transform of a noisy image (an enhancer, bicubic upsampling, Richardson-Lucy) changes its noise:
correlated, amplified, and for an enhancer not even the same everywhere. The matched-filter
detector (:mod:`galgan_ray.detect`) assumes white noise of known RMS, so each transform is
calibrated on noise:

- :func:`significance_noise_scale`: pure-noise images of unit RMS go through the transform and the
  matched filter; the RMS of the significance map away from the edges is rho, and
  ``noise_sigma = rho * sigma_lr`` gives unit-variance significance on the sky. Exact for linear
  transforms; for scale-equivariant ones it holds on the sky.
- :func:`enhanced_noise_scale`: that calibration for a super-resolution model (its inputs are
  divided by their own sigma, so one calibration serves every depth).
- :class:`EnhancedNoiseModel` (:func:`enhanced_noise_model`): the noise of enhanced images as a
  function of the filtered signal level, by Monte Carlo on galaxies: it grows on galaxies, where a
  change of the input moves the predicted structure.

The blend benchmark and the field job use the same level-dependent model, calibrated the same way:
the benchmark on its isolated galaxies, the field job on :func:`calibration_galaxies` drawn on the
model's grid (it has no galaxies of its own to spare); :func:`enhanced_noise_scale` (the sky level
alone) remains for transforms that are not enhancers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import galsim
import numpy as np

from .degrade import degrade
from .detect import DetectConfig, detection_images, matched_filter
from .errors import InputError
from .psf import psf_profile

__all__ = ["significance_noise_scale", "enhanced_noise_scale", "EnhancedNoiseModel", "enhanced_noise_model",
           "calibration_galaxies"]


def significance_noise_scale(
    transform: Callable[[np.ndarray], np.ndarray],
    *,
    shape: tuple[int, int],
    psf_out: np.ndarray,
    n_realizations: int = 64,
    margin_px: int | None = None,
    seed: int = 0,
    psf_energy: float = DetectConfig().psf_energy,
) -> float:
    """Noise factor rho of a scale-equivariant image transform, for matched-filter detection.

    Parameters
    ----------
    transform : callable
        ``(M, H, W)`` input images of white noise with unit RMS -> ``(M, H', W')`` outputs. Must
        satisfy ``transform(a * x) = a * transform(x)`` for a > 0 for rho to carry over to any RMS.
    shape : (int, int)
        ``(H, W)`` of the inputs.
    psf_out : numpy.ndarray
        The PSF used to detect on the outputs.
    n_realizations : int
        Noise images drawn (``np.random.default_rng(seed)``).
    margin_px : int, optional
        Output pixels ignored at each edge; default one output-PSF FWHM.
    seed : int
        Seed of the noise realisations.
    psf_energy : float
        As :attr:`DetectConfig.psf_energy` (the trimming of the filter).

    Returns
    -------
    float
        rho: pass ``noise_sigma = rho * sigma_in`` to the detector on transformed images.
    """
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((n_realizations,) + tuple(shape)).astype(np.float32)
    out = np.asarray(transform(noise))
    mf = matched_filter(out, psf=psf_out, noise_sigma=1.0, psf_energy=psf_energy)
    m = int(np.ceil(mf["fwhm_px"])) if margin_px is None else int(margin_px)
    sig = mf["significance"][:, m: out.shape[1] - m, m: out.shape[2] - m]
    if sig.size == 0:
        raise InputError("significance_noise_scale", f"margin {m} px leaves no pixels of {out.shape[1:]}")
    return float(sig.std())


def enhanced_noise_scale(enhance_plane: Callable[..., np.ndarray], *, n_bands: int, psf_hr: np.ndarray,
                         detect: DetectConfig, size: int = 48, n_realizations: int = 16, seed: int = 0) -> float:
    """rho such that ``noise_sigma = rho * sigma_lr`` is the right matched-filter noise on enhanced images.

    The enhancer divides its input by ``sigma_lr`` (the normalisation contract of
    :mod:`galgan_ray.models`), so one calibration at ``sigma_lr = 1`` serves every depth: pure
    unit-noise LR images of ``size`` x ``size`` are enhanced as whole images, the way the field job
    and ``galgan enhance`` enhance (``enhance_plane(plane (C, H, W), sigma (C,)) -> (C, 3H, 3W)``,
    :meth:`galgan_ray.enhance.Enhancer.enhance_plane`), and the standard deviation of their
    matched-filter significance (computed with noise 1, away from the edges) is rho
    (:func:`significance_noise_scale`).
    """
    def transform(x):
        x = np.asarray(x, dtype=np.float32)
        ones = np.ones(n_bands, np.float32)
        return np.stack([np.asarray(enhance_plane(np.repeat(p[None], n_bands, axis=0), ones))[0] for p in x])

    return float(significance_noise_scale(transform, shape=(size, size), psf_out=psf_hr,
                                          n_realizations=n_realizations, seed=seed, psf_energy=detect.psf_energy))


@dataclass(frozen=True)
class EnhancedNoiseModel:
    """The noise of a matched-filtered enhanced image as a function of its filtered signal level.

    An enhancer is not linear: the noise in its output is not white and grows where there is a
    galaxy (there a change of the input moves the predicted structure). ``levels`` are filtered
    signal levels ``L`` (the significance the image would have with white noise at the nominal
    ``sigma_lr``), ``rho`` the noise there in the same units; between levels it is interpolated,
    beyond them held. A filtered enhanced image's significance is ``L / rho(L)``.
    """

    levels: tuple[float, ...]
    rho: tuple[float, ...]

    def __call__(self, level: np.ndarray) -> np.ndarray:
        """Noise factors at white-noise significance ``level`` (any shape): the ``noise_scale`` of
        :func:`galgan_ray.detect.find_peaks_batch`."""
        return np.interp(level, self.levels, self.rho).astype(np.float32)

    def summary(self) -> dict[str, Any]:
        return {"levels": [round(float(v), 4) for v in self.levels], "rho": [round(float(v), 4) for v in self.rho],
                "rho_sky": float(np.interp(0.0, self.levels, self.rho)), "rho_max": float(max(self.rho))}


def enhanced_noise_model(enh, images_hr: np.ndarray, sigma_lr: np.ndarray, *, degrade_config, psf: np.ndarray,
                         n_draws: int = 8, percentile: float = 90.0, n_levels: int = 24, seed: int = 0,
                         det: DetectConfig = DetectConfig(), min_pixels: int = 200,
                         channel: int | None = None) -> EnhancedNoiseModel:
    """Calibrate :class:`EnhancedNoiseModel` for an enhancer by Monte Carlo on isolated galaxies.

    The galaxies are degraded without noise, ``n_draws`` noise realisations at their ``sigma_lr``
    are added, each is enhanced and matched-filtered with the detection PSF. At every pixel the
    standard deviation over the draws is the noise there (relative to the nominal white noise);
    pixels are grouped by filtered signal level (the draws' mean: ``n_levels`` bins of equal counts,
    and above level 1 four bins per decade, each of at least ``min_pixels``), and in each group the
    ``percentile`` of the noise is ``rho``. The enhancer works on
    inputs divided by their own sigma, so the model carries over to any depth. ``channel``: detection
    on that output channel alone (a multi-band enhancer scored on one band).
    """
    images_hr = np.asarray(images_hr)
    m = len(images_hr)
    clean = degrade(images_hr, config=replace(degrade_config, add_noise=False))["image_lr"]
    s = np.asarray(sigma_lr, dtype=np.float32)[:m]
    rng = np.random.default_rng([seed, 99])
    noisy = clean[:, None] + rng.normal(0.0, 1.0, (m, n_draws) + clean.shape[1:]).astype(np.float32) * s[:, None, :, None, None]
    sr = enh.enhance_cutouts(noisy.reshape((m * n_draws,) + clean.shape[1:]), np.repeat(s, n_draws, axis=0))
    s_rep = np.repeat(s, n_draws, axis=0)
    if channel is not None:
        sr, s_rep = sr[:, channel:channel + 1], s_rep[:, channel:channel + 1]
    img, noise = detection_images(sr, s_rep)
    sig = np.asarray(matched_filter(img, psf=psf, noise_sigma=noise, psf_energy=det.psf_energy)["significance"])
    sig = sig.reshape((m, n_draws) + sig.shape[-2:])
    level = sig.mean(axis=1).reshape(-1)
    std = sig.std(axis=1, ddof=1).reshape(-1)
    # Bins of equal counts hold the sky and the faint outskirts; above level 1 they are joined by
    # bins of equal width in log(level), so that the bright cores (few pixels, the most noise) do not
    # share one bin with everything above the sky. Bins with fewer than min_pixels are merged upward.
    edges = np.quantile(level, np.linspace(0.0, 1.0, n_levels + 1))
    top = float(level.max())
    if top > 2.0:
        edges = np.union1d(edges, np.geomspace(1.0, top, max(int(np.ceil(4 * np.log10(top))), 2) + 1))
    which = np.clip(np.searchsorted(edges, level, side="right") - 1, 0, len(edges) - 2)
    bins, acc = [], np.zeros(level.shape, bool)
    for k in range(len(edges) - 1):  # ascending levels
        acc |= which == k
        if acc.sum() >= min_pixels or (k == len(edges) - 2 and acc.any()):
            bins.append(acc)
            acc = np.zeros(level.shape, bool)
    return EnhancedNoiseModel(levels=tuple(float(np.median(level[b])) for b in bins),
                              rho=tuple(float(np.percentile(std[b], percentile)) for b in bins))


def calibration_galaxies(degrade_config, *, n: int = 48, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free galaxies on the HR grid of ``degrade_config`` for :func:`enhanced_noise_model`.

    Bulge + disk galaxies (half-light radii 0.1-0.8", bulge fractions 0-0.6, axis ratios 0.3-1) and
    a sixth of point sources, convolved with the HR band's PSF, at random positions within 0.5" of
    the centre and with LR point-source S/N drawn log-uniformly in [10, 1000] at the LR band's
    ``sky_sigma``: the range of levels the field's enhanced images hold.

    Returns
    -------
    images_hr : numpy.ndarray
        float32 ``(n, C, size, size)`` in the HR bands' units (the same galaxy in every band,
        scaled to each LR band's depth).
    sigma_lr : numpy.ndarray
        float32 ``(n, C)``: the LR bands' ``sky_sigma``.
    """
    rng = np.random.default_rng([int(seed), 41])
    high, low = degrade_config.high, degrade_config.low
    scale = high[0].pixel_scale_arcsec
    fwhm_lr = max(float(low[0].psf.fwhm_arcsec), 2 * low[0].pixel_scale_arcsec)
    n_eff = 4 * np.pi * (fwhm_lr / 2.355 / low[0].pixel_scale_arcsec) ** 2  # LR pixels of a point source
    sigma_lr = np.array([b.sky_sigma for b in low], dtype=np.float32)
    unit = np.array([lb.to_njy / hb.to_njy for hb, lb in zip(high, low)])
    images = np.zeros((n, len(high), size, size), dtype=np.float32)
    for i in range(n):
        snr = float(np.exp(rng.uniform(np.log(10.0), np.log(1000.0))))
        if rng.uniform() < 1 / 6:
            gal = galsim.DeltaFunction()
        else:
            hlr = float(rng.uniform(0.1, 0.8))
            disk = galsim.Exponential(half_light_radius=hlr).shear(q=float(rng.uniform(0.3, 1.0)),
                                                                   beta=float(rng.uniform(0, 180)) * galsim.degrees)
            bt = float(rng.uniform(0.0, 0.6))
            gal = (1 - bt) * disk + bt * galsim.DeVaucouleurs(half_light_radius=max(0.3 * hlr, 0.05))
        offset = rng.uniform(-0.5, 0.5, 2) / scale
        for c, band in enumerate(high):
            flux = snr * float(sigma_lr[c]) * np.sqrt(n_eff) * unit[c]
            obj = galsim.Convolve(gal.withFlux(flux), psf_profile(band.psf))
            images[i, c] = obj.drawImage(nx=size, ny=size, scale=scale, offset=tuple(offset)).array
    return images, np.broadcast_to(sigma_lr, (n, len(high))).copy()
