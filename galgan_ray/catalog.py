"""Mosaic catalogs: read any layout through a column mapping, apply the paper's cuts, split by Dec.

The default mapping reads the CANDELS GOODS-S catalog of Guo et al. (2013) as distributed
(``ID``, ``RA``, ``DEC``, ``CLASS_STAR``, ``ACS_F775W_FLUX`` ... ``WFC3_F160W_FLUX`` in microJansky,
-99 for "no data") together with the SExtractor sizes ``FWHM_IMAGE`` / ``FLUX_RADIUS`` (pixels of
0.06") and a redshift column ``ZBEST`` (the simulated catalogs of :mod:`galgan_ray.sky` use the
same names). Any other catalog is read by passing a :class:`CatalogColumns` with its names.

The canonical table has one row per object and the columns ``objectId`` (int64), ``ra``, ``dec``
(float64 deg), ``class_star``, ``redshift``, ``fwhm_arcsec``, ``flux_radius_arcsec`` (float64, NaN
where not mapped) and, per band, ``mag_<band>`` (AB, NaN for non-positive or missing fluxes) and
``flux_njy_<band>``.

Hemmati et al. (2022) kept GOODS-S galaxies with F160W < 25, CLASS_STAR < 0.95 and z < 5, and
split train and test by declination (:func:`select_galaxies`, :func:`split_by_dec`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
from astropy.io import fits
from astropy.table import Table

from .config import to_dict
from .errors import InputError
from .instrument import HST_BANDS, NJY_ZEROPOINT

__all__ = ["CatalogColumns", "SelectionConfig", "DecSplit", "read_catalog", "select_galaxies", "split_by_dec",
           "candels_flux_column", "CANDELS_FLUX_COLUMNS"]

_WFC3_BANDS = ("F098M", "F105W", "F110W", "F125W", "F140W", "F160W")


def candels_flux_column(band: str) -> str:
    """Flux column of ``band`` in the CANDELS (Guo et al. 2013) layout, e.g. ``ACS_F775W_FLUX``.

    The error column is the same name with ``ERR`` appended (``ACS_F775W_FLUXERR``).
    """
    instr = "WFC3" if band.upper() in _WFC3_BANDS else "ACS"
    return f"{instr}_{band.upper()}_FLUX"


CANDELS_FLUX_COLUMNS: dict[str, str] = {b: candels_flux_column(b) for b in HST_BANDS}


@dataclass(frozen=True)
class CatalogColumns:
    """Names and units of a catalog's columns (defaults: CANDELS GOODS-S, Guo et al. 2013).

    Attributes
    ----------
    id, ra, dec : str
        Required columns (RA/Dec in degrees).
    class_star, redshift, fwhm, flux_radius : str or None
        Optional columns; ``None`` means "not in this catalog" (filled with NaN). A named column
        that is missing from the file is an error.
    band_columns : dict of str -> str
        Band name -> photometry column (flux or magnitude, see ``flux_unit``).
    bands : tuple of str, optional
        Bands to read. ``None`` reads every band of ``band_columns`` present in the file (at least
        one must be); a listed band whose column is missing is an error.
    flux_unit : {"uJy", "nJy", "Jy", "mag"}
        Unit of the photometry columns; ``mag`` means AB magnitudes.
    flux_zeropoint_mag : float, optional
        When set, photometry columns are fluxes in units of this AB zero point (overrides
        ``flux_unit``; e.g. 25.0 for SExtractor fluxes on a ZP-25 image).
    missing_value : float
        Photometry sentinel for "no data" (-99 in CANDELS); values <= ``missing_value`` + 1 (for
        fluxes) or >= 90 (for magnitudes) become NaN.
    size_unit : {"pixel", "arcsec"}
        Unit of ``fwhm`` and ``flux_radius``.
    size_pixel_scale_arcsec : float
        Pixel scale of the image the sizes were measured on (CANDELS: 0.06"/px).
    """

    id: str = "ID"
    ra: str = "RA"
    dec: str = "DEC"
    class_star: str | None = "CLASS_STAR"
    redshift: str | None = "ZBEST"
    fwhm: str | None = "FWHM_IMAGE"
    flux_radius: str | None = "FLUX_RADIUS"
    band_columns: dict[str, str] = field(default_factory=lambda: dict(CANDELS_FLUX_COLUMNS))
    bands: tuple[str, ...] | None = None
    flux_unit: Literal["uJy", "nJy", "Jy", "mag"] = "uJy"
    flux_zeropoint_mag: float | None = None
    missing_value: float = -99.0
    size_unit: Literal["pixel", "arcsec"] = "pixel"
    size_pixel_scale_arcsec: float = 0.06


@dataclass(frozen=True)
class SelectionConfig:
    """The paper's galaxy selection (Hemmati et al. 2022, GOODS-S).

    Attributes
    ----------
    mag_band : str
        Band of the magnitude cut (F160W, the CANDELS detection band).
    fallback_band : str, optional
        Band used instead when ``mag_<mag_band>`` is not in the table (the simulated single-band
        sky has only F775W); ``None`` makes a missing ``mag_band`` an error. The band actually
        used is recorded in the returned table's meta.
    mag_max : float
        Keep ``mag < mag_max``.
    class_star_max : float
        Keep ``class_star < class_star_max`` (drop stars).
    redshift_max : float
        Keep ``redshift < redshift_max``.
    """

    mag_band: str = "F160W"
    fallback_band: str | None = "F775W"
    mag_max: float = 25.0
    class_star_max: float = 0.95
    redshift_max: float = 5.0


class DecSplit(NamedTuple):
    """Result of :func:`split_by_dec`: ``train``, ``test`` tables and the split declination."""

    train: Table
    test: Table
    dec_split_deg: float


def _find_column(table: Table, name: str) -> str | None:
    if name in table.colnames:
        return name
    lower = {c.lower(): c for c in table.colnames}
    return lower.get(name.lower())


def _read_table(path: Path) -> Table:
    suffixes = "".join(path.suffixes).lower()
    try:
        if any(suffixes.endswith(s) for s in (".fits", ".fit", ".fits.gz", ".fts")):
            return Table.read(path, format="fits", hdu=1) if _has_table_hdu(path) else Table.read(path)
        if suffixes.endswith(".csv"):
            return Table.read(path, format="ascii.csv")
        if suffixes.endswith((".parquet", ".pq")):
            return Table.read(path, format="parquet")
        return Table.read(path, format="ascii")  # SExtractor-style ".cat" headers, whitespace tables
    except FileNotFoundError:
        raise InputError(str(path), "catalog file not found") from None
    except InputError:
        raise
    except Exception as exc:  # astropy raises many types for unreadable files
        raise InputError(str(path), f"cannot read the catalog: {exc}") from exc


def _has_table_hdu(path: Path) -> bool:
    with fits.open(path) as hdul:
        return len(hdul) > 1 and isinstance(hdul[1], fits.BinTableHDU)


def read_catalog(path: str | Path, *, columns: CatalogColumns = CatalogColumns()) -> Table:
    """Read a mosaic catalog (FITS, CSV, Parquet or ASCII) into the canonical table.

    Parameters
    ----------
    path : str or Path
        The catalog file (a Guo et al. 2013 GOODS-S catalog as downloaded, a simulated
        ``sky_catalog.fits``, or any file described by ``columns``).
    columns : CatalogColumns
        Column names and units.

    Returns
    -------
    astropy.table.Table
        Columns ``objectId`` (int64), ``ra``, ``dec`` (deg), ``class_star``, ``redshift``,
        ``fwhm_arcsec``, ``flux_radius_arcsec`` (NaN where the column is not mapped), and per band
        ``mag_<band>`` (AB; NaN for missing or non-positive flux) and ``flux_njy_<band>``. Meta:
        ``source`` (the path), ``bands`` (tuple), ``columns`` (the mapping as a dict).

    Raises
    ------
    InputError
        The file cannot be read, or a mapped column is missing (the message names the file and
        the column).
    """
    path = Path(path)
    raw = _read_table(path)
    src = str(path)

    def need(name: str, what: str) -> np.ndarray:
        col = _find_column(raw, name)
        if col is None:
            raise InputError(src, f"missing column {name!r} ({what}); columns are: "
                                  f"{', '.join(raw.colnames[:40])}{' ...' if len(raw.colnames) > 40 else ''}")
        values = raw[col]
        if hasattr(values, "filled"):
            values = values.filled(np.nan) if values.dtype.kind == "f" else values.filled(0)
        return np.asarray(values)

    def optional(name: str | None, what: str) -> np.ndarray:
        if name is None:
            return np.full(len(raw), np.nan)
        return need(name, what).astype(np.float64)

    out = Table()
    ids = need(columns.id, "object id")
    try:
        out["objectId"] = ids.astype(np.int64)
    except (TypeError, ValueError):
        raise InputError(src, f"column {columns.id!r} (object id) is not an integer column") from None
    out["ra"] = need(columns.ra, "right ascension, deg").astype(np.float64)
    out["dec"] = need(columns.dec, "declination, deg").astype(np.float64)
    out["class_star"] = optional(columns.class_star, "SExtractor CLASS_STAR")
    out["redshift"] = optional(columns.redshift, "redshift")
    size_scale = columns.size_pixel_scale_arcsec if columns.size_unit == "pixel" else 1.0
    out["fwhm_arcsec"] = optional(columns.fwhm, "FWHM") * size_scale
    out["flux_radius_arcsec"] = optional(columns.flux_radius, "flux radius") * size_scale
    out["ra"].unit = out["dec"].unit = "deg"
    out["fwhm_arcsec"].unit = out["flux_radius_arcsec"].unit = "arcsec"

    if columns.bands is None:
        bands = tuple(b for b, c in columns.band_columns.items() if _find_column(raw, c) is not None)
        if not bands:
            raise InputError(src, "none of the photometry columns "
                                  f"{sorted(columns.band_columns.values())} is in the catalog")
    else:
        bands = tuple(columns.bands)
        unknown = [b for b in bands if b not in columns.band_columns]
        if unknown:
            raise InputError(src, f"bands {unknown} have no entry in CatalogColumns.band_columns")
    for band in bands:
        values = need(columns.band_columns[band], f"photometry of band {band}").astype(np.float64)
        mag, flux = _to_mag_flux(values, columns)
        out[f"mag_{band}"] = mag
        out[f"flux_njy_{band}"] = flux
        out[f"flux_njy_{band}"].unit = "nJy"
    out.meta["source"] = src
    out.meta["bands"] = bands
    out.meta["columns"] = to_dict(columns)
    return out


def _to_mag_flux(values: np.ndarray, columns: CatalogColumns) -> tuple[np.ndarray, np.ndarray]:
    if columns.flux_zeropoint_mag is None and columns.flux_unit == "mag":
        mag = np.where(np.isfinite(values) & (values < 90) & (values > columns.missing_value + 1), values, np.nan)
        return mag, 10.0 ** (-0.4 * (mag - NJY_ZEROPOINT))
    if columns.flux_zeropoint_mag is not None:
        to_njy = 10.0 ** (-0.4 * (columns.flux_zeropoint_mag - NJY_ZEROPOINT))
    else:
        to_njy = {"uJy": 1e3, "nJy": 1.0, "Jy": 1e9}[columns.flux_unit]
    flux = np.where(np.isfinite(values) & (values > columns.missing_value + 1), values * to_njy, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, NJY_ZEROPOINT - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    return mag, flux


def select_galaxies(table: Table, *, cuts: SelectionConfig = SelectionConfig()) -> tuple[Table, dict[str, int]]:
    """Apply the paper's cuts (mag < 25 in F160W, CLASS_STAR < 0.95, z < 5) in that order.

    Rows with a NaN magnitude or redshift fail the corresponding cut. A cut whose column is
    entirely NaN (not in the catalog) is skipped and said so in ``meta["selection_notes"]``.

    Parameters
    ----------
    table : astropy.table.Table
        A canonical table from :func:`read_catalog`.
    cuts : SelectionConfig

    Returns
    -------
    selected : astropy.table.Table
        The kept rows; meta gains ``selection_band`` (band of the magnitude cut),
        ``selection_notes`` (list of str) and ``selection_counts``.
    counts : dict of str -> int
        ``input``, ``removed_mag``, ``removed_class_star``, ``removed_redshift`` (each counted
        after the previous cuts) and ``kept``.
    """
    notes: list[str] = []
    band = cuts.mag_band
    if f"mag_{band}" not in table.colnames:
        if cuts.fallback_band is not None and f"mag_{cuts.fallback_band}" in table.colnames:
            notes.append(f"mag_{band} absent: magnitude cut applied to mag_{cuts.fallback_band} < {cuts.mag_max}")
            band = cuts.fallback_band
        else:
            raise InputError(str(table.meta.get("source", "catalog")),
                             f"no column mag_{band} (nor mag_{cuts.fallback_band}) for the magnitude cut")
    keep = np.ones(len(table), bool)
    counts = {"input": len(table)}

    def apply(name: str, ok: np.ndarray) -> None:
        nonlocal keep
        counts[f"removed_{name}"] = int(np.count_nonzero(keep & ~ok))
        keep &= ok

    with np.errstate(invalid="ignore"):
        apply("mag", np.asarray(table[f"mag_{band}"], float) < cuts.mag_max)
        for name, col, limit in (("class_star", "class_star", cuts.class_star_max),
                                 ("redshift", "redshift", cuts.redshift_max)):
            values = np.asarray(table[col], float) if col in table.colnames else np.full(len(table), np.nan)
            if np.all(np.isnan(values)):
                notes.append(f"{col} not in the catalog: cut {col} < {limit} skipped")
                counts[f"removed_{name}"] = 0
            else:
                apply(name, values < limit)
    counts["kept"] = int(np.count_nonzero(keep))
    out = table[keep]
    out.meta = dict(table.meta)
    out.meta["selection_band"] = band
    out.meta["selection_notes"] = notes
    out.meta["selection_counts"] = dict(counts)
    return out, counts


def split_by_dec(table: Table, *, dec_split_deg: float | None = None, test_fraction: float = 0.2) -> DecSplit:
    """Split a catalog into train and test sets by declination (Hemmati et al. 2022, GOODS-S).

    Parameters
    ----------
    table : astropy.table.Table
        Needs a ``dec`` column (deg).
    dec_split_deg : float, optional
        Rows with ``dec < dec_split_deg`` are the test set. By default the ``test_fraction``
        quantile of the declinations (the southernmost ~20% is the test set).
    test_fraction : float
        Used only when ``dec_split_deg`` is None.

    Returns
    -------
    DecSplit
        ``train`` (dec >= split), ``test`` (dec < split), ``dec_split_deg``. Both tables' meta
        record ``dec_split_deg`` and ``split`` ("train"/"test"). Every row is in exactly one.
    """
    if "dec" not in table.colnames:
        raise InputError(str(table.meta.get("source", "catalog")), "no 'dec' column to split on")
    dec = np.asarray(table["dec"], float)
    if dec_split_deg is None:
        if not 0.0 < test_fraction < 1.0:
            raise InputError("split_by_dec", f"test_fraction must be in (0, 1), got {test_fraction}")
        if len(dec) == 0:
            raise InputError(str(table.meta.get("source", "catalog")), "empty catalog: nothing to split")
        dec_split_deg = float(np.quantile(dec, test_fraction))
    is_test = dec < dec_split_deg
    train, test = table[~is_test], table[is_test]
    for part, name in ((train, "train"), (test, "test")):
        part.meta = dict(table.meta)
        part.meta["dec_split_deg"] = float(dec_split_deg)
        part.meta["split"] = name
    return DecSplit(train, test, float(dec_split_deg))
