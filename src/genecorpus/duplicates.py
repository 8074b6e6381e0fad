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
   ``max(MAX_MISMATCHES, ceil(n / 100))``. Re-published copies differ in a few genes at most
   (columns of one symbol resolved differently); two distinct cells of hundreds of expressed genes agree on
   far fewer. Within one dataset, only identical count vectors are reported.
4. **The rule** (:func:`duplicate_groups`): pairs in different datasets join groups; in each group the first
   cell in manifest order (dataset, then cell) stays and the others are dropped under ``duplicate`` (policy
   ``drop``) before QC statistics, medians and encoding, so the corpus is exactly the corpus built without
   the copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from genecorpus._kernels import compare_rows_csr, fingerprint_csr, sketch_agreement
from genecorpus.dataset import CellStats

if TYPE_CHECKING:
    from collections.abc import Sequence

    from genecorpus.dataset import CellRange, DatasetPlan

__all__ = [
    "BANDS",
    "GENES_PER_BAND",
    "MAX_KEY_CELLS",
    "MIN_BAND_COUNT",
    "MIN_SHARED_GENES",
    "RULE",
    "SKETCH_GENES",
    "TOPS",
    "CandidateSettings",
    "Candidates",
    "CellsRead",
    "PairChecks",
    "VerifySettings",
    "candidate_task",
    "cell_files",
    "cells_task",
    "duplicate_groups",
    "fingerprint_cells",
    "fingerprint_dataset",
    "gene_groups",
    "read_fingerprints",
    "sketch_path",
    "sketches_agree",
    "verify_pairs",
    "verify_task",
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
MISMATCHES_PER_100_GENES = 1
"""A verified pair differs in at most ``max(MAX_MISMATCHES, ceil(MISMATCHES_PER_100_GENES · n / 100))`` genes."""
RULE = (f"same cell when, on the genes both datasets have (mitochondrial genes left out), at least "
        f"{MIN_SHARED_GENES} genes are nonzero in either cell and at most max({MAX_MISMATCHES}, "
        f"{MISMATCHES_PER_100_GENES}% of them) differ; within a dataset, identical counts")
"""The verification rule in words (the manifest records it)."""

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


def fingerprint_dataset(plan: DatasetPlan, groups: np.ndarray, *, block_size: int = 1000,
                        ) -> tuple[tuple[np.ndarray, np.ndarray], sp.csr_matrix]:
    """Every cell of a dataset fingerprinted, and its counts, in memory: for diagnostics on small datasets.

    A build never calls this (it fingerprints block by block in its QC pass); the Kang benchmark and the
    tests compare what the rule finds with known pairs of cells.

    Returns
    -------
    (keys, sketches)
        As :func:`fingerprint_cells`, over all cells of ``plan``.
    counts
        Cells × universe genes, CSR with sorted indices (int64 counts).
    """
    parts, rows = [], []
    for block in plan.read_blocks(0, plan.n_cells, block_size=block_size):
        parts.append(fingerprint_cells(block.genes, selected=np.ones(block.genes.shape[0], bool),
                                       first_cell=block.start, groups=groups))
        rows.append(block.genes)
    counts = sp.vstack(rows, format="csr")
    counts.sort_indices()
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])), counts


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


