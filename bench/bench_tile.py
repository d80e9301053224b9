"""Where one field tile's time goes: per-stage ms/tile of the pure core, and photometry per source.

Simulates the job's default field (``galgan_ray/data/field_default.yaml``: 2 x 2 tiles of ~40",
HST-like, degraded to HSC-like 0.18"/px), then runs :func:`galgan_ray.field.process_tile` on each
tile in this one process (no Ray, ``--threads`` torch threads, default 1) with the shipped model on
CPU, and reads the per-step clock it keeps (CPU time of the process, and wall time; best of
``--repeats`` per tile, then the mean over tiles). The sky simulation, model
loading and the enhanced-noise calibration are timed apart.

In the same run it fits ``--n-blends`` two-galaxy blends with the batched photometry exactly as
``bench/bench_photometry.py`` does (22 x 22 px, all parameters free), and once more with the
field's photometry settings (centres fixed), and prints the tile photometry's time per source
against both rates. Why a tile costs more per source: boxes up to 64-96 px around footprints of up
to six fitted children (against 22 px and two sources), and the fits that run to ``max_iter``
without converging (flag ``FIT_FAILED``; the script prints how many). A table of the fits by box
side shows where that time goes: big footprints alone in their batch, which run tens of
Levenberg-Marquardt iterations.

    .venv/bin/python bench/bench_tile.py [--tiles-x 2 --tiles-y 2] [--repeats 2] [--n-blends 400]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import yaml

from galgan_ray.field import TILE_STEPS, process_tile

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = tuple(step for steps in TILE_STEPS.values() for step in steps)


def run_tile(tile, *, model, enhancer, rho, config, compute):
    """process_tile on one tile: ms per step as (cpu, wall), the tile's state, catalog rows."""
    res = process_tile(tile, model=model, enhance_fn=enhancer.enhance_plane, rho=rho, config=config,
                       compute=compute)
    times = {s: tuple(1e3 * t for t in res.steps.get(s, (0.0, 0.0))) for s in STAGES}
    return times, res, len(res.catalog)


def record_fits() -> list[dict]:
    """Wrap the field photometry's calls of ``fit_fluxes`` to record each one (a group of footprint
    boxes of one size): boxes, box side, sources, LM iterations per box, CPU ms. Measurement only:
    the wrapped call returns what it returned."""
    from galgan_ray.field import measure

    calls: list[dict] = []
    fit = measure.fit_fluxes

    def recorded(images, **kw):
        c0 = time.process_time()
        res = fit(images, **kw)
        calls.append({"boxes": int(np.shape(images)[0]), "side": int(np.shape(images)[-1]),
                      "sources": int(np.asarray(res["source_mask"]).sum()), "n_iter": np.asarray(res["n_iter"]),
                      "ms": (time.process_time() - c0) * 1e3, "forced": kw["config"].mode == "forced"})
        return res

    measure.fit_fluxes = recorded
    return calls


def print_fits(calls: list[dict], *, n_passes: int) -> None:
    """Where the Gaussian-mixture fits' time goes, per box side: a batch of small boxes converges in a
    few iterations, while a big footprint alone in its batch can run tens of them."""
    if not calls:
        return
    total = sum(c["ms"] for c in calls)
    print(f"\nGaussian-mixture fits by box side (all {n_passes} timed passes; {total / n_passes:.0f} ms CPU per tile "
          f"pass):")
    print(f"  {'side px':>7s} {'calls':>5s} {'boxes':>5s} {'sources':>7s} {'LM iter median':>14s} {'max':>4s} "
          f"{'CPU ms':>8s} {'share':>6s}")
    for side in sorted({c["side"] for c in calls}):
        sel = [c for c in calls if c["side"] == side and not c["forced"]]
        if not sel:
            continue
        it = np.concatenate([c["n_iter"] for c in sel])
        ms = sum(c["ms"] for c in sel)
        print(f"  {side:7d} {len(sel):5d} {sum(c['boxes'] for c in sel):5d} {sum(c['sources'] for c in sel):7d} "
              f"{np.median(it):14.0f} {it.max():4d} {ms:8.0f} {ms / total:6.0%}")
    forced = [c for c in calls if c["forced"]]
    if forced:
        ms = sum(c["ms"] for c in forced)
        print(f"  forced (more children than max_fit_children): {len(forced)} calls, {ms:.0f} ms ({ms / total:.0%})")


