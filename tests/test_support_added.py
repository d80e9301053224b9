"""The plain low-resolution detection and the support test of the children only deblending finds."""
from __future__ import annotations

import numpy as np
import pytest

from galgan_ray.detect import extract_objects
from galgan_ray.errors import ConfigError
from galgan_ray.field import Children, FieldConfig, FootprintConfig, find_footprints
from galgan_ray.field.measure import Fluxes, MeasureConfig, deblend_added, support_children
from galgan_ray.flags import describe_flags, flag_bit

from test_field import point_tile


def _blob(shape, x, y, peak, sigma=1.5):
    yy, xx = np.indices(shape)
    return peak * np.exp(-0.5 * ((xx - x) ** 2 + (yy - y) ** 2) / sigma**2)


def test_extract_objects_finds_what_rises_above_the_threshold_where_it_is():
    rng = np.random.default_rng(1)
    smap = rng.normal(0, 1, (80, 80)) * 0.3
    smap += _blob(smap.shape, 20.3, 30.6, 20.0) + _blob(smap.shape, 60.0, 50.0, 12.0)
    smap += _blob(smap.shape, 40.0, 70.0, 3.0)  # below 5 sigma
    smap += _blob(smap.shape, 65.0, 15.0, 30.0)  # in the mask
    mask = np.zeros(smap.shape, bool)
    mask[8:23, 55:76] = True
    x, y, objs = extract_objects(smap, nsigma=5.0, mask=mask, minarea=1)
    assert len(x) == len(objs) == 2
    order = np.argsort(x)
    np.testing.assert_allclose(x[order], [20.3, 60.0], atol=0.15)
    np.testing.assert_allclose(y[order], [30.6, 50.0], atol=0.15)
    x0, _, _ = extract_objects(np.zeros((20, 20)), nsigma=5.0)
    assert len(x0) == 0


def _children(xy):
    xy = np.asarray(xy, float).reshape(-1, 2)
    n = len(xy)
    return Children(fp=np.zeros(n, np.int32), x=xy[:, 0], y=xy[:, 1], significance=np.ones(n, np.float32),
                    flags=np.zeros(n, np.int64), n_peaks_enhanced=np.array([n], np.int32))


class _FP:  # deblend_added reads only the footprints' plain detections
    def __init__(self, det):
        self.detections = det


def test_deblend_added_matches_detections_to_children_one_to_one():
    ch = _children([(10.0, 10.0), (10.8, 10.0), (30.0, 30.0), (50.0, 12.0)])
    det = np.array([[10.1, 10.0], [50.5, 12.0]])
    added = deblend_added(ch, _FP(det), radius_px=2.0)
    # of the two children near the first detection one is that detection, the other deblending's
    assert added.tolist() == [False, True, True, False]
    assert deblend_added(ch, _FP(np.zeros((0, 2))), radius_px=2.0).all()
    assert deblend_added(ch, _FP(None), radius_px=2.0) is None


def test_a_child_only_deblending_finds_needs_the_higher_significance():
    f = Fluxes(flux=np.array([[100.0], [100.0], [300.0], [100.0]]), flux_err=np.full((4, 1), 10.0),
               flags=np.zeros(4, np.int64), hlr_arcsec=np.zeros(4))
    added = np.array([False, True, True, False])
    out = support_children(f, support_snr=5.0, added=added, support_snr_added=25.0)
    unsup, dadd = flag_bit("UNSUPPORTED"), flag_bit("DEBLEND_ADDED")
    assert [bool(v & unsup) for v in out.flags] == [False, True, False, False]  # S/N 10, 10, 30, 10
    assert [bool(v & dadd) for v in out.flags] == added.tolist()
    assert "DEBLEND_ADDED" in describe_flags(int(out.flags[2]))
    # without the rule (no plain detection) nothing changes
    base = support_children(f, support_snr=5.0)
    assert not np.any(base.flags & (unsup | dadd))


def test_footprints_carry_the_plain_detection_of_the_tile():
    pos = [(25.0, 25.0), (70.0, 30.0), (60.0, 75.0)]
    t = point_tile(pos, [1500.0, 1500.0, 1500.0], n=100)
    cfg = FieldConfig()
    fp = find_footprints(t, config=cfg.footprints, detect=cfg.detect)
    det = fp.detections
    assert det is not None and det.shape == (3, 2)
    d = np.hypot(det[:, None, 0] - np.array(pos)[None, :, 0], det[:, None, 1] - np.array(pos)[None, :, 1])
    assert np.all(d.min(axis=0) < 0.5)  # each source once, where it is
    empty = find_footprints(point_tile([], [], n=100), config=cfg.footprints, detect=cfg.detect)
    assert empty.detections.shape == (0, 2)


