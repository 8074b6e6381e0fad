"""AnnData ``.h5ad`` files read block by block with h5py, and the HDF5 pieces loom and 10x reuse.

The h5ad reader follows anndata's on-disk encoding without calling ``anndata.read_h5ad``:

- ``X`` (or ``layers/<name>``, or ``raw/X`` with genes from ``raw/var``) is a group with
  ``encoding-type`` ``csr_matrix``/``csc_matrix`` (or the pre-0.7 ``h5sparse_format`` attribute)
  holding ``data``, ``indices``, ``indptr`` and a ``shape`` attribute, or a 2-D dataset (dense).
- ``obs``/``var`` are dataframe groups whose ``_index`` attribute names the index column; columns
  are string, numeric or boolean datasets, ``categorical`` groups (``codes`` + ``categories``), the
  pre-0.7 categorical datasets (codes with a ``categories`` object reference into ``__categories``)
  or ``nullable-*`` groups (``values`` + ``mask``).

Costs per block of ``b`` rows: CSR reads ``indptr[start:stop + 1]`` and only the block's stored
values; dense reads the row slab in pieces of at most :data:`DENSE_PIECE_VALUES` values; CSC has no
row index, so every block scans the whole matrix in pieces of :data:`CSC_SCAN_VALUES` stored values
and keeps those in its rows: memory stays bounded, but reading all blocks costs ``n_blocks x nnz``.
Convert large CSC files to CSR (``adata.X = adata.X.tocsr()``) once.

Obs columns come back per block as numpy arrays: strings as object arrays of str, numbers and
booleans with their own dtype, categoricals as object arrays of their category values (None where
missing), nullable integers as int64 (float64 with NaN when the column has missing values), nullable
booleans as bool (object with None when it has missing values).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from genecorpus import _kernels
from genecorpus.errors import InputError
from genecorpus.io.registry import register_reader
from genecorpus.io.counts import BaseReader, one_line

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "CSC_SCAN_VALUES",
    "DENSE_PIECE_VALUES",
    "H5Column",
    "H5adReader",
    "as_str_array",
    "decode_strings",
    "is_hdf5_with",
    "open_hdf5",
]

logger = logging.getLogger(__name__)

DENSE_PIECE_VALUES = 1 << 24
"""Most dense values (cells x genes) read from a dense matrix at once (128 MiB as float64)."""

CSC_SCAN_VALUES = 1 << 22
"""Stored values read at once while scanning a CSC matrix for a block's rows."""

_SPARSE_ENCODINGS = {"csr_matrix": "csr", "csc_matrix": "csc"}
_NULLABLE_ENCODINGS = {"nullable-integer", "nullable-boolean", "nullable-string-array"}


# ---- HDF5 helpers shared with loom.py and tenx.py ------------------------------------------------
def open_hdf5(path: str | Path, *, kind: str = "HDF5/h5ad") -> h5py.File:
    """Open an HDF5 file read-only, turning any failure into a one-line :class:`InputError`."""
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        msg = f"{path}: not a readable {kind} file ({one_line(exc)}); re-download or re-export it"
        raise InputError(msg) from exc


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


def _is_string_dataset(ds: h5py.Dataset) -> bool:
    return ds.dtype.kind in "SU" or h5py.check_string_dtype(ds.dtype) is not None


def _read_dataset(
    ds: h5py.Dataset, start: int | None = None, stop: int | None = None
) -> np.ndarray:
    sl = slice(start, stop)
    if _is_string_dataset(ds):
        if h5py.check_string_dtype(ds.dtype) is not None:
            return np.asarray(ds.asstr()[sl], dtype=object)
        return decode_strings(ds[sl])
    return np.asarray(ds[sl])


def _encoding(elem: h5py.Group | h5py.Dataset) -> str:
    value = elem.attrs.get("encoding-type", "")
    return value.decode() if isinstance(value, bytes) else str(value)


