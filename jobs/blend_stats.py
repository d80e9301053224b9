"""Blend statistics of a field run: detection fractions at high / low / enhanced resolution.

Usage::

    python jobs/blend_stats.py                 # the run in ./output (from jobs/process_field.py)
    python jobs/blend_stats.py s3://bucket/run1 --endpoint-url http://127.0.0.1:9000 --figures figs/

Simulated fields (a ``blends/`` table): the fraction of close truth pairs with both members found
at high, low and enhanced resolution, overall and versus the blend parameters (separation,
separation over size, flux ratio, summed FWHM, redshift difference), and the completeness of single
truth sources versus magnitude. Every field (also real ones, without truth): the share of
low-resolution footprints with at most one peak that the enhanced image splits into two or more,
versus the footprint's magnitude. The binning and counting are Ray Data aggregations (a bin column,
then ``groupby(bin).aggregate(Count, Sum...)``); figures are PNG; the numbers go to
``blend_stats.json`` beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

#: Blend parameters and their bin edges (the last bin is open-ended in the figures' sense: values
#: beyond the edges are clipped into the outer bins).
BLEND_BINS: dict[str, np.ndarray] = {
    "sep_arcsec": np.arange(0.0, 2.01, 0.25),
    "sep_over_size": np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 10.0]),
    "flux_ratio": np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0]),
    "sum_fwhm_arcsec": np.array([0.0, 0.15, 0.2, 0.25, 0.3, 0.4, 0.6, 1.0, 2.0]),
    "delta_z": np.array([0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0]),
}
RESOLUTIONS = ("high", "low", "enhanced")
MAG_BINS = np.arange(18.0, 27.01, 0.5)


def _binned(ds, bins: dict[str, np.ndarray], flags: dict[str, str], *, where: str | None = None) -> dict[str, dict]:
    """Counts and success counts per bin of every parameter in ``bins``, in one Ray Data pass: each
    row becomes one long-format row per parameter (``param``, ``bin``, 0/1 flags), then
    ``groupby(["param", "bin"]).aggregate(Count(), Sum(flag)...)``. Rows where ``where`` is false
    and non-finite values are left out; values beyond the edges fall in the outer bins."""
    from ray.data.aggregate import Count, Sum

    names = list(bins)

    def long_rows(batch):
        keep = np.ones(len(next(iter(batch.values()))), bool) if where is None else np.asarray(batch[where], bool)
        out = {"param": [], "bin": []}
        out.update({name: [] for name in flags})
        for i, param in enumerate(names):
            edges = bins[param]
            v = np.asarray(batch[param], dtype=np.float64)
            ok = keep & np.isfinite(v)
            out["param"].append(np.full(ok.sum(), i, dtype=np.int64))
            out["bin"].append(np.clip(np.digitize(v[ok], edges) - 1, 0, len(edges) - 2).astype(np.int64))
            for name, col in flags.items():
                out[name].append(np.asarray(batch[col])[ok].astype(np.int64))
        return {k: np.concatenate(v) for k, v in out.items()}

    agg = (ds.map_batches(long_rows, batch_format="numpy").groupby(["param", "bin"])
           .aggregate(Count(), *[Sum(name) for name in flags]).to_pandas())
    result = {}
    for i, param in enumerate(names):
        edges = bins[param]
        n = np.zeros(len(edges) - 1, dtype=np.int64)
        k = {name: np.zeros(len(edges) - 1, dtype=np.int64) for name in flags}
        for _, row in agg[agg["param"] == i].iterrows():
            n[int(row["bin"])] = int(row["count()"])
            for name in flags:
                k[name][int(row["bin"])] = int(row[f"sum({name})"])
        out: dict = {"centres": (0.5 * (edges[:-1] + edges[1:])).tolist(), "edges": edges.tolist(), "n": n.tolist()}
        for name in flags:
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.where(n > 0, k[name] / np.maximum(n, 1), np.nan)
                err = np.where(n > 0, np.sqrt(frac * (1 - frac) / np.maximum(n, 1)), np.nan)
            out[name] = {"k": k[name].tolist(), "fraction": frac.tolist(), "err": err.tolist()}
        result[param] = out
    return result


def _plot_binned(panels: dict[str, dict], names: tuple[str, ...], *, path: Path, ylabel: str, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    ncol = min(3, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    colours = {"high": "k", "low": "tab:red", "enhanced": "tab:blue", "split": "tab:purple"}
    for ax, (param, d) in zip(axes.ravel(), panels.items()):
        x = np.asarray(d["centres"])
        for name in names:
            f = np.asarray(d[name]["fraction"], dtype=float)
            e = np.asarray(d[name]["err"], dtype=float)
            ok = np.isfinite(f)
            ax.errorbar(x[ok], f[ok], yerr=e[ok], marker="o", ms=3, capsize=2, label=name,
                        color=colours.get(name))
        ax.set_xlabel(param)
        ax.set_ylabel(ylabel)
        ax.set_ylim(-0.05, 1.05)
        ax2 = ax.twinx()
        ax2.bar(x, d["n"], width=np.diff(d["edges"]) * 0.9, alpha=0.12, color="grey")
        ax2.set_ylabel("N", color="grey")
    for ax in axes.ravel()[len(panels):]:
        ax.axis("off")
    axes.ravel()[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    # Imports here, not at the top: a job script sets its environment (above) before Ray is imported.
    from galgan_ray.instrument import NJY_ZEROPOINT
    from galgan_ray.outputs import figures_dir
    from galgan_ray.ray_shell.job import FieldComputeConfig, init_ray
    from galgan_ray.ray_shell.reading import read_run_dataset
    from galgan_ray.storage import StorageConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", nargs="?", default="output", help="output URL of a field run (default ./output)")
    p.add_argument("--figures", help="directory for the PNGs and blend_stats.json "
                                     "(default RUN/figures for a local run, ./figures otherwise)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the run's storage")
    args = p.parse_args(argv)
    storage = StorageConfig(endpoint_url=args.endpoint_url)
    fig_dir = figures_dir(args.run, args.figures)
    init_ray(FieldComputeConfig())
    stats: dict = {"run": args.run}
    written: list[Path] = []

    blends = read_run_dataset(args.run, what="blends", storage=storage)
    panels = _binned(blends, BLEND_BINS, {r: f"found_{r}" for r in RESOLUTIONS}) if blends is not None else {}
    n = int(sum(panels["sep_arcsec"]["n"])) if panels else 0
    if n:
        stats["blends"] = {"n": n, **{f"fraction_{r}": sum(panels["sep_arcsec"][r]["k"]) / n for r in RESOLUTIONS},
                           "binned": panels}
        written.append(_plot_binned(panels, RESOLUTIONS, path=fig_dir / "blend_fractions.png",
                                    ylabel="both found", title=f"{n} close truth pairs: both members found"))
    truth = read_run_dataset(args.run, what="truth", storage=storage)
    if truth is not None:
        panel = _binned(truth, {"mag": MAG_BINS}, {r: f"matched_{r}" for r in RESOLUTIONS}, where="scored")["mag"]
        stats["truth_completeness_vs_mag"] = panel
        written.append(_plot_binned({"mag": panel}, RESOLUTIONS, path=fig_dir / "completeness_vs_mag.png",
                                    ylabel="found", title="truth sources found (one-to-one match)"))

    # Every field: the share of single-peak low-resolution footprints that enhancement splits.
    cat = read_run_dataset(args.run, what="catalog", storage=storage)
    if cat is not None:
        from ray.data.aggregate import Max, Sum

        flux_col = next(c for c in cat.columns() if c.endswith("_gmmFlux"))
        parents = cat.groupby("parentObjectId").aggregate(
            Sum(flux_col, alias_name="flux"), Max("deblend_nPeaks_low", alias_name="n_low"),
            Max("deblend_nPeaks_enhanced", alias_name="n_enh"))

        def parent_cols(batch):
            flux = np.asarray(batch["flux"], dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                mag = np.where(flux > 0, NJY_ZEROPOINT - 2.5 * np.log10(np.maximum(flux, 1e-30)), np.nan)
            return {"mag": mag, "single": np.asarray(batch["n_low"]) <= 1,
                    "split": (np.asarray(batch["n_low"]) <= 1) & (np.asarray(batch["n_enh"]) >= 2)}

        singles = parents.map_batches(parent_cols, batch_format="numpy")
        panel = _binned(singles, {"mag": MAG_BINS}, {"split": "split"}, where="single")["mag"]
        n_single, n_split = int(sum(panel["n"])), int(sum(panel["split"]["k"]))
        stats["split_vs_mag"] = {"n_single_peak_footprints": n_single, "n_split": n_split,
                                 "fraction": n_split / n_single if n_single else float("nan"), "binned": panel}
        written.append(_plot_binned({"footprint magnitude": panel}, ("split",), path=fig_dir / "split_vs_mag.png",
                                    ylabel="split by enhancement",
                                    title=f"{n_split}/{n_single} single-peak footprints split into >= 2"))
    (fig_dir / "blend_stats.json").write_text(json.dumps(stats, indent=2, default=float))
    written.append(fig_dir / "blend_stats.json")
    if "blends" in stats:
        b = stats["blends"]
        print(f"{b['n']} close truth pairs, both found: high {b['fraction_high']:.1%}, low {b['fraction_low']:.1%}, "
              f"enhanced {b['fraction_enhanced']:.1%}")
    if "split_vs_mag" in stats:
        s = stats["split_vs_mag"]
        print(f"{s['n_split']} of {s['n_single_peak_footprints']} single-peak low-resolution footprints split "
              f"into >= 2 sources by enhancement")
    print("wrote:")
    for w in written:
        print(f"  {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
