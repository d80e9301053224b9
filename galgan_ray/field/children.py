"""Steps 4-5 of the field pipeline: peaks of the enhanced cutouts become the children of each footprint.

:func:`galgan_ray.detect.find_peaks_batch` runs on each enhanced cutout with the HR PSF of the
model's high-resolution band (several bands: the chi-like sum of their S/N images,
:func:`galgan_ray.detect.detection_images`), with the noise of enhanced images as the blend benchmark models it: level-dependent
(:class:`galgan_ray.noise.EnhancedNoiseModel`, calibrated by Monte Carlo on galaxies), or one
factor ``rho`` on ``sigma_lr``.
Peaks map back to the LR cutout (:func:`galgan_ray.geometry.hr_to_lr_pixels`) and to the tile's
pixels. A peak belongs to a footprint when its LR pixel lies in that footprint's segment; of a
footprint covered by several cutouts, a peak is kept only from the nearest cutout (Voronoi) and
peaks closer than the detector's minimum separation are merged. A footprint whose enhanced image
holds no peak (or that was not enhanced) keeps its LR peaks (flag ``ENHANCE_SKIPPED``); in the
others, an LR peak that no enhanced child reproduces (none within half the LR PSF's FWHM) is kept
too (flag ``LOW_RES_PEAK``): the enhancement adds children, it never removes a peak the original
pixels show. The enhanced peaks within a star's radius (an LR peak flagged ``STAR``,
:mod:`~galgan_ray.field.footprints`) are dropped: the star is its LR peak, one child.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..detect import DetectConfig, detection_images, find_peaks_batch, merge_close_peaks
from ..flags import flag_bit
from ..geometry import hr_to_lr_pixels
from ..psf import measure_fwhm
from .cutouts import Cutouts
from .footprints import Footprints

__all__ = ["Children", "find_children"]

_EDGE = flag_bit("EDGE")
_BLENDED = flag_bit("BLENDED")
_SKIPPED = flag_bit("ENHANCE_SKIPPED")
_MERGED = flag_bit("PEAK_MERGED")
_MASKED = flag_bit("MASKED")
_LOW_RES_PEAK = flag_bit("LOW_RES_PEAK")


@dataclass(frozen=True, eq=False)
class Children:
    """The children of a tile's footprints (N rows, ordered by footprint, then by decreasing significance).

    Attributes
    ----------
    fp : numpy.ndarray
        int32, footprint row.
    x, y : numpy.ndarray
        float64, 0-based LR tile px.
    significance : numpy.ndarray
        float32.
    flags : numpy.ndarray
        int64: ``PEAK_MERGED``, ``EDGE``, ``ENHANCE_SKIPPED`` when the LR peaks stand in,
        ``BLENDED`` when the footprint has more than one LR peak, ``MASKED``.
    n_peaks_enhanced : numpy.ndarray
        int32 ``(K,)`` per footprint: enhanced peaks kept (0 when the LR peaks stand in).
    """

    fp: np.ndarray
    x: np.ndarray
    y: np.ndarray
    significance: np.ndarray
    flags: np.ndarray
    n_peaks_enhanced: np.ndarray

    def __len__(self) -> int:
        return len(self.fp)


def find_children(enhanced: np.ndarray, footprints: Footprints, cutouts: Cutouts, *, tile_shape: tuple[int, int],
                  psf_hr: np.ndarray, rho, detect: DetectConfig, ratio: float, edge_px: float = 2.0,
                  lr_size: int = 22, lr_psf_fwhm_px: float = 0.6 / 0.18) -> Children:
    """Children of every footprint: peaks of the enhanced cutouts mapped to the tile (module docstring).

    Parameters
    ----------
    enhanced : numpy.ndarray
        ``(M, C, n_high, n_high)`` enhanced cutouts (nJy per HR pixel), rows as ``cutouts``.
    footprints : Footprints
    cutouts : Cutouts
    tile_shape : (int, int)
        ``(H, W)`` of the LR tile.
    psf_hr : numpy.ndarray
        The HR PSF the peaks are found with.
    rho : EnhancedNoiseModel or float
        Noise of enhanced images: the level-dependent model, or one factor on ``sigma_lr``.
    detect : DetectConfig
    ratio : float
        LR / HR pixel-scale ratio (3).
    edge_px : float
        Children this close to the tile edge, or in a footprint touching it, get ``EDGE``.
    lr_size : int
        Side of the LR cutouts (22).
    lr_psf_fwhm_px : float
        FWHM of the LR PSF in LR pixels: an LR peak farther than half of it from every enhanced child
        of its footprint is kept (``LOW_RES_PEAK``).

    Returns
    -------
    Children
    """
    h, w = tile_shape
    n_fp = len(footprints)
    seg, labels = footprints.seg, footprints.label
    cut_fp, origin, centre, sigma = cutouts.fp, cutouts.origin, cutouts.centre, cutouts.sigma
    m = len(cut_fp)
    parts = {k: [] for k in ("fp", "x", "y", "significance", "flags")}
    n_enh = np.zeros(n_fp, dtype=np.int32)
    if m:
        enh = np.asarray(enhanced, dtype=np.float32)
        n_high = enh.shape[-1]
        model = rho if callable(rho) else None
        scale = 1.0 if model is not None else float(rho)
        det_img, noise = detection_images(enh, scale * sigma.astype(np.float64))
        pk = find_peaks_batch(det_img, psf=psf_hr, config=detect, noise_sigma=np.maximum(noise, 1e-30),
                              noise_scale=model)
        xl, yl = hr_to_lr_pixels(pk["x"], pk["y"], n_high=n_high, n_low=int(lr_size), ratio=ratio)
        ci = pk["index"]
        xt, yt = xl + origin[ci, 0], yl + origin[ci, 1]
        ix = np.clip(np.rint(xt).astype(np.int64), 0, w - 1)
        iy = np.clip(np.rint(yt).astype(np.int64), 0, h - 1)
        inside = (xt > -0.5) & (xt < w - 0.5) & (yt > -0.5) & (yt < h - 0.5)
        fp = cut_fp[ci]
        own = inside & (seg[iy, ix] == labels[fp])
        # Voronoi: keep a peak only from the nearest cutout of its footprint.
        multi = cutouts.n_per_footprint[fp] > 1
        if multi.any():
            for j in np.flatnonzero(own & multi):
                mine = np.flatnonzero(cut_fp == fp[j])
                d2 = (centre[mine, 0] - xt[j]) ** 2 + (centre[mine, 1] - yt[j]) ** 2
                if mine[np.argmin(d2)] != ci[j]:
                    own[j] = False
        flags = (pk["flags"].astype(np.int64) & ~np.int64(_EDGE))
        sel = np.flatnonzero(own)
        fp_s, x_s, y_s, s_s, f_s = fp[sel], xt[sel], yt[sel], pk["significance"][sel], flags[sel]
        min_sep = max(detect.min_separation_fwhm * measure_fwhm(psf_hr), 1.0) / ratio
        for k in np.unique(fp_s[multi[sel]] if len(sel) else []):
            rows = np.flatnonzero(fp_s == k)
            keep, merged = merge_close_peaks(x_s[rows], y_s[rows], s_s[rows], min_sep=min_sep)
            f_s[rows[merged]] |= _MERGED
            drop = rows[~keep]
            fp_s, x_s, y_s, s_s, f_s = (np.delete(a, drop) for a in (fp_s, x_s, y_s, s_s, f_s))
        # A star's enhanced peaks (its rings and masked core, field.footprints) are its LR peak's.
        star_r = footprints.peaks.star_radius
        if star_r is not None and len(fp_s):
            low = footprints.peaks
            stars_own = np.zeros(len(fp_s), bool)
            for j in np.flatnonzero(star_r > 0):
                stars_own |= (fp_s == low.fp[j]) & (np.hypot(x_s - low.x[j], y_s - low.y[j]) <= star_r[j])
            fp_s, x_s, y_s, s_s, f_s = (a[~stars_own] for a in (fp_s, x_s, y_s, s_s, f_s))
        for key, arr in zip(("fp", "x", "y", "significance", "flags"), (fp_s, x_s, y_s, s_s, f_s)):
            parts[key].append(arr)
        n_enh = np.bincount(fp_s, minlength=n_fp).astype(np.int32)
    # Footprints without enhanced peaks (or not enhanced): their LR peaks stand in. In the others an
    # LR peak no enhanced child reproduces is kept beside them.
    low = footprints.peaks
    reach = 0.5 * lr_psf_fwhm_px
    enh_x = np.concatenate(parts["x"]) if parts["x"] else np.zeros(0)
    enh_y = np.concatenate(parts["y"]) if parts["y"] else np.zeros(0)
    enh_fp = np.concatenate(parts["fp"]) if parts["fp"] else np.zeros(0, np.int32)
    for k in np.unique(low.fp):
        rows = np.flatnonzero(low.fp == k)
        if n_enh[k] == 0:
            extra = _SKIPPED
        else:
            mine = enh_fp == k
            d = np.hypot(low.x[rows, None] - enh_x[None, mine], low.y[rows, None] - enh_y[None, mine])
            rows = rows[d.min(axis=1) > reach]
            extra = _LOW_RES_PEAK
        if not len(rows):
            continue
        parts["fp"].append(np.full(len(rows), k, dtype=np.int32))
        parts["x"].append(low.x[rows])
        parts["y"].append(low.y[rows])
        parts["significance"].append(low.significance[rows])
        parts["flags"].append((low.flags[rows].astype(np.int64) & ~np.int64(_EDGE)) | extra)
    cat = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in parts.items()}
    fp = cat["fp"].astype(np.int32)
    order = np.lexsort((-cat["significance"], fp))
    x, y = cat["x"][order].astype(np.float64), cat["y"][order].astype(np.float64)
    fp = fp[order]
    flags = cat["flags"][order].astype(np.int64)
    near = (x < edge_px - 0.5) | (y < edge_px - 0.5) | (x > w - 0.5 - edge_px) | (y > h - 0.5 - edge_px)
    flags |= np.where(near | (footprints.flags[fp] & _EDGE).astype(bool), _EDGE, 0)
    flags |= np.where(footprints.n_peaks_low[fp] > 1, _BLENDED, 0)
    flags |= footprints.flags[fp] & _MASKED
    flags |= footprints.flags_at(x, y)  # SATURATED, BRIGHT_OBJECT, NO_DATA near the child (mask planes)
    return Children(fp=fp, x=x, y=y, significance=cat["significance"][order].astype(np.float32), flags=flags,
                    n_peaks_enhanced=n_enh)
