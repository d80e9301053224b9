"""The field job: its config, the Ray Data pipeline built from the stages, and the run from inputs to summary.

Pipeline (one row per tile from end to end, :mod:`galgan_ray.ray_shell.rows`)::

    TileDatasource (one read task per tile: fsspec bytes -> astropy -> validated Tile)
      -> DegradeStage     (simulation mode only: HR tile -> HSC-like tile, truth carried along)
      -> FootprintStage   (sep footprints + LR peaks on the LR tile, 22x22 cutouts around them)
      -> EnhanceStage     (the GAN, checkpoint loaded once per actor; GPU when the cluster has one)
      -> DetectStage      (peaks on the enhanced cutouts -> children on the tile grid, RA/Dec)
      -> PhotometerStage  (Gaussian-mixture photometry on the LR image; catalog, truth scores)
      -> CommitStage      (per-tile files under deterministic names, then the _COMMITTED marker)

Ray Data runs them as fixed-size actor pools, in one of two layouts (``compute.layout``). Where the
model runs on CPU (``auto``'s choice without GPUs), one pool runs every stage and a second commits::

    ReadTile->MapBatches(ProcessStage)   read + all five stages                 process_actors (one per CPU)
    MapBatches(CommitStage)                                                     commit_actors

Where it runs on GPUs (``stage_pools``), the model has a pool of its own between two CPU pools::

    ReadTile->MapBatches(PrepareStage)   read + DegradeStage + FootprintStage   stage_actors
    MapBatches(EnhanceStage)                                                    enhance_actors (GPU)
    MapBatches(MeasureStage)             DetectStage + PhotometerStage          stage_actors
    MapBatches(CommitStage)                                                     commit_actors

Each actor process imports the stack (seconds of CPU) and each enhancement actor loads and
calibrates the model before its first tile, so on a CPU cluster one pool starts fewer than half the
processes (on 2 CPUs 3 actors against 7); the stages and the catalog are the same in both. The read
tasks ask for the CPUs of the first pool's actor, which lets Ray Data fuse them into that pool, so no
Ray task (and no short-lived worker process) is left in the pipeline. A stage that raises on a tile
turns that row into a failure (stage and reason); the commit writes it to ``OUT/failures/``, so the
rest of the field completes and nothing is dropped silently. The outputs'
layout is :mod:`galgan_ray.outputs`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import posixpath
import time
from dataclasses import dataclass
from typing import Any, Sequence

import fsspec
import ray
import ray.data

from ..checkpoint import ModelGrid, read_checkpoint
from ..config import config_json, dump_config, from_dict, to_dict
from ..enhance import PRECISIONS, resolve_model
from ..errors import ConfigError
from ..field import FieldConfig
from ..hats_catalog import write_hats_catalog
from ..photometry import PhotometryComputeConfig
from ..progress import progress_setting
from ..provenance import provenance
from ..sky import FieldSimConfig, make_simulated_field
from ..storage import StorageConfig, check_writable, join_url, open_fs, scrub_url, write_bytes_atomic
from ..tiles import list_tile_sources
from .commit import CommitStage, claim_output, commit_refused, plan_tiles, read_markers, release_output, run_fingerprint
from .reading import TileDatasource
from .stages import EnhanceStage, MeasureStage, PrepareStage, ProcessStage
from .summary import format_summary, summarise

__all__ = ["FieldComputeConfig", "FieldJobConfig", "init_ray", "check_resources", "check_output", "resolve_model_grid",
           "build_pipeline", "run_field"]

log = logging.getLogger(__name__)


#: The field job's actor layouts (:attr:`FieldComputeConfig.layout`).
LAYOUTS = ("auto", "one_pool", "stage_pools")


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
    enhance_precision : {"fp32", "bf16"}
        Arithmetic of the model's forward pass (:class:`galgan_ray.enhance.Enhancer`): bf16 autocast
        is faster on CPUs with bf16 instructions and changes the catalog (``bench/bench_precision.py``
        measures both; ``tests/test_precision.py`` bounds the change on its scenes); fp32 is the default.
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
    layout : {"auto", "one_pool", "stage_pools"}
        ``stage_pools``: the three pools of the module docstring (``stage_actors``, ``enhance_actors``),
        for a model on GPUs or custom resources. ``one_pool``: every stage in each actor of one pool
        (:class:`~galgan_ray.ray_shell.stages.ProcessStage`, ``process_actors`` of them), the faster
        where the model runs on CPU: fewer than half the processes to start, no tile state between
        processes. ``auto``: ``one_pool`` unless the enhancement asks for GPUs or ``enhance_resources``.
        The catalog is the same either way.
    process_actors : int or None
        Actors of the one pool (no more than the tiles to process); None: one per CPU of the cluster
        when the job starts (on an autoscaling cluster, set it to the CPUs it will grow to).
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
    enhance_precision: str = "fp32"
    io_num_cpus: float = 0.25
    commit_actors: int = 1
    torch_threads: int = 1
    photometry: PhotometryComputeConfig = dataclasses.field(default_factory=lambda: PhotometryComputeConfig(device="cpu"))
    layout: str = "auto"
    process_actors: int | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ConfigError("compute.layout", f"must be one of {list(LAYOUTS)}, got {self.layout!r}")
        if self.process_actors is not None and self.process_actors < 1:
            raise ConfigError("compute.process_actors", f"must be >= 1 or null, got {self.process_actors}")
        if self.num_cpus < 1:
            raise ConfigError("compute.num_cpus", f"a local Ray instance needs at least 1 CPU, got {self.num_cpus}")
        if min(self.stage_actors, self.enhance_actors, self.commit_actors, self.enhance_batch_size) < 1:
            raise ConfigError("compute", "stage_actors, enhance_actors, commit_actors and enhance_batch_size must "
                                         "be >= 1")
        if self.enhance_precision not in PRECISIONS:
            raise ConfigError("compute.enhance_precision", f"must be one of {list(PRECISIONS)}, "
                                                           f"got {self.enhance_precision!r}")
        if self.stage_num_cpus < 0 or self.io_num_cpus < 0 or self.torch_threads < 1:
            raise ConfigError("compute", "CPUs must be >= 0 and torch_threads >= 1")


@dataclass(frozen=True)
class FieldJobConfig:
    """The field job: inputs, output, model, science and compute (``field_default.yaml`` mirrors it).

    Attributes
    ----------
    inputs : tuple of str
        Tile URLs (files, directories, globs; FITS or Parquet). Survey files as delivered (HSC
        data-access cutouts and coadd patches with their PSF files, e.g. ``../shared/data/hsc_coadd_cutout``)
        are grouped into patches by a naming rule or a manifest CSV
        (:func:`galgan_ray.tiles.list_tile_sources`) and brought onto the model's grid as
        ``galgan deblend`` brings one image (:func:`galgan_ray.survey.read_survey_patch`). Empty:
        simulate a field (``simulate``) into ``OUTPUT/input/`` and process it.
    output : str
        Output URL (local path, ``s3://...``, ``gs://...``, ``memory://...``).
    checkpoint : str
        ``"default"`` (the shipped model, :func:`galgan_ray.enhance.default_checkpoint`) or a path/URL.
    overwrite : bool
        Replace what the output holds: the earlier run's tables are removed first and every tile is
        processed, even where another config or model wrote them (a run still writing there is
        refused all the same). Without it a run resumes an output of its own fingerprint only.
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
# Ray and the model
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


def _can_autoscale(compute: FieldComputeConfig) -> bool:
    """Whether the job joined a cluster by address (``ray job submit``, ``cluster/*.yaml``) whose
    autoscaler may add nodes. A local instance, one the caller started in-process, or a cluster whose
    autoscaler runs Ray's read-only provider (``ray start --head`` without ``--autoscaling-config``)
    has fixed resources."""
    address = compute.ray_address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local" and not _read_only_autoscaler()


def _read_only_autoscaler() -> bool:
    """Whether the connected cluster's autoscaler can add no node: Ray's read-only provider, which
    names every node type ``node_<node id>`` in its status report. Unknown (no report yet, another
    autoscaler version): False, so the job waits as on an autoscaling cluster."""
    try:
        from ray._private import ray_constants
        from ray.experimental.internal_kv import _internal_kv_get

        report = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS))["autoscaler_report"]
        types = set((report.get("node_type_mapping") or {}).values())
    except Exception:  # noqa: BLE001 - a private status record; any surprise means "unknown"
        return False
    return bool(types) and all(str(t).startswith("node_") for t in types)


