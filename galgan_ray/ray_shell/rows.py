"""The rows the field job's Ray dataset carries: one per tile, from the read to the commit.

A tile's arrays ride in one ``payload`` column of bytes (:func:`galgan_ray.field.pack_state`,
:func:`galgan_ray.field.pack_output`), because tiles differ in shape and Ray's tensor columns need
one shape per block. A row whose ``status`` is not ``ok`` is a failure (``stage``, ``reason``) that
later stages pass through to the commit.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from ..errors import InputError

__all__ = ["ROW_COLUMNS", "make_row", "rows_to_batch", "batch_rows", "rows_table", "failure_reason"]

#: Columns of a pipeline row.
ROW_COLUMNS: tuple[str, ...] = ("tileId", "source", "status", "stage", "reason", "payload")


def make_row(tile_id: int, source: str, status: str, stage: str, reason: str, payload: bytes) -> dict[str, Any]:
    """One pipeline row (:data:`ROW_COLUMNS`)."""
    return {"tileId": int(tile_id), "source": str(source), "status": status, "stage": stage, "reason": reason,
            "payload": payload}


def rows_to_batch(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Rows -> a numpy batch of Ray Data."""
    return {
        "tileId": np.array([r["tileId"] for r in rows], dtype=np.int64),
        **{k: np.array([r[k] for r in rows], dtype=object) for k in ("source", "status", "stage", "reason", "payload")},
    }


def batch_rows(batch: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """A numpy batch of Ray Data -> rows."""
    out = []
    for i in range(len(batch["source"])):
        payload = batch["payload"][i]
        out.append({"tileId": int(batch["tileId"][i]), "source": str(batch["source"][i]),
                    "status": str(batch["status"][i]), "stage": str(batch["stage"][i]),
                    "reason": str(batch["reason"][i]), "payload": bytes(payload) if payload is not None else b""})
    return out


def rows_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows -> an Arrow table (what a read task yields)."""
    return pa.table({
        "tileId": pa.array([r["tileId"] for r in rows], pa.int64()),
        "source": pa.array([r["source"] for r in rows], pa.string()),
        "status": pa.array([r["status"] for r in rows], pa.string()),
        "stage": pa.array([r["stage"] for r in rows], pa.string()),
        "reason": pa.array([r["reason"] for r in rows], pa.string()),
        "payload": pa.array([r["payload"] for r in rows], pa.binary()),
    })


def failure_reason(exc: BaseException, source: str) -> str:
    """The failure reason: InputErrors already name the input; other errors get the source prepended."""
    if isinstance(exc, InputError):
        return str(exc)
    return f"{source}: {type(exc).__name__}: {exc}"
