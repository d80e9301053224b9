"""Simultaneous Gaussian-mixture photometry: unbiased fluxes with honest errors, blends, flags, batching."""
from __future__ import annotations

import dataclasses
import pickle

import galsim
import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.config import from_dict, to_dict
from galgan_ray.errors import ConfigError, InputError
from galgan_ray.flags import flag_bit
from galgan_ray.gmm import GaussianMixture, convolve, fit_psf_mixture, galaxy_mixture, render_mixture
from galgan_ray.photometry import (
    PhotometryComputeConfig,
    PhotometryConfig,
    fit_fluxes,
    measure_input_fluxes,
)
from galgan_ray.psf import PSFConfig, draw_psf

LR_SCALE, HR_SCALE = 0.18, 0.06
N_LR = 22
MOFFAT = galsim.Moffat(beta=3.5, fwhm=0.6)
CENTRE = (N_LR - 1) / 2.0


@pytest.fixture(scope="module")
def lr_psf():
    img = draw_psf(PSFConfig(kind="moffat", fwhm_arcsec=0.6, beta=3.5), pixel_scale_arcsec=LR_SCALE)
    return fit_psf_mixture(img, pixel_scale_arcsec=LR_SCALE)[0]


def _draw(galaxies, *, n=N_LR, scale=LR_SCALE, psf=MOFFAT):
    """GalSim image of (flux, hlr, e1, e2, dx_arcsec, dy_arcsec) exponentials through ``psf``."""
    profs = [galsim.Exponential(half_light_radius=h, flux=f).shear(e1=e1, e2=e2).shift(dx, dy)
             for f, h, e1, e2, dx, dy in galaxies]
    return galsim.Convolve(galsim.Add(profs), psf).drawImage(nx=n, ny=n, scale=scale).array.astype(np.float64)


def _px(dx_arcsec, dy_arcsec, *, n=N_LR, scale=LR_SCALE):
    c = (n - 1) / 2.0
    return [c + dx_arcsec / scale, c + dy_arcsec / scale]


def test_isolated_galaxy_flux_pulls_are_unit_normal(lr_psf):
    """300 noise draws of a GalSim exponential (S/N ~ 25): (flux - true) / flux_err ~ N(0, 1)."""
    flux, gal = 350.0, (350.0, 0.35, 0.15, -0.1, 0.04, -0.05)
    img = _draw([gal])
    rng = np.random.default_rng(42)
    n = 300
    images = img[None] + rng.normal(size=(n, N_LR, N_LR))
    centres = np.tile(np.array([_px(0.04, -0.05)]), (n, 1, 1))
    res = fit_fluxes(images, centres=centres, psf_mixture=lr_psf, noise_sigma=1.0)
    pull = (res["flux"][:, 0] - flux) / res["flux_err"][:, 0]
    assert abs(pull.mean()) < 0.15, pull.mean()
    assert 0.85 < pull.std() < 1.15, pull.std()
    assert np.all(res["flags"] == 0) and np.all(res["converged"])
    assert abs(np.median(res["hlr_arcsec"]) / 0.35 - 1) < 0.05
    assert abs(np.median(res["e1"]) - 0.15) < 0.05 and abs(np.median(res["e2"]) + 0.1) < 0.05
    # Noiseless: the flux is recovered to 0.5% (PSF and profile mixtures are approximations).
    clean = fit_fluxes(img, centres=[[_px(0.04, -0.05)]], psf_mixture=lr_psf, noise_sigma=1.0)
    assert_allclose(clean["flux"][0, 0], flux, rtol=5e-3)
    assert_allclose(clean["x"][0, 0], _px(0.04, -0.05)[0], atol=0.02)


