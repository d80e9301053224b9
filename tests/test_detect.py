"""The peak finder finds what went in, at every resolution, and nothing in pure noise."""
from __future__ import annotations

import pickle

import galsim
import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.config import from_dict, to_dict
from galgan_ray.detect import DetectConfig, find_peaks, find_peaks_batch, matched_filter
from galgan_ray.errors import InputError
from galgan_ray.flags import flag_bit
from galgan_ray.geometry import make_tan_wcs
from galgan_ray.instrument import get_band
from galgan_ray.psf import PSFConfig, draw_psf, measure_fwhm, psf_profile

LR = get_band("hsc", "i")  # Moffat 0.6" on 0.18"/px
HR = get_band("hst", "F775W")  # Airy + jitter on 0.06"/px
GAUSS_HR = PSFConfig(kind="gaussian", fwhm_arcsec=0.1)


def draw_points(psf_cfg: PSFConfig, scale: float, n: int, sources, *, sigma: float = 0.0, seed: int = 0) -> np.ndarray:
    """An n x n image of point sources [(x, y, flux), ...] (0-based px) plus white noise."""
    prof = psf_profile(psf_cfg)
    c = (n - 1) / 2
    img = np.zeros((n, n))
    for x, y, flux in sources:
        stamp = galsim.ImageD(n, n, scale=scale)
        prof.withFlux(flux).drawImage(stamp, offset=(x - c, y - c))
        img += stamp.array
    if sigma:
        img += np.random.default_rng(seed).normal(0.0, sigma, img.shape)
    return img.astype(np.float32)


def _sorted_xy(out):
    xy = np.c_[out["x"], out["y"]]
    return xy[np.lexsort((xy[:, 1], xy[:, 0]))]


@pytest.mark.parametrize("background", ["zero", "sep"])
def test_two_moffat_sources_lr(background):
    psf = draw_psf(LR.psf, pixel_scale_arcsec=LR.pixel_scale_arcsec)
    sig = LR.sky_sigma
    truth = np.array([[6.3, 11.2], [15.1, 8.6]])  # 9 px = 1.6" apart
    img = draw_points(LR.psf, LR.pixel_scale_arcsec, 22, [(x, y, 150 * sig) for x, y in truth], sigma=sig, seed=1)
    out = find_peaks(img, psf=psf, noise_sigma=sig, config=DetectConfig(background=background))
    assert len(out["x"]) == 2
    assert_allclose(_sorted_xy(out), truth, atol=0.3)
    assert np.all(out["significance"] > 10)
    assert out["flags"].dtype == np.int32
    assert np.all(np.diff(out["significance"]) <= 0)


@pytest.mark.parametrize("psf_cfg", [HR.psf, GAUSS_HR], ids=["airy", "gaussian"])
def test_two_sources_hr(psf_cfg):
    psf = draw_psf(psf_cfg, pixel_scale_arcsec=HR.pixel_scale_arcsec)
    sig = HR.sky_sigma
    truth = np.array([[20.4, 30.7], [41.8, 36.2]])
    img = draw_points(psf_cfg, HR.pixel_scale_arcsec, 64, [(x, y, 40 * sig) for x, y in truth], sigma=sig, seed=2)
    out = find_peaks(img, psf=psf, noise_sigma=sig, config=DetectConfig(background="zero"))
    assert len(out["x"]) == 2
    assert_allclose(_sorted_xy(out), truth, atol=0.3)


