"""Training loops, metrics and data plumbing of galgan_ray.training (tiny models, seconds)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.testing import assert_allclose
from torch import nn

from galgan_ray.errors import ConfigError
from galgan_ray.models import DCGANConfig, SRGANConfig, build_generator
from galgan_ray.training import (
    TrainConfig,
    _table_batches,
    evaluate_srgan,
    psnr,
    ssim,
    train_dcgan,
    train_srgan,
)


class StandInDegrader(nn.Module):
    """Gaussian blur (sigma 4 HR px ~ 0.6" FWHM at 0.06"/px) + pad 64 -> 66 + 3x3 sum pool -> 22."""

    def __init__(self, sigma_px: float = 4.0, size: int = 25):
        super().__init__()
        r = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-(r**2) / (2 * sigma_px**2))
        g = g / g.sum()
        self.register_buffer("k", (g[:, None] * g[None, :])[None, None])

    def forward(self, x):
        c = x.shape[1]
        x = F.conv2d(x, self.k.expand(c, 1, -1, -1), padding=self.k.shape[-1] // 2, groups=c)
        return F.avg_pool2d(F.pad(x, (1, 1, 1, 1)), 3) * 9.0


def galaxy_set(n: int, *, channels: int = 1, seed: int = 0, sigma_lr: float = 20.0) -> dict:
    """Elliptical Gaussian galaxies (1-2 per cutout) near the centre, degraded with the stand-in."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64].astype(np.float32)
    hr = np.zeros((n, channels, 64, 64), np.float32)
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            x0, y0 = 31.5 + rng.normal(0, 5, 2)
            s, q, th = rng.uniform(1.5, 5), rng.uniform(0.4, 1), rng.uniform(0, np.pi)
            u = (xx - x0) * np.cos(th) + (yy - y0) * np.sin(th)
            v = (-(xx - x0) * np.sin(th) + (yy - y0) * np.cos(th)) / q
            prof = np.exp(-0.5 * (u**2 + v**2) / s**2)
            flux = 10 ** rng.uniform(3.5, 5)
            hr[i] += (flux * rng.uniform(0.5, 1.5, channels))[:, None, None] * prof / prof.sum()
    with torch.no_grad():
        lr = StandInDegrader()(torch.from_numpy(hr)).numpy()
    lr = (lr + rng.normal(0, sigma_lr, lr.shape)).astype(np.float32)
    return {"image_lr": lr, "image_hr": hr, "sigma_lr": np.full((n, channels), sigma_lr, np.float32),
            "objectId": np.arange(n, dtype=np.int64)}




# ------------------------------------------------------------------------------------- metrics
def test_ssim_and_psnr():
    rng = np.random.default_rng(0)
    a = torch.as_tensor(rng.random((2, 3, 32, 32)), dtype=torch.float32)
    assert_allclose(ssim(a, a).numpy(), 1.0, atol=1e-5)
    noisy = a + 0.1 * torch.randn_like(a)
    worse = a + 0.3 * torch.randn_like(a)
    s1, s2 = ssim(noisy, a), ssim(worse, a)
    assert (s1 < 1).all() and (s2 < s1).all()
    b = a + 0.01
    rng_a = (a.reshape(2, -1).amax(1) - a.reshape(2, -1).amin(1)).numpy()
    assert_allclose(psnr(b, a).numpy(), 10 * np.log10(rng_a**2 / 1e-4), rtol=1e-4)
    assert_allclose(psnr(b, a, data_range=1.0).numpy(), 40.0, rtol=1e-4)


# ------------------------------------------------------------------------------------- data plumbing
def test_table_batches_split_global_batches_between_ranks():
    table = {"x": np.arange(20)[:, None], "image_hr": np.zeros((20, 1, 2, 2))}
    per_rank = [[b["x"][:, 0] for b in _table_batches(table, epoch=3, seed=1, batch_size=8, rank=r, world_size=2,
                                                        sharded=False, shuffle=True, drop_last=True, device="cpu")]
                for r in range(2)]
    assert [len(p) for p in per_rank] == [2, 2]  # 20 // 8 global steps, same count on every rank
    seen = np.concatenate([np.concatenate(p) for p in per_rank])
    assert len(seen) == 16 and len(np.unique(seen)) == 16  # disjoint slices
    again = [b["x"][:, 0] for b in _table_batches(table, epoch=3, seed=1, batch_size=8, rank=0, world_size=2,
                                                    sharded=False, shuffle=True, drop_last=True, device="cpu")]
    assert all(np.array_equal(u, v) for u, v in zip(again, per_rank[0]))  # [seed, epoch] decides


