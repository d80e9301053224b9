"""The tables the field job writes, defined once: Rubin Object-table spelling, units and descriptions.

Every catalog the package writes is built from :func:`object_schema` (by :func:`catalog_table`)
and checked with :func:`validate_table` (a test reads written files back and validates them);
failures by :func:`failure_table`; the simulation truth and blend tables of a field run by
:func:`truth_table` and :func:`blends_table` (columns :data:`TRUTH_TABLE_COLUMNS`,
:data:`BLEND_TABLE_COLUMNS`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .errors import InputError

__all__ = ["Column", "object_columns", "object_schema", "FAILURE_COLUMNS", "failure_schema", "validate_table",
           "band_name", "catalog_table", "failure_table", "truth_table", "blends_table", "TRUTH_TABLE_COLUMNS",
           "BLEND_TABLE_COLUMNS"]


@dataclass(frozen=True)
class Column:
    """One catalog column: Arrow type, unit and description."""

    name: str
    type: pa.DataType
    unit: str
    description: str

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=True,
                        metadata={b"unit": self.unit.encode(), b"description": self.description.encode()})


_BASE: tuple[Column, ...] = (
    Column("objectId", pa.int64(), "", "unique id of the source: (tileId << 24) | running number within the tile"),
    Column("parentObjectId", pa.int64(), "", "id of the low-resolution footprint (parent) the source was found in"),
    Column("tileId", pa.int64(), "", "id of the tile whose inner region holds the source"),
    Column("coord_ra", pa.float64(), "deg", "right ascension, ICRS"),
    Column("coord_dec", pa.float64(), "deg", "declination, ICRS"),
    Column("x", pa.float64(), "pixel", "0-based column position on the tile's low-resolution image"),
    Column("y", pa.float64(), "pixel", "0-based row position on the tile's low-resolution image"),
    Column("significance", pa.float32(), "sigma", "matched-filter peak significance on the enhanced image"),
    Column("deblend_nPeaks_low", pa.int32(), "", "peaks found in the parent footprint at low resolution"),
    Column("deblend_nPeaks_enhanced", pa.int32(), "", "peaks found in the parent footprint on the enhanced image"),
    Column("flags", pa.int64(), "", "bit flags, see galgan_ray.flags.FLAGS"),
)


def object_columns(bands: Sequence[str]) -> tuple[Column, ...]:
    """Columns of the source catalog for the given band names (e.g. ``("i",)``)."""
    per_band = []
    for b in bands:
        per_band += [
            Column(f"{b}_gmmFlux", pa.float64(), "nJy", f"Gaussian-mixture forced flux in band {b}"),
            Column(f"{b}_gmmFluxErr", pa.float64(), "nJy", f"1-sigma error of {b}_gmmFlux"),
        ]
    return _BASE[:8] + tuple(per_band) + _BASE[8:]


def object_schema(bands: Sequence[str], *, metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """Arrow schema of the source catalog for ``bands``."""
    return pa.schema([c.field() for c in object_columns(bands)], metadata=metadata)


FAILURE_COLUMNS: tuple[Column, ...] = (
    Column("tileId", pa.int64(), "", "id of the tile that failed (-1 when unknown)"),
    Column("source", pa.string(), "", "URL or file of the tile"),
    Column("stage", pa.string(), "", "pipeline stage where it failed"),
    Column("reason", pa.string(), "", "the error message, naming the input and the problem"),
)


def failure_schema() -> pa.Schema:
    """Arrow schema of the ``failures`` table."""
    return pa.schema([c.field() for c in FAILURE_COLUMNS])


def validate_table(table: pa.Table, schema: pa.Schema, *, source: str = "table") -> None:
    """Raise :class:`InputError` unless ``table`` has exactly the columns and types of ``schema``."""
    got = [(f.name, f.type) for f in table.schema]
    want = [(f.name, f.type) for f in schema]
    if got != want:
        missing = [n for n, _ in want if n not in dict(got)]
        extra = [n for n, _ in got if n not in dict(want)]
        wrong = [n for n, t in got if n in dict(want) and dict(want)[n] != t]
        raise InputError(source, f"schema mismatch: missing {missing}, unexpected {extra}, wrong type {wrong}"
                                 + ("" if missing or extra or wrong else " (column order differs)"))


# ------------------------------------------------------------------------------------------------
# Building the tables from columns
# ------------------------------------------------------------------------------------------------
#: Columns of a field run's ``truth`` table (simulations): the owned truth sources and whether they
#: were found at high, low and enhanced resolution.
TRUTH_TABLE_COLUMNS: tuple[str, ...] = (
    "truthId", "tileId", "coord_ra", "coord_dec", "x", "y", "mag", "flux_njy", "hlr_arcsec", "flux_radius_arcsec",
    "fwhm_arcsec", "redshift", "is_star", "scored", "matched_high", "matched_low", "matched_enhanced", "objectId")
#: Columns of a field run's ``blends`` table (simulations): truth pairs and whether both were found.
BLEND_TABLE_COLUMNS: tuple[str, ...] = (
    "blendId", "tileId", "truthId_primary", "truthId_secondary", "sep_arcsec", "delta_mag", "flux_ratio",
    "sum_fwhm_arcsec", "delta_z", "sep_over_size", "mag_primary", "mag_secondary", "redshift_primary",
    "blended_low", "n_found_high", "n_found_low", "n_found_enhanced", "found_high", "found_low", "found_enhanced")


def band_name(key: str) -> str:
    """The name a band's columns carry: ``hsc/i`` -> ``i`` (a name stays as it is)."""
    return key.split("/", 1)[-1]


def catalog_table(columns: Mapping[str, np.ndarray], *, bands: Sequence[str],
                  metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """An Arrow table with exactly :func:`object_schema` (band keys or names)."""
    schema = object_schema([band_name(b) for b in bands], metadata=dict(metadata or {}))
    arrays = [pa.array(np.asarray(columns[f.name]), type=f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def failure_table(rows: Sequence[Mapping[str, Any]], *, metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """An Arrow table of failures (:func:`failure_schema`), one row per ``{tileId, source, stage, reason}``."""
    schema = failure_schema().with_metadata(dict(metadata or {}))
    return pa.Table.from_arrays([pa.array([r[f.name] for r in rows], type=f.type) for f in schema], schema=schema)


def _plain_table(columns: Mapping[str, np.ndarray], names: Sequence[str], metadata=None) -> pa.Table:
    return pa.table({k: pa.array(np.asarray(columns[k])) for k in names}, metadata=dict(metadata or {}))


def truth_table(columns: Mapping[str, np.ndarray], *, metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """Arrow table of :data:`TRUTH_TABLE_COLUMNS`."""
    return _plain_table(columns, TRUTH_TABLE_COLUMNS, metadata)


def blends_table(columns: Mapping[str, np.ndarray], *, metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """Arrow table of :data:`BLEND_TABLE_COLUMNS`."""
    return _plain_table(columns, BLEND_TABLE_COLUMNS, metadata)
