import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.errors import ConfigError, InputError
from galgan_ray.geometry import hr_to_lr_pixels, low_res_side, lr_to_hr_pixels, make_tan_wcs, pixel_scale_of
from galgan_ray.instrument import HSC_BANDS, HST_BANDS, get_band, list_bands
from galgan_ray.psf import PSFConfig, draw_psf, measure_fwhm, normalize_psf
from galgan_ray.scaling import ArcsinhScaling


def test_every_band_is_defined():
    bands = list_bands()
    assert set(HST_BANDS) <= set(bands["hst"])
    assert set(HST_BANDS) <= set(bands["hsc_like"])
    assert set(HSC_BANDS) <= set(bands["hsc"])
    for survey, names in bands.items():
        for name in names:
            band = get_band(survey, name)
            psf = draw_psf(band.psf, pixel_scale_arcsec=band.pixel_scale_arcsec)
            assert psf.shape[0] % 2 == 1 and abs(psf.sum() - 1) < 1e-9
            assert band.sky_sigma > 0
    with pytest.raises(ConfigError, match="no band"):
        get_band("hsc", "F160W")


@pytest.mark.parametrize("kind,fwhm", [("moffat", 0.6), ("gaussian", 0.6), ("kolmogorov", 0.7)])
def test_psf_fwhm_matches_config(kind, fwhm):
    img = draw_psf(PSFConfig(kind=kind, fwhm_arcsec=fwhm), pixel_scale_arcsec=0.01, size=301)
    assert_allclose(measure_fwhm(img, pixel_scale_arcsec=0.01), fwhm, rtol=0.02)


def test_hst_psf_is_acs_like():
    band = get_band("hst", "F775W")
    fwhm = measure_fwhm(draw_psf(band.psf, pixel_scale_arcsec=0.005, size=201), pixel_scale_arcsec=0.005)
    assert 0.08 <= fwhm <= 0.1


def test_depth_gives_five_sigma_point_source():
    band = get_band("hsc", "i")
    psf = draw_psf(band.psf, pixel_scale_arcsec=band.pixel_scale_arcsec)
    flux = band.flux_from_mag(band.depth_5sigma_mag)
    snr = flux * np.sqrt((psf**2).sum()) / band.sky_sigma  # optimal (PSF-weighted) S/N
    assert_allclose(snr, 5.0, rtol=1e-6)


def test_bad_psf_is_refused():
    with pytest.raises(InputError, match="non-finite"):
        normalize_psf(np.full((5, 5), np.nan), source="my_psf.fits")


def test_wcs_round_trip_and_cocentred_grids():
    w_hr = make_tan_wcs(53.1, -27.8, pixel_scale_arcsec=0.06, shape=(64, 64))
    assert_allclose(pixel_scale_of(w_hr), 0.06, rtol=1e-6)
    n_lr = low_res_side(64, scale_high_arcsec=0.06, scale_low_arcsec=0.18)
    assert n_lr == 22
    w_lr = make_tan_wcs(53.1, -27.8, pixel_scale_arcsec=0.18, shape=(n_lr, n_lr))
    x, y = np.array([3.2, 31.5, 60.0]), np.array([10.0, 31.5, 2.5])
    ra, dec = w_hr.pixel_to_world_values(x, y)
    xl, yl = w_lr.world_to_pixel_values(ra, dec)
    xl2, yl2 = hr_to_lr_pixels(x, y, n_high=64, n_low=22, ratio=3.0)
    assert_allclose(xl, xl2, atol=1e-3)
    assert_allclose(yl, yl2, atol=1e-3)
    xb, yb = lr_to_hr_pixels(xl2, yl2, n_high=64, n_low=22, ratio=3.0)
    assert_allclose(np.c_[xb, yb], np.c_[x, y], atol=1e-9)
    ra2, dec2 = w_hr.pixel_to_world_values(*w_hr.world_to_pixel_values(ra, dec))
    assert np.all(np.hypot((ra2 - ra) * np.cos(np.radians(dec)), dec2 - dec) * 3600 < 0.01)


def test_arcsinh_scaling_inverts_numpy_and_torch():
    import torch

    s = ArcsinhScaling(softening=2.0, scale=8.0)
    x = np.array([-5.0, 0.0, 0.3, 10.0, 3e4])
    assert_allclose(s.inverse(s.forward(x)), x, rtol=1e-10, atol=1e-10)
    xt = torch.tensor(x)
    assert_allclose(s.forward(xt).numpy(), s.forward(x), rtol=1e-12)
    assert_allclose(s.inverse(s.forward(xt)).numpy(), x, rtol=1e-9)
