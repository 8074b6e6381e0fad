"""Every reader against an independent load of the same file (anndata, h5py, scipy.io, pandas)."""

from __future__ import annotations

import gzip
from typing import TYPE_CHECKING, Any

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from genecorpus import testing
from genecorpus.errors import CountsError, InputError
from genecorpus.io import CellSource, iter_block_ranges, open_dataset
from genecorpus.io import anndata_layout as anndata_layout_module
from genecorpus.io import store as store_module

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Dataset  # the fixture's type, from tests/io/conftest.py

    from genecorpus.io import CellBlock

N_CELLS = 53
N_GENES = 41
EXPECTED_FORMAT = {
    "h5ad-csr": "h5ad",
    "h5ad-csc": "h5ad",
    "h5ad-dense": "h5ad",
    "loom": "loom",
    "zarr-v2-csr": "zarr",
    "zarr-v3-csc": "zarr",
    "zarr-v3-dense": "zarr",
    "10x-mtx-v2": "10x-mtx",
    "10x-mtx-v3": "10x-mtx",
    "10x-h5-v2": "10x-h5",
    "10x-h5-v3": "10x-h5",
    "csv-cells-as-rows": "csv",
    "tsv-cells-as-columns": "tsv",
    "txt-cells-as-columns": "txt",
    "anndata": "anndata",
}
OBS_CASES = ("h5ad-csr", "h5ad-csc", "h5ad-dense", "loom", "zarr-v2-csr", "zarr-v3-dense", "anndata")
"""Cases whose format carries per-cell columns."""


