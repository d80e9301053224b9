"""Exceptions that name the input and the problem.

Every error raised on bad user input is an :class:`InputError` (or subclass) whose message starts
with the offending file/URL/key, so that a batch job can put it verbatim in its ``failures`` table.
"""
from __future__ import annotations

__all__ = ["InputError", "ConfigError", "CheckpointError"]


class InputError(ValueError):
    """Bad input data: a file, URL, array or catalog that cannot be used.

    Parameters
    ----------
    source : str
        The file, URL or object the problem was found in.
    problem : str
        What is wrong, in words an astronomer can act on.
    """

    def __init__(self, source: str, problem: str):
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")

    def __reduce__(self):  # keep pickling (Ray) intact with the two-argument constructor
        return (type(self), (self.source, self.problem))


class ConfigError(InputError):
    """A configuration (YAML, overrides, dataclass values) that cannot be used."""


class CheckpointError(InputError):
    """A model checkpoint that is unreadable, tampered with, or made for other data."""
