"""The field pipeline, spelled once: the steps in order, grouped into the stages the Ray job runs.

:data:`STEPS` is the one list of what happens to a tile. :func:`process_tile` runs every stage on
one tile in this process (a notebook, a test, ``galgan deblend``); the Ray job
(:mod:`galgan_ray.ray_shell.stages`) runs the same :func:`run_stage` calls, one stage per
``<Verb>Stage`` actor, and moves the :class:`TileState` between them as bytes (:func:`pack_state`).
After the last stage only the :class:`TileOutput` (the tables and counts) travels on, to the commit.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable, Literal

import numpy as np

from ..checkpoint import ModelGrid
from ..degrade import degrade_tile
from ..detect import DetectConfig
from ..errors import ConfigError, InputError
from ..psf import measure_fwhm
from ..noise import EnhancedNoiseModel, calibration_galaxies, enhanced_noise_model
from ..photometry import PhotometryComputeConfig
from ..tiles import Tile, pack_arrays, pack_tile_arrays, tile_from_arrays, unpack_arrays
from .catalog import Catalog, TileStats, build_catalog, tile_stats
from .children import Children, find_children
from .cutouts import CutoutConfig, Cutouts, EnhanceFn, cut_footprint_cutouts, enhance_cutouts_in_plane
from .footprints import FootprintConfig, Footprints, LowPeaks, find_footprints
from .measure import Fluxes, MeasureConfig, flag_template_fluxes, measure_children, measure_templates
from .truth import HighPeaks, TruthConfig, TruthScores, find_high_peaks, score_truth

__all__ = ["FieldConfig", "TileContext", "TileState", "TileOutput", "Step", "STEPS", "STAGES", "TILE_STEPS",
           "check_tile", "enhancer_noise_scale", "run_stage", "process_tile", "pack_state", "unpack_state", "pack_output", "unpack_output"]

@dataclass(frozen=True)
class FieldConfig:
    """Science parameters of the field processor (compute knobs live in the Ray shell's config).

    Attributes
    ----------
    seed : int
        Seeds the simulated degradation noise (per field-grid block or per tile) and the noise
        calibration of enhanced images.
    footprints : FootprintConfig
    cutouts : CutoutConfig
    detect : DetectConfig
        The peak finder, identical at every resolution (LR tile, enhanced cutouts, HR tile). The
        tile's background is subtracted before, so ``background`` is ``zero`` here, and
        ``min_prominence`` is 3: on whole fields, noise bumps on bright extended galaxies otherwise
        become peaks (5-10 per bright galaxy on enhanced images), which isolated-blend benchmarks
        never meet.
    measure : MeasureConfig
    truth : TruthConfig
    noise_realizations, noise_calibration_galaxies, noise_percentile, noise_levels
        The noise model of enhanced images, calibrated as the blend benchmark calibrates it
        (:func:`galgan_ray.noise.enhanced_noise_model`: noise draws per galaxy, galaxies, percentile,
        signal-level bins), on :func:`galgan_ray.noise.calibration_galaxies` of the model's grid.
    degrade_add_noise : bool
        Add LR sky noise when degrading simulated tiles.
    keep_not_primary : bool
        Keep sources outside the tile's inner region, flagged ``NOT_PRIMARY`` (default: drop them;
        the tile that owns them reports them).
    keep_unsupported : bool
        Keep children the LR pixels do not support, flagged ``UNSUPPORTED`` (default: drop them;
        :func:`galgan_ray.field.measure.support_children`, ``measure.support_snr``).
    """

    seed: int = 0
    footprints: FootprintConfig = field(default_factory=FootprintConfig)
    cutouts: CutoutConfig = field(default_factory=CutoutConfig)
    detect: DetectConfig = field(default_factory=lambda: DetectConfig(background="zero", min_prominence=3.0))
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    truth: TruthConfig = field(default_factory=TruthConfig)
    noise_realizations: int = 8
    noise_calibration_galaxies: int = 48
    noise_percentile: float = 90.0
    noise_levels: int = 24
    degrade_add_noise: bool = True
    keep_not_primary: bool = False
    keep_unsupported: bool = False

    def __post_init__(self):
        if self.noise_realizations < 2:
            raise ConfigError("field.noise_realizations", f"must be >= 2, got {self.noise_realizations}")


# ------------------------------------------------------------------------------------------------
# What a step sees: the tile's state so far, and the context of the run
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileContext:
    """What the steps need besides the tile: the model's grids, the science config and, for the
    enhancement stage, the enhancer.

    Attributes
    ----------
    model : ModelGrid
    config : FieldConfig
    compute : PhotometryComputeConfig
    enhance_fn : callable or None
        ``(plane (C, H, W), sigma (C,), need=(H, W) bool) -> (C, 3H, 3W)``: the whole LR tile
        enhanced without seams where ``need`` is set (:meth:`galgan_ray.enhance.Enhancer.enhance_plane`;
        only the enhancement stage needs it).
    rho : EnhancedNoiseModel, float or None
        Noise of ``enhance_fn``'s outputs: the level-dependent model (:func:`enhancer_noise_scale`) or
        one factor on the nominal noise.
    enhance_device : str or None
        Where ``enhance_fn`` runs (recorded in the run summary).
    """

    model: ModelGrid
    config: FieldConfig = field(default_factory=FieldConfig)
    compute: PhotometryComputeConfig = field(default_factory=PhotometryComputeConfig)
    enhance_fn: EnhanceFn | None = None
    rho: EnhancedNoiseModel | float | None = None
    enhance_device: str | None = None
    psf_hr: np.ndarray = field(init=False, repr=False, compare=False)
    lr_psf_fwhm_px: float = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "psf_hr", self.model.psf_high())
        object.__setattr__(self, "lr_psf_fwhm_px", float(measure_fwhm(self.model.psf_low())))


@dataclass(eq=False)
class TileState:
    """One tile on its way through the steps: the tile and what each step has made of it so far.

    Attributes
    ----------
    tile : Tile
        The input tile; the low-resolution tile from the ``degrade`` step on.
    mode : {"simulation", "real"} or None
        From :func:`check_tile`.
    source_pixel_scale_arcsec : float or None
        Pixel scale of the tile as read.
    high : HighPeaks or None
        Peaks of the simulated HR tile (simulations).
    footprints : Footprints or None
    cutouts : Cutouts or None
    enhanced : numpy.ndarray or None
        ``(M, C, 64, 64)`` enhanced cutouts (between the enhancement and detection stages only).
    rho : float or None
        Noise of the enhanced cutouts on the sky, in units of the nominal (reported).
    noise : EnhancedNoiseModel or None
        Their level-dependent noise, which the detection uses (None: ``rho`` everywhere).
    enhance_device : str or None
    children : Children or None
    fluxes : Fluxes or None
    catalog : Catalog or None
    truth : TruthScores or None
        Simulations only.
    stats : TileStats or None
    timing : dict of str to float
        Wall seconds per stage (``<stage>_s``).
    steps : dict of str to (float, float)
        Per step ``(process CPU s, wall s)`` (``bench/bench_tile.py`` reads them).
    """

    tile: Tile
    mode: Literal["simulation", "real"] | None = None
    source_pixel_scale_arcsec: float | None = None
    high: HighPeaks | None = None
    footprints: Footprints | None = None
    cutouts: Cutouts | None = None
    enhanced: np.ndarray | None = None
    rho: float | None = None
    noise: EnhancedNoiseModel | None = None
    enhance_device: str | None = None
    children: Children | None = None
    fluxes: Fluxes | None = None
    catalog: Catalog | None = None
    truth: TruthScores | None = None
    stats: TileStats | None = None
    timing: dict[str, float] = field(default_factory=dict)
    steps: dict[str, tuple[float, float]] = field(default_factory=dict)

    def output(self) -> "TileOutput":
        """What the commit writes (after the last stage)."""
        if self.catalog is None or self.stats is None:
            raise InputError(self.tile.source, "the tile has not been through the photometry stage")
        return TileOutput(tile_id=int(self.tile.tile_id), bands=tuple(self.tile.bands), catalog=self.catalog,
                          truth=self.truth, stats=self.stats,
                          info={"timing": dict(self.timing), "mode": self.mode, "rho": self.rho,
                                "enhance_device": self.enhance_device})


@dataclass(frozen=True, eq=False)
class TileOutput:
    """The tables and counts of one processed tile.

    Attributes
    ----------
    tile_id : int
    bands : tuple of str
        Band keys of the catalog's flux columns.
    catalog : Catalog
    truth : TruthScores or None
        Simulations only.
    stats : TileStats
    info : dict
        ``timing`` (wall s per stage), ``mode``, ``rho``, ``enhance_device``.
    """

    tile_id: int
    bands: tuple[str, ...]
    catalog: Catalog
    truth: TruthScores | None
    stats: TileStats
    info: dict[str, Any]


def enhancer_noise_scale(enhancer, config: FieldConfig) -> EnhancedNoiseModel:
    """The noise model of an :class:`~galgan_ray.enhance.Enhancer`'s images for this field's detector
    and seed, calibrated the way the blend benchmark calibrates it (:func:`galgan_ray.noise.enhanced_noise_model`
    on :func:`galgan_ray.noise.calibration_galaxies`): once per process that enhances."""
    dc = enhancer.grid.degrade_config()
    images, sigma = calibration_galaxies(dc, n=config.noise_calibration_galaxies, size=enhancer.hr_size,
                                         seed=config.seed)
    return enhanced_noise_model(enhancer, images, sigma, degrade_config=dc, psf=np.asarray(enhancer.psf_high(0)),
                                n_draws=config.noise_realizations, percentile=config.noise_percentile,
                                n_levels=config.noise_levels, seed=config.seed, det=config.detect)


# ------------------------------------------------------------------------------------------------
# Validation against the model
# ------------------------------------------------------------------------------------------------
def check_tile(tile: Tile, *, model: ModelGrid) -> Literal["simulation", "real"]:
    """Decide how a tile is processed, or raise naming the tile and the problem.

    A simulated tile on the model's HR grid is degraded first (``"simulation"``); a tile on the
    model's LR grid is processed as it is (``"real"``).

    Raises
    ------
    InputError
        Wrong band count or bands, a pixel scale matching neither grid (1% tolerance), or a tile
        smaller than one cutout.
    """
    n = len(model.low)
    if tile.n_bands != n:
        raise InputError(tile.source, f"wrong band count: the tile has {tile.n_bands} band(s) {list(tile.bands)}, "
                                      f"the model takes {n} {list(model.band_keys_low)}")
    scale = tile.pixel_scale_arcsec
    s_lo, s_hi = model.low[0].pixel_scale_arcsec, model.high[0].pixel_scale_arcsec
    if tile.simulated and abs(scale / s_hi - 1) < 0.01:
        if tuple(tile.bands) != model.band_keys_high:
            raise InputError(tile.source, f"simulated tile bands {list(tile.bands)} differ from the model's "
                                          f"high-resolution bands {list(model.band_keys_high)}")
        mode: Literal["simulation", "real"] = "simulation"
        min_side = model.hr_size
    elif abs(scale / s_lo - 1) < 0.01:
        if tuple(tile.bands) != model.band_keys_low:
            raise InputError(tile.source, f"tile bands {list(tile.bands)} differ from the model's low-resolution "
                                          f"bands {list(model.band_keys_low)}")
        mode = "real"
        min_side = model.lr_size
    else:
        raise InputError(tile.source, f"wrong pixel scale for the model: {scale:.4f}\"/px, the model takes "
                                      f"{s_lo}\"/px tiles (or simulated {s_hi}\"/px tiles)")
    if min(tile.shape) < min_side:
        raise InputError(tile.source, f"wrong shape: {tile.shape[0]}x{tile.shape[1]} px is smaller than one "
                                      f"{min_side} px cutout")
    return mode


# ------------------------------------------------------------------------------------------------
# The steps
# ------------------------------------------------------------------------------------------------
def _check(s: TileState, ctx: TileContext) -> None:
    s.mode = check_tile(s.tile, model=ctx.model)
    s.source_pixel_scale_arcsec = s.tile.pixel_scale_arcsec


def _high_peaks(s: TileState, ctx: TileContext) -> None:
    if s.mode == "simulation":
        s.high = find_high_peaks(s.tile, detect=ctx.config.detect, ratio=int(round(ctx.model.ratio)),
                                 block_px=3 * ctx.config.footprints.peak_block_px)


def _degrade(s: TileState, ctx: TileContext) -> None:
    if s.mode == "simulation":
        s.tile = degrade_tile(s.tile, config=ctx.model.degrade_config(), seed=ctx.config.seed,
                              add_noise=ctx.config.degrade_add_noise)


def _footprints(s: TileState, ctx: TileContext) -> None:
    s.footprints = find_footprints(s.tile, config=ctx.config.footprints, detect=ctx.config.detect)


def _cutouts(s: TileState, ctx: TileContext) -> None:
    s.cutouts = cut_footprint_cutouts(s.footprints, s.tile.variance, config=ctx.config.cutouts,
                                      side=ctx.model.lr_size)


def _enhance(s: TileState, ctx: TileContext) -> None:
    if ctx.enhance_fn is None or ctx.rho is None:
        raise ConfigError("enhance", "the enhancement stage needs an enhancer and its noise scale rho")
    s.cutouts, s.enhanced = enhance_cutouts_in_plane(s.footprints.image_sub, s.tile.variance, s.cutouts,
                                                     enhance_fn=ctx.enhance_fn, factor=int(round(ctx.model.ratio)),
                                                     hr_size=ctx.model.hr_size)
    if isinstance(ctx.rho, EnhancedNoiseModel):
        s.noise, s.rho = ctx.rho, float(ctx.rho(np.zeros(1))[0])
    else:
        s.rho = float(ctx.rho)
    s.enhance_device = ctx.enhance_device


def _detect(s: TileState, ctx: TileContext) -> None:
    s.children = find_children(s.enhanced, s.footprints, s.cutouts, tile_shape=s.tile.shape, psf_hr=ctx.psf_hr,
                               rho=s.noise if s.noise is not None else float(s.rho), detect=ctx.config.detect,
                               ratio=ctx.model.ratio, edge_px=ctx.config.footprints.edge_px,
                               lr_size=ctx.model.lr_size, lr_psf_fwhm_px=ctx.lr_psf_fwhm_px)


def _photometry(s: TileState, ctx: TileContext) -> None:
    fluxes = measure_children(s.footprints, s.children, s.tile.variance, psf=s.tile.psf,
                              pixel_scale_arcsec=s.tile.pixel_scale_arcsec, config=ctx.config.measure,
                              compute=ctx.compute)
    t_flux, t_err, t_flags = measure_templates(s.footprints, s.children, s.cutouts, s.enhanced, s.tile.variance,
                                               psf=s.tile.psf, psf_hr=ctx.psf_hr, factor=int(round(ctx.model.ratio)),
                                               pixel_scale_arcsec=s.tile.pixel_scale_arcsec,
                                               config=ctx.config.measure)
    s.fluxes = flag_template_fluxes(replace(fluxes, template_flux=t_flux, template_flux_err=t_err,
                                            flags=fluxes.flags | t_flags))
    s.enhanced = None  # used: it does not travel further


def _catalog(s: TileState, ctx: TileContext) -> None:
    s.catalog = build_catalog(s.tile, s.footprints, s.children, s.fluxes,
                              keep_not_primary=ctx.config.keep_not_primary,
                              keep_unsupported=ctx.config.keep_unsupported)
    s.stats = tile_stats(s.tile, s.footprints, s.cutouts, s.children, s.fluxes, s.catalog)


def _truth(s: TileState, ctx: TileContext) -> None:
    if s.tile.truth is not None:
        s.truth = score_truth(s.tile, high=s.high, footprints=s.footprints, children=s.children, catalog=s.catalog,
                              config=ctx.config.truth)


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: its name, the stage (Ray actor pool) it runs in, and its function."""

    name: str
    stage: str
    run: Callable[[TileState, TileContext], None]


