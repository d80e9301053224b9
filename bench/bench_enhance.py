"""Compute efficiency of the enhancement: FLOPs per cutout, achieved GFLOP/s, and this machine's conv peak.

Usage::

    .venv/bin/python bench/bench_enhance.py            # ~2-4 minutes on 2 cores (torch.compile included)
    .venv/bin/python bench/bench_enhance.py --quick    # smoke run, well under a minute, no torch.compile

What it measures, side by side in one run (one process, ``torch.set_num_threads(--threads)``,
default: every core this process may use):

1. **FLOPs per cutout** of the shipped generator (``galgan_ray/data/models/sr_1band.pt``), one forward
   at batch 1 under ``torch.utils.flop_counter.FlopCounterMode``, cross-checked against an analytic
   count (2 x MACs of every ``Conv2d``, ``Cout * Cin/groups * kh * kw * Hout * Wout`` with ``Hout``,
   ``Wout`` from the conv formula). Only convolutions are counted (the usual convention): activations,
   PixelShuffle, interpolation, concatenation, the bicubic skip and the arcsinh normalisation cost time
   but no FLOPs here.
2. **Peak**: a dense 3x3 convolution, 64 -> 64 channels on 128x128 maps, batch 32 (8 with ``--quick``),
   same threads, in NCHW and channels_last; the faster is this machine's fp32 conv peak. A large
   sgemm is printed for reference. A bf16 conv peak is measured too: oneDNN uses the CPU's bf16
   instructions (AVX-512 BF16 on this machine; AMX tiles on newer Xeons).
3. **Achieved**: cutouts/s x FLOPs per cutout for Enhancer-style batched inference in several
   settings (Enhancer as shipped; the bare generator under no_grad / inference_mode; channels_last;
   a larger batch; torch.compile with inductor freezing; bf16 autocast), each checked against the
   fp32 eager output (max and rms difference in the generator's scaled units, where unit LR noise
   is 0.1 and the HST-like HR noise ~0.02), best of ``--repeats`` passes. Printed as achieved / peak
   (target >= 50 %).
4. **Where the time goes**: per-layer timing of the best eager fp32 setting (forward hooks), each
   conv's share of FLOPs and of time and its own GFLOP/s, and the time outside convolutions.

Nothing here changes :mod:`galgan_ray.enhance`; the last lines say which Enhancer setting would give
the best measured rate.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from galgan_ray.enhance import Enhancer  # noqa: E402
from galgan_ray.models import count_parameters, prepare_batch  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def synthetic_cutouts(n: int, *, lr_size: int = 22, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """LR cutouts with unit noise and 1-3 Gaussian sources of S/N ~5-300 (values only matter for
    denormals and the arcsinh stretch; the cost of a convolution does not depend on them)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:lr_size, :lr_size].astype(np.float32)
    img = rng.normal(size=(n, 1, lr_size, lr_size)).astype(np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.uniform(6, lr_size - 6, 2)
            s = rng.uniform(1.0, 3.0)
            prof = np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / s**2)
            img[i, 0] += rng.uniform(5, 300) * prof / np.sqrt((prof**2).sum())
    return img, np.ones((n, 1), np.float32)


