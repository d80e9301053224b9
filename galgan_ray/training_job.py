"""A training run from a config alone: make the data (simulated sky -> cutouts -> blends), train the SR
GAN (or the DCGAN) locally or data-parallel on Ray, and write a self-describing checkpoint.

``galgan train --config galgan_ray/data/train_default.yaml`` reproduces the shipped default model.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .blends import BlendConfig
from .catalog import SelectionConfig
from .checkpoint import save_checkpoint
from .config import to_dict
from .dataset import BandsConfig, DatasetConfig, clean_neighbours, make_training_pairs, simulated_galaxy_sets
from .errors import ConfigError
from .evaluation import select_detectable
from .flags import without_flags
from .models import DCGANConfig, SRGANConfig
from .provenance import provenance
from .psf import draw_psf
from .training import TrainConfig, train_dcgan, train_srgan

__all__ = ["TrainDataConfig", "TrainJobConfig", "make_training_data", "run_training"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainDataConfig:
    """The training sample: simulated sky tiles, cuts, cleaned cutouts, random blends and singles.

    Attributes
    ----------
    seed : int
    bands : BandsConfig
    sky_size_arcsec, n_sky_tiles : float, int
        ``n_sky_tiles`` tiles of ``sky_size_arcsec`` squared (about 90 galaxies/arcmin^2 pass the cuts).
    selection : SelectionConfig
    test_fraction : float
        Southern share held out (the evaluation uses another seed's sky anyway).
    clean_neighbours : bool
        Replace neighbours in the cutouts by noise (:func:`dataset.clean_neighbours`).
    blends : BlendConfig
        Shifts/separations of the training blends.
    n_pairs : int
        (LR, HR) pairs made from the galaxies.
    blend_fraction : float
        Share of the pairs that are blends (the rest isolated galaxies).
    min_high_significance : float
        Train only on galaxies that the high-resolution image detects on their own: the benchmark's
        cut (:func:`galgan_ray.evaluation.select_detectable`, matched-filter significance within
        ``match_radius_arcsec`` of the centre). 0 keeps every galaxy that passes ``selection``.
    match_radius_arcsec : float
        The radius of that cut.
    """

    seed: int = 1000
    bands: BandsConfig = field(default_factory=BandsConfig)
    sky_size_arcsec: float = 60.0
    n_sky_tiles: int = 24
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    test_fraction: float = 0.05
    clean_neighbours: bool = True
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(sep_scale_arcsec=0.6, min_sep_arcsec=0.1,
                                                                    max_sep_arcsec=1.5, exclude_flags=("EDGE",)))
    n_pairs: int = 12000
    blend_fraction: float = 0.6
    min_high_significance: float = 0.0
    match_radius_arcsec: float = 0.3


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
    ds = DatasetConfig(seed=cfg.seed, bands=cfg.bands, sky_size_arcsec=cfg.sky_size_arcsec,
                       n_sky_tiles=cfg.n_sky_tiles, selection=cfg.selection, test_fraction=cfg.test_fraction)
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


def run_training(cfg: TrainJobConfig, *, out: str, work_dir: str | Path = "runs/train") -> dict[str, Any]:
    """Make the data, train, write the checkpoint to ``out``; returns a summary (history included)."""
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
        from .degrade import TorchDegrader
        from .ray_shell.train import RayTrainConfig, train_with_ray

        result = train_with_ray(pairs, model_cfg=cfg.model, train_cfg=cfg.train,
                                ray_cfg=RayTrainConfig(num_workers=cfg.ray_workers, storage_path=cfg.ray_storage_path),
                                bands=bands, degrader_factory=(lambda: TorchDegrader(degrade_cfg))
                                if cfg.train.flux_weight > 0 else None)
        from .checkpoint import checkpoint_file
        import fsspec

        src = checkpoint_file(result.checkpoint.path)
        with fsspec.open(src, "rb") as fi, fsspec.open(out, "wb") as fo:
            fo.write(fi.read())
        summary = {"out": out, "metrics": result.metrics, "seconds": time.perf_counter() - t0, "data": info}
        return summary
    else:
        from .degrade import TorchDegrader

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
