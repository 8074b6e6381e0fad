"""Exact corpus-wide nonzero medians per gene in bounded memory (SPEC §2.4).

A value is ``count / n_counts * 10,000`` in float64. Positive float64 values order like their bit
patterns read as uint64 ("keys"), so the median is selected on integer keys in three mergeable steps:

1. **window** (during the QC statistics pass): each gene's smallest and largest key;
2. **histogram** pass: per gene, counts in :data:`N_BINS` bins ``(key - lo) >> shift`` over its window;
   the bins that hold the middle rank(s) are found from the merged counts;
3. **selection** pass: the values that fall in those bins only, kept as a multiset — per gene, the
   *distinct* keys with their multiplicities (:class:`ValueMultiset`, collapsed block by block); the
   middle value(s) are picked exactly, and for an even count their mean ``(a + b) / 2`` is taken, as
   ``numpy.median`` does.

Every partial result is an integer count or a canonical multiset, so any partition of the cells into
blocks and tasks gives the same bits. Memory is ``n_genes * N_BINS`` counters plus the distinct keys that
land in the selected bins. A key is a function of (count, n_counts), so their number is bounded by the
distinct (count, n_counts) combinations in a narrow range of values, not by the number of cells.

The passes' tasks (:func:`histogram_task`, :func:`selection_task`) read the cells that QC keeps in
datasets that feed the medians; the build folds their results in task order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genecorpus import _kernels

if TYPE_CHECKING:
    from collections.abc import Sequence

    import scipy.sparse as sp

    from genecorpus.dataset import CellRange, DatasetPlan
    from genecorpus.qc import DatasetQC

__all__ = [
    "N_BINS", "GeneWindow", "HistogramSettings", "MedianTargets", "SelectionSettings", "ValueMultiset",
    "ValueSelection", "add_histograms", "histogram_task", "select_medians", "selection_task",
]

N_BINS = 64
"""Histogram bins per gene in the first median pass (64 × 4 bytes × 22k genes fits a CPU cache)."""

_EMPTY_LO = np.iinfo(np.uint64).max


@dataclass
class GeneWindow:
    """Running per-gene minimum and maximum value key (uint64); a gene never seen has lo > hi."""

    lo: np.ndarray
    hi: np.ndarray

    @classmethod
    def empty(cls, n_genes: int) -> GeneWindow:
        """A window that holds nothing yet."""
        return cls(np.full(n_genes, _EMPTY_LO, dtype=np.uint64), np.zeros(n_genes, dtype=np.uint64))

    def add(self, counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray) -> None:
        """Widen the window with the values of the kept cells of a block (cells × genes counts)."""
        _kernels.value_window_csr(counts.data, counts.indices, counts.indptr, depth, keep, self.lo, self.hi)

    def merge(self, other: GeneWindow) -> None:
        """Combine with another partial window."""
        np.minimum(self.lo, other.lo, out=self.lo)
        np.maximum(self.hi, other.hi, out=self.hi)

    def shifts(self) -> np.ndarray:
        """Per-gene right shift so that ``(hi - lo) >> shift < N_BINS`` (uint64)."""
        span = np.where(self.hi >= self.lo, self.hi - self.lo, 0).astype(np.uint64)
        shift = np.zeros(span.shape, dtype=np.uint64)
        big = span >= N_BINS
        # bit_length(span) - bit_length(N_BINS - 1); exact on integers, no float rounding
        bits = np.zeros(span.shape, dtype=np.int64)
        s = span.copy()
        while s.any():
            nz = s > 0
            bits[nz] += 1
            s >>= np.uint64(1)
        shift[big] = (bits[big] - int(N_BINS - 1).bit_length()).astype(np.uint64)
        return shift


def histogram_values(counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, hist: np.ndarray, *,
                     window: GeneWindow, shift: np.ndarray) -> None:
    """Count the values of the kept cells of a block in the per-gene histogram (n_genes × N_BINS, in place)."""
    _kernels.value_histogram_csr(counts.data, counts.indices, counts.indptr, depth, keep, window.lo, shift,
                                  hist)


@dataclass(frozen=True)
class MedianTargets:
    """For each gene: the bins that hold its middle rank(s) and the ranks inside them.

    ``bin_lo[g] == -1`` marks a gene without values. ``rank_lo``/``rank_hi`` are 0-based ranks counted
    from the start of ``bin_lo``.
    """

    n_values: np.ndarray
    bin_lo: np.ndarray
    bin_hi: np.ndarray
    rank_lo: np.ndarray
    rank_hi: np.ndarray

    @classmethod
    def from_histogram(cls, hist: np.ndarray) -> MedianTargets:
        """Locate the middle ranks in the merged histogram (int64, n_genes × N_BINS)."""
        n = hist.sum(axis=1)
        cum = np.cumsum(hist, axis=1)
        k_lo = (n - 1) // 2
        k_hi = n // 2
        # the first bin whose cumulative count exceeds the rank (searchsorted "right", for all genes at once)
        bin_lo = (cum <= k_lo[:, None]).sum(axis=1)
        bin_hi = (cum <= k_hi[:, None]).sum(axis=1)
        before = np.where(bin_lo > 0, np.take_along_axis(cum, np.maximum(bin_lo - 1, 0)[:, None], 1)[:, 0], 0)
        absent = n == 0
        bin_lo = np.where(absent, -1, bin_lo).astype(np.int64)
        bin_hi = np.where(absent, -1, bin_hi).astype(np.int64)
        return cls(n, bin_lo, bin_hi, k_lo - before, k_hi - before)

    def key_range(self, window: GeneWindow, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The keys of each gene's target bins: ``key - key_lo <= key_width`` in uint64 (wrapping) arithmetic.

        For keys in the gene's window, exactly those whose bin ``(key - lo) >> shift`` lies in
        ``[bin_lo, bin_hi]`` (the last bin open upwards, as the histogram clamps to it); a gene without
        values selects nothing.
        """
        present = self.bin_lo >= 0
        b_lo = np.where(present, self.bin_lo, 0).astype(np.uint64)
        b_hi = np.where(present, self.bin_hi, 0).astype(np.uint64)
        top = np.iinfo(np.uint64).max
        # bin_lo holds a value, so lo + (bin_lo << shift) <= that value's key: no overflow; below the last
        # bin, (bins << shift) <= 63 << 58 < 2**64 (shift <= 58 since the span is < 2**64).
        key_lo = np.where(present, window.lo + (b_lo << shift), top).astype(np.uint64)
        last = b_hi == N_BINS - 1
        key_width = np.where(last, top - key_lo,
                             ((np.where(last, 0, b_hi - b_lo) + np.uint64(1)) << shift) - np.uint64(1))
        key_width[~present] = 0
        return key_lo, key_width.astype(np.uint64)


