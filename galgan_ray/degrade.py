"""HST -> HSC-like degradation: PSF-matching kernel, flux-conserving resampling, sky noise; torch twin.

The operator, band by band (``high[c]`` -> ``low[c]``):

1. Convolve the high-resolution (HR) image with a matching kernel ``K`` built on the HR grid with
   photutils (ratio of Fourier transforms, windowed). The source PSF is the HR band's PSF and the
   target is the low-resolution (LR) band's PSF, both drawn on the HR grid *with the small HR pixel*
   and *without* the big LR pixel: the HR pixel cancels in the ratio, and the resampling of step 2
   adds the LR pixel (summing r x r HR pixels convolves the HR pixel with a comb, which is exactly
   the LR pixel box). So the output PSF is ``low.psf`` convolved with the LR pixel, as drawn by
   ``psf.draw_psf(low.psf, pixel_scale_arcsec=low.pixel_scale_arcsec)``.
2. Resample onto the co-centred LR grid (``geometry``: 64 px at 0.06" -> 22 px at 0.18"), conserving
   flux: ``reproject_exact`` times the pixel-area ratio (or ``reproject_adaptive(conserve_flux=True)``).
   When the grids are aligned with an integer ratio (the default cutouts), steps 1-2 are one linear
   map, precomputed as a dense matrix and applied with one matrix product per band (the *fast path*);
   it equals convolution + r x r block sums, which is what ``reproject_exact`` computes there
   (tested to ~1e-6).
3. Convert units (``high.to_njy / low.to_njy``) and add white Gaussian noise of ``low.sky_sigma``.

:class:`TorchDegrader` is the same noiseless operator as a differentiable ``torch.nn.Module`` for the
GAN's flux-consistency loss.

A FITS-image target PSF (``low.psf.kind == "fits"``) is an effective PSF that already holds its own
pixel; drawn on the HR grid it gets the LR pixel a second time in step 2 (a small broadening, about
the LR pixel in quadrature). Analytic target PSFs have no such issue.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import scipy.fft as sfft
from astropy.wcs import WCS, Sip
from astropy.wcs.utils import proj_plane_pixel_area
from reproject import reproject_adaptive, reproject_exact

from .errors import ConfigError, InputError
from .flags import flag_bit
from .geometry import block_summed_wcs, hr_to_block_pixels, low_res_side, make_tan_wcs, pixel_scale_of
from .instrument import DEFAULT_HIGH, DEFAULT_LOW, BandConfig, get_band
from .psf import draw_psf, measure_fwhm
from .tiles import Tile

__all__ = ["DegradeConfig", "matching_kernel", "band_kernels", "degrade", "degrade_tile", "Degrader", "TorchDegrader",
           "get_degrader"]

WindowName = Literal["split_cosine_bell", "top_hat", "tukey", "cosine_bell", "hanning", "none"]


@dataclass(frozen=True)
class DegradeConfig:
    """How HR cutouts are degraded to LR (HSC-like) ones.

    Attributes
    ----------
    high : tuple of BandConfig
        The HR bands of the input, in channel order (default HST ACS F775W, 0.06"/px).
    low : tuple of BandConfig
        The LR band each HR band becomes, same length and order (default HSC i, 0.6" Moffat,
        0.18"/px).
    add_noise : bool
        Add white Gaussian noise of ``low[c].sky_sigma`` per LR pixel.
    kernel_window : str
        photutils window applied to the Fourier ratio of the matching kernel:
        ``split_cosine_bell`` (uses alpha and beta), ``top_hat`` (beta), ``tukey`` (alpha),
        ``cosine_bell`` (alpha), ``hanning`` or ``none``.
    kernel_window_alpha, kernel_window_beta : float
        Window parameters (fractions of the kernel array). The defaults keep all frequencies up
        to half the HR Nyquist frequency, where the 0.6" target has no power left, and taper to
        zero at 80 %.
    kernel_regularization : float
        photutils' OTF threshold (fraction of the source OTF peak below which the ratio is 0).
    kernel_size : int
        Side of the kernel (and of the PSF images it is built from) in HR pixels, odd. 63 px =
        3.8" holds 99 % of the 0.6" Moffat's flux.
    resample : {"exact", "adaptive"}
        reproject method for general WCS: ``reproject_exact`` x pixel-area ratio, or
        ``reproject_adaptive(conserve_flux=True)``. The aligned fast path is exactly ``exact``.
    """

    high: tuple[BandConfig, ...] = field(default_factory=lambda: (get_band(*DEFAULT_HIGH),))
    low: tuple[BandConfig, ...] = field(default_factory=lambda: (get_band(*DEFAULT_LOW),))
    add_noise: bool = True
    kernel_window: WindowName = "split_cosine_bell"
    kernel_window_alpha: float = 0.3
    kernel_window_beta: float = 0.5
    kernel_regularization: float = 1e-4
    kernel_size: int = 63
    resample: Literal["exact", "adaptive"] = "exact"

    def __post_init__(self):
        if isinstance(self.high, BandConfig):
            object.__setattr__(self, "high", (self.high,))
        if isinstance(self.low, BandConfig):
            object.__setattr__(self, "low", (self.low,))
        object.__setattr__(self, "high", tuple(self.high))
        object.__setattr__(self, "low", tuple(self.low))
        if not self.high or len(self.high) != len(self.low):
            raise ConfigError("degrade", f"high and low need the same, non-zero number of bands, got "
                                         f"{len(self.high)} and {len(self.low)}")
        for name, bands in (("high", self.high), ("low", self.low)):
            scales = {b.pixel_scale_arcsec for b in bands}
            if max(scales) - min(scales) > 1e-9 * max(scales):
                raise ConfigError(f"degrade.{name}", f"all bands must share one pixel grid, got scales {sorted(scales)}")
        if self.low[0].pixel_scale_arcsec <= self.high[0].pixel_scale_arcsec:
            raise ConfigError("degrade.low", "the low-resolution pixels must be larger than the high-resolution ones")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ConfigError("degrade.kernel_size", f"must be odd and >= 3, got {self.kernel_size}")
        if not 0.0 <= self.kernel_regularization < 1.0:
            raise ConfigError("degrade.kernel_regularization", f"must be in [0, 1), got {self.kernel_regularization}")

    @property
    def scale_high_arcsec(self) -> float:
        return float(self.high[0].pixel_scale_arcsec)

    @property
    def scale_low_arcsec(self) -> float:
        return float(self.low[0].pixel_scale_arcsec)

    @property
    def ratio(self) -> float:
        """LR pixel scale over HR pixel scale (3 for 0.18" / 0.06")."""
        return self.scale_low_arcsec / self.scale_high_arcsec

    def low_side(self, n_high: int) -> int:
        """Side of the LR cutout co-centred with an ``n_high`` HR cutout (64 -> 22)."""
        return low_res_side(n_high, scale_high_arcsec=self.scale_high_arcsec, scale_low_arcsec=self.scale_low_arcsec)


# --------------------------------------------------------------------------------------------- kernels
def _convolve_full(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Linear convolution (zero padding, 'full' size ``H + k - 1``) of every plane ``(..., C, H, W)``
    with its band's odd kernel ``(C, k, k)``, in float64 through real FFTs."""
    h, w = images.shape[-2:]
    k = kernels.shape[-1]
    sy, sx = sfft.next_fast_len(h + k - 1, real=True), sfft.next_fast_len(w + k - 1, real=True)
    kf = sfft.rfft2(kernels, s=(sy, sx))
    out = sfft.irfft2(sfft.rfft2(images.astype(np.float64), s=(sy, sx)) * kf, s=(sy, sx))
    return out[..., :h + k - 1, :w + k - 1]


def _photutils_matching():
    try:  # photutils >= 3.0  # local: the module moved between photutils versions
        from photutils.psf_matching import (
            CosineBellWindow,
            HanningWindow,
            SplitCosineBellWindow,
            TopHatWindow,  # local: see above
            TukeyWindow,
            make_kernel,
        )
    except ImportError:  # photutils < 3.0: same function under its old name and module
        from photutils.psf import CosineBellWindow, HanningWindow, SplitCosineBellWindow, TopHatWindow, TukeyWindow  # type: ignore # local:
        from photutils.psf import create_matching_kernel as make_kernel  # type: ignore # local:
    return make_kernel, dict(split_cosine_bell=SplitCosineBellWindow, top_hat=TopHatWindow, tukey=TukeyWindow,
                             cosine_bell=CosineBellWindow, hanning=HanningWindow)


def _make_window(window, alpha: float, beta: float):
    if window is None or window == "none":
        return None
    if callable(window):
        return window
    _, windows = _photutils_matching()
    if window not in windows:
        raise ConfigError("degrade.kernel_window", f"unknown window {window!r}; known: {sorted(windows) + ['none']}")
    cls = windows[window]
    if window == "split_cosine_bell":
        return cls(alpha=alpha, beta=beta)
    if window == "top_hat":
        return cls(beta=beta)
    if window in ("tukey", "cosine_bell"):
        return cls(alpha=alpha)
    return cls()


def matching_kernel(psf_high: np.ndarray, psf_target: np.ndarray, *, window: str | object = "split_cosine_bell",
                    alpha: float = 0.3, beta: float = 0.5, regularization: float = 1e-4) -> np.ndarray:
    """Kernel ``K`` with ``psf_high * K ~= psf_target`` (photutils' Fourier-ratio matching kernel).

    Parameters
    ----------
    psf_high, psf_target : numpy.ndarray
        2-D, same odd shape, same pixel grid, centred on the central pixel; the target broader.
    window : str or callable
        A photutils window by name (see :class:`DegradeConfig`), a window instance, or ``"none"``.
    alpha, beta : float
        Window parameters (ignored by windows that do not take them).
    regularization : float
        photutils' OTF threshold.

    Returns
    -------
    numpy.ndarray
        float64 kernel of the same shape, unit sum, centred.
    """
    make_kernel, _ = _photutils_matching()
    src = np.asarray(psf_high, dtype=np.float64)
    tgt = np.asarray(psf_target, dtype=np.float64)
    if src.ndim != 2 or src.shape != tgt.shape or src.shape[0] % 2 == 0 or src.shape[1] % 2 == 0:
        raise InputError("matching_kernel", f"PSFs must be 2-D, odd-sized and of one shape, got {src.shape} and {tgt.shape}")
    kernel = make_kernel(src / src.sum(), tgt / tgt.sum(), window=_make_window(window, alpha, beta),
                         regularization=regularization)
    kernel = np.asarray(kernel, dtype=np.float64)
    return kernel / kernel.sum()


def _target_psf_hr(low: BandConfig, *, pixel_scale_arcsec: float, size: int) -> np.ndarray:
    # The LR band's PSF on the HR grid, integrated over the *HR* pixel only (see the module docstring).
    return draw_psf(low.psf, pixel_scale_arcsec=pixel_scale_arcsec, size=size)


@lru_cache(maxsize=32)
def _band_kernels_cached(config: DegradeConfig) -> np.ndarray:
    size, s_hr = config.kernel_size, config.scale_high_arcsec
    kernels = []
    for high, low in zip(config.high, config.low):
        src = draw_psf(high.psf, pixel_scale_arcsec=s_hr, size=size)
        tgt = _target_psf_hr(low, pixel_scale_arcsec=s_hr, size=size)
        f_src, f_tgt = measure_fwhm(src), measure_fwhm(tgt)
        if not f_tgt > f_src:
            raise ConfigError(f"degrade.low[{low.key}]", f"target PSF FWHM {f_tgt * s_hr:.3f}\" is not broader than "
                                                         f"the {high.key} PSF ({f_src * s_hr:.3f}\")")
        kernels.append(matching_kernel(src, tgt, window=config.kernel_window, alpha=config.kernel_window_alpha,
                                       beta=config.kernel_window_beta, regularization=config.kernel_regularization))
    out = np.stack(kernels)
    out.setflags(write=False)
    return out


def band_kernels(config: DegradeConfig | None = None) -> np.ndarray:
    """The matching kernels of every band of ``config``.

    Returns
    -------
    numpy.ndarray
        float64 ``(C, kernel_size, kernel_size)``, unit sum each, read-only.
    """
    return _band_kernels_cached(config or DegradeConfig())


def _unit_factors(config: DegradeConfig) -> np.ndarray:
    """Multiply HR image units by this to get LR image units, per band."""
    return np.array([h.to_njy / l.to_njy for h, l in zip(config.high, config.low)], dtype=np.float64)


# --------------------------------------------------------------------------------------------- helpers
def _aligned_offset(n_high: int, n_low: int, ratio: float) -> int | None:
    """HR pixels by which the LR grid overhangs the HR one on each side, if the grids align exactly."""
    r = round(ratio)
    if abs(ratio - r) > 1e-9 * ratio or r < 1:
        return None
    twice_m = n_low * r - n_high
    if twice_m < 0 or twice_m % 2:
        return None
    return twice_m // 2


def _operator_matrix(kernel: np.ndarray, *, n_high: int, n_low: int, r: int, m: int) -> np.ndarray:
    """Dense (n_low**2, n_high**2) matrix of 'convolve with kernel, then sum r x r blocks'.

    LR pixel ``J`` sums HR output pixels ``i = r*J - m + d`` (d = 0..r-1), and the convolution gives
    ``out[i] = sum_j img[j] * kernel[i - j + h]``; so ``A[J, j] = Kb[r*J - m - j + h]`` with ``Kb`` the
    kernel summed over r x r windows (``Kb[a] = sum_d kernel[a + d]``).
    """
    k = kernel.shape[0]
    h = (k - 1) // 2
    J, j = np.arange(n_low), np.arange(n_high)
    idx = r * J[:, None] - m - j[None, :] + h  # (n_low, n_high), may run outside [0, k)
    lo, hi = int(idx.min()), int(idx.max())
    pad_lo = max(0, -lo)
    size = pad_lo + max(k, hi + 1) + r
    kp = np.zeros((size, size))
    kp[pad_lo:pad_lo + k, pad_lo:pad_lo + k] = kernel
    kb = np.zeros_like(kp)
    for dy in range(r):
        for dx in range(r):
            kb[: size - r, : size - r] += kp[dy:size - r + dy, dx:size - r + dx]
    ii = idx + pad_lo
    a = kb[ii[:, None, :, None], ii[None, :, None, :]]  # (J_y, J_x, j_y, j_x)
    return a.reshape(n_low * n_low, n_high * n_high)


def _as_batch(images_hr) -> tuple[np.ndarray, bool]:
    arr = np.asarray(images_hr)
    if arr.ndim == 3:
        return arr[None], True
    if arr.ndim != 4:
        raise InputError("image_hr", f"expected (N, C, H, W) or (C, H, W), got shape {arr.shape}")
    return arr, False


def _generators(rng, n: int) -> list[np.random.Generator] | np.random.Generator:
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    rngs = list(rng)
    if len(rngs) != n or not all(isinstance(g, np.random.Generator) for g in rngs):
        raise InputError("rng", f"expected a Generator, a seed, or {n} Generators (one per image)")
    return rngs


def _shift_wcs(wcs, h: int):
    """WCS of an image padded by ``h`` pixels on every side (crpix moves by h)."""
    w = copy.deepcopy(wcs)
    w.wcs.crpix = np.asarray(w.wcs.crpix) + h
    if w.sip is not None:
        w.sip = Sip(w.sip.a, w.sip.b, w.sip.ap, w.sip.bp, np.asarray(w.sip.crpix) + h)
    if w.pixel_shape is not None:
        w.pixel_shape = tuple(int(s) + 2 * h for s in w.pixel_shape)
    return w


# --------------------------------------------------------------------------------------------- degrader
class Degrader:
    """Degrades batches of HR cutouts to LR ones; kernels and operator matrices are built once.

    Parameters
    ----------
    config : DegradeConfig, optional
    fast_path : bool
        Use the precomputed matrix when the HR and LR grids are aligned with an integer ratio and
        no WCS is given (exactly ``reproject_exact`` there). ``False`` always goes through reproject.

    Notes
    -----
    Picklable (Ray actors): it holds only the config, numpy arrays and a cache that refills lazily.
    """

    def __init__(self, config: DegradeConfig | None = None, *, fast_path: bool = True):
        self.config = config or DegradeConfig()
        self.fast_path = bool(fast_path)
        self.kernels = band_kernels(self.config)
        self.unit_factors = _unit_factors(self.config)
        self.sky_sigma = np.array([b.sky_sigma for b in self.config.low], dtype=np.float64)
        self._operators: dict[int, np.ndarray] = {}

    @property
    def n_bands(self) -> int:
        return len(self.config.high)

    def operator(self, n_high: int) -> np.ndarray | None:
        """float32 ``(C, n_low**2, n_high**2)`` matrices of the noiseless operator (unit factor
        included), or ``None`` when the grids are not aligned with an integer ratio."""
        if n_high not in self._operators:
            n_low = self.config.low_side(n_high)
            m = _aligned_offset(n_high, n_low, self.config.ratio)
            if m is None:
                return None
            r = round(self.config.ratio)
            self._operators[n_high] = np.stack([
                (_operator_matrix(k, n_high=n_high, n_low=n_low, r=r, m=m) * f).astype(np.float32)
                for k, f in zip(self.kernels, self.unit_factors)])
        return self._operators[n_high]

    # ---- noiseless operator
    def _check(self, arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, c, ny, nx = arr.shape
        if c != self.n_bands:
            raise InputError("image_hr", f"{c} bands given, the degrade config has {self.n_bands}")
        if ny != nx:
            raise InputError("image_hr", f"cutouts must be square, got {ny}x{nx}")
        flags = np.zeros(n, dtype=np.int32)
        arr = np.asarray(arr, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            arr = np.where(bad, np.float32(0.0), arr)
            flags[bad.any(axis=(1, 2, 3))] |= flag_bit("NONFINITE")
        return arr, flags

    def _convolve_full(self, arr: np.ndarray) -> np.ndarray:
        """Linear convolution of every (N, C) image with its band's kernel, 'full' size."""
        return _convolve_full(arr, self.kernels)

    def noiseless(self, images_hr, *, wcs_hr=None) -> np.ndarray:
        """The noiseless LR images (same rank as the input), float32, LR image units.

        ``wcs_hr`` (one astropy WCS for all images, or one per image) selects the reproject path;
        without it the HR cutouts are taken to be the standard co-centred grid.
        """
        arr, squeeze = _as_batch(images_hr)
        arr, _ = self._check(arr)
        out = self._noiseless(arr, wcs_hr)
        return out[0] if squeeze else out

    def _noiseless(self, arr: np.ndarray, wcs_hr) -> np.ndarray:
        n, c, n_high, _ = arr.shape
        n_low = self.config.low_side(n_high)
        op = self.operator(n_high) if (self.fast_path and wcs_hr is None) else None
        if op is not None:
            flat = arr.reshape(n, c, n_high * n_high)
            out = np.empty((n, c, n_low * n_low), dtype=np.float32)
            for ci in range(c):  # one BLAS matrix product per band
                np.matmul(flat[:, ci], op[ci].T, out=out[:, ci])
            return out.reshape(n, c, n_low, n_low)
        return self._reproject(arr, wcs_hr, n_low).astype(np.float32)

    def _reproject(self, arr: np.ndarray, wcs_hr, n_low: int) -> np.ndarray:
        n, c, n_high, _ = arr.shape
        full = self._convolve_full(arr) * self.unit_factors[None, :, None, None]
        h = (self.kernels.shape[-1] - 1) // 2
        if wcs_hr is None:
            wcs_list = [make_tan_wcs(0.0, 0.0, pixel_scale_arcsec=self.config.scale_high_arcsec, shape=(n_high, n_high))] * n
        elif isinstance(wcs_hr, WCS):
            wcs_list = [wcs_hr] * n
        else:
            wcs_list = list(wcs_hr)
            if len(wcs_list) != n:
                raise InputError("wcs_hr", f"{len(wcs_list)} WCS given for {n} images")
        out = np.empty((n, c, n_low, n_low))
        cache: dict[int, tuple] = {}
        for i, w in enumerate(wcs_list):
            if id(w) not in cache:
                scale = pixel_scale_of(w)
                if abs(scale / self.config.scale_high_arcsec - 1.0) > 0.01:
                    raise InputError("wcs_hr", f"pixel scale {scale:.4f}\" differs from the configured HR scale "
                                               f"{self.config.scale_high_arcsec}\"")
                centre = w.celestial.pixel_to_world_values((n_high - 1) / 2.0, (n_high - 1) / 2.0)
                w_lr = make_tan_wcs(float(centre[0]), float(centre[1]), pixel_scale_arcsec=self.config.scale_low_arcsec,
                                    shape=(n_low, n_low))
                w_full = _shift_wcs(w.celestial, h)
                area = proj_plane_pixel_area(w_lr) / proj_plane_pixel_area(w_full)
                cache[id(w)] = (w_full, w_lr, area)
            w_full, w_lr, area = cache[id(w)]
            if self.config.resample == "exact":
                res, _ = reproject_exact((full[i], w_full), w_lr, shape_out=(c, n_low, n_low))
                out[i] = res * area
            else:
                res, _ = reproject_adaptive((full[i], w_full), w_lr, shape_out=(c, n_low, n_low), conserve_flux=True,
                                            boundary_mode="constant", boundary_fill_value=0.0)
                out[i] = res
        return np.nan_to_num(out, nan=0.0)

    # ---- with noise
    def __call__(self, images_hr, *, rng=None, wcs_hr=None, add_noise: bool | None = None) -> dict[str, np.ndarray]:
        """Degrade HR cutouts: matching kernel, flux-conserving resampling, sky noise.

        Parameters
        ----------
        images_hr : array_like
            ``(N, C, H, W)`` or ``(C, H, W)`` HR cutouts in the HR bands' units (nJy/px by default),
            square, centred on the sky position of the cutout. Non-finite pixels are set to 0 and
            flagged ``NONFINITE``.
        rng : numpy.random.Generator, int, sequence of Generator, optional
            Noise generator: one for the whole batch, a seed, or one per image (so results do not
            depend on batching).
        wcs_hr : astropy.wcs.WCS or sequence of WCS, optional
            WCS of the HR cutouts; forces the reproject path. The LR grid is then a north-up TAN
            grid centred on the HR cutout's centre.
        add_noise : bool, optional
            Overrides ``config.add_noise``.

        Returns
        -------
        dict
            ``image_lr``: float32 ``(N, C, h, w)`` (``(C, h, w)`` for a 3-D input), LR image units
            (nJy/px by default), 0.18"/px, co-centred with the input;
            ``sigma_lr``: float32 ``(N, C)`` (or ``(C,)``) standard deviation of the noise added per
            pixel (0 when no noise is added);
            ``flags``: int32 ``(N,)`` (or scalar array) ``NONFINITE`` where input pixels were zeroed.
        """
        arr, squeeze = _as_batch(images_hr)
        arr, flags = self._check(arr)
        n, c = arr.shape[:2]
        image_lr = self._noiseless(arr, wcs_hr)
        noise = self.config.add_noise if add_noise is None else bool(add_noise)
        sigma = np.broadcast_to(self.sky_sigma if noise else np.zeros(c), (n, c)).astype(np.float32)
        if noise:
            gens = _generators(rng, n)
            shape = image_lr.shape[1:]
            if isinstance(gens, list):
                draws = np.stack([g.standard_normal(shape, dtype=np.float32) for g in gens])
            else:
                draws = gens.standard_normal(image_lr.shape, dtype=np.float32)
            image_lr += draws * sigma[:, :, None, None]
        out = {"image_lr": image_lr, "sigma_lr": np.ascontiguousarray(sigma), "flags": flags}
        if squeeze:
            out = {k: v[0] for k, v in out.items()}
        return out

    def __reduce__(self):
        return (type(self), (self.config,), {"fast_path": self.fast_path})

    def __setstate__(self, state):
        self.fast_path = state["fast_path"]


@lru_cache(maxsize=8)
def get_degrader(config: DegradeConfig | None = None) -> Degrader:
    """A cached :class:`Degrader` for ``config`` (kernels and operators are built once per process)."""
    return Degrader(config or DegradeConfig())


def degrade(images_hr, *, config: DegradeConfig | None = None, rng=None, wcs_hr=None) -> dict[str, np.ndarray]:
    """Degrade HR cutouts to LR (HSC-like) ones: matching kernel, flux-conserving resampling, noise.

    A convenience wrapper of :class:`Degrader` (cached per config); see :meth:`Degrader.__call__`.

    Parameters
    ----------
    images_hr : array_like
        ``(N, C, H, W)`` or ``(C, H, W)`` HR cutouts (nJy/px at 0.06"/px by default).
    config : DegradeConfig, optional
    rng : numpy.random.Generator, int or sequence of Generator, optional
        Noise generator(s); one Generator per image makes results independent of batching.
    wcs_hr : astropy.wcs.WCS or sequence of WCS, optional
        WCS of the HR cutouts (forces the reproject path).

    Returns
    -------
    dict
        ``image_lr`` float32 ``(N, C, h, w)`` (22x22 for 64x64 inputs), ``sigma_lr`` float32
        ``(N, C)`` noise added per pixel, ``flags`` int32 ``(N,)``; rank follows the input.
    """
    return get_degrader(config or DegradeConfig())(images_hr, rng=rng, wcs_hr=wcs_hr)


# --------------------------------------------------------------------------------------------- torch twin
# ------------------------------------------------------------------------------------------------
# Whole survey tiles (the field job's simulation mode)
# ------------------------------------------------------------------------------------------------
def _block_noise(shape: tuple[int, int], *, origin: tuple[int, int] | None, seed: int, band: int,
                 tile_id: int, block: int = 64) -> np.ndarray:
    """Unit Gaussian noise for a tile: per block of the field grid (shared by overlapping tiles)."""
    h, w = shape
    if origin is None:
        return np.random.default_rng([seed, tile_id, band]).standard_normal((h, w), dtype=np.float32)
    ox, oy = origin
    out = np.empty((h, w), dtype=np.float32)
    for by in range(oy // block, (oy + h - 1) // block + 1):
        for bx in range(ox // block, (ox + w - 1) // block + 1):
            noise = np.random.default_rng([seed, 1, band, bx, by]).standard_normal((block, block), dtype=np.float32)
            y0, x0 = by * block - oy, bx * block - ox
            ys, xs = max(y0, 0), max(x0, 0)
            ye, xe = min(y0 + block, h), min(x0 + block, w)
            out[ys:ye, xs:xe] = noise[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def degrade_tile(tile: Tile, *, config: DegradeConfig, seed: int, add_noise: bool = True) -> Tile:
    """Degrade a simulated high-resolution tile to the co-aligned low-resolution grid.

    The tile is convolved with the PSF-matching kernels of :func:`band_kernels`, summed over r x r
    pixel blocks (the same operator as the cutout degradation; LR pixel J covers HR pixels
    rJ .. rJ+r-1, :func:`galgan_ray.geometry.hr_to_block_pixels`), converted to the LR units and
    given sky noise. The noise is drawn per 64 x 64 block of the field's common LR grid, seeded with
    ``[seed, 1, band, block_x, block_y]`` (``[seed, tile_id, band]`` for a tile without a field
    grid), so overlapping tiles hold the same pixels, as coadd patches of one tract do, and the
    result does not depend on which worker ran which tile.

    Parameters
    ----------
    tile : Tile
        HR tile whose bands are ``config.high`` and whose pixel scale is ``config.scale_high_arcsec``.
    config : DegradeConfig
        Bands and matching-kernel settings; the LR/HR pixel-scale ratio must be a whole number.
    seed : int
        Noise seed.
    add_noise : bool
        Add LR sky noise of ``low[c].sky_sigma``.

    Returns
    -------
    Tile
        LR tile: ``floor(H / r) x floor(W / r)`` px, variance = propagated HR variance + LR sky
        variance, mask = OR over each block, PSF = the LR bands' PSFs, WCS, inner region, field
        origin and truth positions mapped to the LR grid; ``simulated`` stays True.
    """
    r = int(round(config.ratio))
    if abs(config.ratio - r) > 1e-6:
        raise ConfigError("degrade", f"the LR/HR pixel-scale ratio {config.ratio} must be a whole number for tiles")
    c, h, w = tile.image.shape
    if c != len(config.high):
        raise InputError(tile.source, f"{c} band(s), the degradation has {len(config.high)}")
    hl, wl = h // r, w // r
    kernels = band_kernels(config)
    half = kernels.shape[-1] // 2
    unit = np.array([hb.to_njy / lb.to_njy for hb, lb in zip(config.high, config.low)])[:, None, None]
    good = np.isfinite(tile.variance) & (tile.mask == 0)

    def convolve_same(planes, k):
        return _convolve_full(planes, k)[:, half:half + h, half:half + w][:, :hl * r, :wl * r]

    conv = convolve_same(np.where(good, tile.image, 0.0), kernels)
    lr = conv.reshape(c, hl, r, wl, r).sum(axis=(2, 4)) * unit
    var_conv = convolve_same(np.where(good, tile.variance, 0.0), kernels**2)
    var = np.clip(var_conv.reshape(c, hl, r, wl, r).sum(axis=(2, 4)), 0.0, None) * unit**2
    origin = None
    if tile.tract_origin is not None and tile.tract_origin[0] % r == 0 and tile.tract_origin[1] % r == 0:
        origin = (tile.tract_origin[0] // r, tile.tract_origin[1] // r)
    sigma = np.array([lb.sky_sigma for lb in config.low], dtype=np.float64)
    if add_noise:
        for ci in range(c):
            lr[ci] += sigma[ci] * _block_noise((hl, wl), origin=origin, seed=seed, band=ci, tile_id=tile.tile_id)
        var = var + (sigma**2)[:, None, None]
    bad = ~good[:, :hl * r, :wl * r].reshape(c, hl, r, wl, r).all(axis=(2, 4))
    mask = tile.mask[:, :hl * r, :wl * r].reshape(c, hl, r, wl, r).max(axis=(2, 4)).astype(np.int32)
    mask = np.where(bad & (mask == 0), 1, mask).astype(np.int32)
    var = np.where(bad | ~(var > 0), np.inf, var)
    psf_lr = np.stack([np.asarray(draw_psf(lb.psf, pixel_scale_arcsec=lb.pixel_scale_arcsec, size=27))
                       for lb in config.low])
    inner = tuple(float(hr_to_block_pixels(v, factor=r)) for v in tile.inner)
    truth = None
    if tile.truth is not None:
        truth = dict(tile.truth)
        truth["x"], truth["y"] = hr_to_block_pixels(truth["x"], factor=r), hr_to_block_pixels(truth["y"], factor=r)
    return Tile(tile_id=tile.tile_id, source=tile.source, image=np.where(bad, 0.0, lr).astype(np.float32),
                variance=var.astype(np.float32), mask=mask, psf=psf_lr,
                wcs_header=block_summed_wcs(tile.wcs_header, r, source="degrade_tile"),
                bands=tuple(b.key for b in config.low), inner=inner, tract_origin=origin, truth=truth, simulated=True)


def _make_torch_degrader_class():
    import torch  # local: numpy-only workers never pay torch's import (see __getattr__)

    class TorchDegrader(torch.nn.Module):
        """Differentiable twin of the noiseless degradation, ``(B, C, n_high, n_high) -> (B, C, n_low, n_low)``.

        Same kernels as :class:`Degrader` (float32), zero padding outside the cutout, r x r sum-pooling
        onto the co-centred LR grid (64 -> pad to 66 -> 22), then the band unit factors.

        Parameters
        ----------
        config : DegradeConfig, optional
        n_high : int
            HR cutout side (64). The grids must align with an integer ratio.
        method : {"matrix", "fft", "conv"}
            ``matrix`` (default): the dense operator of :class:`Degrader` (conv + sum-pool as one
            ``(C, 484, 4096)`` einsum; ~0.3 ms per 64x64 image forward+backward on 2 CPU threads);
            ``fft``: the linear convolution through ``torch.fft`` (no wrap-around) + sum-pool (~3 ms);
            ``conv``: grouped ``conv2d`` with the flipped 63 px kernel + sum-pool (~60 ms on CPU).
            All three agree with each other and with numpy to float32 rounding.
        device : str or torch.device, optional
            Default ``"cuda"`` if available, else ``"cpu"``. The module moves with ``.to()``.
        """

        def __init__(self, config: DegradeConfig | None = None, *, n_high: int = 64,
                     method: Literal["fft", "conv", "matrix"] = "matrix", device=None):
            super().__init__()
            self.config = config or DegradeConfig()
            self.n_high = int(n_high)
            self.n_low = self.config.low_side(self.n_high)
            m = _aligned_offset(self.n_high, self.n_low, self.config.ratio)
            if m is None:
                raise ConfigError("degrade", f"TorchDegrader needs aligned grids with an integer pixel-scale ratio, got "
                                             f"{self.config.ratio:.4f} for {self.n_high} px")
            if method not in ("fft", "conv", "matrix"):
                raise ConfigError("TorchDegrader.method", f"unknown method {method!r}; use fft, conv or matrix")
            self.method, self.r, self.m = method, round(self.config.ratio), m
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            kernels = band_kernels(self.config)
            c, k, _ = kernels.shape
            self.h = (k - 1) // 2
            self.register_buffer("unit", torch.as_tensor(_unit_factors(self.config), dtype=torch.float32).view(1, c, 1, 1))
            if method == "conv":
                # conv2d is a correlation: flip the kernel to convolve.
                self.register_buffer("weight", torch.as_tensor(np.ascontiguousarray(kernels[:, ::-1, ::-1]),
                                                               dtype=torch.float32).view(c, 1, k, k))
            elif method == "fft":
                # Circular convolution of size L equals the linear one on the outputs we keep when
                # L >= n_high + h + m (no wrapped contribution reaches rows -m .. n_high-1+m).
                self.L = int(sfft.next_fast_len(self.n_high + self.h + m, real=True))
                kp = np.zeros((c, self.L, self.L))
                kp[:, :k, :k] = kernels
                kp = np.roll(kp, (-self.h, -self.h), axis=(1, 2))  # kernel centre at index 0
                self.register_buffer("kernel_f", torch.fft.rfft2(torch.as_tensor(kp, dtype=torch.float64)).to(torch.complex64))
            else:
                op = Degrader(self.config).operator(self.n_high)  # unit factor included
                self.register_buffer("op", torch.as_tensor(op))
            self.to(device)

        def forward(self, x):
            """Noiseless LR images ``(B, C, n_low, n_low)`` of HR images ``x`` ``(B, C, n_high, n_high)``."""
            import torch.nn.functional as F  # local: torch is imported on first use only

            b, c, ny, nx = x.shape
            if ny != self.n_high or nx != self.n_high or c != self.unit.shape[1]:
                raise InputError("TorchDegrader", f"expected (B, {self.unit.shape[1]}, {self.n_high}, {self.n_high}), "
                                                  f"got {tuple(x.shape)}")
            if self.method == "matrix":
                out = torch.einsum("bcp,cqp->bcq", x.reshape(b, c, -1), self.op.to(x.dtype))
                return out.reshape(b, c, self.n_low, self.n_low)
            m, n = self.m, self.n_high
            if self.method == "conv":
                pad = self.h + m
                full = F.conv2d(F.pad(x, (pad, pad, pad, pad)), self.weight.to(x.dtype), groups=c)  # (B, C, n+2m, n+2m)
            else:
                spec = torch.fft.rfft2(x, s=(self.L, self.L)) * self.kernel_f
                circ = torch.fft.irfft2(spec, s=(self.L, self.L))
                # rows -m .. n-1+m of the linear convolution (negative indices wrap to the end)
                circ = torch.roll(circ, shifts=(m, m), dims=(2, 3))
                full = circ[:, :, : n + 2 * m, : n + 2 * m]
            pooled = F.avg_pool2d(full, self.r) * float(self.r * self.r)
            return pooled * self.unit.to(x.dtype)

    TorchDegrader.__module__ = __name__
    TorchDegrader.__qualname__ = "TorchDegrader"  # picklable as galgan_ray.degrade.TorchDegrader
    return TorchDegrader


def __getattr__(name: str):
    # torch is imported on first use of TorchDegrader only: numpy-only workers start ~1 s faster.
    if name == "TorchDegrader":
        cls = _make_torch_degrader_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
