"""The skeleton every registered reader builds on, and the conversions all readers share.

:class:`BaseReader` implements :class:`~genecorpus.io.CellSource` once. A format sets, when it
opens a source, the number of cells, the gene ids and its annotation columns, and implements two
hooks; the base class answers every question about genes and columns, checks row ranges and column
names, validates the counts with :func:`~genecorpus.io.counts.validate_counts` and assembles the
:class:`~genecorpus.io.CellBlock`, so checks and error messages are the same for every format.

It has a module of its own rather than sharing one with the count validation
(:mod:`genecorpus.io.counts`, a pure function of a matrix that is tested on its own) or with the
block types (:mod:`genecorpus.io.block`, which every stage imports and which stays free of the
readers' numpy, pandas and scipy code): readers need all three, the pipeline only the block types.
"""

from __future__ import annotations

import abc
import html
from typing import TYPE_CHECKING, Any, Protocol, Self

import numpy as np
import pandas as pd

from genecorpus.errors import CountsError, InputError
from genecorpus.io.block import CellBlock
from genecorpus.io.counts import validate_counts

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import TracebackType

__all__ = [
    "ArrayColumn",
    "BaseReader",
    "Column",
    "as_str_array",
    "decode_strings",
    "one_line",
    "scipy_dtype",
]


def one_line(exc: BaseException) -> str:
    """Return a library exception's message on one line, for embedding in our one-line errors."""
    return " ".join(str(exc).split()) or type(exc).__name__


def decode_strings(values: np.ndarray, *, xml_entities: bool = False) -> np.ndarray:
    """Return HDF5 string values (bytes, fixed-length or variable-length) as an object array of str.

    ``xml_entities`` decodes the ``&#...;`` escapes loom uses for non-ASCII characters.
    """
    values = np.asarray(values)
    if values.dtype.kind == "O" and values.size and isinstance(values.flat[0], bytes):
        values = values.astype(bytes)
    if values.dtype.kind == "S":
        out = np.char.decode(values, "utf-8").astype(object)
    else:
        out = values.astype(object)
    if xml_entities and out.size:
        for i in np.flatnonzero(np.char.find(out.astype(str), "&") >= 0).tolist():
            out[i] = html.unescape(out[i])
    return out


def as_str_array(values: np.ndarray) -> np.ndarray:
    """Return any 1-D column as an object array of str (missing values become ``""``)."""
    values = np.asarray(values)
    if values.dtype.kind in "SU":
        return decode_strings(values)
    if values.dtype.kind != "O":
        return values.astype(str).astype(object)
    inferred = pd.api.types.infer_dtype(values, skipna=False)
    if inferred == "string":
        return values
    if inferred == "bytes":
        return decode_strings(values)
    out = values.copy()
    out[pd.isna(values)] = ""
    return out.astype(str).astype(object)


def scipy_dtype(values: np.ndarray) -> np.ndarray:
    """Return ``values`` in a dtype scipy.sparse accepts (float16, which it refuses, as float32)."""
    return values.astype(np.float32) if values.dtype == np.float16 else values


class Column(Protocol):
    """One per-cell or per-gene annotation column of a source, read by row range."""

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) as a numpy array."""
        ...


class ArrayColumn:
    """A :class:`Column` whose values are already in memory."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) of the values."""
        return self.values[start:stop]


