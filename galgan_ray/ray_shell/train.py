"""Data-parallel training with Ray Train: a ``TorchTrainer`` around :func:`galgan_ray.training.train_srgan`.

The worker function is a thin adapter: it finds its rank, its share of the data and the checkpoint to
resume from, then calls the same pure-torch loop as a notebook run, with DistributedDataParallel
(gloo on CPU, NCCL on GPU, via ``ray.train.torch.prepare_model``) as the ``wrap_model`` hook and an
``on_epoch_end`` hook that writes a :mod:`galgan_ray.checkpoint` file into a temporary directory and
calls ``ray.train.report(metrics, checkpoint=...)`` once per epoch (a report blocks for the controller's
poll interval, ~2 s; set ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` lower in tests).

Data may be given as
- a dict of numpy arrays (the galaxy-set layout): put once in the object store, each rank reads it
  and takes its slice of every global batch (``training`` shuffles with ``[seed, epoch]``);
- a list of shard URLs (Parquet, :mod:`galgan_ray.shards`): rank ``r`` reads ``urls[r::world_size]``;
- a ``ray.data.Dataset``: passed as ``datasets``; each rank iterates ``get_dataset_shard(...)``.

Resumption: a run restarted with the same ``storage_path`` and ``name`` continues from its latest
checkpoint. Ray Train restores it from the run's checkpoint-manager snapshot
(``ray.train.get_checkpoint()``); when that snapshot is missing (a job killed before writing it), the
builder scans the run directory for the newest ``checkpoint_epoch_*`` holding a checkpoint file.
"""
from __future__ import annotations

import logging
import os
import posixpath
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import ray
import ray.train
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..checkpoint import CHECKPOINT_FILENAME, load_training_state, save_checkpoint
from ..config import from_dict, to_dict
from ..errors import ConfigError
from ..models import DCGANConfig, SRGANConfig
from ..training import TrainConfig, train_dcgan, train_srgan

__all__ = ["RayTrainConfig", "build_trainer", "train_with_ray", "find_latest_checkpoint", "storage_filesystem"]

