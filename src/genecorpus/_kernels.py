"""Numba kernels on raw CSR arrays: no I/O, no logging, no Python objects.

Each kernel has a slow, obvious NumPy reference in the tests. Names end with the layout they expect.
The module is private to genecorpus (hence its underscore): each kernel is called only by the module
that owns its computation (``dataset``, ``medians``, ``encode``, ``validate``, ``io``), never by the
driver; the ``_``-prefixed functions are helpers of the kernels themselves and are not called from outside.
Floating-point formulas are written exactly as SPEC §2.4/§2.6 state them, in float64, left to right.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.cpython.unsafe.numbers import trailing_zeros

EXCLUDED_COLUMN = -2
"""``col_to_gene`` value of an input column left out entirely: not a gene, and not in the cell's total."""
TARGET_SUM = 10_000.0
"""Counts are scaled to this many per cell before dividing by the gene's median (SPEC §2.4, §2.6)."""


@njit(cache=True, nogil=True)
def collapse_csr(data, indices, indptr, col_to_gene, is_mito_col, n_genes, injective):  # type: ignore[no-untyped-def]
    """Per-row totals, and input columns summed into genes: ``col_to_gene[col]`` is a gene index or -1.

    Totals and mitochondrial totals (``is_mito_col``) are int64 sums over *all* input columns, but those
    marked -2 (left out of the dataset entirely, as CELLxGENE's ``feature_is_filtered`` genes). With
    ``injective`` (no two columns map to one gene) entries are only renamed and filtered. Returns
    (int64 data, int32 indices, int64 indptr) of a CSR over ``n_genes`` columns whose indices are
    unique within a row but not necessarily sorted (no consumer needs them sorted), then the totals
    and mitochondrial totals (int64 per row).
    """
    n = indptr.shape[0] - 1
    totals = np.zeros(n, dtype=np.int64)
    mito = np.zeros(n, dtype=np.int64)
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    out_indices = np.empty(indices.shape[0], dtype=np.int32)
    out_data = np.empty(indices.shape[0], dtype=np.int64)
    acc = np.zeros(0 if injective else n_genes, dtype=np.int64)
    pos = 0
    for i in range(n):
        start = pos
        t = 0
        m = 0
        for k in range(indptr[i], indptr[i + 1]):
            c = data[k]
            col = indices[k]
            g = col_to_gene[col]
            if g == EXCLUDED_COLUMN:
                continue
            t += c
            if is_mito_col[col]:
                m += c
            if g < 0:
                continue
            if injective:
                out_indices[pos] = g
                out_data[pos] = c
                pos += 1
            else:
                if acc[g] == 0:
                    out_indices[pos] = g
                    pos += 1
                acc[g] += c
        if not injective:
            for j in range(start, pos):
                g = out_indices[j]
                out_data[j] = acc[g]
                acc[g] = 0
        totals[i] = t
        mito[i] = m
        out_indptr[i + 1] = pos
    return out_data[:pos], out_indices[:pos], out_indptr, totals, mito


@njit(cache=True, nogil=True)
def value_window_csr(data, indices, indptr, depth, keep, lo, hi):  # type: ignore[no-untyped-def]
    """Widen each gene's [lo, hi] key window (uint64, in place) with the values of the kept rows.

    A value is ``count / depth * 10,000`` (float64); its key is its IEEE-754 bit pattern read as uint64,
    which orders positive floats exactly like the floats.
    """
    buf = np.empty(1, dtype=np.float64)
    bits = buf.view(np.uint64)
    for i in range(indptr.shape[0] - 1):
        if not keep[i]:
            continue
        d = depth[i]
        for k in range(indptr[i], indptr[i + 1]):
            buf[0] = data[k] / d * TARGET_SUM
            key = bits[0]
            g = indices[k]
            if key < lo[g]:
                lo[g] = key
            if key > hi[g]:
                hi[g] = key


