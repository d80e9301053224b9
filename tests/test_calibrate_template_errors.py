"""bench/calibrate_template_errors.py: the pick of the template systematic (synthetic galaxies, < 1 s)."""
import numpy as np
from conftest import load_bench

cte = load_bench("calibrate_template_errors")


def _galaxies(n, systematic, rng):
    flux = 10 ** rng.uniform(3.0, 4.5, n)  # nJy: mag 20-23.9
    stat = np.sqrt(flux) * 0.3  # a statistical error of 0.3-1% of the flux
    true_err = np.sqrt(stat**2 + (systematic * flux) ** 2)
    measured = flux + rng.normal(0.0, true_err)
    return {"flux": measured, "flux_err": stat, "dmag": -2.5 * np.log10(measured / flux), "n_peaks": np.ones(n, int)}


def test_the_pick_recovers_the_systematic_that_went_in():
    rng = np.random.default_rng(5)
    z = _galaxies(4000, 0.015, rng)
    assert abs(cte.pick_fraction(z) - 0.015) <= 0.0025
    nmad, hw68 = cte.pulls(z, 0.015)
    assert abs(nmad - 1.0) < 0.08 and abs(hw68 - 1.0) < 0.08
    # Errors without the systematic are too small: the pulls are wider than 1.
    assert cte.pulls(z, 0.0)[0] > 1.5


def test_split_galaxies_are_left_out_of_the_pick_when_asked():
    rng = np.random.default_rng(6)
    z = _galaxies(3000, 0.01, rng)
    split = np.zeros(3000, bool)
    split[:300] = True
    z["dmag"] = np.where(split, z["dmag"] + rng.uniform(0.1, 0.5, 3000), z["dmag"])  # shreds lose flux
    z["n_peaks"] = np.where(split, 3, 1)
    assert abs(cte.pick_fraction(z, z["n_peaks"] == 1) - 0.01) <= 0.0025
    assert cte.pick_fraction(z) > 0.01
