"""The tables the field job writes, defined once: Rubin Object-table spelling, units and descriptions.

Every catalog the package writes is built from :func:`object_schema` (by :func:`catalog_table`)
and checked with :func:`validate_table` (a test reads written files back and validates them);
failures by :func:`failure_table`; the simulation truth and blend tables of a field run by
:func:`truth_table` and :func:`blends_table` (columns :data:`TRUTH_TABLE_COLUMNS`,
:data:`BLEND_TABLE_COLUMNS`).

Names follow Rubin's Object table where Rubin has the quantity (``Column.rubin`` says which data
release defines the name: DP1, or DP0.2 for ``detect_isPrimary``, which DP1's Object table does not
carry); the project's own quantities (``tileId``, ``significance``, ``deblend_nPeaks_low``, ...) keep
their names and say so. Every row of the catalog is a deblended child: parents are not rows, so
``deblend_nChild`` is 0 on every row and ``parentObjectId`` names the footprint, and the Rubin
selection ``detect_isPrimary & (deblend_nChild == 0)`` works unchanged. Units are astropy's
(``Table.read`` of a written file shows them: the schema metadata carries astropy's
``table_meta_yaml``, :func:`astropy_meta`). The README section "Catalog columns and flags" is
:func:`readme_section` (``python -m galgan_ray.schema README.md`` rewrites it; a test checks it).
"""
from __future__ import annotations

import functools
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from .errors import InputError
from .flags import FLAGS

__all__ = ["Column", "object_columns", "object_schema", "FAILURE_COLUMNS", "failure_schema", "validate_table",
           "band_name", "catalog_table", "failure_table", "truth_table", "blends_table", "TRUTH_TABLE_COLUMNS",
           "BLEND_TABLE_COLUMNS", "HEALPIX_COLUMN", "astropy_meta", "readme_section", "update_readme",
           "README_SECTION"]


@dataclass(frozen=True)
class Column:
    """One catalog column: Arrow type, unit (astropy's spelling, ``""`` for none) and description.

    ``rubin`` names the Rubin table whose column of that name means the same (``"DP1 Object"``),
    ``"DP1 pattern"`` for a name spelt as Rubin spells its measurements (``{band}_<algorithm>Flux``
    in nJy) for a measurement of this project, and ``""`` for this project's own columns.
    """

    name: str
    type: pa.DataType
    unit: str
    description: str
    rubin: str = ""

    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=True,
                        metadata={b"unit": self.unit.encode(), b"description": self.description.encode()})


_DP1, _DP02, _PATTERN = "DP1 Object", "DP0.2 Object", "DP1 pattern"

#: Columns before the per-band ones.
_HEAD: tuple[Column, ...] = (
    Column("objectId", pa.int64(), "", "unique id of the source: (tileId << 24) | running number within the tile",
           _DP1),
    Column("parentObjectId", pa.int64(), "", "id of the low-resolution footprint (parent) the source was deblended "
                                             "from: (tileId << 24) | 2^23 | footprint number; parents are not rows "
                                             "of the catalog", _DP1),
    Column("tileId", pa.int64(), "", "id of the tile whose inner region holds the source"),
    Column("coord_ra", pa.float64(), "deg", "right ascension, ICRS", _DP1),
    Column("coord_dec", pa.float64(), "deg", "declination, ICRS", _DP1),
    Column("x", pa.float64(), "pix", "0-based column position on the tile's low-resolution image", _DP1),
    Column("y", pa.float64(), "pix", "0-based row position on the tile's low-resolution image", _DP1),
    Column("significance", pa.float32(), "", "matched-filter peak significance on the enhanced image, in units "
                                             "of the noise sigma"),
)
#: Columns after the per-band ones. The Rubin booleans are read off ``flags`` (field.catalog).
_TAIL: tuple[Column, ...] = (
    Column("detect_isPrimary", pa.bool_(), "", "the tile owns the source (its inner region holds it) and the "
                                               "source has no children: the rows to use; false only with "
                                               "keep_not_primary (flag NOT_PRIMARY)", _DP02),
    Column("deblend_nChild", pa.int32(), "", "children of this object: 0 on every row (every row is a deblended "
                                             "child; the footprint's count is deblend_nPeaks_enhanced)", _DP1),
    Column("deblend_skipped", pa.bool_(), "", "the enhancement did not deblend the footprint (not enhanced, or no "
                                              "peak in its enhanced image): its low-resolution peaks stand in "
                                              "(flag ENHANCE_SKIPPED)", _DP1),
    Column("deblend_failed", pa.bool_(), "", "the joint fit that shares the footprint's flux among its children "
                                             "failed for this child: its flux is unconstrained or did not "
                                             "converge (flag FIT_FAILED)", _DP1),
    Column("deblend_nPeaks_low", pa.int32(), "", "peaks found in the parent footprint at low resolution (what "
                                                 "Rubin's deblend_nPeaks counts on a parent)"),
    Column("deblend_nPeaks_enhanced", pa.int32(), "", "peaks found in the parent footprint on the enhanced image"),
    Column("flags", pa.int64(), "", "bit flags of galgan_ray.flags.FLAGS (README: Catalog columns and "
                                    "flags; `galgan flags VALUE` decodes one)"),
)

#: The HATS spatial index (:mod:`galgan_ray.hats_catalog` adds it to the HATS copy of the catalog).
HEALPIX_COLUMN = Column("_healpix_29", pa.int64(), "", "HEALPix nested pixel of (coord_ra, coord_dec) at order "
                                                       "29: the spatial index of the HATS catalog")


