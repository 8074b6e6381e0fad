"""A slow, obvious reference of the whole pipeline (SPEC §2.3–§2.7), written independently of src/.

It loads each dataset whole, uses numpy's own mean/std/median and plain sorts (Python's, or numpy's
lexsort on the same keys, one cell at a time), and returns the expected medians and token lists. Only
the gene-ID mapping is shared with the code under test (it has its own tests in test_genes.py).
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
    """Gene index -> the normalized values ``count / n_counts * 10,000`` of the kept cells expressing it."""
    kept = np.flatnonzero(keep)
    g = collapse(ds, genes)[kept]
    n_counts = np.asarray(ds.counts.astype(np.float64).sum(axis=1)).ravel()[kept]
    cell = np.repeat(np.arange(len(kept)), np.diff(g.indptr))  # the kept cell of each stored value
    normalized = sp.csr_matrix((g.data / n_counts[cell] * 10_000.0, g.indices, g.indptr), shape=g.shape)
    by_gene = normalized.tocsc()
    return {int(j): by_gene.data[by_gene.indptr[j]:by_gene.indptr[j + 1]].tolist()
            for j in np.flatnonzero(np.diff(by_gene.indptr))}


def medians_of(values: dict[int, list[float]], n_genes: int) -> np.ndarray:
    out = np.full(n_genes, np.nan)
    for j, v in values.items():
        out[j] = np.median(np.array(v, dtype=np.float64))
    return out


def encode_cell(row: sp.csr_matrix, depth: float, medians: np.ndarray, tokens: np.ndarray,
                max_genes: int) -> list[int]:
    pairs = []
    for j, c in zip(row.indices.tolist(), row.data.tolist(), strict=False):
        m = medians[j]
        if np.isfinite(m) and m > 0 and tokens[j] >= 0:
            pairs.append((-(c / depth * 10_000.0 / m), int(tokens[j])))
    return [t for _, t in sorted(pairs)][:max_genes]


def encode_cells(g: sp.csr_matrix, depth: np.ndarray, medians: np.ndarray, tokens: np.ndarray,
                 max_genes: int, rows: np.ndarray | None = None) -> list[list[int]]:
    """:func:`encode_cell` of each of ``rows`` (default: all) of ``g``: the same float64 operations in the
    same order on each value, and the same order of the pairs (value descending, then token ascending,
    as ``sorted`` orders ``(-value, token)``) by ``np.lexsort``, one numpy call per cell instead of a Python
    loop per value."""
    g = sp.csr_matrix(g)
    usable = np.zeros(len(medians), dtype=bool)
    finite = np.isfinite(medians)
    usable[finite] = (medians[finite] > 0) & (tokens[finite] >= 0)
    out = []
    for i in range(g.shape[0]) if rows is None else rows:
        lo, hi = g.indptr[i], g.indptr[i + 1]
        j, c = g.indices[lo:hi], g.data[lo:hi]
        keep = usable[j]
        j, c = j[keep], c[keep].astype(np.float64)
        value = -(c / np.float64(depth[i]) * 10_000.0 / medians[j])
        tok = tokens[j].astype(np.int64)
        out.append(tok[np.lexsort((tok, value))][:max_genes].tolist())
    return out
