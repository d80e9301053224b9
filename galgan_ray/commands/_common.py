"""Helpers shared by the command modules and the job scripts: config loading with overrides, printing
summaries."""
from __future__ import annotations

import argparse
import json
from importlib import resources
from typing import Any, Sequence, TypeVar

from ..config import load_config
from ..enhance import PRECISIONS

T = TypeVar("T")

__all__ = ["add_config_arguments", "add_precision_argument", "config_from_args", "print_json"]


def add_config_arguments(parser: argparse.ArgumentParser, *, what: str, default: str | None = None) -> None:
    """``--config FILE.yaml`` and repeatable ``--set key=value`` (dotted keys).

    ``default`` names a YAML file of ``galgan_ray/data/`` read when ``--config`` is not given (else the
    dataclass defaults).
    """
    path = str(resources.files("galgan_ray").joinpath("data", default)) if default else None
    note = f"; default: galgan_ray/data/{default}" if default else ""
    parser.add_argument("--config", metavar="YAML", default=path,
                        help=f"{what} config (keys map onto the dataclass; unknown keys are an error{note})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set blends.sep_scale_arcsec=0.8 (repeatable)")


def add_precision_argument(parser: argparse.ArgumentParser) -> None:
    """``--precision {fp32,bf16}``: the model's arithmetic (:class:`galgan_ray.enhance.Enhancer`)."""
    parser.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                        help="the model's arithmetic: bf16 autocast is faster on CPUs with bf16 instructions (AMX, "
                             "AVX-512 BF16) and on GPUs, and changes catalogs a little (bench/bench_precision.py; "
                             "default fp32)")


def config_from_args(cls: type[T], args: argparse.Namespace, *, overrides: Sequence[str] = ()) -> T:
    """The config of ``--config`` with ``overrides`` and then every ``--set`` applied (a ``--set`` wins)."""
    return load_config(cls, args.config, [*overrides, *args.overrides])


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))
