"""Cells published twice, found from their counts: fingerprints, candidate pairs, verification, the drop rule.

Re-publication changes barcodes, gene order, gene identifiers (symbols ↔ Ensembl IDs), drops rare or
mitochondrial genes and adds others, but it leaves the counts of the genes that remain. So:

1. **Fingerprints** (in the QC pass, :func:`fingerprint_cells`, a Numba kernel): a selected cell's genes
   of the universe (Ensembl IDs, so identifier changes do not matter) other than mitochondrial ones, by
   count descending, give up to 8 keys (64-bit hashes of the genes and their exact counts): one per
   gene group (the genes are dealt into ``BANDS`` groups by a hash; the group's first ``GENES_PER_BAND``
   genes, when the last has a count of at least ``MIN_BAND_COUNT``) and one per ``k`` in ``TOPS`` (the
   cell's first ``k`` genes, when no other gene ties with the k-th: then the set does not depend on
   which low genes a copy lacks). A cell's highest genes are common genes, which gene filters keep; a
   gene missing from one copy, or a count that differs, breaks only the keys it is in, and any one key
   that still agrees makes the pair a candidate. The cell's *sketch* (its ``SKETCH_GENES`` highest genes
   and counts) is kept too. Each QC task writes its keys, sorted, and sketches to the work folder.
2. **Candidates** (:func:`candidate_task`, one task per key range, through the executor): the keys of every
   task that fall in the range are read (memory-mapped: a task holds one range of all keys, never all of
   them), and cells that share a key are pairs. A key shared by more than ``MAX_KEY_CELLS`` cells says
   nothing about identity (very shallow cells) and is skipped, and counted. A pair is a candidate when
   its sketches agree (:func:`sketches_agree`): distinct cells of one cell type often share a key, and
   their sketches tell them apart without reading the data again.
3. **Verification** (:func:`cells_task` reads the candidate cells again; :func:`verify_pairs`): on the genes
   both datasets have (mitochondrial genes left out), with ``n`` the genes nonzero in either cell, a pair
   is the same cell when ``n >= MIN_SHARED_GENES`` and the genes whose counts differ number at most
   ``max(MAX_MISMATCHES, ceil(MISMATCH_FRACTION · n))``. Re-published copies differ in a few genes at most
   (columns of one symbol resolved differently); two distinct cells of hundreds of expressed genes agree on
   far fewer. Within one dataset, only identical count vectors are reported.
4. **The rule** (:func:`duplicate_groups`): pairs in different datasets join groups; in each group the first
   cell in manifest order (dataset, then cell) stays and the others are dropped under ``duplicate`` (policy
   ``drop``) before QC statistics, medians and encoding, so the corpus is exactly the corpus built without
   the copies.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from genecorpus._kernels import fingerprint_csr
from genecorpus.dataset import CellStats

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from genecorpus.dataset import CellRange, DatasetPlan

__all__ = [
    "BANDS",
    "GENES_PER_BAND",
    "MAX_KEY_CELLS",
    "MIN_BAND_COUNT",
    "MIN_SHARED_GENES",
    "SKETCH_GENES",
    "TOPS",
    "CandidateSettings",
    "Candidates",
    "CellVectors",
    "PairCheck",
    "candidate_task",
    "cells_task",
    "duplicate_groups",
    "fingerprint_cells",
    "gene_groups",
    "read_fingerprints",
    "sketch_path",
    "sketches_agree",
    "verify_pair",
    "verify_pairs",
    "write_fingerprints",
]

BANDS = 4
"""Gene groups; each gives a cell one key."""
GENES_PER_BAND = 3
"""Genes (with their counts) hashed into one group key."""
TOPS = (2, 3, 4, 6)
"""Keys of the cell's first genes overall, when no other gene ties with the last (robust to filtered genes)."""
MIN_BAND_COUNT = 2
"""A key is used only when each of its genes has at least this count (shallow ties are not identity)."""
MAX_KEY_CELLS = 64
"""A key shared by more cells than this is not selective and makes no candidates."""
SKETCH_GENES = 32
"""Genes of a cell's sketch: its highest, with their counts, kept beside its keys."""
SKETCH_MIN_COMMON = 8
SKETCH_MAX_MISMATCHES = 4
"""A candidate pair goes on to verification when its sketches have at least ``SKETCH_MIN_COMMON`` genes in
common and at most ``SKETCH_MAX_MISMATCHES`` of them with other counts (distinct cells of one type share
their highest genes, with other counts)."""
MIN_SHARED_GENES = 20
"""Genes nonzero in either cell, among those both datasets have, that a verified pair needs at least."""
MAX_MISMATCHES = 2
MISMATCH_FRACTION = 0.01
"""A verified pair differs in at most ``max(MAX_MISMATCHES, ceil(MISMATCH_FRACTION · n))`` genes."""