#: The pipeline, in order. ``high_peaks`` and ``degrade`` act on simulated tiles only; ``truth`` on
#: tiles with a truth table.
STEPS: tuple[Step, ...] = (
    Step("check", "degrade", _check),
    Step("high_peaks", "degrade", _high_peaks),
    Step("degrade", "degrade", _degrade),
    Step("footprints", "footprints", _footprints),
    Step("cutouts", "footprints", _cutouts),
    Step("enhance", "enhance", _enhance),
    Step("detect", "detect", _detect),
    Step("photometry", "photometry", _photometry),
    Step("catalog", "photometry", _catalog),
    Step("truth", "photometry", _truth),
)
#: The stages in order (the ``stage`` of a failure row; ``<stage>_s`` timing keys).
STAGES: tuple[str, ...] = tuple(dict.fromkeys(st.stage for st in STEPS))
#: The steps under each stage's ``<stage>_s`` timing key (``bench/bench_tile.py`` reports them in order).
TILE_STEPS: dict[str, tuple[str, ...]] = {f"{g}_s": tuple(st.name for st in STEPS if st.stage == g) for g in STAGES}


def run_stage(stage: str, state: TileState, context: TileContext) -> TileState:
    """Run the steps of ``stage`` on ``state`` (in place; returned), timing each step and the stage."""
    if stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {stage!r}; the stages are {list(STAGES)}")
    t_stage = time.perf_counter()
    for st in STEPS:
        if st.stage != stage:
            continue
        c0, w0 = time.process_time(), time.perf_counter()
        st.run(state, context)
        state.steps[st.name] = (time.process_time() - c0, time.perf_counter() - w0)
    state.timing[f"{stage}_s"] = time.perf_counter() - t_stage
    return state


