"""Bad input, systematically: every kind of malformed input a survey run meets, one case each.

Two layers:

1. Unit (no Ray): each bad input goes to the function a user calls -- the tile reader and the model
   check (:func:`read_tile_source` + :func:`check_tile`), ``galgan enhance``, the checkpoint
   loader, the config loader, the shard reader -- and must raise the project's error
   (:class:`InputError` or a subclass) whose message starts with the file/URL/key and names the
   problem.
2. Field (one Ray run for the module): a small field of good tiles plus one bad tile of every
   tile-level kind. Every bad tile becomes exactly one row of the failures table naming its problem,
   every good tile is committed with its sources, and committed + failed = inputs (nothing is
   dropped silently).

Decisions recorded here:

- An **all-zero** tile (or band) is an error, not an empty catalog: a real exposure has noise, so
  zeros mean an unfilled or missing exposure. ``galgan enhance`` refuses an all-zero image too.
- **NaN/Inf** pixels are fine where the tile's MASK flags them (the good FITS tile below has both);
  unmasked they are an error. ``galgan enhance`` takes images with NaN borders (coadds have them):
  they count as 0, and only an image with no finite pixel is refused.
- A **wrong pixel scale** for the model fails a tile (the field does not resample tiles); ``galgan
  enhance`` resamples any scale within :data:`~galgan_ray.enhance.PIXEL_SCALE_MAX_RATIO` of the
  model's and refuses the rest (a WCS in the wrong units).
- An **unreadable URL** or a **truncated Parquet file** in the input list is kept by
  :func:`list_tile_sources` and becomes a failure row; it does not stop the listing.
- A **tampered checkpoint** or a config with an **unknown key** stops a job before any tile is
  read (they concern the whole run, so there is no tile to fail).
- A **survey patch** (HSC cutouts as delivered, grouped by the naming rule of
  :func:`galgan_ray.tiles.group_survey_files`) that is truncated, has no PSF, lacks the model's band,
  has counts of unknown unit or a corrupt PSF file is a failure row of the read stage naming the file
  (:func:`galgan_ray.ray_shell.reading.read_tile_row`); the patches beside it are read.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from astropy.io import fits

from conftest import moto_s3
from galgan_ray.checkpoint import load_checkpoint
from galgan_ray.cli import main
from galgan_ray.config import apply_overrides, load_config
from galgan_ray.errors import CheckpointError, ConfigError, InputError
from galgan_ray.checkpoint import ModelGrid
from galgan_ray.field import FieldConfig, check_tile
from galgan_ray.geometry import make_tan_wcs
from galgan_ray.instrument import get_band
from galgan_ray.psf import draw_psf
from galgan_ray.shards import read_shards, write_shards
from galgan_ray.tiles import Tile, list_tile_sources, read_tile_source, tile_to_fits_bytes, write_tiles_parquet

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

HSC, HST = get_band("hsc", "i"), get_band("hst", "F775W")
MODEL = ModelGrid(high=(HST,), low=(HSC,))
SOURCES_XY = ((14, 15), (33, 20), (22, 34))  # 0-based (x, y) of the point sources of every good tile
FLUX_NJY = 3000.0  # peak ~50 sigma: found on any good tile
SIDE = 48
NO_BUCKET = "galgan-no-such-bucket"


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
def good_tile(tile_id: int, *, band=HSC, scale_arcsec: float | None = None) -> Tile:
    """A valid low-resolution (real-mode) tile: three PSF-shaped sources on white noise."""
    rng = np.random.default_rng(tile_id)
    psf = np.asarray(draw_psf(band.psf, pixel_scale_arcsec=band.pixel_scale_arcsec))
    h = psf.shape[0] // 2
    img = rng.normal(0.0, band.sky_sigma, (1, SIDE, SIDE))
    for x, y in SOURCES_XY:
        img[0, y - h:y + h + 1, x - h:x + h + 1] += FLUX_NJY * psf
    scale = scale_arcsec or band.pixel_scale_arcsec
    wcs = make_tan_wcs(150.0 + 0.01 * (tile_id % 50), 2.0, pixel_scale_arcsec=scale, shape=(SIDE, SIDE))
    return Tile(tile_id=tile_id, source="", image=img.astype(np.float32),
                variance=np.full((1, SIDE, SIDE), band.sky_sigma**2, np.float32),
                mask=np.zeros((1, SIDE, SIDE), np.int32), psf=psf[None],
                wcs_header=wcs.to_header(relax=True).tostring(), bands=(band.key,),
                inner=(-0.5, SIDE - 0.5, -0.5, SIDE - 0.5))


def write_fits(path: Path, tile: Tile, edit: Callable | None = None) -> str:
    """Write ``tile`` as a tile FITS file after ``edit(hdul)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with fits.open(io.BytesIO(tile_to_fits_bytes(tile))) as hdul:
        if edit is not None:
            edit(hdul)
        hdul.writeto(path)
    return str(path)


