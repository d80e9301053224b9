"""Step 6 of the field pipeline: Gaussian-mixture photometry of the children on the low-resolution image.

:func:`galgan_ray.photometry.fit_fluxes` on the LR image at the enhanced positions (centres fixed
by default: forced photometry), all children of a footprint fitted simultaneously in a box around
the footprint, with the pixels of other footprints given zero weight; the PSF is a Gaussian mixture
fitted to the tile's PSF image (once per PSF and process). The boxes of a tile are padded with
zero-weight pixels to a few common sizes and fitted in one batched call per size. Extra bands are
fitted in ``forced`` mode with the reference band's shapes.

Every child must earn its place in the original pixels, by two tests against ``support_snr``:

- its fitted flux, with the error of the footprint's joint fit (the inverse Fisher matrix, so the
  light a neighbour could take instead is counted against it: for the fluxes this is the chi^2 the
  fit loses without the child) (:func:`support_children`); a child the enhancer drew on noise fails;
- its light in excess of what a brighter child of its footprint puts there by point symmetry
  (:func:`symmetric_excess`); a shred of a bright galaxy's disk or of a star's wings fails, though
  a one-profile fit leaves it significant flux.

A child that no object of the plain low-resolution detection holds (:attr:`Footprints.detections`:
what a survey's own 5-sigma catalog of the image would list) is a claim of the deblending alone,
flagged ``DEBLEND_ADDED``; its fitted S/N must reach ``support_snr_added`` (:func:`deblend_added`).

A child that fails any test is flagged ``UNSUPPORTED`` (the catalog leaves it out by default);
``LOW_SNR`` marks fitted fluxes below 5 sigma, and no negative flux passes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve

from ..errors import ConfigError
from ..flags import flag_bit
from ..geometry import extract_box
from ..gmm import fit_psf_mixture
from ..matching import match_peaks
from ..photometry import PhotometryComputeConfig, PhotometryConfig, fit_fluxes
from ..psf import measure_fwhm
from ..templates import TemplateConfig, lr_operator, template_fluxes
from .children import Children
from .footprints import Footprints

__all__ = ["MeasureConfig", "Fluxes", "measure_children", "measure_templates", "flag_template_fluxes", "support_children",
           "symmetric_excess", "deblend_added",
           "fitted_snr", "LOW_SNR_THRESHOLD"]

_EDGE = flag_bit("EDGE")
_LOW_SNR = flag_bit("LOW_SNR")
_UNSUPPORTED = flag_bit("UNSUPPORTED")
_DEBLEND_ADDED = flag_bit("DEBLEND_ADDED")
#: Fitted significance below which ``LOW_SNR`` is set (the detector's threshold).
LOW_SNR_THRESHOLD = 5.0

_BOX_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)


def _footprint_box(bbox, cx: np.ndarray, cy: np.ndarray, margin: int) -> tuple[int, int, int]:
    """``(ox, oy, size)``: the square box (a size of ``_BOX_SIZES`` where one fits) centred on a
    footprint's bounding box ``(x0, x1, y0, y1)`` and its children at ``cx, cy``, ``margin`` px around."""
    x0 = min(int(bbox[0]), int(np.floor(cx.min()))) - margin
    x1 = max(int(bbox[1]), int(np.ceil(cx.max()))) + margin
    y0 = min(int(bbox[2]), int(np.floor(cy.min()))) - margin
    y1 = max(int(bbox[3]), int(np.ceil(cy.max()))) + margin
    need = max(x1 - x0 + 1, y1 - y0 + 1)
    size = next((s for s in _BOX_SIZES if s >= need), need)
    ox = int(np.floor((x0 + x1) / 2.0 - (size - 1) / 2.0 + 0.5))
    oy = int(np.floor((y0 + y1) / 2.0 - (size - 1) / 2.0 + 0.5))
    return ox, oy, size


