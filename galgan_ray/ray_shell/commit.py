"""Commit: a tile's tables under deterministic names, then its ``_COMMITTED`` marker (exactly once).

Every file is written to a temporary name and moved; the marker is written last. A rerun lists
the markers first and reads only tiles without one (a failed tile has none, so it is retried); a
marker made with another config or model is an error unless ``overwrite``. The layout is
:mod:`galgan_ray.outputs`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import time
import traceback
from typing import Any, Mapping

import numpy as np

from ..config import config_json
from ..errors import InputError
from ..field import FieldConfig, unpack_output
from ..outputs import failure_url, marker_url, table_url
from ..schema import blends_table, catalog_table, failure_table, truth_table
from ..storage import StorageConfig, open_fs, parquet_bytes, scrub_url, write_bytes_atomic
from .rows import batch_rows, failure_reason

__all__ = ["commit_tiles", "CommitStage", "run_fingerprint", "read_markers"]

log = logging.getLogger(__name__)


def run_fingerprint(field: FieldConfig, model_id: Mapping[str, str]) -> str:
    """What must not change between a run and its resumption: science config and model."""
    text = config_json(field) + "|" + model_id["sha256"]
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_markers(output: str, storage: StorageConfig) -> dict[str, dict]:
    """Committed tiles: ``source -> marker`` (empty for a new output)."""
    fs, path = open_fs(output, storage)
    try:
        found = fs.glob(posixpath.join(path, "catalog", "tile=*", "_COMMITTED"))
    except FileNotFoundError:
        return {}
    markers = {}
    for p in sorted(found):
        with fs.open(p, "rb") as fh:
            m = json.loads(fh.read())
        markers[m["source"]] = m
    return markers


def commit_tiles(batch: dict[str, np.ndarray], *, output: str, storage: StorageConfig, metadata_json: str,
                 fingerprint: str) -> dict[str, np.ndarray]:
    """Write each tile's outputs under deterministic names, then its ``_COMMITTED`` marker.

    Failed rows (and tiles whose outputs cannot be written) go to ``OUT/failures/``.

    Returns
    -------
    dict of numpy.ndarray
        One summary row per tile: ``tileId``, ``source``, ``status`` (``done``/``failed``),
        ``stage``, ``reason``, ``stats`` (JSON text of counts and timings).
    """
    meta = {b"galgan_ray": metadata_json.encode()}
    out = {k: [] for k in ("tileId", "source", "status", "stage", "reason", "stats")}

    def fail(row, stage, reason):
        table = failure_table([{"tileId": row["tileId"], "source": scrub_url(row["source"]), "stage": stage,
                                "reason": reason}], metadata=meta)
        try:
            write_bytes_atomic(failure_url(output, row["source"]), parquet_bytes(table), storage)
        except Exception:  # noqa: BLE001 - still reported in the summary
            log.error("cannot write the failure of %s:\n%s", row["source"], traceback.format_exc())
        return "failed", stage, reason, "{}"

    for row in batch_rows(batch):
        if row["status"] != "ok":
            status, stage, reason, stats = fail(row, row["stage"], row["reason"])
        else:
            try:
                status, stage, reason, stats = _commit_one(row, output=output, storage=storage, meta=meta,
                                                           fingerprint=fingerprint)
            except Exception as exc:  # noqa: BLE001
                log.warning("commit failed on %s:\n%s", row["source"], traceback.format_exc())
                status, stage, reason, stats = fail(row, "commit", failure_reason(exc, row["source"]))
        for k, v in zip(("tileId", "source", "status", "stage", "reason", "stats"),
                        (row["tileId"], row["source"], status, stage, reason, stats)):
            out[k].append(v)
    return {"tileId": np.asarray(out["tileId"], dtype=np.int64),
            **{k: np.asarray(out[k], dtype=object) for k in ("source", "status", "stage", "reason", "stats")}}


def _commit_one(row: Mapping[str, Any], *, output: str, storage: StorageConfig, meta: dict, fingerprint: str):
    result = unpack_output(row["payload"])
    tid = row["tileId"]
    fs, marker_path = open_fs(marker_url(output, tid), storage)
    if fs.exists(marker_path):
        with fs.open(marker_path, "rb") as fh:
            other = json.loads(fh.read())
        if other.get("source") != row["source"]:
            raise InputError(row["source"], f"TILEID {tid} is also used by {other.get('source')}; tile "
                                            f"ids must be unique in a field")
    tables = {"catalog": catalog_table(result.catalog.columns, bands=result.bands, metadata=meta)}
    if result.truth is not None:
        tables["truth"] = truth_table(result.truth.truth, metadata=meta)
        tables["blends"] = blends_table(result.truth.blends, metadata=meta)
    for name, table in tables.items():
        write_bytes_atomic(table_url(output, name, tid), parquet_bytes(table), storage)
    ffs, fpath = open_fs(failure_url(output, row["source"]), storage)
    if ffs.exists(fpath):  # an earlier failure of this source is superseded
        ffs.rm(fpath)
    stats = result.stats.to_dict()
    stats.update({k: result.info.get(k) for k in ("timing", "mode", "rho", "enhance_device")})
    if result.truth is not None:
        stats["truth"] = result.truth.counts()
    marker = {"tileId": tid, "source": row["source"], "fingerprint": fingerprint, "stats": stats,
              "committed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_bytes_atomic(marker_url(output, tid), json.dumps(marker, sort_keys=True).encode(), storage)
    return "done", "commit", "", json.dumps(stats, sort_keys=True)


class CommitStage:
    """The commit step as a warm actor: :func:`commit_tiles` on each batch.

    A commit is light (a few small Parquet files and a marker per tile), but the process that runs
    it imports the catalog writers (and with them numpy, pyarrow and fsspec): as Ray tasks,
    commits started worker processes that each paid that import, several at once on a small node.
    One actor, started with the other stages, pays it once. Atomicity does not depend on the
    process: files are moved into place and the marker is written last, so a commit retried after
    the actor died rewrites the same names.

    Parameters
    ----------
    output : str
        Output URL.
    storage : StorageConfig
    metadata_json : str
        Provenance stored in every Parquet file's metadata.
    fingerprint : str
        Science config and model fingerprint stored in each marker.
    """

    stage = "commit"

    def __init__(self, *, output: str, storage: StorageConfig, metadata_json: str, fingerprint: str):
        self.kwargs = dict(output=output, storage=storage, metadata_json=metadata_json, fingerprint=fingerprint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return commit_tiles(batch, **self.kwargs)
