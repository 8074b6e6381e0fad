"""Synthetic raw-count data for tests and benchmarks, written in every format genecorpus reads.

:func:`random_counts` makes a cells x genes CSR matrix; the ``write_*`` functions put a matrix, its
cell ids and gene ids (and optional per-cell columns) into one format each, independently of the
readers in :mod:`genecorpus.io` (anndata writes h5ad; the other layouts are written from their
specifications with h5py, ``scipy.io.mmwrite`` and pandas). Matrices may hold any values, including
negative, fractional, NaN or infinite ones, so that tests can check the errors raised for bad input.

Examples
--------
>>> import tempfile
>>> counts = random_counts(20, 30, seed=1)
>>> counts.shape, counts.data.dtype.name
((20, 30), 'int32')
>>> with tempfile.TemporaryDirectory() as tmp:
...     paths = write_all_formats(tmp, counts, cell_ids=cell_ids_for(20), gene_ids=gene_ids_for(30))
...     sorted(paths)[:3]
['10x-h5-v2', '10x-h5-v3', '10x-mtx-v2']
"""

from __future__ import annotations

import gzip
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Required, TypedDict, Unpack

import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "AnnDataContent",
    "cell_ids_for",
    "gene_ids_for",
    "random_counts",
    "write_10x_h5",
    "write_10x_mtx",
    "write_all_formats",
    "write_h5ad",
    "write_loom",
    "write_text",
    "write_zarr",
]

PathLike = str | os.PathLike[str]


def random_counts(
    n_cells: int, n_genes: int, *, density: float = 0.1, seed: int = 0
) -> sp.csr_matrix:
    """Return random raw counts: mostly 1-3 with a long tail (P(count >= k) = 1/k, up to 65,535).

    Each cell draws Binomial(n_genes, density) gene positions (duplicates merged, so the density is
    slightly below ``density``). Memory and time are O(nnz), so it also makes benchmark-sized data.

    Returns
    -------
    ``scipy.sparse.csr_matrix`` (n_cells, n_genes), int32 data, sorted int32 indices, no explicit
    zeros.
    """
    rng = np.random.default_rng(seed)
    per_cell = rng.binomial(n_genes, density, size=n_cells)
    rows = np.repeat(np.arange(n_cells, dtype=np.int64), per_cell)
    cols = rng.integers(0, n_genes, size=len(rows), dtype=np.int64)
    keys = np.sort(rows * n_genes + cols)  # np.unique's hash path is far slower at this size
    keys = keys[np.concatenate(([True], keys[1:] != keys[:-1]))] if len(keys) else keys
    rows, cols = np.divmod(keys, n_genes)
    # floor(1/U) is a discrete Pareto: P(count >= k) = 1/k, so 75 % are 1-3 and the tail is long
    uniform = rng.random(len(keys))
    values = np.floor(1.0 / np.maximum(uniform, 1.0 / 65_535)).astype(np.int32)
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_cells), out=indptr[1:])
    return sp.csr_matrix((values, cols.astype(np.int32), indptr), shape=(n_cells, n_genes))


