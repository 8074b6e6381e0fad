"""Exact medians: equal, bit for bit, to numpy.median over the same values, for any partition."""

from __future__ import annotations

import itertools

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
        values = [float(c) / float(d) * 10_000.0 for c, d in zip(counts[sel], depth[rows][sel], strict=False)]
        if values:
            out[g] = np.median(np.array(values, dtype=np.float64))
    return out


def exact_medians(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, cuts: list[int]) -> np.ndarray:
    """The module's three passes, with the cells cut into blocks at ``cuts``, merged in order."""
    bounds = [0, *cuts, x.shape[0]]
    blocks = [(x[a:b], depth[a:b], keep[a:b]) for a, b in itertools.pairwise(bounds)]
    window = medians.GeneWindow.empty(x.shape[1])
    for xb, db, _ in blocks:
        part = medians.GeneWindow.empty(x.shape[1])
        part.add(xb, db, np.ones(xb.shape[0], bool))  # the window may be wider than the kept cells
        window.merge(part)
    shift = window.shifts()
    hist = np.zeros((x.shape[1], medians.N_BINS), dtype=np.int64)
    for xb, db, kb in blocks:
        medians.histogram_values(xb, db, kb, hist, window=window, shift=shift)
    targets = medians.MedianTargets.from_histogram(hist)
    key_lo, key_width = targets.key_range(window, shift)
    acc = medians.ValueMultiset.empty(x.shape[1])
    for xb, db, kb in blocks:  # merged block by block, as tasks are merged
        acc = acc.merge(medians.ValueMultiset.from_pairs(x.shape[1], *medians.select_in_bins(
            xb, db, kb, key_lo, key_width)))
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


# --- the selection pass: kernels against plain NumPy references, adversarial cases, merge groupings ---


def _keys(x: sp.csr_matrix, depth: np.ndarray) -> np.ndarray:
    """Each stored value's key, row by row (NumPy)."""
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    return (x.data.astype(np.float64) / depth[rows] * 10_000.0).view(np.uint64)


def reference_select(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, window: medians.GeneWindow,
                     shift: np.ndarray, targets: medians.MedianTargets) -> tuple[np.ndarray, np.ndarray]:
    """(gene, key) of the kept values whose histogram bin (last bin open upwards) is a target bin."""
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    genes = x.indices.astype(np.int64)
    keys = _keys(x, depth)
    with np.errstate(over="ignore"):
        b = np.minimum((keys - window.lo[genes]) >> shift[genes], np.uint64(medians.N_BINS - 1)).astype(np.int64)
    sel = keep[rows] & (targets.bin_lo[genes] >= 0) & (b >= targets.bin_lo[genes]) & (b <= targets.bin_hi[genes])
    return genes[sel].astype(np.int32), keys[sel]


