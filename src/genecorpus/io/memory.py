"""In-memory ``anndata.AnnData`` objects as a :class:`~genecorpus.io.CellSource` (``"anndata"``).

Blocks are row slices of ``X`` (or ``layers[layer]``, or ``raw.X``): CSR matrices, dense arrays,
backed AnnData matrices and dask arrays are sliced as they are; an in-memory CSC matrix is converted
to CSR once when the source is opened (a copy of the matrix), because slicing rows of a CSC costs a
pass over all of it per block. Obs columns follow the conventions of the h5ad reader (see
:mod:`genecorpus.io.anndata_layout`), so a dataset gives the same blocks from memory and from disk.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from genecorpus.errors import InputError
from genecorpus.io.reader import BaseReader, as_str_array, scipy_dtype
from genecorpus.io.registry import register_reader

__all__ = ["AnnDataReader"]

logger = logging.getLogger(__name__)


def _is_anndata(source: Any) -> bool:
    try:
        import anndata  # anndata is heavy; only needed for in-memory sources
    except ImportError:  # pragma: no cover - anndata is a dependency
        return False
    return isinstance(source, anndata.AnnData)


class _ObsColumn:
    """One obs column read by row range, typed as the h5ad reader types it."""

    def __init__(self, series: pd.Series) -> None:
        self._series = series
        self._has_missing = bool(series.isna().any())

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) as a numpy array."""
        series = self._series
        dtype = series.dtype
        if isinstance(dtype, pd.CategoricalDtype):
            codes = series.cat.codes.to_numpy()[start:stop]
            categories = dtype.categories.to_numpy(dtype=object)
            out = np.empty(len(codes), dtype=object)
            valid = codes >= 0
            out[valid] = categories[codes[valid]]
            out[~valid] = None
            return out
        part = series.iloc[start:stop]
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and not isinstance(dtype, np.dtype):
            if not self._has_missing and dtype.kind in "iub":
                return np.asarray(part.to_numpy(dtype=dtype.numpy_dtype))
            if dtype.kind in "iuf":
                return np.asarray(part.to_numpy(dtype=np.float64, na_value=np.nan))
            return np.asarray(part.to_numpy(dtype=object, na_value=None))
        if dtype.kind == "O":
            return np.asarray(part.to_numpy(dtype=object))
        return np.asarray(part.to_numpy())


class _VarColumn:
    """One var column read as objects (a categorical's values, not its codes)."""

    def __init__(self, series: pd.Series) -> None:
        self._series = series

    def read(self, start: int, stop: int | None) -> np.ndarray:
        """Return rows ``start:stop`` (``stop=None``: to the end) as an object array."""
        series = self._series
        if isinstance(series.dtype, pd.CategoricalDtype):
            series = series.astype(object)
        return series.to_numpy(dtype=object)[start:stop]


class AnnDataReader(BaseReader):
    """An in-memory (or backed) ``anndata.AnnData`` read by row blocks.

    Cells are the AnnData's ``n_obs`` rows; ``var_names`` and ``var_columns`` are those of ``var``
    (``raw.var``'s with ``use_raw``); ``var_column`` gives missing values as ``""``;
    ``obs_columns`` are the columns of ``obs``.
    """

    def __init__(self, adata: Any, *, layer: str | None = None, use_raw: bool = False) -> None:
        name = str(adata.filename) if getattr(adata, "isbacked", False) else "<in-memory AnnData>"
        super().__init__(name, "anndata")
        if layer is not None and use_raw:
            msg = f"{name}: give layer= or use_raw=True, not both"
            raise InputError(msg)
        if use_raw:
            if adata.raw is None:
                msg = (
                    f"{name}: use_raw=True but the AnnData has no .raw; drop use_raw or pass layer="
                )
                raise InputError(msg)
            matrix, var = adata.raw.X, adata.raw.var
        elif layer is not None:
            if layer not in adata.layers:
                known = ", ".join(adata.layers.keys()) or "none"
                msg = f"{name}: no layer {layer!r}; available layers: {known}"
                raise InputError(msg)
            matrix, var = adata.layers[layer], adata.var
        else:
            matrix, var = adata.X, adata.var
        if matrix is None:
            msg = f"{name}: the AnnData has no X; pass layer= or use_raw=True"
            raise InputError(msg)
        if isinstance(matrix, sp.csc_matrix | sp.csc_array):
            logger.info("%s: converting the CSC matrix to CSR once (a copy) for row blocks", name)
            matrix = sp.csr_matrix(matrix)
        self._matrix = matrix
        self.stored_dense = not sp.issparse(matrix)
        self._n_cells = int(adata.n_obs)
        self._cell_ids = as_str_array(adata.obs_names.to_numpy())
        self._var_names = as_str_array(var.index.to_numpy())
        self._var = {str(col): _VarColumn(var[col]) for col in var.columns}
        self._obs = {str(col): _ObsColumn(adata.obs[col]) for col in adata.obs.columns}

    def _read_counts(self, start: int, stop: int) -> Any:
        block = self._matrix[start:stop]
        if hasattr(block, "compute"):  # dask
            block = block.compute()
        if sp.issparse(block):
            return block
        return sp.csr_matrix(scipy_dtype(np.asarray(block)))

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self._cell_ids[start:stop]


@register_reader("anndata", sniff=_is_anndata, options=("layer", "use_raw"), in_memory=True)
def _open_anndata(adata: Any, *, layer: str | None = None, use_raw: bool = False) -> AnnDataReader:
    return AnnDataReader(adata, layer=layer, use_raw=use_raw)
