"""The field job with input and output on S3 (an S3-compatible moto server on loopback)."""
from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
ray = pytest.importorskip("ray")
pytest.importorskip("moto")
s3fs = pytest.importorskip("s3fs")

from conftest import moto_s3  # noqa: E402
from galgan_ray.outputs import read_run_table  # noqa: E402
from galgan_ray.ray_shell.job import FieldJobConfig, run_field  # noqa: E402
from galgan_ray.storage import StorageConfig  # noqa: E402
from galgan_ray.schema import object_schema, validate_table  # noqa: E402
from galgan_ray.sky import FieldSimConfig, make_simulated_field  # noqa: E402

pytestmark = pytest.mark.ray
BUCKET = "galgan-field"
SECRET = "s3cr3t-never-stored"


@pytest.fixture(scope="module")
def endpoint():
    """moto on loopback, credentials in the environment *before* Ray starts (workers inherit them)."""
    with moto_s3(AWS_SECRET_ACCESS_KEY=SECRET, FSSPEC_S3_ENDPOINT_URL="{url}") as url:
        started = not ray.is_initialized()
        if started:
            ray.init(address="local", num_cpus=2, object_store_memory=250 * 1024 * 1024, include_dashboard=False,
                     log_to_driver=False)
        yield url
        if started:
            ray.shutdown()


def test_field_job_reads_and_writes_s3(endpoint, ckpt):
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    sim = FieldSimConfig(seed=4, n_tiles_x=2, n_tiles_y=1, tile_inner_arcsec=10.8, border_arcsec=3.96)
    info = make_simulated_field(sim, f"s3://{BUCKET}/tiles", storage_options={"endpoint_url": endpoint})
    assert all(u.startswith(f"s3://{BUCKET}/tiles/") for u in info["tiles"])
    storage = StorageConfig(endpoint_url=endpoint)
    out = f"s3://{BUCKET}/runs/one"
    cfg = FieldJobConfig(inputs=(f"s3://{BUCKET}/tiles/", f"s3://{BUCKET}/tiles/nope.fits"), output=out,
                         checkpoint=ckpt, storage=storage)
    summary = run_field(cfg, verbose=False)
    assert summary["tiles"] == {"total": 3, "done": 2, "failed": 1, "skipped": 0}
    assert "no such file" in summary["failures"][0]["reason"]

    fs.invalidate_cache()
    parts = sorted(fs.glob(f"{BUCKET}/runs/one/catalog/tile=*/part-0.parquet"))
    assert len(parts) == 2 and len(fs.glob(f"{BUCKET}/runs/one/catalog/tile=*/_COMMITTED")) == 2
    n = 0
    for p in parts:
        with fs.open(p, "rb") as fh:
            table = pq.read_table(fh)
        validate_table(table, object_schema(["i"]), source=p)
        n += table.num_rows
        text = json.dumps(json.loads(table.schema.metadata[b"galgan_ray"]))
        assert SECRET not in text and "testing" not in text  # credentials never stored
        assert json.loads(text)["config"]["storage"]["endpoint_url"] == endpoint
    assert n == summary["sources"] > 0
    assert read_run_table(out, storage=storage).num_rows == n
    assert read_run_table(out, storage=storage, what="failures").num_rows == 1
    with fs.open(f"{BUCKET}/runs/one/summary.json", "rb") as fh:
        assert json.loads(fh.read())["sources"] == n
    with fs.open(f"{BUCKET}/runs/one/config.yaml", "rb") as fh:
        assert SECRET.encode() not in fh.read()
    # The HATS copy of the catalog on S3: every row, its properties written last.
    assert summary["hats"]["rows"] == n and summary["outputs"]["hats"] == f"{out}/hats/"
    assert fs.exists(f"{BUCKET}/runs/one/hats/hats.properties") and fs.exists(f"{BUCKET}/runs/one/hats/dataset/_metadata")
    # A rerun on S3 skips the committed tiles.
    again = run_field(cfg, verbose=False)
    assert again["tiles"]["skipped"] == 2 and again["tiles"]["done"] == 0
