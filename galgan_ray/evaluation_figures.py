"""Figures of the blend benchmark: Fig. 4 (examples with peaks), Fig. 5/9 (dependence on the blend
parameters; with the 7-band spec both models' rows), Fig. 6 (SOM of the parameter space), Fig. 7
(photometry; with the 7-band spec also both models' photometry on the same blends) and the summary
tables as Markdown."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .figures import _plt, plot_blends
from .metrics import binned_fraction
from .photometry_eval import photometry_table, plot_photometry
from .som import SOMConfig, fit_som

__all__ = ["plot_all", "plot_examples", "plot_dependence", "plot_som", "markdown_table", "PARAMETER_LABELS",
           "plot_photometry_models", "photometry_models_table"]

PARAMETER_LABELS = {
    "sep_over_size": "separation / sqrt(r1^2 + r2^2)",
    "delta_mag": "magnitude difference (flux ratio)",
    "sum_fwhm_arcsec": 'sum of FWHM ["]',
    "delta_z": "redshift difference",
}
_COLOURS = {"high": "tab:blue", "low": "tab:red", "enhanced": "tab:green", "enhanced_fluxcons": "tab:olive",
            "enhanced_1band": "tab:cyan",
            "richardson_lucy": "tab:purple", "bicubic": "tab:gray", "sep": "tab:orange"}


def _peaks_list(peaks: Mapping[str, np.ndarray], n: int) -> list[np.ndarray]:
    idx = np.asarray(peaks["index"])
    xy = np.c_[peaks["x"], peaks["y"]]
    return [xy[idx == i] for i in range(n)]


def plot_examples(out: Mapping[str, Any], path: Path, *, n_show: int = 6, row: str | None = None) -> Path:
    """Fig. 4: blends at high, low and enhanced resolution, truth (+) and found peaks (o)."""
    bb = out["blend_batch"]
    row = row or out["report"].get("headline_model", "enhanced")
    # Prefer blends that the enhancement resolved and the low resolution did not (what the paper shows).
    oc = out["outcomes"]
    gain = np.flatnonzero((oc["low"] < 2) & (oc.get(row, oc["low"]) == 2))
    rest = np.setdiff1d(np.arange(len(bb["image_hr"])), gain)
    pick = np.concatenate([gain[: n_show // 2], rest[: n_show - min(len(gain), n_show // 2)]])[:n_show]
    c = out.get("detect_channel") or 0  # the detection band's channel
    images = {"high": bb["image_hr"][pick, c], "low": bb["image_lr"][pick, c]}
    truth = {"high": out["truth_hr"][pick], "low": out["truth_lr"][pick]}
    peaks = {"high": _sel(out["peaks"]["high"], pick), "low": _sel(out["peaks"]["low"], pick)}
    noise = {"high": bb["sigma_hr"][pick, c], "low": bb["sigma_lr"][pick, c]}
    titles = {"high": "HST-like", "low": "HSC-like", row: "GAN-enhanced"}
    if row in out.get("enhanced_images", {}):
        enh = out["enhanced_images"][row]
        images[row] = enh[pick, c if enh.shape[1] > c else 0]
        truth[row] = out["truth_hr"][pick]
        peaks[row] = _sel(out["peaks"][row], pick)
        noise[row] = bb["sigma_hr"][pick, c]
    return plot_blends(images, out=path, truth=truth, peaks=peaks, n_show=len(pick), titles=titles, noise=noise)


def _sel(peaks: Mapping[str, np.ndarray], pick: np.ndarray) -> list[np.ndarray]:
    allp = _peaks_list(peaks, int(max(pick.max() + 1, 1)))
    return [allp[i] for i in pick]


def plot_dependence(out: Mapping[str, Any], path: Path, *, rows: tuple[str, ...] | None = None, n_bins: int = 8) -> Path:
    """Fig. 5: both-found fraction vs the four blend parameters, histograms of counts underneath."""
    plt = _plt()
    blends = out["blends"]
    rows = rows or tuple(r for r in ("high", "low", out["report"].get("headline_model", "enhanced"), "enhanced_1band")
                         if r in out["outcomes"])
    fig, axes = plt.subplots(2, 4, figsize=(15, 6), sharex="col", gridspec_kw={"height_ratios": [3, 1]})
    for j, param in enumerate(PARAMETER_LABELS):
        v = np.asarray(blends[param], dtype=float)
        finite = v[np.isfinite(v)]
        if len(finite) == 0:
            axes[0, j].set_visible(False)
            axes[1, j].set_visible(False)
            continue
        lo, hi = np.percentile(finite, [1, 99])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, n_bins + 1)
        for r in rows:
            c, f, e, n = binned_fraction(v, out["outcomes"][r] == 2, bins=bins)
            axes[0, j].errorbar(c, f, yerr=e, marker="o", ms=4, capsize=2, label=r, color=_COLOURS.get(r))
        axes[1, j].hist(finite, bins=bins, color="0.6")
        axes[0, j].set_ylim(-0.02, 1.02)
        axes[1, j].set_xlabel(PARAMETER_LABELS[param])
    axes[0, 0].set_ylabel("both galaxies found")
    axes[1, 0].set_ylabel("blends")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_som(out: Mapping[str, Any], path: Path, *, rows: tuple[str, ...] | None = None, epochs: int = 10) -> tuple[Path, dict]:
    """Fig. 6: a 32x24 SOM of (separation/size, delta mag, sum FWHM, delta z); top row coloured by each
    parameter's cell mean, bottom row by the both-found fraction at each resolution.

    Returns
    -------
    path, info
        ``info``: quantization and topographic error of the map.
    """
    plt = _plt()
    blends = out["blends"]
    data = np.column_stack([np.asarray(blends[p], dtype=float) for p in PARAMETER_LABELS])
    good = np.all(np.isfinite(data), axis=1)
    data = data[good]
    som = fit_som(data, config=SOMConfig(shape=(32, 24), epochs=epochs))
    bmu = som.bmu(data)
    rows = rows or tuple(r for r in ("high", "low", out["report"].get("headline_model", "enhanced"))
                         if r in out["outcomes"])
    n_cols = max(len(PARAMETER_LABELS), len(rows))
    fig, axes = plt.subplots(2, n_cols, figsize=(3.2 * n_cols, 7), squeeze=False)
    for j, p in enumerate(PARAMETER_LABELS):
        im = axes[0, j].imshow(som.cell_mean(bmu, data[:, j]), origin="lower", cmap="viridis")
        axes[0, j].set_title(PARAMETER_LABELS[p], fontsize=8)
        fig.colorbar(im, ax=axes[0, j], fraction=0.046)
    for j, r in enumerate(rows):
        im = axes[1, j].imshow(som.cell_mean(bmu, (out["outcomes"][r][good] == 2).astype(float)), origin="lower",
                               cmap="RdYlGn", vmin=0, vmax=1)
        axes[1, j].set_title(f"{r}: both found", fontsize=9)
        fig.colorbar(im, ax=axes[1, j], fraction=0.046)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    for j in range(len(rows), n_cols):
        axes[1, j].set_visible(False)
    info = {"shape": [32, 24], "n_rows": int(len(data)), "quantization_error": float(som.quantization_error(data)),
            "topographic_error": float(som.topographic_error(data))}
    fig.suptitle(f"SOM 32x24: QE {info['quantization_error']:.3f}, TE {info['topographic_error']:.3f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, info


def markdown_table(report: Mapping[str, Any]) -> str:
    """The benchmark table (paper vs this project) in Markdown."""
    paper = {"high": "~80%", "low": "~10%", "enhanced": "~50%"}
    lines = ["| row | both found (68% interval) | one found | FP (HR=LR=1 peak; paper) | "
             "FP there, invented peak | FP (isolated) | invented sources / arcmin^2: empty sky, blends | paper |",
             "|---|---|---|---|---|---|---|---|"]
    invented = report.get("invented_sources_per_arcmin2", {})

    def per_area(r):
        v = invented.get(r)
        if not v:
            return "-"
        empty = "-" if v.get("empty_sky") is None else f"{v['empty_sky']:.1f}"
        return f"{empty}, {v['blends']:.1f}"

    def count(rate):
        return f"{100 * rate['fraction']:.1f}% ({rate['k']}/{rate['n']})" if rate else "-"

    for r in report["rows"]:
        d = report["detection_fraction"][r]
        o = report["one_found_fraction"][r]
        fp = report["false_positive_rate"].get(r)
        fs = report.get("false_positive_rate_spurious", {}).get(r)
        fi = report["false_positive_rate_isolated"][r]
        lines.append(f"| {r} | {100 * d['fraction']:.1f}% ({100 * d['lower']:.1f}-{100 * d['upper']:.1f}) | "
                     f"{100 * o['fraction']:.1f}% | {count(fp)} | {count(fs)} | {100 * fi['fraction']:.1f}% | "
                     f"{per_area(r)} | {paper.get(r, '')} |")
    if report.get("detect_band"):
        lines.append(f"\nPeaks found on the {report['detect_band']} channel (rows *_chi: on the chi-like sum of all bands).")
    for name, p in report.get("paired", {}).items():
        err = "" if p["err"] is None else f" +- {100 * p['err']:.1f}"
        lines.append(f"\nPaired, on the same {p['n']} blends: {name.replace('_minus_', ' - ')} = "
                     f"{100 * p['difference']:+.1f}{err} points ({100 * p['first']:.1f}% vs {100 * p['second']:.1f}%; "
                     f"resolved by only the first {p['only_first']}, only the second {p['only_second']}).")
    return "\n".join(lines) + "\n"


def plot_all(out: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Every figure of the benchmark into ``out_dir``; returns name -> path. Adds the SOM errors to the report."""
    out_dir = Path(out_dir)
    written = {"figure4": str(plot_examples(out, out_dir / "fig4_examples.png")),
               "figure5": str(plot_dependence(out, out_dir / "fig5_dependence.png"))}
    p, info = plot_som(out, out_dir / "fig6_som.png")
    written["figure6"] = str(p)
    out["report"]["som"] = info
    (out_dir / "table.md").write_text(markdown_table(out["report"]))
    written["table"] = str(out_dir / "table.md")
    if "photometry" in out:
        written["figure7"] = str(plot_photometry(out["photometry"], out_dir / "fig7_photometry.png"))
        text = photometry_table(out["photometry"]["report"])
        if "photometry_models" in out:
            reports = {k: v["report"] for k, v in out["photometry_models"].items()}
            written["figure7_models"] = str(plot_photometry_models(reports, out_dir / "fig7_photometry_models.png"))
            text += "\n" + photometry_models_table(reports)
        (out_dir / "photometry.md").write_text(text)
        written["photometry_table"] = str(out_dir / "photometry.md")
    return written


