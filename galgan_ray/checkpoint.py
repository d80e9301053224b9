"""Self-describing, tamper-evident model checkpoints on any fsspec URL.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts:

- ``generator``, ``discriminator``: state dicts; ``optimizer_g``, ``optimizer_d``: optimiser states;
- ``meta_json``: JSON text with the model kind and config, the training config, the arcsinh scaling,
  the bands (``BandConfig`` dicts, high and low resolution), epoch, step, metrics, package version,
  git revision, torch version and creation time;
- ``sha256``: the SHA-256 of everything above (tensor bytes, dtypes, shapes, keys and the meta text).

:func:`load_checkpoint` reads it with ``torch.load(..., weights_only=True)`` (no pickled classes can
run code), checks the hash, checks bands and pixel scales against what the caller expects, and
rebuilds the generator from the stored config alone. Paths may be local or fsspec URLs
(``s3://bucket/run/ckpt.pt``, ``memory://...``); a directory (e.g. a Ray Train checkpoint) holds the
file as ``checkpoint.pt``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import fsspec
import numpy as np
import torch
from torch import nn

from . import __version__
from .config import from_dict, to_dict
from .degrade import DegradeConfig
from .errors import CheckpointError, InputError
from .instrument import BandConfig
from .models import DCGANConfig, SRGANConfig, build_generator
from .provenance import git_revision as _current_git_revision
from .psf import draw_psf
from .scaling import ArcsinhScaling

__all__ = ["CHECKPOINT_FILENAME", "FORMAT", "save_checkpoint", "load_checkpoint", "load_training_state",
           "read_checkpoint", "checkpoint_file", "ModelGrid"]

CHECKPOINT_FILENAME = "checkpoint.pt"
FORMAT = "galgan-ray-checkpoint/1"
_MODEL_KINDS = {"SRGANConfig": SRGANConfig, "DCGANConfig": DCGANConfig}
_PAYLOAD_KEYS = ("format", "generator", "discriminator", "optimizer_g", "optimizer_d", "meta_json")


# ----------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------
def checkpoint_file(path_or_dir: str | os.PathLike) -> str:
    """The checkpoint file of ``path_or_dir``: itself, or ``<dir>/checkpoint.pt`` for a directory.

    A path is a directory when it ends with ``/`` or exists as a directory (local or remote).
    """
    p = str(path_or_dir)
    if p.endswith("/"):
        return p + CHECKPOINT_FILENAME
    fs, fs_path = fsspec.core.url_to_fs(p)
    try:
        if fs.isdir(fs_path):
            return p.rstrip("/") + "/" + CHECKPOINT_FILENAME
    except Exception:  # noqa: BLE001 - an unreachable store is reported when the file is opened
        pass
    return p


# ----------------------------------------------------------------------------------------------
# Hashing
# ----------------------------------------------------------------------------------------------
def _update_hash(h, obj: Any) -> None:
    """Feed a canonical serialisation of nested dicts / lists / tensors / scalars into ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode() + b":")
            _update_hash(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _update_hash(h, v)
            h.update(b",")
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def _digest(payload: Mapping[str, Any]) -> str:
    h = hashlib.sha256()
    for key in _PAYLOAD_KEYS:
        h.update(key.encode())
        _update_hash(h, payload.get(key))
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Bands
# ----------------------------------------------------------------------------------------------
def _band_dict(band: BandConfig | Mapping[str, Any]) -> dict:
    if isinstance(band, BandConfig):
        return to_dict(band)
    return to_dict(from_dict(BandConfig, band, where="bands"))


def _bands_meta(bands) -> dict | None:
    if bands is None:
        return None
    if isinstance(bands, Mapping):
        high, low = bands.get("high", ()), bands.get("low", ())
    else:
        high, low = bands
    return {"high": [_band_dict(b) for b in high], "low": [_band_dict(b) for b in low]}


def _band_key(b: BandConfig | Mapping[str, Any] | str) -> str:
    if isinstance(b, str):
        return b
    if isinstance(b, BandConfig):
        return b.key
    return f"{b['survey']}/{b['name']}"


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------
def save_checkpoint(path_or_dir: str | os.PathLike, *, generator_state: Mapping[str, torch.Tensor],
                    model_cfg: SRGANConfig | DCGANConfig, discriminator_state: Mapping[str, torch.Tensor] | None = None,
                    optimizer_g_state: Mapping[str, Any] | None = None,
                    optimizer_d_state: Mapping[str, Any] | None = None, train_cfg: Any = None,
                    scaling: ArcsinhScaling | None = None,
                    bands: Mapping[str, Sequence[BandConfig | Mapping]] | tuple | None = None,
                    epoch: int = 0, step: int = 0, metrics: Mapping[str, Any] | None = None,
                    package_version: str | None = None, git_revision: str | None = None,
                    extra: Mapping[str, Any] | None = None) -> str:
    """Write a checkpoint (see the module docstring) and return the file's path/URL.

    Parameters
    ----------
    path_or_dir : str or os.PathLike
        File path/URL, or a directory (existing, or ending with ``/``) to hold ``checkpoint.pt``.
    generator_state : mapping of str to Tensor
        ``generator.state_dict()`` (of the unwrapped module).
    model_cfg : SRGANConfig or DCGANConfig
        Enough to rebuild the generator.
    discriminator_state, optimizer_g_state, optimizer_d_state : optional
        For resuming training.
    train_cfg : dataclass, optional
        The training config (stored as plain data).
    scaling : ArcsinhScaling, optional
        Default ``model_cfg.scaling``.
    bands : {"high": [...], "low": [...]} or (high, low), optional
        ``BandConfig`` objects (or their dicts) of the target and input images, in channel order.
    epoch, step : int
        Completed epochs and steps.
    metrics : mapping, optional
        JSON-able validation metrics.
    package_version, git_revision : str, optional
        Default: this package's version and ``git rev-parse HEAD`` (None outside a git checkout).
    extra : mapping, optional
        Further JSON-able metadata.

    Returns
    -------
    str
        Where the checkpoint was written.
    """
    if type(model_cfg).__name__ not in _MODEL_KINDS:
        raise CheckpointError(str(path_or_dir), f"unknown model config {type(model_cfg).__name__}")
    meta = {
        "format": FORMAT,
        "model": {"kind": type(model_cfg).__name__, "config": to_dict(model_cfg)},
        "train": to_dict(train_cfg) if train_cfg is not None else None,
        "scaling": to_dict(scaling or model_cfg.scaling),
        "bands": _bands_meta(bands),
        "epoch": int(epoch),
        "step": int(step),
        "metrics": to_dict(dict(metrics or {})),
        "package_version": package_version or __version__,
        "git_revision": git_revision if git_revision is not None else _current_git_revision(),
        "torch_version": torch.__version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": to_dict(dict(extra or {})),
    }
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=True)
    except TypeError as exc:
        raise CheckpointError(str(path_or_dir), f"metadata is not JSON-able: {exc}") from exc

    def cpu(sd):
        if sd is None:
            return None
        return {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}

    payload = {
        "format": FORMAT,
        "generator": cpu(generator_state),
        "discriminator": cpu(discriminator_state),
        "optimizer_g": _to_cpu(optimizer_g_state),
        "optimizer_d": _to_cpu(optimizer_d_state),
        "meta_json": meta_json,
    }
    payload["sha256"] = _digest(payload)
    buf = io.BytesIO()
    torch.save(payload, buf)
    target = checkpoint_file(path_or_dir)
    try:
        fs, fs_path = fsspec.core.url_to_fs(target)
        parent = fs._parent(fs_path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fsspec.open(target, "wb") as f:
            f.write(buf.getvalue())
    except OSError as exc:
        raise CheckpointError(target, f"cannot write checkpoint: {exc}") from exc
    return target


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read and verify a checkpoint file: ``(payload, meta)``.

    Raises
    ------
    CheckpointError
        Unreadable, not a galgan-ray checkpoint, unsafe content, or the SHA-256 does not match.
    """
    target = checkpoint_file(path)
    try:
        with fsspec.open(target, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        raise CheckpointError(target, f"cannot read checkpoint: {exc}") from exc
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(target, f"not a loadable weights-only checkpoint: {exc}") from exc
    if not isinstance(payload, Mapping) or payload.get("format") != FORMAT:
        raise CheckpointError(target, f"not a {FORMAT} file")
    stored = payload.get("sha256")
    if not isinstance(stored, str) or _digest(payload) != stored:
        raise CheckpointError(target, "SHA-256 of weights and metadata does not match the stored hash: "
                                      "the file was modified or corrupted")
    try:
        meta = json.loads(payload["meta_json"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(target, f"metadata unreadable: {exc}") from exc
    meta["path"] = target
    meta["sha256"] = stored
    return dict(payload), meta


def _check_expectations(target: str, meta: Mapping[str, Any], expect_bands, expect_pixel_scales) -> None:
    bands = meta.get("bands")
    if expect_bands is not None:
        if not bands:
            raise CheckpointError(target, "the checkpoint records no bands, cannot check the expected ones")
        exp = expect_bands if isinstance(expect_bands, Mapping) else {"high": expect_bands[0], "low": expect_bands[1]}
        for res in ("high", "low"):
            if res in exp and exp[res] is not None:
                want = [_band_key(b) for b in exp[res]]
                have = [_band_key(b) for b in bands.get(res, [])]
                if want != have:
                    raise CheckpointError(target, f"made for {res}-resolution bands {have}, expected {want}")
    if expect_pixel_scales is not None:
        if not bands:
            raise CheckpointError(target, "the checkpoint records no bands, cannot check pixel scales")
        exp = (expect_pixel_scales if isinstance(expect_pixel_scales, Mapping)
               else {"high": expect_pixel_scales[0], "low": expect_pixel_scales[1]})
        for res, want in exp.items():
            if want is None:
                continue
            for b in bands.get(res, []):
                have = float(b["pixel_scale_arcsec"])
                if abs(have - float(want)) > 1e-6 * max(abs(float(want)), 1e-12):
                    raise CheckpointError(target, f"made for {res}-resolution pixel scale {have}\"/px "
                                                  f"({_band_key(b)}), expected {float(want)}\"/px")


def _model_cfg(target: str, meta: Mapping[str, Any]) -> SRGANConfig | DCGANConfig:
    model = meta.get("model") or {}
    cls = _MODEL_KINDS.get(model.get("kind"))
    if cls is None:
        raise CheckpointError(target, f"unknown model kind {model.get('kind')!r}")
    try:
        return from_dict(cls, model.get("config") or {}, where=f"{target}:model")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(target, f"model config cannot be rebuilt: {exc}") from exc


def load_checkpoint(path: str | os.PathLike, *, expect_bands=None, expect_pixel_scales=None,
                    device: str | torch.device | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the generator of a checkpoint, after checking its integrity and what it was made for.

    Parameters
    ----------
    path : str or os.PathLike
        Checkpoint file or directory; local path or fsspec URL.
    expect_bands : {"high": [...], "low": [...]} or (high, low), optional
        Bands (``BandConfig``, band dicts or ``"survey/name"`` keys) in channel order; compared by key.
        Either resolution may be left out.
    expect_pixel_scales : {"high": float, "low": float} or (high, low), optional
        Pixel scales in arcsec that every stored band must have (relative tolerance 1e-6).
    device : str or torch.device, optional
        Default ``cuda`` when available, else ``cpu``.

    Returns
    -------
    generator : torch.nn.Module
        In eval mode on ``device``.
    meta : dict
        ``model`` (kind, config), ``train``, ``scaling``, ``bands``, ``epoch``, ``step``, ``metrics``,
        ``package_version``, ``git_revision``, ``torch_version``, ``created_utc``, ``extra``, plus
        ``path`` and ``sha256``.

    Raises
    ------
    CheckpointError
        Naming the file: unreadable, tampered with (hash mismatch), other bands or pixel scales, or a
        model that cannot be rebuilt.
    """
    payload, meta = read_checkpoint(path)
    target = meta["path"]
    _check_expectations(target, meta, expect_bands, expect_pixel_scales)
    cfg = _model_cfg(target, meta)
    gen = build_generator(cfg)
    try:
        gen.load_state_dict(payload["generator"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(target, f"generator weights do not fit the stored config: {exc}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return gen.to(device).eval(), meta


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Everything needed to resume training (``start_state`` of :func:`galgan_ray.training.train_srgan`).

    Returns
    -------
    dict
        ``generator``, ``discriminator``, ``optimizer_g``, ``optimizer_d`` (state dicts or None),
        ``epoch``, ``step``, ``meta`` and ``path``.
    """
    payload, meta = read_checkpoint(path)
    return {
        "generator": payload["generator"], "discriminator": payload.get("discriminator"),
        "optimizer_g": payload.get("optimizer_g"), "optimizer_d": payload.get("optimizer_d"),
        "epoch": int(meta.get("epoch", 0)), "step": int(meta.get("step", 0)), "meta": meta,
        "path": meta["path"],
    }


# ----------------------------------------------------------------------------------------------
# What a super-resolution checkpoint was made for
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelGrid:
    """What a super-resolution model was made for: its bands (channel order) and cutout grids.

    The one reader of a checkpoint's grids: :class:`galgan_ray.enhance.Enhancer` and the field job
    both build it with :meth:`from_checkpoint_meta`.

    Attributes
    ----------
    high, low : tuple of BandConfig
        The model's HR (output) and LR (input) bands.
    lr_size, hr_size : int
        Cutout sides (22 and 64).
    """

    high: tuple[BandConfig, ...]
    low: tuple[BandConfig, ...]
    lr_size: int = 22
    hr_size: int = 64

    @property
    def ratio(self) -> float:
        """LR / HR pixel-scale ratio (3)."""
        return self.low[0].pixel_scale_arcsec / self.high[0].pixel_scale_arcsec

    @property
    def band_keys_low(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.low)

    @property
    def band_keys_high(self) -> tuple[str, ...]:
        return tuple(b.key for b in self.high)

    def degrade_config(self) -> DegradeConfig:
        """The degradation that makes this model's inputs from its targets."""
        return DegradeConfig(high=self.high, low=self.low)

    def psf_high(self, band: int = 0, *, size: int | None = None) -> np.ndarray:
        """The PSF of the HR targets in ``band``, drawn at the HR pixel scale (for peaks on enhanced images)."""
        return np.asarray(draw_psf(self.high[band].psf, pixel_scale_arcsec=self.high[band].pixel_scale_arcsec,
                                   size=size))

    def psf_low(self, band: int = 0, *, size: int | None = None) -> np.ndarray:
        """The effective PSF of the LR inputs in ``band``, drawn at the LR scale (LR pixel included)."""
        return np.asarray(draw_psf(self.low[band].psf, pixel_scale_arcsec=self.low[0].pixel_scale_arcsec, size=size))

    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any], *, source: str = "checkpoint") -> "ModelGrid":
        """From the ``meta`` of :func:`read_checkpoint` / :func:`load_checkpoint`.

        Raises
        ------
        InputError
            The checkpoint records no high or low bands (grids and PSFs unknown).
        """
        bands = meta.get("bands") or {}
        for res in ("low", "high"):
            if not bands.get(res):
                raise InputError(source, f"the checkpoint records no {res}-resolution bands, so the grids and PSF "
                                         f"it was trained for are unknown; re-save it with bands=...")
        model = (meta.get("model") or {}).get("config") or {}
        return cls(high=tuple(from_dict(BandConfig, b, where=f"{source}:bands.high") for b in bands["high"]),
                   low=tuple(from_dict(BandConfig, b, where=f"{source}:bands.low") for b in bands["low"]),
                   lr_size=int(model.get("lr_size", 22)), hr_size=int(model.get("hr_size", 64)))
