"""A training run from a config alone: make the data (simulated sky -> cutouts -> blends), train the SR
GAN (or the DCGAN) locally or data-parallel on Ray, and write a self-describing checkpoint.

``galgan train --config galgan_ray/data/train_default.yaml`` reproduces the shipped default model.
Data-parallel training (``use_ray``) is the Ray shell's: the caller passes its trainer as ``train_on_ray``
(:func:`galgan_ray.commands.train.train_on_ray`), so this module never imports Ray.
"""
from __future__ import annotations

import glob
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal

import fsspec
import numpy as np

from .blends import BlendConfig
from .checkpoint import checkpoint_file, save_checkpoint
from .config import from_dict, to_dict
from .dataset import (
    SkySampleConfig,
    band_from_key,
    build_galaxy_sets,
    clean_neighbours,
    make_sky_tiles,
    make_training_pairs,
    real_galaxy_set,
)
from .degrade import TorchDegrader
from .errors import ConfigError
from .evaluation import select_detectable
from .flags import without_flags
from .models import DCGANConfig, SRGANConfig
from .provenance import provenance
from .psf import draw_psf
from .instrument import BandConfig
from .training import TrainConfig, train_dcgan, train_srgan
from .training_data import (
    LRNoiseConfig,
    add_sky_residual,
    concat_pairs,
    describe,
    jittered_degrade_configs,
    noise_only_pairs,
    placed_pairs,
    psf_shape_degrade_configs,
    sky_crop_pairs,
)

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
        Share of the placed pairs (blends and single galaxies) that are blends.
    recipe : {"centred", "position_free"}
        ``centred``: galaxy-centred blends and single galaxies with the degradation's white noise
        (the models shipped before; kept to reproduce them). ``position_free``: the mix of
        :mod:`galgan_ray.training_data`: sky crops, blends placed as ``blends.placement`` says, real
        stamps, noise-only cutouts, the noise model ``noise`` and the PSF jitter.
    sky_crop_fraction : float
        ``position_free``: share of the pairs that are random windows of the degraded sky tiles.
    noise_only_fraction : float
        ``position_free``: share of the pairs that are empty sky (LR noise in, HR noise out).
    real_galaxies : str or None
        ``position_free``: a GalSim RealGalaxyCatalog file whose stamps join the placed pairs.
    real_band : str
        Band key the real stamps are drawn in.
    real_fraction : float
        Share of the placed pairs made from the real stamps.
    noise : LRNoiseConfig
        ``position_free``: depth range and correlation of the LR noise.
    psf_fwhm_jitter : float
        ``position_free``: the LR PSF's FWHM is scaled by factors spread over ``1 +- this`` (per sky
        tile, and over equal chunks of the placed pairs).
    lr_psf_images : tuple of str
        ``position_free``: glob patterns of real LR PSF images (FITS, e.g. HSC's PSF picker); a share
        ``lr_psf_fraction`` of the degradations uses their shapes, at the jittered widths
        (:func:`galgan_ray.training_data.psf_shape_degrade_configs`).
    lr_psf_pixel_scale_arcsec : float
        Sampling of those images.
    lr_psf_fraction : float
        Share of the degradations (sky tiles, chunks of placed pairs) with a real PSF shape.
    """

    seed: int = 1000
    n_sky_tiles: int = 24
    blends: BlendConfig = field(default_factory=lambda: BlendConfig(sep_scale_arcsec=0.6, min_sep_arcsec=0.1,
                                                                    max_sep_arcsec=1.5, exclude_flags=("EDGE",)))
    test_fraction: float = 0.05
    n_pairs: int = 12000
    blend_fraction: float = 0.6
    recipe: Literal["centred", "position_free"] = "centred"
    sky_crop_fraction: float = 0.0
    noise_only_fraction: float = 0.0
    real_galaxies: str | None = None
    real_band: str = "hst/F814W"
    real_fraction: float = 0.0
    noise: LRNoiseConfig = field(default_factory=LRNoiseConfig)
    psf_fwhm_jitter: float = 0.0
    lr_psf_images: tuple[str, ...] = ()
    lr_psf_pixel_scale_arcsec: float = 0.168
    lr_psf_fraction: float = 0.5

    def __post_init__(self):
        if self.recipe not in ("centred", "position_free"):
            raise ConfigError("data.recipe", f"must be centred or position_free, got {self.recipe!r}")
        for name in ("sky_crop_fraction", "noise_only_fraction", "real_fraction", "blend_fraction", "lr_psf_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"data.{name}", f"must be in [0, 1], got {getattr(self, name)}")
        if self.sky_crop_fraction + self.noise_only_fraction > 1.0:
            raise ConfigError("data.sky_crop_fraction", "sky_crop_fraction + noise_only_fraction must be <= 1")
        if self.recipe == "centred" and (self.sky_crop_fraction or self.noise_only_fraction or self.real_galaxies
                                         or self.psf_fwhm_jitter or self.noise != LRNoiseConfig()
                                         or self.lr_psf_images):
            raise ConfigError("data.recipe", "sky crops, noise-only cutouts, real stamps, the noise model, the "
                                             "PSF jitter and real PSF shapes belong to recipe: position_free")
        if self.real_fraction > 0 and not self.real_galaxies:
            raise ConfigError("data.real_fraction", "needs data.real_galaxies (a RealGalaxyCatalog file)")


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
    tiles = make_sky_tiles(ds, Path(work_dir) / "sky")
    train, _, info = build_galaxy_sets(tiles, bands=ds.bands, selection=ds.selection, test_fraction=ds.test_fraction)
    if cfg.clean_neighbours:
        train, replaced = clean_neighbours(train, seed=cfg.seed)
        info["cleaned_pixels_median"] = float(np.median(replaced))
    if cfg.min_high_significance > 0:
        dc = cfg.bands.degrade_config()
        scale = dc.scale_high_arcsec
        train, info["high_significance_cut"] = select_detectable(
            train, psf_hr=draw_psf(dc.high[0].psf, pixel_scale_arcsec=scale),
            radius_px=cfg.match_radius_arcsec / scale, min_significance=cfg.min_high_significance)
    if cfg.recipe == "centred":
        pairs = make_training_pairs(train, bands=cfg.bands, blends=cfg.blends, n_pairs=cfg.n_pairs,
                                    blend_fraction=cfg.blend_fraction, seed=cfg.seed)
    else:
        pairs, info["parts"] = _position_free_pairs(cfg, train, tiles, dec_split_deg=info["dec_split_deg"])
    info["data_seconds"] = time.perf_counter() - t0
    return pairs, train, info


def _position_free_pairs(cfg: TrainDataConfig, galaxies: dict, tiles: list, *, dec_split_deg: float
                         ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The ``position_free`` mix (:mod:`galgan_ray.training_data`), ``cfg.n_pairs`` pairs in all."""
    dc = cfg.bands.degrade_config(add_noise=False)
    n = cfg.n_pairs
    n_crops = int(round(n * cfg.sky_crop_fraction))
    n_noise = int(round(n * cfg.noise_only_fraction))
    n_placed = n - n_crops - n_noise
    n_real = int(round(n_placed * cfg.real_fraction)) if cfg.real_galaxies else 0
    if cfg.lr_psf_images and cfg.lr_psf_fraction > 0:
        # Real PSF shapes beside the analytic ones: 16 degradations in all, the share asked for real.
        files = sorted({f for pat in cfg.lr_psf_images for f in glob.glob(pat)})
        if not files:
            raise ConfigError("data.lr_psf_images", f"{list(cfg.lr_psf_images)} match no file")
        n_shape = max(1, int(round(16 * cfg.lr_psf_fraction)))
        n_analytic = 16 - n_shape
    else:
        files, n_shape, n_analytic = [], 0, 8 if cfg.psf_fwhm_jitter > 0 else 1
    configs = (jittered_degrade_configs(dc, jitter=cfg.psf_fwhm_jitter, n=n_analytic, seed=cfg.seed)
               if n_analytic else [])
    if n_shape:
        configs += psf_shape_degrade_configs(dc, files, pixel_scale_arcsec=cfg.lr_psf_pixel_scale_arcsec,
                                             jitter=cfg.psf_fwhm_jitter, n=n_shape, seed=cfg.seed)
    parts = {
        "sky_crops": sky_crop_pairs(tiles, degrade_configs=configs, high_bands=dc.high, n_pairs=n_crops,
                                    noise=cfg.noise, seed=cfg.seed,
                                    min_dec_deg=dec_split_deg if cfg.test_fraction > 0 else None),
        "noise_only": noise_only_pairs(n_noise, degrade_config=dc, noise=cfg.noise, seed=cfg.seed),
        "placed_simulated": placed_pairs(galaxies, degrade_configs=configs, blends=cfg.blends,
                                         n_pairs=n_placed - n_real, blend_fraction=cfg.blend_fraction,
                                         noise=cfg.noise, seed=cfg.seed, stream=21),
    }
    if n_real:
        real, meta = real_galaxy_set(cfg.real_galaxies, band=cfg.real_band, seed=cfg.seed)
        band_cfgs = meta.get("band_configs") or {}
        first = next(iter(band_cfgs.values())) if isinstance(band_cfgs, dict) and band_cfgs else None
        high = first if isinstance(first, BandConfig) else (from_dict(BandConfig, first) if first else
                                                             band_from_key(cfg.real_band))
        real_configs = [replace(c, high=(high,) + tuple(c.high[1:])) for c in configs]
        parts["placed_real"] = placed_pairs(real, degrade_configs=real_configs, blends=cfg.blends, n_pairs=n_real,
                                            blend_fraction=cfg.blend_fraction, noise=cfg.noise, seed=cfg.seed,
                                            stream=22)
    pairs = concat_pairs(list(parts.values()), seed=cfg.seed)
    if cfg.noise.sky_residual > 0:
        pairs = add_sky_residual(pairs, amplitude=cfg.noise.sky_residual, seed=cfg.seed)
    return pairs, describe(parts)


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
