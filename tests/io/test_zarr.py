"""The zarr reader against the h5ad reader: the same AnnData written as ``.h5ad`` and as ``.zarr`` (zarr
format 2 and 3) reads back identically, block by block and down to the corpus bytes; a damaged folder
is refused in one line."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING, Any

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr
from corpus_files import SHARD_FILES, corpus_file_digests

from genecorpus import testing
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.errors import InputError
from genecorpus.io import CellSource, iter_block_ranges, open_dataset

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Dataset  # the fixture's type, from tests/io/conftest.py


def _obs_with_missing_values(n_cells: int) -> dict[str, Any]:
    """anndata's encodings with missing values: categorical, nullable integer, boolean and string."""
    pattern = np.arange(n_cells) % 4
    return {
        "category": pd.Categorical(np.where(pattern == 1, None, np.where(pattern == 2, "b", "a"))),
        "nullable_int": pd.array(np.where(pattern == 1, None, pattern), dtype="Int64"),
        "complete_int": pd.array(pattern, dtype="Int64"),
        "nullable_bool": pd.array(np.where(pattern == 1, None, pattern == 2), dtype="boolean"),
        "nullable_str": pd.array(np.where(pattern == 1, None, "x"), dtype="string"),
    }


def _write_both(
    dataset: Dataset, folder: Path, *, zarr_format: int, x_format: str, where: str, chunks: int | None
) -> tuple[Path, Path, dict[str, Any]]:
    """The same AnnData as ``.h5ad`` and as ``.zarr``; returns both paths and the reader options.

    With the counts in X it has the obs columns with missing values, else a var column (each array
    of a zarr folder costs a little to write and to read)."""
    in_x = where == "X"
    kwargs: dict[str, Any] = {
        "cell_ids": dataset.cell_ids,
        "gene_ids": dataset.gene_ids,
        "obs": _obs_with_missing_values(dataset.n_cells) if in_x else None,
        "var": None if in_x else {"symbol": [f"S{i}" for i in range(dataset.n_genes)]},
        "x_format": x_format,
        "layer": "counts" if where == "layer" else None,
        "raw": where == "raw",
    }
    h5ad = testing.write_h5ad(folder / "x.h5ad", dataset.counts, **kwargs)
    store = testing.write_zarr(folder / "x.zarr", dataset.counts, **kwargs, zarr_format=zarr_format, chunks=chunks)
    options = {"layer": "counts"} if where == "layer" else {"use_raw": where == "raw"}
    return h5ad, store, options


def assert_same_source(expected: CellSource, actual: CellSource, block_size: int) -> None:
    """Genes, columns and every block (counts, ids, obs columns, value dtype, dense flag) are equal."""
    assert actual.n_cells == expected.n_cells
    assert actual.var_names.tolist() == expected.var_names.tolist()
    assert actual.var_columns == expected.var_columns
    for name in expected.var_columns:
        assert actual.var_column(name).tolist() == expected.var_column(name).tolist()
    assert actual.obs_columns == expected.obs_columns
    for start, stop in iter_block_ranges(expected.n_cells, block_size):
        want = expected.read_block(start, stop, obs_columns=expected.obs_columns)
        got = actual.read_block(start, stop, obs_columns=expected.obs_columns)
        for part in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(got.counts, part), getattr(want.counts, part))
        assert got.cell_ids.tolist() == want.cell_ids.tolist()
        assert (got.value_dtype, got.dense_input) == (want.value_dtype, want.dense_input)
        for name, values in want.obs.items():
            assert got.obs[name].dtype == values.dtype, name
            np.testing.assert_array_equal(got.obs[name], values)