# ------------------------------------------------------------------------------------------------
# 1. FLOPs
# ------------------------------------------------------------------------------------------------
def conv_macs_analytic(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Per-Conv2d MACs at the input ``x``: shapes from the conv formula on each layer's input."""
    rows: list[dict] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(mod: nn.Conv2d, inp):
        _, cin, h, w = inp[0].shape
        kh, kw = mod.kernel_size
        sh, sw = mod.stride
        ph, pw = mod.padding
        dh, dw = mod.dilation
        hout = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wout = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        macs = inp[0].shape[0] * mod.out_channels * (cin // mod.groups) * kh * kw * hout * wout
        rows.append({"name": names[mod], "cin": cin, "cout": mod.out_channels, "k": f"{kh}x{kw}",
                     "stride": sh, "in": f"{h}x{w}", "out": f"{hout}x{wout}", "macs": macs})

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    other = [type(m).__name__ for m in model.modules() if isinstance(m, (nn.ConvTranspose2d, nn.Linear))]
    if other:
        raise RuntimeError(f"analytic count covers Conv2d only, model also has {other}")
    return rows


def flop_counter_total(model: nn.Module, x: torch.Tensor) -> tuple[int, dict]:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    per_op = {str(k): int(v) for k, v in fc.get_flop_counts().get("Global", {}).items()}
    return int(fc.get_total_flops()), per_op


# ------------------------------------------------------------------------------------------------
# 2. Peak
# ------------------------------------------------------------------------------------------------
def _best_time(fn, repeats: int, min_time: float = 0.0, warmup: bool = True) -> float:
    """Best wall time of ``fn()`` over ``repeats`` calls (after one warm-up call unless ``warmup`` is
    False); when a call is shorter than ``min_time`` it is looped until the loop lasts that long (time
    per call reported)."""
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            dt = time.perf_counter() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def conv_peak(*, batch: int, repeats: int, channels_last: bool, dtype=torch.float32) -> float:
    """FLOP/s of a 3x3, 64 -> 64 conv (padding 1) on 128x128 maps, weights and input in ``dtype``."""
    conv = nn.Conv2d(64, 64, 3, padding=1).eval().to(dtype)
    x = torch.randn(batch, 64, 128, 128, dtype=dtype)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    flops = 2.0 * batch * 64 * 64 * 9 * 128 * 128
    with torch.inference_mode():
        t = _best_time(lambda: conv(x), repeats, min_time=0.3)
    return flops / t


def gemm_peak(*, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        t = _best_time(lambda: a @ b, repeats, min_time=0.3)
    return 2.0 * n**3 / t


# ------------------------------------------------------------------------------------------------
# 3. Achieved
# ------------------------------------------------------------------------------------------------
class _Variant:
    def __init__(self, name: str, run, *, batch: int, note: str = ""):
        self.name, self.run, self.batch, self.note = name, run, batch, note


def _generator_runner(gen: nn.Module, x_all: torch.Tensor, *, batch: int, grad_mode: str, channels_last: bool,
                      bf16: bool = False):
    """A function that runs ``gen`` over all of ``x_all`` in batches and returns the outputs (float32)."""
    if channels_last:
        x_all = x_all.contiguous(memory_format=torch.channels_last)
    ctx_grad = torch.inference_mode if grad_mode == "inference_mode" else torch.no_grad

    def run():
        outs = []
        with ctx_grad(), (torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):
            for i in range(0, len(x_all), batch):
                outs.append(gen(x_all[i:i + batch]).float())
        return torch.cat(outs)

    return run


def _enhancer_runner(enh: Enhancer, img: np.ndarray, sig: np.ndarray):
    def run():
        return enh.enhance_cutouts(img, sig)

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer cutouts, 1 repeat, no torch.compile")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads (default: every core this process may use)")
    ap.add_argument("--n", type=int, default=None, help="cutouts per timed pass (default 2048; quick 512)")
    ap.add_argument("--batch-size", type=int, default=256, help="the Enhancer's batch (default 256)")
    ap.add_argument("--big-batch", type=int, default=1024, help="the larger batch tried (default 1024)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed passes per setting, best kept (default 3; quick 1)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it compiles for tens of seconds)")
    ap.add_argument("--checkpoint", default="default")
    args = ap.parse_args(argv)
    n = args.n or (512 if args.quick else 2048)
    repeats = args.repeats or (1 if args.quick else 3)
    peak_batch = 8 if args.quick else 32
    gemm_n = 2048 if args.quick else 4096
    do_compile = not (args.no_compile or args.quick)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    enh = Enhancer(args.checkpoint, device="cpu", batch_size=args.batch_size)
    gen = enh.generator.eval()
    cfg = enh.model_cfg
    b, bb = args.batch_size, args.big_batch

    # 1. FLOPs per cutout --------------------------------------------------------------------------
    x1 = torch.zeros(1, enh.n_bands, enh.lr_size, enh.lr_size)
    counted, per_op = flop_counter_total(gen, x1)
    layers = conv_macs_analytic(gen, x1)
    analytic = 2 * sum(r["macs"] for r in layers)
    flops_cutout = counted

    # 2. Peak, measured before and after [3] (the larger is kept: other processes only slow it down) -
    def measure_peaks() -> dict[str, float]:
        return {"fp32 conv, NCHW": conv_peak(batch=peak_batch, repeats=repeats, channels_last=False),
                "fp32 conv, channels_last": conv_peak(batch=peak_batch, repeats=repeats, channels_last=True),
                "bf16 conv, channels_last": conv_peak(batch=peak_batch, repeats=repeats, channels_last=True,
                                                      dtype=torch.bfloat16)}

    peaks_before = measure_peaks()
    sgemm = gemm_peak(n=gemm_n, repeats=repeats)

    # 3. Achieved ---------------------------------------------------------------------------------
    img, sig = synthetic_cutouts(n, lr_size=enh.lr_size)
    x_all, _ = prepare_batch(img, None, sig, cfg.scaling, device="cpu")
    with torch.inference_mode():
        ref = torch.cat([gen(x_all[i:i + b]) for i in range(0, n, b)])
    gen_cl = Enhancer(args.checkpoint, device="cpu").generator.eval().to(memory_format=torch.channels_last)
    variants = [
        _Variant(f"Enhancer.enhance_cutouts as shipped, b{b}", _enhancer_runner(enh, img, sig), batch=b,
                 note="incl. normalisation, numpy in/out"),
        _Variant(f"generator, no_grad, NCHW, b{b}",
                 _generator_runner(gen, x_all, batch=b, grad_mode="no_grad", channels_last=False), batch=b),
        _Variant(f"generator, inference_mode, NCHW, b{b}",
                 _generator_runner(gen, x_all, batch=b, grad_mode="inference_mode", channels_last=False), batch=b),
        _Variant(f"generator, inference_mode, NCHW, b{bb}",
                 _generator_runner(gen, x_all, batch=bb, grad_mode="inference_mode", channels_last=False), batch=bb),
        _Variant(f"generator, inference_mode, channels_last, b{b}",
                 _generator_runner(gen_cl, x_all, batch=b, grad_mode="inference_mode", channels_last=True), batch=b),
        _Variant(f"generator, inference_mode, channels_last, b{bb}",
                 _generator_runner(gen_cl, x_all, batch=bb, grad_mode="inference_mode", channels_last=True), batch=bb),
    ]
    compile_note = "skipped (--quick / --no-compile)"
    if do_compile:
        compile_note = "ok"
        for cl, bf16 in ((False, False), (True, False), (True, True)):
            layout = "channels_last" if cl else "NCHW"
            try:
                # Imported here: inductor takes ~1 s to import and only the torch.compile rows need it.
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True  # constant weights: inductor pre-packs them for oneDNN
                g = Enhancer(args.checkpoint, device="cpu").generator.eval()
                if cl:
                    g = g.to(memory_format=torch.channels_last)
                run = _generator_runner(torch.compile(g), x_all, batch=b, grad_mode="no_grad", channels_last=cl,
                                        bf16=bf16)
                t0 = time.perf_counter()
                run()  # compiles (the last, partial batch may compile a second shape)
                note = f"compiled in {time.perf_counter() - t0:.0f} s (not timed)"
                variants.append(_Variant(f"torch.compile (inductor, freezing), {layout}{', bf16' if bf16 else ''}, "
                                         f"b{b}", run, batch=b,
                                         note=note + ("; not fp32: needs a science check" if bf16 else "")))
            except Exception as exc:  # noqa: BLE001 - report and go on: compile needs a C++ toolchain
                compile_note = f"{layout} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    variants.append(_Variant(f"generator, bf16 autocast, channels_last, b{b}",
                             _generator_runner(gen_cl, x_all, batch=b, grad_mode="inference_mode",
                                               channels_last=True, bf16=True), batch=b,
                             note="not fp32: needs a science check"))
    results = []
    for v in variants:
        out = v.run()  # warm-up, and the output to check against the fp32 reference
        diff = (float("nan"), float("nan")) if isinstance(out, np.ndarray) else (
            float((out - ref).abs().max()), float((out - ref).square().mean().sqrt()))
        t = _best_time(v.run, repeats, warmup=False)
        results.append((v, n / t, n / t * flops_cutout / 1e9, diff))

    peaks_after = measure_peaks()
    peaks = {k: max(peaks_before[k], peaks_after[k]) for k in peaks_before}
    peak = max(peaks["fp32 conv, NCHW"], peaks["fp32 conv, channels_last"])

    # 4. Where the time goes: per-layer timing of the best eager fp32 layout ------------------------
    fp32 = [r for r in results if "bf16" not in r[0].name]
    shipped, best = results[0], max(fp32, key=lambda r: r[1])
    eager = [r for r in fp32 if r[0].name.startswith("generator") and r[0].batch == b]
    use_cl = "channels_last" in max(eager, key=lambda r: r[1])[0].name
    g_prof = gen_cl if use_cl else gen
    x_prof = x_all[:b].contiguous(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
    times: dict[str, float] = {}
    starts: dict[nn.Module, float] = {}
    names = {m: nm for nm, m in g_prof.named_modules()}

    def pre(mod, _inp):
        starts[mod] = time.perf_counter()

    def post(mod, _inp, _out):
        times[names[mod]] = times.get(names[mod], 0.0) + time.perf_counter() - starts[mod]

    handles = [h for m in g_prof.modules() if isinstance(m, nn.Conv2d)
               for h in (m.register_forward_pre_hook(pre), m.register_forward_hook(post))]
    reps = max(repeats, 2)
    with torch.inference_mode():
        g_prof(x_prof)  # warm-up
        times.clear()
        t0 = time.perf_counter()
        for _ in range(reps):
            g_prof(x_prof)
        total = (time.perf_counter() - t0) / reps
    for h in handles:
        h.remove()

    # Report ------------------------------------------------------------------------------------------
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s); load average "
          f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print(f"model: {enh.checkpoint}\n  {cfg.architecture} base_width={cfg.base_width} depth={cfg.depth} "
          f"blocks={cfg.blocks} upsample={cfg.upsample}; {count_parameters(gen):,} parameters; "
          f"LR {enh.lr_size}x{enh.lr_size} -> HR {enh.hr_size}x{enh.hr_size}")

    print("\n[1] FLOPs per cutout (one forward, batch 1; convolutions only)")
    print(f"  FlopCounterMode          {counted / 1e6:9.2f} MFLOP  {per_op}")
    print(f"  analytic 2 x conv MACs   {analytic / 1e6:9.2f} MFLOP  ({len(layers)} Conv2d layers; relative "
          f"difference {abs(counted - analytic) / analytic:.1e})")

    print(f"\n[2] dense conv peak: 3x3 conv 64->64 on 128x128, batch {peak_batch}, {args.threads} thread(s); "
          f"measured before and after [3], best kept")
    for k, v in peaks.items():
        print(f"  {k:<26} {v / 1e9:8.1f} GFLOP/s  (before {peaks_before[k] / 1e9:.1f}, after "
              f"{peaks_after[k] / 1e9:.1f})")
    print(f"  fp32 conv peak             {peak / 1e9:8.1f} GFLOP/s  <- the denominator of [3]")
    print(f"  fp32 sgemm {gemm_n}^3          {sgemm / 1e9:8.1f} GFLOP/s  (reference)")

    print(f"\n[3] achieved: {n} cutouts per pass, best of {repeats} pass(es), {args.threads} thread(s); "
          f"target >= 50 % of the fp32 conv peak")
    print(f"  {'setting':<58} {'cutouts/s':>9} {'GFLOP/s':>8} {'/peak':>6} {'max|diff|':>9} {'rms diff':>8}  note")
    for v, rate, gflops, diff in results:
        d = f"{'-':>9} {'-':>8}" if np.isnan(diff[0]) else f"{diff[0]:9.1e} {diff[1]:8.1e}"
        print(f"  {v.name:<58} {rate:9.0f} {gflops:8.1f} {gflops * 1e9 / peak:6.1%} {d}  {v.note}")
    if compile_note != "ok":
        print(f"  torch.compile: {compile_note}")
    print(f"  as shipped: {shipped[2]:.1f} GFLOP/s = {shipped[2] * 1e9 / peak:.1%} of the fp32 conv peak")
    print(f"  best fp32:  {best[0].name}: {best[2]:.1f} GFLOP/s = {best[2] * 1e9 / peak:.1%} of the peak, "
          f"{best[1] / shipped[1]:.2f}x the shipped Enhancer")
    bf = max((r for r in results if "bf16" in r[0].name), key=lambda r: r[1])
    print(f"  best bf16:  {bf[0].name}: {bf[2]:.1f} GFLOP/s = {bf[2] * 1e9 / peaks['bf16 conv, channels_last']:.1%} "
          f"of the bf16 conv peak, {bf[1] / shipped[1]:.2f}x the shipped Enhancer; output differs by up to "
          f"{bf[3][0]:.1e} (rms {bf[3][1]:.1e}) in the generator's scaled units, where unit LR noise is 0.1 and the "
          f"HST-like HR noise ~0.02")

    print(f"\n[4] where the time goes: eager fp32, inference_mode, {'channels_last' if use_cl else 'NCHW'}, "
          f"batch {b}, forward hooks around each conv ({total * 1e3:.0f} ms per batch)")
    print(f"  {'layer':<16} {'Cin->Cout':>10} {'k':>4} {'s':>2} {'map out':>8} {'MFLOP/cut':>9} {'%FLOP':>6} "
          f"{'%time':>6} {'GFLOP/s':>8} {'/peak':>6}")
    conv_time = 0.0
    for r in layers:
        t = times.get(r["name"], 0.0) / reps
        conv_time += t
        fl = 2.0 * r["macs"]
        rate = fl * b / t if t > 0 else 0.0
        print(f"  {r['name']:<16} {r['cin']:>4}->{r['cout']:<5} {r['k']:>4} {r['stride']:>2} {r['out']:>8} "
              f"{fl / 1e6:9.2f} {fl / analytic:6.1%} {t / total:6.1%} {rate / 1e9:8.1f} {rate / peak:6.1%}")
    print(f"  {'not in a conv':<16} {'':>10} {'':>4} {'':>2} {'':>8} {0:9.2f} {0:6.1%} "
          f"{(total - conv_time) / total:6.1%}  (activations, PixelShuffle, interpolate, cat, crop, bicubic skip)")
    print("  (a layer's GFLOP/s can exceed the large-map peak: its maps stay in cache; hook timings are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
