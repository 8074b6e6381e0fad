"""Exact corpus-wide nonzero medians per gene in bounded memory (SPEC §2.4).

A value is ``count / n_counts * 10,000`` in float64. Positive float64 values order like their bit
patterns read as uint64 ("keys"), so the median is selected on integer keys in three mergeable steps:

1. **window** (during the QC statistics pass): each gene's smallest and largest key;
2. **histogram** pass: per gene, counts in :data:`N_BINS` bins ``(key - lo) >> shift`` over its window;
   the bins that hold the middle rank(s) are found from the merged counts;
3. **selection** pass: the distinct keys (with multiplicities) that fall in those bins only; the middle
   value(s) are picked exactly, and for an even count their mean ``(a + b) / 2`` is taken, as
   ``numpy.median`` does.

Every partial result is an integer count or a multiset, so any partition of the cells into blocks and
tasks gives the same bits. Memory is ``n_genes * N_BINS`` counters plus the keys that land in the
selected bins — independent of the number of cells for a given spread of values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genecorpus import _kernels

if TYPE_CHECKING:
    import scipy.sparse as sp

__all__ = ["N_BINS", "GeneWindow", "MedianTargets", "ValueMultiset", "select_medians"]

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
        _kernels._value_window_csr(counts.data, counts.indices, counts.indptr, depth, keep, self.lo, self.hi)

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


def histogram_values(counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, window: GeneWindow,
                     shift: np.ndarray, hist: np.ndarray) -> None:
    """Count the values of the kept cells of a block in the per-gene histogram (n_genes × N_BINS, in place)."""
    _kernels._value_histogram_csr(counts.data, counts.indices, counts.indptr, depth, keep, window.lo, shift,
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
        bin_lo = np.array([np.searchsorted(c, k, side="right") for c, k in zip(cum, k_lo, strict=True)])
        bin_hi = np.array([np.searchsorted(c, k, side="right") for c, k in zip(cum, k_hi, strict=True)])
        before = np.where(bin_lo > 0, np.take_along_axis(cum, np.maximum(bin_lo - 1, 0)[:, None], 1)[:, 0], 0)
        absent = n == 0
        bin_lo = np.where(absent, -1, bin_lo).astype(np.int64)
        bin_hi = np.where(absent, -1, bin_hi).astype(np.int64)
        return cls(n, bin_lo, bin_hi, k_lo - before, k_hi - before)


@dataclass
class ValueMultiset:
    """Distinct (gene, key) pairs with multiplicities, sorted by gene then key."""

    genes: np.ndarray
    keys: np.ndarray
    counts: np.ndarray

    @classmethod
    def empty(cls) -> ValueMultiset:
        """A multiset that holds nothing."""
        return cls(np.empty(0, np.int32), np.empty(0, np.uint64), np.empty(0, np.int64))

    @classmethod
    def from_pairs(cls, genes: np.ndarray, keys: np.ndarray, counts: np.ndarray | None = None) -> ValueMultiset:
        """Collapse (gene, key) pairs, each with a multiplicity (default 1)."""
        if counts is None:
            counts = np.ones(genes.shape[0], dtype=np.int64)
        order = np.lexsort((keys, genes))
        g, k, c = genes[order], keys[order], counts[order]
        if g.shape[0] == 0:
            return cls.empty()
        start = np.ones(g.shape[0], dtype=bool)
        start[1:] = (g[1:] != g[:-1]) | (k[1:] != k[:-1])
        idx = np.flatnonzero(start)
        return cls(g[idx], k[idx], np.add.reduceat(c, idx))

    def merge(self, other: ValueMultiset) -> ValueMultiset:
        """Union with multiplicities added."""
        return ValueMultiset.union([self, other])

    @classmethod
    def union(cls, parts: list[ValueMultiset]) -> ValueMultiset:
        """Union of several multisets (one sort of everything, whatever the number of parts)."""
        if not parts:
            return cls.empty()
        return cls.from_pairs(np.concatenate([p.genes for p in parts]),
                              np.concatenate([p.keys for p in parts]),
                              np.concatenate([p.counts for p in parts]))


def select_in_bins(counts: sp.csr_matrix, depth: np.ndarray, keep: np.ndarray, window: GeneWindow,
                   shift: np.ndarray, targets: MedianTargets) -> tuple[np.ndarray, np.ndarray]:
    """The values of the kept cells of a block that fall in each gene's target bins.

    Returns unsorted (gene index int32, key uint64) pairs; collect a task's pairs and make one
    :meth:`ValueMultiset.from_pairs` of them (one sort instead of one per block).
    """
    return _kernels._value_select_csr(counts.data, counts.indices, counts.indptr, depth, keep,
                                      window.lo, shift, targets.bin_lo, targets.bin_hi)


def select_medians(targets: MedianTargets, values: ValueMultiset) -> np.ndarray:
    """Exact nonzero median per gene (float64; NaN for a gene without values)."""
    n_genes = targets.n_values.shape[0]
    out = np.full(n_genes, np.nan)
    bounds = np.searchsorted(values.genes, np.arange(n_genes + 1), side="left")
    as_float = values.keys.view(np.float64)
    for g in np.flatnonzero(targets.n_values > 0):
        a, b = bounds[g], bounds[g + 1]
        cum = np.cumsum(values.counts[a:b])
        i_lo = int(np.searchsorted(cum, targets.rank_lo[g], side="right"))
        i_hi = int(np.searchsorted(cum, targets.rank_hi[g], side="right"))
        lo, hi = as_float[a + i_lo], as_float[a + i_hi]
        out[g] = lo if i_lo == i_hi else (lo + hi) / 2.0
    return out
