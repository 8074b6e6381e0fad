"""Arrays and groups of a hierarchical store, and what reads them by row range.

The HDF5 formats (h5ad, loom, 10x ``.h5``, read with h5py) and zarr AnnData folders keep their data
in the same shape: groups of named members with attributes, and n-dimensional arrays read by slicing.
:class:`ArrayNode` and :class:`GroupNode` are the part of that interface the readers use; h5py's
``Dataset`` and ``Group`` satisfy them as they are, and :mod:`genecorpus.io.zarr` wraps zarr's objects
to fit (strings as object arrays of str, damaged chunks as :class:`OSError`). On top of them:
:class:`StoredColumn` reads a per-cell or per-gene column by row range (plain arrays and anndata's
encodings), :class:`CsrRows` and :class:`DenseRows` read row blocks of a stored matrix without loading
it, and :func:`get_layer` finds a ``/layers`` member.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import h5py
import numpy as np
import scipy.sparse as sp

from genecorpus import _kernels
from genecorpus.errors import InputError
from genecorpus.io.reader import decode_strings, scipy_dtype

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

__all__ = [
    "DENSE_PIECE_VALUES",
    "ArrayNode",
    "CsrRows",
    "DenseRows",
    "GroupNode",
    "MatrixRows",
    "StoredColumn",
    "encoding_type",
    "get_layer",
    "is_array",
    "is_group",
    "layer_names",
]

logger = logging.getLogger(__name__)

DENSE_PIECE_VALUES = 1 << 24
"""Most dense values (cells x genes) read from a dense matrix at once (128 MiB as float64)."""

_NULLABLE_ENCODINGS = {"nullable-integer", "nullable-boolean", "nullable-string-array"}


class OpenStore(Protocol):
    """The file or folder a node belongs to (h5py's ``File``, the zarr reader's folder)."""

    filename: str


@runtime_checkable
class ArrayNode(Protocol):
    """An n-dimensional array of a store: ``h5py.Dataset`` or the zarr reader's array."""

    shape: tuple[int, ...]
    ndim: int
    dtype: np.dtype
    attrs: Mapping[str, Any]
    name: str
    """Path inside the store, e.g. ``/X/data``."""
    file: OpenStore

    def __getitem__(self, selection: Any) -> Any:
        """Return the selected values (a numpy array, or a scalar for an integer index)."""
        ...


@runtime_checkable
class GroupNode(Protocol):
    """A group of named arrays and groups: ``h5py.Group`` or the zarr reader's group."""

    attrs: Mapping[str, Any]
    name: str
    file: OpenStore

    def __contains__(self, name: object) -> bool:
        """Whether the group has a member ``name``."""
        ...

    def __getitem__(self, name: str) -> Any:
        """Return member ``name`` (an array or a group)."""
        ...

    def __iter__(self) -> Iterator[str]:
        """Iterate over the members' names."""
        ...

    def get(self, name: str) -> Any:
        """Return member ``name``, or None when there is none."""
        ...


def is_array(node: Any) -> bool:
    """Return True when ``node`` is an array of a store (not a group)."""
    return isinstance(node, ArrayNode)


def is_group(node: Any) -> bool:
    """Return True when ``node`` is a group of a store (not an array)."""
    return not is_array(node) and isinstance(node, GroupNode)


def encoding_type(node: ArrayNode | GroupNode) -> str:
    """Return anndata's ``encoding-type`` attribute of a node (``""`` when it has none)."""
    value = node.attrs.get("encoding-type", "")
    return value.decode() if isinstance(value, bytes) else str(value)


def layer_names(root: GroupNode) -> list[str]:
    """Return the sorted names in the store's ``/layers`` group (none without that group)."""
    layers = root.get("layers")
    return sorted(layers) if is_group(layers) else []


def get_layer(root: GroupNode, name: str, *, path: str) -> ArrayNode | GroupNode:
    """Return ``/layers/<name>``; a missing one is an InputError listing those there are."""
    names = layer_names(root)
    if name not in names:
        known = ", ".join(names) or "none"
        msg = f"{path}: no layer {name!r}; available layers: {known}"
        raise InputError(msg)
    return root["layers"][name]


def _is_string_array(array: ArrayNode) -> bool:
    if array.dtype.kind in "SU":
        return True
    if isinstance(array, h5py.Dataset):  # h5py marks variable-length strings in the dtype
        return h5py.check_string_dtype(array.dtype) is not None
    return array.dtype.kind == "O"  # other stores give strings as object arrays of str


def _read_values(array: ArrayNode, start: int | None = None, stop: int | None = None) -> np.ndarray:
    """Rows ``start:stop`` of a 1-D array; strings as an object array of str."""
    sl = slice(start, stop)
    if isinstance(array, h5py.Dataset) and h5py.check_string_dtype(array.dtype) is not None:
        return np.asarray(array.asstr()[sl], dtype=object)  # h5py gives bytes unless asked for str
    values = np.asarray(array[sl])
    return decode_strings(values) if values.dtype.kind in "SU" else values


def _is_legacy_categorical(array: ArrayNode) -> bool:
    """anndata < 0.7 wrote categoricals to HDF5 as codes whose ``categories`` attribute references
    the values (an HDF5 object reference, so no other store has them)."""
    return isinstance(array, h5py.Dataset) and "categories" in array.attrs


