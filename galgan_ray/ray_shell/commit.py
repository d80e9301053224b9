"""Commit: a tile's tables under deterministic names, then its ``_COMMITTED`` marker (exactly once);
and the rules that keep one output to one run.

Every file is written to a temporary name and moved; the marker is written last. A marker names the
tile by its identity, its ``tileId`` and the SHA-256 of its file (:func:`source_identity`), not by
how its path was spelt. A rerun (:func:`plan_tiles`) skips the sources whose content is committed
(named by a relative or an absolute path, or copied elsewhere), processes the others (a failed tile
has no marker, so it is retried) and refuses, as a failure row, a different file under the name of
a committed one. One output holds one run (:func:`claim_output`): ``OUT/_RUN.json`` records the
run's fingerprint (science config and model) and, while it runs, serves as its lock; a run with
another fingerprint, or any run while a live one holds the output, is refused unless ``overwrite``
(which clears the earlier run's tables first). The layout is :mod:`galgan_ray.outputs`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import socket
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np

from ..config import config_json
from ..errors import ConfigError, InputError
from ..field import FieldConfig, unpack_output
from ..outputs import TABLES, failure_url, hats_url, marker_url, run_url, table_url
from ..schema import blends_table, catalog_table, failure_table, object_columns, truth_table
from ..storage import StorageConfig, open_fs, parquet_bytes, scrub_url, write_bytes_atomic
from ..tiles import PATCH_TAG, parse_patch_source
from .rows import batch_rows, failure_reason, make_row, rows_to_batch

__all__ = ["commit_tiles", "CommitStage", "run_fingerprint", "read_markers", "source_url", "source_identity",
           "TilePlan", "plan_tiles", "commit_refused", "RunClaim", "claim_output", "release_output"]

log = logging.getLogger(__name__)


def run_fingerprint(field: FieldConfig, model_id: Mapping[str, str], *, precision: str = "fp32") -> str:
    """What must not change between a run and its resumption: science config, model (and the
    arithmetic it runs in, when not fp32) and the catalog's columns (a tile written before a column
    was added does not mix with newer ones)."""
    columns = ",".join(c.name for c in object_columns(("{band}",)))
    text = config_json(field) + "|" + model_id["sha256"] + ("" if precision == "fp32" else f"/{precision}") + "|" + columns
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_markers(output: str, storage: StorageConfig) -> list[dict]:
    """The markers of the committed tiles, by tile (empty for a new output)."""
    fs, path = open_fs(output, storage)
    try:
        found = fs.glob(posixpath.join(path, "catalog", "tile=*", "_COMMITTED"))
    except FileNotFoundError:
        return []
    markers = []
    for p in sorted(found):
        with fs.open(p, "rb") as fh:
            markers.append(json.loads(fh.read()))
    return markers


# ------------------------------------------------------------------------------------------------
# A tile's identity: its file's content, not its path's spelling
# ------------------------------------------------------------------------------------------------
_ROW = "#row="


def source_url(source: str, storage: StorageConfig = StorageConfig()) -> str:
    """The canonical spelling of a tile source: ``protocol://path``, or for a local file its absolute
    path with symbolic links resolved, keeping a Parquet row's ``#row=i``."""
    if PATCH_TAG in str(source):  # a survey patch (tiles.patch_source) names its files by full URLs already
        return str(source)
    base, sep, row = str(source).partition(_ROW)
    try:
        fs, path = fsspec.core.url_to_fs(base, **storage.options_for(base))
    except Exception:  # noqa: BLE001 - an unknown protocol: kept as spelt (it fails when read)
        return str(source)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    canonical = os.path.realpath(path) if protocol in ("file", "local") else f"{protocol}://{path}"
    return canonical + sep + row


def source_identity(source: str, storage: StorageConfig = StorageConfig()) -> dict[str, Any]:
    """A tile source's identity: ``url`` (:func:`source_url`), ``sha256`` and ``size`` of its file
    (read in chunks), ``row`` (a Parquet row's index, else None).

    Raises
    ------
    InputError
        Naming ``source`` when its file cannot be read.
    """
    if PATCH_TAG in str(source):  # a survey patch: the identity of all its files, band by band
        parts = [source_identity(u, storage) for _, pair in sorted(parse_patch_source(str(source))[1].items())
                 for u in pair if u]
        return {"url": str(source), "sha256": hashlib.sha256("".join(p["sha256"] for p in parts).encode()).hexdigest(),
                "size": sum(p["size"] for p in parts), "row": None}
    base, _, row = str(source).partition(_ROW)
    digest, size = hashlib.sha256(), 0
    try:
        with fsspec.open(base, "rb", **storage.options_for(base)) as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
                size += len(chunk)
    except Exception as exc:  # noqa: BLE001 - missing file, network, protocol
        raise InputError(source, f"cannot be read to hash it: {type(exc).__name__}: {exc}") from None
    return {"url": source_url(source, storage), "sha256": digest.hexdigest(), "size": size,
            "row": int(row) if row else None}