def _model_bins(rep: Mapping[str, Any]) -> tuple[dict, dict]:
    b = rep["methods"][rep["catalog_method"]]["bins"]
    return b["low"], b["enhanced"]


def plot_photometry_models(reports: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Fig. 7 for several models: the catalog method's dmag (dominant galaxy, all blends) per input magnitude, median and
    68% half-width, at the low-resolution peaks and at each model's enhanced peaks (same blends)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    first = next(iter(reports.values()))
    low, _ = _model_bins(first)
    mids = lambda b: 0.5 * (np.asarray(b["mag_lo"]) + np.asarray(b["mag_hi"]))  # noqa: E731
    axes[0].plot(mids(low), low["median"], "o-", color=_COLOURS["low"], label="low-res peaks")
    axes[1].plot(mids(low), low["half_width_68"], "o-", color=_COLOURS["low"], label="low-res peaks")
    title = []
    for name, rep in reports.items():
        _, enh = _model_bins(rep)
        c = _COLOURS.get(name, None)
        axes[0].plot(mids(enh), enh["median"], "s-", color=c, label=f"{name} peaks")
        axes[1].plot(mids(enh), enh["half_width_68"], "s-", color=c, label=f"{name} peaks")
        a = rep["all.dominant"]
        title.append(f"{name}: RMS {a['rms_low']:.3f} -> {a['rms_enhanced']:.3f}")
    axes[0].axhline(0, color="k", lw=1)
    axes[0].set_ylabel("median dmag (measured - input)")
    axes[1].set_ylabel("68% half-width of dmag")
    for ax in axes:
        ax.set_xlabel("input magnitude")
        ax.legend(fontsize=8)
    fig.suptitle(f"{first['catalog_method']} photometry, dominant galaxy, all blends; " + "; ".join(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def photometry_models_table(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: each model's catalog-method photometry on the same blends (``fig7_photometry_models.png``)."""
    lines = ["Both models' peaks (`fig7_photometry_models.png`), the same blends and channel (catalog method, dominant galaxy). "
             "All blends: low-res peaks -> the model's peaks; subset: where the low resolution finds one peak "
             "and that model two (so the subsets differ between models).", "",
             "| model | all: bias | all: NMAD | all: RMS | all: RMS factor | subset n | subset: bias factor "
             "| subset: NMAD factor | subset: RMS factor |", "|---|---|---|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        a, h = rep["all.dominant"], rep["headline"]
        lines.append(f"| {name} | {a['bias_low']:+.3f} -> {a['bias_enhanced']:+.3f} | {a['nmad_low']:.3f} -> "
                     f"{a['nmad_enhanced']:.3f} | {a['rms_low']:.3f} -> {a['rms_enhanced']:.3f} | {a['rms_factor']:.2f} "
                     f"| {rep['n_subset_low1_enh2']} | {h['bias_factor']:.1f} | {h['nmad_factor']:.2f} "
                     f"| {h['rms_factor']:.2f} |")
    return "\n".join(lines) + "\n"
