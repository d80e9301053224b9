"""bf16 autocast against float32 for the shipped enhancer, side by side in one run (AMX or AVX-512 BF16 CPUs, GPUs).

Usage::

    .venv/bin/python bench/bench_precision.py            # ~1 min on 2 cores
    .venv/bin/python bench/bench_precision.py --quick    # a smaller image, one repeat

What it measures (one process, ``torch.set_num_threads(--threads)``, default every core it may use):
the shipped 1-band model's ``Enhancer.enhance_plane`` on one LR image of galaxies and stars with
white noise (``--side`` LR px square, the way the field job enhances a tile), in fp32 and under
``precision="bf16"`` (:class:`galgan_ray.enhance.Enhancer`), alternating, best of ``--repeats``;
then the two images' difference (rms over the fp32 image's rms, max, mean offset, total flux); then
[3] the catalogs of the default simulated field (the job's ``simulate`` and ``field`` settings,
:func:`galgan_ray.field.process_tile` per tile, each precision with the noise model calibrated in its
own arithmetic): rows, rows within 0.5 LR px of a row of the other, their largest position and flux
differences, and each catalog's purity against the truth (rows within 0.5" of a true object, as
``../shared/tools/field_purity.py`` counts). The ratio printed last is fp32 wall over bf16 wall.
``tests/test_precision.py`` bounds the catalog differences.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galgan_ray.enhance import Enhancer  # noqa: E402


def sky_plane(side: int, *, seed: int = 0) -> tuple[np.ndarray, float]:
    """Moffat-like galaxies and stars (Gaussian blobs of 0.6" FWHM and wider) on unit white noise."""
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((side, side)).astype(np.float32)
    yy, xx = np.mgrid[:side, :side]
    for _ in range(side * side // 1000):
        x0, y0 = rng.uniform(5, side - 5, 2)
        s = rng.uniform(1.4, 3.0)
        f = 10 ** rng.uniform(1.0, 3.0)
        img += (f * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s**2)) / (2 * np.pi * s**2)).astype(np.float32)
    return img, 1.0


def cpu_bf16_flags() -> str:
    """The CPU's bfloat16 instruction sets (AMX tiles, AVX-512 BF16) as /proc/cpuinfo lists them."""
    try:
        flags = set(open("/proc/cpuinfo").read().split())
    except OSError:
        return "unknown"
    have = sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})
    return ", ".join(have) or "none (bf16 is emulated)"


def field_catalogs(enhancers: dict) -> dict[str, list[dict]]:
    """The default simulated field's catalog and truth per tile, for each enhancer (``process_tile``)."""
    import tempfile
    from importlib import resources

    import yaml

    from galgan_ray.config import from_dict
    from galgan_ray.field import FieldConfig, enhancer_noise_scale, process_tile
    from galgan_ray.sky import FieldSimConfig, make_simulated_field
    from galgan_ray.tiles import read_tile_source

    job = yaml.safe_load(resources.files("galgan_ray").joinpath("data", "field_default.yaml").read_text())
    config = from_dict(FieldConfig, job["field"], where="field")
    with tempfile.TemporaryDirectory() as tmp:
        info = make_simulated_field(from_dict(FieldSimConfig, job["simulate"], where="simulate"), tmp)
        tiles = [read_tile_source(u) for u in info["tiles"]]
    out = {}
    for p, e in enhancers.items():
        noise = enhancer_noise_scale(e, config)
        states = [process_tile(t, model=e.grid, enhance_fn=e.enhance_plane, rho=noise, config=config) for t in tiles]
        out[p] = [{"catalog": s.catalog.columns, "truth": s.truth.truth} for s in states]
    return out


