"""Tests of galgan_ray.blends: placement truth, tables, reproducibility, isolated set, speed."""
from __future__ import annotations

import dataclasses
import pickle
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from galgan_ray.blends import BlendConfig, _place, simulate_blends, simulate_isolated
from galgan_ray.config import apply_overrides, from_dict, to_dict
from galgan_ray.degrade import DegradeConfig, Degrader
from galgan_ray.errors import ConfigError, InputError
from galgan_ray.flags import flag_bit
from galgan_ray.geometry import hr_to_lr_pixels, make_tan_wcs
from galgan_ray.instrument import get_band
from galgan_ray.psf import psf_profile

galsim = pytest.importorskip("galsim")

N_HR, N_LR, S_HR = 64, 22, 0.06
NOISELESS = DegradeConfig(add_noise=False)


def _make_set(n=16, *, seed=5, hlr_range=(0.06, 0.18), n_bands=1):
    """A galaxy set laid out like cutouts.py's: compact sheared exponentials, HST PSF, centred at 31.5."""
    rng = np.random.default_rng(seed)
    psf = psf_profile(get_band("hst", "F775W").psf)
    hlr = rng.uniform(*hlr_range, n)
    flux = 10 ** rng.uniform(3.0, 4.0, n)
    imgs = []
    for i in range(n):
        gal = galsim.Exponential(half_light_radius=hlr[i], flux=flux[i]).shear(
            q=rng.uniform(0.4, 1.0), beta=rng.uniform(0, 180) * galsim.degrees)
        # a little off-centre structure (a knot), so that rotations matter
        knot = galsim.Gaussian(sigma=0.03, flux=0.1 * flux[i]).shift(0.1, 0.05)
        imgs.append(galsim.Convolve(gal + knot, psf).drawImage(nx=N_HR, ny=N_HR, scale=S_HR).array)
    image = np.repeat(np.stack(imgs)[:, None], n_bands, axis=1).astype(np.float32)
    total = 1.1 * flux
    return {
        "image_hr": image,
        "objectId": np.arange(n, dtype=np.int64) + 1000,
        "ra_center": rng.uniform(53.0, 53.2, n),
        "dec_center": rng.uniform(-27.9, -27.7, n),
        "flux_njy": np.repeat(total[:, None], n_bands, axis=1).astype(np.float32),
        "mag": np.repeat((31.4 - 2.5 * np.log10(total))[:, None], n_bands, axis=1).astype(np.float32),
        "fwhm_arcsec": (2 * hlr).astype(np.float32),
        "flux_radius_arcsec": hlr.astype(np.float32),
        "redshift": rng.uniform(0.1, 3.0, n).astype(np.float32),
        "class_star": np.zeros(n, np.float32),
        "sigma_hr": np.full((n, n_bands), 2.0, np.float32),
        "flags": np.zeros(n, np.int32),
    }


@pytest.fixture(scope="module")
def gset():
    return _make_set()


