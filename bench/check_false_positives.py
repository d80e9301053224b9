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

    .venv/bin/python bench/check_false_positives.py --report docs/benchmark --row enhanced   # ~1 min
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
from galgan_ray.dataset import DatasetConfig, clean_neighbours, concat_batches, simulated_galaxy_sets
from galgan_ray.evaluation import EvalSpec, central_significance, peaks_at_resolution, score_blends
from galgan_ray.figures import truth_positions
from galgan_ray.psf import draw_psf


def galaxy_set(spec: EvalSpec, work_dir: Path, *, add_noise: bool) -> dict[str, np.ndarray]:
    """The benchmark's galaxies (before cleaning), as ``evaluation.benchmark_galaxies`` reads them."""
    ds = DatasetConfig(seed=spec.seed, bands=spec.bands, sky_size_arcsec=spec.sky_size_arcsec,
                       n_sky_tiles=spec.n_sky_tiles, selection=spec.selection, test_fraction=0.5,
                       add_noise=add_noise)
    train, test, _ = simulated_galaxy_sets(ds, work_dir=work_dir)
    return concat_batches([g for g in (train, test) if g])


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
    noisy = galaxy_set(spec, work / "noisy", add_noise=True)
    clean = galaxy_set(spec, work / "noise_free", add_noise=False)
    if spec.clean_neighbours:
        cleaned, _ = clean_neighbours(noisy, seed=spec.seed)
        neighbour = cleaned["image_hr"] != noisy["image_hr"]  # pixels of neighbours the benchmark removes
        noisy = cleaned
        clean = dict(clean, image_hr=np.where(neighbour, 0.0, clean["image_hr"]).astype(np.float32))
    clean["sigma_hr"] = noisy["sigma_hr"]  # significance in the noisy image's units
    dc = spec.bands.degrade_config()
    scale = dc.scale_high_arcsec
    psf = draw_psf(dc.high[0].psf, pixel_scale_arcsec=scale)
    radius = spec.match_radius_arcsec / scale
    keep = central_significance(noisy["image_hr"], noisy["sigma_hr"], psf=psf, radius_px=radius,
                                psf_energy=spec.detect.psf_energy) >= spec.min_high_significance
    n = len(keep)
    pick = lambda g: {k: (np.asarray(v)[keep] if np.ndim(v) and len(v) == n else v) for k, v in g.items()}  # noqa: E731
    b_noisy, blends, sources = simulate_blends(pick(noisy), config=spec.blends, degrade_config=dc,
                                               n_blends=spec.n_blends, seed=spec.seed)
    b_clean, _, sources_clean = simulate_blends(pick(clean), config=spec.blends, degrade_config=dc,
                                                n_blends=spec.n_blends, seed=spec.seed)
    for col in ("blendId", "x_hr", "y_hr"):
        if col in sources and not np.array_equal(np.asarray(sources[col]), np.asarray(sources_clean[col])):
            raise SystemExit(f"the noise-free blends differ from the noisy ones in {col}")
    truth = truth_positions(sources, b_noisy["blendId"], grid="hr")
    res = {}
    for name, b in (("noisy", b_noisy), ("noise_free", b_clean)):
        pk = peaks_at_resolution(b["image_hr"], psf=psf, noise_sigma=b_noisy["sigma_hr"], detect=spec.detect)
        res[name] = score_blends(pk, truth, n_items=len(truth), radius_px=radius, n_truth=blends["n_sources"])

    out = pq.read_table(Path(args.report) / "blend_outcomes.parquet").to_pandas()
    if len(out) != len(truth):
        raise SystemExit(f"{args.report}: {len(out)} blends, this spec makes {len(truth)}: not the same spec")
    both_noisy = float((res["noisy"]["outcome"] == 2).mean())
    if not np.array_equal(res["noisy"]["outcome"], out["outcome_high"].to_numpy()):
        raise SystemExit(f"{args.report}: its high-resolution outcomes differ from this rebuild: not the same spec/sky")
    print(f"HR both found: noisy {100 * both_noisy:.1f}% (= the report's high row), "
          f"noise-free {100 * (res['noise_free']['outcome'] == 2).mean():.1f}%  ({len(truth)} blends)")
    fp = (out.n_peaks_high == 1) & (out.n_peaks_low == 1) & (out[f"n_peaks_{args.row}"] > 1)
    idx = np.flatnonzero(fp.to_numpy())
    one = int((res["noise_free"]["n_peaks"][idx] == 1).sum())
    split = int((res["noise_free"]["outcome"][idx] == 2).sum())
    print(f"{args.row}: {len(idx)} paper false positives of {int(((out.n_peaks_high == 1) & (out.n_peaks_low == 1)).sum())}; "
          f"the noise-free HR image shows one peak in {one}, finds both galaxies in {split}")
    print("blend  sep\"   dmag  peaks: HR noisy / HR noise-free / row  matched(row)")
    for i in idx:
        print(f"{i:5d}  {out.sep_arcsec[i]:.2f}  {out.delta_mag[i]:4.2f}  "
              f"{res['noisy']['n_peaks'][i]} / {res['noise_free']['n_peaks'][i]} / {out[f'n_peaks_{args.row}'][i]}"
              f"  {out[f'n_matched_{args.row}'][i]}")


if __name__ == "__main__":
    main()
