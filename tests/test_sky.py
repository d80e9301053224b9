import json
import pickle

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.catalog import candels_flux_column
from galgan_ray.config import from_dict
from galgan_ray.errors import ConfigError
from galgan_ray.instrument import get_band
from galgan_ray.sky import SkyConfig, _draw_objects, simulate_sky, write_sky

TINY = SkyConfig(seed=11, size_arcsec=12.0, bands=("F775W", "F160W"))


@pytest.fixture(scope="module")
def tiny_sky():
    return simulate_sky(TINY)


def test_same_seed_same_sky(tiny_sky):
    images, wcs, cat = tiny_sky
    images2, _, cat2 = simulate_sky(TINY)
    for band in TINY.bands:
        assert images[band].dtype == np.float32 and images[band].shape == (200, 200)
        assert_array_equal(images[band], images2[band])
    assert_array_equal(np.asarray(cat["RA"]), np.asarray(cat2["RA"]))
    other, _, _ = simulate_sky(SkyConfig(seed=12, size_arcsec=12.0, bands=("F775W",)))
    assert not np.array_equal(other["F775W"], images["F775W"])


def test_catalog_layout_and_wcs_round_trip(tiny_sky):
    images, wcs, cat = tiny_sky
    for col in ("ID", "RA", "DEC", "CLASS_STAR", "FWHM_IMAGE", "FLUX_RADIUS", "ZBEST",
                "ACS_F775W_FLUX", "ACS_F775W_FLUXERR", "WFC3_F160W_FLUX", "WFC3_F160W_FLUXERR",
                "MAG_TRUE_F775W", "MAG_TRUE_F160W", "IS_STAR", "X_PIX", "Y_PIX"):
        assert col in cat.colnames, col
    assert len(cat) > 3
    x, y = wcs.world_to_pixel_values(cat["RA"], cat["DEC"])
    assert_allclose(x, cat["X_PIX"], atol=0.01 / 0.06)
    assert_allclose(y, cat["Y_PIX"], atol=0.01 / 0.06)
    ra, dec = wcs.pixel_to_world_values(x, y)
    sep = np.hypot((ra - cat["RA"]) * np.cos(np.radians(cat["DEC"])), dec - cat["DEC"]) * 3600
    assert np.all(sep < 0.01)
    # the centre of the mosaic is the configured sky position
    assert_allclose(wcs.pixel_to_world_values(99.5, 99.5), (53.12, -27.80), atol=1e-9)


def test_population_statistics():
    cfg = SkyConfig(seed=0, size_arcsec=300.0)  # parameters only, nothing drawn
    p = _draw_objects(cfg)
    area = ((300 + 2 * cfg.margin_arcsec) / 60.0) ** 2
    gal = ~p["is_star"]
    n_265 = np.count_nonzero(gal & (p["mag"] < 26.5)) / area
    assert_allclose(n_265, cfg.galaxy_density_arcmin2, rtol=0.1)
    # dlogN/dm ~ 0.3: one magnitude brighter -> 10^0.3 fewer
    n_255 = np.count_nonzero(gal & (p["mag"] < 25.5)) / area
    assert_allclose(np.log10(n_265 / n_255), 0.3, atol=0.05)
    z = p["z"][gal]
    assert 0.6 < np.median(z) < 2.0
    assert 0.01 < np.mean(z > 5) < 0.1  # the paper's z < 5 cut bites
    hlr = p["hlr_disk"][gal & (p["mag"] < 25)]
    assert 0.1 < np.median(hlr) < 1.0


def test_aperture_flux_of_isolated_bright_galaxy():
    cfg = SkyConfig(seed=5, size_arcsec=24.0, galaxy_density_arcmin2=25.0, density_mag=23.0,
                    mag_bright=20.5, mag_faint=23.0, star_fraction=0.0, margin_arcsec=0.0)
    images, wcs, cat = simulate_sky(cfg)
    img = images["F775W"]
    x, y = np.asarray(cat["X_PIX"]), np.asarray(cat["Y_PIX"])
    radius_px = 2.5 / 0.06
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) + np.eye(len(cat)) * 1e9
    ok = (d.min(axis=1) > 2 * radius_px) & (x > radius_px) & (y > radius_px) & \
         (x < img.shape[1] - radius_px) & (y < img.shape[0] - radius_px) & \
         (np.asarray(cat["HLR_DISK_ARCSEC"]) < 0.6)
    assert ok.any(), "the test field should hold an isolated galaxy"
    i = int(np.argmin(np.where(ok, cat["MAG_TRUE_F775W"], np.inf)))
    yy, xx = np.indices(img.shape)
    ap = np.hypot(xx - x[i], yy - y[i]) < radius_px
    flux = img[ap].sum()
    true = 10 ** (-0.4 * (cat["MAG_TRUE_F775W"][i] - 31.4))
    noise = get_band("hst", "F775W").sky_sigma * np.sqrt(ap.sum())
    assert true > 100 * noise
    assert_allclose(flux, true, rtol=0.03)
    # the catalog flux (uJy, measured-like) agrees within its error
    assert abs(cat["ACS_F775W_FLUX"][i] * 1000 - true) < 5 * cat["ACS_F775W_FLUXERR"][i] * 1000


def test_write_sky_headers_and_catalog(tmp_path):
    cfg = SkyConfig(seed=2, size_pixels=120, bands=("F606W",), reference_band="F775W")
    paths = write_sky(cfg, tmp_path)
    assert set(paths) == {"F606W", "catalog"}
    with fits.open(paths["F606W"]) as hdul:
        hdr, data = hdul[0].header, hdul[0].data
    assert data.shape == (120, 120)
    assert hdr["BUNIT"] == "nJy" and hdr["FILTER"] == "F606W" and hdr["INSTRUME"] == "ACS"
    assert hdr["MAGZERO"] == 31.4 and hdr["PHOTZP"] == 31.4
    assert from_dict(SkyConfig, json.loads(hdr["SKYCONF"])) == cfg
    w = WCS(hdr)
    assert w.has_celestial and w.wcs.ctype[0] == "RA---TAN"
    cat = Table.read(paths["catalog"])
    assert candels_flux_column("F606W") in cat.colnames and "ZBEST" in cat.colnames
    x, y = w.world_to_pixel_values(cat["RA"], cat["DEC"])
    assert_allclose(x, cat["X_PIX"], atol=1e-3)


def test_config_pickles_and_validates():
    cfg = SkyConfig(bands=("F435W", "F160W"))
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(ConfigError, match="mag_faint"):
        SkyConfig(mag_bright=27, mag_faint=20)
