"""The support gate of an enhanced image (galgan_ray.support_map): the model's output only where the
low-resolution data detect a source, the data themselves (bicubic-upsampled) elsewhere."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import ndimage

from galgan_ray.baselines import upsample_bicubic
from galgan_ray.errors import InputError
from galgan_ray.support_map import SupportConfig, apply_support, map_support, upsample_support


def _psf(fwhm_px: float = 3.33, n: int = 21) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - n // 2
    p = np.exp(-0.5 * (xx**2 + yy**2) / (fwhm_px / 2.3548) ** 2)
    return p / p.sum()


def _noise(shape=(150, 150), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, shape)


def _add_source(img: np.ndarray, psf: np.ndarray, y: int, x: int, snr: float) -> np.ndarray:
    """A point source of matched-filter S/N ``snr`` on unit white noise (S/N = flux * sqrt(sum psf^2))."""
    flux = snr / np.sqrt((psf**2).sum())
    out = img.copy()
    h = psf.shape[0] // 2
    out[y - h:y + h + 1, x - h:x + h + 1] += flux * psf
    return out


def test_pure_noise_is_not_supported_anywhere():
    psf = _psf()
    for seed in range(5):
        w, info = map_support(_noise(seed=seed), psf_lr=psf)
        assert w.max() == 0.0 and info["n_regions"] == 0, (seed, info)
        assert info["peak_snr"][0] < 5.0
        assert info["effective_sigma"][0] == pytest.approx(1.0, rel=0.1)  # white noise: its own sigma


def test_a_detected_source_is_supported_with_its_wings_and_nothing_else():
    psf = _psf()
    img = _add_source(_noise(seed=1), psf, 75, 60, snr=12.0)
    w, info = map_support(img, psf_lr=psf)
    assert info["n_regions"] == 1
    assert w[75, 60] == 1.0 and w[75, 60 + 4] == 1.0  # the core and one FWHM out
    assert w[75, 60 + 20] == 0.0 and w[10, 10] == 0.0
    assert 0.0 < info["fraction_supported"] < 0.02


def test_a_source_below_the_detection_threshold_is_not_supported():
    psf = _psf()
    w_faint, _ = map_support(_add_source(_noise((80, 80), seed=2), psf, 40, 40, snr=3.0), psf_lr=psf)
    assert w_faint.max() == 0.0
    bright = _add_source(_noise((80, 80), seed=2), psf, 40, 40, snr=30.0)
    w_strict, info = map_support(bright, psf_lr=psf, config=SupportConfig(detect_snr=100.0))
    assert w_strict.max() == 0.0 and info["n_regions"] == 0


def test_correlated_noise_is_measured_not_assumed_white():
    """Coadd noise is correlated: smoothed white noise has a filtered scatter well above the white-noise
    prediction; measured on the filtered image, nothing in it is 'detected'."""
    psf = _psf()
    corr = ndimage.gaussian_filter(_noise(seed=3), 1.0)
    corr /= corr.std()
    w, info = map_support(corr, psf_lr=psf)
    assert w.max() == 0.0, info
    assert info["effective_sigma"][0] > 1.5 * corr.std()  # white noise of that sigma would give corr.std()


def test_a_residual_sky_does_not_create_support():
    psf = _psf()
    ny, nx = 150, 150
    yy, xx = np.mgrid[:ny, :nx]
    sky = 1.0 + 1.0 * (yy / ny) + 1.0 * (xx / nx)  # 1 sigma pedestal, 1 sigma across each axis
    for seed in range(3):
        img = _noise(seed=seed)
        w0, _ = map_support(img, psf_lr=psf)
        w1, _ = map_support(img + sky, psf_lr=psf)
        assert w1.max() == 0.0 and w0.max() == 0.0
    src = _add_source(_noise(seed=4), psf, 50, 90, snr=10.0)
    assert_allclose(map_support(src + sky, psf_lr=psf)[0], map_support(src, psf_lr=psf)[0], atol=1e-6)


def test_any_band_supports_every_band():
    psf = _psf()
    b0 = _noise(seed=5)
    b1 = _add_source(_noise(seed=6), psf, 30, 30, snr=15.0)
    w, info = map_support(np.stack([b0, b1]), psf_lr=psf)
    assert w[30, 30] == 1.0 and info["n_regions"] == 1 and len(info["peak_snr"]) == 2


def test_a_noiseless_image_is_gated_on_the_sigma_given():
    psf = _psf()
    img = _add_source(np.zeros((80, 80)), psf, 40, 40, snr=20.0)  # S/N 20 for unit white noise
    w, info = map_support(img, psf_lr=psf, sigma_lr=1.0)
    assert w[40, 40] == 1.0 and info["peak_snr"][0] == pytest.approx(20.0, rel=0.01)
    # a floor only: noise above it is measured
    noisy = img + 3.0 * _noise((80, 80), seed=13)
    _, info = map_support(noisy, psf_lr=psf, sigma_lr=1.0)
    assert info["effective_sigma"][0] == pytest.approx(3.0, rel=0.1)


def test_pixels_without_data_are_never_supported():
    psf = _psf()
    img = _add_source(_noise(seed=7), psf, 40, 50, snr=30.0)  # its wings reach into the pixels without data
    valid = np.ones(img.shape, bool)
    valid[:, :45] = False
    w, _ = map_support(img, psf_lr=psf, valid=valid)
    assert not w[:, :45].any() and w[40, 50] == 1.0


def test_apply_support_keeps_the_enhanced_image_where_supported_and_the_data_elsewhere():
    rng = np.random.default_rng(8)
    lr = rng.normal(0.0, 1.0, (2, 30, 40)).astype(np.float32)
    hr = rng.normal(0.0, 1.0, (2, 90, 120)).astype(np.float32)
    base = upsample_bicubic(lr, factor=3, crop=0)
    assert_allclose(apply_support(hr, lr, np.ones((30, 40)), factor=3), hr)
    assert_allclose(apply_support(hr, lr, np.zeros((30, 40)), factor=3), base, atol=1e-6)
    w = np.zeros((30, 40))
    w[10:20, 10:30] = 1.0
    out = apply_support(hr, lr, w, factor=3)
    assert_allclose(out[:, 33:57, 33:87], hr[:, 33:57, 33:87])
    assert_allclose(out[:, :25], base[:, :25], atol=1e-6)
    assert out[0].shape == hr[0].shape and apply_support(hr[0], lr[0], w, factor=3).shape == (90, 120)
    with pytest.raises(InputError, match="3x the LR shape"):
        apply_support(hr[:, :80], lr, w, factor=3)


def test_apply_support_in_strips_equals_the_whole_image():
    rng = np.random.default_rng(12)
    lr = rng.normal(0.0, 1.0, (1, 70, 50)).astype(np.float32)
    hr = rng.normal(0.0, 1.0, (1, 210, 150)).astype(np.float32)
    w = np.zeros((70, 50))
    w[5:40, 10:30] = 1.0
    w = ndimage.gaussian_filter(w, 1.5)
    whole = apply_support(hr, lr, w, factor=3, block_rows=1000)
    for rows in (1, 7, 16):
        assert_allclose(apply_support(hr, lr, w, factor=3, block_rows=rows), whole, atol=1e-5)  # float32 rounding


def test_the_gated_image_conserves_the_flux_of_a_source():
    """Where the gate turns from the model's output to the data, the light of a source is not lost."""
    psf = _psf()
    lr = _add_source(_noise((60, 60), seed=9) * 0.05, psf, 30, 30, snr=400.0)
    hr = np.kron(lr, np.ones((3, 3))) / 9.0  # a stand-in for the model: the same light on the HR grid
    w, _ = map_support(lr, psf_lr=psf)
    out = apply_support(hr, lr, w, factor=3)
    core = (slice(30, 150), slice(30, 150))
    assert out[core].sum() == pytest.approx(hr[core].sum(), rel=0.01)


def test_upsampled_weight_is_co_centred():
    w = np.zeros((20, 20))
    w[10, 10] = 1.0
    up = upsample_support(w, 3)
    assert up.shape == (60, 60) and up[31, 31] == pytest.approx(1.0)
    assert_allclose(up.sum(), 9.0, rtol=0.05)
    assert up.min() >= 0.0 and up.max() <= 1.0


def test_config_is_checked_and_pickles():
    with pytest.raises(InputError, match="detect_snr"):
        SupportConfig(detect_snr=0.0)
    with pytest.raises(InputError, match="grow_snr"):
        SupportConfig(detect_snr=3.0, grow_snr=4.0)
    c = SupportConfig(detect_snr=6.0)
    assert pickle.loads(pickle.dumps(c)) == c


def test_matched_filter_snr_of_a_point_source_is_what_was_put_in():
    psf = _psf()
    img = _add_source(_noise(seed=10), psf, 75, 75, snr=20.0)
    _, info = map_support(img, psf_lr=psf)
    assert info["peak_snr"][0] == pytest.approx(20.0, abs=2.0)
