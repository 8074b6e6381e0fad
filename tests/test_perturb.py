"""genecorpus perturb: in-silico deletion and overexpression on real cells, checked by hand."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
import torch  # noqa: F401 - the train extra: make test installs it, so a missing one fails here
from embedding_data import kang_corpus, kang_labels_if_present, reference_layer, tiny_model
from typer.testing import CliRunner

from genecorpus.cli import app
from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.bert import load_model
from genecorpus.model.embed import CellEncoder, embed_corpus
from genecorpus.model.perturb import perturb, perturb_tokens, resolve_genes

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CD74 = "ENSG00000019582"  # HLA class II chaperone: high in B cells and monocytes, absent from most T cells


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.getbasetemp() / "embedding-data"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.fixture(scope="session")
def gc30m(data_dir: Path, shared_folder: Path) -> tuple[Path, Path]:
    corpus = kang_corpus(data_dir, "gc30m", kang_labels_if_present(shared_folder))
    return corpus, tiny_model(data_dir / "tiny-gc30m", corpus / "token_dictionary.pkl")


@pytest.fixture(scope="session")
def gc104m(data_dir: Path, shared_folder: Path) -> tuple[Path, Path]:
    corpus = kang_corpus(data_dir, "gc104m", kang_labels_if_present(shared_folder))
    return corpus, tiny_model(data_dir / "tiny-gc104m", corpus / "token_dictionary.pkl", seed=1)


def token_of(corpus: Path, ensembl_id: str) -> int:
    tdict = CorpusReader.open(corpus).token_dictionary
    return int(tdict.gene_tokens[tdict.gene_ids.tolist().index(ensembl_id)])


def cells_with_and_without(corpus: Path, token: int, n: int = 2) -> tuple[list[int], list[int]]:
    """The first ``n`` short-ish cells holding the token and the first ``n`` lacking it."""
    reader = CorpusReader.open(corpus)
    rows = [r for r in np.argsort(reader.lengths, kind="stable") if reader.lengths[r] > 300]
    holding = [int(r) for r in rows if token in reader.input_ids(int(r))]
    lacking = [int(r) for r in rows if token not in reader.input_ids(int(r))]
    return holding[:n], lacking[:n]


# ---- the sequences


def test_delete_removes_only_the_genes() -> None:
    ids = np.array([10, 11, 12, 13, 14])
    assert perturb_tokens(ids, [12, 14], mode="delete").tolist() == [10, 11, 13]
    assert perturb_tokens(ids, [99], mode="delete").tolist() == ids.tolist()
    assert perturb_tokens(np.array([2, 10, 11, 3]), [11], mode="delete").tolist() == [2, 10, 3]


def test_overexpress_moves_to_front_or_inserts_and_keeps_length() -> None:
    ids = np.array([10, 11, 12, 13, 14])
    assert perturb_tokens(ids, [13], mode="overexpress").tolist() == [13, 10, 11, 12, 14]
    assert perturb_tokens(ids, [13, 11], mode="overexpress").tolist() == [13, 11, 10, 12, 14]
    # absent: inserted at the front, the last gene falls off
    assert perturb_tokens(ids, [99], mode="overexpress").tolist() == [99, 10, 11, 12, 13]
    # gc104m: after <cls>, and <eos> stays last
    wrapped = np.array([2, 10, 11, 12, 3])
    assert perturb_tokens(wrapped, [12], mode="overexpress", cls_token=2, eos_token=3).tolist() == [2, 12, 10, 11, 3]
    assert perturb_tokens(wrapped, [99], mode="overexpress", cls_token=2, eos_token=3).tolist() == [2, 99, 10, 11, 3]
    with pytest.raises(ConfigError, match="mode 'shuffle'"):
        perturb_tokens(ids, [10], mode="shuffle")  # type: ignore[arg-type]


def test_overexpress_real_cells(gc104m: tuple[Path, Path]) -> None:
    corpus, _ = gc104m
    reader = CorpusReader.open(corpus)
    special = reader.token_dictionary.special
    token = token_of(corpus, CD74)
    (holding, *_), (lacking, *_) = cells_with_and_without(corpus, token, n=1)
    for row in (holding, lacking):
        ids = np.asarray(reader.input_ids(row), dtype=np.int64)
        out = perturb_tokens(ids, [token], mode="overexpress", cls_token=special["<cls>"],
                             eos_token=special["<eos>"])
        assert len(out) == len(ids)
        assert out[0] == special["<cls>"] and out[1] == token and out[-1] == special["<eos>"]
        others = [t for t in ids.tolist() if t != token]  # everything else keeps its order
        assert out[2:-1].tolist() == others[1:len(ids) - 2]


def test_resolve_genes_by_symbol_or_ensembl_id(gc30m: tuple[Path, Path]) -> None:
    corpus, _ = gc30m
    tdict = CorpusReader.open(corpus).token_dictionary
    table = resolve_genes(["CD74", f"{CD74}.12", "MS4A1"], tdict)
    assert table["ensembl_id"].tolist() == [CD74, "ENSG00000156738"]
    assert table["symbol"].tolist() == ["CD74", "MS4A1"]
    assert table["token"].tolist() == [token_of(corpus, CD74), token_of(corpus, "ENSG00000156738")]
    with pytest.raises(InputError, match="gene 'NOT-A-GENE': not a human gene symbol"):
        resolve_genes(["CD74", "NOT-A-GENE"], tdict)
    # a real gene the Kang corpus's vocabulary lacks: not detected in these PBMCs
    absent = next(g for g in ["ENSG00000171345", "ENSG00000111704", "ENSG00000163631"] if g not in set(tdict.gene_ids))
    with pytest.raises(InputError, match=f"gene '{absent}' .* is not in the model's token dictionary"):
        resolve_genes([absent], tdict)


# ---- the model runs


def test_deleting_an_absent_gene_changes_nothing(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    token = token_of(corpus, CD74)
    holding, lacking = cells_with_and_without(corpus, token)
    emb = tmp_path / "e.h5ad"
    embed_corpus(corpus, model, out=emb, cells=holding + lacking)
    result = perturb(emb, model, genes=[CD74], mode="delete")
    cells = result.cells.set_index("corpus_row")
    assert cells.loc[lacking, "shift"].tolist() == [0.0, 0.0]
    assert not cells.loc[lacking, "changed"].any()
    assert (cells.loc[lacking, "n_genes_present"] == 0).all()
    assert (cells.loc[holding, "shift"] > 0).all()
    assert cells.loc[holding, "changed"].all()
    assert result.mean_shift_containing == pytest.approx(cells.loc[holding, "shift"].mean())
    # and for real: re-embedding the unchanged sequence gives the same embedding, bit for bit
    bert, tdict = load_model(model, device="cpu")
    encoder = CellEncoder(bert, tdict)
    reader = CorpusReader.open(corpus)
    for row in lacking:
        original = encoder.truncate(reader.input_ids(row))
        deleted = perturb_tokens(original, [token], mode="delete")
        assert np.array_equal(encoder.pool([original]), encoder.pool([deleted]))


def test_shifts_agree_with_a_computation_by_hand(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    token = token_of(corpus, CD74)
    (row, *_), _ = cells_with_and_without(corpus, token, n=1)
    emb = tmp_path / "one.h5ad"
    embed_corpus(corpus, model, out=emb, cells=[row])
    result = perturb(emb, model, genes=["CD74"], mode="delete")

    ids = CorpusReader.open(corpus).input_ids(row).tolist()
    perturbed = [t for t in ids if t != token]
    before, after = reference_layer(model, np.array(ids), -2), reference_layer(model, np.array(perturbed), -2)
    genes = perturbed  # gc30m: every token is a gene; all but CD74 are in both sequences
    b = np.array([before[ids.index(g)] for g in genes], dtype=np.float64)
    a = np.array([after[perturbed.index(g)] for g in genes], dtype=np.float64)

    def cos(x: np.ndarray, y: np.ndarray) -> float:
        return float(x @ y / np.sqrt((x @ x) * (y @ y)))

    shifts = {g: 1 - cos(b[i], a[i]) for i, g in enumerate(genes)}
    got = result.gene_shifts.set_index("token")
    assert sorted(got.index.tolist()) == sorted(genes)
    assert (got["n_cells"] == 1).all()
    np.testing.assert_allclose([got.loc[g, "mean_shift"] for g in genes], [shifts[g] for g in genes], atol=1e-5)
    assert result.gene_shifts["mean_shift"].is_monotonic_decreasing
    cell = result.cells.iloc[0]
    assert cell["shift"] == pytest.approx(1 - cos(b.mean(axis=0), a.mean(axis=0)), abs=1e-6)
    assert cell["n_genes_compared"] == len(genes)
    assert cell["n_genes_present"] == 1


def test_overexpress_on_a_gc104m_corpus(gc104m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc104m
    token = token_of(corpus, CD74)
    _holding, lacking = cells_with_and_without(corpus, token, n=1)
    result = perturb(corpus, model, genes=[CD74], mode="overexpress", max_cells=3)
    assert result.cells["corpus_row"].tolist() == [0, 1, 2]
    reader = CorpusReader.open(corpus)
    # a cell changes unless CD74 is already its top gene (right after <cls>)
    assert result.cells["changed"].tolist() == [bool(reader.input_ids(r)[1] != token) for r in range(3)]
    # one cell lacking CD74, checked by hand: insertion after <cls>, last gene cut, <eos> kept
    emb = tmp_path / "lacking.h5ad"
    embed_corpus(corpus, model, out=emb, cells=lacking)
    one = perturb(emb, model, genes=["CD74"], mode="overexpress")
    ids = CorpusReader.open(corpus).input_ids(lacking[0]).tolist()
    new = [ids[0], token, *ids[1:-2], ids[-1]]
    before, after = reference_layer(model, np.array(ids), -2), reference_layer(model, np.array(new), -2)
    shared = ids[1:-2]  # genes in both sequences (CD74 and the dropped last gene left out)
    b = np.mean([before[ids.index(g)] for g in shared], axis=0)
    a = np.mean([after[new.index(g)] for g in shared], axis=0)
    expected = 1 - float(b @ a / np.linalg.norm(a) / np.linalg.norm(b))
    assert one.cells["shift"].iloc[0] == pytest.approx(expected, abs=1e-6)
    assert one.cells["n_genes_present"].iloc[0] == 0
    assert len(one.gene_shifts) == len(shared)


def test_outputs_and_cli(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    token = token_of(corpus, CD74)
    holding, lacking = cells_with_and_without(corpus, token)
    emb = tmp_path / "e.h5ad"
    embed_corpus(corpus, model, out=emb, cells=holding + lacking)
    prefix = tmp_path / "out" / "cd74"
    result = CliRunner().invoke(app, ["perturb", str(emb), "--model", str(model), "--genes", "CD74",
                                      "--mode", "delete", "--out", str(prefix), "--top", "5", "--min-cells", "2"])
    assert result.exit_code == 0, result.output
    assert "delete CD74 (ENSG00000019582)" in result.output
    assert "cells: 4, holding the gene(s): 2, changed: 2" in result.output
    assert "genes whose embeddings moved most (top 5, among genes compared in at least 2 cells)" in result.output
    cells = pd.read_csv(tmp_path / "out" / "cd74_cells.csv")
    genes = pd.read_csv(tmp_path / "out" / "cd74_genes.csv")
    assert cells["corpus_row"].tolist() == holding + lacking
    assert {"cell", "dataset_id", "cell_id", "cell_type", "shift", "cosine", "n_genes_present"} <= set(cells.columns)
    assert genes.columns.tolist() == ["ensembl_id", "symbol", "token", "mean_shift", "n_cells"]
    assert genes["n_cells"].max() <= 2
    assert not list((tmp_path / "out").glob(".*"))


def test_cli_errors_are_one_line(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    runner = CliRunner()
    for args, expected in [
        (["--genes", "NOT-A-GENE"], "gene 'NOT-A-GENE': not a human gene symbol"),
        (["--genes", "CD74", "--mode", "shuffle"], "--mode shuffle: use one of delete, overexpress"),
        (["--genes", "CD74", "--max-cells", "0"], "--max-cells 0"),
    ]:
        result = runner.invoke(app, ["perturb", str(corpus), "--model", str(model), *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("error:") and expected in lines[0]
    bogus = tmp_path / "bogus.h5ad"
    bogus.write_bytes(b"not hdf5")
    result = runner.invoke(app, ["perturb", str(bogus), "--model", str(model), "--genes", "CD74"])
    assert result.exit_code == 1
    assert result.output.startswith("error:") and "genecorpus embed" in result.output


def test_genes_that_moved_most_are_reported_among_genes_seen_in_enough_cells() -> None:
    """A gene compared in one or two cells has a noisy mean shift: the top list leaves it out (the CSV keeps it)."""
    import pandas as pd

    from genecorpus.model.perturb import MIN_CELLS, PerturbResult

    shifts = pd.DataFrame({"ensembl_id": ["ENSG01", "ENSG02", "ENSG03"], "symbol": ["A", "B", "C"],
                           "token": [5, 6, 7], "mean_shift": [0.9, 0.5, 0.1], "n_cells": [1, 40, 10]})
    cells = pd.DataFrame({"n_genes_present": [1], "changed": [True], "shift": [0.2]})
    genes = pd.DataFrame({"query": ["X"], "ensembl_id": ["ENSG09"], "symbol": ["X"], "token": [9]})
    result = PerturbResult(mode="delete", genes=genes, cells=cells, gene_shifts=shifts)
    assert result.min_cells == MIN_CELLS == 10
    assert result.top_genes(5)["symbol"].tolist() == ["B", "C"]  # A: one cell
    assert "among genes compared in at least 10 cells" in result.to_text()
    strict = PerturbResult(mode="delete", genes=genes, cells=cells, gene_shifts=shifts, min_cells=50)
    assert strict.top_genes(5).empty and "no gene was compared in 50 cells or more" in strict.to_text()
    assert len(strict.gene_shifts) == 3
