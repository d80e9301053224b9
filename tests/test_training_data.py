"""The position-free training sample (galgan_ray.training_data): what goes in comes out aligned."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from galgan_ray.dataset import BandsConfig, make_sky_tiles
from galgan_ray.degrade import get_degrader
from galgan_ray.errors import ConfigError
from galgan_ray.training_data import (LRNoiseConfig, add_lr_noise, add_sky_residual, correlated_noise,
                                      jittered_degrade_configs, noise_only_pairs, psf_shape_degrade_configs,
                                      sky_crop_pairs)
from galgan_ray.training_job import TrainDataConfig

pytest.importorskip("galsim")


def test_correlated_noise_has_unit_variance_and_the_kernels_correlation():
    rng = np.random.default_rng(0)
    a = correlated_noise((200, 200), rng, phase=(0.5, 0.5))
    assert a.std() == pytest.approx(1.0, rel=0.03)
    rho = np.mean(a[:, 1:] * a[:, :-1]) / a.var()
    assert rho == pytest.approx(0.5, abs=0.03)  # bilinear at phase 1/2: sum k(j) k(j+1) / sum k^2 = 1/2
    w = correlated_noise((200, 200), rng, phase=(0.0, 0.0))
    assert abs(np.mean(w[:, 1:] * w[:, :-1])) < 0.03  # phase 0: white


def test_added_noise_has_the_sigma_it_reports():
    cfg = LRNoiseConfig(depth_factor_max=2.5, correlated_fraction=0.5)
    zeros = np.zeros((400, 1, 22, 22), np.float32)
    img, sigma = add_lr_noise(zeros, [3.0], config=cfg, seed=1)
    measured = img.reshape(400, -1).std(axis=1)
    assert np.all(sigma[:, 0] >= 3.0 - 1e-6) and np.all(sigma[:, 0] <= 7.5 + 1e-6)
    assert np.median(measured / sigma[:, 0]) == pytest.approx(1.0, abs=0.03)
    again, _ = add_lr_noise(zeros, [3.0], config=cfg, seed=1)
    np.testing.assert_array_equal(img, again)  # reproducible under the seed


def test_sky_crops_are_co_aligned_windows_of_the_degraded_sky(tmp_path):
    """LR input and HR target are the same sky: degrading the HR window gives the LR window within noise,
    and one LR pixel off does not."""
    cfg = TrainDataConfig(sky_size_arcsec=30.0, n_sky_tiles=1, recipe="position_free")
    tiles = make_sky_tiles(cfg.dataset_config(), tmp_path)
    dc = cfg.bands.degrade_config(add_noise=False)
    pairs = sky_crop_pairs(tiles, degrade_configs=[dc], high_bands=dc.high, n_pairs=60, noise=LRNoiseConfig(), seed=2)
    lr, hr, sig = pairs["image_lr"], pairs["image_hr"], pairs["sigma_lr"]
    assert lr.shape == (60, 1, 22, 22) and hr.shape == (60, 1, 64, 64) and sig.shape == (60, 1)
    deg = get_degrader(dc)(hr)["image_lr"]
    core = (slice(None), slice(None), slice(5, 17), slice(5, 17))
    z = lambda model: ((lr - model) / sig[:, :, None, None])[core]  # noqa: E731
    bright = (deg / sig[:, :, None, None])[core] > 5  # where the sky has sources
    assert bright.sum() > 50
    assert z(deg).std() < 1.1 and z(deg)[bright].std() < 1.3
    assert z(np.roll(deg, 1, axis=-1))[bright].std() > 2.0
    empty = noise_only_pairs(5, degrade_config=dc, noise=LRNoiseConfig(), seed=0)
    assert empty["image_lr"].shape == (5, 1, 22, 22) and np.abs(empty["image_hr"]).std() < 3 * dc.high[0].sky_sigma


def test_psf_jitter_spreads_the_fwhm_and_recipe_keys_are_checked():
    dc = BandsConfig(high=("hst/F775W",), low=("hsc_udeep/i",)).degrade_config()
    cfgs = jittered_degrade_configs(dc, jitter=0.1, n=5, seed=0)
    f = sorted(c.low[0].psf.fwhm_arcsec for c in cfgs)
    assert f == pytest.approx([0.54, 0.57, 0.6, 0.63, 0.66])
    with pytest.raises(ConfigError, match="position_free"):
        TrainDataConfig(sky_crop_fraction=0.3)
    with pytest.raises(ConfigError, match="real_galaxies"):
        TrainDataConfig(recipe="position_free", real_fraction=0.2)
    assert replace(TrainDataConfig(), recipe="position_free", sky_crop_fraction=0.4).sky_crop_fraction == 0.4


def test_real_psf_shapes_take_the_jittered_widths_and_conserve_flux(shared_data):
    from galgan_ray.psf import draw_psf, measure_fwhm

    dc = BandsConfig(high=("hst/F775W",), low=("hsc_udeep/i",)).degrade_config(add_noise=False)
    files = sorted((shared_data / "hsc_hst_pairs").glob("psf_hsc_*.fits"))
    cfgs = psf_shape_degrade_configs(dc, files, pixel_scale_arcsec=0.168, jitter=0.08, n=4, seed=0)
    assert [c.low[0].psf.kind for c in cfgs] == ["fits"] * 4
    want = sorted(0.6 * np.linspace(0.92, 1.08, 4))
    got = sorted(measure_fwhm(draw_psf(c.low[0].psf, pixel_scale_arcsec=0.18), pixel_scale_arcsec=0.18) for c in cfgs)
    assert got == pytest.approx(want, abs=0.01)  # the real shapes, at the widths asked for
    point = np.zeros((1, 1, 64, 64), np.float32)
    point[0, 0, 32, 32] = 1000.0
    for c in cfgs:
        assert get_degrader(c)(point)["image_lr"].sum() == pytest.approx(1000.0, rel=1e-3)
    with pytest.raises(ConfigError, match="lr_psf_images"):
        psf_shape_degrade_configs(dc, [], pixel_scale_arcsec=0.168, jitter=0.08, n=4, seed=0)


def test_sky_residual_is_the_same_sky_in_both_images():
    rng = np.random.default_rng(0)
    pairs = {"image_lr": rng.normal(size=(5, 1, 22, 22)).astype(np.float32),
             "image_hr": rng.normal(size=(5, 1, 66, 66)).astype(np.float32),
             "sigma_lr": np.full((5, 1), 2.0, np.float32)}
    out = add_sky_residual(pairs, amplitude=0.5, seed=3)
    d_lr = out["image_lr"] - pairs["image_lr"]
    d_hr = out["image_hr"] - pairs["image_hr"]
    # The same sky per unit area: the HR block sums give the LR sky; smooth, and within the amplitude.
    assert np.allclose(d_hr.reshape(5, 1, 22, 3, 22, 3).sum(axis=(3, 5)), d_lr, atol=1e-5)
    assert np.abs(d_lr).max() <= 2.0 * 0.5 * 2 + 1e-6
    assert d_lr.std(axis=(2, 3)).max() > 0 and np.abs(np.diff(d_lr, 2, axis=-1)).max() < 1e-5
    assert add_sky_residual(pairs, amplitude=0.0, seed=3)["image_lr"] is pairs["image_lr"]
    with pytest.raises(ConfigError, match="sky_residual"):
        LRNoiseConfig(sky_residual=-1.0)
