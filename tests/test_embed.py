"""genecorpus embed: pooled hidden states of real cells, checked against a slow one-cell reference."""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import torch  # noqa: F401 - the train extra: make test installs it, so a missing one fails here
from embedding_data import (
    kang_corpus,
    kang_geneformer_corpus,
    kang_labels_if_present,
    kang_subset,
    reference_layer,
    tiny_model,
)
from typer.testing import CliRunner

from genecorpus.cli import app
from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.embed import EMBEDDING_KEY, embed_corpus

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# a few rows of the 300-cell corpus, including its longest and shortest cell (set in the fixture)
SOME_ROWS = [5, 0, 17, 3, 42]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "embedding-data"


@pytest.fixture(scope="session")
def gc30m(data_dir: Path, shared_folder: Path) -> tuple[Path, Path]:
    """(corpus, tiny model) with our own dictionary, gc30m layout."""
    data_dir.mkdir(exist_ok=True)
    corpus = kang_corpus(data_dir, "gc30m", kang_labels_if_present(shared_folder))
    return corpus, tiny_model(data_dir / "tiny-gc30m", corpus / "token_dictionary.pkl")


@pytest.fixture(scope="session")
def gc104m(data_dir: Path, shared_folder: Path) -> tuple[Path, Path]:
    """(corpus, tiny model) with our own dictionary, gc104m layout (<cls> ... <eos>)."""
    data_dir.mkdir(exist_ok=True)
    corpus = kang_corpus(data_dir, "gc104m", kang_labels_if_present(shared_folder))
    return corpus, tiny_model(data_dir / "tiny-gc104m", corpus / "token_dictionary.pkl", seed=1)


def gene_positions(ids: np.ndarray, specials: dict[str, int]) -> np.ndarray:
    return np.array([i for i, t in enumerate(ids.tolist()) if t not in set(specials.values())])


def rows_with_extremes(corpus: Path) -> list[int]:
    lengths = CorpusReader.open(corpus).lengths
    return [*SOME_ROWS, int(np.argmax(lengths)), int(np.argmin(lengths))]


@pytest.mark.parametrize("layer", [-2, -1, 0])
def test_mean_pooling_equals_one_cell_reference(gc30m: tuple[Path, Path], tmp_path: Path, layer: int) -> None:
    corpus, model = gc30m
    rows = rows_with_extremes(corpus)
    emb = embed_corpus(corpus, model, out=tmp_path / "e.h5ad", layer=layer, batch_size=5, cells=rows)
    reader = CorpusReader.open(corpus)
    for k, row in enumerate(rows[:4] + rows[-2:]):
        ids = reader.input_ids(row)
        states = reference_layer(model, ids, layer)
        expected = states[gene_positions(ids, reader.token_dictionary.special)].mean(axis=0)
        got = emb.obsm[EMBEDDING_KEY][rows.index(row)]
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"row {row} (case {k})")