# ---- independent loads: the plainest code that reads each layout whole ------------------------
def _decode(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def _load_h5ad(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    adata = anndata.read_h5ad(path)
    return sp.csr_matrix(adata.X), list(adata.obs_names), list(adata.var_names)


def _load_zarr(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    adata = anndata.read_zarr(path)
    return sp.csr_matrix(adata.X), list(adata.obs_names), list(adata.var_names)


def _load_loom(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    with h5py.File(path, "r") as f:
        matrix = f["matrix"][()]
        cells = _decode(f["col_attrs/CellID"][()])
        genes = _decode(f["row_attrs/Gene"][()])
    return sp.csr_matrix(matrix.T), cells, genes


def _first_existing(folder: Path, *names: str) -> Path:
    return next(folder / n for n in names if (folder / n).exists())


def _load_10x_mtx(folder: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    matrix = scipy.io.mmread(_first_existing(folder, "matrix.mtx.gz", "matrix.mtx"))
    features = pd.read_csv(
        _first_existing(folder, "features.tsv.gz", "genes.tsv"), sep="\t", header=None
    )
    barcodes = pd.read_csv(
        _first_existing(folder, "barcodes.tsv.gz", "barcodes.tsv"), sep="\t", header=None
    )
    return sp.csr_matrix(matrix.T), list(barcodes[0]), list(features[0])


def _load_10x_h5(path: Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    with h5py.File(path, "r") as f:
        if "matrix" in f:
            group, genes = f["matrix"], _decode(f["matrix/features/id"][()])
        else:
            group = f[next(iter(f))]
            genes = _decode(group["genes"][()])
        n_genes, n_cells = group["shape"][()]
        genes_by_cells = sp.csc_matrix(
            (group["data"][()], group["indices"][()], group["indptr"][()]), shape=(n_genes, n_cells)
        )
        cells = _decode(group["barcodes"][()])
    return sp.csr_matrix(genes_by_cells.T), cells, genes


def _load_text(
    path: Path, *, sep: str, cells_as_rows: bool
) -> tuple[sp.csr_matrix, list[str], list[str]]:
    frame = pd.read_csv(path, sep=sep, index_col=0)
    if not cells_as_rows:
        frame = frame.T
    return (
        sp.csr_matrix(frame.to_numpy()),
        [str(c) for c in frame.index],
        [str(g) for g in frame.columns],
    )


def independent_load(case: str, source: Any) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """Matrix (cells x genes), cell ids and gene ids as a plain whole-file load gives them."""
    if case == "anndata":
        return sp.csr_matrix(source.X), list(source.obs_names), list(source.var_names)
    loaders = {
        "h5ad": _load_h5ad,
        "loom": _load_loom,
        "zarr": _load_zarr,
        "10x-mtx": _load_10x_mtx,
        "10x-h5": _load_10x_h5,
        "csv": lambda p: _load_text(p, sep=",", cells_as_rows=True),
        "tsv": lambda p: _load_text(p, sep="\t", cells_as_rows=False),
        "txt": lambda p: _load_text(p, sep="\t", cells_as_rows=False),
    }
    return loaders[EXPECTED_FORMAT[case]](source)


def read_all(
    source: CellSource, block_size: int, obs_columns: list[str] | None = None
) -> list[CellBlock]:
    return [
        source.read_block(start, stop, obs_columns=obs_columns or [])
        for start, stop in iter_block_ranges(source.n_cells, block_size)
    ]


def assert_canonical(block: CellBlock) -> None:
    """The CellBlock contract: int32 data, sorted int32 indices, int64 indptr, no stored zeros."""
    counts = block.counts
    assert isinstance(counts, sp.csr_matrix)
    assert counts.data.dtype == np.int32
    assert counts.indices.dtype == np.int32
    assert counts.indptr.dtype == np.int64
    assert (counts.data > 0).all()
    for row in range(counts.shape[0]):
        cols = counts.indices[counts.indptr[row] : counts.indptr[row + 1]]
        assert (np.diff(cols) > 0).all()
    assert block.cell_ids.dtype == object
    assert all(isinstance(c, str) for c in block.cell_ids)
    assert len(block.cell_ids) == counts.shape[0]


def assert_same_matrix(actual: sp.spmatrix, expected: sp.spmatrix) -> None:
    assert actual.shape == expected.shape
    difference = sp.csr_matrix(actual, dtype=np.float64) - sp.csr_matrix(expected, dtype=np.float64)
    assert abs(difference).sum() == 0


# ---- every format, every block size ------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_blocks_equal_independent_load(dataset: Dataset, case: str, block_size: int) -> None:
    source_arg = dataset.source(case)
    expected, expected_cells, expected_genes = independent_load(case, source_arg)
    with open_dataset(source_arg) as source:
        assert source.format == EXPECTED_FORMAT[case]
        assert source.n_cells == N_CELLS
        assert list(source.var_names) == expected_genes
        blocks = read_all(source, block_size)
    assert [b.start for b in blocks] == [s for s, _ in iter_block_ranges(N_CELLS, block_size)]
    for block in blocks:
        assert_canonical(block)
    counts = sp.vstack([b.counts for b in blocks], format="csr")
    cells = [c for b in blocks for c in b.cell_ids]
    assert_same_matrix(counts, expected)
    assert cells == expected_cells
    # and the independent load is the truth the files were written from
    assert_same_matrix(expected, dataset.counts)
    assert expected_cells == dataset.cell_ids
    assert expected_genes == dataset.gene_ids


def test_cell_source_protocol(dataset: Dataset, case: str) -> None:
    with open_dataset(dataset.source(case)) as source:
        assert isinstance(source, CellSource)
        for name in source.var_columns:
            column = source.var_column(name)
            assert column.dtype == object
            assert len(column) == N_GENES
            assert all(isinstance(v, str) for v in column)
        with pytest.raises(InputError, match="no gene annotation column 'nope'"):
            source.var_column("nope")
        with pytest.raises(InputError, match="no cell annotation column 'nope'"):
            source.read_block(0, 1, obs_columns=["nope"])
        with pytest.raises(IndexError):
            source.read_block(0, N_CELLS + 1)
        empty = source.read_block(5, 5)
        assert empty.counts.shape == (0, N_GENES)


# ---- obs columns ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case_name", OBS_CASES)
@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_obs_columns_sliced_per_block(dataset: Dataset, case_name: str, block_size: int) -> None:
    names = list(dataset.obs)
    with open_dataset(dataset.source(case_name)) as source:
        assert set(names) <= set(source.obs_columns)
        blocks = read_all(source, block_size, names)
    for block in blocks:
        stop = block.start + block.n_cells
        for name, values in dataset.obs.items():
            got = block.obs[name]
            assert len(got) == block.n_cells
            want = np.asarray(values)[block.start : stop]
            if name in {"donor", "cell_type"}:
                assert got.dtype == object
                assert got.tolist() == [str(v) for v in want]
            else:
                assert got.dtype.kind == want.dtype.kind, name
                np.testing.assert_array_equal(got, want)


def test_h5ad_obs_encodings_with_missing_values(tmp_path: Path) -> None:
    counts = testing.random_counts(6, 4, seed=1)
    obs = {
        "category": pd.Categorical(["a", None, "b", "a", None, "b"]),
        "nullable_int": pd.array([1, None, 3, 4, 5, 6], dtype="Int64"),
        "complete_int": pd.array([1, 2, 3, 4, 5, 6], dtype="Int64"),
        "nullable_bool": pd.array([True, None, False, True, True, False], dtype="boolean"),
        "nullable_str": pd.array(["x", None, "z", "x", "y", "z"], dtype="string"),
    }
    cells, genes = testing.cell_ids_for(6), testing.gene_ids_for(4)
    path = testing.write_h5ad(
        tmp_path / "obs.h5ad", counts, cell_ids=cells, gene_ids=genes, obs=obs
    )
    in_memory = anndata.read_h5ad(path)
    for source_arg in (path, in_memory):
        with open_dataset(source_arg) as source:
            first, second = (
                source.read_block(0, 2, obs_columns=list(obs)),
                source.read_block(2, 6, obs_columns=list(obs)),
            )
        got = {k: [*first.obs[k].tolist(), *second.obs[k].tolist()] for k in obs}
        assert got["category"] == ["a", None, "b", "a", None, "b"]
        assert np.isnan(got["nullable_int"][1])
        assert [v for i, v in enumerate(got["nullable_int"]) if i != 1] == [1, 3, 4, 5, 6]
        assert first.obs["complete_int"].dtype.kind == "i"
        assert got["complete_int"] == [1, 2, 3, 4, 5, 6]
        assert got["nullable_bool"] == [True, None, False, True, True, False]
        assert got["nullable_str"] == ["x", None, "z", "x", "y", "z"]


# ---- layers and raw ------------------------------------------------------------------------------
@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
def test_h5ad_layer(dataset: Dataset, tmp_path: Path, x_format: str) -> None:
    path = testing.write_h5ad(
        tmp_path / "layer.h5ad",
        dataset.counts,
        cell_ids=dataset.cell_ids,
        gene_ids=dataset.gene_ids,
        x_format=x_format,  # type: ignore[arg-type]
        layer="counts",
    )
    expected = sp.csr_matrix(anndata.read_h5ad(path).layers["counts"])
    for source_arg in (path, anndata.read_h5ad(path)):
        with open_dataset(source_arg, layer="counts") as source:
            counts = sp.vstack([b.counts for b in read_all(source, 7)])
        assert_same_matrix(counts, expected)
        assert_same_matrix(counts, dataset.counts)
        # X holds normalized values, which are refused with a hint towards layer=/use_raw
        with open_dataset(source_arg) as source, pytest.raises(CountsError, match="layer="):
            read_all(source, 1000)
        with pytest.raises(InputError, match="available layers: counts"):
            open_dataset(source_arg, layer="spliced")


@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
def test_h5ad_raw(dataset: Dataset, tmp_path: Path, x_format: str) -> None:
    path = testing.write_h5ad(
        tmp_path / "raw.h5ad",
        dataset.counts,
        cell_ids=dataset.cell_ids,
        gene_ids=dataset.gene_ids,
        x_format=x_format,  # type: ignore[arg-type]
        raw=True,
        var={"symbol": [f"S{i}" for i in range(N_GENES)]},
    )
    reference = anndata.read_h5ad(path)
    assert reference.n_vars < N_GENES  # X keeps fewer genes than raw
    expected = sp.csr_matrix(reference.raw.X)
    for source_arg in (path, reference):
        with open_dataset(source_arg, use_raw=True) as source:
            assert list(source.var_names) == list(reference.raw.var_names)
            assert list(source.var_column("symbol")) == list(reference.raw.var["symbol"])
            counts = sp.vstack([b.counts for b in read_all(source, 7)])
        assert_same_matrix(counts, expected)
        assert_same_matrix(counts, dataset.counts)
        with open_dataset(source_arg) as source:
            assert list(source.var_names) == list(reference.var_names)
        with pytest.raises(InputError, match="not both"):
            open_dataset(source_arg, use_raw=True, layer="x")


def test_h5ad_without_raw(dataset: Dataset) -> None:
    with pytest.raises(InputError, match="no raw"):
        open_dataset(dataset.paths["h5ad-csr"], use_raw=True)


def test_loom_layer_and_attributes(dataset: Dataset, tmp_path: Path) -> None:
    accessions = [f"ACC{i}" for i in range(N_GENES)]
    path = testing.write_loom(
        tmp_path / "layer.loom",
        dataset.counts,
        cell_ids=dataset.cell_ids,
        gene_ids=dataset.gene_ids,
        var={"Accession": accessions},
        layer="spliced",
    )
    with h5py.File(path, "r") as f:
        expected = sp.csr_matrix(f["layers/spliced"][()].T)
    with open_dataset(path, layer="spliced") as source:
        assert set(source.var_columns) == {"Gene", "Accession"}
        assert list(source.var_column("Accession")) == accessions
        assert list(source.var_names) == dataset.gene_ids
        counts = sp.vstack([b.counts for b in read_all(source, 7)])
    assert_same_matrix(counts, expected)
    with open_dataset(path) as source, pytest.raises(CountsError):
        read_all(source, 1000)


@pytest.mark.parametrize("x_format", ["csr", "csc", "dense"])
def test_h5ad_float16_and_int_storage(dataset: Dataset, tmp_path: Path, x_format: str) -> None:
    small = dataset.counts.copy()
    small.data = np.minimum(small.data, 2000)  # exact in float16
    for dtype in (np.float16, np.int64, np.uint16):
        path = testing.write_h5ad(
            tmp_path / f"{np.dtype(dtype).name}.h5ad",
            small,
            cell_ids=dataset.cell_ids,
            gene_ids=dataset.gene_ids,
            x_format=x_format,  # type: ignore[arg-type]
            dtype=np.float32 if dtype == np.float16 else dtype,
        )
        if dtype == np.float16:  # scipy cannot hold float16, so store it with h5py
            with h5py.File(path, "r+") as f:
                name = "X" if x_format == "dense" else "X/data"
                values = f[name][()].astype(np.float16)
                del f[name]
                f.create_dataset(name, data=values)
        with open_dataset(path) as source:
            assert_same_matrix(sp.vstack([b.counts for b in read_all(source, 7)]), small)


def test_chunked_paths_give_the_same_blocks(
    dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny CSC scan pieces and dense pieces exercise the bounded-memory loops."""
    monkeypatch.setattr(anndata_layout_module, "CSC_SCAN_VALUES", 5)
    monkeypatch.setattr(store_module, "DENSE_PIECE_VALUES", 50)
    for case_name in ("h5ad-csc", "h5ad-dense", "loom", "zarr-v3-csc", "zarr-v3-dense"):
        with open_dataset(dataset.paths[case_name]) as source:
            counts = sp.vstack([b.counts for b in read_all(source, 13)])
        assert_same_matrix(counts, dataset.counts)


# ---- 10x specifics -------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["mtx", "h5"])
def test_10x_keeps_gene_expression_features(tmp_path: Path, writer: str) -> None:
    counts = testing.random_counts(30, 12, density=0.4, seed=5)
    types = ["Gene Expression"] * 9 + ["Antibody Capture"] * 2 + ["CRISPR Guide Capture"]
    ids = [*testing.gene_ids_for(9), "CD3_TotalSeqB", "CD4_TotalSeqB", "guide1"]
    symbols = [f"SYM{i}" for i in range(12)]
    common = {
        "cell_ids": testing.cell_ids_for(30),
        "gene_ids": ids,
        "gene_symbols": symbols,
        "feature_types": types,
        "version": 3,
    }
    if writer == "mtx":
        path = testing.write_10x_mtx(tmp_path / "feature_bc", counts, **common)  # type: ignore[arg-type]
    else:
        path = testing.write_10x_h5(tmp_path / "feature_bc.h5", counts, **common)  # type: ignore[arg-type]
    with open_dataset(path) as source:
        assert list(source.var_names) == ids[:9]
        assert list(source.var_column("gene_ids")) == ids[:9]
        assert list(source.var_column("gene_symbols")) == symbols[:9]
        assert set(source.var_column("feature_types")) == {"Gene Expression"}
        got = sp.vstack([b.counts for b in read_all(source, 7)])
    assert_same_matrix(got, counts[:, :9])


def test_10x_mtx_path_may_be_the_matrix_file_and_prefixed(dataset: Dataset, tmp_path: Path) -> None:
    folder = dataset.paths["10x-mtx-v3"]
    with open_dataset(folder / "matrix.mtx.gz") as source:
        assert source.format == "10x-mtx"
        assert_same_matrix(sp.vstack([b.counts for b in read_all(source, 1000)]), dataset.counts)
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz"):
        (tmp_path / f"GSM1_{name}").write_bytes((folder / name).read_bytes())
    with open_dataset(tmp_path / "GSM1_matrix.mtx.gz") as source:
        assert list(source.var_names) == dataset.gene_ids
        assert_same_matrix(sp.vstack([b.counts for b in read_all(source, 1000)]), dataset.counts)


def test_10x_mtx_missing_barcodes(dataset: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "incomplete"
    folder.mkdir()
    for name in ("matrix.mtx", "genes.tsv"):
        (folder / name).write_bytes((dataset.paths["10x-mtx-v2"] / name).read_bytes())
    with pytest.raises(InputError, match=r"barcodes\.tsv"):
        open_dataset(folder)


def test_10x_symbols_as_var_column(dataset: Dataset) -> None:
    with (
        open_dataset(dataset.paths["10x-h5-v2"]) as v2,
        open_dataset(dataset.paths["10x-mtx-v3"]) as v3,
    ):
        assert list(v2.var_column("gene_symbols")) == list(v3.var_column("gene_symbols"))
        assert v3.var_column("gene_ids").tolist() == dataset.gene_ids


# ---- real public data ----------------------------------------------------------------------------
# anndata warns about these older files' encoding and duplicate symbols; they are the point here.
old_anndata_file = pytest.mark.filterwarnings(
    "ignore:Element .* was written without encoding metadata",
    "ignore:Variable names are not unique",
)


@old_anndata_file
def test_kang_pbmc_control_csc_equals_anndata(kang_control: Path) -> None:
    reference = anndata.read_h5ad(kang_control)
    expected = sp.csr_matrix(reference.X)
    with open_dataset(kang_control) as source:
        assert source.n_cells == 3000
        assert list(source.var_names) == list(reference.var_names)  # legacy categorical index
        blocks = read_all(source, 1000)
    counts = sp.vstack([b.counts for b in blocks], format="csr")
    assert counts.nnz == expected.nnz
    assert_same_matrix(counts, expected)
    assert [c for b in blocks for c in b.cell_ids] == list(reference.obs_names)


@old_anndata_file
def test_kang_pbmc_ctrl_csr_equals_anndata() -> None:
    from genecorpus.public_data import fetch_public_file

    path = fetch_public_file("kang_pbmc_ctrl")
    reference = anndata.read_h5ad(path)
    with open_dataset(path) as source:
        counts = sp.vstack([b.counts for b in read_all(source, 2500)], format="csr")
    assert_same_matrix(counts, sp.csr_matrix(reference.X))


def test_celltypist_csv_equals_rounded_pandas(celltypist_csv: Path, celltypist_frame: pd.DataFrame) -> None:
    frame = celltypist_frame  # pd.read_csv(celltypist_csv, index_col=0, low_memory=False), parsed once
    assert (frame.to_numpy() != frame.round().to_numpy()).any()  # the file really has float noise
    expected = sp.csr_matrix(frame.round().to_numpy())
    with open_dataset(celltypist_csv) as source:
        assert source.format == "csv"
        assert list(source.var_names) == list(frame.columns)
        blocks = read_all(source, 200)
    assert [c for b in blocks for c in b.cell_ids] == list(frame.index)
    assert_same_matrix(sp.vstack([b.counts for b in blocks]), expected)


# ---- bad values ----------------------------------------------------------------------------------
BAD_CASES = (
    "h5ad-csr",
    "h5ad-csc",
    "h5ad-dense",
    "loom",
    "10x-mtx-v3",
    "10x-h5-v3",
    "csv-cells-as-rows",
    "tsv-cells-as-columns",
    "anndata",
)
BAD_ROW, BAD_COL = 11, 5


def _write_case(
    case_name: str, root: Path, counts: sp.csr_matrix, cells: list[str], genes: list[str]
) -> Any:
    ids = {"cell_ids": cells, "gene_ids": genes}
    writers = {
        "h5ad-csr": lambda: testing.write_h5ad(root / "bad.h5ad", counts, **ids, dtype=np.float64),
        "h5ad-csc": lambda: testing.write_h5ad(
            root / "bad.h5ad", counts, **ids, x_format="csc", dtype=np.float64
        ),
        "h5ad-dense": lambda: testing.write_h5ad(
            root / "bad.h5ad", counts, **ids, x_format="dense", dtype=np.float64
        ),
        "loom": lambda: testing.write_loom(root / "bad.loom", counts, **ids, dtype=np.float64),
        "10x-mtx-v3": lambda: testing.write_10x_mtx(root / "bad_mtx", counts, **ids),
        "10x-h5-v3": lambda: testing.write_10x_h5(root / "bad.h5", counts, **ids),
        "csv-cells-as-rows": lambda: testing.write_text(root / "bad.csv", counts, **ids),
        "tsv-cells-as-columns": lambda: testing.write_text(
            root / "bad.tsv", counts, **ids, cells_as_rows=False, sep="\t"
        ),
        "anndata": lambda: anndata.AnnData(
            X=counts, obs=pd.DataFrame(index=cells), var=pd.DataFrame(index=genes)
        ),
    }
    return writers[case_name]()


@pytest.mark.parametrize("case_name", BAD_CASES)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1.0, "negative"),
        (0.5, "not an integer"),
        (np.nan, "NaN"),
        (np.inf, "infinite"),
        (3e9, "larger than 2\\*\\*31-1"),
    ],
)
def test_bad_values_name_file_cell_and_gene(
    dataset: Dataset, tmp_path: Path, case_name: str, value: float, reason: str
) -> None:
    counts = dataset.counts.astype(np.float64).tolil()
    counts[BAD_ROW, BAD_COL] = value
    counts[BAD_ROW + 20, BAD_COL + 1] = value  # a later one: the first is reported
    source_arg = _write_case(
        case_name, tmp_path, sp.csr_matrix(counts), dataset.cell_ids, dataset.gene_ids
    )
    with open_dataset(source_arg) as source:
        source.read_block(0, BAD_ROW)  # rows before the bad one are fine
        with pytest.raises(CountsError) as info:
            read_all(source, 7)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(source.path + ":")
    assert repr(dataset.cell_ids[BAD_ROW]) in message
    assert f"row {BAD_ROW})" in message
    assert repr(dataset.gene_ids[BAD_COL]) in message
    assert pd.Series([message]).str.contains(reason).all()
    assert "raw integer counts" in message


def test_near_integer_floats_are_rounded(dataset: Dataset, tmp_path: Path) -> None:
    counts = dataset.counts.astype(np.float64)
    noisy = counts.copy()
    noisy.data = noisy.data + np.where(np.arange(noisy.nnz) % 2, 4e-7, -4e-7)
    path = testing.write_text(
        tmp_path / "noisy.csv", noisy, cell_ids=dataset.cell_ids, gene_ids=dataset.gene_ids
    )
    with open_dataset(path) as source:
        assert_same_matrix(sp.vstack([b.counts for b in read_all(source, 1000)]), counts)


# ---- files that cannot be read -------------------------------------------------------------------
def test_truncated_h5ad_names_the_file(dataset: Dataset, tmp_path: Path) -> None:
    whole = dataset.paths["h5ad-csr"].read_bytes()
    for cut in (len(whole) // 2, 1000):
        path = tmp_path / f"cut{cut}.h5ad"
        path.write_bytes(whole[:cut])
        with pytest.raises(InputError) as info, open_dataset(path) as source:
            read_all(source, 1000)
        message = str(info.value)
        assert str(path) in message
        assert "re-download or re-export" in message
        assert "\n" not in message


def test_corrupt_data_chunk_names_the_file_and_rows(dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "corrupt.h5ad"
    with h5py.File(path, "w") as f:  # a valid h5ad whose X/data lives in one gzip chunk
        for name in ("obs", "var"):
            src = anndata.read_h5ad(dataset.paths["h5ad-csr"])
            frame = src.obs if name == "obs" else src.var
            anndata.io.write_elem(f, name, frame)
        x = sp.csr_matrix(dataset.counts, dtype=np.float32)
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0"})
        group.attrs["shape"] = np.array(x.shape)
        group.create_dataset("data", data=x.data, chunks=(x.nnz,), compression="gzip")
        group.create_dataset("indices", data=x.indices)
        group.create_dataset("indptr", data=x.indptr)
        chunk = group["data"].id.get_chunk_info(0)
    with path.open("r+b") as fh:  # overwrite the compressed chunk with garbage
        fh.seek(chunk.byte_offset)
        fh.write(b"\xff" * chunk.size)
    with open_dataset(path) as source, pytest.raises(InputError) as info:
        source.read_block(0, 10)
    message = str(info.value)
    assert message.startswith(f"{path}: rows 0:10 could not be read (")
    assert "re-download or re-export" in message
    assert "\n" not in message


def test_truncated_gz_mtx_names_the_file(dataset: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    folder.mkdir()
    for name in ("features.tsv.gz", "barcodes.tsv.gz"):
        (folder / name).write_bytes((dataset.paths["10x-mtx-v3"] / name).read_bytes())
    whole = (dataset.paths["10x-mtx-v3"] / "matrix.mtx.gz").read_bytes()
    (folder / "matrix.mtx.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz"):
        open_dataset(folder)


def test_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.h5ad"
    with pytest.raises(InputError, match=r"nowhere\.h5ad: no such file"):
        open_dataset(missing)


def test_gzip_text_round_trip(dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "rows.csv.gz"
    testing.write_text(path, dataset.counts, cell_ids=dataset.cell_ids, gene_ids=dataset.gene_ids)
    with gzip.open(path, "rt") as fh:
        assert fh.readline().startswith(",ENSG")
    with open_dataset(path) as source:
        assert source.format == "csv"
        assert_same_matrix(sp.vstack([b.counts for b in read_all(source, 1000)]), dataset.counts)