def test_a_tile_that_carries_its_detection_keeps_it_less_the_stars_discs():
    """A survey image's detection on its own pixels (Tile.detections) is the one the support test uses,
    and it survives the packing between pipeline stages."""
    from dataclasses import replace

    from galgan_ray.tiles import pack_tile_arrays, tile_from_arrays

    pos = [(25.0, 25.0), (70.0, 30.0), (60.0, 75.0)]
    t = replace(point_tile(pos, [1500.0, 1500.0, 1500.0], n=100), detections=np.array([[25.2, 24.9]]))
    back = tile_from_arrays(*pack_tile_arrays(t))
    np.testing.assert_array_equal(back.detections, t.detections)
    cfg = FieldConfig()
    fp = find_footprints(back, config=cfg.footprints, detect=cfg.detect)
    np.testing.assert_array_equal(fp.detections, [[25.2, 24.9]])  # not the tile's own three
    assert tile_from_arrays(*pack_tile_arrays(point_tile(pos, [1.0] * 3))).detections is None


def _cosmos_cutout(shared_data, field: int) -> tuple[str, str]:
    """The HSC i cutout of one real COSMOS field as downloaded and its PSF file (skip when absent)."""
    import glob

    d = shared_data / "hsc_hst_qso_fields"
    img = glob.glob(str(d / "hsc" / f"{field}-cutout-HSC-I-*.fits"))
    if not img:
        pytest.skip(f"the COSMOS cutouts are not at {d}")
    return img[0], glob.glob(str(d / "hsc_psf" / f"{field}-psf-calexp-*-HSC-I-*.fits"))[0]


def _survey_image(radec, *, crpix_shift=0.0, seed=0, n=110):
    from galgan_ray.geometry import make_tan_wcs
    from galgan_ray.survey import SurveyImage

    w = make_tan_wcs(150.0, 2.0, pixel_scale_arcsec=0.168, shape=(n, n))
    w.wcs.crpix = w.wcs.crpix + crpix_shift
    x, y = w.world_to_pixel_values(*np.asarray(radec, float).T)
    yy, xx = np.indices((n, n))
    s = 0.7 / 2.355 / 0.168  # a 0.7" Gaussian PSF
    img = np.random.default_rng(seed).normal(0, 1.0, (n, n))
    for xi, yi in zip(x, y):
        img += 40.0 * np.exp(-0.5 * ((xx - xi) ** 2 + (yy - yi) ** 2) / s**2)
    py, px = np.indices((21, 21)) - 10
    psf = np.exp(-0.5 * (px**2 + py**2) / s**2)
    return SurveyImage(image=img, variance=np.ones((n, n)), bad=np.zeros((n, n), bool), mask=np.zeros((n, n), np.int32),
                       mask_planes={}, wcs=w, psf=psf / psf.sum(), psf_pixel_scale_arcsec=0.168, unit_to_njy=1.0,
                       unit_source="test", source=f"mem://b{seed}.fits")


def test_bands_are_detected_on_their_own_pixels_each_source_once():
    """native_detections: bands on one grid are coadded; bands on different grids are detected each on
    its own and a source both show is listed once. Positions land on the model's grid."""
    from galgan_ray.checkpoint import ModelGrid
    from galgan_ray.instrument import get_band
    from galgan_ray.survey import to_model_tile

    d = 1.0 / 3600.0
    common = [(150.0 - 4 * d, 2.0 - 3 * d), (150.0 + 3 * d, 2.0 + 1 * d), (150.0, 2.0 + 5 * d)]
    extra = [(150.0 + 5 * d, 2.0 - 4 * d)]
    grid = ModelGrid(high=(get_band("hst", "F775W"),) * 2, low=(get_band("hsc", "i"),) * 2)
    a = _survey_image(common, seed=0)
    for shift, n_expect in ((0.0, 4), (7.3, 4)):
        b = _survey_image(common + extra, crpix_shift=shift, seed=1)
        tile, _ = to_model_tile([a, b], model=grid)
        det = tile.detections
        assert det.shape == (n_expect, 2), shift
        x, y = tile.wcs.world_to_pixel_values(*np.asarray(common + extra).T)
        dist = np.hypot(det[:, None, 0] - x[None], det[:, None, 1] - y[None])
        assert np.all(dist.min(axis=1) < 0.3) and len(set(dist.argmin(axis=1))) == n_expect, shift


