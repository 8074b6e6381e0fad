"""Loom files (http://linnarssonlab.org/loompy/format/) read block by block with h5py.

``/matrix`` (or ``/layers/<name>``) is a dense genes x cells dataset; a block of cells is a column
slab, read in pieces of at most :data:`~genecorpus.io.store.DENSE_PIECE_VALUES` values and
transposed, so memory does not grow with the file.

Genes: every 1-D ``/row_attrs`` dataset is a var column under its own name (``Gene``, ``Accession``,
``ensembl_id``...). The var index is ``Gene`` when present, else ``var_names`` (anndata's loom
writer), else the first string row attribute in HDF5 (alphabetical) order; a file with none of
these is refused (genes without ids cannot be mapped).
Cells: every 1-D ``/col_attrs`` dataset is an obs column; cell ids are ``CellID``, else
``obs_names``, else ``cell_names``, else the first string column attribute, else the column number.
Strings are decoded from loom's XML-escaped ASCII.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from genecorpus.errors import InputError
from genecorpus.io.hdf5 import HDF5Reader, is_hdf5_with
from genecorpus.io.reader import as_str_array
from genecorpus.io.registry import register_reader
from genecorpus.io.store import DenseRows, StoredColumn, get_layer

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["CELL_ID_ATTRS", "GENE_INDEX_ATTRS", "LoomReader"]

logger = logging.getLogger(__name__)

GENE_INDEX_ATTRS = ("Gene", "var_names")
"""Row attributes tried, in order, as the var index."""

CELL_ID_ATTRS = ("CellID", "obs_names", "cell_names")
"""Column attributes tried, in order, as the cell ids."""


def _attr_columns(group: h5py.Group | None, n_rows: int) -> dict[str, StoredColumn]:
    if not isinstance(group, h5py.Group):
        return {}
    columns = {}
    for name in group:
        elem = group[name]
        if isinstance(elem, h5py.Dataset) and elem.ndim == 1 and elem.shape[0] == n_rows:
            columns[name] = StoredColumn(elem, xml_entities=True)
    return columns


def _pick_index(columns: dict[str, StoredColumn], preferred: tuple[str, ...]) -> str | None:
    for name in preferred:
        if name in columns:
            return name
    for name, column in columns.items():
        if column.is_string:
            return name
    return None


class LoomReader(HDF5Reader):
    """A ``.loom`` file read one block of cells (a column slab of genes x cells) at a time.

    Cells are the columns of ``/matrix``; ``var_columns`` are the 1-D ``/row_attrs`` datasets and
    ``obs_columns`` the 1-D ``/col_attrs`` datasets (see the module docstring for the ids).
    """

    def __init__(self, path: Path, *, layer: str | None = None) -> None:
        super().__init__(path, "loom", kind="HDF5/loom", layout="loom", layer=layer)

    def _setup(self, *, layer: str | None) -> None:
        f = self._file
        if layer is None:
            matrix = f.get("matrix")
            what = "/matrix"
        else:
            matrix, what = get_layer(f, layer, path=self.path), f"/layers/{layer}"
        if not isinstance(matrix, h5py.Dataset) or matrix.ndim != 2:
            msg = (
                f"{self.path}: {what} is missing or not a 2-D matrix, so not a loom file; "
                "re-export it"
            )
            raise InputError(msg)
        self._matrix = DenseRows(matrix, transposed=True)
        self.stored_dense = True
        n_cells, n_genes = self._matrix.shape
        self._n_cells = n_cells
        self._var = _attr_columns(f.get("row_attrs"), n_genes)
        self._obs = _attr_columns(f.get("col_attrs"), n_cells)
        gene_index = _pick_index(self._var, GENE_INDEX_ATTRS)
        if gene_index is None:  # row numbers would map to no gene, so say what is missing
            found = ", ".join(self._var) or "none"
            msg = (
                f"{self.path}: no gene ids: row_attrs has no Gene, var_names or other string "
                f"attribute of {n_genes} values (found: {found}); add row_attrs/Gene or re-export it"
            )
            raise InputError(msg)
        logger.debug("%s: gene ids from row_attrs/%s", self.path, gene_index)
        self._var_names = as_str_array(self._var[gene_index].read(0, None))
        cell_index = _pick_index(self._obs, CELL_ID_ATTRS)
        if cell_index is None:
            logger.warning("%s: no string column attribute; cell ids are column numbers", self.path)
        self._cell_index = None if cell_index is None else self._obs[cell_index]

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._cell_index is None:
            return np.arange(start, stop).astype(str).astype(object)
        return as_str_array(self._cell_index.read(start, stop))


def _sniff_loom(source: Any) -> bool:
    return is_hdf5_with(source, required=("matrix", "row_attrs", "col_attrs"))


@register_reader("loom", suffixes=(".loom",), sniff=_sniff_loom, options=("layer",))
def _open_loom(path: Path, *, layer: str | None = None) -> LoomReader:
    return LoomReader(path, layer=layer)
