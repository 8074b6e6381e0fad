"""AnnData ``.h5ad`` files read block by block with h5py.

The file is opened with h5py and read as :mod:`~genecorpus.io.anndata_layout` describes (the layout,
the cost of a block for CSR, CSC and dense X, and the types of the obs columns), without calling
``anndata.read_h5ad``; the zarr reader (:mod:`~genecorpus.io.zarr`) reads the same layout from a
folder.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from genecorpus.io.anndata_layout import AnnDataLayoutReader
from genecorpus.io.hdf5 import HDF5Reader, is_hdf5_with
from genecorpus.io.registry import register_reader

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["H5adReader"]


class H5adReader(HDF5Reader, AnnDataLayoutReader):
    """An ``.h5ad`` file read with h5py, one row block at a time.

    Cells are the rows of X; ``var_names`` is the var index and ``var_columns`` are the var
    dataframe's columns (``raw/var``'s with ``use_raw``); ``var_column`` gives missing values as
    ``""``; ``obs_columns`` are the obs dataframe's 1-D columns, in their written order.
    """

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False) -> None:
        super().__init__(
            path, "h5ad", kind="HDF5/h5ad", layout="h5ad", layer=layer, use_raw=use_raw
        )

    def _setup(self, *, layer: str | None, use_raw: bool) -> None:
        self._setup_layout(self._file, layer=layer, use_raw=use_raw)


def _sniff_h5ad(source: Any) -> bool:
    return is_hdf5_with(source, required=("obs", "var"), any_of=("X", "layers", "raw"))


@register_reader("h5ad", suffixes=(".h5ad",), sniff=_sniff_h5ad, options=("layer", "use_raw"))
def _open_h5ad(path: Path, *, layer: str | None = None, use_raw: bool = False) -> H5adReader:
    return H5adReader(path, layer=layer, use_raw=use_raw)
