"""AnnData ``.h5ad`` files read block by block with h5py.

The h5ad reader follows anndata's on-disk encoding without calling ``anndata.read_h5ad``:

- ``X`` (or ``layers/<name>``, or ``raw/X`` with genes from ``raw/var``) is a group with
  ``encoding-type`` ``csr_matrix``/``csc_matrix`` (or the pre-0.7 ``h5sparse_format`` attribute)
  holding ``data``, ``indices``, ``indptr`` and a ``shape`` attribute, or a 2-D dataset (dense).
- ``obs``/``var`` are dataframe groups whose ``_index`` attribute names the index column; columns
  are string, numeric or boolean datasets, ``categorical`` groups (``codes`` + ``categories``), the
  pre-0.7 categorical datasets (codes with a ``categories`` object reference into ``__categories``)
  or ``nullable-*`` groups (``values`` + ``mask``).

Costs per block of ``b`` rows: CSR reads ``indptr[start:stop + 1]`` and only the block's stored
values; dense reads the row slab in pieces of at most :data:`~genecorpus.io.hdf5.DENSE_PIECE_VALUES`
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
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import scipy.sparse as sp

from genecorpus.errors import InputError
from genecorpus.io.hdf5 import CsrRows, DenseRows, H5Column, HDF5Reader, encoding_type, is_hdf5_with
from genecorpus.io.reader import as_str_array, scipy_dtype
from genecorpus.io.registry import register_reader

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["CSC_SCAN_VALUES", "H5adReader"]

logger = logging.getLogger(__name__)

CSC_SCAN_VALUES = 1 << 22
"""Stored values read at once while scanning a CSC matrix for a block's rows."""

_SPARSE_ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}


def _dataframe_index_name(group: h5py.Group) -> str | None:
    name = group.attrs.get("_index")
    if name is not None:
        return name.decode() if isinstance(name, bytes) else str(name)
    for candidate in ("_index", "index"):
        if candidate in group:
            return candidate
    return None


def _dataframe_columns(
    group: h5py.Group, index_name: str | None, n_rows: int
) -> dict[str, H5Column]:
    """Columns of an anndata dataframe group in their written order, 1-D and ``n_rows`` long."""
    order = [str(c) for c in np.asarray(group.attrs.get("column-order", [])).tolist()]
    names = order + sorted(k for k in group if k not in order)
    columns: dict[str, H5Column] = {}
    for name in names:
        if name == index_name or name.startswith("__") or name not in group:
            continue
        column = H5Column(group[name])
        if column.is_column and column.length == n_rows:
            columns[name] = column
    return columns


# ---- matrix access by row block ------------------------------------------------------------------
class CscRows:
    """Rows of a CSC matrix stored as ``data``/``indices``/``indptr`` datasets (bounded scan)."""

    def __init__(self, group: h5py.Group, shape: tuple[int, int]) -> None:
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
    elem: h5py.Group | h5py.Dataset, *, path: str, what: str
) -> CsrRows | CscRows | DenseRows:
    """Return the row-block reader of an anndata-encoded matrix (sparse group or dense dataset)."""
    if isinstance(elem, h5py.Dataset):
        if elem.ndim != 2:
            msg = f"{path}: {what} is a {elem.ndim}-D dataset, not a matrix; re-export the file"
            raise InputError(msg)
        return DenseRows(elem)
    encoding = encoding_type(elem)
    layout = _SPARSE_ENCODINGS.get(encoding)
    shape_attr = elem.attrs.get("shape")
    if layout is None and "h5sparse_format" in elem.attrs:  # anndata < 0.7
        fmt = elem.attrs["h5sparse_format"]
        layout = fmt.decode() if isinstance(fmt, bytes) else str(fmt)
        shape_attr = elem.attrs.get("h5sparse_shape")
    if layout not in {"csr", "csc"} or shape_attr is None:
        msg = (
            f"{path}: {what} has encoding {encoding or 'unknown'!r}, not a CSR/CSC/dense matrix; "
            "re-export it with anndata"
        )
        raise InputError(msg)
    shape = (int(shape_attr[0]), int(shape_attr[1]))
    if layout == "csr":
        return CsrRows(elem, shape)
    nnz = int(elem["indptr"][-1]) if elem["indptr"].shape[0] else 0
    logger.info(
        "%s: %s is CSC (%d stored values): every block scans the whole matrix; convert it to CSR "
        "for large files",
        path,
        what,
        nnz,
    )
    return CscRows(elem, shape)


