"""The field job on local Ray: end to end, tile borders against the truth, resumption, bad tiles."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from importlib import resources
from pathlib import Path

import numpy as np
from numpy.testing import assert_allclose
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")

from galgan_ray.checkpoint import ModelGrid  # noqa: E402
from galgan_ray.config import load_config  # noqa: E402
from galgan_ray.errors import ConfigError  # noqa: E402
from galgan_ray.field import TILE_STEPS, FieldConfig  # noqa: E402
from galgan_ray.flags import flag_bit  # noqa: E402
from galgan_ray.instrument import get_band  # noqa: E402
from galgan_ray.outputs import read_run_table  # noqa: E402
from galgan_ray.ray_shell.commit import CommitStage  # noqa: E402
from galgan_ray.ray_shell.job import FieldJobConfig, run_field  # noqa: E402
from galgan_ray.ray_shell.stages import (  # noqa: E402
    DegradeStage,
    DetectStage,
    EnhanceStage,
    FootprintStage,
    MeasureStage,
    PhotometerStage,
    PrepareStage,
)
from galgan_ray.schema import failure_schema, object_schema, validate_table  # noqa: E402
from galgan_ray.sky import FieldSimConfig, make_simulated_field  # noqa: E402
from galgan_ray.storage import StorageConfig  # noqa: E402
from galgan_ray.tiles import read_tile_source, tile_to_fits_bytes  # noqa: E402

pytestmark = pytest.mark.ray
HST, HSC = get_band("hst", "F775W"), get_band("hsc", "i")
SIM = FieldSimConfig(seed=3, n_tiles_x=2, n_tiles_y=2, tile_inner_arcsec=14.4, border_arcsec=3.96,
                     galaxy_density_arcmin2=150.0)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, object_store_memory=250 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    yield
    ray.shutdown()




@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("field")
    info = make_simulated_field(SIM, str(out / "tiles"))
    info["dir"] = out / "tiles"
    return info


def job(ckpt: str, inputs, output, **kw) -> FieldJobConfig:
    return FieldJobConfig(inputs=tuple(str(i) for i in inputs), output=str(output), checkpoint=ckpt, **kw)


def read_parts(root: Path, what: str) -> dict[str, object]:
    return {p.parent.name: pq.read_table(p) for p in sorted((root / what).glob("tile=*/part-0.parquet"))}


def assert_same_tables(ref_out: Path, out: Path, what: str) -> None:
    """The tiles of ``what`` under two outputs hold the same rows: integers and strings exactly, floats
    to float precision."""
    ref, new = read_parts(ref_out, what), read_parts(out, what)
    assert sorted(ref) == sorted(new) and ref
    for name in ref:
        a, b = ref[name].to_pydict(), new[name].to_pydict()
        assert sorted(a) == sorted(b), name
        for col in a:
            va, vb = np.asarray(a[col]), np.asarray(b[col])
            if va.dtype.kind == "f":
                # The enhancer's float sums may differ in the last bits between processes (threads);
                # the template fluxes, which read its pixels, then agree to float precision only.
                assert_allclose(vb, va, rtol=1e-5, atol=0, equal_nan=True, err_msg=f"{what} {name}.{col}")
            else:
                assert a[col] == b[col], f"{what} {name}.{col}"


def test_default_yaml_mirrors_the_config_and_rejects_unknown_keys(tmp_path):
    path = resources.files("galgan_ray").joinpath("data", "field_default.yaml")
    assert load_config(FieldJobConfig, str(path)) == FieldJobConfig()
    bad = tmp_path / "bad.yaml"
    bad.write_text("field:\n  detect:\n    nsigmaa: 3\n")
    with pytest.raises(ConfigError, match="field.detect.nsigmaa"):
        load_config(FieldJobConfig, str(bad))
    cfg = load_config(FieldJobConfig, str(path), ["field.detect.nsigma=4", "inputs=[s3://b/t/]"])
    assert cfg.field.detect.nsigma == 4 and cfg.inputs == ("s3://b/t/",)


def test_stages_and_configs_pickle():
    model = ModelGrid(high=(HST,), low=(HSC,))
    for obj in (FieldJobConfig(), StorageConfig(endpoint_url="http://x"), model):
        assert pickle.loads(pickle.dumps(obj)) == obj
    for cls in (DegradeStage, FootprintStage, DetectStage, PhotometerStage):
        stage = pickle.loads(pickle.dumps(cls(model, FieldConfig())))
        assert stage.model == model
    for cls, names in ((PrepareStage, ["degrade", "footprints"]), (MeasureStage, ["detect", "photometry"])):
        pool = pickle.loads(pickle.dumps(cls(model, FieldConfig())))
        assert [s.stage for s in pool.stages] == names and all(s.model == model for s in pool.stages)
    commit = pickle.loads(pickle.dumps(CommitStage(output="memory://x", storage=StorageConfig(), metadata_json="{}",
                                                   fingerprint="f")))
    assert commit.kwargs["output"] == "memory://x"


@pytest.fixture(scope="module")
def full_run(ray_local, ckpt, sim, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    summary = run_field(job(ckpt, [sim["dir"]], out), verbose=False)
    return out, summary


def test_tile_steps_are_grouped_under_the_ray_stages_timing_keys():
    """field.TILE_STEPS groups process_tile's steps under the timing keys that the five Ray stages write
    (``<stage>_s``): a renamed or added stage must be mapped there too."""
    stages = (DegradeStage, FootprintStage, EnhanceStage, DetectStage, PhotometerStage)
    assert [f"{s.stage}_s" for s in stages] == list(TILE_STEPS)


def test_end_to_end_catalog_schema_provenance(full_run):
    out, summary = full_run
    assert summary["tiles"] == {"total": 4, "done": 4, "failed": 0, "skipped": 0}
    parts = read_parts(out, "catalog")
    assert sorted(parts) == [f"tile={i:06d}" for i in range(4)]
    ids = []
    for name, table in parts.items():
        validate_table(table, object_schema(["i"]), source=name)
        assert set(table.column("tileId").to_pylist()) <= {int(name.split("=")[1])}
        ids += table.column("objectId").to_pylist()
        meta = json.loads(table.schema.metadata[b"galgan_ray"])
        assert meta["checkpoint"]["sha256"] and meta["version"] and meta["config"]["field"]["detect"]["nsigma"] == 5.0
        assert (out / "catalog" / name / "_COMMITTED").exists()
    assert len(ids) == len(set(ids)) == summary["sources"] > 0
    assert summary["newly_resolved_blends"] >= 0 and summary["throughput"]["sources_per_s"] > 0
    assert json.loads((out / "summary.json").read_text())["sources"] == summary["sources"]
    assert not (out / "failures").exists() and "failures" not in summary["outputs"]  # only outputs that exist
    for name, url in summary["outputs"].items():
        assert Path(url.rstrip("/")).exists(), (name, url)
    assert {"catalog", "hats", "truth", "blends", "config", "summary", "run"} <= set(summary["outputs"])
    run = json.loads((out / "_RUN.json").read_text())  # the run that owns the output, finished
    assert run["finished_utc"] and run["fingerprint"] == meta["fingerprint"] and run["model"] == summary["model"]
    for table in parts.values():  # the Rubin columns, read off the flags
        cols = table.to_pydict()
        assert all(cols["detect_isPrimary"]) and not any(cols["deblend_nChild"])
        assert cols["deblend_skipped"] == [bool(f & flag_bit("ENHANCE_SKIPPED")) for f in cols["flags"]]
    blends = read_run_table(str(out), what="blends")
    assert blends.num_rows == summary["truth"]["n_blends"]
    # Purity beside completeness: every catalog row counted once, and some of them lie on a true object.
    assert summary["truth"]["n_catalog"] == summary["sources"]
    assert 0 < summary["truth"]["n_catalog_near_truth"] <= summary["truth"]["n_catalog"]
    # The truth table names only rows the catalog has: a child left out (unsupported) matches no row,
    # and the catalog's completeness counts those rows alone.
    truth = read_run_table(str(out), what="truth").to_pydict()
    named = [o for o in truth["objectId"] if o >= 0]
    assert named and set(named) <= set(ids) and len(named) == len(set(named))
    assert summary["truth"]["matched_catalog"] == sum(o >= 0 and sc for o, sc in zip(truth["objectId"], truth["scored"]))
    assert summary["truth"]["matched_catalog"] <= summary["truth"]["matched_enhanced"]


def _tangent(ra, dec, ra0, dec0):
    return ((np.asarray(ra) - ra0) * np.cos(np.radians(dec0)) * 3600.0, (np.asarray(dec) - dec0) * 3600.0)


def test_no_gaps_no_duplicates_across_tile_borders(full_run, sim):
    """Each truth source is owned by one tile; each bright isolated one is found, by one tile only."""
    from scipy.spatial import cKDTree

    out, _ = full_run
    truth = read_run_table(str(out), what="truth").to_pandas()
    cat = read_run_table(str(out)).to_pandas()
    assert truth["truthId"].is_unique and len(truth) == sim["n_truth"]
    ra0, dec0 = SIM.ra_center_deg, SIM.dec_center_deg
    tx, ty = _tangent(truth["coord_ra"], truth["coord_dec"], ra0, dec0)
    cx, cy = _tangent(cat["coord_ra"], cat["coord_dec"], ra0, dec0)
    t_all = cKDTree(np.c_[tx, ty])
    bright = np.flatnonzero(truth["mag"].to_numpy() < 24.0)
    isolated = [i for i in bright if len(t_all.query_ball_point([tx[i], ty[i]], 2.0)) == 1]
    assert len(isolated) >= 3
    c_tree = cKDTree(np.c_[cx, cy])
    tiles_of = cat["tileId"].to_numpy()
    for i in isolated:
        near = c_tree.query_ball_point([tx[i], ty[i]], 0.5)
        assert near, f"truth {truth['truthId'][i]} (mag {truth['mag'][i]:.1f}) not found"
        assert len(set(tiles_of[near])) == 1, f"truth {truth['truthId'][i]} reported by tiles {set(tiles_of[near])}"
    # No source is reported twice by neighbouring tiles (same position, different tiles).
    pairs = c_tree.query_pairs(0.1, output_type="ndarray")
    assert not np.any(tiles_of[pairs[:, 0]] != tiles_of[pairs[:, 1]]) if len(pairs) else True


def test_resume_processes_only_uncommitted_tiles_and_gives_the_same_catalog(full_run, ckpt, sim, tmp_path):
    """A run that committed tiles 0 and 1, then died while writing tile 3 (after tile 2 had failed)."""
    from galgan_ray.outputs import failure_url as _failure_url

    ref_out, ref_summary = full_run
    out = tmp_path / "out"
    for name in ("catalog", "truth", "blends"):
        for tid in (0, 1):
            shutil.copytree(ref_out / name / f"tile={tid:06d}", out / name / f"tile={tid:06d}")
    committed = {p: p.stat().st_mtime_ns for p in (out / "catalog").glob("tile=*/part-0.parquet")}
    (out / "catalog" / "tile=000003").mkdir(parents=True)
    (out / "catalog" / "tile=000003" / "part-0.parquet").write_bytes(b"PAR1 partial")  # debris, no marker
    stale = Path(_failure_url(str(out), str(sim["dir"] / "tile_000002.fits")))
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier failure of tile 2")
    second = run_field(job(ckpt, [sim["dir"]], out), verbose=False)
    assert second["tiles"] == {"total": 4, "done": 2, "failed": 0, "skipped": 2}
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # committed tiles untouched
    assert not stale.exists()  # the retried tile's old failure is superseded
    assert_same_tables(ref_out, out, "catalog")
    assert second["sources"] == ref_summary["sources"]
    # Nothing is left to do now; another science config may not reuse the output.
    third = run_field(job(ckpt, [sim["dir"]], out), verbose=False)
    assert third["tiles"]["skipped"] == 4 and third["tiles"]["done"] == 0
    with pytest.raises(ConfigError, match="another config or model"):
        run_field(job(ckpt, [sim["dir"]], out, field=FieldConfig(seed=9)), verbose=False)


def test_one_pool_and_stage_pools_write_the_same_tables(full_run, ckpt, sim, tmp_path):
    """Without a GPU the job runs every stage in one pool (``compute.layout`` auto); the three pools
    a GPU cluster uses write the same catalog, truth and blends."""
    import dataclasses

    from galgan_ray.ray_shell.job import FieldComputeConfig

    ref_out, ref_summary = full_run
    assert ref_summary["throughput"]["layout"] == "one_pool"
    compute = dataclasses.replace(FieldComputeConfig(), layout="stage_pools")
    summary = run_field(job(ckpt, [sim["dir"]], tmp_path / "out", compute=compute), verbose=False)
    assert summary["throughput"]["layout"] == "stage_pools"
    assert summary["tiles"] == ref_summary["tiles"] and summary["sources"] == ref_summary["sources"]
    assert sorted(summary["stage_seconds"]) == sorted(ref_summary["stage_seconds"]) == sorted(TILE_STEPS)
    for what in ("catalog", "truth", "blends"):
        assert_same_tables(ref_out, tmp_path / "out", what)


def test_the_hats_catalog_opens_in_lsdb_with_the_catalogs_rows(full_run):
    """OUT/hats/ is the committed catalog, HEALPix-partitioned: LSDB opens it with every row; astropy
    reads the per-tile files with their units."""
    from astropy.table import Table

    out, summary = full_run
    cat = read_run_table(str(out))
    assert summary["hats"]["rows"] == cat.num_rows == summary["sources"]
    t = Table.read(min((out / "catalog").glob("tile=*/part-0.parquet")), format="parquet")
    assert str(t["coord_ra"].unit) == "deg" and str(t["i_gmmFlux"].unit) == "nJy" and str(t["x"].unit) == "pix"
    lsdb = pytest.importorskip("lsdb", reason="lsdb (the test extra) opens the HATS catalog as survey users do")
    objects = lsdb.read_hats(str(out / "hats"))
    df = objects.compute()
    assert len(df) == cat.num_rows and objects.hc_structure.catalog_info.total_rows == cat.num_rows
    assert sorted(df["objectId"]) == sorted(cat.column("objectId").to_pylist())


def test_committed_tiles_are_known_by_their_content_not_by_how_their_path_is_spelt(full_run, ckpt, sim, tmp_path,
                                                                                 monkeypatch):
    """A rerun naming the tiles by relative paths, or copies of them elsewhere, skips them all; a
    different file under a committed tile's name is a failure row naming it, not a silent skip."""
    ref_out, ref_summary = full_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    committed = {p: p.stat().st_mtime_ns for p in (out / "catalog").glob("tile=*/part-0.parquet")}
    files = sorted(sim["dir"].glob("tile_*.fits"))
    monkeypatch.chdir(sim["dir"].parent)
    relative = [Path(sim["dir"].name) / f.name for f in files]
    again = run_field(job(ckpt, relative, out), verbose=False)
    assert again["tiles"] == {"total": 4, "done": 0, "failed": 0, "skipped": 4}
    assert again["sources"] == ref_summary["sources"]
    copies = tmp_path / "copies"
    shutil.copytree(sim["dir"], copies)
    assert run_field(job(ckpt, [copies], out), verbose=False)["tiles"]["skipped"] == 4
    # Another file under tile 2's name (one pixel changed): refused before any work, named, tile 2 kept.
    original = files[2].read_bytes()
    tile = read_tile_source(str(files[2]))
    tile.image[0, 40, 40] += 1.0
    try:
        files[2].write_bytes(tile_to_fits_bytes(tile))
        third = run_field(job(ckpt, [sim["dir"]], out), verbose=False)
    finally:
        files[2].write_bytes(original)
    assert third["tiles"] == {"total": 4, "done": 0, "failed": 1, "skipped": 3}
    reason = third["failures"][0]["reason"]
    assert reason.startswith(f"{files[2]}: differs from the file committed as tile 2") and "\n" not in reason
    assert "overwrite=true" in reason and third["outputs"]["failures"].endswith("/failures/")
    assert read_run_table(str(out), what="failures").column("source").to_pylist() == [str(files[2])]
    # The same changed file under a new name has tile 2's TILEID: processed, and the commit refuses it.
    changed = copies / files[2].name
    changed.write_bytes(tile_to_fits_bytes(tile))
    fourth = run_field(job(ckpt, [copies], out), verbose=False)
    assert fourth["tiles"] == {"total": 4, "done": 0, "failed": 1, "skipped": 3}
    reason = fourth["failures"][0]["reason"]
    assert reason.startswith(f"{changed}: TILEID 2 is already committed from another file, {files[2]}")
    assert {p: p.stat().st_mtime_ns for p in committed} == committed  # nothing replaced