def test_two_galaxy_blend_fluxes_within_errors(lr_psf):
    """Two exponentials 1.0" apart (1.7 PSF FWHM), fitted together at known positions."""
    g1 = (1500.0, 0.4, 0.2, 0.05, -0.45, 0.1)
    g2 = (600.0, 0.25, -0.1, 0.2, 0.5, -0.2)
    img = _draw([g1, g2])
    centres = np.array([_px(-0.45, 0.1), _px(0.5, -0.2)])
    clean = fit_fluxes(img[None], centres=centres[None], psf_mixture=lr_psf, noise_sigma=1.0)
    assert_allclose(clean["flux"][0], [1500.0, 600.0], rtol=0.01)
    rng = np.random.default_rng(3)
    n = 200
    res = fit_fluxes(img[None] + 2.0 * rng.normal(size=(n, N_LR, N_LR)), centres=np.tile(centres, (n, 1, 1)),
                     psf_mixture=lr_psf, noise_sigma=2.0)
    pull = (res["flux"] - np.array([1500.0, 600.0])) / res["flux_err"]
    assert np.all(np.abs(pull.mean(0)) < 0.35), pull.mean(0)
    assert np.all((pull.std(0) > 0.8) & (pull.std(0) < 1.2)), pull.std(0)
    # The two fluxes are anti-correlated, and the flux covariance says so.
    corr = res["flux_cov"][:, 0, 1] / (res["flux_err"][:, 0] * res["flux_err"][:, 1])
    assert np.all(corr < -0.3)
    assert_allclose(np.sqrt(res["flux_cov"][:, [0, 1], [0, 1]]), res["flux_err"], rtol=1e-12)


def test_forced_mode_is_exact_linear_least_squares(lr_psf):
    """With shapes fixed the fit is linear: fluxes and errors equal the normal-equation solution."""
    shapes = [(0.3, 0.1, 0.0, (-0.3, 0.2)), (0.5, -0.2, 0.3, (0.4, -0.1))]
    mixtures = [convolve(galaxy_mixture("exp", flux=1.0, hlr_arcsec=h, e1=e1, e2=e2, centre_arcsec=c), lr_psf)
                for h, e1, e2, c in shapes]
    g = np.stack([render_mixture(m, shape=(N_LR, N_LR), pixel_scale_arcsec=LR_SCALE).ravel() for m in mixtures])
    truth = np.array([800.0, 300.0])
    sigma = 1.5
    noise = np.random.default_rng(0).normal(size=N_LR * N_LR) * sigma
    img = (truth @ g + noise).reshape(N_LR, N_LR)
    a = g @ g.T / sigma**2
    expected = np.linalg.solve(a, g @ img.ravel() / sigma**2)
    res = fit_fluxes(img, centres=[[_px(*s[3]) for s in shapes]], psf_mixture=lr_psf, noise_sigma=sigma,
                     shapes={"hlr_arcsec": np.array([[0.3, 0.5]]), "e1": np.array([[0.1, -0.2]]),
                             "e2": np.array([[0.0, 0.3]])},
                     config=PhotometryConfig(mode="forced"))
    assert_allclose(res["flux"][0], expected, rtol=1e-8)
    assert_allclose(res["flux_cov"][0], np.linalg.inv(a), rtol=1e-8)
    assert_allclose(res["hlr_arcsec"][0], [0.3, 0.5], rtol=1e-8)
    assert res["n_iter"][0] == 0 and res["converged"][0]


def test_edge_source_is_flagged(lr_psf):
    img = _draw([(500.0, 0.3, 0, 0, -1.7, 0.0), (500.0, 0.3, 0, 0, 0.3, 0.2)])
    res = fit_fluxes(img, centres=[[_px(-1.7, 0.0), _px(0.3, 0.2)]], psf_mixture=lr_psf, noise_sigma=1.0)
    assert _px(-1.7, 0.0)[0] < 1.5  # less than edge_margin_px = 2 from the border
    assert res["flags"][0, 0] & flag_bit("EDGE")
    assert not res["flags"][0, 1] & flag_bit("EDGE")
    assert res["flags"][0, 1] == 0


