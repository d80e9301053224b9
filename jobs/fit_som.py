"""A self-organising map of a simulated field run's blends, coloured by the detection outcome.

Usage::

    python jobs/fit_som.py                    # the run in ./output (from jobs/process_field.py)
    python jobs/fit_som.py s3://bucket/run1 --endpoint-url http://127.0.0.1:9000 --shape 32 24

The blend parameters of the paper's SOM (separation, magnitude difference, summed FWHM, redshift
difference) are read from the run's ``blends/`` table with Ray Data, the batched torch SOM
(:func:`galgan_ray.som.fit_som`) is fitted to them, and one PNG shows the map's cell means of each
parameter and the share of blends with both members found at high, low and enhanced resolution,
and enhanced minus low.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

PARAMS = ("sep_arcsec", "delta_mag", "sum_fwhm_arcsec", "delta_z")
OUTCOMES = ("found_high", "found_low", "found_enhanced")


def _auto_shape(n: int) -> tuple[int, int]:
    """The paper's 32 x 24 for >= 5000 blends, else about five blends per cell (4:3, at least 4 x 3)."""
    if n >= 5000:
        return (32, 24)
    cells = max(n / 5.0, 12.0)
    rows = max(4, int(round(np.sqrt(cells * 4 / 3))))
    return rows, max(3, int(round(rows * 3 / 4)))


def main(argv: list[str] | None = None) -> int:
    # Imports here, not at the top: a job script sets its environment (above) before Ray is imported.
    from galgan_ray.outputs import figures_dir
    from galgan_ray.ray_shell.job import FieldComputeConfig, init_ray
    from galgan_ray.ray_shell.reading import read_run_dataset
    from galgan_ray.som import SOMConfig, fit_som
    from galgan_ray.storage import StorageConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="output", help="output URL of a simulated field run (default ./output)")
    p.add_argument("--figures", help="directory for som.png and som.npz (default RUN/figures for a local run)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the run's storage")
    p.add_argument("--shape", nargs=2, type=int, metavar=("ROWS", "COLS"), help="SOM grid (default: from the size)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    fig_dir = figures_dir(args.run, args.figures)
    init_ray(FieldComputeConfig())

    ds = read_run_dataset(args.run, what="blends", storage=storage, columns=list(PARAMS + OUTCOMES))
    if ds is None:
        print(f"error: {args.run} has no blends/ table (a simulated field run makes one)", file=sys.stderr)
        return 2

    def finite_rows(batch):
        ok = np.all([np.isfinite(np.asarray(batch[c], dtype=np.float64)) for c in PARAMS], axis=0)
        return {c: np.asarray(batch[c])[ok] for c in PARAMS + OUTCOMES}

    table = ds.map_batches(finite_rows, batch_format="numpy").to_pandas()
    n = len(table)
    if n < 4:
        print(f"error: {args.run} has {n} usable blends; a SOM needs more (simulate a larger field)", file=sys.stderr)
        return 2
    data = table[list(PARAMS)].to_numpy(dtype=np.float64)
    shape = tuple(args.shape) if args.shape else _auto_shape(n)
    som = fit_som(data, config=SOMConfig(shape=shape, epochs=args.epochs, seed=args.seed))
    bmu = som.bmu(data)
    som.save(fig_dir / "som.npz")

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    panels = [(c, som.cell_mean(bmu, table[c].to_numpy(float)), "viridis", None) for c in PARAMS]
    panels += [(c.replace("found_", "both found: "), som.cell_mean(bmu, table[c].to_numpy(float)), "RdYlBu", (0, 1))
               for c in OUTCOMES]
    gain = som.cell_mean(bmu, table["found_enhanced"].to_numpy(float) - table["found_low"].to_numpy(float))
    panels.append(("enhanced - low", gain, "coolwarm", (-1, 1)))
    fig, axes = plt.subplots(2, 4, figsize=(16, 7.5))
    for ax, (title, img, cmap, lim) in zip(axes.ravel(), panels):
        im = ax.imshow(img, origin="lower", cmap=cmap, vmin=None if lim is None else lim[0],
                       vmax=None if lim is None else lim[1])
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046)
    qe, te = som.quantization_error(data), som.topographic_error(data)
    fig.suptitle(f"SOM {shape[0]}x{shape[1]} of {n} close truth pairs (QE {qe:.2f}, TE {te:.2f}); grey: empty cells")
    fig.tight_layout()
    out = fig_dir / "som.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    info = {"n_blends": n, "shape": list(shape), "quantization_error": qe, "topographic_error": te,
            "params": list(PARAMS), "fraction": {c: float(table[c].mean()) for c in OUTCOMES}}
    (fig_dir / "som.json").write_text(json.dumps(info, indent=2))
    print(f"SOM {shape[0]}x{shape[1]} of {n} blends: QE {qe:.3f}, TE {te:.3f}")
    print("wrote:")
    for f in (out, fig_dir / "som.npz", fig_dir / "som.json"):
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
