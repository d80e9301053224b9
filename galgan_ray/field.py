"""The field processor's pure core: one tile in, its catalog (and, for simulations, truth scores) out.

No Ray here: every step runs on one tile in a notebook or a test; :mod:`galgan_ray.ray_shell.field`
wraps each step in a ``<Verb>Stage`` and streams a field's tiles through them. The steps, in the
order data flows:

1. **Degrade** (simulation mode only; :func:`degrade_tile`). A high-resolution (HST-like) tile is
   convolved with the PSF-matching kernels of :mod:`galgan_ray.degrade`, summed over r x r pixel
   blocks onto the co-aligned low-resolution (LR) grid (the same operator as the cutout degradation;
   LR pixel J covers HR pixels rJ .. rJ+r-1), converted to the LR units and given sky noise. The
   noise is drawn per 64 x 64 block of the field's common LR grid, seeded with
   ``[seed, band, block_x, block_y]`` (``[seed, tile_id]`` for a tile without a field grid), so
   overlapping tiles hold the same pixels, as coadd patches of one tract do, and the result does
   not depend on which worker ran which tile. The truth positions move to the LR grid; the peaks
   of the HR tile are kept for the ``high`` row of the statistics (:func:`find_high_peaks`).
2. **Footprints** (:func:`find_footprints`). Background (sep, two passes, detected objects masked
   in the second), then sep segmentation of the detection image with its variance (``thresh_sigma``
   per pixel, no sep deblending: a footprint is a low-resolution *parent*), and the PSF-matched
   peaks of :func:`galgan_ray.detect.find_peaks` at low resolution. A footprint is a source of the
   catalog when it holds at least one LR peak (the survey's detection); an LR peak outside every
   segment gets a 3 x 3 footprint of its own, so no detection is lost.
3. **Cutouts** (:func:`cut_cutouts`): the enhancement is spent on footprints only, never on empty
   sky. A footprint whose box fits in the 22 x 22 cutout less a 3 px margin gets one cutout centred
   on it; a bigger one is covered by a grid of 22 x 22 cutouts ``tile_stride_px`` apart, and a peak
   found in several of them is kept only from the cutout whose centre is nearest (a Voronoi split:
   no gaps, no duplicates), then peaks closer than the detector's minimum separation are merged.
   Footprints needing more than ``max_cutouts_per_footprint`` cutouts are not enhanced (flag
   ``ENHANCE_SKIPPED``; their LR peaks are used).
4. **Enhance**: the super-resolution model, ``(K, C, 22, 22) -> (K, C, 64, 64)`` nJy (a callable
   passed in; :class:`galgan_ray.enhance.Enhancer` in the pipeline).
5. **Detect** (:func:`find_children`): :func:`galgan_ray.detect.find_peaks_batch` on each enhanced
   cutout with the HR PSF of the model's high-resolution band, with the noise of enhanced images
   calibrated on pure-noise inputs (:func:`enhanced_noise_scale`: ``noise = rho * sigma_lr``). Peaks
   map back to the LR cutout (:func:`galgan_ray.geometry.hr_to_lr_pixels`), to the tile's pixels
   and, through the tile WCS, to RA/Dec. A peak belongs to a footprint when its LR pixel lies in
   that footprint's segment. A footprint whose enhanced image holds no peak keeps its LR peaks
   (flag ``ENHANCE_SKIPPED``).
6. **Measure** (:func:`measure_children`): :func:`galgan_ray.photometry.fit_fluxes` on the LR image
   at the enhanced positions (centres fixed by default: forced photometry), all children of a
   footprint fitted simultaneously in a box around the footprint, with pixels of other footprints
   given zero weight; the PSF is a Gaussian mixture fitted to the tile's PSF image (once per PSF
   and process). The boxes of a tile are padded with zero-weight pixels to a few common sizes and
   fitted in one batched call per size. Extra bands are fitted in ``forced`` mode with the
   reference band's shapes.
7. **Catalog** (:func:`build_catalog`): ``objectId = (tileId << 24) | n`` with n the running
   number of the child in the tile (children ordered by footprint, then by decreasing
   significance); ``parentObjectId = (tileId << 24) | 2^23 | footprint``. A source belongs to the
   tile whose inner region holds its position; the others are dropped (or kept with
   ``NOT_PRIMARY`` when ``keep_not_primary``), so a field's tiles merge without duplicates or gaps.
8. **Truth** (:func:`score_truth`, simulations): truth sources brighter than ``mag_limit`` are
   matched one to one (Hungarian, within ``match_radius_arcsec``) to the HR peaks, the LR peaks and
   the enhanced children of the tile; every pair of them closer than ``blend_max_sep_arcsec`` whose
   brighter member the tile owns becomes a row of the blends table, with its parameters and whether
   both members were found at high, low and enhanced resolution.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from .degrade import DegradeConfig
from .detect import DetectConfig, find_peaks_batch
from .errors import ConfigError, InputError
from .flags import flag_bit
from .instrument import BandConfig
from .photometry import PhotometryComputeConfig, PhotometryConfig
from .tiles import Tile

__all__ = ["FootprintConfig", "TruthConfig", "FieldConfig", "ModelGrid", "check_tile", "degrade_tile",
           "find_high_peaks", "find_peaks_tiled", "find_footprints", "cut_cutouts", "find_children", "measure_children",
           "build_catalog", "score_truth", "enhanced_noise_scale", "process_tile", "catalog_table",
           "failure_table", "truth_table", "blends_table", "TRUTH_TABLE_COLUMNS", "BLEND_TABLE_COLUMNS",
           "PARENT_BIT", "ID_SHIFT", "TILE_STEPS"]

#: ``objectId = (tileId << ID_SHIFT) | n``; parents set :data:`PARENT_BIT` in ``n``.
ID_SHIFT = 24
PARENT_BIT = 1 << 23

#: The steps of :func:`process_tile` under each of the five stages of the Ray pipeline (``timing`` keys).
#: ``high_peaks`` runs on simulations only. ``bench/bench_tile.py`` reports the steps in this order.
TILE_STEPS: dict[str, tuple[str, ...]] = {
    "degrade_s": ("high_peaks", "degrade"),
    "footprints_s": ("footprints", "cutouts"),
    "enhance_s": ("enhance",),
    "detect_s": ("detect",),
    "photometry_s": ("photometry", "catalog+truth"),
}

_EDGE = flag_bit("EDGE")
_NONFINITE = flag_bit("NONFINITE")
_BLENDED = flag_bit("BLENDED")
_NOT_PRIMARY = flag_bit("NOT_PRIMARY")
_SKIPPED = flag_bit("ENHANCE_SKIPPED")
_MERGED = flag_bit("PEAK_MERGED")
_MASKED = flag_bit("MASKED")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FootprintConfig:
    """Low-resolution footprints (parents) and the cutouts enhanced around them.

    Attributes
    ----------
    thresh_sigma : float
        sep threshold per pixel, in units of the pixel's noise (sqrt of the variance plane).
    min_area_px : int
        Smallest footprint (pixels above threshold).
    background : {"sep", "none"}
        Subtract a sep background map (two passes, detections masked), or nothing.
    back_size_px, back_filter_size : int
        sep background mesh and median filter.
    cutout_margin_px : int
        A footprint fits one cutout when its box plus this margin on each side fits in 22 px.
    tile_stride_px : int
        Spacing of the cutout grid over larger footprints (must leave ``cutout_margin_px`` on each
        side of a Voronoi cell: ``stride <= 22 - 2 * margin``).
    max_cutouts_per_footprint : int
        Larger footprints are not enhanced (``ENHANCE_SKIPPED``).
    photometry_margin_px : int
        Pixels around a footprint's box in the photometry fit.
    max_fit_children : int
        Footprints with more children than this (a bright galaxy shredded into knots) are fitted
        in ``forced`` mode (fluxes only, round profiles of ``hlr_init_arcsec``): the nonlinear fit of
        dozens of overlapping sources costs seconds and is ill-posed anyway.
    edge_px : float
        Children closer than this to the tile edge, or in a footprint touching it, get ``EDGE``.
    peak_block_px : int
        Core of the blocks the tile-level peak finder works in (:func:`find_peaks_tiled`); the
        high-resolution tiles of simulations use three times this.
    """

    thresh_sigma: float = 1.5
    min_area_px: int = 5
    background: Literal["sep", "none"] = "sep"
    back_size_px: int = 64
    back_filter_size: int = 3
    cutout_margin_px: int = 3
    tile_stride_px: int = 16
    max_cutouts_per_footprint: int = 64
    photometry_margin_px: int = 4
    max_fit_children: int = 6
    edge_px: float = 2.0
    peak_block_px: int = 128

    def __post_init__(self):
        if not self.thresh_sigma > 0 or self.min_area_px < 1:
            raise ConfigError("footprints.thresh_sigma", "need thresh_sigma > 0 and min_area_px >= 1")
        if self.background not in ("sep", "none"):
            raise ConfigError("footprints.background", f"must be 'sep' or 'none', got {self.background!r}")
        if self.tile_stride_px < 1 or self.cutout_margin_px < 0 or self.max_cutouts_per_footprint < 1:
            raise ConfigError("footprints.tile_stride_px", "need stride >= 1, margin >= 0, max_cutouts >= 1")


@dataclass(frozen=True)
class TruthConfig:
    """How simulated fields are scored against their truth.

    Attributes
    ----------
    match_radius_arcsec : float
        Largest truth-to-detection distance of a match.
    mag_limit : float
        Truth sources fainter than this (AB, the tile's band) are not scored.
    blend_max_sep_arcsec : float
        Truth pairs closer than this are blends (a row of the blends table).
    """

    match_radius_arcsec: float = 0.3
    mag_limit: float = 25.5
    blend_max_sep_arcsec: float = 2.0

    def __post_init__(self):
        if not (self.match_radius_arcsec > 0 and self.blend_max_sep_arcsec > 0):
            raise ConfigError("truth.match_radius_arcsec", "radii must be > 0")


@dataclass(frozen=True)
class FieldConfig:
    """Science parameters of the field processor (compute knobs live in the Ray shell's config).

    Attributes
    ----------
    seed : int
        Seeds the simulated degradation noise (per field-grid block or per tile) and the noise
        calibration of enhanced images.
    footprints : FootprintConfig
    detect : DetectConfig
        The peak finder, identical at every resolution (LR tile, enhanced cutouts, HR tile). The
        tile's background is subtracted before, so ``background`` is ``zero`` here, and
        ``min_prominence`` is 3: on whole fields, noise bumps on bright extended galaxies otherwise
        become peaks (5-10 per bright galaxy on enhanced images), which isolated-blend benchmarks
        never meet.
    photometry : PhotometryConfig
        Defaults to fixed centres (forced at the enhanced positions), free size and shape.
    truth : TruthConfig
    psf_n_gauss : int
        Gaussians in the PSF mixture fitted to each tile's PSF.
    noise_realizations : int
        Pure-noise cutouts used to calibrate the noise of enhanced images.
    degrade_add_noise : bool
        Add LR sky noise when degrading simulated tiles.
    keep_not_primary : bool
        Keep sources outside the tile's inner region, flagged ``NOT_PRIMARY`` (default: drop them;
        the tile that owns them reports them).
    """

    seed: int = 0
    footprints: FootprintConfig = field(default_factory=FootprintConfig)
    detect: DetectConfig = field(default_factory=lambda: DetectConfig(background="zero", min_prominence=3.0))
    photometry: PhotometryConfig = field(default_factory=lambda: PhotometryConfig(fit_centre=False))
    truth: TruthConfig = field(default_factory=TruthConfig)
    psf_n_gauss: int = 3
    noise_realizations: int = 64
    degrade_add_noise: bool = True
    keep_not_primary: bool = False

    def __post_init__(self):
        if self.psf_n_gauss < 1 or self.noise_realizations < 2:
            raise ConfigError("field.psf_n_gauss", "need psf_n_gauss >= 1 and noise_realizations >= 2")


@dataclass(frozen=True)
class ModelGrid:
    """What a super-resolution model was made for: its bands (channel order) and cutout grids.

    Attributes
    ----------
    high, low : tuple of BandConfig
        The model's HR (output) and LR (input) bands.
    lr_size, hr_size : int
        Cutout sides (22 and 64).
    """

    high: tuple[BandConfig, ...]
    low: tuple[BandConfig, ...]
    lr_size: int = 22
    hr_size: int = 64

    @property
    def ratio(self) -> float:
        return self.low[0].pixel_scale_arcsec / self.high[0].pixel_scale_arcsec

    @property
    def band_keys_low(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.low)

    @property
    def band_keys_high(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.high)

    def degrade_config(self) -> DegradeConfig:
        """The degradation that makes this model's inputs from its targets."""
        return DegradeConfig(high=self.high, low=self.low)

    def psf_high(self) -> np.ndarray:
        """The HR PSF of the first band at the HR pixel scale (for peaks on enhanced images)."""
        from .psf import draw_psf

        return np.asarray(draw_psf(self.high[0].psf, pixel_scale_arcsec=self.high[0].pixel_scale_arcsec))

    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any], *, source: str = "checkpoint") -> "ModelGrid":
        """From the ``meta`` of :func:`galgan_ray.checkpoint.read_checkpoint`."""
        from .config import from_dict

        bands = meta.get("bands") or {}
        if not bands.get("high") or not bands.get("low"):
            raise InputError(source, "the checkpoint records no high/low bands; the field job needs them")
        model = (meta.get("model") or {}).get("config") or {}
        return cls(high=tuple(from_dict(BandConfig, b, where=f"{source}:bands.high") for b in bands["high"]),
                   low=tuple(from_dict(BandConfig, b, where=f"{source}:bands.low") for b in bands["low"]),
                   lr_size=int(model.get("lr_size", 22)), hr_size=int(model.get("hr_size", 64)))


