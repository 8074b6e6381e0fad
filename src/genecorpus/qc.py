"""Per-dataset quality control (SPEC §2.3): the QC pass's task, mergeable moments, thresholds, keep masks.

The QC pass reads every cell once (:func:`qc_task`): it sums the moments of ``n_counts`` and of the
mitochondrial statistic over the pre-selected cells, keeps the statistics of a fixed sample of cells for
the report, and, when medians are to be computed, records each gene's value window for them
(:class:`~genecorpus.medians.GeneWindow`). The dataset-wide mean and population SD are computed from
exact sums (Python integers for counts, exact float expansions for fractions) merged in a fixed order, so
they do not depend on how the dataset was cut into blocks or spread over workers; they are rounded to
float64 once. :meth:`DatasetQC.keep_mask` then applies the rule to any block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Literal

import numpy as np

from genecorpus.corpus.manifest import DROP_REASONS, QCThresholds
from genecorpus.corpus.qc_sample import QCSample
from genecorpus.dataset import CellStats
from genecorpus.duplicates import fingerprint_cells, write_fingerprints
from genecorpus.medians import GeneWindow

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from pathlib import Path

    from genecorpus.config import QCParams
    from genecorpus.dataset import CellRange, DatasetPlan

__all__ = ["NO_VOCAB_REASON", "QC_SAMPLE_CELLS", "DatasetQC", "QCMoments", "QCPassSettings", "QCTaskResult",
           "count_reasons", "dataset_thresholds", "qc_sample", "qc_task"]

QC_SAMPLE_CELLS = 20_000
"""At most about this many cells per dataset keep their QC statistics for the report."""

(_R_FILTER, _R_COUNTS, _R_MITO, _R_GENES, _R_VOCAB, _R_PRIMARY, _R_DUPLICATE) = (
    DROP_REASONS.index(r) for r in ("filter_pass", "n_counts_outlier", "mito_outlier", "min_genes", "no_vocab_genes",
                                    "not_primary_data", "duplicate"))
NO_VOCAB_REASON = _R_VOCAB
"""Reason index of a kept cell that has no vocabulary gene (decided by the encoding pass)."""


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

    def subtract(self, other: _Moments) -> None:
        self.n -= other.n
        self.s1 -= other.s1
        self.s2 -= other.s2

    def mean_sd(self) -> tuple[float, float]:
        if self.n == 0:
            return 0.0, 0.0
        mean = self.s1 / self.n
        var = self.s2 / self.n - mean * mean
        return float(mean), math.sqrt(max(float(var), 0.0))


@dataclass
class QCMoments:
    """Mergeable moments of n_counts and the mito statistic over the selected cells of a dataset.

    Selected: pre-selected (``filter_pass`` and the other selection columns) and primary (not marked
    ``is_primary_data = False``); the card's rule looks at the dataset's own cells.
    """

    n_counts: _Moments = field(default_factory=_Moments)
    mito: _Moments = field(default_factory=_Moments)

    def add(self, stats: CellStats, mode: str) -> None:
        """Add the selected cells of one block."""
        sel = stats.selected
        self.n_counts.add(stats.n_counts[sel])
        self.mito.add(stats.mito_values(mode)[sel])

    def merge(self, other: QCMoments) -> None:
        """Add another partial result (call in a fixed order; the sums are exact anyway)."""
        self.n_counts.merge(other.n_counts)
        self.mito.merge(other.mito)

    def subtract(self, other: QCMoments) -> None:
        """Take out cells added before (duplicates): exactly as if they had never been added."""
        self.n_counts.subtract(other.n_counts)
        self.mito.subtract(other.mito)


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
    duplicates: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    """Cells (index in the dataset, ascending int64) dropped as later copies of cells of earlier datasets;
    the moments above leave them out."""

    @classmethod
    def from_moments(cls, moments: QCMoments, params: QCParams, *, has_mito: bool) -> DatasetQC:
        """Fix the thresholds from the merged moments."""
        n_mean, n_sd = moments.n_counts.mean_sd()
        m_mean, m_sd = moments.mito.mean_sd()
        return cls(params.enabled, params.n_sd, params.mito, params.min_genes, n_mean, n_sd,
                   has_mito, m_mean, m_sd)

    def to_record(self) -> QCThresholds:
        """The thresholds as the manifest records them."""
        return QCThresholds(
            enabled=self.enabled,
            n_counts_mean=self.n_counts_mean,
            n_counts_sd=self.n_counts_sd,
            n_counts_range=(self.n_counts_mean - self.n_sd * self.n_counts_sd,
                            self.n_counts_mean + self.n_sd * self.n_counts_sd),
            mito_rule=self.mito_rule if self.enabled else False,
            mito_mode=self.mito_mode,
            mito_mean=self.mito_mean,
            mito_sd=self.mito_sd,
            mito_range=(self.mito_mean - self.n_sd * self.mito_sd, self.mito_mean + self.n_sd * self.mito_sd),
            min_genes=self.min_genes,
        )

    def keep_mask(self, stats: CellStats, *, first_cell: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Which cells of a block pass QC (bool), and the drop reason of each cell (int8, -1 = kept).

        Reasons index :data:`~genecorpus.corpus.manifest.DROP_REASONS`; the first rule a cell fails is its
        reason, in the order of :data:`~genecorpus.corpus.manifest.RULE_ORDER`. ``first_cell`` is the index
        of the block's first cell in its dataset (for :attr:`duplicates`).
        """
        reason = np.full(stats.n_counts.shape[0], -1, dtype=np.int8)
        reason[~stats.preselected] = _R_FILTER
        reason[(reason < 0) & ~stats.primary] = _R_PRIMARY
        if len(self.duplicates):
            cells = np.arange(first_cell, first_cell + len(reason))
            reason[(reason < 0) & np.isin(cells, self.duplicates)] = _R_DUPLICATE
        if self.enabled:
            bad = np.abs(stats.n_counts.astype(np.float64) - self.n_counts_mean) > self.n_sd * self.n_counts_sd
            reason[(reason < 0) & bad] = _R_COUNTS
            if self.mito_rule:
                mito = stats.mito_values(self.mito_mode).astype(np.float64)
                bad = np.abs(mito - self.mito_mean) > self.n_sd * self.mito_sd
                reason[(reason < 0) & bad] = _R_MITO
            reason[(reason < 0) & (stats.n_genes < self.min_genes)] = _R_GENES
        return reason < 0, reason


