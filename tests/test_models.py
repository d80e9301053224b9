"""Shapes, grids and the normalisation contract of galgan_ray.models."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from galgan_ray.config import from_dict, to_dict
from galgan_ray.errors import ConfigError, InputError
from galgan_ray.models import (
    DCGANConfig,
    SRGANConfig,
    build_discriminator,
    build_generator,
    count_parameters,
    postprocess,
    prepare_batch,
    upsample_baseline,
)
from galgan_ray.scaling import ArcsinhScaling




@pytest.mark.parametrize("channels", [1, 7])
def test_dcgan_shapes(channels):
    cfg = DCGANConfig(channels=channels, gen_width=8, disc_width=8)
    g, d = build_generator(cfg), build_discriminator(cfg)
    img = g(torch.randn(3, cfg.latent_dim))
    assert img.shape == (3, channels, 64, 64)
    assert img.abs().max() <= 1.0
    assert d(img).shape == (3,)


@pytest.mark.parametrize("channels", [1, 7])
@pytest.mark.parametrize("kw", [{}, {"upsample": "convtranspose"}, {"architecture": "paper", "depth": 3},
                                {"architecture": "paper", "skip": False, "output_activation": "tanh"}])
def test_sr_shapes(channels, kw):
    cfg = SRGANConfig(in_channels=channels, out_channels=channels, base_width=8, **kw)
    g, d = build_generator(cfg), build_discriminator(cfg)
    x = torch.randn(2, channels, 22, 22) * 0.1
    y = g(x)
    assert y.shape == (2, channels, 64, 64)
    assert d(y, x).shape == (2, 1, 8, 8)


def test_default_generator_is_small():
    n = count_parameters(build_generator(SRGANConfig()))
    assert 3e5 <= n <= 1e6, n


def test_untrained_unet_returns_bicubic_baseline():
    cfg = SRGANConfig()
    x = torch.randn(2, 1, 22, 22) * 0.2
    expected = upsample_baseline(x, scaling=cfg.scaling, factor=3, crop=1, mode="bicubic")
    assert_allclose(build_generator(cfg)(x).detach().numpy(), expected.numpy(), atol=1e-7)


def test_baseline_is_cocentred_and_conserves_surface_brightness():
    scaling = ArcsinhScaling()
    yy, xx = np.mgrid[:22, :22]
    lr = np.exp(-0.5 * ((xx - 10.5) ** 2 + (yy - 10.5) ** 2) / 2.0**2)[None, None] * 100.0
    x = scaling.forward(torch.as_tensor(lr, dtype=torch.float32))
    hr = scaling.inverse(upsample_baseline(x, scaling=scaling)).numpy()[0, 0]
    assert hr.shape == (64, 64)
    Y, X = np.mgrid[:64, :64]
    assert_allclose([(hr * X).sum() / hr.sum(), (hr * Y).sum() / hr.sum()], [31.5, 31.5], atol=1e-3)
    # each HR pixel carries 1/9 of an LR pixel's flux: the totals agree
    assert_allclose(hr.sum(), lr.sum(), rtol=1e-3)


def test_prepare_postprocess_roundtrip():
    rng = np.random.default_rng(1)
    lr = rng.normal(0, 5, (3, 2, 22, 22)).astype(np.float32)
    hr = rng.gamma(1.0, 30.0, (3, 2, 64, 64)).astype(np.float32)
    sigma = np.array([[5.0, 3.0]] * 3, np.float32)
    scaling = SRGANConfig().scaling
    x, y = prepare_batch(lr, hr, sigma, scaling)
    assert x.shape == (3, 2, 22, 22) and y.shape == (3, 2, 64, 64)
    assert_allclose(x.numpy(), np.arcsinh(lr / sigma[:, :, None, None]) / scaling.scale, rtol=1e-5, atol=1e-6)
    assert_allclose(postprocess(y, sigma, scaling).numpy(), hr, rtol=1e-4, atol=1e-3)
    x_only, none = prepare_batch(lr, None, sigma, scaling)
    assert none is None and torch.equal(x_only, x)


def test_prepare_batch_rejects_bad_input():
    lr = np.zeros((2, 1, 22, 22), np.float32)
    with pytest.raises(InputError, match="sigma_lr"):
        prepare_batch(lr, None, np.array([[1.0], [0.0]]), ArcsinhScaling())
    with pytest.raises(InputError, match="sigma_lr"):
        prepare_batch(lr, None, np.ones((2, 3)), ArcsinhScaling())
    bad = lr.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InputError, match="image_lr"):
        prepare_batch(bad, None, np.ones((2, 1)), ArcsinhScaling())


def test_configs_roundtrip_and_pickle():
    for cfg in (SRGANConfig(in_channels=7, out_channels=7, scaling=ArcsinhScaling(0.5, 8.0)), DCGANConfig()):
        assert from_dict(type(cfg), to_dict(cfg)) == cfg
        assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_invalid_configs():
    with pytest.raises(ConfigError):
        SRGANConfig(in_channels=1, out_channels=3)  # skip needs equal channels
    with pytest.raises(ConfigError):
        SRGANConfig(lr_size=20)  # 20 * 3 < 64
    with pytest.raises(ConfigError):
        DCGANConfig(image_size=32)
    with pytest.raises(ConfigError):
        build_generator(object())


def test_icnr_starts_the_pixelshuffle_as_nearest_neighbour_upsampling():
    """ICNR: the 3x3 sub-pixels of every output pixel start equal (no checkerboard); off, they differ."""
    h = torch.randn(2, 32, 22, 22)
    for icnr in (True, False):
        torch.manual_seed(0)
        up = build_generator(SRGANConfig(icnr=icnr)).upsampler(h)
        blocks = up.reshape(2, 16, 22, 3, 22, 3)
        spread = (blocks - blocks[:, :, :, :1, :, :1]).abs().amax().item()
        assert (spread == 0.0) if icnr else (spread > 1e-3)


def test_reflect_padding_mirrors_the_image_at_every_3x3_convolution():
    """padding_mode: every 3x3 convolution of the U-Net mirrors the image (1x1 ones have no padding);
    the same weights give the same output away from the edges and a different one on them; zeros is
    the default, so the shipped checkpoints (without the key) are read as they were trained."""
    assert SRGANConfig().padding_mode == "zeros"
    with pytest.raises(ConfigError, match="padding_mode"):
        SRGANConfig(padding_mode="circular")
    without_key = {k: v for k, v in to_dict(SRGANConfig()).items() if k != "padding_mode"}
    assert from_dict(SRGANConfig, without_key).padding_mode == "zeros"  # a checkpoint from before the key
    torch.manual_seed(0)
    zeros = build_generator(SRGANConfig(decoder_upsample="double"))
    reflect = build_generator(SRGANConfig(decoder_upsample="double", padding_mode="reflect"))
    convs = [m for m in reflect.modules() if isinstance(m, torch.nn.Conv2d)]
    assert {m.padding_mode for m in convs if m.padding != (0, 0)} == {"reflect"}
    assert {m.padding_mode for m in zeros.modules() if isinstance(m, torch.nn.Conv2d)} == {"zeros"}
    for m in zeros.modules():  # nonzero zero-initialised convolutions, so that the output shows the padding
        if isinstance(m, torch.nn.Conv2d) and not m.weight.abs().sum():
            torch.nn.init.normal_(m.weight, std=0.05)
    reflect.load_state_dict(zeros.state_dict())
    x = torch.randn(1, 1, 44, 44)
    with torch.no_grad():
        a, b = zeros(x, crop=False), reflect(x, crop=False)
    d = (a - b).abs()[0, 0]
    assert d[60:72, 60:72].max() < 1e-5 and d[:3].max() > 1e-3
    assert from_dict(SRGANConfig, to_dict(SRGANConfig(padding_mode="reflect"))).padding_mode == "reflect"
