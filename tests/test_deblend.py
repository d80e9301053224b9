"""`galgan deblend` and the survey-image reader: files as surveys deliver them, errors that name the file."""
from __future__ import annotations

import glob
import gzip
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from conftest import load_bench

from galgan_ray.cli import main
from galgan_ray.errors import InputError
from galgan_ray.survey import AB_NJY, check_psf, read_survey_image


def _qso_scene(shared_data, k=0):
    d = shared_data / "hsc_hst_qso_fields"
    img = sorted(glob.glob(str(d / "hsc" / "*-cutout-HSC-I-*.fits")))[k]
    sid = img.split("/")[-1].split("-")[0]
    psf = glob.glob(str(d / "hsc_psf" / f"{sid}-psf-calexp-*-HSC-I-*.fits"))[0]
    return img, psf


def _qso_scene_id(shared_data, sid):
    d = shared_data / "hsc_hst_qso_fields"
    img = glob.glob(str(d / "hsc" / f"{sid}-cutout-HSC-I-*.fits"))[0]
    psf = glob.glob(str(d / "hsc_psf" / f"{sid}-psf-calexp-*-HSC-I-*.fits"))[0]
    return img, psf


def test_an_hsc_data_access_cutout_reads_in_njy_with_its_mask_planes(shared_data):
    img, psf = _qso_scene(shared_data)
    si = read_survey_image(img, psf=psf)
    with fits.open(img) as h:
        raw, f0 = h[1].data.astype(float), h[0].header["FLUXMAG0"]
    assert si.unit_to_njy == pytest.approx(AB_NJY / f0) == pytest.approx(57.54, rel=1e-3)
    ok = ~si.bad
    np.testing.assert_allclose(si.image[ok], raw[ok] * AB_NJY / f0)
    assert {"NO_DATA", "SAT", "BRIGHT_OBJECT"} <= set(si.mask_planes)
    assert si.psf is not None and si.psf.sum() == pytest.approx(1.0)
    assert si.pixel_scale_arcsec == pytest.approx(0.168, rel=1e-3)


def test_deblend_writes_the_field_schema_and_a_gzipped_copy_gives_the_same_catalog(shared_data, tmp_path, capsys):
    img, psf = _qso_scene(shared_data)
    gz = tmp_path / "copy.fits.gz"
    with open(img, "rb") as fi, gzip.open(gz, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "a.parquet")]) == 0
    out = capsys.readouterr().out
    assert "sources in" in out
    assert main(["deblend", str(gz), "--psf", psf, "--out", str(tmp_path / "b.parquet")]) == 0
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.num_rows > 0 and a.column_names == b.column_names
    for name in ("coord_ra", "coord_dec", "i_gmmFlux", "flags"):
        np.testing.assert_array_equal(a[name].to_numpy(), b[name].to_numpy())
    assert {"objectId", "parentObjectId", "coord_ra", "coord_dec", "i_gmmFlux", "i_gmmFluxErr", "flags"} <= set(
        a.column_names)
    flags = a["flags"].to_numpy()
    from galgan_ray.flags import flag_bit

    assert not np.any(flags & flag_bit("UNSUPPORTED"))
    n_added = int(np.sum((flags & flag_bit("DEBLEND_ADDED")) != 0))
    assert n_added > 0  # this cutout has rows only deblending finds, so the checks below test something
    assert (f"{n_added} row(s) only deblending finds" in out) == (n_added > 0)  # the summary counts them
    snr = a["i_gmmFlux"].to_numpy() / a["i_gmmFluxErr"].to_numpy()
    assert np.all(snr[(flags & flag_bit("DEBLEND_ADDED")) != 0] >= 20.0)  # measure.support_snr_added
    flux = a["i_gmmFlux"].to_numpy()
    assert np.all((flux > 0) | ((flags & flag_bit("LOW_SNR")) != 0))  # a negative flux is never unflagged
    # positions are the input image's pixels
    with fits.open(img) as h:
        ny, nx = h[1].data.shape
    x, y = a["x"].to_numpy(), a["y"].to_numpy()
    assert np.all((x > -1) & (x < nx) & (y > -1) & (y < ny))


