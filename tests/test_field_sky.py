"""Real skies in the field pipeline: a background that survives pedestals and gradients, stars, mask bits."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from galgan_ray.checkpoint import ModelGrid
from galgan_ray.field import FieldConfig, FootprintConfig, find_footprints, process_tile
from galgan_ray.enhance import estimate_noise_sigma
from galgan_ray.field.footprints import mesh_background
from galgan_ray.flags import flag_bit
from galgan_ray.geometry import make_tan_wcs
from galgan_ray.instrument import get_band
from galgan_ray.noise import enhanced_noise_scale
from galgan_ray.psf import draw_psf
from galgan_ray.sky_plane import convolve_keeping_sky, fit_sky_plane
from galgan_ray.tiles import Tile

HSC = get_band("hsc", "i")
HST = get_band("hst", "F775W")
MODEL = ModelGrid(high=(HST,), low=(HSC,))
SIGMA = HSC.sky_sigma


def scene_tile(n: int = 160, *, n_gal: int = 20, n_star: int = 6, seed: int = 1, extra=None) -> Tile:
    """A tile of galaxies (exponential discs) and stars seen through the band's PSF, with white noise.
    ``extra`` is a list of ``(profile, x, y)`` drawn on top (galsim profiles before the PSF)."""
    import galsim

    from galgan_ray.psf import psf_profile

    rng = np.random.default_rng(seed)
    scale = HSC.pixel_scale_arcsec
    psf = psf_profile(HSC.psf)
    img = galsim.ImageF(n, n, scale=scale)
    objs = []
    for _ in range(n_gal):
        g = galsim.Exponential(half_light_radius=float(rng.uniform(0.2, 0.6)), flux=float(rng.uniform(400, 6000)))
        objs.append((g.shear(e1=float(rng.uniform(-0.3, 0.3)), e2=float(rng.uniform(-0.3, 0.3))),
                     rng.uniform(8, n - 8), rng.uniform(8, n - 8)))
    for _ in range(n_star):
        objs.append((galsim.DeltaFunction(flux=float(rng.uniform(500, 5000))), rng.uniform(8, n - 8),
                     rng.uniform(8, n - 8)))
    for prof, x, y in objs + list(extra or []):
        stamp = galsim.Convolve(prof, psf).drawImage(nx=65, ny=65, scale=scale,
                                                     offset=(x - round(x), y - round(y)))
        stamp.setCenter(round(x) + 1, round(y) + 1)  # galsim is 1-based
        b = stamp.bounds & img.bounds
        img[b] += stamp[b]
    arr = img.array.astype(np.float32)[None] + rng.normal(0, SIGMA, (1, n, n)).astype(np.float32)
    w = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=scale, shape=(n, n))
    return Tile(tile_id=5, source="mem://scene.fits", image=arr, variance=np.full(arr.shape, SIGMA**2, np.float32),
                mask=np.zeros(arr.shape, np.int32), psf=np.asarray(draw_psf(HSC.psf, pixel_scale_arcsec=scale))[None],
                wcs_header=w.to_header().tostring(), bands=(HSC.key,), inner=(-0.5, n - 0.5, -0.5, n - 0.5))


def with_sky(tile: Tile, *, pedestal_sigma: float, gradient_sigma: float) -> Tile:
    """The tile plus a residual sky: a pedestal and a gradient across the tile (in units of the noise)."""
    n = tile.shape[0]
    yy, xx = np.indices(tile.shape)
    sky = SIGMA * (pedestal_sigma + gradient_sigma * (0.7 * xx + 0.3 * yy) / n)
    return Tile(**{**tile.__dict__, "image": (tile.image + sky[None]).astype(np.float32), "_wcs": None})


def test_mesh_background_returns_a_plane_as_it_went_in():
    h, w = 130, 170
    yy, xx = np.indices((h, w))
    plane = 3.0 + 0.02 * xx - 0.01 * yy
    np.testing.assert_allclose(mesh_background(plane, np.ones((h, w), bool), mesh_px=32), plane, atol=1e-9)
    rng = np.random.default_rng(0)
    noisy = plane + rng.normal(0, 1, (h, w))
    use = np.ones((h, w), bool)
    use[40:90, 50:120] = False  # a masked source: its meshes are filled from their neighbours
    b = mesh_background(noisy, use, mesh_px=32)
    assert np.abs(b - plane).max() < 0.35 and abs(np.mean(b - plane)) < 0.05
    # the mode is shift-equivariant: a pedestal comes out whole
    np.testing.assert_allclose(mesh_background(noisy + 7.0, use, mesh_px=32), b + 7.0, atol=1e-9)
    assert np.all(mesh_background(noisy, np.zeros((h, w), bool)) == 0.0)  # nothing usable: no sky


def test_an_image_smaller_than_two_meshes_keeps_its_gradient():
    """A data-access cutout (~100 px, one 64 px mesh a side): the gradient comes out as it went in,
    the level too, with most of the image covered by masked sources (a constant would leave half the
    gradient, +-0.5 sigma at the corners, in the subtracted image)."""
    h, w = 96, 97
    yy, xx = np.indices((h, w))
    plane = 2.0 + 0.9 * (xx / w - 0.5) + 0.6 * (yy / h - 0.5)
    np.testing.assert_allclose(mesh_background(plane, np.ones((h, w), bool)), plane, atol=1e-9)
    rng = np.random.default_rng(1)
    noisy = plane + rng.normal(0, 1, (h, w))
    use = np.ones((h, w), bool)
    use[20:80, 15:85] = False  # 40 % of the pixels: a bright source and its halo, masked
    noisy[~use] += 50.0
    b = mesh_background(noisy, use)
    assert np.abs(b - plane).max() < 0.1, np.abs(b - plane).max()
    np.testing.assert_allclose(mesh_background(noisy + 7.0, use), b + 7.0, atol=1e-6)


def test_the_sky_plane_comes_out_as_it_went_in_and_a_source_does_not_move_it():
    """The clipped least-squares plane: exact on a plane, the sources clipped out, and an added
    plane added to the fit exactly (so estimators downstream see the same residual)."""
    h, w = 102, 103
    yy, xx = np.indices((h, w))
    grad = 0.9 * (xx - (w - 1) / 2) / w - 0.6 * (yy - (h - 1) / 2) / h
    np.testing.assert_allclose(fit_sky_plane(grad + 4.0, np.ones((h, w), bool)), grad, atol=1e-12)
    rng = np.random.default_rng(3)
    img = rng.normal(0, 1, (h, w)) + 400.0 * np.exp(-((xx - 70) ** 2 + (yy - 30) ** 2) / 18.0)  # a bright source
    use = np.ones((h, w), bool)
    use[:4] = False
    clean = fit_sky_plane(img, use)
    assert np.abs(clean).max() < 0.2  # the source falls out of the fit: no gradient made of it
    np.testing.assert_allclose(fit_sky_plane(img + grad + 2.0, use), clean + grad, atol=1e-9)
    assert np.all(fit_sky_plane(img, np.zeros((h, w), bool)) == 0.0)  # nothing usable: no gradient


def test_psf_matching_keeps_a_sky_plane_to_the_edges():
    """A zero-padded convolution bends a pedestal and gradient down within half a kernel of the edges
    and of unusable pixels; with the sky plane taken out and added back it stays a plane, and the
    image's sources come out as a plain convolution gives them."""
    h, w = 90, 97
    yy, xx = np.indices((h, w))
    plane = 2.0 + 0.02 * xx - 0.015 * yy
    k = np.exp(-((np.indices((15, 15)) - 7.0) ** 2).sum(axis=0) / 8.0)
    k /= k.sum()
    use = np.ones((h, w), bool)
    use[40:45, 10:20] = False  # a hole: its pixels are filled with the sky, not with zeros
    out = convolve_keeping_sky(np.where(use, plane, 0.0), k, use)
    np.testing.assert_allclose(out, plane, atol=1e-9)
    from scipy.signal import fftconvolve
    assert np.abs(fftconvolve(plane, k, mode="same") - plane).max() > 0.5  # what zero padding does
    rng = np.random.default_rng(5)
    src = 50.0 * np.exp(-((xx - 48) ** 2 + (yy - 45) ** 2) / 6.0) + rng.normal(0, 1, (h, w))
    got = convolve_keeping_sky(src + plane, k, np.ones((h, w), bool))
    want = fftconvolve(src, k, mode="same") + plane  # away from the edges, where zero padding is felt
    assert np.abs(got - want)[8:-8, 8:-8].max() < 0.1