def _same_file(marker: Mapping[str, Any], identity: Mapping[str, Any], storage: StorageConfig) -> bool:
    if marker.get("sha256"):
        return (marker["sha256"], marker.get("row")) == (identity["sha256"], identity["row"])
    # A marker of an earlier version (no hash): recognised by its canonical name.
    return source_url(marker["source"], storage) == identity["url"]


@dataclass(frozen=True)
class TilePlan:
    """What a run does with each of its sources (:func:`plan_tiles`).

    Attributes
    ----------
    todo : list of str
        Sources to process (one per canonical name).
    skipped : list of dict
        Markers of the committed tiles among the sources (each once).
    refused : list of dict
        Failure rows (:data:`~galgan_ray.ray_shell.rows.ROW_COLUMNS`, stage ``plan``) of sources
        that are a different file under the name of a committed tile.
    """

    todo: list[str]
    skipped: list[dict]
    refused: list[dict]

    @property
    def n_sources(self) -> int:
        return len(self.todo) + len(self.skipped) + len(self.refused)


def plan_tiles(sources: Sequence[str], markers: Sequence[Mapping[str, Any]], *,
               storage: StorageConfig = StorageConfig(), max_workers: int = 8) -> TilePlan:
    """Split a run's sources by identity against the committed tiles' markers.

    A source whose file content (SHA-256, and Parquet row) a marker records is skipped, however its
    path is spelt; a source named like a committed tile but with other content is refused (a
    failure row naming the file: its tile would replace a committed one made from another file);
    the others are processed. Hashing reads each source once, on ``max_workers`` threads, and only
    when the output has committed tiles; an unreadable source is processed (the read stage turns it
    into a failure row that names the problem).

    Returns
    -------
    TilePlan
    """
    by_url: dict[str, str] = {}
    for s in sources:
        by_url.setdefault(source_url(s, storage), s)
    if not markers:
        return TilePlan(todo=list(by_url.values()), skipped=[], refused=[])

    def file_identity(base):
        try:
            return source_identity(base, storage)
        except InputError:
            return None

    bases = sorted({s.partition(_ROW)[0] for s in by_url.values()})  # a Parquet file of tiles is hashed once
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(bases)))) as pool:
        of_base = dict(zip(bases, pool.map(file_identity, bases)))
    identities = []
    for url, source in by_url.items():
        base, _, row = source.partition(_ROW)
        ident = of_base[base]
        identities.append(None if ident is None else {**ident, "url": url, "row": int(row) if row else None})
    by_key = {(m["sha256"], m.get("row")): m for m in markers if m.get("sha256")}
    by_name = {m.get("url") or source_url(m["source"], storage): m for m in markers}
    todo, skipped, refused, seen = [], [], [], set()
    for (url, source), ident in zip(by_url.items(), identities):
        named = by_name.get(url)
        match = None if ident is None else by_key.get((ident["sha256"], ident["row"]))
        if match is None and named is not None and ident is not None and not named.get("sha256"):
            match = named if _same_file(named, ident, storage) else None
        if match is not None:
            if match["tileId"] not in seen:
                seen.add(match["tileId"])
                skipped.append(match)
        elif named is not None and ident is not None:
            reason = (f"{source}: differs from the file committed as tile {named['tileId']} under this name "
                      f"(sha256 {ident['sha256'][:12]}, committed {str(named.get('sha256'))[:12]}); its tile "
                      f"would replace one made from another file: use a new output, or set overwrite=true")
            refused.append(make_row(named["tileId"], source, "failed", "plan", reason, b""))
        else:
            todo.append(source)
    return TilePlan(todo=todo, skipped=skipped, refused=refused)


# ------------------------------------------------------------------------------------------------
# One output, one run: OUT/_RUN.json
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunClaim:
    """This run's hold on an output (:func:`claim_output`): the output and the record written."""

    output: str
    record: dict


