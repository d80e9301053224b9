"""Fractions, binomial errors, BTK scores and the efficiency matrix on hand-made outcomes."""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.stats import binomtest

from galgan_ray.errors import InputError
from galgan_ray.metrics import (
    ONE_SIGMA,
    binned_fraction,
    binomial_interval,
    blend_outcomes,
    detection_fraction,
    detection_scores,
    efficiency_matrix,
    enhancement_false_positive_rate,
    enhancement_false_positives,
    false_positive_rate,
)


def test_eight_out_of_ten():
    res = detection_fraction([True] * 8 + [False] * 2)
    assert res["k"] == 8 and res["n"] == 10
    assert_allclose(res["fraction"], 0.8)
    assert_allclose(res["err"], np.sqrt(0.8 * 0.2 / 10), rtol=1e-12)
    assert_allclose(res["err"], 0.1265, atol=5e-5)
    # Wilson score interval at one sigma (z = 1), written out by hand.
    z, n, p = 1.0, 10, 0.8
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert_allclose([res["lower"], res["upper"]], [centre - half, centre + half], rtol=1e-6)
    assert_allclose([res["lower"], res["upper"]], [0.6491, 0.8964], atol=1e-4)
    # Wilson at 95% agrees with scipy's implementation; Clopper-Pearson with the exact one.
    ci = binomtest(8, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert_allclose(binomial_interval(8, 10, confidence=0.95), [ci.low, ci.high], rtol=1e-9)
    ci = binomtest(8, 10).proportion_ci(confidence_level=ONE_SIGMA, method="exact")
    cp = detection_fraction(np.r_[np.ones(8), np.zeros(2)], interval="clopper-pearson")
    assert_allclose([cp["lower"], cp["upper"]], [ci.low, ci.high], rtol=1e-9)


def test_fraction_edges():
    allin = detection_fraction(np.ones(5, bool))
    assert allin["fraction"] == 1.0 and allin["err"] == 0.0
    assert allin["upper"] == 1.0 and allin["lower"] < 1.0  # Wilson is not degenerate at p = 1
    none = detection_fraction([])
    assert np.isnan(none["fraction"]) and np.isnan(none["lower"])
    with pytest.raises(InputError):
        detection_fraction([0, 2])


def test_blend_outcomes():
    out = blend_outcomes(n_truth=[2, 2, 2, 3], n_peaks=[2, 3, 0, 2], n_matched=[2, 1, 0, 2])
    assert_array_equal(out["outcome"], [2, 1, 0, 2])
    assert_array_equal(out["n_spurious"], [0, 2, 0, 0])
    assert_array_equal(out["n_missed"], [0, 1, 2, 1])
    assert_array_equal(out["all_found"], [True, False, False, False])
    with pytest.raises(InputError):
        blend_outcomes(n_truth=[1], n_peaks=[1], n_matched=[2])


def test_false_positive_rates():
    fp = false_positive_rate([1, 1, 2, 1, 0, 3, 1, 1, 1, 1])
    assert fp["k"] == 2 and fp["n"] == 10
    enh = enhancement_false_positive_rate(n_peaks_hr=[1, 1, 1, 2, 1], n_peaks_lr=[1, 1, 0, 1, 1],
                                          n_peaks_enhanced=[2, 1, 3, 2, 1])
    assert enh["n"] == 3 and enh["k"] == 1
    # Stricter: only an enhanced peak that matches no galaxy is invented. In the HR = LR = 1 subset
    # (blends 0, 1, 4) the enhanced image finds both real galaxies of blend 0 (2 peaks, 2 matched):
    # a false positive by the paper's definition, not an invented peak; blend 4 has an unmatched one.
    strict = enhancement_false_positive_rate(n_peaks_hr=[1, 1, 1, 2, 1], n_peaks_lr=[1, 1, 0, 1, 1],
                                             n_peaks_enhanced=[2, 1, 3, 2, 2], n_matched_enhanced=[2, 1, 1, 2, 1])
    paper = enhancement_false_positive_rate(n_peaks_hr=[1, 1, 1, 2, 1], n_peaks_lr=[1, 1, 0, 1, 1],
                                            n_peaks_enhanced=[2, 1, 3, 2, 2])
    assert (strict["n"], strict["k"]) == (3, 1) and (paper["n"], paper["k"]) == (3, 2)
    # Per blend: which blends the rate is over, and which of them are false positives (blends 0 and 4).
    considered, fp = enhancement_false_positives(n_peaks_hr=[1, 1, 1, 2, 1], n_peaks_lr=[1, 1, 0, 1, 1],
                                                 n_peaks_enhanced=[2, 1, 3, 2, 2])
    assert considered.tolist() == [True, True, False, False, True] and fp.tolist() == [True, False, False, False, True]


def test_btk_scores_and_efficiency_matrix():
    n_truth = np.array([2, 2, 2, 1, 3])
    n_peaks = np.array([2, 1, 3, 1, 1])
    n_matched = np.array([2, 1, 1, 1, 1])
    s = detection_scores(n_truth=n_truth, n_peaks=n_peaks, n_matched=n_matched)
    assert (s["tp"], s["fp"], s["fn"]) == (6, 2, 4)
    assert_allclose([s["precision"], s["recall"]], [6 / 8, 6 / 10])
    assert_allclose(s["f1"], 2 * 0.75 * 0.6 / 1.35)
    eff = efficiency_matrix(n_truth=n_truth, n_detected=n_matched)
    expected = np.zeros((3, 4))  # rows: matched 0..2, columns: true 0..3
    expected[2, 2] = 1
    expected[1, 2] = 2
    expected[1, 1] = 1
    expected[1, 3] = 1
    assert_array_equal(eff, expected)
    norm = efficiency_matrix(n_truth=n_truth, n_detected=n_matched, normalize=True)
    assert_allclose(norm[:, 2], [0, 2 / 3, 1 / 3])
    assert np.all(np.isnan(norm[:, 0]))
    fixed = efficiency_matrix(n_truth=n_truth, n_detected=n_peaks, max_count=2)
    assert fixed.shape == (3, 3) and fixed.sum() == 5 and fixed[2, 2] == 2  # 3 -> clipped to 2


def test_binned_fraction():
    values = np.array([0.1, 0.2, 0.3, 1.1, 1.2, 1.4, 1.6, 2.5, np.nan])
    success = np.array([0, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    centres, frac, err, counts = binned_fraction(values, success, bins=[0, 1, 2, 3])
    assert_allclose(centres, [0.5, 1.5, 2.5])
    assert_array_equal(counts, [3, 4, 1])
    assert_allclose(frac, [1 / 3, 3 / 4, 1.0])
    assert_allclose(err, [np.sqrt(2 / 9 / 3), np.sqrt(3 / 16 / 4), 0.0])
    _, _, werr, _ = binned_fraction(values, success, bins=[0, 1, 2, 3, 4], err_kind="wilson")
    assert werr.shape == (2, 4) and np.all(werr[:, :3] >= 0) and np.all(np.isnan(werr[:, 3]))
