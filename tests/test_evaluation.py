"""The blend benchmark harness end to end on a tiny spec (the shipped default model)."""
import json

import numpy as np
import pytest

from galgan_ray.config import load_config
from galgan_ray.enhance import model_available
from galgan_ray.evaluation import EvalSpec, evaluate, write_report

TINY = ["sky_size_arcsec=30", "n_sky_tiles=1", "n_blends=16", "n_isolated=6", "noise_calibration_galaxies=4",
        "noise_realizations=2", "photometry_blends=8"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not model_available("default"):
        pytest.skip("the shipped default model is not installed")
    from importlib import resources

    spec = load_config(EvalSpec, str(resources.files("galgan_ray").joinpath("data/benchmark_default.yaml")), TINY)
    out = evaluate(spec, models={"enhanced": "default"}, work_dir=tmp_path_factory.mktemp("work"))
    written = write_report(out, tmp_path_factory.mktemp("report"))
    return out, written


def test_report_has_the_keys_other_tools_read(tiny_run):
    out, written = tiny_run
    rep = json.loads(open(written["report"]).read())
    for row in ("high", "low", "enhanced", "sep", "richardson_lucy", "bicubic"):
        d = rep["detection_fraction"][row]
        assert 0.0 <= d["fraction"] <= 1.0 and d["n"] == 16 and d["lower"] <= d["fraction"] <= d["upper"]
    assert rep["n_blends"] == 16 and "enhanced" in rep["false_positive_rate"]
    # The invented-peak rate is the paper's rate restricted further: never larger, same subset.
    strict, paper = rep["false_positive_rate_spurious"]["enhanced"], rep["false_positive_rate"]["enhanced"]
    assert strict["n"] == paper["n"] and strict["k"] <= paper["k"]
    assert rep["spec"]["n_blends"] == 16 and rep["provenance"]["version"]
    assert np.isfinite(rep["som"]["quantization_error"])
    assert "headline_factor" in rep["photometry"]
    for key in ("figure4", "figure5", "figure6", "figure7", "table"):
        assert open(written[key], "rb").read(4)


def test_outcomes_agree_with_the_fractions(tiny_run):
    out, _ = tiny_run
    rep = out["report"]
    for row, oc in out["outcomes"].items():
        assert rep["detection_fraction"][row]["k"] == int((oc == 2).sum())


def test_the_seven_band_spec_loads_with_matching_bands():
    from importlib import resources

    spec = load_config(EvalSpec, str(resources.files("galgan_ray").joinpath("data/benchmark_7band.yaml")))
    assert len(spec.bands.high) == len(spec.bands.low) == 7 and spec.baselines == ()
    assert spec.seed == load_config(EvalSpec, str(resources.files("galgan_ray").joinpath(
        "data/benchmark_default.yaml"))).seed
