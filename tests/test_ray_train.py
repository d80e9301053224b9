"""Data-parallel training with Ray Train (2 CPU workers, gloo): report, checkpoint, resume."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

ray = pytest.importorskip("ray")
import ray.data  # noqa: E402

from galgan_ray.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from galgan_ray.instrument import get_band  # noqa: E402
from galgan_ray.models import SRGANConfig, build_generator  # noqa: E402
from galgan_ray.ray_shell.train import (  # noqa: E402
    RayTrainConfig,
    build_trainer,
    find_latest_checkpoint,
    storage_filesystem,
)
from galgan_ray.training import TrainConfig  # noqa: E402

pytestmark = pytest.mark.ray

BANDS = {"high": [get_band("hst", "F775W")], "low": [get_band("hsc", "i")]}
_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@pytest.fixture(scope="module")
def ray_local():
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _ENV.items():  # read by the driver and propagated to the Train controller and workers
            mp.setenv(k, v)
        ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 log_to_driver=False)
        yield
        ray.shutdown()


def _tiny_set(n: int = 24, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    hr = rng.gamma(2.0, 5.0, (n, 1, 64, 64)).astype(np.float32)
    lr = np.pad(hr, ((0, 0), (0, 0), (1, 1), (1, 1))).reshape(n, 1, 22, 3, 22, 3).sum(axis=(3, 5))
    lr = (lr + rng.normal(0, 3.0, lr.shape)).astype(np.float32)
    return {"image_lr": lr, "image_hr": hr, "sigma_lr": np.full((n, 1), 3.0, np.float32)}


def test_two_workers_report_checkpoint_and_resume(ray_local, tmp_path):
    data = _tiny_set()
    mc = SRGANConfig(base_width=8)
    rc = RayTrainConfig(num_workers=2, storage_path=str(tmp_path / "runs"), name="srgan-test", num_to_keep=None)
    tc = TrainConfig(epochs=2, batch_size=8, validation_fraction=0.25, seed=3)  # 18 train rows: 2 steps/epoch

    result = build_trainer(data, model_cfg=mc, train_cfg=tc, ray_cfg=rc, bands=BANDS).fit()
    m = result.metrics
    assert (m["epoch"], m["start_epoch"], m["step"], m["train_images"]) == (2, 0, 4, 16)
    assert np.isfinite(m["val_psnr"]) and np.isfinite(m["baseline_psnr"]) and m["val_count"] == 6
    with result.checkpoint.as_directory() as d:
        g, meta = load_checkpoint(d, expect_bands={"high": ["hst/F775W"], "low": ["hsc/i"]},
                                  expect_pixel_scales=(0.06, 0.18), device="cpu")
    assert meta["epoch"] == 2 and meta["extra"]["world_size"] == 2 and meta["metrics"]["epoch"] == 2
    assert isinstance(g, type(build_generator(mc)))

    # The same run name resumes from the epoch-2 checkpoint: only epoch 3 runs. This time the data come
    # as Ray Datasets: each worker iterates its shard (12 rows, 4 per local batch: 3 steps).
    rows = [{k: v[i] for k, v in data.items()} for i in range(24)]
    train_ds, val_ds = ray.data.from_items(rows), ray.data.from_items(rows[:6])
    result2 = build_trainer(train_ds, val_ds, model_cfg=mc, train_cfg=TrainConfig(**{**tc.__dict__, "epochs": 3}),
                            ray_cfg=rc, bands=BANDS).fit()
    m2 = result2.metrics
    assert (m2["epoch"], m2["start_epoch"], m2["step"], m2["train_images"]) == (3, 2, 7, 24)
    assert m2["val_count"] == 6
    assert result2.checkpoint.path.endswith("checkpoint_epoch_00003")


def test_fallback_checkpoint_when_snapshot_is_missing(ray_local, tmp_path):
    """A job killed before Ray wrote its run snapshot still resumes from the newest complete checkpoint."""
    mc = SRGANConfig(base_width=8)
    run = tmp_path / "runs" / "killed"
    save_checkpoint(run / "checkpoint_epoch_00001" / "checkpoint.pt", model_cfg=mc,
                    generator_state=build_generator(mc).state_dict(), epoch=1)
    (run / "checkpoint_epoch_00002").mkdir()  # upload interrupted: no checkpoint file
    rc = RayTrainConfig(storage_path=str(tmp_path / "runs"), name="killed")
    latest = find_latest_checkpoint(rc)
    assert latest is not None and latest.path.endswith("checkpoint_epoch_00001")
    trainer = build_trainer(_tiny_set(8), model_cfg=mc, ray_cfg=rc)
    assert trainer.train_loop_config["fallback_checkpoint"].path == latest.path
    assert find_latest_checkpoint(RayTrainConfig(storage_path=str(tmp_path / "runs"), name="none")) is None


def test_storage_filesystem_and_config_pickle():
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(RayTrainConfig(storage_path="s3://bucket/runs/", s3_endpoint="http://127.0.0.1:9"))
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/runs"
    assert storage_filesystem(RayTrainConfig(storage_path="s3://bucket/runs")) == (None, "s3://bucket/runs")
    rc = RayTrainConfig(num_workers=3, name="x")
    assert pickle.loads(pickle.dumps(rc)) == rc