_FINGERPRINT_DTYPE = np.dtype([("key", "<u8"), ("cell", "<i8")])
_SKETCH_DTYPE = np.dtype([("cell", "<i8"), ("genes", "<i4", (SKETCH_GENES,)), ("counts", "<i8", (SKETCH_GENES,))])


def gene_groups(n_genes: int, leave_out: np.ndarray) -> np.ndarray:
    """The group of each universe gene (0 … ``BANDS - 1``, by a fixed hash of its index), -1 for ``leave_out``."""
    group = ((np.arange(n_genes, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
             % np.uint64(BANDS)).astype(np.int64)
    group[leave_out] = -1
    return group


def fingerprint_cells(genes: sp.csr_matrix, *, selected: np.ndarray, first_cell: int,
                      groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The keys and sketches of a block's selected cells.

    Parameters
    ----------
    genes
        Cells × universe genes (int64 counts; indices need not be sorted).
    selected
        Cells to fingerprint (bool).
    first_cell
        Index of the block's first cell in its plan.
    groups
        :func:`gene_groups` of the universe: mitochondrial genes (often removed by publications) left out.

    Returns
    -------
    keys
        Records ``(key uint64, cell int64)``, cell = index in the plan; a cell has up to
        ``BANDS + len(TOPS)`` keys.
    sketches
        One record per selected cell: ``cell``, its ``SKETCH_GENES`` highest genes and their counts
        (count descending, then gene; -1 padded).
    """
    keys, sketch_genes, sketch_counts = fingerprint_csr(
        genes.data, genes.indices, genes.indptr, np.ascontiguousarray(selected, dtype=np.bool_), groups, BANDS,
        GENES_PER_BAND, np.asarray(TOPS, dtype=np.int64), MIN_BAND_COUNT, SKETCH_GENES)
    row, slot = np.nonzero(keys)
    records = np.empty(len(row), dtype=_FINGERPRINT_DTYPE)
    records["key"], records["cell"] = keys[row, slot], row + first_cell
    cells = np.flatnonzero(selected)
    sketches = np.empty(len(cells), dtype=_SKETCH_DTYPE)
    sketches["cell"] = cells + first_cell
    sketches["genes"], sketches["counts"] = sketch_genes[cells], sketch_counts[cells]
    return records, sketches


def sketch_path(path: Path) -> Path:
    """The sketch file beside a task's key file."""
    return path.with_name(path.stem + ".sketch.npy")


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)
    tmp.replace(path)


def write_fingerprints(path: Path, parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Write a task's keys sorted by (key, cell) to ``path`` and its sketches by cell beside it (each written
    whole, then renamed)."""
    records = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, dtype=_FINGERPRINT_DTYPE)
    sketches = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, dtype=_SKETCH_DTYPE)
    _save(sketch_path(path), sketches)
    _save(path, records[np.lexsort((records["cell"], records["key"]))])


def read_fingerprints(path: Path, lo: int, hi: int) -> np.ndarray:
    """The records of one task file whose keys fall in ``[lo, hi)`` (memory-mapped: only that range is read)."""
    records = np.load(path, mmap_mode="r", allow_pickle=False)
    keys = records["key"]
    a = int(np.searchsorted(keys, np.uint64(lo)))
    b = int(np.searchsorted(keys, np.uint64(hi))) if hi < 2**64 else len(keys)
    return np.array(records[a:b])


def sketches_agree(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two sketch records may be one cell (see :data:`SKETCH_MIN_COMMON`)."""
    ga, gb = a["genes"][a["genes"] >= 0], b["genes"][b["genes"] >= 0]
    common, ia, ib = np.intersect1d(ga, gb, assume_unique=True, return_indices=True)
    if len(common) < SKETCH_MIN_COMMON:
        return False
    return int((a["counts"][ia] != b["counts"][ib]).sum()) <= SKETCH_MAX_MISMATCHES


@dataclass(frozen=True)
class CandidateSettings:
    """What one candidate task reads: the fingerprint files, the dataset of each, and its key range."""

    files: tuple[tuple[str, int], ...]
    """(fingerprint file, dataset index), in task order."""
    lo: int
    hi: int
    """Keys in ``[lo, hi)``."""


@dataclass(frozen=True)
class Candidates:
    """What one candidate task found."""

    pairs: np.ndarray
    """``(n, 4)`` int64: dataset and cell of the first, dataset and cell of the second (the first earlier
    in manifest order), unique, sorted: the pairs that share a key and whose sketches agree."""
    n_key_pairs: int
    """Pairs that shared a key, before the sketches were compared."""
    n_common_keys: int
    """Keys skipped for being shared by more than :data:`MAX_KEY_CELLS` cells."""


def candidate_task(settings: CandidateSettings) -> Candidates:
    """Pairs of cells sharing a key in the task's key range whose sketches agree."""
    parts = []
    for f, (path, dataset) in enumerate(settings.files):
        rec = read_fingerprints(Path(path), settings.lo, settings.hi)
        parts.append(np.stack([rec["key"].view(np.int64), np.full(len(rec), dataset, np.int64), rec["cell"],
                               np.full(len(rec), f, np.int64)], axis=1))
    table = np.concatenate(parts) if parts else np.empty((0, 4), np.int64)
    table = table[np.lexsort((table[:, 2], table[:, 1], table[:, 0]))]
    bounds = np.flatnonzero(np.r_[True, table[1:, 0] != table[:-1, 0], True]) if len(table) else np.array([0])
    pairs, n_common = [], 0
    for a, b in itertools.pairwise(bounds):
        if b - a < 2:
            continue
        if b - a > MAX_KEY_CELLS:
            n_common += 1
            continue
        members = table[a:b, 1:]
        i, j = np.triu_indices(b - a, k=1)
        pairs.append(np.concatenate([members[i], members[j]], axis=1))
    out = np.concatenate(pairs) if pairs else np.empty((0, 6), np.int64)
    out = np.unique(out, axis=0) if len(out) else out
    sketches: dict[int, np.ndarray] = {}

    def sketch(file: int, cell: int) -> np.ndarray:
        if file not in sketches:
            sketches[file] = np.load(sketch_path(Path(settings.files[file][0])), mmap_mode="r", allow_pickle=False)
        s = sketches[file]
        return s[int(np.searchsorted(s["cell"], cell))]

    agree = np.array([sketches_agree(sketch(fa, ca), sketch(fb, cb)) for _, ca, fa, _, cb, fb in out.tolist()],
                     dtype=bool)
    kept = out[agree][:, [0, 1, 3, 4]] if len(out) else np.empty((0, 4), np.int64)
    kept = np.unique(kept, axis=0) if len(kept) else kept
    return Candidates(kept, len(np.unique(out[:, [0, 1, 3, 4]], axis=0)) if len(out) else 0, n_common)


@dataclass(frozen=True)
class CellVectors:
    """Some cells of one task, over the universe: their counts and QC statistics."""

    cells: np.ndarray
    """Index in the plan (int64), ascending."""
    counts: sp.csr_matrix
    """Cells × universe genes (int64), sorted indices."""
    stats: CellStats
    """Their QC statistics (a dropped copy is taken out of its dataset's QC moments)."""

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Genes and counts of the i-th cell (views)."""
        lo, hi = self.counts.indptr[i], self.counts.indptr[i + 1]
        return self.counts.indices[lo:hi], self.counts.data[lo:hi]


def cells_task(plan: DatasetPlan, cells: CellRange, wanted: np.ndarray, block_size: int) -> CellVectors:
    """Read the ``wanted`` cells (indices in the plan, ascending) of one range again, for verification.

    Only the blocks that hold wanted cells are read.
    """
    rows, stats, picked = [], [], []
    starts = np.arange(cells.start, cells.stop, block_size)
    for w in np.unique(np.searchsorted(starts, wanted, side="right") - 1).tolist():
        stop = min(int(starts[w]) + block_size, cells.stop)
        for block in plan.read_blocks(int(starts[w]), stop, block_size=block_size):
            inside = wanted[(wanted >= block.start) & (wanted < block.start + block.genes.shape[0])]
            local = inside - block.start
            rows.append(block.genes[local])
            stats.append(block.stats.take(local))
            picked.append(inside)
    counts = sp.vstack(rows, format="csr") if rows else sp.csr_matrix((0, plan.n_genes), dtype=np.int64)
    counts.sort_indices()
    empty = np.empty(0, np.int64)
    return CellVectors(np.concatenate(picked) if picked else empty, counts,
                       CellStats.concatenate(stats) if stats else CellStats(empty, empty, empty, np.empty(0, bool),
                                                                            np.empty(0, bool)))


@dataclass(frozen=True)
class PairCheck:
    """What verification found for one candidate pair."""

    n_shared: int
    """Genes nonzero in either cell, among the genes both datasets have (mitochondrial left out)."""
    n_mismatch: int
    """Of those, genes whose counts differ."""
    same: bool


Cell = tuple[np.ndarray, np.ndarray]
"""A cell over the universe: its genes (ascending) and their counts."""


def verify_pair(a: Cell, b: Cell, shared: np.ndarray, *, within: bool) -> PairCheck:
    """Compare two cells on the ``shared`` genes (bool over the universe).

    Within one dataset only identical count vectors are the same cell.
    """
    (ga, ca), (gb, cb) = a, b
    if within:
        identical = bool(np.array_equal(ga, gb) and np.array_equal(ca, cb))
        return PairCheck(len(ga), 0 if identical else 1, same=identical and len(ga) > 0)
    ia, va = ga[shared[ga]], ca[shared[ga]]
    ib, vb = gb[shared[gb]], cb[shared[gb]]
    genes = np.union1d(ia, ib)
    x = np.zeros(len(genes), np.int64)
    y = np.zeros(len(genes), np.int64)
    x[np.searchsorted(genes, ia)] = va
    y[np.searchsorted(genes, ib)] = vb
    n, m = len(genes), int((x != y).sum())
    allowed = max(MAX_MISMATCHES, math.ceil(MISMATCH_FRACTION * n))
    return PairCheck(n, m, same=n >= MIN_SHARED_GENES and m <= allowed)


def verify_pairs(pairs: np.ndarray, cells: Callable[[int, int], Cell],
                 shared: dict[tuple[int, int], np.ndarray]) -> tuple[np.ndarray, list[PairCheck]]:
    """Verify candidate pairs (rows ``dataset_a, cell_a, dataset_b, cell_b``).

    ``cells(dataset, cell)`` gives a cell's counts; ``shared`` maps a pair of datasets (ascending) to the
    genes both have (bool over the universe, mitochondrial left out). Returns the verified rows of
    ``pairs`` and every pair's check.
    """
    checks, same = [], []
    for da, ca, db, cb in pairs.tolist():
        check = verify_pair(cells(da, ca), cells(db, cb), shared[(min(da, db), max(da, db))], within=da == db)
        checks.append(check)
        same.append(check.same)
    return pairs[np.asarray(same, dtype=bool)] if len(pairs) else pairs, checks


def duplicate_groups(verified: np.ndarray) -> dict[tuple[int, int], tuple[int, int]]:
    """Cells to drop as later copies: ``(dataset, cell) → the (dataset, cell) that stays in their place``.

    Pairs across datasets join groups (union-find); in each group the first cell in manifest order (dataset,
    then cell) stays and the others are copies, whatever QC later decides about any of them: the corpus is
    the corpus built without the copies. Pairs within one dataset drop nothing.
    """
    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def root(c: tuple[int, int]) -> tuple[int, int]:
        while parent.setdefault(c, c) != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for da, ca, db, cb in verified.tolist():
        if da != db:
            ra, rb = root((da, ca)), root((db, cb))
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for c in list(parent):
        groups.setdefault(root(c), []).append(c)
    drop: dict[tuple[int, int], tuple[int, int]] = {}
    for members in groups.values():
        first, *later = sorted(members)
        for c in later:
            drop[c] = first
    return drop
