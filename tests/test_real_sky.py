"""bench/real_sky.py on two real HSC/HST COSMOS scenes with the shipped default model (~15 s).

Skips where ``../shared/data/hsc_hst_qso_fields`` is absent (a fresh clone).
"""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import load_bench

rs = load_bench("real_sky")


pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def qso_fields(shared_data) -> Path:
    d = shared_data / "hsc_hst_qso_fields"
    if not d.is_dir():
        pytest.skip(f"real HSC/HST scenes not found at {d} (../shared/data is absent on a fresh clone)")
    return d


@pytest.fixture(scope="module")
def two_scenes(qso_fields, tmp_path_factory):
    """The script's own run on the first two scenes, and the files it writes."""
    from galgan_ray.enhance import model_available

    if not model_available("default"):
        pytest.skip("the shipped default model is not installed")
    import torch

    # Module-scoped, so set up before the conftest's one-thread fixture: two threads spin on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, full = rs.run(qso_fields, model="default", limit=2, log=lambda *a: None)
    finally:
        torch.set_num_threads(before)
    out = tmp_path_factory.mktemp("real_sky")
    paths = rs.write_outputs(out, report, full)
    return report, paths


def test_report_has_every_row_and_key(two_scenes):
    report, paths = two_scenes
    assert report["failures"] == []
    assert [s["scene"] for s in report["scenes"]] == ["2", "4"]
    for key in ("dataset", "model", "model_sha256", "settings", "provenance", "scenes", "summary", "runtime_s"):
        assert key in report
    summary = report["summary"]
    assert summary["n_scenes"] == 2 and summary["area_arcmin2"] > 0
    assert list(summary["rows"]) == list(rs.ROWS)
    for name, r in summary["rows"].items():
        for key in ("recall", "recall_err", "recall_isolated", "by_mag", "n_truth", "n_matched", "n_spurious",
                    "spurious_per_scene", "spurious_per_arcmin2", "median_offset_arcsec"):
            assert key in r, (name, key)
        assert 0.0 <= r["recall"] <= 1.0
        assert r["n_matched"] <= r["n_truth"]
        assert set(r["by_mag"]) == set(rs.mag_bin_labels())
        for b in r["by_mag"].values():
            assert b["recall"] is None or 0.0 <= b["recall"] <= 1.0
        assert sum(b["n_truth"] for b in r["by_mag"].values()) == r["n_truth"]
        assert r["spurious_per_scene"] >= 0 and r["spurious_per_arcmin2"] >= 0
    # the files it writes, readable, with every row in the table
    assert json.loads(paths["report"].read_text())["summary"]["n_scenes"] == 2
    table = paths["table"].read_text()
    for name in rs.ROWS:
        assert f"| {name} |" in table
    assert paths["figure"].stat().st_size > 10_000


def test_truth_per_scene_and_scored_region(two_scenes):
    report, _ = two_scenes
    for s in report["scenes"]:
        assert s["truth"]["n_scored"] > 0
        assert s["zeropoint"] == pytest.approx(25.94, abs=0.01)  # F814W from PHOTFLAM/PHOTPLAM
        assert s["quasar"]["source"].startswith("cosmos_t1qso.fits")
        # the HST-HSC overlap minus a 0.5" border and the 1.5" quasar disc: below the 15" x 15" HST image
        hst_area = (502 * 0.03 / 60) ** 2
        assert 0.6 * hst_area < s["area_arcmin2"] < hst_area
        cosd = math.cos(math.radians(s["quasar"]["dec"]))
        for t in s["truth"]["sources"]:
            if t["scored"]:
                d = 3600 * math.hypot((t["ra"] - s["quasar"]["ra"]) * cosd, t["dec"] - s["quasar"]["dec"])
                assert d > rs.QSO_EXCLUDE_ARCSEC - 0.05


