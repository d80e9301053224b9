"""The torch SOM keeps neighbours together, is reproducible, and colours cells correctly."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.spatial import cKDTree

from galgan_ray.config import from_dict, to_dict
from galgan_ray.errors import InputError
from galgan_ray.som import SOMConfig, fit_som, load_som

SMALL = SOMConfig(shape=(10, 8), epochs=8, batch_size=256, device="cpu")


def plane_in_3d(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth 2-D sheet in 3-D (and its 2-D coordinates)."""
    rng = np.random.default_rng(seed)
    uv = rng.uniform(0, 1, (n, 2)) * [1.0, 0.8]
    xyz = np.c_[uv[:, 0], uv[:, 1], 0.3 * np.sin(3 * uv[:, 0]) + 0.2 * uv[:, 1]]
    return xyz, uv


def test_neighbouring_inputs_land_in_neighbouring_cells():
    x, uv = plane_in_3d(4000)
    som = fit_som(x, config=SMALL)
    assert som.weights.shape == (10, 8, 3)
    te = som.topographic_error(x)
    assert te < 0.1
    assert som.quantization_error(x) < 0.35  # standardised units; a numpy online SOM gets 0.31
    # Pairs close on the sheet map to nearby cells; random pairs are far apart on the grid.
    b = som.bmu(x)
    rng = np.random.default_rng(1)
    i = rng.integers(0, len(x), 2000)
    nearest = cKDTree(uv).query(uv[i], k=2)[1][:, 1]  # the closest other input to each sampled one
    grid_near = np.max(np.abs(b[i] - b[nearest]), axis=1)
    grid_rand = np.max(np.abs(b[i] - b[rng.integers(0, len(x), len(i))]), axis=1)
    assert np.mean(grid_near <= 1) > 0.9
    assert grid_rand.mean() > 3 * grid_near.mean()
    # Flat indices agree with (row, col).
    assert_array_equal(som.bmu(x[:50], flat=True), b[:50, 0] * 8 + b[:50, 1])


def test_reproducible_under_seed():
    x, _ = plane_in_3d(1500, seed=2)
    cfg = SOMConfig(shape=(6, 5), epochs=3, batch_size=128, init="random", seed=7, device="cpu")
    a, b = fit_som(x, config=cfg), fit_som(x, config=cfg)
    assert_array_equal(a.weights_std, b.weights_std)
    c = fit_som(x, config=SOMConfig(**{**to_dict(cfg), "shape": (6, 5), "seed": 8}))
    assert not np.array_equal(a.weights_std, c.weights_std)


def test_cell_stats_and_save_load(tmp_path):
    x, _ = plane_in_3d(800, seed=3)
    som = fit_som(x, config=SOMConfig(shape=(4, 3), epochs=2, batch_size=64, device="cpu"))
    bmu = np.array([[0, 0], [0, 0], [3, 2], [1, 1]])
    stats = som.cell_stats(bmu, np.array([1.0, 3.0, 5.0, 2.0]))
    assert stats["mean"].shape == (4, 3)
    assert_allclose([stats["mean"][0, 0], stats["mean"][3, 2]], [2.0, 5.0])
    assert stats["count"][0, 0] == 2 and stats["count"].sum() == 4
    assert_allclose(stats["std"][0, 0], 1.0)
    assert np.isnan(stats["mean"][2, 2])
    frac = som.cell_mean(bmu, np.array([True, False, True, True]))
    assert_allclose(frac[0, 0], 0.5)
    path = tmp_path / "som.npz"
    som.save(path)
    back = load_som(path)
    assert back.config == som.config
    assert_array_equal(back.bmu(x), som.bmu(x))
    assert som.umatrix().shape == (4, 3)
    with pytest.raises(InputError):
        som.bmu(x[:, :2])


def test_config_round_trips_and_validates():
    cfg = SOMConfig(shape=(8, 6), epochs=2)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert from_dict(SOMConfig, to_dict(cfg)) == cfg
    with pytest.raises(InputError):
        SOMConfig(lr_initial=0.01, lr_final=0.1)
    with pytest.raises(InputError):
        fit_som(np.array([[1.0, np.nan], [0.0, 1.0]]), config=cfg)
