"""The ``<Verb>Stage`` actors of the field job: each runs one stage of :data:`galgan_ray.field.STEPS`.

A stage unpacks each ``ok`` row's :class:`~galgan_ray.field.TileState`, calls
:func:`galgan_ray.field.run_stage` (the same call :func:`galgan_ray.field.process_tile` makes) and
packs the state again; after the last stage only the tile's :class:`~galgan_ray.field.TileOutput`
travels on. Failures pass through; an exception becomes a failure row naming the stage, so the
rest of the field completes.

Ray Data runs them as fixed-size actor pools, so each process starts (and imports numpy, torch,
astropy: seconds of CPU and ~0.3 GB each) once per job, never once per tile.
:class:`PrepareStage` (degrade + footprints) and :class:`MeasureStage` (detect + photometry) run
two stages one after the other in one actor: footprints and detection are too light to be worth a
process of their own, and each stage keeps its own class, timer and failure name. Where the model
runs on CPU, :class:`ProcessStage` runs all five in one actor (the job's ``compute.layout``): one
process per core to start, and no tile state between processes.
"""
from __future__ import annotations

import logging
import traceback
from typing import Any

import numpy as np
import ray
import torch

from ..checkpoint import ModelGrid
from ..enhance import Enhancer
from ..field import (STAGES, FieldConfig, TileContext, enhancer_noise_scale, pack_output, pack_state, run_stage,
                     unpack_state)
from ..photometry import PhotometryComputeConfig
from ..storage import StorageConfig
from .rows import batch_rows, failure_reason, make_row, rows_to_batch

__all__ = ["DegradeStage", "FootprintStage", "EnhanceStage", "DetectStage", "PhotometerStage", "PrepareStage",
           "MeasureStage", "ProcessStage"]

log = logging.getLogger(__name__)


class _TileStage:
    """Base of the ``<Verb>Stage`` classes: one stage of the pipeline on each ``ok`` row."""

    stage = "stage"

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1, **context: Any):
        torch.set_num_threads(int(torch_threads))
        self.model, self.config = model, config
        self.context = TileContext(model=model, config=config, **context)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        state = run_stage(self.stage, unpack_state(row["payload"]), self.context)
        payload = pack_output(state.output()) if self.stage == STAGES[-1] else pack_state(state)
        return make_row(state.tile.tile_id, row["source"], "ok", self.stage, "", payload)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in batch_rows(batch):
            if row["status"] != "ok":
                out.append(row)
                continue
            try:
                out.append(self._one(row))
            except Exception as exc:  # noqa: BLE001 - a bad tile must not stop the field
                log.warning("%s failed on %s:\n%s", self.stage, row["source"], traceback.format_exc())
                out.append(make_row(row["tileId"], row["source"], "failed", self.stage,
                                    failure_reason(exc, row["source"]), b""))
        return rows_to_batch(out)


class DegradeStage(_TileStage):
    """Check a tile against the model; degrade simulated HR tiles to the model's LR grid."""

    stage = "degrade"


class FootprintStage(_TileStage):
    """Footprints (sep) and LR peaks on the LR tile, and the 22x22 cutouts to enhance."""

    stage = "footprints"


class DetectStage(_TileStage):
    """Peaks on the enhanced cutouts -> children of each footprint on the tile grid."""

    stage = "detect"