def process_tile(tile: Tile, *, model: ModelGrid, enhance_fn: EnhanceFn, rho: EnhancedNoiseModel | float,
                 config: FieldConfig = FieldConfig(),
                 compute: PhotometryComputeConfig = PhotometryComputeConfig()) -> TileState:
    """Run every stage on one tile, in this process (what the Ray pipeline does stage by stage).

    Parameters
    ----------
    tile : Tile
        A tile (LR, or simulated HR: it is degraded first).
    model : ModelGrid
        Bands and grids of the enhancer.
    enhance_fn : callable
        ``(image_lr (M, C, 22, 22), sigma_lr (M, C)) -> (M, C, 64, 64)`` nJy.
    rho : EnhancedNoiseModel or float
        The noise of ``enhance_fn``'s images (:func:`enhancer_noise_scale`), or one factor.
    config : FieldConfig
    compute : PhotometryComputeConfig

    Returns
    -------
    TileState
        Every step's result (``catalog``, ``truth``, ``stats``, the intermediate products, the LR
        ``tile``), ``timing`` per stage and ``steps`` per step.
    """
    context = TileContext(model=model, config=config, compute=compute, enhance_fn=enhance_fn, rho=rho)
    state = TileState(tile=tile)
    for stage in STAGES:
        run_stage(stage, state, context)
    return state


