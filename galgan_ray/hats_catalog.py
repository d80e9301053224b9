"""A field run's catalog as a HATS catalog: HEALPix-partitioned Parquet that LSDB opens (``lsdb.read_hats``).

The field job writes its catalog per tile (:mod:`galgan_ray.outputs`); survey users join catalogs
by sky position, partitioned by HEALPix. :func:`write_hats_catalog` copies the committed rows of a
run into ``OUT/hats/`` in the HATS layout (the IVOA note on HATS; the layout and metadata files
are written with the ``hats`` library)::

    OUT/hats/hats.properties, properties     catalog name and type, columns of RA/Dec, row count
    OUT/hats/partition_info.csv              the partitions (Norder, Npix)
    OUT/hats/dataset/Norder=k/Dir=d/Npix=n.parquet   the rows in HEALPix pixel (k, n), sorted by _healpix_29
    OUT/hats/dataset/_metadata, _common_metadata     the Parquet dataset's schema and row groups

Each partition is the largest HEALPix pixel (order 0 to ``highest_order``) holding at most
``max_rows`` rows: the adaptive tiling of HATS, computed on the occupied pixels only. Every row
gains ``_healpix_29`` (:data:`galgan_ray.schema.HEALPIX_COLUMN`), the HATS spatial index; the other
columns, types and units are the catalog's (:func:`galgan_ray.schema.object_schema`). Memory: one
pass over the committed files reads RA/Dec only; then each partition is built from the files that
touch it, so at most one partition's rows are held at once.

The catalog is rebuilt whole from the committed tiles (a rerun that adds tiles rewrites it); its
``hats.properties`` is written last, so a folder without one is a crashed build.
"""
from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .outputs import hats_url, run_files
from .schema import HEALPIX_COLUMN, Column, astropy_meta
from .storage import StorageConfig, join_url, open_fs, parquet_bytes, write_bytes_atomic

__all__ = ["CATALOG_NAME", "write_hats_catalog", "partition_pixels"]

#: ``obs_collection`` of the HATS catalog.
CATALOG_NAME = "galgan_objects"
_ORDER29 = 29


def partition_pixels(healpix_29: np.ndarray, *, highest_order: int = 10,
                     max_rows: int = 1_000_000) -> tuple[np.ndarray, np.ndarray]:
    """The HATS partition of each row: the lowest-order HEALPix pixel that holds it and at most
    ``max_rows`` rows (at ``highest_order`` a pixel is kept whatever it holds).

    Parameters
    ----------
    healpix_29 : numpy.ndarray
        int64, the rows' nested HEALPix pixels at order 29.
    highest_order : int
        The smallest partitions allowed.
    max_rows : int
        Rows per partition.

    Returns
    -------
    order, pixel : numpy.ndarray
        int64 per row: the partition's order and nested pixel number at that order.
    """
    h = np.asarray(healpix_29, dtype=np.int64)
    order = np.full(len(h), -1, dtype=np.int64)
    pixel = np.zeros(len(h), dtype=np.int64)
    for k in range(highest_order + 1):
        todo = np.flatnonzero(order < 0)
        if not len(todo):
            break
        pix_k = h[todo] >> (2 * (_ORDER29 - k))
        uniq, inv, counts = np.unique(pix_k, return_inverse=True, return_counts=True)
        small = (counts <= max_rows) if k < highest_order else np.ones(len(uniq), bool)
        take = small[inv]
        order[todo[take]] = k
        pixel[todo[take]] = pix_k[take]
    return order, pixel


