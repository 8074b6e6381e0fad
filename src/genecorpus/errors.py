"""The error hierarchy of genecorpus.

Every error a user can cause by giving bad input is a :class:`GenecorpusError`. Its message is one line
that names the file, the item (cell, gene, key, field) and what to do about it; the command line prints
exactly that line and exits non-zero, without a traceback unless ``--debug`` is given.

Faults of the machine rather than the input (a full disk, a folder that may not be written, workers killed
for memory) are told the same way: :func:`environment_fault` words an ``OSError`` as one such line, and a
build raises it as a :class:`ResourceError`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "ConfigError",
    "CountsError",
    "DictionaryError",
    "GeneMappingError",
    "GenecorpusError",
    "InputError",
    "ResourceError",
    "TaskFailure",
    "WorkerLostError",
    "environment_fault",
    "is_environment_fault",
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


class ResourceError(GenecorpusError, OSError):
    """The machine stopped the job, not the input: a full disk, a read-only or unwritable folder, no memory.

    An ``OSError`` (so ``except OSError`` still catches a full disk); its ``__cause__`` is the original
    error.
    """


class WorkerLostError(ResourceError):
    """Worker processes kept dying (killed, or out of memory) although their tasks were rerun."""


# errno -> (what happened, what to do)
_FAULTS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free space on that file system, or choose an --out on another one"),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, or choose an --out on another file system"),
    errno.EROFS: ("read-only file system", "choose an --out on a writable file system"),
    errno.EACCES: ("permission denied", "choose an --out in a folder you may write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose an --out in a folder you may write to, or fix its permissions"),
    errno.EIO: ("input/output error", "the device failed: check the disk (dmesg) before rerunning"),
    errno.ENOMEM: ("out of memory", "use fewer --workers or a smaller block_size"),
}


def _fault_errno(exc: OSError) -> int | None:
    """The errno of ``exc``, also when a library (Arrow) only spells it in the message."""
    if exc.errno in _FAULTS:
        return exc.errno
    import os
    import re

    text = str(exc)
    if re.search(r"\d+ requested and \d+ written", text):  # numpy's short write to a regular file: no space
        return errno.ENOSPC
    return next((code for code in _FAULTS if os.strerror(code) in text), None)


def is_environment_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine's fault (OS errors, no memory, lost workers, Ctrl-C), not the input's."""
    if isinstance(exc, KeyboardInterrupt | MemoryError | ResourceError):
        return True
    return isinstance(exc, OSError) and not isinstance(exc, GenecorpusError)


def environment_fault(exc: BaseException, *, where: Path | None = None, doing: str = "") -> str:
    """One line saying what happened, where, and what to do, for an OS error or a ``MemoryError``.

    Parameters
    ----------
    exc
        The error (an ``OSError`` whose ``errno`` or message names the fault, or a ``MemoryError``).
    where
        The path to name when the error names none (a write to an open file does not).
    doing
        What was under way, e.g. ``"building corpus/"``, appended to the location.

    Examples
    --------
    >>> import errno, os
    >>> environment_fault(OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/.c.incomplete"))
    '/data/.c.incomplete: read-only file system; choose an --out on a writable file system'
    """
    during = f" while {doing}" if doing else ""
    if isinstance(exc, MemoryError):
        return f"out of memory{during}; use fewer --workers or a smaller block_size"
    code = _fault_errno(exc) if isinstance(exc, OSError) else None
    filename = getattr(exc, "filename", None)
    place = str(filename) if filename else str(where) if where is not None else ""
    prefix = f"{place}: " if place else ""
    if code is None:
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return f"{prefix}{text}{during}; check the file system and rerun"
    what, advice = _FAULTS[code]
    return f"{prefix}{what}{during}; {advice}"


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
