"""Tests of galgan_ray.degrade: matching kernel, flux, PSF width, noise, positions, fast path, torch twin."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.config import from_dict, to_dict
from galgan_ray.degrade import DegradeConfig, Degrader, TorchDegrader, band_kernels, degrade, matching_kernel
from galgan_ray.errors import ConfigError, InputError
from galgan_ray.flags import flag_bit
from galgan_ray.geometry import hr_to_lr_pixels, make_tan_wcs
from galgan_ray.instrument import get_band
from galgan_ray.psf import draw_psf, measure_fwhm, psf_profile

galsim = pytest.importorskip("galsim")

N_HR, N_LR, S_HR, S_LR = 64, 22, 0.06, 0.18


@pytest.fixture(scope="module")
def cfg():
    return DegradeConfig()


@pytest.fixture(scope="module")
def degrader(cfg):
    return Degrader(cfg)


def _galaxy(x=31.5, y=31.5, *, hlr=0.15, flux=1000.0, n=1.0, q=0.7, beta=30.0, band=None):
    """A Sersic galaxy convolved with the HST PSF, drawn on the 64x64 0.06"/px grid at 0-based (x, y)."""
    band = band or get_band("hst", "F775W")
    gal = galsim.Sersic(n=n, half_light_radius=hlr, flux=flux).shear(q=q, beta=beta * galsim.degrees)
    prof = galsim.Convolve(gal, psf_profile(band.psf))
    return prof.drawImage(nx=N_HR, ny=N_HR, scale=S_HR, offset=(x - 31.5, y - 31.5)).array.astype(np.float32)


def _point(x, y):
    """The HST PSF (a point source) drawn at 0-based (x, y) on the HR grid, unit flux."""
    prof = psf_profile(get_band("hst", "F775W").psf)
    return prof.drawImage(nx=N_HR, ny=N_HR, scale=S_HR, offset=(x - 31.5, y - 31.5)).array.astype(np.float32)


@pytest.fixture(scope="module")
def galaxies():
    specs = [dict(), dict(x=28.2, y=35.9, hlr=0.1, n=4.0), dict(x=36.0, y=27.3, hlr=0.2, q=0.4),
             dict(x=31.5, y=31.5, hlr=0.05, n=0.5)]
    return np.stack([_galaxy(**s) for s in specs])[:, None]