def write_good_fits(path: Path, tile_id: int) -> str:
    """A good tile with a NaN and an Inf in *masked* pixels (allowed)."""
    def edit(h):
        h["IMAGE"].data[0, 40, 40], h["IMAGE"].data[0, 5, 42] = np.nan, np.inf
        h["MASK"].data[0, 40, 40] = h["MASK"].data[0, 5, 42] = 1
    return write_fits(path, good_tile(tile_id), edit)


@dataclass(frozen=True)
class Bad:
    """One bad input: how the field lists it, the phrase its message must hold, where the field stops it."""

    source: str
    problem: str
    stage: str = "read"
    listed_as_is: bool = False  # list_tile_sources keeps it verbatim (it cannot be opened)


@dataclass(frozen=True)
class Ctx:
    root: Path  # directory of the field's tile files
    elsewhere: Path  # a directory that is not an input
    s3_endpoint: str | None


def _bad_fits(name: str, tile_id: int, problem: str, *, stage: str = "read", edit=None, tile_fn=None, **tile_kw):
    """A tile FITS file made from a good tile (``good_tile(tile_id, **tile_kw)``, then ``tile_fn``) and
    spoilt by ``edit(hdul)``."""
    def make(ctx: Ctx) -> Bad:
        tile = good_tile(tile_id, **tile_kw)
        if tile_fn is not None:
            tile = tile_fn(tile)
        return Bad(write_fits(ctx.root / f"{name}.fits", tile, edit), problem, stage)
    return make


def _truncated_fits(ctx: Ctx) -> Bad:
    data = tile_to_fits_bytes(good_tile(201))
    path = ctx.root / "truncated.fits"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 3])
    return Bad(str(path), "truncated")


def _nan(h):
    h["IMAGE"].data[0, 20, 20] = np.nan


def _inf(h):
    h["IMAGE"].data[0, 7, 30] = -np.inf


def _no_wcs(h):
    for k in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CD1_1", "CD1_2", "CD2_1", "CD2_2", "PC1_1", "PC1_2", "PC2_1",
              "PC2_2", "CDELT1", "CDELT2", "CUNIT1", "CUNIT2", "RADESYS", "LONPOLE", "LATPOLE"):
        h["IMAGE"].header.remove(k, ignore_missing=True)


def _nan_psf(h):
    c = h["PSF"].data.shape[-1] // 2
    h["PSF"].data[0, c, c + 1] = np.nan


def _bad_variance(h):
    h["VARIANCE"].data[0, 5, 5] = 0.0
    h["VARIANCE"].data[0, 6, 9] = -4.0


def _two_bands(t: Tile) -> Tile:
    return dataclasses.replace(t, image=np.concatenate([t.image, t.image]), variance=np.concatenate([t.variance] * 2),
                               mask=np.concatenate([t.mask] * 2), bands=("hsc/g", "hsc/i"), _wcs=None)


def _nan_parquet_row(ctx: Ctx) -> Bad:
    """Row 1 of a Parquet file is bad; row 0 is the good tile 101 (a bad row spoils no neighbour)."""
    bad = good_tile(212)
    bad.image[0, 11, 30] = np.nan
    url = write_tiles_parquet([good_tile(101), bad], str(ctx.root / "rows.parquet"))
    return Bad(f"{url}#row=1", "non-finite")