def reference_multiset(n_genes: int, genes: np.ndarray, keys: np.ndarray,
                       counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct (gene, key) with multiplicities, as CSR over genes (NumPy)."""
    counts = np.ones(genes.shape[0], np.int64) if counts is None else counts
    pairs = np.stack([genes.astype(np.uint64), keys.astype(np.uint64)], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    summed = np.zeros(uniq.shape[0], np.int64)
    np.add.at(summed, inverse.ravel(), counts)
    indptr = np.searchsorted(uniq[:, 0], np.arange(n_genes + 1), side="left").astype(np.int64)
    return indptr, uniq[:, 1].copy(), summed


def _passes(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray
            ) -> tuple[medians.GeneWindow, np.ndarray, medians.MedianTargets]:
    window = medians.GeneWindow.empty(x.shape[1])
    window.add(x, depth, np.ones(x.shape[0], bool))
    shift = window.shifts()
    hist = np.zeros((x.shape[1], medians.N_BINS), dtype=np.int64)
    medians.histogram_values(x, depth, keep, hist, window=window, shift=shift)
    return window, shift, medians.MedianTargets.from_histogram(hist)


def _task_results(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, window: medians.GeneWindow,
                  shift: np.ndarray, targets: medians.MedianTargets, task_cuts: list[int], block: int,
                  buffer_pairs: int = medians.SELECT_BUFFER_PAIRS) -> list[medians.ValueMultiset]:
    """One :class:`ValueSelection` per task, fed block by block, as medians.selection_task does."""
    bounds = [0, *task_cuts, x.shape[0]]
    out = []
    for a, b in itertools.pairwise(bounds):
        sel = medians.ValueSelection(window, shift, targets, buffer_pairs=buffer_pairs)
        for s in range(a, b, block):
            e = min(s + block, b)
            sel.add(x[s:e], depth[s:e], keep[s:e])
        out.append(sel.result())
    return out


def _same(a: medians.ValueMultiset, b: medians.ValueMultiset) -> bool:
    return (a.indptr.tobytes() == b.indptr.tobytes() and a.keys.tobytes() == b.keys.tobytes()
            and a.counts.tobytes() == b.counts.tobytes())


def _wide_case(seed: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Genes whose middle ranks sit in the first or the last bin; spans from 0 to ~2**62."""
    rng = np.random.default_rng(seed)
    n = 171
    depth = np.exp(rng.uniform(np.log(100.0), np.log(1e5), n))
    depth[100:140] = 100.0  # the largest values
    depth[140:160] = 1e5  # the smallest values
    depth[160:] = 10.0 ** rng.uniform(-280, 280, n - 160)  # keys ~2**62 apart
    dense = np.zeros((n, 12), dtype=np.int64)
    dense[:100, 5:] = rng.poisson(rng.gamma(0.5, 3.0, size=7), size=(100, 7))
    dense[:, 0] = 1  # one count everywhere: the key is set by the depth
    dense[140:160, 1] = 1  # most values of gene 1 tied at its smallest key: first bin
    dense[10:20, 1] = 1
    dense[100:140, 2] = 1  # most values of gene 2 tied at its largest key, in the last bin: pick the
    dense[:20, 2] = 1  # depth of its smallest value so that the span's top 6 bits are all ones
    hi = np.float64(100.0).view(np.uint64)
    cands = np.geomspace(1e5, 1e9, 400_001)
    spans = hi - (1.0 / cands * 10_000.0).view(np.uint64)
    top6 = spans >> (np.floor(np.log2(spans.astype(np.float64))).astype(np.uint64) - np.uint64(5))
    depth[0] = cands[np.flatnonzero(top6 == 63)[0]]
    dense[::2, 3] = 7
    dense[160:, 4] = 1
    dense[:30, 4] = 2
    keep = rng.random(n) > 0.1
    keep[100:160] = True
    return sp.csr_matrix(dense), depth, keep


@pytest.mark.parametrize("seed", range(3))
def test_select_kernel_matches_numpy_reference(seed: int) -> None:
    for x, depth, keep in (_random_case(seed), _wide_case(seed)):
        window, shift, targets = _passes(x, depth, keep)
        if x.shape[1] == 12:  # the wide case
            assert targets.bin_lo[1] == 0 and targets.bin_hi[2] == medians.N_BINS - 1
            assert shift[4] >= 55
        key_lo, key_width = targets.key_range(window, shift)
        genes, keys = medians.select_in_bins(x, depth, keep, key_lo, key_width)
        ref_genes, ref_keys = reference_select(x, depth, keep, window, shift, targets)
        np.testing.assert_array_equal(genes, ref_genes)
        np.testing.assert_array_equal(keys, ref_keys)
        # and the selected values are what the histogram counted in the target bins
        counted = np.bincount(genes, minlength=x.shape[1])
        np.testing.assert_array_equal(counted, _target_bin_counts(x, depth, keep, window, shift, targets))


def _target_bin_counts(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, window: medians.GeneWindow,
                       shift: np.ndarray, targets: medians.MedianTargets) -> np.ndarray:
    hist = np.zeros((x.shape[1], medians.N_BINS), dtype=np.int64)
    medians.histogram_values(x, depth, keep, hist, window=window, shift=shift)
    cols = np.arange(medians.N_BINS)
    mask = (cols >= targets.bin_lo[:, None]) & (cols <= targets.bin_hi[:, None]) & (targets.bin_lo[:, None] >= 0)
    return (hist * mask).sum(axis=1)


def test_multiset_kernels_match_numpy_reference() -> None:
    rng = np.random.default_rng(5)
    n_genes = 40
    parts = []
    for size in (0, 1, 500, 20_000):
        genes = rng.integers(0, n_genes, size).astype(np.int32)
        genes[genes == 17] = 18  # a gene with no entries
        keys = rng.integers(0, 60, size).astype(np.uint64) * np.uint64(2**57)  # many repeats, top bits set
        got = medians.ValueMultiset.from_pairs(n_genes, genes, keys)
        ref = reference_multiset(n_genes, genes, keys)
        for a, b in zip((got.indptr, got.keys, got.counts), ref, strict=True):
            np.testing.assert_array_equal(a, b)
        parts.append((got, genes, keys))
    merged = medians.ValueMultiset.union([p for p, _, _ in parts], n_genes)
    ref = reference_multiset(n_genes, np.concatenate([g for _, g, _ in parts]),
                             np.concatenate([k for _, _, k in parts]))
    for a, b in zip((merged.indptr, merged.keys, merged.counts), ref, strict=True):
        np.testing.assert_array_equal(a, b)
    assert merged.keys.dtype == np.uint64 and merged.counts.dtype == np.int64 and merged.indptr.dtype == np.int64


def _check_medians(x: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, *, task_cuts: list[int],
                   block: int, buffer_pairs: int = medians.SELECT_BUFFER_PAIRS) -> np.ndarray:
    window, shift, targets = _passes(x, depth, keep)
    parts = _task_results(x, depth, keep, window, shift, targets, task_cuts, block, buffer_pairs)
    got = medians.select_medians(targets, medians.ValueMultiset.union(parts, x.shape[1]))
    expected = brute_force_medians(x, depth, keep)
    assert got.tobytes() == expected.tobytes()
    return got


def test_all_values_equal() -> None:
    # one key per gene: an empty window span (shift 0), odd and even counts
    n = 1001
    x = sp.csr_matrix(np.ones((n, 3), dtype=np.int64))
    depth = np.full(n, 4096.0)
    keep = np.ones(n, bool)
    keep[0] = False  # 1000 kept: even
    got = _check_medians(x, depth, keep, task_cuts=[300, 301], block=64)
    assert (got == 10_000.0 / 4096.0).all()
    keep[1] = False  # 999 kept: odd
    _check_medians(x, depth, keep, task_cuts=[500], block=1000)


def test_one_gene_with_200k_values_in_one_bin() -> None:
    # 200,000 distinct values in one histogram bin (continuous depths in a 0.5% range, one outlier widens
    # the window): the selection holds them all and must pick the exact middle pair.
    rng = np.random.default_rng(8)
    n = 200_000
    depth = rng.uniform(20_000.0, 20_100.0, n)
    data = np.ones(n, dtype=np.int64)
    data[0] = 900
    x = sp.csr_matrix((data, np.zeros(n, dtype=np.int32), np.arange(n + 1)), shape=(n, 2))
    keep = np.ones(n, bool)
    window, shift, targets = _passes(x, depth, keep)
    assert targets.bin_lo[0] == targets.bin_hi[0]
    parts = _task_results(x, depth, keep, window, shift, targets, [70_001, 140_000], 4096, buffer_pairs=10_000)
    values = medians.ValueMultiset.union(parts, 2)
    assert len(values) > 199_000  # nearly all distinct, all in the one target bin
    got = medians.select_medians(targets, values)
    expected = np.median(data.astype(np.float64) / depth * 10_000.0)
    assert got[0].tobytes() == np.float64(expected).tobytes()
    assert np.isnan(got[1])


@pytest.mark.parametrize("n_values", [1, 2, 3, 4, 5, 6])
def test_few_values_odd_and_even(n_values: int) -> None:
    # gene 0: distinct values; gene 1: the middle pair tied; gene 2: one value only; gene 3: none
    rng = np.random.default_rng(n_values)
    n = 8
    dense = np.zeros((n, 4), dtype=np.int64)
    dense[:n_values, 0] = rng.integers(1, 40, n_values)
    dense[:n_values, 1] = 3
    dense[:n_values, 1][:: 2] = 5
    dense[0, 2] = 2
    depth = rng.uniform(50.0, 5000.0, n)
    depth[:n_values] = np.sort(depth[:n_values])
    x = sp.csr_matrix(dense)
    keep = np.ones(n, bool)
    for cuts in ([], [1], [1, 2, 3, 4, 5]):
        got = _check_medians(x, depth, keep, task_cuts=cuts, block=1)
    assert np.isfinite(got[:3]).all() and np.isnan(got[3])


def test_groupings_of_tasks_give_identical_bits() -> None:
    import pickle

    x, depth, keep = _random_case(21, n_cells=900, n_genes=50)
    window, shift, targets = _passes(x, depth, keep)
    cuts = [50, 51, 200, 333, 600, 777, 800]
    reference = None
    for block, buffer_pairs in ((1, 1), (13, 7), (1000, medians.SELECT_BUFFER_PAIRS)):
        parts = _task_results(x, depth, keep, window, shift, targets, cuts, block, buffer_pairs)
        parts = [pickle.loads(pickle.dumps(p)) for p in parts]  # tasks come back pickled
        left = medians.ValueMultiset.empty(x.shape[1])
        for p in parts:
            left = left.merge(p)
        right = medians.ValueMultiset.empty(x.shape[1])
        for p in reversed(parts):
            right = p.merge(right)
        rng = np.random.default_rng(block)
        shuffled = list(parts)
        rng.shuffle(shuffled)
        groupings = [medians.ValueMultiset.union(parts, x.shape[1]), left, right,
                     medians.ValueMultiset.union(shuffled, x.shape[1]),
                     medians.ValueMultiset.union([medians.ValueMultiset.union(parts[:3], x.shape[1]),
                                                  medians.ValueMultiset.union(parts[3:], x.shape[1])], x.shape[1]),
                     _task_results(x, depth, keep, window, shift, targets, [], x.shape[0])[0]]
        reference = reference or groupings[0]
        for g in groupings:
            assert _same(g, reference)
            got = medians.select_medians(targets, g)
            assert got.tobytes() == brute_force_medians(x, depth, keep).tobytes()


def test_selection_state_is_distinct_keys_not_values() -> None:
    # 50,000 cells drawn from 40 depths and counts 1-3: the state has at most 40 * 3 keys per gene
    rng = np.random.default_rng(2)
    n = 50_000
    dense = rng.integers(0, 4, size=(n, 5)).astype(np.int64)
    depth = rng.choice(np.arange(1000.0, 1040.0), n)
    x = sp.csr_matrix(dense)
    keep = np.ones(n, bool)
    window, shift, targets = _passes(x, depth, keep)
    parts = _task_results(x, depth, keep, window, shift, targets, [25_000], 2000)
    for p in parts:
        assert len(p) <= 5 * 40 * 3
        assert int(p.counts.sum()) > 5 * 40 * 3
    np.testing.assert_array_equal(medians.select_medians(targets, medians.ValueMultiset.union(parts, 5)),
                                  brute_force_medians(x, depth, keep))


def test_missing_values_are_detected() -> None:
    x, depth, keep = _random_case(4)
    _window, _shift, targets = _passes(x, depth, keep)
    with pytest.raises(ValueError, match="middle ranks"):
        medians.select_medians(targets, medians.ValueMultiset.empty(x.shape[1]))
