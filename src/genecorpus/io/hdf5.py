"""HDF5 mechanism shared by the h5ad, loom and 10x ``.h5`` readers.

:class:`HDF5Reader` opens the file and refuses damaged ones with one-line errors; :class:`H5Column`
reads a per-cell or per-gene column by row range (plain datasets and anndata's encodings);
:class:`CsrRows` and :class:`DenseRows` read row blocks of a stored matrix without loading it;
:func:`is_hdf5_with` is the content test of the HDF5 formats.
"""

from __future__ import annotations

import abc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import h5py
import numpy as np
import scipy.sparse as sp

from genecorpus import _kernels
from genecorpus.errors import InputError
from genecorpus.io.reader import BaseReader, decode_strings, one_line, scipy_dtype

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "DENSE_PIECE_VALUES",
    "CsrRows",
    "DenseRows",
    "H5Column",
    "HDF5Reader",
    "MatrixRows",
    "encoding_type",
    "is_hdf5_with",
]

logger = logging.getLogger(__name__)

DENSE_PIECE_VALUES = 1 << 24
"""Most dense values (cells x genes) read from a dense matrix at once (128 MiB as float64)."""

_NULLABLE_ENCODINGS = {"nullable-integer", "nullable-boolean", "nullable-string-array"}


class MatrixRows(Protocol):
    """Row blocks of a matrix stored in an HDF5 file (:class:`CsrRows`, :class:`DenseRows`...)."""

    shape: tuple[int, int]
    """(cells, genes)."""

    def read(self, start: int, stop: int) -> sp.csr_matrix:
        """Return rows ``start:stop`` as CSR."""
        ...


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

    def _layer_names(self) -> list[str]:
        """Return the sorted names in the file's ``/layers`` group (none without that group)."""
        layers = self._file.get("layers")
        return sorted(layers) if isinstance(layers, h5py.Group) else []

    def _layer(self, name: str) -> h5py.Group | h5py.Dataset:
        """Return ``/layers/<name>``; a missing one is an InputError listing those there are."""
        names = self._layer_names()
        if name not in names:
            known = ", ".join(names) or "none"
            msg = f"{self.path}: no layer {name!r}; available layers: {known}"
            raise InputError(msg)
        return self._file["layers"][name]

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


def encoding_type(elem: h5py.Group | h5py.Dataset) -> str:
    """Return anndata's ``encoding-type`` attribute of an element (``""`` when it has none)."""
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
        encoding = encoding_type(elem)
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
                import anndata.io  # only needed for rare encodings

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
            piece = self._ds[:, lo:hi] if self._transposed else self._ds[lo:hi]
            dense = np.ascontiguousarray(scipy_dtype(piece))
            data, indices, indptr = _kernels.dense_to_csr(dense, self._transposed)
            pieces.append(sp.csr_matrix((data, indices, indptr), shape=(hi - lo, self.shape[1])))
        if not pieces:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        return pieces[0] if len(pieces) == 1 else sp.vstack(pieces, format="csr")