def test_flux_and_significance_of_a_bright_lr_source():
    psf = draw_psf(LR.psf, pixel_scale_arcsec=LR.pixel_scale_arcsec)
    flux = 500.0
    img = draw_points(LR.psf, LR.pixel_scale_arcsec, 22, [(10.7, 10.2, flux)])
    out = find_peaks(img, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero"))
    assert len(out["x"]) == 1
    assert_allclose(out["flux"][0], flux, rtol=0.01)
    # S/N of optimal photometry: F sqrt(sum p^2) / sigma.
    assert_allclose(out["significance"][0], flux * np.sqrt((psf**2).sum()), rtol=0.01)


def test_close_pair_gives_one_peak():
    psf = draw_psf(LR.psf, pixel_scale_arcsec=LR.pixel_scale_arcsec)
    fwhm = measure_fwhm(psf)
    sep_px = 0.5 * fwhm
    truth = [(10.5 - sep_px / 2, 10.5, 300.0), (10.5 + sep_px / 2, 10.5, 300.0)]
    img = draw_points(LR.psf, LR.pixel_scale_arcsec, 22, truth)
    out = find_peaks(img, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero"))
    assert len(out["x"]) == 1
    assert_allclose([out["x"][0], out["y"][0]], [10.5, 10.5], atol=0.1)


def test_pair_inside_min_separation_is_merged_and_flagged():
    psf = draw_psf(GAUSS_HR, pixel_scale_arcsec=0.06)
    fwhm = measure_fwhm(psf)
    truth = [(26.0, 31.0, 300.0), (26.0 + 2.5 * fwhm, 31.0, 200.0)]
    img = draw_points(GAUSS_HR, 0.06, 64, truth)
    both = find_peaks(img, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero"))
    assert len(both["x"]) == 2 and not np.any(both["flags"] & flag_bit("PEAK_MERGED"))
    one = find_peaks(img, psf=psf, noise_sigma=1.0,
                     config=DetectConfig(background="zero", min_separation_fwhm=3.0))
    assert len(one["x"]) == 1
    assert one["flags"][0] & flag_bit("PEAK_MERGED")
    assert abs(one["x"][0] - 26.0) < 0.3  # the stronger survives
    # The same floor given in arcsec.
    arc = find_peaks(img, psf=psf, noise_sigma=1.0, pixel_scale_arcsec=0.06,
                     config=DetectConfig(background="zero", min_separation_arcsec=3.0 * fwhm * 0.06))
    assert len(arc["x"]) == 1


def test_min_prominence_merges_a_bump_on_a_wing_but_not_separate_sources():
    psf = draw_psf(GAUSS_HR, pixel_scale_arcsec=0.06)
    fwhm = measure_fwhm(psf)
    bright, bump = (30.0, 31.0, 3000.0), (30.0 + 2.5 * fwhm, 31.0, 300.0)  # bump prominence ~35
    img = draw_points(GAUSS_HR, 0.06, 64, [bright, bump])
    cfg = DetectConfig(background="zero")
    assert len(find_peaks(img, psf=psf, noise_sigma=1.0, config=cfg)["x"]) == 2
    out = find_peaks(img, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero", min_prominence=20.0))
    assert len(out["x"]) == 2
    out = find_peaks(img, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero", min_prominence=50.0))
    assert len(out["x"]) == 1 and out["flags"][0] & flag_bit("PEAK_MERGED")
    # Two well separated sources: the saddle between them is ~0, both stay.
    pair = draw_points(GAUSS_HR, 0.06, 64, [(20.0, 31.0, 400.0), (44.0, 31.0, 400.0)])
    out = find_peaks(pair, psf=psf, noise_sigma=1.0, config=DetectConfig(background="zero", min_prominence=50.0))
    assert len(out["x"]) == 2 and not np.any(out["flags"] & flag_bit("PEAK_MERGED"))


def test_sparse_saddle_pass_changes_no_peak(monkeypatch):
    """The prominence test reads most paths sparsely (an upper bound of their minimum) and only the
    doubtful ones in full: the peaks are exactly those of reading every path in full."""
    import galgan_ray.detect as detect

    psf = draw_psf(GAUSS_HR, pixel_scale_arcsec=0.06)
    rng = np.random.default_rng(11)
    # Clumpy extended light plus isolated sources: many peaks, many close to the prominence limit.
    src = [(x, y, f) for x, y, f in zip(rng.uniform(4, 92, 60), rng.uniform(4, 92, 60), rng.uniform(40, 600, 60))]
    imgs = np.stack([draw_points(GAUSS_HR, 0.06, 96, src, sigma=1.0, seed=s) for s in range(3)])
    cfg = DetectConfig(background="zero", min_prominence=3.0, max_peaks=10**6)
    fast = find_peaks_batch(imgs, psf=psf, noise_sigma=1.0, config=cfg)
    full_saddle = detect._saddle
    monkeypatch.setattr(detect, "_saddle", lambda *a, every=1, **k: full_saddle(*a, **k))
    full = find_peaks_batch(imgs, psf=psf, noise_sigma=1.0, config=cfg)
    assert len(full["x"]) > 60
    for key in full:
        np.testing.assert_array_equal(fast[key], full[key], err_msg=key)


def test_pure_noise_at_5_sigma():
    psf = draw_psf(HR.psf, pixel_scale_arcsec=HR.pixel_scale_arcsec)
    noise = np.random.default_rng(3).normal(0.0, 2.0, (300, 64, 64)).astype(np.float32)
    out = find_peaks_batch(noise, psf=psf, noise_sigma=2.0, config=DetectConfig(background="zero"))
    # Gaussian tail: ~4096 px * 2.9e-7 ~ 1e-3 per image -> expect ~0.3 in 300; allow 3.
    assert len(out["x"]) <= 3
    mf = matched_filter(noise[:50], psf=psf, noise_sigma=2.0)
    assert_allclose(mf["significance"].std(), 1.0, rtol=0.03)


def test_batch_equals_single_and_handles_empty():
    psf = draw_psf(LR.psf, pixel_scale_arcsec=LR.pixel_scale_arcsec)
    sig = LR.sky_sigma
    imgs = np.stack([
        draw_points(LR.psf, 0.18, 22, [(6.0, 7.0, 100 * sig), (15.0, 14.0, 80 * sig)], sigma=sig, seed=4),
        np.random.default_rng(5).normal(0, sig, (22, 22)).astype(np.float32),
        draw_points(LR.psf, 0.18, 22, [(11.0, 9.0, 120 * sig)], sigma=sig, seed=6),
    ])
    cfg = DetectConfig(background="zero")
    batch = find_peaks_batch(imgs[:, None], psf=psf, noise_sigma=np.full(3, sig), config=cfg)
    assert list(np.bincount(batch["index"], minlength=3)) == [2, 0, 1]
    for i in range(3):
        single = find_peaks(imgs[i], psf=psf, noise_sigma=sig, config=cfg)
        sel = batch["index"] == i
        for key in ("x", "y", "significance", "flux", "flags"):
            assert_allclose(batch[key][sel], single[key], rtol=1e-6)
    empty = find_peaks_batch(imgs[1:2], psf=psf, noise_sigma=sig, config=cfg)
    assert set(empty) == {"index", "x", "y", "significance", "flux", "flags"} and len(empty["x"]) == 0


def test_noise_estimated_when_not_given():
    psf = draw_psf(HR.psf, pixel_scale_arcsec=0.06)
    truth = np.array([[20.0, 20.0], [44.0, 40.0]])
    img = draw_points(HR.psf, 0.06, 64, [(x, y, 60.0) for x, y in truth], sigma=1.0, seed=7) + 25.0
    out = find_peaks(img, psf=psf, config=DetectConfig(background="sep"))
    assert_allclose(_sorted_xy(out), truth, atol=0.3)


def test_wcs_columns_and_edge_and_nonfinite_flags():
    psf = draw_psf(LR.psf, pixel_scale_arcsec=0.18)
    img = draw_points(LR.psf, 0.18, 22, [(10.5, 10.5, 200.0), (2.0, 12.0, 200.0)])
    img[0, 21] = np.nan
    wcs = make_tan_wcs(53.1, -27.8, pixel_scale_arcsec=0.18, shape=(22, 22))
    out = find_peaks(img, psf=psf, noise_sigma=1.0, wcs=wcs, config=DetectConfig(background="zero"))
    assert len(out["x"]) == 2
    centre = np.argmin(np.hypot(out["x"] - 10.5, out["y"] - 10.5))
    assert_allclose([out["ra"][centre], out["dec"][centre]], [53.1, -27.8], atol=0.1 * 0.18 / 3600)
    assert np.all(out["flags"] & flag_bit("NONFINITE"))
    edge = out["flags"] & flag_bit("EDGE") > 0
    assert list(edge) == [bool(abs(x - 2.0) < 0.5) for x in out["x"]]


def test_bad_inputs_raise_input_error():
    psf = draw_psf(LR.psf, pixel_scale_arcsec=0.18)
    with pytest.raises(InputError):
        find_peaks(np.zeros((2, 3, 22, 22)), psf=psf, noise_sigma=1.0)
    with pytest.raises(InputError):
        find_peaks(np.zeros((22, 22)), psf=psf[:-1], noise_sigma=1.0)  # even side
    with pytest.raises(InputError):
        find_peaks(np.zeros((22, 22)), psf=psf, noise_sigma=-1.0)
    with pytest.raises(InputError):
        find_peaks(np.zeros((22, 22)), psf=psf, noise_sigma=1.0, config=DetectConfig(min_separation_arcsec=0.3))


def test_config_round_trips():
    cfg = DetectConfig(nsigma=4.0, background="zero")
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert from_dict(DetectConfig, to_dict(cfg)) == cfg
    with pytest.raises(InputError):
        DetectConfig(background="median")
