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
