"""Exact medians: equal, bit for bit, to numpy.median over the same values, for any partition."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from genecorpus import medians


def brute_force_medians(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The obvious way: list every value of every gene, numpy.median."""
    x = x.tocsc()
    out = np.full(x.shape[1], np.nan)
    for g in range(x.shape[1]):
        rows = x.indices[x.indptr[g]:x.indptr[g + 1]]
        counts = x.data[x.indptr[g]:x.indptr[g + 1]]
        sel = keep[rows]
        values = [float(c) / float(d) * 10_000.0 for c, d in zip(counts[sel], depth[rows][sel])]
        if values:
            out[g] = np.median(np.array(values, dtype=np.float64))
    return out


def exact_medians(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, cuts: list[int]) -> np.ndarray:
    """The module's three passes, with the cells cut into blocks at ``cuts``, merged in order."""
    bounds = [0, *cuts, x.shape[0]]
    blocks = [(x[a:b], depth[a:b], keep[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    window = medians.GeneWindow.empty(x.shape[1])
    for xb, db, kb in blocks:
        part = medians.GeneWindow.empty(x.shape[1])
        part.add(xb, db, np.ones(xb.shape[0], bool))  # the window may be wider than the kept cells
        window.merge(part)
    shift = window.shifts()
    hist = np.zeros((x.shape[1], medians.N_BINS), dtype=np.int64)
    for xb, db, kb in blocks:
        medians.histogram_values(xb, db, kb, window, shift, hist)
    targets = medians.MedianTargets.from_histogram(hist)
    acc = medians.ValueMultiset.empty()
    for xb, db, kb in blocks:  # merged block by block, as tasks are merged
        acc = acc.merge(medians.ValueMultiset.from_pairs(*medians.select_in_bins(xb, db, kb, window, shift,
                                                                                 targets)))
    return medians.select_medians(targets, acc)


def _random_case(seed: int, n_cells: int = 400, n_genes: int = 60) -> tuple:
    rng = np.random.default_rng(seed)
    dense = rng.poisson(rng.gamma(0.3, 2.0, size=n_genes), size=(n_cells, n_genes))
    # a gene with one value, a gene with huge counts, a gene that is always 1
    dense[:, 0] = 0
    dense[5, 0] = 3
    dense[:, 1] = rng.integers(1, 50_000, n_cells)
    dense[:, 2] = 1
    x = sp.csr_matrix(dense.astype(np.int64))
    depth = dense.sum(axis=1).astype(np.float64) + rng.integers(0, 5000, n_cells)
    keep = rng.random(n_cells) > 0.2
    return x, depth, keep


@pytest.mark.parametrize("seed", range(4))
def test_medians_equal_numpy_median_bit_for_bit(seed: int) -> None:
    x, depth, keep = _random_case(seed)
    expected = brute_force_medians(x, depth, keep)
    got = exact_medians(x, depth, keep, cuts=[])
    np.testing.assert_array_equal(got, expected)  # NaN == NaN for never-seen genes


@pytest.mark.parametrize("block", [1, 7, 1000])
def test_medians_do_not_depend_on_blocks(block: int) -> None:
    x, depth, keep = _random_case(11, n_cells=300)
    expected = brute_force_medians(x, depth, keep)
    cuts = list(range(block, x.shape[0], block))
    got = exact_medians(x, depth, keep, cuts=cuts)
    assert got.tobytes() == expected.tobytes()


def test_medians_of_even_counts_and_near_ties() -> None:
    # values that differ by one ulp, and even counts with distinct middle values
    depth = np.array([3.0, 3.0, 7.0, 7.0, 7.0 * (1 + 2**-52), 11.0])
    x = sp.csr_matrix(np.array([[1, 2], [1, 2], [1, 1], [2, 1], [1, 0], [1, 0]], dtype=np.int64))
    keep = np.ones(6, dtype=bool)
    np.testing.assert_array_equal(exact_medians(x, depth, keep, cuts=[2, 3]),
                                  brute_force_medians(x, depth, keep))


def test_many_values_in_one_bin() -> None:
    # 5,000 values in a narrow range: the selection pass must pick the exact one
    rng = np.random.default_rng(3)
    n = 5000
    depth = rng.integers(10_000, 10_050, n).astype(np.float64)
    x = sp.csr_matrix(np.ones((n, 1), dtype=np.int64))
    x[0, 0] = 900  # widen the window so that most values share a bin
    keep = np.ones(n, dtype=bool)
    np.testing.assert_array_equal(exact_medians(x, depth, keep, cuts=[1234]),
                                  brute_force_medians(x, depth, keep))
