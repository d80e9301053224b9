"""`galgan deblend` and the survey-image reader: files as surveys deliver them, errors that name the file."""
from __future__ import annotations

import glob
import gzip
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from astropy.io import fits

from galgan_ray.cli import main
from galgan_ray.errors import InputError
from galgan_ray.survey import AB_NJY, check_psf, read_survey_image


def _qso_scene(shared_data, k=0):
    d = shared_data / "hsc_hst_qso_fields"
    img = sorted(glob.glob(str(d / "hsc" / "*-cutout-HSC-I-*.fits")))[k]
    sid = img.split("/")[-1].split("-")[0]
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
    assert "sources in" in capsys.readouterr().out
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
    flux = a["i_gmmFlux"].to_numpy()
    assert np.all((flux > 0) | ((flags & flag_bit("LOW_SNR")) != 0))  # a negative flux is never unflagged
    # positions are the input image's pixels
    with fits.open(img) as h:
        ny, nx = h[1].data.shape
    x, y = a["x"].to_numpy(), a["y"].to_numpy()
    assert np.all((x > -1) & (x < nx) & (y > -1) & (y < ny))


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
    far = np.exp(-((xx - 22.0) ** 2 + (yy - 12.0) ** 2) / 2.0)
    with pytest.raises(InputError, match="psf.fits.*off-centre"):
        check_psf(far, source="psf.fits")
    with pytest.raises(InputError, match="non-finite"):
        check_psf(np.full((5, 5), np.nan), source="psf.fits")
