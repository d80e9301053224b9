"""Matching: swapped, missing, extra and out-of-radius peaks; flat batches; the most-pairs and the
nearest-pairs rules."""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.errors import InputError
from galgan_ray.matching import match_peaks, match_peaks_batch, radius_pixels


def test_swapped_order_is_matched_by_position():
    truth = [[10.0, 10.0], [20.0, 12.0]]
    peaks = [[20.3, 11.8], [9.9, 10.2]]
    m = match_peaks(truth, peaks, radius_px=2.0)
    assert_array_equal(m["truth_index"], [0, 1])
    assert_array_equal(m["peak_index"], [1, 0])
    assert_allclose(m["distance"], [np.hypot(0.1, 0.2), np.hypot(0.3, 0.2)])
    assert m["truth_matched"].all() and m["peak_matched"].all()


def test_missing_extra_and_out_of_radius():
    truth = [[10.0, 10.0], [20.0, 12.0]]
    # one good peak, one spurious far away, nothing near the second source
    m = match_peaks(truth, [[10.5, 10.0], [40.0, 40.0]], radius_px=2.0)
    assert_array_equal(m["truth_index"], [0])
    assert_array_equal(m["peak_index"], [0])
    assert_array_equal(m["truth_matched"], [True, False])
    assert_array_equal(m["peak_matched"], [True, False])
    # a peak just beyond the radius stays unmatched
    far = match_peaks(truth, [[12.01, 10.0]], radius_px=2.0)
    assert len(far["truth_index"]) == 0


def test_empty_inputs():
    m = match_peaks(np.zeros((0, 2)), [[1.0, 1.0]], radius_px=1.0)
    assert len(m["truth_index"]) == 0 and m["peak_matched"].tolist() == [False]
    m = match_peaks([[1.0, 1.0]], [], radius_px=1.0)
    assert len(m["peak_index"]) == 0 and m["truth_matched"].tolist() == [False]


def test_one_to_one_maximises_matches_over_greedy():
    # Greedy nearest-first would give peak 0 to truth 1 (d=0.5) and leave truth 0 unmatched.
    truth = [[0.0, 0.0], [1.5, 0.0]]
    peaks = [[1.0, 0.0], [2.9, 0.0]]
    m = match_peaks(truth, peaks, radius_px=1.45)
    assert_array_equal(m["truth_index"], [0, 1])
    assert_array_equal(m["peak_index"], [0, 1])


def test_batch_over_blends():
    truth = np.array([[10, 10], [20, 12], [5, 5], [8, 8], [30, 30]], float)
    t_idx = np.array([0, 0, 1, 1, 3])
    peaks = np.array([[20.2, 12.1], [10.1, 9.8], [5.2, 5.1], [50, 50], [1, 1]], float)
    p_idx = np.array([0, 0, 1, 1, 2])
    m = match_peaks_batch(truth, t_idx, peaks, p_idx, radius_px=1.0, n_blends=4)
    assert_array_equal(m["n_truth"], [2, 2, 0, 1])
    assert_array_equal(m["n_peaks"], [2, 2, 1, 0])
    assert_array_equal(m["n_matched"], [2, 1, 0, 0])
    assert_array_equal(m["truth_matched"], [True, True, True, False, False])
    assert_array_equal(m["peak_matched"], [True, True, True, False, False])
    pairs = sorted(zip(m["truth_row"].tolist(), m["peak_row"].tolist()))
    assert pairs == [(0, 1), (1, 0), (2, 2)]
    assert_array_equal(m["index"][np.argsort(m["truth_row"])], [0, 0, 1])


def test_radius_in_arcsec():
    assert_allclose(radius_pixels(0.3, pixel_scale_arcsec=0.06), 5.0)
    assert_allclose(radius_pixels(0.3, pixel_scale_arcsec=0.18), 5.0 / 3)
    with pytest.raises(InputError):
        radius_pixels(0.3, pixel_scale_arcsec=0.0)
    with pytest.raises(InputError):
        match_peaks([[0, 0, 0]], [[0, 0]], radius_px=1.0)


def test_nearest_rule_keeps_the_peak_on_top_of_a_source():
    """The photometry's rule: a galaxy is measured at the peak on top of it. The most-pairs rule
    hands that peak to a neighbour 0.3 px farther from it and gives the galaxy a peak 12 px away
    (the benchmark's blend 104: the dominant galaxy then 'measured' 2.2 mag too faint)."""
    truth = [[17.6, 20.3], [23.7, 17.8]]  # neighbour, dominant
    peaks = [[21.6, 18.1], [36.8, 23.9]]  # between them (2.1 px from the dominant), and a far one
    count = match_peaks(truth, peaks, radius_px=16.7)
    assert_array_equal(count["peak_index"][np.argsort(count["truth_index"])], [0, 1])  # two pairs
    near = match_peaks(truth, peaks, radius_px=16.7, rule="nearest")
    assert_array_equal(near["truth_index"], [1])
    assert_array_equal(near["peak_index"], [0])
    assert_allclose(near["distance"], [np.hypot(2.1, 0.3)])
    assert not near["peak_matched"][1] and not near["truth_matched"][0]


def test_nearest_rule_takes_closest_pairs_first_and_respects_the_radius():
    truth = [[0.0, 0.0], [5.0, 0.0], [50.0, 50.0]]
    peaks = [[4.0, 0.0], [0.5, 0.0], [9.0, 0.0]]
    m = match_peaks(truth, peaks, radius_px=4.5, rule="nearest")
    pairs = dict(zip(m["truth_index"].tolist(), m["peak_index"].tolist()))
    # (0, 0)-(0.5, 0) at 0.5, then (5, 0)-(4, 0) at 1; (9, 0), 4 px from (5, 0), is left: that source has its peak
    assert pairs == {0: 1, 1: 0}
    assert_allclose(np.sort(m["distance"]), [0.5, 1.0])
    with pytest.raises(InputError, match="rule"):
        match_peaks(truth, peaks, radius_px=1.0, rule="greedy")