@pytest.mark.parametrize(("h5ad_case", "zarr_case"), [
    ("h5ad-csr", "zarr-v2-csr"), ("h5ad-csc", "zarr-v3-csc"), ("h5ad-dense", "zarr-v3-dense"),
])
def test_shared_files_read_as_their_h5ad(dataset: Dataset, h5ad_case: str, zarr_case: str) -> None:
    """The files every reader test uses: obs columns of every kind (strings with non-ASCII, a
    categorical, floats, integers, booleans)."""
    with open_dataset(dataset.paths[h5ad_case]) as expected, open_dataset(dataset.paths[zarr_case]) as actual:
        assert actual.format == "zarr"
        assert actual.obs_columns == list(dataset.obs)
        assert_same_source(expected, actual, block_size=7)


@pytest.mark.parametrize(
    ("zarr_format", "x_format", "where", "chunks"),
    [
        (2, "csr", "X", 7),  # 7 values (5 rows of dense X) per chunk: reads that span chunks
        (3, "dense", "X", 5),
        (2, "dense", "layer", None),
        (3, "csc", "raw", None),
    ],
)
def test_zarr_reads_as_h5ad(
    dataset: Dataset, tmp_path: Path, zarr_format: int, x_format: str, where: str, chunks: int | None
) -> None:
    h5ad, store, options = _write_both(
        dataset, tmp_path, zarr_format=zarr_format, x_format=x_format, where=where, chunks=chunks
    )
    with open_dataset(h5ad, **options) as expected, open_dataset(store, **options) as actual:
        assert actual.format == "zarr"
        assert actual.obs_columns == (list(_obs_with_missing_values(1)) if where == "X" else [])
        assert_same_source(expected, actual, block_size=7)


def _digests(folder: Path) -> dict[str, str]:
    return corpus_file_digests(folder, suffixes=(*SHARD_FILES, ".json"), skip=("manifest.json", "state.json"),
                               recursive=False)


@pytest.mark.filterwarnings("ignore:Element .* was written without encoding metadata",
                            "ignore:Variable names are not unique", "ignore:zarr v3 autosharding",
                            "ignore:Consolidated metadata")
def test_kang_as_zarr_builds_the_same_corpus_bytes(kang_control: Path, tmp_path: Path) -> None:
    """The real Kang PBMC h5ad (float32 CSC) and its zarr copy give byte-identical corpora, with
    different block sizes."""
    store = tmp_path / "kang.zarr"
    with anndata.settings.override(zarr_write_format=3):
        anndata.read_h5ad(kang_control).write_zarr(store)
    digests = []
    for path, block_size in ((kang_control, 700), (store, 1000)):  # CSC: zarr scans X per block
        spec = DatasetSpec(path=str(path), id="kang", gene_id="symbol", release="grch37")
        out = tmp_path / f"corpus-{path.suffix[1:]}"
        build_corpus(BuildConfig(datasets=(spec,), block_size=block_size), out, report=False)
        digests.append(_digests(out))
    assert digests[0] == digests[1]
    assert any(name.endswith(".arrow") for name in digests[0])


# ---- what the reader refuses ---------------------------------------------------------------------
def _first_chunk(array: Path) -> Path:
    """The first chunk file of an array folder (``0``, ``0.0`` in format 2; ``c/0``, ``c/0/0`` in 3)."""
    return min(p for p in array.rglob("*") if p.is_file() and p.name not in (".zarray", ".zattrs", "zarr.json"))