def _truncated_parquet(ctx: Ctx) -> Bad:
    path = ctx.root / "truncated.parquet"
    write_tiles_parquet([good_tile(213), good_tile(214)], str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Bad(str(path), "not a readable Parquet file (truncated", listed_as_is=True)


def _missing_file(ctx: Ctx) -> Bad:
    return Bad(str(ctx.elsewhere / "missing.fits"), "no such file", listed_as_is=True)


def _unknown_protocol(ctx: Ctx) -> Bad:
    return Bad("nonexistentproto://survey/tile_000215.fits", "unknown protocol 'nonexistentproto'", listed_as_is=True)


def _s3_bad_bucket(ctx: Ctx) -> Bad:
    if ctx.s3_endpoint is None:
        pytest.skip("moto/s3fs not installed")
    return Bad(f"s3://{NO_BUCKET}/tile_000216.fits", "bucket does not exist", listed_as_is=True)


#: Tile-level kinds: each writes one bad input (under ``ctx.root`` when it is a file).
TILE_KINDS: dict[str, Callable[[Ctx], Bad]] = {
    "truncated_fits": _truncated_fits,
    "nan_pixels": _bad_fits("nan", 202, "non-finite (NaN/inf) unmasked pixel", edit=_nan),
    "inf_pixels": _bad_fits("inf", 203, "non-finite (NaN/inf) unmasked pixel", edit=_inf),
    "nan_pixels_parquet_row": _nan_parquet_row,
    "all_zero": _bad_fits("zero", 204, "all pixels are zero",
                          tile_fn=lambda t: dataclasses.replace(t, image=np.zeros_like(t.image))),
    "missing_wcs": _bad_fits("nowcs", 205, "no celestial WCS", edit=_no_wcs),
    "wrong_pixel_scale": _bad_fits("scale", 206, "wrong pixel scale for the model", stage="degrade",
                                   scale_arcsec=0.25),
    "missing_psf": _bad_fits("nopsf", 207, "no PSF extension", edit=lambda h: h.__delitem__("PSF")),
    "nonfinite_psf": _bad_fits("nanpsf", 208, "PSF has non-finite pixels", edit=_nan_psf),
    "wrong_band_count": _bad_fits("twoband", 209, "wrong band count", stage="degrade", tile_fn=_two_bands),
    "band_keyword_mismatch": _bad_fits("bandskey", 210, "BANDS lists 2 band(s)",
                                       edit=lambda h: h[0].header.set("BANDS", "hsc/g,hsc/i")),
    "other_band_than_checkpoint": _bad_fits("rband", 211, "differ from the model's low-resolution bands",
                                            stage="degrade", band=get_band("hsc", "r")),
    "variance_le_0": _bad_fits("variance", 217, "variance <= 0", edit=_bad_variance),
    "truncated_parquet": _truncated_parquet,
    "unreadable_url_missing_file": _missing_file,
    "unreadable_url_unknown_protocol": _unknown_protocol,
    "unreadable_url_s3_bad_bucket": _s3_bad_bucket,
}


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server (moto) on loopback with credentials in the environment (before Ray starts, so
    its workers inherit them); None when moto or s3fs is missing."""
    try:
        import moto.server  # noqa: F401
        import s3fs  # noqa: F401
    except ImportError:
        yield None
        return
    with moto_s3() as url:
        yield url


def _storage_options(url: str, endpoint: str | None) -> dict:
    return {"endpoint_url": endpoint} if url.startswith("s3://") and endpoint else {}


# ------------------------------------------------------------------------------------------------
# 1. Unit layer: tiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(TILE_KINDS))
def test_bad_tile_error_names_the_input_and_the_problem(kind, tmp_path, s3_endpoint):
    """What the field does per tile, without Ray: read and validate the source, then check it suits the model."""
    bad = TILE_KINDS[kind](Ctx(tmp_path / "tiles", tmp_path / "elsewhere", s3_endpoint))
    opts = _storage_options(bad.source, s3_endpoint)
    if bad.listed_as_is:
        assert list_tile_sources([bad.source], storage_options=opts) == [bad.source]
    with pytest.raises(InputError) as info:
        check_tile(read_tile_source(bad.source, storage_options=opts), model=MODEL)
    msg = str(info.value)
    assert msg.startswith(bad.source + ": ") and bad.problem in msg, msg


# ------------------------------------------------------------------------------------------------
# 1b. Unit layer: survey files as delivered (patches of HSC cutouts and PSF files)
# ------------------------------------------------------------------------------------------------
def _survey_cutout(path: Path, *, band: str = "i", fluxmag0: bool = True, n: int = 90, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    prim = fits.PrimaryHDU()
    if fluxmag0:
        prim.header["FLUXMAG0"] = 10 ** (0.4 * 27.0)
    prim.header["FILTER"] = band
    hdr = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.168, shape=(n, n)).to_header()
    yy, xx = np.indices((n, n))
    img = rng.normal(0, 0.05, (n, n)) + 20.0 * np.exp(-0.5 * ((xx - 45) ** 2 + (yy - 40) ** 2) / 1.6**2)
    fits.HDUList([prim, fits.ImageHDU(img.astype(np.float32), header=hdr), fits.ImageHDU(np.zeros((n, n), np.int32)),
                  fits.ImageHDU(np.full((n, n), 0.05**2, np.float32))]).writeto(path)
    return path


def _survey_psf(path: Path) -> Path:
    yy, xx = np.indices((25, 25))
    fits.PrimaryHDU(np.exp(-0.5 * ((xx - 12) ** 2 + (yy - 12) ** 2) / 1.4**2)).writeto(path)
    return path


def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


SURVEY_KINDS: dict[str, tuple[Callable[[Path], None], str]] = {
    # kind: (what is done to a good patch obj_{i,g}.fits + obj_{i,g}_psf.fits, the problem reported)
    "truncated": (lambda d: _truncate(d / "obj_i.fits"), "obj_i.fits: is truncated"),
    "no-psf": (lambda d: (d / "obj_i_psf.fits").unlink(), "obj_i.fits: has no PSF"),
    "no-model-band": (lambda d: [(d / f"obj_i{s}.fits").unlink() for s in ("", "_psf")],
                      "the model takes band(s) ['i']; the patch has ['g']"),
    "no-unit": (lambda d: _survey_cutout(d / "obj_i.fits", fluxmag0=False) if (d / "obj_i.fits").unlink() is None
                else None, "obj_i.fits: the flux unit is unknown"),
    "corrupt-psf": (lambda d: (d / "obj_i_psf.fits").write_bytes(b"SIMPLE  = not a FITS file"),
                    "obj_i_psf.fits: cannot be read as FITS"),
    # CD in arcsec read as degrees: a model grid of millions of pixels a side (a MemoryError before)
    "wcs-units": (lambda d: _scale_cd(d / "obj_i.fits", 3600.0), "obj_i.fits: wrong pixel scale for the model"),
    "too-small": (lambda d: _survey_cutout(d / "obj_i.fits", n=12) if (d / "obj_i.fits").unlink() is None else None,
                  "obj_i.fits: is 12x12 px on the model's"),
    "psf-cube": (lambda d: fits.PrimaryHDU(np.ones((3, 25, 25))).writeto(d / "obj_i_psf.fits", overwrite=True),
                 "obj_i_psf.fits: holds no 2-D PSF image (its HDUs hold data of shapes [(3, 25, 25)])"),
}


def test_galgan_deblend_refuses_a_file_of_another_band_than_the_models(tmp_path, capsys):
    """A g image given to the i model: its fluxes would be written as i_*Flux. Refused, naming the file
    and both bands; a file whose band is not known (no FILTER, no band token) is taken as it is."""
    from galgan_ray.cli import main

    g = _survey_cutout(tmp_path / "obj.fits", band="HSC-G")
    psf = _survey_psf(tmp_path / "psf.fits")
    assert main(["deblend", str(g), "--psf", str(psf), "--out", str(tmp_path / "c.parquet")]) == 2
    err = capsys.readouterr().err
    assert "obj.fits: is band 'HSC-G' (g); the model takes 'hsc_udeep/i' (i)" in err and "Traceback" not in err
    unknown = _survey_cutout(tmp_path / "unknown.fits", band="")
    assert main(["deblend", str(unknown), "--psf", str(psf), "--out", str(tmp_path / "u.parquet")]) == 0


def _scale_cd(path: Path, factor: float) -> None:
    with fits.open(path) as h:
        hdr = h[1].header
        for key in [k for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2", "CDELT1", "CDELT2") if k in hdr]:
            hdr[key] = hdr[key] * factor
        h.writeto(path, overwrite=True)


@pytest.mark.parametrize("kind", list(SURVEY_KINDS))
def test_bad_survey_patch_is_a_read_failure_naming_the_file(kind, tmp_path):
    from galgan_ray.ray_shell.reading import read_tile_row
    from galgan_ray.storage import StorageConfig

    d = tmp_path / "cutouts"
    d.mkdir()
    for b in "ig":
        _survey_cutout(d / f"obj_{b}.fits", band=f"HSC-{b.upper()}")
        _survey_psf(d / f"obj_{b}_psf.fits")
    (good,) = list_tile_sources(str(d))
    assert read_tile_row(good, StorageConfig(), MODEL)["status"] == "ok"  # the control
    edit, problem = SURVEY_KINDS[kind]
    edit(d)
    (src,) = list_tile_sources(str(d))
    row = read_tile_row(src, StorageConfig(), MODEL)
    assert row["status"] == "failed" and row["stage"] == "read" and row["tileId"] > 0
    assert problem in row["reason"] and row["reason"].startswith(str(d)), row["reason"]


def test_good_tiles_pass_masked_nan_included(tmp_path):
    """The control: the good inputs of the field layer read and check cleanly."""
    tile = read_tile_source(write_good_fits(tmp_path / "good.fits", 100))
    assert check_tile(tile, model=MODEL) == "real" and tile.mask[0, 40, 40] != 0 and tile.image[0, 40, 40] == 0
    _nan_parquet_row(Ctx(tmp_path, tmp_path, None))
    row0 = read_tile_source(f"{tmp_path / 'rows.parquet'}#row=0")
    assert row0.tile_id == 101 and check_tile(row0, model=MODEL) == "real"


# ------------------------------------------------------------------------------------------------
# 1. Unit layer: `galgan enhance` (FITS image with WCS, optional PSF)
# ------------------------------------------------------------------------------------------------
SCALE_IN = 0.168


def _image_fits(path: Path, data: np.ndarray, *, scale: float = SCALE_IN, wcs: bool = True) -> str:
    hdr = make_tan_wcs(150.1, 2.2, pixel_scale_arcsec=scale, shape=data.shape[-2:]).to_header() if wcs else None
    fits.PrimaryHDU(data.astype(np.float32), header=hdr).writeto(path)
    return str(path)


def _noise(*planes: int) -> np.ndarray:
    return np.random.default_rng(0).normal(0.0, 1.0, (*planes, 40, 40))


def _enh_image(data: np.ndarray, problem: str, *extra: str, **kw):
    """A bad image: the message names the image file."""
    def make(d: Path, ckpt: str):
        image = _image_fits(d / "in.fits", data, **kw)
        return image, ["enhance", image, "--model", ckpt, *extra], problem
    return make


def _enh_truncated(d: Path, ckpt: str):
    image = _image_fits(d / "in.fits", _noise())
    data = Path(image).read_bytes()
    Path(image).write_bytes(data[: len(data) // 2])
    return image, ["enhance", image, "--model", ckpt], "truncated"


def _enh_truncated_after_the_image(d: Path, ckpt: str):
    """A download cut off after the image HDU (its mask and variance missing): refused as a whole, as
    `galgan deblend` refuses it, not enhanced from the one complete HDU."""
    image = str(d / "in.fits")
    hdr = make_tan_wcs(150.1, 2.2, pixel_scale_arcsec=SCALE_IN, shape=(40, 40)).to_header()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(_noise().astype(np.float32), header=hdr),
                  fits.ImageHDU(np.zeros((40, 40), np.float32)), fits.ImageHDU(np.ones((40, 40), np.float32))]
                 ).writeto(image)
    data = Path(image).read_bytes()
    Path(image).write_bytes(data[: len(data) - 4000])
    return image, ["enhance", image, "--model", ckpt], "truncated"


def _enh_another_band(d: Path, ckpt: str):
    """A g image given to an i model (its FILTER keyword says g): refused, as `galgan deblend` refuses it."""
    image = _image_fits(d / "in.fits", _noise())
    with fits.open(image, mode="update") as h:
        h[0].header["FILTER"] = "HSC-G"
    return image, ["enhance", image, "--model", ckpt], "is band 'HSC-G' (g)"


def _enh_psf(psf: Callable[[], np.ndarray] | None, problem: str):
    """A bad ``--psf`` file (None: it does not exist): the message names the PSF file."""
    def make(d: Path, ckpt: str):
        psf_path = str(d / "psf.fits")
        if psf is not None:
            fits.PrimaryHDU(psf()).writeto(psf_path)
        return psf_path, ["enhance", _image_fits(d / "in.fits", _noise()), "--psf", psf_path, "--model", ckpt], problem
    return make


def _nan_psf_image() -> np.ndarray:
    psf = np.array(draw_psf(HSC.psf, pixel_scale_arcsec=SCALE_IN))  # a copy: draw_psf caches
    psf[3, 4] = np.nan
    return psf


def _enh_missing_image(d: Path, ckpt: str):
    image = str(d / "nothing.fits")
    return image, ["enhance", image, "--model", ckpt], "no such file"


def _enh_sigma(d: Path, ckpt: str):
    return "sigma", ["enhance", _image_fits(d / "in.fits", _noise()), "--sigma", "0", "--model", ckpt], \
        "must be finite and > 0"


def _enh_tampered_model(d: Path, ckpt: str):
    model = str(d / "tampered.pt")
    _tamper(ckpt, Path(model))
    return model, ["enhance", _image_fits(d / "in.fits", _noise()), "--model", model], "SHA-256"


#: ``galgan enhance`` cases: ``make(dir, ckpt) -> (what the message must name, argv, problem)``.
ENHANCE_KINDS = {
    "truncated_fits": _enh_truncated,
    "truncated_after_the_image": _enh_truncated_after_the_image,
    "another_band": _enh_another_band,
    "nan_pixels_everywhere": _enh_image(np.full((40, 40), np.nan), "no finite pixels"),
    "all_zero": _enh_image(np.zeros((40, 40)), "all pixels are zero"),
    "missing_wcs": _enh_image(_noise(), "no celestial WCS", wcs=False),
    # arcsec per pixel written as degrees per pixel: 605"/px
    "wrong_pixel_scale": _enh_image(_noise(), "wrong pixel scale for the model", scale=SCALE_IN * 3600),
    "missing_psf": _enh_psf(None, "no such file"),
    "nonfinite_psf": _enh_psf(_nan_psf_image, "non-finite"),
    "wrong_band_count": _enh_image(_noise(3), "2 band(s) selected, the model", "--band-index", "0,2"),
    "cube_without_band_choice": _enh_image(_noise(4), "choose plane(s) with --band-index"),
    "sigma_le_0": _enh_sigma,
    "unreadable_image_path": _enh_missing_image,
    "checkpoint_tampered": _enh_tampered_model,
}


@pytest.mark.parametrize("kind", list(ENHANCE_KINDS))
def test_galgan_enhance_error_names_the_input_and_the_problem(kind, ckpt, tmp_path, capsys):
    named, argv, problem = ENHANCE_KINDS[kind](tmp_path, ckpt)
    out = tmp_path / "out.fits"
    assert main([*argv, "--out", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"galgan enhance: error: {named}: " in err and problem in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# 1. Unit layer: checkpoints, configs, shards
# ------------------------------------------------------------------------------------------------
def _tamper(src: str, dst: Path) -> None:
    """Copy a checkpoint with one weight changed and the stored hash left as it was."""
    payload = torch.load(src, weights_only=True)
    name = next(iter(payload["generator"]))
    payload["generator"][name] = payload["generator"][name] + 1e-3
    torch.save(payload, dst)


def test_checkpoint_for_another_band_is_refused(ckpt):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt, expect_bands={"low": ["hsc/r"]}, device="cpu")
    msg = str(info.value)
    assert msg.startswith(ckpt + ": ") and "made for low-resolution bands ['hsc/i'], expected ['hsc/r']" in msg, msg


@pytest.mark.parametrize("how", ["load_checkpoint", "Enhancer", "field_job"])
def test_tampered_checkpoint_is_refused(how, ckpt, tmp_path):
    from galgan_ray.enhance import Enhancer

    bad = tmp_path / "tampered.pt"
    _tamper(ckpt, bad)
    with pytest.raises(CheckpointError) as info:
        if how == "load_checkpoint":
            load_checkpoint(str(bad), device="cpu")
        elif how == "Enhancer":
            Enhancer(str(bad), device="cpu")
        else:  # the job stops before any tile is read (and before Ray starts)
            pytest.importorskip("ray")
            from galgan_ray.ray_shell.job import FieldJobConfig, run_field

            run_field(FieldJobConfig(inputs=(str(tmp_path),), output=str(tmp_path / "out"), checkpoint=str(bad)),
                      verbose=False)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: ") and "SHA-256" in msg and "modified or corrupted" in msg, msg


def test_truncated_checkpoint_is_refused(ckpt, tmp_path):
    bad = tmp_path / "truncated.pt"
    data = Path(ckpt).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(bad), device="cpu")
    assert str(info.value).startswith(f"{bad}: ") and "not a loadable weights-only checkpoint" in str(info.value)


@pytest.mark.parametrize("how", ["yaml", "override"])
def test_config_with_an_unknown_key_is_refused(how, tmp_path):
    pytest.importorskip("ray")
    from galgan_ray.ray_shell.job import FieldJobConfig

    path = tmp_path / "field.yaml"
    path.write_text("output: out\nfield:\n  detect:\n    nsigmaa: 3\n" if how == "yaml" else "output: out\n")
    with pytest.raises(ConfigError) as info:
        if how == "yaml":
            load_config(FieldJobConfig, str(path))
        else:
            apply_overrides(load_config(FieldJobConfig, str(path)), ["field.detect.nsigmaa=3"])
    msg = str(info.value)
    named = str(path) if how == "yaml" else "--set field.detect.nsigmaa=3"
    assert msg.startswith(named) and "unknown key" in msg and "field.detect.nsigmaa" in msg, msg


def _truncated_shard(d: Path):
    url = write_shards({"x": np.arange(100.0), "img": np.ones((100, 2, 3), np.float32)}, str(d / "shards"))[0]
    data = Path(url).read_bytes()
    Path(url).write_bytes(data[: len(data) // 2])
    return str(d / "shards"), url, "not a readable Parquet file (truncated or corrupt?)"


#: Shard reading (training sets, catalogs): ``make(dir) -> (URL to read, what the message names, problem)``.
SHARD_KINDS = {
    "truncated_parquet_shard": _truncated_shard,
    "missing_directory": lambda d: (str(d / "nothing"), str(d / "nothing"), "no such file or directory"),
    "unreadable_url_unknown_protocol": lambda d: ("nonexistentproto://bucket/shards/",
                                                  "nonexistentproto://bucket/shards/", "unreadable URL"),
}


@pytest.mark.parametrize("kind", list(SHARD_KINDS))
def test_bad_shard_is_refused(kind, tmp_path):
    url, named, problem = SHARD_KINDS[kind](tmp_path)
    with pytest.raises(InputError) as info:
        read_shards(url)
    msg = str(info.value)
    assert msg.startswith(named + ": ") and problem in msg, msg


# ------------------------------------------------------------------------------------------------
# 2. Field layer: one Ray run over good tiles and every tile-level kind
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def field_run(tmp_path_factory, s3_endpoint, ckpt):
    ray = pytest.importorskip("ray")
    from galgan_ray.ray_shell.job import FieldJobConfig, run_field
    from galgan_ray.storage import StorageConfig

    root = tmp_path_factory.mktemp("bad_field")
    ctx = Ctx(root / "tiles", root / "elsewhere", s3_endpoint)
    good = {100: write_good_fits(ctx.root / "good_100.fits", 100)}
    bads = {}
    for kind, make in TILE_KINDS.items():
        try:
            bads[kind] = make(ctx)
        except pytest.skip.Exception:  # no S3 server: that one kind is left out
            continue
    good[101] = str(ctx.root / "rows.parquet") + "#row=0"  # written by nan_pixels_parquet_row
    inputs = (str(ctx.root),) + tuple(b.source for b in bads.values() if not b.source.startswith(str(ctx.root)))
    out = root / "out"
    config = FieldJobConfig(inputs=inputs, output=str(out), checkpoint=ckpt,
                            field=FieldConfig(noise_realizations=8), storage=StorageConfig(endpoint_url=s3_endpoint))
    ray.init(address="local", num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    try:
        summary = run_field(config, verbose=False)
    finally:
        ray.shutdown()
    return {"summary": summary, "out": out, "good": good, "bads": bads}


def _failures(run) -> dict[str, list[dict]]:
    from galgan_ray.outputs import read_run_table

    rows: dict[str, list[dict]] = {}
    for r in read_run_table(str(run["out"]), what="failures").to_pylist():
        rows.setdefault(r["source"], []).append(r)
    return rows


@pytest.mark.ray
@pytest.mark.parametrize("kind", list(TILE_KINDS))
def test_field_bad_tile_is_one_failure_row_naming_its_problem(kind, field_run):
    if kind not in field_run["bads"]:
        pytest.skip("moto/s3fs not installed")
    bad = field_run["bads"][kind]
    rows = _failures(field_run).get(bad.source, [])
    assert len(rows) == 1, f"{bad.source}: {len(rows)} failure rows"
    (row,) = rows
    assert row["reason"].startswith(bad.source + ": ") and bad.problem in row["reason"], row
    assert row["stage"] == bad.stage, row


@pytest.mark.ray
def test_field_good_tiles_are_committed_with_their_sources(field_run):
    from galgan_ray.outputs import read_run_table

    out = field_run["out"]
    cat = read_run_table(str(out)).to_pandas()
    for tile_id, source in field_run["good"].items():
        marker = out / "catalog" / f"tile={tile_id:06d}" / "_COMMITTED"
        assert json.loads(marker.read_text())["source"] == source
        mine = cat[cat["tileId"] == tile_id]
        for x, y in SOURCES_XY:
            d = np.hypot(mine["x"].to_numpy() - x, mine["y"].to_numpy() - y)
            assert len(d) and d.min() < 1.5, f"{source}: source at ({x}, {y}) not in the catalog"
    assert set(cat["tileId"]) == set(field_run["good"])


@pytest.mark.ray
def test_field_nothing_is_dropped(field_run):
    """committed + failed = inputs: every input is accounted for, once."""
    from galgan_ray.schema import failure_schema, validate_table
    from galgan_ray.outputs import read_run_table

    run, summary = field_run, field_run["summary"]
    n_inputs = len(run["good"]) + len(run["bads"])
    failures = _failures(run)
    committed = list((run["out"] / "catalog").glob("tile=*/_COMMITTED"))
    assert summary["tiles"] == {"total": n_inputs, "done": len(run["good"]), "failed": len(run["bads"]), "skipped": 0}
    assert len(committed) + sum(len(v) for v in failures.values()) == n_inputs
    assert set(failures) == {b.source for b in run["bads"].values()}
    validate_table(read_run_table(str(run["out"]), what="failures").replace_schema_metadata(None), failure_schema())
    assert sorted(f["source"] for f in summary["failures"]) == sorted(failures)
