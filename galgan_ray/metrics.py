"""Detection statistics: per-blend outcomes, fractions with binomial errors, BTK-style scores.

Definitions
-----------
- A blend's outcome counts its true sources matched to a peak (``n_matched``); for pairs,
  ``outcome`` is 2 (both found), 1 (one) or 0 (none). Peaks left unmatched are spurious.
- Fractions carry two uncertainties: the symmetric binomial sigma ``sqrt(p (1 - p) / n)`` (the
  paper's error bars; zero at p = 0 or 1), and a confidence interval, by default the Wilson score
  interval at 68.27% (one sigma), which stays inside [0, 1] and is not degenerate at p = 0 or 1;
  ``interval="clopper-pearson"`` gives the exact (conservative) beta-quantile interval instead.
- Precision, recall, F1 and the efficiency matrix follow BlendingToolKit (BTK,
  ``btk.metrics.detection`` and ``btk.metrics.utils.effmat``): with per-blend counts of true
  sources t, detections p and true positives tp (matched pairs),
  precision = sum(tp) / sum(p), recall = sum(tp) / sum(t), F1 = their harmonic mean, and the
  efficiency matrix ``E[i, j]`` is the number of blends with i matched detections and j true
  sources (rows: detected-and-matched count, columns: true count; BTK plots it with
  ``origin="lower"``).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from .errors import InputError

__all__ = [
    "ONE_SIGMA",
    "blend_outcomes",
    "binomial_interval",
    "detection_fraction",
    "false_positive_rate",
    "enhancement_false_positive_rate",
    "enhancement_false_positives",
    "detection_scores",
    "efficiency_matrix",
    "binned_fraction",
]

#: Two-sided probability within one Gaussian sigma, the default confidence of intervals.
ONE_SIGMA = 0.6826894921370859


def _counts(a, name: str) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and (not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool):
        raise InputError(f"metrics.{name}", f"expected integer counts, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise InputError(f"metrics.{name}", "counts must be >= 0")
    return arr


def blend_outcomes(*, n_truth, n_peaks, n_matched) -> dict[str, np.ndarray]:
    """Per-blend outcome from the counts of a match (``match_peaks_batch`` returns them).

    Parameters
    ----------
    n_truth, n_peaks, n_matched : array_like
        ``(N,)`` true sources, detected peaks and matched pairs per blend.

    Returns
    -------
    dict of numpy.ndarray, each ``(N,)``
        ``n_truth``, ``n_peaks``, ``n_matched``: int64 copies of the inputs;
        ``n_missed``: int64, true sources without a peak;
        ``n_spurious``: int64, peaks without a true source;
        ``outcome``: int8, ``min(n_matched, 2)``: 2 both (or more) found, 1 one, 0 none;
        ``all_found``: bool, every true source found (``n_matched == n_truth > 0``).
    """
    t, p, m = _counts(n_truth, "n_truth"), _counts(n_peaks, "n_peaks"), _counts(n_matched, "n_matched")
    if not (len(t) == len(p) == len(m)):
        raise InputError("blend_outcomes", f"count arrays differ in length: {len(t)}, {len(p)}, {len(m)}")
    if np.any(m > np.minimum(t, p)):
        raise InputError("blend_outcomes", "n_matched exceeds n_truth or n_peaks")
    return {
        "n_truth": t,
        "n_peaks": p,
        "n_matched": m,
        "n_missed": t - m,
        "n_spurious": p - m,
        "outcome": np.minimum(m, 2).astype(np.int8),
        "all_found": (m == t) & (t > 0),
    }


def _z_of(confidence: float) -> float:
    # scipy.stats is imported in the two functions that need it: it takes ~0.25 s, which every `galgan`
    # command would pay at start-up (the CLI imports this module through the benchmark).
    from scipy.stats import norm

    if not 0 < confidence < 1:
        raise InputError("metrics.confidence", f"must be in (0, 1), got {confidence}")
    return float(norm.isf((1.0 - confidence) / 2.0))


def binomial_interval(k, n, *, confidence: float = ONE_SIGMA,
                      interval: Literal["wilson", "clopper-pearson"] = "wilson") -> tuple[np.ndarray, np.ndarray]:
    """Two-sided binomial confidence interval for k successes out of n (vectorised).

    Parameters
    ----------
    k, n : array_like
        Successes and trials (n = 0 gives NaN).
    confidence : float
        Coverage of the interval (default one sigma, 68.27%).
    interval : {"wilson", "clopper-pearson"}
        Wilson score interval, or the exact Clopper-Pearson interval.

    Returns
    -------
    (lower, upper) : tuple of numpy.ndarray (float64)
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if interval == "wilson":
            z = _z_of(confidence)
            p = k / n
            denom = 1.0 + z**2 / n
            centre = (p + z**2 / (2 * n)) / denom
            half = z / denom * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
            lo, hi = centre - half, centre + half
        elif interval == "clopper-pearson":
            from scipy.stats import beta  # see _z_of

            if not 0 < confidence < 1:
                raise InputError("metrics.confidence", f"must be in (0, 1), got {confidence}")
            a = (1.0 - confidence) / 2.0
            lo = np.where(k > 0, beta.ppf(a, k, n - k + 1), 0.0)
            hi = np.where(k < n, beta.ppf(1 - a, k + 1, n - k), 1.0)
        else:
            raise InputError("metrics.interval", f"unknown interval {interval!r}; use 'wilson' or 'clopper-pearson'")
    bad = ~(n > 0)
    lo = np.where(bad, np.nan, np.clip(lo, 0.0, 1.0))
    hi = np.where(bad, np.nan, np.clip(hi, 0.0, 1.0))
    return lo, hi