def test_the_noise_estimate_is_the_same_under_a_residual_sky():
    """``estimate_noise_sigma`` (which sets a survey file's variance scale) on a real-sized cutout
    with sources: a pedestal of 1 sigma and a gradient of 1 sigma across leave it as it was; a
    gradient used to move it by 1-3 % on the real COSMOS cutouts and flip threshold rows."""
    tile = scene_tile(n=102, n_gal=12, n_star=3, seed=4)
    img = tile.image[0].astype(np.float64)
    sigma = estimate_noise_sigma(img)
    assert sigma == pytest.approx(SIGMA, rel=0.1)
    yy, xx = np.indices(img.shape)
    for ped, gx, gy in [(1.0, 1.0, 1.0), (-2.0, 3.0, -1.0)]:
        sky = SIGMA * (ped + gx * (xx / img.shape[1] - 0.5) + gy * (yy / img.shape[0] - 0.5))
        assert estimate_noise_sigma(img + sky) == pytest.approx(sigma, rel=1e-6)


@pytest.mark.parametrize("pedestal,gradient", [(1.0, 1.0), (0.5, 0.0), (-1.0, 2.0), (2.0, 3.0)])
def test_footprints_survive_a_sky_pedestal_and_gradient(pedestal, gradient):
    """A residual sky of a sigma (and a gradient of one or two across the tile) gives the clean tile's
    footprints and LR peaks; the two-pass sep background collapses the tile into a few footprints."""
    clean = scene_tile()
    sky = with_sky(clean, pedestal_sigma=pedestal, gradient_sigma=gradient)
    cfg = FieldConfig()
    a = find_footprints(clean, config=cfg.footprints, detect=cfg.detect)
    b = find_footprints(sky, config=cfg.footprints, detect=cfg.detect)
    assert len(a) >= 12
    assert abs(len(b) - len(a)) <= max(1, 0.05 * len(a)), (len(a), len(b))
    assert abs(len(b.peaks.x) - len(a.peaks.x)) <= 1
    d = np.hypot(a.peaks.x[:, None] - b.peaks.x[None], a.peaks.y[:, None] - b.peaks.y[None])
    assert np.sum(d.min(axis=1) < 0.5) >= len(a.peaks.x) - 1
    # the subtracted images agree to a small fraction of the noise
    assert np.abs(np.median(b.image_sub - a.image_sub)) < 0.05 * SIGMA
    assert np.percentile(np.abs(b.image_sub - a.image_sub), 99) < 0.25 * SIGMA
    if pedestal >= 1.0:
        legacy = FootprintConfig(background="sep")
        assert len(find_footprints(sky, config=legacy, detect=cfg.detect)) < 0.5 * len(a)


