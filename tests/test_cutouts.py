import os

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table, vstack
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.catalog import read_catalog
from galgan_ray.cutouts import GALAXY_SET_KEYS, cut_cutouts, draw_real_galaxies
from galgan_ray.errors import InputError
from galgan_ray.flags import flag_bit
from galgan_ray.sky import SkyConfig, write_sky

EDGE, NONFINITE = flag_bit("EDGE"), flag_bit("NONFINITE")
SIZE = 64
C = (SIZE - 1) / 2.0


@pytest.fixture(scope="module")
def sky(tmp_path_factory):
    out = tmp_path_factory.mktemp("sky")
    paths = write_sky(SkyConfig(seed=4, size_arcsec=18.0, bands=("F775W",), star_fraction=0.0), out)
    return paths, read_catalog(paths["catalog"])


def _centroid(images, r=4.0, x0=C, y0=C):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    w = np.where(np.hypot(xx - np.asarray(x0)[..., None, None], yy - np.asarray(y0)[..., None, None]) < r,
                 images, 0.0)
    w = np.clip(w, 0, None)
    return (w * xx).sum((-2, -1)) / w.sum((-2, -1)), (w * yy).sum((-2, -1)) / w.sum((-2, -1))


def _check_set(g, n, c):
    assert set(GALAXY_SET_KEYS) <= set(g)
    assert g["image_hr"].shape == (n, c, SIZE, SIZE) and g["image_hr"].dtype == np.float32
    for key in ("mag", "flux_njy", "sigma_hr"):
        assert g[key].shape == (n, c) and g[key].dtype == np.float32
    assert g["objectId"].dtype == np.int64 and g["flags"].dtype == np.int32
    assert np.isfinite(g["image_hr"]).all()


def test_cutouts_are_centred_where_the_flux_is(sky):
    paths, cat = sky
    g, meta = cut_cutouts({"F775W": paths["F775W"]}, None, cat)
    _check_set(g, len(cat), 1)
    assert meta["centering"] == {"F775W": "integer"} and meta["bands"] == ("hst/F775W",)
    assert meta["zeropoints"]["F775W"]["zeropoint_mag"] == 31.4
    assert np.all(np.abs(g["x_offset_px"]) <= 0.5) and np.all(np.abs(g["y_offset_px"]) <= 0.5)
    bright = (g["mag"][:, 0] < 25) & (g["flags"] == 0)
    assert bright.sum() >= 2
    cx, cy = _centroid(g["image_hr"][bright, 0], x0=C + g["x_offset_px"][bright], y0=C + g["y_offset_px"][bright])
    assert_allclose(cx - g["x_offset_px"][bright], C, atol=0.5)
    assert_allclose(cy - g["y_offset_px"][bright], C, atol=0.5)
    # sigma from the SKYSIGMA header, in nJy
    assert_allclose(g["sigma_hr"], 0.863, rtol=0.01)
    # ra_center/dec_center is the sky position of the cutout centre: catalog position = centre + offset
    from galgan_ray.geometry import make_tan_wcs

    for k in np.nonzero(bright)[0][:3]:
        w = make_tan_wcs(g["ra_center"][k], g["dec_center"][k], pixel_scale_arcsec=0.06, shape=(SIZE, SIZE))
        x, y = w.world_to_pixel_values(cat["ra"][k], cat["dec"][k])
        assert_allclose([x - C, y - C], [g["x_offset_px"][k], g["y_offset_px"][k]], atol=0.02)


