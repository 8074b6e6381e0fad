"""The builder end to end on real public data, checked against the slow reference in reference.py.

The real corpus is the Kang PBMC file and the celltypist sample's counts. ``make test`` gives the builder
those counts as an h5ad written here (same cells, genes and float values, noise included; the corpus
files come out byte for byte the same as from the CSV): the builder parses a text table again in each
of its passes, which costs seconds per pass over the CSV's 32,786 columns. The CSV itself goes through
the same tests under ``make test-all`` (marked slow), whole, and through a build in ``make test`` as a
subset (test_two_workers_give_identical_bytes_on_real_subsets); io/test_readers.py reads it whole.
"""

from __future__ import annotations

import json
import pickle
from typing import TYPE_CHECKING

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from corpus_files import SHARD_FILES, corpus_file_digests
from reference import RefDataset, collapse, encode_cells, gene_values, medians_of, qc_keep

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec

if TYPE_CHECKING:
    from pathlib import Path

    from genecorpus.executors import LocalExecutor


def _rounded(x: sp.spmatrix) -> sp.csr_matrix:
    """``np.round`` of every entry (zeros stay zero, so only the stored values need it), zeros dropped."""
    out = sp.csr_matrix(x, dtype=np.float64, copy=True)
    out.data = np.round(out.data)
    out.eliminate_zeros()
    return out


def _load_reference_datasets(kang: Path, df: pd.DataFrame) -> list[RefDataset]:
    a = ad.read_h5ad(kang)
    ids = genes.map_to_ensembl(np.asarray(a.var_names, dtype=object), kind="symbol").ensembl_ids
    ds1 = RefDataset(_rounded(a.X), ids, np.asarray(a.obs_names, dtype=object))
    ids2 = genes.map_to_ensembl(np.asarray(df.columns, dtype=object), kind="symbol").ensembl_ids
    ds2 = RefDataset(sp.csr_matrix(np.round(df.to_numpy(dtype=np.float64))), ids2,
                     np.asarray(df.index, dtype=object))
    return [ds1, ds2]


