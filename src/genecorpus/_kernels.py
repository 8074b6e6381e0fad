"""Numba kernels on raw CSR arrays: no I/O, no logging, no Python objects.

Each kernel has a slow, obvious NumPy reference in the tests. Names end with the layout they expect.
Floating-point formulas are written exactly as SPEC §2.4/§2.6 state them, in float64, left to right.
"""

from __future__ import annotations

import numpy as np
from numba import njit

TARGET_SUM = 10_000.0
"""Counts are scaled to this many per cell before dividing by the gene's median (SPEC §2.4, §2.6)."""


@njit(cache=True, nogil=True)
def _cell_totals_csr(data, indptr, indices, is_mito_col):  # type: ignore[no-untyped-def]
    """Total counts and mitochondrial counts of each row (int64) over all input columns."""
    n = indptr.shape[0] - 1
    totals = np.zeros(n, dtype=np.int64)
    mito = np.zeros(n, dtype=np.int64)
    for i in range(n):
        t = 0
        m = 0
        for k in range(indptr[i], indptr[i + 1]):
            c = data[k]
            t += c
            if is_mito_col[indices[k]]:
                m += c
        totals[i] = t
        mito[i] = m
    return totals, mito


@njit(cache=True, nogil=True)
def _collapse_csr(data, indices, indptr, col_to_gene, n_genes):  # type: ignore[no-untyped-def]
    """Sum input columns into genes: ``col_to_gene[col]`` is the gene index or -1 (dropped).

    Returns a CSR (int64 data, int32 sorted indices, int64 indptr) over ``n_genes`` columns.
    """
    n = indptr.shape[0] - 1
    acc = np.zeros(n_genes, dtype=np.int64)
    touched = np.empty(n_genes, dtype=np.int32)
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    out_indices = np.empty(indices.shape[0], dtype=np.int32)
    out_data = np.empty(indices.shape[0], dtype=np.int64)
    pos = 0
    for i in range(n):
        nt = 0
        monotone = True
        last = -1
        for k in range(indptr[i], indptr[i + 1]):
            g = col_to_gene[indices[k]]
            if g < 0:
                continue
            if acc[g] == 0:
                touched[nt] = g
                nt += 1
                if g < last:
                    monotone = False
                last = g
            acc[g] += data[k]
        genes = touched[:nt]
        if not monotone:
            genes.sort()
        for j in range(nt):
            g = genes[j]
            out_indices[pos] = g
            out_data[pos] = acc[g]
            acc[g] = 0
            pos += 1
        out_indptr[i + 1] = pos
    return out_data[:pos], out_indices[:pos], out_indptr


@njit(cache=True, nogil=True)
def _count_nonzero_genes_csr(indptr, indices, is_candidate):  # type: ignore[no-untyped-def]
    """Number of stored (nonzero) entries per row whose column is flagged."""
    n = indptr.shape[0] - 1
    out = np.zeros(n, dtype=np.int64)
    for i in range(n):
        c = 0
        for k in range(indptr[i], indptr[i + 1]):
            if is_candidate[indices[k]]:
                c += 1
        out[i] = c
    return out


@njit(cache=True, nogil=True)
def _value_keys_csr(data, indices, indptr, depth, keep):  # type: ignore[no-untyped-def]
    """Bit patterns (uint64) of ``count / depth * 10,000`` for the entries of kept rows.

    Positive float64 values order exactly like their IEEE-754 bit patterns read as unsigned integers,
    so medians can be selected on integer keys. Returns (gene index int32, key uint64) per entry.
    """
    n = indptr.shape[0] - 1
    total = 0
    for i in range(n):
        if keep[i]:
            total += indptr[i + 1] - indptr[i]
    genes = np.empty(total, dtype=np.int32)
    keys = np.empty(total, dtype=np.uint64)
    vals = np.empty(1, dtype=np.float64)
    bits = vals.view(np.uint64)
    pos = 0
    for i in range(n):
        if not keep[i]:
            continue
        d = depth[i]
        for k in range(indptr[i], indptr[i + 1]):
            vals[0] = data[k] / d * TARGET_SUM
            genes[pos] = indices[k]
            keys[pos] = bits[0]
            pos += 1
    return genes, keys