# ------------------------------------------------------------------------------------------------
# Validation against the model
# ------------------------------------------------------------------------------------------------
def check_tile(tile: Tile, *, model: ModelGrid) -> Literal["simulation", "real"]:
    """Decide how a tile is processed, or raise naming the tile and the problem.

    A simulated tile on the model's HR grid is degraded first (``"simulation"``); a tile on the
    model's LR grid is processed as it is (``"real"``).

    Raises
    ------
    InputError
        Wrong band count or bands, a pixel scale matching neither grid (1% tolerance), or a tile
        smaller than one cutout.
    """
    n = len(model.low)
    if tile.n_bands != n:
        raise InputError(tile.source, f"wrong band count: the tile has {tile.n_bands} band(s) {list(tile.bands)}, "
                                      f"the model takes {n} {list(model.band_keys_low)}")
    scale = tile.pixel_scale_arcsec
    s_lo, s_hi = model.low[0].pixel_scale_arcsec, model.high[0].pixel_scale_arcsec
    if tile.simulated and abs(scale / s_hi - 1) < 0.01:
        if tuple(tile.bands) != model.band_keys_high:
            raise InputError(tile.source, f"simulated tile bands {list(tile.bands)} differ from the model's "
                                          f"high-resolution bands {list(model.band_keys_high)}")
        mode = "simulation"
        min_side = model.hr_size
    elif abs(scale / s_lo - 1) < 0.01:
        if tuple(tile.bands) != model.band_keys_low:
            raise InputError(tile.source, f"tile bands {list(tile.bands)} differ from the model's low-resolution "
                                          f"bands {list(model.band_keys_low)}")
        mode = "real"
        min_side = model.lr_size
    else:
        raise InputError(tile.source, f"wrong pixel scale for the model: {scale:.4f}\"/px, the model takes "
                                      f"{s_lo}\"/px tiles (or simulated {s_hi}\"/px tiles)")
    if min(tile.shape) < min_side:
        raise InputError(tile.source, f"wrong shape: {tile.shape[0]}x{tile.shape[1]} px is smaller than one "
                                      f"{min_side} px cutout")
    return mode


