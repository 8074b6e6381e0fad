"""AnnData's on-disk layout, read block by block from the store that holds it (h5ad or zarr).

anndata writes the same layout to an HDF5 file (``.h5ad``, read with h5py by
:mod:`~genecorpus.io.h5ad`) and to a zarr folder (``.zarr``, :mod:`~genecorpus.io.zarr`); both
readers are an :class:`AnnDataLayoutReader`, which follows anndata's encoding through the nodes of
:mod:`~genecorpus.io.store` without calling ``anndata.read_h5ad``/``read_zarr``:

- ``X`` (or ``layers/<name>``, or ``raw/X`` with genes from ``raw/var``) is a group with
  ``encoding-type`` ``csr_matrix``/``csc_matrix`` (or the pre-0.7 ``h5sparse_format`` attribute)
  holding ``data``, ``indices``, ``indptr`` and a ``shape`` attribute, or a 2-D array (dense).
- ``obs``/``var`` are dataframe groups whose ``_index`` attribute names the index column; columns
  are string, numeric or boolean arrays, ``categorical`` groups (``codes`` + ``categories``), the
  pre-0.7 categorical datasets of HDF5 files (codes with a ``categories`` object reference into
  ``__categories``) or ``nullable-*`` groups (``values`` + ``mask``).

Costs per block of ``b`` rows: CSR reads ``indptr[start:stop + 1]`` and only the block's stored
values; dense reads the row slab in pieces of at most :data:`~genecorpus.io.store.DENSE_PIECE_VALUES`
values; CSC has no row index, so every block scans the whole matrix in pieces of
:data:`CSC_SCAN_VALUES` stored values and keeps those in its rows: memory stays bounded, but reading
all blocks costs ``n_blocks x nnz``. Convert large CSC files to CSR (``adata.X = adata.X.tocsr()``)
once.

Obs columns come back per block as numpy arrays: strings as object arrays of str, numbers and
booleans with their own dtype, categoricals as object arrays of their category values (None where
missing), nullable integers as int64 (float64 with NaN when the column has missing values), nullable
booleans as bool (object with None when it has missing values).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from genecorpus.errors import InputError
from genecorpus.io.reader import BaseReader, as_str_array, scipy_dtype
from genecorpus.io.store import (
    CsrRows,
    DenseRows,
    MatrixRows,
    StoredColumn,
    encoding_type,
    get_layer,
    is_array,
    is_group,
    layer_names,
)

if TYPE_CHECKING:
    from genecorpus.io.store import ArrayNode, GroupNode

__all__ = ["CSC_SCAN_VALUES", "AnnDataLayoutReader", "CscRows", "matrix_rows"]

logger = logging.getLogger(__name__)

CSC_SCAN_VALUES = 1 << 22
"""Stored values read at once while scanning a CSC matrix for a block's rows."""

_SPARSE_ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}


def _dataframe_index_name(group: GroupNode) -> str | None:
    name = group.attrs.get("_index")
    if name is not None:
        return name.decode() if isinstance(name, bytes) else str(name)
    for candidate in ("_index", "index"):
        if candidate in group:
            return candidate
    return None


def _dataframe_columns(
    group: GroupNode, index_name: str | None, n_rows: int
) -> dict[str, StoredColumn]:
    """Columns of an anndata dataframe group in their written order, 1-D and ``n_rows`` long."""
    order = [str(c) for c in np.asarray(group.attrs.get("column-order", [])).tolist()]
    names = order + sorted(k for k in group if k not in order)
    columns: dict[str, StoredColumn] = {}
    for name in names:
        if name == index_name or name.startswith("__") or name not in group:
            continue
        column = StoredColumn(group[name])
        if column.is_column and column.length == n_rows:
            columns[name] = column
    return columns


