import numpy as np
import pyarrow as pa
import pytest

from galgan_ray.errors import InputError
from galgan_ray.schema import object_schema, validate_table
from galgan_ray.shards import read_fits_shard, read_shards, write_fits_shard, write_shards


def _batch(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image_hr": rng.normal(size=(n, 2, 64, 64)).astype(np.float32),
        "image_lr": rng.normal(size=(n, 2, 22, 22)).astype(np.float32),
        "mag": rng.uniform(20, 26, size=(n, 2)).astype(np.float32),
        "objectId": np.arange(n, dtype=np.int64) + 10**12,
        "flags": np.zeros(n, dtype=np.int32),
        "redshift": rng.uniform(0, 5, n),
    }


@pytest.mark.parametrize("base", ["memory://shards-test/a", "file"])
def test_parquet_round_trip_is_bit_identical(base, tmp_path):
    url = str(tmp_path / "a") if base == "file" else base
    batch = _batch()
    written = write_shards(batch, url, metadata={"config": {"seed": 1}, "version": "x"}, rows_per_shard=3)
    assert len(written) == 3
    back, meta = read_shards(url)
    assert meta["config"] == {"seed": 1}
    for k, v in batch.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert np.array_equal(back[k], v), k


def test_fits_round_trip_is_bit_identical():
    batch = _batch(3)
    write_fits_shard(batch, "memory://shards-test/b.fits", metadata={"bands": ["F775W", "F160W"]})
    back, meta = read_fits_shard("memory://shards-test/b.fits")
    assert meta == {"bands": ["F775W", "F160W"]}
    for k, v in batch.items():
        assert np.array_equal(back[k], v), k


def test_truncated_or_missing_shard_names_the_file(tmp_path):
    write_shards(_batch(), str(tmp_path / "c"))
    f = next((tmp_path / "c").glob("*.parquet"))
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(InputError, match=str(f)):
        read_shards(str(tmp_path / "c"))
    with pytest.raises(InputError, match="no such"):
        read_shards(str(tmp_path / "nothing"))


def test_schema_validation():
    schema = object_schema(["i"])
    assert "i_gmmFlux" in schema.names and schema.field("coord_ra").type == pa.float64()
    table = pa.Table.from_pylist([], schema=schema)
    validate_table(table, schema)
    with pytest.raises(InputError, match="missing"):
        validate_table(table.drop_columns(["flags"]), schema)
