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
    "TaskFailure",
    "WorkerLostError",
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


class WorkerLostError(GenecorpusError, RuntimeError):
    """Worker processes kept dying (killed, or out of memory) although their tasks were rerun."""


class TaskFailure:
    """A task's input error, returned instead of raised so that ``--on-error skip`` can drop its dataset.

    Not an exception: it travels back from a worker as the task's result and is never stored as a
    finished task.
    """

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"TaskFailure({self.message!r})"

    def __reduce__(self) -> tuple[type[TaskFailure], tuple[str]]:
        return (TaskFailure, (self.message,))
