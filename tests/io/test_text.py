"""CSV/TSV tables: orientation declared and detected, header styles, and parse errors."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genecorpus import testing
from genecorpus.errors import InputError
from genecorpus.io import iter_block_ranges, open_dataset
from genecorpus.io.text import detect_cells_as_rows

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Dataset


def read_matrix(path: Path, **options: object) -> tuple[sp.csr_matrix, list[str], list[str]]:
    with open_dataset(path, **options) as source:  # type: ignore[arg-type]
        blocks = [source.read_block(a, b) for a, b in iter_block_ranges(source.n_cells, 9)]
        genes = list(source.var_names)
    return (
        sp.vstack([b.counts for b in blocks], format="csr"),
        [c for b in blocks for c in b.cell_ids],
        genes,
    )


def assert_same(actual: sp.spmatrix, expected: np.ndarray) -> None:
    np.testing.assert_array_equal(actual.toarray(), expected)


@pytest.mark.parametrize(
    ("rows", "columns", "expected"),
    [
        (["c1", "c2", "c3"], ["ENSG00000141510", "ENSG00000012048"], True),
        (["ENSG00000141510.17", "ENSG00000012048"], ["c1", "c2", "c3"], False),
        (["ENSMUSG00000000001", "ENSMUSG00000000003"], ["a", "b", "c"], False),
        (["AAACCTGAGAAGGCCT-1", "AAACCTGAGACAGACC-1"], ["CD3E", "MS4A1", "LYZ"], True),
        (["CD3E", "MS4A1"], ["AAACCTGAGAAGGCCT-1", "AAACCTGAGACAGACC-1", "ACGTACGTAC", "y"], False),
        (["Cell_1", "Cell_2"], ["CD3E", "MS4A1", "LYZ"], True),  # more labels: genes
        (["CD3E", "MS4A1", "LYZ"], ["Cell_1", "Cell_2"], False),
    ],
)
def test_detect_cells_as_rows(rows: list[str], columns: list[str], expected: bool) -> None:
    assert detect_cells_as_rows(rows, columns)[0] is expected


def seurat_like(tmp_path: Path) -> tuple[Path, np.ndarray, list[str], list[str]]:
    """The layout of Seurat's extdata/pbmc_raw.txt: 230 symbol rows x 80 barcode columns, tab,
    header without a corner field."""
    counts = testing.random_counts(80, 230, density=0.15, seed=11)
    barcodes = [c[2:16] for c in testing.cell_ids_for(80)]  # 14-mers like ATGCCAGAACGACT
    rng = np.random.default_rng(1)
    symbols = [f"{''.join(rng.choice(list('ABCDEFGHKLMNPRSTZ'), 4))}{i}" for i in range(230)]
    path = testing.write_text(
        tmp_path / "pbmc_raw.txt",
        counts,
        cell_ids=barcodes,
        gene_ids=symbols,
        cells_as_rows=False,
        sep="\t",
        corner=None,
    )
    return path, counts.toarray(), barcodes, symbols


def test_seurat_pbmc_raw_layout_detected(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path, _, barcodes, symbols = seurat_like(tmp_path)
    header = path.read_text().splitlines()[0].split("\t")
    assert len(header) == 80  # no corner field, as R writes it
    frame = pd.read_csv(path, sep="\t", index_col=0)  # pandas infers the row labels
    with caplog.at_level(logging.INFO, logger="genecorpus.io.text"):
        counts, cells, genes = read_matrix(path)
    assert "cells taken as columns" in caplog.text
    assert_same(counts, frame.T.to_numpy())
    assert cells == list(frame.columns) == barcodes
    assert genes == list(frame.index) == symbols


def test_celltypist_layout_detected(tmp_path: Path) -> None:
    counts = testing.random_counts(30, 90, density=0.2, seed=3)
    noisy = counts.astype(np.float64)
    noisy.data = noisy.data * (1 + 1e-13)
    cells = [f"Cell_{i + 1}" for i in range(30)]
    genes = [f"GENE{j}" for j in range(90)]
    path = testing.write_text(tmp_path / "sample.csv", noisy, cell_ids=cells, gene_ids=genes)
    assert path.read_text().startswith(",GENE0,")
    frame = pd.read_csv(path, index_col=0)
    got, got_cells, got_genes = read_matrix(path)
    assert_same(got, frame.round().to_numpy())
    assert got_cells == cells
    assert got_genes == genes


@pytest.mark.parametrize("cells_as_rows", [True, False])
def test_declared_orientation(dataset: Dataset, tmp_path: Path, cells_as_rows: bool) -> None:
    path = testing.write_text(
        tmp_path / "t.tsv",
        dataset.counts,
        cell_ids=dataset.cell_ids,
        gene_ids=dataset.gene_ids,
        cells_as_rows=cells_as_rows,
        sep="\t",
    )
    frame = pd.read_csv(path, sep="\t", index_col=0)
    # declared right
    counts, cells, genes = read_matrix(path, cells_as_rows=cells_as_rows)
    expected = frame if cells_as_rows else frame.T
    assert_same(counts, expected.to_numpy())
    assert (cells, genes) == (dataset.cell_ids, dataset.gene_ids)
    # declared the other way: the user's word wins over detection
    counts, cells, genes = read_matrix(path, cells_as_rows=not cells_as_rows)
    flipped = frame.T if cells_as_rows else frame
    assert_same(counts, flipped.to_numpy())
    assert (cells, genes) == (dataset.gene_ids, dataset.cell_ids)


def test_sniffed_delimiter_crlf_and_quotes(tmp_path: Path) -> None:
    path = tmp_path / "semicolon.txt"
    path.write_bytes(b'gene;"cell,1";cell2\r\nENSG00000000001;1;0\r\nENSG00000000002;0;7\r\n')
    counts, cells, genes = read_matrix(path)
    assert cells == ["cell,1", "cell2"]
    assert genes == ["ENSG00000000001", "ENSG00000000002"]
    assert_same(counts, np.array([[1, 0], [0, 7]]))


def test_header_and_line_disagree(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b,c,d,e\nx,1,2\n")
    with pytest.raises(
        InputError, match=r"bad\.csv: the header has 5 fields but the first line has 3"
    ):
        open_dataset(path)


def test_non_numeric_value_names_column(tmp_path: Path) -> None:
    path = tmp_path / "words.csv"
    path.write_text(",ENSG00000000001,ENSG00000000002\nc1,1,2\nc2,3,many\n")
    with pytest.raises(
        InputError, match=r"words\.csv: cannot parse the table in column 'ENSG00000000002'"
    ):
        open_dataset(path)


def test_header_only(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text(",a,b\n")
    with pytest.raises(
        InputError, match=r"empty\.csv: needs a header line and at least one data line"
    ):
        open_dataset(path)
