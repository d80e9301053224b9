"""Template photometry (galgan_ray.templates): what goes in comes out."""
import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.degrade import DegradeConfig, Degrader
from galgan_ray.flags import flag_bit
from galgan_ray.psf import draw_psf
from galgan_ray.templates import (TemplateConfig, prior_sky_noise, psf_templates, solve_template_fluxes, split_light,
                                  template_fluxes)

_FAILED = flag_bit("TEMPLATE_FAILED")


def _gauss(shape, x, y, sigma, flux):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    g = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return flux * g / g.sum()


def _pair_hr(sep_px=14.0, fluxes=(3000.0, 1000.0), sigma=(3.0, 2.0)):
    c = 31.5
    xs = (c - sep_px / 2, c + sep_px / 2)
    parts = np.stack([_gauss((64, 64), x, c, s, f) for x, s, f in zip(xs, sigma, fluxes)])
    centres = np.array([[xs[0], c], [xs[1], c]])
    return parts, centres


def test_prior_sky_noise_of_pure_noise_is_its_sigma():
    rng = np.random.default_rng(1)
    noise = rng.normal(0.0, 2.5, (4, 64, 64))
    noise[:, 20:30, 20:30] += 50.0  # sources add positive light only
    assert_allclose(prior_sky_noise(noise), 2.5, rtol=0.05)
    assert prior_sky_noise(np.zeros((1, 8, 8)))[0] == 0.0


def test_split_light_conserves_the_light_and_splits_a_symmetric_pair_evenly():
    parts, centres = _pair_hr(sep_px=10.0, fluxes=(1000.0, 1000.0), sigma=(3.0, 3.0))
    image = parts.sum(0)[None]
    shares = split_light(image, centres[None], pixel_scale_arcsec=0.06,
                         config=TemplateConfig(threshold_sigma=0.0, smooth_fwhm_arcsec=0.0))
    assert shares.shape == (1, 2, 64, 64)
    assert (shares >= 0).all()
    assert_allclose(shares.sum(axis=1)[0], image[0], rtol=1e-5, atol=1e-6)
    assert_allclose(shares[0, 0].sum(), shares[0, 1].sum(), rtol=1e-3)


def test_split_light_padding_rows_are_empty():
    parts, centres = _pair_hr()
    c = np.full((1, 3, 2), np.nan)
    c[0, :2] = centres
    shares = split_light(parts.sum(0)[None], c, pixel_scale_arcsec=0.06)
    assert shares[0, 2].sum() == 0.0


def test_true_prior_recovers_the_fluxes_of_a_pair_through_the_degradation():
    dc = DegradeConfig()
    deg = Degrader(dc)
    parts, centres = _pair_hr(sep_px=14.0)
    image_lr = deg.noiseless(parts.sum(0)[None, None])[:, 0].astype(np.float64)
    sigma = 0.05
    res = template_fluxes(image_lr, np.array([sigma**2]), parts.sum(0)[None], centres[None],
                          pixel_scale_arcsec=0.06, to_low_resolution=lambda x: deg.noiseless(x[:, None])[:, 0],
                          config=TemplateConfig(threshold_sigma=0.0, smooth_fwhm_arcsec=0.0, systematic_fraction=0.0))
    assert (res["flags"] == 0).all()
    # The split of overlapping light is not exact; the total is.
    assert_allclose(res["flux"][0], [3000.0, 1000.0], rtol=0.05)
    assert_allclose(res["flux"][0].sum(), 4000.0, rtol=0.01)


def test_noisy_fluxes_scatter_as_their_quoted_errors():
    dc = DegradeConfig()
    deg = Degrader(dc)
    parts, centres = _pair_hr(sep_px=20.0, fluxes=(800.0, 500.0))
    clean = deg.noiseless(parts.sum(0)[None, None])[0, 0].astype(np.float64)
    rng = np.random.default_rng(3)
    n, sigma = 200, 2.0
    images = clean[None] + rng.normal(0.0, sigma, (n, *clean.shape))
    prior = np.broadcast_to(parts.sum(0), (n, 64, 64))  # a noiseless prior: only the LR noise counts
    res = template_fluxes(images, np.full(n, sigma**2), prior, np.broadcast_to(centres, (n, 2, 2)),
                          pixel_scale_arcsec=0.06, to_low_resolution=lambda x: deg.noiseless(x[:, None])[:, 0],
                          config=TemplateConfig(threshold_sigma=0.0, smooth_fwhm_arcsec=0.0, systematic_fraction=0.0,
                                                robust_errors=False))
    pulls = (res["flux"] - res["flux"].mean(0)) / res["flux_err"]
    assert_allclose(pulls.std(0), 1.0, atol=0.15)
    assert_allclose(res["flux"].mean(0), [800.0, 500.0], rtol=0.03)


def test_child_without_prior_light_gets_a_psf_template():
    psf = draw_psf(DegradeConfig().low[0].psf, pixel_scale_arcsec=0.18, size=21)
    star = psf_templates(psf, np.array([[[10.3, 11.6]]]), (22, 22))[0, 0] * 500.0
    assert_allclose(star.sum(), 500.0, rtol=0.02)
    res = template_fluxes(star[None].astype(np.float64), np.array([0.01]), np.zeros((1, 66, 66)),
                          np.array([[[3 * 10.3 + 1, 3 * 11.6 + 1]]]), pixel_scale_arcsec=0.06,
                          to_low_resolution=lambda x: x.reshape(len(x), 22, 3, 22, 3).sum((2, 4)),
                          psf_lr=psf, centres_lr=np.array([[[10.3, 11.6]]]), config=TemplateConfig(systematic_fraction=0))
    assert res["flags"][0, 0] == 0
    assert_allclose(res["flux"][0, 0], 500.0, rtol=0.01)


