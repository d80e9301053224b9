"""Classic alternatives to the GAN, applied to the low-resolution (HSC-like) images.

Each baseline gives either peaks directly or an image plus the PSF and noise level to give to
:func:`galgan_ray.detect.find_peaks_batch`, so that the same detector judges every method:

(a) :func:`sep_deblend_peaks` - sep's (SExtractor's) multi-threshold deblending of the LR image
    (``deblend_nthresh=32``, ``deblend_cont=0.005``), each deblended object is a peak.
(b) :func:`richardson_lucy` - Richardson-Lucy deconvolution of the LR image with its PSF, then
    peak finding with the *effective* PSF of the deconvolved image (the deconvolution of the PSF
    itself under the same settings, narrower than the LR PSF).
(c) :func:`upsample_bicubic` - bicubic x3 upsampling of the LR image onto the co-centred 64x64 HR
    grid (66x66 cropped by 1 px on each side), flux conserving, then peak finding with the LR PSF
    upsampled by the same operator.

Noise. (b) and (c) change the noise: correlated after both, amplified by (b). The detector's
significance assumes white noise of known RMS, so each transform is calibrated once per setting
by :func:`significance_noise_scale`: pure-noise images of unit RMS go through the transform and
the matched filter, and the RMS of the resulting significance map (away from the edges) is the
factor rho such that ``noise_sigma = rho * sigma_lr`` gives unit-variance significance on the sky.
This is exact for the linear (c); for (b) it holds because this Richardson-Lucy is scale
equivariant (offset and start both proportional to sigma), but only on the sky: RL noise grows
with the local signal, so peaks on bright galaxies are more significant than they would be.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Literal

import numpy as np
import sep
import torch
import torch.nn.functional as F

from .detect import DetectConfig, _as_stack, _correlate_t, _subtract_background, find_peaks_batch, matched_filter
from .errors import ConfigError, InputError
from .flags import flag_bit
from .noise import significance_noise_scale
from .psf import measure_fwhm, normalize_psf

__all__ = [
    "SepDeblendConfig",
    "RLConfig",
    "sep_deblend_peaks",
    "richardson_lucy",
    "richardson_lucy_psf",
    "upsample_bicubic",
    "upsample_psf",
    "significance_noise_scale",
    "baseline_peaks",
]


# ----------------------------------------------------------------------------------------------
# helpers


def _sigma_array(noise_sigma, n: int, source: str) -> np.ndarray:
    s = np.broadcast_to(np.asarray(noise_sigma, dtype=np.float64), (n,)).copy()
    if not np.all(np.isfinite(s) & (s > 0)):
        raise InputError(source, "noise_sigma must be finite and > 0")
    return s


def _odd_psf(psf, source: str) -> np.ndarray:
    p = normalize_psf(psf, source=source)
    if p.shape[0] % 2 == 0 or p.shape[1] % 2 == 0:
        raise InputError(source, f"PSF image must have odd sides, got {p.shape}")
    return p


# ----------------------------------------------------------------------------------------------
# (a) sep deblending


@dataclass(frozen=True)
class SepDeblendConfig:
    """sep.extract settings for the multi-threshold deblending baseline.

    Attributes
    ----------
    thresh_nsigma : float
        Detection threshold in units of the per-pixel noise on the filtered image (sep's
        ``thresh`` with ``err``; SExtractor's DETECT_THRESH).
    minarea : int
        Minimum pixels above threshold.
    deblend_nthresh, deblend_cont : int, float
        SExtractor's DEBLEND_NTHRESH and DEBLEND_MINCONT.
    filter : {"default", "psf", "none"}
        Filter kernel: sep's (SExtractor's) 3x3 default, the PSF (trimmed to 99.9% of
        sum(psf^2)), or none. sep compares the *normalised-kernel-filtered* image with
        ``thresh_nsigma`` times the per-pixel RMS, so a PSF-wide filter lowers the peaks and
        with it the sensitivity (at 1.5 sigma it still finds 80-sigma HSC pairs 1.1" apart only
        one time in thirty); the 3x3 default at 1.5 sigma finds them all, with no detection on 200
        pure-noise 22x22 cutouts.
    clean, clean_param : bool, float
        SExtractor's CLEAN / CLEAN_PARAM.
    background : {"zero", "sep"}
        As :attr:`DetectConfig.background`.
    """

    thresh_nsigma: float = 1.5
    minarea: int = 5
    deblend_nthresh: int = 32
    deblend_cont: float = 0.005
    filter: Literal["default", "psf", "none"] = "default"
    clean: bool = True
    clean_param: float = 1.0
    background: Literal["zero", "sep"] = "zero"


def sep_deblend_peaks(
    images: np.ndarray,
    *,
    psf: np.ndarray,
    noise_sigma,
    config: SepDeblendConfig = SepDeblendConfig(),
) -> dict[str, np.ndarray]:
    """sep multi-threshold detection and deblending; each object is one peak.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W)`` (or ``(N, 1, H, W)``) LR images, or one ``(H, W)`` image.
    psf : numpy.ndarray
        The images' PSF (filter kernel when ``config.filter == "psf"``, and the matched filter
        that gives each object its ``significance``).
    noise_sigma : float or array_like
        Sky RMS per pixel, scalar or ``(N,)``.
    config : SepDeblendConfig

    Returns
    -------
    dict of numpy.ndarray, one row per object, ordered by image then decreasing significance
        ``index``: int64 image row (absent for a single 2-D image);
        ``x``, ``y``: float64 barycentre (0-based px);
        ``significance``: float32, matched-filter S/N at the nearest pixel (as ``find_peaks``);
        ``flux``: float32, sep's isophotal flux; ``npix``: int32 isophotal area;
        ``flags``: int32, ``PEAK_MERGED`` (sep OBJ_MERGED), ``EDGE`` (OBJ_TRUNC).
    """
    single = np.asarray(images).ndim == 2
    stack = _as_stack(np.asarray(images)[None] if single else images, "sep_deblend_peaks.images")
    n, h, w = stack.shape
    sigma = _sigma_array(noise_sigma, n, "sep_deblend_peaks.noise_sigma")
    p = _odd_psf(psf, "sep_deblend_peaks.psf")
    sub, _ = _subtract_background(np.nan_to_num(stack), DetectConfig(background=config.background), need_rms=False)
    mf = matched_filter(sub, psf=p, noise_sigma=sigma)
    if config.filter == "psf":
        kernel = np.ascontiguousarray(mf["kernel"], dtype=np.float32)
    elif config.filter == "default":
        kernel = np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=np.float32)
    elif config.filter == "none":
        kernel = None
    else:
        raise InputError("sep_deblend_peaks.filter", f"unknown filter {config.filter!r}")
    cols: dict[str, list] = {k: [] for k in ("index", "x", "y", "significance", "flux", "npix", "flags")}
    merged_bit, edge_bit = flag_bit("PEAK_MERGED"), flag_bit("EDGE")
    for i in range(n):
        data = np.ascontiguousarray(sub[i], dtype=np.float32)
        try:
            objs = sep.extract(data, config.thresh_nsigma, err=float(sigma[i]), minarea=config.minarea,
                               filter_kernel=kernel, deblend_nthresh=config.deblend_nthresh,
                               deblend_cont=config.deblend_cont, clean=config.clean,
                               clean_param=config.clean_param)
        except Exception as exc:  # sep raises plain Exceptions (pixel stack, deblending limits)
            raise InputError(f"sep_deblend_peaks.images[{i}]", f"sep.extract failed: {exc}") from exc
        if len(objs) == 0:
            continue
        x, y = objs["x"].astype(np.float64), objs["y"].astype(np.float64)
        ix = np.clip(np.rint(x).astype(int), 0, w - 1)
        iy = np.clip(np.rint(y).astype(int), 0, h - 1)
        fl = np.zeros(len(objs), np.int32)
        fl[(objs["flag"] & sep.OBJ_MERGED) > 0] |= merged_bit
        fl[(objs["flag"] & sep.OBJ_TRUNC) > 0] |= edge_bit
        cols["index"].append(np.full(len(objs), i, np.int64))
        cols["x"].append(x)
        cols["y"].append(y)
        cols["significance"].append(mf["significance"][i, iy, ix])
        cols["flux"].append(objs["flux"])
        cols["npix"].append(objs["npix"])
        cols["flags"].append(fl)
    dtypes = {"index": np.int64, "x": np.float64, "y": np.float64, "significance": np.float32,
              "flux": np.float32, "npix": np.int32, "flags": np.int32}
    out = {k: (np.concatenate(v) if v else np.zeros(0)).astype(dtypes[k]) for k, v in cols.items()}
    order = np.lexsort((-out["significance"], out["index"]))
    out = {k: v[order] for k, v in out.items()}
    if single:
        del out["index"]
    return out


# ----------------------------------------------------------------------------------------------
# (b) Richardson-Lucy


@dataclass(frozen=True)
class RLConfig:
    """Richardson-Lucy deconvolution of noisy, sky-subtracted images.

    Attributes
    ----------
    num_iter : int
        Iterations (more: sharper and noisier).
    offset_nsigma : float
        RL needs positive data: ``offset_nsigma * sigma`` is added before and subtracted after.
    clip_fraction : float
        Pixels still below ``clip_fraction * offset`` after the offset (noise dips deeper than
        ``offset_nsigma``) are raised to it; they are rare (0.13% of sky pixels at 3 sigma).
    pad : bool
        Reflect-pad by the PSF half-width before deconvolving (no dark/bright frame at the edges).
    psf_snr : float
        Matched-filter S/N of the point source deconvolved to get the effective PSF.
    n_realizations : int
        Noise images for :func:`significance_noise_scale`.
    seed : int
    """

    num_iter: int = 30
    offset_nsigma: float = 3.0
    clip_fraction: float = 1e-3
    pad: bool = True
    psf_snr: float = 30.0
    n_realizations: int = 32
    seed: int = 0

    def __post_init__(self):
        if self.num_iter < 1:
            raise ConfigError("rl.num_iter", f"must be >= 1, got {self.num_iter}")
        if self.offset_nsigma < 0 or self.clip_fraction < 0:
            raise ConfigError("rl.offset_nsigma", "offset_nsigma and clip_fraction must be >= 0")
        if not self.psf_snr > 0 or self.n_realizations < 2:
            raise ConfigError("rl.psf_snr", "need psf_snr > 0 and n_realizations >= 2")


def _rl_core(data: torch.Tensor, psf: np.ndarray, num_iter: int, init: torch.Tensor) -> torch.Tensor:
    """Batched Richardson-Lucy on positive (N, H, W) data (zero padding 'same', dtype of data)."""
    psf_flip = np.ascontiguousarray(psf[::-1, ::-1])
    est = init.clone()
    eps = 1e-12
    for _ in range(num_iter):
        model = _correlate_t(est, psf_flip)  # est convolved with the PSF
        ratio = data / torch.clamp(model, min=eps)
        est = est * _correlate_t(ratio, psf)  # correlated with the PSF
    return est


def _pad_mode(pad: tuple[int, int], shape: tuple[int, int]) -> str:
    return "reflect" if pad[0] < shape[0] and pad[1] < shape[1] else "replicate"


def _richardson_lucy_unit(stack: np.ndarray, sigma: np.ndarray, psf: np.ndarray, config: RLConfig) -> np.ndarray:
    n, h, w = stack.shape
    offset = config.offset_nsigma * sigma
    x = torch.from_numpy((np.asarray(stack, dtype=np.float64) + offset[:, None, None]).astype(np.float32))
    floor = torch.from_numpy((config.clip_fraction * offset).astype(np.float32))[:, None, None]
    x = torch.maximum(x, floor)
    pad = (psf.shape[0] // 2, psf.shape[1] // 2) if config.pad else (0, 0)
    if config.pad:
        x = F.pad(x[:, None], (pad[1], pad[1], pad[0], pad[0]), mode=_pad_mode(pad, (h, w)))[:, 0]
    # Start from a flat image at the data mean: keeps RL(a * d) = a * RL(d) (noise calibration).
    init = x.mean(dim=(1, 2), keepdim=True).expand_as(x)
    with torch.no_grad():
        est = _rl_core(x, psf, config.num_iter, init)
    est = est[:, pad[0]: pad[0] + h, pad[1]: pad[1] + w]
    return (est.numpy() - offset[:, None, None]).astype(np.float32)


@lru_cache(maxsize=16)
def _rl_psf_cached(psf_key: bytes, shape: tuple[int, int], config: RLConfig) -> np.ndarray:
    psf = np.frombuffer(psf_key, dtype=np.float64).reshape(shape)
    flux = config.psf_snr / np.sqrt((psf**2).sum())  # matched-filter S/N psf_snr at unit sky RMS
    point = (psf * flux)[None]
    eff = _richardson_lucy_unit(point, np.ones(1), psf, config)[0].astype(np.float64)
    eff = np.clip(eff, 0.0, None)
    out = eff / eff.sum()
    out.setflags(write=False)
    return out


def richardson_lucy_psf(psf: np.ndarray, *, config: RLConfig = RLConfig()) -> np.ndarray:
    """Effective PSF of a Richardson-Lucy-deconvolved image.

    The PSF itself, scaled to a point source of matched-filter S/N ``config.psf_snr`` over a sky of
    unit RMS, deconvolved with the same settings; negative pixels clipped, unit sum.

    Parameters
    ----------
    psf : numpy.ndarray
        The PSF of the images before deconvolution (odd sides).
    config : RLConfig

    Returns
    -------
    numpy.ndarray
        float64 image of the same shape as ``psf``, unit sum (read-only).
    """
    p = _odd_psf(psf, "richardson_lucy_psf.psf")
    return _rl_psf_cached(np.ascontiguousarray(p).tobytes(), p.shape, config)


@lru_cache(maxsize=16)
def _rl_rho(psf_key: bytes, shape: tuple[int, int], image_shape: tuple[int, int], config: RLConfig,
            psf_energy: float) -> float:
    psf = np.frombuffer(psf_key, dtype=np.float64).reshape(shape)
    eff = _rl_psf_cached(psf_key, shape, config)
    return significance_noise_scale(
        lambda z: _richardson_lucy_unit(z, np.ones(len(z)), psf, config),
        shape=image_shape, psf_out=eff, n_realizations=config.n_realizations, seed=config.seed,
        psf_energy=psf_energy)


def richardson_lucy(
    images: np.ndarray,
    *,
    psf: np.ndarray,
    noise_sigma,
    config: RLConfig = RLConfig(),
    background: Literal["zero", "sep"] = "zero",
    psf_energy: float = DetectConfig().psf_energy,
) -> dict:
    """Richardson-Lucy deconvolution of LR images, ready for :func:`find_peaks_batch`.

    Batched torch implementation of the RL iteration of ``skimage.restoration.richardson_lucy``
    (same update; differences: a flat start at the data mean instead of 0.5, so that the result
    scales with the data; optional reflect padding; float32 FFTs). Negative noisy pixels: the data are
    offset by ``config.offset_nsigma`` sky sigmas and floored (see :class:`RLConfig`).

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W)`` (or ``(N, 1, H, W)``) LR images, or one ``(H, W)`` image.
    psf : numpy.ndarray
        Their PSF (odd sides).
    noise_sigma : float or array_like
        Sky RMS per pixel, scalar or ``(N,)``.
    config : RLConfig
    background : {"zero", "sep"}
        Background subtracted first, as in :class:`DetectConfig`.
    psf_energy : float
        The detector's PSF trimming (only for the noise calibration).

    Returns
    -------
    dict
        ``image``: float32 deconvolved images, same shape as the input stack (``(H, W)`` for one);
        ``psf``: float64 effective PSF to detect with (:func:`richardson_lucy_psf`);
        ``noise_sigma``: float64 ``(N,)`` (or float) RMS to pass to the detector
        (``rho * sigma``); ``rho``: float, the calibration factor;
        ``fwhm_px``: float FWHM (px) of the effective PSF.
    """
    single = np.asarray(images).ndim == 2
    stack = _as_stack(np.asarray(images)[None] if single else images, "richardson_lucy.images")
    n = len(stack)
    sigma = _sigma_array(noise_sigma, n, "richardson_lucy.noise_sigma")
    p = _odd_psf(psf, "richardson_lucy.psf")
    sub, _ = _subtract_background(np.nan_to_num(stack), DetectConfig(background=background), need_rms=False)
    deconv = _richardson_lucy_unit(sub, sigma, p, config)
    eff = richardson_lucy_psf(p, config=config)
    rho = _rl_rho(np.ascontiguousarray(p).tobytes(), p.shape, tuple(stack.shape[1:]), config, float(psf_energy))
    out_sigma = rho * sigma
    return {"image": deconv[0] if single else deconv, "psf": eff,
            "noise_sigma": float(out_sigma[0]) if single else out_sigma, "rho": rho,
            "fwhm_px": measure_fwhm(eff)}


# ----------------------------------------------------------------------------------------------
# (c) bicubic upsampling


def _bicubic(stack: np.ndarray, factor: int) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(stack, dtype=np.float32))[:, None]
    with torch.no_grad():
        up = F.interpolate(x, scale_factor=factor, mode="bicubic", align_corners=False)
    # Interpolation keeps surface brightness; divide by the pixel-area ratio to keep flux per pixel.
    return up[:, 0].numpy() / float(factor * factor)


def upsample_bicubic(images: np.ndarray, *, factor: int = 3, crop: int = 1) -> np.ndarray:
    """Bicubic upsampling of LR images onto the co-centred HR grid, flux conserving.

    With ``align_corners=False`` the output pixel j sits at LR coordinate ``(j + 0.5) / factor - 0.5``,
    so a 22 px LR image gives 66 px whose pixel 1 is LR x = 0, which is HR pixel 0 of the
    co-centred 64 px HR grid (``geometry.hr_to_lr_pixels``); ``crop=1`` removes one pixel per side.

    Parameters
    ----------
    images : numpy.ndarray
        ``(N, H, W)`` / ``(N, 1, H, W)`` stack or one ``(H, W)`` image.
    factor : int
        Upsampling factor (LR / HR pixel scale: 3 for 0.18" -> 0.06").
    crop : int
        Pixels removed on each side after upsampling.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, factor*H - 2*crop, factor*W - 2*crop)`` (or 2-D for one image); the sum over
        the uncropped grid equals the LR sum up to the interpolation's edge handling.
    """
    single = np.asarray(images).ndim == 2
    stack = _as_stack(np.asarray(images)[None] if single else images, "upsample_bicubic.images")
    if factor < 1 or crop < 0:
        raise InputError("upsample_bicubic", f"need factor >= 1 and crop >= 0, got {factor}, {crop}")
    up = _bicubic(np.nan_to_num(stack), factor)
    if crop:
        up = up[:, crop:-crop, crop:-crop]
    return up[0] if single else up


def upsample_psf(psf: np.ndarray, *, factor: int = 3) -> np.ndarray:
    """The LR PSF through the same bicubic operator: odd ``factor*n`` side, centred, unit sum.

    An odd n px PSF becomes ``factor * n`` px (odd for odd factor) with its centre on the central
    pixel (LR pixel c -> HR pixel ``factor*c + (factor-1)/2``); negative ringing is clipped.

    Returns
    -------
    numpy.ndarray
        float64 ``(factor*n, factor*n)`` unit-sum PSF on the HR grid.
    """
    p = _odd_psf(psf, "upsample_psf.psf")
    if factor % 2 == 0:
        raise InputError("upsample_psf.factor", f"an odd factor keeps the PSF centred on a pixel, got {factor}")
    up = np.clip(_bicubic(p[None], factor)[0].astype(np.float64), 0.0, None)
    return up / up.sum()


@lru_cache(maxsize=16)
def _bicubic_rho(psf_key: bytes, shape: tuple[int, int], image_shape: tuple[int, int], factor: int, crop: int,
                 psf_energy: float) -> float:
    psf = np.frombuffer(psf_key, dtype=np.float64).reshape(shape)
    return significance_noise_scale(lambda z: upsample_bicubic(z, factor=factor, crop=crop), shape=image_shape,
                                    psf_out=upsample_psf(psf, factor=factor), psf_energy=psf_energy)


def _bicubic_for_detection(stack: np.ndarray, sigma: np.ndarray, psf: np.ndarray, factor: int, crop: int,
                           psf_energy: float) -> dict:
    up = upsample_bicubic(stack, factor=factor, crop=crop)
    psf_up = upsample_psf(psf, factor=factor)
    rho = _bicubic_rho(np.ascontiguousarray(psf).tobytes(), psf.shape, tuple(stack.shape[1:]), factor, crop,
                       float(psf_energy))
    return {"image": up, "psf": psf_up, "noise_sigma": rho * sigma, "rho": rho}


# ----------------------------------------------------------------------------------------------
# one entry point for the harness


def baseline_peaks(
    images_lr: np.ndarray,
    *,
    method: Literal["sep", "richardson_lucy", "bicubic"],
    psf_lr: np.ndarray,
    noise_sigma,
    detect: DetectConfig = DetectConfig(background="zero"),
    sep_config: SepDeblendConfig = SepDeblendConfig(),
    rl_config: RLConfig = RLConfig(),
    factor: int = 3,
    crop: int = 1,
) -> dict[str, np.ndarray]:
    """Peaks of a baseline method on a stack of LR images (flat table, like ``find_peaks_batch``).

    Parameters
    ----------
    images_lr : numpy.ndarray
        ``(N, H, W)`` or ``(N, 1, H, W)`` LR images.
    method : {"sep", "richardson_lucy", "bicubic"}
        Which baseline (see the module docstring).
    psf_lr : numpy.ndarray
        PSF of the LR images.
    noise_sigma : float or array_like
        LR sky RMS per pixel, scalar or ``(N,)``.
    detect : DetectConfig
        Detector settings for "richardson_lucy" and "bicubic" (the same as for HR/LR/enhanced).
        Its ``background`` is applied to the LR images before the transform; the transformed
        images are then searched with ``background="zero"``.
    sep_config, rl_config : SepDeblendConfig, RLConfig
        Settings of the "sep" and "richardson_lucy" methods.
    factor, crop : int
        Upsampling of the "bicubic" method.

    Returns
    -------
    dict of numpy.ndarray
        The columns of :func:`galgan_ray.detect.find_peaks_batch` (``index``, ``x``, ``y``,
        ``significance``, ``flux``, ``flags``; ``npix`` too for "sep"). Positions are in LR pixels
        for "sep" and "richardson_lucy", in HR pixels (the co-centred 64x64 grid) for "bicubic".
        Fluxes are in image units per the method (for "bicubic", HR pixels; the total is conserved).
    """
    stack = _as_stack(images_lr, "baseline_peaks.images_lr")
    n = len(stack)
    sigma = _sigma_array(noise_sigma, n, "baseline_peaks.noise_sigma")
    p = _odd_psf(psf_lr, "baseline_peaks.psf_lr")
    if method == "sep":
        return sep_deblend_peaks(stack, psf=p, noise_sigma=sigma, config=sep_config)
    after = replace(detect, background="zero")
    if method == "richardson_lucy":
        res = richardson_lucy(stack, psf=p, noise_sigma=sigma, config=rl_config, background=detect.background,
                              psf_energy=detect.psf_energy)
    elif method == "bicubic":
        sub, _ = _subtract_background(np.nan_to_num(stack), detect, need_rms=False)
        res = _bicubic_for_detection(sub, sigma, p, factor, crop, detect.psf_energy)
    else:
        raise InputError("baseline_peaks.method",
                         f"unknown method {method!r}; use 'sep', 'richardson_lucy' or 'bicubic'")
    return find_peaks_batch(res["image"], psf=res["psf"], config=after, noise_sigma=res["noise_sigma"])