def _assert_one_line(info: pytest.ExceptionInfo[InputError], store: Path, *needles: str) -> None:
    message = str(info.value)
    assert message.startswith(f"{store}: "), message
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(("zarr_format", "x_format", "damage"), [
    (2, "csr", "cut"),  # blosc decodes a chunk cut short without noticing: its header is checked
    (2, "dense", "cut"),
    (3, "csr", "garbage"),  # zstd notices
    (3, "csc", "missing"),  # zarr would read a missing chunk as zeros
])
def test_damaged_chunk_is_one_line(
    dataset: Dataset, tmp_path: Path, zarr_format: int, x_format: str, damage: str
) -> None:
    store = testing.write_zarr(
        tmp_path / "x.zarr", dataset.counts, cell_ids=dataset.cell_ids, gene_ids=dataset.gene_ids,
        x_format=x_format, zarr_format=zarr_format, chunks=None if x_format == "dense" else 40,  # type: ignore[arg-type]
    )
    chunk = _first_chunk(store / "X" if x_format == "dense" else store / "X" / "data")
    raw = chunk.read_bytes()
    if damage == "cut":
        chunk.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        chunk.write_bytes(b"\xff" * len(raw))
    else:
        chunk.unlink()
    with open_dataset(store) as source, pytest.raises(InputError) as info:
        for start, stop in iter_block_ranges(source.n_cells, 10):
            source.read_block(start, stop)
    _assert_one_line(info, store, "could not be read", "re-download or re-export it")


def test_damage_found_while_opening(dataset: Dataset, tmp_path: Path) -> None:
    ids = {"cell_ids": dataset.cell_ids, "gene_ids": dataset.gene_ids}
    store = testing.write_zarr(tmp_path / "index.zarr", dataset.counts, **ids)
    _first_chunk(store / "var" / "_index").write_bytes(b"\xff" * 64)
    with pytest.raises(InputError) as info:
        open_dataset(store)
    _assert_one_line(info, store, "not a readable zarr AnnData folder", "re-download or re-export it")

    store = testing.write_zarr(tmp_path / "gone.zarr", dataset.counts, **ids, x_format="dense")
    shutil.rmtree(store / "X")  # the consolidated metadata still lists X: a partial copy
    with pytest.raises(InputError) as info:
        open_dataset(store)
    _assert_one_line(info, store, "not a readable zarr AnnData folder", "X")

    store = tmp_path / "empty.zarr"
    store.mkdir()
    with pytest.raises(InputError) as info:
        open_dataset(store)
    _assert_one_line(info, store, "not a readable zarr folder")


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_missing_x_layer_raw_and_anndata(dataset: Dataset, tmp_path: Path) -> None:
    ids = {"cell_ids": dataset.cell_ids, "gene_ids": dataset.gene_ids}
    store = testing.write_zarr(tmp_path / "layer.zarr", dataset.counts, **ids, layer="counts")
    with pytest.raises(InputError) as info:
        open_dataset(store, layer="spliced")
    _assert_one_line(info, store, "no layer 'spliced'; available layers: counts")
    with pytest.raises(InputError) as info:
        open_dataset(store, use_raw=True)
    _assert_one_line(info, store, "use_raw=True but the folder has no raw.X")
    shutil.rmtree(store / "X")
    zarr.consolidate_metadata(store)
    with pytest.raises(InputError) as info:
        open_dataset(store)
    _assert_one_line(info, store, "the folder has no X; pass layer= (available: counts)")

    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w")
    plain.create_array("X", shape=(2, 2), dtype="f4")
    with pytest.raises(InputError) as info:
        open_dataset(tmp_path / "plain.zarr")
    _assert_one_line(info, tmp_path / "plain.zarr", "not a zarr AnnData")


def test_folder_is_detected_by_content_and_empty_matrix_reads(dataset: Dataset, tmp_path: Path) -> None:
    for case in ("zarr-v2-csr", "zarr-v3-dense"):
        folder = tmp_path / case  # no .zarr suffix
        shutil.copytree(dataset.paths[case], folder)
        with open_dataset(folder) as source:
            assert source.format == "zarr"
            assert source.n_cells == dataset.n_cells
    empty = testing.write_zarr(tmp_path / "empty.zarr", sp.csr_matrix((4, 3)), cell_ids=list("abcd"),
                               gene_ids=["g1", "g2", "g3"], zarr_format=2)
    with open_dataset(empty) as source:  # zarr writes no chunk of an empty matrix's indptr
        assert source.read_block(0, 4).counts.nnz == 0