def test_degenerate_templates_are_flagged_not_invented():
    t = np.zeros((1, 2, 10, 10))
    t[0, 0, 4:6, 4:6] = 1.0
    t[0, 1, 4:6, 4:6] = 1.0  # the same template twice: only the sum is constrained
    img = t[:, 0] * 7.0
    res = solve_template_fluxes(img, np.array([1.0]), t)
    assert (res["flags"][0] & _FAILED).all()
    assert np.isnan(res["amplitude"][0]).all()
    empty = solve_template_fluxes(img, np.array([1.0]), np.stack([t[:, 0], np.zeros_like(t[:, 0])], axis=1))
    assert empty["flags"][0, 1] & _FAILED and not empty["flags"][0, 0]
    assert_allclose(empty["amplitude"][0, 0], 7.0)


@pytest.mark.parametrize("bad", ["threshold_sigma", "smooth_fwhm_arcsec", "systematic_fraction"])
def test_config_rejects_negative_values(bad):
    from galgan_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=bad):
        TemplateConfig(**{bad: -1.0})


def test_lr_operator_matches_the_degradation_of_cutouts():
    from galgan_ray.templates import lr_operator

    dc = DegradeConfig()
    deg = Degrader(dc)
    hr = _gauss((64, 64), 30.2, 33.7, 2.5, 1000.0)
    ref = deg.noiseless(hr[None, None])[0, 0]
    psf_hr = draw_psf(dc.high[0].psf, pixel_scale_arcsec=0.06, size=63)
    psf_lr = draw_psf(dc.low[0].psf, pixel_scale_arcsec=0.18, size=21)
    op = lr_operator(psf_hr, psf_lr, factor=3)
    out = op(np.pad(hr, 1)[None])[0]  # the 22 x 22 LR cutout spans 66 HR px: the 64 HR px plus one on each side
    assert out.shape == (22, 22)
    assert_allclose(out.sum(), hr.sum(), rtol=1e-3)
    assert np.abs(out - ref).max() < 0.01 * ref.max()


def test_split_light_of_a_stack_equals_each_image_alone():
    # split_light works on blocks of images at once; each image's shares must not depend on its company.
    rng = np.random.default_rng(4)
    n, s = 40, 3
    centres = rng.uniform(8, 56, (n, s, 2))
    centres[::3, 2] = np.nan                # padding rows
    centres[::5, 1:] = np.nan               # single children
    centres[7, 0] = (-20.0, 90.0)           # a centre far off the box
    prior = rng.normal(0, 1.0, (n, 64, 64))
    for i in range(n):
        for j in range(s):
            if np.isfinite(centres[i, j]).all():
                prior[i] += _gauss((64, 64), *centres[i, j], rng.uniform(1.5, 4), rng.uniform(300, 3000))
    for cfg in (TemplateConfig(), TemplateConfig(monotonic=True, dilate_arcsec=0.0)):
        together = split_light(prior, centres, pixel_scale_arcsec=0.06, config=cfg)
        alone = np.concatenate([split_light(prior[i:i + 1], centres[i:i + 1], pixel_scale_arcsec=0.06, config=cfg)
                                for i in range(n)])
        assert_allclose(together, alone, rtol=1e-6, atol=1e-6)
        assert (together[~np.isfinite(centres).all(-1)] == 0).all()


def test_lr_operator_equals_a_direct_convolution_and_block_sum():
    # The operator block-sums the rows on the folded spectrum: it must equal convolving the whole
    # template ('same' window) and summing 3 x 3 blocks, for boxes of any size.
    from scipy.signal import fftconvolve

    from galgan_ray.templates import _kernel_cached, lr_operator

    dc = DegradeConfig()
    psf_hr = draw_psf(dc.high[0].psf, pixel_scale_arcsec=0.06, size=63)
    psf_lr = draw_psf(dc.low[0].psf, pixel_scale_arcsec=0.18, size=21)
    op = lr_operator(psf_hr, psf_lr, factor=3)
    a, b = np.ascontiguousarray(psf_hr, np.float64), np.ascontiguousarray(psf_lr, np.float64)
    kernel = _kernel_cached(a.tobytes(), a.shape, b.tobytes(), b.shape, 3)
    rng = np.random.default_rng(5)
    for h, w in ((66, 66), (48, 96), (9, 9), (192, 144)):
        x = rng.normal(size=(3, h, w)) + np.pad(_gauss((h - 6, w - 6), w / 3, h / 2, 3.0, 500.0), 3)[None]
        direct = np.stack([fftconvolve(xi, kernel, mode="same") for xi in x])
        direct = direct.reshape(3, h // 3, 3, w // 3, 3).sum(axis=(2, 4))
        out = op(x)
        assert out.shape == (3, h // 3, w // 3)
        assert np.abs(out - direct).max() < 1e-5 * np.abs(direct).max()
