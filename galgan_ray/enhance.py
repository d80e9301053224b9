"""Apply a trained super-resolution model to cutouts, or to a user's image of any size, pixel scale and WCS.

Two levels:

- :class:`Enhancer` loads a checkpoint once and maps model-grid cutouts, ``(N, C, 22, 22)`` at the
  model's low-resolution (LR) scale (0.18"/px), to ``(N, C, 64, 64)`` at its high-resolution (HR)
  scale (0.06"/px), following the normalisation contract of :mod:`galgan_ray.models` (divide by the
  LR noise sigma, arcsinh stretch, generator, inverse stretch, multiply back). The generator's
  response to an empty input of the same shape is subtracted before the inverse stretch (a fixed map
  of its biases, 0.04-0.16 sigma per HR pixel for the shipped models), so nothing in gives nothing
  out. :meth:`Enhancer.enhance_plane` enhances whole images fully convolutionally, in windows that
  reproduce one forward pass.
- :func:`enhance_image` takes any image with a celestial WCS (e.g. one plane of an HSC coadd at
  0.168"/px), brings it onto the model's LR grid, matches its PSF to the one the model was trained on,
  tiles it, enhances every tile and blends the tiles into one HR mosaic with its own WCS. By default
  it keeps the model's output only where the LR data detect a source (:func:`gate_enhanced`,
  :mod:`galgan_ray.support_map`) and shows the bicubic-upsampled data elsewhere, so noise peaks the
  model sharpens into sources stay out of the image as the support tests keep them out of the catalog.

Units
-----
The networks work on *flux per pixel* (nJy per pixel in training). :func:`enhance_image` therefore
resamples flux-conservingly: ``reproject_exact`` returns the overlap-weighted mean of the input
pixels, which is multiplied by the pixel-area ratio (LR pixel area / input pixel area), so the sum
over the LR image equals the sum over the input image. (The LR grid covers the input's footprint; a
border LR pixel only partly covered takes the mean of its covered part, so edges stay flat and only
the sky level of that sliver is added.)
The model's HR output is again flux per (HR) pixel, so sums are conserved end to end and the output is
in the input's units per 0.06" pixel. For surface-brightness images (e.g. MJy/sr) pass
``surface_brightness=True``: no area factors are applied on the way in and the output is converted
back to surface brightness, so it is in the input's units too. The noise sigma is measured on the
image the model sees (or given), so the input's flux scale does not matter.

Shipped models
--------------
``galgan_ray/data/models/sr_1band.pt`` (HST F775W <- HSC i) and ``sr_7band.pt`` (the seven HST bands
<- their HSC-like counterparts) are found with :mod:`importlib.resources`; ``"default"`` and
``"default-7band"`` name them (:func:`resolve_model`).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

import numpy as np
import sep
import torch
from astropy.stats import sigma_clipped_stats
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from reproject import reproject_exact
from scipy import ndimage
from scipy.signal import fftconvolve

from .checkpoint import ModelGrid, load_checkpoint
from .degrade import matching_kernel
from .errors import InputError
from .geometry import make_tan_wcs, pixel_scale_of
from .models import SRGANConfig, postprocess, prepare_batch
from .progress import progress
from .psf import draw_psf, measure_fwhm, normalize_psf
from .sky_plane import convolve_keeping_sky, fit_sky_plane
from .support_map import SupportConfig, apply_support, map_support

__all__ = ["DEFAULT_MODELS", "default_checkpoint", "resolve_model", "Enhancer", "enhance_image",
           "estimate_noise_sigma", "model_available", "NAMED_MODELS", "PSF_MATCH_TOLERANCE", "PSF_BROADER_WARN",
           "PIXEL_SCALE_MAX_RATIO", "PLANE_WINDOW_PX", "PLANE_HALO_PX", "PRECISIONS", "model_psf_lr", "gate_enhanced"]

log = logging.getLogger(__name__)

#: Shipped checkpoints under ``galgan_ray/data/models/``, by number of bands.
DEFAULT_MODELS: dict[int, str] = {1: "sr_1band.pt", 7: "sr_7band.pt"}
_MODEL_ALIASES: dict[str, int] = {"default": 1, "default-1band": 1, "default-7band": 7}

#: A PSF narrower than the model's by more than this fraction (of the model's FWHM) is matched to it;
#: closer than that it is used as it is (a kernel for a ~1 % difference is below the sampling).
PSF_MATCH_TOLERANCE = 0.01
#: A PSF broader than the model's by more than this fraction gets a warning (it cannot be undone).
PSF_BROADER_WARN = 0.10
#: An image whose pixel scale differs from the model's input scale by more than this factor is refused:
#: resampling it is no longer an enhancement (and a WCS in the wrong units, e.g. CDELT in arcsec read
#: as degrees, would ask for an output of millions of pixels a side).
PIXEL_SCALE_MAX_RATIO = 10.0
#: :meth:`Enhancer.enhance_plane`: core window and context (LR pixels). The shipped U-Net's influence
#: falls to 6e-6 of the peak at 32 px (4e-4 at 24, 6e-3 at 16): tests/test_model_properties.py.
PLANE_WINDOW_PX = 256
PLANE_HALO_PX = 32
#: Arithmetic of the generator's forward pass: float32, or bfloat16 autocast (AMX or AVX-512 BF16 on x86 CPUs,
#: tensor cores on GPUs; the output and the empty-input response subtracted from it stay float32).
PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def default_checkpoint(n_bands: int = 1) -> str:
    """Path of the shipped checkpoint for ``n_bands`` bands (1: HST F775W <- HSC i; 7: HST 7 bands).

    Raises
    ------
    InputError
        No model is shipped for ``n_bands`` or its file is missing from the installation.
    """
    name = DEFAULT_MODELS.get(int(n_bands))
    if name is None:
        raise InputError(f"default model ({n_bands} bands)",
                         f"no shipped model for {n_bands} bands; shipped: {sorted(DEFAULT_MODELS)} bands")
    ref = resources.files("galgan_ray").joinpath("data", "models", name)
    if not ref.is_file():
        raise InputError(f"galgan_ray/data/models/{name}",
                         f"no shipped model for {n_bands} band(s) in this installation; train one with "
                         f"`galgan train` and pass its path (--model PATH)")
    return str(ref)


#: Other shipped checkpoints, by alias (the evaluation's baselines).
NAMED_MODELS: dict[str, str] = {"default-fluxcons": "sr_1band_fluxcons.pt"}


def model_available(spec: str) -> bool:
    """Whether a shipped model alias (``default``, ``default-7band``, ``default-fluxcons``) is installed."""
    try:
        resolve_model(spec)
    except InputError:
        return False
    return True


def resolve_model(spec: str | os.PathLike = "default") -> str:
    """Checkpoint path/URL of a model spec: ``"default"`` (1 band), ``"default-7band"``,
    ``"default-fluxcons"`` (the default recipe plus the flux-consistency term), or a path/URL.

    Returns
    -------
    str
        The path or fsspec URL to pass to :func:`galgan_ray.checkpoint.load_checkpoint`.
    """
    s = str(spec)
    if s in _MODEL_ALIASES:
        return default_checkpoint(_MODEL_ALIASES[s])
    if s in NAMED_MODELS:
        ref = resources.files("galgan_ray").joinpath("data", "models", NAMED_MODELS[s])
        if not ref.is_file():
            raise InputError(f"galgan_ray/data/models/{NAMED_MODELS[s]}", f"model {s!r} is not shipped in this "
                                                                           "installation")
        return str(ref)
    return s


class Enhancer:
    """A super-resolution generator loaded once, applied to batches of model-grid cutouts.

    Parameters
    ----------
    checkpoint : str or os.PathLike
        ``"default"``, ``"default-7band"``, or a checkpoint path/URL (see :func:`resolve_model`).
    device : str or torch.device, optional
        Default ``cuda`` when available, else ``cpu``.
    batch_size : int
        Cutouts per forward pass.
    precision : {"fp32", "bf16"}
        ``bf16``: the forward pass under bfloat16 autocast (``bench/bench_precision.py`` measures the
        speed and ``tests/test_precision.py`` bounds what it changes in images and catalogs). fp32 is
        the default and what every committed report used.

    Notes
    -----
    Pickles as its checkpoint path (the weights are reloaded and re-verified on unpickling).

    Attributes
    ----------
    generator : torch.nn.Module
        In eval mode on ``device``.
    meta : dict
        Checkpoint metadata (:func:`galgan_ray.checkpoint.load_checkpoint`).
    model_cfg : SRGANConfig
    bands_low, bands_high : tuple of BandConfig
        Input and output bands in channel order.
    pixel_scale_low_arcsec, pixel_scale_high_arcsec : float
        The model's LR (input) and HR (output) pixel scales.
    lr_size, hr_size : int
        Cutout sides (22 and 64).
    """

    def __init__(self, checkpoint: str | os.PathLike = "default", *, device: str | torch.device | None = None,
                 batch_size: int = 256, precision: str = "fp32"):
        if batch_size < 1:
            raise InputError("batch_size", f"must be >= 1, got {batch_size}")
        if precision not in PRECISIONS:
            raise InputError("precision", f"must be one of {list(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.checkpoint = resolve_model(checkpoint)
        self._requested_device = None if device is None else str(device)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.generator, self.meta = load_checkpoint(self.checkpoint, device=self.device)
        # channels_last: oneDNN (CPU) and cuDNN run these convolutions without layout reorders around
        # every layer (bench/bench_enhance.py measures it; outputs agree to ~1e-7).
        self.generator = self.generator.to(memory_format=torch.channels_last)
        target = self.meta.get("path", self.checkpoint)
        cfg = self.generator.cfg
        if not isinstance(cfg, SRGANConfig):
            raise InputError(target, f"is a {type(cfg).__name__} checkpoint, not a super-resolution model "
                                     f"(use `galgan sample` for DCGANs)")
        self.model_cfg: SRGANConfig = cfg
        self.grid = ModelGrid.from_checkpoint_meta(self.meta, source=target)
        self.bands_low, self.bands_high = self.grid.low, self.grid.high
        if len(self.bands_low) != cfg.in_channels or len(self.bands_high) != cfg.out_channels:
            raise InputError(target, f"records {len(self.bands_low)} low / {len(self.bands_high)} high bands for a "
                                     f"model with {cfg.in_channels} input / {cfg.out_channels} output channels")
        self.pixel_scale_low_arcsec = float(self.bands_low[0].pixel_scale_arcsec)
        self.pixel_scale_high_arcsec = float(self.bands_high[0].pixel_scale_arcsec)
        ratio = self.pixel_scale_low_arcsec / self.pixel_scale_high_arcsec
        if abs(ratio - cfg.factor) > 1e-6 * cfg.factor:
            raise InputError(target, f"pixel scales {self.pixel_scale_low_arcsec}\" / {self.pixel_scale_high_arcsec}\" "
                                     f"do not match the model's upsampling factor {cfg.factor}")
        self.lr_size, self.hr_size, self.factor = int(cfg.lr_size), int(cfg.hr_size), int(cfg.factor)
        self._zero: dict[tuple, torch.Tensor] = {}

    # ---- what the model was made for
    @property
    def n_bands(self) -> int:
        """Number of input bands ``C``."""
        return len(self.bands_low)

    @property
    def band_keys_low(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.bands_low)

    @property
    def band_keys_high(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.bands_high)

    def psf_low(self, band: int = 0, *, size: int | None = None) -> np.ndarray:
        """The effective PSF of the model's LR inputs in ``band``: drawn at the LR scale (LR pixel included)."""
        return self.grid.psf_low(band, size=size)

    def psf_high(self, band: int = 0, *, size: int | None = None) -> np.ndarray:
        """The PSF of the HR training targets in ``band``, drawn at the HR scale."""
        return self.grid.psf_high(band, size=size)

    def psf_fwhm_low_arcsec(self, band: int = 0) -> float:
        """FWHM of :meth:`psf_low` (measured on the drawn image, so the LR pixel is included)."""
        return measure_fwhm(self.psf_low(band), pixel_scale_arcsec=self.pixel_scale_low_arcsec)

    # ---- inference
    def enhance_cutouts(self, image_lr, sigma_lr) -> np.ndarray:
        """Enhance model-grid LR cutouts.

        Parameters
        ----------
        image_lr : array_like ``(N, C, lr_size, lr_size)``
            LR cutouts (nJy, or any flux unit, per LR pixel) on the model's grid.
        sigma_lr : array_like ``(N, C)`` (or ``(N,)`` for one band)
            Noise sigma per LR pixel, same units.

        Returns
        -------
        numpy.ndarray
            float32 ``(N, C, hr_size, hr_size)`` in the input's units per HR pixel.
        """
        arr = np.asarray(image_lr, dtype=np.float32)
        if arr.ndim != 4 or arr.shape[1] != self.n_bands or arr.shape[2:] != (self.lr_size, self.lr_size):
            raise InputError("image_lr", f"expected (N, {self.n_bands}, {self.lr_size}, {self.lr_size}), "
                                         f"got {arr.shape}")
        sig = np.asarray(sigma_lr, dtype=np.float32)
        if sig.ndim == 1 and self.n_bands == 1:
            sig = sig[:, None]
        if sig.shape != arr.shape[:2]:
            raise InputError("sigma_lr", f"expected shape {arr.shape[:2]}, got {sig.shape}")
        out = np.empty((arr.shape[0], self.model_cfg.out_channels, self.hr_size, self.hr_size), dtype=np.float32)
        scaling = self.model_cfg.scaling
        with torch.inference_mode():
            for i in progress(range(0, arr.shape[0], self.batch_size), desc="enhance", unit="batch"):
                j = min(i + self.batch_size, arr.shape[0])
                x, _ = prepare_batch(arr[i:j], None, sig[i:j], scaling, device=self.device)
                x = x.contiguous(memory_format=torch.channels_last)
                y = postprocess(self._generate(x), sig[i:j], scaling)
                out[i:j] = y.cpu().numpy()
        return out

    @property
    def plane_step(self) -> int:
        """LR pixels between the positions where the network computes the same thing (``2**depth``):
        windows of an image start on multiples of it, so windowed inference equals whole-image inference."""
        return 2 ** int(self.model_cfg.depth)

    def _plane_input(self, plane, sigma) -> tuple[np.ndarray, np.ndarray, bool, tuple[int, int]]:
        if self.model_cfg.architecture != "unet":
            raise InputError(self.checkpoint, f"a {self.model_cfg.architecture!r} generator works on "
                                              f"{self.lr_size} px cutouts only, not on whole images")
        arr = np.asarray(plane, dtype=np.float32)
        squeeze = arr.ndim == 2
        if squeeze:
            arr = arr[None]
        if arr.ndim != 3 or arr.shape[0] != self.n_bands:
            raise InputError("plane", f"expected ({self.n_bands}, H, W), got {np.shape(plane)}")
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float32).reshape(-1), (self.n_bands,)).copy()
        if not np.all(np.isfinite(sig) & (sig > 0)):
            raise InputError("sigma", f"must be finite and > 0, got {sig.tolist()}")
        q = self.plane_step
        c, h, w = arr.shape
        # the far edges padded by repeating the last row/column (as the bicubic skip treats the near edges)
        padded = np.pad(np.where(np.isfinite(arr), arr, 0.0).astype(np.float32),
                        ((0, 0), (0, -h % q), (0, -w % q)), mode="edge")
        return padded, sig[None], squeeze, (h, w)

    def _generate(self, x: torch.Tensor, *, crop: bool = True) -> torch.Tensor:
        """The generator's output less its response to an empty input of the same shape (in the
        scaled space): nothing in gives exactly nothing out, at every position, edges included.
        The response is computed once per input shape."""
        kw = {} if crop else {"crop": False}
        key = (tuple(x.shape[1:]), crop)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            if key not in self._zero:
                zero = torch.zeros((1, *x.shape[1:]), dtype=x.dtype, device=x.device)
                self._zero[key] = self.generator(zero.contiguous(memory_format=torch.channels_last), **kw).float()
            y = self.generator(x, **kw).float()
        return (y - self._zero[key]).contiguous()

    def _forward_full(self, x_lr: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
        scaling = self.model_cfg.scaling
        x, _ = prepare_batch(x_lr[None], None, sig_b, scaling, device=self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        return postprocess(self._generate(x, crop=False), sig_b, scaling)[0].cpu().numpy()

    def enhance_plane(self, plane, sigma, *, need=None, window_px: int = PLANE_WINDOW_PX,
                      halo_px: int = PLANE_HALO_PX) -> np.ndarray:
        """Enhance a whole LR image on the model's grid, fully convolutionally and without seams.

        The image (padded at its far edges to a multiple of :attr:`plane_step` by repeating its last
        row and column) is cut into core
        windows of ``window_px``; each is enhanced with ``halo_px`` of context on every side (less at
        the image's edges, where the network then sees the edge exactly as on the whole image), and
        its core is kept. Windows start on multiples of :attr:`plane_step`, so the strided layers see
        the same phases as on the whole image, and with a halo wider than the network's reach the
        result equals whole-image inference (:meth:`enhance_whole`; ``tests/test_enhance.py``
        bounds the difference).

        Parameters
        ----------
        plane : array_like ``(C, H, W)`` (or ``(H, W)`` for one band)
            On the model's LR grid, flux per LR pixel; non-finite pixels count as 0.
        sigma : float or array_like ``(C,)``
            Noise sigma per LR pixel (the normalisation contract of :mod:`galgan_ray.models`).
        need : array_like of bool ``(H, W)``, optional
            LR pixels whose enhancement is wanted: core windows without any are skipped (left 0).
        window_px, halo_px : int
            Core window and context in LR pixels (rounded up to multiples of :attr:`plane_step`).

        Returns
        -------
        numpy.ndarray
            float32 ``(C, 3H, 3W)`` (``(3H, 3W)`` for a 2-D input) in the input's units per HR pixel:
            HR pixels ``3y .. 3y + 2`` lie in LR pixel ``y``.
        """
        padded, sig_b, squeeze, (h, w) = self._plane_input(plane, sigma)
        q, f = self.plane_step, self.factor
        win, halo = -(-max(int(window_px), 1) // q) * q, -(-max(int(halo_px), 0) // q) * q
        hp, wp = padded.shape[1:]
        want = None
        if need is not None:
            want = np.zeros((hp, wp), dtype=bool)
            want[:h, :w] = np.asarray(need, dtype=bool)
        out = np.zeros((self.model_cfg.out_channels, f * hp, f * wp), dtype=np.float32)
        with torch.inference_mode():
            for y0 in progress(range(0, hp, win), desc="enhance", unit="row"):
                for x0 in range(0, wp, win):
                    y1, x1 = min(y0 + win, hp), min(x0 + win, wp)
                    if want is not None and not want[y0:y1, x0:x1].any():
                        continue
                    ya, xa = max(y0 - halo, 0), max(x0 - halo, 0)
                    yb, xb = min(y1 + halo, hp), min(x1 + halo, wp)
                    y = self._forward_full(padded[:, ya:yb, xa:xb], sig_b)
                    out[:, f * y0:f * y1, f * x0:f * x1] = y[:, f * (y0 - ya):f * (y1 - ya), f * (x0 - xa):f * (x1 - xa)]
        out = out[:, :f * h, :f * w]
        return out[0] if squeeze else out

    def enhance_whole(self, plane, sigma) -> np.ndarray:
        """What :meth:`enhance_plane` reproduces: one forward pass over the whole image (padded to a
        multiple of :attr:`plane_step` the same way). Memory grows with the image: for tests and small images."""
        padded, sig_b, squeeze, (h, w) = self._plane_input(plane, sigma)
        with torch.inference_mode():
            y = self._forward_full(padded, sig_b)[:, :self.factor * h, :self.factor * w]
        return y[0] if squeeze else y

    def __reduce__(self):
        # Ray actors and process pools: ship the checkpoint path, reload (and re-verify) on arrival.
        return (_rebuild_enhancer, (self.checkpoint, self._requested_device, self.batch_size, self.precision))

    def __repr__(self) -> str:
        return (f"Enhancer({self.checkpoint!r}, bands {list(self.band_keys_low)} -> {list(self.band_keys_high)}, "
                f"{self.pixel_scale_low_arcsec}\"/px -> {self.pixel_scale_high_arcsec}\"/px, device={self.device}, "
                f"precision={self.precision})")


def _rebuild_enhancer(checkpoint: str, device: str | None, batch_size: int, precision: str = "fp32") -> Enhancer:
    return Enhancer(checkpoint, device=device, batch_size=batch_size, precision=precision)


# ----------------------------------------------------------------------------------------------
# Noise
# ----------------------------------------------------------------------------------------------
def estimate_noise_sigma(image: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Robust per-pixel noise sigma of a 2-D image with sources on it.

    Steps: (0) a residual gradient taken out (:func:`galgan_ray.sky_plane.fit_sky_plane`, so the estimate is
    the same with or without one); (1) a coarse sep background and its global rms; (2) sep detection at 1.5
    sigma with a segmentation map, dilated by 2 px, masks the sources; (3) the sigma-clipped MAD standard
    deviation of the remaining background-subtracted pixels. Falls back to step (1) when fewer than 10 % of
    the pixels are left.

    Parameters
    ----------
    image : numpy.ndarray
        2-D image.
    mask : numpy.ndarray of bool, optional
        Pixels to ignore (True), e.g. outside the footprint.

    Returns
    -------
    float
        Noise sigma per pixel in the image's units (0 for a noiseless image).
    """
    img = np.ascontiguousarray(image, dtype=np.float64)
    m = np.zeros(img.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not (~m).any() or np.ptp(img[~m]) == 0:  # constant (noiseless) image; sep would report rms 1
        return 0.0
    img = img - fit_sky_plane(img, ~m)
    ny, nx = img.shape
    box = int(max(8, min(64, min(ny, nx) // 3)))
    try:
        bkg = sep.Background(img, mask=m, bw=box, bh=box, fw=3, fh=3)
        resid, rms0 = img - bkg.back(), float(bkg.globalrms)
    except Exception:  # noqa: BLE001 - sep refuses degenerate images; fall back to plain statistics
        resid, rms0 = img - np.median(img[~m]) if (~m).any() else img, float("nan")
    if not np.isfinite(rms0) or rms0 <= 0:
        _, _, rms0 = sigma_clipped_stats(resid[~m], stdfunc="mad_std")
        rms0 = float(rms0)
    if not rms0 > 0:
        return 0.0
    try:
        _, seg = sep.extract(resid, 1.5, err=rms0, mask=m, minarea=5, segmentation_map=True)
        srcmask = ndimage.binary_dilation(seg > 0, iterations=2)
    except Exception:  # noqa: BLE001 - e.g. too many objects in a pathological image
        srcmask = np.zeros_like(m)
    keep = ~(m | srcmask)
    if keep.sum() < max(0.1 * img.size, 10):
        return rms0
    _, _, sd = sigma_clipped_stats(resid[keep], stdfunc="mad_std")
    return float(sd) if sd > 0 else rms0


# ----------------------------------------------------------------------------------------------
# Grids
# ----------------------------------------------------------------------------------------------
def _celestial_wcs(wcs, source: str) -> WCS:
    if not isinstance(wcs, WCS):
        raise InputError(source, f"expected an astropy WCS, got {type(wcs).__name__}")
    if not wcs.has_celestial:
        raise InputError(source, "the WCS has no celestial (RA/Dec) axes")
    return wcs.celestial


def _lr_grid(wcs_in: WCS, shape: tuple[int, int], scale_lr: float) -> WCS:
    """A north-up TAN grid at ``scale_lr`` centred on the input image's centre, covering its footprint."""
    ny, nx = shape
    ra, dec = wcs_in.pixel_to_world_values((nx - 1) / 2.0, (ny - 1) / 2.0)
    probe = make_tan_wcs(float(ra), float(dec), pixel_scale_arcsec=scale_lr, shape=(1, 1))  # centre at (0, 0)
    # Pixel edges of the input, sampled along the border (a curved footprint is covered too).
    tx, ty = np.linspace(-0.5, nx - 0.5, 33), np.linspace(-0.5, ny - 0.5, 33)
    xs = np.concatenate([tx, tx, np.full(33, -0.5), np.full(33, nx - 0.5)])
    ys = np.concatenate([np.full(33, -0.5), np.full(33, ny - 0.5), ty, ty])
    wx, wy = wcs_in.pixel_to_world_values(xs, ys)
    px, py = probe.world_to_pixel_values(wx, wy)
    n_x = max(int(math.ceil(2.0 * np.max(np.abs(px)) - 1e-6)), 1)
    n_y = max(int(math.ceil(2.0 * np.max(np.abs(py)) - 1e-6)), 1)
    return make_tan_wcs(float(ra), float(dec), pixel_scale_arcsec=scale_lr, shape=(n_y, n_x))


def _to_lr_grid(data: np.ndarray, wcs_in: WCS, wcs_lr: WCS, shape_lr: tuple[int, int], *,
                surface_brightness: bool) -> tuple[np.ndarray, np.ndarray]:
    """Flux-conserving resampling of ``(C, H, W)`` onto the LR grid: ``(image, footprint)``."""
    c = data.shape[0]
    res, foot = reproject_exact((data, wcs_in), wcs_lr, shape_out=(c, *shape_lr), return_footprint=True)
    res = np.nan_to_num(np.asarray(res, dtype=np.float64), nan=0.0)
    foot = np.clip(np.nan_to_num(np.asarray(foot, dtype=np.float64), nan=0.0), 0.0, 1.0)
    if foot.ndim == 3:
        foot = foot[0]
    # An LR pixel only partly covered by the input (at the border: the grids' sides are not integer
    # multiples of each other) takes the mean of its covered part, so edges stay flat; uncovered is 0.
    covered = foot > 0
    if surface_brightness:
        return res * covered, foot
    area = proj_plane_pixel_area(wcs_lr) / proj_plane_pixel_area(wcs_in)
    return res * area * covered, foot


#: An input grid turned by less than this (degrees) from one of the LR grid's eight axis-aligned
#: orientations (north-up, rotated by 90 degrees, mirrored) counts as that orientation: its PSF is
#: resampled without a rotation that would only blur it.
PSF_AXES_SNAP_DEG = 1.0


def _psf_axes(wcs_in: WCS, shape_in: tuple[int, int], wcs_lr: WCS) -> np.ndarray:
    """How the input's pixel axes lie on the LR grid at the input's centre: a 2x2 matrix of unit scale,
    ``(dx_lr, dy_lr) = A @ (dx_in, dy_in)`` (the identity for a north-up, east-left input). A PSF image
    drawn in the input's pixels is turned by it onto the (north-up) LR grid."""
    ny, nx = shape_in
    x0, y0 = (nx - 1) / 2.0, (ny - 1) / 2.0
    ra, dec = wcs_in.pixel_to_world_values(np.array([x0, x0 + 1.0, x0]), np.array([y0, y0, y0 + 1.0]))
    lx, ly = wcs_lr.world_to_pixel_values(ra, dec)
    jac = np.array([[lx[1] - lx[0], lx[2] - lx[0]], [ly[1] - ly[0], ly[2] - ly[0]]])
    jac /= math.sqrt(abs(np.linalg.det(jac)))
    for snap in (np.array(m, dtype=float) for m in ([[1, 0], [0, 1]], [[-1, 0], [0, 1]], [[1, 0], [0, -1]],
                                                    [[-1, 0], [0, -1]], [[0, 1], [1, 0]], [[0, -1], [1, 0]],
                                                    [[0, 1], [-1, 0]], [[0, -1], [-1, 0]])):
        if np.abs(jac - snap).max() < math.radians(PSF_AXES_SNAP_DEG):
            return snap
    return jac


def _psf_on_lr_grid(psf: np.ndarray, scale_psf: float, scale_lr: float, size: int,
                    axes: np.ndarray | None = None) -> np.ndarray:
    """A centred PSF image resampled (like the science image) onto a ``size`` LR grid, unit sum.
    ``axes``: how the PSF's pixel axes lie on the LR grid (:func:`_psf_axes`; default aligned)."""
    n_y, n_x = psf.shape
    w_in = make_tan_wcs(0.0, 0.0, pixel_scale_arcsec=scale_psf, shape=(n_y, n_x))
    if axes is not None:  # the LR grid's CD (east-left, north-up) times the input's axes on it
        w_in.wcs.cd = np.array([[-1.0, 0.0], [0.0, 1.0]]) @ np.asarray(axes, dtype=float) * (scale_psf / 3600.0)
    w_out = make_tan_wcs(0.0, 0.0, pixel_scale_arcsec=scale_lr, shape=(size, size))
    res, foot = reproject_exact((psf, w_in), w_out, shape_out=(size, size))
    return normalize_psf(np.nan_to_num(res * foot, nan=0.0), source="psf")


def _cosine_ramp_window(n: int, ramp: int) -> np.ndarray:
    """1-D weights: sin^2 ramps over ``ramp`` px at both ends, 1 between; overlapping ramps sum to 1."""
    i = np.arange(n) + 0.5
    t = np.clip(np.minimum(i, n - i) / max(ramp, 1), 0.0, 1.0)
    return np.sin(0.5 * np.pi * t) ** 2


def _tile_starts(n: int, size: int, stride: int) -> list[int]:
    starts = list(range(0, max(n - size, 0) + 1, stride))
    if starts[-1] + size < n:
        starts.append(n - size)
    return starts


# ----------------------------------------------------------------------------------------------
# Whole images
# ----------------------------------------------------------------------------------------------
def model_psf_lr(enhancer: Enhancer, band: int = 0) -> np.ndarray:
    """The PSF the model was trained on for input band ``band``, drawn on its LR grid (odd, >= 15 px, unit sum)."""
    s_lr = enhancer.pixel_scale_low_arcsec
    size = max(int(math.ceil(6.0 * max(enhancer.psf_fwhm_low_arcsec(band), 2 * s_lr) / s_lr)) | 1, 15)
    return draw_psf(enhancer.bands_low[band].psf, pixel_scale_arcsec=s_lr, size=size)


def gate_enhanced(image_hr: np.ndarray, image_lr: np.ndarray, *, enhancer: Enhancer,
                  valid: np.ndarray | None = None, sigma_lr=None, support: SupportConfig = SupportConfig()
                  ) -> tuple[np.ndarray, dict[str, Any]]:
    """An enhanced image kept only where the LR data detect something (:mod:`galgan_ray.support_map`).

    ``image_hr`` ``(C, fH, fW)`` flux per HR pixel, ``image_lr`` ``(C, H, W)`` the model's input (resampled,
    PSF-matched), ``valid`` ``(H, W)`` LR pixels with data, ``sigma_lr`` the noise per LR pixel where known
    (per band; :func:`~galgan_ray.support_map.map_support`'s floor). Returns the gated image and the support info
    (``n_regions``, ``fraction_supported``, ...; ``weight_lr``: the weight map)."""
    psf = np.stack([model_psf_lr(enhancer, b) for b in range(enhancer.n_bands)])
    weight, sinfo = map_support(image_lr, psf_lr=psf, valid=valid, sigma_lr=sigma_lr, config=support)
    gated = apply_support(image_hr, image_lr, weight, factor=enhancer.model_cfg.factor)
    return gated, {**sinfo, "weight_lr": weight}


@dataclass(frozen=True)
class _PSFPlan:
    fwhm_input_arcsec: float
    fwhm_model_arcsec: float
    action: str  # "matched" | "none" | "broader" | "no-psf"
    fwhm_matched_arcsec: float | None = None


def _plan_psf(psf_b: np.ndarray | None, *, scale_psf: float, enhancer: Enhancer, band: int, source: str,
              axes: np.ndarray | None = None) -> tuple[_PSFPlan, np.ndarray | None, str | None]:
    """Compare a user's PSF with the model's on the LR grid; a matching kernel where it is narrower.
    ``axes``: the input's pixel axes on the LR grid (:func:`_psf_axes`), so a rotated image's PSF is turned
    with it."""
    s_lr = enhancer.pixel_scale_low_arcsec
    target = model_psf_lr(enhancer, band)
    size = target.shape[0]
    f_model = measure_fwhm(target, pixel_scale_arcsec=s_lr)
    if psf_b is None:
        return _PSFPlan(float("nan"), f_model, "no-psf"), None, None
    user = _psf_on_lr_grid(normalize_psf(psf_b, source=source), scale_psf, s_lr, size, axes=axes)
    f_user = measure_fwhm(user, pixel_scale_arcsec=s_lr)
    key = enhancer.bands_low[band].key
    if not np.isfinite(f_user):
        raise InputError(source, f"cannot measure the FWHM of the PSF of band {band} ({key})")
    if f_user > f_model * (1.0 + PSF_BROADER_WARN):
        msg = (f"PSF of band {band} ({key}) has FWHM {f_user:.3f}\" on the model grid, broader than the model's "
               f"{f_model:.3f}\" by {100 * (f_user / f_model - 1):.0f}% (> {100 * PSF_BROADER_WARN:.0f}%): the model was "
               f"not trained for such seeing, expect softer, less reliable results")
        return _PSFPlan(f_user, f_model, "broader"), None, msg
    if f_user >= f_model * (1.0 - PSF_MATCH_TOLERANCE):
        return _PSFPlan(f_user, f_model, "none"), None, None
    # Fourier-ratio kernel on the LR grid; the science image is convolved after resampling, so the
    # kernel acts on exactly the PSF it was built from (the resampled user PSF).
    kernel = matching_kernel(user, target, window="tukey", alpha=0.4, regularization=1e-4)

    f_matched = measure_fwhm(fftconvolve(user, kernel, mode="same"), pixel_scale_arcsec=s_lr)
    msg = None
    if not abs(f_matched / f_model - 1.0) <= 0.05:
        msg = (f"PSF of band {band} ({key}) matched to FWHM {f_matched:.3f}\", not the model's {f_model:.3f}\" "
               f"(PSF too different in shape for the matching kernel?)")
    return _PSFPlan(f_user, f_model, "matched", f_matched), kernel, msg


def _enhance_tiled(lr: np.ndarray, sig: np.ndarray, *, enhancer: Enhancer, overlap_px: int, source: str
                   ) -> tuple[np.ndarray, int]:
    """Cutout-only generators: mirror-padded tiles of the model's input size, ``overlap_px`` apart
    in overlap, blended with cosine-ramp weights that sum to one across every overlap."""
    cfg = enhancer.model_cfg
    n_bands = enhancer.n_bands
    L, f, hr = cfg.lr_size, cfg.factor, cfg.hr_size
    crop = cfg.crop
    pad = int(overlap_px)
    ny, nx = lr.shape[1:]
    pad_y, pad_x = (pad, pad + max(L - (ny + 2 * pad), 0)), (pad, pad + max(L - (nx + 2 * pad), 0))
    padded = np.pad(lr, ((0, 0), pad_y, pad_x), mode="symmetric")
    py_, px_ = padded.shape[1:]
    stride = L - int(overlap_px)
    ys, xs = _tile_starts(py_, L, stride), _tile_starts(px_, L, stride)
    starts = [(y, x) for y in ys for x in xs]
    w1 = _cosine_ramp_window(hr, hr - f * stride)
    w2 = np.outer(w1, w1).astype(np.float32)
    acc = np.zeros((cfg.out_channels, f * py_, f * px_), dtype=np.float32)
    wsum = np.zeros((f * py_, f * px_), dtype=np.float32)
    sig32 = sig.astype(np.float32)
    # Stream the tiles in enhancer-sized batches, so memory holds one batch of outputs, not all of them.
    for i in range(0, len(starts), enhancer.batch_size):
        chunk = starts[i:i + enhancer.batch_size]
        tiles = np.stack([padded[:, y:y + L, x:x + L] for y, x in chunk]).astype(np.float32)
        out = enhancer.enhance_cutouts(tiles, np.broadcast_to(sig32, (len(chunk), n_bands)))
        for (y, x), tile in zip(chunk, out):
            oy, ox = f * y + crop, f * x + crop  # HR pixel 0 of a tile: LR pixel y's first sub-pixel + crop
            acc[:, oy:oy + hr, ox:ox + hr] += tile * w2
            wsum[oy:oy + hr, ox:ox + hr] += w2
    y0, x0 = f * pad_y[0], f * pad_x[0]
    acc = acc[:, y0:y0 + f * ny, x0:x0 + f * nx]
    wsum = wsum[y0:y0 + f * ny, x0:x0 + f * nx]
    if not np.all(wsum > 0):  # cannot happen with pad >= 1 and overlap >= 1; guard the geometry
        raise InputError(source, "internal tiling left HR pixels uncovered")
    return acc / wsum, len(starts)


def enhance_image(image, wcs: WCS, *, enhancer: Enhancer, sigma: float | Sequence[float] | None = None,
                  psf: np.ndarray | None = None, psf_pixel_scale_arcsec: float | None = None,
                  overlap_px: int = 6, surface_brightness: bool = False, source: str = "image",
                  support: SupportConfig | None = SupportConfig()) -> tuple[np.ndarray, WCS, dict[str, Any]]:
    """Enhance an image of any size, pixel scale and WCS with a super-resolution model.

    Steps:

    1. Resample flux-conservingly (``reproject_exact`` x pixel-area ratio) onto a north-up TAN grid
       at the model's LR scale, centred on the image and covering its footprint (border pixels
       partly covered take the mean of their covered part; sky outside the footprint is 0).
       Non-finite input pixels count as 0.
    2. If a PSF is given, resample it the same way and compare its FWHM with the model's LR PSF
       (the checkpoint's band config, drawn at the LR scale). Narrower by more than
       :data:`PSF_MATCH_TOLERANCE`: convolve the resampled image with the matching kernel
       (:func:`galgan_ray.degrade.matching_kernel`). Broader by more than :data:`PSF_BROADER_WARN`:
       a warning in ``info["warnings"]`` (nothing can undo it).
    3. Noise sigma per LR pixel: given, or :func:`estimate_noise_sigma` of the image the model sees.
    4. Enhance the whole LR image fully convolutionally (:meth:`Enhancer.enhance_plane`: windows
       with context that reproduce whole-image inference, so no seams and no pattern at a tile
       stride). Generators that take fixed-size cutouts only (``architecture: paper``) tile the
       image (mirror-padded by ``overlap_px``) and blend the tiles with cosine-ramp weights.
    5. Crop to the LR grid's footprint x factor: an HR grid co-centred with the LR one.
    6. Unless ``support`` is None, keep the enhanced pixels only where the LR data detect a source
       (:func:`gate_enhanced`, :mod:`galgan_ray.support_map`: a matched-filter peak >= 5 sigma grown to
       its 2-sigma isophote and one PSF FWHM); elsewhere the image is the data themselves, bicubic-upsampled.
       The model turns noise peaks into compact sources (a 4-sigma noise peak into one 18x the output's
       pixel scatter); the gate keeps them out of the image as the field job's support tests keep them
       out of the catalog.

    Parameters
    ----------
    image : array_like
        ``(C, H, W)`` with C the model's bands in its order, or ``(H, W)`` for a 1-band model; flux
        per pixel (any unit; see ``surface_brightness``).
    wcs : astropy.wcs.WCS
        Celestial WCS of the image (extra axes are dropped).
    enhancer : Enhancer
    sigma : float or sequence of float, optional
        Noise sigma per pixel *of the resampled, PSF-matched LR image* (the model's input), in the
        image's units, one per band. Estimated from the image when omitted.
    psf : array_like, optional
        The image's PSF: ``(n, n)`` (every band) or ``(C, n, n)``, centred on the array centre.
    psf_pixel_scale_arcsec : float, optional
        Sampling of ``psf``; default the image's pixel scale.
    overlap_px : int
        Cutout-only generators: overlap of neighbouring tiles in LR pixels (1 .. lr_size // 2).
    surface_brightness : bool
        The image is surface brightness (intensive) rather than flux per pixel.
    source : str
        Name of the image (a file) used in error messages.
    support : SupportConfig or None
        The support gate (step 6); None: the model's output everywhere.

    Returns
    -------
    image_hr : numpy.ndarray
        float32 ``(C, H', W')`` (``(H', W')`` for a 2-D input) at the model's HR scale, in the input's
        units per HR pixel (or surface brightness units).
    wcs_hr : astropy.wcs.WCS
        North-up TAN WCS of ``image_hr``.
    info : dict
        ``checkpoint``, ``sha256``, ``bands_low``, ``bands_high`` (keys), ``pixel_scale_in_arcsec``,
        ``pixel_scale_lr_arcsec``, ``pixel_scale_hr_arcsec``, ``shape_lr``, ``shape_hr``, ``sigma_lr``
        (list per band), ``sigma_source`` (``"given"``/``"estimated"``), ``psf`` (per band: ``action``
        one of ``matched``/``none``/``broader``/``no-psf``, ``fwhm_input_arcsec``, ``fwhm_model_arcsec``,
        ``fwhm_matched_arcsec``), ``warnings`` (list of str), ``n_tiles``, ``overlap_px``,
        ``n_nonfinite`` (input pixels set to 0), ``footprint_lr`` (float32 covered fraction per LR pixel),
        ``surface_brightness``, ``support`` (None, or :func:`gate_enhanced`'s info without the weight map:
        ``n_regions``, ``fraction_supported``, ``detect_snr``, ``grow_snr``, ``peak_snr``, ``effective_sigma``),
        ``image_lr`` (float32 ``(C, H, W)``: the model's input, resampled and PSF-matched; with
        ``footprint_lr`` and ``sigma_lr`` what :func:`gate_enhanced` needs to gate a ``support=None``
        output, of a flux-per-pixel image, exactly as this function would).

    Raises
    ------
    InputError
        Naming ``source``: wrong rank or band count, no finite pixels, a band of zeros, no celestial
        WCS, a pixel scale more than :data:`PIXEL_SCALE_MAX_RATIO` from the model's, a PSF of the
        wrong shape or with non-finite pixels, a noiseless image without ``sigma``.
    """
    cfg = enhancer.model_cfg
    n_bands = enhancer.n_bands
    # ---- input checks
    arr = np.asarray(image, dtype=np.float64)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputError(source, f"expected a 2-D image or a (C, H, W) cube, got shape {arr.shape}")
    if arr.shape[0] != n_bands:
        raise InputError(source, f"has {arr.shape[0]} band(s), the model {enhancer.checkpoint} expects "
                                 f"{n_bands} ({', '.join(enhancer.band_keys_low)})")
    finite = np.isfinite(arr)
    if not finite.any():
        raise InputError(source, "has no finite pixels (all NaN/inf)")
    n_nonfinite = int((~finite).sum())
    arr = np.where(finite, arr, 0.0)
    for b in range(n_bands):  # a real exposure has noise: an all-zero plane is empty or unfilled
        if not np.any(arr[b]):
            raise InputError(source, f"all pixels are zero in band {b} ({enhancer.band_keys_low[b]}): an empty "
                                     f"or unfilled image, nothing to enhance")
    wcs_in = _celestial_wcs(wcs, source)
    if not 1 <= overlap_px <= cfg.lr_size // 2:
        raise InputError("overlap_px", f"must be in 1..{cfg.lr_size // 2}, got {overlap_px}")
    scale_in = pixel_scale_of(wcs_in)
    s_lr, s_hr = enhancer.pixel_scale_low_arcsec, enhancer.pixel_scale_high_arcsec
    if not (np.isfinite(scale_in) and s_lr / PIXEL_SCALE_MAX_RATIO <= scale_in <= s_lr * PIXEL_SCALE_MAX_RATIO):
        raise InputError(source, f"wrong pixel scale for the model: the WCS gives {scale_in:.4g}\"/px, more than "
                                 f"{PIXEL_SCALE_MAX_RATIO:g}x from the model's {s_lr}\"/px input (CD/CDELT in the "
                                 f"wrong units?)")

    # ---- 1. resample onto the model's LR grid
    wcs_lr = _lr_grid(wcs_in, arr.shape[1:], s_lr)
    shape_lr = (int(wcs_lr.pixel_shape[1]), int(wcs_lr.pixel_shape[0]))
    lr, foot = _to_lr_grid(arr, wcs_in, wcs_lr, shape_lr, surface_brightness=surface_brightness)

    # ---- 2. PSF
    warnings_: list[str] = []
    psf_info: list[dict] = []
    if psf is not None:
        p = np.asarray(psf, dtype=np.float64)
        if p.ndim == 2:
            p = np.broadcast_to(p, (n_bands, *p.shape))
        if p.ndim != 3 or p.shape[0] != n_bands:
            raise InputError(f"{source} PSF", f"expected (n, n) or ({n_bands}, n, n), got shape {np.shape(psf)}")
    scale_psf = float(psf_pixel_scale_arcsec or scale_in)
    for b in range(n_bands):
        plan, kernel, msg = _plan_psf(None if psf is None else p[b], scale_psf=scale_psf, enhancer=enhancer,
                                      band=b, source=f"{source} PSF", axes=_psf_axes(wcs_in, arr.shape[1:], wcs_lr))
        if kernel is not None:
            lr[b] = convolve_keeping_sky(lr[b], kernel, foot > 0.999)
        if msg:
            warnings_.append(msg)
            log.warning("%s: %s", source, msg)
        psf_info.append({"band": enhancer.band_keys_low[b], "action": plan.action,
                         "fwhm_input_arcsec": plan.fwhm_input_arcsec, "fwhm_model_arcsec": plan.fwhm_model_arcsec,
                         "fwhm_matched_arcsec": plan.fwhm_matched_arcsec})

    # ---- 3. noise
    if sigma is None:
        outside = foot <= 0
        sig = np.array([estimate_noise_sigma(lr[b], mask=outside) for b in range(n_bands)])
        sigma_source = "estimated"
        if not np.all(sig > 0):
            raise InputError(source, "the noise sigma estimated from the image is 0 (a noiseless image?); "
                                     "pass sigma explicitly")
    else:
        sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64).reshape(-1), (n_bands,)).copy()
        sigma_source = "given"
        if not np.all(np.isfinite(sig) & (sig > 0)):
            raise InputError("sigma", f"must be finite and > 0, got {sig.tolist()}")

    f = cfg.factor
    # ---- 4. enhance: the whole LR image fully convolutionally (no seams, no pattern), or, for a
    #         generator that takes fixed-size cutouts only, overlapping tiles blended by cosine ramps
    ny, nx = shape_lr
    if cfg.architecture == "unet":
        image_hr = enhancer.enhance_plane(lr.astype(np.float32), sig)
        n_tiles = -(-ny // PLANE_WINDOW_PX) * -(-nx // PLANE_WINDOW_PX)
    else:
        image_hr, n_tiles = _enhance_tiled(lr, sig, enhancer=enhancer, overlap_px=int(overlap_px), source=source)
    support_info = None
    if support is not None:  # gate_enhanced(output, info["image_lr"], ...) of a support=None call gives the same
        image_hr, support_info = gate_enhanced(image_hr, lr, enhancer=enhancer, valid=foot > 0, sigma_lr=sig,
                                               support=support)
        support_info.pop("weight_lr")
    if surface_brightness:
        image_hr *= np.float32(cfg.area_ratio)  # the model returns flux per HR pixel

    # ---- 5. the HR grid: co-centred with the LR grid, f times finer
    ra, dec = wcs_lr.wcs.crval
    wcs_hr = make_tan_wcs(float(ra), float(dec), pixel_scale_arcsec=s_hr, shape=(f * ny, f * nx))
    info = {
        "checkpoint": str(enhancer.checkpoint), "sha256": enhancer.meta.get("sha256"),
        "bands_low": list(enhancer.band_keys_low), "bands_high": list(enhancer.band_keys_high),
        "pixel_scale_in_arcsec": scale_in, "pixel_scale_lr_arcsec": s_lr, "pixel_scale_hr_arcsec": s_hr,
        "shape_lr": shape_lr, "shape_hr": (f * ny, f * nx), "sigma_lr": [float(s) for s in sig],
        "sigma_source": sigma_source, "psf": psf_info, "warnings": warnings_, "n_tiles": n_tiles,
        "overlap_px": int(overlap_px), "n_nonfinite": n_nonfinite, "footprint_lr": foot.astype(np.float32),
        "surface_brightness": bool(surface_brightness), "support": support_info,
        "image_lr": lr.astype(np.float32),
    }
    return (image_hr[0] if squeeze else image_hr), wcs_hr, info
