"""End to end through the `galgan make-*` commands: sky -> cutouts -> blends, and real stamps from a
GalSim RealGalaxyCatalog directory the package has never seen."""
import shutil
from dataclasses import replace

import numpy as np
import pytest
from numpy.testing import assert_allclose

from galgan_ray.cli import main
from galgan_ray.dataset import (BandsConfig, DatasetConfig, build_galaxy_sets, clean_neighbours, make_blend_set,
                                make_sky_tiles, read_blend_set)
from galgan_ray.shards import read_shards


@pytest.fixture(scope="module")
def sky_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sky_run")
    assert main(["make-sky", "--out", str(root / "sky"), "--set", "sky_size_arcsec=30", "--set", "n_sky_tiles=2"]) == 0
    tiles = [str(root / "sky" / f"tile_00{k}") for k in range(2)]
    assert main(["make-cutouts", "--sky", *tiles, "--out", str(root / "cut")]) == 0
    assert main(["make-blends", "--cutouts", str(root / "cut" / "train"), "--out", str(root / "blends"),
                 "--figure", str(root / "blends.png"), "--set", "n_blends=12", "--set", "n_isolated=4"]) == 0
    return root


def test_commands_write_what_they_say(sky_run):
    train, meta = read_shards(str(sky_run / "cut" / "train"))
    test, _ = read_shards(str(sky_run / "cut" / "test"))
    assert train["image_hr"].shape[1:] == (1, 64, 64) and len(test["image_hr"]) > 0
    assert meta["bands"] == ["hst/F775W"] and "selection_counts" in meta and meta["version"]
    # declination split: every test galaxy is south of every training galaxy
    assert test["dec_center"].max() <= train["dec_center"].min() + 0.5 / 3600
    made = read_blend_set(str(sky_run / "blends"))
    bb, blends, sources = made["blend_batch"], made["blends"], made["sources"]
    assert bb["image_hr"].shape == (12, 1, 64, 64) and bb["image_lr"].shape == (12, 1, 22, 22)
    assert len(sources["blendId"]) == 24 and set(sources["blendId"]) == set(blends["blendId"])
    assert made["isolated_batch"]["image_lr"].shape == (4, 1, 22, 22)
    assert (sky_run / "blends.png").stat().st_size > 10_000


def test_blend_truth_is_where_the_flux_is(sky_run):
    """Noiseless blends of the cleaned galaxies: each component's centroid sits at its truth position."""
    train, _ = read_shards(str(sky_run / "cut" / "train"))
    train, _ = clean_neighbours(train)
    from galgan_ray.blends import BlendConfig, simulate_blends

    bands = BandsConfig()
    dc = bands.degrade_config(add_noise=False)
    batch, blends, sources = simulate_blends(train, config=BlendConfig(sep_scale_arcsec=0.8, max_sep_arcsec=1.2),
                                             degrade_config=dc, n_blends=6, seed=3, return_components=True)
    comps = batch["components_hr"][:, :, 0]
    yy, xx = np.mgrid[0:64, 0:64]
    err = []
    for row in range(len(sources["blendId"])):
        b, k = int(sources["blendId"][row]), int(sources["sourceIndex"][row])
        img = np.clip(comps[b, k], 0, None)
        # centroid of the bright core only (noise in the stamp pulls a plain centroid to the centre)
        core = img > 0.5 * img.max()
        cx, cy = (img * xx)[core].sum() / img[core].sum(), (img * yy)[core].sum() / img[core].sum()
        err.append(np.hypot(cx - sources["x_hr"][row], cy - sources["y_hr"][row]))
    # Real-looking galaxies (bulge + disk + knots) are not symmetric: the core centroid scatters
    # around the catalog position by a fraction of a pixel, rarely more.
    assert np.median(err) < 1.0 and np.percentile(err, 75) < 2.0, err


def test_reproducible_under_a_seed(tmp_path):
    cfg = DatasetConfig(sky_size_arcsec=24, seed=11)
    a = make_sky_tiles(cfg, tmp_path / "a")
    b = make_sky_tiles(cfg, tmp_path / "b")
    ga, _, _ = build_galaxy_sets(a, bands=cfg.bands, test_fraction=0.3)
    gb, _, _ = build_galaxy_sets(b, bands=cfg.bands, test_fraction=0.3)
    assert np.array_equal(ga["image_hr"], gb["image_hr"])
    ma = make_blend_set(ga, bands=cfg.bands, blends=cfg.blends, n_blends=5, n_isolated=2, seed=4)
    mb = make_blend_set(gb, bands=cfg.bands, blends=cfg.blends, n_blends=5, n_isolated=2, seed=4)
    assert np.array_equal(ma["blend_batch"]["image_lr"], mb["blend_batch"]["image_lr"])


