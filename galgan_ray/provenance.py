"""Where a product came from: package version, git revision, resolved config (for metadata)."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

from . import __version__
from .config import to_dict

__all__ = ["git_revision", "provenance"]


@lru_cache(maxsize=1)
def git_revision() -> str:
    """The git commit of the source tree (with ``-dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(config: Any = None, **extra: Any) -> dict:
    """A JSON-able dict: package name/version, git revision, the resolved config and ``extra``."""
    out = {"package": "galgan-ray", "version": __version__, "git_revision": git_revision()}
    if config is not None:
        out["config"] = to_dict(config)
    out.update({k: to_dict(v) for k, v in extra.items()})
    return out