@dataclass
class ValueMultiset:
    """Per gene, the distinct value keys (ascending) with their multiplicities, as CSR arrays over genes.

    The layout is canonical (sorted, no repeated key), so merging any partition of the same values in any
    grouping gives identical arrays. Its size is the number of distinct keys, whatever the number of cells.
    """

    indptr: np.ndarray
    """int64, n_genes + 1: gene ``g`` owns entries ``indptr[g]:indptr[g + 1]``."""
    keys: np.ndarray
    """uint64, ascending within each gene."""
    counts: np.ndarray
    """int64 multiplicity of each key (at least 1)."""

    @classmethod
    def empty(cls, n_genes: int) -> ValueMultiset:
        """A multiset over ``n_genes`` genes that holds nothing."""
        return cls(np.zeros(n_genes + 1, np.int64), np.empty(0, np.uint64), np.empty(0, np.int64))

    @classmethod
    def from_pairs(cls, n_genes: int, genes: np.ndarray, keys: np.ndarray) -> ValueMultiset:
        """Collapse (gene index, key) pairs, each one value."""
        if genes.shape[0] and (int(genes.min()) < 0 or int(genes.max()) >= n_genes):
            msg = f"gene index out of range [0, {n_genes})"
            raise ValueError(msg)
        return cls(*_kernels.value_pairs_to_csr(n_genes, np.ascontiguousarray(genes, dtype=np.int32),
                                                 np.ascontiguousarray(keys, dtype=np.uint64)))

    @property
    def n_genes(self) -> int:
        """Number of genes the multiset is laid out over."""
        return int(self.indptr.shape[0] - 1)

    def __len__(self) -> int:
        """Number of distinct (gene, key) entries."""
        return int(self.keys.shape[0])

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return int(self.indptr.nbytes + self.keys.nbytes + self.counts.nbytes)

    def merge(self, other: ValueMultiset) -> ValueMultiset:
        """Union with multiplicities added (a linear merge per gene)."""
        if self.n_genes != other.n_genes:
            msg = f"cannot merge multisets over {self.n_genes} and {other.n_genes} genes"
            raise ValueError(msg)
        if not len(other):
            return self
        if not len(self):
            return other
        return ValueMultiset(*_kernels.value_merge_csr(self.indptr, self.keys, self.counts,
                                                        other.indptr, other.keys, other.counts))

    @classmethod
    def union(cls, parts: Sequence[ValueMultiset], n_genes: int) -> ValueMultiset:
        """Union of several multisets over ``n_genes`` genes, merged pairwise as a balanced tree."""
        level = list(parts)
        if not level:
            return cls.empty(n_genes)
        while len(level) > 1:
            level = [level[i].merge(level[i + 1]) if i + 1 < len(level) else level[i]
                     for i in range(0, len(level), 2)]
        if level[0].n_genes != n_genes:
            msg = f"multisets over {level[0].n_genes} genes, expected {n_genes}"
            raise ValueError(msg)
        return level[0]


