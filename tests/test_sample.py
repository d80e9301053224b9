"""`galgan sample`: galaxies drawn from a (tiny, untrained) DCGAN checkpoint beside real ones, one PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from galgan_ray.checkpoint import save_checkpoint
from galgan_ray.cli import main
from galgan_ray.commands.sample import real_galaxies, sample_galaxies
from galgan_ray.errors import InputError
from galgan_ray.instrument import get_band
from galgan_ray.models import DCGANConfig, SRGANConfig, build_generator
from galgan_ray.shards import write_shards

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




@pytest.fixture(scope="module")
def dcgan(tmp_path_factory) -> str:
    torch.manual_seed(0)
    cfg = DCGANConfig(latent_dim=8, gen_width=4, disc_width=4)
    return save_checkpoint(str(tmp_path_factory.mktemp("dcgan") / "dcgan.pt"),
                           generator_state=build_generator(cfg).state_dict(), model_cfg=cfg,
                           bands={"high": [get_band("hst", "F775W")], "low": []})


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    gal = 500.0 * np.exp(-((xx - 31.5) ** 2 + (yy - 31.5) ** 2) / (2 * 3.0**2))
    image_hr = (gal[None, None] + rng.normal(0, 2.0, (10, 1, 64, 64))).astype(np.float32)
    url = str(tmp_path_factory.mktemp("shards") / "galaxies")
    write_shards({"image_hr": image_hr, "sigma_hr": np.full((10, 1), 2.0, np.float32),
                  "objectId": np.arange(10, dtype=np.int64)}, url, rows_per_shard=4)
    return url


def test_sample_galaxies_is_seeded(dcgan):
    a, meta = sample_galaxies(dcgan, n=5, seed=3, device="cpu")
    b, _ = sample_galaxies(dcgan, n=5, seed=3, device="cpu")
    assert a.shape == (5, 1, 64, 64) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b) and meta["model"]["kind"] == "DCGANConfig"


def test_real_galaxies_in_sigma_units(shards):
    real = real_galaxies(shards, n=16, seed=0)
    assert real.shape == (10, 1, 64, 64)  # only 10 in the set
    assert np.std(real[:, 0, :8, :8]) == pytest.approx(1.0, rel=0.15)


def test_cli_writes_png_with_and_without_real(dcgan, shards, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", "--model", dcgan, "--real", shards, "--n", "9", "--out", str(out), "--seed", "1",
                 "--device", "cpu"]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC and "9 generated + 9 real" in capsys.readouterr().out
    only = tmp_path / "only.png"
    assert main(["sample", "--model", dcgan, "--real", "none", "--n", "4", "--out", str(only)]) == 0
    assert only.read_bytes()[:8] == PNG_MAGIC


def test_cli_refuses_an_sr_checkpoint(tmp_path, capsys):
    cfg = SRGANConfig(base_width=8)
    sr = save_checkpoint(str(tmp_path / "sr.pt"), generator_state=build_generator(cfg).state_dict(), model_cfg=cfg)
    assert main(["sample", "--model", sr, "--out", str(tmp_path / "x.png")]) == 2
    assert "not a DCGAN" in capsys.readouterr().err
    with pytest.raises(InputError, match="--n"):
        sample_galaxies(sr, n=0)