@pytest.fixture(scope="module")
def enhancer(tmp_path_factory):
    from galgan_ray.checkpoint import save_checkpoint
    from galgan_ray.enhance import Enhancer
    from galgan_ray.models import SRGANConfig, build_generator

    cfg = SRGANConfig()  # untrained, skip=True: bicubic upsampling
    path = save_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "bicubic.pt"),
                           generator_state=build_generator(cfg).state_dict(), model_cfg=cfg,
                           bands={"high": [HST], "low": [HSC]})
    return Enhancer(path, device="cpu")


@pytest.fixture(scope="module")
def rho(enhancer):
    return enhanced_noise_scale(enhancer.enhance_plane, n_bands=1, psf_hr=MODEL.psf_high(),
                                detect=FieldConfig().detect, n_realizations=16)


def test_a_sky_pedestal_and_gradient_give_the_clean_catalog(enhancer, rho):
    clean = scene_tile()
    sky = with_sky(clean, pedestal_sigma=1.0, gradient_sigma=1.0)
    a = process_tile(clean, model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho).catalog.columns
    b = process_tile(sky, model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho).catalog.columns
    n = len(a["x"])
    assert n >= 15 and abs(len(b["x"]) - n) <= max(1, 0.05 * n)
    d = np.hypot(a["x"][:, None] - b["x"][None], a["y"][:, None] - b["y"][None])
    j = d.argmin(axis=1)
    same = d.min(axis=1) < 0.5
    assert same.sum() >= n - 1
    fa, fb, ea = a["i_gmmFlux"][same], b["i_gmmFlux"][j[same]], a["i_gmmFluxErr"][same]
    assert np.all(np.abs(fb - fa) < 1.0 * ea + 0.02 * np.abs(fa)), np.c_[fa, fb, ea]