@pytest.mark.parametrize("k", [0, 2, 3, 5, 6])
def test_a_residual_sky_and_gradient_give_the_clean_catalog(shared_data, tmp_path, k):
    """The real-sky issue's check on real cutouts as downloaded: a pedestal of 1 sigma plus a gradient
    of 1 sigma across the image (each pixel's own sigma) gives the clean run's rows, flags and fluxes.
    Scenes 2, 3, 5 and 6 (ids 14, 16, 2, 20) failed it until ``to_model_tile`` took the sky's plane out
    of the file's own pixels first (``bench/residual_sky.py`` runs all 35)."""
    img, psf = _qso_scene(shared_data, k)
    load_bench("residual_sky").with_residual_sky(img, str(tmp_path / "sky.fits"))
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "a.parquet")]) == 0
    assert main(["deblend", str(tmp_path / "sky.fits"), "--psf", psf, "--out", str(tmp_path / "b.parquet")]) == 0
    a, b = pq.read_table(tmp_path / "a.parquet").to_pydict(), pq.read_table(tmp_path / "b.parquet").to_pydict()
    assert len(a["x"]) >= 5 and len(b["x"]) == len(a["x"])
    d = np.hypot(np.subtract.outer(a["x"], b["x"]), np.subtract.outer(a["y"], b["y"]))
    j = d.argmin(axis=1)
    assert d.min(axis=1).max() < 0.5 and len(set(j)) == len(j)  # input pixels
    np.testing.assert_array_equal(np.asarray(a["flags"]), np.asarray(b["flags"])[j])
    for col in ("i_gmmFlux", "i_templateFlux"):
        fa, fb = np.asarray(a[col]), np.asarray(b[col])[j]
        err = np.asarray(a[col + "Err"])
        assert np.all(np.abs(fb - fa) < 0.5 * err + 0.01 * np.abs(fa)), (col, fa, fb, err)


def test_the_model_tile_of_a_file_is_the_same_under_a_residual_sky(shared_data, tmp_path):
    """Why the catalog is: the sky's plane comes out on the file's own pixels, so the tile the pipeline
    sees (resampled, PSF-matched, its variance scaled by the measured noise) and the file's plain
    detection are those of the clean file, to float rounding."""
    from galgan_ray.checkpoint import ModelGrid
    from galgan_ray.instrument import get_band
    from galgan_ray.survey import to_model_tile

    img, psf = _qso_scene(shared_data, 10)
    load_bench("residual_sky").with_residual_sky(img, str(tmp_path / "sky.fits"), pedestal=-2.0, gradient_x=3.0,
                                                  gradient_y=-1.0)
    grid = ModelGrid(high=(get_band("hst", "F775W"),), low=(get_band("hsc", "i"),))
    a, _ = to_model_tile(read_survey_image(img, psf=psf), model=grid)
    b, _ = to_model_tile(read_survey_image(str(tmp_path / "sky.fits"), psf=psf), model=grid)
    noise = np.sqrt(np.median(a.variance[np.isfinite(a.variance)]))
    assert np.abs(b.image - a.image).max() < 1e-3 * noise  # float32 rounding of the file and tile
    np.testing.assert_allclose(b.variance, a.variance, rtol=1e-5)
    np.testing.assert_allclose(b.detections, a.detections, atol=1e-3)


def _fpacked(img, out):
    with fits.open(img) as h:
        hl = fits.HDUList([fits.PrimaryHDU(header=h[0].header)])
        for hdu in h[1:]:  # lossless tile compression, as fpack -g2 -q 0 writes it
            hl.append(fits.CompImageHDU(data=hdu.data, header=hdu.header, compression_type="GZIP_2",
                                        quantize_level=0.0))
        hl.writeto(out)


