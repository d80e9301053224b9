"""Gaussian mixtures: profiles, convolution, rendering against GalSim, PSF fits (Moffat and real HST)."""
from __future__ import annotations

import pickle
import galsim
import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.errors import InputError
from galgan_ray.gmm import (
    GaussianMixture,
    T_to_hlr,
    convolve,
    fit_psf_mixture,
    galaxy_mixture,
    hlr_to_T,
    image_moments,
    profile_coefficients,
    render_mixture,
)
from galgan_ray.psf import PSFConfig, draw_psf, measure_fwhm, read_psf

LR_SCALE = 0.18


def _hlr(image: np.ndarray, *, scale: float, flux: float) -> float:
    """Half-light radius about the stamp centre: cumulative flux over rings of equal radius, interpolated."""
    n = image.shape[0]
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[:n, :n]
    r = np.round(np.hypot(xx - c, yy - c).ravel(), 9)
    ru, inv = np.unique(r, return_inverse=True)
    cum = np.cumsum(np.bincount(inv, weights=image.ravel()))
    return float(np.interp(flux / 2.0, cum, ru) * scale)


@pytest.fixture(scope="module")
def lr_psf():
    img = draw_psf(PSFConfig(kind="moffat", fwhm_arcsec=0.6, beta=3.5), pixel_scale_arcsec=LR_SCALE)
    mix, info = fit_psf_mixture(img, pixel_scale_arcsec=LR_SCALE)
    return img, mix, info


# -- profiles -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gauss", "exp", "dev"])
def test_profile_coefficients_are_normalised(model):
    p, f = profile_coefficients(model)
    assert len(p) == {"gauss": 1, "exp": 6, "dev": 10}[model]
    assert_allclose(p.sum(), 1.0, rtol=1e-12)
    assert_allclose((p * f).sum(), 1.0, rtol=1e-12)
    # The mixture's half-light radius is the one asked for (analytic enclosed flux of each Gaussian).
    hlr = 0.7
    var = hlr_to_T(model, hlr) * f / 2.0
    assert_allclose((p * (1.0 - np.exp(-hlr**2 / (2.0 * var)))).sum(), 0.5, rtol=1e-10)
    assert_allclose(T_to_hlr(model, hlr_to_T(model, hlr)), hlr, rtol=1e-12)


def test_galaxy_mixture_moments_follow_the_parameters():
    g = galaxy_mixture("exp", flux=250.0, hlr_arcsec=0.4, e1=0.3, e2=-0.2, centre_arcsec=(0.1, -0.05))
    assert g.n_components == 6
    assert_allclose(g.flux, 250.0, rtol=1e-12)
    assert_allclose(g.centroid, [0.1, -0.05], atol=1e-12)
    cov = g.covariance
    t = cov[0, 0] + cov[1, 1]
    assert_allclose([(cov[0, 0] - cov[1, 1]) / t, 2 * cov[0, 1] / t], [0.3, -0.2], atol=1e-12)
    # Area-preserving shear: det(cov) is that of the round profile of the same hlr.
    round_ = galaxy_mixture("exp", hlr_arcsec=0.4).covariance
    assert_allclose(np.linalg.det(cov), np.linalg.det(round_), rtol=1e-12)


def test_convolution_multiplies_fluxes_and_adds_moments(lr_psf):
    _, psf, _ = lr_psf
    g = galaxy_mixture("dev", flux=3.0, hlr_arcsec=0.5, e1=0.1, centre_arcsec=(0.2, 0.3))
    c = convolve(g, psf)
    assert c.n_components == g.n_components * psf.n_components
    assert_allclose(c.flux, g.flux * psf.flux, rtol=1e-12)
    assert_allclose(c.centroid, g.centroid + psf.centroid, atol=1e-12)
    assert_allclose(c.covariance, g.covariance + psf.covariance, rtol=1e-10)