def enhance_gpus_per_actor(compute: FieldComputeConfig) -> float:
    """GPUs per enhancement actor: ``compute.enhance_num_gpus``, or (None) 1 where the cluster has a GPU."""
    if compute.enhance_num_gpus is not None:
        return float(compute.enhance_num_gpus)
    gpus = float(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0.0
    return 1.0 if gpus >= 1 else 0.0


def resolve_layout(compute: FieldComputeConfig, *, enhance_gpus: float) -> str:
    """``one_pool`` or ``stage_pools``: ``compute.layout``, with ``auto`` resolved (one pool unless the
    enhancement asks for GPUs or custom resources)."""
    if compute.layout != "auto":
        return compute.layout
    return "stage_pools" if (enhance_gpus > 0 or compute.enhance_resources) else "one_pool"


def process_actor_count(compute: FieldComputeConfig) -> int:
    """Actors of the one pool: ``compute.process_actors``, or one per CPU of the connected cluster."""
    if compute.process_actors is not None:
        return int(compute.process_actors)
    cpus = float(ray.cluster_resources().get("CPU", 0)) if ray.is_initialized() else float(compute.num_cpus)
    return max(1, int(cpus))


def check_resources(compute: FieldComputeConfig, *, enhance_gpus: float, layout: str = "stage_pools") -> None:
    """Fail fast on resource requests the connected Ray cluster can never satisfy, naming the key.

    On a cluster with fixed resources the actor pools would wait for ever (Ray Data does not give
    up on an actor that cannot be placed): an actor asking for more CPUs or GPUs than any node has,
    or pools asking for more CPUs together than the cluster has. On a cluster joined by address the
    autoscaler may add nodes, so waiting stays allowed and is logged.

    Raises
    ------
    ConfigError
        Naming the ``compute.*`` key that cannot be satisfied.
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    max_cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
    max_gpu = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
    total_cpu = float(sum(r.get("CPU", 0.0) for r in nodes))
    if layout == "one_pool":
        pools = process_actor_count(compute) * compute.stage_num_cpus + compute.commit_actors * compute.io_num_cpus
        formula = "process_actors x stage_num_cpus + commit_actors x io_num_cpus"
    else:
        pools = (2 * compute.stage_actors + compute.enhance_actors) * compute.stage_num_cpus \
            + compute.commit_actors * compute.io_num_cpus
        formula = "(2 stage_actors + enhance_actors) x stage_num_cpus + commit_actors x io_num_cpus"
    problems = []
    if compute.stage_num_cpus > max_cpu:
        problems.append(("compute.stage_num_cpus", f"{compute.stage_num_cpus} CPUs per stage actor, but the largest "
                                                   f"node has {max_cpu:g}"))
    if compute.io_num_cpus > max_cpu:
        problems.append(("compute.io_num_cpus", f"{compute.io_num_cpus} CPUs per commit actor, but the largest node "
                                                f"has {max_cpu:g}"))
    if enhance_gpus > max_gpu:
        problems.append(("compute.enhance_num_gpus", f"{enhance_gpus:g} GPU(s) per enhancement actor, but the "
                                                     f"largest node has {max_gpu:g}"))
    if pools > total_cpu:
        problems.append(("compute.stage_num_cpus", f"the actor pools ask for {pools:g} CPUs together ({formula}) "
                                                   f"and the cluster has {total_cpu:g}; the pipeline would wait for "
                                                   f"ever"))
    if not problems:
        return
    if _can_autoscale(compute):
        for key, what in problems:
            log.warning("%s: %s; waiting for the autoscaler to add nodes", key, what)
        return
    key, what = problems[0]
    raise ConfigError(key, what + " (a cluster of fixed size; lower the request or join an autoscaling cluster "
                                  "with compute.ray_address)")


def resolve_model_grid(checkpoint: str, *, storage: StorageConfig = StorageConfig()) -> tuple[str, ModelGrid, dict]:
    """Checkpoint path/URL, the model's grids and its identity (``path``, ``sha256``)."""
    storage.apply_defaults()
    path = resolve_model(checkpoint)
    _, meta = read_checkpoint(path)
    return path, ModelGrid.from_checkpoint_meta(meta, source=path), {"path": scrub_url(meta["path"]),
                                                                       "sha256": meta["sha256"]}


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the entrypoint of `ray job submit`


def _submitted_job() -> str | None:
    """The submission id when this process is a ``ray job submit`` entrypoint, else None."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id") or "?")
    except (ValueError, AttributeError):
        return "?"


def check_output(output: str, storage: StorageConfig = StorageConfig()) -> str:
    """The output URL of a run, checked before any work starts (a relative local path made absolute).

    :func:`galgan_ray.storage.check_writable` (a folder that can be created and written, or a probe
    object on object storage). A relative local path resolves against the working directory, except
    in a ``ray job submit`` entrypoint: that runs in Ray's copy of the uploaded working directory,
    which Ray deletes with its session, and the submitter's directory is not known there, so it is
    refused. Returns the URL to write (an absolute path for local outputs); a :class:`ConfigError`
    names ``output`` and what is wrong with it.
    """
    url = str(output)
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in (None, "file", "local"):
        path = os.path.expanduser(url.split("://", 1)[1] if protocol else url)
        if not os.path.isabs(path):
            job = _submitted_job()
            if job:
                raise ConfigError("output", f"{url!r} is a relative path, and a `ray job submit` job (here {job}) "
                                            f"runs in Ray's copy of the working directory (deleted with the Ray "
                                            f"session), not where it was submitted; give an absolute path or a URL, "
                                            f"e.g. --set output=$PWD/{path.rstrip('/')} or --set output=s3://BUCKET/RUN")
            path = os.path.abspath(path)
        url = path
    return check_writable(url, storage)


def simulate_inputs(config: FieldJobConfig) -> tuple[list[str], dict]:
    """Make the simulated field under ``OUTPUT/input/`` once (reused when its config matches)."""
    url = join_url(config.output, "input")
    storage = config.storage
    fs, path = open_fs(url, storage)
    stamp = posixpath.join(path, "_SIMULATION.json")
    want = config_json(config.simulate)
    if fs.exists(stamp):
        with fs.open(stamp, "rb") as fh:
            have = json.loads(fh.read())
        if have.get("simulate") == want:
            return [url], have.get("info", {})
    info = make_simulated_field(config.simulate, url, storage_options=storage.options_for(url))
    info = {k: v for k, v in info.items() if k != "tiles"}
    write_bytes_atomic(join_url(url, "_SIMULATION.json"), json.dumps({"simulate": want, "info": info}).encode(), storage)
    return [url], info


def build_pipeline(sources: Sequence[str], *, config: FieldJobConfig, checkpoint: str, model: ModelGrid,
                   metadata_json: str, fingerprint: str, layout: str | None = None) -> ray.data.Dataset:
    """The lazy Ray dataset of the run: read -> stages -> commit (one summary row per tile), in the
    actor layout of the module docstring (``layout``: ``one_pool`` or ``stage_pools``; None:
    :func:`resolve_layout`'s)."""
    c = config.compute
    enhance_gpus = enhance_gpus_per_actor(c)
    layout = layout or resolve_layout(c, enhance_gpus=enhance_gpus)
    if ray.is_initialized():
        check_resources(c, enhance_gpus=enhance_gpus, layout=layout)
    common = dict(batch_size=1, num_cpus=c.stage_num_cpus, zero_copy_batch=False)
    kw = dict(torch_threads=c.torch_threads)
    enhance_kw = dict(batch_size=c.enhance_batch_size, precision=c.enhance_precision, storage=config.storage)
    # 1. Reads with the CPUs of a PrepareStage actor, and PrepareStage with batch_size=None (a batch
    #    is one block, i.e. one tile: a read task yields one 1-row block): Ray Data then fuses the
    #    reads into that pool (it fuses a task-pool map into a following actor pool when their remote
    #    args match and the actor pool asks for no batch size), so tiles are read in warm actors.
    ds = ray.data.read_datasource(TileDatasource(sources, storage=config.storage, model=model,
                                                 footprints=config.field.footprints, detect=config.field.detect),
                                  override_num_blocks=len(sources),
                                  num_cpus=c.stage_num_cpus)
    if layout == "one_pool":
        # 2'. Every stage in one pool (the model on CPU): the read fused in as above.
        ds = ds.map_batches(ProcessStage, fn_constructor_args=(model, checkpoint, config.field),
                            fn_constructor_kwargs=dict(compute=c.photometry, **enhance_kw, **kw),
                            compute=ray.data.ActorPoolStrategy(size=min(process_actor_count(c), len(sources))),
                            **{**common, "batch_size": None})
        return _commit(ds, config=config, metadata_json=metadata_json, fingerprint=fingerprint)
    ds = ds.map_batches(PrepareStage, fn_constructor_args=(model, config.field), fn_constructor_kwargs=kw,
                        compute=ray.data.ActorPoolStrategy(size=c.stage_actors), **{**common, "batch_size": None})
    # 2. The model, on a GPU where the cluster has one.
    enh_args = dict(batch_size=1, zero_copy_batch=False, num_cpus=c.stage_num_cpus, num_gpus=enhance_gpus)
    if c.enhance_resources:
        enh_args["resources"] = dict(c.enhance_resources)
    ds = ds.map_batches(EnhanceStage, fn_constructor_args=(checkpoint, config.field),
                        fn_constructor_kwargs=dict(**enhance_kw, **kw),
                        compute=ray.data.ActorPoolStrategy(size=c.enhance_actors), **enh_args)
    # 3. Children and photometry.
    ds = ds.map_batches(MeasureStage, fn_constructor_args=(model, config.field),
                        fn_constructor_kwargs=dict(compute=c.photometry, **kw),
                        compute=ray.data.ActorPoolStrategy(size=c.stage_actors), **common)
    return _commit(ds, config=config, metadata_json=metadata_json, fingerprint=fingerprint)


def _commit(ds: ray.data.Dataset, *, config: FieldJobConfig, metadata_json: str, fingerprint: str) -> ray.data.Dataset:
    """4. The commit, in warm actors too (as Ray tasks, each commit started a worker that imported the stack)."""
    c = config.compute
    return ds.map_batches(CommitStage, fn_constructor_kwargs=dict(output=config.output, storage=config.storage,
                                                                  metadata_json=metadata_json, fingerprint=fingerprint),
                          compute=ray.data.ActorPoolStrategy(size=c.commit_actors), batch_size=1,
                          num_cpus=c.io_num_cpus, zero_copy_batch=False)


def run_field(config: FieldJobConfig, *, verbose: bool = True) -> dict[str, Any]:
    """Process a field end to end on Ray (see the module docstring), holding its output for the
    run (:func:`~galgan_ray.ray_shell.commit.claim_output`: one output, one run); the committed
    catalog is also written as a HATS catalog (``OUT/hats/``, :mod:`galgan_ray.hats_catalog`).

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
        ``throughput`` (``sources_per_s``, ``deg2_per_hour``, ``wall_s``, ``cores``, ``core_h_per_deg2``,
        ``layout``), ``model``, ``outputs``,
        ``failures`` (list of ``{tileId, source, stage, reason}``), ``hats`` (rows, partitions),
        ``truth`` (simulations).

    Raises
    ------
    ConfigError
        Naming the output, when another run holds it or one with another config or model wrote it
        (unless ``overwrite``).
    """
    claims: list = []
    try:
        return _run_field(config, verbose=verbose, claims=claims)
    finally:
        for claim in claims:
            release_output(claim, storage=config.storage)


def _run_field(config: FieldJobConfig, *, verbose: bool, claims: list) -> dict[str, Any]:
    t_start = time.perf_counter()
    storage = config.storage
    config = dataclasses.replace(config, output=check_output(config.output, storage))
    checkpoint, model, model_id = resolve_model_grid(config.checkpoint, storage=storage)
    fprint = run_fingerprint(config.field, model_id, precision=config.compute.enhance_precision)
    markers = [] if config.overwrite else read_markers(config.output, storage)  # (overwrite clears them)
    claims.append(claim_output(config.output, fingerprint=fprint, model_id=model_id, overwrite=config.overwrite,
                               storage=storage, markers=markers))
    sim_info = None
    if config.inputs:
        inputs = list(config.inputs)
    else:
        inputs, sim_info = simulate_inputs(config)
    sources = []
    for url in inputs:
        sources += list_tile_sources(url, storage_options=storage.options_for(url))
    sources = sorted(dict.fromkeys(sources))
    plan = plan_tiles(sources, markers, storage=storage)  # committed tiles by content, not by path
    todo, skipped = plan.todo, plan.skipped
    scrubbed = from_dict(FieldJobConfig, {**to_dict(config), "inputs": [scrub_url(u) for u in config.inputs]})
    metadata = provenance(scrubbed, checkpoint=model_id, fingerprint=fprint)
    metadata_json = json.dumps(metadata, sort_keys=True, default=str)
    write_bytes_atomic(join_url(config.output, "config.yaml"), dump_config(scrubbed).encode(), storage)

    results = commit_refused(plan.refused, output=config.output, storage=storage, metadata_json=metadata_json)
    t_run = time.perf_counter()
    layout = None
    if todo:
        init_ray(config.compute)
        if progress_setting() is False:  # -q / GALGAN_PROGRESS=0: no Ray Data progress either
            logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # its "disabled" notice
            ray.data.DataContext.get_current().enable_progress_bars = False
        layout = resolve_layout(config.compute, enhance_gpus=enhance_gpus_per_actor(config.compute))
        log.info("actor layout: %s", layout if layout == "stage_pools" else
                 f"one_pool of {process_actor_count(config.compute)} actor(s)")
        ds = build_pipeline(todo, config=config, checkpoint=checkpoint, model=model, metadata_json=metadata_json,
                            fingerprint=fprint, layout=layout)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for i in range(len(batch["source"])):
                results.append({k: (batch[k][i].item() if hasattr(batch[k][i], "item") else batch[k][i])
                                for k in ("tileId", "source", "status", "stage", "reason", "stats")})
    wall = time.perf_counter() - t_run
    cores = float(ray.cluster_resources().get("CPU", config.compute.num_cpus)) if todo else None
    try:
        hats = write_hats_catalog(config.output, storage=storage)
    except Exception as exc:  # noqa: BLE001 - a copy of the committed tables, which stand without it
        log.error("%s: the HATS catalog was not written (jobs/hats_catalog.py retries): %s", config.output, exc)
        hats = {"error": f"{type(exc).__name__}: {exc}"}
    summary = summarise(config, results, skipped, model_id=model_id, wall_s=wall,
                        total_s=time.perf_counter() - t_start, n_sources_total=plan.n_sources, sim_info=sim_info,
                        hats=hats, cores=cores, layout=layout)
    write_bytes_atomic(join_url(config.output, "summary.json"), json.dumps(summary, indent=2, sort_keys=True,
                                                                          default=str).encode(), storage)
    if verbose:
        print(format_summary(summary))
    return summary