@njit(cache=True, nogil=True)
def value_histogram_csr(data, indices, indptr, depth, keep, lo, shift, hist):  # type: ignore[no-untyped-def]
    """Count the kept rows' value keys in ``hist[gene, (key - lo[gene]) >> shift[gene]]`` (in place)."""
    buf = np.empty(1, dtype=np.float64)
    bits = buf.view(np.uint64)
    n_bins = hist.shape[1]
    for i in range(indptr.shape[0] - 1):
        if not keep[i]:
            continue
        d = depth[i]
        for k in range(indptr[i], indptr[i + 1]):
            buf[0] = data[k] / d * TARGET_SUM
            g = indices[k]
            b = np.int64((bits[0] - lo[g]) >> shift[g])
            if b >= n_bins:
                b = n_bins - 1
            hist[g, b] += 1


@njit(cache=True, nogil=True)
def value_pairs_to_csr(n_genes, genes, keys):  # type: ignore[no-untyped-def]
    """Collapse (gene, key) pairs into a multiset: per gene, its distinct keys ascending with multiplicities.

    Returns CSR arrays over genes: ``indptr`` (int64, n_genes + 1), ``keys`` (uint64), ``counts`` (int64).
    Counting sort by gene, then one small in-place sort per gene: no global sort of the pairs.
    """
    n = genes.shape[0]
    indptr = np.zeros(n_genes + 1, dtype=np.int64)
    for i in range(n):
        indptr[genes[i] + 1] += 1
    for g in range(n_genes):
        indptr[g + 1] += indptr[g]
    fill = indptr[:-1].copy()
    grouped = np.empty(n, dtype=np.uint64)
    for i in range(n):
        g = genes[i]
        grouped[fill[g]] = keys[i]
        fill[g] += 1
    out_keys = np.empty(n, dtype=np.uint64)
    out_counts = np.empty(n, dtype=np.int64)
    pos = 0
    for g in range(n_genes):
        a = indptr[g]
        b = indptr[g + 1]
        indptr[g] = pos
        if b - a > 1:
            grouped[a:b].sort()
        for i in range(a, b):
            if pos > indptr[g] and out_keys[pos - 1] == grouped[i]:
                out_counts[pos - 1] += 1
            else:
                out_keys[pos] = grouped[i]
                out_counts[pos] = 1
                pos += 1
    indptr[n_genes] = pos
    return indptr, out_keys[:pos].copy(), out_counts[:pos].copy()


@njit(cache=True, nogil=True)
def value_merge_csr(ptr_a, keys_a, counts_a, ptr_b, keys_b, counts_b):  # type: ignore[no-untyped-def]
    """Union of two multisets in the layout of :func:`value_pairs_to_csr`, multiplicities added (linear)."""
    n_genes = ptr_a.shape[0] - 1
    cap = keys_a.shape[0] + keys_b.shape[0]
    indptr = np.zeros(n_genes + 1, dtype=np.int64)
    keys = np.empty(cap, dtype=np.uint64)
    counts = np.empty(cap, dtype=np.int64)
    pos = 0
    for g in range(n_genes):
        i = ptr_a[g]
        i_end = ptr_a[g + 1]
        j = ptr_b[g]
        j_end = ptr_b[g + 1]
        while i < i_end and j < j_end:
            ka = keys_a[i]
            kb = keys_b[j]
            if ka < kb:
                keys[pos] = ka
                counts[pos] = counts_a[i]
                i += 1
            elif kb < ka:
                keys[pos] = kb
                counts[pos] = counts_b[j]
                j += 1
            else:
                keys[pos] = ka
                counts[pos] = counts_a[i] + counts_b[j]
                i += 1
                j += 1
            pos += 1
        while i < i_end:
            keys[pos] = keys_a[i]
            counts[pos] = counts_a[i]
            i += 1
            pos += 1
        while j < j_end:
            keys[pos] = keys_b[j]
            counts[pos] = counts_b[j]
            j += 1
            pos += 1
        indptr[g + 1] = pos
    if pos == cap:
        return indptr, keys, counts
    return indptr, keys[:pos].copy(), counts[:pos].copy()