# ---- matrix access by row block ------------------------------------------------------------------
class CscRows:
    """Rows of a CSC matrix stored as ``data``/``indices``/``indptr`` arrays (bounded scan)."""

    def __init__(self, group: GroupNode, shape: tuple[int, int]) -> None:
        self._data = group["data"]
        self._indices = group["indices"]
        self._indptr = np.asarray(group["indptr"][()], dtype=np.int64)
        self.shape = shape

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop`` by scanning all stored values in bounded pieces."""
        nnz = int(self._indptr[-1])
        rows, cols, vals = [], [], []
        for lo in range(0, nnz, CSC_SCAN_VALUES):
            hi = min(lo + CSC_SCAN_VALUES, nnz)
            idx = np.asarray(self._indices[lo:hi])
            hit = np.flatnonzero((idx >= start) & (idx < stop))
            if not hit.size:
                continue
            rows.append(idx[hit] - start)
            cols.append(np.searchsorted(self._indptr, lo + hit, side="right") - 1)
            vals.append(scipy_dtype(np.asarray(self._data[lo:hi])[hit]))
        dtype = scipy_dtype(np.empty(0, dtype=self._data.dtype)).dtype
        if not rows:
            return sp.csr_matrix((stop - start, self.shape[1]), dtype=dtype)
        coo = sp.coo_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(stop - start, self.shape[1]),
        )
        return coo.tocsr()


def matrix_rows(
    node: ArrayNode | GroupNode, *, path: str, what: str, container: str = "file"
) -> CsrRows | CscRows | DenseRows:
    """Return the row-block reader of an anndata-encoded matrix (sparse group or dense array).

    ``container`` names what holds it in messages (``"file"``, ``"folder"``).
    """
    if is_array(node):
        if node.ndim != 2:
            msg = (
                f"{path}: {what} is a {node.ndim}-D dataset, not a matrix; re-export the "
                f"{container}"
            )
            raise InputError(msg)
        return DenseRows(node)
    encoding = encoding_type(node)
    layout = _SPARSE_ENCODINGS.get(encoding)
    shape_attr = node.attrs.get("shape")
    if layout is None and "h5sparse_format" in node.attrs:  # anndata < 0.7
        fmt = node.attrs["h5sparse_format"]
        layout = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        shape_attr = node.attrs.get("h5sparse_shape")
    if layout not in {"csr", "csc"} or shape_attr is None:
        msg = (
            f"{path}: {what} has encoding {encoding or 'unknown'!r}, not a CSR/CSC/dense matrix; "
            "re-export it with anndata"
        )
        raise InputError(msg)
    shape = (int(shape_attr[0]), int(shape_attr[1]))
    if layout == "csr":
        return CsrRows(node, shape)
    nnz = int(node["indptr"][-1]) if node["indptr"].shape[0] else 0
    logger.info(
        "%s: %s is CSC (%d stored values): every block scans the whole matrix; convert it to CSR "
        "for large files",
        path,
        what,
        nnz,
    )
    return CscRows(node, shape)


# ---- the reader ----------------------------------------------------------------------------------
class AnnDataLayoutReader(BaseReader):
    """A reader of anndata's on-disk layout, one row block at a time (see the module docstring).

    A subclass opens its store and calls :meth:`_setup_layout` with the root group. Cells are the
    rows of X; ``var_names`` is the var index and ``var_columns`` are the var dataframe's columns
    (``raw/var``'s with ``use_raw``); ``var_column`` gives missing values as ``""``;
    ``obs_columns`` are the obs dataframe's 1-D columns, in their written order.
    """

    _described_as = "an h5ad"
    """What the store is in messages: "not <this> written by anndata >= 0.7"."""
    _matrix: MatrixRows
    _cell_index: StoredColumn

    def _group(self, root: GroupNode, name: str) -> GroupNode:
        node = root.get(name)
        if not is_group(node):
            msg = (
                f"{self.path}: no {name!r} dataframe group, so not {self._described_as} written by "
                "anndata >= 0.7; re-export it with a recent anndata"
            )
            raise InputError(msg)
        return node

    def _counts_node(
        self, root: GroupNode, *, layer: str | None, use_raw: bool
    ) -> tuple[ArrayNode | GroupNode, str, GroupNode]:
        """The node holding the counts, its name in messages, and the var group of its genes."""
        if layer is not None and use_raw:
            msg = f"{self.path}: give layer= or use_raw=True, not both"
            raise InputError(msg)
        if use_raw:
            raw = root.get("raw")
            if raw is None or "X" not in raw:
                msg = (
                    f"{self.path}: use_raw=True but the {self._container} has no raw.X; drop "
                    "use_raw or pass layer="
                )
                raise InputError(msg)
            var = raw.get("var")
            if not is_group(var):
                msg = (
                    f"{self.path}: raw.X has no raw/var dataframe group; re-export it with anndata"
                )
                raise InputError(msg)
            return raw["X"], "raw.X", var
        if layer is not None:
            return get_layer(root, layer, path=self.path), f"layers[{layer!r}]", self._group(root, "var")
        if "X" not in root:
            msg = (
                f"{self.path}: the {self._container} has no X; pass layer= (available: "
                f"{', '.join(layer_names(root)) or 'none'}) or use_raw=True"
            )
            raise InputError(msg)
        return root["X"], "X", self._group(root, "var")

    def _setup_layout(self, root: GroupNode, *, layer: str | None, use_raw: bool) -> None:
        """Find the counts, cells and genes under ``root`` and set the reader up."""
        matrix, what, var = self._counts_node(root, layer=layer, use_raw=use_raw)
        self._matrix = matrix_rows(matrix, path=self.path, what=what, container=self._container)
        self.stored_dense = isinstance(self._matrix, DenseRows)
        n_cells, n_genes = self._matrix.shape

        obs = self._group(root, "obs")
        obs_index = _dataframe_index_name(obs)
        if obs_index is None or obs_index not in obs:
            msg = f"{self.path}: obs has no index (cell ids); re-export it with anndata"
            raise InputError(msg)
        self._cell_index = StoredColumn(obs[obs_index])
        self._obs = _dataframe_columns(obs, obs_index, n_cells)
        var_index = _dataframe_index_name(var)
        if var_index is None or var_index not in var:
            msg = f"{self.path}: {var.name.lstrip('/')} has no index (gene ids); re-export it"
            raise InputError(msg)
        self._var_names = as_str_array(StoredColumn(var[var_index]).read(0, None))
        self._var = _dataframe_columns(var, var_index, n_genes)
        for what_len, expected, label in (
            (self._cell_index.length, n_cells, "obs index (cells)"),
            (len(self._var_names), n_genes, f"{var.name.lstrip('/')} index (genes)"),
        ):
            if what_len != expected:
                msg = (
                    f"{self.path}: {label} has {what_len} entries but {what} has shape "
                    f"{n_cells} x {n_genes}; the {self._container} is inconsistent: re-export it"
                )
                raise InputError(msg)
        self._n_cells = n_cells

    def _read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._matrix.read(start, stop)

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return as_str_array(self._cell_index.read(start, stop))
