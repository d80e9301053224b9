"""The HATS copy of a run's catalog: partitions, metadata, and LSDB opening it with every row."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from galgan_ray.hats_catalog import partition_pixels, write_hats_catalog
from galgan_ray.outputs import marker_url, read_run_table, table_url
from galgan_ray.schema import HEALPIX_COLUMN, catalog_table, object_columns
from galgan_ray.storage import StorageConfig, parquet_bytes, write_bytes_atomic

pytest.importorskip("hats", reason="the HATS writer needs the hats package (a dependency of galgan-ray)")


def _fake_run(out: str, *, n_per_tile=(40, 25, 0), ra0=150.1, dec0=2.2, seed=1) -> int:
    """A run's committed catalog tiles (as the commit writes them) with random positions."""
    rng = np.random.default_rng(seed)
    total = 0
    for tid, n in enumerate(n_per_tile):
        cols = {}
        for c in object_columns(["i"]):
            dtype = c.type.to_pandas_dtype()
            cols[c.name] = rng.normal(size=n).astype(dtype) if np.dtype(dtype).kind == "f" else np.zeros(n, dtype)
        cols["objectId"] = (np.int64(tid) << 24) | np.arange(n, dtype=np.int64)
        cols["tileId"] = np.full(n, tid, np.int64)
        cols["coord_ra"] = ra0 + tid * 0.01 + rng.uniform(-0.005, 0.005, n)
        cols["coord_dec"] = dec0 + rng.uniform(-0.005, 0.005, n)
        meta = {b"galgan_ray": json.dumps({"fingerprint": "abc"}).encode()}
        write_bytes_atomic(table_url(out, "catalog", tid), parquet_bytes(catalog_table(cols, bands=("i",),
                                                                                       metadata=meta)),
                           StorageConfig())
        write_bytes_atomic(marker_url(out, tid), b"{}", StorageConfig())
        total += n
    return total


def test_partitions_are_the_largest_pixels_under_the_row_limit():
    # 10 rows in order-29 pixel 5 (inside order-0 pixel 0) and 3 in order-0 pixel 3.
    h = np.array([5] * 10 + [(3 << 58) + 7] * 3, dtype=np.int64)
    order, pixel = partition_pixels(h, highest_order=10, max_rows=100)
    assert set(order) == {0} and set(pixel[:10]) == {0} and set(pixel[10:]) == {3}
    order, pixel = partition_pixels(h, highest_order=6, max_rows=5)
    assert set(order[:10]) == {6}  # never split past highest_order, whatever it holds
    assert set(order[10:]) == {0}  # 3 rows fit in their order-0 pixel
    np.testing.assert_array_equal(pixel[:10], h[:10] >> (2 * (29 - 6)))


def test_hats_catalog_has_every_committed_row_and_lsdb_opens_it(tmp_path):
    out = str(tmp_path / "run")
    n = _fake_run(out)
    info = write_hats_catalog(out, max_rows=30, highest_order=16)  # small partitions: several orders
    assert info["rows"] == n == read_run_table(out).num_rows and info["partitions"] >= 2
    root = tmp_path / "run" / "hats"
    assert (root / "hats.properties").exists() and (root / "partition_info.csv").exists()
    assert (root / "dataset" / "_metadata").exists()
    parts = sorted((root / "dataset").glob("Norder=*/Dir=*/Npix=*.parquet"))
    tables = [pq.read_table(p) for p in parts]
    assert sum(t.num_rows for t in tables) == n and all(t.num_rows <= 30 for t in tables)
    for p, t in zip(parts, tables):  # rows sorted by the spatial index and inside their pixel
        h = t.column(HEALPIX_COLUMN.name).to_numpy()
        order = int(p.parts[-3].split("=")[1])
        assert np.all(np.diff(h) >= 0) and set(h >> (2 * (29 - order))) == {int(p.stem.split("=")[1])}
    # Units survive into the HATS copy.
    from astropy.table import Table

    t = Table.read(parts[0], format="parquet")
    assert str(t["coord_ra"].unit) == "deg" and str(t["i_gmmFlux"].unit) == "nJy"
    # A rebuild replaces the old one (no partitions of the first build are left).
    info2 = write_hats_catalog(out)
    assert info2["partitions"] == 1 and len(list((root / "dataset").glob("Norder=*/Dir=*/*.parquet"))) == 1

    lsdb = pytest.importorskip("lsdb", reason="lsdb (test extra) is needed to open the HATS catalog as users do")
    cat = lsdb.read_hats(str(root))
    assert cat.hc_structure.catalog_info.total_rows == n
    df = cat.compute()
    assert len(df) == n
    assert sorted(df["objectId"]) == sorted(read_run_table(out).column("objectId").to_pylist())


def test_no_rows_no_hats_catalog(tmp_path):
    out = str(tmp_path / "run")
    _fake_run(out, n_per_tile=(0,))
    assert write_hats_catalog(out) is None and not (tmp_path / "run" / "hats").exists()
