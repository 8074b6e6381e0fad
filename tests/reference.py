"""A slow, obvious reference of the whole pipeline (SPEC §2.3–§2.7), written independently of src/.

It loads each dataset whole, uses numpy's own mean/std/median and Python's sort, and returns the
expected medians and token lists. Only the gene-ID mapping is shared with the code under test (it has
its own tests in test_genes.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class RefDataset:
    counts: sp.csr_matrix  # cells x input columns, integer-valued
    ensembl_ids: np.ndarray  # per input column, "" = unmapped
    cell_ids: np.ndarray
    filter_pass: np.ndarray | None = None


def collapse(ds: RefDataset, genes: np.ndarray) -> sp.csr_matrix:
    """cells x genes, columns that map to the same gene summed."""
    index = {g: i for i, g in enumerate(genes.tolist())}
    rows, cols = [], []
    for c, e in enumerate(ds.ensembl_ids.tolist()):
        if e in index:
            rows.append(c)
            cols.append(index[e])
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(ds.counts.shape[1], len(genes)))
    out = (ds.counts.astype(np.float64) @ m).tocsr()
    out.eliminate_zeros()
    out.sort_indices()
    return out


def qc_keep(ds: RefDataset, genes: np.ndarray, mito: np.ndarray, *, n_sd: float = 3.0,
            min_genes: int = 7, mito_mode: str = "counts") -> tuple[np.ndarray, dict[str, int]]:
    x = ds.counts.astype(np.float64)
    n_counts = np.asarray(x.sum(axis=1)).ravel()
    is_mito = np.isin(ds.ensembl_ids, mito)
    mito_counts = np.asarray(x[:, np.flatnonzero(is_mito)].sum(axis=1)).ravel()
    pre = np.ones(x.shape[0], bool) if ds.filter_pass is None else ds.filter_pass.astype(bool)
    reason = np.full(x.shape[0], "", dtype=object)
    reason[~pre] = "filter_pass"
    ok = np.abs(n_counts - n_counts[pre].mean()) <= n_sd * n_counts[pre].std()
    reason[(reason == "") & ~ok] = "n_counts_outlier"
    if is_mito.any():
        m = mito_counts if mito_mode == "counts" else np.where(n_counts > 0, mito_counts / np.maximum(n_counts, 1), 0)
        ok = np.abs(m - m[pre].mean()) <= n_sd * m[pre].std()
        reason[(reason == "") & ~ok] = "mito_outlier"
    n_genes = np.diff(collapse(ds, genes).indptr)
    reason[(reason == "") & (n_genes < min_genes)] = "min_genes"
    keep = reason == ""
    counts = {r: int((reason == r).sum()) for r in ("filter_pass", "n_counts_outlier", "mito_outlier", "min_genes")}
    return keep, counts


def gene_values(ds: RefDataset, genes: np.ndarray, keep: np.ndarray) -> dict[int, list[float]]:
    g = collapse(ds, genes)
    n_counts = np.asarray(ds.counts.astype(np.float64).sum(axis=1)).ravel()
    out: dict[int, list[float]] = {}
    for i in np.flatnonzero(keep):
        row = g.getrow(i)
        for j, c in zip(row.indices.tolist(), row.data.tolist()):
            out.setdefault(j, []).append(c / n_counts[i] * 10_000.0)
    return out


def medians_of(values: dict[int, list[float]], n_genes: int) -> np.ndarray:
    out = np.full(n_genes, np.nan)
    for j, v in values.items():
        out[j] = np.median(np.array(v, dtype=np.float64))
    return out


def encode_cell(row: sp.csr_matrix, depth: float, medians: np.ndarray, tokens: np.ndarray,
                max_genes: int) -> list[int]:
    pairs = []
    for j, c in zip(row.indices.tolist(), row.data.tolist()):
        m = medians[j]
        if np.isfinite(m) and m > 0 and tokens[j] >= 0:
            pairs.append((-(c / depth * 10_000.0 / m), int(tokens[j])))
    return [t for _, t in sorted(pairs)][:max_genes]