#: What one more Levenberg-Marquardt loop (one more :func:`~galgan_ray.photometry.fit_fluxes` call)
#: costs, in source-pixels evaluated per iteration: about 1.3 ms of fixed work per iteration (some
#: hundred small torch operations) against 60-70 ns per source and pixel, on one CPU thread. It
#: decides which box sizes of a tile share one padded fit; on the default field's tiles 1.5e4-3e4
#: are equally fast, no merging is 15% slower, one class for all 25-40% slower (bench/bench_tile.py).
_LOOP_COST_PX = 20000.0


@dataclass(frozen=True)
class MeasureConfig:
    """The photometry of the children.

    Attributes
    ----------
    photometry : PhotometryConfig
        Defaults to fixed centres (forced at the enhanced positions), free size and shape, and up to
        100 Levenberg-Marquardt iterations: on whole fields the fits of bright galaxies that one
        profile misfits crawl (7% of the default field's rows ended ``FIT_FAILED`` at 40, 1% at 100,
        at no measurable cost: the active set is small by then).
    margin_px : int
        Pixels around a footprint's box in its fit.
    max_fit_children : int
        Footprints with more children than this (a bright galaxy shredded into knots) are fitted
        in ``forced`` mode (fluxes only, round profiles of ``hlr_init_arcsec``): the nonlinear fit of
        dozens of overlapping sources costs seconds and is ill-posed anyway.
    psf_n_gauss : int
        Gaussians in the PSF mixture fitted to each tile's PSF.
    support_snr : float
        A child is supported by the LR pixels when its fitted flux reaches this many times its
        error (bands combined: the square root of the sum of the squared positive S/N); below, it
        is flagged ``UNSUPPORTED`` (:func:`support_children`). On pure noise the fitted S/N at a
        position fixed beforehand is a unit Gaussian; at peaks chosen on an enhanced noise image
        it is not, so the default is the detector's 5 sigma. The same threshold applies to a child's
        light in excess of a brighter sibling's point-symmetric light (:func:`symmetric_excess`).
    support_snr_added : float
        The fitted S/N a child needs when it is not an object of the plain low-resolution detection
        (``DEBLEND_ADDED``: :attr:`Footprints.detections`, what a survey's own catalog of the image
        holds, matched one to one within ``added_radius_arcsec``; :func:`deblend_added`). Such a child is a claim of the deblending alone --
        an extra peak of the LR peak finder or a child of the enhanced image -- and its fitted flux
        is a share of a footprint whose brighter members one profile misfits, so the misfit, not
        the pixel noise, sets how significant it must be. Chosen by ``bench/calibrate_support.py``:
        of the thresholds that keep two simulated skies at purity and completeness >= 0.95, the one
        with the fewest unconfirmed rows on half of the real COSMOS fields (the other half checks it);
        ``support_snr`` (5) turns the rule off.
    added_radius_arcsec : float
        Largest distance of a child from the plain detection it is matched to (the real-sky
        benchmark's matching radius).
    symmetry_max_arcsec : float
        Siblings farther than this do not explain a child's light by symmetry.
    symmetry_other_child_fwhm : float
        A mirror point closer than this many LR PSF FWHM to a third child of the footprint, brighter
        than the child tested, does not test the child (it would measure the third child's light;
        :func:`symmetric_excess`).
    templates : TemplateConfig
        Template photometry (the catalog's ``templateFlux``): the enhanced image as the
        morphological prior, fluxes solved linearly on the LR image (:func:`measure_templates`).
    """

    photometry: PhotometryConfig = field(default_factory=lambda: PhotometryConfig(fit_centre=False, max_iter=100))
    margin_px: int = 4
    max_fit_children: int = 6
    psf_n_gauss: int = 3
    support_snr: float = 5.0
    support_snr_added: float = 20.0
    added_radius_arcsec: float = 0.4
    symmetry_max_arcsec: float = 3.0
    symmetry_other_child_fwhm: float = 0.5
    templates: TemplateConfig = field(default_factory=TemplateConfig)

    def __post_init__(self):
        if self.psf_n_gauss < 1 or self.margin_px < 0 or self.max_fit_children < 1:
            raise ConfigError("measure.psf_n_gauss", "need psf_n_gauss >= 1, margin_px >= 0, max_fit_children >= 1")
        if not self.support_snr >= 0:
            raise ConfigError("measure.support_snr", f"must be >= 0, got {self.support_snr}")
        if not self.support_snr_added >= self.support_snr:
            raise ConfigError("measure.support_snr_added", f"must be >= support_snr ({self.support_snr}), "
                                                           f"got {self.support_snr_added}")
        if not self.added_radius_arcsec > 0:
            raise ConfigError("measure.added_radius_arcsec", f"must be > 0, got {self.added_radius_arcsec}")
        if not self.symmetry_other_child_fwhm >= 0:
            raise ConfigError("measure.symmetry_other_child_fwhm", f"must be >= 0, got {self.symmetry_other_child_fwhm}")