@njit(cache=True, nogil=True)
def value_median_csr(indptr, keys, counts, n_values, rank_lo, rank_hi):  # type: ignore[no-untyped-def]
    """Per gene, the values of 0-based ranks ``rank_lo``/``rank_hi`` in its multiset; their median (float64).

    A gene with ``n_values == 0`` gets NaN. For an odd count the middle value is returned; for an even
    count ``(a + b) / 2`` of the two middle values, as ``numpy.median`` computes it. Returns the medians
    and -1, or stops at the first gene whose ranks the multiset does not hold and returns its index.
    """
    n_genes = indptr.shape[0] - 1
    out = np.full(n_genes, np.nan)
    buf = np.empty(1, dtype=np.uint64)
    as_float = buf.view(np.float64)
    for g in range(n_genes):
        if n_values[g] == 0:
            continue
        r_lo = rank_lo[g]
        r_hi = rank_hi[g]
        i_lo = -1
        i_hi = -1
        cum = 0
        for i in range(indptr[g], indptr[g + 1]):
            cum += counts[i]
            if i_lo < 0 and cum > r_lo:
                i_lo = i
            if cum > r_hi:
                i_hi = i
                break
        if i_lo < 0 or i_hi < 0:
            return out, g
        buf[0] = keys[i_lo]
        a = as_float[0]
        if n_values[g] % 2 == 1:
            out[g] = a
        else:
            buf[0] = keys[i_hi]
            out[g] = (a + as_float[0]) / 2.0
    return out, -1