def batched_rate(n_blends: int, cfg, *, seed: int = 0) -> tuple[float, float]:
    """ms per source of fit_fluxes on bench_photometry's blends (CPU time), and mean LM iterations."""
    from bench_photometry import make_blends

    from galgan_ray.gmm import fit_psf_mixture
    from galgan_ray.instrument import get_band
    from galgan_ray.photometry import PhotometryComputeConfig, fit_fluxes
    from galgan_ray.psf import draw_psf

    band = get_band("hsc", "i")
    scale = band.pixel_scale_arcsec
    mix, _ = fit_psf_mixture(draw_psf(band.psf, pixel_scale_arcsec=scale), n_gauss=3, pixel_scale_arcsec=scale)
    images, centres, _ = make_blends(n_blends, band=band, seed=seed)
    kw = dict(centres=centres, psf_mixture=mix, noise_sigma=band.sky_sigma, pixel_scale_arcsec=scale, config=cfg,
              compute=PhotometryComputeConfig(device="cpu"))
    fit_fluxes(images[:8], **{**kw, "centres": centres[:8]})  # warm-up
    c0 = time.process_time()
    res = fit_fluxes(images, **kw)
    return (time.process_time() - c0) * 1e3 / (2 * n_blends), float(res["n_iter"].mean())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles-x", type=int, default=None, help="default: the job's simulate.n_tiles_x")
    ap.add_argument("--tiles-y", type=int, default=None, help="default: the job's simulate.n_tiles_y")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per tile (best kept)")
    ap.add_argument("--n-blends", type=int, default=400, help="blends of the batched reference fit")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from dataclasses import replace

    from galgan_ray.config import from_dict
    from galgan_ray.enhance import Enhancer
    from galgan_ray.field import FieldConfig, enhancer_noise_scale
    from galgan_ray.flags import flag_bit
    from galgan_ray.photometry import PhotometryComputeConfig, PhotometryConfig
    from galgan_ray.sky import FieldSimConfig, make_simulated_field
    from galgan_ray.tiles import read_tile_source

    print(f"load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); torch threads {args.threads}")
    job = yaml.safe_load(resources.files("galgan_ray").joinpath("data", "field_default.yaml").read_text())
    config = from_dict(FieldConfig, job["field"], where="field")
    sim = from_dict(FieldSimConfig, job["simulate"], where="simulate")
    sim = replace(sim, n_tiles_x=args.tiles_x or sim.n_tiles_x, n_tiles_y=args.tiles_y or sim.n_tiles_y)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        info = make_simulated_field(sim, tmp)
        tiles = [read_tile_source(u) for u in info["tiles"]]
        print(f"simulated {len(tiles)} tiles of {info['tile_side_arcsec']:.1f}\" ({tiles[0].shape[0]} HR px) in "
              f"{time.perf_counter() - t0:.1f} s (not timed below)")
    t0 = time.perf_counter()
    enhancer = Enhancer("default", device="cpu")
    model = enhancer.grid
    rho = enhancer_noise_scale(enhancer, config)
    print(f"model load + noise calibration: {time.perf_counter() - t0:.1f} s (once per worker; not timed below)")
    compute = PhotometryComputeConfig(device="cpu")
    kw = dict(model=model, enhancer=enhancer, rho=rho, config=config, compute=compute)
    t0 = time.process_time()
    run_tile(tiles[0], **kw)
    print(f"first pass over tile 0 (imports, torch and PSF-mixture warm-up): {(time.process_time() - t0) * 1e3:.0f} ms "
          f"CPU (not in the figures)")

    fits = record_fits()  # every Gaussian-mixture fit of the timed passes below
    best = {s: np.zeros((len(tiles), 2)) for s in STAGES}
    n_children = n_failed = n_rows = 0
    for i, tile in enumerate(tiles):
        runs = [run_tile(tile, **kw) for _ in range(args.repeats)]
        for s in STAGES:
            best[s][i] = np.min([r[0][s] for r in runs], axis=0)
        p = runs[-1][1]
        n_children += len(p.children)
        n_failed += int((p.fluxes.flags & flag_bit("FIT_FAILED") > 0).sum())
        n_rows += runs[-1][2]
    nt = len(tiles)
    print(f"\nper-stage time per tile (mean over {nt} tiles of the best of {args.repeats} passes; 1 process, "
          f"{args.threads} thread(s)):")
    print(f"  {'stage':14s} {'CPU ms':>8s} {'wall ms':>8s}")
    for s in STAGES:
        c, w = best[s].mean(axis=0)
        print(f"  {s:14s} {c:8.1f} {w:8.1f}")
    tot = sum(best[s] for s in STAGES).mean(axis=0)
    print(f"  {'total':14s} {tot[0]:8.1f} {tot[1]:8.1f}")
    phot_ms = best["photometry"][:, 0].sum() / max(n_children, 1)
    print(f"  children measured per tile: {n_children / nt:.1f} (catalog rows: {n_rows / nt:.1f}); "
          f"FIT_FAILED (no convergence in max_iter={config.measure.photometry.max_iter}): {n_failed} of {n_children}")

    print_fits(fits, n_passes=nt * args.repeats)

    print(f"\nbatched reference: fit_fluxes on {args.n_blends} two-galaxy 22x22 blends (bench_photometry's set), "
          f"CPU, {args.threads} thread(s)")
    ref_full, it_full = batched_rate(args.n_blends, PhotometryConfig())
    ref_field, it_field = batched_rate(args.n_blends, config.measure.photometry)
    print(f"  bench_photometry settings (all free):   {ref_full:.3f} ms/source (mean {it_full:.1f} LM iterations)")
    print(f"  the field's settings (centres fixed):   {ref_field:.3f} ms/source (mean {it_field:.1f} LM iterations)")
    print(f"  tile photometry:                        {phot_ms:.3f} ms/source = {phot_ms / ref_full:.1f}x the "
          f"bench_photometry rate, {phot_ms / ref_field:.1f}x the same settings on 22x22 blends")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