class PhotometerStage(_TileStage):
    """Photometry of the children on the LR image, the catalog and (simulations) the truth scores;
    the row leaving it carries only the tables and the tile's counts, not the images."""

    stage = "photometry"

    def __init__(self, model: ModelGrid, config: FieldConfig, *,
                 compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"), torch_threads: int = 1):
        super().__init__(model, config, torch_threads=torch_threads, compute=compute)
        self.compute = compute


class EnhanceStage(_TileStage):
    """The super-resolution model on each tile, fully convolutionally where its footprint cutouts lie.

    The checkpoint is loaded and the noise of enhanced images calibrated once per actor. Runs on
    the GPU Ray assigned to the actor, else on CPU.

    Parameters
    ----------
    checkpoint : str
        Checkpoint path/URL.
    config : FieldConfig
    batch_size : int
    device : str, optional
        Default ``cuda`` when this actor got a GPU, else ``cpu``.
    storage : StorageConfig
        For a checkpoint on object storage.
    torch_threads : int
    precision : {"fp32", "bf16"}
        The forward pass's arithmetic (:class:`galgan_ray.enhance.Enhancer`).
    """

    stage = "enhance"

    def __init__(self, checkpoint: str, config: FieldConfig, *, batch_size: int = 256, device: str | None = None,
                 storage: StorageConfig = StorageConfig(), torch_threads: int = 1, precision: str = "fp32"):
        torch.set_num_threads(int(torch_threads))
        storage.apply_defaults()
        if device is None:
            # ray.is_initialized() first: ray.get_gpu_ids() would start (or join) a Ray instance
            # when the stage is built outside Ray (a notebook, a test).
            device = "cuda" if (ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available()) else "cpu"
        self.device = device
        self.enhancer = Enhancer(checkpoint, device=device, batch_size=batch_size, precision=precision)
        self.rho = enhancer_noise_scale(self.enhancer, config)  # calibrated in the same arithmetic
        where = str(device) if precision == "fp32" else f"{device} ({precision})"
        super().__init__(self.enhancer.grid, config, torch_threads=torch_threads,
                         enhance_fn=self.enhancer.enhance_plane, rho=self.rho, enhance_device=where)


class _StageSequence:
    """Consecutive stages run one after the other in one actor: one pool and one process for
    stages too light to be worth their own. Each keeps its own class, timer and failure name (a
    tile failed by the first passes through the next, as between pools).

    Parameters
    ----------
    *specs : tuple of (class, tuple, dict)
        The stages in order, as ``(cls, args, kwargs)``: they are built in the actor, not in the
        driver (a stage's ``__init__`` sets torch's threads in its process).
    """

    def __init__(self, *specs: tuple[type, tuple, dict]):
        self.stages = [cls(*args, **kwargs) for cls, args, kwargs in specs]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for stage in self.stages:
            batch = stage(batch)
        return batch


class PrepareStage(_StageSequence):
    """:class:`DegradeStage` then :class:`FootprintStage` in one actor (and, fused in by Ray Data,
    the read before them): the low-resolution tile and the cutouts to enhance."""

    @staticmethod
    def specs(model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1) -> list[tuple[type, tuple, dict]]:
        kw = dict(torch_threads=torch_threads)
        return [(DegradeStage, (model, config), kw), (FootprintStage, (model, config), kw)]

    def __init__(self, model: ModelGrid, config: FieldConfig, *, torch_threads: int = 1):
        super().__init__(*self.specs(model, config, torch_threads=torch_threads))


class MeasureStage(_StageSequence):
    """:class:`DetectStage` then :class:`PhotometerStage` in one actor: the children found on the
    enhanced cutouts, then their fluxes on the low-resolution image."""

    @staticmethod
    def specs(model: ModelGrid, config: FieldConfig, *,
              compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"),
              torch_threads: int = 1) -> list[tuple[type, tuple, dict]]:
        return [(DetectStage, (model, config), dict(torch_threads=torch_threads)),
                (PhotometerStage, (model, config), dict(compute=compute, torch_threads=torch_threads))]

    def __init__(self, model: ModelGrid, config: FieldConfig, *,
                 compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"), torch_threads: int = 1):
        super().__init__(*self.specs(model, config, compute=compute, torch_threads=torch_threads))


class ProcessStage(_StageSequence):
    """Every stage in one actor (:class:`PrepareStage`, :class:`EnhanceStage`, :class:`MeasureStage`
    one after the other): the field job's pool where the model runs on CPU (``compute.layout``).

    A CPU cluster gains nothing from separate pools: each actor process imports the stack and the
    enhancement actors load and calibrate the model (seconds of CPU each, before the first tile), and
    each tile's state is serialised between pools. One pool of as many actors as cores starts fewer
    than half the processes (3 actors against 7 on 2 CPUs) and keeps each tile in one. The stages,
    their timers and failure names, and so the catalog, are those of the three pools.

    Parameters
    ----------
    model : ModelGrid
    checkpoint : str
    config : FieldConfig
    compute : PhotometryComputeConfig
    torch_threads : int
    **enhance : Any
        :class:`EnhanceStage`'s keywords (``batch_size``, ``precision``, ``storage``, ``device``).
    """

    def __init__(self, model: ModelGrid, checkpoint: str, config: FieldConfig, *,
                 compute: PhotometryComputeConfig = PhotometryComputeConfig(device="cpu"), torch_threads: int = 1,
                 **enhance: Any):
        super().__init__(*PrepareStage.specs(model, config, torch_threads=torch_threads),
                         (EnhanceStage, (checkpoint, config), dict(enhance, torch_threads=torch_threads)),
                         *MeasureStage.specs(model, config, compute=compute, torch_threads=torch_threads))
