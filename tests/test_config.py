import pickle
from dataclasses import dataclass, field

import pytest

from galgan_ray.config import apply_overrides, dump_config, from_dict, load_config, to_dict
from galgan_ray.errors import ConfigError
from galgan_ray.instrument import BandConfig, get_band
from galgan_ray.psf import PSFConfig


@dataclass(frozen=True)
class _Inner:
    nsigma: float = 5.0
    bands: tuple[str, ...] = ("i",)


@dataclass(frozen=True)
class _Job:
    seed: int = 1
    detect: _Inner = field(default_factory=_Inner)
    name: str | None = None


def test_round_trip_through_yaml(tmp_path):
    cfg = _Job(seed=3, detect=_Inner(nsigma=2.5, bands=("g", "r")))
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(_Job, path) == cfg


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\ndetect:\n  nsigmaa: 3\n")
    with pytest.raises(ConfigError, match=r"detect\.nsigmaa"):
        load_config(_Job, path)


def test_dotted_overrides():
    cfg = apply_overrides(_Job(), ["detect.nsigma=3", "seed=7", "name=run1", "detect.bands=[g, i]"])
    assert cfg == _Job(seed=7, detect=_Inner(nsigma=3.0, bands=("g", "i")), name="run1")
    with pytest.raises(ConfigError, match="unknown key"):
        apply_overrides(_Job(), ["detect.sigma=3"])
    with pytest.raises(ConfigError, match="integer"):
        apply_overrides(_Job(), ["seed=abc"])


def test_band_config_is_data_and_pickles():
    band = get_band("hst", "F775W")
    assert band.pixel_scale_arcsec == 0.06
    again = from_dict(BandConfig, to_dict(band))
    assert again == band
    assert pickle.loads(pickle.dumps(band)) == band
    assert pickle.loads(pickle.dumps(_Job())) == _Job()


def test_new_survey_is_one_more_config():
    lsst = from_dict(BandConfig, {"survey": "lsst", "name": "r", "pixel_scale_arcsec": 0.2,
                                   "psf": {"kind": "kolmogorov", "fwhm_arcsec": 0.7}, "depth_5sigma_mag": 27.0})
    assert lsst.sky_sigma > 0
    with pytest.raises(ConfigError, match="path"):
        PSFConfig(kind="fits")
