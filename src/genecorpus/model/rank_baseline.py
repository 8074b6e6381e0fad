"""The baseline a pretrained model must beat: predict a masked gene from gene frequencies at its rank.

In a rank value encoding, position says a lot (housekeeping genes sit near the front of most cells), so
a model that learned nothing about the cell could still predict a masked gene from its position alone.
:class:`RankFrequencyBaseline` counts, over training cells, how often each gene token sits at each
position, and predicts the most frequent genes of the masked position. Positions below
``EXACT_POSITIONS`` are counted one by one; later positions share log-spaced bins
(``BINS_PER_OCTAVE`` per doubling), so the counts stay ``n_bins × vocab`` with ~100 bins for any length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Iterable

    from genecorpus.vocab import TokenDictionary

__all__ = ["BINS_PER_OCTAVE", "EXACT_POSITIONS", "RankFrequencyBaseline", "position_bins"]

EXACT_POSITIONS = 64
BINS_PER_OCTAVE = 4


def position_bins(positions: np.ndarray) -> np.ndarray:
    """Bin of each position (int64): the position itself below 64, log-spaced bins beyond.

    Examples
    --------
    >>> position_bins(np.array([0, 63, 64, 77, 91, 127, 128, 4095])).tolist()
    [0, 63, 64, 65, 66, 67, 68, 87]
    """
    positions = np.asarray(positions, dtype=np.int64)
    beyond = np.log2(np.maximum(positions, EXACT_POSITIONS) / EXACT_POSITIONS) * BINS_PER_OCTAVE
    return np.where(positions < EXACT_POSITIONS, positions,
                    EXACT_POSITIONS + np.floor(beyond + 1e-9).astype(np.int64))


@dataclass(frozen=True)
class RankFrequencyBaseline:
    """Gene-token frequencies per position bin, and the predictions they give.

    Use :meth:`fit`. ``counts[b, t]`` is how often token ``t`` sat at a position of bin ``b``.
    """

    counts: np.ndarray
    """``(n_bins, vocab_size)`` int64 counts of gene tokens (special-token columns are 0)."""
    gene_tokens: np.ndarray
    """The dictionary's gene token ids (int64): the support of the smoothed distribution."""
    top: np.ndarray
    """``(n_bins, 10)`` int64: the 10 most frequent tokens of each bin (ties: lower id first)."""

    @classmethod
    def fit(cls, cells: Iterable[np.ndarray], token_dictionary: TokenDictionary, *,
            max_length: int) -> RankFrequencyBaseline:
        """Count gene tokens per position bin over ``cells`` (each truncated to ``max_length``).

        Parameters
        ----------
        cells
            Token ids of each training cell (any integer dtype).
        token_dictionary
            Gives the vocabulary size and which tokens are genes.
        max_length
            Positions beyond it are not counted (the model never sees them).
        """
        vocab = token_dictionary.max_token + 1
        n_bins = int(position_bins(np.array([max(max_length - 1, 0)]))[0]) + 1
        counts = np.zeros(n_bins * vocab, dtype=np.int64)
        buffer: list[np.ndarray] = []
        n_buffered = 0

        def flush() -> None:
            nonlocal n_buffered
            if buffer:
                flat = np.concatenate(buffer)
                counts[:] += np.bincount(flat, minlength=n_bins * vocab)
                buffer.clear()
                n_buffered = 0

        for cell in cells:
            ids = np.asarray(cell[:max_length], dtype=np.int64)
            buffer.append(position_bins(np.arange(len(ids))) * vocab + ids)
            n_buffered += len(ids)
            if n_buffered > 4_000_000:
                flush()
        flush()
        counts = counts.reshape(n_bins, vocab)
        is_gene = np.zeros(vocab, dtype=bool)
        gene_tokens = np.asarray(token_dictionary.gene_tokens, dtype=np.int64)
        is_gene[gene_tokens] = True
        counts[:, ~is_gene] = 0
        k = min(10, vocab)
        # descending count, ascending id on ties: a stable sort of -count over ascending ids
        top = np.argsort(-counts, axis=1, kind="stable")[:, :k].astype(np.int64)
        return cls(counts, gene_tokens, top)

    def score(self, labels: np.ndarray) -> dict[str, float]:
        """Sums over the masked positions of a batch: cross-entropy, top-1 and top-10 hits.

        Parameters
        ----------
        labels
            ``(n_cells, n_positions)`` int64, the true token at masked positions and ``-100``
            elsewhere (as :func:`~genecorpus.model.masking.mask_genes` gives).

        Returns
        -------
        dict
            ``{"loss_sum", "top1", "top10", "n"}``: summed natural-log cross-entropy with add-one
            smoothing over the gene tokens, counts of hits, and the number of masked positions.
        """
        rows, positions = np.nonzero(labels >= 0)
        true = labels[rows, positions]
        bins = np.minimum(position_bins(positions), len(self.counts) - 1)
        totals = self.counts.sum(axis=1)
        prob = (self.counts[bins, true] + 1) / (totals[bins] + len(self.gene_tokens))
        top = self.top[bins]
        return {"loss_sum": float(-np.log(prob).sum()), "top1": float((top[:, 0] == true).sum()),
                "top10": float((top == true[:, None]).any(axis=1).sum()), "n": float(len(true))}

    @property
    def n_bins(self) -> int:
        """Position bins."""
        return len(self.counts)

    def __repr__(self) -> str:
        return f"RankFrequencyBaseline(n_bins={self.n_bins}, n_counted={int(self.counts.sum())})"

