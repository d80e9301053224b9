"""Does a residual sky change the catalog? `galgan deblend` on every real COSMOS cutout, clean and with sky.

Usage::

    .venv/bin/python bench/residual_sky.py [DATA_DIR] [--scenes ID ...] [--json OUT.json]   # ~5 min, 35 scenes

The real-sky issue's check (``tests/test_deblend.py::test_a_residual_sky_and_gradient_give_the_clean_catalog``
runs it on five scenes) on each HSC i-band data-access cutout of ``hsc_hst_qso_fields`` as downloaded
(the scenes of ``real_sky.find_scenes``, by their ids):
the file, and a copy with a pedestal of 1 sigma plus a gradient of 1 sigma across the image along each
axis (sigma: the median of the file's variance plane), each through :func:`deblend_file` with the
shipped model. A scene gives the **same** catalog when every row of the clean run has one row of the
other within 0.5 input px (one to one, the same number of rows), with equal flags, and its gmm and
template fluxes within half their error plus 1 %; the test's assertions. Prints, per scene, the rows
and what differs; last line ``summary: same=K/N rows_changed=... flags_changed=... flux_changed=...
moved=... worst_flux_sigma=... worst_offset_px=...`` (scene counts, then the largest flux change in
units of the clean run's error and the largest offset of a matched row, over the scenes that kept
their rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_sky as rs  # noqa: E402

from galgan_ray.commands.deblend import deblend_file, default_field_config  # noqa: E402
from galgan_ray.enhance import Enhancer  # noqa: E402
from galgan_ray.field import enhancer_noise_scale  # noqa: E402


def with_residual_sky(path: str, out: str, *, pedestal: float = 1.0, gradient_x: float = 1.0,
                      gradient_y: float = 1.0) -> None:
    """An HSC data-access cutout (image, mask, variance HDUs) written to ``out`` with a residual sky
    added to its image: ``pedestal`` plus ``gradient_x``/``gradient_y`` across the image, in units of
    sigma (the square root of the median of its variance plane)."""
    with fits.open(path) as h:
        sig = np.sqrt(np.nanmedian(h[3].data))
        ny, nx = h[1].data.shape
        yy, xx = np.indices((ny, nx))
        sky = sig * (pedestal + gradient_x * (xx / nx - 0.5) + gradient_y * (yy / ny - 0.5))
        h[1].data = (h[1].data + sky).astype(h[1].data.dtype)
        h.writeto(out)


def compare(a: dict, b: dict, band: str = "i") -> dict:
    """What differs between two catalogs of one image (the residual-sky test's criteria)."""
    out = {"rows": [len(a["x"]), len(b["x"])], "rows_changed": len(a["x"]) != len(b["x"]), "moved": False,
           "flags_changed": False, "flux_changed": False}
    if out["rows_changed"] or not len(a["x"]):
        return {**out, "same": not out["rows_changed"]}
    d = np.hypot(np.subtract.outer(a["x"], b["x"]), np.subtract.outer(a["y"], b["y"]))
    j = d.argmin(axis=1)
    out["max_offset_px"] = float(d.min(axis=1).max())
    out["moved"] = bool(out["max_offset_px"] >= 0.5 or len(set(j)) != len(j))
    out["flags_changed"] = bool(np.any(np.asarray(a["flags"]) != np.asarray(b["flags"])[j]))
    worst = 0.0
    for col in (f"{band}_gmmFlux", f"{band}_templateFlux"):
        fa, fb, err = np.asarray(a[col]), np.asarray(b[col])[j], np.asarray(a[col + "Err"])
        bad = ~(np.abs(fb - fa) < 0.5 * err + 0.01 * np.abs(fa))
        out["flux_changed"] |= bool(bad.any())
        with np.errstate(invalid="ignore", divide="ignore"):
            worst = max(worst, float(np.nanmax(np.abs(fb - fa) / err, initial=0.0)))
    out["worst_flux_change_sigma"] = worst
    out["same"] = not (out["moved"] or out["flags_changed"] or out["flux_changed"])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="?", default=str(rs.DEFAULT_DATA), help="hsc_hst_qso_fields folder")
    ap.add_argument("--scenes", nargs="*", help="scene ids (default: all)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", help="write the per-scene results here")
    args = ap.parse_args(argv)
    scenes = [f for f in rs.find_scenes(args.data) if not args.scenes or f.name in args.scenes]
    if not scenes:
        print(f"residual_sky: no scenes {args.scenes or ''} under {args.data}", file=sys.stderr)
        return 1
    enh = Enhancer(args.model)
    config = default_field_config()
    noise = enhancer_noise_scale(enh, config)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in scenes:
            sky = f"{tmp}/sky_{f.name}.fits"
            with_residual_sky(f.hsc, sky)
            a, _, _, _ = deblend_file(f.hsc, psf=f.hsc_psf, enhancer=enh, noise=noise, config=config)
            b, _, _, _ = deblend_file(sky, psf=f.hsc_psf, enhancer=enh, noise=noise, config=config)
            r = {"scene": f.name, "file": Path(f.hsc).name, **compare(a, b)}
            results.append(r)
            what = [w for w in ("rows_changed", "moved", "flags_changed", "flux_changed") if r[w]]
            print(f"scene {f.name:>3}: rows {r['rows'][0]:2d} / {r['rows'][1]:2d}  "
                  f"{'same' if r['same'] else 'DIFFERENT: ' + ', '.join(what)}"
                  + (f"  (worst flux change {r['worst_flux_change_sigma']:.2f} sigma)" if "worst_flux_change_sigma" in r
                     else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    n = len(results)
    print(f"summary: same={sum(r['same'] for r in results)}/{n} "
          f"rows_changed={sum(r['rows_changed'] for r in results)} "
          f"flags_changed={sum(r['flags_changed'] for r in results)} "
          f"flux_changed={sum(r['flux_changed'] for r in results)} moved={sum(r['moved'] for r in results)} "
          f"worst_flux_sigma={max((r.get('worst_flux_change_sigma', 0.0) for r in results), default=0.0):.2f} "
          f"worst_offset_px={max((r.get('max_offset_px', 0.0) for r in results), default=0.0):.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