def test_centre_running_to_the_shift_limit_is_flagged(lr_psf):
    img = _draw([(2000.0, 0.3, 0, 0, 0.0, 0.0)])
    cfg = PhotometryConfig(allow_shift_px=0.5)
    res = fit_fluxes(np.stack([img, img]), centres=[[[CENTRE + 2.0, CENTRE]], [[CENTRE + 0.1, CENTRE - 0.1]]],
                     psf_mixture=lr_psf, noise_sigma=1.0, config=cfg)
    assert res["flags"][0, 0] & flag_bit("FIT_SHIFTED")
    assert_allclose(res["x"][0, 0], CENTRE + 2.0 - 0.5, atol=0.02)  # pinned at the limit
    assert res["flags"][1, 0] == 0
    assert_allclose([res["x"][1, 0], res["y"][1, 0]], [CENTRE, CENTRE], atol=0.02)


def test_source_without_data_fails_alone(lr_psf):
    """A source off the image has no information: infinite error and FIT_FAILED, no harm to the other."""
    img = _draw([(500.0, 0.3, 0, 0, 0.0, 0.0)]) + np.random.default_rng(5).normal(size=(N_LR, N_LR))
    res = fit_fluxes(img, centres=[[[CENTRE, CENTRE], [60.0, -30.0]]], psf_mixture=lr_psf, noise_sigma=1.0)
    ref = fit_fluxes(img, centres=[[[CENTRE, CENTRE]]], psf_mixture=lr_psf, noise_sigma=1.0)
    assert np.isinf(res["flux_err"][0, 1])
    assert res["flags"][0, 1] & flag_bit("FIT_FAILED") and res["flags"][0, 1] & flag_bit("EDGE")
    assert res["flags"][0, 0] == 0
    assert_allclose(res["flux"][0, 0], ref["flux"][0, 0], rtol=1e-6)


def test_non_convergence_is_flagged(lr_psf):
    img = _draw([(2000.0, 0.8, 0.3, 0, 0.0, 0.0)])
    res = fit_fluxes(img, centres=[[[CENTRE, CENTRE]]], psf_mixture=lr_psf, noise_sigma=1.0,
                     config=PhotometryConfig(max_iter=1, hlr_init_arcsec=0.1))
    assert not res["converged"][0]
    assert res["flags"][0, 0] & flag_bit("FIT_FAILED")


def test_batched_fit_equals_per_cutout_fits(lr_psf):
    """Cutouts with 1-3 sources, fitted together (in chunks of 4) and one at a time."""
    rng = np.random.default_rng(7)
    images, centres = [], []
    for i in range(7):
        s = 1 + i % 3
        gals = [(rng.uniform(300, 2000), rng.uniform(0.2, 0.5), rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2),
                 dx, dy) for dx, dy in rng.uniform(-1.0, 1.0, size=(s, 2))]
        images.append(_draw(gals) + rng.normal(size=(N_LR, N_LR)))
        centres.append(np.array([_px(g[4], g[5]) for g in gals]) + rng.normal(0, 0.1, size=(s, 2)))
    images = np.stack(images)
    sig = np.full(len(images), 1.0)
    batch = fit_fluxes(images, centres=centres, psf_mixture=lr_psf, noise_sigma=sig,
                       compute=PhotometryComputeConfig(batch_size=4))
    for i in range(len(images)):
        one = fit_fluxes(images[i], centres=[centres[i]], psf_mixture=lr_psf, noise_sigma=sig[i])
        s = len(centres[i])
        for key in ("flux", "flux_err", "x", "y", "hlr_arcsec", "e1", "e2"):
            assert_allclose(batch[key][i, :s], one[key][0], rtol=1e-6, atol=1e-8, err_msg=key)
        assert_allclose(batch["chi2"][i], one["chi2"][0], rtol=1e-8)
        assert np.array_equal(batch["flags"][i, :s], one["flags"][0])
        assert np.all(np.isnan(batch["flux"][i, s:])) and np.all(batch["flags"][i, s:] == 0)
        assert np.array_equal(batch["source_mask"][i], np.arange(3) < s)


