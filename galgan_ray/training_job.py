"""A training run from a config alone: make the data (simulated sky -> cutouts -> blends), train the SR
GAN (or the DCGAN) locally or data-parallel on Ray, and write a self-describing checkpoint.

``galgan train --config galgan_ray/data/train_default.yaml`` reproduces the shipped default model.
Data-parallel training (``use_ray``) is the Ray shell's: the caller passes its trainer as ``train_on_ray``
(:func:`galgan_ray.commands.train.train_on_ray`), so this module never imports Ray.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import fsspec
import numpy as np

from .blends import BlendConfig
from .checkpoint import checkpoint_file, save_checkpoint
from .config import to_dict
from .dataset import SkySampleConfig, clean_neighbours, make_training_pairs, simulated_galaxy_sets
from .degrade import TorchDegrader
from .errors import ConfigError
from .evaluation import select_detectable
from .flags import without_flags
from .models import DCGANConfig, SRGANConfig
from .provenance import provenance
from .psf import draw_psf
from .training import TrainConfig, train_dcgan, train_srgan

__all__ = ["TrainDataConfig", "TrainJobConfig", "RayTrainFn", "make_training_data", "run_training"]

log = logging.getLogger(__name__)

#: Data-parallel training of the SR GAN, from the Ray shell: ``train_on_ray(pairs, *, job, bands,
#: degrader_factory)`` -> (URL of the last epoch's checkpoint, a file or a directory holding one; that
#: epoch's metrics).
RayTrainFn = Callable[..., tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class TrainDataConfig(SkySampleConfig):
    """The training sample: simulated sky tiles, cuts, cleaned cutouts, random blends and singles.

    The sky, cuts, cleaning, blends (their shifts/separations) and the high-resolution cut are the keys
    of :class:`galgan_ray.dataset.SkySampleConfig`; ``min_high_significance`` > 0 trains on the galaxies
    the benchmark scores.

    Attributes
    ----------
    test_fraction : float
        Southern share held out (the evaluation uses another seed's sky anyway).
    n_pairs : int
        (LR, HR) pairs made from the galaxies.
    blend_fraction : float
        Share of the pairs that are blends (the rest isolated galaxies).
    """

    seed: int = 1000
    n_sky_tiles: int = 24
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(sep_scale_arcsec=0.6, min_sep_arcsec=0.1,
                                                                    max_sep_arcsec=1.5, exclude_flags=("EDGE",)))
    test_fraction: float = 0.05
    n_pairs: int = 12000
    blend_fraction: float = 0.6


@dataclass(frozen=True)
class TrainJobConfig:
    """What ``galgan train`` needs: data, model, optimisation, and where it runs.

    Attributes
    ----------
    kind : {"srgan", "dcgan"}
    data : TrainDataConfig
    model : SRGANConfig
    dcgan : DCGANConfig
    train : TrainConfig
    use_ray : bool
        Data-parallel with Ray Train (``ray_workers`` workers) instead of the plain loop.
    ray_workers : int
    ray_storage_path : str or None
        Where Ray Train keeps runs and checkpoints (local or ``s3://``) -- resumable.
    keep_training_state : bool
        Keep discriminator and optimiser states in the checkpoint (to resume); off for shipped models.
    """

    kind: Literal["srgan", "dcgan"] = "srgan"
    data: TrainDataConfig = field(default_factory=TrainDataConfig)
    model: SRGANConfig = field(default_factory=SRGANConfig)
    dcgan: DCGANConfig = field(default_factory=DCGANConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=8, batch_size=32, flux_weight=0.3))
    use_ray: bool = False
    ray_workers: int = 2
    ray_storage_path: str | None = None
    keep_training_state: bool = True

    def __post_init__(self):
        c = len(self.data.bands.high)
        if self.kind == "srgan" and (self.model.in_channels != c or self.model.out_channels != c):
            raise ConfigError("model.in_channels", f"the data has {c} band(s), the model {self.model.in_channels}")
        if self.kind == "dcgan" and self.dcgan.channels != c:
            raise ConfigError("dcgan.channels", f"the data has {c} band(s), the model {self.dcgan.channels}")


def make_training_data(cfg: TrainDataConfig, *, work_dir: str | Path) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Simulated sky -> cleaned cutouts of the training galaxies -> (LR, HR) pairs.

    Returns
    -------
    pairs : dict
        ``image_lr``, ``image_hr``, ``sigma_lr`` (plus ``sigma_hr`` for the DCGAN).
    galaxies : dict
        The training galaxy set (cleaned).
    info : dict
        Counts and the dec split, as :func:`dataset.build_galaxy_sets` reports them.
    """
    ds = cfg.dataset_config(test_fraction=cfg.test_fraction)
    t0 = time.perf_counter()
    train, _, info = simulated_galaxy_sets(ds, work_dir=work_dir)
    if cfg.clean_neighbours:
        train, replaced = clean_neighbours(train, seed=cfg.seed)
        info["cleaned_pixels_median"] = float(np.median(replaced))
    if cfg.min_high_significance > 0:
        dc = cfg.bands.degrade_config()
        scale = dc.scale_high_arcsec
        train, info["high_significance_cut"] = select_detectable(
            train, psf_hr=draw_psf(dc.high[0].psf, pixel_scale_arcsec=scale),
            radius_px=cfg.match_radius_arcsec / scale, min_significance=cfg.min_high_significance)
    pairs = make_training_pairs(train, bands=cfg.bands, blends=cfg.blends, n_pairs=cfg.n_pairs,
                                blend_fraction=cfg.blend_fraction, seed=cfg.seed)
    info["data_seconds"] = time.perf_counter() - t0
    return pairs, train, info


def run_training(cfg: TrainJobConfig, *, out: str, work_dir: str | Path = "runs/train",
                 train_on_ray: RayTrainFn | None = None) -> dict[str, Any]:
    """Make the data, train, write the checkpoint to ``out``; returns a summary (history included).

    ``train_on_ray`` trains the SR GAN when ``cfg.use_ray`` is set (the Ray shell's
    :func:`galgan_ray.commands.train.train_on_ray`); its checkpoint file is copied to ``out``.
    """
    if cfg.use_ray and cfg.kind == "srgan" and train_on_ray is None:
        raise ConfigError("use_ray", "data-parallel training runs from the Ray shell: `galgan train` or "
                                     "jobs/train_gan.py (or pass train_on_ray)")
    t0 = time.perf_counter()
    pairs, galaxies, info = make_training_data(cfg.data, work_dir=work_dir)
    log.info("training data: %d pairs from %d galaxies in %.0f s", len(pairs["image_lr"]),
             len(galaxies["image_hr"]), info["data_seconds"])
    degrade_cfg = cfg.data.bands.degrade_config()
    bands = {"high": list(degrade_cfg.high), "low": list(degrade_cfg.low)}
    if cfg.kind == "dcgan":
        # The DCGAN learns what a cutout looks like: the blends' excluded flags (EDGE: zero-padded
        # corners off the mosaic) are left out here too, or it learns to draw the padding.
        keep = without_flags(galaxies["flags"], cfg.data.blends.exclude_flags)
        info["dcgan_galaxies"] = {"input": int(len(keep)), "kept": int(keep.sum()),
                                  "excluded_flags": list(cfg.data.blends.exclude_flags)}
    extra = {"data": to_dict(cfg.data), "data_info": {k: v for k, v in info.items() if k != "provenance"},
             "job": to_dict(cfg)}
    if cfg.kind == "dcgan":
        data = {"image_hr": galaxies["image_hr"][keep], "sigma_hr": galaxies["sigma_hr"][keep]}
        state, history = train_dcgan(data, model_cfg=cfg.dcgan, train_cfg=cfg.train)
        model_cfg = cfg.dcgan
    elif cfg.use_ray:
        ray_checkpoint, metrics = train_on_ray(pairs, job=cfg, bands=bands,
                                               degrader_factory=(lambda: TorchDegrader(degrade_cfg))
                                               if cfg.train.flux_weight > 0 else None)
        with fsspec.open(checkpoint_file(ray_checkpoint), "rb") as fi, fsspec.open(out, "wb") as fo:
            fo.write(fi.read())
        summary = {"out": out, "metrics": metrics, "seconds": time.perf_counter() - t0, "data": info}
        return summary
    else:
        degrader = TorchDegrader(degrade_cfg) if cfg.train.flux_weight > 0 else None
        state, history = train_srgan(pairs, model_cfg=cfg.model, train_cfg=cfg.train, degrader=degrader)
        model_cfg = cfg.model
    metrics = history[-1] if history else {}
    states = state.state_dicts()
    if not cfg.keep_training_state:
        states = {k: v for k, v in states.items() if k in ("generator_state", "epoch", "step")}
    path = save_checkpoint(out, **states, model_cfg=model_cfg, train_cfg=cfg.train, bands=bands,
                           metrics=_jsonable(metrics), extra=extra)
    summary = {"out": path, "metrics": _jsonable(metrics), "history": [_jsonable(h) for h in history],
               "seconds": time.perf_counter() - t0, "data": {k: v for k, v in info.items() if k != "provenance"},
               "provenance": provenance()}
    return summary


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))