def detection_fraction(successes, *, confidence: float = ONE_SIGMA,
                       interval: Literal["wilson", "clopper-pearson"] = "wilson") -> dict[str, float]:
    """Fraction of successes (e.g. blends with both galaxies found) and its uncertainty.

    Parameters
    ----------
    successes : array_like of bool
        One entry per trial (blend); e.g. ``blend_outcomes(...)["outcome"] == 2``.
    confidence : float
        Coverage of the interval (default one sigma, 68.27%).
    interval : {"wilson", "clopper-pearson"}
        Which binomial interval to report.

    Returns
    -------
    dict
        ``fraction``: k / n (NaN when n = 0); ``err``: symmetric binomial sigma sqrt(p(1-p)/n);
        ``lower``, ``upper``: the interval bounds; ``k``, ``n``: int counts;
        ``confidence``: float; ``interval``: str.
    """
    s = np.asarray(successes).reshape(-1)
    if s.dtype != bool:
        if s.size and not np.all(np.isin(s, (0, 1))):
            raise InputError("detection_fraction.successes", "expected booleans (or 0/1)")
        s = s.astype(bool)
    k, n = int(s.sum()), int(s.size)
    p = k / n if n else float("nan")
    err = float(np.sqrt(p * (1 - p) / n)) if n else float("nan")
    lo, hi = binomial_interval(k, n, confidence=confidence, interval=interval)
    return {"fraction": p, "err": err, "lower": float(lo), "upper": float(hi), "k": k, "n": n,
            "confidence": float(confidence), "interval": interval}


def false_positive_rate(n_peaks, *, n_truth=1, confidence: float = ONE_SIGMA,
                        interval: Literal["wilson", "clopper-pearson"] = "wilson") -> dict[str, float]:
    """Share of images with more peaks than galaxies (isolated set: more than one peak).

    Parameters
    ----------
    n_peaks : array_like
        ``(N,)`` peaks found per image.
    n_truth : int or array_like
        True galaxies per image (1 for the isolated-galaxy set).
    confidence, interval
        As in :func:`detection_fraction`.

    Returns
    -------
    dict
        The keys of :func:`detection_fraction`, for the event ``n_peaks > n_truth``.
    """
    p = _counts(n_peaks, "n_peaks")
    t = np.broadcast_to(np.asarray(n_truth, dtype=np.int64), p.shape)
    return detection_fraction(p > t, confidence=confidence, interval=interval)


