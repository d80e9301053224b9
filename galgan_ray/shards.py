"""Shards: batches of cutouts (and their tables) as Parquet or multi-extension FITS on any fsspec URL.

A batch is ``dict[str, np.ndarray]`` with one row per cutout. Array columns of any shape are stored
as Arrow ``fixed_size_list`` of the flattened row, with the row shape and dtype in the field
metadata, so that reading gives bit-identical arrays (and Ray Data reads the same files). The
producing config, package version and band definitions travel in the schema metadata under the
key ``galgan_ray``.
"""
from __future__ import annotations

import io
import json
import posixpath
from typing import Any, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.table import Table

from .errors import InputError

__all__ = ["batch_to_table", "table_to_batch", "write_shards", "read_shards", "iter_shards",
           "list_shards", "write_table", "read_table", "write_fits_shard", "read_fits_shard",
           "read_metadata", "write_atomic", "METADATA_KEY"]

METADATA_KEY = b"galgan_ray"


def _is_arraylike_column(values: np.ndarray) -> bool:
    return values.ndim > 1


def batch_to_table(batch: Mapping[str, np.ndarray], *, metadata: Mapping[str, Any] | None = None) -> pa.Table:
    """Arrow table of a batch; multi-dimensional columns become fixed-size lists with shape metadata."""
    n = None
    fields, arrays = [], []
    for name, values in batch.items():
        values = np.asarray(values)
        if n is None:
            n = len(values)
        elif len(values) != n:
            raise InputError(f"column {name!r}", f"has {len(values)} rows, expected {n}")
        if _is_arraylike_column(values):
            row_shape = values.shape[1:]
            flat = np.ascontiguousarray(values).reshape(len(values), -1)
            arr = pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), int(np.prod(row_shape)))
            meta = {b"shape": json.dumps(list(row_shape)).encode(), b"dtype": values.dtype.str.encode()}
            fields.append(pa.field(name, arr.type, metadata=meta))
        else:
            arr = pa.array(values)
            fields.append(pa.field(name, arr.type, metadata={b"dtype": values.dtype.str.encode()}))
        arrays.append(arr)
    schema_meta = {METADATA_KEY: json.dumps(dict(metadata or {}), sort_keys=True, default=str).encode()}
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=schema_meta))


def table_to_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """Inverse of :func:`batch_to_table`: numpy arrays with their original shapes and dtypes."""
    out: dict[str, np.ndarray] = {}
    for field in table.schema:
        col = table.column(field.name).combine_chunks()
        meta = field.metadata or {}
        dtype = np.dtype(meta[b"dtype"].decode()) if b"dtype" in meta else None
        if pa.types.is_fixed_size_list(field.type):
            shape = tuple(json.loads(meta[b"shape"])) if b"shape" in meta else (field.type.list_size,)
            flat = col.flatten().to_numpy(zero_copy_only=False)
            values = flat.reshape((len(col),) + shape)
        else:
            values = col.to_numpy(zero_copy_only=False)
        out[field.name] = values.astype(dtype, copy=False) if dtype is not None else values
    return out


