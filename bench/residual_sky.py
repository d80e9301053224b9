"""Does a residual sky change the catalog? `galgan deblend` on every real COSMOS cutout, clean and with sky.

Usage::

    .venv/bin/python bench/residual_sky.py [DATA_DIR] [--scenes K ...] [--json OUT.json]   # ~5 min, 35 scenes

The real-sky issue's check (``tests/test_deblend.py::test_a_residual_sky_and_gradient_give_the_clean_catalog``
runs it on five scenes) on each HSC i-band data-access cutout of ``hsc_hst_qso_fields`` as downloaded:
the file, and a copy with a pedestal of 1 sigma plus a gradient of 1 sigma across the image along each
axis (sigma: the median of the file's variance plane), each through :func:`deblend_file` with the
shipped model. A scene gives the **same** catalog when every row of the clean run has one row of the
other within 0.5 input px (one to one, the same number of rows), with equal flags, and its gmm and
template fluxes within half their error plus 1 %; the test's assertions. Prints, per scene, the rows
and what differs; last line ``summary: same=K/N rows_changed=... flags_changed=... flux_changed=...
moved=...`` (scene counts).
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from galgan_ray.commands.deblend import deblend_file, default_field_config  # noqa: E402
from galgan_ray.enhance import Enhancer  # noqa: E402
from galgan_ray.field import enhancer_noise_scale  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hsc_hst_qso_fields"


def with_residual_sky(path: str, out: str) -> None:
    """The file with 1 sigma of pedestal plus a gradient of 1 sigma across each axis added to its image."""
    with fits.open(path) as h:
        sig = np.sqrt(np.nanmedian(h[3].data))
        ny, nx = h[1].data.shape
        yy, xx = np.indices((ny, nx))
        h[1].data = (h[1].data + sig * (1.0 + (xx / nx - 0.5) + (yy / ny - 0.5))).astype(h[1].data.dtype)
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
    ap.add_argument("data", nargs="?", default=str(DEFAULT_DATA), help="hsc_hst_qso_fields folder")
    ap.add_argument("--scenes", type=int, nargs="*", help="indices into the sorted cutouts (default: all)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--json", help="write the per-scene results here")
    args = ap.parse_args(argv)
    images = sorted(glob.glob(str(Path(args.data) / "hsc" / "*-cutout-HSC-I-*.fits")))
    if not images:
        print(f"residual_sky: no HSC-I cutouts under {args.data}/hsc", file=sys.stderr)
        return 1
    ks = args.scenes if args.scenes else range(len(images))
    enh = Enhancer(args.model)
    config = default_field_config()
    noise = enhancer_noise_scale(enh, config)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            img = images[k]
            sid = Path(img).name.split("-")[0]
            psf = glob.glob(str(Path(args.data) / "hsc_psf" / f"{sid}-psf-calexp-*-HSC-I-*.fits"))[0]
            sky = f"{tmp}/sky_{k}.fits"
            with_residual_sky(img, sky)
            a, _, _, _ = deblend_file(img, psf=psf, enhancer=enh, noise=noise, config=config)
            b, _, _, _ = deblend_file(sky, psf=psf, enhancer=enh, noise=noise, config=config)
            r = {"scene": k, "file": Path(img).name, **compare(a, b)}
            results.append(r)
            what = [w for w in ("rows_changed", "moved", "flags_changed", "flux_changed") if r[w]]
            print(f"scene {k:2d} {sid:>3}: rows {r['rows'][0]:2d} / {r['rows'][1]:2d}  "
                  f"{'same' if r['same'] else 'DIFFERENT: ' + ', '.join(what)}"
                  + (f"  (worst flux change {r['worst_flux_change_sigma']:.2f} sigma)" if "worst_flux_change_sigma" in r
                     else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    n = len(results)
    print(f"summary: same={sum(r['same'] for r in results)}/{n} "
          f"rows_changed={sum(r['rows_changed'] for r in results)} "
          f"flags_changed={sum(r['flags_changed'] for r in results)} "
          f"flux_changed={sum(r['flux_changed'] for r in results)} moved={sum(r['moved'] for r in results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
