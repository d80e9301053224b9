"""The field processor's pure core: one survey tile in, its catalog (and, for simulations, truth scores) out.

No Ray here: every step runs on one tile in a notebook or a test. The steps, in the order data
flows, each one function in its own room with its own frozen config and a typed result
(:data:`~galgan_ray.field.pipeline.STEPS` lists them once; :func:`process_tile` runs them all, and
the Ray job's ``<Verb>Stage`` actors run the same steps stage by stage):

0. **Check** (:func:`~galgan_ray.field.pipeline.check_tile`): the tile's bands and pixel scale against
   the model: a simulated tile on the model's high-resolution grid is degraded first, a tile on
   its low-resolution grid is processed as it is.
1. **Degrade** (simulations only; :func:`galgan_ray.degrade.degrade_tile`): the HST-like tile to the
   HSC-like grid, noise shared by overlapping tiles; the true HR sky's peaks are kept for the
   statistics first (:func:`~galgan_ray.field.truth.find_high_peaks`).
2. **Footprints** (:mod:`~galgan_ray.field.footprints`, :func:`find_footprints` -> :class:`Footprints`):
   background, sep footprints (the low-resolution parents) and the LR peaks.
3. **Cutouts** (:mod:`~galgan_ray.field.cutouts`, :func:`cut_footprint_cutouts` -> :class:`Cutouts`):
   the model's 22 x 22 cutouts on the footprints, a grid over large ones.
4. **Enhance**: the super-resolution model on the cutouts (a callable passed in;
   :class:`galgan_ray.enhance.Enhancer` in the pipeline).
5. **Detect** (:mod:`~galgan_ray.field.children`, :func:`find_children` -> :class:`Children`): peaks
   of the enhanced cutouts become the children of each footprint on the tile grid.
6. **Measure** (:mod:`~galgan_ray.field.measure`, :func:`measure_children` -> :class:`Fluxes`):
   Gaussian-mixture forced photometry on the LR image at the children's positions.
7. **Catalog** (:mod:`~galgan_ray.field.catalog`, :func:`build_catalog` -> :class:`Catalog`): ids,
   ownership by the tile's inner region, the Rubin-style columns of :mod:`galgan_ray.schema`.
8. **Truth** (simulations; :mod:`~galgan_ray.field.truth`, :func:`score_truth` -> :class:`TruthScores`):
   truth sources matched at high, low and enhanced resolution, and the blends table.

:mod:`~galgan_ray.field.pipeline` composes them (:func:`process_tile`, :func:`run_stage`) and moves a
tile's :class:`TileState` between processes (:func:`pack_state`). The Ray shell is
:mod:`galgan_ray.ray_shell`; the noise calibration of enhanced images is :mod:`galgan_ray.noise`.
"""
from .catalog import ID_SHIFT, PARENT_BIT, Catalog, TileStats, build_catalog, tile_stats
from .children import Children, find_children
from .cutouts import CutoutConfig, Cutouts, cut_footprint_cutouts
from .footprints import FootprintConfig, Footprints, LowPeaks, find_footprints
from .measure import Fluxes, MeasureConfig, measure_children
from .pipeline import (STAGES, STEPS, TILE_STEPS, FieldConfig, Step, TileContext, TileOutput, TileState, check_tile,
                       enhancer_noise_scale, pack_output, pack_state, process_tile, run_stage, unpack_output,
                       unpack_state)
from .truth import HighPeaks, TruthConfig, TruthScores, find_high_peaks, score_truth

__all__ = [
    "FieldConfig", "FootprintConfig", "CutoutConfig", "MeasureConfig", "TruthConfig",
    "Footprints", "LowPeaks", "Cutouts", "Children", "Fluxes", "Catalog", "TileStats", "HighPeaks", "TruthScores",
    "TileContext", "TileState", "TileOutput", "Step", "STEPS", "STAGES", "TILE_STEPS",
    "check_tile", "enhancer_noise_scale", "find_high_peaks", "find_footprints", "cut_footprint_cutouts",
    "find_children", "measure_children",
    "build_catalog", "tile_stats", "score_truth", "run_stage", "process_tile",
    "pack_state", "unpack_state", "pack_output", "unpack_output", "ID_SHIFT", "PARENT_BIT",
]
