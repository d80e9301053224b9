"""Step 3 of the field pipeline: the low-resolution cutouts enhanced around footprints.

The enhancement is spent on footprints only, never on empty sky. A footprint whose box fits in
the model's cutout (22 x 22) less a margin gets one cutout centred on it; a bigger one is covered
by a grid of cutouts ``stride_px`` apart. A peak found in several of them is later kept only from
the cutout whose centre is nearest (a Voronoi split: no gaps, no duplicates; :mod:`.children`).
Footprints needing more than ``max_per_footprint`` cutouts, and a saturated star's own footprint
(``STAR``, :mod:`.footprints`), are not enhanced (their LR peaks stand in, flag ``ENHANCE_SKIPPED``).

The cutouts are not enhanced one by one: the tile is enhanced once, wherever a cutout lies, fully
convolutionally (:func:`enhance_cutouts_in_plane`), and each cutout's enhanced view is cut from that
image. A galaxy looks the same in every cutout that holds it, there are no seams, and no position in
a cutout is special.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..errors import ConfigError
from ..flags import flag_bit
from ..geometry import extract_box
from .footprints import Footprints

__all__ = ["CutoutConfig", "Cutouts", "EnhanceFn", "cut_footprint_cutouts", "enhance_cutouts_in_plane", "median_sigma"]

#: ``(plane (C, H, W), sigma (C,), need=(H, W) bool) -> (C, factor H, factor W)``: a whole LR image
#: enhanced where ``need`` is set (:meth:`galgan_ray.enhance.Enhancer.enhance_plane`).
EnhanceFn = Callable[..., np.ndarray]
_STAR = flag_bit("STAR")


@dataclass(frozen=True)
class CutoutConfig:
    """Where the model's cutouts go.

    Attributes
    ----------
    margin_px : int
        A footprint fits one cutout when its box plus this margin on each side fits in the cutout.
    stride_px : int
        Spacing of the cutout grid over larger footprints (at most ``side - 2 * margin_px``, so each
        Voronoi cell keeps the margin).
    max_per_footprint : int
        Larger footprints are not enhanced (``ENHANCE_SKIPPED``).
    """

    margin_px: int = 3
    stride_px: int = 16
    max_per_footprint: int = 64

    def __post_init__(self):
        if self.stride_px < 1 or self.margin_px < 0 or self.max_per_footprint < 1:
            raise ConfigError("cutouts.stride_px", "need stride_px >= 1, margin_px >= 0, max_per_footprint >= 1")


@dataclass(frozen=True, eq=False)
class Cutouts:
    """The cutouts of a tile (M rows) and how many each footprint got.

    Attributes
    ----------
    image : numpy.ndarray
        float32 ``(M, C, side, side)`` (nJy, 0 where unusable).
    sigma : numpy.ndarray
        float32 ``(M, C)``: median noise of the cutout's usable pixels.
    origin : numpy.ndarray
        int64 ``(M, 2)``: ``x, y`` of the cutout's pixel (0, 0) on the tile.
    centre : numpy.ndarray
        float64 ``(M, 2)``: its Voronoi centre on the tile.
    fp : numpy.ndarray
        int32 ``(M,)``: row of its footprint.
    padded : numpy.ndarray
        bool ``(M,)``: part of it lies off the tile or on unusable pixels.
    n_per_footprint : numpy.ndarray
        int32 ``(K,)``: cutouts of each footprint (0: not enhanced, too large).
    """

    image: np.ndarray
    sigma: np.ndarray
    origin: np.ndarray
    centre: np.ndarray
    fp: np.ndarray
    padded: np.ndarray
    n_per_footprint: np.ndarray

    def __len__(self) -> int:
        return len(self.fp)


def median_sigma(variance: np.ndarray) -> np.ndarray:
    """``(C,)`` per-band noise sigma of a ``(C, H, W)`` variance plane: the root of its median over the
    usable (finite) pixels; 1 for a band without any."""
    return np.array([np.sqrt(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else 1.0 for v in variance])


def _grid_centres(lo: int, hi: int, stride: int) -> np.ndarray:
    width = hi - lo + 1
    n = max(1, math.ceil(width / stride))
    return (lo + hi) / 2.0 + (np.arange(n) - (n - 1) / 2.0) * stride


def cut_footprint_cutouts(footprints: Footprints, variance: np.ndarray, *, config: CutoutConfig,
                          side: int = 22) -> Cutouts:
    """LR cutouts of ``footprints.image_sub`` around the footprints (module docstring).

    Parameters
    ----------
    footprints : Footprints
    variance : numpy.ndarray
        ``(C, H, W)`` variance plane of the tile (``inf`` where unusable).
    config : CutoutConfig
    side : int
        The model's LR cutout side.

    Returns
    -------
    Cutouts
    """
    image_sub = footprints.image_sub
    c, h, w = image_sub.shape
    bbox = footprints.bbox
    n_fp = len(bbox)
    tile_sigma = median_sigma(variance)
    m = config.margin_px
    usable = side - 2 * m
    stride = min(config.stride_px, max(usable, 1))
    origins, centres, fps = [], [], []
    n_cut = np.zeros(n_fp, dtype=np.int32)
    for k in range(n_fp):
        if footprints.flags[k] & _STAR:  # a saturated star's own footprint (field.footprints): its peak stands in
            continue
        x0, x1, y0, y1 = (int(v) for v in bbox[k])
        if x1 - x0 + 1 <= usable and y1 - y0 + 1 <= usable:
            # One cutout on the footprint's centroid, moved just enough to hold its box plus margin.
            cx, cy = float(footprints.x[k]), float(footprints.y[k])
            ox = int(np.clip(np.floor(cx - (side - 1) / 2.0 + 0.5), x1 + m - (side - 1), x0 - m))
            oy = int(np.clip(np.floor(cy - (side - 1) / 2.0 + 0.5), y1 + m - (side - 1), y0 - m))
            origins.append((ox, oy))
            centres.append((cx, cy))
            fps.append(k)
            n_cut[k] = 1
            continue
        cxs, cys = _grid_centres(x0, x1, stride), _grid_centres(y0, y1, stride)
        if len(cxs) * len(cys) > config.max_per_footprint:
            continue
        for cy in cys:
            for cx in cxs:
                ox = int(np.floor(cx - (side - 1) / 2.0 + 0.5))
                oy = int(np.floor(cy - (side - 1) / 2.0 + 0.5))
                origins.append((ox, oy))
                centres.append((cx, cy))
                fps.append(k)
        n_cut[k] = len(cxs) * len(cys)
    n = len(origins)
    images = np.zeros((n, c, side, side), dtype=np.float32)
    sigma = np.zeros((n, c), dtype=np.float32)
    padded = np.zeros(n, dtype=bool)
    for i, (ox, oy) in enumerate(origins):
        var = extract_box(variance, ox, oy, side, np.inf)
        ok = np.isfinite(var)
        images[i] = np.where(ok, extract_box(image_sub, ox, oy, side, 0.0), 0.0)
        padded[i] = not ok.all()
        for ci in range(c):
            sigma[i, ci] = np.sqrt(np.median(var[ci][ok[ci]])) if ok[ci].any() else tile_sigma[ci]
    return Cutouts(image=images, sigma=sigma, origin=np.asarray(origins, dtype=np.int64).reshape(n, 2),
                   centre=np.asarray(centres, dtype=np.float64).reshape(n, 2), fp=np.asarray(fps, dtype=np.int32),
                   padded=padded, n_per_footprint=n_cut)


def enhance_cutouts_in_plane(image: np.ndarray, variance: np.ndarray, cutouts: Cutouts, *, enhance_fn: EnhanceFn,
                             factor: int, hr_size: int) -> tuple[Cutouts, np.ndarray]:
    """The cutouts' enhanced views, cut from the whole tile enhanced once without seams.

    The tile (``image``: background-subtracted, 0 where unusable) is enhanced by ``enhance_fn``
    wherever a cutout lies, with one noise sigma per band (the median over the tile's usable
    pixels), and each cutout's ``hr_size`` view is cut from it: the cutout at LR origin ``(x0, y0)``
    sees HR pixels ``factor * x0 + crop ..`` (the model's cutout grid, ``crop`` = 1). The returned
    cutouts carry that sigma, the noise the enhanced views are normalised to.
    """
    c, h, w = image.shape
    if not len(cutouts):
        return cutouts, np.zeros((0, c, hr_size, hr_size), np.float32)
    sigma = median_sigma(variance).astype(np.float32)
    side = cutouts.image.shape[-1]
    need = np.zeros((h, w), dtype=bool)
    for x0, y0 in cutouts.origin:
        need[max(y0, 0):max(min(y0 + side, h), 0), max(x0, 0):max(min(x0 + side, w), 0)] = True
    plane = np.asarray(enhance_fn(image.astype(np.float32), sigma, need=need), dtype=np.float32)
    crop = (side * factor - hr_size) // 2
    views = np.stack([extract_box(plane, factor * int(x0) + crop, factor * int(y0) + crop, hr_size, np.float32(0.0))
                      for x0, y0 in cutouts.origin])
    return replace(cutouts, sigma=np.broadcast_to(sigma, cutouts.sigma.shape).copy()), views
