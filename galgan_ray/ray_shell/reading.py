"""Read: survey tiles at fsspec URLs as a Ray dataset of pipeline rows, one read task per tile; and a
run's committed tables as Ray datasets for the aggregation jobs (the layout is :mod:`galgan_ray.outputs`).

A tile source is one of the package's tile files, a row of a Parquet file of tiles, or a survey patch
(:func:`galgan_ray.tiles.patch_source`: HSC cutouts/patches as delivered, with their PSF files), which
is brought onto the model's grid as ``galgan deblend`` brings one image
(:func:`galgan_ray.survey.read_survey_patch`)."""
from __future__ import annotations

import io
from typing import Any, Iterable, Sequence

import pyarrow as pa
import ray.data
from astropy.io import fits
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from ..checkpoint import ModelGrid
from ..detect import DetectConfig
from ..errors import InputError
from ..field import FootprintConfig, TileState, pack_state
from ..outputs import run_files, run_filesystem
from ..storage import StorageConfig
from ..survey import patch_tile_id, read_survey_patch
from ..tiles import PATCH_TAG, read_tile, read_tile_source, read_url_bytes
from .rows import failure_reason, make_row, rows_table

__all__ = ["TileDatasource", "read_tile_row", "read_run_dataset"]


def _peek_tile_id(data: bytes) -> int:
    try:
        with fits.open(io.BytesIO(data), lazy_load_hdus=True) as hdul:
            for hdu in hdul[:2]:
                if "TILEID" in hdu.header:
                    return int(hdu.header["TILEID"])
    except Exception:  # noqa: BLE001 - only a hint for the failure row
        pass
    return -1


def read_tile_row(source: str, storage: StorageConfig, model: ModelGrid | None = None,
                  footprints: FootprintConfig | None = None, detect: DetectConfig | None = None) -> dict[str, Any]:
    """One tile source -> a pipeline row: ``ok`` with the packed :class:`~galgan_ray.field.TileState`,
    or ``failed`` at stage ``read`` with the reason (every problem becomes a failure row). A survey
    patch needs the ``model`` whose grid it is brought onto, and is detected on its own pixels with
    the field config's ``footprints`` and ``detect`` (:attr:`galgan_ray.tiles.Tile.detections`)."""
    try:
        if PATCH_TAG in source:
            key = source.split(PATCH_TAG, 1)[0]
            if model is None:
                return make_row(patch_tile_id(key), source, "failed", "read",
                                f"{key}: a survey patch is read onto a model's grid; no model was given", b"")
            try:
                tile, _ = read_survey_patch(source, model=model, storage_options=storage.options_for(key),
                                            footprints=footprints, detect=detect)
            except InputError as exc:
                return make_row(patch_tile_id(key), source, "failed", "read", str(exc), b"")
        elif "#row=" in source or source.lower().endswith(".parquet"):  # a Parquet row, or an unlistable file
            tile = read_tile_source(source, storage_options=storage.options_for(source))
        else:
            data = read_url_bytes(source, storage_options=storage.options_for(source))
            try:
                tile = read_tile(data, source=source)
            except InputError as exc:
                return make_row(_peek_tile_id(data), source, "failed", "read", str(exc), b"")
        return make_row(tile.tile_id, source, "ok", "read", "", pack_state(TileState(tile=tile)))
    except Exception as exc:  # noqa: BLE001 - every problem becomes a failure row
        return make_row(-1, source, "failed", "read", failure_reason(exc, source), b"")


class TileDatasource(Datasource):
    """Tiles at fsspec URLs as a Ray dataset of pipeline rows (:data:`~galgan_ray.ray_shell.rows.ROW_COLUMNS`),
    one read task per tile, so tiles stream through the pipeline and are never all in memory.

    An unreadable URL, a corrupt file or a tile that fails validation becomes a row with
    ``status = "failed"``, ``stage = "read"`` and the reason.

    Parameters
    ----------
    sources : sequence of str
        Tile sources (:func:`galgan_ray.tiles.list_tile_sources`).
    storage : StorageConfig
    model : ModelGrid, optional
        The model's grids, onto which survey patches are brought.
    footprints, detect : FootprintConfig, DetectConfig, optional
        The field config's, for the plain detection of survey patches on their own pixels.
    """

    def __init__(self, sources: Sequence[str], *, storage: StorageConfig = StorageConfig(),
                 model: ModelGrid | None = None, footprints: FootprintConfig | None = None,
                 detect: DetectConfig | None = None):
        self.sources = list(sources)
        self.storage = storage
        self.model = model
        self.footprints = footprints
        self.detect = detect

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        storage, model, footprints, detect = self.storage, self.model, self.footprints, self.detect
        tasks = []
        for source in self.sources:
            def read_fn(source=source) -> Iterable[pa.Table]:
                yield rows_table([read_tile_row(source, storage, model, footprints, detect)])

            meta = BlockMetadata(num_rows=1, size_bytes=None, exec_stats=None, input_files=(source,))
            tasks.append(ReadTask(read_fn, meta))
        return tasks


def read_run_dataset(output: str, *, what: str = "catalog", storage: StorageConfig = StorageConfig(),
                     columns: Sequence[str] | None = None) -> ray.data.Dataset | None:
    """A run's committed table ``what`` (``catalog``, ``truth``, ``blends``) as a Ray dataset, or None
    when the run has none."""
    files = run_files(output, what=what, storage=storage)
    if not files:
        return None
    return ray.data.read_parquet(files, filesystem=run_filesystem(output, storage=storage),
                                 columns=list(columns) if columns else None, partitioning=None)
