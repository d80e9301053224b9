"""What the `galgan deblend` rows that match no HST source are, on the real COSMOS fields.

Usage::

    .venv/bin/python bench/real_sky_spurious.py [DATA_DIR] [--json OUT.json]   # ~3 min on 2 cores

The same scenes, truth, scored region and matching as ``bench/real_sky.py`` (the ``galgan deblend``
row of ``docs/real_sky``): every scored catalog row is matched or spurious. For each, it prints how
far the nearest HST detection is, how far the quasar, the row's HSC magnitude and S/N, and the
**HST image filtered at ground resolution** (``real_sky``'s significance map of the background-
subtracted image with a 0.6" FWHM Gaussian as the filter) at the row, the highest value within 3 HST px: a real source HST's PSF-matched 5-sigma
truth misses (faint and extended) still shows there, a noise peak of the HSC image does not. Matched
rows of the same HSC magnitude give the scale. Two nulls say what that statistic gives where
there is no source: the same maximum on the *negated* map at the same rows (noise alone is symmetric
about zero, a source is not), and on the map itself at random scored positions with no HST detection
within the matching radius (``N_RANDOM`` per scene, seeded): the sky between the HST detections, its
faint undetected galaxies included. Nothing here changes the real-sky score.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_sky as rs  # noqa: E402

from galgan_ray.commands.deblend import deblend_file, default_field_config  # noqa: E402
from galgan_ray.detect import significance_map  # noqa: E402
from galgan_ray.enhance import Enhancer  # noqa: E402
from galgan_ray.field import enhancer_noise_scale  # noqa: E402
from galgan_ray.instrument import NJY_ZEROPOINT  # noqa: E402
from galgan_ray.matching import match_peaks  # noqa: E402
from galgan_ray.psf import PSFConfig, draw_psf  # noqa: E402

SMOOTH_FWHM_ARCSEC = 0.6
N_RANDOM = 200
MAG_BINS = (20.0, 25.0, 26.0, 27.0, 30.0)


def _peak_near(smap: np.ndarray, x: float, y: float, r: int = 3) -> float:
    xi, yi = int(round(float(x))), int(round(float(y)))
    h, w = smap.shape
    if not (r <= xi < w - r and r <= yi < h - r):
        return float("nan")
    return float(np.nanmax(smap[yi - r:yi + r + 1, xi - r:xi + r + 1]))


def random_empty(smap: np.ndarray, region: np.ndarray, t_xy: np.ndarray, *, radius_px: float, n: int,
                 seed: int) -> list[float]:
    """The statistic of :func:`_peak_near` at ``n`` random scored pixels with no HST detection within
    ``radius_px`` (the sky the spurious rows lie on, as the truth sees it)."""
    rng = np.random.default_rng(seed)
    iy, ix = np.nonzero(region)
    if not len(ix):
        return []
    pick = rng.choice(len(ix), size=min(4 * n, len(ix)), replace=False)
    x, y = ix[pick].astype(float), iy[pick].astype(float)
    if len(t_xy):
        d, _ = cKDTree(t_xy).query(np.column_stack([x, y]))
        x, y = x[d > radius_px], y[d > radius_px]
    return [_peak_near(smap, xi, yi) for xi, yi in zip(x[:n], y[:n])]


def scene_rows(files, enhancer, noise, *, seed: int = 0) -> tuple[list[dict], list[float]]:
    sc = rs.read_scene(files)
    s_hst = rs.pixel_scale_of(sc.hst_wcs)
    region = rs.scored_region(sc)
    truth = rs.detect_truth(sc)
    cols, _, _, _ = deblend_file(files.hsc, psf=files.hsc_psf, enhancer=enhancer, noise=noise)
    ra, dec = np.asarray(cols["coord_ra"]), np.asarray(cols["coord_dec"])
    q_ra, q_dec = sc.qso_radec
    d_qso = np.hypot((ra - q_ra) * np.cos(np.radians(q_dec)), dec - q_dec) * 3600
    dx, dy = sc.hst_wcs.world_to_pixel_values(ra, dec)
    d_xy, t_xy = np.column_stack([dx, dy]), np.column_stack([truth.x, truth.y])
    m = match_peaks(t_xy, d_xy, radius_px=rs.radius_pixels(rs.MATCH_RADIUS_ARCSEC, pixel_scale_arcsec=s_hst))
    scored = rs._in_region(region, dx, dy) & rs.outside_quasar(sc, ra, dec)
    band = next(k for k in cols if k.endswith("_gmmFlux"))[:-len("_gmmFlux")]
    flux, err = np.asarray(cols[f"{band}_gmmFlux"]), np.asarray(cols[f"{band}_gmmFluxErr"])
    # The HST image at ground resolution: real_sky's own significance map (clipped sky RMS of the
    # filtered, background-subtracted image), with a Gaussian of the HSC seeing as the filter.
    kernel = draw_psf(PSFConfig(kind="gaussian", fwhm_arcsec=SMOOTH_FWHM_ARCSEC), pixel_scale_arcsec=s_hst)
    smap, _, _ = significance_map(truth.image, np.isfinite(sc.hst_image), kernel, psf_energy=1.0)
    if len(t_xy):
        d_hst, nearest = cKDTree(t_xy).query(d_xy)
        d_hst = d_hst * s_hst
    else:
        d_hst, nearest = np.full(len(ra), np.inf), np.zeros(len(ra), int)
    mags = rs.kron_magnitudes(truth, zeropoint=sc.hst_zeropoint)
    negated = -smap
    rows = []
    for i in np.flatnonzero(scored):
        rows.append({"scene": sc.name, "matched": bool(m["peak_matched"][i]), "snr": float(flux[i] / err[i]),
                     "mag": float(NJY_ZEROPOINT - 2.5 * np.log10(max(flux[i], 1e-3))),
                     "d_hst_arcsec": float(d_hst[i]), "d_qso_arcsec": float(d_qso[i]),
                     "mag_nearest_hst": float(mags[nearest[i]]) if len(mags) else None,
                     "hst_smoothed_sigma": _peak_near(smap, dx[i], dy[i]),
                     "hst_smoothed_negated_sigma": _peak_near(negated, dx[i], dy[i])})
    radius = rs.radius_pixels(rs.MATCH_RADIUS_ARCSEC, pixel_scale_arcsec=s_hst)
    return rows, random_empty(smap, region, t_xy, radius_px=radius, n=N_RANDOM, seed=seed)


def report(rows: list[dict], n_scenes: int, random_values: list[float]) -> None:
    sp = [r for r in rows if not r["matched"]]
    ok = [r for r in rows if r["matched"]]
    arr = lambda g, k: np.array([r[k] for r in g], dtype=float)  # noqa: E731
    print(f"{len(rows)} scored rows in {n_scenes} scenes: {len(ok)} matched, {len(sp)} spurious "
          f"({len(sp) / n_scenes:.2f} per scene)")
    d, dq = arr(sp, "d_hst_arcsec"), arr(sp, "d_qso_arcsec")
    mn = np.array([r["mag_nearest_hst"] if r["mag_nearest_hst"] is not None else np.nan for r in sp])
    print(f"spurious rows: nearest HST detection median {np.median(d):.2f}\" ({np.sum(d < 0.8)} within 0.8\", "
          f"{np.mean(d < 1.5):.0%} within 1.5\"); within 4\" of the quasar {np.mean(dq < 4):.0%}; "
          f"nearest HST source brighter than mag 23 and within 3\": {np.mean((d < 3) & (mn < 23)):.0%}")
    print(f"HST smoothed to {SMOOTH_FWHM_ARCSEC}\" at the row (sigma), by the row's HSC magnitude:")
    print("  mag         | matched: n, median, >3 sigma | spurious: n, median, >3 sigma | HSC S/N median (m, s)")
    for lo, hi in zip(MAG_BINS[:-1], MAG_BINS[1:]):
        cells = []
        snr = []
        for g in (ok, sp):
            sel = [r for r in g if lo <= r["mag"] < hi]
            s = arr(sel, "hst_smoothed_sigma")
            s = s[np.isfinite(s)]
            cells.append(f"{len(sel):4d}, {np.median(s) if len(s) else np.nan:5.1f}, "
                         f"{np.mean(s > 3) if len(s) else np.nan:4.0%}")
            snr.append(np.median(arr(sel, "snr")) if sel else np.nan)
        print(f"  {lo:4.1f}-{hi:4.1f}   | {cells[0]:>28} | {cells[1]:>29} | {snr[0]:.1f}, {snr[1]:.1f}")
    s_all = arr(sp, "hst_smoothed_sigma")
    s_neg = arr(sp, "hst_smoothed_negated_sigma")
    s_rnd = np.asarray(random_values, dtype=float)
    s_rnd = s_rnd[np.isfinite(s_rnd)]
    med, above = np.nanmedian(s_all), np.nanmean(s_all > 3)
    neg_above, rnd_above = np.nanmean(s_neg > 3), np.mean(s_rnd > 3)
    print(f"nulls for the spurious rows' {np.isfinite(s_all).sum()} values (median, share > 3 sigma): at the rows "
          f"{med:.1f}, {above:.0%}; the negated map at the same rows {np.nanmedian(s_neg):.1f}, {neg_above:.0%}; "
          f"{len(s_rnd)} random scored positions without an HST detection within {rs.MATCH_RADIUS_ARCSEC}\" "
          f"{np.median(s_rnd):.1f}, {rnd_above:.0%}")
    print(f"summary: spurious_per_scene={len(sp) / n_scenes:.2f} spurious_hst_smoothed_median={med:.1f} "
          f"spurious_above_3sigma={above:.2f} matched_hst_smoothed_median="
          f"{np.nanmedian(arr(ok, 'hst_smoothed_sigma')):.1f} random_empty_above_3sigma={rnd_above:.2f} "
          f"negated_above_3sigma={neg_above:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data_dir", nargs="?", default=str(rs.DEFAULT_DATA))
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", help="write every scored row here")
    args = ap.parse_args(argv)
    files = rs.find_scenes(args.data_dir)
    enhancer = Enhancer(args.model)
    noise = enhancer_noise_scale(enhancer, default_field_config())
    rows, random_values = [], []
    for k, f in enumerate(files):
        r, v = scene_rows(f, enhancer, noise, seed=k)
        rows.extend(r)
        random_values.extend(v)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    report(rows, len(files), random_values)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
