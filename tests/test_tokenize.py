"""`tokenize` with the published Geneformer dictionaries gives Geneformer's layout, cell for cell."""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING

import anndata as ad
import datasets
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from reference import RefDataset, collapse, encode_cells

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec

if TYPE_CHECKING:
    from pathlib import Path


def _plain_load(path: Path) -> dict:
    with path.open("rb") as fh:
        return pickle.load(fh)  # trusted test fixture from ../shared


def _tokenize(paths: list[Path], out: Path, dicts: Path, version: str, **kw) -> datasets.Dataset:
    names = {"V1": "gc30M", "V2": "gc95M"}[version]
    config = BuildConfig(
        datasets=tuple(DatasetSpec(path=str(p), **kw) for p in paths),
        layout="gc30m" if version == "V1" else "gc104m",
        token_dictionary=str(dicts / f"token_dictionary_{names}.pkl"),
        gene_medians=str(dicts / f"gene_median_dictionary_{names}.pkl"),
        gene_mapping=str(dicts / f"ensembl_mapping_dict_{names}.pkl") if version == "V2" else None,
        block_size=500,
    )
    build_corpus(config, out, mode="tokenize")
    return datasets.load_from_disk(str(out))


def _expected(ds: RefDataset, token_dict: dict, medians: dict, max_genes: int, wrap: bool) -> list[list[int]]:
    vocab = np.array(sorted(g for g in token_dict if g.startswith("ENSG")), dtype=object)
    med = np.array([medians[g] for g in vocab.tolist()])
    tok = np.array([token_dict[g] for g in vocab.tolist()])
    g = collapse(ds, vocab)
    depth = np.asarray(ds.counts.sum(axis=1)).ravel()
    cells = []
    for cell in encode_cells(g, depth, med, tok, max_genes):
        if cell:
            cells.append([token_dict["<cls>"], *cell, token_dict["<eos>"]] if wrap else cell)
    return cells


def test_gc30m_on_real_pbmc(kang_control: Path, kang_gc30m: Path, geneformer_dicts: Path) -> None:
    out = datasets.load_from_disk(str(kang_gc30m))  # tokenize of kang_control with gc30M, gene_id="symbol"
    assert out.column_names == ["input_ids", "dataset_id", "cell_id", "length"]
    assert out.features["input_ids"].feature.dtype == "int16"
    a = ad.read_h5ad(kang_control)
    ids = genes.map_to_ensembl(np.asarray(a.var_names, dtype=object), kind="symbol").ensembl_ids
    ref = RefDataset(sp.csr_matrix(a.X).astype(np.float64), ids, np.asarray(a.obs_names, dtype=object))
    expected = _expected(ref, _plain_load(geneformer_dicts / "token_dictionary_gc30M.pkl"),
                         _plain_load(geneformer_dicts / "gene_median_dictionary_gc30M.pkl"), 2048, wrap=False)
    assert out["input_ids"] == expected
    assert out["length"] == [len(c) for c in expected]


@pytest.mark.parametrize("table", [
    pytest.param("whole", marks=pytest.mark.slow),  # its 32,786 columns take seconds per pass to parse
    "subset",  # conftest's celltypist_subset_csv: 120 cells, ~3,300 genes, same format and values
])
def test_gc104m_with_mapping_dict_on_real_csv(table: str, geneformer_dicts: Path, tmp_path: Path,
                                             request: pytest.FixtureRequest) -> None:
    if table == "whole":
        path: Path = request.getfixturevalue("celltypist_csv")
        df: pd.DataFrame = request.getfixturevalue("celltypist_frame")
    else:
        path = request.getfixturevalue("celltypist_subset_csv")
        df = pd.read_csv(path, index_col=0, low_memory=False)
    out = _tokenize([path], tmp_path / "v2", geneformer_dicts, "V2")
    tokens = _plain_load(geneformer_dicts / "token_dictionary_gc95M.pkl")
    mapping = _plain_load(geneformer_dicts / "ensembl_mapping_dict_gc95M.pkl")
    ids = np.array([mapping.get(s.upper(), "") for s in df.columns], dtype=object)
    ref = RefDataset(sp.csr_matrix(np.round(df.to_numpy(dtype=np.float64))), ids, np.asarray(df.index, dtype=object))
    expected = _expected(ref, tokens, _plain_load(geneformer_dicts / "gene_median_dictionary_gc95M.pkl"),
                         4094, wrap=True)
    got = out["input_ids"]
    assert all(c[0] == tokens["<cls>"] and c[-1] == tokens["<eos>"] for c in got)
    assert got == expected


