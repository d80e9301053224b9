"""The blend benchmark (paper Figs. 4, 5, 6, 9): how often both galaxies of a blend are found at high,
low and enhanced resolution, false positives, baselines, the dependence on the blend parameters and
the SOM of that parameter space.

``evaluate(spec, models=...)`` is pure (numpy/torch); ``galgan evaluate`` writes its report and figures.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .baselines import baseline_peaks
from .blends import BlendConfig, simulate_blends, simulate_isolated
from .config import from_dict, to_dict
from .dataset import SkySampleConfig, clean_neighbours, concat_batches, real_galaxy_set, simulated_galaxy_sets
from .degrade import get_degrader
from .detect import DetectConfig, detection_images, find_peaks_batch, matched_filter
from .errors import InputError
from .evaluation_figures import plot_all
from .figures import truth_positions
from .instrument import BandConfig
from .matching import match_peaks_batch
from .metrics import (blend_outcomes, detection_fraction, detection_scores, efficiency_matrix,
                      enhancement_false_positive_rate)
from .noise import EnhancedNoiseModel, enhanced_noise_model
from .photometry_eval import evaluate_photometry
from .progress import progress
from .provenance import provenance
from .psf import draw_psf
from .training import evaluate_srgan

__all__ = ["EvalSpec", "evaluate", "benchmark_galaxies", "band_index", "channel_view", "paired_differences", "peaks_at_resolution", "score_blends",
           "central_significance", "select_detectable",
           "write_report", "BLEND_PARAMETERS"]

log = logging.getLogger(__name__)

#: The four blend parameters of the paper's Fig. 5 / Fig. 6 (columns of the blends table).
BLEND_PARAMETERS = ("sep_over_size", "delta_mag", "sum_fwhm_arcsec", "delta_z")


@dataclass(frozen=True)
class EvalSpec(SkySampleConfig):
    """The standard blend benchmark (committed as ``galgan_ray/data/benchmark_default.yaml``).

    The keys of the evaluation sky and its blends are those of :class:`galgan_ray.dataset.SkySampleConfig`
    (``seed``: sky tiles ``seed + k``, disjoint from the training sky; all the sky's galaxies passing the
    cuts are used). ``min_high_significance`` > 0 makes the benchmark, as in the paper, whose galaxies
    come from an HST-selected catalogue, measure resolution, not depth: a faint extended galaxy that the
    HST filter misses but a smoothed image shows would otherwise count as a false positive of every
    method that smooths.

    Attributes
    ----------
    n_blends, n_isolated : int
    detect : DetectConfig
        One peak finder for every resolution (only the PSF differs).
    noise_realizations : int
        Noise draws per calibration galaxy for the noise of enhanced images.
    noise_calibration_galaxies : int
        Isolated galaxies used to calibrate that noise (see :func:`enhanced_noise_model`).
    noise_percentile : float
        The noise of the filtered enhanced image at a pixel is this percentile of the per-pixel noise
        of the calibration draws whose filtered signal is at the same level (see
        :func:`enhanced_noise_model`).
    noise_levels : int
        Signal-level bins of that noise model (equal numbers of calibration pixels).
    baselines : tuple of str
        Any of ``sep``, ``richardson_lucy``, ``bicubic``.
    batch_size : int
        Enhancement batch size.
    photometry_blends : int
        Blends (the first ones) measured in the Fig. 7 photometry experiment (0: none; the default, all
        5000: on the first 1500 the headline bias factor's bootstrap interval was [11.8, 28.7]).
    n_empty : int
        Cutouts of empty sky (noise only, at the blends' depth): every peak any row finds on them is
        invented (``invented_sources_per_arcmin2.{row}.empty_sky``).
    detect_band : str or None
        Filter name (e.g. ``F775W``) of the channel on which every row finds its peaks, as the paper
        finds them on the i-band cutouts; its PSFs are the detection PSFs, the baselines work on it,
        and a single-band enhancer scores a multi-band spec on that channel alone (the paired 7-band
        benchmark's ``enhanced_1band`` row). None: band 0 of one band, the chi-like sum of several.
    chi_detection_beside : bool
        With ``detect_band`` and several bands: also the rows ``high_chi``, ``low_chi`` and
        ``{model}_chi`` (multi-band enhancers) with peaks on the chi-like sum of all bands.
    photometry_all_models : bool
        The photometry experiment at every model's peaks, not only the first's (the paired 7-band
        benchmark: the 7-band and the 1-band model on the same blends and channel, Fig. 7 of each);
        ``report["photometry_models"]`` holds each model's report.
    """

    seed: int = 5000
    n_sky_tiles: int = 6
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(sep_scale_arcsec=1.0, min_sep_arcsec=0.2,
                                                                    max_sep_arcsec=1.5, exclude_flags=("EDGE",)))
    n_blends: int = 5000
    n_isolated: int = 1000
    detect: DetectConfig = field(default_factory=lambda: DetectConfig(background="zero"))
    noise_realizations: int = 8
    noise_calibration_galaxies: int = 48
    noise_percentile: float = 90.0
    noise_levels: int = 24
    baselines: tuple[str, ...] = ("sep", "richardson_lucy", "bicubic")
    batch_size: int = 256
    photometry_blends: int = 5000
    n_empty: int = 0
    detect_band: str | None = None
    chi_detection_beside: bool = False
    photometry_all_models: bool = False


def band_index(spec: EvalSpec, band: str | None) -> int | None:
    """The channel of ``band`` (a filter name such as ``F775W``, or a full key) among the spec's HR or
    LR bands; None for None. An unknown band is an :class:`InputError` that lists the spec's bands."""
    if band is None:
        return None
    for keys in (spec.bands.high, spec.bands.low):
        for i, k in enumerate(keys):
            if band in (k, k.split("/", 1)[-1]):
                return i
    raise InputError("detect_band", f"{band!r} is not among the spec's bands {list(spec.bands.high)}")


def _one_band(dc, i: int):
    """The degrade config of channel ``i`` alone."""
    return replace(dc, high=(dc.high[i],), low=(dc.low[i],))


def _channel(x: np.ndarray, i: int | None) -> np.ndarray:
    """Channel ``i`` of (N, C, ...) kept as (N, 1, ...); all channels for None."""
    return x if i is None else x[:, i:i + 1]


def benchmark_galaxies(spec: EvalSpec, *, work_dir: str | Path, real_galaxies: str | None = None,
                       real_band: str = "hst/F814W", add_noise: bool = True
                       ) -> tuple[dict[str, np.ndarray], dict[str, Any], EvalSpec]:
    """The galaxies the benchmark blends are built from: the evaluation sky, or real stamps.

    ``add_noise=False`` draws the same evaluation sky without its noise (``DatasetConfig.add_noise``;
    ``bench/check_false_positives.py``).

    Returns
    -------
    galaxies : dict
        A cleaned galaxy set.
    info : dict
        Where they came from and how many.
    spec : EvalSpec
        The spec, with ``bands.high`` set to the real stamps' band when ``real_galaxies`` is given.
    """
    if real_galaxies:
        galaxies, meta = real_galaxy_set(real_galaxies, band=real_band, seed=spec.seed)
        spec = replace(spec, bands=replace(spec.bands, high=(real_band,)))
        info = {"source": str(real_galaxies), "n_galaxies": int(len(galaxies["image_hr"])),
                "band_configs": meta.get("band_configs")}
    else:
        ds = spec.dataset_config(test_fraction=0.5, add_noise=add_noise)
        train, test, binfo = simulated_galaxy_sets(ds, work_dir=work_dir)
        galaxies = concat_batches([g for g in (train, test) if g])
        info = {"source": "simulated sky", "n_galaxies": int(len(galaxies["image_hr"])),
                "selection_counts": binfo["selection_counts"], "band_configs": binfo["band_configs"]}
    if spec.clean_neighbours:
        galaxies, _ = clean_neighbours(galaxies, seed=spec.seed)
    return galaxies, info, spec


def empty_sky_batch(n: int, *, degrade_config, seed: int, n_high: int = 64) -> dict[str, np.ndarray] | None:
    """``n`` cutouts of empty sky: HR white noise at the HR bands' depth, degraded like the blends
    (so the LR noise is the blends' noise, HR noise carried through included). None when ``n`` is 0."""
    if n <= 0:
        return None
    sigma_hr = np.array([b.sky_sigma for b in degrade_config.high], dtype=np.float32)
    c = len(sigma_hr)
    gens = [np.random.default_rng([int(seed), 31, i]) for i in range(n)]
    image_hr = np.stack([g.standard_normal((c, n_high, n_high), dtype=np.float32) for g in gens])
    image_hr *= sigma_hr[None, :, None, None]
    out = get_degrader(degrade_config)(image_hr, rng=gens)
    return {"image_hr": image_hr, "image_lr": out["image_lr"], "sigma_lr": out["sigma_lr"],
            "sigma_hr": np.broadcast_to(sigma_hr, (n, c)).copy()}


def _degrade_config_with_real_psf(spec: EvalSpec, band_configs) -> Any:
    """The degrade config, with the HR band replaced by the one the galaxy set was drawn with."""
    dc = spec.bands.degrade_config()
    if band_configs:
        first = next(iter(band_configs.values())) if isinstance(band_configs, Mapping) else band_configs[0]
        high = first if isinstance(first, BandConfig) else from_dict(BandConfig, first)
        dc = replace(dc, high=(high,) + tuple(dc.high[1:]))
    return dc


def peaks_at_resolution(images: np.ndarray, *, psf: np.ndarray, noise_sigma: np.ndarray,
                        detect: DetectConfig, noise_model: EnhancedNoiseModel | None = None) -> dict[str, np.ndarray]:
    """``find_peaks_batch`` on the detection band (band 0, or the noise-weighted sum of bands).

    With ``noise_model`` (enhanced images) the filtered image's noise is not white: it is
    ``noise_model(level)`` times the nominal, ``level`` being the white-noise significance.
    """
    images, noise_sigma = detection_images(images, noise_sigma)
    return find_peaks_batch(images, psf=psf, config=detect, noise_sigma=noise_sigma, noise_scale=noise_model)


def central_significance(images_hr: np.ndarray, sigma_hr, *, psf: np.ndarray, radius_px: float,
                         psf_energy: float = DetectConfig().psf_energy) -> np.ndarray:
    """Highest matched-filter significance within ``radius_px`` of each cutout's centre, ``(N,)``.

    How well the high-resolution image detects a galaxy on its own (the filter of
    :func:`galgan_ray.detect.find_peaks_batch`; several bands are combined as in
    :func:`peaks_at_resolution`).
    """
    img, noise = detection_images(images_hr, sigma_hr)
    h, w = img.shape[1:]
    yy, xx = np.mgrid[:h, :w]
    disk = (xx - (w - 1) / 2.0) ** 2 + (yy - (h - 1) / 2.0) ** 2 <= max(radius_px, 1.0) ** 2
    sig = matched_filter(img, psf=psf, noise_sigma=noise, psf_energy=psf_energy)["significance"]
    return np.asarray(sig)[:, disk].max(axis=1).astype(np.float64)


def select_detectable(galaxies: Mapping[str, np.ndarray], *, psf_hr: np.ndarray, radius_px: float,
                      min_significance: float, psf_energy: float = DetectConfig().psf_energy,
                      channel: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Keep the galaxies whose :func:`central_significance` at high resolution is ``>= min_significance``
    (on ``channel`` alone, the detection band, when given).

    Returns the reduced galaxy set and counts (``input``, ``kept``, ``removed_high_significance``,
    ``min_high_significance``) for the report.
    """
    n = len(galaxies["image_hr"])
    sig = central_significance(_channel(galaxies["image_hr"], channel), _channel(galaxies["sigma_hr"], channel),
                               psf=psf_hr, radius_px=radius_px, psf_energy=psf_energy)
    keep = sig >= min_significance
    if not keep.any():
        raise InputError("min_high_significance", f"no galaxy reaches {min_significance} sigma at high "
                                                  f"resolution (highest: {sig.max():.1f}); lower the cut")
    kept = {k: (np.asarray(v)[keep] if np.ndim(v) and len(v) == n else v) for k, v in galaxies.items()}
    info = {"input": int(n), "kept": int(keep.sum()), "removed_high_significance": int(n - keep.sum()),
            "min_high_significance": float(min_significance),
            "significance_percentiles_10_50_90": [float(v) for v in np.percentile(sig, [10, 50, 90])]}
    return kept, info


def score_blends(peaks: Mapping[str, np.ndarray], truth_xy: np.ndarray, *, n_items: int, radius_px: float,
                 n_truth: int | np.ndarray) -> dict[str, np.ndarray]:
    """Match peaks to truth per blend; returns :func:`metrics.blend_outcomes` columns."""
    n_t = np.broadcast_to(np.asarray(n_truth), (n_items,))
    txy = truth_xy.reshape(n_items, -1, 2)
    keep = np.isfinite(txy[..., 0])
    t_index = np.nonzero(keep)[0]
    m = match_peaks_batch(txy[keep], t_index, np.c_[peaks["x"], peaks["y"]], peaks["index"],
                          radius_px=radius_px, n_blends=n_items)
    return blend_outcomes(n_truth=n_t, n_peaks=m["n_peaks"], n_matched=m["n_matched"])


def _fraction(ok) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating)) else v)
            for k, v in detection_fraction(np.asarray(ok, bool)).items()}


def evaluate(spec: EvalSpec, *, models: Mapping[str, str] | None = None, work_dir: str | Path = "runs/evaluate",
             real_galaxies: str | None = None, real_band: str = "hst/F814W",
             photometry: bool = True) -> dict[str, Any]:
    """Run the benchmark.

    Parameters
    ----------
    spec : EvalSpec
    models : mapping name -> checkpoint
        Enhancers to score, e.g. ``{"enhanced": "default", "enhanced_fluxcons": "default-fluxcons"}``;
        the first one is the headline ``enhanced`` row.
    real_galaxies : str, optional
        A GalSim ``RealGalaxyCatalog`` file: blends are made from those stamps instead of the sky.

    Returns
    -------
    dict
        ``report`` (JSON-able: ``detection_fraction.{row}``, ``false_positive_rate.{row}``,
        ``false_positive_rate_isolated.{row}``, ``scores.{row}``, ``efficiency_matrix.{row}``, ``n_blends``,
        ``n_isolated``, ``spec``, ``models``, ``timing``, ``provenance``), and the arrays the figures need:
        ``blends`` (truth table), ``outcomes`` (row -> per-blend outcome), ``images``, ``peaks``,
        ``sources``, ``blend_ids``.
    """
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    models = dict({"enhanced": "default"} if models is None else models)
    galaxies, ginfo, spec = benchmark_galaxies(spec, work_dir=work_dir, real_galaxies=real_galaxies, real_band=real_band)
    timing["galaxies_s"] = time.perf_counter() - t_start
    dc = _degrade_config_with_real_psf(spec, ginfo.get("band_configs")) if real_galaxies else spec.bands.degrade_config()
    scale_hr, scale_lr = dc.scale_high_arcsec, dc.scale_low_arcsec
    ch = band_index(spec, spec.detect_band)
    n_ch = len(dc.high)
    if ch is not None and n_ch == 1:
        ch = None  # one band: its channel is the only one
    det_band = 0 if ch is None else ch
    psf_hr = draw_psf(dc.high[det_band].psf, pixel_scale_arcsec=scale_hr)
    psf_lr = draw_psf(dc.low[det_band].psf, pixel_scale_arcsec=scale_lr)
    if spec.min_high_significance > 0:
        galaxies, ginfo["high_significance_cut"] = select_detectable(
            galaxies, psf_hr=psf_hr, radius_px=spec.match_radius_arcsec / scale_hr,
            min_significance=spec.min_high_significance, psf_energy=spec.detect.psf_energy, channel=ch)
        ginfo["n_galaxies"] = int(len(galaxies["image_hr"]))
    t0 = time.perf_counter()
    bb, blends, sources = simulate_blends(galaxies, config=spec.blends, degrade_config=dc, n_blends=spec.n_blends,
                                          seed=spec.seed)
    ib, iso, iso_sources = simulate_isolated(galaxies, config=spec.blends, degrade_config=dc, n=spec.n_isolated,
                                             seed=spec.seed, first_id=10**7)
    eb = empty_sky_batch(spec.n_empty, degrade_config=dc, seed=spec.seed)
    timing["blends_s"] = time.perf_counter() - t0
    n_b, n_i = len(bb["image_hr"]), len(ib["image_hr"])
    truth_hr = truth_positions(sources, bb["blendId"], grid="hr")
    truth_lr = truth_positions(sources, bb["blendId"], grid="lr")
    iso_hr = truth_positions(iso_sources, ib["blendId"], grid="hr")
    iso_lr = truth_positions(iso_sources, ib["blendId"], grid="lr")
    n_truth = blends["n_sources"]
    r_hr, r_lr = spec.match_radius_arcsec / scale_hr, spec.match_radius_arcsec / scale_lr

    rows: dict[str, dict[str, Any]] = {}  # row -> {"blend": outcomes, "iso": outcomes, "peaks": ..., "grid": ...}

    def add_row(name, pk_b, pk_i, grid, pk_e=None):
        th, ti, r = (truth_hr, iso_hr, r_hr) if grid == "hr" else (truth_lr, iso_lr, r_lr)
        rows[name] = {"blend": score_blends(pk_b, th, n_items=n_b, radius_px=r, n_truth=n_truth),
                      "iso": score_blends(pk_i, ti, n_items=n_i, radius_px=r, n_truth=1),
                      "empty": None if pk_e is None else int(len(pk_e["index"])),
                      "peaks": pk_b, "peaks_iso": pk_i, "grid": grid}

    det = spec.detect
    t0 = time.perf_counter()
    def on_empty(fn):
        return fn(eb) if eb is not None else None

    def peaks_of(images, sigma, *, psf, c, noise_model=None):
        return peaks_at_resolution(_channel(images, c), psf=psf, noise_sigma=_channel(sigma, c), detect=det,
                                   noise_model=noise_model)

    # Detection on the detect_band's channel (the paper's i band), and with chi_detection_beside also
    # on the chi-like sum of every band (rows *_chi), each with the PSFs of band 0 / its own band.
    chi = spec.chi_detection_beside and ch is not None
    psf_hr0 = draw_psf(dc.high[0].psf, pixel_scale_arcsec=scale_hr) if chi else None
    psf_lr0 = draw_psf(dc.low[0].psf, pixel_scale_arcsec=scale_lr) if chi else None
    for suffix, c, p_hr, p_lr in (("", ch, psf_hr, psf_lr),) + ((("_chi", None, psf_hr0, psf_lr0),) if chi else ()):
        add_row("high" + suffix, peaks_of(bb["image_hr"], bb["sigma_hr"], psf=p_hr, c=c),
                peaks_of(ib["image_hr"], ib["sigma_hr"], psf=p_hr, c=c), "hr",
                on_empty(lambda e: peaks_of(e["image_hr"], e["sigma_hr"], psf=p_hr, c=c)))
        add_row("low" + suffix, peaks_of(bb["image_lr"], bb["sigma_lr"], psf=p_lr, c=c),
                peaks_of(ib["image_lr"], ib["sigma_lr"], psf=p_lr, c=c), "lr",
                on_empty(lambda e: peaks_of(e["image_lr"], e["sigma_lr"], psf=p_lr, c=c)))
    timing["detect_high_low_s"] = time.perf_counter() - t0

    enhanced_images, enhanced_isolated = {}, {}
    model_info = {}
    for name, ckpt in models.items():
        # Imported here: galgan_ray.enhance pulls in scipy.signal (~0.5 s), which every `galgan` command
        # would pay at start-up (the CLI imports this module); only scoring an enhancer needs it.
        from .enhance import Enhancer

        t0 = time.perf_counter()
        enh = Enhancer(ckpt, batch_size=spec.batch_size)
        # A single-band enhancer on a multi-band spec sees the detect_band's channel alone (the paired
        # 7-band benchmark's enhanced_1band row: the very same blends and noise in that band).
        n_in = len(enh.band_keys_low)
        if n_in == n_ch:
            c_in, c_out, dc_m = None, ch, dc
        elif n_in == 1 and ch is not None:
            c_in, c_out, dc_m = ch, None, _one_band(dc, ch)
        else:
            raise InputError(str(ckpt), f"the model takes {n_in} band(s) and the spec has {n_ch}; a single-band "
                                        "model on a multi-band spec needs detect_band (the channel it sees)")

        def enhance(batch, c_in=c_in, enh=enh):
            return enh.enhance_cutouts(_channel(batch["image_lr"], c_in), _channel(batch["sigma_lr"], c_in))

        sr_b, sr_i = enhance(bb), enhance(ib)
        sr_e = on_empty(enhance)
        cal = ib["image_hr"][: spec.noise_calibration_galaxies]
        noise = enhanced_noise_model(enh, _channel(cal, c_in), _channel(ib["sigma_lr"], c_in), degrade_config=dc_m,
                                     psf=psf_hr, n_draws=spec.noise_realizations, percentile=spec.noise_percentile,
                                     n_levels=spec.noise_levels, seed=spec.seed, det=det, channel=c_out)
        timing[f"{name}_enhance_s"] = time.perf_counter() - t0
        s_b, s_i = _channel(bb["sigma_lr"], c_in), _channel(ib["sigma_lr"], c_in)
        add_row(name, peaks_of(sr_b, s_b, psf=psf_hr, c=c_out, noise_model=noise),
                peaks_of(sr_i, s_i, psf=psf_hr, c=c_out, noise_model=noise), "hr",
                None if sr_e is None else peaks_of(sr_e, _channel(eb["sigma_lr"], c_in), psf=psf_hr, c=c_out,
                                                   noise_model=noise))
        info = {"checkpoint": str(ckpt), "noise_model": noise.summary(), "bands_low": list(enh.band_keys_low),
                "bands_high": list(enh.band_keys_high)}
        if chi and c_in is None:
            noise_chi = enhanced_noise_model(enh, cal, ib["sigma_lr"], degrade_config=dc, psf=psf_hr0,
                                             n_draws=spec.noise_realizations, percentile=spec.noise_percentile,
                                             n_levels=spec.noise_levels, seed=spec.seed, det=det)
            add_row(name + "_chi", peaks_of(sr_b, s_b, psf=psf_hr0, c=None, noise_model=noise_chi),
                    peaks_of(sr_i, s_i, psf=psf_hr0, c=None, noise_model=noise_chi), "hr",
                    None if sr_e is None else peaks_of(sr_e, eb["sigma_lr"], psf=psf_hr0, c=None,
                                                       noise_model=noise_chi))
            info["noise_model_chi"] = noise_chi.summary()
        if c_in is not None:
            info["channel"] = dc.low[c_in].key
        enhanced_images[name] = sr_b
        enhanced_isolated[name] = sr_i
        info["image_metrics"] = _image_metrics(enh, bb, ib, channel=c_in)
        model_info[name] = info

    for method in progress(spec.baselines, desc="baselines", unit="method"):
        t0 = time.perf_counter()
        kw = dict(method=method, psf_lr=psf_lr, detect=det)
        pb = baseline_peaks(bb["image_lr"][:, det_band], noise_sigma=bb["sigma_lr"][:, det_band], **kw)
        pi = baseline_peaks(ib["image_lr"][:, det_band], noise_sigma=ib["sigma_lr"][:, det_band], **kw)
        pe = on_empty(lambda e: baseline_peaks(e["image_lr"][:, det_band], noise_sigma=e["sigma_lr"][:, det_band],
                                               **kw))
        add_row(method, pb, pi, "hr" if method == "bicubic" else "lr", pe)
        timing[f"{method}_s"] = time.perf_counter() - t0

    report = _report(spec, rows, n_b=n_b, n_i=n_i, models=model_info, galaxies=ginfo,
                     cutout_arcmin2=(dc.high[0].pixel_scale_arcsec * bb["image_hr"].shape[-1] / 60.0) ** 2,
                     n_empty=0 if eb is None else len(eb["image_lr"]))
    first = next(iter(models), None)
    report["headline_model"] = first
    report["detect_band"] = None if ch is None else dc.high[ch].name
    report["paired"] = paired_differences({k: v["blend"]["outcome"] for k, v in rows.items()}, first=first,
                                          others=[m for m in models if m != first])
    out = {"report": report, "blends": blends, "sources": sources, "blend_batch": bb,
           "outcomes": {k: v["blend"]["outcome"] for k, v in rows.items()},
           "n_peaks": {k: v["blend"]["n_peaks"] for k, v in rows.items()},
           "n_matched": {k: v["blend"]["n_matched"] for k, v in rows.items()},
           "peaks": {k: v["peaks"] for k, v in rows.items()}, "enhanced_images": enhanced_images,
           "peaks_isolated": {k: v["peaks_iso"] for k, v in rows.items()}, "enhanced_isolated": enhanced_isolated,
           "truth_hr_isolated": iso_hr, "truth_lr_isolated": iso_lr,
           "truth_hr": truth_hr, "truth_lr": truth_lr, "degrade_config": dc, "psf_hr": psf_hr, "psf_lr": psf_lr,
           "isolated_batch": ib, "isolated_sources": iso_sources, "detect_channel": ch}
    if photometry and first is not None and spec.photometry_blends > 0:
        t0 = time.perf_counter()
        view = channel_view(out, ch)
        out["photometry"] = evaluate_photometry(view, headline=first, max_blends=spec.photometry_blends)
        report["photometry"] = out["photometry"]["report"]
        if spec.photometry_all_models and len(models) > 1:
            out["photometry_models"] = {first: out["photometry"]}
            for name in models:
                if name != first:
                    out["photometry_models"][name] = evaluate_photometry(view, headline=name,
                                                                         max_blends=spec.photometry_blends)
            report["photometry_models"] = {k: v["report"] for k, v in out["photometry_models"].items()}
        timing["photometry_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - t_start
    report["timing"] = timing
    return out


def paired_differences(outcomes: Mapping[str, np.ndarray], *, first: str | None, others) -> dict[str, Any]:
    """Both-found fraction of ``first`` minus each other row's, on the very same blends: the mean of the
    per-blend differences, its standard error (paired: ``std(d) / sqrt(n)``), and the blends only one
    of the two resolves (McNemar's discordant pairs). Also for the ``_chi`` rows where both exist."""
    res: dict[str, Any] = {}
    pairs = [(first, o) for o in others] + [(first + "_chi", o + "_chi") for o in others] if first else []
    for a, b in pairs:
        if a not in outcomes or b not in outcomes:
            continue
        fa, fb = np.asarray(outcomes[a]) == 2, np.asarray(outcomes[b]) == 2
        d = fa.astype(float) - fb.astype(float)
        n = len(d)
        res[f"{a}_minus_{b}"] = {"difference": float(d.mean()), "err": float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else None,
                                 "n": int(n), "only_first": int((fa & ~fb).sum()), "only_second": int((fb & ~fa).sum()),
                                 "first": float(fa.mean()), "second": float(fb.mean())}
    return res


def channel_view(out: Mapping[str, Any], channel: int | None) -> Mapping[str, Any]:
    """``out`` of :func:`evaluate` reduced to one channel (what the single-band photometry experiment
    reads): batches, enhanced images, the stamps' fluxes and the degrade config of that band. The PSFs
    in ``out`` are already the detection band's. ``out`` itself for None."""
    if channel is None:
        return out
    c = channel

    def batch(b):
        return {k: (v[:, c:c + 1] if isinstance(v, np.ndarray) and v.ndim >= 2 and k.startswith(("image_", "sigma_"))
                    else v) for k, v in b.items()}

    def sources(t):
        t = dict(t)
        f = np.asarray(t["flux_stamp_njy"])
        if f.ndim > 1:
            t["flux_stamp_njy"] = f[:, c]
        return t

    view = dict(out)
    view["blend_batch"] = batch(out["blend_batch"])
    view["isolated_batch"] = batch(out["isolated_batch"]) if out.get("isolated_batch") is not None else None
    view["sources"] = sources(out["sources"])
    view["isolated_sources"] = sources(out["isolated_sources"]) if out.get("isolated_sources") is not None else None
    view["degrade_config"] = _one_band(out["degrade_config"], c)
    view["enhanced_images"] = {k: _channel(v, c) if v.shape[1] > 1 else v for k, v in out["enhanced_images"].items()}
    view["enhanced_isolated"] = {k: _channel(v, c) if v.shape[1] > 1 else v
                                 for k, v in out["enhanced_isolated"].items()}
    return view


def _image_metrics(enh, *batches, channel: int | None = None) -> dict[str, float]:
    """PSNR / SSIM / total-flux error of the enhancer and of bicubic upsampling on the benchmark cutouts
    (on ``channel`` alone for a single-band enhancer of a multi-band spec)."""
    data = {k: _channel(np.concatenate([b[k] for b in batches]), channel) for k in ("image_lr", "image_hr", "sigma_lr")}
    return {k: float(v) for k, v in evaluate_srgan(enh.generator, data, scaling=enh.model_cfg.scaling).items()}


def _report(spec, rows, *, n_b, n_i, models, galaxies, cutout_arcmin2: float, n_empty: int) -> dict[str, Any]:
    rep: dict[str, Any] = {"n_blends": n_b, "n_isolated": n_i, "n_empty": n_empty, "rows": list(rows)}
    rep["cutout_arcmin2"] = float(cutout_arcmin2)
    rep["invented_sources_per_arcmin2"] = {
        k: {"blends": float(np.sum(v["blend"]["n_peaks"] - v["blend"]["n_matched"]) / (n_b * cutout_arcmin2)),
            "empty_sky": (float(v["empty"] / (n_empty * cutout_arcmin2)) if n_empty and v["empty"] is not None
                          else None),
            "empty_sky_peaks": v["empty"]}
        for k, v in rows.items()}
    rep["detection_fraction"] = {k: _fraction(v["blend"]["outcome"] == 2) for k, v in rows.items()}
    rep["one_found_fraction"] = {k: _fraction(v["blend"]["outcome"] == 1) for k, v in rows.items()}
    rep["none_found_fraction"] = {k: _fraction(v["blend"]["outcome"] == 0) for k, v in rows.items()}
    rep["false_positive_rate_isolated"] = {k: _fraction(v["iso"]["n_peaks"] > 1) for k, v in rows.items()}
    def ref(k):  # the high/low rows of the same detection (a *_chi row against high_chi / low_chi)
        sfx = "_chi" if k.endswith("_chi") and "high_chi" in rows else ""
        return rows["high" + sfx]["blend"]["n_peaks"], rows["low" + sfx]["blend"]["n_peaks"]

    plain = [k for k in rows if k not in ("high", "low", "high_chi", "low_chi")]
    rep["false_positive_rate"] = {
        k: {kk: (float(vv) if isinstance(vv, (float, np.floating)) else vv) for kk, vv in
            enhancement_false_positive_rate(n_peaks_hr=ref(k)[0], n_peaks_lr=ref(k)[1],
                                            n_peaks_enhanced=rows[k]["blend"]["n_peaks"]).items()}
        for k in plain}
    rep["false_positive_rate_spurious"] = {
        k: {kk: (float(vv) if isinstance(vv, (float, np.floating)) else vv) for kk, vv in
            enhancement_false_positive_rate(n_peaks_hr=ref(k)[0], n_peaks_lr=ref(k)[1],
                                            n_peaks_enhanced=rows[k]["blend"]["n_peaks"],
                                            n_matched_enhanced=rows[k]["blend"]["n_matched"]).items()}
        for k in plain}
    rep["spurious_peak_rate"] = {k: _fraction(v["blend"]["n_peaks"] > v["blend"]["n_matched"])
                                 for k, v in rows.items()}
    rep["scores"] = {k: detection_scores(n_truth=v["blend"]["n_truth"], n_peaks=v["blend"]["n_peaks"],
                                         n_matched=v["blend"]["n_matched"]) for k, v in rows.items()}
    rep["efficiency_matrix"] = {k: efficiency_matrix(n_truth=v["blend"]["n_truth"], n_detected=v["blend"]["n_matched"],
                                                     max_count=3).tolist() for k, v in rows.items()}
    rep["spec"] = to_dict(spec)
    rep["models"] = models
    rep["galaxies"] = {k: v for k, v in galaxies.items() if k != "band_configs"}
    rep["provenance"] = provenance()
    rep["definitions"] = {
        "detection_fraction": "share of blends whose two galaxies each have their own peak within "
                              "match_radius_arcsec (Hungarian one-to-one); err = sqrt(p(1-p)/n), lower/upper = "
                              "68% Wilson interval",
        "false_positive_rate": "share of blends with one peak at high AND low resolution where this row finds "
                               "more than one (the paper's definition)",
        "false_positive_rate_spurious": "as false_positive_rate, but only blends where at least one of this "
                                        "row's peaks matches no galaxy (an invented peak); the paper's definition "
                                        "also counts blends whose two real galaxies this row finds and the "
                                        "high-resolution image does not",
        "spurious_peak_rate": "share of all blends with at least one peak matched to no galaxy",
        "false_positive_rate_isolated": "share of isolated single galaxies with more than one peak",
        "efficiency_matrix": "BTK convention E[matched count, true count], counts capped at 3",
        "invented_sources_per_arcmin2": "peaks matched to no galaxy per arcmin^2 of cutout: on the blends "
                                        "(all peaks less the matched ones), and on the n_empty cutouts of empty "
                                        "sky (noise only at the blends' depth), where every peak is invented",
    }
    return rep


def write_report(out: Mapping[str, Any], out_dir: str | Path) -> dict[str, str]:
    """Write ``report.json``, the per-blend outcome table (Parquet) and every figure into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_all(out, out_dir)  # first: it adds the SOM's errors to the report
    (out_dir / "report.json").write_text(json.dumps(out["report"], indent=2, sort_keys=True, default=_json_default))
    table = {k: np.asarray(v) for k, v in out["blends"].items() if np.asarray(v).ndim == 1}
    for row, oc in out["outcomes"].items():
        table[f"outcome_{row}"] = np.asarray(oc)
        table[f"n_peaks_{row}"] = np.asarray(out["n_peaks"][row])
        if row in out.get("n_matched", {}):
            table[f"n_matched_{row}"] = np.asarray(out["n_matched"][row])
    pq.write_table(pa.table(table), out_dir / "blend_outcomes.parquet")
    written = {"report": str(out_dir / "report.json"), "outcomes": str(out_dir / "blend_outcomes.parquet")}
    written.update(figures)
    return written


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