def select_in_bins(counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, key_lo: np.ndarray,
                   key_width: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The values of the kept cells of a block that fall in each gene's target bins.

    ``key_lo``/``key_width`` come from :meth:`MedianTargets.key_range`. Returns unsorted (gene index
    int32, key uint64) pairs, one per value; :class:`ValueSelection` collapses them into a
    :class:`ValueMultiset`.
    """
    return _kernels.value_select_csr(counts.data, counts.indices, counts.indptr, depth, keep, key_lo, key_width)


SELECT_BUFFER_PAIRS = 1 << 21
"""Selected pairs (12 bytes each) buffered before they are collapsed into the running multiset, at least."""


class ValueSelection:
    """The selection pass over one task: block by block, the values in the target bins, as a multiset.

    Pairs are buffered until there are as many as the multiset has entries (and at least
    ``buffer_pairs``), then collapsed and merged in, so the work stays linear in the number of values and
    memory stays proportional to the number of distinct keys.
    """

    def __init__(self, window: GeneWindow, shift: np.ndarray, targets: MedianTargets, *,
                 buffer_pairs: int = SELECT_BUFFER_PAIRS) -> None:
        self.key_lo, self.key_width = targets.key_range(window, shift)
        self.buffer_pairs = buffer_pairs
        self.values = ValueMultiset.empty(targets.n_values.shape[0])
        self._genes: list[np.ndarray] = []
        self._keys: list[np.ndarray] = []
        self._buffered = 0

    def add(self, counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray) -> None:
        """Select the values of the kept cells of a block (cells × genes counts)."""
        genes, keys = select_in_bins(counts, depth, keep, self.key_lo, self.key_width)
        if genes.shape[0]:
            self._genes.append(genes)
            self._keys.append(keys)
            self._buffered += genes.shape[0]
        if self._buffered >= max(self.buffer_pairs, len(self.values)):
            self._flush()

    def _flush(self) -> None:
        if not self._buffered:
            return
        genes = self._genes[0] if len(self._genes) == 1 else np.concatenate(self._genes)
        keys = self._keys[0] if len(self._keys) == 1 else np.concatenate(self._keys)
        self._genes, self._keys, self._buffered = [], [], 0
        self.values = self.values.merge(ValueMultiset.from_pairs(self.values.n_genes, genes, keys))

    def result(self) -> ValueMultiset:
        """Everything selected so far."""
        self._flush()
        return self.values


def select_medians(targets: MedianTargets, values: ValueMultiset) -> np.ndarray:
    """Exact nonzero median per gene (float64; NaN for a gene without values)."""
    out, missing = _kernels.value_median_csr(values.indptr, values.keys, values.counts,
                                              np.ascontiguousarray(targets.n_values, dtype=np.int64),
                                              np.ascontiguousarray(targets.rank_lo, dtype=np.int64),
                                              np.ascontiguousarray(targets.rank_hi, dtype=np.int64))
    if missing >= 0:
        msg = (f"gene {missing}: the selected values do not hold its middle ranks "
               "(selection and histogram passes saw different values)")
        raise ValueError(msg)
    return out


# ------------------------------------------------------------------------------------------- the passes


@dataclass(frozen=True)
class HistogramSettings:
    """What every task of the histogram pass needs."""

    block_size: int
    """Cells read at a time (never changes a result)."""
    window: GeneWindow
    shift: np.ndarray
    """Per gene, the right shift that maps its window onto :data:`N_BINS` bins (int64)."""


def histogram_task(plan: DatasetPlan, cells: CellRange, qc: DatasetQC, settings: HistogramSettings) -> np.ndarray:
    """The histogram pass over one range of a dataset's cells: genes × :data:`N_BINS` counts (int32)."""
    # int32 keeps the table small enough for the CPU cache (a task has far fewer than 2**31 cells)
    hist = np.zeros((plan.n_genes, N_BINS), dtype=np.int32)
    for b in plan.read_blocks(cells.start, cells.stop, block_size=settings.block_size):
        keep = qc.keep_mask(b.stats, first_cell=b.start)[0]
        histogram_values(b.genes, b.depth, keep, hist, window=settings.window, shift=settings.shift)
    return hist


def add_histograms(acc: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Fold one task's histogram into the running total (in place; int64 total)."""
    acc += part
    return acc


@dataclass(frozen=True)
class SelectionSettings:
    """What every task of the selection pass needs."""

    block_size: int
    """Cells read at a time (never changes a result)."""
    window: GeneWindow
    shift: np.ndarray
    targets: MedianTargets


def selection_task(plan: DatasetPlan, cells: CellRange, qc: DatasetQC, settings: SelectionSettings) -> ValueMultiset:
    """The selection pass over one range of a dataset's cells: the values in each gene's target bins."""
    selection = ValueSelection(settings.window, settings.shift, settings.targets)
    for b in plan.read_blocks(cells.start, cells.stop, block_size=settings.block_size):
        selection.add(b.genes, b.depth, qc.keep_mask(b.stats, first_cell=b.start)[0])
    return selection.result()