def test_deterministic_bytes_and_independent_of_batch_size(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    rows = rows_with_extremes(corpus)
    a = embed_corpus(corpus, model, out=tmp_path / "a.h5ad", batch_size=7, cells=rows)
    b = embed_corpus(corpus, model, out=tmp_path / "b.h5ad", batch_size=7, cells=rows)
    c = embed_corpus(corpus, model, out=tmp_path / "c.h5ad", batch_size=1, cells=rows)
    digest = [hashlib.sha256((tmp_path / f"{x}.h5ad").read_bytes()).hexdigest() for x in "ab"]
    assert digest[0] == digest[1]
    assert a.obsm[EMBEDDING_KEY].tobytes() == b.obsm[EMBEDDING_KEY].tobytes()
    np.testing.assert_allclose(a.obsm[EMBEDDING_KEY], c.obsm[EMBEDDING_KEY], atol=1e-5)
    assert a.obsm[EMBEDDING_KEY].dtype == np.float32
    assert a.obsm[EMBEDDING_KEY].shape == (len(rows), 64)
    assert not np.allclose(a.obsm[EMBEDDING_KEY][0], a.obsm[EMBEDDING_KEY][1])  # cells differ


def test_row_order_obs_and_provenance_carried_through(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    rows = [7, 3, 250, 0, 99]
    out = tmp_path / "sub" / "emb.h5ad"
    embed_corpus(corpus, model, out=out, cells=rows)
    emb = ad.read_h5ad(out)
    assert emb.obs["corpus_row"].tolist() == rows
    assert emb.X.shape == (len(rows), 0)
    reader = CorpusReader.open(corpus)
    assert {"dataset_id", "cell_id", "cell_type", "length"} <= set(emb.obs.columns)
    assert emb.obs["cell_id"].tolist() == [reader.column("cell_id")[r] for r in rows]
    assert emb.obs["length"].tolist() == [len(reader.input_ids(r)) for r in rows]
    assert emb.obs_names.tolist() == [f"kang_ctrl:{c}" for c in emb.obs["cell_id"]]
    # labels match the input file, looked up by cell id (independently of the corpus)
    source = ad.read_h5ad(kang_subset(corpus.parent)).obs["cell_type"]
    assert emb.obs["cell_type"].astype(str).tolist() == [source[c] for c in emb.obs["cell_id"]]
    info = emb.uns["genecorpus"]
    assert info["corpus"] == str(corpus.resolve())
    assert info["model"] == str(model.resolve())
    assert (info["layer"], info["pool"], info["max_length"]) == (-2, "mean", 2048)
    assert info["token_dictionary"] == str((model / "token_dictionary.pkl").resolve())
    assert not list(out.parent.glob(".*incomplete*"))


def test_whole_corpus_in_row_order_with_truncation(gc104m: tuple[Path, Path], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    corpus, model = gc104m
    reader = CorpusReader.open(corpus)
    with caplog.at_level(logging.WARNING, logger="genecorpus.model.embed"):
        emb = embed_corpus(corpus, model, out=tmp_path / "all.h5ad", max_length=40, batch_size=64)
    assert emb.obs["corpus_row"].tolist() == list(range(reader.n_cells))
    n_long = int((reader.lengths > 40).sum())
    assert n_long > 0
    assert [r.message for r in caplog.records] == [
        f"{n_long} of {reader.n_cells} cells are longer than 40 tokens; their first 40 tokens are embedded"]
    for row in (0, reader.n_cells - 1, int(np.argmin(reader.lengths))):
        ids = reader.input_ids(row)[:40]  # the first 40 tokens: <cls> and genes, <eos> cut off if longer
        states = reference_layer(model, ids, -2)
        expected = states[gene_positions(ids, reader.token_dictionary.special)].mean(axis=0)
        np.testing.assert_allclose(emb.obsm[EMBEDDING_KEY][row], expected, atol=1e-5)


def test_mean_excludes_cls_and_eos_and_cls_pool_is_position_zero(gc104m: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    corpus, model = gc104m
    reader = CorpusReader.open(corpus)
    special = reader.token_dictionary.special
    rows = [4, 1, 60]
    mean = embed_corpus(corpus, model, out=tmp_path / "m.h5ad", cells=rows, batch_size=2)
    cls = embed_corpus(corpus, model, out=tmp_path / "c.h5ad", cells=rows, pool="cls", batch_size=2)
    for k, row in enumerate(rows):
        ids = reader.input_ids(row)
        assert ids[0] == special["<cls>"]
        assert ids[-1] == special["<eos>"]
        states = reference_layer(model, ids, -2)
        np.testing.assert_allclose(cls.obsm[EMBEDDING_KEY][k], states[0], atol=1e-5)
        np.testing.assert_allclose(mean.obsm[EMBEDDING_KEY][k], states[1:-1].mean(axis=0), atol=1e-5)
    assert ad.read_h5ad(tmp_path / "c.h5ad").uns["genecorpus"]["pool"] == "cls"


def test_cls_pool_without_cls_token_is_one_line_error(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    with pytest.raises(ConfigError, match=r"has no <cls> token.*use --pool mean"):
        embed_corpus(corpus, model, out=tmp_path / "x.h5ad", pool="cls", cells=[0])
    assert not (tmp_path / "x.h5ad").exists()


def test_geneformer_checkpoint_with_published_corpus(genecorpus_sample: Path, geneformer_dicts: Path,
                                                     data_dir: Path, tmp_path: Path) -> None:
    sample = genecorpus_sample
    tdict = geneformer_dicts / "token_dictionary_gc30M.pkl"
    model = tiny_model(data_dir / "geneformer-gc30m", tdict, geneformer_layout="bin")
    assert not (model / "token_dictionary.pkl").exists()
    assert (model / "pytorch_model.bin").exists()
    rows = [3, 0]
    # the parquet corpus has no dictionary: the model's is used for it
    emb = embed_corpus(sample, model, out=tmp_path / "gf.h5ad", token_dictionary=tdict, cells=rows, layer=-1)
    reader = CorpusReader.open(sample, tdict)
    for k, row in enumerate(rows):
        ids = reader.input_ids(row)
        assert len(ids) > 2000
        expected = reference_layer(model, ids, -1)[gene_positions(ids, {"<pad>": 0, "<mask>": 1})].mean(axis=0)
        np.testing.assert_allclose(emb.obsm[EMBEDDING_KEY][k], expected, atol=1e-5)
    assert emb.obs.columns.tolist() == ["length", "corpus_row"]
    assert emb.obs_names.tolist() == ["3", "0"]


def test_geneformer_gc104m_dictionary_and_cls(geneformer_dicts: Path, data_dir: Path, shared_folder: Path,
                                              tmp_path: Path) -> None:
    data_dir.mkdir(exist_ok=True)
    corpus = kang_geneformer_corpus(data_dir, geneformer_dicts, kang_labels_if_present(shared_folder))
    tdict = geneformer_dicts / "token_dictionary_gc95M.pkl"
    model = tiny_model(data_dir / "geneformer-gc95m", tdict, geneformer_layout="safetensors", max_positions=4096)
    assert (model / "model.safetensors").exists()
    assert not (model / "token_dictionary.pkl").exists()
    emb = embed_corpus(corpus, model, out=tmp_path / "v2.h5ad", token_dictionary=tdict, cells=[2, 9], pool="cls")
    reader = CorpusReader.open(corpus)
    for k, row in enumerate([2, 9]):
        np.testing.assert_allclose(emb.obsm[EMBEDDING_KEY][k], reference_layer(model, reader.input_ids(row), -2)[0],
                                   atol=1e-5)


def test_corpus_of_another_dictionary_is_refused(gc30m: tuple[Path, Path], geneformer_dicts: Path,
                                                 data_dir: Path, tmp_path: Path) -> None:
    corpus, _ = gc30m
    tdict = geneformer_dicts / "token_dictionary_gc30M.pkl"
    model = tiny_model(data_dir / "geneformer-gc30m", tdict, geneformer_layout="bin")
    with pytest.raises(InputError, match=r"tokenized with another dictionary.*re-tokenize") as err:
        embed_corpus(corpus, model, out=tmp_path / "x.h5ad", token_dictionary=tdict, cells=[0])
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.h5ad").exists()


def test_token_ids_beyond_the_model_vocabulary_are_refused(gc30m: tuple[Path, Path], genecorpus_sample: Path,
                                                           tmp_path: Path) -> None:
    sample = genecorpus_sample
    _, model = gc30m  # vocabulary of ~10k Kang genes; the published corpus uses gc30M ids up to 25k
    with pytest.raises(InputError, match=r"token id \d+ is outside the model's vocabulary of \d+"):
        embed_corpus(sample, model, out=tmp_path / "x.h5ad", cells=[0, 1])
    assert not (tmp_path / "x.h5ad").exists()


@pytest.mark.parametrize(("kwargs", "error", "pattern"), [
    ({"layer": 3}, ConfigError, r"layer 3 does not exist.*0\.\.2"),
    ({"layer": -4}, ConfigError, "layer -4 does not exist"),
    ({"batch_size": 0}, ConfigError, "batch size 0"),
    ({"cells": [0, 10_000]}, InputError, "row 10000 is outside the corpus"),
    ({"corpus_token_dictionary": "/no/such.pkl"}, InputError, "no such token dictionary"),
])
def test_bad_settings_are_one_line_errors(gc30m: tuple[Path, Path], tmp_path: Path, kwargs: dict,
                                          error: type[Exception], pattern: str) -> None:
    corpus, model = gc30m
    with pytest.raises(error, match=pattern) as err:
        embed_corpus(corpus, model, out=tmp_path / "x.h5ad", **kwargs)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.h5ad").exists()


def test_cli_embed(gc104m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc104m
    out = tmp_path / "cli.h5ad"
    result = CliRunner().invoke(app, ["embed", str(corpus), "--model", str(model), "--out", str(out),
                                      "--max-length", "24", "--batch-size", "50", "--layer", "-1"])
    assert result.exit_code == 0, result.output
    n = CorpusReader.open(corpus).n_cells
    assert f"embedded {n} cells" in result.output
    assert "cells/s" in result.output
    emb = ad.read_h5ad(out)
    assert emb.obsm[EMBEDDING_KEY].shape == (n, 64)
    assert emb.uns["genecorpus"]["layer"] == -1


def test_cli_embed_errors_are_one_line(gc30m: tuple[Path, Path], tmp_path: Path) -> None:
    corpus, model = gc30m
    runner = CliRunner()
    out = tmp_path / "x.h5ad"
    for args, expected in [
        (["--model", str(tmp_path)], "not a model folder"),
        (["--model", str(model), "--pool", "cls"], "use --pool mean"),
        (["--model", str(model), "--layer", "7"], "layer 7 does not exist"),
    ]:
        result = runner.invoke(app, ["embed", str(corpus), "--out", str(out), *args])
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1, result.output
        assert lines[0].startswith("error:") and expected in lines[0]
        assert not out.exists()