def test_padded_centres_variance_maps_and_nonfinite_pixels(lr_psf):
    img = _draw([(900.0, 0.3, 0.1, 0.0, -0.4, 0.0), (700.0, 0.3, 0.0, 0.1, 0.5, 0.1)])
    noisy = img + np.random.default_rng(1).normal(size=img.shape)
    centres = np.array([[_px(-0.4, 0.0), _px(0.5, 0.1), [np.nan, np.nan]], [_px(-0.4, 0.0), [0, 0], [0, 0]]])
    ref = fit_fluxes(np.stack([noisy, noisy]), centres=[centres[0, :2], centres[1, :1]], psf_mixture=lr_psf,
                     noise_sigma=1.0)
    padded = fit_fluxes(np.stack([noisy, noisy]), centres=centres, n_sources=np.array([2, 1]),
                        psf_mixture=lr_psf, variance=np.ones((2, N_LR, N_LR)))
    assert_allclose(padded["flux"][:, :2], ref["flux"], rtol=1e-10)
    assert padded["flux"].shape == (2, 3) and np.isnan(padded["flux"][0, 2])
    # A NaN pixel far from the sources: masked (zero weight), flagged, fluxes barely change.
    bad = noisy.copy()
    bad[0, 0] = np.nan
    res = fit_fluxes(bad, centres=[centres[0, :2]], psf_mixture=lr_psf, noise_sigma=1.0)
    assert np.all(res["flags"][0] & flag_bit("NONFINITE"))
    assert_allclose(res["flux"][0], ref["flux"][0], rtol=1e-3)
    assert res["dof"][0] == ref["dof"][0] - 1


def test_zero_weight_padding_changes_no_fit(lr_psf):
    """Cutouts embedded in larger zero-weight arrays (as the field pads a tile's boxes to a few
    sizes), with extra source slots, fit exactly as on their own."""
    rng = np.random.default_rng(12)
    gals = [(900.0, 0.3, 0.1, 0.0, -0.4, 0.0), (400.0, 0.5, -0.2, 0.1, 0.6, 0.3)]
    img = _draw(gals) + rng.normal(size=(N_LR, N_LR))
    cen = np.array([_px(g[4], g[5]) for g in gals])
    cfg = PhotometryConfig(fit_centre=False)
    ref = fit_fluxes(img, centres=[cen], psf_mixture=lr_psf, noise_sigma=1.0, config=cfg)
    big = np.zeros((2, 40, 40))
    var = np.full((2, 40, 40), np.inf)
    big[:, :N_LR, :N_LR], var[:, :N_LR, :N_LR] = img, 1.0
    pad = np.full((2, 4, 2), np.nan)
    pad[:, :2] = cen
    res = fit_fluxes(big, centres=pad, psf_mixture=lr_psf, variance=var, config=cfg)
    for key in ("flux", "flux_err", "hlr_arcsec", "e1", "e2"):
        assert_allclose(res[key][:, :2], np.repeat(ref[key], 2, 0), rtol=1e-9, err_msg=key)
    assert np.all(res["n_iter"] == ref["n_iter"][0]) and np.all(res["dof"] == ref["dof"][0])
    assert_allclose(res["chi2"], ref["chi2"][0], rtol=1e-10)


