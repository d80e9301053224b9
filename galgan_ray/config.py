"""Configuration machinery shared by every stage: frozen dataclasses <-> YAML, dotted overrides.

Each stage owns one frozen dataclass (``DegradeConfig``, ``BlendConfig``, ...) defined beside its code;
job configs compose them. This module only knows how to build any such dataclass from a mapping
(unknown keys are an error naming the key), apply ``--set a.b=c`` overrides, and turn a config back
into plain data for YAML, JSON and Parquet metadata.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

from .errors import ConfigError

__all__ = ["from_dict", "to_dict", "apply_overrides", "load_config", "dump_config", "config_json"]

T = TypeVar("T")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Convert plain data ``value`` into type ``tp`` (dataclasses, tuples, optionals, scalars)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except (ConfigError, TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise ConfigError(where, f"value {value!r} fits none of {tp}: {'; '.join(errors)}")
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, where=where)
    if origin in (tuple, Sequence, list) or tp in (tuple, list):
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, tuple, list)):
            raise ConfigError(where, f"expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(where, f"expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(where, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(where, f"{value!r} is not one of {list(args)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(where, f"expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(where, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, where: str = "config") -> T:
    """Build the frozen dataclass ``cls`` from plain data.

    Unknown keys raise :class:`ConfigError` naming the full dotted key; missing keys take the
    dataclass defaults; values are coerced to the annotated types (lists become tuples).
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            where, f"unknown key(s) {', '.join(where + '.' + k for k in unknown)} for {cls.__name__}; "
            f"known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(where, str(exc)) from exc


def to_dict(cfg: Any) -> Any:
    """Turn a (nested) config dataclass into plain lists/dicts/scalars for YAML and JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if hasattr(cfg, "item") and callable(cfg.item):  # numpy scalars
        return cfg.item()
    return cfg


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {} if node.get(key) is None else node[key]
        node = node[key]
    node[path[-1]] = value


def apply_overrides(cfg: T, overrides: Sequence[str]) -> T:
    """Return ``cfg`` with dotted ``key=value`` overrides applied (values parsed as YAML).

    >>> apply_overrides(cfg, ["detect.nsigma=3", "seed=7"])  # doctest: +SKIP
    """
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}", "expected key=value, e.g. detect.nsigma=3")
        key, raw = item.split("=", 1)
        path = key.strip().split(".")
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"--set {item}", f"unknown key {'.'.join(path[: i + 1])!r}")
            node = node[part] if node[part] is not None else {}
        if not isinstance(node, dict) or (path[-1] not in node):
            raise ConfigError(f"--set {item}", f"unknown key {key!r}")
        _set_path(data, path, yaml.safe_load(raw))
    return from_dict(type(cfg), data)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Read a YAML file (keys map one to one onto ``cls``) and apply dotted overrides."""
    data: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read config: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(str(path), "the top level must be a mapping of keys")
    cfg = from_dict(cls, data, where=str(path) if path else cls.__name__)
    return apply_overrides(cfg, overrides) if overrides else cfg


def dump_config(cfg: Any) -> str:
    """YAML text of a config (round-trips through :func:`load_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_json(cfg: Any) -> str:
    """Compact, key-sorted JSON of a config, for Parquet metadata and checkpoints."""
    return json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