@njit(cache=True, nogil=True)
def value_select_csr(data, indices, indptr, depth, keep, key_lo, key_width):  # type: ignore[no-untyped-def]
    """(gene int32, key uint64) of the kept rows' values with ``key - key_lo[gene] <= key_width[gene]``.

    The test is on uint64, so it wraps: a key below ``key_lo`` is never selected. Branch-free: every value
    is written and the output position only advances for the selected ones.
    """
    buf = np.empty(1, dtype=np.float64)
    bits = buf.view(np.uint64)
    n_rows = indptr.shape[0] - 1
    cap = max(1024, (indptr[n_rows] - indptr[0]) // 8)
    genes = np.empty(cap, dtype=np.int32)
    keys = np.empty(cap, dtype=np.uint64)
    pos = 0
    for i in range(n_rows):
        if not keep[i]:
            continue
        start = indptr[i]
        end = indptr[i + 1]
        if pos + (end - start) > cap:
            while pos + (end - start) > cap:
                cap *= 2
            grown_genes = np.empty(cap, dtype=np.int32)
            grown_genes[:pos] = genes[:pos]
            genes = grown_genes
            grown_keys = np.empty(cap, dtype=np.uint64)
            grown_keys[:pos] = keys[:pos]
            keys = grown_keys
        d = depth[i]
        for k in range(start, end):
            g = indices[k]
            buf[0] = data[k] / d * TARGET_SUM
            key = bits[0]
            genes[pos] = g
            keys[pos] = key
            pos += (key - key_lo[g]) <= key_width[g]
    return genes[:pos].copy(), keys[:pos].copy()


@njit(cache=True, nogil=True, inline="always")
def _value(c, d, d32, r32, r64, scale, float32_head, reciprocal):  # type: ignore[no-untyped-def]
    """The normalized value of count ``c``; ``scale`` is the median, or ``1 / median`` if ``reciprocal``."""
    if reciprocal:
        if float32_head:
            head = np.float64((np.float32(c) * r32) * np.float32(TARGET_SUM))
        else:
            head = (c * r64) * TARGET_SUM
        return head * scale
    if float32_head:
        head = np.float64((np.float32(c) / d32) * np.float32(TARGET_SUM))
    else:
        head = c / d * TARGET_SUM
    return head / scale


CHAIN_TOLERANCE = 1e-6
"""Relative gap of ``count / median`` below which two (count, gene) pairs may swap under rounding.

A value is at most ~3 roundings (float32 at worst: 2 × 2**-24, plus one float64) away from its exact
``count / depth * 10,000 / median``, i.e. within 2.4e-7 relative; pairs further apart keep their order.
"""


@njit(cache=True, nogil=True)
def _sort_value_desc_token_asc(vals, toks, n):  # type: ignore[no-untyped-def]
    """Sort ``vals[:n]``/``toks[:n]`` in place by (value descending, token ascending)."""
    if n <= 32:
        for m in range(1, n):
            v = vals[m]
            t = toks[m]
            q = m
            while q > 0 and (vals[q - 1] < v or (vals[q - 1] == v and toks[q - 1] > t)):
                vals[q] = vals[q - 1]
                toks[q] = toks[q - 1]
                q -= 1
            vals[q] = v
            toks[q] = t
        return
    order = np.argsort(-vals[:n])
    v_sorted = vals[:n][order]
    t_sorted = toks[:n][order]
    vals[:n] = v_sorted
    toks[:n] = t_sorted
    u = 0
    while u < n:
        e = u + 1
        while e < n and vals[e] == vals[u]:
            e += 1
        if e - u > 1:
            toks[u:e].sort()
        u = e


SMALL_COUNTS = 16
"""Counts 1..SMALL_COUNTS are ranked through the precomputed order of (count, gene) pairs."""


@njit(cache=True, nogil=True)
def rank_value_encode_csr(  # type: ignore[no-untyped-def]
    data, indices, indptr, keep, depth, pos_of, pos_token, pos_count, pos_scale, pos_chain,
    rank_of, rank_token, rank_scale, max_genes, float32_head, reciprocal, float32_reciprocal,
):
    """Rank value encoding of the kept rows: tokens of their genes by descending normalized value.

    Within a cell, ``value = head(count) / median`` (or ``* (1 / median)``) where ``head(count) =
    count / depth * 10,000`` is increasing in the count; so, up to rounding, the order of a cell's genes
    is the order of ``count / median``, which does not depend on the cell. The caller precomputes that
    order for every (count <= :data:`SMALL_COUNTS`, vocabulary gene) pair — *positions*, sorted by
    ``count / median`` descending, then token — and ``pos_of[count - 1, column]`` (-1 outside the
    vocabulary). A cell sets one bit per gene in a bitmap over positions and reads the bits back in
    order: no per-cell sort. Rounding can only reorder pairs whose ``count / median`` differ by less
    than ~3 float32 roundings; consecutive positions closer than :data:`CHAIN_TOLERANCE` share a
    *chain* (``pos_chain`` = its first position), and within a chain the cell's actual float values are
    sorted (value descending, token ascending). Larger counts are valued and sorted per cell, then merged.
    The result is exactly a stable sort by descending value with ties by ascending token (SPEC §2.6).

    Value arithmetic: ``count / depth * 10,000 / median`` in float64 by default. ``float32_head``
    evaluates ``count / depth * 10,000`` in float32; ``reciprocal`` multiplies by ``1 / depth`` and
    ``1 / median`` instead of dividing (SciPy's sparse division), with ``1 / depth`` in float32 when
    ``float32_reciprocal`` — the combinations Geneformer's NumPy/SciPy expression produces.
    ``pos_scale``/``rank_scale`` hold the median (dividing) or ``1 / median`` (``reciprocal``).

    Returns the flat tokens (int32) of the kept rows and each row's length (int64; 0 for dropped rows).
    """
    n = indptr.shape[0] - 1
    n_small = pos_of.shape[0]
    bound = 0
    width = 0
    for i in range(n):
        w = indptr[i + 1] - indptr[i]
        width = max(width, w)
        if keep[i]:
            bound += min(w, max_genes)
    out = np.empty(bound, dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int64)
    sp = np.empty(width, dtype=np.int32)
    sv = np.empty(width, dtype=np.float64)
    sg = np.empty(width, dtype=np.int32)
    big_r = np.empty(width, dtype=np.int32)
    big_c = np.empty(width, dtype=np.int64)
    bv = np.empty(width, dtype=np.float64)
    bt = np.empty(width, dtype=np.int32)
    heads = np.empty(n_small, dtype=np.float64)
    n_words = (pos_token.shape[0] >> 6) + 1
    bitmap = np.zeros(n_words, dtype=np.uint64)
    summary = np.zeros((n_words >> 6) + 1, dtype=np.uint64)
    one = np.uint64(1)
    pos = 0
    for i in range(n):
        if not keep[i]:
            continue
        d = depth[i]
        d32 = np.float32(d)
        r32 = np.float32(1.0) / d32
        r64 = np.float64(r32) if float32_reciprocal else 1.0 / d
        nb = 0
        ns = 0
        for k in range(indptr[i], indptr[i + 1]):
            c = data[k]
            col = indices[k]
            if c <= n_small:
                p = pos_of[c - 1, col]
                if p >= 0:
                    w = p >> 6
                    bitmap[w] |= one << np.uint64(p & 63)
                    summary[w >> 6] |= one << np.uint64(w & 63)
                    ns += 1
            else:
                r = rank_of[col]
                if r >= 0:
                    big_r[nb] = r
                    big_c[nb] = c
                    nb += 1
        if ns + nb == 0:
            continue
        for b in range(n_small):
            heads[b] = _value(b + 1, d, d32, r32, r64, 1.0, float32_head, reciprocal)
        # the small counts, in order of their positions; chains put in (value desc, token asc) order
        j = 0
        for s in range(summary.shape[0]):
            x = summary[s]
            if x == 0:
                continue
            summary[s] = 0
            while x != 0:
                w = (s << 6) + trailing_zeros(x)
                x &= x - one
                y = bitmap[w]
                bitmap[w] = 0
                while y != 0:
                    p = (w << 6) + trailing_zeros(y)
                    y &= y - one
                    g = pos_chain[p]
                    if g >= 0:  # a chain of near ties: insert by (value descending, token ascending)
                        head = heads[pos_count[p] - 1]
                        v = head * pos_scale[p] if reciprocal else head / pos_scale[p]
                        t = pos_token[p]
                        q = j
                        while q > 0 and sg[q - 1] == g and (
                                sv[q - 1] < v or (sv[q - 1] == v and pos_token[sp[q - 1]] > t)):
                            sp[q] = sp[q - 1]
                            sv[q] = sv[q - 1]
                            sg[q] = g
                            q -= 1
                        sp[q] = p
                        sv[q] = v
                        sg[q] = g
                    else:
                        sp[j] = p
                        sg[j] = -1
                    j += 1
        # the large counts: value and sort by (value descending, token ascending)
        for m in range(nb):
            r = big_r[m]
            bv[m] = _value(big_c[m], d, d32, r32, r64, rank_scale[r], float32_head, reciprocal)
            bt[m] = rank_token[r]
        if nb > 1:
            _sort_value_desc_token_asc(bv, bt, nb)
        # merge the two sorted runs; small values are only needed while large ones remain
        length = min(ns + nb, max_genes)
        end = pos + length
        a = 0
        b = 0
        while b < nb and pos < end:
            if a < ns:
                p = sp[a]
                if sg[a] >= 0:
                    v = sv[a]
                else:
                    head = heads[pos_count[p] - 1]
                    v = head * pos_scale[p] if reciprocal else head / pos_scale[p]
                t = pos_token[p]
                if bv[b] > v or (bv[b] == v and bt[b] < t):
                    out[pos] = bt[b]
                    b += 1
                else:
                    out[pos] = t
                    a += 1
            else:
                out[pos] = bt[b]
                b += 1
            pos += 1
        while pos < end:
            out[pos] = pos_token[sp[a]]
            a += 1
            pos += 1
        lengths[i] = length
    return out[:pos], lengths


@njit(cache=True, nogil=True)
def dense_to_csr(dense, transposed):  # type: ignore[no-untyped-def]
    """CSR (values in ``dense``'s dtype, int32 indices sorted, int64 indptr) of the nonzeros of a 2-D
    C-ordered array's rows — or of its columns when ``transposed`` (a genes × cells slab read as cells).

    Reads the array in memory order, twice (count, then fill); NaN counts as nonzero.
    """
    n0, n1 = dense.shape
    n_rows = n1 if transposed else n0
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    for a in range(n0):
        for b in range(n1):
            if dense[a, b] != 0:
                indptr[(b if transposed else a) + 1] += 1
    for r in range(n_rows):
        indptr[r + 1] += indptr[r]
    fill = indptr[:-1].copy()
    data = np.empty(indptr[n_rows], dtype=dense.dtype)
    indices = np.empty(indptr[n_rows], dtype=np.int32)
    for a in range(n0):
        for b in range(n1):
            v = dense[a, b]
            if v != 0:
                r, c = (b, a) if transposed else (a, b)
                k = fill[r]
                data[k] = v
                indices[k] = c
                fill[r] = k + 1
    return data, indices, indptr


@njit(cache=True, nogil=True)
def counts_from_values_csr(data, indices, indptr, tolerance, max_count):  # type: ignore[no-untyped-def]
    """One pass over a CSR block: check raw counts, round to int32, drop zeros, check index order.

    Returns (values int32, indices int32, indptr int64, ok): ``ok`` is False when any value is not a
    raw count (NaN, infinite, negative, further than ``tolerance`` from an integer, above
    ``max_count``) or a row's indices are not strictly increasing; the caller then takes the slow path
    that names the offending value, or sorts and sums duplicates.
    """
    n = indptr.shape[0] - 1
    nnz = indptr[n] - indptr[0]
    values = np.empty(nnz, dtype=np.int32)
    out_indices = np.empty(nnz, dtype=np.int32)
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    pos = 0
    for i in range(n):
        last = -1
        for k in range(indptr[i], indptr[i + 1]):
            x = data[k]
            if not (x >= 0 and x <= max_count):  # also NaN
                return values[:0], out_indices[:0], out_indptr, False
            r = np.int64(x)  # truncation: exact for integral values, no libm call
            if x != r:
                r = np.int64(np.rint(x))
                if abs(x - r) > tolerance:
                    return values[:0], out_indices[:0], out_indptr, False
            j = indices[k]
            if j <= last:
                return values[:0], out_indices[:0], out_indptr, False
            last = j
            if r != 0:
                values[pos] = np.int32(r)
                out_indices[pos] = j
                pos += 1
        out_indptr[i + 1] = pos
    return values[:pos], out_indices[:pos], out_indptr, True


# Problems :func:`cell_problems_csr` finds in a corpus row (bits of its uint16 result).
CELL_LENGTH_MISMATCH = 1
"""The ``length`` column differs from the number of tokens."""
CELL_TOKEN_OUT_OF_RANGE = 2
"""A token id is negative or beyond the token dictionary."""
CELL_TOKEN_NOT_IN_DICTIONARY = 4
"""A token id inside the range is neither a gene nor a special token of the dictionary."""
CELL_GENE_WITHOUT_MEDIAN = 8
"""A gene token whose gene has no median (outside the vocabulary)."""
CELL_DUPLICATE_TOKEN = 16
"""A token occurs twice in the cell."""
CELL_EMPTY = 32
"""The cell has no gene token."""
CELL_TOO_LONG = 64
"""More tokens than the layout allows."""
CELL_SPECIAL_MISPLACED = 128
"""A special token where the layout has none, or a missing ``<cls>``/``<eos>`` (gc104m)."""

# Kinds of token ids in the ``token_kind`` table of :func:`cell_problems_csr`.
TOKEN_UNKNOWN = 0
TOKEN_GENE = 1
TOKEN_GENE_WITHOUT_MEDIAN = 2
TOKEN_SPECIAL = 3


@njit(cache=True, nogil=True)
def cell_problems_csr(tokens, offsets, lengths, token_kind, cls_token, eos_token, wrap, max_length,  # type: ignore[no-untyped-def]
                       seen, first_stamp):
    """The problems of each row of a corpus's ``input_ids`` list column, as ``CELL_*`` bits (uint16).

    ``tokens`` (any integer dtype) and ``offsets`` (row ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``)
    are the list column's flat values and offsets; ``lengths`` is the ``length`` column. ``token_kind``
    (int8, one ``TOKEN_*`` per token id) describes the dictionary; ids outside it are out of range.
    With ``wrap`` (gc104m) the first token must be ``cls_token``, the last ``eos_token``, and no other
    special token may occur. Duplicates are found through ``seen`` (int64, one slot per token id; ids
    beyond it are out of range), which keeps the stamp ``first_stamp + i`` of the last row that held each
    id, so it is never cleared between rows or calls as long as the stamps keep increasing.
    """
    n = lengths.shape[0]
    flags = np.zeros(n, dtype=np.uint16)
    n_kinds = token_kind.shape[0]
    for i in range(n):
        start = offsets[i]
        stop = offsets[i + 1]
        m = stop - start
        f = 0
        if lengths[i] != m:
            f |= CELL_LENGTH_MISMATCH
        if m > max_length:
            f |= CELL_TOO_LONG
        stamp = first_stamp + i
        n_genes = 0
        for k in range(start, stop):
            t = tokens[k]
            if t < 0 or t >= seen.shape[0]:
                f |= CELL_TOKEN_OUT_OF_RANGE
                n_genes += 1
                continue
            if seen[t] == stamp:
                f |= CELL_DUPLICATE_TOKEN
            seen[t] = stamp
            if t >= n_kinds:
                f |= CELL_TOKEN_OUT_OF_RANGE
                n_genes += 1
                continue
            kind = token_kind[t]
            if kind == TOKEN_SPECIAL:
                at_cls = k == start and t == cls_token
                at_eos = k == stop - 1 and t == eos_token
                if not (wrap and (at_cls or at_eos)):
                    f |= CELL_SPECIAL_MISPLACED
                continue
            n_genes += 1
            if kind == TOKEN_UNKNOWN:
                f |= CELL_TOKEN_NOT_IN_DICTIONARY
            elif kind == TOKEN_GENE_WITHOUT_MEDIAN:
                f |= CELL_GENE_WITHOUT_MEDIAN
        if wrap and (m < 2 or tokens[start] != cls_token or tokens[stop - 1] != eos_token):
            f |= CELL_SPECIAL_MISPLACED
        if n_genes == 0:
            f |= CELL_EMPTY
        flags[i] = f
    return flags


@njit(cache=True, nogil=True, inline="always")
def _mix64(h, v):  # type: ignore[no-untyped-def]
    """Fold ``v`` into hash ``h`` (uint64): splitmix64's finalizer over ``h * 31 + v + golden ratio``."""
    z = h * np.uint64(31) + np.uint64(v) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _insert_ranked(genes, counts, base, n, cap, g, c):  # type: ignore[no-untyped-def]
    """Insert (g, c) into the ``n`` entries at ``base`` of ``genes``/``counts`` (count descending, then gene
    ascending) if it is among the best ``cap``; return the new number of entries."""
    if n == cap:
        last = base + cap - 1
        if not (c > counts[last] or (c == counts[last] and g < genes[last])):
            return n
        j = last
    else:
        j = base + n
        n += 1
    while j > base and (c > counts[j - 1] or (c == counts[j - 1] and g < genes[j - 1])):
        genes[j] = genes[j - 1]
        counts[j] = counts[j - 1]
        j -= 1
    genes[j] = g
    counts[j] = c
    return n


@njit(cache=True, nogil=True)
def fingerprint_csr(data, indices, indptr, selected, gene_group, n_groups, per_group, tops, min_count,  # type: ignore[no-untyped-def]
                    sketch_size):
    """Keys and sketch of each selected row, from its entries on genes with ``gene_group >= 0``.

    A row's entries are ranked by count descending, then gene ascending. Keys (uint64, 0 = none):
    ``n_groups`` group keys, of the row's first ``per_group`` entries of each group when there are that
    many and the last has a count of at least ``min_count``; then one key per ``tops[j]``, of the row's
    first ``tops[j]`` entries when the last has at least ``min_count`` and the next entry (if any) has a
    smaller count (the set is the same whatever else the row lacks). A key hashes its kind, genes and
    counts. The sketch is the first ``sketch_size`` (gene, count) pairs, -1 padded (int32, int64).
    Only the best entries are kept while a row is scanned (insertion into short ranked buffers): O(nnz).
    """
    n = indptr.shape[0] - 1
    n_keys = n_groups + tops.shape[0]
    keys = np.zeros((n, n_keys), dtype=np.uint64)
    sketch_genes = np.full((n, sketch_size), -1, dtype=np.int32)
    sketch_counts = np.full((n, sketch_size), -1, dtype=np.int64)
    cap = max(sketch_size, tops.max() + 1)
    top_g = np.empty(cap, dtype=np.int64)
    top_c = np.empty(cap, dtype=np.int64)
    grp_g = np.empty(n_groups * per_group, dtype=np.int64)
    grp_c = np.empty(n_groups * per_group, dtype=np.int64)
    grp_n = np.zeros(n_groups, dtype=np.int64)
    for i in range(n):
        if not selected[i]:
            continue
        n_top = 0
        grp_n[:] = 0
        for k in range(indptr[i], indptr[i + 1]):
            c = np.int64(data[k])
            if c <= 0:
                continue
            g = np.int64(indices[k])
            # most entries are 1s: below min_count an entry is in no valid key, so once the sketch is full
            # it only matters if it still ranks into the sketch
            if c < min_count and n_top == cap and (c < top_c[cap - 1] or (c == top_c[cap - 1] and g > top_g[cap - 1])):
                continue
            b = gene_group[g]
            if b < 0:
                continue
            n_top = _insert_ranked(top_g, top_c, 0, n_top, cap, g, c)
            if c >= min_count:  # a group key needs all its genes at min_count or more
                grp_n[b] = _insert_ranked(grp_g, grp_c, b * per_group, grp_n[b], per_group, g, c)
        for j in range(min(n_top, sketch_size)):
            sketch_genes[i, j] = top_g[j]
            sketch_counts[i, j] = top_c[j]
        for b in range(n_groups):
            if grp_n[b] == per_group:
                h = np.uint64(b + 1)
                for j in range(b * per_group, (b + 1) * per_group):
                    h = _mix64(_mix64(h, grp_g[j]), grp_c[j])
                keys[i, b] = h
        for t in range(tops.shape[0]):
            k = tops[t]
            # the buffer holds more than max(tops) entries, so n_top > k exactly when the row has more than k
            if n_top < k or top_c[k - 1] < min_count or (n_top > k and top_c[k] == top_c[k - 1]):
                continue
            h = np.uint64(1000 + k)
            for j in range(k):
                h = _mix64(_mix64(h, top_g[j]), top_c[j])
            keys[i, n_groups + t] = h
    return keys, sketch_genes, sketch_counts


@njit(cache=True, nogil=True)
def sketch_agreement(genes_a, counts_a, genes_b, counts_b):  # type: ignore[no-untyped-def]
    """Per pair of sketch rows (-1 padded): genes in both, and of them genes with other counts (int64)."""
    n, width = genes_a.shape
    common = np.zeros(n, dtype=np.int64)
    differ = np.zeros(n, dtype=np.int64)
    for i in range(n):
        for x in range(width):
            g = genes_a[i, x]
            if g < 0:
                break
            for y in range(width):
                h = genes_b[i, y]
                if h < 0:
                    break
                if h == g:
                    common[i] += 1
                    if counts_a[i, x] != counts_b[i, y]:
                        differ[i] += 1
                    break
    return common, differ


@njit(cache=True, nogil=True)
def compare_rows_csr(indptr, indices, data, rows_a, rows_b, masks, mask_of_pair):  # type: ignore[no-untyped-def]
    """Per pair of rows (sorted indices): genes nonzero in either row among ``masks[mask_of_pair[p]]`` (bool
    per column), and of them genes whose values differ (int64 each)."""
    n = rows_a.shape[0]
    union = np.zeros(n, dtype=np.int64)
    differ = np.zeros(n, dtype=np.int64)
    for p in range(n):
        mask = masks[mask_of_pair[p]]
        x, x_end = indptr[rows_a[p]], indptr[rows_a[p] + 1]
        y, y_end = indptr[rows_b[p]], indptr[rows_b[p] + 1]
        while x < x_end or y < y_end:
            if y >= y_end or (x < x_end and indices[x] < indices[y]):
                if mask[indices[x]]:
                    union[p] += 1
                    differ[p] += 1
                x += 1
            elif x >= x_end or indices[y] < indices[x]:
                if mask[indices[y]]:
                    union[p] += 1
                    differ[p] += 1
                y += 1
            else:
                if mask[indices[x]]:
                    union[p] += 1
                    if data[x] != data[y]:
                        differ[p] += 1
                x += 1
                y += 1
    return union, differ
