"""Survey operations: the field job's overhead, scaling, memory, cost per square degree, and sep alone.

Usage::

    .venv/bin/python bench/bench_field.py            # 4 field runs + references: ~8-10 min on 2 idle cores (est.)
    .venv/bin/python bench/bench_field.py --quick    # smoke run: tiles of half the side, 1 and 4 tiles
    .venv/bin/python bench/bench_field.py --workdir DIR [--report-only]   # keep fields/logs; reprint a report

Every figure is measured in this one run, side by side:

- Two simulated fields of HSC-like tiles (:func:`galgan_ray.sky.make_simulated_field`, the job's
  ``simulate`` settings from ``galgan_ray/data/field_default.yaml``): the **base** field (2x2 tiles;
  ``--quick``: 1 tile of half the side) and a **4x** field (4x4 tiles; ``--quick``: 2x2). They are
  simulated before any timing and given to the job as ``inputs`` (so the sky simulation is in no figure).
- Field runs, each in a fresh Python process that starts its own local Ray (``init_ray`` with the
  job's compute config, timed apart) and calls :func:`galgan_ray.ray_shell.job.run_field`. The
  process is pinned to ``k`` cores (``sched_setaffinity``; Ray's processes inherit it, and the
  report prints the CPUs every process of the tree was allowed) with ``compute.num_cpus = k`` and
  ``k`` actors per stage (``stage_actors = enhance_actors = k``, 1 torch thread each, fractional CPUs
  so the stage pools and the commit actor fit): base and 4x at 2 cores, base and 4x at 1 core.
  The parent samples the resident memory of the process tree every ``--interval`` s from ``/proc``.
  "Steady state" is the 4x run minus the base run on the same cores (extra sources over extra wall
  time), so the fixed start-up costs cancel.
- A reference process (all cores): the same tiles degraded and cut exactly as the pipeline does
  (:func:`galgan_ray.degrade.degrade_tile`, ``find_footprints``, ``cut_footprint_cutouts``), then
  (a) the shipped :class:`galgan_ray.enhance.Enhancer` alone on exactly those cutouts (batch 256,
  all cores, and 1 thread), (b) sep alone (``sep.Background`` + ``sep.extract`` with its default
  deblending) on the same low-resolution tiles.

- Real-format copies of both fields: each HR tile degraded once, as the pipeline would (untimed), and
  written as a low-resolution tile on the model's grid without truth (what a survey delivers after
  ``galgan_ray.survey.to_model_tile``), so the runs on them have no degradation and no truth stage.
  Base and 4x on 2 cores; their per-area cost is ``cost_real``.

Sections: [2] pipeline overhead, [3] scaling 1 -> 2 workers, [4] memory base -> 4x, [5] cost per
square degree (CPU, and one GPU projected), [6] detection alone; each prints its ratio and target.
The report ends with one line, ``summary: cost_real=X pipeline_over_enhance=Y scaling_2w=Z cost_sim=W``:
core-h/deg^2 on the real-format tiles (steady state: 2 cores x extra wall / extra area, per area of sky,
never scaled by catalog rows; the sky's true density is printed in [5]); end-to-end field throughput
over the Enhancer's alone on the same tiles (``Enhancer.enhance_plane`` where the pipeline enhances);
2 workers over 1, end to end; the same cost as ``cost_real`` for the simulated tiles.
"Pipeline wall" is run_field's own ``throughput.wall_s``: from building the Ray dataset to the last
committed tile (actor start-up, model loading and noise calibration included; ``ray.init`` excluded and
shown apart).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: HSC-Wide detected-source density (deg^-2) used in [5]; see bench/README.md for the source.
HSC_WIDE_DENSITY_DEG2 = 2.0e5
#: Rubin's deblending step, core-hours per deg^2 (the figure quoted in the "Survey operations" issue).
RUBIN_DEBLEND_CORE_H_DEG2 = 10.6
#: Effective GPU throughput assumed for the projection in [5] (TFLOP/s on this model's convolutions).
GPU_EFFECTIVE_TFLOPS = 20.0


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------
def _default_yaml() -> str:
    return str(resources.files("galgan_ray").joinpath("data", "field_default.yaml"))


def job_config(inputs: str, output: str, *, workers: int, quick: bool):
    """The default field job on ``inputs`` with ``workers`` CPUs and as many actors per stage."""
    from galgan_ray.config import load_config
    from galgan_ray.ray_shell.job import FieldJobConfig

    # Three stage pools of `workers` actors at 0.15 CPU plus the commit actor at 0.1 stay below `workers`.
    overrides = [f"inputs=[{inputs!r}]", f"output={output!r}", f"compute.num_cpus={workers}",
                 f"compute.stage_actors={workers}", f"compute.enhance_actors={workers}",
                 "compute.stage_num_cpus=0.15", "compute.io_num_cpus=0.1", "compute.torch_threads=1"]
    if quick:
        overrides.append("field.noise_realizations=16")
    return load_config(FieldJobConfig, _default_yaml(), overrides)


def sim_config(*, tiles_per_side: int, quick: bool):
    from galgan_ray.config import load_config
    from galgan_ray.ray_shell.job import FieldJobConfig

    sim = load_config(FieldJobConfig, _default_yaml()).simulate
    import dataclasses

    inner = sim.tile_inner_arcsec / 2 if quick else sim.tile_inner_arcsec
    return dataclasses.replace(sim, n_tiles_x=tiles_per_side, n_tiles_y=tiles_per_side, tile_inner_arcsec=inner)


# ------------------------------------------------------------------------------------------------
# Memory of a process tree, from /proc (Linux)
# ------------------------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _tree(pid: int) -> list[int]:
    kids, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def _rss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def _pss(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpus_allowed(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("Cpus_allowed_list:"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


class TreeSampler(threading.Thread):
    """Peak resident memory of a process and its descendants, sampled every ``interval`` s.

    RSS every sample (cheap: ``/proc/PID/statm``); PSS (``smaps_rollup``, shared pages divided among
    the processes mapping them) only when the RSS sum reaches a new peak, at most once a second,
    because reading it costs ~5 ms per process.
    """

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop_event = threading.Event()
        self.driver_peak = self.sum_peak = self.other_peak = 0
        self.pss_at_peak = 0
        self.procs_at_peak = 0
        self.max_procs = 0
        self.samples = 0
        self.cpus: dict[str, int] = {}
        self._seen: set[int] = set()
        self._last_pss = 0.0

    def run(self):
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self):
        pids = _tree(self.pid)
        rss = {p: r for p in pids if (r := _rss(p)) is not None}
        if not rss:
            return
        self.samples += 1
        total = sum(rss.values())
        self.driver_peak = max(self.driver_peak, rss.get(self.pid, 0))
        self.other_peak = max([self.other_peak] + [r for p, r in rss.items() if p != self.pid])
        self.max_procs = max(self.max_procs, len(rss))
        for p in rss:
            if p not in self._seen:
                self._seen.add(p)
                c = _cpus_allowed(p)
                if c is not None:
                    self.cpus[c] = self.cpus.get(c, 0) + 1
        if total > self.sum_peak:
            self.sum_peak, self.procs_at_peak = total, len(rss)
            now = time.monotonic()
            if now - self._last_pss >= 1.0:
                self._last_pss = now
                self.pss_at_peak = sum(v for p in rss if (v := _pss(p)) is not None)

    def result(self) -> dict:
        return {"driver_peak": self.driver_peak, "sum_peak": self.sum_peak, "other_peak": self.other_peak,
                "pss_at_peak": self.pss_at_peak, "procs_at_peak": self.procs_at_peak, "max_procs": self.max_procs,
                "samples": self.samples, "cpus_allowed": self.cpus}


# ------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------
def child_run(spec: dict) -> dict:
    """One field run in this (fresh) process: Ray started here, run_field, summary out."""
    import ray

    from galgan_ray.ray_shell.job import init_ray, run_field

    cfg = job_config(spec["inputs"], spec["output"], workers=spec["workers"], quick=spec["quick"])
    t0 = time.perf_counter()
    init_ray(cfg.compute)
    ray_init_s = time.perf_counter() - t0
    summary = run_field(cfg, verbose=False)
    ray.shutdown()
    # Cutouts the job enhanced: the per-tile stats in the commit markers (the summary does not total them).
    n_cutouts = sum(json.loads(p.read_text())["stats"].get("n_cutouts", 0)
                    for p in Path(spec["output"]).glob("catalog/tile=*/_COMMITTED"))
    return {"summary": summary, "ray_init_s": ray_init_s, "n_cutouts": n_cutouts,
            "affinity": sorted(os.sched_getaffinity(0))}


def child_reference(spec: dict) -> dict:
    """Enhancement alone and sep alone on the tiles of ``spec['inputs']``, cut as the pipeline cuts them."""
    import numpy as np
    import sep
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from galgan_ray.enhance import Enhancer
    from galgan_ray.degrade import degrade_tile
    from galgan_ray.field import check_tile, cut_footprint_cutouts, find_footprints
    from galgan_ray.field.cutouts import median_sigma
    from galgan_ray.ray_shell.job import resolve_model_grid
    from galgan_ray.tiles import list_tile_sources, read_tile

    cfg = job_config(spec["inputs"], spec["output"], workers=1, quick=spec["quick"])
    fc = cfg.field
    checkpoint, model, _ = resolve_model_grid(cfg.checkpoint)
    repeats = spec["repeats"]
    cores = len(os.sched_getaffinity(0))

    # 1. The pipeline's LR tiles and cutouts (untimed).
    lr_images, cuts, sigmas, truth_faint = [], [], [], 0
    planes = []  # (image_sub, sigma, need): what the enhancement stage enhances per tile
    area = 0.0
    for src in list_tile_sources(spec["inputs"]):
        with open(src, "rb") as fh:
            tile = read_tile(fh.read(), source=src)
        if check_tile(tile, model=model) == "simulation":
            tile = degrade_tile(tile, config=model.degrade_config(), seed=fc.seed, add_noise=fc.degrade_add_noise)
        if tile.truth is not None:
            t = tile.truth
            truth_faint += int((tile.owns(t["x"], t["y"]) & (np.asarray(t["mag"]) < 26.0)).sum())
        area += tile.inner_area_deg2()
        fp = find_footprints(tile, config=fc.footprints, detect=fc.detect)
        cc = cut_footprint_cutouts(fp, tile.variance, config=fc.cutouts, side=model.lr_size)
        cuts.append(cc.image)
        sigmas.append(cc.sigma)
        h, w = fp.image_sub.shape[1:]
        need = np.zeros((h, w), dtype=bool)
        for x0, y0 in cc.origin:
            need[max(y0, 0):max(min(y0 + model.lr_size, h), 0), max(x0, 0):max(min(x0 + model.lr_size, w), 0)] = True
        planes.append((fp.image_sub.astype(np.float32), median_sigma(tile.variance).astype(np.float32), need))
        lr_images.append(np.ascontiguousarray(tile.image[0], dtype=np.float32))
    image = np.concatenate(cuts)
    sigma = np.concatenate(sigmas)

    # 2. Enhancement alone: the shipped Enhancer, batch 256, all cores, then 1 thread.
    enh = Enhancer(checkpoint, device="cpu", batch_size=256)
    with torch.no_grad(), FlopCounterMode(display=False) as flop_counter:
        enh.generator(torch.zeros(1, enh.n_bands, enh.lr_size, enh.lr_size))
    enhance_s = {}
    for threads, passes in ((cores, repeats), (1, 1)):  # 1 thread: only [6]'s per-tile multiple of sep uses it
        torch.set_num_threads(threads)
        enh.enhance_cutouts(image[:256], sigma[:256])  # warm-up
        best = float("inf")
        for _ in range(passes):
            t0 = time.perf_counter()
            enh.enhance_cutouts(image, sigma)
            best = min(best, time.perf_counter() - t0)
        enhance_s[threads] = best
    # The pipeline's own enhancement: each tile enhanced once, without seams, where cutouts lie.
    torch.set_num_threads(cores)
    enh.enhance_plane(*planes[0][:2], need=planes[0][2])  # warm-up
    plane_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for img, sig, need in planes:
            enh.enhance_plane(img, sig, need=need)
        plane_s = min(plane_s, time.perf_counter() - t0)

    # 3. sep alone on the same LR tiles (background + extraction with its default deblending).
    sep_s, sep_n = [], []
    thresh = fc.footprints.thresh_sigma
    for img in lr_images:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            bkg = sep.Background(img)
            objs = sep.extract(img - bkg, thresh, err=bkg.globalrms, minarea=fc.footprints.min_area_px)
            best = min(best, time.perf_counter() - t0)
        sep_s.append(best)
        sep_n.append(len(objs))
    return {"n_cutouts": int(len(image)), "n_tiles": len(lr_images), "tile_shape": list(lr_images[0].shape),
            "area_deg2": area, "truth_mag26_owned": truth_faint,
            "flops_per_cutout": int(flop_counter.get_total_flops()),
            "enhance_s_all_cores": enhance_s[cores], "enhance_s_1_thread": enhance_s[1], "cores": cores,
            "enhance_plane_s_all_cores": plane_s,
            "sep_s_per_tile": float(np.mean(sep_s)), "sep_objects": int(sum(sep_n)),
            "sep_thresh_sigma": thresh}


def write_real_format(hr_dir: str, out_dir: str) -> list[str]:
    """Each simulated HR tile of ``hr_dir`` degraded as the pipeline degrades it (the job's seed and
    noise) and written to ``out_dir`` as a low-resolution tile on the model's grid without truth."""
    import dataclasses

    from galgan_ray.degrade import degrade_tile
    from galgan_ray.field import check_tile
    from galgan_ray.ray_shell.job import resolve_model_grid
    from galgan_ray.tiles import list_tile_sources, read_tile, write_tile

    cfg = job_config(hr_dir, str(Path(out_dir) / "unused"), workers=1, quick=False)
    _, model, _ = resolve_model_grid(cfg.checkpoint)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for src in list_tile_sources(hr_dir):
        with open(src, "rb") as fh:
            tile = read_tile(fh.read(), source=src)
        if check_tile(tile, model=model) == "simulation":
            tile = degrade_tile(tile, config=model.degrade_config(), seed=cfg.field.seed,
                                add_noise=cfg.field.degrade_add_noise)
        tile = dataclasses.replace(tile, truth=None)
        written.append(write_tile(tile, str(Path(out_dir) / Path(src).name)))
    return written


