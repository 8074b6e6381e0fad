"""Rank value encoding (SPEC §2.6) and layouts (SPEC §2.7): pure, deterministic functions.

For each cell and each of its nonzero vocabulary genes, ``value = count / n_counts * 10,000 / median``
in float64, in exactly that order; genes are sorted by value, descending, ties broken by ascending token
id; the first ``layout.max_genes`` are kept, and the gc104m layout wraps them in ``<cls>`` … ``<eos>``.

The encoding pass's task (:func:`encode_task`) reads a range of a dataset's cells, applies its QC rule,
encodes the kept cells and streams them with their metadata into one Arrow part file
(:class:`~genecorpus.corpus.shards.ShardWriter`); the build publishes the parts as shards in task order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from genecorpus import _kernels
from genecorpus.corpus.manifest import DROP_REASONS
from genecorpus.corpus.shards import ColumnSpec, ShardWriter
from genecorpus.io.block import QueryableSource
from genecorpus.qc import NO_VOCAB_REASON, count_reasons
from genecorpus.vocab import LAYOUTS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import scipy.sparse as sp

    from genecorpus.dataset import CellRange, DatasetPlan, GeneBlock
    from genecorpus.qc import DatasetQC
    from genecorpus.vocab import Layout

__all__ = [
    "FIXED_COLUMNS", "SPEC_ARITHMETIC", "Arithmetic", "EncodeResult", "EncodeSettings", "Positions", "RankOrder",
    "apply_layout", "encode_task", "metadata_columns", "rank_value_encode",
]

FIXED_COLUMNS = ("dataset_id", "cell_id")
"""Metadata columns every corpus has, after ``input_ids`` and before the requested obs columns."""


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

    @classmethod
    def geneformer_of(cls, block: GeneBlock) -> Arithmetic:
        """:meth:`geneformer` for the storage and dtypes of a block's input."""
        return cls.geneformer(value_dtype=block.value_dtype, depth_dtype=block.depth_dtype, dense=block.dense_input)


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

    Arrays are per position unless stated; see :func:`genecorpus._kernels.rank_value_encode_csr`.
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
    return _kernels.rank_value_encode_csr(
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


# ------------------------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class EncodeSettings:
    """What every task of the encoding pass needs (the same object for all of them)."""

    order: RankOrder
    """The vocabulary's genes (universe indices) in rank positions, with tokens and medians."""
    layout: str
    special: dict[str, int]
    schema: pa.Schema
    metadata: tuple[ColumnSpec, ...]
    geneformer_arithmetic: bool
    """Divide in the dtype Geneformer's NumPy code would use (``tokenize``); float64 otherwise."""
    block_size: int
    """Cells read at a time (never changes a result)."""


@dataclass
class EncodeResult:
    """What one encoding task wrote."""

    n_in: int
    n_rows: int
    n_tokens: int
    dropped: dict[str, int]
    """Cells dropped by reason (every reason of ``DROP_REASONS``)."""
    lengths: np.ndarray
    """Tokens per written cell (int64)."""
    part: Path


def encode_task(plan: DatasetPlan, cells: CellRange, qc: DatasetQC, settings: EncodeSettings,
                part: Path) -> EncodeResult:
    """The encoding pass over one range of a dataset's cells, written to the Arrow file ``part``.

    A kept cell without any vocabulary gene is dropped under ``no_vocab_genes``. The part is written to
    a temporary name and renamed when complete; on failure nothing is left.
    """
    layout = LAYOUTS[settings.layout]
    wanted = [c.name for c in settings.metadata if c.name not in FIXED_COLUMNS and c.name in plan.spec.obs_columns]
    writer = ShardWriter(part, settings.schema)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    lengths_all: list[np.ndarray] = []
    n_in = 0
    try:
        for b in plan.read_blocks(cells.start, cells.stop, block_size=settings.block_size, obs_columns=wanted):
            n_in += b.genes.shape[0]
            keep, reason = qc.keep_mask(b.stats, first_cell=b.start)
            tokens, lengths = rank_value_encode(
                b.genes, depth=b.depth, order=settings.order, keep=keep, max_genes=layout.max_genes,
                arithmetic=Arithmetic.geneformer_of(b) if settings.geneformer_arithmetic else SPEC_ARITHMETIC)
            rows = np.flatnonzero(keep)
            lengths = lengths[rows]
            empty = lengths == 0
            reason[rows[empty]] = NO_VOCAB_REASON
            for name, c in count_reasons(reason).items():
                dropped[name] += c
            rows, lengths = rows[~empty], lengths[~empty]
            tokens, lengths = apply_layout(tokens, lengths, layout=layout, special=settings.special)
            columns = {"dataset_id": np.full(rows.shape[0], plan.dataset_id, dtype=object),
                       "cell_id": np.asarray(b.cell_ids, dtype=object)[rows]}
            for c in settings.metadata:
                if c.name in FIXED_COLUMNS:
                    continue
                if c.name in b.obs:
                    columns[c.name] = _as_column(np.asarray(b.obs[c.name])[rows], c)
                else:
                    columns[c.name] = np.full(rows.shape[0], None, dtype=object)
            writer.write(tokens, lengths, columns)
            lengths_all.append(lengths)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    lengths_arr = np.concatenate(lengths_all) if lengths_all else np.empty(0, np.int64)
    return EncodeResult(n_in, writer.n_rows, int(lengths_arr.sum()), dropped, lengths_arr, part)


def _as_column(values: np.ndarray, col: ColumnSpec) -> np.ndarray:
    if col.type == pa.string():
        return np.array([None if v is None else str(v) for v in values.tolist()], dtype=object)
    return values


def _arrow_type(values: np.ndarray) -> pa.DataType:
    kind = values.dtype.kind
    if kind == "b":
        return pa.bool_()
    if kind in "iu":
        return pa.int64()
    if kind == "f":
        return pa.float64()
    return pa.string()


def metadata_columns(plans: Sequence[DatasetPlan]) -> tuple[ColumnSpec, ...]:
    """The corpus's metadata columns: ``dataset_id``, ``cell_id``, then every requested obs column.

    A column's Arrow type comes from its values in the first cell of each dataset that has cells:
    one type if they agree, float64 for a mix of integers and floats, else string.
    """
    types: dict[str, set[pa.DataType]] = {}
    for plan in plans:
        if not plan.spec.obs_columns or plan.n_cells == 0:
            for name in plan.spec.obs_columns:
                types.setdefault(name, set())
            continue
        source = plan.open()
        first = int(plan.rows[0]) if plan.rows is not None else 0  # the plan's first cell
        try:
            if isinstance(source, QueryableSource) and plan.rows is not None:
                sample = source.read_rows(plan.rows[:1], obs_columns=list(plan.spec.obs_columns)).obs
            else:
                sample = source.read_block(first, first + 1, obs_columns=list(plan.spec.obs_columns)).obs
        finally:
            source.close()
        for name in plan.spec.obs_columns:
            types.setdefault(name, set()).add(_arrow_type(np.asarray(sample[name])))
    cols = [ColumnSpec("dataset_id", pa.string()), ColumnSpec("cell_id", pa.string())]
    for name, kinds in types.items():
        if name in FIXED_COLUMNS:
            continue
        if len(kinds) == 1:
            (t,) = kinds
        elif kinds and kinds <= {pa.int64(), pa.float64()}:
            t = pa.float64()
        else:
            t = pa.string()
        cols.append(ColumnSpec(name, t))
    return tuple(cols)
