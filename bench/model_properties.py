"""The trust properties of the shipped models, as numbers (``galgan_ray.model_properties``).

Usage::

    .venv/bin/python bench/model_properties.py [--model default --model default-fluxcons ...] [--figure PNG]   # ~3 min

For each model: the largest output from an all-zero input; on pure noise (256 cutouts of unit
white noise), the positional bias of the mean output over its scatter inside the cutout's outermost
LR pixel and on that ring (the trust issue's target: < 0.5x everywhere), the worst deviation from
flat in standard errors and the central box's; the shift errors for k = 1..4 LR px; windowed against
whole-image inference; and the fixed-pattern check of ``galgan enhance`` (the mean of 6 and of 4
enhanced noise images: scatter over independent noise's, brightest pixel over it; targets < 1.3 and
< 8) on the draw of ``../shared/tools/noise_pattern.py`` (its seed, 150 px, a Moffat 0.6" PSF) and,
since one draw's brightest pixel is the brightest source the model paints on its noise, on
``--draws`` more draws of six 150-px images (seeds 1..N) and ``--draws-large`` of six 300-px images
(seeds 1..N): how many pass, the median and the worst. ``tests/test_model_properties.py`` asserts the
measures on the outside check's own draw. Last line, for the first model:
``summary: zero_out=... bias_inner=... bias_ring=... shift_max=... pattern6=... brightest6=... pattern4=...
brightest4=... draws_pass=K/N brightest_median=... brightest_max=... raw_pattern6=... ... raw_brightest_max=...``
(the unprefixed pattern figures: ``galgan enhance`` as shipped, its support gate on; ``raw_``: the model's
output everywhere, ``--no-support-gate``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galgan_ray.enhance import Enhancer  # noqa: E402
from galgan_ray.model_properties import (noise_pattern_means, noise_pattern_passes,  # noqa: E402
                                         noise_pattern_scores, positional_bias, shift_error, window_error,
                                         zero_response)


def draw_stats(draws: list[tuple]) -> tuple[int, float, float, float]:
    """``(size, seed, ratio, brightest)`` draws -> (how many pass, median and worst brightest, worst ratio)."""
    b = np.array([d[3] for d in draws])
    return (sum(noise_pattern_passes(*d[2:]) for d in draws), float(np.median(b)), float(b.max()),
            max(d[2] for d in draws))


def measure(name: str, draws: int = 20, draws_large: int = 5) -> dict:
    torch.manual_seed(0)
    enh = Enhancer(name, device="cpu")
    out = {"model": name, "checkpoint": str(enh.checkpoint), "zero_out": zero_response(enh)}
    pbs = positional_bias(enh, n_draws=256)
    out["bias"] = [(p.band, p.max_inner, p.max_ring, p.z_interior, p.centre_z) for p in pbs]
    if enh.n_bands == 1:
        out["shift"] = {k: shift_error(enh, k) for k in (1, 2, 3, 4)}
        out["window"] = window_error(enh)
        # each draw enhanced once: galgan enhance as shipped (its support gate) and the model alone (raw_)
        runs = {"pattern6": dict(n_images=6), "pattern4": dict(n_images=4)}
        runs |= {(150, s): dict(seed=s) for s in range(1, draws + 1)}
        runs |= {(300, s): dict(size=300, seed=s) for s in range(1, draws_large + 1)}
        out["draws"], out["raw_draws"] = [], []
        for name_, kw in runs.items():
            means = noise_pattern_means(enh, **kw)
            for key, gate in (("", "gated"), ("raw_", "raw")):
                scores = noise_pattern_scores(*means[gate])
                if isinstance(name_, str):
                    out[key + name_] = scores
                else:
                    out[key + "draws"].append((*name_, *scores))
    return out


def report(r: dict) -> None:
    print(f"{r['model']} ({r['checkpoint']})")
    print(f"  zero in: largest output {r['zero_out']:.2e} sigma per HR pixel (test: < 1e-3)")
    for band, inner, ring, z, cz in r["bias"]:
        print(f"  pure noise, {band}: positional bias {inner:.2f}x the scatter inside the outermost LR pixel, "
              f"{ring:.2f}x on it (target < 0.5x); worst interior pixel {z:.1f} standard errors, centre {cz:+.1f}")
    if "shift" in r:
        print("  shifted input: " + ", ".join(f"k={k} {v:.2%}" for k, v in r["shift"].items())
              + " of the peak (k=4: the U-Net's stride, exact up to float noise)")
        print(f"  windowed vs whole image: {r['window']:.1e} of the peak")
        for key, what in (("", "galgan enhance as shipped (support gate on)"),
                          ("raw_", "the model's output everywhere (--no-support-gate)")):
            print(f"  {what}:")
            for n in (6, 4):
                ratio, brightest = r[f"{key}pattern{n}"]
                print(f"    mean of {n} enhanced noise images: scatter {ratio:.2f}x independent noise's "
                      f"(target < 1.3), brightest pixel {brightest:.1f}x (target < 8)")
            for size in sorted({d[0] for d in r[key + "draws"]}):
                ds = [d for d in r[key + "draws"] if d[0] == size]
                n_pass, median, worst, ratio_max = draw_stats(ds)
                print(f"    {len(ds)} more draws of six {size}-px noise images: {n_pass} pass; brightest pixel median "
                      f"{median:.1f}x, worst {worst:.1f}x; scatter at most {ratio_max:.2f}x; "
                      + " ".join(f"{d[3]:.1f}" for d in ds))


def plot_noise_means(name: str, out: str) -> None:
    """The mean of the outside check's four enhanced noise images (the draw that failed), with and without
    the support gate, in units of independent noise's expected scatter."""
    from galgan_ray.figures import _plt

    enh = Enhancer(name, device="cpu")
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.2))
    means = noise_pattern_means(enh, n_images=4)
    for ax, (gate, title) in zip(axes, (("raw", "the model's output everywhere (--no-support-gate)"),
                                        ("gated", "galgan enhance as shipped (support gate)"))):
        mean, expect = means[gate]
        z = mean / expect
        im = ax.imshow(z, origin="lower", cmap="RdBu_r", vmin=-8, vmax=8, interpolation="nearest")
        iy, ix = np.unravel_index(np.argmax(np.abs(z)), z.shape)
        ax.plot(ix, iy, "o", mfc="none", mec="k", ms=14)
        ax.set_title(f"{title}\nbrightest |pixel| {np.abs(z).max():.1f}x (limit 8x)", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.8, label="mean of 4 enhanced noise images / expected scatter")
    fig.suptitle(f"{name}: pure white noise (noise_pattern.py's draw), 0.168\"/px in, 0.06\"/px out", fontsize=10)
    fig.savefig(out, dpi=80, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=20, help="more draws of six 150-px noise images (default 20)")
    ap.add_argument("--draws-large", type=int, default=5, help="more draws of six 300-px images (default 5)")
    ap.add_argument("--model", action="append", help="checkpoint (repeatable; default: default, default-fluxcons, "
                                                     "default-7band)")
    ap.add_argument("--figure", metavar="PNG", help="also draw the first model's mean of the outside check's four "
                                                    "noise images, with and without the support gate")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    names = args.model or ["default", "default-fluxcons", "default-7band"]
    results = [measure(m, args.draws, args.draws_large) for m in names]
    for r in results:
        report(r)
    r = results[0]
    line = (f"summary: zero_out={r['zero_out']:.1e} bias_inner={max(b[1] for b in r['bias']):.2f} "
            f"bias_ring={max(b[2] for b in r['bias']):.2f}")
    if "shift" in r:
        line += (f" shift_max={max(r['shift'].values()):.3f} pattern6={r['pattern6'][0]:.2f} "
                 f"brightest6={r['pattern6'][1]:.1f} pattern4={r['pattern4'][0]:.2f} brightest4={r['pattern4'][1]:.1f}")
        for key in ("", "raw_"):
            if key:
                line += (f" raw_pattern6={r['raw_pattern6'][0]:.2f} raw_brightest6={r['raw_pattern6'][1]:.1f} "
                         f"raw_pattern4={r['raw_pattern4'][0]:.2f} raw_brightest4={r['raw_pattern4'][1]:.1f}")
            if r[key + "draws"]:
                n_pass, median, worst, _ = draw_stats(r[key + "draws"])
                line += (f" {key}draws_pass={n_pass}/{len(r[key + 'draws'])} {key}brightest_median={median:.1f} "
                         f"{key}brightest_max={worst:.1f}")
    print(line)
    if args.figure:
        plot_noise_means(names[0], args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
