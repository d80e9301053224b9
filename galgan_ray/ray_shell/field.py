"""The survey-scale field processor on Ray Data: tiles in, one partitioned Parquet catalog out.

Pipeline (one row per tile from end to end; a tile's arrays ride in one ``payload`` column of
:func:`galgan_ray.tiles.pack_tile` bytes, because tiles differ in shape and Ray's tensor columns
need one shape per block)::

    TileDatasource (one read task per tile: fsspec bytes -> astropy -> validated Tile)
      -> DegradeStage     (simulation mode only: HR tile -> HSC-like tile, truth carried along)
      -> FootprintStage   (sep footprints + LR peaks on the LR tile, 22x22 cutouts around them)
      -> EnhanceStage     (the GAN, checkpoint loaded once per actor; GPU when the cluster has one)
      -> DetectStage      (peaks on the enhanced cutouts -> children on the tile grid, RA/Dec)
      -> PhotometerStage  (Gaussian-mixture photometry on the LR image; catalog, truth scores)
      -> CommitStage      (per-tile files under deterministic names, then the _COMMITTED marker)

Each ``<Verb>Stage`` is a thin callable class over :mod:`galgan_ray.field`. A stage that raises on a
tile turns that row into a failure (stage and reason); later stages pass failures through and the
commit stage writes them to ``OUT/failures/``, so the rest of the field completes and nothing is
dropped silently.

Ray Data runs them as four fixed-size actor pools, so each process starts (and imports numpy,
torch, astropy: seconds of CPU and ~0.3 GB each) once per job, never once per tile::

    ReadTile->MapBatches(PrepareStage)   read + DegradeStage + FootprintStage   stage_actors
    MapBatches(EnhanceStage)                                                    enhance_actors (GPU)
    MapBatches(MeasureStage)             DetectStage + PhotometerStage          stage_actors
    MapBatches(CommitStage)                                                     commit_actors

:class:`PrepareStage` and :class:`MeasureStage` run their stages one after the other in one actor:
footprints and detection are too light to be worth a process of their own, and each stage keeps
its own class, timer and failure name. The read tasks ask for the CPUs of a PrepareStage actor,
which lets Ray Data fuse them into that pool, so no Ray task (and no short-lived worker process)
is left in the pipeline.

Outputs under ``OUT`` (any fsspec URL)::

    OUT/catalog/tile=000123/part-0.parquet   schema.object_schema, metadata: config, model, version
    OUT/catalog/tile=000123/_COMMITTED       JSON: source, counts, config fingerprint (commit point)
    OUT/truth/tile=000123/part-0.parquet     simulations: owned truth sources, matched at high/low/enhanced
    OUT/blends/tile=000123/part-0.parquet    simulations: truth pairs closer than blend_max_sep_arcsec
    OUT/failures/failure-<sha1(source)>.parquet   schema.failure_schema, one file per failed input
    OUT/summary.json, OUT/config.yaml        the run summary and the resolved config
    OUT/input/                               the simulated tiles (when no input was given)

Exactly once: every file is written to a temporary name and moved; the marker is written last. A
rerun lists the markers first and reads only tiles without one (a failed tile has none, so it is
retried); a marker made with another config or model is an error unless ``overwrite``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import ray
import ray.data
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..config import config_json, dump_config, from_dict, to_dict
from ..errors import ConfigError, InputError
from ..field import FieldConfig, ModelGrid
from ..photometry import PhotometryComputeConfig
from ..tiles import FieldSimConfig

__all__ = ["figures_dir", "StorageConfig", "FieldComputeConfig", "FieldJobConfig", "TileDatasource", "DegradeStage",
           "FootprintStage", "EnhanceStage", "DetectStage", "PhotometerStage", "PrepareStage", "MeasureStage",
           "CommitStage", "commit_tiles", "build_pipeline", "run_field", "resolve_model_grid", "format_summary",
           "init_ray", "read_catalog", "read_run_dataset", "run_files", "ROW_COLUMNS"]

log = logging.getLogger(__name__)

#: Columns of a pipeline row.
ROW_COLUMNS: tuple[str, ...] = ("tileId", "source", "status", "stage", "reason", "payload")


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StorageConfig:
    """Object-storage options (never credentials: those come from the environment, e.g.
    ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, and are never written anywhere).

    Attributes
    ----------
    endpoint_url : str or None
        S3-compatible endpoint (``http://127.0.0.1:9000`` for MinIO/moto); default the
        ``FSSPEC_S3_ENDPOINT_URL`` environment variable, else AWS.
    anon : bool
        Anonymous access (public buckets).
    """

    endpoint_url: str | None = None
    anon: bool = False

    def apply_defaults(self) -> None:
        """Make ``endpoint_url`` fsspec's default for ``s3://`` in this process, so that code which
        opens URLs without storage options (e.g. :func:`galgan_ray.checkpoint.load_checkpoint` for a
        checkpoint on S3) reaches the same store."""
        if self.endpoint_url:
            import fsspec.config

            fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = self.endpoint_url

    def options_for(self, url: str) -> dict[str, Any]:
        """fsspec storage options for ``url`` (only ``s3://`` takes these)."""
        if not str(url).startswith(("s3://", "s3a://")):
            return {}
        opts: dict[str, Any] = {}
        endpoint = self.endpoint_url or os.environ.get("FSSPEC_S3_ENDPOINT_URL")
        if endpoint:
            opts["endpoint_url"] = endpoint
        if self.anon:
            opts["anon"] = True
        return opts


@dataclass(frozen=True)
class FieldComputeConfig:
    """Compute knobs of the field job (no effect on the catalog).

    Attributes
    ----------
    ray_address : str or None
        Cluster to join (``"auto"``, ``"HOST:PORT"``, ``"ray://..."``); None: ``RAY_ADDRESS`` when set
        (``ray job submit``), else (or ``"local"``) a new local instance of ``num_cpus`` CPUs.
    num_cpus : int
        CPUs of a local instance.
    object_store_mb : int
        Object store of a local instance (MB).
    stage_num_cpus : float
        CPUs reserved per stage actor (the reads run in the PrepareStage actors). Keep the sum
        over the actors (``2 stage_actors + enhance_actors`` of these and the commit actors)
        below the cluster's CPUs, or the pipeline starves (STACK.md).
    stage_actors : int
        Actors of each CPU pool (:class:`PrepareStage`, :class:`MeasureStage`).
    enhance_actors : int
        Actors of the enhancement stage.
    enhance_num_gpus : float or None
        GPUs per enhancement actor; None (auto): 1 when the cluster has a GPU, else 0 (CPU).
    enhance_resources : dict of str to float
        Custom Ray resources per enhancement actor (e.g. ``{"accelerator": 1}``).
    enhance_batch_size : int
        Cutouts per forward pass.
    io_num_cpus : float
        CPUs reserved per commit actor.
    commit_actors : int
        Actors of the commit stage. A commit writes a few small files (~10 ms per tile on local
        disk, against a second or more of stage work per tile), so one keeps up with many cores;
        raise it where many nodes commit to object storage (each file is a few round trips).
    torch_threads : int
        ``torch.set_num_threads`` in every stage actor.
    photometry : PhotometryComputeConfig
        Device, precision and batch of the photometry.
    """

    ray_address: str | None = None
    num_cpus: int = 2
    object_store_mb: int = 300
    stage_num_cpus: float = 0.25
    stage_actors: int = 1
    enhance_actors: int = 1
    enhance_num_gpus: float | None = None
    enhance_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    enhance_batch_size: int = 256
    io_num_cpus: float = 0.25
    commit_actors: int = 1
    torch_threads: int = 1
    photometry: PhotometryComputeConfig = dataclasses.field(default_factory=lambda: PhotometryComputeConfig(device="cpu"))

    def __post_init__(self):
        if min(self.stage_actors, self.enhance_actors, self.commit_actors, self.enhance_batch_size) < 1:
            raise ConfigError("compute", "stage_actors, enhance_actors, commit_actors and enhance_batch_size must "
                                         "be >= 1")
        if self.stage_num_cpus < 0 or self.io_num_cpus < 0 or self.torch_threads < 1:
            raise ConfigError("compute", "CPUs must be >= 0 and torch_threads >= 1")


@dataclass(frozen=True)
class FieldJobConfig:
    """The field job: inputs, output, model, science and compute (``field_default.yaml`` mirrors it).

    Attributes
    ----------
    inputs : tuple of str
        Tile URLs (files, directories, globs; FITS or Parquet). Empty: simulate a field
        (``simulate``) into ``OUTPUT/input/`` and process it.
    output : str
        Output URL (local path, ``s3://...``, ``gs://...``, ``memory://...``).
    checkpoint : str
        ``"default"`` (the shipped model, :func:`galgan_ray.enhance.default_checkpoint`) or a path/URL.
    overwrite : bool
        Reprocess committed tiles (and accept markers made with another config or model).
    simulate : FieldSimConfig
        The simulated field made when ``inputs`` is empty.
    field : FieldConfig
        Science parameters.
    storage : StorageConfig
    compute : FieldComputeConfig
    """

    inputs: tuple[str, ...] = ()
    output: str = "output"
    checkpoint: str = "default"
    overwrite: bool = False
    simulate: FieldSimConfig = dataclasses.field(default_factory=FieldSimConfig)
    field: FieldConfig = dataclasses.field(default_factory=FieldConfig)
    storage: StorageConfig = dataclasses.field(default_factory=StorageConfig)
    compute: FieldComputeConfig = dataclasses.field(default_factory=FieldComputeConfig)


# ------------------------------------------------------------------------------------------------
# Helpers: rows, files
# ------------------------------------------------------------------------------------------------
def _row(tile_id: int, source: str, status: str, stage: str, reason: str, payload: bytes) -> dict[str, Any]:
    return {"tileId": int(tile_id), "source": str(source), "status": status, "stage": stage, "reason": reason,
            "payload": payload}


def _rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    return {
        "tileId": np.array([r["tileId"] for r in rows], dtype=np.int64),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "status": np.array([r["status"] for r in rows], dtype=object),
        "stage": np.array([r["stage"] for r in rows], dtype=object),
        "reason": np.array([r["reason"] for r in rows], dtype=object),
        "payload": np.array([r["payload"] for r in rows], dtype=object),
    }


def _batch_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    n = len(batch["source"])
    out = []
    for i in range(n):
        payload = batch["payload"][i]
        out.append({"tileId": int(batch["tileId"][i]), "source": str(batch["source"][i]),
                    "status": str(batch["status"][i]), "stage": str(batch["stage"][i]),
                    "reason": str(batch["reason"][i]), "payload": bytes(payload) if payload is not None else b""})
    return out


def _reason(exc: BaseException, source: str) -> str:
    """The failure reason: InputErrors already name the input; other errors get the source prepended."""
    if isinstance(exc, InputError):
        return str(exc)
    return f"{source}: {type(exc).__name__}: {exc}"


def _source_key(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def _scrub(url: str) -> str:
    """A URL without user:password@ (never store credentials)."""
    return re.sub(r"(//)[^/@]+@", r"\1", str(url))


def _join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def _fs(url: str, storage: StorageConfig):
    """``(filesystem, path)`` with listings re-read: fsspec caches directory listings per process
    (s3fs), and other processes (Ray workers) write the files we look for."""
    fs, path = fsspec.core.url_to_fs(url, **storage.options_for(url))
    try:
        fs.invalidate_cache()
    except Exception:  # noqa: BLE001 - filesystems without a cache
        pass
    return fs, path


def _write_bytes_atomic(url: str, data: bytes, storage: StorageConfig) -> None:
    fs, path = _fs(url, storage)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}"
    with fs.open(tmp, "wb") as fh:
        fh.write(data)
    fs.mv(tmp, path)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def _tile_dir(tile_id: int) -> str:
    return f"tile={int(tile_id):06d}"


# ------------------------------------------------------------------------------------------------
# Read: a datasource with one read task per tile
# ------------------------------------------------------------------------------------------------
def _peek_tile_id(data: bytes) -> int:
    try:
        import io

        from astropy.io import fits

        with fits.open(io.BytesIO(data), lazy_load_hdus=True) as hdul:
            for hdu in hdul[:2]:
                if "TILEID" in hdu.header:
                    return int(hdu.header["TILEID"])
    except Exception:  # noqa: BLE001 - only a hint for the failure row
        pass
    return -1


def _read_one(source: str, storage: StorageConfig) -> dict[str, Any]:
    from ..tiles import pack_tile, read_tile, read_tile_source, read_url_bytes

    try:
        if "#row=" in source or source.lower().endswith(".parquet"):  # a Parquet row, or an unlistable file
            tile = read_tile_source(source, storage_options=storage.options_for(source))
        else:
            data = read_url_bytes(source, storage_options=storage.options_for(source))
            try:
                tile = read_tile(data, source=source)
            except InputError as exc:
                return _row(_peek_tile_id(data), source, "failed", "read", str(exc), b"")
        return _row(tile.tile_id, source, "ok", "read", "", pack_tile(tile, info={"timing": {}}))
    except Exception as exc:  # noqa: BLE001 - every problem becomes a failure row
        return _row(-1, source, "failed", "read", _reason(exc, source), b"")


def _rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    return pa.table({
        "tileId": pa.array([r["tileId"] for r in rows], pa.int64()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "status": pa.array([r["status"] for r in rows], pa.string()),
        "stage": pa.array([r["stage"] for r in rows], pa.string()),
        "reason": pa.array([r["reason"] for r in rows], pa.string()),
        "payload": pa.array([r["payload"] for r in rows], pa.binary()),
    })


class TileDatasource(Datasource):
    """Tiles at fsspec URLs as a Ray dataset of pipeline rows (:data:`ROW_COLUMNS`), one read task
    per tile, so tiles stream through the pipeline and are never all in memory.

    An unreadable URL, a corrupt file or a tile that fails validation becomes a row with
    ``status = "failed"``, ``stage = "read"`` and the reason.

    Parameters
    ----------
    sources : sequence of str
        Tile sources (:func:`galgan_ray.tiles.list_tile_sources`).
    storage : StorageConfig
    """

    def __init__(self, sources: Sequence[str], *, storage: StorageConfig = StorageConfig()):
        self.sources = list(sources)
        self.storage = storage

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        storage = self.storage
        tasks = []
        for source in self.sources:
            def read_fn(source=source) -> Iterable[pa.Table]:
                yield _rows_table([_read_one(source, storage)])

            meta = BlockMetadata(num_rows=1, size_bytes=None, exec_stats=None, input_files=(source,))
            tasks.append(ReadTask(read_fn, meta))
        return tasks


# ------------------------------------------------------------------------------------------------
# Stages
# ------------------------------------------------------------------------------------------------
class _TileStage:
    """Base of the ``<Verb>Stage`` classes: unpack each ok row, call :meth:`process`, repack;
    failures pass through, exceptions become failures naming the stage."""

    stage = "stage"

    def __init__(self, *, torch_threads: int = 1):
        import torch

        torch.set_num_threads(int(torch_threads))

    def process(self, tile, extra: dict, info: dict):  # pragma: no cover - overridden
        raise NotImplementedError

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        from ..tiles import pack_tile, unpack_tile

        tile, extra, info = unpack_tile(row["payload"])
        t0 = time.perf_counter()
        tile, extra, info = self.process(tile, extra, info)
        info.setdefault("timing", {})[f"{self.stage}_s"] = time.perf_counter() - t0
        return _row(tile.tile_id, row["source"], "ok", self.stage, "", pack_tile(tile, extra=extra, info=info))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in _batch_rows(batch):
            if row["status"] != "ok":
                out.append(row)
                continue
            try:
                out.append(self._one(row))
            except Exception as exc:  # noqa: BLE001 - a bad tile must not stop the field
                log.warning("%s failed on %s:\n%s", self.stage, row["source"], traceback.format_exc())
                out.append(_row(row["tileId"], row["source"], "failed", self.stage, _reason(exc, row["source"]), b""))
        return _rows_to_batch(out)


class DegradeStage(_TileStage):
    """Check a tile against the model; degrade simulated HR tiles to the model's LR grid.

    Parameters
    ----------
    model : ModelGrid
    config : FieldConfig
    torch_threads : int
    """

    stage = "degrade"

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1):
        super().__init__(torch_threads=torch_threads)
        self.model, self.config = model, config

    def process(self, tile, extra, info):
        from ..field import check_tile, degrade_tile, find_high_peaks

        mode = check_tile(tile, model=self.model)
        info["mode"] = mode
        info["source_pixel_scale_arcsec"] = tile.pixel_scale_arcsec
        if mode == "simulation":
            hr = find_high_peaks(tile, detect=self.config.detect, ratio=int(round(self.model.ratio)),
                                 block_px=3 * self.config.footprints.peak_block_px)
            extra.update({f"hr.{k}": v for k, v in hr.items()})
            tile = degrade_tile(tile, config=self.model.degrade_config(), seed=self.config.seed,
                                add_noise=self.config.degrade_add_noise)
        return tile, extra, info


class FootprintStage(_TileStage):
    """Footprints (sep) and LR peaks on the LR tile, and the 22x22 cutouts to enhance."""

    stage = "footprints"

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1):
        super().__init__(torch_threads=torch_threads)
        self.model, self.config = model, config

    def process(self, tile, extra, info):
        from ..field import cut_cutouts, find_footprints

        extra.update(find_footprints(tile, config=self.config))
        extra.update(cut_cutouts(extra["image_sub"], tile.variance, extra, config=self.config.footprints,
                                 side=self.model.lr_size))
        return tile, extra, info


class EnhanceStage(_TileStage):
    """The super-resolution model on each tile's footprint cutouts, in batches.

    The checkpoint is loaded and the noise of enhanced images calibrated once per actor. Runs on
    the GPU Ray assigned to the actor, else on CPU.

    Parameters
    ----------
    checkpoint : str
        Checkpoint path/URL.
    config : FieldConfig
    batch_size : int
    device : str, optional
        Default ``cuda`` when this actor got a GPU, else ``cpu``.
    storage : StorageConfig
        For a checkpoint on object storage.
    torch_threads : int
    """

    stage = "enhance"

    def __init__(self, checkpoint: str, config: FieldConfig, *, batch_size: int = 256, device: str | None = None,
                 storage: StorageConfig = StorageConfig(), torch_threads: int = 1):
        super().__init__(torch_threads=torch_threads)
        import torch

        from ..enhance import Enhancer
        from ..field import enhanced_noise_scale

        storage.apply_defaults()
        if device is None:
            # ray.is_initialized() first: ray.get_gpu_ids() would start (or join) a Ray instance
            # when the stage is built outside Ray (a notebook, a test).
            device = "cuda" if (ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available()) else "cpu"
        self.device = device
        self.config = config
        self.enhancer = Enhancer(checkpoint, device=device, batch_size=batch_size)
        psf_hr = np.asarray(self.enhancer.psf_high(0))
        self.rho = enhanced_noise_scale(self.enhancer.enhance_cutouts, n_bands=self.enhancer.n_bands, psf_hr=psf_hr,
                                        detect=config.detect, lr_size=self.enhancer.lr_size,
                                        n_realizations=config.noise_realizations, seed=config.seed)

    def process(self, tile, extra, info):
        cut = extra.pop("cut.image")
        if len(cut):
            extra["enhanced"] = self.enhancer.enhance_cutouts(cut, extra["cut.sigma"])
        else:
            extra["enhanced"] = np.zeros((0, tile.n_bands, self.enhancer.hr_size, self.enhancer.hr_size), np.float32)
        info["rho"] = self.rho
        info["enhance_device"] = str(self.device)
        return tile, extra, info


class DetectStage(_TileStage):
    """Peaks on the enhanced cutouts -> children of each footprint on the tile grid."""

    stage = "detect"

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1):
        super().__init__(torch_threads=torch_threads)
        self.model, self.config = model, config
        self.psf_hr = model.psf_high()

    def process(self, tile, extra, info):
        from ..field import find_children

        enhanced = extra.pop("enhanced")
        extra.update(find_children(enhanced, extra, tile_shape=tile.shape, psf_hr=self.psf_hr, rho=float(info["rho"]),
                                   detect=self.config.detect, ratio=self.model.ratio,
                                   edge_px=self.config.footprints.edge_px, lr_size=self.model.lr_size))
        return tile, extra, info