def _rubin_style(img, out):
    with fits.open(img) as h:
        njy = AB_NJY / h[0].header["FLUXMAG0"]
        im = fits.ImageHDU((h[1].data * njy).astype(np.float32), h[1].header, name="IMAGE")
        im.header["BUNIT"] = "nJy"
        var = fits.ImageHDU((h[3].data * njy**2).astype(np.float32), h[3].header, name="VARIANCE")
        fits.HDUList([fits.PrimaryHDU(), im, fits.ImageHDU(h[2].data, h[2].header, name="MASK"), var]).writeto(out)


def _turned(img, psf, out, out_psf):
    """The cutout turned by 90 degrees on its pixel grid, its WCS (a rotated CD matrix) and PSF with it."""
    with fits.open(img) as h:
        hl = fits.HDUList([fits.PrimaryHDU(header=h[0].header)])
        for hdu in h[1:4]:
            hd, nx = hdu.header.copy(), hdu.data.shape[1]
            cd = WCS(hdu.header).celestial.pixel_scale_matrix @ np.array([[0, -1], [1, 0]])  # x_old = nx-1-y, y_old = x
            for key in [k for k in hd if k.startswith(("CD1_", "CD2_", "PC1_", "PC2_", "CDELT"))]:
                del hd[key]
            for (i, j), v in np.ndenumerate(cd):
                hd[f"CD{i + 1}_{j + 1}"] = v
            hd["CRPIX1"], hd["CRPIX2"] = hdu.header["CRPIX2"], nx + 1 - hdu.header["CRPIX1"]
            hl.append(fits.ImageHDU(np.ascontiguousarray(np.rot90(hdu.data)), hd))
        hl.writeto(out)
    with fits.open(psf) as h:
        h[0].data = np.ascontiguousarray(np.rot90(h[0].data))
        h.writeto(out_psf)


def _off_centre(psf, out):
    with fits.open(psf) as h:
        h[0].data = np.roll(h[0].data, (1, -2), axis=(0, 1))  # 2 px east, 1 px north of its centre
        h.writeto(out)


@pytest.mark.parametrize("variant", ["fpack", "rubin", "turned", "off_centre_psf"])
def test_the_same_sky_delivered_otherwise_gives_the_same_catalog(variant, shared_data, tmp_path):
    """An fpack-compressed copy, a Rubin deep_coadd-style file (IMAGE/MASK/VARIANCE in nJy), the cutout
    turned by 90 degrees with its WCS (a rotated CD matrix) and PSF, and an off-centre PSF (moved by whole
    pixels, as a convention mismatch leaves it): each gives the catalog of the file as downloaded."""
    img, psf = _qso_scene(shared_data)
    new_img, new_psf = img, psf
    if variant == "fpack":
        _fpacked(img, new_img := str(tmp_path / "copy.fits.fz"))
    elif variant == "rubin":
        _rubin_style(img, new_img := str(tmp_path / "deep_coadd.fits"))
    elif variant == "turned":
        _turned(img, psf, new_img := str(tmp_path / "turned.fits"), new_psf := str(tmp_path / "turned_psf.fits"))
    else:
        _off_centre(psf, new_psf := str(tmp_path / "psf_off.fits"))
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "a.parquet")]) == 0
    assert main(["deblend", new_img, "--psf", new_psf, "--out", str(tmp_path / "b.parquet")]) == 0
    a, b = pq.read_table(tmp_path / "a.parquet").to_pydict(), pq.read_table(tmp_path / "b.parquet").to_pydict()
    assert len(a["coord_ra"]) >= 5 and len(b["coord_ra"]) == len(a["coord_ra"])
    cos = np.cos(np.radians(np.mean(a["coord_dec"])))
    d = 3600 * np.hypot(cos * np.subtract.outer(a["coord_ra"], b["coord_ra"]),
                        np.subtract.outer(a["coord_dec"], b["coord_dec"]))
    j = d.argmin(axis=1)
    assert d.min(axis=1).max() < 0.01 and len(set(j)) == len(j)  # arcsec
    np.testing.assert_array_equal(np.asarray(a["flags"]), np.asarray(b["flags"])[j])
    for col in ("i_gmmFlux", "i_templateFlux"):
        fa, fb, err = np.asarray(a[col]), np.asarray(b[col])[j], np.asarray(a[col + "Err"])
        assert np.all(np.abs(fb - fa) < 0.05 * err), (col, fa, fb, err)


