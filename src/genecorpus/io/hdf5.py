"""HDF5 mechanism shared by the h5ad, loom and 10x ``.h5`` readers.

:class:`HDF5Reader` opens the file and refuses damaged ones with one-line errors; :func:`is_hdf5_with`
is the content test of the HDF5 formats. What reads the file's datasets and groups (columns by row
range, matrices by row block) works on zarr stores too, so it lives in :mod:`genecorpus.io.store`.
"""

from __future__ import annotations

import abc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py

from genecorpus.errors import InputError
from genecorpus.io.reader import BaseReader, one_line

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp

    from genecorpus.io.store import MatrixRows

__all__ = ["HDF5Reader", "is_hdf5_with"]


class HDF5Reader(BaseReader):
    """A reader of one HDF5 file, open from construction until :meth:`close`.

    The constructor opens the file read-only and calls the format's ``_setup`` with the reader's
    options, which sets the count matrix up as ``_matrix`` besides what :class:`BaseReader` asks
    for. A file h5py cannot open is refused as "not a readable ``kind`` file", one in which
    ``_setup`` meets h5py's errors for damaged or incomplete files (OSError, KeyError) as "not a
    readable ``layout`` file", each with a one-line :class:`InputError`; the file is closed
    whenever ``_setup`` fails.
    """

    _matrix: MatrixRows

    def __init__(
        self, path: Path, format_name: str, *, kind: str, layout: str, **options: Any
    ) -> None:
        super().__init__(str(path), format_name)
        try:
            self._file = h5py.File(path, "r")
        except (OSError, ValueError) as exc:
            raise self._unreadable(kind, exc) from exc
        try:
            self._setup(**options)
        except (OSError, KeyError) as exc:  # h5py's errors for damaged or incomplete files
            self._file.close()
            raise self._unreadable(layout, exc) from exc
        except BaseException:
            self._file.close()
            raise

    def _unreadable(self, kind: str, exc: BaseException) -> InputError:
        msg = (
            f"{self.path}: not a readable {kind} file ({one_line(exc)}); re-download or re-export it"
        )
        return InputError(msg)

    @abc.abstractmethod
    def _setup(self, **options: Any) -> None:
        """Find the format's matrix, cells and genes in ``self._file`` and set the reader up."""

    def _read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._matrix.read(start, stop)

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()


def is_hdf5_with(source: Any, *, required: Sequence[str] = (), any_of: Sequence[str] = ()) -> bool:
    """Return True when ``source`` is an HDF5 file with the given paths (a sniffer; never raises).

    All of ``required`` must exist, and at least one of ``any_of`` when it is given.
    """
    if not isinstance(source, Path) or not source.is_file():
        return False
    try:
        with source.open("rb") as fh:
            if fh.read(8) != b"\x89HDF\r\n\x1a\n" and not h5py.is_hdf5(source):
                return False
        with h5py.File(source, "r") as f:
            if not all(name in f for name in required):
                return False
            return not any_of or any(name in f for name in any_of)
    except (OSError, ValueError, KeyError):
        return False