def test_a_noise_free_sky_is_the_same_galaxies_without_the_noise(tmp_path):
    """add_noise=False draws the same galaxies: noisy minus noise-free is the sky noise alone."""
    from astropy.io import fits

    cfg = DatasetConfig(sky_size_arcsec=24, seed=11)
    noisy = make_sky_tiles(cfg, tmp_path / "noisy")[0]
    clean = make_sky_tiles(replace(cfg, add_noise=False), tmp_path / "clean")[0]
    band = cfg.bands.high_names[0]
    with fits.open(noisy[band]) as hn, fits.open(clean[band]) as hc:
        sigma = hn[0].header["SKYSIGMA"]
        assert sigma > 0 and hc[0].header["SKYSIGMA"] == 0.0
        resid = hn[0].data.astype(np.float64) - hc[0].data
        flux = hc[0].data.sum()
    assert abs(resid.mean()) < 5 * sigma / np.sqrt(resid.size)
    assert_allclose(resid.std(), sigma, rtol=0.02)
    assert flux > 100 * sigma  # the noise-free image holds the galaxies
    with fits.open(noisy["catalog"]) as cn, fits.open(clean["catalog"]) as cc:
        assert np.array_equal(cn[1].data["X_PIX"], cc[1].data["X_PIX"])


def test_neighbours_are_replaced_by_noise():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    img = 200 * np.exp(-((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / 8) + 300 * np.exp(-((xx - 10) ** 2 + (yy - 50) ** 2) / 4)
    img = img + rng.normal(0, 1.0, img.shape)
    gs = {"image_hr": img[None, None].astype(np.float32), "sigma_hr": np.ones((1, 1), np.float32)}
    cleaned, n = clean_neighbours(gs)
    assert n[0] > 10
    assert cleaned["image_hr"][0, 0, 50, 10] < 5  # the neighbour is gone
    assert_allclose(cleaned["image_hr"][0, 0, 31, 31], img[31, 31], rtol=1e-6)  # the galaxy is kept


def test_bad_input_names_the_file(tmp_path, capsys):
    assert main(["make-blends", "--cutouts", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("n_blends: 3\nblendz: {}\n")
    assert main(["make-sky", "--out", str(tmp_path / "s"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "blendz" in capsys.readouterr().err


def test_make_blends_on_an_unseen_real_galaxy_directory(shared_data, tmp_path):
    """A new directory in GalSim RealGalaxyCatalog format (other file names, other galaxies) works unchanged."""
    from astropy.io import fits
    from astropy.table import Table

    src = shared_data / "hst_cosmos_f814w"
    cat = Table.read(src / "cosmos_f814w_catalog.fits")[10:22]
    new = tmp_path / "my_stamps"
    new.mkdir()
    with fits.open(src / "cosmos_f814w_images.fits") as gal, fits.open(src / "cosmos_f814w_PSF_images.fits") as psf:
        fits.HDUList([fits.PrimaryHDU(gal[int(h)].data) if i == 0 else fits.ImageHDU(gal[int(h)].data)
                      for i, h in enumerate(cat["GAL_HDU"])]).writeto(new / "stamps.fits")
        fits.HDUList([fits.PrimaryHDU(psf[int(h)].data) if i == 0 else fits.ImageHDU(psf[int(h)].data)
                      for i, h in enumerate(cat["PSF_HDU"])]).writeto(new / "psfs.fits")
    shutil.copy(src / cat["NOISE_FILENAME"][0], new / cat["NOISE_FILENAME"][0])
    cat["GAL_FILENAME"] = "stamps.fits"
    cat["PSF_FILENAME"] = "psfs.fits"
    cat["GAL_HDU"] = np.arange(len(cat))
    cat["PSF_HDU"] = np.arange(len(cat))
    cat.write(new / "my_catalog.fits")
    assert main(["make-blends", "--real-galaxies", str(new / "my_catalog.fits"), "--out", str(tmp_path / "b"),
                 "--figure", str(tmp_path / "b.png"), "--set", "n_blends=8", "--set", "n_isolated=2"]) == 0
    made = read_blend_set(str(tmp_path / "b"))
    assert made["blend_batch"]["image_lr"].shape == (8, 1, 22, 22)
    assert np.all(np.isfinite(made["blend_batch"]["image_hr"]))
