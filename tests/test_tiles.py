"""Tile FITS layout: round trips, validation errors that name the file and the problem, simulated fields."""
from __future__ import annotations

import io

import numpy as np
import pytest
from astropy.io import fits

from galgan_ray.errors import InputError
from galgan_ray.geometry import make_tan_wcs
from galgan_ray.sky import FieldSimConfig, make_simulated_field
from galgan_ray.tiles import (TRUTH_COLUMNS, Tile, list_tile_sources,
                              pack_tile, read_tile, read_tile_source, tile_to_fits_bytes, unpack_tile, write_tile,
                              write_tiles_parquet)

SRC = "mem://tiles/t.fits"


def small_tile(tile_id: int = 7, n: int = 40, with_truth: bool = True) -> Tile:
    rng = np.random.default_rng(tile_id)
    img = rng.normal(0, 2.0, (1, n, n)).astype(np.float32)
    psf = np.exp(-0.5 * ((np.arange(15) - 7)[:, None] ** 2 + (np.arange(15) - 7)[None] ** 2) / 2.0**2)
    w = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.18, shape=(n, n))
    truth = None
    if with_truth:
        truth = {c: np.arange(3).astype(float) for c in TRUTH_COLUMNS}
        truth["truthId"] = np.arange(3, dtype=np.int64)
        truth["is_star"] = np.array([True, False, False])
    return Tile(tile_id=tile_id, source="", image=img, variance=np.full_like(img, 4.0),
                mask=np.zeros(img.shape, np.int32), psf=(psf / psf.sum())[None], wcs_header=w.to_header().tostring(),
                bands=("hsc/i",), inner=(4.5, 34.5, 4.5, 34.5), tract_origin=(80, 0), truth=truth)


def fits_bytes(tile: Tile, edit=None) -> bytes:
    """The tile's FITS bytes after ``edit(hdul)``."""
    hdul = fits.open(io.BytesIO(tile_to_fits_bytes(tile)))
    if edit is not None:
        edit(hdul)
    buf = io.BytesIO()
    hdul.writeto(buf)
    return buf.getvalue()


def test_round_trip_keeps_arrays_geometry_and_truth():
    t = small_tile()
    back = read_tile(tile_to_fits_bytes(t), source=SRC)
    np.testing.assert_array_equal(back.image, t.image)
    np.testing.assert_allclose(back.variance, t.variance)
    np.testing.assert_allclose(back.psf, t.psf, rtol=1e-6)
    assert back.tile_id == 7 and back.bands == ("hsc/i",) and back.inner == t.inner
    assert back.tract_origin == (80, 0)
    assert back.pixel_scale_arcsec == pytest.approx(0.18)
    np.testing.assert_allclose(back.wcs.pixel_to_world_values(3.0, 5.0), t.wcs.pixel_to_world_values(3.0, 5.0),
                               rtol=0, atol=1e-10)
    assert set(back.truth) == set(TRUTH_COLUMNS)
    np.testing.assert_array_equal(back.truth["is_star"], [True, False, False])


def test_weight_extension_and_masked_nans_are_accepted():
    t = small_tile()

    def edit(h):
        h["VARIANCE"].name = "WEIGHT"
        h["WEIGHT"].data = 1.0 / h["WEIGHT"].data
        h["IMAGE"].data[0, 3, 3] = np.nan
        h["MASK"].data[0, 3, 3] = 1

    back = read_tile(fits_bytes(t, edit), source=SRC)
    np.testing.assert_allclose(back.variance[0, 0, 0], 4.0, rtol=1e-6)
    assert back.image[0, 3, 3] == 0 and np.isinf(back.variance[0, 3, 3])


def _delete(name):
    def edit(h):
        del h[name]
    return edit


def _set(ext, key, value):
    def edit(h):
        h[ext].header[key] = value
    return edit


def _nan(h):
    h["IMAGE"].data[0, 10, 10] = np.nan


def _zero_var(h):
    h["VARIANCE"].data[0, 2, 2] = 0.0


