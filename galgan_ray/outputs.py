"""A field run's outputs: their layout under ``OUT`` and the readers that aggregation jobs use.

::

    OUT/catalog/tile=000123/part-0.parquet   schema.object_schema, metadata: config, model, version
    OUT/catalog/tile=000123/_COMMITTED       JSON: source, counts, config fingerprint (commit point)
    OUT/truth/tile=000123/part-0.parquet     simulations: owned truth sources, matched at high/low/enhanced
    OUT/blends/tile=000123/part-0.parquet    simulations: truth pairs closer than blend_max_sep_arcsec
    OUT/failures/failure-<sha1(source)>.parquet   schema.failure_schema, one file per failed input
    OUT/hats/                                the committed catalog as a HATS catalog (hats_catalog.py)
    OUT/summary.json, OUT/config.yaml        the run summary and the resolved config
    OUT/_RUN.json                            the run that owns OUT: fingerprint, model; its lock while running
    OUT/input/                               the simulated tiles (when no input was given)

A tile's files count only once its ``_COMMITTED`` marker exists (files without one are a crashed
attempt); every reader here reads committed tiles only. A marker names the tile by its identity: its
``tileId`` and the SHA-256 of its file (``sha256``, with the ``#row=`` of a Parquet row), beside the
``source`` as it was spelt and its canonical ``url``. No Ray here: the jobs make Ray datasets of
:func:`run_files` with :func:`run_filesystem`.
"""
from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .storage import StorageConfig, join_url, open_fs

__all__ = ["TABLES", "tile_dir", "table_url", "marker_url", "failure_url", "hats_url", "run_url", "read_run_table",
           "run_files", "run_filesystem", "figures_dir"]

#: The per-tile tables of a run.
TABLES: tuple[str, ...] = ("catalog", "truth", "blends")


def tile_dir(tile_id: int) -> str:
    """The folder of a tile's files: ``tile=000123``."""
    return f"tile={int(tile_id):06d}"


def table_url(output: str, table: str, tile_id: int) -> str:
    """URL of one tile's part of table ``table``."""
    return join_url(output, table, tile_dir(tile_id), "part-0.parquet")


def marker_url(output: str, tile_id: int) -> str:
    """URL of a tile's commit marker."""
    return join_url(output, "catalog", tile_dir(tile_id), "_COMMITTED")


def failure_url(output: str, source: str) -> str:
    """URL of the failure file of one input (named by the SHA-1 of its source)."""
    return join_url(output, "failures", f"failure-{hashlib.sha1(source.encode()).hexdigest()[:16]}.parquet")


def hats_url(output: str) -> str:
    """URL of the run's HATS catalog (a folder)."""
    return join_url(output, "hats")


def run_url(output: str) -> str:
    """URL of the record of the run that owns ``output`` (``_RUN.json``)."""
    return join_url(output, "_RUN.json")


def _committed(fs, path: str) -> set[str]:
    return {posixpath.basename(posixpath.dirname(p))
            for p in fs.glob(posixpath.join(path, "catalog", "tile=*", "_COMMITTED"))}


def run_files(output: str, *, what: str = "catalog", storage: StorageConfig = StorageConfig()) -> list[str]:
    """Paths (without protocol) of a run's committed per-tile Parquet files of table ``what``."""
    fs, path = open_fs(output, storage)
    committed = _committed(fs, path)
    return sorted(p for p in fs.glob(posixpath.join(path, what, "tile=*", "part-0.parquet"))
                  if posixpath.basename(posixpath.dirname(p)) in committed)


def run_filesystem(output: str, *, storage: StorageConfig = StorageConfig()) -> pafs.FileSystem:
    """A pyarrow filesystem that reads :func:`run_files` (for ``ray.data.read_parquet``)."""
    fs, _ = open_fs(output, storage)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def read_run_table(output: str, *, what: str = "catalog", storage: StorageConfig = StorageConfig()) -> pa.Table:
    """Read one of a run's tables (``catalog``, ``truth``, ``blends``, ``failures``) into Arrow,
    committed tiles only for the per-tile tables; an empty table when the run has none."""
    fs, path = open_fs(output, storage)
    root = posixpath.join(path, what)
    if not fs.exists(root):
        return pa.table({})
    if what == "failures":
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    else:
        files = run_files(output, what=what, storage=storage)
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="none")


def figures_dir(run: str, figures: str | None = None) -> Path:
    """Where an aggregation job writes its PNGs: ``figures`` if given, else ``RUN/figures`` for a
    local run and ``./figures`` for a run on object storage (created)."""
    local = "://" not in run or run.startswith("file://")
    out = Path(figures or (Path(run.replace("file://", "")) / "figures" if local else "figures"))
    out.mkdir(parents=True, exist_ok=True)
    return out
