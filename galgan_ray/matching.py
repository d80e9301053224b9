"""One-to-one matching of detected peaks to true source positions.

Each true source is matched to at most one peak and each peak to at most one source. Two rules:

- ``rule="count"`` (the default; detection scores): maximise first the number of pairs closer than
  the matching radius, then minimise their summed distance (Hungarian algorithm,
  ``scipy.optimize.linear_sum_assignment`` on the distance matrix, with a penalty larger than any
  feasible total for pairs beyond the radius; such pairs are then discarded). It answers "how many
  sources were found".
- ``rule="nearest"`` (measurements at the peaks; the photometry benchmark): the closest pair within
  the radius first, then the closest pair among the rest, and so on. It answers "what does the
  catalog report at this source": a source keeps the peak on top of it, even where giving that peak
  to a neighbour and a farther peak to the source would make one more pair.

Radii are stated in arcsec by callers and converted with :func:`radius_pixels` for the grid the
peaks live on.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from .errors import InputError

__all__ = ["match_peaks", "match_peaks_batch", "match_sparse", "radius_pixels"]


def radius_pixels(radius_arcsec: float, *, pixel_scale_arcsec: float) -> float:
    """A matching radius in arcsec -> pixels of a grid with ``pixel_scale_arcsec``."""
    if not radius_arcsec > 0 or not pixel_scale_arcsec > 0:
        raise InputError("matching.radius",
                         f"radius ({radius_arcsec}) and pixel scale ({pixel_scale_arcsec}) must be > 0")
    return float(radius_arcsec) / float(pixel_scale_arcsec)


def _as_xy(a, source: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(source, f"expected positions of shape (M, 2) (x, y), got {arr.shape}")
    return arr


def _assign(truth: np.ndarray, peaks: np.ndarray, radius: float,
            rule: str = "count") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    m, k = len(truth), len(peaks)
    if m == 0 or k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    d = np.hypot(truth[:, None, 0] - peaks[None, :, 0], truth[:, None, 1] - peaks[None, :, 1])
    outside = ~(d <= radius)  # NaN positions never match
    if rule == "nearest":
        order = np.argsort(np.where(outside, np.inf, d), axis=None, kind="stable")
        t_used, p_used, rows, cols = np.zeros(m, bool), np.zeros(k, bool), [], []
        for flat in order[:int((~outside).sum())]:
            i, j = divmod(int(flat), k)
            if not (t_used[i] or p_used[j]):
                t_used[i] = p_used[j] = True
                rows.append(i)
                cols.append(j)
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        return rows, cols, d[rows, cols]
    # A penalty above any sum of in-radius distances makes the solver maximise the match count first.
    penalty = (min(m, k) + 1) * radius * 10.0 + 1.0
    cost = np.where(outside, penalty, d)
    rows, cols = linear_sum_assignment(cost)
    ok = ~outside[rows, cols]
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64), d[rows[ok], cols[ok]]


def match_peaks(truth_xy, peaks_xy, *, radius_px: float, rule: str = "count") -> dict[str, np.ndarray]:
    """Match true source positions to detected peaks one to one within a radius.

    Parameters
    ----------
    truth_xy : array_like
        ``(M, 2)`` true positions (x, y), 0-based px on the grid of the peaks; M may be 0.
    peaks_xy : array_like
        ``(K, 2)`` detected positions (x, y); K may be 0.
    radius_px : float
        Largest distance of a match (px); pairs farther apart stay unmatched.
    rule : {"count", "nearest"}
        The most pairs (then the least summed distance), or the closest pairs first (module docstring).

    Returns
    -------
    dict of numpy.ndarray
        ``truth_index``: int64 ``(P,)`` rows of ``truth_xy`` that were matched;
        ``peak_index``: int64 ``(P,)`` their peaks (rows of ``peaks_xy``);
        ``distance``: float64 ``(P,)`` separations (px), each <= ``radius_px``;
        ``truth_matched``: bool ``(M,)``; ``peak_matched``: bool ``(K,)``.
    """
    if not radius_px > 0:
        raise InputError("match_peaks.radius_px", f"must be > 0, got {radius_px}")
    if rule not in ("count", "nearest"):
        raise InputError("match_peaks.rule", f"must be count or nearest, got {rule!r}")
    truth = _as_xy(truth_xy, "match_peaks.truth_xy")
    peaks = _as_xy(peaks_xy, "match_peaks.peaks_xy")
    ti, pi, dist = _assign(truth, peaks, float(radius_px), rule)
    tm = np.zeros(len(truth), bool)
    pm = np.zeros(len(peaks), bool)
    tm[ti] = True
    pm[pi] = True
    return {"truth_index": ti, "peak_index": pi, "distance": dist, "truth_matched": tm, "peak_matched": pm}


def _group_bounds(index: np.ndarray, n: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    index = np.asarray(index, dtype=np.int64)
    if len(index) and (index.min() < 0 or index.max() >= n):
        raise InputError(source, f"index values must lie in [0, {n}), got [{index.min()}, {index.max()}]")
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    return order, bounds


def match_peaks_batch(
    truth_xy,
    truth_index,
    peaks_xy,
    peak_index,
    *,
    radius_px: float,
    n_blends: int | None = None,
) -> dict[str, np.ndarray]:
    """Match sources to peaks blend by blend, for flat tables of many blends.

    Parameters
    ----------
    truth_xy : array_like
        ``(M, 2)`` true positions of all sources of all blends.
    truth_index : array_like
        ``(M,)`` int blend number of each source (e.g. the row of the blend's image).
    peaks_xy : array_like
        ``(K, 2)`` detected peak positions of all images.
    peak_index : array_like
        ``(K,)`` int blend number of each peak (``find_peaks_batch``'s ``index``).
    radius_px : float
        Largest distance of a match (px).
    n_blends : int, optional
        Number of blends (default: one more than the largest index seen).

    Returns
    -------
    dict of numpy.ndarray
        ``index``: int64 ``(P,)`` blend of each matched pair;
        ``truth_row``: int64 ``(P,)`` row in ``truth_xy``; ``peak_row``: int64 ``(P,)`` row in
        ``peaks_xy``; ``distance``: float64 ``(P,)`` px;
        ``truth_matched``: bool ``(M,)``; ``peak_matched``: bool ``(K,)``;
        ``n_truth``, ``n_peaks``, ``n_matched``: int64 ``(n_blends,)`` counts per blend.
    """
    if not radius_px > 0:
        raise InputError("match_peaks_batch.radius_px", f"must be > 0, got {radius_px}")
    truth = _as_xy(truth_xy, "match_peaks_batch.truth_xy")
    peaks = _as_xy(peaks_xy, "match_peaks_batch.peaks_xy")
    t_idx = np.asarray(truth_index, dtype=np.int64).reshape(-1)
    p_idx = np.asarray(peak_index, dtype=np.int64).reshape(-1)
    if len(t_idx) != len(truth) or len(p_idx) != len(peaks):
        raise InputError("match_peaks_batch", "index arrays must have one entry per position")
    if n_blends is None:
        n_blends = int(max(t_idx.max(initial=-1), p_idx.max(initial=-1)) + 1)
    t_order, t_b = _group_bounds(t_idx, n_blends, "match_peaks_batch.truth_index")
    p_order, p_b = _group_bounds(p_idx, n_blends, "match_peaks_batch.peak_index")
    n_truth = np.diff(t_b)
    n_peaks = np.diff(p_b)
    rows_t, rows_p, dists, blends = [], [], [], []
    radius = float(radius_px)
    for i in np.flatnonzero((n_truth > 0) & (n_peaks > 0)):
        tr = t_order[t_b[i]: t_b[i + 1]]
        pr = p_order[p_b[i]: p_b[i + 1]]
        ti, pi, d = _assign(truth[tr], peaks[pr], radius)
        rows_t.append(tr[ti])
        rows_p.append(pr[pi])
        dists.append(d)
        blends.append(np.full(len(ti), i, np.int64))
    cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
    truth_row, peak_row = cat(rows_t, np.int64), cat(rows_p, np.int64)
    index = cat(blends, np.int64)
    tm = np.zeros(len(truth), bool)
    pm = np.zeros(len(peaks), bool)
    tm[truth_row] = True
    pm[peak_row] = True
    return {
        "index": index,
        "truth_row": truth_row,
        "peak_row": peak_row,
        "distance": cat(dists, np.float64),
        "truth_matched": tm,
        "peak_matched": pm,
        "n_truth": n_truth.astype(np.int64),
        "n_peaks": n_peaks.astype(np.int64),
        "n_matched": np.bincount(index, minlength=n_blends).astype(np.int64),
    }


def match_sparse(truth_xy, peaks_xy, *, radius_px: float) -> np.ndarray:
    """:func:`match_peaks` over a whole field: the same one-to-one matching, solved separately in
    each connected group of the radius graph (so its cost grows with the group sizes, not with the
    square of the field's sources).

    Returns
    -------
    numpy.ndarray
        int64, the peak row matched to each truth row, -1 when none.
    """
    truth_xy = _as_xy(truth_xy, "match_sparse.truth_xy")
    peaks_xy = _as_xy(peaks_xy, "match_sparse.peaks_xy")
    out = np.full(len(truth_xy), -1, dtype=np.int64)
    if len(truth_xy) == 0 or len(peaks_xy) == 0:
        return out
    pairs = cKDTree(truth_xy).query_ball_tree(cKDTree(peaks_xy), r=radius_px)
    ti = np.repeat(np.arange(len(truth_xy)), [len(p) for p in pairs])
    pi = np.fromiter((j for p in pairs for j in p), dtype=np.int64, count=len(ti))
    if len(ti) == 0:
        return out
    nt = len(truth_xy)
    graph = coo_matrix((np.ones(len(ti)), (ti, nt + pi)), shape=(nt + len(peaks_xy),) * 2)
    _, comp = connected_components(graph, directed=False)
    for cidx in np.unique(comp[ti]):
        t_rows = np.flatnonzero(comp[:nt] == cidx)
        p_rows = np.flatnonzero(comp[nt:] == cidx)
        m = match_peaks(truth_xy[t_rows], peaks_xy[p_rows], radius_px=radius_px)
        out[t_rows[m["truth_index"]]] = p_rows[m["peak_index"]]
    return out