# ------------------------------------------------------------------------------------------------
# Stars and mask planes
# ------------------------------------------------------------------------------------------------
STAR_XY = (80.3, 70.6)


def star_tile(*, saturate: bool, flux: float = 3e5, extra=()) -> Tile:
    """The scene with a bright star at :data:`STAR_XY`; ``saturate``: its core clipped, masked and flagged
    ``SATURATED`` in ``pixel_flags``, as a survey reader leaves a saturated star."""
    import galsim

    t = scene_tile(extra=[(galsim.DeltaFunction(flux=flux), *STAR_XY), *extra])
    if saturate:
        level = np.float32(1000 * SIGMA)
        sat = t.image[0] > level
        t.image[0][sat] = 0.0
        t.mask[0][sat] = 1
        t.variance[0][sat] = np.inf
        t.pixel_flags = np.where(sat, flag_bit("SATURATED"), 0).astype(np.int64)
    return t


def _no_star_handling(cfg: FieldConfig) -> FieldConfig:
    return dataclasses.replace(cfg, footprints=dataclasses.replace(cfg.footprints, star_min_snr=np.inf))


def test_a_saturated_star_is_one_star_row_and_its_neighbours_stay(enhancer, rho):
    """A saturated star (masked core ringed by LR peaks) becomes one row flagged STAR and SATURATED, in a
    footprint of its own that is not enhanced; the other sources come out as without the star."""
    t = star_tile(saturate=True)
    assert t.pixel_flags.any()
    res = process_tile(t, model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho)
    cat = res.catalog.columns
    d = np.hypot(cat["x"] - STAR_XY[0], cat["y"] - STAR_XY[1])
    near = np.flatnonzero(d < 8.0)
    assert len(near) == 1 and d[near[0]] < 1.0
    f = int(cat["flags"][near[0]])
    assert f & flag_bit("STAR") and f & flag_bit("SATURATED") and f & flag_bit("ENHANCE_SKIPPED")
    k = int(res.children.fp[np.argmin(np.hypot(res.children.x - STAR_XY[0], res.children.y - STAR_XY[1]))])
    assert res.footprints.flags[k] & flag_bit("STAR") and res.cutouts.n_per_footprint[k] == 0
    # the rest of the scene, as without the star (sources beyond its disc)
    clean = process_tile(scene_tile(), model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho).catalog.columns
    far = np.hypot(clean["x"] - STAR_XY[0], clean["y"] - STAR_XY[1]) > 20
    dd = np.hypot(clean["x"][far][:, None] - cat["x"][None], clean["y"][far][:, None] - cat["y"][None]).min(axis=1)
    assert np.sum(dd < 0.5) >= far.sum() - 1
    assert not np.any(cat["flags"][d > 20] & flag_bit("STAR"))
    # without the star handling the masked core is shredded by the LR peaks around it
    shred = process_tile(dataclasses.replace(t, pixel_flags=None), model=MODEL, enhance_fn=enhancer.enhance_plane,
                         rho=rho).catalog.columns
    assert np.sum(np.hypot(shred["x"] - STAR_XY[0], shred["y"] - STAR_XY[1]) < 8.0) > 1