class H5Column:
    """One per-cell or per-gene column of an HDF5 file, readable by row range.

    Handles string, numeric and boolean datasets, anndata ``categorical`` and ``nullable-*`` groups,
    and pre-0.7 categoricals (a codes dataset whose ``categories`` attribute references the values).
    Other encodings are read whole once with ``anndata.io.read_elem`` and then sliced.
    """

    def __init__(self, elem: h5py.Group | h5py.Dataset, *, xml_entities: bool = False) -> None:
        self._elem = elem
        self._xml = xml_entities
        self._categories: np.ndarray | None = None
        self._whole: np.ndarray | None = None
        self._has_missing: bool | None = None
        encoding = _encoding(elem)
        if isinstance(elem, h5py.Dataset):
            self.kind = "legacy-categorical" if "categories" in elem.attrs else "dataset"
            self.length = int(elem.shape[0]) if elem.ndim == 1 else -1
        elif encoding == "categorical":
            self.kind = "categorical"
            self.length = int(elem["codes"].shape[0])
        elif encoding in _NULLABLE_ENCODINGS:
            self.kind = encoding
            self.length = int(elem["values"].shape[0])
        else:
            self.kind = "other"
            self.length = -1
            if encoding in {"string-array", "array", ""}:
                return
            try:
                import anndata.io  # noqa: PLC0415 - only needed for rare encodings

                whole = np.asarray(anndata.io.read_elem(elem))
            except Exception as exc:  # noqa: BLE001 - any anndata failure means "not a column"
                logger.debug("%s: skipped (%s)", elem.name, exc)
                return
            if whole.ndim == 1:
                self._whole = whole.astype(object) if whole.dtype.kind in "OU" else whole
                self.length = len(whole)

    @property
    def is_string(self) -> bool:
        """True when the element is a plain string dataset."""
        return self.kind == "dataset" and _is_string_dataset(self._elem)

    @property
    def is_column(self) -> bool:
        """True when the element is a 1-D column (not a matrix or an unknown group)."""
        return self.length >= 0

    def _load_categories(self) -> np.ndarray:
        if self._categories is None:
            if self.kind == "categorical":
                cats = self._elem["categories"]
            else:
                cats = self._elem.file[self._elem.attrs["categories"]]
            if isinstance(cats, h5py.Dataset):
                values = _read_dataset(cats)
            else:
                values = H5Column(cats).read(0, None)
            self._categories = np.asarray(values).astype(object)
        return self._categories

    def _missing_anywhere(self) -> bool:
        if self._has_missing is None:
            self._has_missing = bool(np.asarray(self._elem["mask"][()]).any())
        return self._has_missing

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) as a numpy array."""
        elem = self._elem
        if self._whole is not None:
            return self._whole[start:stop]
        if self.kind == "dataset":
            values = _read_dataset(elem, start, stop)
            if values.dtype == object and self._xml:
                values = decode_strings(values, xml_entities=True)
            return values
        if self.kind in {"categorical", "legacy-categorical"}:
            codes = np.asarray((elem["codes"] if self.kind == "categorical" else elem)[start:stop])
            categories = self._load_categories()
            out = np.empty(len(codes), dtype=object)
            valid = codes >= 0
            out[valid] = categories[codes[valid]]
            out[~valid] = None
            return out
        if self.kind in _NULLABLE_ENCODINGS:
            values = _read_dataset(elem["values"], start, stop)
            if not self._missing_anywhere():
                return values
            mask = np.asarray(elem["mask"][start:stop], dtype=bool)
            if self.kind == "nullable-integer":
                values = values.astype(np.float64)
                values[mask] = np.nan
            else:
                values = values.astype(object)
                values[mask] = None
            return values
        msg = f"{elem.file.filename}: {elem.name} is not a 1-D column"
        raise InputError(msg)


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
class CsrRows:
    """Rows of a CSR matrix stored as ``data``/``indices``/``indptr`` datasets.

    Also serves 10x ``.h5`` files, whose gene x cell CSC is a cell x gene CSR. ``keep_columns``
    (bool per stored column) drops columns, e.g. 10x antibody features; kept columns are renumbered.
    """

    def __init__(
        self,
        group: h5py.Group,
        shape: tuple[int, int],
        *,
        keep_columns: np.ndarray | None = None,
    ) -> None:
        self._data = group["data"]
        self._indices = group["indices"]
        self._indptr = group["indptr"]
        self.shape = shape
        self._remap: np.ndarray | None = None
        self.n_columns = shape[1]
        if keep_columns is not None and not keep_columns.all():
            self._remap = np.full(shape[1], -1, dtype=np.int64)
            self._remap[keep_columns] = np.arange(int(keep_columns.sum()))
            self.n_columns = int(keep_columns.sum())

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop``, reading only their stored values."""
        indptr = np.asarray(self._indptr[start : stop + 1], dtype=np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        indptr -= lo
        data = scipy_dtype(np.asarray(self._data[lo:hi]))
        indices = np.asarray(self._indices[lo:hi])
        if self._remap is not None:
            new = self._remap[indices]
            keep = new >= 0
            kept_before = np.zeros(len(keep) + 1, dtype=np.int64)
            np.cumsum(keep, out=kept_before[1:])
            indptr = kept_before[indptr]
            data, indices = data[keep], new[keep]
        out = sp.csr_matrix((stop - start, self.n_columns), dtype=data.dtype)
        out.data, out.indices, out.indptr = data, indices, indptr
        return out


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


class DenseRows:
    """Rows of a dense 2-D dataset, or columns when ``transposed`` (loom's genes x cells matrix)."""

    def __init__(self, dataset: h5py.Dataset, *, transposed: bool = False) -> None:
        self._ds = dataset
        self._transposed = transposed
        n0, n1 = (int(n) for n in dataset.shape)
        self.shape = (n1, n0) if transposed else (n0, n1)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop`` as CSR, densifying at most DENSE_PIECE_VALUES at once."""
        step = max(1, DENSE_PIECE_VALUES // max(1, self.shape[1]))
        pieces = []
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            dense = np.ascontiguousarray(scipy_dtype(self._ds[:, lo:hi] if self._transposed else self._ds[lo:hi]))
            data, indices, indptr = _kernels._dense_to_csr(dense, self._transposed)
            pieces.append(sp.csr_matrix((data, indices, indptr), shape=(hi - lo, self.shape[1])))
        if not pieces:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")


def matrix_rows(
    elem: h5py.Group | h5py.Dataset, *, path: str, what: str
) -> CsrRows | CscRows | DenseRows:
    """Return the row-block reader of an anndata-encoded matrix (sparse group or dense dataset)."""
    if isinstance(elem, h5py.Dataset):
        if elem.ndim != 2:  # noqa: PLR2004
            msg = f"{path}: {what} is a {elem.ndim}-D dataset, not a matrix; re-export the file"
            raise InputError(msg)
        return DenseRows(elem)
    encoding = _encoding(elem)
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
class H5adReader(BaseReader):
    """An ``.h5ad`` file read with h5py, one row block at a time (see the module docstring)."""

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False) -> None:
        super().__init__(str(path), "h5ad")
        self._file = open_hdf5(path)
        try:
            self._setup(layer=layer, use_raw=use_raw)
        except (OSError, KeyError) as exc:  # h5py's errors for damaged or incomplete files
            self._file.close()
            msg = (
                f"{self.path}: not a readable h5ad file ({one_line(exc)}); "
                "re-download or re-export it"
            )
            raise InputError(msg) from exc
        except BaseException:
            self._file.close()
            raise

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
            layers = f.get("layers")
            names = sorted(layers) if isinstance(layers, h5py.Group) else []
            if layer not in names:
                known = ", ".join(names) or "none"
                msg = f"{self.path}: no layer {layer!r}; available layers: {known}"
                raise InputError(msg)
            matrix, what, var = layers[layer], f"layers[{layer!r}]", self._group("var")
        else:
            if "X" not in f:
                layers = sorted(f["layers"]) if isinstance(f.get("layers"), h5py.Group) else []
                msg = (
                    f"{self.path}: the file has no X; pass layer= (available: "
                    f"{', '.join(layers) or 'none'}) or use_raw=True"
                )
                raise InputError(msg)
            matrix, what, var = f["X"], "X", self._group("var")
        self._what = what
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
        self._var_cache: dict[str, np.ndarray] = {}
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

    @property
    def n_cells(self) -> int:
        """Number of cells (rows of X)."""
        return self._n_cells

    @property
    def var_names(self) -> np.ndarray:
        """Object array of str: the var index (``raw/var`` index with ``use_raw``)."""
        return self._var_names

    @property
    def var_columns(self) -> list[str]:
        """The var dataframe's columns (``raw/var``'s with ``use_raw``)."""
        return list(self._var)

    def var_column(self, name: str) -> np.ndarray:
        """Return var column ``name`` as an object array of str (missing values as ``""``)."""
        self._check_var_column(name)
        if name not in self._var_cache:
            self._var_cache[name] = as_str_array(self._var[name].read(0, None))
        return self._var_cache[name]

    @property
    def obs_columns(self) -> list[str]:
        """The obs dataframe's 1-D columns, in their written order."""
        return list(self._obs)

    def _read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._matrix.read(start, stop)

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return as_str_array(self._cell_index.read(start, stop))

    def _read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._obs[name].read(start, stop)

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()


def _sniff_h5ad(source: Any) -> bool:
    return is_hdf5_with(source, required=("obs", "var"), any_of=("X", "layers", "raw"))


@register_reader("h5ad", suffixes=(".h5ad",), sniff=_sniff_h5ad, options=("layer", "use_raw"))
def _open_h5ad(path: Path, *, layer: str | None = None, use_raw: bool = False) -> H5adReader:
    return H5adReader(path, layer=layer, use_raw=use_raw)