class PhotometerStage(_TileStage):
    """Photometry of the children on the LR image, the catalog columns and (simulations) truth scores.

    The row leaving this stage carries only the tables (``cat.*``, ``truth.*``, ``blend.*``) and
    the tile's statistics, not the images.
    """

    stage = "photometry"

    def __init__(self, model: ModelGrid, config: FieldConfig, *,
                 compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"), torch_threads: int = 1):
        super().__init__(torch_threads=torch_threads)
        self.model, self.config, self.compute = model, config, compute

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        from ..field import build_catalog, measure_children, score_truth, tile_stats
        from ..tiles import pack_arrays, unpack_tile

        tile, extra, info = unpack_tile(row["payload"])
        t0 = time.perf_counter()
        extra.update(measure_children(extra["image_sub"], tile.variance, extra, psf=tile.psf,
                                      pixel_scale_arcsec=tile.pixel_scale_arcsec, config=self.config,
                                      compute=self.compute))
        catalog = build_catalog(tile, extra, keep_not_primary=self.config.keep_not_primary)
        arrays = {f"cat.{k}": v for k, v in catalog.items() if not k.startswith("_")}
        if tile.truth is not None:
            truth, blends = score_truth(tile, extra, catalog, config=self.config.truth)
            arrays.update({f"truth.{k}": v for k, v in truth.items()})
            arrays.update({f"blend.{k}": v for k, v in blends.items()})
        info.setdefault("timing", {})[f"{self.stage}_s"] = time.perf_counter() - t0
        info["stats"] = tile_stats(tile, extra, catalog)
        info["bands"] = list(tile.bands)
        info["simulated"] = tile.truth is not None
        return _row(tile.tile_id, row["source"], "ok", self.stage, "", pack_arrays(arrays, info))


class _StageSequence:
    """Consecutive stages run one after the other in one actor: one pool and one process for
    stages too light to be worth their own. Each keeps its own class, timer and failure name (a
    tile failed by the first passes through the next, as between pools).

    Parameters
    ----------
    *specs : tuple of (class, tuple, dict)
        The stages in order, as ``(cls, args, kwargs)``: they are built in the actor, not in the
        driver (a stage's ``__init__`` sets torch's threads in its process).
    """

    def __init__(self, *specs: tuple[type, tuple, dict]):
        self.stages = [cls(*args, **kwargs) for cls, args, kwargs in specs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch


class PrepareStage(_StageSequence):
    """:class:`DegradeStage` then :class:`FootprintStage` in one actor (and, fused in by Ray Data,
    the read before them): the low-resolution tile and the cutouts to enhance.

    Parameters
    ----------
    model : ModelGrid
    config : FieldConfig
    torch_threads : int
    """

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1):
        kw = dict(torch_threads=torch_threads)
        super().__init__((DegradeStage, (model, config), kw), (FootprintStage, (model, config), kw))


class MeasureStage(_StageSequence):
    """:class:`DetectStage` then :class:`PhotometerStage` in one actor: the children found on the
    enhanced cutouts, then their fluxes on the low-resolution image.

    Parameters
    ----------
    model : ModelGrid
    config : FieldConfig
    compute : PhotometryComputeConfig
    torch_threads : int
    """

    def __init__(self, model: ModelGrid, config: FieldConfig, *,
                 compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"), torch_threads: int = 1):
        super().__init__((DetectStage, (model, config), dict(torch_threads=torch_threads)),
                         (PhotometerStage, (model, config), dict(compute=compute, torch_threads=torch_threads)))


# ------------------------------------------------------------------------------------------------
# Commit
# ------------------------------------------------------------------------------------------------
def _marker_url(output: str, tile_id: int) -> str:
    return _join(output, "catalog", _tile_dir(tile_id), "_COMMITTED")


def _failure_url(output: str, source: str) -> str:
    return _join(output, "failures", f"failure-{_source_key(source)}.parquet")


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
    from ..field import blends_table, catalog_table, failure_table, truth_table
    from ..tiles import unpack_arrays

    meta = {b"galgan_ray": metadata_json.encode()}
    out = {k: [] for k in ("tileId", "source", "status", "stage", "reason", "stats")}

    def fail(row, stage, reason):
        table = failure_table([{"tileId": row["tileId"], "source": _scrub(row["source"]), "stage": stage,
                                "reason": reason}], metadata=meta)
        try:
            _write_bytes_atomic(_failure_url(output, row["source"]), _parquet_bytes(table), storage)
        except Exception:  # noqa: BLE001 - still reported in the summary
            log.error("cannot write the failure of %s:\n%s", row["source"], traceback.format_exc())
        return "failed", stage, reason, "{}"

    for row in _batch_rows(batch):
        if row["status"] != "ok":
            status, stage, reason, stats = fail(row, row["stage"], row["reason"])
        else:
            try:
                arrays, info = unpack_arrays(row["payload"])
                tid = row["tileId"]
                fs, marker_path = _fs(_marker_url(output, tid), storage)
                if fs.exists(marker_path):
                    with fs.open(marker_path, "rb") as fh:
                        other = json.loads(fh.read())
                    if other.get("source") != row["source"]:
                        raise InputError(row["source"], f"TILEID {tid} is also used by {other.get('source')}; tile "
                                                        f"ids must be unique in a field")
                cat = {k[4:]: v for k, v in arrays.items() if k.startswith("cat.")}
                tables = {"catalog": catalog_table(cat, bands=info["bands"], metadata=meta)}
                if info.get("simulated"):
                    tables["truth"] = truth_table({k[6:]: v for k, v in arrays.items() if k.startswith("truth.")},
                                                  metadata=meta)
                    tables["blends"] = blends_table({k[6:]: v for k, v in arrays.items() if k.startswith("blend.")},
                                                    metadata=meta)
                for name, table in tables.items():
                    _write_bytes_atomic(_join(output, name, _tile_dir(tid), "part-0.parquet"), _parquet_bytes(table),
                                        storage)
                ffs, fpath = _fs(_failure_url(output, row["source"]), storage)
                if ffs.exists(fpath):  # an earlier failure of this source is superseded
                    ffs.rm(fpath)
                stats = dict(info.get("stats", {}))
                stats.update({"timing": info.get("timing", {}), "mode": info.get("mode"), "rho": info.get("rho"),
                              "enhance_device": info.get("enhance_device")})
                if info.get("simulated"):
                    stats["truth"] = _truth_counts({k[6:]: v for k, v in arrays.items() if k.startswith("truth.")},
                                                   {k[6:]: v for k, v in arrays.items() if k.startswith("blend.")})
                marker = {"tileId": tid, "source": row["source"], "fingerprint": fingerprint, "stats": stats,
                          "committed_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                _write_bytes_atomic(_marker_url(output, tid), json.dumps(marker, sort_keys=True).encode(), storage)
                status, stage, reason, stats = "done", "commit", "", json.dumps(stats, sort_keys=True)
            except Exception as exc:  # noqa: BLE001
                log.warning("commit failed on %s:\n%s", row["source"], traceback.format_exc())
                status, stage, reason, stats = fail(row, "commit", _reason(exc, row["source"]))
        for k, v in zip(("tileId", "source", "status", "stage", "reason", "stats"),
                        (row["tileId"], row["source"], status, stage, reason, stats)):
            out[k].append(v)
    return {"tileId": np.asarray(out["tileId"], dtype=np.int64),
            **{k: np.asarray(out[k], dtype=object) for k in ("source", "status", "stage", "reason", "stats")}}


class CommitStage:
    """The commit step as a warm actor: :func:`commit_tiles` on each batch.

    A commit is light (a few small Parquet files and a marker per tile), but the process that runs
    it imports the catalog writers (and with them numpy, torch, pyarrow and fsspec): as Ray tasks,
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
        from .. import field as _core  # noqa: F401 - import the writers now, not on the first tile

        self.kwargs = dict(output=output, storage=storage, metadata_json=metadata_json, fingerprint=fingerprint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return commit_tiles(batch, **self.kwargs)


def _truth_counts(truth: Mapping[str, np.ndarray], blends: Mapping[str, np.ndarray]) -> dict[str, int]:
    scored = np.asarray(truth.get("scored", np.zeros(0)), bool)
    out = {"n_truth": int(len(scored)), "n_scored": int(scored.sum())}
    for k in ("high", "low", "enhanced"):
        out[f"matched_{k}"] = int((np.asarray(truth.get(f"matched_{k}", np.zeros(0)), bool) & scored).sum())
        out[f"blends_found_{k}"] = int(np.asarray(blends.get(f"found_{k}", np.zeros(0)), bool).sum())
    out["n_blends"] = int(len(blends.get("sep_arcsec", ())))
    return out


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------
def init_ray(compute: FieldComputeConfig) -> bool:
    """Connect to a cluster (``compute.ray_address``, or ``RAY_ADDRESS`` under ``ray job submit``) or
    start a small local instance. Returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address if compute.ray_address else "auto", log_to_driver=True)
    else:
        # address="local": a new instance even where `ray start` left its address in /tmp/ray (a bare
        # ray.init() would join that cluster, then refuse num_cpus).
        ray.init(address="local", num_cpus=compute.num_cpus,
                 object_store_memory=int(compute.object_store_mb) * 1024 * 1024, include_dashboard=False,
                 log_to_driver=True)
    return True


def resolve_model_grid(checkpoint: str, *, storage: StorageConfig = StorageConfig()) -> tuple[str, ModelGrid, dict]:
    """Checkpoint path/URL, the model's grids and its identity (``path``, ``sha256``)."""
    from ..checkpoint import read_checkpoint
    from ..enhance import resolve_model

    storage.apply_defaults()
    path = resolve_model(checkpoint)
    _, meta = read_checkpoint(path)
    return path, ModelGrid.from_checkpoint_meta(meta, source=path), {"path": _scrub(meta["path"]),
                                                                       "sha256": meta["sha256"]}


def _fingerprint(config: FieldJobConfig, model_id: Mapping[str, str]) -> str:
    """What must not change between a run and its resumption: science config and model."""
    text = config_json(config.field) + "|" + model_id["sha256"]
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_markers(output: str, storage: StorageConfig) -> dict[str, dict]:
    """Committed tiles: ``source -> marker`` (empty for a new output)."""
    fs, path = _fs(output, storage)
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


def _simulate_inputs(config: FieldJobConfig) -> tuple[list[str], dict]:
    """Make the simulated field under ``OUTPUT/input/`` once (reused when its config matches)."""
    from ..tiles import make_simulated_field

    url = _join(config.output, "input")
    storage = config.storage
    fs, path = _fs(url, storage)
    stamp = posixpath.join(path, "_SIMULATION.json")
    want = config_json(config.simulate)
    if fs.exists(stamp):
        with fs.open(stamp, "rb") as fh:
            have = json.loads(fh.read())
        if have.get("simulate") == want:
            return [url], have.get("info", {})
    info = make_simulated_field(config.simulate, url, storage_options=storage.options_for(url))
    info = {k: v for k, v in info.items() if k != "tiles"}
    _write_bytes_atomic(_join(url, "_SIMULATION.json"), json.dumps({"simulate": want, "info": info}).encode(), storage)
    return [url], info


def build_pipeline(sources: Sequence[str], *, config: FieldJobConfig, checkpoint: str, model: ModelGrid,
                   metadata_json: str, fingerprint: str) -> ray.data.Dataset:
    """The lazy Ray dataset of the run: read -> stages -> commit (one summary row per tile), as the
    four actor pools of the module docstring."""
    c = config.compute
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    enhance_gpus = (1.0 if gpus >= 1 else 0.0) if c.enhance_num_gpus is None else float(c.enhance_num_gpus)
    common = dict(batch_size=1, num_cpus=c.stage_num_cpus, zero_copy_batch=False)
    kw = dict(torch_threads=c.torch_threads)
    # 1. Reads with the CPUs of a PrepareStage actor, and PrepareStage with batch_size=None (a batch
    #    is one block, i.e. one tile: a read task yields one 1-row block): Ray Data then fuses the
    #    reads into that pool (it fuses a task-pool map into a following actor pool when their remote
    #    args match and the actor pool asks for no batch size), so tiles are read in warm actors.
    ds = ray.data.read_datasource(TileDatasource(sources, storage=config.storage), override_num_blocks=len(sources),
                                  num_cpus=c.stage_num_cpus)
    ds = ds.map_batches(PrepareStage, fn_constructor_args=(model, config.field), fn_constructor_kwargs=kw,
                        compute=ray.data.ActorPoolStrategy(size=c.stage_actors), **{**common, "batch_size": None})
    # 2. The model, on a GPU where the cluster has one.
    enh_args = dict(batch_size=1, zero_copy_batch=False, num_cpus=c.stage_num_cpus, num_gpus=enhance_gpus)
    if c.enhance_resources:
        enh_args["resources"] = dict(c.enhance_resources)
    ds = ds.map_batches(EnhanceStage, fn_constructor_args=(checkpoint, config.field),
                        fn_constructor_kwargs=dict(batch_size=c.enhance_batch_size, storage=config.storage, **kw),
                        compute=ray.data.ActorPoolStrategy(size=c.enhance_actors), **enh_args)
    # 3. Children and photometry.
    ds = ds.map_batches(MeasureStage, fn_constructor_args=(model, config.field),
                        fn_constructor_kwargs=dict(compute=c.photometry, **kw),
                        compute=ray.data.ActorPoolStrategy(size=c.stage_actors), **common)
    # 4. The commit, in warm actors too (as Ray tasks, each commit started a worker that imported the stack).
    ds = ds.map_batches(CommitStage, fn_constructor_kwargs=dict(output=config.output, storage=config.storage,
                                                                metadata_json=metadata_json, fingerprint=fingerprint),
                        compute=ray.data.ActorPoolStrategy(size=c.commit_actors), batch_size=1,
                        num_cpus=c.io_num_cpus, zero_copy_batch=False)
    return ds


def run_field(config: FieldJobConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Process a field end to end on Ray (see the module docstring).

    Parameters
    ----------
    config : FieldJobConfig
    verbose : bool
        Print the summary.

    Returns
    -------
    dict
        The summary (also written to ``OUT/summary.json``): ``tiles`` (``total``, ``done``,
        ``failed``, ``skipped``), ``sources``, ``footprints``, ``newly_resolved_blends``,
        ``throughput`` (``sources_per_s``, ``deg2_per_hour``, ``wall_s``), ``model``, ``outputs``,
        ``failures`` (list of ``{tileId, source, stage, reason}``), ``truth`` (simulations).
    """
    from ..provenance import provenance

    t_start = time.perf_counter()
    storage = config.storage
    checkpoint, model, model_id = resolve_model_grid(config.checkpoint, storage=storage)
    sim_info = None
    if config.inputs:
        inputs = list(config.inputs)
    else:
        inputs, sim_info = _simulate_inputs(config)
    from ..tiles import list_tile_sources

    sources = []
    for url in inputs:
        sources += list_tile_sources(url, storage_options=storage.options_for(url))
    sources = sorted(dict.fromkeys(sources))
    fingerprint = _fingerprint(config, model_id)
    markers = {} if config.overwrite else _read_markers(config.output, storage)
    stale = sorted(s for s, m in markers.items() if m.get("fingerprint") != fingerprint)
    if stale:
        raise ConfigError(config.output, f"{len(stale)} committed tile(s) (e.g. {stale[0]}) were made with another "
                                         f"config or model; use a new output or set overwrite=true")
    todo = [s for s in sources if s not in markers]
    skipped = [markers[s] for s in sources if s in markers]
    scrubbed = from_dict(FieldJobConfig, {**to_dict(config), "inputs": [_scrub(u) for u in config.inputs]})
    metadata = provenance(scrubbed, checkpoint=model_id, fingerprint=fingerprint)
    metadata_json = json.dumps(metadata, sort_keys=True, default=str)
    _write_bytes_atomic(_join(config.output, "config.yaml"), dump_config(scrubbed).encode(), storage)

    results: list[dict[str, Any]] = []
    t_run = time.perf_counter()
    if todo:
        init_ray(config.compute)
        ds = build_pipeline(todo, config=config, checkpoint=checkpoint, model=model, metadata_json=metadata_json,
                            fingerprint=fingerprint)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["source"])):
                results.append({k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i])
                                for k in ("tileId", "source", "status", "stage", "reason", "stats")})
    wall = time.perf_counter() - t_run
    summary = _summarise(config, results, skipped, model_id=model_id, wall_s=wall,
                         total_s=time.perf_counter() - t_start, n_sources_total=len(sources), sim_info=sim_info)
    _write_bytes_atomic(_join(config.output, "summary.json"), json.dumps(summary, indent=2, sort_keys=True,
                                                                          default=str).encode(), storage)
    if verbose:
        print(format_summary(summary))
    return summary


def _summarise(config, results, skipped, *, model_id, wall_s, total_s, n_sources_total, sim_info) -> dict[str, Any]:
    done = [r for r in results if r["status"] == "done"]
    failed = [r for r in results if r["status"] != "done"]
    stats_new = [json.loads(r["stats"]) for r in done]
    stats_all = stats_new + [m.get("stats", {}) for m in skipped]

    def total(stats, key):
        return int(sum(s.get(key, 0) for s in stats))

    area_new = float(sum(s.get("area_deg2", 0.0) for s in stats_new))
    n_new = total(stats_new, "n_sources")
    out = config.output.rstrip("/")
    summary: dict[str, Any] = {
        "tiles": {"total": n_sources_total, "done": len(done), "failed": len(failed), "skipped": len(skipped)},
        "sources": total(stats_all, "n_sources"),
        "sources_this_run": n_new,
        "footprints": total(stats_all, "n_footprints"),
        "newly_resolved_blends": total(stats_all, "n_newly_resolved"),
        "enhance_skipped_footprints": total(stats_all, "n_enhance_skipped"),
        "area_deg2": float(sum(s.get("area_deg2", 0.0) for s in stats_all)),
        "throughput": {"wall_s": wall_s, "total_s": total_s,
                       "sources_per_s": n_new / wall_s if wall_s > 0 else 0.0,
                       "deg2_per_hour": area_new / (wall_s / 3600.0) if wall_s > 0 else 0.0},
        "model": model_id,
        "enhance_device": sorted({s.get("enhance_device") for s in stats_new if s.get("enhance_device")}),
        "outputs": {"catalog": f"{out}/catalog/", "failures": f"{out}/failures/", "summary": f"{out}/summary.json",
                    "config": f"{out}/config.yaml"},
        "failures": [{"tileId": r["tileId"], "source": _scrub(r["source"]), "stage": r["stage"],
                      "reason": r["reason"]} for r in failed],
        "stage_seconds": {k: float(sum(s.get("timing", {}).get(k, 0.0) for s in stats_new))
                          for k in sorted({k for s in stats_new for k in s.get("timing", {})})},
    }
    truths = [s["truth"] for s in stats_all if s.get("truth")]
    if truths:
        summary["outputs"].update({"truth": f"{out}/truth/", "blends": f"{out}/blends/"})
        t = {k: int(sum(x.get(k, 0) for x in truths)) for k in truths[0]}
        summary["truth"] = t
    if sim_info:
        summary["outputs"]["input"] = f"{out}/input/"
        summary["simulation"] = sim_info
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """The one-screen text of a run summary."""
    t = summary["tiles"]
    th = summary["throughput"]
    lines = [
        "=" * 78,
        "galgan-ray field run",
        f"  model      {summary['model']['path']}  (sha256 {summary['model']['sha256'][:12]}...)"
        + (f"  on {', '.join(summary['enhance_device'])}" if summary.get("enhance_device") else ""),
        f"  tiles      {t['done']} done, {t['failed']} failed, {t['skipped']} skipped (already committed)"
        f"  of {t['total']}",
        f"  sources    {summary['sources']} in {summary['footprints']} low-resolution footprints"
        f"  ({summary['area_deg2'] * 3600:.2f} arcmin^2)",
        f"  newly resolved blends  {summary['newly_resolved_blends']} footprints with <= 1 low-resolution peak "
        f"split into >= 2 by enhancement",
        f"  throughput {th['sources_per_s']:.1f} sources/s, {th['deg2_per_hour']:.4f} deg^2/hour "
        f"(pipeline {th['wall_s']:.1f} s, job {th['total_s']:.1f} s)",
    ]
    if summary.get("truth"):
        tr = summary["truth"]
        n, nb = max(tr["n_scored"], 1), max(tr["n_blends"], 1)
        lines.append(f"  truth      {tr['n_scored']} scored sources found: high {tr['matched_high'] / n:.0%}, "
                     f"low {tr['matched_low'] / n:.0%}, enhanced {tr['matched_enhanced'] / n:.0%}")
        lines.append(f"             {tr['n_blends']} close pairs, both found: high {tr['blends_found_high'] / nb:.0%}, "
                     f"low {tr['blends_found_low'] / nb:.0%}, enhanced {tr['blends_found_enhanced'] / nb:.0%}")
    for f in summary.get("failures", [])[:5]:
        lines.append(f"  FAILED     tile {f['tileId']} at {f['stage']}: {f['reason'][:160]}")
    if len(summary.get("failures", [])) > 5:
        lines.append(f"  ... and {len(summary['failures']) - 5} more in {summary['outputs']['failures']}")
    lines.append("  outputs")
    for k, v in summary["outputs"].items():
        lines.append(f"    {k:<9}{v}")
    lines.append("=" * 78)
    return "\n".join(lines)


def read_catalog(output: str, *, storage: StorageConfig = StorageConfig(), what: str = "catalog") -> pa.Table:
    """Read one of a run's tables (``catalog``, ``truth``, ``blends``, ``failures``) into Arrow,
    committed tiles only for the per-tile tables (files without a marker are a crashed attempt)."""
    import pyarrow.parquet as pq

    fs, path = _fs(output, storage)
    root = posixpath.join(path, what)
    if not fs.exists(root):
        return pa.table({})
    if what == "failures":
        files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    else:
        committed = {posixpath.basename(posixpath.dirname(p))
                     for p in fs.glob(posixpath.join(path, "catalog", "tile=*", "_COMMITTED"))}
        files = sorted(p for p in fs.glob(posixpath.join(root, "tile=*", "part-0.parquet"))
                       if posixpath.basename(posixpath.dirname(p)) in committed)
    tables = []
    for p in files:
        with fs.open(p, "rb") as fh:
            tables.append(pq.read_table(fh))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="none")


def run_files(output: str, *, what: str = "catalog", storage: StorageConfig = StorageConfig()) -> list[str]:
    """Paths (without protocol) of a run's committed per-tile Parquet files of table ``what``."""
    fs, path = _fs(output, storage)
    committed = {posixpath.basename(posixpath.dirname(p))
                 for p in fs.glob(posixpath.join(path, "catalog", "tile=*", "_COMMITTED"))}
    return sorted(p for p in fs.glob(posixpath.join(path, what, "tile=*", "part-0.parquet"))
                  if posixpath.basename(posixpath.dirname(p)) in committed)


def figures_dir(run: str, figures: str | None = None) -> Path:
    """Where an aggregation job writes its PNGs: ``figures`` if given, else ``RUN/figures`` for a
    local run and ``./figures`` for a run on object storage (created)."""
    local = "://" not in run or run.startswith("file://")
    out = Path(figures or (Path(run.replace("file://", "")) / "figures" if local else "figures"))
    out.mkdir(parents=True, exist_ok=True)
    return out


def read_run_dataset(output: str, *, what: str = "catalog", storage: StorageConfig = StorageConfig(),
                     columns: Sequence[str] | None = None) -> ray.data.Dataset | None:
    """A run's table (``catalog``, ``truth``, ``blends``) as a Ray dataset over its committed files
    (any fsspec URL), or None when the run has none."""
    import pyarrow.fs as pafs

    files = run_files(output, what=what, storage=storage)
    if not files:
        return None
    fs, _ = _fs(output, storage)
    filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    return ray.data.read_parquet(files, filesystem=filesystem, columns=list(columns) if columns else None,
                                 partitioning=None)
