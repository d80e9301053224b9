"""``galgan train``: train the SR GAN (or the DCGAN) from a config, locally or data-parallel on Ray."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..progress import note
from ..training_job import TrainJobConfig, run_training
from ._common import add_config_arguments, config_from_args

__all__ = ["register", "run", "train_on_ray"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a super-resolution GAN (or the DCGAN) on the simulated sky",
        description="Make the training data from the config (simulated CANDELS-like sky, paper cuts, cleaned "
                    "cutouts, random blends and single galaxies degraded to HSC-like images), train, and write a "
                    "self-describing checkpoint. The shipped default model is reproduced by "
                    "`galgan train --config galgan_ray/data/train_default.yaml --out sr_1band.pt`. "
                    "--set use_ray=true trains data-parallel with Ray Train (ray_workers workers).")
    p.add_argument("--out", required=True, help="checkpoint path or URL (local, s3://, memory://)")
    p.add_argument("--work-dir", default="runs/train", help="scratch folder for the simulated sky")
    p.add_argument("--summary", help="write the training summary (metrics per epoch) as JSON here")
    add_config_arguments(p, what="training job (TrainJobConfig)")
    p.set_defaults(func=run)


def train_on_ray(pairs: dict[str, np.ndarray], *, job: TrainJobConfig, bands: dict[str, list],
                 degrader_factory: Callable[[], Any] | None) -> tuple[str, dict[str, Any]]:
    """Train the SR GAN data-parallel with Ray Train (``job.ray_workers`` workers, ``job.ray_storage_path``):
    the :data:`galgan_ray.training_job.RayTrainFn` that :func:`~galgan_ray.training_job.run_training` calls.

    Returns
    -------
    checkpoint : str
        Path of the last epoch's checkpoint directory (holds ``checkpoint.pt``).
    metrics : dict
        That epoch's metrics.
    """
    # Imported here, not at the top: Ray Train takes ~0.8 s to import, and every `galgan` command
    # imports this module to register itself; only `--set use_ray=true` needs it.
    from ..ray_shell.train import RayTrainConfig, train_with_ray

    result = train_with_ray(pairs, model_cfg=job.model, train_cfg=job.train,
                            ray_cfg=RayTrainConfig(num_workers=job.ray_workers, storage_path=job.ray_storage_path),
                            bands=bands, degrader_factory=degrader_factory)
    return result.checkpoint.path, result.metrics


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(TrainJobConfig, args)
    note(f"galgan train: {cfg.train.epochs} epochs; train_default.yaml (16 epochs) takes ~43 min on one core "
         f"(the training data first, then a bar over the epochs)")
    summary = run_training(cfg, out=args.out, work_dir=args.work_dir, train_on_ray=train_on_ray)
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary, indent=2, default=str))
    m = summary.get("metrics", {})
    print(json.dumps({"checkpoint": summary["out"], "seconds": round(summary["seconds"], 1),
                      "final_metrics": m}, indent=2, default=str))
    return 0