def test_one_output_holds_one_run(full_run, ckpt, sim, tmp_path):
    """OUT/_RUN.json: a run with another config is refused (one line naming the output); a live run
    holding the output is refused even with overwrite; a dead one's record is stale."""
    import subprocess

    ref_out, _ = full_run
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    other = FieldConfig(seed=9)
    with pytest.raises(ConfigError) as exc:
        run_field(job(ckpt, [sim["dir"]], out, field=other), verbose=False)
    text = str(exc.value)
    assert text.startswith(f"{out}: was written by a run with another config or model") and "\n" not in text
    assert "overwrite=true" in text
    record = json.loads((out / "_RUN.json").read_text())
    holder = subprocess.Popen(["sleep", "60"])  # stands for a live run of this host holding the output
    try:
        with open(f"/proc/{holder.pid}/stat") as fh:
            start = fh.read().rsplit(")", 1)[1].split()[19]
        (out / "_RUN.json").write_text(json.dumps({**record, "pid": holder.pid, "pid_start": start,
                                                   "finished_utc": None}))
        for kw in ({}, {"overwrite": True}, {"field": other, "overwrite": True}):
            with pytest.raises(ConfigError, match=rf"^{re.escape(str(out))}: is being written by another run \(pid "
                                                  rf"{holder.pid} on "):
                run_field(job(ckpt, [sim["dir"]], out, **kw), verbose=False)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without finishing: a run of its config resumes (nothing left to do), another config
    # is refused as "did not finish".
    with pytest.raises(ConfigError, match="was being written \\(the run did not finish\\) by a run with another"):
        run_field(job(ckpt, [sim["dir"]], out, field=other), verbose=False)
    assert run_field(job(ckpt, [sim["dir"]], out), verbose=False)["tiles"]["skipped"] == 4
    assert json.loads((out / "_RUN.json").read_text())["finished_utc"]


