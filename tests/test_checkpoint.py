"""Self-describing, tamper-evident checkpoints (galgan_ray.checkpoint), local and on memory:// URLs."""
from __future__ import annotations

import io
import uuid

import fsspec
import pytest
import torch

from galgan_ray.checkpoint import (
    CHECKPOINT_FILENAME,
    load_checkpoint,
    load_training_state,
    read_checkpoint,
    save_checkpoint,
)
from galgan_ray.errors import CheckpointError
from galgan_ray.instrument import get_band
from galgan_ray.models import DCGANConfig, SRGANConfig, build_discriminator, build_generator
from galgan_ray.scaling import ArcsinhScaling
from galgan_ray.training import TrainConfig

BANDS = {"high": [get_band("hst", "F775W")], "low": [get_band("hsc", "i")]}




@pytest.fixture
def trained():
    """A small SR model with one optimiser step, so optimiser states are non-trivial."""
    torch.manual_seed(0)
    cfg = SRGANConfig(base_width=8, scaling=ArcsinhScaling(1.0, 8.0))
    g, d = build_generator(cfg), build_discriminator(cfg)
    for p in g.parameters():  # make the zero-initialised tail non-trivial
        p.data.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.Adam(g.parameters(), lr=1e-3)
    x = torch.randn(2, 1, 22, 22) * 0.1
    g(x).abs().mean().backward()
    opt.step()
    return cfg, g, d, opt, x


def _save(path, cfg, g, d, opt, bands=BANDS, **kw):
    return save_checkpoint(path, generator_state=g.state_dict(), discriminator_state=d.state_dict(),
                           optimizer_g_state=opt.state_dict(), model_cfg=cfg, train_cfg=TrainConfig(epochs=3),
                           bands=bands, epoch=3, step=42, metrics={"val_psnr": 30.5}, **kw)