def test_a_psf_the_model_cannot_match_flags_every_row(shared_data, tmp_path, capsys):
    """A PSF broader than the model's by more than 10% cannot be matched: the catalog is still made, and
    every row says so (PSF_BROADER) beside the printed warning; the PSF as downloaded flags none."""
    from scipy import ndimage

    from galgan_ray.flags import flag_bit

    img, psf = _qso_scene(shared_data)
    with fits.open(psf) as h:
        h[0].data = ndimage.gaussian_filter(h[0].data.astype(float), 3.0)  # ~1.4" instead of ~0.6"
        h.writeto(tmp_path / "broad_psf.fits")
    assert main(["deblend", img, "--psf", str(tmp_path / "broad_psf.fits"), "--out", str(tmp_path / "b.parquet")]) == 0
    assert "broader than the model's" in capsys.readouterr().out
    flags = pq.read_table(tmp_path / "b.parquet")["flags"].to_numpy()
    assert len(flags) > 0 and np.all(flags & flag_bit("PSF_BROADER"))
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "a.parquet")]) == 0
    assert not np.any(pq.read_table(tmp_path / "a.parquet")["flags"].to_numpy() & flag_bit("PSF_BROADER"))


def test_galgan_enhance_recentres_an_off_centre_psf_as_deblend_does(shared_data, tmp_path):
    """`galgan enhance` checks its PSF as `galgan deblend` does: moved off its centre by whole pixels, it
    gives the same enhanced image (before: taken as it was, the output shifted and differed by 19% of its peak)."""
    img, psf = _qso_scene(shared_data)
    _off_centre(psf, str(tmp_path / "psf_off.fits"))
    assert main(["enhance", img, "--psf", psf, "--out", str(tmp_path / "a.fits")]) == 0
    assert main(["enhance", img, "--psf", str(tmp_path / "psf_off.fits"), "--out", str(tmp_path / "b.fits")]) == 0
    a, b = fits.getdata(tmp_path / "a.fits"), fits.getdata(tmp_path / "b.fits")
    assert np.abs(a - b).max() < 1e-4 * np.abs(a).max()


def test_deblend_writes_the_enhanced_image_gated_as_galgan_enhance_does(shared_data, tmp_path):
    """`galgan deblend --enhanced` writes the model's output where the LR pixels detect a source and the
    bicubic-upsampled data elsewhere (galgan_ray.support_map); `--no-support-gate` the output everywhere.
    The catalog is the same either way (the gate changes the image only)."""
    img, psf = _qso_scene(shared_data)
    g, r = tmp_path / "gated.fits", tmp_path / "raw.fits"
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "a.parquet"), "--enhanced", str(g)]) == 0
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "b.parquet"), "--enhanced", str(r),
                 "--no-support-gate"]) == 0
    with fits.open(g) as hg, fits.open(r) as hr:
        assert hg[0].header["GGSUPP"] is True and hr[0].header["GGSUPP"] is False
        assert 0 < hg[0].header["GGSUPFR"] < 1 and hg[0].header["GGSUPNR"] >= 1
        a, b = hg[0].data.astype(float), hr[0].data.astype(float)
    assert a.shape == b.shape
    peak = np.unravel_index(np.argmax(b), b.shape)  # the quasar: detected, so the model's output is kept
    assert a[peak] == pytest.approx(b[peak], rel=1e-6)
    assert np.abs(a - b).max() > 0  # somewhere the data detect nothing
    ta, tb = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert ta.num_rows == tb.num_rows
    np.testing.assert_array_equal(ta["flags"].to_numpy(), tb["flags"].to_numpy())