@dataclass(frozen=True, eq=False)
class Fluxes:
    """The photometry of the children (N rows, as :class:`~galgan_ray.field.children.Children`).

    Attributes
    ----------
    flux, flux_err : numpy.ndarray
        float64 ``(N, C)`` (nJy).
    flags : numpy.ndarray
        int64: OR of the bands' fit flags, less the box-edge ``EDGE`` bit.
    hlr_arcsec : numpy.ndarray
        float64: half-light radius in the reference band.
    template_flux, template_flux_err : numpy.ndarray or None
        float64 ``(N, C)`` (nJy): template photometry (:func:`measure_templates`), NaN where
        unconstrained (``TEMPLATE_FAILED`` in ``flags``).
    """

    flux: np.ndarray
    flux_err: np.ndarray
    flags: np.ndarray
    hlr_arcsec: np.ndarray
    template_flux: np.ndarray | None = None
    template_flux_err: np.ndarray | None = None


@lru_cache(maxsize=64)
def _psf_mixture_cached(key: bytes, shape: tuple[int, int], scale: float, n_gauss: int):
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


def measure_children(footprints: Footprints, children: Children, variance: np.ndarray, *, psf: np.ndarray,
                     pixel_scale_arcsec: float, config: MeasureConfig,
                     compute: PhotometryComputeConfig = PhotometryComputeConfig()) -> Fluxes:
    """Gaussian-mixture photometry of all children on the LR image, footprint by footprint (module docstring).

    Every footprint is fitted in its own box (its bounding box and children plus ``margin_px``,
    rounded up to a size of ``_BOX_SIZES``); boxes are then padded with zero-weight pixels to a few
    common sizes (:func:`_size_classes`) so that a tile takes one or two batched
    :func:`~galgan_ray.photometry.fit_fluxes` calls instead of one per box size. Padding changes no
    fit: the pixels added carry no weight.

    Parameters
    ----------
    footprints : Footprints
        Its ``image_sub`` is the image measured.
    children : Children
    variance : numpy.ndarray
        ``(C, H, W)`` variance plane of the tile.
    psf : numpy.ndarray
        ``(C, P, P)`` PSF of the tile.
    pixel_scale_arcsec : float
    config : MeasureConfig
    compute : PhotometryComputeConfig

    Returns
    -------
    Fluxes
    """
    image_sub = footprints.image_sub
    c = image_sub.shape[0]
    seg, labels, bbox = footprints.seg, footprints.label, footprints.bbox
    cfp, cx, cy = children.fp, children.x, children.y
    n = len(cfp)
    flux = np.full((n, c), np.nan)
    err = np.full((n, c), np.nan)
    flags = np.zeros(n, dtype=np.int64)
    hlr = np.full(n, np.nan)
    if n == 0:
        return Fluxes(flux=flux, flux_err=err, flags=flags, hlr_arcsec=hlr)

    mixes = [_psf_mixture(psf[ci], pixel_scale_arcsec, config.psf_n_gauss) for ci in range(c)]
    margin = config.margin_px
    phot = config.photometry
    # 1. One box per footprint.
    items = []
    for k in np.unique(cfp):
        rows = np.flatnonzero(cfp == k)
        ox, oy, size = _footprint_box(bbox[k], cx[rows], cy[rows], margin)
        items.append((int(k), rows, ox, oy, size, len(rows) > config.max_fit_children))
    # 2. Group the boxes: by fit mode, then by padded size.
    groups: dict[tuple[int, bool], list] = {}
    for many in (False, True):
        sel = [it for it in items if it[5] == many]
        if not sel:
            continue
        # Forced fits (many children) are linear: one evaluation, so a loop costs little.
        loop = _LOOP_COST_PX / (phot.max_iter if many or phot.mode == "forced" else 1)
        pad_to = _size_classes([it[4] for it in sel], [len(it[1]) for it in sel], loop_cost_px=loop)
        for it in sel:
            groups.setdefault((pad_to[it[4]], many), []).append(it)
    # 3. One fit per group: each box in the corner of a zero-weight array of the group's size.
    for (size, many), group in groups.items():
        ref_cfg = replace(phot, mode="forced") if many else phot
        imgs = np.zeros((len(group), c, size, size), dtype=np.float64)
        var = np.full((len(group), c, size, size), np.inf)
        centres = []
        for i, (k, rows, ox, oy, bs, _) in enumerate(group):
            s = extract_box(seg, ox, oy, bs, -1)
            other = (s != 0) & (s != labels[k])  # other footprints, and off-tile pixels (-1)
            v = np.where(other[None], np.inf, extract_box(variance, ox, oy, bs, np.inf).astype(np.float64))
            var[i, :, :bs, :bs] = v
            imgs[i, :, :bs, :bs] = np.where(np.isfinite(v), extract_box(image_sub, ox, oy, bs, 0.0), 0.0)
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
                err[rows, ci] = res["flux_err"][i, :s] * footprints.noise_scale  # the measured noise
                flags[rows] |= res["flags"][i, :s].astype(np.int64) & ~np.int64(_EDGE)
            hlr[rows] = ref["hlr_arcsec"][i, :s]
    excess = symmetric_excess(image_sub, variance, psf=psf, children=children, flux=flux,
                              footprints=footprints, max_distance_px=config.symmetry_max_arcsec / pixel_scale_arcsec,
                              other_child_px=config.symmetry_other_child_fwhm * measure_fwhm(psf[0]))
    added = deblend_added(children, footprints, radius_px=config.added_radius_arcsec / pixel_scale_arcsec)
    return support_children(Fluxes(flux=flux, flux_err=err, flags=flags, hlr_arcsec=hlr),
                            support_snr=config.support_snr, excess=excess, added=added,
                            support_snr_added=config.support_snr_added)