def test_hsc_positions_land_on_hst_sources(two_scenes):
    """The HSC detections converted to the sky sit on HST sources: most within the 0.4" matching radius,
    and the median distance to the nearest HST source (of those within 1") well below it."""
    report, _ = two_scenes
    near = []
    for s in report["scenes"]:
        t = np.array([[u["ra"], u["dec"]] for u in s["truth"]["sources"]])
        cosd = math.cos(math.radians(s["quasar"]["dec"]))
        for d in s["rows"]["hsc"]["detections"]:
            if d["scored"]:
                near.append(3600 * np.min(np.hypot((t[:, 0] - d["ra"]) * cosd, t[:, 1] - d["dec"])))
    near = np.array(near)
    assert len(near) >= 5
    assert np.mean(near <= rs.MATCH_RADIUS_ARCSEC) >= 0.6
    assert np.median(near[near < 1.0]) < 0.2
    assert report["summary"]["rows"]["hsc"]["median_offset_arcsec"] < 0.2


def test_a_bad_scene_is_a_listed_failure_and_the_rest_go_on(qso_fields, tmp_path):
    data = tmp_path / "fields"
    for sub in ("hsc", "hsc_psf", "hst", "hst_psf"):
        (data / sub).mkdir(parents=True)
    os.symlink(qso_fields / "cosmos_t1qso.fits", data / "cosmos_t1qso.fits")
    for sid in ("2", "4"):
        for sub, pattern in (("hsc", f"{sid}-cutout-HSC-I-*.fits"), ("hsc_psf", f"{sid}-psf-*-HSC-I-*.fits"),
                             ("hst_psf", f"{sid}-psf-HST-COSMOS.fits")):
            f = min((qso_fields / sub).glob(pattern))
            os.symlink(f, data / sub / f.name)
    good = min((qso_fields / "hst").glob("2_*_sci.fits*"))
    os.symlink(good, data / "hst" / good.name)
    bad = min((qso_fields / "hst").glob("4_*_sci.fits*"))
    (data / "hst" / bad.name).write_bytes(bad.read_bytes()[:20000])  # truncated gzip
    lines = []
    report, _ = rs.run(data, model="default", log=lines.append)
    assert [s["scene"] for s in report["scenes"]] == ["2"]
    assert [f["scene"] for f in report["failures"]] == ["4"]
    assert bad.name in report["failures"][0]["error"]
    assert any(line.startswith("scene 4: FAILED:") and bad.name in line and "\n" not in line for line in lines)


def test_missing_data_folder_exits_2(tmp_path, capsys):
    assert rs.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_spurious_nulls_sample_only_scored_sky_away_from_the_truth():
    """bench/real_sky_spurious.py's random null: scored pixels only, none within the radius of a detection."""
    mod = load_bench("real_sky_spurious")
    h = w = 80
    yy, xx = np.mgrid[:h, :w]
    # the value tells where a sample came from: the window's maximum is at (x + 3, y + 3)
    smap = 1000.0 * yy + xx
    region = np.zeros((h, w), bool)
    region[10:70, 10:40] = True
    t_xy = np.array([[20.0, 30.0]])
    vals = mod.random_empty(smap, region, t_xy, radius_px=8.0, n=50, seed=1)
    assert len(vals) == 50
    y, x = np.divmod(np.asarray(vals), 1000.0)
    x, y = x - 3, y - 3  # the sampled pixel
    assert x.min() >= 10 and x.max() <= 39 and y.min() >= 10 and y.max() <= 69
    assert np.hypot(x - 20.0, y - 30.0).min() > 8.0
    assert vals == mod.random_empty(smap, region, t_xy, radius_px=8.0, n=50, seed=1)  # seeded
    # nothing near the detection: with the whole region inside its radius, no sample
    assert mod.random_empty(smap, region, np.array([[25.0, 40.0]]), radius_px=200.0, n=10, seed=0) == []


def test_the_pair_scenes_run_end_to_end_without_a_deblend_row(shared_data, tmp_path):
    """hsc_hst_pairs (cubes, no zero points) has no `galgan deblend` row: the report and its figure
    are written with the rows it has."""
    pairs = shared_data / "hsc_hst_pairs"
    if not pairs.is_dir():
        pytest.skip(f"real HSC/HST pair scenes not found at {pairs}")
    assert rs.main(["--data", str(pairs), "--limit", "1", "--out", str(tmp_path / "pairs"), "--threads", "1"]) == 0
    report = json.loads((tmp_path / "pairs" / "report.json").read_text())
    assert "deblend" not in report["scenes"][0]["rows"] and "hsc" in report["scenes"][0]["rows"]
    assert (tmp_path / "pairs" / "real_sky_examples.png").stat().st_size > 0
