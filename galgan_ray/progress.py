"""Progress bars for the long loops (benchmark, training epochs, whole-image enhancement).

One switch for the whole process: :func:`set_progress` (the ``galgan -q`` flag), else the
``GALGAN_PROGRESS`` environment variable (``0``: never, ``1``: always), else a bar is shown only
when standard error is a terminal. Bars go to standard error, so output that tests or scripts
parse on standard output is unchanged, and nothing is drawn in Ray workers (whose standard error
is a log file) or in captured test output. tqdm is imported only when a bar is drawn; without
tqdm, :func:`progress` returns its iterable unchanged.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["ENV_VAR", "note", "progress", "progress_enabled", "progress_setting", "set_progress"]

T = TypeVar("T")

#: Environment variable read when :func:`set_progress` was not called: ``0``/``1`` (also
#: ``false``/``true``, ``no``/``yes``, ``off``/``on``).
ENV_VAR = "GALGAN_PROGRESS"

_switch: bool | None = None


def set_progress(enabled: bool | None) -> bool | None:
    """Show progress bars always (True), never (False), or as ``GALGAN_PROGRESS`` / the terminal
    decides (None, the default). Returns the previous switch, to restore it."""
    global _switch
    before, _switch = _switch, (None if enabled is None else bool(enabled))
    return before


def progress_setting() -> bool | None:
    """The explicit choice: :func:`set_progress`, else ``GALGAN_PROGRESS``; None when neither says."""
    if _switch is not None:
        return _switch
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    return None


def progress_enabled() -> bool:
    """Whether :func:`progress` draws a bar: the explicit choice, else whether stderr is a terminal."""
    setting = progress_setting()
    if setting is not None:
        return setting
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str | None = None, unit: str = "it",
             leave: bool = False) -> Iterator[T] | Iterable[T]:
    """``iterable`` with a tqdm bar on standard error when :func:`progress_enabled`, else unchanged.

    Parameters
    ----------
    iterable : iterable
    total : int, optional
        Number of items (default: ``len(iterable)`` where it has one).
    desc : str, optional
        Label in front of the bar.
    unit : str
        What one item is (``"epoch"``, ``"row"``, ...).
    leave : bool
        Keep the finished bar on screen (False: it is erased, so nested loops leave one line).

    Returns
    -------
    iterable
        The same items in the same order.
    """
    if not progress_enabled():
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; a broken install still runs, without bars
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5)


def note(text: str) -> None:
    """Print ``text`` on standard error where bars are drawn (what a long command is about to do)."""
    if progress_enabled():
        print(text, file=sys.stderr, flush=True)
