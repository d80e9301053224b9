"""Benchmark the torch SOM: rows/s, total time, quantisation and topographic error.

Trains the default 32x24 map (``SOMConfig()``) on synthetic 4-column blend parameters
(separation, magnitude difference, size, redshift difference) with 1e5 and 1e6 rows, and, for
reference, a plain numpy online (one row at a time) Kohonen SOM on a small subset.

    .venv/bin/python bench/bench_som.py [--rows 100000 1000000] [--online-rows 20000] [--threads 2]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from galgan_ray.som import SOM, SOMConfig, fit_som


def blend_like_rows(n: int, seed: int = 0) -> np.ndarray:
    """Synthetic, correlated 4-D table shaped like the paper's blend parameters."""
    rng = np.random.default_rng(seed)
    sep = rng.uniform(0.2, 3.0, n)
    dmag = rng.exponential(1.0, n)
    size = rng.lognormal(-0.5, 0.4, n) + 0.1 * dmag
    dz = rng.normal(0.0, 0.5, n) + 0.2 * sep
    return np.c_[sep, dmag, size, dz]


def online_som_numpy(x: np.ndarray, *, shape=(32, 24), epochs: int = 10, lr0=0.5, lr1=0.02,
                     sigma1=1.0, seed: int = 0) -> np.ndarray:
    """Classic online Kohonen SOM (MiniSom-like update), numpy, standardised inputs -> (K, D)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    grid = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2).astype(float)
    weights = x[rng.integers(0, len(x), h * w)].copy()
    sigma0 = max(h, w) / 2.0
    total = epochs * len(x)
    t = 0
    for _ in range(epochs):
        for i in rng.permutation(len(x)):
            frac = t / (total - 1)
            lr = lr0 * (lr1 / lr0) ** frac
            sigma = sigma0 * (sigma1 / sigma0) ** frac
            b = np.argmin(((weights - x[i]) ** 2).sum(1))
            hnb = np.exp(-((grid - grid[b]) ** 2).sum(1) / (2 * sigma**2))
            weights += lr * hnb[:, None] * (x[i] - weights)
            t += 1
    return weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--online-rows", type=int, default=20_000, help="0 skips the numpy online SOM")
    ap.add_argument("--online-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=SOMConfig().epochs)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = SOMConfig(epochs=args.epochs)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, map {cfg.shape}, "
          f"epochs {cfg.epochs} + {cfg.final_batch_iters} full-batch polish, batch <= {cfg.batch_size}; "
          f"rows/s = (epochs + polish) * rows / train time")
    for n in args.rows:
        x = blend_like_rows(n)
        t0 = time.perf_counter()
        som = fit_som(x, config=cfg)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        qe, te = som.quantization_error(x), som.topographic_error(x)
        eval_s = time.perf_counter() - t0
        visits = (cfg.epochs + cfg.final_batch_iters) * n
        print(f"rows {n:>9,d}: train {train_s:7.2f} s  {visits / train_s:11,.0f} rows/s  "
              f"QE {qe:.4f}  TE {te:.4f}  (QE+TE eval {eval_s:.2f} s)")
    if args.online_rows:
        n = args.online_rows
        x = blend_like_rows(n, seed=1)
        xs = (x - x.mean(0)) / x.std(0)
        t0 = time.perf_counter()
        w = online_som_numpy(xs, epochs=args.online_epochs)
        on_s = time.perf_counter() - t0
        ref = SOM(weights_std=w.reshape(32, 24, -1).astype(np.float32), mean=x.mean(0), scale=x.std(0))
        t0 = time.perf_counter()
        som = fit_som(x, config=SOMConfig(epochs=args.online_epochs))
        b_s = time.perf_counter() - t0
        print(f"subset {n:,d} rows, {args.online_epochs} epochs:")
        print(f"  numpy online SOM: {on_s:7.2f} s {args.online_epochs * n / on_s:11,.0f} rows/s  "
              f"QE {ref.quantization_error(x):.4f}  TE {ref.topographic_error(x):.4f}")
        print(f"  torch batch SOM : {b_s:7.2f} s {args.online_epochs * n / b_s:11,.0f} rows/s (epochs only)  "
              f"QE {som.quantization_error(x):.4f}  TE {som.topographic_error(x):.4f}")


if __name__ == "__main__":
    main()
