"""Train the SR GAN data-parallel with Ray Train (for ``ray job submit``).

Usage::

    python jobs/train_gan.py                                  # default config, 2 workers, local Ray
    ray job submit --working-dir . -- .venv/bin/python jobs/train_gan.py \\
        --config galgan_ray/data/train_default.yaml --out s3://bucket/models/sr_1band.pt \\
        --set ray_workers=8 --set ray_storage_path=s3://bucket/ray-train

Rerunning with the same ``ray_storage_path`` resumes from the latest checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import ray

from galgan_ray.commands._common import add_config_arguments, config_from_args
from galgan_ray.commands.train import train_on_ray
from galgan_ray.errors import InputError
from galgan_ray.training_job import TrainJobConfig, run_training

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # read by ray.init, not at import


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(p, what="training job (TrainJobConfig)", default="train_default.yaml")
    p.add_argument("--out", default="runs/sr_model.pt", help="checkpoint path or URL")
    p.add_argument("--work-dir", default="runs/train_job")
    args = p.parse_args(argv)
    try:
        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else "local", ignore_reinit_error=True)
        cfg = config_from_args(TrainJobConfig, args, overrides=["use_ray=true"])
        summary = run_training(cfg, out=args.out, work_dir=args.work_dir, train_on_ray=train_on_ray)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": summary["out"], "seconds": round(summary["seconds"], 1),
                      "metrics": summary.get("metrics", {})}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
