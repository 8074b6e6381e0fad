"""The unit of work of every stage: a bounded block of cells of one dataset, as raw counts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Sequence

    import numpy as np
    import scipy.sparse as sp

__all__ = ["DEFAULT_BLOCK_SIZE", "CellBlock", "CellSource", "QueryableSource"]

DEFAULT_BLOCK_SIZE = 2_000
"""Cells per block when the caller does not say."""


@dataclass(frozen=True)
class CellBlock:
    """Rows ``start:start + n_cells`` of a dataset as validated raw counts.

    Attributes
    ----------
    counts
        ``scipy.sparse.csr_matrix`` of shape (n_cells, n_input_genes); ``data`` is int32 (validated,
        non-negative, integer-valued; explicit zeros removed), ``indices`` int32 (sorted within each
        row, no duplicates), ``indptr`` int64. Columns are the dataset's input gene columns, in input order.
    cell_ids
        Object array of str, one per row (obs names / barcodes).
    obs
        Requested per-cell metadata columns, each a numpy array of length n_cells.
    start
        Index of the first row within the dataset.
    value_dtype
        dtype in which the input stored the counts (e.g. float32), before validation; Geneformer's
        arithmetic depends on it (see :func:`genecorpus.encode.rank_value_encode`).
    dense_input
        The input stores a dense matrix (so does Geneformer's arithmetic on it).
    """

    counts: sp.csr_matrix
    cell_ids: np.ndarray
    start: int
    obs: dict[str, np.ndarray] = field(default_factory=dict)
    value_dtype: np.dtype | None = None
    dense_input: bool = False

    @property
    def n_cells(self) -> int:
        """Number of cells in the block."""
        return int(self.counts.shape[0])


@runtime_checkable
class CellSource(Protocol):
    """An open dataset that yields :class:`CellBlock` row ranges without loading the whole matrix."""

    path: str
    """File (or folder) the data comes from, for messages and the manifest."""
    format: str
    """Registered reader name (``"h5ad"``, ``"loom"``, ``"10x-mtx"``, ``"10x-h5"``, ``"csv"``, ...)."""

    @property
    def n_cells(self) -> int:
        """Number of cells (rows) in the dataset."""
        ...

    @property
    def var_names(self) -> np.ndarray:
        """Object array of str: the gene identifier of each input column (var index)."""
        ...

    @property
    def var_columns(self) -> list[str]:
        """Names of the per-gene annotation columns available (e.g. ``ensembl_id``, ``gene_symbols``)."""
        ...

    def var_column(self, name: str) -> np.ndarray:
        """Return one per-gene annotation column as an object array of str."""
        ...

    @property
    def obs_columns(self) -> list[str]:
        """Names of the per-cell metadata columns available."""
        ...

    def obs_column(self, name: str) -> np.ndarray:
        """Return one per-cell metadata column for every cell, without reading any counts."""
        ...

    def read_block(self, start: int, stop: int, *, obs_columns: Sequence[str] = ()) -> CellBlock:
        """Read cells ``start:stop`` as validated raw counts, with the requested obs columns."""
        ...

    def close(self) -> None:
        """Release open file handles."""
        ...


@runtime_checkable
class QueryableSource(CellSource, Protocol):
    """A :class:`CellSource` whose cells are selected by a query and read by row number, in any set.

    A TileDB-SOMA experiment (:class:`~genecorpus.io.soma.SomaReader`): its rows are soma_joinids, a build
    runs the query once when it plans and its tasks read the selected rows in blocks.
    """

    def read_rows(self, rows: np.ndarray, *, obs_columns: Sequence[str] = ()) -> CellBlock:
        """Read the cells ``rows`` (ascending, distinct; int64) as validated raw counts, in that order."""
        ...

    def query_obs(self, value_filter: str | None, *, column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows ``value_filter`` selects (ascending; every row when None), and ``column``'s values for them."""
        ...
