"""The error hierarchy of genecorpus.

Every error a user can cause by giving bad input is a :class:`GenecorpusError`. Its message is one line
that names the file, the item (cell, gene, key, field) and what to do about it; the command line prints
exactly that line and exits non-zero, without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "CountsError",
    "DictionaryError",
    "GeneMappingError",
    "GenecorpusError",
    "InputError",
]


class GenecorpusError(Exception):
    """Base class of every error caused by the user's input or settings."""


class InputError(GenecorpusError, ValueError):
    """An input file is missing, unreadable, truncated or in an unknown format."""


class CountsError(InputError):
    """A matrix holds values that are not raw counts (negative, non-integer, NaN or infinite)."""


class GeneMappingError(GenecorpusError, ValueError):
    """Gene identifiers cannot be mapped (unknown release, no gene mapped, mixed species...)."""


class DictionaryError(GenecorpusError, ValueError):
    """A token, median or mapping dictionary is unreadable, unsafe or inconsistent."""


class ConfigError(GenecorpusError, ValueError):
    """A manifest or a command-line setting is invalid."""