class StoredColumn:
    """One per-cell or per-gene column of a store, readable by row range.

    Handles string, numeric and boolean arrays, anndata ``categorical`` and ``nullable-*`` groups,
    and pre-0.7 categoricals of HDF5 files (a codes dataset whose ``categories`` attribute references
    the values). Other encodings are read whole once with ``anndata.io.read_elem`` and then sliced.
    """

    def __init__(self, node: ArrayNode | GroupNode, *, xml_entities: bool = False) -> None:
        self._node = node
        self._xml = xml_entities
        self._categories: np.ndarray | None = None
        self._whole: np.ndarray | None = None
        self._has_missing: bool | None = None
        encoding = encoding_type(node)
        if is_array(node):
            self.kind = "legacy-categorical" if _is_legacy_categorical(node) else "array"
            self.length = int(node.shape[0]) if node.ndim == 1 else -1
        elif encoding == "categorical":
            self.kind = "categorical"
            self.length = int(node["codes"].shape[0])
        elif encoding in _NULLABLE_ENCODINGS:
            self.kind = encoding
            self.length = int(node["values"].shape[0])
        else:
            self.kind = "other"
            self.length = -1
            if encoding in {"string-array", "array", ""}:
                return
            try:
                import anndata.io  # only needed for rare encodings

                # a wrapped node (the zarr reader's) hands anndata the store's own object
                whole = np.asarray(anndata.io.read_elem(getattr(node, "native", node)))
            except Exception as exc:  # noqa: BLE001 - any anndata failure means "not a column"
                logger.debug("%s: skipped (%s)", node.name, exc)
                return
            if whole.ndim == 1:
                self._whole = whole.astype(object) if whole.dtype.kind in "OUT" else whole
                self.length = len(whole)

    @property
    def is_string(self) -> bool:
        """True when the node is a plain string array."""
        return self.kind == "array" and _is_string_array(self._node)

    @property
    def is_column(self) -> bool:
        """True when the node is a 1-D column (not a matrix or an unknown group)."""
        return self.length >= 0

    def _load_categories(self) -> np.ndarray:
        if self._categories is None:
            if self.kind == "categorical":
                categories = self._node["categories"]
            else:
                categories = self._node.file[self._node.attrs["categories"]]
            if is_array(categories):
                values = _read_values(categories)
            else:
                values = StoredColumn(categories).read(0, None)
            self._categories = np.asarray(values).astype(object)
        return self._categories

    def _missing_anywhere(self) -> bool:
        if self._has_missing is None:
            self._has_missing = bool(np.asarray(self._node["mask"][()]).any())
        return self._has_missing

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) as a numpy array."""
        node = self._node
        if self._whole is not None:
            return self._whole[start:stop]
        if self.kind == "array":
            values = _read_values(node, start, stop)
            if values.dtype == object and self._xml:
                values = decode_strings(values, xml_entities=True)
            return values
        if self.kind in {"categorical", "legacy-categorical"}:
            codes = np.asarray((node["codes"] if self.kind == "categorical" else node)[start:stop])
            categories = self._load_categories()
            out = np.empty(len(codes), dtype=object)
            valid = codes >= 0
            out[valid] = categories[codes[valid]]
            out[~valid] = None
            return out
        if self.kind in _NULLABLE_ENCODINGS:
            values = _read_values(node["values"], start, stop)
            if not self._missing_anywhere():
                return values
            mask = np.asarray(node["mask"][start:stop], dtype=bool)
            if self.kind == "nullable-integer":
                values = values.astype(np.float64)
                values[mask] = np.nan
            else:
                values = values.astype(object)
                values[mask] = None
            return values
        msg = f"{node.file.filename}: {node.name} is not a 1-D column"
        raise InputError(msg)


# ---- matrix access by row block ------------------------------------------------------------------
class MatrixRows(Protocol):
    """Row blocks of a matrix held in a store (:class:`CsrRows`, :class:`DenseRows`...)."""

    shape: tuple[int, int]
    """(cells, genes)."""

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop`` as CSR."""
        ...


class CsrRows:
    """Rows of a CSR matrix stored as ``data``/``indices``/``indptr`` arrays.

    Also serves 10x ``.h5`` files, whose gene x cell CSC is a cell x gene CSR. ``keep_columns``
    (bool per stored column) drops columns, e.g. 10x antibody features; kept columns are renumbered.
    """

    def __init__(
        self,
        group: GroupNode,
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


class DenseRows:
    """Rows of a dense 2-D array, or columns when ``transposed`` (loom's genes x cells matrix)."""

    def __init__(self, array: ArrayNode, *, transposed: bool = False) -> None:
        self._array = array
        self._transposed = transposed
        n0, n1 = (int(n) for n in array.shape)
        self.shape = (n1, n0) if transposed else (n0, n1)

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop`` as CSR, densifying at most DENSE_PIECE_VALUES at once."""
        step = max(1, DENSE_PIECE_VALUES // max(1, self.shape[1]))
        pieces = []
        for lo in range(start, stop, step):
            hi = min(lo + step, stop)
            piece = self._array[:, lo:hi] if self._transposed else self._array[lo:hi]
            dense = np.ascontiguousarray(scipy_dtype(piece))
            data, indices, indptr = _kernels.dense_to_csr(dense, self._transposed)
            pieces.append(sp.csr_matrix((data, indices, indptr), shape=(hi - lo, self.shape[1])))
        if not pieces:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