@pytest.fixture(params=["local", "memory"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run" / "model.pt")
    return f"memory://ckpt-{uuid.uuid4().hex}/model.pt"


def test_roundtrip_rebuilds_model_from_checkpoint_alone(trained, location):
    cfg, g, d, opt, x = trained
    where = _save(location, cfg, g, d, opt)
    assert where == location
    g2, meta = load_checkpoint(location, expect_bands={"high": ["hst/F775W"], "low": [get_band("hsc", "i")]},
                               expect_pixel_scales={"high": 0.06, "low": 0.18}, device="cpu")
    assert type(g2) is type(g) and not g2.training
    g.eval()
    with torch.no_grad():
        assert torch.equal(g(x), g2(x))
    assert meta["model"]["config"]["scaling"] == {"softening": 1.0, "scale": 8.0}
    assert meta["epoch"] == 3 and meta["step"] == 42 and meta["metrics"]["val_psnr"] == 30.5
    assert meta["bands"]["low"][0]["name"] == "i" and meta["train"]["epochs"] == 3
    assert meta["package_version"] and "git_revision" in meta and len(meta["sha256"]) == 64
    state = load_training_state(location)
    assert state["epoch"] == 3 and state["optimizer_g"]["state"] and state["discriminator"] is not None


def test_directory_holds_checkpoint_pt(trained, tmp_path):
    cfg, g, d, opt, _ = trained
    where = _save(str(tmp_path) + "/", cfg, g, d, opt)
    assert where.endswith("/" + CHECKPOINT_FILENAME)
    g2, _ = load_checkpoint(tmp_path, device="cpu")  # an existing directory
    assert isinstance(g2, type(g))


def _rewrite(path, mutate):
    with fsspec.open(path, "rb") as f:
        payload = torch.load(io.BytesIO(f.read()), weights_only=True)
    mutate(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    with fsspec.open(path, "wb") as f:
        f.write(buf.getvalue())


def test_tampered_weights_are_refused(trained, location):
    cfg, g, d, opt, _ = trained
    _save(location, cfg, g, d, opt)

    def poke(p):
        name = next(iter(p["generator"]))
        p["generator"][name] = p["generator"][name] + 1e-3

    _rewrite(location, poke)
    with pytest.raises(CheckpointError, match="SHA-256") as err:
        load_checkpoint(location, device="cpu")
    assert str(err.value).startswith(location)


def test_tampered_metadata_is_refused(trained, location):
    cfg, g, d, opt, _ = trained
    _save(location, cfg, g, d, opt)
    _rewrite(location, lambda p: p.update(meta_json=p["meta_json"].replace('"F775W"', '"F814W"')))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(location, device="cpu")


def test_other_bands_or_pixel_scales_are_refused(trained, location):
    cfg, g, d, opt, _ = trained
    _save(location, cfg, g, d, opt)
    with pytest.raises(CheckpointError, match="bands") as err:
        load_checkpoint(location, expect_bands={"low": ["hsc/r"]}, device="cpu")
    assert str(err.value).startswith(location)
    with pytest.raises(CheckpointError, match="bands"):
        load_checkpoint(location, expect_bands=([get_band("hst", "F606W")], None), device="cpu")
    with pytest.raises(CheckpointError, match="pixel scale"):
        load_checkpoint(location, expect_pixel_scales=(0.06, 0.2), device="cpu")
    with pytest.raises(CheckpointError, match="pixel scale"):
        load_checkpoint(location, expect_pixel_scales={"high": 0.03}, device="cpu")


def test_checkpoint_without_bands_cannot_satisfy_expectations(trained, tmp_path):
    cfg, g, d, opt, _ = trained
    path = _save(tmp_path / "nb.pt", cfg, g, d, opt, bands=None)
    load_checkpoint(path, device="cpu")  # fine when nothing is expected
    with pytest.raises(CheckpointError, match="no bands"):
        load_checkpoint(path, expect_bands={"low": ["hsc/i"]}, device="cpu")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_garbage_and_pickled_objects_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_checkpoint(junk)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "galgan-ray-checkpoint/1", "x": _Evil()}, evil)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(tmp_path / "missing.pt")


def test_dcgan_checkpoint_roundtrip(tmp_path):
    cfg = DCGANConfig(channels=7, gen_width=8, disc_width=8)
    g = build_generator(cfg).eval()
    path = save_checkpoint(tmp_path / "dcgan.pt", generator_state=g.state_dict(), model_cfg=cfg)
    g2, meta = load_checkpoint(path, device="cpu")
    z = torch.randn(2, cfg.latent_dim)
    with torch.no_grad():
        assert torch.equal(g(z), g2(z))
    assert meta["model"]["kind"] == "DCGANConfig" and meta["bands"] is None


@pytest.mark.parametrize("model_file,config_file", [("sr_1band.pt", "train_default.yaml"),
                                                    ("sr_1band_fluxcons.pt", "train_fluxcons.yaml"),
                                                    ("sr_7band.pt", "train_7band.yaml")])
def test_shipped_models_record_the_committed_recipe(model_file, config_file):
    """What went in comes out: each shipped checkpoint records the data, model and training config of the YAML
    that `galgan train --config` reproduces it from (a checkpoint older than a config key does not record
    it; the YAML then pins the value that reproduces the old behaviour)."""
    from importlib import resources

    from galgan_ray.checkpoint import read_checkpoint
    from galgan_ray.config import load_config, to_dict
    from galgan_ray.training_job import TrainJobConfig

    data = resources.files("galgan_ray").joinpath("data")
    model = data.joinpath("models", model_file)
    if not model.is_file():
        pytest.skip(f"shipped model {model_file} is not installed")
    cfg = to_dict(load_config(TrainJobConfig, str(data.joinpath(config_file))))
    _, meta = read_checkpoint(str(model))
    def recorded(have, want):  # the keys the checkpoint records, at every level of nesting
        if isinstance(have, dict) and isinstance(want, dict):
            assert set(have) <= set(want), set(have) - set(want)
            return {k: recorded(have[k], want[k]) for k in have}
        return want

    for have, want in ((meta["train"], cfg["train"]), (meta["model"]["config"], cfg["model"]),
                       (meta["extra"]["data"], cfg["data"])):
        assert have == recorded(have, want)
