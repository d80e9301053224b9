"""The field job on real survey files as delivered: ../shared/data/hsc_coadd_cutout (HSC g, r, i with PSFs)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from galgan_ray.outputs import read_run_table
from galgan_ray.ray_shell.job import FieldJobConfig, run_field
from galgan_ray.tiles import PATCH_TAG, list_tile_sources, parse_patch_source

pytestmark = [pytest.mark.ray, pytest.mark.realdata]


@pytest.fixture(scope="module")
def cutout_dir(shared_data) -> Path:
    d = shared_data / "hsc_coadd_cutout"
    if not d.is_dir():
        pytest.skip(f"the real HSC coadd cutout is not at {d} (../shared/data is absent on a fresh clone)")
    return d


@pytest.fixture(scope="module")
def run(cutout_dir, tmp_path_factory):
    """The field job on the cutout's folder, and beside it a broken patch (a truncated image, no PSF)."""
    from galgan_ray.enhance import model_available

    if not model_available("default"):
        pytest.skip("the shipped default model is not installed")
    inputs = tmp_path_factory.mktemp("inputs")
    for f in cutout_dir.iterdir():  # links, not copies
        (inputs / f.name).symlink_to(f)
    good = next(cutout_dir.glob("*_300x300_i.fits")).read_bytes()
    (inputs / "150.0,2.0_300x300_i.fits").write_bytes(good[: len(good) // 2])  # truncated, and no PSF
    out = tmp_path_factory.mktemp("out")
    ray.init(address="local", num_cpus=2, object_store_memory=250 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    try:
        summary = run_field(FieldJobConfig(inputs=(str(inputs),), output=str(out / "run")), verbose=False)
    finally:
        ray.shutdown()
    return {"inputs": inputs, "out": out / "run", "summary": summary}


def test_a_folder_of_cutouts_becomes_patches_of_bands_with_their_psfs(cutout_dir):
    (src,) = list_tile_sources(str(cutout_dir))
    key, files = parse_patch_source(src)
    assert key.endswith("149.2558,2.5652_300x300") and sorted(files) == ["g", "i", "r"]
    assert all(psf is not None and psf.endswith(f"_{b}_psf.fits") for b, (_, psf) in files.items())


def test_the_field_job_runs_the_real_cutout_and_reports_the_bad_patch(run, cutout_dir):
    s = run["summary"]
    assert s["tiles"]["done"] == 1 and s["tiles"]["failed"] == 1, s["tiles"]
    (fail,) = s["failures"]
    assert "150.0,2.0_300x300_i.fits: is truncated" in fail["reason"] and fail["stage"] == "read"
    cat = read_run_table(str(run["out"]), what="catalog").to_pandas()
    assert len(cat) >= 40 and cat["tileId"].nunique() == 1
    assert {"coord_ra", "coord_dec", "i_gmmFlux", "i_gmmFluxErr", "flags"} <= set(cat.columns)
    # positions in the input's WCS: on the cutout's sky, x and y in its pixels
    img = next(cutout_dir.glob("*_300x300_i.fits"))
    with fits.open(img) as h:
        wcs, (ny, nx) = WCS(h[1].header).celestial, h[1].data.shape
    x, y = wcs.world_to_pixel_values(cat["coord_ra"].to_numpy(), cat["coord_dec"].to_numpy())
    assert np.all((x > -0.5) & (x < nx - 0.5) & (y > -0.5) & (y < ny - 0.5))
    np.testing.assert_allclose(cat["x"], x, atol=1e-6)
    np.testing.assert_allclose(cat["y"], y, atol=1e-6)
    assert not np.any(cat["flags"] & (1 << 12))  # UNSUPPORTED children are left out


def test_the_field_job_gives_galgan_deblends_catalog(run, cutout_dir):
    """One code path: the job's catalog of the patch is `galgan deblend`'s of its i-band file."""
    from galgan_ray.commands.deblend import deblend_file

    img = next(cutout_dir.glob("*_300x300_i.fits"))
    psf = next(cutout_dir.glob("*_i_psf.fits"))
    cols, summary, _, _ = deblend_file(str(img), psf=str(psf))
    cat = read_run_table(str(run["out"]), what="catalog").to_pandas().sort_values("objectId")
    assert len(cat) == summary["rows"]
    order = np.argsort(cols["objectId"] & ((1 << 24) - 1))
    for name in ("coord_ra", "coord_dec", "x", "y", "i_gmmFlux", "flags"):
        np.testing.assert_allclose(cat[name].to_numpy(), np.asarray(cols[name])[order], rtol=1e-6, atol=1e-9)
    assert PATCH_TAG in run["summary"]["failures"][0]["source"]


@pytest.fixture(scope="module")
def gri_run(cutout_dir, tmp_path_factory):
    """The field job with a three-band (g, r, i) model on the same patch: the bands mapped by name."""
    from galgan_ray.checkpoint import save_checkpoint
    from galgan_ray.instrument import get_band
    from galgan_ray.models import SRGANConfig, build_generator

    cfg = SRGANConfig(in_channels=3, out_channels=3)  # untrained, skip=True: bicubic upsampling in each band
    ckpt = save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "gri.pt"),
                           generator_state=build_generator(cfg).state_dict(), model_cfg=cfg,
                           bands={"high": [get_band("hst", b) for b in ("F435W", "F606W", "F775W")],
                                  "low": [get_band("hsc_udeep", b) for b in ("g", "r", "i")]})
    out = tmp_path_factory.mktemp("out_gri") / "run"
    ray.init(address="local", num_cpus=2, object_store_memory=250 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    try:
        summary = run_field(FieldJobConfig(inputs=(str(cutout_dir),), output=str(out), checkpoint=ckpt), verbose=False)
    finally:
        ray.shutdown()
    return {"out": out, "summary": summary}


def test_a_multi_band_model_takes_the_patch_bands_by_name_through_the_same_job(gri_run, cutout_dir):
    """Several bands go the one-band way: a g, r, i model's catalog of the g, r, i patch has each band's
    fluxes, in nJy from each file's own FLUXMAG0, at positions in the input's WCS."""
    s = gri_run["summary"]
    assert s["tiles"]["done"] == 1 and s["tiles"]["failed"] == 0, s
    cat = read_run_table(str(gri_run["out"]), what="catalog").to_pandas()
    assert len(cat) >= 40
    for b in ("g", "r", "i"):
        assert {f"{b}_gmmFlux", f"{b}_gmmFluxErr"} <= set(cat.columns)
    ok = (cat["i_gmmFlux"] > 10 * cat["i_gmmFluxErr"]) & (cat["g_gmmFlux"] > 3 * cat["g_gmmFluxErr"])
    assert ok.sum() >= 10
    # colours of real galaxies: g, r, i fluxes of the same objects are of the same order, not 57x apart
    for b in ("g", "r"):
        ratio = np.median(cat.loc[ok, "i_gmmFlux"] / cat.loc[ok, f"{b}_gmmFlux"])
        assert 0.5 < ratio < 20, (b, ratio)
    img = next(cutout_dir.glob("*_300x300_i.fits"))
    with fits.open(img) as h:
        wcs = WCS(h[1].header).celestial
    x, y = wcs.world_to_pixel_values(cat["coord_ra"].to_numpy(), cat["coord_dec"].to_numpy())
    np.testing.assert_allclose(cat["x"], x, atol=1e-6)
    np.testing.assert_allclose(cat["y"], y, atol=1e-6)