def test_a_survey_image_is_detected_on_its_own_pixels_as_the_real_sky_benchmark_detects_it(shared_data):
    """to_model_tile's detection of a real HSC cutout as downloaded is the real-sky benchmark's hsc row
    (bench/real_sky.py's one detector, the quasar not masked): the same objects at the same RA/Dec."""
    from conftest import load_bench

    from galgan_ray.checkpoint import ModelGrid
    from galgan_ray.instrument import get_band
    from galgan_ray.survey import read_survey_image, to_model_tile

    img, psf = _cosmos_cutout(shared_data, 10)
    rs = load_bench("real_sky")
    si = read_survey_image(img, psf=psf)
    ref = rs.detect_sources(si.image, si.wcs, psf=si.psf, valid=~si.bad)
    grid = ModelGrid(high=(get_band("hst", "F775W"),), low=(get_band("hsc", "i"),))
    tile, _ = to_model_tile(si, model=grid)
    assert len(ref.ra) >= 5 and tile.detections.shape == (len(ref.ra), 2)
    ra, dec = tile.wcs.pixel_to_world_values(tile.detections[:, 0], tile.detections[:, 1])
    dra = (ra[:, None] - ref.ra[None]) * np.cos(np.radians(dec[:, None]))
    sep = 3600.0 * np.hypot(dra, dec[:, None] - ref.dec[None])
    assert np.all(sep.min(axis=1) < 1e-4)  # arcsec: each at one of the benchmark's detections
    assert len(set(sep.argmin(axis=1))) == len(ref.ra)


def test_support_added_config_is_checked():
    with pytest.raises(ConfigError, match="support_snr_added"):
        MeasureConfig(support_snr=5.0, support_snr_added=3.0)
    with pytest.raises(ConfigError, match="added_radius_arcsec"):
        MeasureConfig(added_radius_arcsec=0.0)
    with pytest.raises(ConfigError, match="plain_deblend_cont"):
        FootprintConfig(plain_deblend_cont=2.0)


def test_the_calibration_rule_keeps_the_simulated_skies_and_then_the_fewest_unconfirmed_rows():
    from conftest import load_bench

    cs = load_bench("calibrate_support")
    calib = {5.0: {"spurious_per_scene": 3.8}, 15.0: {"spurious_per_scene": 3.0},
             20.0: {"spurious_per_scene": 2.4}, 25.0: {"spurious_per_scene": 2.2}}
    good, bad = {"purity": 0.96, "completeness": 0.96}, {"purity": 0.96, "completeness": 0.93}
    sims = {0: {5.0: good, 15.0: good, 20.0: good, 25.0: good}, 1: {5.0: good, 15.0: good, 20.0: good, 25.0: bad}}
    assert cs.pick(calib, sims) == 20.0  # 25 costs sky 1 its completeness
    assert cs.pick(calib, {0: {t: bad for t in calib}}) is None
    assert cs.within_margin(calib, {"spurious_per_scene": 1.3}) is None
    assert cs.within_margin(calib, {"spurious_per_scene": 2.0}) == 20.0


def test_a_threshold_only_cuts_rows_so_one_run_with_the_rule_off_gives_every_threshold(shared_data):
    """What bench/calibrate_support.py relies on: the catalog at support_snr_added = T is the rule-off
    catalog less its DEBLEND_ADDED rows below T, on a real COSMOS cutout as downloaded."""
    from dataclasses import replace

    from conftest import load_bench

    from galgan_ray.commands.deblend import deblend_file, default_field_config
    from galgan_ray.enhance import Enhancer, model_available
    from galgan_ray.field import enhancer_noise_scale

    if not model_available("default"):
        pytest.skip("the shipped default model is not installed")
    img, psf = _cosmos_cutout(shared_data, 2)
    cs = load_bench("calibrate_support")
    shipped = default_field_config()
    enh = Enhancer("default")
    noise = enhancer_noise_scale(enh, shipped)
    off = replace(shipped, measure=replace(shipped.measure, support_snr_added=shipped.measure.support_snr))
    rows_off = cs.catalog_rows(deblend_file(img, psf=psf, enhancer=enh, noise=noise, config=off)[0])
    rows_on = cs.catalog_rows(deblend_file(img, psf=psf, enhancer=enh, noise=noise, config=shipped)[0])
    keep = cs.kept_at(rows_off, shipped.measure.support_snr_added)
    assert 0 < keep.sum() < len(keep)  # the threshold removes some rows of this cutout, not all
    for k in ("ra", "dec", "snr", "added"):
        np.testing.assert_array_equal(rows_on[k], rows_off[k][keep])