def test_edge_and_off_mosaic_cutouts_are_flagged_and_counted(sky):
    paths, cat = sky
    with fits.open(paths["F775W"]) as hdul:
        from astropy.wcs import WCS

        w = WCS(hdul[0].header)
    extra = Table(cat[:2], copy=True)
    extra["objectId"] = [9001, 9002]
    corner = w.pixel_to_world_values(3.0, 5.0)  # near the (0, 0) corner: window runs off the mosaic
    far = w.pixel_to_world_values(-500.0, 120.0)  # entirely off the mosaic
    extra["ra"], extra["dec"] = [corner[0], far[0]], [corner[1], far[1]]
    full = vstack([cat, extra])
    g, meta = cut_cutouts({"F775W": paths["F775W"]}, None, full)
    counts = meta["counts"]
    assert counts["input"] == len(full) and counts["off_mosaic"] == 1 and meta["off_mosaic_ids"] == [9002]
    assert counts["kept"] == len(full) - 1 == len(g["objectId"])
    k = int(np.nonzero(g["objectId"] == 9001)[0][0])
    assert g["flags"][k] & EDGE
    assert counts["edge"] == int(np.count_nonzero(g["flags"] & EDGE)) >= 1
    # the padded part is zero, the rest is the mosaic
    assert np.all(g["image_hr"][k, 0, :SIZE // 2 - 6, :] == 0.0)


def test_mosaic_without_wcs_names_the_file(sky, tmp_path):
    paths, cat = sky
    data = fits.getdata(paths["F775W"])
    bare = tmp_path / "no_wcs.fits"
    fits.PrimaryHDU(data).writeto(bare)
    with pytest.raises(InputError) as err:
        cut_cutouts({"F775W": bare}, None, cat)
    assert str(bare) in str(err.value) and "WCS" in str(err.value)
    with pytest.raises(InputError, match="wcs"):
        cut_cutouts({"F775W": data}, None, cat)


def test_nan_pixels_are_flagged_and_zeroed(sky):
    paths, cat = sky
    from astropy.wcs import WCS

    with fits.open(paths["F775W"]) as hdul:
        data = hdul[0].data.astype(np.float32)
        w = WCS(hdul[0].header)
    x, y = w.world_to_pixel_values(cat["ra"][0], cat["dec"][0])
    ix, iy = int(round(float(x))), int(round(float(y)))
    data[iy - 2:iy + 3, ix - 2:ix + 3] = np.nan  # 25 NaN pixels on the first galaxy
    g, meta = cut_cutouts({"F775W": data}, w, cat[:1], sigma={"F775W": 0.86})
    assert g["flags"][0] & NONFINITE
    assert meta["counts"]["nonfinite_pixels"] == 25 and meta["counts"]["nonfinite_cutouts"] == 1
    assert np.isfinite(g["image_hr"]).all()
    assert meta["zeropoints"]["F775W"]["source"] == "BandConfig"


def test_other_pixel_scale_and_units_are_resampled(tmp_path):
    # A 0.03"/px mosaic in e-/s with the CANDELS F775W zero point (PHOTZP 25.654).
    cfg = SkyConfig(seed=8, size_arcsec=12.0, pixel_scale_arcsec=0.03, galaxy_density_arcmin2=150.0,
                    density_mag=23.0, mag_bright=21.0, mag_faint=23.0, star_fraction=0.0, margin_arcsec=0.0)
    paths = write_sky(cfg, tmp_path)
    cat = read_catalog(paths["catalog"])
    zp = 25.654
    with fits.open(paths["F775W"]) as hdul:
        hdr, data = hdul[0].header, hdul[0].data
    hdr["PHOTZP"] = hdr["MAGZERO"] = zp
    hdr["BUNIT"] = "ELECTRONS/S"
    fits.PrimaryHDU(data / 10 ** (-0.4 * (zp - 31.4)), header=hdr).writeto(tmp_path / "eps.fits")
    g, meta = cut_cutouts({"F775W": tmp_path / "eps.fits"}, None, cat)
    assert meta["centering"] == {"F775W": "resampled"} and meta["counts"]["resampled"]["F775W"] == len(cat)
    assert_allclose(meta["native_pixel_scale_arcsec"]["F775W"], 0.03, rtol=1e-6)
    inner = (g["flags"] & EDGE) == 0
    assert inner.any()
    # centred exactly on the catalog position, flux conserved and converted to nJy
    cx, cy = _centroid(g["image_hr"][inner, 0])
    assert_allclose(cx, C, atol=0.3)
    assert_allclose(cy, C, atol=0.3)
    # flux conservation + unit conversion: same aperture (1.5") on the native nJy mosaic
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    flux = g["image_hr"][inner, 0][:, np.hypot(xx - C, yy - C) < 25].sum(-1)
    truth = Table.read(paths["catalog"])[inner]
    ny, nx = np.indices(data.shape)
    native = [data[np.hypot(nx - x, ny - y) < 50].sum() for x, y in zip(truth["X_PIX"], truth["Y_PIX"])]
    assert_allclose(flux, native, rtol=0.01)
    with pytest.raises(InputError, match="resample='never'"):
        cut_cutouts({"F775W": tmp_path / "eps.fits"}, None, cat, resample="never")


# ------------------------------------------------------------------------------------------------
# Real HST stamps (../shared/data/hst_cosmos_f814w)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cosmos_dir(shared_data):
    d = shared_data / "hst_cosmos_f814w"
    if not (d / "cosmos_f814w_catalog.fits").exists():
        pytest.skip(f"real COSMOS stamps not found in {d} (../shared/data is absent on a fresh clone)")
    return d


@pytest.mark.realdata
def test_real_stamps_are_drawn_on_the_grid(cosmos_dir):
    rows = list(range(0, 70, 3))
    g, meta = draw_real_galaxies(cosmos_dir / "cosmos_f814w_catalog.fits", seed=3, indices=rows)
    n = len(rows)
    _check_set(g, n, 1)
    assert meta["counts"] == {"input": n, "drawn": n, "failed": 0}
    assert meta["bands"] == ("hst/F814W",) and meta["pixel_scale_arcsec"] == 0.06
    assert meta["band_configs"][0]["psf"]["jitter_fwhm_arcsec"] >= 0.07  # never sharper than the stamps
    assert np.isfinite(g["redshift"]).all() and np.isfinite(g["flux_radius_arcsec"]).all()
    assert np.all(g["sigma_hr"] >= 0.84)  # at least the F814W depth's noise
    img = g["image_hr"][:, 0]
    # flux: a 1.5" aperture holds about the catalog magnitude's flux (noise and neighbours aside)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    ap = np.hypot(xx - C, yy - C) < 1.5 / 0.06
    ratio = img[:, ap].sum(-1) / g["flux_njy"][:, 0]
    bright = g["mag"][:, 0] < 24
    assert bright.sum() >= 5
    assert_allclose(np.median(ratio[bright]), 1.0, atol=0.2)
    # centroid near the centre
    cx, cy = _centroid(img[bright], r=8.0)
    assert np.median(np.hypot(cx - C, cy - C)) < 1.0
    assert np.all(np.hypot(cx - C, cy - C) < 4.0)
    # reproducible
    g2, _ = draw_real_galaxies(cosmos_dir / "cosmos_f814w_catalog.fits", seed=3, indices=rows[:2])
    assert_array_equal(g2["image_hr"], g["image_hr"][:2])


@pytest.mark.realdata
def test_real_stamps_from_another_directory(cosmos_dir, tmp_path):
    for f in os.listdir(cosmos_dir):
        (tmp_path / f).symlink_to(cosmos_dir / f)
    g, meta = draw_real_galaxies(tmp_path / "cosmos_f814w_catalog.fits", indices=[1, 5], noise="whiten",
                                 fits_catalog=False)
    assert g["image_hr"].shape == (2, 1, SIZE, SIZE) and np.isnan(g["redshift"]).all()
    assert meta["catalog"].startswith(str(tmp_path))
    with pytest.raises(InputError, match="not found"):
        draw_real_galaxies(tmp_path / "missing.fits")
