"""Rank value encoding (SPEC §2.6) and layouts (SPEC §2.7): pure, deterministic functions.

For each cell and each of its nonzero vocabulary genes, ``value = count / n_counts * 10,000 / median``
in float64, in exactly that order; genes are sorted by value, descending, ties broken by ascending token
id; the first ``layout.max_genes`` are kept, and the gc104m layout wraps them in ``<cls>`` … ``<eos>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from genecorpus import _kernels

if TYPE_CHECKING:
    import scipy.sparse as sp

    from genecorpus.vocab import Layout

__all__ = ["SPEC_ARITHMETIC", "Arithmetic", "Positions", "RankOrder", "apply_layout", "rank_value_encode"]


@dataclass(frozen=True)
class Arithmetic:
    """How ``count / n_counts * 10,000 / median`` is evaluated, to the bit.

    The default is SPEC §2.6: true divisions, float64, left to right. :meth:`geneformer` describes what
    Geneformer's NumPy/SciPy expression does for a given input.
    """

    head_dtype: str = "float64"
    """dtype of ``count / n_counts * 10,000`` (``"float32"`` or ``"float64"``)."""
    reciprocal: bool = False
    """Multiply by ``1 / n_counts`` and ``1 / median`` instead of dividing."""
    reciprocal_dtype: str = "float64"
    """dtype in which ``1 / n_counts`` is computed when ``reciprocal``."""

    @classmethod
    def geneformer(cls, *, value_dtype: np.dtype, depth_dtype: np.dtype, dense: bool) -> Arithmetic:
        """What ``X / n_counts * target_sum / medians`` does in Geneformer's tokenizer.

        On a dense matrix NumPy divides, in ``result_type(X, n_counts)``. On a sparse matrix SciPy
        computes ``X.multiply(1 / n_counts)`` (the reciprocal in n_counts' float dtype, the product in the
        promoted dtype), then ``* 10,000`` in that dtype, then ``.multiply(1 / medians)`` in float64.
        """
        if dense:
            head = np.result_type(value_dtype, depth_dtype)
            return cls("float32" if head == np.float32 else "float64")
        recip = np.result_type(np.divide(1, np.ones(1, dtype=depth_dtype)))
        head = np.result_type(value_dtype, recip)
        return cls("float32" if head == np.float32 else "float64", True,
                   "float32" if recip == np.float32 else "float64")


SPEC_ARITHMETIC = Arithmetic()


@dataclass(frozen=True)
class RankOrder:
    """The vocabulary in rank positions: genes sorted by (median ascending, token ascending).

    Built once per corpus from per-gene medians and tokens; the encoder works on rank positions.
    """

    rank_of: np.ndarray
    """Per gene (column): its rank position, or -1 outside the vocabulary (int32)."""
    token: np.ndarray
    """Per rank position: token id (int32)."""
    median: np.ndarray
    """Per rank position: median (float64)."""
    inv_median: np.ndarray
    """Per rank position: ``1 / median`` in float64 (for the reciprocal arithmetic)."""

    @classmethod
    def from_genes(cls, medians: np.ndarray, tokens: np.ndarray) -> RankOrder:
        """From per-gene medians (``<= 0`` or NaN: not in the vocabulary) and token ids."""
        med = np.asarray(medians, dtype=np.float64)
        tok = np.asarray(tokens, dtype=np.int32)
        in_vocab = np.flatnonzero(np.isfinite(med) & (med > 0))
        order = in_vocab[np.lexsort((tok[in_vocab], med[in_vocab]))]
        rank_of = np.full(med.shape[0], -1, dtype=np.int32)
        rank_of[order] = np.arange(order.shape[0], dtype=np.int32)
        median = med[order]
        return cls(rank_of, tok[order], median, np.divide(1.0, median))

    def positions(self, *, reciprocal: bool) -> Positions:
        """The precomputed order of (count, gene) pairs the encoder reads cells through."""
        return self._reciprocal_positions if reciprocal else self._dividing_positions

    @cached_property
    def _dividing_positions(self) -> Positions:
        return Positions.build(self, self.median, reciprocal=False)

    @cached_property
    def _reciprocal_positions(self) -> Positions:
        return Positions.build(self, self.inv_median, reciprocal=True)


@dataclass(frozen=True)
class Positions:
    """Every (count, gene) pair with ``count <= SMALL_COUNTS``, sorted by ``count / median`` descending.

    Arrays are per position unless stated; see :func:`genecorpus._kernels._rank_value_encode_csr`.
    """

    pos_of: np.ndarray
    """(SMALL_COUNTS, n_columns) int32: position of (count, column), -1 outside the vocabulary."""
    token: np.ndarray
    """Token id (int32)."""
    count: np.ndarray
    """The count (int32, 1..SMALL_COUNTS)."""
    scale: np.ndarray
    """The gene's median, or ``1 / median`` for the reciprocal arithmetic (float64)."""
    chain: np.ndarray
    """First position of the pair's chain — consecutive positions whose ``count / median`` lie within
    :data:`~genecorpus._kernels.CHAIN_TOLERANCE` of each other, which rounding may reorder — or -1 for
    a pair alone (int32)."""

    @classmethod
    def build(cls, order: RankOrder, scale: np.ndarray, *, reciprocal: bool) -> Positions:
        """From a rank order and its per-rank scale (median, or ``1 / median`` if ``reciprocal``)."""
        n_small, n_ranks = _kernels.SMALL_COUNTS, order.token.shape[0]
        counts = np.repeat(np.arange(1, n_small + 1, dtype=np.int64), n_ranks)
        ranks = np.tile(np.arange(n_ranks, dtype=np.int64), n_small)
        key = counts * scale[ranks] if reciprocal else counts / scale[ranks]
        sorted_pairs = np.lexsort((order.token[ranks], -key))
        key = key[sorted_pairs]
        close = key[1:] >= key[:-1] * (1.0 - _kernels.CHAIN_TOLERANCE)
        starts = np.flatnonzero(np.concatenate([[True], ~close]))
        sizes = np.diff(np.append(starts, key.shape[0]))
        chain = np.repeat(np.where(sizes > 1, starts, -1), sizes).astype(np.int32)
        pos_of_pair = np.empty(key.shape[0], dtype=np.int32)
        pos_of_pair[sorted_pairs] = np.arange(key.shape[0], dtype=np.int32)
        pos_of_rank = pos_of_pair.reshape(n_small, n_ranks)
        in_vocab = order.rank_of >= 0
        pos_of = np.full((n_small, order.rank_of.shape[0]), -1, dtype=np.int32)
        pos_of[:, in_vocab] = pos_of_rank[:, order.rank_of[in_vocab]]
        ranks = ranks[sorted_pairs]
        return cls(pos_of, order.token[ranks], counts[sorted_pairs].astype(np.int32), scale[ranks], chain)