# ------------------------------------------------------------------------------------------------
# 1. Degrade a simulated tile
# ------------------------------------------------------------------------------------------------
def _fft_convolve_same(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Linear convolution of each plane ``(C, H, W)`` with its odd kernel ``(C, k, k)``, zero padding."""
    import scipy.fft as sfft

    c, h, w = images.shape
    k = kernels.shape[-1]
    half = k // 2
    sy, sx = sfft.next_fast_len(h + k - 1, real=True), sfft.next_fast_len(w + k - 1, real=True)
    out = sfft.irfft2(sfft.rfft2(images.astype(np.float64), s=(sy, sx)) * sfft.rfft2(kernels, s=(sy, sx)),
                      s=(sy, sx))
    return out[:, half:half + h, half:half + w]


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


def _lr_wcs_header(wcs_header: str, r: int) -> str:
    """The WCS of the r x r block-summed grid (same projection; pixel centres at block centres)."""
    from astropy.io import fits
    from astropy.wcs import WCS

    w = WCS(fits.Header.fromstring(wcs_header)).celestial.deepcopy()
    if w.sip is not None:
        raise InputError("degrade_tile", "simulated tiles with SIP distortion are not supported")
    crpix0 = np.asarray(w.wcs.crpix, dtype=np.float64) - 1.0  # 0-based
    w.wcs.crpix = (crpix0 - (r - 1) / 2.0) / r + 1.0
    if w.wcs.has_cd():
        w.wcs.cd = np.asarray(w.wcs.cd) * r
    else:
        w.wcs.cdelt = np.asarray(w.wcs.cdelt) * r
    if w.pixel_shape is not None:
        w.pixel_shape = tuple(int(s) // r for s in w.pixel_shape)
    return w.to_header(relax=True).tostring()


def degrade_tile(tile: Tile, *, config: DegradeConfig, seed: int, add_noise: bool = True) -> Tile:
    """Degrade a simulated high-resolution tile to the low-resolution grid (module docstring, step 1).

    Parameters
    ----------
    tile : Tile
        HR tile whose bands are ``config.high`` and whose pixel scale is ``config.scale_high_arcsec``.
    config : DegradeConfig
        Bands and matching-kernel settings; the LR/HR pixel-scale ratio must be a whole number.
    seed : int
        Noise seed (see :func:`_block_noise`).
    add_noise : bool
        Add LR sky noise of ``low[c].sky_sigma``.

    Returns
    -------
    Tile
        LR tile: ``floor(H / r) x floor(W / r)`` px, variance = propagated HR variance + LR sky
        variance, mask = OR over each block, PSF = the LR bands' PSFs, WCS, inner region, field
        origin and truth positions mapped to the LR grid; ``simulated`` stays True.
    """
    from .degrade import band_kernels
    from .psf import draw_psf

    r = int(round(config.ratio))
    if abs(config.ratio - r) > 1e-6:
        raise ConfigError("degrade", f"the LR/HR pixel-scale ratio {config.ratio} must be a whole number for tiles")
    c, h, w = tile.image.shape
    if c != len(config.high):
        raise InputError(tile.source, f"{c} band(s), the degradation has {len(config.high)}")
    hl, wl = h // r, w // r
    kernels = band_kernels(config)
    unit = np.array([hb.to_njy / lb.to_njy for hb, lb in zip(config.high, config.low)])[:, None, None]
    good = np.isfinite(tile.variance) & (tile.mask == 0)
    img = np.where(good, tile.image, 0.0)
    conv = _fft_convolve_same(img, kernels)[:, :hl * r, :wl * r]
    lr = conv.reshape(c, hl, r, wl, r).sum(axis=(2, 4)) * unit
    var_hr = np.where(good, tile.variance, 0.0)
    var_conv = _fft_convolve_same(var_hr, kernels**2)[:, :hl * r, :wl * r]
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
    to_lr = lambda v: (np.asarray(v, dtype=np.float64) - (r - 1) / 2.0) / r  # noqa: E731
    inner = tuple(float(to_lr(v)) for v in tile.inner)
    truth = None
    if tile.truth is not None:
        truth = dict(tile.truth)
        truth["x"], truth["y"] = to_lr(truth["x"]), to_lr(truth["y"])
    return Tile(tile_id=tile.tile_id, source=tile.source, image=np.where(bad, 0.0, lr).astype(np.float32),
                variance=var.astype(np.float32), mask=mask, psf=psf_lr,
                wcs_header=_lr_wcs_header(tile.wcs_header, r), bands=tuple(b.key for b in config.low), inner=inner,
                tract_origin=origin, truth=truth, simulated=True)


def find_peaks_tiled(image: np.ndarray, *, psf: np.ndarray, detect: DetectConfig, noise_sigma: float,
                     block_px: int = 128) -> dict[str, np.ndarray]:
    """:func:`galgan_ray.detect.find_peaks` on a whole tile, in overlapping blocks.

    The tile is cut into ``block_px`` cores, each filtered with a margin of half the PSF plus 8 px
    (so the matched filter sees the same pixels as on the whole image) in one
    :func:`~galgan_ray.detect.find_peaks_batch` call; a peak is kept from the block whose core holds
    it. Merging and the prominence test then act within blocks, which keeps their cost linear in
    the tile's area (on a whole tile they grow as the square of the number of peaks), and the
    per-image ``max_peaks`` cap does not apply to a tile.

    Returns
    -------
    dict of numpy.ndarray
        ``x``, ``y`` (0-based px of the tile), ``significance``, ``flux``, ``flags`` (as
        :func:`~galgan_ray.detect.find_peaks`), ordered by decreasing significance.
    """
    from dataclasses import replace

    h, w = image.shape
    margin = psf.shape[0] // 2 + 8
    core = max(int(block_px), 8)
    starts = [(y, x) for y in range(0, h, core) for x in range(0, w, core)]
    size = core + 2 * margin
    blocks = np.zeros((len(starts), size, size), dtype=np.float32)
    for i, (y, x) in enumerate(starts):
        blocks[i] = _extract(image, x - margin, y - margin, size, 0.0)
    det = replace(detect, max_peaks=10**9, border_px=1)
    pk = find_peaks_batch(blocks, psf=psf, config=det, noise_sigma=float(noise_sigma))
    oy = np.array([s[0] for s in starts]) - margin
    ox = np.array([s[1] for s in starts]) - margin
    x, y = pk["x"] + ox[pk["index"]], pk["y"] + oy[pk["index"]]
    cy, cx = oy[pk["index"]] + margin, ox[pk["index"]] + margin
    keep = ((x >= cx - 0.5) & (x < cx + core - 0.5) & (y >= cy - 0.5) & (y < cy + core - 0.5)
            & (x > 0.5 * detect.border_px - 0.5) & (x < w - 0.5 * detect.border_px - 0.5)
            & (y > 0.5 * detect.border_px - 0.5) & (y < h - 0.5 * detect.border_px - 0.5))
    order = np.argsort(-pk["significance"][keep], kind="stable")
    return {"x": x[keep][order], "y": y[keep][order], "significance": pk["significance"][keep][order],
            "flux": pk["flux"][keep][order], "flags": pk["flags"][keep][order]}


def find_high_peaks(tile: Tile, *, detect: DetectConfig, ratio: int, block_px: int = 384) -> dict[str, np.ndarray]:
    """Peaks of a simulated HR tile (band 0), positions mapped to the LR grid of :func:`degrade_tile`.

    Returns
    -------
    dict of numpy.ndarray
        ``x``, ``y`` (0-based LR px), ``significance``.
    """
    good = np.isfinite(tile.variance[0])
    sigma = float(np.sqrt(np.median(tile.variance[0][good])))
    pk = find_peaks_tiled(np.where(good, tile.image[0], 0.0), psf=tile.psf[0], detect=detect, noise_sigma=sigma,
                          block_px=block_px)
    r = int(ratio)
    return {"x": (pk["x"] - (r - 1) / 2.0) / r, "y": (pk["y"] - (r - 1) / 2.0) / r,
            "significance": pk["significance"].astype(np.float32)}


# ------------------------------------------------------------------------------------------------
# 2. Footprints
# ------------------------------------------------------------------------------------------------
def _detection_image(image: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance weighted mean of the bands and its variance (``inf`` where unusable)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(np.isfinite(variance) & (variance > 0), 1.0 / variance, 0.0)
        wsum = ivar.sum(axis=0)
        det = np.where(wsum > 0, (image * ivar).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.0)
        dvar = np.where(wsum > 0, 1.0 / np.where(wsum > 0, wsum, 1.0), np.inf)
    return det.astype(np.float32), dvar.astype(np.float32)


def _sep_background(img: np.ndarray, bad: np.ndarray, cfg: FootprintConfig) -> np.ndarray:
    import sep

    h, w = img.shape
    bkg = sep.Background(np.ascontiguousarray(img, dtype=np.float32), mask=np.ascontiguousarray(bad),
                         bw=min(cfg.back_size_px, w), bh=min(cfg.back_size_px, h), fw=cfg.back_filter_size,
                         fh=cfg.back_filter_size)
    return bkg.back()


def _sep_segments(det: np.ndarray, dvar: np.ndarray, bad: np.ndarray, cfg: FootprintConfig):
    import sep

    h, w = det.shape
    sep.set_extract_pixstack(max(300000, 2 * h * w))
    sep.set_sub_object_limit(4096)
    var = np.where(bad, np.float32(1e30), dvar).astype(np.float32)
    objs, seg = sep.extract(np.ascontiguousarray(det, dtype=np.float32), cfg.thresh_sigma,
                            var=np.ascontiguousarray(var), mask=np.ascontiguousarray(bad), minarea=cfg.min_area_px,
                            deblend_cont=1.0, segmentation_map=True)
    return objs, np.asarray(seg, dtype=np.int32)


def find_footprints(tile: Tile, *, config: FieldConfig) -> dict[str, np.ndarray]:
    """Background, footprints (sep segments) and LR peaks of a low-resolution tile.

    Returns
    -------
    dict of numpy.ndarray
        ``image_sub`` float32 ``(C, H, W)``: background-subtracted image (0 where unusable);
        ``seg`` int32 ``(H, W)``: footprint label per pixel (0: none);
        per footprint (K rows, only those holding an LR peak, ordered by label):
        ``fp.label`` int32, ``fp.bbox`` int32 ``(K, 4)`` (x_min, x_max, y_min, y_max, inclusive),
        ``fp.npix`` int32, ``fp.x``, ``fp.y`` float64 (centroid), ``fp.n_peaks_low`` int32,
        ``fp.flags`` int64 (``EDGE``: touches the tile edge; ``MASKED``: holds masked pixels);
        per LR peak (P rows): ``low.x``, ``low.y`` float64, ``low.significance`` float32,
        ``low.flags`` int32, ``low.fp`` int32 (row of its footprint);
        ``noise_sigma`` float64 ``(C,)``: median per-pixel noise of each band;
        ``n_segments`` int64 ``()``: sep segments before the peak requirement.
    """
    from scipy import ndimage

    cfg = config.footprints
    c, h, w = tile.image.shape
    bad_c = ~np.isfinite(tile.variance) | (tile.mask != 0)
    image = np.where(bad_c, 0.0, tile.image).astype(np.float32)
    noise = np.array([float(np.sqrt(np.median(tile.variance[ci][~bad_c[ci]]))) if (~bad_c[ci]).any() else np.nan
                      for ci in range(c)])
    bad = bad_c.all(axis=0)
    if cfg.background == "sep":
        det0, dvar0 = _detection_image(image, np.where(bad_c, np.inf, tile.variance))
        _, seg0 = _sep_segments(det0, dvar0, bad, cfg)
        objmask = ndimage.binary_dilation(seg0 > 0, iterations=3)
        image = np.stack([image[ci] - _sep_background(image[ci], bad_c[ci] | objmask, cfg) for ci in range(c)])
        image = np.where(bad_c, 0.0, image).astype(np.float32)
    det, dvar = _detection_image(image, np.where(bad_c, np.inf, tile.variance))
    objs, seg = _sep_segments(det, dvar, bad, cfg)
    n_segments = len(objs)

    # LR peaks: the survey's detection (matched filter, the same detector at every resolution).
    psf_det = tile.psf.mean(axis=0)
    sig_det = float(np.sqrt(np.median(dvar[np.isfinite(dvar)]))) if np.isfinite(dvar).any() else 1.0
    pk = find_peaks_tiled(np.where(bad, 0.0, det), psf=psf_det, detect=config.detect, noise_sigma=sig_det,
                          block_px=cfg.peak_block_px)
    ix = np.clip(np.rint(pk["x"]).astype(np.int64), 0, w - 1)
    iy = np.clip(np.rint(pk["y"]).astype(np.int64), 0, h - 1)
    label = seg[iy, ix].copy()
    # A peak outside every segment gets a 3x3 footprint of its own (nothing is lost).
    next_label = n_segments + 1
    for k in np.flatnonzero(label == 0):
        ys, xs = slice(max(iy[k] - 1, 0), iy[k] + 2), slice(max(ix[k] - 1, 0), ix[k] + 2)
        if seg[iy[k], ix[k]] == 0:
            free = seg[ys, xs] == 0
            seg[ys, xs][free] = next_label
            label[k] = next_label
            next_label += 1
        else:  # an earlier orphan painted this pixel
            label[k] = seg[iy[k], ix[k]]
    labels = np.unique(label[label > 0])
    keep_seg = np.isin(seg, labels)
    seg = np.where(keep_seg, seg, 0).astype(np.int32)
    slices = ndimage.find_objects(seg)
    k_of_label = {int(l): i for i, l in enumerate(labels)}
    n_fp = len(labels)
    bbox = np.zeros((n_fp, 4), dtype=np.int32)
    npix = np.zeros(n_fp, dtype=np.int32)
    fx = np.zeros(n_fp)
    fy = np.zeros(n_fp)
    fflags = np.zeros(n_fp, dtype=np.int64)
    for i, l in enumerate(labels):
        sl = slices[int(l) - 1]
        sy, sx = sl
        bbox[i] = (sx.start, sx.stop - 1, sy.start, sy.stop - 1)
        sub = seg[sl] == l
        npix[i] = int(sub.sum())
        yy, xx = np.nonzero(sub)
        wts = np.clip(det[sl][sub], 0, None) + 1e-12
        fx[i] = float((xx + sx.start) @ wts / wts.sum())
        fy[i] = float((yy + sy.start) @ wts / wts.sum())
        if sx.start == 0 or sy.start == 0 or sx.stop == w or sy.stop == h:
            fflags[i] |= _EDGE
        if (bad_c[:, sl[0], sl[1]] & sub).any():
            fflags[i] |= _MASKED
    peak_fp = np.array([k_of_label[int(l)] for l in label], dtype=np.int32)
    n_low = np.bincount(peak_fp, minlength=n_fp).astype(np.int32)
    return {
        "image_sub": image, "seg": seg,
        "fp.label": labels.astype(np.int32), "fp.bbox": bbox, "fp.npix": npix, "fp.x": fx, "fp.y": fy,
        "fp.n_peaks_low": n_low, "fp.flags": fflags,
        "low.x": pk["x"], "low.y": pk["y"], "low.significance": pk["significance"].astype(np.float32),
        "low.flags": pk["flags"].astype(np.int32), "low.fp": peak_fp,
        "noise_sigma": noise, "n_segments": np.asarray(n_segments, dtype=np.int64),
    }


# ------------------------------------------------------------------------------------------------
# 3. Cutouts
# ------------------------------------------------------------------------------------------------
def _extract(arr: np.ndarray, x0: int, y0: int, size: int, fill) -> np.ndarray:
    """``arr[..., y0:y0+size, x0:x0+size]`` with ``fill`` outside the array."""
    h, w = arr.shape[-2:]
    out = np.full(arr.shape[:-2] + (size, size), fill, dtype=arr.dtype)
    ys, xs = max(y0, 0), max(x0, 0)
    ye, xe = min(y0 + size, h), min(x0 + size, w)
    if ye > ys and xe > xs:
        out[..., ys - y0:ye - y0, xs - x0:xe - x0] = arr[..., ys:ye, xs:xe]
    return out


def _grid_centres(lo: int, hi: int, stride: int) -> np.ndarray:
    width = hi - lo + 1
    n = max(1, math.ceil(width / stride))
    return (lo + hi) / 2.0 + (np.arange(n) - (n - 1) / 2.0) * stride


def cut_cutouts(image_sub: np.ndarray, variance: np.ndarray, footprints: Mapping[str, np.ndarray], *,
                config: FootprintConfig, side: int = 22) -> dict[str, np.ndarray]:
    """LR cutouts around footprints (module docstring, step 3).

    Returns
    -------
    dict of numpy.ndarray
        Per cutout (M rows): ``cut.image`` float32 ``(M, C, side, side)`` (nJy, 0 where unusable),
        ``cut.sigma`` float32 ``(M, C)`` (median noise of the cutout's usable pixels),
        ``cut.origin`` int64 ``(M, 2)`` (x, y of the cutout's pixel (0, 0) on the tile),
        ``cut.centre`` float64 ``(M, 2)`` (its Voronoi centre on the tile), ``cut.fp`` int32 (row of
        its footprint), ``cut.padded`` bool (part of it lies off the tile or on unusable pixels);
        per footprint: ``fp.n_cutouts`` int32 (0: not enhanced, too large).
    """
    c, h, w = image_sub.shape
    bbox = footprints["fp.bbox"]
    n_fp = len(bbox)
    tile_sigma = np.array([np.sqrt(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else 1.0 for v in variance])
    usable = side - 2 * config.cutout_margin_px
    stride = min(config.tile_stride_px, max(usable, 1))
    origins, centres, fps = [], [], []
    n_cut = np.zeros(n_fp, dtype=np.int32)
    for k in range(n_fp):
        x0, x1, y0, y1 = (int(v) for v in bbox[k])
        m = config.cutout_margin_px
        if x1 - x0 + 1 <= usable and y1 - y0 + 1 <= usable:
            # One cutout on the footprint's centroid, moved just enough to hold its box plus margin.
            cx, cy = float(footprints["fp.x"][k]), float(footprints["fp.y"][k])
            ox = int(np.clip(np.floor(cx - (side - 1) / 2.0 + 0.5), x1 + m - (side - 1), x0 - m))
            oy = int(np.clip(np.floor(cy - (side - 1) / 2.0 + 0.5), y1 + m - (side - 1), y0 - m))
            origins.append((ox, oy))
            centres.append((cx, cy))
            fps.append(k)
            n_cut[k] = 1
            continue
        cxs, cys = _grid_centres(x0, x1, stride), _grid_centres(y0, y1, stride)
        if len(cxs) * len(cys) > config.max_cutouts_per_footprint:
            continue
        for cy in cys:
            for cx in cxs:
                ox = int(np.floor(cx - (side - 1) / 2.0 + 0.5))
                oy = int(np.floor(cy - (side - 1) / 2.0 + 0.5))
                origins.append((ox, oy))
                centres.append((cx, cy))
                fps.append(k)
        n_cut[k] = len(cxs) * len(cys)
    m = len(origins)
    images = np.zeros((m, c, side, side), dtype=np.float32)
    sigma = np.zeros((m, c), dtype=np.float32)
    padded = np.zeros(m, dtype=bool)
    for i, (ox, oy) in enumerate(origins):
        var = _extract(variance, ox, oy, side, np.inf)
        ok = np.isfinite(var)
        images[i] = np.where(ok, _extract(image_sub, ox, oy, side, 0.0), 0.0)
        padded[i] = not ok.all()
        for ci in range(c):
            sigma[i, ci] = np.sqrt(np.median(var[ci][ok[ci]])) if ok[ci].any() else tile_sigma[ci]
    return {"cut.image": images, "cut.sigma": sigma,
            "cut.origin": np.asarray(origins, dtype=np.int64).reshape(m, 2),
            "cut.centre": np.asarray(centres, dtype=np.float64).reshape(m, 2),
            "cut.fp": np.asarray(fps, dtype=np.int32), "cut.padded": padded, "fp.n_cutouts": n_cut}


# ------------------------------------------------------------------------------------------------
# 4-5. Enhanced peaks -> children
# ------------------------------------------------------------------------------------------------
def enhanced_noise_scale(enhance_fn: Callable[[np.ndarray, np.ndarray], np.ndarray], *, n_bands: int,
                         psf_hr: np.ndarray, detect: DetectConfig, lr_size: int = 22, n_realizations: int = 64,
                         seed: int = 0) -> float:
    """rho such that ``noise_sigma = rho * sigma_lr`` is the right matched-filter noise on enhanced images.

    The enhancer divides its input by ``sigma_lr`` (the normalisation contract of
    :mod:`galgan_ray.models`), so one calibration at ``sigma_lr = 1`` serves every cutout: pure
    unit-noise LR cutouts are enhanced and the standard deviation of their matched-filter
    significance (computed with noise 1, away from the edges) is rho
    (:func:`galgan_ray.baselines.significance_noise_scale`).
    """
    from .baselines import significance_noise_scale

    def transform(x):
        x = np.asarray(x, dtype=np.float32)[:, None].repeat(n_bands, axis=1)
        return np.asarray(enhance_fn(x, np.ones((len(x), n_bands), np.float32)))[:, 0]

    return float(significance_noise_scale(transform, shape=(lr_size, lr_size), psf_out=psf_hr,
                                          n_realizations=n_realizations, seed=seed, psf_energy=detect.psf_energy))


def _merge_close(x: np.ndarray, y: np.ndarray, sig: np.ndarray, min_sep: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy merge of points closer than ``min_sep`` (keep the more significant); kept mask, merged mask."""
    order = np.argsort(-sig, kind="stable")
    keep = np.zeros(len(x), bool)
    merged = np.zeros(len(x), bool)
    kept_idx: list[int] = []
    for i in order:
        close = [j for j in kept_idx if (x[i] - x[j]) ** 2 + (y[i] - y[j]) ** 2 < min_sep**2]
        if close:
            merged[close[0]] = True
        else:
            keep[i] = True
            kept_idx.append(i)
    return keep, merged


def find_children(enhanced: np.ndarray, products: Mapping[str, np.ndarray], *, tile_shape: tuple[int, int],
                  psf_hr: np.ndarray, rho: float, detect: DetectConfig, ratio: float, edge_px: float = 2.0,
                  lr_size: int = 22) -> dict[str, np.ndarray]:
    """Children of every footprint: peaks of the enhanced cutouts mapped to the tile (step 5).

    Parameters
    ----------
    enhanced : numpy.ndarray
        ``(M, C, n_high, n_high)`` enhanced cutouts (nJy per HR pixel), rows as ``cut.*``.
    products : mapping
        The outputs of :func:`find_footprints` and :func:`cut_cutouts`.
    tile_shape : (int, int)
        ``(H, W)`` of the LR tile.
    psf_hr : numpy.ndarray
        The HR PSF the peaks are found with.
    rho : float
        Noise scale of enhanced images (:func:`enhanced_noise_scale`).
    detect : DetectConfig
    ratio : float
        LR / HR pixel-scale ratio (3).
    edge_px : float
        Children this close to the tile edge, or in a footprint touching it, get ``EDGE``.
    lr_size : int
        Side of the LR cutouts (22).

    Returns
    -------
    dict of numpy.ndarray, one row per child, ordered by footprint then decreasing significance
        ``child.fp`` int32 (footprint row), ``child.x``, ``child.y`` float64 (0-based LR tile px),
        ``child.significance`` float32, ``child.flags`` int64 (``PEAK_MERGED``, ``EDGE``,
        ``ENHANCE_SKIPPED`` when the LR peaks stand in, ``BLENDED`` when the footprint has more
        than one LR peak); per footprint ``fp.n_peaks_enhanced`` int32 (enhanced peaks kept; 0 when
        the LR peaks stand in).
    """
    from .geometry import hr_to_lr_pixels

    h, w = tile_shape
    n_fp = len(products["fp.bbox"])
    seg = products["seg"]
    labels = products["fp.label"]
    cut_fp = products["cut.fp"]
    origin = products["cut.origin"]
    centre = products["cut.centre"]
    sigma = products["cut.sigma"]
    m = len(cut_fp)
    parts = {k: [] for k in ("fp", "x", "y", "significance", "flags")}
    n_enh = np.zeros(n_fp, dtype=np.int32)
    if m:
        enh = np.asarray(enhanced, dtype=np.float32)
        n_high = enh.shape[-1]
        n_low = int(lr_size)
        if enh.shape[1] == 1:
            det_img, noise = enh[:, 0], rho * sigma[:, 0].astype(np.float64)
        else:  # chi-like detection image: sum of the bands' S/N images
            det_img = (enh / (rho * sigma[:, :, None, None])).sum(axis=1)
            noise = np.full(m, np.sqrt(enh.shape[1]))
        pk = find_peaks_batch(det_img, psf=psf_hr, config=detect, noise_sigma=np.maximum(noise, 1e-30))
        xl, yl = hr_to_lr_pixels(pk["x"], pk["y"], n_high=n_high, n_low=n_low, ratio=ratio)
        ci = pk["index"]
        xt, yt = xl + origin[ci, 0], yl + origin[ci, 1]
        ix = np.clip(np.rint(xt).astype(np.int64), 0, w - 1)
        iy = np.clip(np.rint(yt).astype(np.int64), 0, h - 1)
        inside = (xt > -0.5) & (xt < w - 0.5) & (yt > -0.5) & (yt < h - 0.5)
        fp = cut_fp[ci]
        own = inside & (seg[iy, ix] == labels[fp])
        # Voronoi: keep a peak only from the nearest cutout of its footprint.
        multi = products["fp.n_cutouts"][fp] > 1
        if multi.any():
            for j in np.flatnonzero(own & multi):
                mine = np.flatnonzero(cut_fp == fp[j])
                d2 = (centre[mine, 0] - xt[j]) ** 2 + (centre[mine, 1] - yt[j]) ** 2
                if mine[np.argmin(d2)] != ci[j]:
                    own[j] = False
        flags = (pk["flags"].astype(np.int64) & ~np.int64(_EDGE))
        sel = np.flatnonzero(own)
        fp_s, x_s, y_s, s_s, f_s = fp[sel], xt[sel], yt[sel], pk["significance"][sel], flags[sel]
        from .psf import measure_fwhm

        min_sep = max(detect.min_separation_fwhm * measure_fwhm(psf_hr), 1.0) / ratio
        for k in np.unique(fp_s[multi[sel]] if len(sel) else []):
            rows = np.flatnonzero(fp_s == k)
            keep, merged = _merge_close(x_s[rows], y_s[rows], s_s[rows], min_sep)
            f_s[rows[merged]] |= _MERGED
            drop = rows[~keep]
            fp_s, x_s, y_s, s_s, f_s = (np.delete(a, drop) for a in (fp_s, x_s, y_s, s_s, f_s))
        for key, arr in zip(("fp", "x", "y", "significance", "flags"), (fp_s, x_s, y_s, s_s, f_s)):
            parts[key].append(arr)
        n_enh = np.bincount(fp_s, minlength=n_fp).astype(np.int32)
    # Footprints without enhanced peaks (or not enhanced): their LR peaks stand in.
    lp_fp = products["low.fp"]
    for k in np.flatnonzero(n_enh == 0):
        rows = np.flatnonzero(lp_fp == k)
        parts["fp"].append(np.full(len(rows), k, dtype=np.int32))
        parts["x"].append(products["low.x"][rows])
        parts["y"].append(products["low.y"][rows])
        parts["significance"].append(products["low.significance"][rows])
        parts["flags"].append((products["low.flags"][rows].astype(np.int64) & ~np.int64(_EDGE)) | _SKIPPED)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    fp = cat["fp"].astype(np.int32)
    order = np.lexsort((-cat["significance"], fp))
    x, y = cat["x"][order].astype(np.float64), cat["y"][order].astype(np.float64)
    fp = fp[order]
    flags = cat["flags"][order].astype(np.int64)
    near = (x < edge_px - 0.5) | (y < edge_px - 0.5) | (x > w - 0.5 - edge_px) | (y > h - 0.5 - edge_px)
    flags |= np.where(near | (products["fp.flags"][fp] & _EDGE).astype(bool), _EDGE, 0)
    flags |= np.where(products["fp.n_peaks_low"][fp] > 1, _BLENDED, 0)
    flags |= products["fp.flags"][fp] & _MASKED
    return {"child.fp": fp, "child.x": x, "child.y": y,
            "child.significance": cat["significance"][order].astype(np.float32), "child.flags": flags,
            "fp.n_peaks_enhanced": n_enh}


# ------------------------------------------------------------------------------------------------
# 6. Photometry
# ------------------------------------------------------------------------------------------------
_BOX_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

#: What one more Levenberg-Marquardt loop (one more :func:`~galgan_ray.photometry.fit_fluxes` call)
#: costs, in source-pixels evaluated per iteration: about 1.3 ms of fixed work per iteration (some
#: hundred small torch operations) against 60-70 ns per source and pixel, on one CPU thread. It
#: decides which box sizes of a tile share one padded fit; on the default field's tiles 1.5e4-3e4
#: are equally fast, no merging is 15% slower, one class for all 25-40% slower (bench/bench_tile.py).
_LOOP_COST_PX = 20000.0


@lru_cache(maxsize=64)
def _psf_mixture_cached(key: bytes, shape: tuple[int, int], scale: float, n_gauss: int):
    from .gmm import fit_psf_mixture

    img = np.frombuffer(key, dtype=np.float64).reshape(shape)
    mix, _ = fit_psf_mixture(img, n_gauss=n_gauss, pixel_scale_arcsec=scale, source="tile PSF")
    return mix


def _psf_mixture(psf: np.ndarray, scale: float, n_gauss: int):
    psf = np.ascontiguousarray(psf, dtype=np.float64)
    return _psf_mixture_cached(psf.tobytes(), psf.shape, float(scale), int(n_gauss))


def _size_classes(sizes: Sequence[int], n_sources: Sequence[int], *, loop_cost_px: float) -> dict[int, int]:
    """The box size each size is padded to, so that a tile's fits run in few batched calls.

    Each call costs ``loop_cost_px`` plus its sources times the pixels of its (largest) box; the
    sorted sizes are split into the contiguous classes of least total cost (dynamic programming
    over at most a dozen sizes).
    """
    weight: dict[int, int] = {}
    for sz, n in zip(sizes, n_sources):
        weight[int(sz)] = weight.get(int(sz), 0) + int(n)
    u = sorted(weight)
    best = [0.0] + [math.inf] * len(u)
    cut = [0] * (len(u) + 1)
    for j in range(1, len(u) + 1):
        n = 0
        for i in range(j, 0, -1):  # class u[i-1] .. u[j-1], padded to u[j-1]
            n += weight[u[i - 1]]
            cost = best[i - 1] + loop_cost_px + n * float(u[j - 1]) ** 2
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    out: dict[int, int] = {}
    j = len(u)
    while j > 0:
        for sz in u[cut[j]:j]:
            out[sz] = u[j - 1]
        j = cut[j]
    return out


def measure_children(image_sub: np.ndarray, variance: np.ndarray, products: Mapping[str, np.ndarray], *,
                     psf: np.ndarray, pixel_scale_arcsec: float, config: FieldConfig,
                     compute: PhotometryComputeConfig = PhotometryComputeConfig()) -> dict[str, np.ndarray]:
    """Gaussian-mixture photometry of all children on the LR image, footprint by footprint (step 6).

    Every footprint is fitted in its own box (its bounding box and children plus
    ``photometry_margin_px``, rounded up to a size of ``_BOX_SIZES``); boxes are then padded with
    zero-weight pixels to a few common sizes (:func:`_size_classes`) so that a tile takes one or
    two batched :func:`~galgan_ray.photometry.fit_fluxes` calls instead of one per box size. Padding
    changes no fit: the pixels added carry no weight.

    Returns
    -------
    dict of numpy.ndarray, rows as ``child.*``
        ``phot.flux``, ``phot.flux_err`` float64 ``(N, C)`` (nJy), ``phot.flags`` int64 (OR of the
        bands' fit flags, less the box-edge ``EDGE`` bit), ``phot.hlr_arcsec`` float64 (reference band).
    """
    from dataclasses import replace

    from .photometry import fit_fluxes

    c, h, w = image_sub.shape
    seg = products["seg"]
    labels = products["fp.label"]
    bbox = products["fp.bbox"]
    cfp, cx, cy = products["child.fp"], products["child.x"], products["child.y"]
    n = len(cfp)
    flux = np.full((n, c), np.nan)
    err = np.full((n, c), np.nan)
    flags = np.zeros(n, dtype=np.int64)
    hlr = np.full(n, np.nan)
    if n == 0:
        return {"phot.flux": flux, "phot.flux_err": err, "phot.flags": flags, "phot.hlr_arcsec": hlr}
    mixes = [_psf_mixture(psf[ci], pixel_scale_arcsec, config.psf_n_gauss) for ci in range(c)]
    margin = config.footprints.photometry_margin_px
    # 1. One box per footprint.
    items = []
    for k in np.unique(cfp):
        rows = np.flatnonzero(cfp == k)
        x0 = min(int(bbox[k, 0]), int(np.floor(cx[rows].min()))) - margin
        x1 = max(int(bbox[k, 1]), int(np.ceil(cx[rows].max()))) + margin
        y0 = min(int(bbox[k, 2]), int(np.floor(cy[rows].min()))) - margin
        y1 = max(int(bbox[k, 3]), int(np.ceil(cy[rows].max()))) + margin
        need = max(x1 - x0 + 1, y1 - y0 + 1)
        size = next((s for s in _BOX_SIZES if s >= need), need)
        ox = int(np.floor((x0 + x1) / 2.0 - (size - 1) / 2.0 + 0.5))
        oy = int(np.floor((y0 + y1) / 2.0 - (size - 1) / 2.0 + 0.5))
        items.append((int(k), rows, ox, oy, size, len(rows) > config.footprints.max_fit_children))
    # 2. Group the boxes: by fit mode, then by padded size.
    groups: dict[tuple[int, bool], list] = {}
    for many in (False, True):
        sel = [it for it in items if it[5] == many]
        if not sel:
            continue
        # Forced fits (many children) are linear: one evaluation, so a loop costs little.
        loop = _LOOP_COST_PX / (config.photometry.max_iter if many or config.photometry.mode == "forced" else 1)
        pad_to = _size_classes([it[4] for it in sel], [len(it[1]) for it in sel], loop_cost_px=loop)
        for it in sel:
            groups.setdefault((pad_to[it[4]], many), []).append(it)
    # 3. One fit per group: each box in the corner of a zero-weight array of the group's size.
    for (size, many), group in groups.items():
        ref_cfg = replace(config.photometry, mode="forced") if many else config.photometry
        imgs = np.zeros((len(group), c, size, size), dtype=np.float64)
        var = np.full((len(group), c, size, size), np.inf)
        centres = []
        for i, (k, rows, ox, oy, bs, _) in enumerate(group):
            s = _extract(seg, ox, oy, bs, -1)
            other = (s != 0) & (s != labels[k])  # other footprints, and off-tile pixels (-1)
            v = np.where(other[None], np.inf, _extract(variance, ox, oy, bs, np.inf).astype(np.float64))
            var[i, :, :bs, :bs] = v
            imgs[i, :, :bs, :bs] = np.where(np.isfinite(v), _extract(image_sub, ox, oy, bs, 0.0), 0.0)
            centres.append(np.c_[cx[rows] - ox, cy[rows] - oy])
        ref = fit_fluxes(imgs[:, 0], centres=centres, psf_mixture=mixes[0], variance=var[:, 0],
                         pixel_scale_arcsec=pixel_scale_arcsec, config=ref_cfg, compute=compute)
        per_band = [ref]
        if c > 1:
            shapes = {"hlr_arcsec": ref["hlr_arcsec"], "e1": ref["e1"], "e2": ref["e2"]}
            fit_c = [np.c_[ref["x"][i, :len(it[1])], ref["y"][i, :len(it[1])]] for i, it in enumerate(group)]
            forced = replace(ref_cfg, mode="forced")
            for ci in range(1, c):
                per_band.append(fit_fluxes(imgs[:, ci], centres=fit_c, psf_mixture=mixes[ci], variance=var[:, ci],
                                           pixel_scale_arcsec=pixel_scale_arcsec, shapes=shapes, config=forced,
                                           compute=compute))
        for i, (k, rows, *_) in enumerate(group):
            s = len(rows)
            for ci, res in enumerate(per_band):
                flux[rows, ci] = res["flux"][i, :s]
                err[rows, ci] = res["flux_err"][i, :s]
                flags[rows] |= res["flags"][i, :s].astype(np.int64) & ~np.int64(_EDGE)
            hlr[rows] = ref["hlr_arcsec"][i, :s]
    return {"phot.flux": flux, "phot.flux_err": err, "phot.flags": flags, "phot.hlr_arcsec": hlr}


# ------------------------------------------------------------------------------------------------
# 7. Catalog
# ------------------------------------------------------------------------------------------------
def _band_name(key: str) -> str:
    return key.split("/", 1)[-1]


def build_catalog(tile: Tile, products: Mapping[str, np.ndarray], *, keep_not_primary: bool = False
                  ) -> dict[str, np.ndarray]:
    """The tile's catalog columns (:func:`galgan_ray.schema.object_columns` order and types).

    Every child gets its ``objectId`` before the ownership cut, so ids do not depend on
    ``keep_not_primary``. Returns the columns of the owned sources (plus, with
    ``keep_not_primary``, the others flagged ``NOT_PRIMARY``), and ``_all.objectId`` /
    ``_all.primary`` for every child (used to score the truth).
    """
    tid = int(tile.tile_id)
    fp = products["child.fp"]
    n = len(fp)
    x, y = products["child.x"], products["child.y"]
    object_id = (np.int64(tid) << ID_SHIFT) | np.arange(n, dtype=np.int64)
    parent_id = (np.int64(tid) << ID_SHIFT) | np.int64(PARENT_BIT) | fp.astype(np.int64)
    primary = tile.owns(x, y)
    flags = products["child.flags"] | products["phot.flags"]
    flags = flags | np.where(primary, 0, _NOT_PRIMARY)
    if n:
        ra, dec = tile.wcs.pixel_to_world_values(x, y)
    else:
        ra = dec = np.zeros(0)
    cols: dict[str, np.ndarray] = {
        "objectId": object_id, "parentObjectId": parent_id, "tileId": np.full(n, tid, dtype=np.int64),
        "coord_ra": np.asarray(ra, dtype=np.float64), "coord_dec": np.asarray(dec, dtype=np.float64),
        "x": x.astype(np.float64), "y": y.astype(np.float64),
    }
    for ci, key in enumerate(tile.bands):
        b = _band_name(key)
        cols[f"{b}_gmmFlux"] = products["phot.flux"][:, ci].astype(np.float64)
        cols[f"{b}_gmmFluxErr"] = products["phot.flux_err"][:, ci].astype(np.float64)
    cols["significance"] = products["child.significance"].astype(np.float32)
    cols["deblend_nPeaks_low"] = products["fp.n_peaks_low"][fp].astype(np.int32)
    n_enh = products["fp.n_peaks_enhanced"][fp].astype(np.int32)
    cols["deblend_nPeaks_enhanced"] = n_enh
    cols["flags"] = flags.astype(np.int64)
    keep = np.ones(n, bool) if keep_not_primary else primary
    out = {k: v[keep] for k, v in cols.items()}
    out["_all.objectId"] = object_id
    out["_all.primary"] = primary
    return out


# ------------------------------------------------------------------------------------------------
# 8. Truth
# ------------------------------------------------------------------------------------------------
TRUTH_TABLE_COLUMNS: tuple[str, ...] = (
    "truthId", "tileId", "coord_ra", "coord_dec", "x", "y", "mag", "flux_njy", "hlr_arcsec", "flux_radius_arcsec",
    "fwhm_arcsec", "redshift", "is_star", "scored", "matched_high", "matched_low", "matched_enhanced", "objectId")
BLEND_TABLE_COLUMNS: tuple[str, ...] = (
    "blendId", "tileId", "truthId_primary", "truthId_secondary", "sep_arcsec", "delta_mag", "flux_ratio",
    "sum_fwhm_arcsec", "delta_z", "sep_over_size", "mag_primary", "mag_secondary", "redshift_primary",
    "blended_low", "n_found_high", "n_found_low", "n_found_enhanced", "found_high", "found_low", "found_enhanced")


def _match_sparse(truth_xy: np.ndarray, peaks_xy: np.ndarray, radius: float) -> np.ndarray:
    """One-to-one matching (Hungarian within connected groups of the radius graph): the peak row
    matched to each truth row, -1 when none."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    from .matching import match_peaks

    out = np.full(len(truth_xy), -1, dtype=np.int64)
    if len(truth_xy) == 0 or len(peaks_xy) == 0:
        return out
    pairs = cKDTree(truth_xy).query_ball_tree(cKDTree(peaks_xy), r=radius)
    ti = np.repeat(np.arange(len(truth_xy)), [len(p) for p in pairs])
    pi = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(ti))
    if len(ti) == 0:
        return out
    nt = len(truth_xy)
    graph = coo_matrix((np.ones(len(ti)), (ti, nt + pi)), shape=(nt + len(peaks_xy),) * 2)
    _, comp = connected_components(graph, directed=False)
    for cidx in np.unique(comp[ti]):
        t_rows = np.flatnonzero(comp[:nt] == cidx)
        p_rows = np.flatnonzero(comp[nt:] == cidx)
        m = match_peaks(truth_xy[t_rows], peaks_xy[p_rows], radius_px=radius)
        out[t_rows[m["truth_index"]]] = p_rows[m["peak_index"]]
    return out


def score_truth(tile: Tile, products: Mapping[str, np.ndarray], catalog: Mapping[str, np.ndarray], *,
                config: TruthConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Score a simulated LR tile against its truth (module docstring, step 8).

    Parameters
    ----------
    tile : Tile
        The (degraded) LR tile with its truth.
    products : mapping
        ``low.*`` LR peaks, ``child.*`` children, ``hr.*`` HR peaks (LR px), ``seg``.
    catalog : mapping
        :func:`build_catalog` output (``_all.objectId``, ``_all.primary``).
    config : TruthConfig

    Returns
    -------
    truth : dict of numpy.ndarray
        The owned truth sources, :data:`TRUTH_TABLE_COLUMNS`.
    blends : dict of numpy.ndarray
        One row per owned truth pair closer than ``blend_max_sep_arcsec``, :data:`BLEND_TABLE_COLUMNS`.
    """
    from scipy.spatial import cKDTree

    t = tile.truth or {}
    nt = len(t.get("truthId", ()))
    scale = tile.pixel_scale_arcsec
    radius = config.match_radius_arcsec / scale
    txy = np.c_[t["x"], t["y"]] if nt else np.zeros((0, 2))
    scored = np.isfinite(np.asarray(t.get("mag", np.zeros(0)), dtype=np.float64)) & (
        np.asarray(t.get("mag", np.zeros(0)), dtype=np.float64) <= config.mag_limit)
    sidx = np.flatnonzero(scored)
    matched = {}
    for key, (xk, yk) in (("high", ("hr.x", "hr.y")), ("low", ("low.x", "low.y")),
                          ("enhanced", ("child.x", "child.y"))):
        got = np.full(nt, -1, dtype=np.int64)
        if xk in products:
            got[sidx] = _match_sparse(txy[sidx], np.c_[products[xk], products[yk]], radius)
        matched[key] = got
    enh = matched["enhanced"]
    all_ids, all_primary = catalog["_all.objectId"], catalog["_all.primary"]
    obj = np.where(enh >= 0, all_ids[np.maximum(enh, 0)] if len(all_ids) else -1, -1)
    obj = np.where((enh >= 0) & (all_primary[np.maximum(enh, 0)] if len(all_primary) else False), obj, -1)
    owned = tile.owns(t["x"], t["y"]) if nt else np.zeros(0, bool)
    tid = int(tile.tile_id)
    truth = {
        "truthId": np.asarray(t.get("truthId", np.zeros(0)), dtype=np.int64),
        "tileId": np.full(nt, tid, dtype=np.int64),
        "coord_ra": np.asarray(t.get("ra", np.zeros(0)), dtype=np.float64),
        "coord_dec": np.asarray(t.get("dec", np.zeros(0)), dtype=np.float64),
        "x": txy[:, 0].astype(np.float64), "y": txy[:, 1].astype(np.float64),
    }
    for k, dt in (("mag", np.float32), ("flux_njy", np.float64), ("hlr_arcsec", np.float32),
                  ("flux_radius_arcsec", np.float32), ("fwhm_arcsec", np.float32), ("redshift", np.float32),
                  ("is_star", bool)):
        truth[k] = np.asarray(t.get(k, np.zeros(0)), dtype=dt)
    truth["scored"] = scored
    for key in ("high", "low", "enhanced"):
        truth[f"matched_{key}"] = matched[key] >= 0
    truth["objectId"] = np.asarray(obj, dtype=np.int64)
    truth_out = {k: v[owned] for k, v in truth.items()}

    # Blends: scored pairs closer than the limit, owned through the brighter member.
    rows: dict[str, list] = {k: [] for k in BLEND_TABLE_COLUMNS}
    if len(sidx) >= 2:
        pairs = cKDTree(txy[sidx]).query_pairs(r=config.blend_max_sep_arcsec / scale, output_type="ndarray")
        seg = products.get("seg")
        h, w = tile.shape
        for a, b in pairs:
            i, j = sidx[a], sidx[b]
            p, s = (i, j) if truth["flux_njy"][i] >= truth["flux_njy"][j] else (j, i)
            if not owned[p]:
                continue
            sep = float(np.hypot(*(txy[p] - txy[s]))) * scale
            size = float(np.hypot(truth["flux_radius_arcsec"][p], truth["flux_radius_arcsec"][s]))
            n_found = {k: int(matched[k][p] >= 0) + int(matched[k][s] >= 0) for k in matched}
            same_fp = False
            if seg is not None:
                lab = [seg[min(max(int(round(txy[q, 1])), 0), h - 1), min(max(int(round(txy[q, 0])), 0), w - 1)]
                       for q in (p, s)]
                same_fp = bool(lab[0] > 0 and lab[0] == lab[1])
            vals = {
                "truthId_primary": truth["truthId"][p], "truthId_secondary": truth["truthId"][s], "sep_arcsec": sep,
                "delta_mag": float(truth["mag"][s] - truth["mag"][p]),
                "flux_ratio": float(truth["flux_njy"][s] / truth["flux_njy"][p]) if truth["flux_njy"][p] > 0 else np.nan,
                "sum_fwhm_arcsec": float(truth["fwhm_arcsec"][p] + truth["fwhm_arcsec"][s]),
                "delta_z": float(abs(truth["redshift"][p] - truth["redshift"][s])),
                "sep_over_size": sep / size if size > 0 else np.nan,
                "mag_primary": float(truth["mag"][p]), "mag_secondary": float(truth["mag"][s]),
                "redshift_primary": float(truth["redshift"][p]), "blended_low": same_fp,
                "n_found_high": n_found["high"], "n_found_low": n_found["low"],
                "n_found_enhanced": n_found["enhanced"],
                "found_high": n_found["high"] == 2, "found_low": n_found["low"] == 2,
                "found_enhanced": n_found["enhanced"] == 2,
            }
            for k, v in vals.items():
                rows[k].append(v)
        if rows["truthId_primary"]:
            order = np.lexsort((rows["truthId_secondary"], rows["truthId_primary"]))
            for k in list(rows):
                if rows[k]:
                    rows[k] = [rows[k][o] for o in order]
    nb = len(rows["truthId_primary"])
    rows["blendId"] = list((np.int64(tid) << ID_SHIFT) | np.arange(nb, dtype=np.int64))
    rows["tileId"] = [tid] * nb
    btypes = {"blendId": np.int64, "tileId": np.int64, "truthId_primary": np.int64, "truthId_secondary": np.int64,
              "blended_low": bool, "n_found_high": np.int32, "n_found_low": np.int32, "n_found_enhanced": np.int32,
              "found_high": bool, "found_low": bool, "found_enhanced": bool}
    blends = {k: np.asarray(rows[k], dtype=btypes.get(k, np.float64)) for k in BLEND_TABLE_COLUMNS}
    return truth_out, blends


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def catalog_table(columns: Mapping[str, np.ndarray], *, bands: Sequence[str], metadata: Mapping[bytes, bytes] | None = None):
    """An Arrow table with exactly :func:`galgan_ray.schema.object_schema` (band keys or names)."""
    import pyarrow as pa

    from .schema import object_schema

    schema = object_schema([_band_name(b) for b in bands], metadata=dict(metadata or {}))
    arrays = [pa.array(np.asarray(columns[f.name]), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def failure_table(rows: Sequence[Mapping[str, Any]], *, metadata: Mapping[bytes, bytes] | None = None):
    """An Arrow table of failures (:func:`galgan_ray.schema.failure_schema`)."""
    import pyarrow as pa

    from .schema import failure_schema

    schema = failure_schema().with_metadata(dict(metadata or {}))
    return pa.Table.from_arrays([pa.array([r[f.name] for r in rows], type=f.type) for f in schema], schema=schema)


def _plain_table(columns: Mapping[str, np.ndarray], names: Sequence[str], metadata=None):
    import pyarrow as pa

    return pa.table({k: pa.array(np.asarray(columns[k])) for k in names}, metadata=dict(metadata or {}))


def truth_table(columns: Mapping[str, np.ndarray], *, metadata: Mapping[bytes, bytes] | None = None):
    """Arrow table of :data:`TRUTH_TABLE_COLUMNS`."""
    return _plain_table(columns, TRUTH_TABLE_COLUMNS, metadata)


def blends_table(columns: Mapping[str, np.ndarray], *, metadata: Mapping[bytes, bytes] | None = None):
    """Arrow table of :data:`BLEND_TABLE_COLUMNS`."""
    return _plain_table(columns, BLEND_TABLE_COLUMNS, metadata)


# ------------------------------------------------------------------------------------------------
# One tile, end to end (no Ray)
# ------------------------------------------------------------------------------------------------
def process_tile(tile: Tile, *, model: ModelGrid, enhance_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                 rho: float, config: FieldConfig = FieldConfig(),
                 compute: PhotometryComputeConfig = PhotometryComputeConfig()) -> dict[str, Any]:
    """Run every step on one tile (what the Ray pipeline does stage by stage).

    Parameters
    ----------
    tile : Tile
        A validated tile (LR, or simulated HR: it is degraded first).
    model : ModelGrid
        Bands and grids of the enhancer.
    enhance_fn : callable
        ``(image_lr (M, C, 22, 22), sigma_lr (M, C)) -> (M, C, 64, 64)`` nJy.
    rho : float
        :func:`enhanced_noise_scale` of ``enhance_fn``.
    config : FieldConfig
    compute : PhotometryComputeConfig

    Returns
    -------
    dict
        ``catalog`` (columns), ``truth`` and ``blends`` (simulations; else None), ``products``
        (every intermediate array), ``stats`` (counts), ``timing`` (wall seconds of the five stages
        of the Ray pipeline: ``degrade_s`` ... ``photometry_s``), ``steps`` (the finer steps of
        :data:`TILE_STEPS` -> ``(process CPU s, wall s)``; ``bench/bench_tile.py`` reads them),
        ``tile`` (the LR tile).
    """
    steps: dict[str, tuple[float, float]] = {}
    clock = (time.process_time(), time.perf_counter())

    def mark(step: str) -> None:
        nonlocal clock
        now = (time.process_time(), time.perf_counter())
        steps[step] = (now[0] - clock[0], now[1] - clock[1])
        clock = now

    mode = check_tile(tile, model=model)
    products: dict[str, np.ndarray] = {}
    if mode == "simulation":
        hr = find_high_peaks(tile, detect=config.detect, ratio=int(round(model.ratio)),
                             block_px=3 * config.footprints.peak_block_px)
        products.update({f"hr.{k}": v for k, v in hr.items()})
        mark("high_peaks")
        tile = degrade_tile(tile, config=model.degrade_config(), seed=config.seed, add_noise=config.degrade_add_noise)
    mark("degrade")
    products.update(find_footprints(tile, config=config))
    mark("footprints")
    products.update(cut_cutouts(products["image_sub"], tile.variance, products, config=config.footprints,
                                side=model.lr_size))
    mark("cutouts")
    cut = products["cut.image"]
    enhanced = (np.asarray(enhance_fn(cut, products["cut.sigma"])) if len(cut)
                else np.zeros((0, tile.n_bands, model.hr_size, model.hr_size), np.float32))
    mark("enhance")
    products.update(find_children(enhanced, products, tile_shape=tile.shape, psf_hr=model.psf_high(), rho=rho,
                                  detect=config.detect, ratio=model.ratio, edge_px=config.footprints.edge_px,
                                  lr_size=model.lr_size))
    mark("detect")
    products.update(measure_children(products["image_sub"], tile.variance, products, psf=tile.psf,
                                     pixel_scale_arcsec=tile.pixel_scale_arcsec, config=config, compute=compute))
    mark("photometry")
    catalog = build_catalog(tile, products, keep_not_primary=config.keep_not_primary)
    truth = blends = None
    if tile.truth is not None:
        truth, blends = score_truth(tile, products, catalog, config=config.truth)
    mark("catalog+truth")
    timing = {stage: sum(steps[n][1] for n in names if n in steps) for stage, names in TILE_STEPS.items()}
    return {"catalog": catalog, "truth": truth, "blends": blends, "products": products, "tile": tile,
            "stats": tile_stats(tile, products, catalog), "timing": timing, "steps": steps}


def tile_stats(tile: Tile, products: Mapping[str, np.ndarray], catalog: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Counts for the run summary: sources, footprints, newly resolved blends (owned footprints
    with at most one LR peak split into two or more enhanced children), area."""
    fp_n_low = products["fp.n_peaks_low"]
    fp_n_enh = products["fp.n_peaks_enhanced"]
    fx, fy = products["fp.x"], products["fp.y"]
    owned_fp = tile.owns(fx, fy) if len(fx) else np.zeros(0, bool)
    split = owned_fp & (fp_n_low <= 1) & (fp_n_enh >= 2)
    return {"n_sources": int(len(catalog["objectId"])), "n_footprints": int(owned_fp.sum()),
            "n_cutouts": int(len(products.get("cut.fp", ()))), "n_newly_resolved": int(split.sum()),
            "n_enhance_skipped": int((owned_fp & (fp_n_enh == 0)).sum()),
            "n_low_peaks": int(tile.owns(products["low.x"], products["low.y"]).sum()) if len(products["low.x"]) else 0,
            "area_deg2": float(tile.inner_area_deg2())}