def _purity(tiles: list[dict], radius_arcsec: float = 0.5) -> tuple[int, float]:
    ra = np.concatenate([t["catalog"]["coord_ra"] for t in tiles])
    dec = np.concatenate([t["catalog"]["coord_dec"] for t in tiles])
    tra = np.concatenate([t["truth"]["coord_ra"] for t in tiles])
    tdec = np.concatenate([t["truth"]["coord_dec"] for t in tiles])
    d = np.hypot((ra[:, None] - tra[None]) * np.cos(np.radians(dec[:, None])), dec[:, None] - tdec[None]) * 3600
    return len(ra), float(np.mean(d.min(axis=1) <= radius_arcsec)) if len(ra) else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--side", type=int, default=None, help="LR image side (default 512; --quick 256)")
    ap.add_argument("--repeats", type=int, default=None, help="best of (default 3; --quick 1)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    side = args.side or (256 if args.quick else 512)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    plane, sigma = sky_plane(side)
    enh = {p: Enhancer("default", device="cpu", precision=p) for p in ("fp32", "bf16")}
    print(f"[1] Enhancer.enhance_plane on a {side}x{side} LR image, {args.threads} thread(s), best of {repeats}; "
          f"torch {torch.__version__}; CPU bf16 flags: {cpu_bf16_flags()}")
    for e in enh.values():  # warm-up: oneDNN picks its kernels on the first call
        e.enhance_plane(plane[:96, :96], sigma)
    best = {p: np.inf for p in enh}
    out = {}
    for _ in range(repeats):
        for p, e in enh.items():
            t = time.perf_counter()
            out[p] = e.enhance_plane(plane, sigma)
            best[p] = min(best[p], time.perf_counter() - t)
    mpix = side * side / 1e6
    for p in enh:
        print(f"    {p}: {best[p]:.2f} s  ({mpix / best[p]:.3f} LR Mpx/s)")
    a, b = out["fp32"], out["bf16"]
    d = b - a
    noise = 1.4826 * np.median(np.abs(a - np.median(a)))  # the enhanced image's per-pixel noise (MAD)
    print(f"[2] bf16 - fp32: rms {d.std():.4g} (fp32 image rms {a.std():.4g}: {d.std() / a.std():.2%}), "
          f"max |diff| {np.abs(d).max():.4g} (image max {a.max():.4g})")
    print(f"    mean offset per HR pixel {d.mean():+.3g} = {d.mean() / noise:+.2g} x the pixel noise ({noise:.3g}); "
          f"summed over all {d.size} HR pixels it changes the image's total flux by {b.sum() / a.sum() - 1:+.2%} "
          f"(a source's flux is a sum over a few hundred pixels: see the catalogs)")
    cats = field_catalogs(enh)
    pairs = []
    for a, b in zip(cats["fp32"], cats["bf16"]):
        ca, cb = a["catalog"], b["catalog"]
        if len(ca["x"]) and len(cb["x"]):
            d = np.hypot(ca["x"][:, None] - cb["x"][None], ca["y"][:, None] - cb["y"][None])
            j, dmin = d.argmin(axis=1), d.min(axis=1)
            same = dmin < 0.5
            band = next(k for k in ca if k.endswith("_gmmFlux"))
            err = ca[band + "Err"][same]
            pairs.append((dmin[same], np.abs(cb[band][j[same]] - ca[band][same]) / err,
                          ca["flags"][same] == cb["flags"][j[same]]))
    dpos, dflux, flags_same = (np.concatenate(v) for v in zip(*pairs))
    (n32, p32), (n16, p16) = _purity(cats["fp32"]), _purity(cats["bf16"])
    print(f"[3] the default simulated field ({len(cats['fp32'])} tiles, process_tile): fp32 {n32} rows (purity {p32:.3f}), "
          f"bf16 {n16} rows (purity {p16:.3f}); {len(dpos)} fp32 rows have a bf16 row within 0.5 LR px: position "
          f"difference max {dpos.max():.3f} LR px, gmmFlux difference max {dflux.max():.2f} sigma (median "
          f"{np.median(dflux):.3f}), flags equal on {flags_same.mean():.1%}")
    print(f"summary: bf16_speedup={best['fp32'] / best['bf16']:.2f} (fp32 wall / bf16 wall, same image, same threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