def deblend_added(children: Children, footprints: Footprints, *, radius_px: float) -> np.ndarray | None:
    """bool per child: not the child of a plain detection (:attr:`Footprints.detections`), the
    detections and children matched one to one within ``radius_px`` (:func:`galgan_ray.matching.match_peaks`:
    of two children near one detection, one is that detection and the other only deblending's); None
    where the footprints carry no plain detection."""
    det = footprints.detections
    if det is None:
        return None
    m = match_peaks(det, np.column_stack([children.x, children.y]), radius_px=radius_px)
    return ~m["peak_matched"]


def symmetric_excess(image: np.ndarray, variance: np.ndarray, *, psf: np.ndarray, children: Children,
                     flux: np.ndarray, footprints: Footprints | None = None, max_distance_px: float = np.inf,
                     other_child_px: float = 0.0) -> np.ndarray:
    """How far each child's light exceeds what a brighter child of its footprint explains by symmetry.

    Galaxies and stars are close to point-symmetric about their centres (the SDSS deblender's
    template idea), so the light of a brighter child ``i`` at a child ``j`` is, to first order, what
    ``i`` puts at ``j``'s mirror image ``2 p_i - p_j``. On the PSF-filtered LR image (reference band)
    the excess is ``(F(p_j) - F(2 p_i - p_j)) / sqrt(V(p_j) + V(2 p_i - p_j))`` (F the filtered
    flux, V its variance); each child keeps its smallest excess over the brighter children (higher F
    at their own position) of its footprint within ``max_distance_px``. A shred of a bright galaxy's disk or a star's
    wing has none; a real companion has its own light. Only mirrors inside the footprint's own
    segment count (elsewhere the light is another source's), and so do only mirrors farther than
    ``other_child_px`` from every other child of the footprint brighter than the child tested: a
    mirror on such a third child measures that child's light, not the brighter sibling's, and would
    reject a real galaxy of a group (a fainter third child cannot cancel the child's own light).
    Children without a brighter sibling, or whose mirror falls off the tile, on unusable pixels, outside
    the segment or on another child, get ``inf``.
    """
    n = len(children)
    out = np.full(n, np.inf)
    if n < 2:
        return out
    k = np.asarray(psf[0], dtype=np.float64)
    k = k / k.sum()
    img = np.asarray(image[0], dtype=np.float64)
    var = np.asarray(variance[0], dtype=np.float64)
    good = np.isfinite(var)
    f_map = fftconvolve(np.where(good, img, 0.0), k[::-1, ::-1], mode="same") / (k**2).sum()
    v_map = fftconvolve(np.where(good, var, 0.0), (k**2)[::-1, ::-1], mode="same") / (k**2).sum() ** 2
    bad_map = (fftconvolve((~good).astype(np.float64), np.abs(k[::-1, ::-1]), mode="same") > 0.05).astype(np.float64)
    h, w = img.shape

    def sample(m, x, y):
        return ndimage.map_coordinates(m, [np.atleast_1d(y), np.atleast_1d(x)], order=1, mode="nearest")

    # "brighter" by the filtered LR image at the child's position (robust where a joint fit trades
    # flux between two children of one galaxy); the fitted flux breaks ties
    ref = sample(f_map, children.x, children.y) + 1e-9 * np.nan_to_num(flux[:, 0], nan=0.0)

    for fp in np.unique(children.fp):
        rows = np.flatnonzero(children.fp == fp)
        if len(rows) < 2:
            continue
        x, y = children.x[rows], children.y[rows]
        for a, j in enumerate(rows):
            brighter = [b for b in range(len(rows)) if ref[rows[b]] > ref[j]]
            if not brighter:
                continue
            brighter = [b for b in brighter if np.hypot(x[b] - x[a], y[b] - y[a]) <= max_distance_px]
            if not brighter:
                continue
            mx, my = 2 * x[brighter] - x[a], 2 * y[brighter] - y[a]
            inside = (mx > 0) & (mx < w - 1) & (my > 0) & (my < h - 1)
            if footprints is not None:
                ix = np.clip(np.rint(mx).astype(int), 0, w - 1)
                iy = np.clip(np.rint(my).astype(int), 0, h - 1)
                inside &= footprints.seg[iy, ix] == footprints.label[fp]
            if other_child_px > 0 and len(rows) > 2:
                third = np.ones((len(mx), len(rows)), bool)
                third[np.arange(len(mx)), brighter] = False  # the mirror's own centre
                third[:, ref[rows] <= ref[j]] = False  # the child itself, and fainter children: no say
                d = np.hypot(mx[:, None] - x[None, :], my[:, None] - y[None, :])
                inside &= ~((d < other_child_px) & third).any(axis=1)
            if not inside.any():
                continue
            mx, my = mx[inside], my[inside]
            ok = sample(bad_map, mx, my) <= 0.0  # no unusable pixel near the mirror
            if not ok.any():
                continue
            fj, vj = sample(f_map, x[a], y[a])[0], sample(v_map, x[a], y[a])[0]
            fm, vm = sample(f_map, mx[ok], my[ok]), sample(v_map, mx[ok], my[ok])
            out[j] = float(np.min((fj - fm) / np.sqrt(np.maximum(vj + vm, 1e-300))))
    return out