# ---- the h5ad reader -----------------------------------------------------------------------------
class H5adReader(HDF5Reader):
    """An ``.h5ad`` file read with h5py, one row block at a time (see the module docstring).

    Cells are the rows of X; ``var_names`` is the var index and ``var_columns`` are the var
    dataframe's columns (``raw/var``'s with ``use_raw``); ``var_column`` gives missing values as
    ``""``; ``obs_columns`` are the obs dataframe's 1-D columns, in their written order.
    """

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False) -> None:
        super().__init__(
            path, "h5ad", kind="HDF5/h5ad", layout="h5ad", layer=layer, use_raw=use_raw
        )

    def _group(self, name: str) -> h5py.Group:
        elem = self._file.get(name)
        if not isinstance(elem, h5py.Group):
            msg = (
                f"{self.path}: no {name!r} dataframe group, so not an h5ad written by "
                "anndata >= 0.7; re-export it with a recent anndata"
            )
            raise InputError(msg)
        return elem

    def _setup(self, *, layer: str | None, use_raw: bool) -> None:
        f = self._file
        if layer is not None and use_raw:
            msg = f"{self.path}: give layer= or use_raw=True, not both"
            raise InputError(msg)
        if use_raw:
            if "raw" not in f or "X" not in f["raw"]:
                msg = (
                    f"{self.path}: use_raw=True but the file has no raw.X; drop use_raw or "
                    "pass layer="
                )
                raise InputError(msg)
            matrix, what, var = f["raw"]["X"], "raw.X", f["raw"].get("var")
            if not isinstance(var, h5py.Group):
                msg = (
                    f"{self.path}: raw.X has no raw/var dataframe group; re-export it with anndata"
                )
                raise InputError(msg)
        elif layer is not None:
            matrix, what, var = self._layer(layer), f"layers[{layer!r}]", self._group("var")
        else:
            if "X" not in f:
                msg = (
                    f"{self.path}: the file has no X; pass layer= (available: "
                    f"{', '.join(self._layer_names()) or 'none'}) or use_raw=True"
                )
                raise InputError(msg)
            matrix, what, var = f["X"], "X", self._group("var")
        self._matrix = matrix_rows(matrix, path=self.path, what=what)
        self.stored_dense = isinstance(self._matrix, DenseRows)
        n_cells, n_genes = self._matrix.shape

        obs = self._group("obs")
        obs_index = _dataframe_index_name(obs)
        if obs_index is None or obs_index not in obs:
            msg = f"{self.path}: obs has no index (cell ids); re-export it with anndata"
            raise InputError(msg)
        self._cell_index = H5Column(obs[obs_index])
        self._obs = _dataframe_columns(obs, obs_index, n_cells)
        var_index = _dataframe_index_name(var)
        if var_index is None or var_index not in var:
            msg = f"{self.path}: {var.name.lstrip('/')} has no index (gene ids); re-export it"
            raise InputError(msg)
        self._var_names = as_str_array(H5Column(var[var_index]).read(0, None))
        self._var = _dataframe_columns(var, var_index, n_genes)
        for what_len, expected, label in (
            (self._cell_index.length, n_cells, "obs index (cells)"),
            (len(self._var_names), n_genes, f"{var.name.lstrip('/')} index (genes)"),
        ):
            if what_len != expected:
                msg = (
                    f"{self.path}: {label} has {what_len} entries but {what} has shape "
                    f"{n_cells} x {n_genes}; the file is inconsistent: re-export it"
                )
                raise InputError(msg)
        self._n_cells = n_cells

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return as_str_array(self._cell_index.read(start, stop))


def _sniff_h5ad(source: Any) -> bool:
    return is_hdf5_with(source, required=("obs", "var"), any_of=("X", "layers", "raw"))


@register_reader("h5ad", suffixes=(".h5ad",), sniff=_sniff_h5ad, options=("layer", "use_raw"))
def _open_h5ad(path: Path, *, layer: str | None = None, use_raw: bool = False) -> H5adReader:
    return H5adReader(path, layer=layer, use_raw=use_raw)
