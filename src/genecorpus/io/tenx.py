"""10x Genomics count matrices: matrix folders (``10x-mtx``) and HDF5 files (``10x-h5``).

Both layouts of cellranger are read:

- folders: cellranger 2 ``matrix.mtx`` + ``genes.tsv`` + ``barcodes.tsv``; cellranger 3
  ``matrix.mtx.gz`` + ``features.tsv.gz`` + ``barcodes.tsv.gz`` (each file plain or gzipped). The
  path may be the folder or its ``matrix.mtx[.gz]``; a file name prefix (GEO style
  ``GSM1_matrix.mtx.gz`` with ``GSM1_features.tsv.gz``...) is followed.
- ``.h5``: cellranger 2 (one group per genome with ``data``, ``indices``, ``indptr``, ``shape``,
  ``genes``, ``gene_names``, ``barcodes``) and cellranger 3 (``/matrix`` with ``features/{id, name,
  feature_type, genome}``).

10x matrices are genes x cells in CSC, i.e. CSR over cells, so an ``.h5`` block reads only its own
stored values. A Matrix Market file has no index, so ``10x-mtx`` parses it whole once when opened
(memory ~ 16 bytes per stored value) and slices blocks from memory.

Only ``Gene Expression`` features are kept (antibody capture, CRISPR guide and custom features are
dropped and logged). The var index is the feature id (Ensembl gene id for cellranger references);
var columns are ``gene_ids``, ``gene_symbols``, ``feature_types`` and, for cellranger 3 ``.h5``,
``genome``. There are no obs columns; cell ids are the barcodes.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from genecorpus.errors import InputError
from genecorpus.io.hdf5 import HDF5Reader, is_hdf5_with
from genecorpus.io.reader import ArrayColumn, BaseReader, as_str_array, decode_strings, one_line
from genecorpus.io.registry import register_reader
from genecorpus.io.store import CsrRows

__all__ = ["GENE_EXPRESSION", "TenxH5Reader", "TenxMtxReader"]

logger = logging.getLogger(__name__)

GENE_EXPRESSION = "Gene Expression"
"""The 10x feature type that is kept."""

_V2_DATASETS = ("data", "indices", "indptr", "shape", "genes", "barcodes")


def _gene_expression_features(
    path: str,
    ids: np.ndarray,
    symbols: np.ndarray,
    types: np.ndarray,
    extra: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, ArrayColumn]]:
    """Return which features are kept (Gene Expression ones) and the var columns of those.

    The columns are ``gene_ids``, ``gene_symbols``, ``feature_types`` and those of ``extra``, as
    object arrays of str.
    """
    keep = types == GENE_EXPRESSION
    if not keep.any():
        found = ", ".join(sorted(set(types.tolist()))) or "none"
        msg = (
            f"{path}: no {GENE_EXPRESSION!r} features (feature types: {found}); "
            "genecorpus needs a gene expression matrix"
        )
        raise InputError(msg)
    if not keep.all():
        dropped = pd.Series(types[~keep]).value_counts().to_dict()
        logger.info("%s: dropped non gene-expression features %s", path, dropped)
    columns = {"gene_ids": ids, "gene_symbols": symbols, "feature_types": types, **(extra or {})}
    var = {name: ArrayColumn(as_str_array(values[keep])) for name, values in columns.items()}
    return np.asarray(keep, dtype=bool), var


# ---- 10x .h5 -------------------------------------------------------------------------------------
class TenxH5Reader(HDF5Reader):
    """A cellranger 2 or 3 ``.h5`` matrix, read one block of barcodes at a time."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "10x-h5", kind="10x HDF5", layout="10x HDF5")

    def _setup(self) -> None:
        f = self._file
        matrix = f.get("matrix")
        if isinstance(matrix, h5py.Group) and "features" in matrix:
            group = matrix
            features = matrix["features"]
            ids = decode_strings(features["id"][()])
            symbols = decode_strings(features["name"][()]) if "name" in features else ids
            types = (
                decode_strings(features["feature_type"][()])
                if "feature_type" in features
                else np.full(len(ids), GENE_EXPRESSION, dtype=object)
            )
            extra = (
                {"genome": decode_strings(features["genome"][()])} if "genome" in features else {}
            )
            self.version = 3
        else:
            genomes = [
                name
                for name in f
                if isinstance(f[name], h5py.Group) and all(k in f[name] for k in _V2_DATASETS)
            ]
            if len(genomes) != 1:
                found = ", ".join(genomes) or "none"
                msg = (
                    f"{self.path}: expected one cellranger 2 genome group (with data, indices, "
                    "indptr, shape, genes, barcodes) or a cellranger 3 /matrix group, found "
                    f"genome groups: {found}; split multi-genome files per genome first"
                )
                raise InputError(msg)
            group = f[genomes[0]]
            ids = decode_strings(group["genes"][()])
            symbols = decode_strings(group["gene_names"][()]) if "gene_names" in group else ids
            types = np.full(len(ids), GENE_EXPRESSION, dtype=object)
            extra = {}
            self.version = 2
        n_features, n_cells = (int(n) for n in group["shape"][()][:2])
        self._barcodes = group["barcodes"]
        if len(ids) != n_features or self._barcodes.shape[0] != n_cells:
            msg = (
                f"{self.path}: shape {n_features} x {n_cells} does not match {len(ids)} features "
                f"and {self._barcodes.shape[0]} barcodes; the file is inconsistent: re-export it"
            )
            raise InputError(msg)
        keep, features = _gene_expression_features(self.path, ids, symbols, types, extra)
        self._var, self._var_names = features, features["gene_ids"].values
        self._matrix = CsrRows(group, (n_cells, n_features), keep_columns=keep)
        self._n_cells = n_cells

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return decode_strings(self._barcodes[start:stop])


