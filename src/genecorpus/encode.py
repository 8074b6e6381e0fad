"""Rank value encoding (SPEC §2.6) and layouts (SPEC §2.7): pure, deterministic functions.

For each cell and each of its nonzero vocabulary genes, ``value = count / n_counts * 10,000 / median``
in float64, in exactly that order; genes are sorted by value, descending, ties broken by ascending token
id; the first ``layout.max_genes`` are kept, and the gc104m layout wraps them in ``<cls>`` … ``<eos>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from genecorpus import _kernels

if TYPE_CHECKING:
    import scipy.sparse as sp

    from genecorpus.vocab import Layout

__all__ = ["SPEC_ARITHMETIC", "Arithmetic", "apply_layout", "rank_value_encode"]


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


def rank_value_encode(
    counts: sp.csr_matrix,
    *,
    depth: np.ndarray,
    medians: np.ndarray,
    tokens: np.ndarray,
    max_genes: int,
    arithmetic: Arithmetic = SPEC_ARITHMETIC,
) -> tuple[np.ndarray, np.ndarray]:
    """Rank value encode the cells of a block.

    Parameters
    ----------
    counts
        Cells × genes CSR of raw counts (integer-valued; sorted indices). Gene columns must be ordered
        by ascending token id, which is how ties are broken.
    depth
        Per-cell ``n_counts`` (float64), the denominator of the normalization.
    medians
        Per-gene nonzero median (float64); ``<= 0`` or NaN marks a gene outside the vocabulary.
    tokens
        Per-gene token id (int32).
    max_genes
        Keep at most this many genes per cell.
    arithmetic
        How the value is evaluated: the specification's float64 divisions (default), or
        :meth:`Arithmetic.geneformer` to reproduce Geneformer's output bit for bit.

    Returns
    -------
    Flat token ids (int32) of all cells, and the number of tokens of each cell (int64).

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> x = sp.csr_matrix(np.array([[1, 3, 0, 1]]))
    >>> rank_value_encode(x, depth=np.array([5.0]), medians=np.array([1.0, 1.0, 1.0, 0.5]),
    ...                   tokens=np.array([2, 3, 4, 5], dtype=np.int32), max_genes=2048)
    (array([3, 5, 2], dtype=int32), array([3]))
    """
    med = np.where(np.isnan(medians), 0.0, medians).astype(np.float64)
    return _kernels._rank_value_encode_csr(
        counts.data, counts.indices, counts.indptr.astype(np.int64),
        np.asarray(depth, dtype=np.float64), med, np.asarray(tokens, dtype=np.int32), max_genes,
        arithmetic.head_dtype == "float32", arithmetic.reciprocal, arithmetic.reciprocal_dtype == "float32",
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