def test_per_cutout_and_non_concentric_psf_mixtures(lr_psf):
    """One PSF mixture per cutout, and the general path for PSF Gaussians on different centres."""
    img = _draw([(900.0, 0.3, 0.1, 0.0, -0.4, 0.0), (700.0, 0.3, 0.0, 0.1, 0.5, 0.1)])
    noisy = np.stack([img, img]) + np.random.default_rng(3).normal(size=(2, N_LR, N_LR))
    centres = [[_px(-0.4, 0.0), _px(0.5, 0.1)]] * 2
    ref = fit_fluxes(noisy, centres=centres, psf_mixture=lr_psf, noise_sigma=1.0)
    per = fit_fluxes(noisy, centres=centres, psf_mixture=[lr_psf, lr_psf], noise_sigma=1.0)
    assert_allclose(per["flux"], ref["flux"], rtol=1e-10)
    offsets = np.zeros_like(lr_psf.centres)
    offsets[0] = [1e-7, -1e-7]  # arcsec: breaks concentricity, changes nothing measurable
    nonconc = GaussianMixture(lr_psf.amplitudes, lr_psf.centres + offsets, lr_psf.covariances)
    gen = fit_fluxes(noisy, centres=centres, psf_mixture=nonconc, noise_sigma=1.0)
    for key in ("flux", "flux_err", "x", "hlr_arcsec", "e1"):
        assert_allclose(gen[key], ref[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_float32_matches_float64(lr_psf):
    img = _draw([(900.0, 0.3, 0.1, 0.0, -0.4, 0.0), (700.0, 0.3, 0.0, 0.1, 0.5, 0.1)])
    noisy = img + np.random.default_rng(2).normal(size=img.shape)
    kw = dict(centres=[[_px(-0.4, 0.0), _px(0.5, 0.1)]], psf_mixture=lr_psf, noise_sigma=1.0)
    r64 = fit_fluxes(noisy, **kw)
    r32 = fit_fluxes(noisy, compute=PhotometryComputeConfig(dtype="float32"), **kw)
    assert_allclose(r32["flux"], r64["flux"], rtol=1e-3)
    assert_allclose(r32["flux_err"], r64["flux_err"], rtol=1e-3)


def test_input_magnitudes_from_high_resolution_image():
    """The same fitter on an HR (0.06"/px, HST-like PSF) cutout at the true positions."""
    psf_cfg = PSFConfig(kind="airy", lam_nm=775.0, diam_m=2.4, obscuration=0.33, jitter_fwhm_arcsec=0.07)
    psf_img = draw_psf(psf_cfg, pixel_scale_arcsec=HR_SCALE)
    psf_mix, info = fit_psf_mixture(psf_img, pixel_scale_arcsec=HR_SCALE)
    assert abs(info["fwhm_rel_err"]) < 0.02
    hr_psf = galsim.InterpolatedImage(galsim.Image(psf_img, scale=HR_SCALE))
    mags = np.array([22.5, 23.5])
    fluxes = 10 ** (-0.4 * (mags - 31.4))
    gals = [(fluxes[0], 0.3, 0.1, 0.0, -0.5, 0.2), (fluxes[1], 0.2, -0.1, 0.2, 0.6, -0.3)]
    img = galsim.Convolve(galsim.Add([galsim.Exponential(half_light_radius=h, flux=f).shear(e1=a, e2=b).shift(x, y)
                                      for f, h, a, b, x, y in gals]), hr_psf).drawImage(
        nx=64, ny=64, scale=HR_SCALE, method="no_pixel").array
    sigma = 2.0
    img = img + np.random.default_rng(4).normal(size=img.shape) * sigma
    centres = [[_px(g[4], g[5], n=64, scale=HR_SCALE) for g in gals]]
    res = measure_input_fluxes(img, centres=centres, psf_mixture=psf_mix, noise_sigma=sigma,
                               config=PhotometryConfig(allow_shift_px=1.5))
    assert np.all(np.abs(res["mag"][0] - mags) < 3 * res["mag_err"][0] + 0.01), (res["mag"], res["mag_err"])
    assert np.all(res["mag_err"][0] < 0.05) and np.all(res["flags"][0] == 0)


def test_configs_round_trip_and_validate():
    cfg = PhotometryConfig(model="dev", mode="round", allow_shift_px=0.5, size_prior_sigma=None)
    assert from_dict(PhotometryConfig, to_dict(cfg)) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    comp = PhotometryComputeConfig(device="cpu", dtype="float32", batch_size=64)
    assert from_dict(PhotometryComputeConfig, to_dict(comp)) == comp
    with pytest.raises(ConfigError):
        PhotometryConfig(mode="psf")
    with pytest.raises(ConfigError):
        PhotometryConfig(hlr_init_arcsec=10.0)
    with pytest.raises(ConfigError):
        dataclasses.replace(cfg, e_max=1.0)
    with pytest.raises(InputError, match="noise_sigma or variance"):
        fit_fluxes(np.zeros((1, 5, 5)), centres=[[[2.0, 2.0]]], psf_mixture=galaxy_mixture("gauss", hlr_arcsec=0.3))
    with pytest.raises(InputError, match="centres"):
        fit_fluxes(np.zeros((2, 5, 5)), centres=[[[2.0, 2.0]]], psf_mixture=galaxy_mixture("gauss", hlr_arcsec=0.3),
                   noise_sigma=1.0)