def enhancement_false_positives(*, n_peaks_hr, n_peaks_lr, n_peaks_enhanced, n_matched_enhanced=None
                                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per blend: whether HR and LR both see one peak, and whether the enhanced image then shows more.

    The HR image is the truth of what is separable; a blend that is a single peak at both HR and
    LR but several after enhancement has peaks invented by the enhancer.

    Parameters
    ----------
    n_peaks_hr, n_peaks_lr, n_peaks_enhanced : array_like
        ``(N,)`` peaks found per blend at each resolution.
    n_matched_enhanced : array_like, optional
        ``(N,)`` enhanced peaks matched one-to-one to a true galaxy. When given, the event is stricter:
        more than one enhanced peak AND at least one of them matched to no galaxy (an invented peak).
        Without it (the paper's definition) a blend whose two real galaxies are both found by the
        enhanced image, but not by the HR image, also counts as a false positive.

    Returns
    -------
    considered, false_positive : numpy.ndarray
        ``(N,)`` booleans: one peak in HR and LR; and, among those, the event.
    """
    hr = _counts(n_peaks_hr, "n_peaks_hr")
    lr = _counts(n_peaks_lr, "n_peaks_lr")
    en = _counts(n_peaks_enhanced, "n_peaks_enhanced")
    if not (len(hr) == len(lr) == len(en)):
        raise InputError("enhancement_false_positive_rate", "count arrays differ in length")
    considered = (hr == 1) & (lr == 1)
    event = en > 1
    if n_matched_enhanced is not None:
        nm = _counts(n_matched_enhanced, "n_matched_enhanced")
        if len(nm) != len(en):
            raise InputError("enhancement_false_positive_rate", "count arrays differ in length")
        event &= en > nm
    return considered, considered & event


def enhancement_false_positive_rate(*, n_peaks_hr, n_peaks_lr, n_peaks_enhanced, n_matched_enhanced=None,
                                    confidence: float = ONE_SIGMA,
                                    interval: Literal["wilson", "clopper-pearson"] = "wilson") -> dict[str, float]:
    """Share of blends where HR and LR both see one peak but the enhanced image shows more
    (:func:`enhancement_false_positives`; the same arguments, and ``confidence``, ``interval`` as in
    :func:`detection_fraction`).

    Returns
    -------
    dict
        The keys of :func:`detection_fraction` over the blends with one peak in HR and LR
        (``n`` is their number), for the event ``n_peaks_enhanced > 1``.
    """
    considered, fp = enhancement_false_positives(n_peaks_hr=n_peaks_hr, n_peaks_lr=n_peaks_lr,
                                                 n_peaks_enhanced=n_peaks_enhanced,
                                                 n_matched_enhanced=n_matched_enhanced)
    return detection_fraction(fp[considered], confidence=confidence, interval=interval)


def detection_scores(*, n_truth, n_peaks, n_matched) -> dict[str, float]:
    """BTK's precision, recall and F1 over a set of blends.

    Parameters
    ----------
    n_truth, n_peaks, n_matched : array_like
        ``(N,)`` true sources, detections and true positives (matched pairs) per blend.

    Returns
    -------
    dict
        ``precision`` = sum(tp)/sum(p); ``recall`` = sum(tp)/sum(t); ``f1`` = 2PR/(P+R)
        (NaN when undefined); ``tp``, ``fp``, ``fn``: int totals.
    """
    t, p, m = _counts(n_truth, "n_truth"), _counts(n_peaks, "n_peaks"), _counts(n_matched, "n_matched")
    tp, tot_p, tot_t = int(m.sum()), int(p.sum()), int(t.sum())
    precision = tp / tot_p if tot_p else float("nan")
    recall = tp / tot_t if tot_t else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if (precision + recall) > 0 else float("nan")
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": tot_p - tp, "fn": tot_t - tp}


def efficiency_matrix(*, n_truth, n_detected, max_count: int | None = None,
                      normalize: bool = False) -> np.ndarray:
    """BTK's efficiency matrix: blends counted by (detected count, true count).

    Parameters
    ----------
    n_truth : array_like
        ``(N,)`` true sources per blend.
    n_detected : array_like
        ``(N,)`` per blend: BTK passes the matched detections (true positives, ``n_matched``);
        pass ``n_peaks`` instead to tabulate raw peak counts.
    max_count : int, optional
        Fix the matrix to ``(max_count + 1, max_count + 1)`` so runs line up; counts above it are
        put in the last row/column. Default: the largest count seen.
    normalize : bool
        Divide each column by its total, giving P(detected = i | true = j) (empty columns NaN).

    Returns
    -------
    numpy.ndarray
        ``E[i, j]``: float64, number (or share) of blends with i detections and j true sources.
    """
    t, d = _counts(n_truth, "n_truth"), _counts(n_detected, "n_detected")
    if len(t) != len(d):
        raise InputError("efficiency_matrix", "n_truth and n_detected differ in length")
    if max_count is None:
        rows, cols = int(d.max(initial=0)) + 1, int(t.max(initial=0)) + 1
    else:
        rows = cols = int(max_count) + 1
        t, d = np.minimum(t, max_count), np.minimum(d, max_count)
    eff = np.zeros((rows, cols))
    np.add.at(eff, (d, t), 1.0)
    if normalize:
        tot = eff.sum(axis=0, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            eff = np.where(tot > 0, eff / tot, np.nan)
    return eff


def binned_fraction(values, successes, *, bins, err_kind: Literal["binomial", "wilson"] = "binomial",
                    confidence: float = ONE_SIGMA) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Success fraction in bins of a parameter (e.g. both-found fraction vs separation).

    Parameters
    ----------
    values : array_like
        ``(N,)`` parameter of each trial (NaN values are ignored).
    successes : array_like of bool
        ``(N,)`` outcome of each trial.
    bins : int or array_like
        Bin edges, or a number of equal-width bins over the finite range of ``values``.
    err_kind : {"binomial", "wilson"}
        ``"binomial"``: symmetric sigma sqrt(p(1-p)/n), shape ``(B,)``; ``"wilson"``: distances
        from the fraction to the Wilson interval bounds, shape ``(2, B)`` (matplotlib ``yerr``).
    confidence : float
        Coverage of the Wilson interval.

    Returns
    -------
    centres : numpy.ndarray
        ``(B,)`` bin centres.
    fraction : numpy.ndarray
        ``(B,)`` k/n per bin (NaN for empty bins).
    err : numpy.ndarray
        ``(B,)`` or ``(2, B)`` uncertainty (see ``err_kind``).
    counts : numpy.ndarray
        ``(B,)`` int64 trials per bin.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    s = np.asarray(successes).reshape(-1).astype(bool)
    if len(v) != len(s):
        raise InputError("binned_fraction", f"values ({len(v)}) and successes ({len(s)}) differ in length")
    ok = np.isfinite(v)
    v, s = v[ok], s[ok]
    edges = np.histogram_bin_edges(v, bins=bins)
    n = np.histogram(v, bins=edges)[0].astype(np.int64)
    k = np.histogram(v[s], bins=edges)[0].astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(n > 0, k / n, np.nan)
        if err_kind == "binomial":
            err = np.where(n > 0, np.sqrt(frac * (1 - frac) / n), np.nan)
        elif err_kind == "wilson":
            lo, hi = binomial_interval(k, n, confidence=confidence, interval="wilson")
            err = np.vstack([frac - lo, hi - frac])
        else:
            raise InputError("binned_fraction.err_kind", f"unknown {err_kind!r}; use 'binomial' or 'wilson'")
    centres = 0.5 * (edges[:-1] + edges[1:])
    return centres, frac, err, n