def _centroid(img):
    yy, xx = np.mgrid[0:img.shape[-2], 0:img.shape[-1]]
    return (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()


# ------------------------------------------------------------------------------------------ placement
@pytest.mark.parametrize("rotation", ["quarter", "arbitrary", "none"])
def test_components_sit_at_truth_positions(gset, rotation):
    cfg = BlendConfig(rotation=rotation, max_sep_arcsec=1.2, seed=11)
    batch, blends, src = simulate_blends(gset, config=cfg, degrade_config=NOISELESS, n_blends=20, return_components=True)
    comps = batch["components_hr"]
    assert comps.shape == (20, 2, 1, N_HR, N_HR)
    assert_allclose(comps.sum(axis=1), batch["image_hr"], rtol=0, atol=1e-3)
    for row in range(len(src["blendId"])):
        img = comps[src["blendId"][row], src["sourceIndex"][row], 0]
        assert_allclose(_centroid(img), (src["x_hr"][row], src["y_hr"][row]), rtol=0, atol=0.3)
    # the components keep their flux (nothing falls off the cutout for these compact galaxies)
    assert_allclose(src["flux_stamp_njy"][:, 0], gset["image_hr"][src["galaxyIndex"], 0].sum(axis=(1, 2)), rtol=5e-3)


def test_place_quarter_and_arbitrary_paths_agree():
    img = np.zeros((1, N_HR, N_HR), np.float32)
    img[0, 30:34, 38:44] = 1.0  # a bar to the right (+x) of the centre
    fast = _place(img, angle_deg=90.0, dx=2.5, dy=-1.25, order=3)
    slow = _place(img, angle_deg=90.0 + 1e-6, dx=2.5, dy=-1.25, order=3)
    assert_allclose(fast, slow, rtol=0, atol=1e-5)
    # counter-clockwise with y up: +x goes to +y
    cx, cy = _centroid(_place(img, angle_deg=90.0, dx=0.0, dy=0.0, order=3)[0])
    assert_allclose((cx, cy), (31.5, 31.5 + 9.0), atol=0.05)


def test_lr_image_keeps_the_flux(gset):
    batch, _, src = simulate_blends(gset, degrade_config=NOISELESS, n_blends=10, seed=2)
    assert_allclose(batch["image_hr"].sum(axis=(1, 2, 3)),
                    np.bincount(src["blendId"], weights=src["flux_stamp_njy"][:, 0]), rtol=1e-4)
    assert_allclose(batch["image_lr"].sum(axis=(1, 2, 3)), batch["image_hr"].sum(axis=(1, 2, 3)), rtol=1e-2)
    assert_array_equal(batch["sigma_lr"], 0.0)


def test_noise_and_degradation_use_the_degrader(gset):
    cfg = DegradeConfig()
    batch, _, _ = simulate_blends(gset, degrade_config=cfg, n_blends=4, seed=3)
    noiseless = Degrader(cfg).noiseless(batch["image_hr"])
    resid = batch["image_lr"] - noiseless
    assert_allclose(batch["sigma_lr"], cfg.low[0].sky_sigma, rtol=1e-6)
    assert_allclose(resid.std(), cfg.low[0].sky_sigma, rtol=0.1)
    assert_allclose(batch["sigma_hr"], 2.0 * np.sqrt(2.0), rtol=1e-6)


# ------------------------------------------------------------------------------------------ tables
def test_tables_layout_and_truth(gset):
    batch, blends, src = simulate_blends(gset, n_blends=30, seed=4)
    assert batch["image_hr"].shape == (30, 1, N_HR, N_HR) and batch["image_hr"].dtype == np.float32
    assert batch["image_lr"].shape == (30, 1, N_LR, N_LR) and batch["image_lr"].dtype == np.float32
    for key in ("sigma_lr", "sigma_hr"):
        assert batch[key].shape == (30, 1)
    assert_array_equal(batch["blendId"], np.arange(30))
    assert set(blends) >= {"blendId", "n_sources", "ra_center", "dec_center", "sep_arcsec", "delta_mag", "flux_ratio",
                           "sum_fwhm_arcsec", "delta_z", "sep_over_size", "flags"}
    assert set(src) >= {"blendId", "sourceIndex", "x_hr", "y_hr", "x_lr", "y_lr", "ra", "dec", "mag", "flux_njy",
                        "fwhm_arcsec", "flux_radius_arcsec", "redshift"}
    assert all(len(v) == 30 for v in blends.values()) and all(len(v) == 60 for v in src.values())
    assert_array_equal(src["sourceIndex"], np.tile([0, 1], 30))
    # LR positions and sky positions follow geometry.py
    assert_allclose(np.stack([src["x_lr"], src["y_lr"]]),
                    np.stack(hr_to_lr_pixels(src["x_hr"], src["y_hr"], n_high=N_HR, n_low=N_LR, ratio=3.0)), atol=1e-9)
    for row in (0, 1, 17):
        b = src["blendId"][row]
        wcs = make_tan_wcs(blends["ra_center"][b], blends["dec_center"][b], pixel_scale_arcsec=S_HR, shape=(N_HR, N_HR))
        assert_allclose(wcs.wcs_world2pix(src["ra"][row], src["dec"][row], 0), (src["x_hr"][row], src["y_hr"][row]),
                        atol=1e-6)
    # the first galaxy is near the centre; catalog quantities are copied from the galaxy set
    first = src["sourceIndex"] == 0
    assert np.all(np.abs(src["x_hr"][first] - 31.5) <= 1.0 + 1e-9)
    gi = src["galaxyIndex"]
    assert_array_equal(src["objectId"], gset["objectId"][gi])
    assert_allclose(src["redshift"], gset["redshift"][gi])
    assert_allclose(blends["ra_center"], gset["ra_center"][gi[first]])
    # pair parameters
    xy = np.stack([src["x_hr"], src["y_hr"]], axis=1).reshape(30, 2, 2)
    assert_allclose(blends["sep_arcsec"], np.hypot(*(xy[:, 0] - xy[:, 1]).T) * S_HR, rtol=1e-5)
    assert np.all((blends["sep_arcsec"] >= 0.1 - 1e-6) & (blends["sep_arcsec"] <= 1.5 + 1e-6))
    assert np.all(blends["delta_mag"] >= 0)
    assert_allclose(blends["flux_ratio"], 10 ** (-0.4 * blends["delta_mag"]), rtol=1e-4)
    r = src["flux_radius_arcsec"].reshape(30, 2)
    assert_allclose(blends["sep_over_size"], blends["sep_arcsec"] / np.sqrt((r ** 2).sum(axis=1)), rtol=1e-5)
    assert_allclose(blends["sum_fwhm_arcsec"], src["fwhm_arcsec"].reshape(30, 2).sum(axis=1), rtol=1e-6)
    assert_allclose(blends["delta_z"], np.abs(np.diff(src["redshift"].reshape(30, 2), axis=1))[:, 0], rtol=1e-6)


def test_reproducible_and_independent_of_batching(gset):
    a = simulate_blends(gset, n_blends=8, seed=9)
    b = simulate_blends(gset, n_blends=8, seed=9)
    c = simulate_blends(gset, n_blends=3, seed=9, first_id=5)
    d = simulate_blends(gset, n_blends=8, seed=10)
    for key in ("image_hr", "image_lr"):
        assert_array_equal(a[0][key], b[0][key])  # the same call twice: bit-identical
        # Another batch size: the same blends up to float32 rounding of the batched degradation
        # (BLAS kernels sum in another order for another batch shape, e.g. OPENBLAS_CORETYPE=Haswell).
        scale = float(np.abs(a[0][key]).max())
        assert_allclose(a[0][key][5:], c[0][key], rtol=0, atol=1e-6 * scale)
    assert_array_equal(a[2]["x_hr"], b[2]["x_hr"])
    assert_array_equal(a[2]["x_hr"][10:], c[2]["x_hr"])
    assert not np.array_equal(a[0]["image_hr"], d[0]["image_hr"])
    # the config's seed is the default
    e = simulate_blends(gset, config=BlendConfig(seed=9), n_blends=8)
    assert_array_equal(a[0]["image_lr"], e[0]["image_lr"])


@pytest.mark.parametrize("dist", ["half_normal", "uniform"])
def test_separation_distributions(gset, dist):
    cfg = BlendConfig(separation=dist, sep_scale_arcsec=0.5, min_sep_arcsec=0.2, max_sep_arcsec=1.4)
    _, blends, _ = simulate_blends(gset, config=cfg, n_blends=300, seed=1)
    sep = blends["sep_arcsec"]
    assert np.all((sep >= 0.2 - 1e-6) & (sep <= 1.4 + 1e-6))
    if dist == "uniform":
        assert_allclose(sep.mean(), 0.8, atol=0.06)
    else:  # half-normal (sigma 0.5) truncated to [0.2, 1.4]
        from scipy.stats import truncnorm

        assert_allclose(sep.mean(), truncnorm(0.2 / 0.5, 1.4 / 0.5, scale=0.5).mean(), atol=0.05)


def test_three_galaxies_and_magnitude_limit(gset):
    cfg = BlendConfig(n_galaxies=3, max_delta_mag=1.0, max_sep_arcsec=1.2)
    batch, blends, src = simulate_blends(gset, config=cfg, degrade_config=NOISELESS, n_blends=12, seed=6,
                                         return_components=True)
    assert_array_equal(blends["n_sources"], 3)
    assert len(src["blendId"]) == 36
    mags = src["mag"][:, 0].reshape(12, 3)
    assert np.all(np.abs(mags - mags[:, :1]) <= 1.0 + 1e-6)
    assert np.all([len(set(g)) == 3 for g in src["galaxyIndex"].reshape(12, 3)])
    # the pair is the two brightest
    flux = src["flux_njy"][:, 0].reshape(12, 3)
    order = np.argsort(-flux, axis=1, kind="stable")
    assert_array_equal(blends["primary_index"], order[:, 0])
    assert_array_equal(blends["secondary_index"], order[:, 1])
    assert_allclose(batch["components_hr"].sum(axis=1), batch["image_hr"], atol=1e-3)


def test_magnitude_limit_that_cannot_be_met_raises():
    gs = _make_set(4)
    gs["mag"] = np.array([[18.0], [21.0], [24.0], [27.0]], np.float32)
    with pytest.raises(InputError, match="max_delta_mag"):
        simulate_blends(gs, config=BlendConfig(max_delta_mag=0.5), n_blends=1, seed=0)


def test_edge_flag_when_a_galaxy_leaves_the_cutout():
    gs = _make_set(4, hlr_range=(0.5, 0.6))
    cfg = BlendConfig(min_sep_arcsec=1.5, max_sep_arcsec=1.5, center_offset_arcsec=0.0)
    batch, blends, src = simulate_blends(gs, config=cfg, n_blends=6, seed=0)
    edge = flag_bit("EDGE")
    assert np.all(src["flags"][src["sourceIndex"] == 1] & edge)
    assert np.all(blends["flags"] & edge) and np.all(batch["flags"] & edge)
    assert np.all(src["flux_stamp_njy"][src["sourceIndex"] == 1, 0] < src["flux_njy"][src["sourceIndex"] == 1, 0])


def test_isolated_set_has_the_same_layout(gset):
    batch_b, blends_b, src_b = simulate_blends(gset, n_blends=3, seed=1)
    batch, blends, src = simulate_isolated(gset, n=5, seed=1)
    assert set(batch) == set(batch_b) and set(blends) == set(blends_b) and set(src) == set(src_b)
    assert batch["image_hr"].shape == (5, 1, N_HR, N_HR) and batch["image_lr"].shape == (5, 1, N_LR, N_LR)
    assert_array_equal(blends["n_sources"], 1)
    assert_array_equal(blends["secondary_index"], -1)
    assert np.all(np.isnan(blends["sep_arcsec"]))
    assert len(src["blendId"]) == 5 and np.all(np.abs(src["x_hr"] - 31.5) <= 1.0 + 1e-9)
    again = simulate_isolated(gset, n=5, seed=1)
    assert_array_equal(batch["image_lr"], again[0]["image_lr"])


def test_bad_inputs_raise(gset):
    with pytest.raises(InputError, match="bands"):
        simulate_blends({"image_hr": np.zeros((4, 2, N_HR, N_HR), np.float32)}, n_blends=1, seed=0)
    with pytest.raises(InputError, match="image_hr"):
        simulate_blends({"mag": np.zeros(3)}, n_blends=1, seed=0)
    with pytest.raises(InputError, match="usable"):
        simulate_blends({"image_hr": np.zeros((1, 1, N_HR, N_HR), np.float32)}, n_blends=1, seed=0)
    with pytest.raises(ConfigError, match="max_sep"):
        simulate_blends(gset, config=BlendConfig(max_sep_arcsec=2.5), n_blends=1, seed=0)
    with pytest.raises(ConfigError):
        BlendConfig(min_sep_arcsec=2.0, max_sep_arcsec=1.0)
    with pytest.raises(ConfigError, match="exclude_flags"):
        BlendConfig(exclude_flags=("NOPE",))


def test_minimal_galaxy_set_and_excluded_flags():
    gs = _make_set(6)
    gs["flags"][:2] = flag_bit("EDGE")
    cfg = BlendConfig(exclude_flags=("EDGE",))
    _, _, src = simulate_blends(gs, config=cfg, n_blends=20, seed=0)
    assert np.all(src["galaxyIndex"] >= 2)
    minimal = {"image_hr": gs["image_hr"]}
    _, blends, src = simulate_blends(minimal, n_blends=3, seed=0)
    assert_allclose(src["flux_njy"][:, 0], gs["image_hr"][src["galaxyIndex"], 0].sum(axis=(1, 2)), rtol=1e-5)
    assert np.all(np.isnan(blends["delta_z"]))


def test_multiband_blends():
    gs = _make_set(6, n_bands=2)
    dc = DegradeConfig(high=(get_band("hst", "F606W"), get_band("hst", "F775W")),
                       low=(get_band("hsc", "r"), get_band("hsc", "i")), add_noise=False)
    batch, blends, src = simulate_blends(gs, config=BlendConfig(ref_band=1), degrade_config=dc, n_blends=3, seed=0)
    assert batch["image_lr"].shape == (3, 2, N_LR, N_LR) and src["mag"].shape == (6, 2)
    assert_allclose(batch["image_lr"].sum(axis=(2, 3)), batch["image_hr"].sum(axis=(2, 3)), rtol=1e-2)


def test_config_roundtrip_and_pickle():
    cfg = BlendConfig(n_galaxies=3, separation="uniform", max_delta_mag=2.0, exclude_flags=("EDGE",))
    assert from_dict(BlendConfig, to_dict(cfg)) == cfg
    assert apply_overrides(BlendConfig(), ["n_galaxies=3", "rotation=arbitrary"]).rotation == "arbitrary"
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert dataclasses.replace(cfg, seed=3).seed == 3


def test_speed_per_blend(gset):
    simulate_blends(gset, n_blends=5, seed=0)  # warm the degrader cache
    n = 200
    t0 = time.perf_counter()
    simulate_blends(gset, n_blends=n, seed=0)
    per_blend = (time.perf_counter() - t0) / n
    print(f"\nper blend (64x64, 2 galaxies, quarter rotations, with degradation): {per_blend * 1e3:.2f} ms")
    assert per_blend < 0.02  # a few ms expected; generous for a shared 2-core machine


def test_blends_placed_anywhere_cover_the_cutout_and_stay_inside(gset):
    """placement: anywhere: no position in the cutout is special; every galaxy stays edge_margin inside."""
    cfg = BlendConfig(placement="anywhere", edge_margin_arcsec=0.3, min_sep_arcsec=0.14, max_sep_arcsec=1.5,
                      rotation="none")
    _, _, src = simulate_blends(gset, config=cfg, degrade_config=NOISELESS, n_blends=400, seed=3)
    m = 0.3 / S_HR
    assert src["x_hr"].min() >= m - 1e-9 and src["x_hr"].max() <= N_HR - 1 - m + 1e-9
    assert src["y_hr"].min() >= m - 1e-9 and src["y_hr"].max() <= N_HR - 1 - m + 1e-9
    first = src["sourceIndex"] == 0
    # the first galaxy is no longer near the centre: its positions fill the cutout's quarters alike
    q = (src["x_hr"][first] > (N_HR - 1) / 2).astype(int) * 2 + (src["y_hr"][first] > (N_HR - 1) / 2)
    counts = np.bincount(q, minlength=4)
    assert counts.min() > 0.15 * first.sum(), counts
    assert np.abs(src["x_hr"][first] - (N_HR - 1) / 2).mean() > 5  # centred blends: < 1 px
    # the separations are drawn as before
    pairs = src["x_hr"].reshape(-1, 2), src["y_hr"].reshape(-1, 2)
    sep = np.hypot(np.diff(pairs[0], axis=1), np.diff(pairs[1], axis=1))[:, 0] * S_HR
    assert sep.min() >= 0.14 - 1e-9 and sep.max() <= 1.5 + 1e-9
    with pytest.raises(ConfigError, match="does not fit"):
        simulate_blends(gset, config=dataclasses.replace(cfg, edge_margin_arcsec=1.5), degrade_config=NOISELESS,
                        n_blends=2, seed=0)
