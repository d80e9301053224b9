"""Step 2 of the field pipeline: background, footprints (low-resolution parents) and LR peaks of a tile.

The background (:func:`estimate_background`) is a mesh of sigma-clipped modes, median-filtered and
interpolated by a bicubic spline (SExtractor's estimate), made first with no source mask -- a mode per mesh
follows a residual pedestal or gradient of the sky, so the first detection is made on a sky near zero -- then
again with the sources detected on the background-subtracted image masked (dilated), until fewer than 1% of
the mask's pixels change (at most 3 passes). (A first detection on the raw image, as a two-pass sep
background makes it, masks the whole tile when the sky has a pedestal of half a sigma: the tile then collapses
into a few footprints.) Footprints are sep segments of the detection image (the inverse-variance weighted mean
of the bands) with its variance, ``thresh_sigma`` per pixel and no sep deblending: a footprint is a
low-resolution *parent*. The LR peaks are :func:`galgan_ray.detect.find_peaks_tiled` on that image: the
survey's own detection. A footprint is a source of the catalog when it holds at least one LR peak; an LR peak
outside every segment gets a 3 x 3 footprint of its own, so no detection is lost. The threshold is on the
noise measured on the sky of sep's filtered image where that is above the variance plane's (correlated coadd
noise, :func:`segment_noise_scale`).

Stars (``star_*`` of :class:`FootprintConfig`, :func:`_star_peaks`): a footprint with saturated
pixels (the tile's ``pixel_flags``, from the survey's mask planes), or whose brightest peak is very
significant and PSF-like (:func:`psf_extent`), holds a star, whose LR peaks become one ``STAR`` peak;
its enhanced children are dropped later (:mod:`.children`), and a saturated star's disc is a
footprint of its own that is not enhanced. The pixel flags (``SATURATED``, ``BRIGHT_OBJECT``,
``NO_DATA``, and ``PSF_BROADER`` on every pixel of an image whose PSF the model's cannot match), grown
by a PSF FWHM, reach the children near them (:meth:`Footprints.flags_at`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
import sep
from scipy import ndimage
from scipy.interpolate import RectBivariateSpline

from ..detect import DetectConfig, detect_plain, find_peaks_tiled, matched_filter
from ..errors import ConfigError
from ..flags import flag_bit
from ..geometry import extract_box
from ..psf import measure_fwhm
from ..sky_plane import fit_sky_plane
from ..tiles import Tile

__all__ = ["FootprintConfig", "LowPeaks", "Footprints", "find_footprints", "estimate_background", "mesh_background",
           "segment_noise_scale", "psf_extent", "plain_detections"]

_EDGE = flag_bit("EDGE")
_MASKED = flag_bit("MASKED")
_STAR = flag_bit("STAR")
_SATURATED = flag_bit("SATURATED")
_MERGED = flag_bit("PEAK_MERGED")
#: Pixel flags (the tile's ``pixel_flags``) a footprint takes from the pixels in and around it.
_PIXEL_FLAGS = flag_bit("SATURATED") | flag_bit("BRIGHT_OBJECT") | flag_bit("NO_DATA") | flag_bit("PSF_BROADER")


@dataclass(frozen=True)
class FootprintConfig:
    """Low-resolution footprints (parents) and the peaks in them.

    Attributes
    ----------
    thresh_sigma : float
        sep threshold per pixel, in units of the pixel's noise (sqrt of the variance plane).
    min_area_px : int
        Smallest footprint (pixels above threshold).
    background : {"mesh", "sep", "none"}
        ``mesh``: the iterative mesh estimate of :func:`estimate_background` (robust to a residual
        pedestal and gradient); ``sep``: a sep map made in two passes, the first detection made on
        the raw image (kept to compare: it fails on a pedestal); ``none``: nothing subtracted.
    back_size_px, back_filter_size : int
        Background mesh (px) and the median filter over meshes.
    back_iterations : int
        ``mesh``: source masks made on the background-subtracted image and the background made
        again (at most this many times; it stops when the mask has converged, ``back_mask_tolerance``).
    back_mask_tolerance : float
        ``mesh``: the mask has converged when fewer than this fraction of its pixels change from
        one pass to the next. On real coadds the noise measured on the sky moves with the mask
        (:func:`segment_noise_scale`) and the pair settles over 4-8 passes, sometimes into a cycle of a
        few pixels, so 3 passes stop before that; 12 passes change neither the real-sky benchmark nor
        the residual-sky check (the sky's plane is out of the file first) and cost 30 % more
        footprint time, so the default stays at 3.
    back_mask_dilate_px : int
        Dilation of the detected sources in the background's mask (their faint wings).
    back_min_fraction : float
        ``mesh``: a mesh with fewer usable, unmasked pixels than this fraction of its area takes
        the value of its nearest measured mesh.
    measured_noise : bool
        Set the threshold in units of the noise measured on the sky of sep's filtered detection
        image where that exceeds what the variance plane predicts by more than 5% (correlated noise:
        coadd warping, resampling and PSF matching; 1.9x on an HSC coadd brought to the model's grid),
        so that correlated noise neither adds footprints nor joins neighbours through noise bridges.
        White noise is left at the variance plane's (:attr:`Footprints.segment_noise_scale`).
    star_min_snr : float
        A footprint whose brightest LR peak reaches this significance and whose light there is
        PSF-like (:func:`psf_extent` at most ``star_max_extent``) is a bright star; so is one with
        saturated pixels in it (the tile's ``pixel_flags``). A star becomes one child flagged ``STAR``
        (and ``SATURATED``) at its centre: the LR peaks within ``star_radius_fwhm`` PSF FWHM of it
        (beyond the saturated core's radius) that do not rise above its profile are merged into it,
        and the enhanced children within that radius are dropped (a star's rings and masked core are
        not galaxies to deblend); its footprint is enhanced and measured as any other, so the
        neighbours beyond are deblended, fitted jointly with the star, and its point-symmetric
        features are removed by the support test (:func:`galgan_ray.field.measure.symmetric_excess`).
        A saturated star's disc of that radius is a footprint of its own, not enhanced.
    star_max_extent : float
        Light within 3 FWHM over a PSF's of the same core flux: 1 for a point source, 1.3-2.5 for the
        bright galaxies of an HSC coadd.
    star_radius_fwhm : float
    edge_px : float
        Children closer than this to the tile edge, or in a footprint touching it, get ``EDGE``.
    peak_block_px : int
        Core of the blocks the tile-level peak finder works in
        (:func:`galgan_ray.detect.find_peaks_tiled`); the high-resolution tiles of simulations use
        three times this.
    plain_min_area_arcsec2, plain_deblend_nthresh, plain_deblend_cont, plain_back_arcsec : float, int, float, float
        The plain detection (:attr:`Footprints.detections`, :func:`plain_detections`): SExtractor-style
        objects of the matched-filter significance of the detection image at the detector's
        ``nsigma`` (:func:`galgan_ray.detect.extract_objects`), with this minimum area, deblending
        levels and contrast, after a sep background of this mesh (SExtractor's "hot" mode, which
        takes bright objects' wings; 0: none) -- the real-sky benchmark's detector on the
        low-resolution image.
    """

    thresh_sigma: float = 1.5
    min_area_px: int = 5
    background: Literal["mesh", "sep", "none"] = "mesh"
    back_size_px: int = 64
    back_filter_size: int = 3
    back_iterations: int = 3
    back_mask_tolerance: float = 0.01
    back_mask_dilate_px: int = 3
    back_min_fraction: float = 0.1
    measured_noise: bool = True
    star_min_snr: float = 1000.0
    star_max_extent: float = 1.15
    star_radius_fwhm: float = 1.5
    edge_px: float = 2.0
    peak_block_px: int = 128
    plain_min_area_arcsec2: float = 0.005
    plain_deblend_nthresh: int = 32
    plain_deblend_cont: float = 0.005
    plain_back_arcsec: float = 2.0

    def __post_init__(self):
        if not (self.plain_min_area_arcsec2 >= 0 and self.plain_deblend_nthresh >= 1
                and 0 <= self.plain_deblend_cont <= 1 and self.plain_back_arcsec >= 0):
            raise ConfigError("footprints.plain_deblend_cont",
                              "need plain_min_area_arcsec2 >= 0, plain_deblend_nthresh >= 1, "
                              "0 <= plain_deblend_cont <= 1 and plain_back_arcsec >= 0")
        if not self.thresh_sigma > 0 or self.min_area_px < 1:
            raise ConfigError("footprints.thresh_sigma", "need thresh_sigma > 0 and min_area_px >= 1")
        if self.background not in ("mesh", "sep", "none"):
            raise ConfigError("footprints.background", f"must be 'mesh', 'sep' or 'none', got {self.background!r}")
        if self.back_size_px < 4 or self.back_filter_size < 1 or self.back_iterations < 1:
            raise ConfigError("footprints.back_size_px", "need back_size_px >= 4, back_filter_size >= 1 and "
                                                         "back_iterations >= 1")
        if not 0 <= self.back_mask_tolerance < 1:
            raise ConfigError("footprints.back_mask_tolerance", f"must be in [0, 1), got {self.back_mask_tolerance}")
        if not (self.star_min_snr > 0 and self.star_max_extent >= 1 and self.star_radius_fwhm >= 0):
            raise ConfigError("footprints.star_min_snr", "need star_min_snr > 0, star_max_extent >= 1 and "
                                                         "star_radius_fwhm >= 0")
        if not 0 < self.back_min_fraction <= 1 or self.back_mask_dilate_px < 0:
            raise ConfigError("footprints.back_min_fraction", "need 0 < back_min_fraction <= 1 and "
                                                              "back_mask_dilate_px >= 0")


@dataclass(frozen=True, eq=False)
class LowPeaks:
    """The peaks of the low-resolution detection image (P rows).

    Attributes
    ----------
    x, y : numpy.ndarray
        float64, 0-based px of the tile.
    significance : numpy.ndarray
        float32, matched-filter S/N.
    flags : numpy.ndarray
        int32, the detector's bits.
    fp : numpy.ndarray
        int32, row of the footprint holding the peak.
    star_radius : numpy.ndarray or None
        float32: a star's radius (px) for peaks flagged ``STAR``, 0 for the others: the enhanced
        children within it are the star's (:mod:`galgan_ray.field.children` drops them). None: no star.
    """

    x: np.ndarray
    y: np.ndarray
    significance: np.ndarray
    flags: np.ndarray
    fp: np.ndarray
    star_radius: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class Footprints:
    """The background-subtracted tile, its footprints (K rows, those holding an LR peak, ordered by
    label) and its LR peaks.

    Attributes
    ----------
    image_sub : numpy.ndarray
        float32 ``(C, H, W)``: background-subtracted image (0 where unusable).
    seg : numpy.ndarray
        int32 ``(H, W)``: footprint label per pixel (0: none).
    label, npix : numpy.ndarray
        int32 ``(K,)``: segment label and pixel count of each footprint.
    bbox : numpy.ndarray
        int32 ``(K, 4)``: ``x_min, x_max, y_min, y_max`` (inclusive).
    x, y : numpy.ndarray
        float64 ``(K,)``: flux-weighted centroid.
    n_peaks_low : numpy.ndarray
        int32 ``(K,)``: LR peaks in the footprint.
    flags : numpy.ndarray
        int64 ``(K,)``: ``EDGE`` (touches the tile edge), ``MASKED`` (holds masked pixels),
        ``SATURATED``, ``BRIGHT_OBJECT``, ``NO_DATA``, ``PSF_BROADER`` (the tile's ``pixel_flags`` in or
        next to it),
        ``STAR`` (a saturated star's own footprint: not enhanced, :mod:`galgan_ray.field.cutouts`).
    peaks : LowPeaks
        The LR peaks.
    noise_sigma : numpy.ndarray
        float64 ``(C,)``: median per-pixel noise of each band.
    n_segments : int
        sep segments before the peak requirement.
    noise_scale : float
        The measured noise of the PSF-filtered detection image on the sky (outside every sep
        segment, robust MAD) over what white noise of the variance plane would give: > 1 where the
        noise is correlated (coadd warping, the degradation of a noisy HST image). The LR peaks'
        threshold and the photometry's errors are scaled by it, so that both hold on the real noise.
    segment_noise_scale : float
        The same for sep's 3 x 3 filtered image, by which the footprints' threshold was scaled (1
        where it is within 5% of white noise's, or ``measured_noise`` is off).
    pixel_flags : numpy.ndarray or None
        int64 ``(H, W)``: the tile's ``SATURATED``, ``BRIGHT_OBJECT``, ``NO_DATA`` and ``PSF_BROADER``
        pixel flags grown by one PSF FWHM (:meth:`flags_at`), or None when the tile has none.
    detections : numpy.ndarray or None
        float64 ``(D, 2)``: ``(x, y)`` of the plain detection (``plain_*`` of :class:`FootprintConfig`):
        what a survey's own catalog of this image holds: of the tile itself (:func:`plain_detections`),
        or, for a survey image brought onto the model's grid, of that image as delivered
        (:attr:`galgan_ray.tiles.Tile.detections`), less those in a star's disc; the stars added. A child
        not matched one to one to one of them is a source only deblending finds (``DEBLEND_ADDED``,
        :func:`galgan_ray.field.measure.deblend_added`). None: not made.
    """

    image_sub: np.ndarray
    seg: np.ndarray
    label: np.ndarray
    bbox: np.ndarray
    npix: np.ndarray
    x: np.ndarray
    y: np.ndarray
    n_peaks_low: np.ndarray
    flags: np.ndarray
    peaks: LowPeaks
    noise_sigma: np.ndarray
    n_segments: int
    noise_scale: float = 1.0
    segment_noise_scale: float = 1.0
    pixel_flags: np.ndarray | None = None
    detections: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    def flags_at(self, x, y) -> np.ndarray:
        """int64: the pixel flags (:attr:`pixel_flags`) at 0-based positions ``(x, y)`` (0 without any)."""
        x = np.asarray(x, dtype=np.float64)
        if self.pixel_flags is None or not x.size:
            return np.zeros(x.shape, np.int64)
        h, w = self.pixel_flags.shape
        ix = np.clip(np.rint(x).astype(np.int64), 0, w - 1)
        iy = np.clip(np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64), 0, h - 1)
        return self.pixel_flags[iy, ix].astype(np.int64)


def coadd_detection_image(image: np.ndarray, variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The detection image of a multi-band tile: the inverse-variance weighted mean of the bands,
    and its variance (``inf`` where no band is usable)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ivar = np.where(np.isfinite(variance) & (variance > 0), 1.0 / variance, 0.0)
        wsum = ivar.sum(axis=0)
        det = np.where(wsum > 0, (image * ivar).sum(axis=0) / np.where(wsum > 0, wsum, 1.0), 0.0)
        dvar = np.where(wsum > 0, 1.0 / np.where(wsum > 0, wsum, 1.0), np.inf)
    return det.astype(np.float32), dvar.astype(np.float32)


def _sep_background(img: np.ndarray, bad: np.ndarray, cfg: FootprintConfig) -> np.ndarray:
    h, w = img.shape
    bkg = sep.Background(np.ascontiguousarray(img, dtype=np.float32), mask=np.ascontiguousarray(bad),
                         bw=min(cfg.back_size_px, w), bh=min(cfg.back_size_px, h), fw=cfg.back_filter_size,
                         fh=cfg.back_filter_size)
    return bkg.back()


def _clipped_mode(values: np.ndarray, *, nsigma: float = 3.0, max_iter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """SExtractor's sky of each row of ``values`` (NaN: not used): ``nsigma``-clipped about the median
    until stable, then ``2.5 median - 1.5 mean`` (the median where the clipped values are too skewed
    for that, ``|mean - median| >= 0.3 std``). Returns ``(mode, number of values kept)``."""
    v = np.array(values, dtype=np.float64)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (empty meshes) give NaN
        for _ in range(max_iter):
            med = np.nanmedian(v, axis=-1, keepdims=True)
            out = np.abs(v - med) > nsigma * np.nanstd(v, axis=-1, keepdims=True)
            if not out.any():
                break
            v[out] = np.nan
        med, mean, std = np.nanmedian(v, axis=-1), np.nanmean(v, axis=-1), np.nanstd(v, axis=-1)
    mode = np.where(np.abs(mean - med) < 0.3 * std, 2.5 * med - 1.5 * mean, med)
    return mode, np.isfinite(v).sum(axis=-1)


def mesh_background(image: np.ndarray, use: np.ndarray, *, mesh_px: int = 64, filter_size: int = 3,
                    min_fraction: float = 0.1) -> np.ndarray:
    """The sky of a 2-D image from the pixels ``use`` selects: SExtractor's mesh estimate.

    Steps: (1) meshes of ``mesh_px`` (the last row and column of meshes hold the rest of the image);
    (2) the sigma-clipped mode of each mesh's selected pixels (:func:`_clipped_mode`); a mesh with
    fewer than ``min_fraction`` of its area selected takes its nearest measured mesh's value; (3) a
    ``filter_size`` median filter over the meshes (of their residual from a plane, so that a gradient
    is kept at the borders); (4) a bicubic spline through the mesh centres
    (exact on a plane, extrapolated to the image border); (5) along an axis that holds one mesh only
    (an image smaller than two meshes, e.g. a data-access cutout), the gradient of the selected pixels
    (:func:`galgan_ray.sky_plane.fit_sky_plane`), taken out before the meshes are measured and added back. A constant
    and a linear gradient come out as they went in; the mode is shift-equivariant, so a pedestal is
    removed whatever its level.

    Returns
    -------
    numpy.ndarray
        float64 ``(H, W)``; the global clipped mode where no mesh is measured (0 with no pixel at all).
    """
    img = np.asarray(image, dtype=np.float64)
    use = np.asarray(use, dtype=bool) & np.isfinite(img)
    h, w = img.shape
    m = int(max(4, min(mesh_px, h, w)))
    ny, nx = max(h // m, 1), max(w // m, 1)  # the rest of the image joins the last mesh
    slope = 0.0
    if (ny == 1 or nx == 1) and use.any():  # one mesh along an axis measures no gradient there
        slope = fit_sky_plane(img, use, along_y=ny == 1, along_x=nx == 1)
        img = img - slope
    ye = np.r_[np.arange(ny) * m, h]
    xe = np.r_[np.arange(nx) * m, w]
    grid = np.full((ny, nx), np.nan)
    for i in range(ny):
        vals = np.where(use[ye[i]:ye[i + 1]], img[ye[i]:ye[i + 1]], np.nan)
        blocks = [vals[:, xe[j]:xe[j + 1]].ravel() for j in range(nx)]
        size = max(len(b) for b in blocks)
        stacked = np.stack([np.pad(b, (0, size - len(b)), constant_values=np.nan) for b in blocks])
        mode, n = _clipped_mode(stacked)
        area = np.array([len(b) for b in blocks])
        grid[i] = np.where(n >= np.maximum(min_fraction * area, 10), mode, np.nan)
    ok = np.isfinite(grid)
    if not ok.any():
        if not use.any():
            return np.zeros((h, w))
        return np.full((h, w), float(_clipped_mode(img[use][None])[0][0])) + slope
    if not ok.all():  # unmeasured meshes take their nearest measured neighbour's value
        idx = ndimage.distance_transform_edt(~ok, return_distances=False, return_indices=True)
        grid = grid[tuple(idx)]
    yc, xc = (ye[:-1] + ye[1:] - 1) / 2.0, (xe[:-1] + xe[1:] - 1) / 2.0
    if filter_size > 1 and grid.size > 1:
        # the median filter acts on the residual from the meshes' best plane: it removes outlying
        # meshes (a bright star's halo) but leaves a gradient as it is, borders and corners included
        gy, gx = np.meshgrid(yc, xc, indexing="ij")
        basis = np.c_[np.ones(grid.size), gy.ravel(), gx.ravel()]
        plane = (basis @ np.linalg.lstsq(basis, grid.ravel(), rcond=None)[0]).reshape(grid.shape)
        grid = plane + ndimage.median_filter(grid - plane, size=filter_size, mode="nearest")
    if ny == 1:  # a spline needs two knots per axis: the one row of meshes, constant along y
        yc, grid = np.array([yc[0] - 1.0, yc[0] + 1.0]), np.repeat(grid, 2, axis=0)
    if nx == 1:
        xc, grid = np.array([xc[0] - 1.0, xc[0] + 1.0]), np.repeat(grid, 2, axis=1)
    spline = RectBivariateSpline(yc, xc, grid, kx=min(3, len(yc) - 1), ky=min(3, len(xc) - 1), s=0,
                                 bbox=[min(-0.5, yc[0]), max(h - 0.5, yc[-1]), min(-0.5, xc[0]), max(w - 0.5, xc[-1])])
    return spline(np.arange(h), np.arange(w)) + slope


def estimate_background(image: np.ndarray, variance: np.ndarray, bad: np.ndarray, *,
                        config: FootprintConfig) -> tuple[np.ndarray, np.ndarray]:
    """The sky of each band of a tile, robust to a residual pedestal and gradient (module docstring).

    Steps: (1) :func:`mesh_background` of every band with only the unusable pixels left out; (2) the
    sources of the background-subtracted detection image (sep segments at ``thresh_sigma``, as the
    footprints), dilated by ``back_mask_dilate_px``, are masked and the background made again;
    (3) step 2 again until fewer than ``back_mask_tolerance`` of the mask's pixels change (or none),
    at most ``back_iterations`` times.

    Parameters
    ----------
    image, variance : numpy.ndarray
        ``(C, H, W)``; ``variance`` is ``inf`` where unusable.
    bad : numpy.ndarray
        bool ``(C, H, W)``: unusable pixels.
    config : FootprintConfig

    Returns
    -------
    back : numpy.ndarray
        float32 ``(C, H, W)``.
    source_mask : numpy.ndarray
        bool ``(H, W)``: the pixels the last estimate left out as sources.
    """
    cfg = config
    c = image.shape[0]
    all_bad = bad.all(axis=0)
    var = np.where(bad, np.inf, variance)

    def mesh(mask):
        return np.stack([mesh_background(image[ci], ~bad[ci] & ~mask, mesh_px=cfg.back_size_px,
                                         filter_size=cfg.back_filter_size, min_fraction=cfg.back_min_fraction)
                         for ci in range(c)]).astype(np.float32)

    source_mask = np.zeros(image.shape[1:], dtype=bool)
    back = mesh(source_mask)
    scale = 1.0
    for _ in range(cfg.back_iterations):
        det, dvar = coadd_detection_image(np.where(bad, 0.0, image - back), var)
        _, seg = _sep_segments(det, dvar * scale**2, all_bad, cfg)
        if cfg.measured_noise:  # the next detection on the noise measured on this one's sky
            scale = segment_noise_scale(det, dvar, sky=(seg == 0) & ~all_bad)
        new = seg > 0
        if cfg.back_mask_dilate_px > 0:
            new = ndimage.binary_dilation(new, iterations=cfg.back_mask_dilate_px)
        changed = int(np.count_nonzero(new != source_mask))
        if changed == 0:
            break
        source_mask = new
        back = mesh(source_mask)
        if changed < cfg.back_mask_tolerance * max(int(new.sum()), 1):
            break
    return back, source_mask


#: sep.extract's default filter (a 3 x 3 pyramid), through which footprints are detected.
_SEP_KERNEL = np.array([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])


def segment_noise_scale(det: np.ndarray, dvar: np.ndarray, *, sky: np.ndarray, min_pixels: int = 500,
                        tolerance: float = 0.05) -> float:
    """The noise of sep's filtered detection image on ``sky`` over what ``dvar`` predicts for white noise.

    The matched-filter S/N ``conv(det / dvar, k) / sqrt(conv(1 / dvar, k^2))`` (``k`` sep's default
    kernel) has unit variance on white noise; its robust standard deviation on the sky
    (:func:`_unit_noise`: the eroded sky, or the negative half of the usable pixels where sources
    cover the tile) is the factor correlated noise adds. Returns 1 when that is within ``tolerance``
    of 1 (or below), or when too few pixels measure it.
    """
    dvar = np.asarray(dvar, dtype=np.float64)
    ok = np.isfinite(dvar) & (dvar > 0)
    ivar = np.where(ok, 1.0 / np.where(ok, dvar, 1.0), 0.0)
    num = ndimage.convolve(np.where(ok, det, 0.0) * ivar, _SEP_KERNEL, mode="constant")
    den = ndimage.convolve(ivar, _SEP_KERNEL**2, mode="constant")
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(den > 0, num / np.sqrt(np.where(den > 0, den, 1.0)), np.nan)
    usable = ndimage.binary_erosion(ok, iterations=2) & (den > 0)
    ratio = _unit_noise(sig, sky=sky & usable, usable=usable, min_pixels=min_pixels)
    return ratio if ratio is not None and ratio > 1.0 + tolerance else 1.0


def _sep_segments(det: np.ndarray, dvar: np.ndarray, bad: np.ndarray, cfg: FootprintConfig):
    h, w = det.shape
    sep.set_extract_pixstack(max(300000, 2 * h * w))
    sep.set_sub_object_limit(4096)
    var = np.where(bad, np.float32(1e30), dvar).astype(np.float32)
    objs, seg = sep.extract(np.ascontiguousarray(det, dtype=np.float32), cfg.thresh_sigma,
                            var=np.ascontiguousarray(var), mask=np.ascontiguousarray(bad), minarea=cfg.min_area_px,
                            deblend_cont=1.0, segmentation_map=True)
    return objs, np.asarray(seg, dtype=np.int32)


def psf_extent(image: np.ndarray, good: np.ndarray, *, psf: np.ndarray, x: float, y: float,
               fwhm_px: float) -> float:
    """How much more light a source has within 3 FWHM than a point source of the same core.

    The PSF (centred on ``(x, y)`` by sub-pixel interpolation) is fitted to the usable pixels within
    one FWHM of the centre (least squares, amplitude only); the result is the image's light within
    3 FWHM over the fitted PSF's there. A star gives 1 (its PSF's mismatch aside); a galaxy more.
    NaN where the core has no usable pixel or no positive fit.
    """
    n = psf.shape[0]
    half = n // 2
    ix, iy = int(np.rint(x)), int(np.rint(y))
    p = np.clip(ndimage.shift(np.asarray(psf, dtype=np.float64), (y - iy, x - ix), order=3, mode="constant"), 0, None)
    p /= p.sum()
    img = extract_box(np.asarray(image, dtype=np.float64), ix - half, iy - half, n, 0.0)
    ok = extract_box(np.asarray(good, dtype=bool), ix - half, iy - half, n, False)
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    r = np.hypot(xx - (x - ix), yy - (y - iy))
    core, ap = ok & (r <= fwhm_px), ok & (r <= 3.0 * fwhm_px)
    if not core.any():
        return float("nan")
    amp = float((p[core] * img[core]).sum() / (p[core] ** 2).sum())
    if not amp > 0:
        return float("nan")
    return float(img[ap].sum() / (amp * p[ap].sum()))


#: A peak near a star is the star's own (a ring, a bump of its wings) unless it rises above the star's
#: azimuthal median profile at its distance, taken this much brighter, by this many sigma of the pixel.
_STAR_MODEL_SLACK = 0.5
_STAR_KEEP_SNR = 5.0


def _radial_median(image: np.ndarray, good: np.ndarray, *, x: float, y: float, radius: float) -> np.ndarray:
    """The azimuthal median of the usable pixels in 1 px rings about ``(x, y)`` out to ``radius``: the
    star's own profile, rings and wings included (a neighbour fills a small part of its ring). ``inf``
    for rings with fewer than 5 usable pixels (a saturated core)."""
    h, w = image.shape
    n = int(np.ceil(radius)) + 2
    box = (slice(max(int(y) - n, 0), min(int(y) + n + 1, h)), slice(max(int(x) - n, 0), min(int(x) + n + 1, w)))
    yy, xx = np.mgrid[box]
    ring = np.floor(np.hypot(xx - x, yy - y)).astype(np.int64)
    ok = good[box] & (ring <= n)
    prof = np.full(n + 1, np.inf)
    vals, rings = image[box][ok], ring[ok]
    for k in range(n + 1):
        v = vals[rings == k]
        if len(v) >= 5:
            prof[k] = float(np.median(v))
    return prof


def _star_peaks(pk: dict[str, np.ndarray], *, seg: np.ndarray, det: np.ndarray, dvar: np.ndarray,
                good: np.ndarray, saturated: np.ndarray | None, psf: np.ndarray, cfg: FootprintConfig
                ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The LR peaks with each star's merged into one ``STAR`` peak at its centre (``star_*`` of
    :class:`FootprintConfig`), the segment label each star peak belongs to (0: as its pixel says) and
    each star's radius (0 for the other peaks).

    Steps: (1) every connected group of saturated pixels is a star centred on the group (its core
    is masked, so the LR peaks ring it), of radius its extent plus ``star_radius_fwhm`` FWHM; its
    segment is the one around it; (2) a peak of at least ``star_min_snr`` outside these whose light is
    PSF-like (:func:`psf_extent`) is a star of radius ``star_radius_fwhm`` FWHM; (3) a peak within its
    radius and segment that does not rise above the star's azimuthal median profile there
    (:func:`_radial_median`, 1.5 times it, plus 5 sigma of the pixel), or lies in its core (half a
    FWHM beyond a saturated core, one FWHM otherwise), is the star's (rings, wings, the rim of a
    masked core): they become one peak (the highest significance of them, ``PEAK_MERGED`` when there
    were several); a brighter one is a neighbour and stays, and the star's radius stops one FWHM
    short of it.
    """
    fwhm = float(measure_fwhm(psf))
    x, y = pk["x"].astype(np.float64), pk["y"].astype(np.float64)
    h, w = seg.shape
    stars = []  # (x, y, radius, flags, label)
    if saturated is not None and saturated.any():
        comp, _ = ndimage.label(saturated)
        for lab, sl in enumerate(ndimage.find_objects(comp), start=1):
            yy, xx = np.nonzero(comp[sl] == lab)
            yy, xx = yy + sl[0].start, xx + sl[1].start
            x0, y0 = float(xx.mean()), float(yy.mean())
            r_sat = float(np.hypot(xx - x0, yy - y0).max()) + 0.5
            box = (slice(max(sl[0].start - 3, 0), sl[0].stop + 3), slice(max(sl[1].start - 3, 0), sl[1].stop + 3))
            core = comp[box] == lab
            ring = ndimage.binary_dilation(core, iterations=2) & ~core
            labs = seg[box][ring]
            labs = labs[labs > 0]
            seg_lab = int(np.bincount(labs).argmax()) if len(labs) else 0
            stars.append((x0, y0, r_sat + cfg.star_radius_fwhm * fwhm, _STAR | _SATURATED, seg_lab,
                          r_sat + 0.5 * fwhm))
    for i in np.flatnonzero(pk["significance"] >= cfg.star_min_snr):
        if any(np.hypot(x[i] - st[0], y[i] - st[1]) <= st[2] for st in stars):
            continue
        if psf_extent(det, good, psf=psf, x=x[i], y=y[i], fwhm_px=fwhm) <= cfg.star_max_extent:
            iy, ix = min(max(int(np.rint(y[i])), 0), h - 1), min(max(int(np.rint(x[i])), 0), w - 1)
            stars.append((x[i], y[i], cfg.star_radius_fwhm * fwhm, _STAR, int(seg[iy, ix]), fwhm))
    if not stars:
        return pk, np.zeros(len(x), np.int64), np.zeros(len(x))
    iy = np.clip(np.rint(y).astype(np.int64), 0, h - 1)
    ix = np.clip(np.rint(x).astype(np.int64), 0, w - 1)
    peak_lab = seg[iy, ix]
    keep = np.ones(len(x), bool)
    add = {k: [] for k in pk}
    add_lab, add_r = [], []
    sigma = np.sqrt(np.where(np.isfinite(dvar) & (dvar > 0), dvar, np.inf))
    for sx, sy, r, fl, lab, r_core in stars:
        d = np.hypot(x - sx, y - sy)
        near = keep & (d <= r) & ((peak_lab == lab) | (lab == 0))
        prof = _radial_median(det, good, x=sx, y=sy, radius=r)  # a neighbour rises above the star's profile
        with np.errstate(invalid="ignore"):  # (inf - inf in rings without pixels: the star's)
            level = np.interp(d, np.arange(len(prof)) + 0.5, prof)
            model = (1.0 + _STAR_MODEL_SLACK) * np.clip(np.nan_to_num(level, nan=np.inf, posinf=np.inf), 0.0, None)
        own = (det[iy, ix] <= model + _STAR_KEEP_SNR * sigma[iy, ix]) | (d <= r_core)  # the core is the star's
        mine = near & own
        neighbours = near & ~own
        keep &= ~mine
        if neighbours.any():  # the star's radius stops short of its nearest neighbour
            r = max(min(r, float(d[neighbours].min()) - fwhm), r_core)
        for k in pk:
            if k == "x":
                add[k].append(sx)
            elif k == "y":
                add[k].append(sy)
            elif k == "flags":
                add[k].append(int(np.bitwise_or.reduce(pk[k][mine].astype(np.int64), initial=0)) | fl
                              | (_MERGED if mine.sum() > 1 else 0))
            elif k == "significance":
                add[k].append(float(pk[k][mine].max()) if mine.any() else float(cfg.star_min_snr))
            else:
                add[k].append(pk[k][mine].max() if mine.any() else 0)
        add_lab.append(lab)
        add_r.append(r)
    out = {k: np.concatenate([pk[k][keep], np.asarray(add[k]).astype(pk[k].dtype)]) for k in pk}
    labels = np.concatenate([np.zeros(int(keep.sum()), np.int64), np.asarray(add_lab, np.int64)])
    radius = np.concatenate([np.zeros(int(keep.sum())), np.asarray(add_r, np.float64)])
    order = np.argsort(-out["significance"], kind="stable")  # peaks stay by decreasing significance
    return {k: v[order] for k, v in out.items()}, labels[order], radius[order]


def find_footprints(tile: Tile, *, config: FootprintConfig, detect: DetectConfig) -> Footprints:
    """Background, footprints (sep segments) and LR peaks of a low-resolution tile (module docstring).

    Parameters
    ----------
    tile : Tile
        A low-resolution tile.
    config : FootprintConfig
    detect : DetectConfig
        The peak finder (the same at every resolution).

    Returns
    -------
    Footprints
    """
    cfg = config
    c, h, w = tile.image.shape
    bad_c = ~np.isfinite(tile.variance) | (tile.mask != 0)
    image = np.where(bad_c, 0.0, tile.image).astype(np.float32)
    noise = np.array([float(np.sqrt(np.median(tile.variance[ci][~bad_c[ci]]))) if (~bad_c[ci]).any() else np.nan
                      for ci in range(c)])
    bad = bad_c.all(axis=0)
    if cfg.background == "mesh":
        back, _ = estimate_background(image, tile.variance, bad_c, config=cfg)
        image = np.where(bad_c, 0.0, image - back).astype(np.float32)
    elif cfg.background == "sep":
        det0, dvar0 = coadd_detection_image(image, np.where(bad_c, np.inf, tile.variance))
        _, seg0 = _sep_segments(det0, dvar0, bad, cfg)
        objmask = ndimage.binary_dilation(seg0 > 0, iterations=3)
        image = np.stack([image[ci] - _sep_background(image[ci], bad_c[ci] | objmask, cfg) for ci in range(c)])
        image = np.where(bad_c, 0.0, image).astype(np.float32)
    det, dvar = coadd_detection_image(image, np.where(bad_c, np.inf, tile.variance))
    objs, seg = _sep_segments(det, dvar, bad, cfg)
    # The sky the noise is measured on: outside the segments at the variance plane's threshold (the
    # lower one where the noise is correlated), so faint sources' wings stay out of it.
    sky = (seg == 0) & ~bad
    seg_scale = segment_noise_scale(det, dvar, sky=sky) if cfg.measured_noise else 1.0
    if seg_scale > 1.0:  # correlated noise: the threshold on the measured noise
        objs, seg = _sep_segments(det, dvar * seg_scale**2, bad, cfg)
    n_segments = len(objs)

    # LR peaks: the survey's detection (matched filter, the same detector at every resolution).
    psf_det = tile.psf.mean(axis=0)
    sig_det = float(np.sqrt(np.median(dvar[np.isfinite(dvar)]))) if np.isfinite(dvar).any() else 1.0
    noise_scale = filtered_noise_scale(np.where(bad, 0.0, det), psf=psf_det, noise_sigma=sig_det,
                                       sky=sky, psf_energy=detect.psf_energy,
                                       usable=ndimage.binary_erosion(~bad, iterations=psf_det.shape[0] // 2))
    pk = find_peaks_tiled(np.where(bad, 0.0, det), psf=psf_det, detect=detect, noise_sigma=sig_det * noise_scale,
                          block_px=cfg.peak_block_px)
    # Stars (saturated, or bright and PSF-like): one peak each, in the segment around it.
    pixel_flags = tile.pixel_flags
    saturated = None if pixel_flags is None else (np.asarray(pixel_flags) & _SATURATED) != 0
    pk, star_label, star_radius = _star_peaks(pk, seg=seg, det=det, dvar=dvar * seg_scale**2, good=~bad,
                                              saturated=saturated, psf=psf_det, cfg=cfg)
    # The plain detection: the stars' discs left out (SExtractor's deblending contrast is a share of the
    # whole object's flux: next to a bright star, that of the star), the stars themselves put in.
    star_disc = np.zeros((h, w), bool)
    is_star = star_radius > 0
    if is_star.any():
        yy, xx = np.mgrid[:h, :w]
        for k in np.flatnonzero(is_star):
            star_disc |= np.hypot(xx - pk["x"][k], yy - pk["y"][k]) <= star_radius[k]
    if tile.detections is not None:  # a survey image: detected on its own pixels (to_model_tile)
        d = np.asarray(tile.detections, dtype=np.float64).reshape(-1, 2)
        ix_d = np.clip(np.rint(d[:, 0]).astype(np.int64), 0, w - 1)
        iy_d = np.clip(np.rint(d[:, 1]).astype(np.int64), 0, h - 1)
        detections = d[~star_disc[iy_d, ix_d]]
    else:
        detections = plain_detections(det, bad=bad, psf=psf_det, detect=detect, cfg=cfg,
                                      pixel_scale_arcsec=tile.pixel_scale_arcsec, exclude=star_disc)
    if is_star.any():
        detections = np.vstack([detections, np.column_stack([pk["x"][is_star], pk["y"][is_star]])])
    ix = np.clip(np.rint(pk["x"]).astype(np.int64), 0, w - 1)
    iy = np.clip(np.rint(pk["y"]).astype(np.int64), 0, h - 1)
    label = np.where(star_label > 0, star_label, seg[iy, ix])
    next_label = n_segments + 1
    # A saturated star's disc is cut out of its segment as a footprint of its own, which is not
    # enhanced (field.cutouts): around a masked core neither the enhancement nor the support test
    # (whose brightness order reads the masked pixels) can be trusted. The rest of the segment is
    # enhanced and deblended as any other. (An unsaturated star stays in its footprint: field.children
    # drops the enhanced peaks within its radius, the support test its point-symmetric features.)
    disc_labels = []
    sat_star = (star_radius > 0) & (label > 0) & ((pk["flags"].astype(np.int64) & _SATURATED) != 0)
    for k in np.flatnonzero(sat_star):
        xk, yk, rk = float(pk["x"][k]), float(pk["y"][k]), float(star_radius[k])
        box = (slice(max(int(yk - rk), 0), min(int(yk + rk) + 2, h)),
               slice(max(int(xk - rk), 0), min(int(xk + rk) + 2, w)))
        yy, xx = np.mgrid[box]
        disc = (np.hypot(xx - xk, yy - yk) <= rk) & (seg[box] == label[k])
        seg[box][disc] = next_label
        label[k] = next_label
        disc_labels.append(next_label)
        next_label += 1
    # A peak outside every segment gets a 3x3 footprint of its own (nothing is lost).
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
    k_of_label = {int(lab): i for i, lab in enumerate(labels)}
    n_fp = len(labels)
    bbox = np.zeros((n_fp, 4), dtype=np.int32)
    npix = np.zeros(n_fp, dtype=np.int32)
    fx = np.zeros(n_fp)
    fy = np.zeros(n_fp)
    fflags = np.zeros(n_fp, dtype=np.int64)
    for i, lab in enumerate(labels):
        sl = slices[int(lab) - 1]
        sy, sx = sl
        bbox[i] = (sx.start, sx.stop - 1, sy.start, sy.stop - 1)
        sub = seg[sl] == lab
        npix[i] = int(sub.sum())
        yy, xx = np.nonzero(sub)
        wts = np.clip(det[sl][sub], 0, None) + 1e-12
        fx[i] = float((xx + sx.start) @ wts / wts.sum())
        fy[i] = float((yy + sy.start) @ wts / wts.sum())
        if sx.start == 0 or sy.start == 0 or sx.stop == w or sy.stop == h:
            fflags[i] |= _EDGE
        # The footprint with its holes (a masked core) and the pixels next to it: unusable pixels
        # (saturated, no data) are left out of the segments, so they lie there.
        y0, x0 = max(sy.start - 1, 0), max(sx.start - 1, 0)
        around = (slice(y0, min(sy.stop + 1, h)), slice(x0, min(sx.stop + 1, w)))
        region = ndimage.binary_dilation(ndimage.binary_fill_holes(seg[around] == lab))
        if (bad_c[:, around[0], around[1]] & region).any():
            fflags[i] |= _MASKED
        if pixel_flags is not None:
            fflags[i] |= int(np.bitwise_or.reduce(pixel_flags[around][region].astype(np.int64), initial=0)) & _PIXEL_FLAGS
    peak_fp = np.array([k_of_label[int(lab)] for lab in label], dtype=np.int32)
    grown = None
    if pixel_flags is not None and np.any(pixel_flags & _PIXEL_FLAGS):
        reach = float(measure_fwhm(psf_det))
        grown = np.zeros((h, w), np.int64)
        for bit in (flag_bit("SATURATED"), flag_bit("BRIGHT_OBJECT"), flag_bit("NO_DATA"), flag_bit("PSF_BROADER")):
            plane = (pixel_flags & bit) != 0
            if plane.any():
                grown |= np.where(ndimage.distance_transform_edt(~plane) <= reach, np.int64(bit), np.int64(0))
    for lab in disc_labels:
        if int(lab) in k_of_label:
            fflags[k_of_label[int(lab)]] |= _STAR  # a saturated star's own footprint: not enhanced
    n_low = np.bincount(peak_fp, minlength=n_fp).astype(np.int32)
    peaks = LowPeaks(x=pk["x"], y=pk["y"], significance=pk["significance"].astype(np.float32),
                     flags=pk["flags"].astype(np.int32), fp=peak_fp,
                     star_radius=star_radius.astype(np.float32) if np.any(star_radius > 0) else None)
    return Footprints(image_sub=image, seg=seg, label=labels.astype(np.int32), bbox=bbox, npix=npix, x=fx, y=fy,
                      n_peaks_low=n_low, flags=fflags, peaks=peaks, noise_sigma=noise, n_segments=int(n_segments),
                      noise_scale=float(noise_scale), segment_noise_scale=float(seg_scale), pixel_flags=grown,
                      detections=detections)


def plain_detections(det: np.ndarray, *, bad: np.ndarray, psf: np.ndarray, detect: DetectConfig,
                     cfg: FootprintConfig, pixel_scale_arcsec: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """``(D, 2)`` positions of the plain detection of the detection image (:attr:`Footprints.detections`):
    :func:`galgan_ray.detect.detect_plain` (the real-sky benchmark's detector) with the ``plain_*``
    settings and the detector's ``nsigma``; ``exclude`` (the stars' discs: :func:`find_footprints`
    adds the stars themselves) left out.
    """
    r = detect_plain(det, bad, psf, pixel_scale_arcsec=pixel_scale_arcsec, nsigma=detect.nsigma,
                     back_arcsec=cfg.plain_back_arcsec, minarea_arcsec2=cfg.plain_min_area_arcsec2,
                     deblend_nthresh=cfg.plain_deblend_nthresh, deblend_cont=cfg.plain_deblend_cont,
                     exclude=exclude, psf_energy=detect.psf_energy)
    return np.column_stack([r["x"], r["y"]]).astype(np.float64) if len(r["x"]) else np.zeros((0, 2))


def _unit_noise(sig: np.ndarray, *, sky: np.ndarray, usable: np.ndarray | None, min_pixels: int) -> float | None:
    """The robust standard deviation of a significance map that has unit variance on white noise.

    On the sky eroded by 3 px (1.4826 MAD) where it has ``min_pixels``; else, where sources cover most
    of the tile (a bright star's or galaxy's halo), from the negative half of the usable pixels
    (``median(-v | v < 0) / 0.6745``: sources add light, so that half is the noise's). None when
    neither has enough pixels.
    """
    inner = ndimage.binary_erosion(sky, iterations=3)
    if inner.sum() >= min_pixels:
        v = sig[inner]
        v = v[np.isfinite(v)]
        return float(1.4826 * np.median(np.abs(v - np.median(v))))
    if usable is None:
        return None
    v = sig[usable & np.isfinite(sig)]
    neg = -v[v < 0]
    if len(neg) < min_pixels // 2:
        return None
    return float(np.median(neg) / 0.6745)


def filtered_noise_scale(image: np.ndarray, *, psf: np.ndarray, noise_sigma: float, sky: np.ndarray,
                         psf_energy: float = 0.999, min_pixels: int = 500, usable: np.ndarray | None = None) -> float:
    """The PSF-filtered image's noise on ``sky`` pixels over white noise's (>= 1; 1 with too few pixels).

    The matched filter's significance has unit variance on white noise of ``noise_sigma``; its robust
    standard deviation on the sky (:func:`_unit_noise`; the negative half of the ``usable`` pixels
    where the sky is too small) measures how much more the real noise gives there.
    """
    sig = np.asarray(matched_filter(image, psf=psf, noise_sigma=noise_sigma, psf_energy=psf_energy)["significance"])
    ratio = _unit_noise(sig, sky=sky, usable=usable, min_pixels=min_pixels)
    return 1.0 if ratio is None else float(max(1.0, ratio))
