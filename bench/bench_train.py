"""Training throughput: the plain loop vs 1- and 2-worker Ray TorchTrainers (CPU, one thread per worker).

Usage::

    .venv/bin/python bench/bench_train.py [--n 320] [--batch-size 32] [--steps 8] [--base-width 32]

Images/s are timed *inside* the training loop (steps of each epoch after the first, data batching included,
validation, checkpointing, ``ray.train.report`` and Ray's ~15 s start-up excluded), so the ratios show
the data-parallel overhead itself; the best of ``--repeats`` timed epochs is kept, because on a shared
machine other processes steal cores. Targets: 1-worker overhead <= 10 %; 2 workers ideally ~2x the
1-thread plain loop (gloo all-reduce of ~0.6M parameters per step is the cost).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from galgan_ray.models import SRGANConfig, build_discriminator, build_generator, count_parameters  # noqa: E402
from galgan_ray.ray_shell.train import RayTrainConfig, build_trainer  # noqa: E402
from galgan_ray.training import TrainConfig, train_srgan  # noqa: E402


def toy_galaxies(n: int, seed: int = 0, sigma_lr: float = 20.0) -> dict:
    """Elliptical Gaussian galaxies, blurred (sigma 4 HR px), pooled 3x3 onto 22x22, plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    hr = np.zeros((n, 1, 64, 64), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            x0, y0 = 31.5 + rng.normal(0, 5, 2)
            s, q, th = rng.uniform(1.5, 5), rng.uniform(0.4, 1), rng.uniform(0, np.pi)
            u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
            v = (-(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)) / q
            prof = np.exp(-0.5 * (u**2 + v**2) / s**2)
            hr[i, 0] += 10 ** rng.uniform(3.5, 5) * prof / prof.sum()
    r = torch.arange(25, dtype=torch.float32) - 12
    g = torch.exp(-(r**2) / 32.0)
    k = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None]
    with torch.no_grad():
        blur = F.conv2d(torch.from_numpy(hr), k, padding=12)
        lr = (F.avg_pool2d(F.pad(blur, (1, 1, 1, 1)), 3) * 9.0).numpy()
    lr = (lr + rng.normal(0, sigma_lr, lr.shape)).astype(np.float32)
    return {"image_lr": lr, "image_hr": hr, "sigma_lr": np.full((n, 1), sigma_lr, np.float32)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=320)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed epoch")
    ap.add_argument("--repeats", type=int, default=2, help="timed epochs (after one warm-up epoch); best kept")
    ap.add_argument("--base-width", type=int, default=32)
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args(argv)

    data = toy_galaxies(args.n)
    mc = SRGANConfig(base_width=args.base_width)
    tc = TrainConfig(epochs=1 + args.repeats, batch_size=args.batch_size, validation_fraction=0.0, max_steps_per_epoch=args.steps,
                     device="cpu", num_threads=1, log_every=10**9)
    print(f"model: {mc.architecture} base_width={mc.base_width}: generator {count_parameters(build_generator(mc)):,} "
          f"params, discriminator {count_parameters(build_discriminator(mc)):,}; global batch {tc.batch_size}, "
          f"{args.steps} timed steps; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = []
    for threads in (1, 2):
        t0 = time.perf_counter()
        _, hist = train_srgan(data, model_cfg=mc, train_cfg=TrainConfig(**{**tc.__dict__, "num_threads": threads}))
        rows.append((f"plain loop, {threads} thread(s)", max(h["images_per_s"] for h in hist[1:]),
                     time.perf_counter() - t0))
    torch.set_num_threads(1)
    if not args.skip_ray:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        with tempfile.TemporaryDirectory() as tmp:
            for workers in (1, 2):
                rc = RayTrainConfig(num_workers=workers, threads_per_worker=1, storage_path=tmp,
                                    name=f"bench-{workers}w", resume=False, num_to_keep=None)
                t0 = time.perf_counter()
                res = build_trainer(data, model_cfg=mc, train_cfg=tc, ray_cfg=rc).fit()
                per_epoch = [m["images_per_s"] for _, m in res.best_checkpoints if m["epoch"] > 1]
                rows.append((f"TorchTrainer, {workers} worker(s) x 1 thread", max(per_epoch),
                             time.perf_counter() - t0))
        ray.shutdown()
    base = rows[0][1]
    print(f"{'configuration':<38} {'images/s':>9} {'vs plain 1 thread':>18} {'wall s':>7}")
    for name, ips, wall in rows:
        print(f"{name:<38} {ips:9.1f} {ips / base:17.2f}x {wall:7.1f}")
    if len(rows) == 4:
        print(f"data-parallel overhead at 1 worker: {100 * (1 - rows[2][1] / base):+.1f} % (target <= 10 %); "
              f"2-worker scaling: {rows[3][1] / rows[2][1]:.2f}x of 1 worker")


if __name__ == "__main__":
    main()
