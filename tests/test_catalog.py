import pickle

import numpy as np
import pytest
from astropy.table import Table
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.catalog import (CatalogColumns, SelectionConfig, read_catalog, select_galaxies,
                                split_by_dec)
from galgan_ray.config import from_dict, to_dict
from galgan_ray.errors import InputError


def _candels_table() -> Table:
    """Hand-made rows in the Guo et al. (2013) layout (fluxes in uJy, -99 = no data).

    F160W fluxes: 1 uJy = 23.90 mag; 0.1 uJy = 26.40 mag.
    """
    t = Table()
    t["ID"] = [1, 2, 3, 4, 5, 6, 7, 8]
    t["RA"] = [53.10, 53.11, 53.12, 53.13, 53.14, 53.15, 53.16, 53.17]
    t["DEC"] = [-27.90, -27.85, -27.80, -27.75, -27.70, -27.72, -27.88, -27.78]
    t["CLASS_STAR"] = [0.02, 0.10, 0.98, 0.03, 0.05, 0.50, 0.01, 0.96]
    t["FWHM_IMAGE"] = [4.0, 5.0, 2.0, 6.0, 3.0, 4.0, 5.0, 2.1]
    t["FLUX_RADIUS"] = [3.0, 4.0, 1.5, 5.0, 2.0, 3.0, 4.0, 1.6]
    #          keep  faint  star  z>5   keep  keep  missing  star+faint
    t["WFC3_F160W_FLUX"] = [1.0, 0.1, 2.0, 1.5, 3.0, 1.2, -99.0, 0.05]
    t["ACS_F775W_FLUX"] = [0.8, 0.05, 1.0, 0.1, 2.0, 1.0, 0.5, 0.04]
    t["ZBEST"] = [1.0, 0.5, 0.0, 5.5, 2.0, 4.9, 1.0, 0.0]
    return t


@pytest.fixture
def candels_fits(tmp_path):
    path = tmp_path / "goodss_like.fits"
    _candels_table().write(path)
    return path


def test_read_candels_layout(candels_fits):
    t = read_catalog(candels_fits)
    assert t.meta["bands"] == ("F775W", "F160W")
    for col in ("objectId", "ra", "dec", "class_star", "redshift", "fwhm_arcsec", "flux_radius_arcsec",
                "mag_F160W", "mag_F775W", "flux_njy_F160W"):
        assert col in t.colnames
    assert t["objectId"].dtype == np.int64
    assert_allclose(t["mag_F160W"][0], 23.9, atol=1e-3)  # 1 uJy
    assert_allclose(t["flux_njy_F160W"][0], 1000.0)
    assert np.isnan(t["mag_F160W"][6])  # -99 sentinel
    assert_allclose(t["fwhm_arcsec"][0], 4.0 * 0.06)
    assert_allclose(t["flux_radius_arcsec"][1], 4.0 * 0.06)


def test_read_csv_with_other_names(tmp_path):
    t = Table({"id": [7, 8], "ra_deg": [150.1, 150.2], "dec_deg": [2.1, 2.2], "i_mag": [22.0, 99.0]})
    path = tmp_path / "other.csv"
    t.write(path, format="ascii.csv")
    cols = CatalogColumns(id="id", ra="ra_deg", dec="dec_deg", class_star=None, redshift=None, fwhm=None,
                          flux_radius=None, band_columns={"i": "i_mag"}, flux_unit="mag")
    out = read_catalog(path, columns=cols)
    assert_array_equal(out["objectId"], [7, 8])
    assert_allclose(out["mag_i"][0], 22.0)
    assert np.isnan(out["mag_i"][1]) and np.isnan(out["redshift"]).all()


def test_missing_column_names_file_and_column(candels_fits):
    with pytest.raises(InputError) as err:
        read_catalog(candels_fits, columns=CatalogColumns(redshift="Photo_z"))
    assert str(candels_fits) in str(err.value) and "Photo_z" in str(err.value)
    with pytest.raises(InputError, match="WFC3_F125W_FLUX"):
        read_catalog(candels_fits, columns=CatalogColumns(bands=("F125W",)))
    with pytest.raises(InputError, match="not found"):
        read_catalog(candels_fits.with_name("nope.fits"))


def test_paper_cuts_remove_exactly_what_they_should(candels_fits):
    t = read_catalog(candels_fits)
    sel, counts = select_galaxies(t)
    # mag: rows 2 (26.4), 7 (missing), 8 (27.2) fail; star: row 3 (0.98); z: row 4 (5.5).
    assert counts == {"input": 8, "removed_mag": 3, "removed_class_star": 1, "removed_redshift": 1, "kept": 3}
    assert_array_equal(sel["objectId"], [1, 5, 6])
    assert sel.meta["selection_band"] == "F160W" and sel.meta["selection_notes"] == []
    assert sel.meta["selection_counts"] == counts


def test_fallback_band_is_recorded(tmp_path):
    t = _candels_table()
    t.remove_column("WFC3_F160W_FLUX")
    path = tmp_path / "sim.fits"
    t.write(path)
    sel, counts = select_galaxies(read_catalog(path))
    assert sel.meta["selection_band"] == "F775W"
    assert "mag_F160W absent" in sel.meta["selection_notes"][0]
    # F775W < 25 means > 0.363 uJy: rows 2 (0.05 uJy), 4 (0.1 uJy) and 8 (0.04 uJy) fail
    assert counts["removed_mag"] == 3
    with pytest.raises(InputError, match="mag_F160W"):
        select_galaxies(read_catalog(path), cuts=SelectionConfig(fallback_band=None))


def test_split_by_dec_is_disjoint_and_complete(candels_fits):
    t = read_catalog(candels_fits)
    split = split_by_dec(t)
    train, test, dec_split = split
    assert len(train) + len(test) == len(t)
    assert set(train["objectId"]).isdisjoint(test["objectId"])
    assert set(train["objectId"]) | set(test["objectId"]) == set(t["objectId"])
    assert np.all(test["dec"] < dec_split) and np.all(train["dec"] >= dec_split)
    assert len(test) == 2  # the southernmost 20% of 8 rows (Dec -27.90, -27.88)
    assert train.meta["dec_split_deg"] == dec_split and test.meta["split"] == "test"
    explicit = split_by_dec(t, dec_split_deg=-27.79)
    assert len(explicit.test) == 4 and explicit.dec_split_deg == -27.79


def test_configs_round_trip():
    cols = CatalogColumns(bands=("F160W",), flux_unit="nJy")
    assert pickle.loads(pickle.dumps(cols)) == cols
    assert from_dict(CatalogColumns, to_dict(cols)) == cols
    cuts = SelectionConfig(mag_max=24.0)
    assert from_dict(SelectionConfig, to_dict(cuts)) == cuts


def test_galgan_flags_decodes_values_and_lists_bits(capsys):
    from galgan_ray.cli import main
    from galgan_ray.flags import flag_bit

    value = flag_bit("BLENDED") | flag_bit("UNSUPPORTED")
    assert main(["flags", str(value), hex(flag_bit("EDGE"))]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{value}: BLENDED, UNSUPPORTED", "1: EDGE"]
    assert main(["flags"]) == 0 and "UNSUPPORTED" in capsys.readouterr().out
    assert main(["flags", "nope"]) == 2 and "is not an integer" in capsys.readouterr().err
