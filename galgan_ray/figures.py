"""Figures: example blends at each resolution (paper Fig. 4), and helpers shared by the plotting code.

Matplotlib is imported lazily with the Agg backend so that headless jobs and workers can plot.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_blends", "plot_blend_set", "truth_positions", "asinh_display"]


def _plt():
    """pyplot with the Agg backend. Imported on the first figure, not with this module: choosing a
    backend at import would override a notebook's, and pyplot adds ~0.4 s to every `galgan` start."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def asinh_display(image: np.ndarray, *, noise: float | None = None, q: float = 99.7) -> np.ndarray:
    """An arcsinh-stretched copy of ``image`` in [0, 1] for display (softening = noise level)."""
    img = np.asarray(image, dtype=np.float64)
    if noise is None or not noise > 0:
        med = np.median(img)
        noise = 1.4826 * np.median(np.abs(img - med)) or (np.std(img) or 1.0)
    y = np.arcsinh(img / noise)
    lo, hi = np.percentile(y, 25.0), np.percentile(y, q)  # sky at dark grey, noise mostly below it
    return np.clip((y - lo) / max(hi - lo, 1e-12), 0, 1)


def plot_blends(images: Mapping[str, np.ndarray], *, out: str | Path, truth: Mapping[str, np.ndarray] | None = None,
                peaks: Mapping[str, Sequence[np.ndarray]] | None = None, n_show: int = 6,
                pixel_scales_arcsec: Mapping[str, float] | None = None, titles: Mapping[str, str] | None = None,
                noise: Mapping[str, np.ndarray] | None = None) -> Path:
    """Grid of blends (rows) at several resolutions (columns), truth and found peaks marked.

    Parameters
    ----------
    images : mapping name -> array (N, H, W)
        e.g. ``{"high": hr[:, 0], "low": lr[:, 0], "enhanced": sr[:, 0]}``; first band only.
    out : path
        PNG written.
    truth : mapping name -> array (N, S, 2), optional
        True (x, y) 0-based pixel positions of the galaxies in each column's grid (NaN = absent).
    peaks : mapping name -> list of (K, 2) arrays, optional
        Found peak positions per blend in each column's grid.
    n_show : int
        Number of blends (rows).
    noise : mapping name -> (N,) array, optional
        Noise sigma per image, used as the display softening.

    Returns
    -------
    pathlib.Path
        The PNG path.
    """
    plt = _plt()
    names = list(images)
    n = min(n_show, len(next(iter(images.values()))))
    fig, axes = plt.subplots(n, len(names), figsize=(2.3 * len(names), 2.3 * n), squeeze=False)
    for i in range(n):
        for j, name in enumerate(names):
            ax = axes[i, j]
            img = images[name][i]
            sig = None if noise is None or name not in noise else float(noise[name][i])
            ax.imshow(asinh_display(img, noise=sig), origin="lower", cmap="gray", interpolation="nearest")
            if truth is not None and name in truth:
                t = np.asarray(truth[name][i]).reshape(-1, 2)
                t = t[np.all(np.isfinite(t), axis=1)]
                ax.plot(t[:, 0], t[:, 1], "+", color="tab:cyan", ms=9, mew=1.5)
            if peaks is not None and name in peaks:
                p = np.asarray(peaks[name][i]).reshape(-1, 2)
                ax.plot(p[:, 0], p[:, 1], "o", mfc="none", mec="tab:red", ms=10, mew=1.2)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title((titles or {}).get(name, name), fontsize=10)
    fig.text(0.5, 0.005, "+ truth   o found peaks", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def truth_positions(sources: Mapping[str, np.ndarray], blend_ids: np.ndarray, *, grid: str = "hr") -> np.ndarray:
    """Truth (x, y) of each blend's galaxies on the ``hr`` or ``lr`` grid as (N, S_max, 2), NaN-padded."""
    ids = np.asarray(blend_ids)
    row_of = {int(b): i for i, b in enumerate(ids)}
    counts = np.bincount([row_of[int(b)] for b in sources["blendId"] if int(b) in row_of], minlength=len(ids))
    s_max = max(int(counts.max()) if len(counts) else 1, 1)
    out = np.full((len(ids), s_max, 2), np.nan)
    fill = np.zeros(len(ids), dtype=int)
    for b, x, y in zip(sources["blendId"], sources[f"x_{grid}"], sources[f"y_{grid}"]):
        i = row_of.get(int(b))
        if i is not None:
            out[i, fill[i]] = (x, y)
            fill[i] += 1
    return out


def plot_blend_set(made: Mapping[str, object], *, out: str | Path, n_show: int = 6, band: int = 0) -> Path:
    """Figure of the first ``n_show`` blends of a blend set in high and low resolution, truth marked
    (the first columns of the paper's Fig. 4)."""
    batch, sources = made["blend_batch"], made["sources"]
    ids = np.asarray(batch["blendId"])[:n_show]
    images = {"high": np.asarray(batch["image_hr"])[:n_show, band],
              "low": np.asarray(batch["image_lr"])[:n_show, band]}
    truth = {"high": truth_positions(sources, ids, grid="hr"), "low": truth_positions(sources, ids, grid="lr")}
    noise = {"low": np.asarray(batch["sigma_lr"])[:n_show, band]}
    if "sigma_hr" in batch:
        noise["high"] = np.asarray(batch["sigma_hr"])[:n_show, band]
    titles = {"high": 'HST-like 0.06"/px', "low": 'HSC-like 0.18"/px'}
    return plot_blends(images, out=out, truth=truth, n_show=n_show, titles=titles, noise=noise)