def rank_value_encode(
    counts: sp.csr_matrix,
    *,
    depth: np.ndarray,
    medians: np.ndarray | None = None,
    tokens: np.ndarray | None = None,
    max_genes: int,
    arithmetic: Arithmetic = SPEC_ARITHMETIC,
    order: RankOrder | None = None,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank value encode the cells of a block.

    Parameters
    ----------
    counts
        Cells × genes CSR of raw counts (integer-valued, positive).
    depth
        Per-cell ``n_counts`` (float64), the denominator of the normalization.
    medians
        Per-gene nonzero median (float64); ``<= 0`` or NaN marks a gene outside the vocabulary.
    tokens
        Per-gene token id (int32); ties are broken by ascending token id.
    max_genes
        Keep at most this many genes per cell.
    arithmetic
        How the value is evaluated: the specification's float64 divisions (default), or
        :meth:`Arithmetic.geneformer` to reproduce Geneformer's output bit for bit.
    order
        A prepared :class:`RankOrder` (instead of ``medians`` and ``tokens``), to save its set-up.
    keep
        Encode only these rows (bool per row); the others get length 0 and no tokens.

    Returns
    -------
    Flat token ids (int32) of the encoded cells, and the number of tokens of each cell (int64).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> x = sp.csr_matrix(np.array([[1, 3, 0, 1]]))
    >>> rank_value_encode(x, depth=np.array([5.0]), medians=np.array([1.0, 1.0, 1.0, 0.5]),
    ...                   tokens=np.array([2, 3, 4, 5], dtype=np.int32), max_genes=2048)
    (array([3, 5, 2], dtype=int32), array([3]))
    """
    if order is None:
        order = RankOrder.from_genes(medians, tokens)
    n = counts.shape[0]
    keep = np.ones(n, dtype=np.bool_) if keep is None else np.asarray(keep, dtype=np.bool_)
    table = order.positions(reciprocal=arithmetic.reciprocal)
    return _kernels._rank_value_encode_csr(
        counts.data, counts.indices, counts.indptr.astype(np.int64, copy=False), keep,
        np.asarray(depth, dtype=np.float64), table.pos_of, table.token, table.count, table.scale,
        table.chain, order.rank_of, order.token, order.inv_median if arithmetic.reciprocal else order.median,
        max_genes, arithmetic.head_dtype == "float32", arithmetic.reciprocal,
        arithmetic.reciprocal_dtype == "float32",
    )

def apply_layout(
    tokens: np.ndarray, lengths: np.ndarray, *, layout: Layout, special: dict[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Add the layout's special tokens around each cell (gc104m: ``<cls>`` first, ``<eos>`` last).

    Returns the new flat token array and lengths (special tokens included).
    """
    if not layout.wrap_cls_eos:
        return tokens, lengths
    n = lengths.shape[0]
    new_lengths = lengths + 2
    out = np.empty(int(new_lengths.sum()), dtype=tokens.dtype)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(new_lengths[:-1], out=starts[1:])
    out[starts] = special["<cls>"]
    out[starts + new_lengths - 1] = special["<eos>"]
    body = np.ones(out.shape[0], dtype=bool)
    body[starts] = False
    body[starts + new_lengths - 1] = False
    out[body] = tokens
    return out, new_lengths