def cell_ids_for(n_cells: int, *, prefix: str = "") -> list[str]:
    """Return ``n_cells`` distinct 10x-style barcodes (``ACGT`` 16-mers + ``-1``), deterministic."""
    letters = np.array(list("ACGT"))
    digits = (np.arange(n_cells)[:, None] // 4 ** np.arange(16)[::-1]) % 4
    return [prefix + "".join(row) + "-1" for row in letters[digits]]


def gene_ids_for(n_genes: int) -> list[str]:
    """Return ``n_genes`` distinct Ensembl-style human gene ids (``ENSG00000000001``...)."""
    return [f"ENSG{i + 1:011d}" for i in range(n_genes)]


def _normalized(counts: sp.csr_matrix) -> sp.csr_matrix:
    """log1p(CP10k) of the counts: what X holds when the raw counts live in a layer or in raw."""
    csr = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(csr.sum(axis=1)).ravel()
    totals[totals == 0] = 1
    out = sp.csr_matrix(sp.diags(1e4 / totals) @ csr)
    out.data = np.log1p(out.data)
    return out.astype(np.float32)


def _as_matrix(counts: sp.spmatrix, x_format: str, dtype: Any) -> Any:
    csr = sp.csr_matrix(counts).astype(dtype)
    if x_format == "csr":
        return csr
    if x_format == "csc":
        return sp.csc_matrix(csr)
    if x_format == "dense":
        return csr.toarray()
    msg = f"x_format must be 'csr', 'csc' or 'dense', got {x_format!r}"
    raise ValueError(msg)


class AnnDataContent(TypedDict, total=False):
    """The keywords of :func:`write_h5ad` (see there), which :func:`write_zarr` takes too."""

    cell_ids: Required[Sequence[str]]
    gene_ids: Required[Sequence[str]]
    obs: Mapping[str, Any] | None
    x_format: Literal["csr", "csc", "dense"]
    layer: str | None
    raw: bool
    var: Mapping[str, Any] | None
    dtype: Any


def _anndata(counts: sp.spmatrix, content: AnnDataContent) -> Any:
    """The ``anndata.AnnData`` that :func:`write_h5ad` and :func:`write_zarr` write."""
    import anndata

    obs, var, layer = content.get("obs"), content.get("var"), content.get("layer")
    x_format = content.get("x_format", "csr")
    obs_df = pd.DataFrame(dict(obs or {}), index=pd.Index(list(content["cell_ids"]), dtype=object))
    var_df = pd.DataFrame(dict(var or {}), index=pd.Index(list(content["gene_ids"]), dtype=object))
    matrix = _as_matrix(counts, x_format, content.get("dtype", np.float32))
    if content.get("raw", False):
        adata = anndata.AnnData(X=matrix, obs=obs_df, var=var_df)
        adata.raw = adata
        kept = np.arange(0, counts.shape[1], 2)
        normalized = _normalized(counts)[:, kept]
        adata = adata[:, kept].copy()
        adata.X = _as_matrix(normalized, "csr" if x_format == "dense" else x_format, np.float32)
        return adata
    if layer is not None:
        return anndata.AnnData(
            X=_as_matrix(
                _normalized(counts), "csr" if x_format == "dense" else x_format, np.float32
            ),
            obs=obs_df,
            var=var_df,
            layers={layer: matrix},
        )
    return anndata.AnnData(X=matrix, obs=obs_df, var=var_df)


def write_h5ad(
    path: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    obs: Mapping[str, Any] | None = None,
    x_format: Literal["csr", "csc", "dense"] = "csr",
    layer: str | None = None,
    raw: bool = False,
    var: Mapping[str, Any] | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Write an ``.h5ad`` with anndata, the counts in X, in ``layers[layer]`` or in ``raw.X``.

    With ``layer`` or ``raw``, X holds log1p-normalized floats (not counts); with ``raw``, X keeps
    only every other gene while ``raw.var`` keeps them all, as after scanpy's highly-variable
    selection.

    Parameters
    ----------
    path
        File to create.
    counts
        Cells x genes matrix (any values).
    cell_ids, gene_ids
        obs and var names.
    layer
        Put the counts in ``layers[layer]``.
    raw
        Put the counts in ``raw.X``.
    obs, var
        Per-cell / per-gene columns (arrays, lists or ``pandas.Categorical``), written as anndata
        encodes them (strings are not turned into categoricals).
    x_format
        Encoding of the matrix holding the counts.
    dtype
        Stored dtype of the counts (float32 like most public files).
    """
    import anndata

    path = Path(path)
    content: AnnDataContent = {"cell_ids": cell_ids, "gene_ids": gene_ids, "obs": obs, "var": var,
                               "x_format": x_format, "layer": layer, "raw": raw, "dtype": dtype}
    adata = _anndata(counts, content)
    with anndata.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(path, convert_strings_to_categoricals=False)
    return path


def write_zarr(
    path: PathLike,
    counts: sp.spmatrix,
    *,
    zarr_format: Literal[2, 3] = 3,
    chunks: int | None = None,
    **content: Unpack[AnnDataContent],
) -> Path:
    """Write an AnnData ``.zarr`` folder with anndata, in zarr format 2 or 3.

    The AnnData is the one :func:`write_h5ad` writes for the same ``content`` keywords (``cell_ids``,
    ``gene_ids``, ``obs``, ``x_format``, ``layer``, ``raw``, ``var``, ``dtype``; see there), so the
    two hold the same counts, ids and columns.

    Parameters
    ----------
    zarr_format
        2 (blosc-compressed chunks) or 3 (zstd).
    chunks
        Values per chunk of every 1-D array (a sparse matrix's ``data``, ``indices``, ``indptr``,
        the obs and var columns), or rows per chunk of a dense X; None lets anndata and zarr choose
        (one chunk per array for small data).
    """
    import anndata

    path = Path(path)
    adata = _anndata(counts, content)
    with (
        anndata.settings.override(allow_write_nullable_strings=True, zarr_write_format=zarr_format),
        warnings.catch_warnings(),
    ):
        # what anndata and zarr announce at every write: their next defaults, v3's consolidated metadata
        for announcement in ("Writing zarr v2 data", "zarr v3 autosharding", "Consolidated metadata"):
            warnings.filterwarnings("ignore", message=announcement, category=UserWarning)
        if chunks is None or content.get("x_format") == "dense":
            x_chunks = None if chunks is None else (chunks, adata.n_vars)
            adata.write_zarr(path, chunks=x_chunks, convert_strings_to_categoricals=False)
        else:  # write_zarr chunks only a dense X: write every element with the chunk length
            import zarr

            root = zarr.open_group(path, mode="w", zarr_format=zarr_format)
            anndata.io.write_elem(root, "/", adata, dataset_kwargs={"chunks": (chunks,)})
            zarr.consolidate_metadata(path)
    return path


def _loom_strings(values: Sequence[Any]) -> np.ndarray:
    """Loom strings: fixed-length 7-bit ASCII with XML character references for the rest."""
    encoded = [str(v).encode("ascii", "xmlcharrefreplace") for v in values]
    return np.array(encoded, dtype=f"S{max([1, *map(len, encoded)])}")


def _loom_column(values: Any) -> np.ndarray:
    array = np.asarray(values.astype(object) if isinstance(values, pd.Categorical) else values)
    if array.dtype.kind in "OUS":
        return _loom_strings(array.tolist())
    return array


def write_loom(
    path: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    obs: Mapping[str, Any] | None = None,
    var: Mapping[str, Any] | None = None,
    layer: str | None = None,
    dtype: Any = np.float32,
) -> Path:
    """Write a loom 3.0 file with h5py: ``/matrix`` genes x cells, gene ids in ``row_attrs/Gene``.

    Cell ids go to ``col_attrs/CellID``, ``obs`` to other column attributes (categoricals as
    strings), ``var`` to other row attributes. With ``layer``, ``/matrix`` holds log1p-normalized
    floats and the counts go to ``/layers/<layer>``.
    """
    path = Path(path)
    genes_by_cells = np.asarray(sp.csr_matrix(counts).astype(dtype).T.toarray())
    chunks = (max(1, min(64, genes_by_cells.shape[0])), max(1, min(64, genes_by_cells.shape[1])))
    with h5py.File(path, "w") as f:
        f.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
        kwargs = {"chunks": chunks, "compression": "gzip"} if genes_by_cells.size else {}
        if layer is None:
            f.create_dataset("matrix", data=genes_by_cells, **kwargs)
            f.create_group("layers")
        else:
            f.create_dataset("matrix", data=_normalized(counts).T.toarray(), **kwargs)
            f.create_group("layers").create_dataset(layer, data=genes_by_cells, **kwargs)
        rows = f.create_group("row_attrs")
        rows.create_dataset("Gene", data=_loom_strings(gene_ids))
        for name, values in (var or {}).items():
            rows.create_dataset(name, data=_loom_column(values))
        cols = f.create_group("col_attrs")
        cols.create_dataset("CellID", data=_loom_strings(cell_ids))
        for name, values in (obs or {}).items():
            cols.create_dataset(name, data=_loom_column(values))
        f.create_group("row_graphs")
        f.create_group("col_graphs")
    return path


def _features(
    gene_ids: Sequence[str],
    gene_symbols: Sequence[str] | None,
    feature_types: Sequence[str] | None,
) -> tuple[list[str], list[str], list[str]]:
    ids = list(gene_ids)
    symbols = (
        list(gene_symbols) if gene_symbols is not None else [f"SYM{i}" for i in range(len(ids))]
    )
    types = list(feature_types) if feature_types is not None else ["Gene Expression"] * len(ids)
    return ids, symbols, types


def _write_bytes(path: Path, payload: bytes) -> None:
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


def write_10x_mtx(
    folder: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    gene_symbols: Sequence[str] | None = None,
    feature_types: Sequence[str] | None = None,
    version: Literal[2, 3] = 3,
    gz: bool | None = None,
) -> Path:
    """Write a cellranger matrix folder (v2 ``genes.tsv`` layout or v3 ``features.tsv.gz``).

    v2 writes ``genes.tsv``, ``matrix.mtx`` and ``barcodes.tsv``; v3 ``features.tsv.gz``,
    ``matrix.mtx.gz`` and ``barcodes.tsv.gz``; ``gz`` (compress the three files) defaults to
    ``version == 3``.

    ``feature_types`` (v3 only; default all ``Gene Expression``) lets tests add antibody features.
    The matrix is written genes x cells, as ``integer`` when the counts have an integer dtype.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gz = version == 3 if gz is None else gz
    ext = ".gz" if gz else ""
    ids, symbols, types = _features(gene_ids, gene_symbols, feature_types)
    if version == 3:
        table = "\n".join(f"{i}\t{s}\t{t}" for i, s, t in zip(ids, symbols, types, strict=True))
        features = folder / f"features.tsv{ext}"
    else:
        table = "\n".join(f"{i}\t{s}" for i, s in zip(ids, symbols, strict=True))
        features = folder / f"genes.tsv{ext}"
    _write_bytes(features, (table + "\n").encode())
    _write_bytes(folder / f"barcodes.tsv{ext}", ("\n".join(cell_ids) + "\n").encode())
    genes_by_cells = sp.coo_matrix(sp.csr_matrix(counts).T)
    field = "integer" if genes_by_cells.dtype.kind in "iu" else "real"
    buffer = io.BytesIO()
    scipy.io.mmwrite(buffer, genes_by_cells, field=field, symmetry="general")
    _write_bytes(folder / f"matrix.mtx{ext}", buffer.getvalue())
    return folder


def write_10x_h5(
    path: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    gene_symbols: Sequence[str] | None = None,
    feature_types: Sequence[str] | None = None,
    version: Literal[2, 3] = 3,
    genome: str = "GRCh38",
) -> Path:
    """Write a cellranger ``.h5`` matrix in the v2 or v3 layout.

    v2: ``/<genome>/{data, indices, indptr, shape, genes, gene_names, barcodes}``; v3:
    ``/matrix/{data, indices, indptr, shape, barcodes, features/{id, name, feature_type, genome}}``.

    The genes x cells CSC is the cells x genes CSR; data keep the counts' dtype (int32 for
    integers).
    """
    path = Path(path)
    csr = sp.csr_matrix(counts)
    csr.sort_indices()
    ids, symbols, types = _features(gene_ids, gene_symbols, feature_types)
    data = csr.data.astype(np.int32) if csr.data.dtype.kind in "iu" else csr.data
    shape = np.array([csr.shape[1], csr.shape[0]], dtype=np.int32)
    with h5py.File(path, "w") as f:
        if version == 3:
            f.attrs["filetype"] = "matrix"
            group = f.create_group("matrix")
            feats = group.create_group("features")
            feats.create_dataset("id", data=np.array(ids, dtype="S"))
            feats.create_dataset("name", data=np.array(symbols, dtype="S"))
            feats.create_dataset("feature_type", data=np.array(types, dtype="S"))
            feats.create_dataset("genome", data=np.array([genome] * len(ids), dtype="S"))
            feats.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
        else:
            group = f.create_group(genome)
            group.create_dataset("genes", data=np.array(ids, dtype="S"))
            group.create_dataset("gene_names", data=np.array(symbols, dtype="S"))
        group.create_dataset("barcodes", data=np.array(list(cell_ids), dtype="S"))
        group.create_dataset("data", data=data)
        group.create_dataset("indices", data=csr.indices.astype(np.int64))
        group.create_dataset("indptr", data=csr.indptr.astype(np.int64))
        group.create_dataset("shape", data=shape)
    return path


def write_text(
    path: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    cells_as_rows: bool = True,
    sep: str = ",",
    corner: str | None = "",
) -> Path:
    """Write a dense delimited table (gzipped when ``path`` ends with ``.gz``).

    ``corner`` is the header's first field: ``""`` as pandas writes it (celltypist's layout), a
    label such as ``"gene"``, or None to omit it as R's ``write.table`` does (Seurat's
    ``pbmc_raw.txt``). NaN is written as an empty field, infinities as ``inf``; integer counts
    without decimals.
    """
    path = Path(path)
    dense = sp.csr_matrix(counts).toarray()
    rows, cols = (cell_ids, gene_ids) if cells_as_rows else (gene_ids, cell_ids)
    frame = pd.DataFrame(dense if cells_as_rows else dense.T, index=list(rows), columns=list(cols))
    text = frame.to_csv(sep=sep, na_rep="", index_label=corner if corner is not None else "")
    if corner is None:
        header, _, body = text.partition("\n")
        text = header.partition(sep)[2] + "\n" + body
    _write_bytes(path, text.encode())
    return path


def write_all_formats(
    tmpdir: PathLike,
    counts: sp.spmatrix,
    *,
    cell_ids: Sequence[str],
    gene_ids: Sequence[str],
    obs: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the same counts in every format and layout; return ``{case name: path}``.

    Cases: ``h5ad-csr``, ``h5ad-csc``, ``h5ad-dense``, ``loom``, ``zarr-v2-csr``, ``zarr-v3-csc``,
    ``zarr-v3-dense`` (AnnData zarr folders in zarr format 2 or 3; these seven with ``obs``),
    ``10x-mtx-v2`` and ``10x-mtx-v3`` (folders), ``10x-h5-v2``, ``10x-h5-v3``,
    ``csv-cells-as-rows`` (``.csv``, pandas corner), ``tsv-cells-as-columns`` (``.tsv.gz``, named
    corner) and ``txt-cells-as-columns`` (``.txt``, tab, no corner as R writes it). Text layouts
    are detected from the labels, so pass Ensembl-like gene ids or barcode-like cell ids (see
    :func:`gene_ids_for`, :func:`cell_ids_for`).
    """
    root = Path(tmpdir)
    root.mkdir(parents=True, exist_ok=True)
    ids: dict[str, Any] = {"cell_ids": cell_ids, "gene_ids": gene_ids}
    return {
        "h5ad-csr": write_h5ad(root / "x_csr.h5ad", counts, **ids, obs=obs),
        "h5ad-csc": write_h5ad(root / "x_csc.h5ad", counts, **ids, obs=obs, x_format="csc"),
        "h5ad-dense": write_h5ad(root / "x_dense.h5ad", counts, **ids, obs=obs, x_format="dense"),
        "loom": write_loom(root / "counts.loom", counts, **ids, obs=obs),
        "zarr-v2-csr": write_zarr(root / "x_csr_v2.zarr", counts, **ids, obs=obs, zarr_format=2),
        "zarr-v3-csc": write_zarr(root / "x_csc_v3.zarr", counts, **ids, obs=obs, x_format="csc"),
        "zarr-v3-dense": write_zarr(root / "x_dense_v3.zarr", counts, **ids, obs=obs, x_format="dense"),
        "10x-mtx-v2": write_10x_mtx(root / "mtx_v2", counts, **ids, version=2),
        "10x-mtx-v3": write_10x_mtx(root / "mtx_v3", counts, **ids, version=3),
        "10x-h5-v2": write_10x_h5(root / "v2.h5", counts, **ids, version=2),
        "10x-h5-v3": write_10x_h5(root / "v3.h5", counts, **ids, version=3),
        "csv-cells-as-rows": write_text(root / "rows.csv", counts, **ids),
        "tsv-cells-as-columns": write_text(
            root / "columns.tsv.gz", counts, **ids, cells_as_rows=False, sep="\t", corner="gene"
        ),
        "txt-cells-as-columns": write_text(
            root / "columns.txt", counts, **ids, cells_as_rows=False, sep="\t", corner=None
        ),
    }
