"""Batches for masked-gene modelling: dynamic padding and the masking rule of SPEC §2.9.

Pure NumPy (no torch): :func:`pad_cells` turns cells of a corpus into one padded ``int64`` batch, and
:func:`mask_genes` applies the masked-gene objective to it with an explicit ``numpy.random.Generator``,
so that the rules can be checked directly and a resumed run masks exactly as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from genecorpus.vocab import TokenDictionary

__all__ = ["IGNORE_INDEX", "MASK_FRACTION", "MaskedBatch", "PaddedBatch", "mask_genes", "pad_cells"]

MASK_FRACTION = 0.15
"""Share of a cell's gene tokens selected for prediction (BERT, Geneformer)."""
IGNORE_INDEX = -100
"""Label of positions that are not predicted (what ``torch.nn.CrossEntropyLoss`` ignores)."""


@dataclass(frozen=True)
class PaddedBatch:
    """Cells padded to the longest one of the batch."""

    input_ids: np.ndarray
    """``(n_cells, n_positions)`` int64 token ids, ``<pad>`` after each cell's end."""
    attention_mask: np.ndarray
    """``(n_cells, n_positions)`` int64, 1 on the cell's tokens, 0 on padding."""

    @property
    def n_tokens(self) -> int:
        """Tokens of the batch that are not padding."""
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class MaskedBatch:
    """A padded batch with the masked-gene objective applied."""

    input_ids: np.ndarray
    """``(n_cells, n_positions)`` int64: the input with selected genes replaced (80 % ``<mask>``,
    10 % a random gene, 10 % unchanged)."""
    labels: np.ndarray
    """``(n_cells, n_positions)`` int64: the original token at selected positions, ``-100`` elsewhere."""
    attention_mask: np.ndarray
    """``(n_cells, n_positions)`` int64, 1 on the cell's tokens, 0 on padding."""


def pad_cells(cells: Sequence[np.ndarray], token_dictionary: TokenDictionary, *,
              max_length: int | None = None) -> PaddedBatch:
    """Pad cells to the longest of them with ``<pad>``, after truncating each to ``max_length``.

    Truncation keeps the first tokens (the rank value encoding puts the most informative genes first);
    a cell that ended with ``<eos>`` (gc104m layout) still ends with ``<eos>`` after truncation.

    Parameters
    ----------
    cells
        Token ids of each cell (any integer dtype), as :meth:`CorpusReader.batch` gives them.
    token_dictionary
        The corpus's dictionary (for ``<pad>`` and ``<eos>``).
    max_length
        Tokens kept per cell; None keeps every token.

    Returns
    -------
    PaddedBatch
        ``(len(cells), longest kept cell)`` int64 arrays.

    Examples
    --------
    >>> import numpy as np
    >>> from genecorpus.vocab import TokenDictionary
    >>> tdict = TokenDictionary.from_mapping({"<pad>": 0, "<mask>": 1, "G1": 2, "G2": 3, "G3": 4})
    >>> pad_cells([np.array([4, 2, 3]), np.array([3])], tdict).input_ids.tolist()
    [[4, 2, 3], [3, 0, 0]]
    """
    pad = token_dictionary.special["<pad>"]
    eos = token_dictionary.special.get("<eos>")
    kept = [len(c) if max_length is None else min(len(c), max_length) for c in cells]
    width = max(kept, default=0)
    input_ids = np.full((len(cells), width), pad, dtype=np.int64)
    attention_mask = np.zeros((len(cells), width), dtype=np.int64)
    for i, (cell, n) in enumerate(zip(cells, kept, strict=True)):
        input_ids[i, :n] = cell[:n]
        attention_mask[i, :n] = 1
        if eos is not None and n < len(cell) and n > 0 and cell[-1] == eos:
            input_ids[i, n - 1] = eos
    return PaddedBatch(input_ids, attention_mask)


def mask_genes(batch: PaddedBatch, token_dictionary: TokenDictionary, rng: np.random.Generator, *,
               fraction: float = MASK_FRACTION) -> MaskedBatch:
    """Apply the masked-gene objective (SPEC §2.9) to a padded batch; returns new arrays.

    In each cell, ``fraction`` of the *gene* tokens (positions whose id is not a special token of the
    dictionary: ``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``) is selected, at least one in a cell with a
    gene. The number selected is ``fraction × n_genes`` rounded up or down at random with the
    probability of its fractional part, so that exactly ``fraction`` of the genes is selected on
    average. Each selected position independently becomes ``<mask>`` (80 %), a gene token drawn
    uniformly from the dictionary's gene tokens (10 %) or stays unchanged (10 %).

    Parameters
    ----------
    batch
        Output of :func:`pad_cells` (int64 ids, padded with ``<pad>``).
    token_dictionary
        Gives the special tokens and the gene tokens random replacements are drawn from.
    rng
        The only source of randomness; the same generator state gives the same batch.
    fraction
        Share of gene tokens selected per cell.

    Returns
    -------
    MaskedBatch
        Masked input ids, labels (original id at selected positions, ``-100`` elsewhere) and the
        attention mask, all ``(n_cells, n_positions)`` int64.

    Examples
    --------
    >>> import numpy as np
    >>> from genecorpus.vocab import TokenDictionary
    >>> tdict = TokenDictionary.from_mapping({"<pad>": 0, "<mask>": 1, **{f"G{i}": i for i in range(2, 30)}})
    >>> cells = pad_cells([np.arange(2, 22), np.arange(2, 12)], tdict)
    >>> masked = mask_genes(cells, tdict, np.random.default_rng(0))
    >>> (masked.labels != -100).sum(axis=1).tolist()   # 15 % of 20 genes, 15 % of 10 rounded at random
    [3, 2]
    """
    ids = batch.input_ids
    specials = np.fromiter(token_dictionary.special.values(), dtype=np.int64)
    is_gene = ~np.isin(ids, specials) & (batch.attention_mask == 1)
    n_genes = is_gene.sum(axis=1)
    expected = fraction * n_genes
    n_selected = np.floor(expected).astype(np.int64)
    n_selected += rng.random(len(ids)) < (expected - n_selected)
    n_selected = np.where(n_genes > 0, np.clip(n_selected, 1, n_genes), 0)
    # a uniformly random subset of exactly n_selected gene positions per cell: the positions with the
    # n_selected smallest random keys, non-gene positions keyed beyond every gene
    keys = np.where(is_gene, rng.random(ids.shape), 2.0)
    order = np.argsort(keys, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(ids.shape[1])[None, :].repeat(len(ids), axis=0), axis=1)
    selected = rank < n_selected[:, None]

    labels = np.where(selected, ids, IGNORE_INDEX)
    action = rng.random(ids.shape)
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    genes = np.asarray(token_dictionary.gene_tokens, dtype=np.int64)
    random_genes = genes[rng.integers(0, len(genes), size=ids.shape)]
    masked = np.where(to_mask, token_dictionary.special["<mask>"], ids)
    masked = np.where(to_random, random_genes, masked)
    return MaskedBatch(masked.astype(np.int64), labels.astype(np.int64), batch.attention_mask.copy())