def sketches_agree(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether pairs of sketch records (arrays of equal length) may be one cell (see :data:`SKETCH_MIN_COMMON`)."""
    common, differ = sketch_agreement(a["genes"], a["counts"], b["genes"], b["counts"])
    return (common >= SKETCH_MIN_COMMON) & (differ <= SKETCH_MAX_MISMATCHES)


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
    starts = np.flatnonzero(np.r_[True, table[1:, 0] != table[:-1, 0]]) if len(table) else np.empty(0, np.int64)
    sizes = np.diff(np.r_[starts, len(table)])
    n_common = int((sizes > MAX_KEY_CELLS).sum())
    pairs = [np.concatenate([table[starts[sizes == 2], 1:], table[starts[sizes == 2] + 1, 1:]], axis=1)]
    for a, size in zip(starts[(sizes > 2) & (sizes <= MAX_KEY_CELLS)].tolist(),
                       sizes[(sizes > 2) & (sizes <= MAX_KEY_CELLS)].tolist(), strict=True):
        i, j = np.triu_indices(size, k=1)
        pairs.append(np.concatenate([table[a + i, 1:], table[a + j, 1:]], axis=1))
    out = np.concatenate(pairs)  # dataset, cell, file of the first; the same of the second
    out = np.unique(out, axis=0) if len(out) else out
    first = np.empty(len(out), dtype=_SKETCH_DTYPE)
    second = np.empty(len(out), dtype=_SKETCH_DTYPE)
    for f, (path, _) in enumerate(settings.files):
        ends = (out[:, 2] == f, out[:, 5] == f)
        if not (ends[0].any() or ends[1].any()):
            continue
        sketches = np.load(sketch_path(Path(path)), mmap_mode="r", allow_pickle=False)
        for target, end, cell in ((first, ends[0], 1), (second, ends[1], 4)):
            target[end] = sketches[np.searchsorted(sketches["cell"], out[end, cell])]
    kept = out[sketches_agree(first, second)][:, [0, 1, 3, 4]] if len(out) else np.empty((0, 4), np.int64)
    return Candidates(kept, len(out), n_common)


_CELL_FILES = ("cells.npy", "indptr.npy", "indices.bin", "data.bin")


def cell_files(folder: Path) -> tuple[Path, ...]:
    """The files a :func:`cells_task` writes into its folder: cell ids and row pointers (``.npy``, int64),
    then the CSR's column indices (raw little-endian int32) and counts (raw little-endian int64)."""
    return tuple(folder / name for name in _CELL_FILES)


@dataclass(frozen=True)
class CellsRead:
    """The candidate cells of one range, read again (their counts are in the task's folder)."""

    cells: np.ndarray
    """Index in the plan (int64), ascending."""
    stats: CellStats
    """Their QC statistics (a dropped copy is taken out of its dataset's QC moments)."""


def cells_task(plan: DatasetPlan, cells: CellRange, wanted: np.ndarray, block_size: int, folder: Path) -> CellsRead:
    """Read the ``wanted`` cells (indices in the plan, ascending) of one range again, for verification.

    Only the blocks that hold wanted cells are read, and their cells' counts over the universe (CSR rows,
    sorted indices) are streamed to ``folder`` (:func:`cell_files`), one block in memory at a time, for the
    verification tasks, which memory-map them.
    """
    ids_path, indptr_path, indices_path, data_path = cell_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lengths, stats, picked = [], [], []
    starts = np.arange(cells.start, cells.stop, block_size)
    tmp = [p.with_name(p.name + ".tmp") for p in (indices_path, data_path)]
    with tmp[0].open("wb") as indices_out, tmp[1].open("wb") as data_out:  # streamed: one block in memory
        for w in np.unique(np.searchsorted(starts, wanted, side="right") - 1).tolist():
            stop = min(int(starts[w]) + block_size, cells.stop)
            for block in plan.read_blocks(int(starts[w]), stop, block_size=block_size):
                inside = wanted[(wanted >= block.start) & (wanted < block.start + block.genes.shape[0])]
                local = inside - block.start
                rows = block.genes[local]
                rows.sort_indices()
                indices_out.write(rows.indices.astype("<i4").tobytes())
                data_out.write(rows.data.astype("<i8").tobytes())
                lengths.append(np.diff(rows.indptr))
                stats.append(block.stats.take(local))
                picked.append(inside)
    for t, path in zip(tmp, (indices_path, data_path), strict=True):
        t.replace(path)
    empty = np.empty(0, np.int64)
    ids = np.concatenate(picked) if picked else empty
    indptr = np.r_[0, np.cumsum(np.concatenate(lengths))] if lengths else np.zeros(1)
    _save(indptr_path, indptr.astype(np.int64))
    _save(ids_path, ids)
    return CellsRead(ids, CellStats.concatenate(stats) if stats else CellStats(empty, empty, empty, np.empty(0, bool),
                                                                              np.empty(0, bool)))


def _raw(path: Path, dtype: str) -> np.ndarray:
    """A raw array file, memory-mapped (an empty file is an empty array)."""
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.empty(0, dtype)


def _gather(folder: Path, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the stored cells ``wanted`` (ids), as (lengths, indices, data), copied out of the memory map."""
    ids_path, indptr_path, indices_path, data_path = cell_files(folder)
    ids, indptr = (np.load(p, mmap_mode="r", allow_pickle=False) for p in (ids_path, indptr_path))
    indices, data = _raw(indices_path, "<i4"), _raw(data_path, "<i8")
    at = np.searchsorted(ids, wanted)
    lo, hi = np.asarray(indptr[at]), np.asarray(indptr[at + 1])
    lengths = hi - lo
    take = np.repeat(lo - np.r_[0, np.cumsum(lengths)[:-1]], lengths) + np.arange(int(lengths.sum()))
    return lengths, np.asarray(indices[take]), np.asarray(data[take])


@dataclass(frozen=True)
class VerifySettings:
    """One verification task: candidate pairs, where their cells are stored, and the genes to compare."""

    pairs: np.ndarray
    """``(n, 4)`` int64: dataset and cell of each end."""
    folders: tuple[str, ...]
    """Folders written by :func:`cells_task`."""
    stored_in: np.ndarray
    """``(n, 2)`` int64: the folder (index into ``folders``) of each end."""
    shared: dict[tuple[int, int], np.ndarray]
    """Genes compared per pair of datasets (see :func:`verify_pairs`)."""
    n_genes: int


def verify_task(settings: VerifySettings) -> PairChecks:
    """Verify a chunk of candidate pairs, reading only their cells from the stored folders."""
    pairs, n = settings.pairs, len(settings.pairs)
    ends = np.concatenate([pairs[:, [0, 1]], pairs[:, [2, 3]]])  # first ends, then second ends
    where = np.concatenate([settings.stored_in[:, 0], settings.stored_in[:, 1]])
    lengths = np.zeros(2 * n, np.int64)
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for f in np.unique(where).tolist():
        mine = np.flatnonzero(where == f)
        lens, idx, val = _gather(Path(settings.folders[f]), ends[mine, 1])
        lengths[mine] = lens
        parts[f] = (idx, val)
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    indices = np.empty(indptr[-1], np.int32)
    data = np.empty(indptr[-1], np.int64)
    for f, (idx, val) in parts.items():
        mine = np.flatnonzero(where == f)
        pos = np.repeat(indptr[mine], lengths[mine]) + (np.arange(len(idx)) - np.repeat(
            np.r_[0, np.cumsum(lengths[mine])[:-1]], lengths[mine]))
        indices[pos], data[pos] = idx, val
    counts = sp.csr_matrix((data, indices, indptr), shape=(2 * n, settings.n_genes))
    return verify_pairs(pairs, counts, np.stack([np.arange(n), n + np.arange(n)], axis=1), settings.shared)[1]


@dataclass(frozen=True)
class PairChecks:
    """What verification found for candidate pairs (one entry per pair)."""

    n_shared: np.ndarray
    """Genes nonzero in either cell, among the genes both datasets have (mitochondrial left out); within one
    dataset, among all genes (int64)."""
    n_mismatch: np.ndarray
    """Of those, genes whose counts differ (int64)."""
    same: np.ndarray
    """The pair is one cell (bool)."""


def verify_pairs(pairs: np.ndarray, counts: sp.csr_matrix, rows: np.ndarray,
                 shared: dict[tuple[int, int], np.ndarray]) -> tuple[np.ndarray, PairChecks]:
    """Verify candidate pairs (rows ``dataset_a, cell_a, dataset_b, cell_b``).

    ``counts`` holds the cells over the universe (sorted indices), ``rows`` the row of each pair's two cells
    in it (``(n, 2)`` int64); ``shared`` maps a pair of datasets (ascending) to the genes both have (bool
    over the universe, mitochondrial left out; within one dataset, all genes). Returns the verified rows
    of ``pairs`` and every pair's check. Across datasets a pair is one cell when ``n >= MIN_SHARED_GENES``
    and at most ``max(MAX_MISMATCHES, ceil(MISMATCHES_PER_100_GENES · n / 100))`` genes differ; within one
    dataset, when its counts are identical.
    """
    order = sorted(shared)
    masks = np.stack([shared[k] for k in order]) if order else np.zeros((1, counts.shape[1]), bool)
    index = {k: i for i, k in enumerate(order)}
    mask_of_pair = np.array([index[(min(a, b), max(a, b))] for a, b in pairs[:, [0, 2]].tolist()], dtype=np.int64)
    union, differ = compare_rows_csr(counts.indptr, counts.indices, counts.data, rows[:, 0].astype(np.int64),
                                     rows[:, 1].astype(np.int64), masks, mask_of_pair)
    allowed = np.maximum(MAX_MISMATCHES, -(-union * MISMATCHES_PER_100_GENES // 100))
    same = np.where(pairs[:, 0] == pairs[:, 2], (differ == 0) & (union > 0),
                    (union >= MIN_SHARED_GENES) & (differ <= allowed))
    return pairs[same], PairChecks(union, differ, same)


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