@njit(cache=True, nogil=True)
def _histogram_keys(genes, keys, lo, shift, n_bins, hist):  # type: ignore[no-untyped-def]
    """Add each (gene, key) to ``hist[gene, (key - lo[gene]) >> shift[gene]]`` (int64, in place)."""
    for j in range(genes.shape[0]):
        g = genes[j]
        b = np.int64((keys[j] - lo[g]) >> shift[g])
        if b >= n_bins:
            b = n_bins - 1
        hist[g, b] += 1


@njit(cache=True, nogil=True)
def _select_keys_in_bins(genes, keys, lo, shift, bin_lo, bin_hi):  # type: ignore[no-untyped-def]
    """Mask of entries whose bin lies in ``[bin_lo[gene], bin_hi[gene]]`` (bins as in the histogram)."""
    out = np.zeros(genes.shape[0], dtype=np.bool_)
    for j in range(genes.shape[0]):
        g = genes[j]
        if bin_lo[g] < 0:
            continue
        b = np.int64((keys[j] - lo[g]) >> shift[g])
        if bin_lo[g] <= b <= bin_hi[g]:
            out[j] = True
    return out


@njit(cache=True, nogil=True)
def _rank_value_encode_csr(  # type: ignore[no-untyped-def]
    data, indices, indptr, depth, medians, tokens, max_genes, float32_head, reciprocal, float32_reciprocal
):
    """Rank value encoding of each row: tokens of its genes by descending normalized value.

    ``indices`` index genes ordered by ascending token id, so a stable sort of the values in descending
    order breaks ties by ascending token id (SPEC §2.6). ``medians[g] <= 0`` marks a gene outside the
    vocabulary (skipped). With ``float32_head``, ``count / depth * 10,000`` is evaluated in float32
    (then divided by the float64 median), as Geneformer's NumPy/SciPy code does for float32 inputs.
    With ``reciprocal``, divisions become multiplications by reciprocals,
    ``count * (1 / depth) * 10,000 * (1 / median)``, which is what SciPy computes for a sparse matrix
    divided by a dense array (``spmatrix._divide`` → ``multiply(1 / other)``); ``float32_reciprocal``
    computes ``1 / depth`` in float32 (NumPy does for a float32 ``n_counts``).
    Returns the flat token array (int32) and the length of each row (int64), truncated to ``max_genes``.
    """
    n = indptr.shape[0] - 1
    lengths = np.zeros(n, dtype=np.int64)
    for i in range(n):
        c = 0
        for k in range(indptr[i], indptr[i + 1]):
            if medians[indices[k]] > 0:
                c += 1
        lengths[i] = min(c, max_genes)
    out = np.empty(lengths.sum(), dtype=np.int32)
    width = 0
    for i in range(n):
        width = max(width, indptr[i + 1] - indptr[i])
    neg = np.empty(width, dtype=np.float64)
    tok = np.empty(width, dtype=np.int32)
    pos = 0
    for i in range(n):
        d = depth[i]
        d32 = np.float32(d)
        r32 = np.float32(1.0) / d32
        r64 = np.float64(r32) if float32_reciprocal else 1.0 / d
        m = 0
        for k in range(indptr[i], indptr[i + 1]):
            g = indices[k]
            med = medians[g]
            if med > 0:
                if reciprocal:
                    if float32_head:
                        head = np.float64((np.float32(data[k]) * r32) * np.float32(TARGET_SUM))
                    else:
                        head = (data[k] * r64) * TARGET_SUM
                    neg[m] = -(head * (1.0 / med))
                elif float32_head:
                    head = np.float64((np.float32(data[k]) / d32) * np.float32(TARGET_SUM))
                    neg[m] = -(head / med)
                else:
                    neg[m] = -(data[k] / d * TARGET_SUM / med)
                tok[m] = tokens[g]
                m += 1
        order = np.argsort(neg[:m], kind="mergesort")
        for j in range(lengths[i]):
            out[pos] = tok[order[j]]
            pos += 1
    return out, lengths