# ------------------------------------------------------------------------------------------------
# Between processes: a state or an output as bytes (no pickle)
# ------------------------------------------------------------------------------------------------
_PRODUCTS: dict[str, type] = {"high": HighPeaks, "footprints": Footprints, "cutouts": Cutouts,
                              "children": Children, "fluxes": Fluxes}
_NESTED: dict[tuple[type, str], type] = {(Footprints, "peaks"): LowPeaks}
_META = ("mode", "source_pixel_scale_arcsec", "rho", "enhance_device", "timing", "steps")


def _flatten(obj, prefix: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    for f in fields(obj):
        v = getattr(obj, f.name)
        key = f"{prefix}.{f.name}"
        if isinstance(v, np.ndarray):
            arrays[key] = v
        elif is_dataclass(v):
            _flatten(v, key, arrays, meta)
        else:
            meta[key] = v


def _rebuild(cls: type, prefix: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]):
    kw = {}
    for f in fields(cls):
        key = f"{prefix}.{f.name}"
        nested = _NESTED.get((cls, f.name))
        kw[f.name] = (_rebuild(nested, key, arrays, meta) if nested is not None
                      else arrays[key] if key in arrays else meta[key])
    return cls(**kw)


def _columns(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}


def pack_state(state: TileState) -> bytes:
    """A :class:`TileState` as bytes (:func:`galgan_ray.tiles.pack_arrays`); :func:`unpack_state` inverts it."""
    arrays, tile_meta = pack_tile_arrays(state.tile)
    arrays = {f"tile.{k}": v for k, v in arrays.items()}
    meta: dict[str, Any] = {"tile": tile_meta, "present": []}
    for name, cls in _PRODUCTS.items():
        obj = getattr(state, name)
        if obj is not None:
            meta["present"].append(name)
            _flatten(obj, name, arrays, meta)
    if state.enhanced is not None:
        arrays["enhanced"] = state.enhanced
    for k in _META:
        meta[k] = getattr(state, k)
    if state.noise is not None:
        meta["noise"] = {"levels": list(state.noise.levels), "rho": list(state.noise.rho)}
    if state.catalog is not None or state.truth is not None or state.stats is not None:
        raise InputError(state.tile.source, "a state past the catalog step travels as pack_output(state.output())")
    return pack_arrays(arrays, meta)