def write_hats_catalog(output: str, *, storage: StorageConfig = StorageConfig(), highest_order: int = 10,
                       max_rows: int = 1_000_000, files: Sequence[str] | None = None) -> dict | None:
    """Write the committed catalog of the run at ``output`` as a HATS catalog in ``OUT/hats/``.

    Parameters
    ----------
    output : str
        The run's output URL.
    storage : StorageConfig
    highest_order, max_rows
        The partitioning (:func:`partition_pixels`).
    files : sequence of str, optional
        Catalog files to take (paths on the output's filesystem); default: the committed tiles
        (:func:`galgan_ray.outputs.run_files`).

    Returns
    -------
    dict or None
        ``url`` (the catalog folder), ``rows``, ``partitions`` (number of HEALPix partitions) and
        ``max_order``; None when the run has no committed rows (nothing is written then, and an
        earlier HATS folder is removed).
    """
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io import file_io, write_parquet_metadata
    from hats.pixel_math import HealpixPixel
    from hats.pixel_math.spatial_index import compute_spatial_index

    url = hats_url(output)
    fs, _ = open_fs(output, storage)
    files = list(run_files(output, what="catalog", storage=storage) if files is None else files)
    _, hats_path = open_fs(url, storage)
    if fs.exists(hats_path):  # rebuilt whole: partitions of an earlier build would mix in
        fs.rm(hats_path, recursive=True)

    # 1. RA/Dec of every file -> the spatial index, and which partitions each file touches.
    index, schema, metadata = [], None, {}
    for p in files:
        with fs.open(p, "rb") as fh:
            pf = pq.ParquetFile(fh)
            if schema is None:
                schema, metadata = pf.schema_arrow, dict(pf.schema_arrow.metadata or {})
            t = pf.read(columns=["coord_ra", "coord_dec"])
        index.append(compute_spatial_index(t.column("coord_ra").to_numpy(), t.column("coord_dec").to_numpy())
                     .astype(np.int64))
    n_rows = int(sum(len(i) for i in index))
    if schema is None or n_rows == 0:
        return None
    order, pixel = partition_pixels(np.concatenate(index), highest_order=highest_order, max_rows=max_rows)
    pairs, part_of_row = np.unique(np.stack([order, pixel], axis=1), axis=0, return_inverse=True)
    part_of_row = part_of_row.reshape(-1)
    bounds = np.cumsum([0] + [len(i) for i in index])
    parts = [HealpixPixel(int(o), int(q)) for o, q in pairs]

    # 2. Each partition from the files that touch it, sorted by the spatial index; the schema is the
    #    catalog's with _healpix_29 added (units for astropy rewritten to match).
    fields = list(schema) + [HEALPIX_COLUMN.field()]
    described = [Column(f.name, f.type, (f.metadata or {}).get(b"unit", b"").decode(),
                        (f.metadata or {}).get(b"description", b"").decode()) for f in fields]
    out_schema = pa.schema(fields, metadata={**metadata, **astropy_meta(described)})
    counts = []
    for j, part in enumerate(parts):
        pieces = []
        for i, p in enumerate(files):
            rows = np.flatnonzero(part_of_row[bounds[i]:bounds[i + 1]] == j)
            if not len(rows):
                continue
            with fs.open(p, "rb") as fh:
                t = pq.read_table(fh).take(pa.array(rows))
            t = t.append_column(HEALPIX_COLUMN.field(), pa.array(index[i][rows], pa.int64()))
            pieces.append(t.select(out_schema.names).cast(out_schema))
        table = pa.concat_tables(pieces).sort_by(HEALPIX_COLUMN.name).replace_schema_metadata(out_schema.metadata)
        counts.append(table.num_rows)
        write_bytes_atomic(join_url(url, "dataset", f"Norder={part.order}", f"Dir={part.dir}",
                                   f"Npix={part.pixel}.parquet"), parquet_bytes(table), storage)

    # 3. The HATS metadata: Parquet _metadata/_common_metadata, partition_info.csv, then the properties.
    options = storage.options_for(url)
    if url.startswith(("s3://", "s3a://")):
        # hats assumes a public bucket unless told, and reads in 32 kB blocks (S3 writes need >= 5 MB)
        options = {"anon": False, "default_block_size": 5 * 2**20, **options}
    root = file_io.get_upath(url, **options)
    write_parquet_metadata(root, create_metadata=True)
    PartitionInfo.from_healpix(parts).write_to_file(root / "partition_info.csv")
    provenance = json.loads(metadata.get(b"galgan_ray", b"{}") or b"{}")
    props = TableProperties(
        catalog_name=CATALOG_NAME, catalog_type="object", total_rows=n_rows, ra_column="coord_ra",
        dec_column="coord_dec", healpix_column=HEALPIX_COLUMN.name, healpix_order=_ORDER29,
        hats_max_rows=int(max(counts)), hats_order=max(p.order for p in parts),
        obs_description="galgan-ray field catalog: GAN-enhanced deblending (Hemmati et al. 2022); columns: "
                        "galgan_ray.schema",
        galgan_fingerprint=str(provenance.get("fingerprint", "")),
        **TableProperties.new_provenance_dict(root, builder=f"galgan-ray {__version__}"))
    props.to_properties_file(root)
    return {"url": url, "rows": n_rows, "partitions": len(parts), "max_order": max(p.order for p in parts)}
