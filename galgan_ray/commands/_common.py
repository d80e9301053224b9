"""Helpers shared by the command modules: config loading with overrides, printing summaries."""
from __future__ import annotations

import argparse
import json
from typing import Any, TypeVar

from ..config import load_config

T = TypeVar("T")

__all__ = ["add_config_arguments", "config_from_args", "print_json"]


def add_config_arguments(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--config FILE.yaml`` and repeatable ``--set key=value`` (dotted keys)."""
    parser.add_argument("--config", metavar="YAML", help=f"{what} config (keys map onto the dataclass; "
                                                           "unknown keys are an error)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set blends.sep_scale_arcsec=0.8 (repeatable)")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