def count_reasons(reason: np.ndarray) -> dict[str, int]:
    """Number of cells per drop reason (all reasons present, zeros included)."""
    counts = np.bincount(reason[reason >= 0].astype(np.int64), minlength=len(DROP_REASONS))
    return {name: int(c) for name, c in zip(DROP_REASONS, counts, strict=True)}


# ------------------------------------------------------------------------------------------- the pass


@dataclass
class QCTaskResult:
    """What the QC pass learns from one task's cells."""

    moments: QCMoments
    window: GeneWindow
    """Each gene's value range over the task's kept-for-medians cells (empty when medians are given)."""
    sample: CellStats | None = None
    """The statistics of the task's sampled cells (every ``ceil(n_cells / QC_SAMPLE_CELLS)``-th cell)."""


@dataclass(frozen=True)
class QCPassSettings:
    """What every task of the QC pass needs."""

    block_size: int
    """Cells read at a time (never changes a result)."""
    mito_mode: Literal["counts", "fraction"]
    """The statistic of the mitochondrial rule."""
    value_window: bool
    """Also record each gene's value window for the medians (of the datasets that feed them)."""
    fingerprint_groups: np.ndarray | None = None
    """Fingerprint the cells for duplicate detection with these gene groups (:func:`genecorpus.duplicates.gene_groups`);
    None: do not."""


def qc_task(plan: DatasetPlan, cells: CellRange, settings: QCPassSettings, fingerprints: Path | None = None,
            ) -> QCTaskResult:
    """The QC pass over one range of a dataset's cells (runs in a worker).

    With ``settings.fingerprint_groups``, the selected cells' fingerprints are written to ``fingerprints``.
    """
    moments = QCMoments()
    keys = []
    window = GeneWindow.empty(plan.n_genes if settings.value_window else 0)
    stride = -(-plan.n_cells // QC_SAMPLE_CELLS)
    samples = []
    for b in plan.read_blocks(cells.start, cells.stop, block_size=settings.block_size):
        moments.add(b.stats, settings.mito_mode)
        samples.append(b.stats.take(np.flatnonzero((np.arange(b.start, b.start + b.genes.shape[0]) % stride) == 0)))
        if settings.value_window and plan.spec.use_for_medians:
            window.add(b.genes, b.depth, b.stats.selected)
        if settings.fingerprint_groups is not None:
            keys.append(fingerprint_cells(b.genes, selected=b.stats.selected, first_cell=b.start,
                                          groups=settings.fingerprint_groups))
    if settings.fingerprint_groups is not None and fingerprints is not None:
        write_fingerprints(fingerprints, keys)
    return QCTaskResult(moments, window, CellStats.concatenate(samples) if samples else None)


def dataset_thresholds(plans: Sequence[DatasetPlan], cells: Sequence[CellRange], results: Sequence[QCTaskResult],
                       params: QCParams, *, duplicates: Mapping[int, tuple[np.ndarray, CellStats]] | None = None,
                       ) -> list[DatasetQC]:
    """Each dataset's QC thresholds from its tasks' moments, merged in task order.

    ``duplicates`` maps a dataset to the cells dropped as copies (indices, ascending, and their statistics):
    they are taken out of the moments, so the thresholds are those of the dataset without them.
    """
    out = []
    for plan in plans:
        moments = QCMoments()
        for c, r in zip(cells, results, strict=True):
            if c.dataset == plan.index:
                moments.merge(r.moments)
        rows = np.empty(0, np.int64)
        if duplicates and plan.index in duplicates:
            rows, stats = duplicates[plan.index]
            removed = QCMoments()
            removed.add(stats, params.mito)
            moments.subtract(removed)
        out.append(replace(DatasetQC.from_moments(moments, params, has_mito=bool(plan.is_mito_col.any())),
                           duplicates=rows))
    return out


def qc_sample(cells: Sequence[CellRange], results: Sequence[QCTaskResult], thresholds: Sequence[DatasetQC],
              mito_mode: str) -> QCSample | None:
    """The sampled cells' statistics with their QC verdicts, for the report (None without cells)."""
    parts = [(c.dataset, r.sample) for c, r in zip(cells, results, strict=True) if r.sample is not None]
    if not parts:
        return None
    return QCSample(
        dataset=np.concatenate([np.full(len(s.n_counts), d, dtype=np.int32) for d, s in parts]),
        n_counts=np.concatenate([s.n_counts for _, s in parts]),
        mito=np.concatenate([s.mito_values(mito_mode).astype(np.float64) for _, s in parts]),
        n_genes=np.concatenate([s.n_genes for _, s in parts]),
        # the sample knows no cell indices: copies dropped as duplicates show as QC sees them
        reason=np.concatenate([replace(thresholds[d], duplicates=np.empty(0, np.int64)).keep_mask(s)[1]
                               for d, s in parts]),
    )