# ------------------------------------------------------------------------------------- SR GAN
def test_overfit_one_batch():
    """Seeded: on 4 cutouts the content loss falls > 5x in ~100 Adam steps (content loss only)."""
    data = galaxy_set(4, seed=1)
    cfg = TrainConfig(epochs=100, batch_size=4, lr_g=2e-3, adversarial_weight=0.0, augment=False,
                      validation_fraction=0.0, seed=0, device="cpu")
    state, hist = train_srgan(data, model_cfg=SRGANConfig(base_width=16), train_cfg=cfg)
    losses = [h["loss_content"] for h in hist]
    assert state.epoch == 100 and state.step == 100
    assert losses[0] / min(losses[-5:]) > 5.0, (losses[0], losses[-5:])


def test_srgan_all_losses_validation_and_iterable_data():
    data = galaxy_set(24, seed=2)
    cfg = TrainConfig(epochs=2, batch_size=8, flux_weight=0.1, adversarial_weight=1e-2, validation_fraction=0.25,
                      device="cpu")
    state, hist = train_srgan(data, model_cfg=SRGANConfig(base_width=8), train_cfg=cfg, degrader=StandInDegrader())
    last = hist[-1]
    for key in ("loss_content", "loss_adv", "loss_flux", "loss_d", "d_real", "d_fake", "images_per_s", "val_psnr",
                "val_ssim", "val_flux_err_median", "baseline_psnr", "baseline_ssim", "baseline_flux_err_median"):
        assert np.isfinite(last[key]), key
    assert last["val_count"] == 6 and last["train_images"] == 16 and last["epoch"] == 2
    # an iterable of batches (e.g. a Ray Data shard) trains the same way; no validation then
    batches = [{k: v[i:i + 4] for k, v in data.items()} for i in range(0, 24, 4)]
    _, hist2 = train_srgan(batches, model_cfg=SRGANConfig(base_width=8),
                           train_cfg=TrainConfig(epochs=1, batch_size=4, device="cpu"))
    assert hist2[0]["train_images"] == 24 and "val_psnr" not in hist2[0]


def test_untrained_generator_matches_baseline_metrics():
    data = galaxy_set(6, seed=3)
    m = evaluate_srgan(build_generator(SRGANConfig()), data, batch_size=4)
    for k in ("psnr", "ssim", "l1", "flux_err_median"):
        assert_allclose(m[f"val_{k}"], m[f"baseline_{k}"], rtol=1e-5)
    assert m["val_count"] == 6
    assert m["baseline_flux_err_median"] < 0.05  # bicubic / 9 keeps the flux


def test_resume_equals_uninterrupted_run():
    data = galaxy_set(16, seed=4)
    mc = SRGANConfig(base_width=8)
    tc = TrainConfig(epochs=2, batch_size=8, validation_fraction=0.0, device="cpu", seed=5)
    full, _ = train_srgan(data, model_cfg=mc, train_cfg=tc)
    saved = {}

    def grab(state, metrics):
        if state.epoch == 1:
            sd = state.state_dicts()
            saved.update(generator=sd["generator_state"], discriminator=sd["discriminator_state"],
                         optimizer_g=sd["optimizer_g_state"], optimizer_d=sd["optimizer_d_state"],
                         epoch=sd["epoch"], step=sd["step"])
            saved.update({k: _clone(v) for k, v in saved.items()})

    train_srgan(data, model_cfg=mc, train_cfg=TrainConfig(**{**tc.__dict__, "epochs": 1}), on_epoch_end=grab)
    resumed, hist = train_srgan(data, model_cfg=mc, train_cfg=tc, start_state=saved)
    assert [h["epoch"] for h in hist] == [2] and hist[0]["start_epoch"] == 1
    for k, v in full.generator.state_dict().items():
        assert_allclose(resumed.generator.state_dict()[k].numpy(), v.numpy(), atol=1e-6, err_msg=k)


