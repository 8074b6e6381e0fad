"""Per-dataset quality control (SPEC §2.3): cell statistics, mergeable moments, keep masks.

The dataset-wide mean and population SD are computed from exact sums (Python integers for counts, exact
float expansions for fractions) merged in a fixed order, so they do not depend on how the dataset was cut
into blocks or spread over workers; they are rounded to float64 once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from genecorpus.config import QCParams

__all__ = ["DROP_REASONS", "CellStats", "DatasetQC", "QCMoments", "keep_mask"]

DROP_REASONS = ("filter_pass", "n_counts_outlier", "mito_outlier", "min_genes", "no_vocab_genes")
"""Why a cell was dropped; each dropped cell is counted under the first reason that applies."""

_R_FILTER, _R_COUNTS, _R_MITO, _R_GENES, _R_VOCAB = range(5)


@dataclass(frozen=True)
class CellStats:
    """Per-cell statistics of one block.

    Attributes
    ----------
    n_counts
        Total counts over all input genes (int64).
    mito_counts
        Counts on mitochondrial genes (int64).
    n_genes
        Number of detected (count > 0) candidate genes (int64).
    preselected
        The ``filter_pass`` column, or all True (bool).
    """

    n_counts: np.ndarray
    mito_counts: np.ndarray
    n_genes: np.ndarray
    preselected: np.ndarray

    def mito_values(self, mode: str) -> np.ndarray:
        """The quantity the mitochondrial rule looks at: counts (int64) or fraction (float64)."""
        if mode == "fraction":
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = self.mito_counts / self.n_counts
            return np.where(self.n_counts > 0, frac, 0.0)
        return self.mito_counts


def _two_sum_partials(values: np.ndarray) -> list[float]:
    """Shewchuk's exact partials of a float sum (the algorithm behind ``math.fsum``)."""
    partials: list[float] = []
    for x in values.tolist():
        i = 0
        for y in partials:
            if abs(x) < abs(y):
                x, y = y, x
            hi = x + y
            lo = y - (hi - x)
            if lo:
                partials[i] = lo
                i += 1
            x = hi
        partials[i:] = [x]
    return partials


@dataclass
class _Moments:
    """Exact running count, sum and sum of squares of one statistic."""

    n: int = 0
    s1: Fraction = Fraction(0)
    s2: Fraction = Fraction(0)

    def add(self, values: np.ndarray) -> None:
        self.n += int(values.shape[0])
        if values.dtype.kind in "iu":
            if values.size and int(values.max()) < 2**24 and int(values.min()) >= 0:
                # squares < 2**48: int64 sums of chunks of 2**14 values are exact
                v = values.astype(np.int64)
                for start in range(0, v.shape[0], 2**14):
                    chunk = v[start:start + 2**14]
                    self.s1 += int(chunk.sum())
                    self.s2 += int((chunk * chunk).sum())
            else:
                v = values.astype(object)
                self.s1 += int(v.sum()) if len(v) else 0
                self.s2 += int((v * v).sum()) if len(v) else 0
        else:
            self.s1 += sum(map(Fraction, _two_sum_partials(values)), Fraction(0))
            self.s2 += sum(map(Fraction, _two_sum_partials(values * values)), Fraction(0))

    def merge(self, other: _Moments) -> None:
        self.n += other.n
        self.s1 += other.s1
        self.s2 += other.s2

    def mean_sd(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        mean = self.s1 / self.n
        var = self.s2 / self.n - mean * mean
        return float(mean), math.sqrt(max(float(var), 0.0))


@dataclass
class QCMoments:
    """Mergeable moments of n_counts and the mito statistic over the preselected cells of a dataset."""

    n_counts: _Moments = field(default_factory=_Moments)
    mito: _Moments = field(default_factory=_Moments)

    def add(self, stats: CellStats, mode: str) -> None:
        """Add the preselected cells of one block."""
        sel = stats.preselected
        self.n_counts.add(stats.n_counts[sel])
        self.mito.add(stats.mito_values(mode)[sel])

    def merge(self, other: QCMoments) -> None:
        """Add another partial result (call in a fixed order; the sums are exact anyway)."""
        self.n_counts.merge(other.n_counts)
        self.mito.merge(other.mito)


@dataclass(frozen=True)
class DatasetQC:
    """The thresholds of one dataset, fixed after its statistics pass."""

    enabled: bool
    n_sd: float
    mito_mode: str
    min_genes: int
    n_counts_mean: float
    n_counts_sd: float
    mito_rule: bool
    """False when the dataset has no mitochondrial genes (the rule is skipped)."""
    mito_mean: float
    mito_sd: float

    @classmethod
    def from_moments(cls, moments: QCMoments, params: QCParams, *, has_mito: bool) -> DatasetQC:
        """Fix the thresholds from the merged moments."""
        n_mean, n_sd = moments.n_counts.mean_sd()
        m_mean, m_sd = moments.mito.mean_sd()
        return cls(params.enabled, params.n_sd, params.mito, params.min_genes, n_mean, n_sd,
                   has_mito, m_mean, m_sd)

    def to_json(self) -> dict[str, object]:
        """Plain dict for the manifest."""
        return {
            "enabled": self.enabled,
            "n_counts_mean": self.n_counts_mean,
            "n_counts_sd": self.n_counts_sd,
            "n_counts_range": [self.n_counts_mean - self.n_sd * self.n_counts_sd,
                               self.n_counts_mean + self.n_sd * self.n_counts_sd],
            "mito_rule": self.mito_rule if self.enabled else False,
            "mito_mode": self.mito_mode,
            "mito_mean": self.mito_mean,
            "mito_sd": self.mito_sd,
            "mito_range": [self.mito_mean - self.n_sd * self.mito_sd,
                           self.mito_mean + self.n_sd * self.mito_sd],
            "min_genes": self.min_genes,
        }


def keep_mask(stats: CellStats, qc: DatasetQC) -> tuple[np.ndarray, np.ndarray]:
    """Which cells of a block pass QC, and the drop reason of each cell (-1 = kept).

    Reasons index :data:`DROP_REASONS`; the first rule a cell fails is its reason.
    """
    reason = np.full(stats.n_counts.shape[0], -1, dtype=np.int8)
    reason[~stats.preselected] = _R_FILTER
    if qc.enabled:
        bad = np.abs(stats.n_counts.astype(np.float64) - qc.n_counts_mean) > qc.n_sd * qc.n_counts_sd
        reason[(reason < 0) & bad] = _R_COUNTS
        if qc.mito_rule:
            mito = stats.mito_values(qc.mito_mode).astype(np.float64)
            bad = np.abs(mito - qc.mito_mean) > qc.n_sd * qc.mito_sd
            reason[(reason < 0) & bad] = _R_MITO
        reason[(reason < 0) & (stats.n_genes < qc.min_genes)] = _R_GENES
    return reason < 0, reason


def count_reasons(reason: np.ndarray) -> dict[str, int]:
    """Number of cells per drop reason (all reasons present, zeros included)."""
    counts = np.bincount(reason[reason >= 0].astype(np.int64), minlength=len(DROP_REASONS))
    return {name: int(c) for name, c in zip(DROP_REASONS, counts, strict=True)}


NO_VOCAB_REASON = _R_VOCAB
