"""Step 8 of the field pipeline (simulations): the peaks of the true high-resolution sky, and the
scores of a tile against its truth.

Before degradation, :func:`find_high_peaks` finds the peaks of the simulated HR tile (the
``high`` row of the statistics) and maps them to the LR grid. After the catalog, truth sources
brighter than ``mag_limit`` are matched one to one (Hungarian, within ``match_radius_arcsec``,
:func:`galgan_ray.matching.match_sparse`) to the HR peaks, the LR peaks and the enhanced children
of the tile; every pair of them closer than ``blend_max_sep_arcsec`` whose brighter member the
tile owns becomes a row of the blends table, with its parameters and whether both members were
found at high, low and enhanced resolution.

"Enhanced" is every child found on the enhanced image, before the support tests that leave some out
of the catalog (:func:`galgan_ray.field.measure.support_children`). A truth source's ``objectId``
is the catalog row that found it: -1 where no child matched, and where the child that matched is
not in the catalog (unsupported, or not the tile's own), so that the truth table never names a row
the catalog lacks; the summary's ``matched_catalog`` counts those rows, the completeness of the
catalog as written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from ..detect import DetectConfig, find_peaks_tiled
from ..errors import ConfigError
from ..geometry import hr_to_block_pixels
from ..matching import match_sparse
from ..schema import BLEND_TABLE_COLUMNS
from ..tiles import Tile
from .catalog import ID_SHIFT, Catalog
from .children import Children
from .footprints import Footprints

__all__ = ["TruthConfig", "HighPeaks", "TruthScores", "find_high_peaks", "score_truth"]


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
    purity_radius_arcsec : float
        A catalog row (or an LR peak) counts as supported by the truth when a true object of any
        magnitude, star or galaxy, lies within this distance: the purity of the run summary.
    """

    match_radius_arcsec: float = 0.3
    mag_limit: float = 25.5
    blend_max_sep_arcsec: float = 2.0
    purity_radius_arcsec: float = 0.5

    def __post_init__(self):
        if not (self.match_radius_arcsec > 0 and self.blend_max_sep_arcsec > 0 and self.purity_radius_arcsec > 0):
            raise ConfigError("truth.match_radius_arcsec", "radii must be > 0")


@dataclass(frozen=True, eq=False)
class HighPeaks:
    """Peaks of a simulated HR tile (band 0), on the LR grid its degradation makes.

    Attributes
    ----------
    x, y : numpy.ndarray
        float64, 0-based LR px.
    significance : numpy.ndarray
        float32.
    """

    x: np.ndarray
    y: np.ndarray
    significance: np.ndarray


@dataclass(frozen=True, eq=False)
class TruthScores:
    """A simulated tile scored against its truth.

    Attributes
    ----------
    truth : dict of numpy.ndarray
        The owned truth sources, :data:`galgan_ray.schema.TRUTH_TABLE_COLUMNS`.
    blends : dict of numpy.ndarray
        One row per owned truth pair closer than ``blend_max_sep_arcsec``,
        :data:`galgan_ray.schema.BLEND_TABLE_COLUMNS`.
    purity : dict of str to int
        ``n_catalog`` (the tile's catalog rows) and ``n_catalog_near_truth`` (those within
        ``purity_radius_arcsec`` of a true object of any magnitude); ``n_low_peaks`` /
        ``n_low_near_truth`` likewise for the owned low-resolution peaks (the survey's own detection).
    """

    truth: dict[str, np.ndarray]
    blends: dict[str, np.ndarray]
    purity: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """The run summary's truth counts: scored sources and blends found at each resolution, and
        the scored sources a catalog row found (``matched_catalog``)."""
        scored = np.asarray(self.truth.get("scored", np.zeros(0)), bool)
        out = {"n_truth": int(len(scored)), "n_scored": int(scored.sum())}
        for k in ("high", "low", "enhanced"):
            out[f"matched_{k}"] = int((np.asarray(self.truth.get(f"matched_{k}", np.zeros(0)), bool) & scored).sum())
            out[f"blends_found_{k}"] = int(np.asarray(self.blends.get(f"found_{k}", np.zeros(0)), bool).sum())
        out["n_blends"] = int(len(self.blends.get("sep_arcsec", ())))
        obj = np.asarray(self.truth.get("objectId", np.zeros(0)), np.int64)
        out["matched_catalog"] = int(((obj >= 0) & scored).sum())
        out.update({k: int(v) for k, v in self.purity.items()})
        return out