def test_weight_average_is_the_running_mean_of_the_steps_and_what_is_saved():
    """ema_decay: after each step avg <- d * avg + (1 - d) * weights, d = min(decay, (1 + step) / (10 + step))."""
    data = galaxy_set(8, seed=6)
    mc = SRGANConfig(base_width=8)
    tc = TrainConfig(epochs=3, batch_size=8, validation_fraction=0.0, device="cpu", seed=7, ema_decay=0.5,
                     adversarial_weight=0.0, lr_g=1e-2)
    torch.manual_seed(tc.seed)  # the loop's initial weights: the first module built after this seed
    expected = {k: v.clone() for k, v in build_generator(mc).state_dict().items()}
    seen = []

    def grab(state, metrics):  # one step per epoch: the average after step s
        d = min(tc.ema_decay, (1.0 + state.step) / (10.0 + state.step))
        for k, w in state.generator.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * w if w.is_floating_point() else w.clone()
        seen.append({k: v.clone() for k, v in state.state_dicts()["generator_state"].items()})

    state, _ = train_srgan(data, model_cfg=mc, train_cfg=tc, on_epoch_end=grab)
    assert state.step == 3 and len(seen) == 3
    for k, v in expected.items():
        assert_allclose(seen[-1][k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    raw = state.generator.state_dict()
    assert any(not torch.allclose(raw[k], seen[-1][k]) for k in raw if raw[k].is_floating_point())
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------- DCGAN
def test_dcgan_trains():
    data = galaxy_set(8, seed=6)
    data["sigma_hr"] = np.full((8, 1), 1.0, np.float32)
    state, hist = train_dcgan(data, model_cfg=DCGANConfig(gen_width=8, disc_width=8),
                              train_cfg=TrainConfig(epochs=2, batch_size=4, device="cpu"))
    assert state.epoch == 2 and len(hist) == 2
    assert all(np.isfinite(hist[-1][k]) for k in ("loss_d", "loss_g", "d_real", "d_fake"))
    assert state.optimizer_g.param_groups[0]["betas"] == (0.5, 0.999)  # DCGAN default


def test_train_config_roundtrip_and_validation():
    import pickle

    from galgan_ray.config import from_dict, to_dict
    from galgan_ray.errors import ConfigError

    cfg = TrainConfig(betas=(0.5, 0.9), flux_weight=0.1, num_threads=2)
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg and pickle.loads(pickle.dumps(cfg)) == cfg
    assert from_dict(TrainConfig, to_dict(TrainConfig())).betas is None
    with pytest.raises(ConfigError):
        TrainConfig(validation_fraction=1.0)
    with pytest.raises(ConfigError):
        TrainConfig(adversarial_weight=-1)


def test_without_flags_drops_exactly_the_flagged_rows():
    """The DCGAN's training set leaves out EDGE-flagged cutouts (zero-padded corners) and keeps the rest."""
    from galgan_ray.flags import flag_bit, without_flags

    flags = np.array([0, flag_bit("EDGE"), flag_bit("PEAK_MERGED"), flag_bit("EDGE") | flag_bit("PEAK_MERGED")])
    assert without_flags(flags, ("EDGE",)).tolist() == [True, False, True, False]
    assert without_flags(flags, ()).all()


def test_training_galaxies_pass_the_benchmarks_high_resolution_cut(tmp_path):
    """data.min_high_significance trains on the galaxies the benchmark scores (HST detects them on their
    own): the kept set is exactly the input galaxies at or above the cut, with every column reduced alike."""
    from galgan_ray.evaluation import central_significance
    from galgan_ray.psf import draw_psf
    from galgan_ray.training_job import TrainDataConfig, make_training_data

    base = TrainDataConfig(sky_size_arcsec=30.0, n_sky_tiles=1, n_pairs=8, test_fraction=0.05)
    _, everything, _ = make_training_data(base, work_dir=tmp_path)
    dc = base.bands.degrade_config()
    psf = draw_psf(dc.high[0].psf, pixel_scale_arcsec=dc.scale_high_arcsec)
    sig = central_significance(everything["image_hr"], everything["sigma_hr"], psf=psf,
                               radius_px=base.match_radius_arcsec / dc.scale_high_arcsec)
    cut = float(np.median(sig))  # a cut that certainly removes some galaxies and keeps others
    _, kept, info = make_training_data(replace(base, min_high_significance=cut), work_dir=tmp_path)
    assert info["high_significance_cut"]["kept"] == int((sig >= cut).sum()) == len(kept["image_hr"]) > 0
    assert kept["objectId"].tolist() == everything["objectId"][sig >= cut].tolist()
    assert {k for k, v in kept.items() if np.ndim(v)} == {k for k, v in everything.items() if np.ndim(v)}


def test_data_parallel_training_needs_the_ray_shell(tmp_path):
    """The core never imports Ray: `use_ray` without the shell's trainer is a config error, raised before the
    training data are made (nothing is written)."""
    from galgan_ray.training_job import TrainJobConfig, run_training

    with pytest.raises(ConfigError, match="use_ray"):
        run_training(TrainJobConfig(use_ray=True), out=str(tmp_path / "m.pt"), work_dir=tmp_path)
    assert not any(tmp_path.iterdir())