def test_mixture_round_trips_through_dict_and_pickle(lr_psf):
    _, psf, _ = lr_psf
    for m in (GaussianMixture.from_dict(psf.to_dict()), pickle.loads(pickle.dumps(psf))):
        assert_allclose(m.amplitudes, psf.amplitudes)
        assert_allclose(m.centres, psf.centres)
        assert_allclose(m.covariances, psf.covariances)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="hlr_arcsec"):
        galaxy_mixture("exp", hlr_arcsec=0.0)
    with pytest.raises(InputError, match="ellipticity"):
        galaxy_mixture("exp", hlr_arcsec=0.3, e1=0.8, e2=0.7)
    with pytest.raises(InputError, match="unknown profile"):
        galaxy_mixture("sersic", hlr_arcsec=0.3)
    with pytest.raises(InputError, match="positive definite"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(InputError, match="psf_image"):
        fit_psf_mixture(np.zeros((9, 9)), pixel_scale_arcsec=0.18)


# -- rendering against GalSim ---------------------------------------------------------------------
@pytest.mark.parametrize("model,hlr,hlr_rtol", [("exp", 0.3, 0.01), ("exp", 0.8, 0.01), ("dev", 0.5, 0.02),
                                                 ("gauss", 0.4, 0.01)])
def test_psf_convolved_galaxy_matches_galsim(lr_psf, model, hlr, hlr_rtol):
    """Mixture galaxy (x) mixture PSF sampled at pixel centres vs GalSim profile (x) Moffat drawn
    with pixel integration: same total flux and half-light radius (dev: Hogg & Lang's mixture is
    a truncated profile, so a 2% tolerance)."""
    _, psf, _ = lr_psf
    n = 128
    prof = {"exp": galsim.Exponential, "dev": galsim.DeVaucouleurs, "gauss": galsim.Gaussian}[model](
        half_light_radius=hlr, flux=100.0)
    ref = galsim.Convolve(prof, galsim.Moffat(beta=3.5, fwhm=0.6)).drawImage(nx=n, ny=n, scale=LR_SCALE).array
    img = render_mixture(convolve(galaxy_mixture(model, flux=100.0, hlr_arcsec=hlr), psf), shape=(n, n),
                         pixel_scale_arcsec=LR_SCALE)
    assert_allclose(img.sum(), 100.0, rtol=5e-3)
    assert_allclose(_hlr(img, scale=LR_SCALE, flux=100.0), _hlr(ref, scale=LR_SCALE, flux=100.0), rtol=hlr_rtol)


def test_elliptical_galaxy_matches_galsim_shear_convention(lr_psf):
    _, psf, _ = lr_psf
    n = 64
    prof = galsim.Exponential(half_light_radius=0.5, flux=50.0).shear(e1=0.3, e2=-0.15)
    ref = galsim.Convolve(prof, galsim.Moffat(beta=3.5, fwhm=0.6)).drawImage(nx=n, ny=n, scale=LR_SCALE).array
    img = render_mixture(convolve(galaxy_mixture("exp", flux=50.0, hlr_arcsec=0.5, e1=0.3, e2=-0.15), psf),
                         shape=(n, n), pixel_scale_arcsec=LR_SCALE)
    # Unweighted moments weigh the far wings, where Hogg & Lang's exponential is softened to zero:
    # compare the ellipticity they imply (a ratio) and the pixels themselves.
    m_ref, m_img = image_moments(ref), image_moments(img)
    e_ref = np.array([m_ref["xx"] - m_ref["yy"], 2 * m_ref["xy"]]) / m_ref["T"]
    e_img = np.array([m_img["xx"] - m_img["yy"], 2 * m_img["xy"]]) / m_img["T"]
    assert_allclose(e_img, e_ref, atol=0.01)
    assert e_ref[0] > 0.1 and e_ref[1] < -0.05  # the signs of GalSim's convention
    assert np.abs(img - ref).max() < 0.01 * ref.max()


def test_bare_profile_with_oversampling_matches_galsim_pixel_integral():
    """A bare exponential (no PSF, so no pixel in the mixture) rendered with 4x4 sub-pixel samples."""
    n, scale = 96, 0.06
    ref = galsim.Exponential(half_light_radius=0.25, flux=10.0).drawImage(nx=n, ny=n, scale=scale).array
    img = render_mixture(galaxy_mixture("exp", flux=10.0, hlr_arcsec=0.25), shape=(n, n),
                         pixel_scale_arcsec=scale, oversample=4)
    assert_allclose(img.sum(), ref.sum(), rtol=5e-3)
    assert_allclose(_hlr(img, scale=scale, flux=10.0), _hlr(ref, scale=scale, flux=10.0), rtol=0.01)


# -- PSF fits -------------------------------------------------------------------------------------
def _check_psf_fit(img, mix, info, scale):
    rendered = render_mixture(mix, shape=img.shape, pixel_scale_arcsec=scale)
    fwhm_img = measure_fwhm(img, pixel_scale_arcsec=scale)
    fwhm_mix = measure_fwhm(rendered, pixel_scale_arcsec=scale)
    m_img, m_mix = image_moments(img), image_moments(rendered / rendered.sum())
    assert abs(fwhm_mix / fwhm_img - 1.0) < 0.02, (fwhm_img, fwhm_mix)
    for key in ("xx", "yy"):
        assert abs(m_mix[key] / m_img[key] - 1.0) < 0.02, (key, m_img, m_mix)
    assert abs(m_mix["xy"] - m_img["xy"]) < 0.02 * m_img["T"]
    assert_allclose(mix.flux, 1.0, rtol=1e-12)
    # The reported diagnostics agree with what we measure here (measure_fwhm's 0.5-px radial bins
    # make it jump by ~0.1% when a centred image moves by 1e-15 px, hence the tolerance).
    assert_allclose(info["fwhm_rel_err"], fwhm_mix / fwhm_img - 1.0, atol=3e-3)
    assert info["moment_rel_err"] < 0.02 and info["flux_in_stamp"] > 0.99


@pytest.mark.parametrize("scale", [0.18, 0.06])
def test_psf_mixture_reproduces_moffat(scale):
    img = draw_psf(PSFConfig(kind="moffat", fwhm_arcsec=0.6, beta=3.5), pixel_scale_arcsec=scale)
    mix, info = fit_psf_mixture(img, n_gauss=3, pixel_scale_arcsec=scale)
    _check_psf_fit(img, mix, info, scale)
    assert info["frac_rms"] < 0.01 and info["max_resid"] < 0.005 and info["success"]
    assert np.abs(mix.centroid).max() < 0.01 * scale  # centred to 1/100 px


@pytest.mark.realdata
@pytest.mark.parametrize("name,scale", [("acs_wfc_f814w_tinytim_paltas/psf_tt_1.fits", 0.0247),
                                        ("cosmos_acs_f814w_psf_179_scarlet.fits", 0.03)])
def test_psf_mixture_reproduces_real_hst_psf(shared_data, name, scale):
    path = shared_data / "psf" / name  # the fixture skips where ../shared/data is absent
    if not path.exists():
        pytest.skip(f"real HST PSF not found at {path} (see ../shared/data/README.md)")
    img = read_psf(str(path))
    mix, info = fit_psf_mixture(img, n_gauss=3, pixel_scale_arcsec=scale)
    _check_psf_fit(img, mix, info, scale)
    # An Airy core with rings and spikes is not a sum of 3 Gaussians: pixel residuals stay ~10%.
    assert info["frac_rms"] < 0.2