class BaseReader(abc.ABC):
    """Common implementation of :class:`~genecorpus.io.CellSource` for every registered format.

    When it opens a source, a format sets ``_n_cells``, ``_var_names`` (object array of str, the
    gene id of each input column) and, if it has any, its annotation columns ``_var`` (per gene)
    and ``_obs`` (per cell), each a dict from column name to :class:`Column`; it implements the
    hooks ``_read_counts`` (raw counts of a row range, any numeric CSR) and ``_read_cell_ids``.
    :meth:`read_block` checks the range and the requested columns, validates the counts with
    :func:`~genecorpus.io.counts.validate_counts` and assembles the :class:`CellBlock`. Readers
    are context managers.
    """

    path: str
    format: str
    stored_dense: bool = False
    """The file stores a dense matrix (h5ad dense X, loom); set by the format."""
    _container = "file"
    """What holds the data, in messages ("the file is truncated"); a zarr store is a "folder"."""
    _n_cells: int
    _var_names: np.ndarray

    def __init__(self, path: str, format_name: str) -> None:
        self.path = path
        self.format = format_name
        self._var: Mapping[str, Column] = {}
        self._obs: Mapping[str, Column] = {}
        self._var_cache: dict[str, np.ndarray] = {}

    # -- what every format sets up --------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Number of cells (rows) in the dataset."""
        return self._n_cells

    @property
    def var_names(self) -> np.ndarray:
        """Object array of str: the gene identifier of each input column (var index)."""
        return self._var_names

    @property
    def n_genes(self) -> int:
        """Number of input gene columns."""
        return len(self.var_names)

    @property
    def var_columns(self) -> list[str]:
        """Names of the per-gene annotation columns available."""
        return list(self._var)

    def var_column(self, name: str) -> np.ndarray:
        """Return one per-gene annotation column as an object array of str.

        The column is read whole once and converted with :func:`as_str_array` (missing values
        become ``""``); later calls return the same array.
        """
        if name not in self.var_columns:
            known = ", ".join(self.var_columns) or "none"
            msg = f"{self.path}: no gene annotation column {name!r}; available: {known}"
            raise InputError(msg)
        if name not in self._var_cache:
            self._var_cache[name] = as_str_array(self._var[name].read(0, None))
        return self._var_cache[name]

    @property
    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns available."""
        return list(self._obs)

    def obs_column(self, name: str) -> np.ndarray:
        """Return obs column ``name`` for every cell (as :meth:`read_block` slices it), reading no counts."""
        if name not in self.obs_columns:
            known = ", ".join(self.obs_columns) or "none"
            msg = f"{self.path}: no cell annotation column {name!r}; available: {known}"
            raise InputError(msg)
        try:
            return self._obs[name].read(0, self.n_cells)
        except OSError as exc:
            msg = (f"{self.path}: obs column {name!r} could not be read ({one_line(exc)}); the "
                   f"{self._container} is truncated or corrupt: re-download or re-export it")
            raise InputError(msg) from exc

    @abc.abstractmethod
    def _read_counts(self, start: int, stop: int) -> Any:
        """Return rows ``start:stop`` as a sparse matrix (any numeric dtype), unvalidated."""

    @abc.abstractmethod
    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        """Return the ids of cells ``start:stop`` as an object array of str."""

    # -- shared ---------------------------------------------------------------------------------
    def read_block(self, start: int, stop: int, *, obs_columns: Sequence[str] = ()) -> CellBlock:
        """Read cells ``start:stop`` as validated raw counts, with the requested obs columns.

        Parameters
        ----------
        start, stop
            Row range within the dataset, ``0 <= start <= stop <= n_cells``.
        obs_columns
            Names from :attr:`obs_columns` to slice alongside the counts.

        Returns
        -------
        The :class:`CellBlock` (counts as described by :func:`validate_counts`).
        """
        if isinstance(obs_columns, str):
            obs_columns = [obs_columns]
        if not 0 <= start <= stop <= self.n_cells:
            msg = f"{self.path}: rows {start}:{stop} are outside the dataset's {self.n_cells} cells"
            raise IndexError(msg)
        missing = [name for name in obs_columns if name not in self.obs_columns]
        if missing:
            known = ", ".join(self.obs_columns) or "none"
            msg = f"{self.path}: no cell annotation column {missing[0]!r}; available: {known}"
            raise InputError(msg)
        try:
            raw = self._read_counts(start, stop)
            cell_ids = self._read_cell_ids(start, stop)
            obs = {name: self._obs[name].read(start, stop) for name in obs_columns}
        except OSError as exc:
            msg = (
                f"{self.path}: rows {start}:{stop} could not be read ({one_line(exc)}); the "
                f"{self._container} is truncated or corrupt: re-download or re-export it"
            )
            raise InputError(msg) from exc
        try:
            counts = validate_counts(
                raw, path=self.path, cell_ids=cell_ids, gene_ids=self.var_names, start=start
            )
        except CountsError as exc:
            exc.add_note(f"while reading rows {start}:{stop} of {self.path} ({self.format})")
            raise
        return CellBlock(counts=counts, cell_ids=cell_ids, start=start, obs=obs,
                         value_dtype=np.dtype(raw.dtype), dense_input=self.stored_dense)

    def close(self) -> None:  # noqa: B027 - an optional hook, not abstract: most readers hold no handle
        """Release open file handles (a no-op for readers that hold none)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.format} {self.path!r}: "
            f"{self.n_cells} cells x {self.n_genes} genes>"
        )
