"""Rank value encoding against a slow, obvious reference (float64, stable sort, ties by token id)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from genecorpus.encode import apply_layout, rank_value_encode
from genecorpus.vocab import LAYOUTS


def reference_encode(x: sp.csr_matrix, depth, medians, tokens, max_genes: int) -> list[list[int]]:
    """Per cell: value = count / n_counts * 10000 / median; sort by (-value, token); truncate."""
    cells = []
    for i in range(x.shape[0]):
        row = x.getrow(i)
        pairs = []
        for g, c in zip(row.indices, row.data):
            if medians[g] > 0:
                value = float(c) / float(depth[i]) * 10_000.0 / float(medians[g])
                pairs.append((-value, int(tokens[g])))
        cells.append([t for _, t in sorted(pairs)][:max_genes])
    return cells


def _split(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [tokens[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("max_genes", [2048, 5])
def test_encoding_matches_reference(max_genes: int) -> None:
    rng = np.random.default_rng(0)
    n_cells, n_genes = 200, 300
    dense = rng.poisson(0.4, size=(n_cells, n_genes)) * (rng.random((n_cells, n_genes)) < 0.5)
    x = sp.csr_matrix(dense.astype(np.int64))
    depth = dense.sum(axis=1).astype(np.float64) + 17
    medians = rng.choice([0.5, 1.0, 1.5, 2.0, 0.0], size=n_genes)  # few distinct values → many ties
    tokens = np.arange(2, n_genes + 2, dtype=np.int32)
    got, lengths = rank_value_encode(x, depth=depth, medians=medians, tokens=tokens, max_genes=max_genes)
    assert _split(got, lengths) == reference_encode(x, depth, medians, tokens, max_genes)


def test_near_ties_one_ulp_apart() -> None:
    m = 1.7
    medians = np.array([m, np.nextafter(m, 2.0), m, np.nextafter(m, 0.0)])
    x = sp.csr_matrix(np.array([[3, 3, 3, 3]], dtype=np.int64))
    tokens = np.array([10, 11, 12, 13], dtype=np.int32)
    got, lengths = rank_value_encode(x, depth=np.array([9.0]), medians=medians, tokens=tokens, max_genes=10)
    # larger median → smaller value; exact ties (genes 0 and 2) by ascending token
    assert got.tolist() == [13, 10, 12, 11]
    assert got.tolist() == reference_encode(x, [9.0], medians, tokens, 10)[0]


def test_gc104m_layout_wraps_cls_eos() -> None:
    tokens = np.array([7, 8, 9, 5], dtype=np.int32)
    lengths = np.array([3, 0, 1])
    out, new = apply_layout(tokens, lengths, layout=LAYOUTS["gc104m"], special={"<cls>": 2, "<eos>": 3})
    assert new.tolist() == [5, 2, 3]
    assert out.tolist() == [2, 7, 8, 9, 3, 2, 3, 2, 5, 3]