def _utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (Linux ``/proc``; None elsewhere or when it is gone): with
    the pid it names one process, so a stale record whose pid was reused is not taken for alive."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        return stat[stat.rindex(")") + 2:].split()[19]
    except (OSError, ValueError, IndexError):
        return None


def _alive(record: Mapping[str, Any]) -> bool | None:
    """Whether the run of ``record`` still runs: True/False on this host, None (unknown) elsewhere."""
    if record.get("finished_utc"):
        return False
    if record.get("host") != socket.gethostname():
        return None
    pid = int(record.get("pid", -1))
    if pid == os.getpid():  # an earlier run of this process, which ended without its release
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OSError, ValueError):
        return False
    start = _process_start(pid)
    return start is None or record.get("pid_start") in (None, start)


def _read_record(fs, path: str, output: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as fh:
        data = fh.read()
    try:
        return json.loads(data)
    except ValueError:
        raise ConfigError(output, f"its run record {posixpath.basename(path)} is unreadable (being written by "
                                  f"another run, or damaged); retry, or remove it if no run writes there") from None


def claim_output(output: str, *, fingerprint: str, model_id: Mapping[str, str], overwrite: bool = False,
                 storage: StorageConfig = StorageConfig(), markers: Sequence[Mapping[str, Any]] = ()) -> RunClaim:
    """Take ``output`` for this run, or refuse it.

    Refused (:class:`ConfigError` naming the output, one line): while another live run on this
    host holds it, whatever ``overwrite``; when the run recorded there (finished, running on another
    host, or dead without finishing) has another fingerprint, unless ``overwrite``. A record of the
    same fingerprint is taken over (a rerun resumes; a record left by a killed run is stale). With
    ``overwrite`` the earlier run's tables, HATS catalog and summary are removed first, so the output
    describes this run alone. An output without a record (written before records existed) is
    judged by its tiles' ``markers``.

    Returns
    -------
    RunClaim
        To hand to :func:`release_output` when the run ends.
    """
    fs, path = open_fs(run_url(output), storage)
    other = _read_record(fs, path, output)
    if other is not None:
        alive = _alive(other)
        who = (f"finished {other['finished_utc']}" if other.get("finished_utc") else
               f"pid {other.get('pid')} on {other.get('host')}, started {other.get('started_utc')}")
        who += f", fingerprint {other.get('fingerprint')}"
        if alive:
            raise ConfigError(output, f"is being written by another run ({who}); wait for it to end, or use "
                                      f"another output")
        if other.get("fingerprint") != fingerprint and not overwrite:
            state = ("was written" if other.get("finished_utc") else
                     "is being written (or was, by a run that did not finish)" if alive is None else
                     "was being written (the run did not finish)")
            raise ConfigError(output, f"{state} by a run with another config or model ({who}, model "
                                      f"{str(other.get('model', {}).get('sha256'))[:12]}; this run: fingerprint "
                                      f"{fingerprint}, model {model_id['sha256'][:12]}); use a new output or set "
                                      f"overwrite=true")
        if alive is None:
            log.warning("%s: taking over from a run on another host (%s)", output, who)
    elif not overwrite:
        stale = sorted(m["source"] for m in markers if m.get("fingerprint") != fingerprint)
        if stale:
            raise ConfigError(output, f"holds {len(stale)} committed tile(s) (e.g. {stale[0]}) made with another "
                                      f"config or model; use a new output or set overwrite=true")
    record = {"fingerprint": fingerprint, "model": dict(model_id), "token": uuid.uuid4().hex,
              "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
              "started_utc": _utc(), "finished_utc": None, "overwrite": bool(overwrite)}
    data = json.dumps(record, sort_keys=True).encode()
    if other is None:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        try:
            with fs.open(path, "xb") as fh:  # exclusive: of two runs starting together, one wins
                fh.write(data)
        except FileExistsError:
            raise ConfigError(output, "another run took this output at the same moment; use another output") from None
        except Exception:  # noqa: BLE001 - a store without exclusive create; the read-back below decides
            write_bytes_atomic(run_url(output), data, storage)
    else:
        write_bytes_atomic(run_url(output), data, storage)
    now = _read_record(*open_fs(run_url(output), storage), output)
    if not now or now.get("token") != record["token"]:
        raise ConfigError(output, "another run took this output at the same moment; use another output")
    if overwrite:
        ofs, opath = open_fs(output, storage)
        for name in (*TABLES, "failures", posixpath.basename(hats_url(output)), "summary.json"):
            target = posixpath.join(opath, name)
            if ofs.exists(target):
                ofs.rm(target, recursive=True)
    return RunClaim(output=output, record=record)


def release_output(claim: RunClaim, *, storage: StorageConfig = StorageConfig()) -> None:
    """Mark the run of ``claim`` finished in ``OUT/_RUN.json`` (unless another run took it over)."""
    fs, path = open_fs(run_url(claim.output), storage)
    try:
        now = _read_record(fs, path, claim.output)
    except ConfigError:
        now = None
    if not now or now.get("token") != claim.record["token"]:
        log.warning("%s: the run record was taken over by another run; left as it is", claim.output)
        return
    write_bytes_atomic(run_url(claim.output), json.dumps({**now, "finished_utc": _utc()}, sort_keys=True).encode(),
                       storage)


def commit_tiles(batch: dict[str, np.ndarray], *, output: str, storage: StorageConfig, metadata_json: str,
                 fingerprint: str, identities: dict[str, dict] | None = None) -> dict[str, np.ndarray]:
    """Write each tile's outputs under deterministic names, then its ``_COMMITTED`` marker.

    Failed rows (and tiles whose outputs cannot be written) go to ``OUT/failures/``. The marker
    records the tile's identity (:func:`source_identity`, read here: ``identities`` caches it by
    file, for the rows of one Parquet file); a committed tile of the same ``tileId`` made from
    another file is an error (a failure row naming both files), the same file is rewritten.

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
                                                           fingerprint=fingerprint,
                                                           identities={} if identities is None else identities)
            except Exception as exc:  # noqa: BLE001
                log.warning("commit failed on %s:\n%s", row["source"], traceback.format_exc())
                status, stage, reason, stats = fail(row, "commit", failure_reason(exc, row["source"]))
        for k, v in zip(("tileId", "source", "status", "stage", "reason", "stats"),
                        (row["tileId"], row["source"], status, stage, reason, stats)):
            out[k].append(v)
    return {"tileId": np.asarray(out["tileId"], dtype=np.int64),
            **{k: np.asarray(out[k], dtype=object) for k in ("source", "status", "stage", "reason", "stats")}}


def _commit_one(row: Mapping[str, Any], *, output: str, storage: StorageConfig, meta: dict, fingerprint: str,
                identities: dict[str, dict]):
    result = unpack_output(row["payload"])
    tid = row["tileId"]
    base = row["source"].partition(_ROW)[0]
    if base not in identities:
        identities[base] = source_identity(base, storage)
    row_index = row["source"].partition(_ROW)[2]
    identity = {**identities[base], "url": source_url(row["source"], storage),
                "row": int(row_index) if row_index else None}
    fs, marker_path = open_fs(marker_url(output, tid), storage)
    if fs.exists(marker_path):
        with fs.open(marker_path, "rb") as fh:
            other = json.loads(fh.read())
        if not _same_file(other, identity, storage):
            raise InputError(row["source"], f"TILEID {tid} is already committed from another file, "
                                            f"{other.get('source')} (sha256 {str(other.get('sha256'))[:12]}, this "
                                            f"file {identity['sha256'][:12]}); tile ids must be unique in a field")
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
    marker = {"tileId": tid, "source": row["source"], "url": identity["url"], "sha256": identity["sha256"],
              "size": identity["size"], "row": identity["row"], "fingerprint": fingerprint, "stats": stats,
              "committed_utc": _utc()}
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
        self.identities: dict[str, dict] = {}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return commit_tiles(batch, **self.kwargs, identities=self.identities)


def commit_refused(rows: Sequence[Mapping[str, Any]], *, output: str, storage: StorageConfig,
                   metadata_json: str) -> list[dict[str, Any]]:
    """Record failure rows made before the pipeline (:attr:`TilePlan.refused`) as the commit records
    failures (``OUT/failures/``); returns their summary rows (keys of :func:`commit_tiles`)."""
    if not rows:
        return []
    out = commit_tiles(rows_to_batch(rows), output=output, storage=storage, metadata_json=metadata_json,
                       fingerprint="")
    return [{k: (out[k][i].item() if hasattr(out[k][i], "item") else out[k][i]) for k in out}
            for i in range(len(out["source"]))]