def fitted_snr(fluxes: Fluxes) -> np.ndarray:
    """Each child's fitted significance: ``sqrt(sum_b max(flux_b / err_b, 0)^2)`` (NaN-safe: 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fluxes.flux_err > 0, fluxes.flux / fluxes.flux_err, np.nan)
    snr = np.nan_to_num(np.clip(snr, 0.0, None), nan=0.0, posinf=0.0)
    return np.sqrt((snr**2).sum(axis=1))


def support_children(fluxes: Fluxes, *, support_snr: float, excess: np.ndarray | None = None,
                     added: np.ndarray | None = None, support_snr_added: float | None = None) -> Fluxes:
    """Flag the children the LR pixels do not support (module docstring): ``UNSUPPORTED`` when the
    fitted S/N or the symmetric ``excess`` (:func:`symmetric_excess`; None: not tested) is below
    ``support_snr``, or, for the ``added`` children (:func:`deblend_added`, flagged
    ``DEBLEND_ADDED``; None: not tested), the fitted S/N below ``support_snr_added``; ``LOW_SNR``
    below 5 sigma (no negative or unmeasured flux passes either)."""
    snr = fitted_snr(fluxes)
    unsupported = snr < support_snr
    if excess is not None:
        unsupported |= np.asarray(excess) < support_snr
    flags = fluxes.flags.copy()
    if added is not None:
        added = np.asarray(added, bool)
        flags |= np.where(added, _DEBLEND_ADDED, 0).astype(np.int64)
        if support_snr_added is not None:
            unsupported |= added & (snr < support_snr_added)
    flags |= np.where(unsupported, _UNSUPPORTED, 0).astype(np.int64)
    flags |= np.where(snr < LOW_SNR_THRESHOLD, _LOW_SNR, 0).astype(np.int64)
    # A negative or unmeasured flux in any band is never unflagged, however significant another band is.
    flags |= np.where((~(fluxes.flux > 0)).any(axis=1), _LOW_SNR, 0).astype(np.int64)
    return replace(fluxes, flags=flags)


# ------------------------------------------------------------------------------------------------
# Template photometry: the enhanced image as the morphological prior (galgan_ray.templates)
# ------------------------------------------------------------------------------------------------
def measure_templates(footprints: Footprints, children: Children, cutouts, enhanced: np.ndarray | None,
                      variance: np.ndarray, *, psf: np.ndarray, psf_hr: np.ndarray, factor: int,
                      pixel_scale_arcsec: float, config: MeasureConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template photometry of the children, footprint by footprint (:mod:`galgan_ray.templates`).

    The footprint's box (children and bounding box plus ``margin_px``) is measured on the LR image
    with the pixels of other footprints given no weight. Its prior is the enhanced tile over the
    box, pasted from the footprint's enhanced cutout views (views of one image enhanced once); a
    footprint without an enhanced image (``ENHANCE_SKIPPED``) is its own prior (the LR image). A
    child whose share of the prior is empty gets a PSF template. Each band is measured with the
    prior of the same band where the model has it, else with the reference band's.

    Returns
    -------
    flux, flux_err : numpy.ndarray
        float64 ``(N, C)`` nJy (NaN where unconstrained).
    flags : numpy.ndarray
        int64 ``(N,)``: ``TEMPLATE_FAILED`` where any band's flux is unconstrained.
    """
    image_sub = footprints.image_sub
    c = image_sub.shape[0]
    seg, labels, bbox = footprints.seg, footprints.label, footprints.bbox
    cfp, cx, cy = children.fp, children.x, children.y
    n = len(cfp)
    flux = np.full((n, c), np.nan)
    err = np.full((n, c), np.nan)
    flags = np.zeros(n, dtype=np.int64)
    if n == 0:
        return flux, err, flags
    tcfg = config.templates
    margin = config.margin_px
    operators = [lr_operator(psf_hr, psf[ci], factor=factor) for ci in range(c)]
    views_of: dict[int, list[int]] = {}
    if enhanced is not None and len(cutouts):
        for j, k in enumerate(cutouts.fp):
            views_of.setdefault(int(k), []).append(j)
    side = cutouts.image.shape[-1] if cutouts is not None and len(cutouts) else 0
    hr_size = enhanced.shape[-1] if enhanced is not None and len(enhanced) else 0
    crop = (side * factor - hr_size) // 2 if hr_size else 0
    # One box per footprint, grouped by size (and by whether it has an enhanced prior).
    groups: dict[tuple[int, bool], list] = {}
    for k in np.unique(cfp):
        rows = np.flatnonzero(cfp == k)
        ox, oy, size = _footprint_box(bbox[k], cx[rows], cy[rows], margin)
        groups.setdefault((size, int(k) in views_of), []).append((int(k), rows, ox, oy))
    s_max_all = 1
    for (size, has_prior), group in groups.items():
        m = len(group)
        s_max = max(len(g[1]) for g in group)
        s_max_all = max(s_max_all, s_max)
        imgs = np.zeros((m, c, size, size))
        var = np.full((m, c, size, size), np.inf)
        cen_lr = np.full((m, s_max, 2), np.nan)
        for i, (k, rows, ox, oy) in enumerate(group):
            sg = extract_box(seg, ox, oy, size, -1)
            other = (sg != 0) & (sg != labels[k])
            v = np.where(other[None], np.inf, extract_box(variance, ox, oy, size, np.inf).astype(np.float64))
            var[i] = v
            imgs[i] = np.where(np.isfinite(v), extract_box(image_sub, ox, oy, size, 0.0), 0.0)
            cen_lr[i, :len(rows)] = np.c_[cx[rows] - ox, cy[rows] - oy]
        if has_prior:
            c_hr = enhanced.shape[1]
            prior = np.zeros((m, c_hr, size * factor, size * factor), dtype=np.float32)
            for i, (k, rows, ox, oy) in enumerate(group):
                for j in views_of[k]:
                    vx, vy = cutouts.origin[j]
                    # The view's HR pixel (0, 0) is HR pixel factor * origin + crop of the tile.
                    px, py = factor * (int(vx) - ox) + crop, factor * (int(vy) - oy) + crop
                    ys, xs = max(py, 0), max(px, 0)
                    ye, xe = min(py + hr_size, size * factor), min(px + hr_size, size * factor)
                    if ye > ys and xe > xs:
                        prior[i, :, ys:ye, xs:xe] = enhanced[j, :, ys - py:ye - py, xs - px:xe - px]
                # Only this footprint's light and the sky around it: what the LR solve can see.
                sg = extract_box(seg, ox, oy, size, -1)
                mine = np.repeat(np.repeat((sg == labels[k]) | (sg == 0), factor, axis=0), factor, axis=1)
                prior[i] *= mine[None]
            cen_hr = factor * cen_lr + (factor - 1) / 2.0
        for ci in range(c):
            if has_prior:
                res = template_fluxes(imgs[:, ci], var[:, ci], prior[:, min(ci, prior.shape[1] - 1)], cen_hr,
                                      pixel_scale_arcsec=pixel_scale_arcsec / factor,
                                      to_low_resolution=operators[ci], psf_lr=psf[ci],
                                      centres_lr=cen_lr, config=tcfg)
            else:
                res = template_fluxes(imgs[:, ci], var[:, ci], imgs[:, ci], cen_lr, pixel_scale_arcsec=pixel_scale_arcsec,
                                      psf_lr=psf[ci], centres_lr=cen_lr, config=tcfg)
            for i, (k, rows, *_) in enumerate(group):
                s = len(rows)
                flux[rows, ci] = res["flux"][i, :s]
                err[rows, ci] = res["flux_err"][i, :s] * footprints.noise_scale
                flags[rows] |= res["flags"][i, :s].astype(np.int64)
    return flux, err, flags


def flag_template_fluxes(fluxes: Fluxes) -> Fluxes:
    """``LOW_SNR`` also where a band's template flux is below 5 sigma (negative or unmeasured included),
    so that no row with ``flags == 0`` carries a negative or insignificant flux in either column."""
    if fluxes.template_flux is None:
        return fluxes
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.where(fluxes.template_flux_err > 0, fluxes.template_flux / fluxes.template_flux_err, np.nan)
    low = ~(np.nan_to_num(snr, nan=-np.inf) >= LOW_SNR_THRESHOLD).all(axis=1)
    return replace(fluxes, flags=fluxes.flags | np.where(low, _LOW_SNR, 0).astype(np.int64))