def _bad_shape(h):
    h["VARIANCE"].data = h["VARIANCE"].data[:, :-1]


def _no_wcs(h):
    for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2", "CD1_2", "CD2_1", "PC1_1", "PC2_2",
              "CDELT1", "CDELT2", "CUNIT1", "CUNIT2", "RADESYS"):
        h["IMAGE"].header.remove(k, ignore_missing=True)


@pytest.mark.parametrize("edit, problem", [
    (_delete("PSF"), "no PSF extension"),
    (_delete("IMAGE"), "no IMAGE extension"),
    (_delete("VARIANCE"), "no VARIANCE or WEIGHT"),
    (_no_wcs, "no celestial WCS"),
    (_nan, "non-finite"),
    (_zero_var, "variance <= 0"),
    (_bad_shape, "differs from IMAGE shape"),
    (_set(0, "BANDS", "hsc/g,hsc/i"), "BANDS lists 2 band(s)"),
    (_set(0, "TILEID", "abc"), "not an integer"),
], ids=["psf", "image", "variance", "wcs", "nan", "variance0", "shape", "bands", "tileid"])
def test_validation_errors_name_file_and_problem(edit, problem):
    with pytest.raises(InputError) as info:
        read_tile(fits_bytes(small_tile(), edit), source=SRC)
    msg = str(info.value)
    assert msg.startswith(SRC + ":") and problem in msg, msg


