"""bf16 autocast for the enhancer (``compute.enhance_precision``, ``--precision``): what it changes.

The shipped model under bfloat16 autocast against float32, on the same simulated tiles, through the
whole per-tile pipeline (:func:`galgan_ray.field.process_tile`, each precision with the noise model
calibrated in its own arithmetic). The speed is measured by ``bench/bench_precision.py``, not here.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from galgan_ray.enhance import Enhancer, model_available
from galgan_ray.errors import InputError
from galgan_ray.field import FieldConfig, enhancer_noise_scale, process_tile

from test_field_sky import scene_tile

pytestmark = pytest.mark.skipif(not model_available("default"), reason="the shipped 1-band model is not installed")


@pytest.fixture(scope="module")
def enhancers():
    torch.set_num_threads(1)
    return {p: Enhancer("default", device="cpu", precision=p) for p in ("fp32", "bf16")}


def test_bf16_keeps_zero_in_zero_out_and_the_image_within_a_percent_of_the_noise(enhancers):
    e32, e16 = enhancers["fp32"], enhancers["bf16"]
    assert not np.any(e16.enhance_plane(np.zeros((48, 48), np.float32), 1.0))
    tile = scene_tile(128, n_gal=15, n_star=3, seed=3)
    sigma = float(np.sqrt(np.median(tile.variance)))
    a, b = e32.enhance_plane(tile.image[0], sigma), e16.enhance_plane(tile.image[0], sigma)
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.std(b - a) < 0.02 * np.std(a)
    assert np.abs(b - a).max() < 0.05 * np.abs(a).max()
    assert abs(b.sum() - a.sum()) < 0.02 * np.abs(a).sum()


def test_bf16_gives_the_same_catalog_within_a_fifth_of_the_errors(enhancers):
    cfg = FieldConfig()
    cats = {}
    for p, e in enhancers.items():
        noise = enhancer_noise_scale(e, cfg)
        cats[p] = [process_tile(dataclasses.replace(scene_tile(200, n_gal=40, n_star=6, seed=s), bands=e.band_keys_low),
                                model=e.grid, enhance_fn=e.enhance_plane, rho=noise, config=cfg).catalog.columns
                   for s in (1, 2)]
    for a, b in zip(cats["fp32"], cats["bf16"]):
        n = len(a["x"])
        assert n >= 30 and abs(len(b["x"]) - n) <= 1
        d = np.hypot(a["x"][:, None] - b["x"][None], a["y"][:, None] - b["y"][None])
        j, dmin = d.argmin(axis=1), d.min(axis=1)
        same = dmin < 0.2  # LR px (0.036")
        assert same.sum() >= n - 1
        fa, fb, ea = a["i_gmmFlux"][same], b["i_gmmFlux"][j[same]], a["i_gmmFluxErr"][same]
        assert np.all(np.abs(fb - fa) < 0.5 * ea), np.c_[fa, fb, ea]
        assert np.median(np.abs(fb - fa) / ea) < 0.05
        assert np.mean(a["flags"][same] == b["flags"][j[same]]) >= 0.95


def test_an_unknown_precision_is_refused():
    with pytest.raises(InputError, match="precision"):
        Enhancer("default", device="cpu", precision="fp16")


def test_the_field_job_takes_the_precision_as_part_of_the_run_identity():
    pytest.importorskip("ray")
    from galgan_ray.errors import ConfigError
    from galgan_ray.ray_shell.commit import run_fingerprint
    from galgan_ray.ray_shell.job import FieldComputeConfig as ComputeConfig

    assert ComputeConfig().enhance_precision == "fp32"
    assert ComputeConfig(enhance_precision="bf16").enhance_precision == "bf16"
    with pytest.raises(ConfigError, match="enhance_precision"):
        ComputeConfig(enhance_precision="half")
    model_id = {"sha256": "0" * 64}
    fp32 = run_fingerprint(FieldConfig(), model_id)
    assert fp32 == run_fingerprint(FieldConfig(), model_id, precision="fp32")
    assert fp32 != run_fingerprint(FieldConfig(), model_id, precision="bf16")