def _sniff_10x_h5(source: Any) -> bool:
    if is_hdf5_with(source, required=("matrix/features", "matrix/barcodes", "matrix/indptr")):
        return True
    if not isinstance(source, Path) or not is_hdf5_with(source):
        return False
    try:
        with h5py.File(source, "r") as f:
            return any(
                isinstance(f[name], h5py.Group) and all(k in f[name] for k in _V2_DATASETS)
                for name in f
            )
    except (OSError, ValueError, KeyError):
        return False


@register_reader("10x-h5", suffixes=(".h5",), sniff=_sniff_10x_h5)
def _open_10x_h5(path: Path) -> TenxH5Reader:
    return TenxH5Reader(path)


# ---- 10x matrix folders --------------------------------------------------------------------------
_MATRIX_NAMES = ("matrix.mtx.gz", "matrix.mtx")


def _find_first(folder: Path, prefix: str, names: tuple[str, ...]) -> Path | None:
    for name in names:
        candidate = folder / f"{prefix}{name}"
        if candidate.is_file():
            return candidate
    return None


def _locate_files(path: Path) -> tuple[Path, Path, Path]:
    """Return the matrix, features/genes and barcodes files of a 10x folder (or its matrix file)."""
    if path.is_dir():
        folder, prefix = path, ""
        matrix = _find_first(folder, prefix, _MATRIX_NAMES)
    else:
        folder, matrix = path.parent, path
        lower = path.name.lower()
        suffix = next((n for n in _MATRIX_NAMES if lower.endswith(n)), None)
        prefix = path.name[: len(path.name) - len(suffix)] if suffix else ""
    features = _find_first(
        folder, prefix, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    )
    barcodes = _find_first(folder, prefix, ("barcodes.tsv.gz", "barcodes.tsv"))
    for found, what in (
        (matrix, "matrix.mtx[.gz]"),
        (features, "features.tsv[.gz] or genes.tsv[.gz]"),
        (barcodes, "barcodes.tsv[.gz]"),
    ):
        if found is None:
            msg = (
                f"{path}: no {prefix}{what} found in {folder}; a 10x matrix folder needs all "
                "three files"
            )
            raise InputError(msg)
    return matrix, features, barcodes  # type: ignore[return-value]


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE
        )
    except (OSError, EOFError, ValueError, pd.errors.ParserError) as exc:
        msg = f"{path}: not a readable 10x table ({one_line(exc)}); re-download or re-export it"
        raise InputError(msg) from exc


class TenxMtxReader(BaseReader):
    """A 10x matrix folder, parsed once when opened (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), "10x-mtx")
        matrix_file, features_file, barcodes_file = _locate_files(path)
        features = _read_tsv(features_file)
        barcodes = _read_tsv(barcodes_file)
        self.version = 3 if "features" in features_file.name.lower() else 2
        ids = features[0].to_numpy(dtype=object)
        symbols = features[1].to_numpy(dtype=object) if features.shape[1] > 1 else ids
        types = (
            features[2].to_numpy(dtype=object)
            if features.shape[1] > 2
            else np.full(len(ids), GENE_EXPRESSION, dtype=object)
        )
        try:
            coo = scipy.io.mmread(str(matrix_file))
        except (OSError, EOFError, ValueError, RuntimeError) as exc:
            msg = (
                f"{matrix_file}: not a readable Matrix Market file ({one_line(exc)}); "
                "re-download it"
            )
            raise InputError(msg) from exc
        if coo.shape != (len(ids), len(barcodes)):
            msg = (
                f"{matrix_file}: matrix is {coo.shape[0]} x {coo.shape[1]} but "
                f"{features_file.name} lists {len(ids)} features and {barcodes_file.name} "
                f"{len(barcodes)} barcodes; "
                "the folder mixes files of different matrices"
            )
            raise InputError(msg)
        keep, features = _gene_expression_features(self.path, ids, symbols, types)
        self._var, self._var_names = features, features["gene_ids"].values
        counts = sp.csr_matrix(sp.coo_matrix(coo).T)
        self._counts = counts if keep.all() else counts[:, np.flatnonzero(keep)]
        self._barcodes = as_str_array(barcodes[0].to_numpy(dtype=object))
        self._n_cells = len(self._barcodes)

    def _read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._counts[start:stop]

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self._barcodes[start:stop]


def _sniff_10x_mtx(source: Any) -> bool:
    if not isinstance(source, Path):
        return False
    if source.is_dir():
        return any((source / name).is_file() for name in _MATRIX_NAMES)
    return source.name.lower().endswith(_MATRIX_NAMES)


@register_reader("10x-mtx", suffixes=(".mtx", ".mtx.gz"), sniff=_sniff_10x_mtx)
def _open_10x_mtx(path: Path) -> TenxMtxReader:
    return TenxMtxReader(path)
