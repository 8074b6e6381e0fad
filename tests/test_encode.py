"""Rank value encoding against a slow, obvious reference (float64, stable sort, ties by token id)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp

from genecorpus.encode import Arithmetic, apply_layout, rank_value_encode
from genecorpus.vocab import LAYOUTS


def reference_encode(x: sp.csr_matrix, depth, medians, tokens, max_genes: int) -> list[list[int]]:
    """Per cell: value = count / n_counts * 10000 / median; sort by (-value, token); truncate."""
    cells = []
    for i in range(x.shape[0]):
        row = x.getrow(i)
        pairs = []
        for g, c in zip(row.indices, row.data, strict=False):
            if medians[g] > 0:
                value = float(c) / float(depth[i]) * 10_000.0 / float(medians[g])
                pairs.append((-value, int(tokens[g])))
        cells.append([t for _, t in sorted(pairs)][:max_genes])
    return cells


def _split(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [tokens[a:b].tolist() for a, b in itertools.pairwise(bounds)]


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
    got, _lengths = rank_value_encode(x, depth=np.array([9.0]), medians=medians, tokens=tokens, max_genes=10)
    # larger median → smaller value; exact ties (genes 0 and 2) by ascending token
    assert got.tolist() == [13, 10, 12, 11]
    assert got.tolist() == reference_encode(x, [9.0], medians, tokens, 10)[0]


def test_gc104m_layout_wraps_cls_eos() -> None:
    tokens = np.array([7, 8, 9, 5], dtype=np.int32)
    lengths = np.array([3, 0, 1])
    out, new = apply_layout(tokens, lengths, layout=LAYOUTS["gc104m"], special={"<cls>": 2, "<eos>": 3})
    assert new.tolist() == [5, 2, 3]
    assert out.tolist() == [2, 7, 8, 9, 3, 2, 3, 2, 5, 3]


def test_geneformer_sparse_arithmetic_is_reproduced() -> None:
    """Geneformer's expression on a sparse float32 matrix with float32 n_counts: SciPy multiplies by
    float32 reciprocals of n_counts, then by float64 reciprocals of the medians."""
    rng = np.random.default_rng(9)
    n_cells, n_genes = 50, 400
    dense = rng.integers(0, 6, size=(n_cells, n_genes)).astype(np.float32)
    depth32 = (dense.sum(axis=1) * rng.uniform(1, 3, n_cells)).astype(np.float32)
    medians = rng.uniform(0.2, 5.0, n_genes)
    tokens = np.arange(4, n_genes + 4, dtype=np.int32)
    # Geneformer's own expression, on scipy/numpy objects
    x32 = sp.csr_matrix(dense)
    norm = sp.csr_matrix(x32 / depth32[:, None] * 10_000 / medians)
    expected = []
    for i in range(n_cells):
        row = norm.getrow(i)
        order = sorted(zip(-row.data, tokens[row.indices], strict=False))
        expected.append([int(t) for _, t in order])
    got, lengths = rank_value_encode(sp.csr_matrix(dense.astype(np.int64)), depth=depth32.astype(np.float64),
                                     medians=medians, tokens=tokens, max_genes=4096,
                                     arithmetic=Arithmetic.geneformer(value_dtype=np.dtype(np.float32),
                                                                      depth_dtype=np.dtype(np.float32), dense=False))
    assert _split(got, lengths) == expected


@pytest.mark.parametrize("n_dtype", [np.float32, np.float64])
def test_geneformer_dense_arithmetic_is_reproduced(n_dtype: type) -> None:
    """On a dense float32 matrix (loom, dense h5ad) NumPy really divides, in float32 when n_counts is."""
    rng = np.random.default_rng(10)
    dense = rng.integers(0, 6, size=(60, 300)).astype(np.float32)
    depth = (dense.sum(axis=1) * rng.uniform(1, 3, 60)).astype(n_dtype)
    medians = rng.uniform(0.2, 5.0, 300)
    tokens = np.arange(2, 302, dtype=np.int32)
    norm = dense / depth[:, None] * 10_000 / medians
    expected = [[int(t) for _, t in sorted(zip(-row[row > 0], tokens[row > 0], strict=False))] for row in norm]
    arithmetic = Arithmetic.geneformer(value_dtype=np.dtype(np.float32), depth_dtype=np.dtype(n_dtype), dense=True)
    got, lengths = rank_value_encode(sp.csr_matrix(dense.astype(np.int64)), depth=depth.astype(np.float64),
                                     medians=medians, tokens=tokens, max_genes=4096, arithmetic=arithmetic)
    assert _split(got, lengths) == expected


@pytest.mark.parametrize("x_dtype", [np.float32, np.float64, np.int32])
@pytest.mark.parametrize("n_dtype", [np.float32, np.float64, np.int64])
def test_geneformer_sparse_arithmetic_for_every_dtype_pair(x_dtype: type, n_dtype: type) -> None:
    rng = np.random.default_rng(11)
    dense = rng.integers(0, 7, size=(40, 500))
    depth = (dense.sum(axis=1) * rng.uniform(1, 3, 40)).astype(n_dtype)
    depth = np.maximum(depth, 1)
    medians = rng.uniform(0.2, 5.0, 500)
    tokens = np.arange(2, 502, dtype=np.int32)
    norm = sp.csr_matrix(sp.csr_matrix(dense.astype(x_dtype)) / depth[:, None] * 10_000 / medians)
    expected = [[int(t) for _, t in sorted(zip(-norm.getrow(i).data, tokens[norm.getrow(i).indices], strict=False))]
                for i in range(40)]
    arithmetic = Arithmetic.geneformer(value_dtype=np.dtype(x_dtype), depth_dtype=np.dtype(n_dtype), dense=False)
    got, lengths = rank_value_encode(sp.csr_matrix(dense), depth=depth.astype(np.float64), medians=medians,
                                     tokens=tokens, max_genes=4096, arithmetic=arithmetic)
    assert _split(got, lengths) == expected


@pytest.mark.parametrize("seed", range(6))
def test_adversarial_near_ties_against_reference(seed: int) -> None:
    """Medians equal or one ulp apart, counts on both sides of SMALL_COUNTS, wide cells, shuffled tokens."""
    rng = np.random.default_rng(100 + seed)
    n_genes = 3000
    base = rng.choice([0.5, 1.0, 2.0, 3.0, 1.0 / 3.0], size=n_genes)
    medians = base.copy()
    bump = rng.random(n_genes) < 0.3
    medians[bump] = np.nextafter(base[bump], np.inf)
    medians[rng.random(n_genes) < 0.05] = 0.0  # outside the vocabulary
    tokens = rng.permutation(n_genes).astype(np.int32) + 2  # token order unrelated to columns
    n_cells = 40
    dense = np.zeros((n_cells, n_genes), dtype=np.int64)
    for i in range(n_cells):
        k = rng.integers(1, 2500)
        cols = rng.choice(n_genes, k, replace=False)
        dense[i, cols] = rng.choice([1, 1, 1, 2, 2, 3, 4, 7, 8, 9, 10, 15, 16, 17, 30, 34, 100], size=k)
    # deep cells (Smart-seq-like): every count above the encoder's small counts, many exact ties
    dense[:3][dense[:3] > 0] = rng.choice([17, 34, 51, 68], size=int((dense[:3] > 0).sum()))
    x = sp.csr_matrix(dense)
    depth = dense.sum(axis=1).astype(np.float64)
    depth[::3] = 3 * depth[::3]  # ratios with many exact ties (2/6 == 1/3)
    keep = rng.random(n_cells) > 0.2
    for arithmetic in (Arithmetic(), Arithmetic.geneformer(value_dtype=np.dtype(np.float32),
                                                           depth_dtype=np.dtype(np.float32), dense=False)):
        got, lengths = rank_value_encode(x, depth=depth, medians=medians, tokens=tokens, max_genes=1000,
                                         arithmetic=arithmetic, keep=keep)
        assert (lengths[~keep] == 0).all()
        cells = _split(got, lengths[keep])
        for i, cell in zip(np.flatnonzero(keep), cells, strict=False):
            row = x.getrow(i)
            pairs = []
            for g, c in zip(row.indices, row.data, strict=False):
                if medians[g] > 0:
                    if arithmetic.reciprocal:
                        head = np.float64(np.float32(c) * (np.float32(1) / np.float32(depth[i])) * np.float32(10_000))
                        v = head * (1.0 / medians[g])
                    else:
                        v = float(c) / depth[i] * 10_000.0 / medians[g]
                    pairs.append((-v, int(tokens[g])))
            assert cell == [t for _, t in sorted(pairs)][:1000]
