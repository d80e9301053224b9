"""Step 2 of the field pipeline: background, footprints (low-resolution parents) and LR peaks of a tile.

The background is a sep map made in two passes (objects found in the first are masked in the
second); footprints are sep segments of the detection image (the inverse-variance weighted mean
of the bands) with its variance, ``thresh_sigma`` per pixel and no sep deblending: a footprint is
a low-resolution *parent*. The LR peaks are :func:`galgan_ray.detect.find_peaks_tiled` on that
image: the survey's own detection. A footprint is a source of the catalog when it holds at least
one LR peak; an LR peak outside every segment gets a 3 x 3 footprint of its own, so no detection
is lost.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import sep
from scipy import ndimage

from ..detect import DetectConfig, find_peaks_tiled, matched_filter
from ..errors import ConfigError
from ..flags import flag_bit
from ..tiles import Tile

__all__ = ["FootprintConfig", "LowPeaks", "Footprints", "find_footprints"]

_EDGE = flag_bit("EDGE")
_MASKED = flag_bit("MASKED")


@dataclass(frozen=True)
class FootprintConfig:
    """Low-resolution footprints (parents) and the peaks in them.

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
    edge_px : float
        Children closer than this to the tile edge, or in a footprint touching it, get ``EDGE``.
    peak_block_px : int
        Core of the blocks the tile-level peak finder works in
        (:func:`galgan_ray.detect.find_peaks_tiled`); the high-resolution tiles of simulations use
        three times this.
    """

    thresh_sigma: float = 1.5
    min_area_px: int = 5
    background: Literal["sep", "none"] = "sep"
    back_size_px: int = 64
    back_filter_size: int = 3
    edge_px: float = 2.0
    peak_block_px: int = 128

    def __post_init__(self):
        if not self.thresh_sigma > 0 or self.min_area_px < 1:
            raise ConfigError("footprints.thresh_sigma", "need thresh_sigma > 0 and min_area_px >= 1")
        if self.background not in ("sep", "none"):
            raise ConfigError("footprints.background", f"must be 'sep' or 'none', got {self.background!r}")


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
    """

    x: np.ndarray
    y: np.ndarray
    significance: np.ndarray
    flags: np.ndarray
    fp: np.ndarray


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
        int64 ``(K,)``: ``EDGE`` (touches the tile edge), ``MASKED`` (holds masked pixels).
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

    def __len__(self) -> int:
        return len(self.label)


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


def _sep_segments(det: np.ndarray, dvar: np.ndarray, bad: np.ndarray, cfg: FootprintConfig):
    h, w = det.shape
    sep.set_extract_pixstack(max(300000, 2 * h * w))
    sep.set_sub_object_limit(4096)
    var = np.where(bad, np.float32(1e30), dvar).astype(np.float32)
    objs, seg = sep.extract(np.ascontiguousarray(det, dtype=np.float32), cfg.thresh_sigma,
                            var=np.ascontiguousarray(var), mask=np.ascontiguousarray(bad), minarea=cfg.min_area_px,
                            deblend_cont=1.0, segmentation_map=True)
    return objs, np.asarray(seg, dtype=np.int32)


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
    if cfg.background == "sep":
        det0, dvar0 = coadd_detection_image(image, np.where(bad_c, np.inf, tile.variance))
        _, seg0 = _sep_segments(det0, dvar0, bad, cfg)
        objmask = ndimage.binary_dilation(seg0 > 0, iterations=3)
        image = np.stack([image[ci] - _sep_background(image[ci], bad_c[ci] | objmask, cfg) for ci in range(c)])
        image = np.where(bad_c, 0.0, image).astype(np.float32)
    det, dvar = coadd_detection_image(image, np.where(bad_c, np.inf, tile.variance))
    objs, seg = _sep_segments(det, dvar, bad, cfg)
    n_segments = len(objs)

    # LR peaks: the survey's detection (matched filter, the same detector at every resolution).
    psf_det = tile.psf.mean(axis=0)
    sig_det = float(np.sqrt(np.median(dvar[np.isfinite(dvar)]))) if np.isfinite(dvar).any() else 1.0
    noise_scale = filtered_noise_scale(np.where(bad, 0.0, det), psf=psf_det, noise_sigma=sig_det,
                                       sky=(seg == 0) & ~bad, psf_energy=detect.psf_energy)
    pk = find_peaks_tiled(np.where(bad, 0.0, det), psf=psf_det, detect=detect, noise_sigma=sig_det * noise_scale,
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
        if (bad_c[:, sl[0], sl[1]] & sub).any():
            fflags[i] |= _MASKED
    peak_fp = np.array([k_of_label[int(lab)] for lab in label], dtype=np.int32)
    n_low = np.bincount(peak_fp, minlength=n_fp).astype(np.int32)
    peaks = LowPeaks(x=pk["x"], y=pk["y"], significance=pk["significance"].astype(np.float32),
                     flags=pk["flags"].astype(np.int32), fp=peak_fp)
    return Footprints(image_sub=image, seg=seg, label=labels.astype(np.int32), bbox=bbox, npix=npix, x=fx, y=fy,
                      n_peaks_low=n_low, flags=fflags, peaks=peaks, noise_sigma=noise, n_segments=int(n_segments),
                      noise_scale=float(noise_scale))


def filtered_noise_scale(image: np.ndarray, *, psf: np.ndarray, noise_sigma: float, sky: np.ndarray,
                         psf_energy: float = 0.999, min_pixels: int = 500) -> float:
    """The PSF-filtered image's noise on ``sky`` pixels over white noise's (>= 1; 1 with too few pixels).

    The matched filter's significance has unit variance on white noise of ``noise_sigma``; its robust
    standard deviation (1.4826 MAD) on the sky measures how much more the real noise gives there.
    """
    inner = ndimage.binary_erosion(sky, iterations=3)
    if inner.sum() < min_pixels:
        return 1.0
    sig = np.asarray(matched_filter(image, psf=psf, noise_sigma=noise_sigma, psf_energy=psf_energy)["significance"])
    v = sig[inner]
    return float(max(1.0, 1.4826 * np.median(np.abs(v - np.median(v)))))