def _band_columns(b: str) -> tuple[Column, ...]:
    return (
        Column(f"{b}_templateFlux", pa.float64(), "nJy",
               f"template flux in band {b}: the child's light on the enhanced image, degraded to the LR "
               f"image and solved linearly with its siblings' (galgan_ray.templates); the catalog's "
               f"recommended flux. NaN when unconstrained (flag TEMPLATE_FAILED)", _PATTERN),
        Column(f"{b}_templateFluxErr", pa.float64(), "nJy",
               f"1-sigma error of {b}_templateFlux (solve, prior noise and a 1.5% template systematic)", _PATTERN),
        Column(f"{b}_gmmFlux", pa.float64(), "nJy", f"Gaussian-mixture forced flux in band {b}", _PATTERN),
        Column(f"{b}_gmmFluxErr", pa.float64(), "nJy", f"1-sigma error of {b}_gmmFlux", _PATTERN),
    )


def object_columns(bands: Sequence[str]) -> tuple[Column, ...]:
    """Columns of the source catalog for the given band names (e.g. ``("i",)``)."""
    per_band: tuple[Column, ...] = ()
    for b in bands:
        per_band += _band_columns(b)
    return _HEAD + per_band + _TAIL


@functools.lru_cache(maxsize=64)
def _astropy_yaml(columns: tuple[Column, ...]) -> str:
    from astropy.table import Column as AstropyColumn
    from astropy.table import Table, meta

    table = Table([AstropyColumn(name=c.name, dtype=np.dtype(c.type.to_pandas_dtype()), length=0,
                                 unit=c.unit or None, description=c.description) for c in columns])
    return "\n".join(meta.get_yaml_from_table(table))


def astropy_meta(columns: Sequence[Column]) -> dict[bytes, bytes]:
    """Parquet schema metadata that gives ``astropy.table.Table.read`` each column's unit and
    description: astropy's own ``table_meta_yaml`` (what ``Table.write(format="parquet")`` stores).
    It must list exactly the file's columns (astropy looks every column up in it)."""
    return {b"table_meta_yaml": _astropy_yaml(tuple(columns)).encode()}


def object_schema(bands: Sequence[str], *, metadata: Mapping[bytes, bytes] | None = None) -> pa.Schema:
    """Arrow schema of the source catalog for ``bands``; its metadata: ``metadata`` and the units
    for astropy (:func:`astropy_meta`)."""
    columns = object_columns(bands)
    return pa.schema([c.field() for c in columns], metadata={**astropy_meta(columns), **dict(metadata or {})})


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


# ------------------------------------------------------------------------------------------------
# The README's table of columns and flag bits (generated here, so it cannot drift from the code)
# ------------------------------------------------------------------------------------------------
#: Title of the README section that :func:`readme_section` writes.
README_SECTION = "Catalog columns and flags"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def readme_section(bands: Sequence[str] = ("{band}",)) -> str:
    """The README section "Catalog columns and flags" (Markdown): every catalog column with its
    type, unit, origin (Rubin name or this project's) and description, then every flag bit.

    Returns
    -------
    str
        The section, from its ``## `` title to its last line (ends with a newline).
    """
    intro = ("Generated from `galgan_ray/schema.py` and `galgan_ray/flags.py` (`python -m galgan_ray.schema "
             "README.md` rewrites this section; a test checks it). The field job writes these columns to "
             "`OUTPUT/catalog/tile=*/part-0.parquet` and to the HATS catalog `OUTPUT/hats/` (which adds "
             "`_healpix_29`); `astropy.table.Table.read` shows the units. Every row is a deblended child, so "
             "Rubin's selection `detect_isPrimary & (deblend_nChild == 0)` works unchanged. *Rubin* names the "
             "Rubin table whose column of that name means the same (*DP1 pattern*: Rubin's spelling "
             "`{band}_<algorithm>Flux`, nJy, for this project's measurement); blank: this project's own column.")
    intro = textwrap.fill(intro, width=100, break_on_hyphens=False, break_long_words=False)
    lines = [f"## {README_SECTION}", "", intro, "",
             "| column | type | unit | Rubin | description |", "|---|---|---|---|---|"]
    for c in object_columns(bands) + (HEALPIX_COLUMN,):
        note = " (HATS copy only)" if c is HEALPIX_COLUMN else ""
        dtype = np.dtype(c.type.to_pandas_dtype()).name
        lines.append(f"| `{c.name}` | {dtype} | {c.unit} | {c.rubin} | {_cell(c.description)}{note} |")
    lines += ["", "Flag bits of the `flags` column (`galgan flags VALUE` decodes a value):", "",
              "| bit | value | name | meaning |", "|---|---|---|---|"]
    for f in FLAGS:
        lines.append(f"| {f.bit} | {f.value} | `{f.name}` | {_cell(f.description)} |")
    return "\n".join(lines) + "\n"


def update_readme(text: str) -> str:
    """``text`` (a README) with its section :data:`README_SECTION` replaced by :func:`readme_section`
    (appended when it has none). The section runs to the next ``## `` title."""
    title = f"## {README_SECTION}\n"
    start = text.find(title)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + readme_section()
    end = text.find("\n## ", start + len(title))
    rest = "" if end < 0 else text[end + 1:]
    return text[:start] + readme_section() + ("\n" + rest if rest else "")


if __name__ == "__main__":  # python -m galgan_ray.schema README.md
    import sys

    for path in sys.argv[1:]:
        with open(path, encoding="utf-8") as fh:
            old = fh.read()
        new = update_readme(old)
        if new != old:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(new)
        print(f"{path}: section '{README_SECTION}' {'rewritten' if new != old else 'up to date'}")
    if len(sys.argv) < 2:
        print(readme_section(), end="")