@pytest.fixture(scope="module")
def wide_h5ad(geneformer_dicts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 cells expressing 5,000 vocabulary genes each (IDs with versions), obs n_counts and filter_pass."""
    vocab = sorted(g for g in _plain_load(geneformer_dicts / "token_dictionary_gc30M.pkl") if g.startswith("ENSG"))
    v2 = set(_plain_load(geneformer_dicts / "token_dictionary_gc95M.pkl"))
    shared = [g for g in vocab if g in v2][:6000]
    rng = np.random.default_rng(5)
    x = sp.random(6, len(shared), density=0.85, random_state=rng, data_rvs=lambda n: rng.integers(1, 9, n))
    a = ad.AnnData(sp.csr_matrix(x.astype(np.float32)))
    a.var_names = [f"{g}.{i % 20}" for i, g in enumerate(shared)]
    a.obs_names = [f"cell{i}" for i in range(6)]
    a.obs["n_counts"] = np.asarray(x.sum(axis=1)).ravel()
    a.obs["filter_pass"] = [True, True, False, True, True, True]
    path = tmp_path_factory.mktemp("wide") / "wide.h5ad"
    a.write_h5ad(path)
    return path


@pytest.mark.parametrize(("version", "length"), [("V1", 2048), ("V2", 4096)])
def test_truncation_and_filter_pass(wide_h5ad: Path, geneformer_dicts: Path, tmp_path: Path,
                                    version: str, length: int) -> None:
    out = _tokenize([wide_h5ad], tmp_path / version, geneformer_dicts, version)
    assert out["cell_id"] == ["cell0", "cell1", "cell3", "cell4", "cell5"]
    assert out["length"] == [length] * 5
    assert all(len(c) == length for c in out["input_ids"])


def geneformer_expression(adata: ad.AnnData, token_dict: dict, medians: dict, max_genes: int) -> list[list[int]]:
    """Geneformer's TranscriptomeTokenizer.tokenize_anndata arithmetic, on the same scipy objects.

    ``X_view / n_counts * target_sum / norm_factor_vector`` — so float32 counts with float32 n_counts are
    divided in float32 — then genes by descending value; ties (which the original leaves to an unstable
    argsort) by ascending token id.
    """
    ids = adata.var["ensembl_id"].tolist()
    loc = np.array([i for i, g in enumerate(ids) if g in token_dict and g in medians])
    norm_factor = np.array([medians[ids[i]] for i in loc])
    toks = np.array([token_dict[ids[i]] for i in loc])
    n_counts = adata.obs["n_counts"].values[:, None]
    x_norm = sp.csr_matrix(adata.X[:, loc] / n_counts * 10_000 / norm_factor)
    cells = []
    for i in range(x_norm.shape[0]):
        lo, hi = x_norm.indptr[i], x_norm.indptr[i + 1]
        value, token = x_norm.data[lo:hi], toks[x_norm.indices[lo:hi]]
        # sorted(zip(-value, token)): by value descending, then token ascending
        cells.append(token[np.lexsort((token, -value))][:max_genes].tolist())
    return cells


def test_float32_inputs_match_geneformer_arithmetic(kang_control: Path, geneformer_dicts: Path,
                                                    tmp_path: Path) -> None:
    a = ad.read_h5ad(kang_control)
    ids = genes.map_to_ensembl(np.asarray(a.var_names, dtype=object), kind="symbol").ensembl_ids
    ids = np.asarray(ids)
    _, first = np.unique(ids, return_index=True)
    cols = np.array(sorted(i for i in first if ids[i]))
    b = ad.AnnData(sp.csr_matrix(a.X[:, cols]).astype(np.float32))
    b.var_names = ids[cols]
    b.var["ensembl_id"] = ids[cols]
    b.obs_names = a.obs_names
    b.obs["n_counts"] = np.asarray(a.X.sum(axis=1), dtype=np.float32).ravel()  # float32, as users make it
    assert b.obs["n_counts"].dtype == np.float32
    path = tmp_path / "kang_ensembl.h5ad"
    b.write_h5ad(path)
    out = _tokenize([path], tmp_path / "v1", geneformer_dicts, "V1")
    expected = geneformer_expression(b, _plain_load(geneformer_dicts / "token_dictionary_gc30M.pkl"),
                                     _plain_load(geneformer_dicts / "gene_median_dictionary_gc30M.pkl"), 2048)
    assert out["input_ids"] == [c for c in expected if c]