def launch(role: str, spec: dict, *, cores: list[int], log: Path, interval: float) -> dict:
    """Run a child role pinned to ``cores``; sample its process tree's memory; return its result."""
    out = log.with_suffix(".json")
    spec = {**spec, "result": str(out)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", role, json.dumps(spec)]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: os.sched_setaffinity(0, set(cores)))
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        sampler.stop_event.set()
        sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0 or not out.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{role} child failed (exit {rc}); last lines of {log}:\n{tail}")
    res = json.loads(out.read_text())
    res["memory"] = sampler.result()
    res["process_wall_s"] = wall
    return res


# ------------------------------------------------------------------------------------------------
# Report helpers
# ------------------------------------------------------------------------------------------------
def _mb(b: float) -> str:
    return f"{b / 2**20:7.0f} MB"


def _verdict(value: float, target: float, *, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"({'meets' if ok else 'misses'} the target {'>=' if at_least else '<='} {target:g})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiles of half the side, 1 and 4 tiles")
    ap.add_argument("--workdir", help="keep simulated fields and run outputs here (default: a temporary directory, "
                                      "removed at the end); simulated fields found here are reused")
    ap.add_argument("--interval", type=float, default=0.2, help="memory sampling interval, s (default 0.2)")
    ap.add_argument("--repeats", type=int, default=None, help="passes of the reference timings, best kept "
                                                              "(default 3; quick 1)")
    ap.add_argument("--hsc-density", type=float, default=HSC_WIDE_DENSITY_DEG2,
                    help=f"HSC-Wide detected sources per deg^2 (default {HSC_WIDE_DENSITY_DEG2:g})")
    ap.add_argument("--gpu-tflops", type=float, default=GPU_EFFECTIVE_TFLOPS,
                    help=f"effective GPU TFLOP/s assumed for the projection (default {GPU_EFFECTIVE_TFLOPS:g})")
    ap.add_argument("--report-only", action="store_true",
                    help="print the report again from WORKDIR/results.json of an earlier run (needs --workdir)")
    ap.add_argument("--_child", nargs=2, metavar=("ROLE", "SPEC"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._child:
        role, spec = args._child[0], json.loads(args._child[1])
        res = child_run(spec) if role == "run" else child_reference(spec)
        Path(spec["result"]).write_text(json.dumps(res, default=str))
        return 0

    if args.report_only:
        if not args.workdir:
            ap.error("--report-only needs --workdir")
        saved = json.loads((Path(args.workdir) / "results.json").read_text())
        runs = {(r["field"], r["cores"]): r for r in saved["runs"]}
        args.quick = saved.get("quick", False)
        report(runs, saved["reference"], args, load=(saved["load_start"], saved.get("load_end", float("nan"))),
               total_s=saved["total_s"])
        return 0
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        print("needs at least 2 cores (1- and 2-worker runs)", file=sys.stderr)
        return 2
    repeats = args.repeats or (1 if args.quick else 3)
    tmp = None if args.workdir else tempfile.mkdtemp(prefix="bench_field_")
    work = Path(args.workdir or tmp).resolve()
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    t_all = time.perf_counter()
    try:
        from galgan_ray.config import config_json
        from galgan_ray.sky import make_simulated_field

        # Simulate the two fields once (no timing depends on this).
        fields = {}
        for name, side in (("base", 1 if args.quick else 2), ("4x", 2 if args.quick else 4)):
            sim = sim_config(tiles_per_side=side, quick=args.quick)
            d = work / f"input_{name}{'_quick' if args.quick else ''}"
            stamp = d / "_BENCH_SIM.json"
            if not (stamp.exists() and stamp.read_text() == config_json(sim)):
                shutil.rmtree(d, ignore_errors=True)
                info = make_simulated_field(sim, str(d))
                stamp.write_text(config_json(sim))
                print(f"simulated the {name} field: {len(info['tiles'])} tiles in {info['seconds']:.0f} s -> {d}",
                      flush=True)
            fields[name] = (str(d), side * side)

        for name in ("base", "4x"):  # the real-format copies (degraded once, no truth), untimed
            src, n = fields[name]
            d = Path(src + "_real")
            stamp = d / "_BENCH_REAL.json"
            if not (stamp.exists() and stamp.read_text() == (Path(src) / "_BENCH_SIM.json").read_text()):
                shutil.rmtree(d, ignore_errors=True)
                write_real_format(src, str(d))
                stamp.write_text((Path(src) / "_BENCH_SIM.json").read_text())
            fields[name + "_real"] = (str(d), n)

        runs = {}
        plan = [("base", 2), ("4x", 2), ("base", 1), ("4x", 1), ("base_real", 2), ("4x_real", 2)]
        for name, k in plan:
            out = work / f"out_{name}_{k}cpu"
            shutil.rmtree(out, ignore_errors=True)  # a rerun must not skip committed tiles
            print(f"field run: {name} field ({fields[name][1]} tiles), {k} core(s) ...", flush=True)
            runs[(name, k)] = launch("run", {"inputs": fields[name][0], "output": str(out), "workers": k,
                                             "quick": args.quick},
                                     cores=allowed[:k], log=work / f"run_{name}_{k}cpu.log", interval=args.interval)
        print("reference: enhancement alone and sep alone on the 4x field's cutouts and tiles ...", flush=True)
        ref = launch("reference", {"inputs": fields["4x"][0], "output": str(work / "ref"), "repeats": repeats,
                                   "quick": args.quick},
                     cores=allowed[:2], log=work / "reference.log", interval=args.interval)
        total_s, load_end = time.perf_counter() - t_all, os.getloadavg()[0]
        (work / "results.json").write_text(json.dumps(
            {"runs": [{**r, "field": n, "cores": k} for (n, k), r in runs.items()], "reference": ref,
             "load_start": load_start, "load_end": load_end, "total_s": total_s, "quick": args.quick}, default=str))
        report(runs, ref, args, load=(load_start, load_end), total_s=total_s)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _run_figures(r: dict, cores: int) -> dict:
    s = r["summary"]
    wall = s["throughput"]["wall_s"]
    return {"tiles": s["tiles"]["done"], "failed": s["tiles"]["failed"], "sources": s["sources_this_run"],
            "footprints": s["footprints"], "area": s["area_deg2"], "wall": wall, "sps": s["sources_this_run"] / wall,
            "deg2_s": s["area_deg2"] / wall, "stages": s.get("stage_seconds", {}), "cores": cores,
            "ray_init": r["ray_init_s"], "mem": r["memory"], "process_wall": r["process_wall_s"]}


def _steady(big: dict, base: dict) -> dict | None:
    """Throughput of the tiles the 4x run has beyond the base run (start-up costs cancel)."""
    dn, da, dw = big["sources"] - base["sources"], big["area"] - base["area"], big["wall"] - base["wall"]
    if dw <= 0 or dn <= 0:
        return None
    return {"sps": dn / dw, "deg2_s": da / dw, "cores": big["cores"], "wall": dw, "sources": dn, "area": da}


def report(runs: dict, ref: dict, args, *, load: tuple[float, float], total_s: float) -> None:
    import torch

    base2, big2, base1, big1 = (_run_figures(runs[k], k[1]) for k in
                                (("base", 2), ("4x", 2), ("base", 1), ("4x", 1)))
    steady2, steady1 = _steady(big2, base2), _steady(big1, base1)
    has_real = ("4x_real", 2) in runs and ("base_real", 2) in runs
    if has_real:
        baseR, bigR = _run_figures(runs[("base_real", 2)], 2), _run_figures(runs[("4x_real", 2)], 2)
        steadyR = _steady(bigR, baseR)
    for f, name in ((base2, "base/2"), (big2, "4x/2"), (base1, "base/1"), (big1, "4x/1")):
        if f["failed"]:
            print(f"WARNING: {f['failed']} tile(s) failed in the {name} run; figures count done tiles only")
    n_cut = ref["n_cutouts"]
    if runs[("4x", 2)].get("n_cutouts") != n_cut:
        print(f"WARNING: the reference cut {n_cut} cutouts, the 4x/2 job {runs[('4x', 2)].get('n_cutouts')}")
    repeats = args.repeats or (1 if args.quick else 3)
    print("=" * 100)
    print(f"bench_field{' --quick' if args.quick else ''}: {os.cpu_count()} CPUs, torch {torch.__version__}; load "
          f"average {load[0]:.1f} at the start, {load[1]:.1f} at the end; {total_s:.0f} s in all")
    print(f"fields: base {base2['tiles']} tile(s), 4x {big2['tiles']} tiles, {ref['tile_shape'][0]}x"
          f"{ref['tile_shape'][1]} LR px each (4x: {big2['area'] * 3600:.2f} arcmin^2 owned); a run on k cores has "
          f"num_cpus=k and k actors per stage, 1 torch thread each")
    print("CPUs allowed to the processes of each run (list: processes): "
          + "; ".join(f"{n}/{k}: {runs[(n, k)]['memory']['cpus_allowed']}" for n, k in runs))
    print('"pipeline wall" = run_field\'s throughput.wall_s: Ray dataset built -> last tile committed (actor start-up, '
          'model load, noise calibration included; ray.init not). "steady state" = (4x run - base run) on the same '
          'cores: the extra tiles\' sources over the extra wall time, start-up costs cancelled.')

    # [2] ------------------------------------------------------------------------------------------
    t_enh, t_enh1 = ref["enhance_s_all_cores"], ref["enhance_s_1_thread"]
    # The pipeline enhances each tile once where cutouts lie (Enhancer.enhance_plane): that is the
    # operation "enhancement alone" times; the cutout batch is printed beside it.
    t_plane = ref.get("enhance_plane_s_all_cores", t_enh)
    enh_sps = big2["sources"] / t_plane
    ratio2 = big2["sps"] / enh_sps
    print("\n[2] pipeline overhead: the field job vs the Enhancer alone on the same cutouts (4x field, 2 cores)")
    print(f"  field job, end to end      {big2['sources']:6d} sources ({big2['footprints']} footprints, {n_cut} "
          f"cutouts) "
          f"in {big2['wall']:6.1f} s = {big2['sps']:8.2f} sources/s  (+ ray.init {big2['ray_init']:.1f} s; whole "
          f"process {big2['process_wall']:.0f} s)")
    if steady2:
        print(f"  field job, steady state    {steady2['sources']:6d} sources in {steady2['wall']:6.1f} s = "
              f"{steady2['sps']:8.2f} sources/s")
    same = "the same" if runs[("4x", 2)].get("n_cutouts") == n_cut else "RECUT, COUNT DIFFERS"
    print(f"  Enhancer alone, 2 threads  the {ref['n_tiles']} tiles where the {n_cut} cutouts lie ({same}), "
          f"enhance_plane as the pipeline, in {t_plane:6.1f} s = {enh_sps:8.2f} sources/s-equivalent (best of "
          f"{repeats}); as a batch of cutouts {t_enh:.1f} s (batch 256; 1 thread {t_enh1:.1f} s)")
    print(f"  ratio field / enhancement alone: end to end {ratio2:.2f} {_verdict(ratio2, 0.8, at_least=True)}"
          + (f"; steady state {steady2['sps'] / enh_sps:.2f}" if steady2 else ""))
    core_s = big2["wall"] * big2["cores"]
    st = big2["stages"]
    print(f"  the end-to-end run's {core_s:.0f} core-s (2 cores x pipeline wall), by the stages' own timers "
          f"(1 thread each):")
    for k in ("degrade_s", "footprints_s", "enhance_s", "detect_s", "photometry_s"):
        if k in st:
            note = "  (simulations only: HR -> LR degradation and HR truth peaks)" if k == "degrade_s" else ""
            print(f"    {k[:-2]:<11} {st[k]:7.1f} core-s {st[k] / core_s:6.1%}{note}")
    rest = core_s - sum(st.values())
    print(f"    {'the rest':<11} {rest:7.1f} core-s {rest / core_s:6.1%}  (Ray: actor start-up, model load and noise "
          f"calibration per enhancement actor, (de)serialisation, read and commit, idle cores)")

    # [3] ------------------------------------------------------------------------------------------
    ratio3 = big2["sps"] / big1["sps"]
    print("\n[3] scaling: 1 worker on 1 core vs 2 workers on 2 cores (fresh Ray each, 4x field)")
    print(f"  end to end : 1 core {big1['sps']:8.2f} sources/s ({big1['wall']:.1f} s), 2 cores {big2['sps']:8.2f} "
          f"sources/s ({big2['wall']:.1f} s) -> {ratio3:.2f}x {_verdict(ratio3, 1.7, at_least=True)}")
    if steady1 and steady2:
        print(f"  steady state: 1 core {steady1['sps']:8.2f} sources/s, 2 cores {steady2['sps']:8.2f} sources/s "
              f"-> {steady2['sps'] / steady1['sps']:.2f}x")
    print(f"  ray.init: {big1['ray_init']:.1f} s (1 core), {big2['ray_init']:.1f} s (2 cores), not in the walls")

    # [4] ------------------------------------------------------------------------------------------
    mb, m4 = base2["mem"], big2["mem"]
    print(f"\n[4] memory: the 4x field ({big2['tiles']} tiles) vs the base field ({base2['tiles']}), 2 cores each; "
          f"resident memory of the run's process tree (driver + Ray), sampled every {args.interval} s")
    print(f"  {'':<34} {'base':>10} {'4x':>10} {'ratio':>7}")
    for label, key in (("driver peak RSS", "driver_peak"), ("tree peak RSS (sum)", "sum_peak"),
                       ("tree PSS at the RSS peak", "pss_at_peak"), ("largest other process RSS", "other_peak")):
        r = m4[key] / mb[key] if mb[key] else float("nan")
        print(f"  {label:<34} {_mb(mb[key]):>10} {_mb(m4[key]):>10} {r:6.2f}x")
    print(f"  processes in the tree at the peak: {mb['procs_at_peak']} (base), {m4['procs_at_peak']} (4x); "
          f"samples {mb['samples']}, {m4['samples']}")
    r_tree, r_drv = m4["sum_peak"] / mb["sum_peak"], m4["driver_peak"] / mb["driver_peak"]
    print(f"  ratio 4x / base: tree {r_tree:.2f}x {_verdict(r_tree, 1.25, at_least=False)}, driver {r_drv:.2f}x "
          f"{_verdict(r_drv, 1.25, at_least=False)}  (an RSS sum counts shared pages, torch's libraries and the "
          f"object store, once per process; PSS divides them)")

    # [5] ------------------------------------------------------------------------------------------
    d_sim = big2["sources"] / big2["area"]
    scale = args.hsc_density / d_sim
    print(f"\n[5] cost per deg^2 of HSC-like imagery at HSC-Wide density ({args.hsc_density:.3g} sources/deg^2)")
    print(f"  simulated field: {d_sim:.3g} catalog sources/deg^2 ({d_sim / 3600:.0f}/arcmin^2; its truth has "
          f"{ref['truth_mag26_owned'] / ref['area_deg2'] / 3600:.0f}/arcmin^2 brighter than mag 26), "
          f"{n_cut / big2['sources']:.2f} cutouts per source")
    rows = {}
    for label, f in (("end to end, 1 core ", big1), ("end to end, 2 cores", big2), ("steady,     1 core ", steady1),
                     ("steady,     2 cores", steady2)):
        if not f:
            continue
        ch_sim = f["cores"] / f["deg2_s"] / 3600.0
        rows[label] = ch_sim * scale
        print(f"  {label}: {f['deg2_s'] / f['cores'] * 3600:9.5f} deg^2/h per core -> {ch_sim:8.1f} core-h/deg^2 "
              f"at the simulated density, {ch_sim * scale:8.1f} at HSC-Wide density (x{scale:.2f})")
    key = "steady,     2 cores" if "steady,     2 cores" in rows else "end to end, 2 cores"
    ch = rows[key]
    print(f"  CPU ({key.replace('     ', ' ').strip()}): {ch:.2f} core-h/deg^2 {_verdict(ch, 0.5, at_least=False)}; "
          f"Rubin's deblending step ~{RUBIN_DEBLEND_CORE_H_DEG2} core-h/deg^2 -> "
          f"{ch / RUBIN_DEBLEND_CORE_H_DEG2:.2f}x that")
    print("    (density scaling treats every cost as per source; footprints and, in simulations, degradation are per "
          "area, so below the simulated density the scaled figure leans low)")
    enh_share = st.get("enhance_s", 0.0) / max(sum(st.values()), 1e-9)
    cut_deg2 = n_cut / big2["sources"] * args.hsc_density
    flop_deg2 = cut_deg2 * ref["flops_per_cutout"]
    gpu_s = flop_deg2 / (args.gpu_tflops * 1e12)
    cpu_rest = ch * (1 - enh_share)
    print(f"  one GPU (projected, not measured): {cut_deg2:.3g} cutouts/deg^2 x {ref['flops_per_cutout'] / 1e6:.0f} "
          f"MFLOP = {flop_deg2 / 1e12:.1f} TFLOP/deg^2; at an assumed {args.gpu_tflops:g} TFLOP/s effective: "
          f"{gpu_s:.2f} GPU-s/deg^2 ({3600 / gpu_s:.0f} deg^2 per GPU-hour) for the enhancement")
    print(f"    the other stages stay on CPU: {cpu_rest:.2f} core-h/deg^2 (the CPU figure less the enhancement's "
          f"{enh_share:.1%} of the stage time); one GPU keeps up with ~{cpu_rest * 3600 / gpu_s:.0f} such cores")

    truth_density = ref["truth_mag26_owned"] / ref["area_deg2"] / 3600
    if has_real:
        print(f"  per area, no density scaling (the sky: {truth_density:.0f} true objects/arcmin^2 brighter than mag 26; "
              f"HSC-Wide detects ~{args.hsc_density / 3600:.0f}/arcmin^2):")
        for label, f in (("real-format, end to end", bigR), ("real-format, steady", steadyR),
                         ("simulated,   end to end", big2), ("simulated,   steady", steady2)):
            if f:
                print(f"    {label:<24} {f['cores'] / f['deg2_s'] / 3600.0:8.2f} core-h/deg^2 (2 cores)")

    # [6] ------------------------------------------------------------------------------------------
    sep_t = ref["sep_s_per_tile"]
    print(f"\n[6] detection alone: sep (Background + extract, {ref['sep_thresh_sigma']} sigma, minarea as the job, "
          f"default deblending) on the same {ref['n_tiles']} LR tiles, 1 core, best of {repeats}")
    print(f"  sep alone                      {sep_t * 1e3:10.1f} ms per tile  ({ref['sep_objects']} objects in all)")
    rows6 = [("Enhancer alone, 1 thread", t_enh1 / ref["n_tiles"], ""),
             ("pipeline, 1 core, end to end", big1["wall"] / big1["tiles"], "pipeline wall / tiles")]
    if steady1:
        rows6.append(("pipeline, 1 core, steady", steady1["wall"] / (big1["tiles"] - base1["tiles"]),
                      "extra wall / extra tiles"))
    rows6.append(("pipeline, 2 cores, end to end", 2 * big2["wall"] / big2["tiles"], "core-s: 2 x wall / tiles"))
    for label, t, note in rows6:
        print(f"  {label:<30} {t * 1e3:10.1f} ms per tile = {t / sep_t:8.0f}x sep  {note}")
    print("=" * 100)

    def cost(steady, end):
        f = steady or end
        return f["cores"] / f["deg2_s"] / 3600.0

    cost_real = cost(steadyR, bigR) if has_real else float("nan")
    cost_sim = cost(steady2, big2)
    for label, steady in ([("cost_real", steadyR)] if has_real else []) + [("cost_sim", steady2)]:
        if not steady:
            print(f"note: {label} is the end-to-end figure: no steady state (the 4x run was not slower than the base "
                  f"run by more than its start-up; a loaded machine or fields too small)")
    print(f"targets: cost_real <= 0.5 {_verdict(cost_real, 0.5, at_least=False)}, pipeline_over_enhance >= 0.8 "
          f"{_verdict(ratio2, 0.8, at_least=True)}, scaling_2w >= 1.7 {_verdict(ratio3, 1.7, at_least=True)}")
    print(f"summary: cost_real={cost_real:.2f} pipeline_over_enhance={ratio2:.2f} scaling_2w={ratio3:.2f} "
          f"cost_sim={cost_sim:.2f}")


if __name__ == "__main__":
    sys.exit(main())