def test_counts_without_a_unit_are_refused_not_guessed(shared_data, tmp_path):
    img, _ = _qso_scene(shared_data)
    with fits.open(img) as h:
        del h[0].header["FLUXMAG0"]
        h.writeto(tmp_path / "nounit.fits")
    with pytest.raises(InputError, match="nounit.fits.*flux unit is unknown"):
        read_survey_image(str(tmp_path / "nounit.fits"))


def test_psf_checks_recentre_clip_and_refuse():
    yy, xx = np.mgrid[:25, :25]
    g = np.exp(-((xx - 13.5) ** 2 + (yy - 12.0) ** 2) / 8.0)  # 1.5 px off-centre in x
    g[0, 0] = -1e-3  # a slightly negative wing
    p = check_psf(g, source="psf.fits")
    c = (p * xx).sum() / p.sum()
    assert abs(c - 12.0) < 0.1 and p.min() >= 0 and p.sum() == pytest.approx(1.0)
    # an asymmetric PSF moved by whole pixels comes back exactly (no interpolation to broaden it)
    bump = 1 + 0.3 * np.exp(-((xx - 14) ** 2 + (yy - 12) ** 2) / 2.0)
    lop = np.exp(-((xx - 12) ** 2 + (yy - 12) ** 2) / 8.0) * bump
    ref = check_psf(lop, source="psf.fits")
    for shift in [(0, 2), (2, -1), (-3, 0)]:
        moved = check_psf(np.roll(lop, shift, axis=(0, 1)), source="psf.fits")
        np.testing.assert_allclose(moved, ref, atol=1e-5 * ref.max())
    far = np.exp(-((xx - 22.0) ** 2 + (yy - 12.0) ** 2) / 2.0)
    with pytest.raises(InputError, match="psf.fits.*off-centre"):
        check_psf(far, source="psf.fits")
    with pytest.raises(InputError, match="non-finite"):
        check_psf(np.full((5, 5), np.nan), source="psf.fits")


def _hsc_like_file(path, *, n=120, seed=0, band="HSC-I"):
    """A data-access-style cutout: empty primary with FLUXMAG0, unnamed image, mask (MP_* planes) and
    variance HDUs at 0.168"/px; a saturated blob and a bright-star mask region."""
    from galgan_ray.geometry import make_tan_wcs

    rng = np.random.default_rng(seed)
    yy, xx = np.indices((n, n))
    img = rng.normal(0, 0.02, (n, n)) + 50.0 * np.exp(-0.5 * ((xx - 60) ** 2 + (yy - 60) ** 2) / 2.0**2)
    mask = np.zeros((n, n), np.int32)
    mask[np.hypot(xx - 60, yy - 60) <= 2] |= 1 << 1  # SAT
    mask[(xx < 30) & (yy < 30)] |= 1 << 9  # BRIGHT_OBJECT
    mask[:, n - 5:] |= 1 << 8  # NO_DATA
    mask[::7, ::5] |= 1 << 3  # CR: informational only
    hdr = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.168, shape=(n, n)).to_header()
    mh = fits.Header()
    for name, bit in (("BAD", 0), ("SAT", 1), ("CR", 3), ("NO_DATA", 8), ("BRIGHT_OBJECT", 9)):
        mh[f"HIERARCH MP_{name}"] = bit  # as the HSC pipeline writes them
    prim = fits.PrimaryHDU()
    prim.header["FLUXMAG0"] = 10 ** (0.4 * 27.0)
    prim.header["FILTER"] = band
    fits.HDUList([prim, fits.ImageHDU(img.astype(np.float32), header=hdr), fits.ImageHDU(mask, header=mh),
                  fits.ImageHDU(np.full((n, n), 0.02**2, np.float32), header=hdr)]).writeto(path)
    return path


