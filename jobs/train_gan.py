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
from importlib import resources

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    from galgan_ray.config import load_config
    from galgan_ray.errors import InputError
    from galgan_ray.training_job import TrainJobConfig, run_training

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="TrainJobConfig YAML (default: galgan_ray/data/train_default.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/sr_model.pt", help="checkpoint path or URL")
    p.add_argument("--work-dir", default="runs/train_job")
    args = p.parse_args(argv)
    path = args.config or str(resources.files("galgan_ray").joinpath("data", "train_default.yaml"))
    try:
        import ray

        ray.init(address="auto" if os.environ.get("RAY_ADDRESS") else "local", ignore_reinit_error=True)
        cfg = load_config(TrainJobConfig, path, ["use_ray=true", *args.overrides])
        summary = run_training(cfg, out=args.out, work_dir=args.work_dir)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": summary["out"], "seconds": round(summary["seconds"], 1),
                      "metrics": summary.get("metrics", {})}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