@pytest.fixture(scope="module", params=[pytest.param("csv", marks=pytest.mark.slow), "h5ad"])
def celltypist_input(request: pytest.FixtureRequest, celltypist_frame: pd.DataFrame,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The celltypist sample as published (CSV), or its values as they are (float64, noise kept) in an h5ad."""
    if request.param == "csv":
        return request.getfixturevalue("celltypist_csv")
    a = ad.AnnData(sp.csr_matrix(celltypist_frame.to_numpy(dtype=np.float64)))
    a.obs_names = celltypist_frame.index.astype(str)
    a.var_names = celltypist_frame.columns.astype(str)
    path = tmp_path_factory.mktemp("celltypist-h5ad") / "celltypist.h5ad"
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def real_config(kang_control: Path, celltypist_input: Path) -> BuildConfig:
    return BuildConfig(datasets=(
        DatasetSpec(path=str(kang_control), id="kang", gene_id="symbol"),
        DatasetSpec(path=str(celltypist_input), id="celltypist", gene_id="symbol"),
    ), block_size=700, shard_cells=1000)


@pytest.fixture(scope="module")
def real_corpus(real_config: BuildConfig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("real") / "corpus"
    build_corpus(real_config, out, workers=1)
    return out


@pytest.fixture(scope="module")
def reference(kang_control: Path, celltypist_frame: pd.DataFrame) -> dict:
    cands = genes.candidate_genes()
    mito = genes.mito_genes()
    dsets = _load_reference_datasets(kang_control, celltypist_frame)
    values: dict[int, list[float]] = {}
    keeps, dropped = [], []
    for ds in dsets:
        keep, counts = qc_keep(ds, cands, mito)
        keeps.append(keep)
        dropped.append(counts)
        for j, v in gene_values(ds, cands, keep).items():
            values.setdefault(j, []).extend(v)
    med = medians_of(values, len(cands))
    return {"genes": cands, "datasets": dsets, "keep": keeps, "dropped": dropped, "medians": med}


def test_output_opens_with_datasets(real_corpus: Path) -> None:
    ds = datasets.load_from_disk(str(real_corpus))
    assert ds.column_names == ["input_ids", "dataset_id", "cell_id", "length"]
    assert ds.features["input_ids"].feature.dtype == "int16"
    assert ds.features["length"].dtype == "int64"
    lengths = pickle.loads((real_corpus / "lengths.pkl").read_bytes())
    assert lengths == ds["length"]
    assert all(len(ids) == n for ids, n in zip(ds["input_ids"], ds["length"], strict=False))
    for name in ("token_dictionary.pkl", "gene_medians.tsv", "gene_medians.pkl", "manifest.json"):
        assert (real_corpus / name).is_file()
    assert not list(real_corpus.parent.glob(".corpus.incomplete*"))


def test_medians_match_brute_force(real_corpus: Path, reference: dict) -> None:
    table = pd.read_csv(real_corpus / "gene_medians.tsv", sep="\t", dtype={"median": str})
    got = {g: float(v) for g, v in zip(table["ensembl_id"], table["median"], strict=False)}
    expected = {g: m for g, m in zip(reference["genes"].tolist(), reference["medians"], strict=False) if np.isfinite(m)}
    assert got.keys() == expected.keys()
    bad = [g for g in got if got[g] != expected[g]]
    assert not bad, f"{len(bad)} medians differ, e.g. {bad[:3]}"
    assert pickle.loads((real_corpus / "gene_medians.pkl").read_bytes()) == got


def test_cells_match_reference_encoding(real_corpus: Path, reference: dict) -> None:
    tokens = pickle.loads((real_corpus / "token_dictionary.pkl").read_bytes())
    assert tokens["<pad>"] == 0 and tokens["<mask>"] == 1
    gene_list = reference["genes"]
    vocab = sorted(g for g, m in zip(gene_list.tolist(), reference["medians"], strict=False) if np.isfinite(m))
    assert [tokens[g] for g in vocab] == list(range(2, 2 + len(vocab)))
    tok = np.array([tokens.get(g, -1) for g in gene_list.tolist()])
    ds = datasets.load_from_disk(str(real_corpus))
    expected_ids, expected_cells = [], []
    for name, d, keep in zip(("kang", "celltypist"), reference["datasets"], reference["keep"], strict=False):
        g = collapse(d, gene_list)
        depth = np.asarray(d.counts.sum(axis=1)).ravel()
        kept = np.flatnonzero(keep)
        expected_ids += [(name, d.cell_ids[i]) for i in kept]
        expected_cells += encode_cells(g, depth, reference["medians"], tok, 2048, rows=kept)
    assert list(zip(ds["dataset_id"], ds["cell_id"], strict=False)) == expected_ids
    assert ds["input_ids"] == expected_cells


def test_qc_accounting(real_corpus: Path, reference: dict) -> None:
    manifest = json.loads((real_corpus / "manifest.json").read_text())
    for d, ref_dropped in zip(manifest["datasets"], reference["dropped"], strict=False):
        cells = d["cells"]
        assert cells["in"] == cells["kept"] + sum(cells["dropped"].values())
        for reason, n in ref_dropped.items():
            assert cells["dropped"][reason] == n, (d["dataset_id"], reason)
        assert len(d["sha256"]) == 64
    celltypist = manifest["datasets"][1]
    assert celltypist["qc"]["mito_rule"] is True
    assert celltypist["cells"]["dropped"]["mito_outlier"] > 0  # the mito rule removes real cells here
    assert manifest["datasets"][0]["genes"]["release"] == "grch37"


def _digests(folder: Path) -> dict[str, str]:
    return corpus_file_digests(folder, suffixes=(*SHARD_FILES, ".json"), skip=("manifest.json",), recursive=False)


@pytest.mark.slow  # a second build of the whole real corpus: the next test checks the same on real subsets
def test_two_workers_give_identical_bytes(real_config: BuildConfig, real_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "w2"
    build_corpus(real_config.model_copy(update={"block_size": 333}), out, workers=2)
    assert _digests(out) == _digests(real_corpus)


@pytest.fixture(scope="module")
def real_subsets(kang_control: Path, celltypist_subset_csv: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Real cells in the formats of the real files, small enough to build twice: the first 300 Kang cells
    (float32 CSC h5ad, all 35,635 symbols, repeats included) and the celltypist subset of conftest.py."""
    kang = ad.read_h5ad(kang_control)[:300].copy()
    assert sp.issparse(kang.X) and kang.X.format == "csc" and kang.X.dtype == np.float32
    path = tmp_path_factory.mktemp("kang-subset") / "kang300.h5ad"
    kang.write_h5ad(path)
    return path, celltypist_subset_csv


def test_two_workers_give_identical_bytes_on_real_subsets(real_subsets: tuple[Path, Path],
                                                          two_worker_pool: LocalExecutor, tmp_path: Path) -> None:
    """As above, on subsets of both real files, the CSV included: 100-cell shards and 33-cell blocks cut
    the datasets into many tasks, merged in task order whatever worker ran them."""
    kang, celltypist = real_subsets
    config = BuildConfig(datasets=(DatasetSpec(path=str(kang), id="kang", gene_id="symbol"),
                                   DatasetSpec(path=str(celltypist), id="celltypist", gene_id="symbol")),
                         block_size=700, shard_cells=100)
    one, two = tmp_path / "w1", tmp_path / "w2"
    build_corpus(config, one, workers=1, report=False)
    build_corpus(config.model_copy(update={"block_size": 33}), two, executor=two_worker_pool, report=False)
    assert sum(name.endswith(".arrow") for name in _digests(one)) == 5  # 3 Kang shards, 2 celltypist
    assert _digests(two) == _digests(one)