def test_mask_planes_become_pixel_flags_on_the_model_grid(tmp_path):
    from galgan_ray.checkpoint import ModelGrid
    from galgan_ray.flags import flag_bit
    from galgan_ray.instrument import get_band
    from galgan_ray.survey import to_model_tile

    si = read_survey_image(_hsc_like_file(str(tmp_path / "c.fits")))
    assert si.band == "HSC-I"
    sat, bo, nd = flag_bit("SATURATED"), flag_bit("BRIGHT_OBJECT"), flag_bit("NO_DATA")
    assert (si.pixel_flags[60, 60] & sat) and si.bad[60, 60]
    assert (si.pixel_flags[10, 10] & bo) and not si.bad[10, 10]  # bright-star mask: flagged, still usable
    assert (si.pixel_flags[50, -1] & nd) and si.bad[50, -1]
    assert not si.pixel_flags[7 * 10, 5 * 3] and not si.bad[7 * 10, 5 * 3]  # CR on a coadd: nothing
    grid = ModelGrid(high=(get_band("hst", "F775W"),), low=(get_band("hsc", "i"),))
    tile, _ = to_model_tile(si, model=grid)  # no enhancer needed: the field job's readers hold none
    assert tile.pixel_scale_arcsec == pytest.approx(0.18, rel=1e-3) and tile.bands == grid.band_keys_low
    ra, dec = si.wcs.pixel_to_world_values([60.0, 10.0, 119.0], [60.0, 10.0, 50.0])
    x, y = tile.wcs.world_to_pixel_values(ra, dec)
    at = tile.pixel_flags[np.rint(y).astype(int), np.rint(x).astype(int)]
    assert at[0] & sat and at[1] & bo and at[2] & nd
    assert tile.mask[0][round(y[0]), round(x[0])] and not tile.mask[0][round(y[1]), round(x[1])]
    # two bands of one patch: one tile of two planes on one grid
    si2 = read_survey_image(_hsc_like_file(str(tmp_path / "r.fits"), seed=1, band="HSC-R"))
    grid2 = ModelGrid(high=grid.high * 2, low=(get_band("hsc", "i"), get_band("hsc", "r")))
    t2, info2 = to_model_tile([si, si2], model=grid2)
    assert t2.image.shape[0] == 2 and t2.shape == tile.shape and len(info2["bands"]) == 2
    # detected on the input's own pixels, the bands of one grid coadded: the one source, once, in both,
    # on the unmasked rim of its saturated core (within ~0.5"; two grids: tests/test_support_added.py)
    bx, by = tile.wcs.world_to_pixel_values(*si.wcs.pixel_to_world_values(60.0, 60.0))
    for t in (tile, t2):
        assert t.detections.shape == (1, 2) and np.hypot(*(t.detections[0] - [bx, by])) < 3.0
    with pytest.raises(InputError, match="c.fits: one image holds one band; the model takes 2"):
        to_model_tile(si, model=grid2)


def test_a_saturated_quasar_is_one_star_row(shared_data, tmp_path):
    """Scene 20 of the real QSO fields: the quasar saturates the i-band coadd (SAT plane). It is one row
    flagged STAR and SATURATED at its centre (before: no row there, and children on the rim of the
    masked core 1.4-1.5" away)."""
    from galgan_ray.flags import flag_bit

    img, psf = _qso_scene_id(shared_data, "20")
    assert main(["deblend", img, "--psf", psf, "--out", str(tmp_path / "q.parquet")]) == 0
    t = pq.read_table(tmp_path / "q.parquet")
    si = read_survey_image(img, psf=psf)
    sy, sx = np.nonzero(si.pixel_flags & flag_bit("SATURATED"))
    x, y, flags = t["x"].to_numpy(), t["y"].to_numpy(), t["flags"].to_numpy()
    d = np.hypot(x - sx.mean(), y - sy.mean())
    near = d < 7.0  # 1.2" in the cutout's pixels
    assert near.sum() == 1 and d[near][0] < 1.5
    assert flags[near][0] & flag_bit("STAR") and flags[near][0] & flag_bit("SATURATED")
    assert np.sum((flags & flag_bit("STAR")) != 0) == 1 and t.num_rows >= 5
