"""Baselines on a synthetic two-source HSC-like image: sep deblending, Richardson-Lucy, bicubic."""
from __future__ import annotations

import pickle

import galsim
import numpy as np
import pytest
from numpy.testing import assert_allclose
from skimage.restoration import richardson_lucy as sk_richardson_lucy

from galgan_ray.baselines import (
    RLConfig,
    SepDeblendConfig,
    _richardson_lucy_unit,
    baseline_peaks,
    richardson_lucy,
    richardson_lucy_psf,
    sep_deblend_peaks,
    upsample_bicubic,
    upsample_psf,
)
from galgan_ray.detect import DetectConfig
from galgan_ray.errors import InputError
from galgan_ray.geometry import lr_to_hr_pixels
from galgan_ray.instrument import get_band
from galgan_ray.psf import draw_psf, measure_fwhm, psf_profile

LR = get_band("hsc", "i")
PSF = draw_psf(LR.psf, pixel_scale_arcsec=LR.pixel_scale_arcsec)
SIG = LR.sky_sigma
TRUTH = np.array([[7.5, 10.0], [13.5, 11.2]])  # 6 LR px = 1.08" apart


def lr_image(sources, *, sigma: float = SIG, seed: int = 0, n: int = 22) -> np.ndarray:
    prof = psf_profile(LR.psf)
    c = (n - 1) / 2
    img = np.zeros((n, n))
    for x, y, flux in sources:
        stamp = galsim.ImageD(n, n, scale=LR.pixel_scale_arcsec)
        prof.withFlux(flux).drawImage(stamp, offset=(x - c, y - c))
        img += stamp.array
    if sigma:
        img += np.random.default_rng(seed).normal(0, sigma, img.shape)
    return img.astype(np.float32)


@pytest.fixture(scope="module")
def pair_stack():
    return np.stack([lr_image([(x, y, 200 * SIG) for x, y in TRUTH], seed=s) for s in range(4)])


def _close_to_truth(out, truth, atol):
    for i in np.unique(out["index"]):
        sel = out["index"] == i
        xy = np.c_[out["x"][sel], out["y"][sel]]
        d = np.hypot(xy[:, None, 0] - truth[None, :, 0], xy[:, None, 1] - truth[None, :, 1])
        assert np.all(d.min(axis=0) < atol), (i, xy)


@pytest.mark.parametrize("method", ["sep", "richardson_lucy", "bicubic"])
def test_each_baseline_finds_both_sources(pair_stack, method):
    out = baseline_peaks(pair_stack, method=method, psf_lr=PSF, noise_sigma=SIG)
    counts = np.bincount(out["index"], minlength=len(pair_stack))
    assert np.all(counts == 2), counts
    # Tolerance: noise (~0.15 LR px here) plus the pull of the neighbour in the filtered image
    # (0.26 LR px for bicubic on noiseless images, 0.1 for the others).
    if method == "bicubic":
        hx, hy = lr_to_hr_pixels(TRUTH[:, 0], TRUTH[:, 1], n_high=64, n_low=22, ratio=3.0)
        _close_to_truth(out, np.c_[hx, hy], atol=1.5)
    else:
        _close_to_truth(out, TRUTH, atol=0.5)


@pytest.mark.parametrize("method", ["sep", "richardson_lucy", "bicubic"])
def test_no_peaks_on_pure_noise(method):
    noise = np.random.default_rng(11).normal(0, SIG, (40, 22, 22)).astype(np.float32)
    out = baseline_peaks(noise, method=method, psf_lr=PSF, noise_sigma=SIG)
    assert len(out["x"]) <= 1


def test_richardson_lucy_sharpens():
    point = lr_image([(10.5, 10.5, 2000 * SIG)], seed=3)
    res = richardson_lucy(point, psf=PSF, noise_sigma=SIG)
    fwhm_lr = measure_fwhm(PSF)
    assert res["image"].shape == (22, 22)
    assert measure_fwhm(res["image"]) < 0.8 * fwhm_lr
    assert res["fwhm_px"] < 0.8 * fwhm_lr
    assert_allclose(res["psf"].sum(), 1.0)
    assert_allclose(res["image"].sum(), point.sum(), rtol=0.05)  # RL conserves flux
    assert res["rho"] > 0 and res["noise_sigma"] == pytest.approx(res["rho"] * SIG)
    # More iterations: sharper effective PSF.
    assert measure_fwhm(richardson_lucy_psf(PSF, config=RLConfig(num_iter=60))) < res["fwhm_px"]


def test_richardson_lucy_iteration_matches_skimage():
    img = lr_image([(10.5, 10.5, 300.0), (14.0, 8.0, 150.0)], sigma=0.0) + 0.05
    img = img / img.mean() * 0.5  # skimage starts at 0.5, ours at the data mean
    ref = sk_richardson_lucy(img.astype(np.float64), PSF, num_iter=10, clip=False)
    ours = _richardson_lucy_unit(img[None], np.ones(1), PSF, RLConfig(num_iter=10, offset_nsigma=0.0, pad=False))[0]
    assert_allclose(ours, ref, rtol=2e-4, atol=1e-6)


def test_bicubic_is_cocentred_and_flux_conserving():
    point = lr_image([(9.0, 12.0, 1000.0)], sigma=0.0)
    up = upsample_bicubic(point)
    assert up.shape == (64, 64)
    assert_allclose(up.sum(), point.sum(), rtol=0.01)
    iy, ix = np.unravel_index(np.argmax(up), up.shape)
    hx, hy = lr_to_hr_pixels(9.0, 12.0, n_high=64, n_low=22, ratio=3.0)
    assert (ix, iy) == (round(float(hx)), round(float(hy)))
    p3 = upsample_psf(PSF)
    assert p3.shape == (81, 81) and np.argmax(p3) == 40 * 81 + 40
    assert_allclose(measure_fwhm(p3), 3 * measure_fwhm(PSF), rtol=0.05)
    assert upsample_bicubic(np.zeros((2, 1, 22, 22))).shape == (2, 64, 64)


def test_sep_single_image_and_errors():
    img = lr_image([(x, y, 80 * SIG) for x, y in TRUTH], seed=5)
    out = sep_deblend_peaks(img, psf=PSF, noise_sigma=SIG)
    assert "index" not in out and len(out["x"]) == 2
    with pytest.raises(InputError):
        baseline_peaks(img[None], method="wiener", psf_lr=PSF, noise_sigma=SIG)
    with pytest.raises(InputError):
        richardson_lucy(img, psf=PSF, noise_sigma=0.0)


def test_configs_pickle():
    for cfg in (SepDeblendConfig(), RLConfig(num_iter=5), DetectConfig()):
        assert pickle.loads(pickle.dumps(cfg)) == cfg
