"""Step 7 of the field pipeline: the tile's catalog rows, their ids and ownership, and the tile's counts.

``objectId = (tileId << 24) | n`` with n the running number of the child in the tile (children
ordered by footprint, then by decreasing significance); ``parentObjectId = (tileId << 24) | 2^23 |
footprint``. A source belongs to the tile whose inner region holds its position; the others are
dropped (or kept with ``NOT_PRIMARY`` when ``keep_not_primary``), so a field's tiles merge without
duplicates or gaps. Children the low-resolution pixels do not support (``UNSUPPORTED``,
:func:`galgan_ray.field.measure.support_children`) are left out too unless ``keep_unsupported``; the
tile's counts say how many. The columns are those of :func:`galgan_ray.schema.object_schema`; its
Rubin booleans are read off the flags: ``detect_isPrimary`` (not ``NOT_PRIMARY``), ``deblend_skipped``
(``ENHANCE_SKIPPED``), ``deblend_failed`` (``FIT_FAILED``), and ``deblend_nChild`` is 0 (every row is a
child).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..flags import flag_bit
from ..schema import band_name
from ..tiles import Tile
from .children import Children
from .cutouts import Cutouts
from .footprints import Footprints
from .measure import Fluxes

__all__ = ["ID_SHIFT", "PARENT_BIT", "Catalog", "TileStats", "build_catalog", "tile_stats"]

#: ``objectId = (tileId << ID_SHIFT) | n``; parents set :data:`PARENT_BIT` in ``n``.
ID_SHIFT = 24
PARENT_BIT = 1 << 23

_NOT_PRIMARY = flag_bit("NOT_PRIMARY")
_UNSUPPORTED = flag_bit("UNSUPPORTED")
_SKIPPED = flag_bit("ENHANCE_SKIPPED")
_DEBLEND_FAILED = flag_bit("FIT_FAILED")


@dataclass(frozen=True, eq=False)
class Catalog:
    """A tile's catalog.

    Attributes
    ----------
    columns : dict of numpy.ndarray
        The rows the tile reports, in :func:`galgan_ray.schema.object_columns` order and types.
    all_object_id : numpy.ndarray
        int64, the ``objectId`` of every child, owned or not (ids do not depend on
        ``keep_not_primary``); rows as :class:`~galgan_ray.field.children.Children`.
    all_primary : numpy.ndarray
        bool, whether the tile owns each child.
    """

    columns: dict[str, np.ndarray]
    all_object_id: np.ndarray
    all_primary: np.ndarray

    def __len__(self) -> int:
        return len(self.columns["objectId"])


@dataclass(frozen=True)
class TileStats:
    """A tile's counts for the run summary.

    Attributes
    ----------
    n_sources : int
        Catalog rows.
    n_footprints : int
        Owned footprints.
    n_cutouts : int
        Cutouts enhanced.
    n_newly_resolved : int
        Owned footprints with at most one LR peak split into two or more enhanced children.
    n_enhance_skipped : int
        Owned footprints whose LR peaks stand in (not enhanced, or no enhanced peak).
    n_low_peaks : int
        Owned LR peaks.
    n_unsupported : int
        Owned children flagged ``UNSUPPORTED`` (left out of the catalog unless ``keep_unsupported``).
    area_deg2 : float
        Sky area of the tile's inner region.
    """

    n_sources: int
    n_footprints: int
    n_cutouts: int
    n_newly_resolved: int
    n_enhance_skipped: int
    n_low_peaks: int
    n_unsupported: int
    area_deg2: float

    def to_dict(self) -> dict:
        return asdict(self)


def build_catalog(tile: Tile, footprints: Footprints, children: Children, fluxes: Fluxes, *,
                  keep_not_primary: bool = False, keep_unsupported: bool = False) -> Catalog:
    """The tile's catalog (module docstring).

    Parameters
    ----------
    tile : Tile
        The LR tile (ids, WCS, inner region, bands).
    footprints, children, fluxes
        The results of the earlier steps.
    keep_not_primary : bool
        Keep the children outside the inner region, flagged ``NOT_PRIMARY``.
    keep_unsupported : bool
        Keep the children flagged ``UNSUPPORTED``.

    Returns
    -------
    Catalog
    """
    tid = int(tile.tile_id)
    fp = children.fp
    n = len(fp)
    x, y = children.x, children.y
    object_id = (np.int64(tid) << ID_SHIFT) | np.arange(n, dtype=np.int64)
    parent_id = (np.int64(tid) << ID_SHIFT) | np.int64(PARENT_BIT) | fp.astype(np.int64)
    primary = tile.owns(x, y)
    flags = children.flags | fluxes.flags
    flags = flags | np.where(primary, 0, _NOT_PRIMARY)
    if n:
        ra, dec = tile.wcs.pixel_to_world_values(x, y)
    else:
        ra = dec = np.zeros(0)
    cols: dict[str, np.ndarray] = {
        "objectId": object_id, "parentObjectId": parent_id, "tileId": np.full(n, tid, dtype=np.int64),
        "coord_ra": np.asarray(ra, dtype=np.float64), "coord_dec": np.asarray(dec, dtype=np.float64),
        **dict(zip(("x", "y"), tile.catalog_pixels(x, y))),  # a survey image's own pixels (tiles.Tile)
    }
    for ci, key in enumerate(tile.bands):
        b = band_name(key)
        nan = np.full(n, np.nan)
        cols[f"{b}_templateFlux"] = nan if fluxes.template_flux is None else fluxes.template_flux[:, ci].astype(np.float64)
        cols[f"{b}_templateFluxErr"] = (nan if fluxes.template_flux_err is None
                                        else fluxes.template_flux_err[:, ci].astype(np.float64))
        cols[f"{b}_gmmFlux"] = fluxes.flux[:, ci].astype(np.float64)
        cols[f"{b}_gmmFluxErr"] = fluxes.flux_err[:, ci].astype(np.float64)
    cols["significance"] = children.significance.astype(np.float32)
    cols["detect_isPrimary"] = (flags & _NOT_PRIMARY) == 0
    cols["deblend_nChild"] = np.zeros(n, dtype=np.int32)
    cols["deblend_skipped"] = (flags & _SKIPPED) != 0
    cols["deblend_failed"] = (flags & _DEBLEND_FAILED) != 0
    cols["deblend_nPeaks_low"] = footprints.n_peaks_low[fp].astype(np.int32)
    cols["deblend_nPeaks_enhanced"] = children.n_peaks_enhanced[fp].astype(np.int32)
    cols["flags"] = flags.astype(np.int64)
    keep = np.ones(n, bool) if keep_not_primary else primary.copy()
    if not keep_unsupported:
        keep &= (flags & _UNSUPPORTED) == 0
    return Catalog(columns={k: v[keep] for k, v in cols.items()}, all_object_id=object_id, all_primary=primary)


def tile_stats(tile: Tile, footprints: Footprints, cutouts: Cutouts, children: Children, fluxes: Fluxes,
               catalog: Catalog) -> TileStats:
    """The tile's counts (:class:`TileStats`)."""
    fp_n_low = footprints.n_peaks_low
    fp_n_enh = children.n_peaks_enhanced
    fx, fy = footprints.x, footprints.y
    owned_fp = tile.owns(fx, fy) if len(fx) else np.zeros(0, bool)
    split = owned_fp & (fp_n_low <= 1) & (fp_n_enh >= 2)
    low = footprints.peaks
    return TileStats(n_sources=len(catalog), n_footprints=int(owned_fp.sum()), n_cutouts=len(cutouts),
                     n_newly_resolved=int(split.sum()), n_enhance_skipped=int((owned_fp & (fp_n_enh == 0)).sum()),
                     n_low_peaks=int(tile.owns(low.x, low.y).sum()) if len(low.x) else 0,
                     n_unsupported=int((tile.owns(children.x, children.y)
                                        & ((fluxes.flags & _UNSUPPORTED) != 0)).sum()) if len(children) else 0,
                     area_deg2=float(tile.inner_area_deg2()))
