"""Raw-count validation shared by every reader.

:func:`validate_counts` is the single gate between a file and the rest of genecorpus (SPEC §2.1):
each block a reader produces goes through it (in
:meth:`~genecorpus.io.reader.BaseReader.read_block`), so every stage downstream can rely on int32,
non-negative, canonical CSR counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from genecorpus import _kernels
from genecorpus.errors import CountsError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["MAX_COUNT", "validate_counts"]

MAX_COUNT = 2**31 - 1
"""Largest count a cell can hold for one gene (counts are stored as int32)."""

INTEGER_TOLERANCE = 1e-6
"""Floats within this distance of an integer are accepted as that integer (SPEC §2.1)."""

_RAW_COUNTS_HINT = (
    "genecorpus needs raw integer counts: if the file also holds them, read them from a layer or raw.X "
    "(manifest: layer = \"counts\" or use_raw = true; tokenize: --layer counts or --use-raw; Python: layer= or "
    "use_raw=True), or re-export the raw counts"
)


def _describe_bad_value(value: float) -> str:
    if np.isnan(value):
        return "is NaN or missing"
    if np.isinf(value):
        return f"is {'-' if value < 0 else ''}infinite"
    if value < 0:
        return f"{value!r} is negative"
    if value > MAX_COUNT:
        return f"{value!r} is larger than 2**31-1"
    return f"{value!r} is not an integer"


def _raise_first_bad(
    bad: np.ndarray,
    csr: sp.csr_matrix,
    *,
    path: str,
    cell_ids: Sequence[str] | np.ndarray,
    gene_ids: Sequence[str] | np.ndarray,
    start: int,
) -> None:
    """Raise a CountsError naming the first bad entry (row order, then column order)."""
    positions = np.flatnonzero(bad)
    rows = np.searchsorted(csr.indptr, positions, side="right") - 1
    first_row = int(rows[0])
    in_row = positions[rows == first_row]
    pick = int(in_row[np.argmin(csr.indices[in_row])])
    gene_index = int(csr.indices[pick])
    value = float(csr.data[pick]) if csr.data.dtype.kind == "f" else int(csr.data[pick])
    cell = cell_ids[first_row] if first_row < len(cell_ids) else "?"
    gene = gene_ids[gene_index] if gene_index < len(gene_ids) else "?"
    msg = (
        f"{path}: cell {cell!r} (row {start + first_row}), gene {gene!r} (column {gene_index}): "
        f"value {_describe_bad_value(value)} ({len(positions)} bad value(s) in rows "
        f"{start}:{start + csr.shape[0]}); {_RAW_COUNTS_HINT}"
    )
    raise CountsError(msg)


def _check_values(
    csr: sp.csr_matrix,
    *,
    path: str,
    cell_ids: Sequence[str] | np.ndarray,
    gene_ids: Sequence[str] | np.ndarray,
    start: int,
) -> np.ndarray:
    """Return the stored values as int64 after checking they are raw counts (vectorized)."""
    data: np.ndarray = np.asarray(csr.data)
    kind = data.dtype.kind
    if kind == "b":
        return data.astype(np.int64)
    if kind in "iu":
        bad = None
        if kind == "i" and data.size and data.min() < 0:
            bad = data < 0
        # only uint32 and 64-bit types can hold values above 2**31-1
        wide = data.dtype.itemsize > 4 or (kind == "u" and data.dtype.itemsize == 4)
        if wide and data.size and data.max() > MAX_COUNT:
            over = data > MAX_COUNT
            bad = over if bad is None else bad | over
        if bad is not None:
            _raise_first_bad(bad, csr, path=path, cell_ids=cell_ids, gene_ids=gene_ids, start=start)
        return data.astype(np.int64, copy=False)
    if kind != "f":
        msg = (
            f"{path}: the count matrix has dtype {data.dtype} in rows "
            f"{start}:{start + csr.shape[0]}, not a number; {_RAW_COUNTS_HINT}"
        )
        raise CountsError(msg)
    if data.dtype.itemsize < 4:  # float16 cannot even hold 2**31-1
        data = data.astype(np.float32)
    rounded = np.rint(data)
    # Comparisons that are all False for NaN and +/-inf (inf - inf is NaN), so one mask finds all.
    with np.errstate(invalid="ignore"):
        diff = np.subtract(data, rounded)
        np.abs(diff, out=diff)
        ok = diff <= INTEGER_TOLERANCE
        ok &= rounded >= 0
        ok &= rounded <= MAX_COUNT
    if not ok.all():
        _raise_first_bad(~ok, csr, path=path, cell_ids=cell_ids, gene_ids=gene_ids, start=start)
    return np.asarray(rounded, dtype=np.int64)


def validate_counts(
    matrix: Any,
    *,
    path: str,
    cell_ids: Sequence[str] | np.ndarray,
    gene_ids: Sequence[str] | np.ndarray,
    start: int = 0,
) -> sp.csr_matrix:
    """Check that one block holds raw counts and return it in genecorpus' canonical CSR form.

    Accepted values are finite, non-negative, at most 2**31-1, and within 1e-6 of an integer (floats
    are rounded to the nearest integer). The work is vectorized over the stored values, so it costs
    a few passes over ``nnz`` whatever the number of cells.

    Parameters
    ----------
    matrix
        The block, ideally a ``scipy.sparse`` CSR matrix of any numeric dtype (other sparse formats
        and dense arrays are converted), shape (n_cells_in_block, n_genes).
    path
        File the block comes from, used in error messages.
    cell_ids
        The block's cell identifiers (one per row), for error messages.
    gene_ids
        The dataset's gene identifiers (one per column), for error messages.
    start
        Row index of the block's first cell within the dataset, for error messages.

    Returns
    -------
    ``scipy.sparse.csr_matrix`` with int32 ``data`` (rounded counts, no explicit zeros, duplicates
    summed), int32 ``indices`` sorted within each row, and int64 ``indptr``.

    Raises
    ------
    CountsError
        On the first value (in row, then column order) that is NaN, infinite, negative, not an
        integer or larger than 2**31-1; the one-line message names the file, the cell (id and row
        within the dataset), the gene (id), the value and what to do.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp
    >>> block = validate_counts(
    ...     sp.csr_matrix(np.array([[0.0, 2.0000001], [3.0, 0.0]])),
    ...     path="x.h5ad", cell_ids=["a", "b"], gene_ids=["g1", "g2"],
    ... )
    >>> block.data.tolist(), block.data.dtype.name, block.indptr.dtype.name
    ([2, 3], 'int32', 'int64')
    """
    if isinstance(matrix, sp.csr_matrix | sp.csr_array):
        csr = matrix
    elif sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
    else:
        csr = sp.csr_matrix(np.asarray(matrix))
    n_rows, n_cols = csr.shape
    if csr.data.dtype.kind in "fiu" and csr.data.dtype.itemsize >= 4 and csr.nnz <= MAX_COUNT:
        # the common case in one compiled pass; anything unusual takes the vectorized path below
        values, indices, indptr, ok = _kernels.counts_from_values_csr(
            csr.data, csr.indices, csr.indptr.astype(np.int64, copy=False), INTEGER_TOLERANCE, MAX_COUNT)
        if ok:
            result = sp.csr_matrix((n_rows, n_cols), dtype=np.int32)
            result.data, result.indices, result.indptr = values, indices, indptr
            result.has_canonical_format = True
            return result
    values = _check_values(csr, path=path, cell_ids=cell_ids, gene_ids=gene_ids, start=start)
    indices = csr.indices
    indptr = csr.indptr.astype(np.int64, copy=False)
    keep = values != 0
    if not keep.all():
        kept_before = np.zeros(len(values) + 1, dtype=np.int64)
        np.cumsum(keep, out=kept_before[1:])
        indptr = kept_before[indptr]
        values = values[keep]
        indices = indices[keep]
    index_dtype = np.int32 if len(values) <= MAX_COUNT else np.int64
    out = sp.csr_matrix(
        (values, indices.astype(index_dtype, copy=False), indptr.astype(index_dtype, copy=False)),
        shape=(n_rows, n_cols),
        copy=False,
    )
    if not out.has_canonical_format:
        out.sum_duplicates()  # sorts indices too; sums in int64 so overflow is caught below
        if out.data.size and out.data.max() > MAX_COUNT:
            pick = int(np.argmax(out.data))
            row = int(np.searchsorted(out.indptr, pick, side="right") - 1)
            msg = (
                f"{path}: cell {cell_ids[row]!r} (row {start + row}), gene "
                f"{gene_ids[out.indices[pick]]!r}: duplicate entries sum to {int(out.data[pick])}, "
                f"larger than 2**31-1; {_RAW_COUNTS_HINT}"
            )
            raise CountsError(msg)
    # Assigning the arrays keeps the promised dtypes (the constructor would unify index dtypes).
    result = sp.csr_matrix((n_rows, n_cols), dtype=np.int32)
    result.data = out.data.astype(np.int32, copy=False)
    result.indices = out.indices.astype(np.int32, copy=False)
    result.indptr = out.indptr.astype(np.int64, copy=False)
    result.has_canonical_format = True
    return result