def _centroid(img):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    return (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()


# ------------------------------------------------------------------------------------------ kernel
def test_matching_kernel_turns_hst_psf_into_target(cfg):
    src = draw_psf(cfg.high[0].psf, pixel_scale_arcsec=S_HR, size=63)
    tgt = draw_psf(cfg.low[0].psf, pixel_scale_arcsec=S_HR, size=63)
    k = matching_kernel(src, tgt)
    from scipy.signal import fftconvolve

    assert k.shape == (63, 63)
    assert_allclose(k.sum(), 1.0, rtol=1e-12)
    assert_allclose(fftconvolve(src, k, mode="same"), tgt, rtol=0, atol=1e-3 * tgt.max())
    assert_allclose(band_kernels(cfg)[0], k, rtol=0, atol=1e-12)


@pytest.mark.parametrize("window", ["top_hat", "tukey", "none"])
def test_matching_kernel_windows(cfg, window):
    src = draw_psf(cfg.high[0].psf, pixel_scale_arcsec=S_HR, size=63)
    tgt = draw_psf(cfg.low[0].psf, pixel_scale_arcsec=S_HR, size=63)
    k = matching_kernel(src, tgt, window=window, alpha=0.4, beta=0.6)
    from scipy.signal import fftconvolve

    assert_allclose(measure_fwhm(fftconvolve(src, k, mode="same")), measure_fwhm(tgt), rtol=0.01)


def test_matching_kernel_rejects_bad_input():
    with pytest.raises(InputError, match="matching_kernel"):
        matching_kernel(np.ones((10, 10)), np.ones((10, 10)))
    with pytest.raises(InputError):
        matching_kernel(np.ones((11, 11)), np.ones((13, 13)))
    with pytest.raises(ConfigError, match="window"):
        matching_kernel(np.ones((11, 11)), np.ones((11, 11)), window="nope")


# ------------------------------------------------------------------------------------------ numpy operator
def test_shapes_dtypes_and_3d_input(degrader, galaxies, cfg):
    out = degrader(galaxies, rng=1)
    assert out["image_lr"].shape == (4, 1, N_LR, N_LR) and out["image_lr"].dtype == np.float32
    assert out["sigma_lr"].shape == (4, 1) and out["sigma_lr"].dtype == np.float32
    assert out["flags"].shape == (4,) and out["flags"].dtype == np.int32
    one = degrade(galaxies[0], config=cfg, rng=1)
    assert one["image_lr"].shape == (1, N_LR, N_LR) and one["sigma_lr"].shape == (1,)


def test_flux_conserved_before_noise(degrader, galaxies):
    lr = degrader.noiseless(galaxies)
    assert_allclose(lr.sum(axis=(1, 2, 3)), galaxies.sum(axis=(1, 2, 3)), rtol=1e-2)


def test_point_source_fwhm_matches_target(degrader, cfg):
    # HR (30, 30) is the centre of LR pixel (10, 10), as the target PSF image is centred on a pixel.
    x_lr, y_lr = hr_to_lr_pixels(30.0, 30.0, n_high=N_HR, n_low=N_LR, ratio=3.0)
    assert (x_lr, y_lr) == (10.0, 10.0)
    lr = degrader.noiseless(_point(30.0, 30.0)[None])[0]
    target = measure_fwhm(draw_psf(cfg.low[0].psf, pixel_scale_arcsec=S_LR), pixel_scale_arcsec=S_LR)
    assert_allclose(measure_fwhm(lr, pixel_scale_arcsec=S_LR), target, rtol=0.05)
    assert_allclose(lr.sum(), 1.0, rtol=1e-2)
    # The shape matches too, not only the width: compare with the target PSF drawn on the LR grid.
    tgt_img = np.zeros((N_LR, N_LR))
    p = draw_psf(cfg.low[0].psf, pixel_scale_arcsec=S_LR, size=21)
    tgt_img[:21, :21] = p
    assert_allclose(lr, tgt_img, rtol=0, atol=2e-2 * p.max())


def test_noise_rms_matches_sigma(degrader, cfg):
    out = degrader(np.zeros((300, 1, N_HR, N_HR), np.float32), rng=np.random.default_rng(4))
    assert_allclose(out["sigma_lr"], cfg.low[0].sky_sigma, rtol=1e-6)
    assert_allclose(out["image_lr"].std(), cfg.low[0].sky_sigma, rtol=0.03)
    quiet = degrader(np.zeros((2, 1, N_HR, N_HR), np.float32), add_noise=False)
    assert_array_equal(quiet["image_lr"], 0.0)
    assert_array_equal(quiet["sigma_lr"], 0.0)


@pytest.mark.parametrize("x, y", [(31.5, 31.5), (25.3, 38.8), (40.0, 22.7), (33.9, 30.1)])
def test_positions_preserved(degrader, x, y):
    lr = degrader.noiseless(_galaxy(x, y, hlr=0.08)[None, None])[0, 0]
    want = hr_to_lr_pixels(x, y, n_high=N_HR, n_low=N_LR, ratio=3.0)
    assert_allclose(_centroid(lr), want, rtol=0, atol=0.1)


def test_per_image_generators_make_noise_independent_of_batching(degrader, galaxies):
    gens = lambda ids: [np.random.default_rng([7, i]) for i in ids]  # noqa: E731
    whole = degrader(galaxies, rng=gens(range(4)))["image_lr"]
    part = degrader(galaxies[2:], rng=gens(range(2, 4)))["image_lr"]
    assert_array_equal(whole[2:], part)
    with pytest.raises(InputError, match="rng"):
        degrader(galaxies, rng=gens(range(3)))


def test_nonfinite_pixels_zeroed_and_flagged(degrader, galaxies):
    bad = galaxies.copy()
    bad[1, 0, 5, 5] = np.nan
    out = degrader(bad, add_noise=False)
    assert np.all(np.isfinite(out["image_lr"]))
    assert out["flags"][1] == flag_bit("NONFINITE") and out["flags"][0] == 0


def test_bad_shapes_raise(degrader):
    with pytest.raises(InputError, match="image_hr"):
        degrader(np.zeros((2, 2, N_HR, N_HR)))
    with pytest.raises(InputError, match="image_hr"):
        degrader(np.zeros((N_HR, N_HR)))


# ------------------------------------------------------------------------------------------ reproject paths
def test_fast_path_equals_reproject_exact(degrader, galaxies, cfg):
    slow = Degrader(cfg, fast_path=False)
    wcs = make_tan_wcs(53.16, -27.78, pixel_scale_arcsec=S_HR, shape=(N_HR, N_HR))
    fast = degrader.noiseless(galaxies)
    assert_allclose(slow.noiseless(galaxies[:2], wcs_hr=wcs), fast[:2], rtol=0, atol=1e-5 * fast.max())


def test_fast_path_equals_explicit_convolution_and_block_sum(degrader, galaxies):
    from scipy.signal import fftconvolve

    k = band_kernels(degrader.config)[0]
    full = fftconvolve(np.pad(galaxies[1, 0].astype(np.float64), 1), k, mode="same")  # HR rows -1..64
    want = full.reshape(N_LR, 3, N_LR, 3).sum(axis=(1, 3))
    assert_allclose(degrader.noiseless(galaxies[1:2])[0, 0], want, rtol=0, atol=1e-5 * want.max())


def test_reproject_adaptive_conserves_flux(galaxies, cfg):
    ad = Degrader(dataclasses.replace(cfg, resample="adaptive"), fast_path=False)
    lr = ad.noiseless(galaxies[:2])
    assert_allclose(lr.sum(axis=(1, 2, 3)), galaxies[:2].sum(axis=(1, 2, 3)), rtol=1e-2)


def test_rotated_input_wcs_goes_through_reproject(degrader):
    # An HR cutout whose pixel grid is rotated by 30 deg on the sky; the LR grid is north-up.
    wcs = make_tan_wcs(150.1, 2.2, pixel_scale_arcsec=S_HR, shape=(N_HR, N_HR))
    th = np.deg2rad(30.0)
    wcs.wcs.cd = wcs.wcs.cd @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    x, y = 37.0, 28.0
    lr = degrader.noiseless(_galaxy(x, y, hlr=0.08, q=1.0)[None, None], wcs_hr=wcs)[0, 0]
    assert_allclose(lr.sum(), 1000.0 * 0.99, rtol=1e-2)
    wcs_lr = make_tan_wcs(150.1, 2.2, pixel_scale_arcsec=S_LR, shape=(N_LR, N_LR))
    ra, dec = wcs.wcs_pix2world(x, y, 0)
    assert_allclose(_centroid(lr), wcs_lr.wcs_world2pix(ra, dec, 0), rtol=0, atol=0.1)


# ------------------------------------------------------------------------------------------ bands, units, configs
def test_two_bands_and_unit_conversion():
    high = (get_band("hst", "F606W"), dataclasses.replace(get_band("hst", "F160W"), zeropoint_mag=30.4))
    low = (get_band("hsc_like", "F606W"), get_band("hsc_like", "F160W"))
    cfg = DegradeConfig(high=high, low=low)
    img = np.stack([_galaxy(band=high[0]), _galaxy(band=high[1])])[None]
    lr = Degrader(cfg).noiseless(img)
    # 1 unit at zero point 30.4 is 10**0.4 nJy.
    assert_allclose(lr.sum(axis=(2, 3))[0], img.sum(axis=(2, 3))[0] * np.array([1.0, 10 ** 0.4]), rtol=1e-2)


def test_config_roundtrip_validation_and_pickle(degrader, galaxies, cfg):
    assert from_dict(DegradeConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="same"):
        DegradeConfig(low=(get_band("hsc", "i"), get_band("hsc", "r")))
    with pytest.raises(ConfigError, match="kernel_size"):
        DegradeConfig(kernel_size=64)
    with pytest.raises(ConfigError, match="broader"):
        Degrader(DegradeConfig(low=(dataclasses.replace(get_band("hsc", "i"), psf=dataclasses.replace(
            get_band("hsc", "i").psf, fwhm_arcsec=0.05)),)))
    again = pickle.loads(pickle.dumps(degrader))
    assert_array_equal(again.noiseless(galaxies), degrader.noiseless(galaxies))
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ------------------------------------------------------------------------------------------ torch twin
@pytest.mark.parametrize("method", ["matrix", "fft", "conv"])
def test_torch_degrader_matches_numpy(degrader, galaxies, method):
    torch = pytest.importorskip("torch")
    td = TorchDegrader(degrader.config, method=method, device="cpu")
    out = td(torch.as_tensor(galaxies)).numpy()
    ref = degrader.noiseless(galaxies)
    assert out.shape == ref.shape == (4, 1, N_LR, N_LR)
    assert_allclose(out.sum(axis=(1, 2, 3)), ref.sum(axis=(1, 2, 3)), rtol=1e-2)
    assert_allclose(out, ref, rtol=0, atol=1e-2 * ref.max())
    assert np.abs(out - ref).max() < 1e-4 * ref.max()  # in practice: float32 rounding


def test_torch_degrader_gradients_flow(galaxies):
    torch = pytest.importorskip("torch")
    td = TorchDegrader(method="matrix", device="cpu")
    x = torch.as_tensor(galaxies).clone().requires_grad_(True)
    target = torch.zeros(4, 1, N_LR, N_LR)
    loss = ((td(x) - target) ** 2).mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in td.parameters())  # the operator is fixed
    with pytest.raises(InputError, match="TorchDegrader"):
        td(torch.zeros(1, 1, 32, 32))
    again = pickle.loads(pickle.dumps(td))  # crosses process boundaries with TorchTrainer
    assert torch.equal(again(x.detach()), td(x.detach()))


def test_non_integer_ratio_goes_through_reproject(galaxies):
    # LSST-like 0.2"/px: 64 x 0.06" -> 20 px, no integer block structure, so no fast path.
    cfg = DegradeConfig(low=(get_band("lsst", "i"),), add_noise=False)
    d = Degrader(cfg)
    assert d.operator(N_HR) is None
    lr = d.noiseless(galaxies[:2])
    assert lr.shape == (2, 1, 20, 20)
    assert_allclose(lr.sum(axis=(1, 2, 3)), galaxies[:2].sum(axis=(1, 2, 3)), rtol=1e-2)
    x_lr, y_lr = hr_to_lr_pixels(28.2, 35.9, n_high=N_HR, n_low=20, ratio=0.2 / S_HR)
    assert_allclose(_centroid(lr[1, 0]), (x_lr, y_lr), rtol=0, atol=0.1)
