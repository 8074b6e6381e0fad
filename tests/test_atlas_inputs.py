"""Atlas-grade inputs: CELLxGENE-style files read as they are, curation flags, repeated files, determinism."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from corpus_files import SHARD_FILES, corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.errors import ConfigError, CountsError
from genecorpus.public_data import fetch_public_file

if TYPE_CHECKING:
    from pathlib import Path

N_CELLS, N_GENES = 400, 300


def _counts(seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.3, 2.0, (N_CELLS, N_GENES))).astype(np.float32)
    return sp.csr_matrix(dense)


def _gene_ids() -> np.ndarray:
    return np.concatenate([genes.candidate_genes()[::50][:N_GENES - 10], genes.mito_genes()[:10]]).astype(object)


def _cellxgene_style(path: Path, counts: sp.csr_matrix, *, primary: np.ndarray, filtered: np.ndarray) -> Path:
    """As CELLxGENE publishes: X normalized (log1p), raw.X counts, Ensembl index, feature_name, flags."""
    ids = _gene_ids()
    norm = counts.multiply(1e4 / np.maximum(np.asarray(counts.sum(axis=1)), 1)).tocsr()
    norm.data = np.log1p(norm.data).astype(np.float32)
    var = pd.DataFrame({"feature_name": [f"SYM{i}" for i in range(len(ids))],
                        "feature_is_filtered": filtered}, index=pd.Index(ids, name="feature_id"))
    obs = pd.DataFrame({"is_primary_data": primary, "cell_type": ["T", "B"] * (N_CELLS // 2)},
                       index=[f"c{i}" for i in range(N_CELLS)])
    adata = ad.AnnData(X=norm, obs=obs, var=var)
    adata.raw = ad.AnnData(X=counts, var=pd.DataFrame({"feature_name": var["feature_name"]}, index=var.index))
    adata.write_h5ad(path)
    return path


def _plain(path: Path, counts: sp.csr_matrix, *, cells: np.ndarray, gene_cols: np.ndarray) -> Path:
    """The same cells and genes as raw counts in X, without any curation column: what the flags mean."""
    ids = _gene_ids()[gene_cols]
    obs = pd.DataFrame({"cell_type": np.array(["T", "B"] * (N_CELLS // 2))[cells]},
                       index=np.array([f"c{i}" for i in range(N_CELLS)])[cells])
    ad.AnnData(X=counts[cells][:, gene_cols], obs=obs, var=pd.DataFrame(index=ids)).write_h5ad(path)
    return path


def _shard_digests(out: Path) -> dict[str, str]:
    return corpus_file_digests(out, suffixes=SHARD_FILES, recursive=False)


def test_cellxgene_file_equals_its_curated_raw_counts(tmp_path: Path) -> None:
    counts = _counts(1)
    rng = np.random.default_rng(2)
    primary = rng.random(N_CELLS) > 0.3
    filtered = np.zeros(N_GENES, dtype=bool)
    filtered[rng.choice(N_GENES - 10, 25, replace=False)] = True
    cxg = _cellxgene_style(tmp_path / "cxg.h5ad", counts, primary=primary, filtered=filtered)
    plain = _plain(tmp_path / "plain.h5ad", counts, cells=np.flatnonzero(primary), gene_cols=np.flatnonzero(~filtered))

    spec = {"id": "d", "gene_id": "ensembl", "obs_columns": ("cell_type",)}
    a = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(cxg), **spec),)), tmp_path / "a", report=False)
    b = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(plain), **spec),)), tmp_path / "b", report=False)
    assert _shard_digests(tmp_path / "a") == _shard_digests(tmp_path / "b")
    record = a.manifest.datasets[0]
    assert record.matrix == "raw.X"
    assert record.primary_column == "is_primary_data"
    assert record.cells.dropped["not_primary_data"] == int((~primary).sum())
    assert record.cells.n_in == N_CELLS
    assert record.genes.n_filtered_out == int(filtered.sum())
    assert record.cells.kept == b.manifest.datasets[0].cells.kept
    assert a.manifest.datasets[0].qc == b.manifest.datasets[0].qc  # QC looked at the primary cells only


def test_primary_only_false_keeps_every_cell(tmp_path: Path) -> None:
    counts = _counts(3)
    primary = np.arange(N_CELLS) % 2 == 0
    cxg = _cellxgene_style(tmp_path / "cxg.h5ad", counts, primary=primary, filtered=np.zeros(N_GENES, bool))
    result = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(cxg), gene_id="ensembl", primary_only=False),)),
                          tmp_path / "out", report=False)
    record = result.manifest.datasets[0]
    assert record.primary_column is None
    assert record.cells.dropped["not_primary_data"] == 0


def test_counts_auto_prefers_a_counts_layer_and_refuses_when_nothing_holds_counts(tmp_path: Path) -> None:
    counts = _counts(4)
    ids = _gene_ids()
    norm = counts.copy()
    norm.data = np.log1p(norm.data)
    layered = ad.AnnData(X=norm, var=pd.DataFrame(index=ids), layers={"counts": counts})
    layered.write_h5ad(tmp_path / "layered.h5ad")
    result = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(tmp_path / "layered.h5ad"), gene_id="ensembl"),)),
                          tmp_path / "out", report=False)
    assert result.manifest.datasets[0].matrix == "layers['counts']"

    ad.AnnData(X=norm, var=pd.DataFrame(index=ids)).write_h5ad(tmp_path / "normalized.h5ad")
    with pytest.raises(CountsError, match=r"normalized\.h5ad"):
        build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(tmp_path / "normalized.h5ad"), gene_id="ensembl"),)),
                     tmp_path / "bad", report=False)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(CountsError):  # counts = "X" never looks elsewhere
        build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(tmp_path / "layered.h5ad"), gene_id="ensembl",
                                                       counts="X"),)), tmp_path / "bad", report=False)


def test_select_columns_preselect_like_filter_pass(tmp_path: Path) -> None:
    counts = _counts(5)
    ids = _gene_ids()
    flags = np.arange(N_CELLS) % 3 != 0
    obs = pd.DataFrame({"good": flags.astype(str)}, index=[f"c{i}" for i in range(N_CELLS)])  # "True"/"False"
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=ids)).write_h5ad(tmp_path / "flags.h5ad")
    result = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(tmp_path / "flags.h5ad"), gene_id="ensembl",
                                                            select_columns=("good",)),)), tmp_path / "out", report=False)
    assert result.manifest.datasets[0].cells.dropped["filter_pass"] == int((~flags).sum())
    with pytest.raises(ConfigError, match="'missing' not found"):
        build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(tmp_path / "flags.h5ad"), gene_id="ensembl",
                                                       select_columns=("missing",)),)), tmp_path / "o2", report=False)


def test_the_same_file_twice_is_refused_unless_allowed(tmp_path: Path) -> None:
    kang = fetch_public_file("kang_pbmc_control")
    copy = tmp_path / "copy.h5ad"
    copy.write_bytes(kang.read_bytes())
    specs = (DatasetSpec(path=str(kang), id="a", gene_id="symbol", release="grch37"),
             DatasetSpec(path=str(copy), id="b", gene_id="symbol", release="grch37"))
    with pytest.raises(ConfigError, match=r"dataset 'b' is identical to .* \(dataset 'a'\).*allow_repeated_files"):
        build_corpus(BuildConfig(datasets=specs), tmp_path / "out", report=False)
    same = (specs[0], specs[0].model_copy(update={"id": "again"}))
    with pytest.raises(ConfigError, match="is the same file as"):
        build_corpus(BuildConfig(datasets=same), tmp_path / "out", report=False)
    assert not (tmp_path / "out").exists()


def test_block_size_above_the_batch_size_changes_no_byte(tmp_path: Path) -> None:
    """Shards are written in batches of 1,000 rows: blocks larger than that must give the same bytes."""
    kang = fetch_public_file("kang_pbmc_control")
    outs = []
    for block in (300, 2500):
        config = BuildConfig(datasets=(DatasetSpec(path=str(kang), gene_id="symbol", release="grch37"),),
                             block_size=block)
        build_corpus(config, tmp_path / f"b{block}", report=False)
        outs.append(_shard_digests(tmp_path / f"b{block}"))
    assert outs[0] == outs[1]
    manifest = json.loads((tmp_path / "b300" / "manifest.json").read_text())
    assert manifest["corpus"]["n_cells"] > 2000  # more than two batches per shard


def test_split_by_equals_one_file_per_value(tmp_path: Path) -> None:
    """A file split by an obs column builds exactly what one file per value builds (per-part QC included)."""
    counts = _counts(6)
    ids = _gene_ids()
    rng = np.random.default_rng(7)
    donor = rng.choice(["d2", "d1", "d3"], N_CELLS)  # interleaved rows
    cells = np.array([f"c{i}" for i in range(N_CELLS)])
    obs = pd.DataFrame({"donor": donor, "cell_type": rng.choice(["T", "B"], N_CELLS)}, index=cells)
    ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=ids)).write_h5ad(tmp_path / "all.h5ad")
    separate = []
    for value in ("d1", "d2", "d3"):
        rows = np.flatnonzero(donor == value)
        ad.AnnData(X=counts[rows], obs=obs.iloc[rows], var=pd.DataFrame(index=ids)).write_h5ad(tmp_path / f"{value}.h5ad")
        separate.append(DatasetSpec(path=str(tmp_path / f"{value}.h5ad"), id=f"all/{value}", gene_id="ensembl",
                                    obs_columns=("cell_type",)))
    whole = DatasetSpec(path=str(tmp_path / "all.h5ad"), gene_id="ensembl", obs_columns=("cell_type",),
                        split_by="donor")
    digests = []
    for block in (7, 1000):
        result = build_corpus(BuildConfig(datasets=(whole,), block_size=block, shard_cells=50), tmp_path / f"s{block}",
                              report=False)
        digests.append(_shard_digests(tmp_path / f"s{block}"))
    build_corpus(BuildConfig(datasets=tuple(separate), shard_cells=50), tmp_path / "sep", report=False)
    assert digests[0] == digests[1] == _shard_digests(tmp_path / "sep")
    records = result.manifest.datasets
    assert [r.dataset_id for r in records] == ["all/d1", "all/d2", "all/d3"]
    assert [r.split_value for r in records] == ["d1", "d2", "d3"]
    assert [r.cells.n_in for r in records] == [int((donor == v).sum()) for v in ("d1", "d2", "d3")]
    with pytest.raises(ConfigError, match="no obs column 'sample' to split by"):
        build_corpus(BuildConfig(datasets=(whole.model_copy(update={"split_by": "sample"}),)), tmp_path / "x",
                     report=False)