def read_metadata(schema: pa.Schema) -> dict:
    """The ``galgan_ray`` metadata dict of a shard schema (empty when absent)."""
    raw = (schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def write_atomic(url: str, write, *, storage_options: Mapping | None = None) -> str:
    """Call ``write(file_handle)`` on ``url + ".tmp"``, then move it to ``url`` (atomic where the
    filesystem's move is; on object stores the object appears whole or not at all)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as fh:
        write(fh)
    fs.mv(tmp, path)
    return url


def write_table(table: pa.Table, url: str, *, storage_options: Mapping | None = None) -> str:
    """Write one Parquet file atomically where the filesystem allows (write ``.tmp``, then move)."""
    return write_atomic(url, lambda fh: pq.write_table(table, fh, compression="zstd"),
                        storage_options=storage_options)


def write_shards(batch: Mapping[str, np.ndarray], url: str, *, metadata: Mapping[str, Any] | None = None,
                 rows_per_shard: int = 1024, basename: str = "part",
                 storage_options: Mapping | None = None) -> list[str]:
    """Write a batch as Parquet shards ``{url}/{basename}-00000.parquet``, ... .

    Returns
    -------
    list of str
        The URLs written, in row order.
    """
    n = len(next(iter(batch.values()))) if batch else 0
    urls = []
    for k, start in enumerate(range(0, max(n, 1), rows_per_shard)):
        part = {key: np.asarray(v)[start:start + rows_per_shard] for key, v in batch.items()}
        table = batch_to_table(part, metadata=metadata)
        urls.append(write_table(table, _join(url, f"{basename}-{k:05d}.parquet"), storage_options=storage_options))
    return urls


def list_shards(url: str, *, storage_options: Mapping | None = None) -> list[str]:
    """Parquet files under ``url`` (a file, a directory or a glob), sorted, as full URLs."""
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ValueError as exc:  # e.g. "Protocol not known: nonexistentproto"
        raise InputError(url, f"unreadable URL: {exc}") from None
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if any(ch in path for ch in "*?["):
        paths = fs.glob(path)
    elif fs.isdir(path):
        paths = [p for p in fs.find(path) if p.endswith(".parquet")]
    elif fs.exists(path):
        paths = [path]
    else:
        raise InputError(url, "no such file or directory")
    if not paths:
        raise InputError(url, "holds no Parquet shards")
    return [prefix + p if prefix and not p.startswith(prefix) else p for p in sorted(paths)]


def read_table(url: str, *, storage_options: Mapping | None = None) -> pa.Table:
    """Read one Parquet file, naming the file in the error when it is truncated or not Parquet."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            return pq.read_table(fh)
    except FileNotFoundError as exc:
        raise InputError(url, "no such file") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(url, f"not a readable Parquet file (truncated or corrupt?): {exc}") from exc


def iter_shards(url: str, *, storage_options: Mapping | None = None) -> Iterator[tuple[dict, dict]]:
    """Yield ``(batch, metadata)`` shard by shard (streaming, one shard in memory at a time)."""
    for shard in list_shards(url, storage_options=storage_options):
        table = read_table(shard, storage_options=storage_options)
        yield table_to_batch(table), read_metadata(table.schema)


def read_shards(url: str, *, storage_options: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read every shard under ``url`` into one batch.

    Returns
    -------
    batch : dict of numpy.ndarray
        Columns concatenated over shards, bit-identical to what was written.
    metadata : dict
        The ``galgan_ray`` metadata of the first shard.
    """
    batches, meta = [], None
    for batch, m in iter_shards(url, storage_options=storage_options):
        batches.append(batch)
        meta = m if meta is None else meta
    keys = batches[0].keys()
    return {k: np.concatenate([b[k] for b in batches]) for k in keys}, meta or {}


def write_fits_shard(batch: Mapping[str, np.ndarray], url: str, *, metadata: Mapping[str, Any] | None = None,
                     storage_options: Mapping | None = None) -> str:
    """Write a batch as one multi-extension FITS file: an image HDU per array column (EXTNAME = column),
    and a binary table HDU ``TABLE`` with the scalar columns. Metadata goes in the primary header as JSON."""
    primary = fits.PrimaryHDU()
    primary.header["GGRMETA"] = "see HDU METADATA"
    hdus = [primary]
    scalars = {}
    for name, values in batch.items():
        values = np.asarray(values)
        if values.ndim > 1:
            hdus.append(fits.ImageHDU(values, name=name.upper()))
        else:
            scalars[name] = values
    if scalars:
        hdus.append(fits.BinTableHDU(Table(scalars), name="TABLE"))
    meta_text = json.dumps(dict(metadata or {}), sort_keys=True, default=str)
    hdus.append(fits.BinTableHDU(Table({"json": np.array([meta_text])}), name="METADATA"))
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as fh:
        fh.write(buf.getvalue())
    return url


def read_fits_shard(url: str, *, storage_options: Mapping | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of :func:`write_fits_shard` (array column names come back lower-case as written)."""
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            data = fh.read()
        hdul = fits.open(io.BytesIO(data))
    except FileNotFoundError as exc:
        raise InputError(url, "no such file") from exc
    except OSError as exc:
        raise InputError(url, f"not a readable FITS file ({exc})") from exc
    batch, meta = {}, {}
    with hdul:
        for hdu in hdul[1:]:
            if hdu.name == "METADATA":
                meta = json.loads(str(Table.read(hdu)["json"][0]))
            elif hdu.name == "TABLE":
                t = Table.read(hdu)
                for c in t.colnames:
                    batch[c] = np.asarray(t[c]).astype(t[c].dtype.newbyteorder("="))
            else:
                arr = np.asarray(hdu.data)
                batch[hdu.name.lower()] = arr.astype(arr.dtype.newbyteorder("="))
    return batch, meta