def find_high_peaks(tile: Tile, *, detect: DetectConfig, ratio: int, block_px: int = 384) -> HighPeaks:
    """Peaks of a simulated HR tile (band 0), positions mapped to the LR grid of
    :func:`galgan_ray.degrade.degrade_tile`."""
    good = np.isfinite(tile.variance[0])
    sigma = float(np.sqrt(np.median(tile.variance[0][good])))
    pk = find_peaks_tiled(np.where(good, tile.image[0], 0.0), psf=tile.psf[0], detect=detect, noise_sigma=sigma,
                          block_px=block_px)
    r = int(ratio)
    return HighPeaks(x=hr_to_block_pixels(pk["x"], factor=r), y=hr_to_block_pixels(pk["y"], factor=r),
                     significance=pk["significance"].astype(np.float32))


def score_truth(tile: Tile, *, high: HighPeaks | None, footprints: Footprints, children: Children, catalog: Catalog,
                config: TruthConfig) -> TruthScores:
    """Score a simulated LR tile against its truth (module docstring).

    Parameters
    ----------
    tile : Tile
        The (degraded) LR tile with its truth.
    high : HighPeaks or None
        The HR peaks (None: the ``high`` row matches nothing).
    footprints, children, catalog
        The results of the earlier steps.
    config : TruthConfig

    Returns
    -------
    TruthScores
    """
    t = tile.truth or {}
    nt = len(t.get("truthId", ()))
    scale = tile.pixel_scale_arcsec
    radius = config.match_radius_arcsec / scale
    txy = np.c_[t["x"], t["y"]] if nt else np.zeros((0, 2))
    mag_all = np.asarray(t.get("mag", np.zeros(0)), dtype=np.float64)
    scored = np.isfinite(mag_all) & (mag_all <= config.mag_limit)
    sidx = np.flatnonzero(scored)
    found = {"high": None if high is None else (high.x, high.y), "low": (footprints.peaks.x, footprints.peaks.y),
             "enhanced": (children.x, children.y)}
    matched = {}
    for key, xy in found.items():
        got = np.full(nt, -1, dtype=np.int64)
        if xy is not None:
            got[sidx] = match_sparse(txy[sidx], np.c_[xy[0], xy[1]], radius_px=radius)
        matched[key] = got
    enh = matched["enhanced"]
    all_ids, all_primary = catalog.all_object_id, catalog.all_primary
    obj = np.where(enh >= 0, all_ids[np.maximum(enh, 0)] if len(all_ids) else -1, -1)
    obj = np.where((enh >= 0) & (all_primary[np.maximum(enh, 0)] if len(all_primary) else False), obj, -1)
    obj = np.where(np.isin(obj, catalog.columns["objectId"]), obj, -1)  # a child left out of the catalog: none
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
    blends = _blend_rows(tile, truth, txy, sidx, owned, matched, footprints.seg, config)
    return TruthScores(truth=truth_out, blends=blends, purity=_purity(tile, txy, footprints, catalog, config))


def _purity(tile: Tile, txy: np.ndarray, footprints: Footprints, catalog: Catalog, config: TruthConfig
            ) -> dict[str, int]:
    """How many of the tile's catalog rows and owned LR peaks have a true object (any magnitude)
    within ``purity_radius_arcsec``."""
    radius = config.purity_radius_arcsec / tile.pixel_scale_arcsec
    tree = cKDTree(txy) if len(txy) else None

    def near(x, y) -> int:
        if tree is None or len(x) == 0:
            return 0
        d, _ = tree.query(np.c_[x, y])
        return int((d < radius).sum())

    cols = catalog.columns
    low = footprints.peaks
    own = tile.owns(low.x, low.y) if len(low.x) else np.zeros(0, bool)
    return {"n_catalog": len(catalog), "n_catalog_near_truth": near(cols["x"], cols["y"]),
            "n_low_peaks": int(own.sum()), "n_low_near_truth": near(low.x[own], low.y[own])}


def _blend_rows(tile: Tile, truth: dict, txy: np.ndarray, sidx: np.ndarray, owned: np.ndarray, matched: dict,
                seg: np.ndarray | None, config: TruthConfig) -> dict[str, np.ndarray]:
    """Scored truth pairs closer than the limit, owned through the brighter member."""
    scale = tile.pixel_scale_arcsec
    tid = int(tile.tile_id)
    rows: dict[str, list] = {k: [] for k in BLEND_TABLE_COLUMNS}
    if len(sidx) >= 2:
        pairs = cKDTree(txy[sidx]).query_pairs(r=config.blend_max_sep_arcsec / scale, output_type="ndarray")
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
    return {k: np.asarray(rows[k], dtype=btypes.get(k, np.float64)) for k in BLEND_TABLE_COLUMNS}
