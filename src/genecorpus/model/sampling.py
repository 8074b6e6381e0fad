"""Which cells train and which validate, and in which batches: the held-out split and the sampler.

Both work on row numbers and the corpus's ``lengths`` array (int64, one entry per cell), never on
Python objects per cell, so they scale to corpora of tens of millions of cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["MEGABATCH_FACTOR", "CellSplit", "LengthGroupedSampler", "split_batch", "split_cells"]

MEGABATCH_FACTOR = 50
"""Cells sorted together by length = this many batches (as HF ``LengthGroupedSampler``)."""


@dataclass(frozen=True)
class CellSplit:
    """Training and validation rows of a corpus."""

    train_rows: np.ndarray
    """Rows that train (int64, ascending)."""
    val_rows: np.ndarray
    """Rows the validation metrics are computed on (int64, ascending), at most ``val_cells``."""
    by: str
    """``"dataset"`` (whole datasets held out) or ``"cell"`` (a random share of cells)."""
    val_datasets: tuple[str, ...] = ()
    """The held-out datasets when ``by == "dataset"``."""
    n_held_out: int = 0
    """Cells held out from training (``val_rows`` is a seeded sample of them if there are more)."""

    def to_dict(self) -> dict[str, Any]:
        """What the model info records about the split."""
        return {"by": self.by, "val_datasets": list(self.val_datasets), "n_train_cells": len(self.train_rows),
                "n_held_out_cells": self.n_held_out, "n_val_cells": len(self.val_rows)}


def split_cells(lengths: np.ndarray, dataset_ids: np.ndarray | None = None, *, val_fraction: float = 0.05,
                val_cells: int = 2000, seed: int = 0, hold_out: Sequence[str] = ()) -> CellSplit:
    """Hold out cells for validation: whole datasets when there are several, else random cells.

    With two or more datasets, the held-out set is a seeded choice of whole datasets, at least one and
    never all, holding at least ``val_fraction`` of the cells and close to it: datasets are visited in
    a seeded random order and taken while the held-out cells stay within twice the target; if that does
    not reach the target, the smallest remaining datasets are added. Otherwise a seeded random
    ``val_fraction`` of the cells (at least one, never all) is held out. Validation uses a seeded sample
    of at most ``val_cells`` of the held-out cells.

    Parameters
    ----------
    lengths
        Tokens per cell (int64, one entry per row); only its length is used.
    dataset_ids
        The corpus's ``dataset_id`` column, or None.
    val_fraction
        Share of the cells to hold out, in (0, 1).
    val_cells
        At most this many held-out cells are used for validation.
    seed
        Same seed, same split.
    hold_out
        The datasets to hold out, chosen by the user instead of the seeded choice (``val_fraction`` is then
        not used).

    Raises
    ------
    ConfigError
        ``val_fraction`` outside (0, 1), a corpus of fewer than two cells, or ``hold_out`` naming a dataset
        the corpus does not have, or all of them.

    Examples
    --------
    >>> import numpy as np
    >>> split = split_cells(np.ones(100, np.int64), np.array(["a"] * 90 + ["b"] * 10, dtype=object))
    >>> split.val_datasets, len(split.train_rows)
    (('b',), 90)
    """
    n = len(lengths)
    if not 0 < val_fraction < 1:
        msg = f"--val-fraction {val_fraction}: must be between 0 and 1 (e.g. 0.05)"
        raise ConfigError(msg)
    if n < 2:
        msg = f"the corpus has {n} cell(s); training and validation need at least two"
        raise ConfigError(msg)
    rng = np.random.default_rng([seed, 0x5EED])
    target = max(1, math.ceil(val_fraction * n))
    names: tuple[str, ...] = ()
    unique: np.ndarray = np.empty(0)
    if dataset_ids is not None:
        unique, codes, sizes = np.unique(np.asarray(dataset_ids).astype(str), return_inverse=True,
                                         return_counts=True)
    if hold_out:
        known = {str(u): k for k, u in enumerate(unique)}
        missing = [d for d in hold_out if d not in known]
        if missing or len(set(hold_out)) >= len(unique):
            msg = (f"--hold-out-datasets {','.join(hold_out)}: " + (
                f"the corpus has no dataset {missing[0]!r}" if missing else "that is every dataset of the corpus")
                + f"; its datasets: {', '.join(map(str, unique)) or 'none (no dataset_id column)'}")
            raise ConfigError(msg)
        is_val = np.isin(codes, [known[d] for d in hold_out])
        by = "dataset"
        names = tuple(sorted(set(hold_out)))
    elif len(unique) >= 2:
        held: list[int] = []
        n_held = 0
        for k in rng.permutation(len(unique)):
            if n_held < target and n_held + sizes[k] <= 2 * target and len(held) < len(unique) - 1:
                held.append(int(k))
                n_held += int(sizes[k])
        for k in np.argsort(sizes, kind="stable"):
            if n_held >= target or len(held) == len(unique) - 1:
                break
            if int(k) not in held:
                held.append(int(k))
                n_held += int(sizes[k])
        is_val = np.isin(codes, held)
        by = "dataset"
        names = tuple(sorted(str(unique[k]) for k in held))
    else:
        is_val = np.zeros(n, dtype=bool)
        is_val[rng.choice(n, size=min(target, n - 1), replace=False)] = True
        by = "cell"
    held_rows = np.flatnonzero(is_val).astype(np.int64)
    val_rows = held_rows
    if len(held_rows) > val_cells:
        val_rows = np.sort(rng.choice(held_rows, size=val_cells, replace=False))
    return CellSplit(np.flatnonzero(~is_val).astype(np.int64), val_rows, by, names, len(held_rows))


@dataclass
class LengthGroupedSampler:
    """Batches of rows of similar length, every row exactly once per epoch; resumable.

    Each epoch (seeded by ``(seed, epoch)``): shuffle the rows, cut them into mega-batches of
    ``MEGABATCH_FACTOR × batch_size``, sort each mega-batch by length (longest first), cut the result
    into batches and shuffle the order of the batches. Only the last batch of an epoch can be smaller.
    ``epoch`` and ``position`` (batches of the epoch already handed out) are the whole state.

    Examples
    --------
    >>> import numpy as np
    >>> sampler = LengthGroupedSampler(np.arange(10), np.arange(10) * 10, batch_size=4)
    >>> sorted(len(b) for b in sampler.epoch_batches(0))
    [2, 4, 4]
    """

    rows: np.ndarray
    """Rows to sample (int64)."""
    lengths: np.ndarray
    """Length of each of ``rows`` (int64, same shape)."""
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0
    _cache: tuple[int, list[np.ndarray]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            msg = f"--batch-size {self.batch_size}: must be at least 1"
            raise ConfigError(msg)
        if len(self.rows) == 0:
            msg = "no training cells: the corpus is empty or entirely held out"
            raise ConfigError(msg)
        self.rows = np.asarray(self.rows, dtype=np.int64)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """Batches in one epoch (the last may be smaller)."""
        return math.ceil(len(self.rows) / self.batch_size)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch, in order (arrays of rows)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.rows))
        mega = MEGABATCH_FACTOR * self.batch_size
        for start in range(0, len(order), mega):
            part = order[start:start + mega]
            order[start:start + mega] = part[np.argsort(-self.lengths[part], kind="stable")]
        batches = [self.rows[order[i:i + self.batch_size]] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def next_batch(self) -> np.ndarray:
        """The next batch of rows; advances the state (and the epoch at its end)."""
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        if self.position == len(batches):
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        """The rest of the current epoch."""
        epoch = self.epoch
        while self.epoch == epoch:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Where the sampler is: ``{"epoch", "position", "seed", "batch_size", "n_rows"}``."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "n_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` of a sampler over the same rows and settings."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "n_rows"):
            if state[key] != mine[key]:
                msg = (f"the checkpoint's sampler has {key}={state[key]}, this run {mine[key]}; "
                       "resume with the same corpus and settings")
                raise ConfigError(msg)
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def split_batch(lengths: np.ndarray, *, rank: int = 0, world_size: int = 1, grad_accum: int = 1,
                max_batch_tokens: int | None = None) -> list[np.ndarray]:
    """One process's micro-batches of a global batch: positions into the batch.

    The batch's cells are ordered by length (longest first, ties in batch order) and dealt out to the
    processes in turn — process ``rank`` takes the ``rank``-th, ``rank + world_size``-th… — so every cell
    goes to exactly one process and every process gets cells of every length. A process's share is cut
    into ``grad_accum`` micro-batches of consecutive lengths and, with ``max_batch_tokens``, each of those
    further (greedily, longest first) so that cells × longest cell stays within it (a single cell longer
    than the budget is a micro-batch of its own). Each micro-batch lists its positions in batch order, so
    one process without accumulation or budget gets ``[arange(n)]``: the batch as it is.

    Parameters
    ----------
    lengths
        Tokens each cell of the batch has after truncation (int, one entry per cell).
    rank, world_size
        This process and the number of processes.
    grad_accum
        Micro-batches per process (fewer when its share has fewer cells).
    max_batch_tokens
        Most padded tokens (cells × longest cell) in one micro-batch; None: no limit.

    Returns
    -------
    list of numpy.ndarray
        int64 positions into the batch, one array per micro-batch; empty when the process has no cell
        (a short last batch of an epoch with fewer cells than processes).

    Examples
    --------
    >>> import numpy as np
    >>> lengths = np.array([9, 8, 7, 6, 5, 4, 3])
    >>> [p.tolist() for p in split_batch(lengths, rank=1, world_size=2)]
    [[1, 3, 5]]
    >>> [p.tolist() for p in split_batch(lengths, rank=0, world_size=2, grad_accum=2)]
    [[0, 2], [4, 6]]
    >>> [p.tolist() for p in split_batch(lengths, max_batch_tokens=16)]
    [[0], [1, 2], [3, 4], [5, 6]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    share = order[rank::world_size]
    parts = [part for part in np.array_split(share, max(1, grad_accum)) if len(part)]
    if max_batch_tokens is not None:
        parts = [piece for part in parts for piece in _within_budget(part, lengths, max_batch_tokens)]
    return [np.sort(part).astype(np.int64) for part in parts]


def _within_budget(part: np.ndarray, lengths: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut ``part`` (positions, longest first) into runs whose cells × first cell's length ≤ ``max_tokens``."""
    pieces, start = [], 0
    while start < len(part):
        longest = max(1, int(lengths[part[start]]))
        n = max(1, max_tokens // longest)
        pieces.append(part[start:start + n])
        start += n
    return pieces