def test_a_bright_point_source_is_one_star_row_and_a_bright_galaxy_is_not(enhancer, rho):
    """An unsaturated bright star stays in its footprint, which is enhanced: the enhanced peaks within its
    radius are dropped and it is one row flagged STAR; a galaxy as bright is no star."""
    import galsim

    from galgan_ray.field.footprints import psf_extent
    from galgan_ray.psf import measure_fwhm

    gal_xy = (30.0, 130.0)
    t = star_tile(saturate=False, extra=[(galsim.Exponential(half_light_radius=0.5, flux=3e5), *gal_xy)])
    res = process_tile(t, model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho)
    fp, cat, star = res.footprints, res.catalog.columns, flag_bit("STAR")
    (k,) = np.flatnonzero(fp.peaks.flags & star)  # one star peak, at the star
    assert np.hypot(fp.peaks.x[k] - STAR_XY[0], fp.peaks.y[k] - STAR_XY[1]) < 0.5
    r = float(fp.peaks.star_radius[k])
    assert r >= measure_fwhm(t.psf[0]) and res.cutouts.n_per_footprint[fp.peaks.fp[k]] >= 1  # enhanced
    d = np.hypot(cat["x"] - STAR_XY[0], cat["y"] - STAR_XY[1])
    assert np.sum(d <= r + 0.5) == 1 and cat["flags"][np.argmin(d)] & star
    assert abs(cat["i_gmmFlux"][np.argmin(d)] / 3e5 - 1) < 0.1
    dg = np.hypot(cat["x"] - gal_xy[0], cat["y"] - gal_xy[1])
    assert dg.min() < 1.0 and not cat["flags"][np.argmin(dg)] & star
    assert np.sum((cat["flags"] & star) != 0) == 1
    fwhm = measure_fwhm(t.psf[0])
    good = np.ones(t.shape, bool)
    assert psf_extent(fp.image_sub[0], good, psf=t.psf[0], x=STAR_XY[0], y=STAR_XY[1], fwhm_px=fwhm) < 1.05
    assert psf_extent(fp.image_sub[0], good, psf=t.psf[0], x=gal_xy[0], y=gal_xy[1], fwhm_px=fwhm) > 1.3
    cfg = FieldConfig()
    off = find_footprints(t, config=_no_star_handling(cfg).footprints, detect=cfg.detect)
    assert not np.any(off.peaks.flags & star) and off.peaks.star_radius is None


def test_mask_planes_flag_the_children_near_them(enhancer, rho):
    """BRIGHT_OBJECT (usable pixels) and NO_DATA (unusable) pixel flags reach the children within a PSF
    FWHM of them, and only those."""
    t = scene_tile()
    h, w = t.shape
    yy, xx = np.indices((h, w))
    pf = np.zeros((h, w), np.int64)
    halo = np.hypot(xx - 40, yy - 40) < 25
    pf[halo] = flag_bit("BRIGHT_OBJECT")
    hole = xx >= w - 20
    pf[hole] |= flag_bit("NO_DATA")
    t.mask[0][hole] = 1
    t.image[0][hole] = 0.0
    t.variance[0][hole] = np.inf
    t.pixel_flags = pf
    cat = process_tile(t, model=MODEL, enhance_fn=enhancer.enhance_plane, rho=rho).catalog.columns
    x, y, f = cat["x"], cat["y"], cat["flags"]
    r = np.hypot(x - 40, y - 40)
    bo, nd = (f & flag_bit("BRIGHT_OBJECT")) != 0, (f & flag_bit("NO_DATA")) != 0
    assert bo[r < 24].all() and not bo[r > 30].any() and bo.any()
    assert not nd[x < w - 26].any()
    assert nd[(x > w - 22) & (x < w - 20)].all()


def test_the_background_mask_tolerance_is_checked():
    from galgan_ray.errors import ConfigError
    with pytest.raises(ConfigError, match="back_mask_tolerance"):
        FootprintConfig(back_mask_tolerance=1.5)
    assert FootprintConfig().back_iterations == 3 and FootprintConfig().back_mask_tolerance == 0.01
