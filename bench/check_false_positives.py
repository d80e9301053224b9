"""Are the benchmark's paper-definition false positives resolved by the HST-like image without its noise?

The paper counts a false positive where the high- (HR) and low-resolution (LR) images show one peak and
the enhanced image more. If the HR image misses the second galaxy only because of its noise, the enhanced
image (a denoised HR image) resolving it is a correct split; if the HR image without noise also shows one
peak, the enhanced image draws a peak that the true high-resolution light profile does not have.

This script draws the benchmark's evaluation sky a second time without noise (same galaxies, same seeds),
builds the same galaxy set (the neighbour cleaning of the noisy cutouts applied as a mask, the same
high-significance cut) and the same blends, and runs the HR peak finder on both with the same noise
sigma. It prints the HR detection fraction with and without noise and, for every false positive of the
given row of a written benchmark (``blend_outcomes.parquet``), the peaks the noise-free HR image finds.

    .venv/bin/python bench/check_false_positives.py --report docs/benchmark --row enhanced   # ~30 s
    .venv/bin/python bench/check_false_positives.py --report DIR --set seed=7000               # another sky
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from galgan_ray.blends import simulate_blends
from galgan_ray.config import load_config
from galgan_ray.dataset import clean_neighbours
from galgan_ray.evaluation import EvalSpec, benchmark_galaxies, peaks_at_resolution, score_blends, select_detectable
from galgan_ray.figures import truth_positions
from galgan_ray.metrics import enhancement_false_positives
from galgan_ray.psf import draw_psf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", default=str(resources.files("galgan_ray").joinpath("data/benchmark_default.yaml")))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="spec override")
    ap.add_argument("--report", required=True, help="a galgan evaluate output directory of the same spec")
    ap.add_argument("--row", default="enhanced")
    ap.add_argument("--work-dir", default="runs/check_false_positives")
    args = ap.parse_args()

    spec = load_config(EvalSpec, args.spec, args.set)
    work = Path(args.work_dir)
    # The benchmark's galaxies, drawn with and without noise; the noisy cutouts' neighbour cleaning
    # is applied to the noise-free ones as a mask (the neighbours' pixels set to zero).
    raw = replace(spec, clean_neighbours=False)
    galaxies, _, _ = benchmark_galaxies(raw, work_dir=work / "noisy")
    noise_free, _, _ = benchmark_galaxies(raw, work_dir=work / "noise_free", add_noise=False)
    noise_free = noise_free["image_hr"]
    if spec.clean_neighbours:
        cleaned, _ = clean_neighbours(galaxies, seed=spec.seed)
        noise_free = np.where(cleaned["image_hr"] != galaxies["image_hr"], 0.0, noise_free).astype(np.float32)
        galaxies = cleaned
    dc = spec.bands.degrade_config()
    scale = dc.scale_high_arcsec
    psf = draw_psf(dc.high[0].psf, pixel_scale_arcsec=scale)
    radius = spec.match_radius_arcsec / scale
    # The same cut as the benchmark, on the noisy images; the noise-free ones ride along as a column.
    galaxies, _ = select_detectable(dict(galaxies, image_hr_noise_free=noise_free), psf_hr=psf, radius_px=radius,
                                    min_significance=spec.min_high_significance, psf_energy=spec.detect.psf_energy)
    b_noisy, blends, sources = simulate_blends(galaxies, config=spec.blends, degrade_config=dc,
                                               n_blends=spec.n_blends, seed=spec.seed)
    b_clean, _, sources_clean = simulate_blends(dict(galaxies, image_hr=galaxies["image_hr_noise_free"]),
                                                config=spec.blends, degrade_config=dc, n_blends=spec.n_blends,
                                                seed=spec.seed)
    if not all(np.array_equal(sources[c], sources_clean[c]) for c in ("blendId", "x_hr", "y_hr")):
        raise SystemExit("the noise-free blends are not placed as the noisy ones")
    truth = truth_positions(sources, b_noisy["blendId"], grid="hr")
    res = {}
    for name, b in (("noisy", b_noisy), ("noise_free", b_clean)):  # significance in the noisy image's units
        pk = peaks_at_resolution(b["image_hr"], psf=psf, noise_sigma=b_noisy["sigma_hr"], detect=spec.detect)
        res[name] = score_blends(pk, truth, n_items=len(truth), radius_px=radius, n_truth=blends["n_sources"])

    out = pq.read_table(Path(args.report) / "blend_outcomes.parquet").to_pandas()
    if len(out) != len(truth) or not np.array_equal(res["noisy"]["outcome"], out["outcome_high"].to_numpy()):
        raise SystemExit(f"{args.report}: its high-resolution outcomes differ from this rebuild: not the same spec/sky")
    print(f"HR both found: noisy {100 * (res['noisy']['outcome'] == 2).mean():.1f}% (= the report's high row), "
          f"noise-free {100 * (res['noise_free']['outcome'] == 2).mean():.1f}%  ({len(truth)} blends)")
    considered, fp = enhancement_false_positives(n_peaks_hr=out.n_peaks_high, n_peaks_lr=out.n_peaks_low,
                                                 n_peaks_enhanced=out[f"n_peaks_{args.row}"])
    idx = np.flatnonzero(fp)
    one = int((res["noise_free"]["n_peaks"][idx] == 1).sum())
    split = int((res["noise_free"]["outcome"][idx] == 2).sum())
    print(f"{args.row}: {len(idx)} paper false positives of {int(considered.sum())}; "
          f"the noise-free HR image shows one peak in {one}, finds both galaxies in {split}")
    print("blend  sep\"   dmag  peaks: HR noisy / HR noise-free / row  matched(row)")
    for i in idx:
        print(f"{i:5d}  {out.sep_arcsec[i]:.2f}  {out.delta_mag[i]:4.2f}  "
              f"{res['noisy']['n_peaks'][i]} / {res['noise_free']['n_peaks'][i]} / {out[f'n_peaks_{args.row}'][i]}"
              f"  {out[f'n_matched_{args.row}'][i]}")


if __name__ == "__main__":
    main()
