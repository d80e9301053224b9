"""The training sample without a position prior: what the enhancer learns from.

Galaxy-centred stamps teach a super-resolution network where galaxies sit: every stamp has one at
its centre, so drawing one there pays off in training, and the shipped models did so on pure noise.
This recipe gives no position in the cutout a meaning. A training set is a mix of

- **sky crops**: random 22 x 22 LR windows of whole simulated sky tiles (galaxies of every
  magnitude, stars, empty sky, crowded groups, sources cut by the window's edge), degraded as a
  whole, with the co-aligned 64 x 64 HR window as the target (:func:`sky_crop_pairs`);
- **blends and single galaxies placed anywhere** in the cutout (``blends.placement: anywhere``),
  from the simulated sky's galaxies and, optionally, from real HST stamps (``real_galaxies``:
  real morphologies, arms, bars and clumps);
- **noise-only cutouts**: LR noise in, HR noise out (:func:`noise_only_pairs`).

Every LR input gets its sky noise here (:func:`add_lr_noise`, :class:`LRNoiseConfig`), at a depth
drawn between the band's and ``depth_factor_max`` times shallower, white or correlated like a
resampled coadd; the LR PSF of each part can be jittered in width (``psf_fwhm_jitter``) so the
model does not depend on a perfectly matched PSF, and can take the shape of a real survey PSF image
(``lr_psf_images``: wings, asymmetry, a core that is not a Moffat's) at those widths
(:func:`psf_shape_degrade_configs`). ``sigma_lr`` is the per-pixel standard deviation of the noise
added (what a MAD of the sky measures). A residual sky (``LRNoiseConfig.sky_residual``: a pedestal
and a gradient, as a coadd's background subtraction leaves them) can be added to both images of a
pair (:func:`add_sky_residual`): a smooth sky stays a smooth sky, never a source.

Every part draws from generators seeded by ``[seed, stream, item]``, so the sample is reproducible.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

from .blends import BlendConfig, simulate_blends, simulate_isolated
from .degrade import DegradeConfig, degrade_tile, get_degrader
from .errors import ConfigError, InputError
from .instrument import BandConfig
from .psf import PSFConfig, draw_psf, measure_fwhm, read_psf
from .tiles import Tile

__all__ = ["LRNoiseConfig", "correlated_noise", "add_lr_noise", "jittered_degrade_configs", "psf_shape_degrade_configs",
           "add_sky_residual", "sky_crop_pairs",
           "noise_only_pairs", "placed_pairs", "concat_pairs", "describe"]

log = logging.getLogger(__name__)

_PAIR_KEYS = ("image_lr", "image_hr", "sigma_lr")
# Streams of the generators (second seed entry), one per part of the sample.
_STREAM_NOISE, _STREAM_CROPS, _STREAM_NOISE_ONLY, _STREAM_SKY = 11, 12, 13, 14


@dataclass(frozen=True)
class LRNoiseConfig:
    """The LR sky noise of the training inputs.

    Attributes
    ----------
    depth_factor_max : float
        The noise sigma per item is the band's ``sky_sigma`` times a factor drawn log-uniformly in
        ``[1, depth_factor_max]`` (1: the band's depth only; 3: HSC UltraDeep i to about Wide).
    correlated_fraction : float
        Share of the items whose noise is correlated like a resampled coadd: white noise convolved
        with a bilinear interpolation kernel of random sub-pixel phases (``max_phase``), rescaled to
        the same per-pixel sigma.
    max_phase : float
        Largest sub-pixel phase of that kernel along each axis (0.5: neighbour correlation up to 0.5).
    sky_residual : float
        Largest residual sky per item, in units of its LR noise sigma: a pedestal drawn uniformly in
        ``+- sky_residual`` plus a plane whose change across the cutout is drawn in the same range
        (:func:`add_sky_residual`; 0: none).
    """

    depth_factor_max: float = 1.0
    correlated_fraction: float = 0.0
    max_phase: float = 0.5
    sky_residual: float = 0.0

    def __post_init__(self):
        if not self.depth_factor_max >= 1.0:
            raise ConfigError("data.noise.depth_factor_max", f"must be >= 1, got {self.depth_factor_max}")
        if not 0.0 <= self.correlated_fraction <= 1.0:
            raise ConfigError("data.noise.correlated_fraction", f"must be in [0, 1], got {self.correlated_fraction}")
        if not 0.0 <= self.max_phase <= 0.5:
            raise ConfigError("data.noise.max_phase", f"must be in [0, 0.5], got {self.max_phase}")
        if not 0.0 <= self.sky_residual <= 5.0:
            raise ConfigError("data.noise.sky_residual", f"must be in [0, 5], got {self.sky_residual}")


def correlated_noise(shape: tuple[int, ...], rng: np.random.Generator, *, phase: tuple[float, float]) -> np.ndarray:
    """Unit-variance noise of ``shape`` (..., H, W) correlated by a bilinear kernel of sub-pixel ``phase``
    (dy, dx): what resampling white noise onto a shifted grid leaves (a coadd's warping)."""
    dy, dx = phase
    ky, kx = np.array([1.0 - dy, dy]), np.array([1.0 - dx, dx])
    kernel = np.outer(ky, kx)
    kernel /= np.sqrt((kernel**2).sum())  # unit per-pixel variance after the convolution
    h, w = shape[-2:]
    white = rng.standard_normal((*shape[:-2], h + 1, w + 1))
    out = ndimage.convolve(white, kernel.reshape((1,) * (white.ndim - 2) + kernel.shape), mode="constant")
    return out[..., 1:, 1:].astype(np.float32)


def add_lr_noise(image_lr: np.ndarray, sky_sigma: Sequence[float], *, config: LRNoiseConfig, seed: int,
                 stream: int = _STREAM_NOISE, base_variance: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Add sky noise to noiseless LR inputs ``(N, C, h, w)``; returns ``(image_lr, sigma_lr (N, C))``.

    Item ``i`` draws its depth factor, noise kind and noise from ``default_rng([seed, stream, i])``.
    ``base_variance`` ``(N, C)``: variance already in the inputs (the HR noise carried through the
    degradation), added to ``sigma_lr`` in quadrature.
    """
    image = np.array(image_lr, dtype=np.float32, copy=True)
    n, c = image.shape[:2]
    base = np.asarray(sky_sigma, dtype=np.float64).reshape(c)
    sigma = np.empty((n, c), dtype=np.float64)
    log_max = np.log(config.depth_factor_max)
    for i in range(n):
        rng = np.random.default_rng([int(seed), int(stream), i])
        factor = float(np.exp(rng.uniform(0.0, log_max))) if log_max > 0 else 1.0
        s = base * factor
        if rng.uniform() < config.correlated_fraction:
            draw = correlated_noise(image.shape[1:], rng, phase=tuple(rng.uniform(0.0, config.max_phase, 2)))
        else:
            draw = rng.standard_normal(image.shape[1:], dtype=np.float32)
        image[i] += draw * s[:, None, None].astype(np.float32)
        sigma[i] = s
    if base_variance is not None:
        sigma = np.sqrt(sigma**2 + np.asarray(base_variance, dtype=np.float64).reshape(n, c))
    return image, sigma.astype(np.float32)


def _width_factors(jitter: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` FWHM factors spread evenly over ``1 +- jitter`` (all 1 for no jitter), shuffled by ``rng``."""
    if not jitter < 0.5:
        raise ConfigError("data.psf_fwhm_jitter", f"must be < 0.5, got {jitter}")
    factors = np.linspace(1.0 - jitter, 1.0 + jitter, n) if jitter > 0 and n > 1 else np.ones(max(n, 1))
    rng.shuffle(factors)
    return factors


def jittered_degrade_configs(config: DegradeConfig, *, jitter: float, n: int, seed: int) -> list[DegradeConfig]:
    """``n`` copies of ``config`` whose LR PSFs have their FWHM scaled by factors spread evenly over
    ``1 +- jitter`` (shuffled by ``seed``); ``jitter = 0`` gives ``[config] * n``."""
    if jitter <= 0 or n <= 1:
        return [config] * max(n, 1)
    out = []
    for f in _width_factors(jitter, n, np.random.default_rng([int(seed), 5])):
        low = tuple(replace(b, psf=replace(b.psf, fwhm_arcsec=b.psf.fwhm_arcsec * float(f))) for b in config.low)
        out.append(replace(config, low=low))
    return out


def psf_shape_degrade_configs(config: DegradeConfig, files: Sequence[str | Path], *, pixel_scale_arcsec: float,
                              jitter: float, n: int, seed: int) -> list[DegradeConfig]:
    """``n`` copies of ``config`` whose LR PSF is a real PSF image (``files``, drawn in turn after a
    shuffle by ``seed``), its sampling rescaled so that its FWHM is the band's FWHM times factors
    spread evenly over ``1 +- jitter``: real PSF shapes at the widths the model is trained for.

    ``pixel_scale_arcsec`` is the sampling of the PSF images (0.168 for HSC's PSF picker). A file that
    cannot be read or measured is an error that names it. (The image's own pixel response is rescaled
    with it: under 1 % of the FWHM at HSC's sampling.)
    """
    files = [str(f) for f in files]
    if not files:
        raise ConfigError("data.lr_psf_images", "matches no PSF file")
    if not pixel_scale_arcsec > 0:
        raise ConfigError("data.lr_psf_pixel_scale_arcsec", f"must be > 0, got {pixel_scale_arcsec}")
    rng = np.random.default_rng([int(seed), 6])
    order = [files[i] for i in rng.permutation(len(files))]
    out = []
    for j, f in enumerate(_width_factors(jitter, n, rng)):
        path = order[j % len(order)]
        fwhm = measure_fwhm(read_psf(path), pixel_scale_arcsec=pixel_scale_arcsec)
        if not fwhm > 0:
            raise InputError(path, "its FWHM cannot be measured (not a peaked PSF image)")
        low = []
        for b in config.low:
            target = b.psf.fwhm_arcsec * float(f)
            low.append(replace(b, psf=PSFConfig(kind="fits", path=path,
                                                pixel_scale_arcsec=pixel_scale_arcsec * target / fwhm)))
        out.append(replace(config, low=tuple(low)))
    return out


def add_sky_residual(pairs: Mapping[str, np.ndarray], *, amplitude: float, seed: int) -> dict[str, np.ndarray]:
    """A residual sky on both images of each pair: a pedestal ``a`` and a plane ``gx x + gy y``
    (``x, y`` in units of the cutout's side, centred), ``a, gx, gy`` uniform in ``+- amplitude``
    times the item's ``sigma_lr``, drawn from ``default_rng([seed, 14, i])``. The HR image gets the
    same sky per unit area (divided by the pixel-area ratio), so the model learns to carry a smooth
    sky through, not to make sources of it or to subtract it."""
    if amplitude <= 0 or not len(pairs.get("image_lr", ())):
        return dict(pairs)
    lr = np.array(pairs["image_lr"], dtype=np.float32, copy=True)
    hr = np.array(pairs["image_hr"], dtype=np.float32, copy=True)
    n, c, h, w = lr.shape
    hh, hw = hr.shape[-2:]
    area = (hh / h) * (hw / w)

    def plane(size_y, size_x):
        y = (np.arange(size_y) + 0.5) / size_y - 0.5
        x = (np.arange(size_x) + 0.5) / size_x - 0.5
        return y[:, None], x[None, :]

    ly, lx = plane(h, w)
    hy, hx = plane(hh, hw)
    sig = np.asarray(pairs["sigma_lr"], dtype=np.float64).reshape(n, -1)
    for i in range(n):
        a, gx, gy = np.random.default_rng([int(seed), _STREAM_SKY, i]).uniform(-amplitude, amplitude, 3)
        for ch in range(c):
            s = sig[i, min(ch, sig.shape[1] - 1)]
            lr[i, ch] += (s * (a + gx * lx + gy * ly)).astype(np.float32)
            if ch < hr.shape[1]:
                hr[i, ch] += (s * (a + gx * hx + gy * hy) / area).astype(np.float32)
    out = dict(pairs)
    out["image_lr"], out["image_hr"] = lr, hr
    return out


def _read_mosaic(paths: Mapping[str, str | Path], names: Sequence[str]) -> tuple[np.ndarray, WCS]:
    planes, wcs = [], None
    for name in names:
        with fits.open(paths[name]) as hdul:
            hdu = next((h for h in hdul if h.data is not None and h.header.get("NAXIS", 0) >= 2), None)
            if hdu is None:
                raise InputError(str(paths[name]), "holds no image HDU")
            planes.append(np.asarray(hdu.data, dtype=np.float32))
            wcs = wcs or WCS(hdu.header).celestial
    return np.stack(planes), wcs


def sky_crop_pairs(tiles: Sequence[Mapping[str, str | Path]], *, degrade_configs: Sequence[DegradeConfig],
                   high_bands: Sequence[BandConfig], n_pairs: int, noise: LRNoiseConfig, seed: int,
                   lr_size: int = 22, hr_size: int = 64, min_dec_deg: float | None = None, edge_lr_px: int = 6
                   ) -> dict[str, np.ndarray]:
    """Random co-aligned (LR, HR) windows of whole simulated sky tiles.

    Each tile's HR mosaic (``tiles[k][band]``, as :func:`galgan_ray.dataset.make_sky_tiles` writes
    them) is degraded as a whole, noise-free (:func:`galgan_ray.degrade.degrade_tile`, with
    ``degrade_configs[k % len]``: LR pixel J holds HR pixels 3J .. 3J+2), and ``n_pairs`` windows are
    drawn uniformly over the tiles, ``edge_lr_px`` inside their edges (where the degradation saw
    the whole PSF) and, with ``min_dec_deg``, north of it (the held-out southern sky stays out).
    An LR window at origin ``(x0, y0)`` pairs with the HR window at ``(3 x0 + 1, 3 y0 + 1)`` of side
    ``hr_size``: the model's output grid (66 px cropped by 1). The LR noise is then added by
    :func:`add_lr_noise`.

    Returns
    -------
    dict
        ``image_lr`` (N, C, 22, 22), ``image_hr`` (N, C, 64, 64), ``sigma_lr`` (N, C).
    """
    if n_pairs <= 0 or not tiles:
        return {}
    names = [b.name for b in high_bands]
    r = int(round(degrade_configs[0].ratio))
    crop = (lr_size * r - hr_size) // 2
    per_tile = np.bincount(np.random.default_rng([int(seed), _STREAM_CROPS]).integers(len(tiles), size=n_pairs),
                           minlength=len(tiles))
    lr_out = np.empty((n_pairs, len(names), lr_size, lr_size), dtype=np.float32)
    hr_out = np.empty((n_pairs, len(names), hr_size, hr_size), dtype=np.float32)
    base_var = np.empty((n_pairs, len(names)), dtype=np.float64)
    side = max(draw_psf(b.psf, pixel_scale_arcsec=b.pixel_scale_arcsec).shape[0] for b in high_bands)
    psf_hr = np.stack([draw_psf(b.psf, pixel_scale_arcsec=b.pixel_scale_arcsec, size=side) for b in high_bands])
    k_out = 0
    for k, tile_paths in enumerate(tiles):
        if per_tile[k] == 0:
            continue
        mosaic, wcs = _read_mosaic(tile_paths, names)
        dc = degrade_configs[k % len(degrade_configs)]
        hr_tile = Tile(tile_id=k, source=str(tile_paths[names[0]]), image=mosaic,
                       variance=np.stack([np.full(mosaic.shape[1:], b.sky_sigma**2, np.float32) for b in high_bands]),
                       mask=np.zeros(mosaic.shape, np.int32), psf=psf_hr.astype(np.float64),
                       wcs_header=wcs.to_header(relax=True).tostring(), bands=tuple(b.key for b in high_bands),
                       inner=(-0.5, mosaic.shape[2] - 0.5, -0.5, mosaic.shape[1] - 0.5))
        lr_tile = degrade_tile(hr_tile, config=dc, seed=int(seed), add_noise=False)
        hl, wl = lr_tile.image.shape[1:]
        y_lo = edge_lr_px
        if min_dec_deg is not None:  # north-up TAN: dec grows with y; keep windows wholly north of the split
            _, y_split = wcs.all_world2pix(wcs.wcs.crval[0], min_dec_deg, 0)
            y_lo = max(y_lo, int(np.ceil((float(y_split) - 1) / r)) + 1)
        y_hi, x_hi = hl - edge_lr_px - lr_size, wl - edge_lr_px - lr_size
        if y_hi < y_lo or x_hi < edge_lr_px:
            continue
        rng = np.random.default_rng([int(seed), _STREAM_CROPS, k])
        ys = rng.integers(y_lo, y_hi + 1, size=per_tile[k])
        xs = rng.integers(edge_lr_px, x_hi + 1, size=per_tile[k])
        prop_var = np.median(lr_tile.variance[:, edge_lr_px:-edge_lr_px, edge_lr_px:-edge_lr_px], axis=(1, 2))
        for y0, x0 in zip(ys, xs):
            lr_out[k_out] = lr_tile.image[:, y0:y0 + lr_size, x0:x0 + lr_size]
            hy, hx = r * y0 + crop, r * x0 + crop
            hr_out[k_out] = mosaic[:, hy:hy + hr_size, hx:hx + hr_size]
            base_var[k_out] = prop_var
            k_out += 1
    lr_out, hr_out, base_var = lr_out[:k_out], hr_out[:k_out], base_var[:k_out]
    if k_out < n_pairs:
        log.warning("sky crops: %d of %d drawn (tiles too small or south of the split)", k_out, n_pairs)
    sky = [b.sky_sigma for b in degrade_configs[0].low]
    image_lr, sigma_lr = add_lr_noise(lr_out, sky, config=noise, seed=seed, stream=_STREAM_CROPS,
                                      base_variance=base_var)
    return {"image_lr": image_lr, "image_hr": hr_out, "sigma_lr": sigma_lr}


def noise_only_pairs(n: int, *, degrade_config: DegradeConfig, noise: LRNoiseConfig, seed: int,
                     lr_size: int = 22, hr_size: int = 64) -> dict[str, np.ndarray]:
    """``n`` cutouts of empty sky: LR sky noise in, the HR band's white noise as the target."""
    if n <= 0:
        return {}
    c = len(degrade_config.low)
    zeros = np.zeros((n, c, lr_size, lr_size), dtype=np.float32)
    image_lr, sigma_lr = add_lr_noise(zeros, [b.sky_sigma for b in degrade_config.low], config=noise, seed=seed,
                                      stream=_STREAM_NOISE_ONLY)
    sigma_hr = np.array([b.sky_sigma for b in degrade_config.high], dtype=np.float32)
    rng = np.random.default_rng([int(seed), _STREAM_NOISE_ONLY, 10**9])
    image_hr = rng.standard_normal((n, c, hr_size, hr_size), dtype=np.float32) * sigma_hr[None, :, None, None]
    return {"image_lr": image_lr, "image_hr": image_hr, "sigma_lr": sigma_lr}


def placed_pairs(galaxies: Mapping[str, np.ndarray], *, degrade_configs: Sequence[DegradeConfig],
                 blends: BlendConfig, n_pairs: int, blend_fraction: float, noise: LRNoiseConfig, seed: int,
                 stream: int) -> dict[str, np.ndarray]:
    """Blends and single galaxies (``blends.placement`` decides where they go), degraded noise-free with
    the configs in turn (equal chunks), then given LR noise by :func:`add_lr_noise`."""
    if n_pairs <= 0:
        return {}
    n_b = int(round(n_pairs * blend_fraction))
    blends = replace(blends, rotation="arbitrary")
    chunks = len(degrade_configs)
    parts = []
    for j, dc in enumerate(degrade_configs):
        dc = replace(dc, add_noise=False)
        nb = n_b * (j + 1) // chunks - n_b * j // chunks
        ni = (n_pairs - n_b) * (j + 1) // chunks - (n_pairs - n_b) * j // chunks
        first = n_pairs * j // chunks
        if nb:
            batch, _, _ = simulate_blends(dict(galaxies), config=blends, degrade_config=dc, n_blends=nb,
                                          seed=seed + 7919 * stream, first_id=first)
            parts.append({k: batch[k] for k in ("image_lr", "image_hr")})
        if ni:
            batch, _, _ = simulate_isolated(dict(galaxies), config=blends, degrade_config=dc, n=ni,
                                            seed=seed + 7919 * stream, first_id=10**7 + first)
            parts.append({k: batch[k] for k in ("image_lr", "image_hr")})
    image_lr = np.concatenate([p["image_lr"] for p in parts])
    image_hr = np.concatenate([p["image_hr"] for p in parts])
    # The HR noise the stamps carry, through the degradation (measured on degraded HR noise): small
    # next to the LR sky, but counted in sigma_lr.
    dc0 = replace(degrade_configs[0], add_noise=False)
    c = image_lr.shape[1]
    sigma_hr = np.asarray(galaxies.get("sigma_hr", np.zeros((1, c))), dtype=np.float64).reshape(-1, c)
    hr_sigma = np.nan_to_num(np.nanmedian(sigma_hr, axis=0))
    probe = np.random.default_rng([int(seed), stream, 10**9 + 1]).standard_normal((16, c, *image_hr.shape[-2:]))
    probe_lr = get_degrader(dc0)((probe * hr_sigma[None, :, None, None]).astype(np.float32))["image_lr"]
    hr_var = probe_lr[..., 4:-4, 4:-4].var(axis=(0, 2, 3))
    base_var = np.broadcast_to(hr_var, (len(image_lr), c))
    image_lr, sigma_lr = add_lr_noise(image_lr, [b.sky_sigma for b in dc0.low], config=noise, seed=seed,
                                      stream=stream, base_variance=base_var)
    return {"image_lr": image_lr, "image_hr": image_hr, "sigma_lr": sigma_lr}


def concat_pairs(parts: Sequence[Mapping[str, np.ndarray]], *, seed: int) -> dict[str, np.ndarray]:
    """The non-empty parts, concatenated and shuffled (``default_rng([seed, 7])``)."""
    parts = [p for p in parts if p]
    out = {k: np.concatenate([p[k] for p in parts]) for k in _PAIR_KEYS}
    order = np.random.default_rng([int(seed), 7]).permutation(len(out["image_lr"]))
    return {k: v[order] for k, v in out.items()}


def describe(parts: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """Pairs per part (for the checkpoint's data info)."""
    return {name: int(len(p["image_lr"])) if p else 0 for name, p in parts.items()}