def test_overwrite_clears_the_earlier_runs_tables_first(tmp_path):
    """The claim with overwrite removes what another run wrote, so the output describes one run."""
    from galgan_ray.ray_shell.commit import claim_output, release_output

    out = tmp_path / "out"
    for d in ("catalog/tile=000001", "truth/tile=000001", "hats/dataset", "failures", "input"):
        (out / d).mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    model = {"path": "m.pt", "sha256": "0" * 64}
    legacy = [{"tileId": 1, "source": "t1.fits", "fingerprint": "a"}]  # an output without a run record
    with pytest.raises(ConfigError, match=r"holds 1 committed tile\(s\) \(e.g. t1.fits\) made with another"):
        claim_output(str(out), fingerprint="b", model_id=model, markers=legacy)
    release_output(claim_output(str(out), fingerprint="a", model_id=model, markers=legacy))
    with pytest.raises(ConfigError, match="another config or model"):
        claim_output(str(out), fingerprint="b", model_id=model)
    assert (out / "catalog").exists()
    claim = claim_output(str(out), fingerprint="b", model_id=model, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["_RUN.json", "input"]  # the simulated inputs stay
    release_output(claim)
    assert json.loads((out / "_RUN.json").read_text())["fingerprint"] == "b"


def test_bad_tiles_become_failure_rows_and_the_field_completes(ray_local, ckpt, sim, tmp_path):
    import dataclasses

    src = tmp_path / "tiles"
    src.mkdir()
    files = sorted(sim["dir"].glob("tile_*.fits"))
    shutil.copy(files[0], src / "good.fits")
    data = files[1].read_bytes()
    (src / "truncated.fits").write_bytes(data[: len(data) // 3])
    t = read_tile_source(str(files[2]))
    t.image[0, 50, 50] = np.nan
    (src / "nan.fits").write_bytes(tile_to_fits_bytes(t))
    wrong = dataclasses.replace(read_tile_source(str(files[3])), bands=("hst/F606W",))
    (src / "wrongband.fits").write_bytes(tile_to_fits_bytes(wrong))
    missing = tmp_path / "elsewhere" / "missing.fits"
    out = tmp_path / "out"
    summary = run_field(job(ckpt, [src, missing], out), verbose=False)
    assert summary["tiles"]["done"] == 1 and summary["tiles"]["failed"] == 4
    assert summary["outputs"]["failures"].endswith("/failures/")
    failures = read_run_table(str(out), what="failures")
    validate_table(failures.replace_schema_metadata(None), failure_schema())
    rows = {Path(r["source"]).name: r for r in failures.to_pylist()}
    assert set(rows) == {"truncated.fits", "nan.fits", "wrongband.fits", "missing.fits"}
    assert "truncated" in rows["truncated.fits"]["reason"] and rows["truncated.fits"]["stage"] == "read"
    assert "non-finite" in rows["nan.fits"]["reason"] and rows["nan.fits"]["tileId"] == 2
    assert "differ from the model" in rows["wrongband.fits"]["reason"] and rows["wrongband.fits"]["stage"] == "degrade"
    assert "no such file" in rows["missing.fits"]["reason"]
    for r in rows.values():
        assert r["reason"].startswith(r["source"]), r
    assert len(read_parts(out, "catalog")) == 1
    assert not any((out / "catalog").glob("*/_COMMITTED")) or len(list((out / "catalog").glob("*/_COMMITTED"))) == 1


@pytest.mark.parametrize("override, key", [
    ({"stage_num_cpus": 5.0}, "compute.stage_num_cpus"),  # more than the 2-CPU node has
    ({"enhance_num_gpus": 1.0}, "compute.enhance_num_gpus"),  # no GPU on this instance
    ({"layout": "stage_pools", "stage_actors": 4, "stage_num_cpus": 0.5}, "compute.stage_num_cpus"),  # 5 CPUs on 2
    ({"process_actors": 8, "stage_num_cpus": 0.5}, "compute.stage_num_cpus"),  # one pool: 4.25 CPUs on 2
])
def test_impossible_resources_fail_fast_naming_the_key(ray_local, ckpt, sim, tmp_path, override, key):
    """On a Ray instance of fixed size, requests it can never place end as an error naming the key,
    not as a pipeline that waits for ever."""
    import dataclasses

    from galgan_ray.ray_shell.job import FieldComputeConfig

    compute = dataclasses.replace(FieldComputeConfig(), **override)
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        run_field(job(ckpt, [sim["dir"]], tmp_path / "out", compute=compute), verbose=False)
    assert not (tmp_path / "out" / "catalog").exists()
    with pytest.raises(ConfigError, match=r"^compute.num_cpus: "):
        FieldComputeConfig(num_cpus=0)
    with pytest.raises(ConfigError, match=r"^compute.layout: "):
        FieldComputeConfig(layout="fused")
    with pytest.raises(ConfigError, match=r"^compute.process_actors: "):
        FieldComputeConfig(process_actors=0)
