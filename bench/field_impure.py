"""What the catalog rows of a simulated field that match no true object are.

Usage::

    .venv/bin/python jobs/process_field.py --set output=/tmp/fld -q
    .venv/bin/python bench/field_impure.py /tmp/fld [--radius 0.5] [--json OUT.json]   # ~1 s

The purity of ``../shared/tools/field_purity.py`` counts a row as impure when no true object (any
magnitude, stars included) lies within ``--radius``. This script says, for each such row, whether the
simulation's own **HST-resolution input** (the field's ``input/tile_*.fits``, 0.06"/px, before the
degradation) shows compact light there, and whose light it is:

- ``hr_peak_sigma``: the largest local maximum of the HR image smoothed with a Gaussian of
  ``SMOOTH_SIGMA_PX`` within ``PEAK_RADIUS_ARCSEC`` of the row, above the median of the annulus
  ``ANNULUS_ARCSEC`` around that maximum, in units of the smoothed image's noise (MAD of the
  smoothed sky). A smooth disk or wing has no local maximum, or none above its surroundings; a knot,
  a clump or an object missing from the truth does.
- ``hr_excess_njy``: the HR image's flux within ``APERTURE_ARCSEC`` of the row above the annulus
  median: the compact light itself, to set beside the row's ``templateFlux``.
- ``host``: the true object brighter than the row (by ``{band}_templateFlux``) nearest in units of
  its half-light radius: its magnitude, half-light radius ("), distance (") and distance / hlr.

Matched rows give the scale, and random positions on the tiles' inner regions (``N_RANDOM``,
seeded) the null. Last line: ``summary: n_rows=... n_impure=... impure_hr_peak=...
matched_hr_peak=... random_hr_peak=... impure_in_host=...`` (shares with ``hr_peak_sigma >= 5``;
``impure_in_host``: impure rows within ``HOST_MAX_HLR`` half-light radii of a brighter true galaxy).
Nothing here changes the catalog or its score.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
from astropy.io import fits
from astropy.stats import mad_std
from astropy.wcs import WCS
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galgan_ray.instrument import NJY_ZEROPOINT

SMOOTH_SIGMA_PX = 1.5
PEAK_RADIUS_ARCSEC = 0.2
ANNULUS_ARCSEC = (0.3, 0.5)
APERTURE_ARCSEC = 0.3
HR_PEAK_SIGMA = 5.0
HOST_MAX_HLR = 8.0
N_RANDOM = 200


def _window(shape, x: float, y: float, m: int):
    """The box of half-side ``m`` around ``(x, y)`` cut to ``shape``: its slices and pixel grids."""
    h, w = shape
    x0, y0 = int(np.rint(x)), int(np.rint(y))
    xa, xb, ya, yb = max(x0 - m, 0), min(x0 + m + 1, w), max(y0 - m, 0), min(y0 + m + 1, h)
    yy, xx = np.mgrid[ya:yb, xa:xb]
    return (slice(ya, yb), slice(xa, xb)), xx, yy


def hr_peak_sigma(smoothed: np.ndarray, noise: float, x: float, y: float, *, scale: float) -> float:
    """Prominence (in ``noise`` units) of the brightest local maximum of ``smoothed`` within
    ``PEAK_RADIUS_ARCSEC`` of ``(x, y)`` above the median of the annulus around it; 0 without one."""
    r_peak = PEAK_RADIUS_ARCSEC / scale
    r0, r1 = (a / scale for a in ANNULUS_ARCSEC)
    sl, xx, yy = _window(smoothed.shape, x, y, int(np.ceil(r_peak + r1)) + 1)
    box = smoothed[sl]
    is_max = box == ndimage.maximum_filter(box, size=3, mode="nearest")
    near = np.hypot(xx - x, yy - y) <= r_peak
    best = 0.0
    for py, px in zip(*np.nonzero(is_max & near)):
        d = np.hypot(xx - xx[py, px], yy - yy[py, px])
        ring = box[(d >= r0) & (d <= r1)]
        if ring.size:
            best = max(best, float((box[py, px] - np.median(ring)) / noise))
    return best


def hr_excess(image: np.ndarray, x: float, y: float, *, scale: float) -> float:
    """The HR image's flux within ``APERTURE_ARCSEC`` of ``(x, y)`` above the median of the annulus
    ``ANNULUS_ARCSEC`` (the light of a compact source over its surroundings, nJy)."""
    r_ap = APERTURE_ARCSEC / scale
    r0, r1 = (a / scale for a in ANNULUS_ARCSEC)
    sl, xx, yy = _window(image.shape, x, y, int(np.ceil(r1)) + 1)
    box = image[sl]
    d = np.hypot(xx - x, yy - y)
    ring = box[(d >= r0) & (d <= r1)]
    inner = d <= r_ap
    return float(box[inner].sum() - (np.median(ring) if ring.size else 0.0) * inner.sum())


def _host(tru, d: np.ndarray, flux: float) -> dict:
    """The true object brighter than ``flux`` nearest in half-light radii (module docstring), ``d``
    the distances (") of all true objects."""
    brighter = tru.flux_njy.values > flux
    if not brighter.any():
        return {"host_mag": None, "host_hlr_arcsec": None, "host_arcsec": None, "host_hlr": None,
                "host_is_star": None}
    hlr = np.maximum(tru.hlr_arcsec.values, 0.05)
    k = np.flatnonzero(brighter)[np.argmin((d / hlr)[brighter])]
    return {"host_mag": float(tru.mag.values[k]), "host_hlr_arcsec": float(tru.hlr_arcsec.values[k]),
            "host_arcsec": float(d[k]), "host_hlr": float(d[k] / hlr[k]),
            "host_is_star": bool(tru.is_star.values[k])}


def analyse(out: Path, *, radius: float = 0.5, seed: int = 0) -> dict:
    """Every catalog row of the field job's output ``out`` (simulation mode) with its match, its
    ``hr_peak_sigma`` and host (module docstring), and the random-position null."""
    out = Path(out)
    cat = ds.dataset(out / "catalog", format="parquet", partitioning="hive").to_table().to_pandas()
    tru = ds.dataset(out / "truth", format="parquet", partitioning="hive").to_table().to_pandas()
    files = sorted((out / "input").glob("tile_*.fits*"))
    if not files:
        raise FileNotFoundError(f"{out / 'input'}: no simulated HR tiles (tile_*.fits); field_impure needs "
                                "a simulation-mode output")
    flux_cols = [c for c in cat.columns if c.endswith("_templateFlux")]
    if not flux_cols:
        raise ValueError(f"{out / 'catalog'}: no {{band}}_templateFlux column")
    flux_col = flux_cols[0]
    rng = np.random.default_rng(seed)
    rows, random_sig = [], []
    per_tile = max(N_RANDOM // max(len(files), 1), 1)
    for f in files:
        tile = int(f.name.split("_")[1].split(".")[0])
        with fits.open(f) as h:
            image = np.asarray(h["IMAGE"].data, dtype=np.float64)[0]
            hdr = h["IMAGE"].header
        wcs = WCS(hdr).celestial
        scale = float(np.sqrt(abs(np.linalg.det(wcs.pixel_scale_matrix)))) * 3600.0
        sm = ndimage.gaussian_filter(image, SMOOTH_SIGMA_PX)
        noise = float(mad_std(sm))
        for _ in range(per_tile):
            x = rng.uniform(hdr["INNRX0"], hdr["INNRX1"])
            y = rng.uniform(hdr["INNRY0"], hdr["INNRY1"])
            random_sig.append(hr_peak_sigma(sm, noise, x, y, scale=scale))
        sub = cat[cat["tile"] == tile]
        if sub.empty:
            continue
        x, y = wcs.world_to_pixel_values(sub.coord_ra.values, sub.coord_dec.values)
        for k, (_, r) in enumerate(sub.iterrows()):
            ra, dec = float(r.coord_ra), float(r.coord_dec)
            d = 3600.0 * np.hypot((tru.coord_ra.values - ra) * np.cos(np.radians(dec)), tru.coord_dec.values - dec)
            flux = float(r[flux_col]) if np.isfinite(r[flux_col]) else 0.0
            rows.append({"tile": tile, "objectId": int(r.objectId), "flags": int(r["flags"]),
                         "templateFlux": flux, "nearest_truth_arcsec": float(d.min()) if len(d) else np.inf,
                         "matched": bool(len(d) and d.min() < radius),
                         "hr_peak_sigma": hr_peak_sigma(sm, noise, float(x[k]), float(y[k]), scale=scale),
                         "hr_excess_njy": hr_excess(image, float(x[k]), float(y[k]), scale=scale),
                         **_host(tru, d, flux)})
    impure = [r for r in rows if not r["matched"]]
    matched = [r for r in rows if r["matched"]]

    def share(rs):
        return float(np.mean([r["hr_peak_sigma"] >= HR_PEAK_SIGMA for r in rs])) if rs else float("nan")

    in_host = [r for r in impure if r["host_hlr"] is not None and r["host_hlr"] <= HOST_MAX_HLR
               and not r["host_is_star"]]
    return {"rows": rows, "random_hr_peak_sigma": random_sig,
            "summary": {"n_rows": len(rows), "n_impure": len(impure), "impure_hr_peak": share(impure),
                        "matched_hr_peak": share(matched),
                        "random_hr_peak": float(np.mean(np.asarray(random_sig) >= HR_PEAK_SIGMA)) if random_sig else float("nan"),
                        "impure_in_host": len(in_host)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a simulation-mode field job output (catalog/, truth/, input/)")
    ap.add_argument("--radius", type=float, default=0.5, help="matching radius, arcsec (field_purity's)")
    ap.add_argument("--json", type=Path, help="write every row and the summary here")
    a = ap.parse_args(argv)
    res = analyse(a.out, radius=a.radius)
    print(f"{'tile':>4} {'objectId':>10} {'flux nJy':>9} {'mag':>6} {'near_as':>7} {'HR pk sig':>9} {'HR excess':>9} "
          f"{'flux/HR':>7} {'host mag':>8} {'hlr_as':>6} {'host_as':>7} {'host/hlr':>8}")
    for r in res["rows"]:
        if r["matched"]:
            continue
        mag = NJY_ZEROPOINT - 2.5 * np.log10(r["templateFlux"]) if r["templateFlux"] > 0 else np.nan
        ratio = r["templateFlux"] / r["hr_excess_njy"] if r["hr_excess_njy"] > 0 else np.nan
        host = (f"{r['host_mag']:8.2f} {r['host_hlr_arcsec']:6.2f} {r['host_arcsec']:7.2f} {r['host_hlr']:8.1f}"
                if r["host_mag"] is not None else f"{'-':>8} {'-':>6} {'-':>7} {'-':>8}")
        print(f"{r['tile']:4d} {r['objectId']:10d} {r['templateFlux']:9.0f} {mag:6.2f} "
              f"{r['nearest_truth_arcsec']:7.2f} {r['hr_peak_sigma']:9.1f} {r['hr_excess_njy']:9.0f} {ratio:7.1f} {host}")
    s = res["summary"]
    matched = [r["hr_peak_sigma"] for r in res["rows"] if r["matched"]]
    if matched:
        print(f"matched rows: HR peak median {np.median(matched):.1f} sigma; random positions: "
              f"median {np.median(res['random_hr_peak_sigma']):.1f} sigma")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    print("summary: " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