def unpack_state(data: bytes) -> TileState:
    """Inverse of :func:`pack_state`."""
    arrays, meta = unpack_arrays(data)
    tile = tile_from_arrays(_columns("tile", arrays), meta["tile"])
    state = TileState(tile=tile, enhanced=arrays.get("enhanced"))
    for name in meta["present"]:
        setattr(state, name, _rebuild(_PRODUCTS[name], name, arrays, meta))
    for k in _META:
        setattr(state, k, meta[k])
    if meta.get("noise"):
        state.noise = EnhancedNoiseModel(levels=tuple(meta["noise"]["levels"]), rho=tuple(meta["noise"]["rho"]))
    state.steps = {k: tuple(v) for k, v in state.steps.items()}
    return state


def pack_output(output: TileOutput) -> bytes:
    """A :class:`TileOutput` as bytes; :func:`unpack_output` inverts it."""
    arrays = {f"cat.{k}": v for k, v in output.catalog.columns.items()}
    arrays["all.objectId"] = output.catalog.all_object_id
    arrays["all.primary"] = output.catalog.all_primary
    if output.truth is not None:
        arrays.update({f"truth.{k}": v for k, v in output.truth.truth.items()})
        arrays.update({f"blend.{k}": v for k, v in output.truth.blends.items()})
    meta = {"tile_id": output.tile_id, "bands": list(output.bands), "stats": output.stats.to_dict(),
            "info": output.info, "simulated": output.truth is not None,
            "purity": output.truth.purity if output.truth is not None else {}}
    return pack_arrays(arrays, meta)


def unpack_output(data: bytes) -> TileOutput:
    """Inverse of :func:`pack_output`."""
    arrays, meta = unpack_arrays(data)
    catalog = Catalog(columns=_columns("cat", arrays), all_object_id=arrays["all.objectId"],
                      all_primary=arrays["all.primary"])
    truth = (TruthScores(truth=_columns("truth", arrays), blends=_columns("blend", arrays), purity=meta["purity"])
             if meta["simulated"] else None)
    return TileOutput(tile_id=int(meta["tile_id"]), bands=tuple(meta["bands"]), catalog=catalog, truth=truth,
                      stats=TileStats(**meta["stats"]), info=meta["info"])