CHECKPOINT_PREFIX = "checkpoint_epoch_"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayTrainConfig:
    """Compute knobs of a Ray Train run (the science lives in the model and training configs).

    Attributes
    ----------
    num_workers : int
        Data-parallel workers (one process each).
    use_gpu : bool
        One GPU per worker (NCCL); otherwise CPU with gloo.
    cpus_per_worker : float
        CPUs reserved per worker.
    threads_per_worker : int
        ``torch.set_num_threads`` in each worker.
    storage_path : str or None
        Where runs, checkpoints and results go: a local directory or ``s3://bucket/prefix``
        (None: Ray's default ``~/ray_results``).
    name : str or None
        Run name (a sub-directory of ``storage_path``); keep it to resume a run.
    s3_endpoint : str or None
        S3-compatible endpoint (``http://127.0.0.1:5000`` for moto/MinIO); credentials come from
        the usual ``AWS_*`` environment variables.
    num_to_keep : int or None
        Checkpoints kept (the newest); None keeps all.
    resume : bool
        Continue from the latest checkpoint in ``storage_path/name`` when there is one. With False,
        a run directory that already holds a run is an error (Ray Train would restore it anyway).
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    threads_per_worker: int = 1
    storage_path: str | None = None
    name: str | None = None
    s3_endpoint: str | None = None
    num_to_keep: int | None = 2
    resume: bool = True

    def __post_init__(self):
        if self.num_workers < 1 or self.threads_per_worker < 1:
            raise ConfigError("RayTrainConfig", "num_workers and threads_per_worker must be >= 1")


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------
def storage_filesystem(ray_cfg: RayTrainConfig):
    """``(pyarrow filesystem or None, storage path for RunConfig)``.

    With ``s3_endpoint`` an ``S3FileSystem(endpoint_override=...)`` is built and the ``s3://`` prefix is
    stripped (Ray expects paths on a custom filesystem without the scheme).
    """
    path = ray_cfg.storage_path
    if path is None:
        return None, None
    if ray_cfg.s3_endpoint and path.startswith("s3://"):
        import pyarrow.fs as pafs

        endpoint = ray_cfg.s3_endpoint
        scheme = "https"
        for prefix in ("http://", "https://"):
            if endpoint.startswith(prefix):
                scheme, endpoint = prefix[:-3], endpoint[len(prefix):]
        kwargs: dict[str, Any] = {"endpoint_override": endpoint, "scheme": scheme}
        if os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION"):
            kwargs["region"] = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        return pafs.S3FileSystem(**kwargs), path[len("s3://"):].rstrip("/")
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    return None, path


def find_latest_checkpoint(ray_cfg: RayTrainConfig) -> Checkpoint | None:
    """Newest ``checkpoint_epoch_*`` directory of ``storage_path/name`` holding a checkpoint file, or None."""
    if not (ray_cfg.storage_path and ray_cfg.name):
        return None
    import pyarrow.fs as pafs

    try:
        fs, path = _resolved_fs(ray_cfg)
        infos = fs.get_file_info(pafs.FileSelector(posixpath.join(path, ray_cfg.name), allow_not_found=True))
    except (OSError, ValueError):  # unreachable or unknown store: nothing to resume from
        return None
    cands = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith(CHECKPOINT_PREFIX)), reverse=True)
    for d in cands:
        if fs.get_file_info(posixpath.join(d, CHECKPOINT_FILENAME)).type == pafs.FileType.File:
            return Checkpoint(d, filesystem=fs)
    return None


def _snapshot_exists(ray_cfg: RayTrainConfig) -> bool:
    import pyarrow.fs as pafs

    try:
        fs, path = _resolved_fs(ray_cfg)
        snap = posixpath.join(path, ray_cfg.name, "checkpoint_manager_snapshot.json")
        return fs.get_file_info(snap).type == pafs.FileType.File
    except (OSError, ValueError):
        return False


def _resolved_fs(ray_cfg: RayTrainConfig):
    """``(pyarrow filesystem, path on it)`` of ``storage_path``, resolving URIs as Ray does."""
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(ray_cfg)
    if fs is None:
        fs, path = pafs.FileSystem.from_uri(path) if "://" in path else (pafs.LocalFileSystem(), path)
    return fs, path


# ----------------------------------------------------------------------------------------------
# Worker
# ----------------------------------------------------------------------------------------------
def _data_spec(data, name: str, datasets: dict) -> dict | None:
    """Describe ``data`` for the workers (and register Ray datasets)."""
    if data is None:
        return None
    if isinstance(data, Mapping):
        return {"kind": "object", "ref": ray.put({k: np.asarray(v) for k, v in data.items()})}
    if isinstance(data, (list, tuple)) and all(isinstance(u, str) for u in data):
        return {"kind": "files", "urls": list(data)}
    import ray.data as ray_data  # imported here: ray.data is heavy and only needed for datasets

    if isinstance(data, ray_data.Dataset):
        datasets[name] = data
        return {"kind": "dataset", "name": name}
    raise ConfigError(name, f"expected a dict of arrays, a list of shard URLs or a ray.data.Dataset, "
                            f"got {type(data).__name__}")


def _worker_data(spec: dict | None, *, rank: int, world: int, local_batch: int, read_fn, drop_last: bool = True):
    """``(data, data_is_sharded)`` for :func:`train_srgan` from a spec of :func:`_data_spec`."""
    if spec is None:
        return None, False
    if spec["kind"] == "object":
        return ray.get(spec["ref"]), False
    if spec["kind"] == "files":
        urls = spec["urls"][rank::world]
        if not urls:
            raise ConfigError("train_data", f"{len(spec['urls'])} shard(s) cannot feed {world} workers")
        if read_fn is None:
            from ..shards import read_shards

            def read_fn(url):
                return read_shards(url)[0]
        parts = [read_fn(u) for u in urls]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, True
    shard = ray.train.get_dataset_shard(spec["name"])

    def batches(epoch: int):
        return shard.iter_batches(batch_size=local_batch, batch_format="numpy", drop_last=drop_last)

    return batches, True


def _jsonable(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, str)):
            out[k] = v
        else:
            try:
                out[k] = float(v)
            except (TypeError, ValueError):
                continue
    return out


def _ddp_kwargs() -> dict[str, Any]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: resolve rank, data and checkpoint, run the pure-torch loop, report per epoch."""
    import ray.train.torch as rtt
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["threads"]))
    kind = config["kind"]
    model_cfg = from_dict(SRGANConfig if kind == "srgan" else DCGANConfig, config["model"], where="model")
    train_cfg = from_dict(TrainConfig, config["train"], where="train")
    train_cfg = replace(train_cfg, device=str(rtt.get_device()), num_threads=int(config["threads"]))
    local_batch = max(1, train_cfg.batch_size // world)
    train_data, sharded = _worker_data(config["train_data"], rank=rank, world=world, local_batch=local_batch,
                                       read_fn=config.get("read_fn"))
    val_data, _ = _worker_data(config.get("val_data"), rank=rank, world=world,
                               local_batch=train_cfg.eval_batch_size, read_fn=config.get("read_fn"), drop_last=False)

    ckpt = ray.train.get_checkpoint() or config.get("fallback_checkpoint")
    start_state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start_state = load_training_state(d)
        if rank == 0:
            log.info("resuming after epoch %d from %s", start_state["epoch"], ckpt.path)

    def on_epoch_end(state, metrics):
        metrics = _jsonable(metrics)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, **state.state_dicts(), model_cfg=model_cfg, train_cfg=train_cfg,
                            bands=config.get("bands"), metrics=metrics,
                            extra={"world_size": world, "ray_run": config.get("run_name")})
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{state.epoch:05d}")

    def wrap_model(module):
        # No buffer sync in forward: the discriminator runs twice per step (D step, then G step), and
        # re-broadcasting BatchNorm buffers between the calls would modify tensors autograd still needs.
        # Buffers are still synced once at wrap time; BatchNorm running stats then stay rank-local.
        return rtt.prepare_model(module, parallel_strategy_kwargs=_ddp_kwargs())

    common = dict(train_cfg=train_cfg, model_cfg=model_cfg, on_epoch_end=on_epoch_end, start_state=start_state,
                  rank=rank, world_size=world, wrap_model=wrap_model, data_is_sharded=sharded)
    if kind == "srgan":
        factory = config.get("degrader_factory")
        train_srgan(train_data, val_data, degrader=factory() if factory else None, **common)
    else:
        train_dcgan(train_data, **common)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