@pytest.mark.parametrize("data", [b"", b"SIMPLE  = this is not fits", "truncate"], ids=["empty", "garbage", "truncated"])
def test_corrupt_or_truncated_files_are_input_errors(data):
    if data == "truncate":
        full = tile_to_fits_bytes(small_tile())
        data = full[: len(full) // 2]
    with pytest.raises(InputError, match=r"^mem://tiles/t.fits: "):
        read_tile(data, source=SRC)


def test_missing_url_and_listing(tmp_path):
    write_tile(small_tile(1), str(tmp_path / "a" / "tile_1.fits"))
    write_tile(small_tile(2), str(tmp_path / "a" / "tile_2.fits"))
    srcs = list_tile_sources(str(tmp_path / "a"))
    assert [s.rsplit("/", 1)[1] for s in srcs] == ["tile_1.fits", "tile_2.fits"]
    missing = str(tmp_path / "nope.fits")
    assert list_tile_sources([missing]) == [missing]  # kept: becomes a failure row when read
    with pytest.raises(InputError, match="no such file"):
        read_tile_source(missing)
    with pytest.raises(InputError, match="matches no files"):
        list_tile_sources(str(tmp_path / "*.nothing"))


def test_parquet_tiles_and_packing(tmp_path):
    tiles = [small_tile(3), small_tile(4, with_truth=False)]
    url = str(tmp_path / "tiles.parquet")
    write_tiles_parquet(tiles, url)
    srcs = list_tile_sources(url)
    assert srcs == [f"{url}#row=0", f"{url}#row=1"]
    back = read_tile_source(srcs[1])
    assert back.tile_id == 4 and back.truth is None and back.source == srcs[1]
    np.testing.assert_array_equal(back.image, tiles[1].image)
    t, extra, info = unpack_tile(pack_tile(tiles[0], extra={"a": np.arange(3)}, info={"k": 1}))
    assert t.tile_id == 3 and info == {"k": 1} and extra["a"].tolist() == [0, 1, 2]


@pytest.fixture(scope="module")
def sim_field(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    cfg = FieldSimConfig(n_tiles_x=2, n_tiles_y=1, tile_inner_arcsec=9.0, border_arcsec=3.96, galaxy_density_arcmin2=200)
    info = make_simulated_field(cfg, str(out))
    return cfg, info, [read_tile_source(u) for u in info["tiles"]]


def test_simulated_tiles_overlap_exactly_and_own_each_source_once(sim_field):
    cfg, info, (a, b) = sim_field
    assert a.simulated and a.truth is not None and a.bands == ("hst/F775W",)
    inner = int(round(cfg.tile_inner_arcsec / 0.18)) * 3
    border = int(round(cfg.border_arcsec / 0.18)) * 3
    assert b.tract_origin[0] - a.tract_origin[0] == inner
    # The shared pixels are identical (one sky), and the inner regions meet without a gap.
    np.testing.assert_array_equal(a.image[:, :, inner:], b.image[:, :, : a.shape[1] - inner])
    assert a.inner[1] - inner == pytest.approx(b.inner[0])
    # Every catalogued source in the union of inner regions is owned by exactly one tile.
    ids_a = set(a.truth["truthId"][a.owns(a.truth["x"], a.truth["y"])])
    ids_b = set(b.truth["truthId"][b.owns(b.truth["x"], b.truth["y"])])
    assert not ids_a & ids_b
    assert len(ids_a | ids_b) == info["n_truth"] > 0
    assert a.image.shape[1] == inner + 2 * border


# ------------------------------------------------------------------------------------------------
# Survey files as delivered: the naming rule and the manifest
# ------------------------------------------------------------------------------------------------
def test_the_naming_rule_groups_bands_of_a_patch_with_their_psfs():
    from galgan_ray.tiles import group_survey_files, parse_patch_source

    d, p = "/data/hsc", "/data/hsc_psf"
    images = [(f"/data/c/149.25,2.56_300x300_{b}.fits", None) for b in "gri"]
    images += [(f"{d}/10-cutout-HSC-{b}-9813-pdr2_dud.fits", f"HSC-{b}") for b in "GI"]
    images += [(f"{d}/11-cutout-HSC-I-9813-pdr2_dud.fits", None)]
    psfs = [f"/data/c/149.25,2.56_{b}_psf.fits" for b in "gri"]
    psfs += [f"{p}/10-psf-calexp-pdr2_dud-HSC-{b}-9813-4,3-150.17976-2.11031.fits" for b in "GI"]
    psfs += [f"{p}/100-psf-calexp-pdr2_dud-HSC-I-9813-4,3-150.2-2.1.fits"]  # another object's: not 11's
    got = {parse_patch_source(s)[0]: parse_patch_source(s)[1] for s in group_survey_files(images, psfs)}
    assert set(got) == {"/data/c/149.25,2.56_300x300", f"{d}/10-cutout-9813-pdr2_dud", f"{d}/11-cutout-9813-pdr2_dud"}
    coadd = got["/data/c/149.25,2.56_300x300"]
    assert sorted(coadd) == ["g", "i", "r"]
    assert coadd["r"] == ("/data/c/149.25,2.56_300x300_r.fits", "/data/c/149.25,2.56_r_psf.fits")
    ten = got[f"{d}/10-cutout-9813-pdr2_dud"]
    assert sorted(ten) == ["g", "i"] and ten["i"][1] == f"{p}/10-psf-calexp-pdr2_dud-HSC-I-9813-4,3-150.17976-2.11031.fits"
    assert got[f"{d}/11-cutout-9813-pdr2_dud"]["i"][1] is None  # no PSF by the rule: a failure when read


def test_hscs_second_i_and_r_filters_are_named_as_i_and_r():
    """HSC-I2 and HSC-R2 (HSC's replacement i and r filters) pair with their PSFs and serve the model's
    i and r; before, the name held no band token and the file had no PSF by the rule."""
    from galgan_ray.tiles import group_survey_files, normalize_band, parse_patch_source

    assert [normalize_band(b) for b in ("HSC-I2", "hsc-r2", "HSC-I", "i", "NB0921")] == ["i", "r", "i", "i", "nb0921"]
    d, p = "/data/hsc", "/data/hsc_psf"
    images = [(f"{d}/12-cutout-HSC-{b}-9813-pdr2_dud.fits", None) for b in ("G", "R2", "I2")]
    psfs = [f"{p}/12-psf-calexp-pdr2_dud-HSC-{b}-9813-4,3-150.2-2.1.fits" for b in ("G", "R2", "I2")]
    (src,) = group_survey_files(images, psfs)
    bands = parse_patch_source(src)[1]
    assert sorted(bands) == ["g", "i", "r"]
    assert bands["i"] == (f"{d}/12-cutout-HSC-I2-9813-pdr2_dud.fits",
                          f"{p}/12-psf-calexp-pdr2_dud-HSC-I2-9813-4,3-150.2-2.1.fits")


def _survey_like(path, band="i", tileid=None):
    from astropy.io import fits

    from galgan_ray.geometry import make_tan_wcs

    prim = fits.PrimaryHDU()
    prim.header["FLUXMAG0"] = 10 ** 10.8
    prim.header["FILTER"] = band
    if tileid is not None:
        prim.header["TILEID"] = tileid
    hdr = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.168, shape=(40, 40)).to_header()
    fits.HDUList([prim, fits.ImageHDU(np.zeros((40, 40), np.float32), header=hdr)]).writeto(path)


def test_list_tile_sources_groups_survey_files_and_reads_a_manifest(tmp_path):
    from galgan_ray.tiles import PATCH_TAG, parse_patch_source

    d = tmp_path / "cut"
    d.mkdir()
    for b in "gi":
        _survey_like(d / f"obj7_{b}.fits", band=f"HSC-{b.upper()}")
        _survey_like(d / f"obj7_{b}_psf.fits")
    write_tile(small_tile(), str(d / "tile-3.fits"))  # one of the package's own tiles beside them
    srcs = list_tile_sources(str(d))
    patches = [s for s in srcs if PATCH_TAG in s]
    assert len(srcs) == 2 and len(patches) == 1 and str(d / "tile-3.fits") in srcs
    key, files = parse_patch_source(patches[0])
    assert key == str(d / "obj7") and files["g"] == (str(d / "obj7_g.fits"), str(d / "obj7_g_psf.fits"))
    man = tmp_path / "patches.csv"
    man.write_text("patch,band,image,psf\nA,HSC-I,cut/obj7_i.fits,cut/obj7_i_psf.fits\nA,g,cut/obj7_g.fits,\n")
    (src,) = list_tile_sources(str(man))
    key, files = parse_patch_source(src)
    assert key == str(tmp_path / "A") and files == {"i": (str(d / "obj7_i.fits"), str(d / "obj7_i_psf.fits")),
                                                    "g": (str(d / "obj7_g.fits"), None)}
    man.write_text("patch,band,image\nA,i,x.fits\nA,i,y.fits\n")
    with pytest.raises(InputError, match="patches.csv: row 2: patch 'A' lists band 'i' twice"):
        list_tile_sources(str(man))


def test_pixel_flags_and_the_input_wcs_travel_with_a_tile():
    t = small_tile(with_truth=False)
    pf = np.zeros(t.shape, np.int64)
    pf[3:6, 4:9] = 1 << 15
    t.pixel_flags = pf
    back = read_tile(tile_to_fits_bytes(t), source=SRC)
    np.testing.assert_array_equal(back.pixel_flags, pf)
    wcs_in = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.168, shape=(43, 43)).to_header().tostring()
    t.input_wcs_header = wcs_in
    u, _, _ = unpack_tile(pack_tile(t))
    np.testing.assert_array_equal(u.pixel_flags, pf)
    assert u.input_wcs_header == wcs_in
    x, _ = u.catalog_pixels([10.0, 20.0], [5.0, 30.0])  # the input's pixels: 0.18/0.168 finer, co-centred
    assert np.all(np.abs(x - 21.0 - (np.array([10.0, 20.0]) - 19.5) * 0.18 / 0.168) < 0.05)
    with pytest.raises(InputError, match="FLAGS shape"):
        read_tile(tile_to_fits_bytes(Tile(**{**t.__dict__, "pixel_flags": pf[:, :5], "_wcs": None})), source=SRC)
