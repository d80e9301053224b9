"""The catalog schema: units astropy reads, Rubin names, and the README table generated from it."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from galgan_ray.flags import FLAGS
from galgan_ray.schema import (
    README_SECTION,
    catalog_table,
    object_columns,
    object_schema,
    readme_section,
    update_readme,
    validate_table,
)
from galgan_ray.storage import StorageConfig, parquet_bytes, write_bytes_atomic

ROOT = Path(__file__).resolve().parents[1]


def _catalog(n: int = 3):
    cols = {c.name: np.zeros(n, dtype=c.type.to_pandas_dtype()) for c in object_columns(["i", "r"])}
    cols["i_gmmFlux"] = np.array([1.0, 2.0, 3.0])[:n]
    return catalog_table(cols, bands=("hsc/i", "hsc/r"), metadata={b"galgan_ray": b"{}"})


def test_astropy_reads_units_and_descriptions_of_a_written_catalog(tmp_path):
    from astropy.table import Table

    path = tmp_path / "part-0.parquet"
    write_bytes_atomic(str(path), parquet_bytes(_catalog()), StorageConfig())
    t = Table.read(path, format="parquet")
    assert t.colnames == [c.name for c in object_columns(["i", "r"])]
    for c in object_columns(["i", "r"]):
        assert (str(t[c.name].unit) if t[c.name].unit is not None else "") == c.unit, c.name
        assert t[c.name].description == c.description
    assert str(t["coord_ra"].unit) == "deg" and str(t["r_gmmFluxErr"].unit) == "nJy"
    assert t["i_gmmFlux"].quantity.to_value("uJy")[2] == 3.0e-3  # nJy, as astropy knows it
    # The metadata the catalog carries is kept beside the units; pyarrow readers see the same schema.
    validate_table(_catalog(), object_schema(["i", "r"]))
    assert b"galgan_ray" in _catalog().schema.metadata


def test_rubin_names_and_the_projects_own_columns_are_all_described():
    cols = {c.name: c for c in object_columns(["i"])}
    for name in ("objectId", "parentObjectId", "coord_ra", "coord_dec", "deblend_nChild", "deblend_skipped",
                 "deblend_failed", "detect_isPrimary"):
        assert cols[name].rubin, name
    for name in ("tileId", "significance", "deblend_nPeaks_low", "deblend_nPeaks_enhanced", "flags"):
        assert not cols[name].rubin and cols[name].description, name  # kept, documented as this project's
    assert cols["i_gmmFlux"].unit == cols["i_gmmFluxErr"].unit == "nJy"
    assert all(c.description for c in cols.values())


def test_readme_section_matches_the_schema_and_the_flags():
    """The README's "Catalog columns and flags" section is generated (python -m galgan_ray.schema README.md)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"## {README_SECTION}\n" in text, "README has no generated section; run python -m galgan_ray.schema README.md"
    assert update_readme(text) == text, ("README's section is out of date with schema.py / flags.py; run "
                                         "python -m galgan_ray.schema README.md")
    section = readme_section()
    for f in FLAGS:
        assert f"| {f.bit} | {f.value} | `{f.name}` |" in section
    for c in object_columns(["{band}"]):
        assert f"| `{c.name}` |" in section


def test_update_readme_replaces_only_its_section():
    text = "# t\n\n## A\n\na\n\n## Catalog columns and flags\n\nSTALE TEXT\n\n## B\n\nb\n"
    new = update_readme(text)
    assert new.startswith("# t\n\n## A\n\na\n\n## Catalog columns and flags\n") and new.endswith("\n## B\n\nb\n")
    assert "STALE TEXT" not in new and update_readme(new) == new
    assert update_readme("# t\n").endswith(readme_section())