def build_trainer(train_data, val_data=None, *, model_cfg: SRGANConfig | DCGANConfig | None = None,
                  train_cfg: TrainConfig | None = None, ray_cfg: RayTrainConfig | None = None,
                  bands: Mapping[str, Sequence] | None = None,
                  degrader_factory: Callable[[], Any] | None = None,
                  read_fn: Callable[[str], Mapping[str, np.ndarray]] | None = None) -> TorchTrainer:
    """A ``TorchTrainer`` that trains the SR GAN (or the DCGAN) data-parallel; call ``.fit()``.

    Parameters
    ----------
    train_data : dict of numpy arrays, list of shard URLs, or ray.data.Dataset
        ``image_lr``, ``image_hr`` (nJy), ``sigma_lr`` (and ``sigma_hr`` for the DCGAN).
    val_data : same, optional
        Validation cutouts (default: ``train_cfg.validation_fraction`` of an in-memory ``train_data``).
    model_cfg : SRGANConfig or DCGANConfig
        Default ``SRGANConfig()``.
    train_cfg : TrainConfig
        ``batch_size`` is global (split over workers); ``device``/``num_threads`` are set per worker.
    ray_cfg : RayTrainConfig
    bands : {"high": [BandConfig, ...], "low": [...]}, optional
        Stored in every checkpoint so :func:`galgan_ray.checkpoint.load_checkpoint` can check them.
    degrader_factory : callable, optional
        Builds the ``TorchDegrader`` in each worker (needed when ``train_cfg.flux_weight > 0``).
    read_fn : callable, optional
        ``url -> dict of arrays`` for shard URLs (default :func:`galgan_ray.shards.read_shards`).

    Returns
    -------
    ray.train.torch.TorchTrainer
        ``fit()`` returns a ``Result`` whose ``metrics`` are the last epoch's (``epoch``, losses,
        ``images_per_s``, ``val_*``, ``baseline_*``) and whose ``checkpoint`` directory holds
        ``checkpoint.pt``.
    """
    model_cfg = model_cfg or SRGANConfig()
    train_cfg = train_cfg or TrainConfig()
    ray_cfg = ray_cfg or RayTrainConfig()
    kind = "srgan" if isinstance(model_cfg, SRGANConfig) else "dcgan"
    if kind == "dcgan" and val_data is not None:
        raise ConfigError("val_data", "the DCGAN has no validation data")
    datasets: dict = {}
    config: dict[str, Any] = {
        "kind": kind,
        "model": to_dict(model_cfg),
        "train": to_dict(train_cfg),
        "threads": ray_cfg.threads_per_worker,
        "train_data": _data_spec(train_data, "train", datasets),
        "val_data": _data_spec(val_data, "val", datasets),
        "bands": _bands_plain(bands),
        "degrader_factory": degrader_factory,
        "read_fn": read_fn,
        "run_name": ray_cfg.name,
    }
    if ray_cfg.storage_path and ray_cfg.name:
        snapshot = _snapshot_exists(ray_cfg)
        if not ray_cfg.resume and (snapshot or find_latest_checkpoint(ray_cfg) is not None):
            raise ConfigError(f"{ray_cfg.storage_path}/{ray_cfg.name}",
                              "holds a previous run; set resume=True to continue it or choose a new name")
        if ray_cfg.resume and not snapshot:
            config["fallback_checkpoint"] = find_latest_checkpoint(ray_cfg)
    fs, path = storage_filesystem(ray_cfg)
    run_config = RunConfig(
        name=ray_cfg.name, storage_path=path, storage_filesystem=fs,
        checkpoint_config=CheckpointConfig(num_to_keep=ray_cfg.num_to_keep),
    )
    scaling = ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                            resources_per_worker={"CPU": ray_cfg.cpus_per_worker})
    return TorchTrainer(_train_loop_per_worker, train_loop_config=config, scaling_config=scaling,
                        run_config=run_config, datasets=datasets or None)


def _bands_plain(bands):
    if bands is None:
        return None
    if not isinstance(bands, Mapping):
        bands = {"high": bands[0], "low": bands[1]}
    return {res: [to_dict(b) for b in bands.get(res, ())] for res in ("high", "low")}


def train_with_ray(train_data, val_data=None, **kwargs):
    """``build_trainer(train_data, val_data, **kwargs).fit()``: the ``ray.train.Result``."""
    return build_trainer(train_data, val_data, **kwargs).fit()
