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
def _collapse_csr(data, indices, indptr, col_to_gene, n_genes, injective):  # type: ignore[no-untyped-def]
    """Sum input columns into genes: ``col_to_gene[col]`` is the gene index or -1 (dropped).

    With ``injective`` (no two columns map to one gene) entries are only renamed and filtered.
    Returns a CSR (int64 data, int32 indices, int64 indptr) over ``n_genes`` columns whose indices are
    unique within a row but not necessarily sorted (no consumer needs them sorted).
    """
    n = indptr.shape[0] - 1
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    out_indices = np.empty(indices.shape[0], dtype=np.int32)
    out_data = np.empty(indices.shape[0], dtype=np.int64)
    pos = 0
    if injective:
        for i in range(n):
            for k in range(indptr[i], indptr[i + 1]):
                g = col_to_gene[indices[k]]
                if g >= 0:
                    out_indices[pos] = g
                    out_data[pos] = data[k]
                    pos += 1
            out_indptr[i + 1] = pos
        return out_data[:pos], out_indices[:pos], out_indptr
    acc = np.zeros(n_genes, dtype=np.int64)
    for i in range(n):
        start = pos
        for k in range(indptr[i], indptr[i + 1]):
            g = col_to_gene[indices[k]]
            if g < 0:
                continue
            if acc[g] == 0:
                out_indices[pos] = g
                pos += 1
            acc[g] += data[k]
        for j in range(start, pos):
            g = out_indices[j]
            out_data[j] = acc[g]
            acc[g] = 0
        out_indptr[i + 1] = pos
    return out_data[:pos], out_indices[:pos], out_indptr


@njit(cache=True, nogil=True)
def _value_window_csr(data, indices, indptr, depth, keep, lo, hi):  # type: ignore[no-untyped-def]
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
def _value_histogram_csr(data, indices, indptr, depth, keep, lo, shift, hist):  # type: ignore[no-untyped-def]
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
def _value_select_csr(data, indices, indptr, depth, keep, lo, shift, bin_lo, bin_hi):  # type: ignore[no-untyped-def]
    """(gene int32, key uint64) of the kept rows' values whose bin lies in ``[bin_lo, bin_hi]`` of the gene."""
    buf = np.empty(1, dtype=np.float64)
    bits = buf.view(np.uint64)
    genes = np.empty(16, dtype=np.int32)
    keys = np.empty(16, dtype=np.uint64)
    pos = 0
    for i in range(indptr.shape[0] - 1):
        if not keep[i]:
            continue
        d = depth[i]
        for k in range(indptr[i], indptr[i + 1]):
            g = indices[k]
            if bin_lo[g] < 0:
                continue
            buf[0] = data[k] / d * TARGET_SUM
            key = bits[0]
            b = np.int64((key - lo[g]) >> shift[g])
            if bin_lo[g] <= b <= bin_hi[g]:
                if pos == genes.shape[0]:
                    genes = np.concatenate((genes, np.empty_like(genes)))
                    keys = np.concatenate((keys, np.empty_like(keys)))
                genes[pos] = g
                keys[pos] = key
                pos += 1
    return genes[:pos].copy(), keys[:pos].copy()


N_COUNT_BUCKETS = 8
"""Counts 1..N_COUNT_BUCKETS get a bucket of their own in the encoder; larger counts share one."""

_DEBRUIJN = np.array([
    0, 1, 48, 2, 57, 49, 28, 3, 61, 58, 50, 42, 38, 29, 17, 4, 62, 55, 59, 36, 53, 51, 43, 22, 45, 39,
    33, 30, 24, 18, 12, 5, 63, 47, 56, 27, 60, 41, 37, 16, 54, 35, 52, 21, 44, 32, 23, 11, 46, 26, 40,
    15, 34, 20, 31, 10, 25, 14, 19, 9, 13, 8, 7, 6], dtype=np.int64)
_DEBRUIJN_MAGIC = np.uint64(0x03F79D71B4CB0A89)


@njit(cache=True, nogil=True, inline="always")
def _value(c, head_c, d, d32, r32, r64, med, inv_med, float32_head, reciprocal):  # type: ignore[no-untyped-def]
    """The normalized value of count ``c`` (``head_c`` = its precomputed head, or NaN)."""
    if head_c == head_c:  # not NaN: precomputed
        head = head_c
    elif reciprocal:
        if float32_head:
            head = np.float64((np.float32(c) * r32) * np.float32(TARGET_SUM))
        else:
            head = (c * r64) * TARGET_SUM
    elif float32_head:
        head = np.float64((np.float32(c) / d32) * np.float32(TARGET_SUM))
    else:
        head = c / d * TARGET_SUM
    if reciprocal:
        return head * inv_med
    return head / med


@njit(cache=True, nogil=True)
def _sort_ranks(rs, lo, hi, bitmap):  # type: ignore[no-untyped-def]
    """Sort the distinct rank positions ``rs[lo:hi]`` ascending (bitmap for many, insertion for few)."""
    n = hi - lo
    if n <= 48:
        for i in range(lo + 1, hi):
            x = rs[i]
            j = i - 1
            while j >= lo and rs[j] > x:
                rs[j + 1] = rs[j]
                j -= 1
            rs[j + 1] = x
        return
    wmin = bitmap.shape[0]
    wmax = -1
    for i in range(lo, hi):
        r = rs[i]
        w = r >> 6
        bitmap[w] |= np.uint64(1) << np.uint64(r & 63)
        wmin = min(wmin, w)
        wmax = max(wmax, w)
    pos = lo
    for w in range(wmin, wmax + 1):
        x = bitmap[w]
        if x == 0:
            continue
        bitmap[w] = np.uint64(0)
        while x != 0:
            t = x & (~x + np.uint64(1))
            bit = _DEBRUIJN[(t * _DEBRUIJN_MAGIC) >> np.uint64(58)]
            rs[pos] = (w << 6) + bit
            pos += 1
            x ^= t


@njit(cache=True, nogil=True)
def _rank_value_encode_csr(  # type: ignore[no-untyped-def]
    data, indices, indptr, keep, depth, rank_of, rank_token, rank_median, rank_inv_median,
    max_genes, float32_head, reciprocal, float32_reciprocal,
):
    """Rank value encoding of the kept rows: tokens of their genes by descending normalized value.

    Genes are given *rank positions*: the vocabulary sorted by (median ascending, token ascending);
    ``rank_of[column]`` is the position of a column's gene, or -1 outside the vocabulary. For a fixed
    count, a cell's values are non-increasing along rank positions (dividing by a larger median, or
    multiplying by a smaller reciprocal, never gives a larger float). So each cell is split into buckets
    of equal count, each bucket is put in rank order (a bitmap pass, no comparison sort), equal values
    inside a bucket are put in token order, and the buckets are merged by (value descending, token
    ascending) until ``max_genes`` tokens are out. Counts above :data:`N_COUNT_BUCKETS` share a bucket
    that is sorted by comparison. The result is exactly a stable sort by descending value with ties by
    ascending token (SPEC §2.6).

    Value arithmetic: ``count / depth * 10,000 / median`` in float64 by default. ``float32_head``
    evaluates ``count / depth * 10,000`` in float32; ``reciprocal`` multiplies by ``1 / depth`` and
    ``1 / median`` instead of dividing (SciPy's sparse division), with ``1 / depth`` in float32 when
    ``float32_reciprocal`` — the combinations Geneformer's NumPy/SciPy expression produces.

    Returns the flat tokens (int32) of the kept rows and each row's length (int64; 0 for dropped rows).
    """
    n = indptr.shape[0] - 1
    nb = N_COUNT_BUCKETS + 1
    bound = 0
    width = 0
    for i in range(n):
        w = indptr[i + 1] - indptr[i]
        width = max(width, w)
        if keep[i]:
            bound += min(w, max_genes)
    out = np.empty(bound, dtype=np.int32)
    lengths = np.zeros(n, dtype=np.int64)
    rs = np.empty(width, dtype=np.int32)
    cs = np.empty(width, dtype=np.int64)
    vals = np.empty(width, dtype=np.float64)
    toks = np.empty(width, dtype=np.int32)
    cnt = np.zeros(nb, dtype=np.int64)
    off = np.zeros(nb + 1, dtype=np.int64)
    fill = np.zeros(nb, dtype=np.int64)
    heads = np.empty(nb, dtype=np.float64)
    bitmap = np.zeros((rank_token.shape[0] >> 6) + 1, dtype=np.uint64)
    pos = 0
    for i in range(n):
        if not keep[i]:
            continue
        a, z = indptr[i], indptr[i + 1]
        cnt[:] = 0
        for k in range(a, z):
            if rank_of[indices[k]] >= 0:
                c = data[k]
                cnt[c - 1 if c <= N_COUNT_BUCKETS else N_COUNT_BUCKETS] += 1
        off[0] = 0
        for b in range(nb):
            off[b + 1] = off[b] + cnt[b]
            fill[b] = off[b]
        total = off[nb]
        if total == 0:
            continue
        for k in range(a, z):
            r = rank_of[indices[k]]
            if r >= 0:
                c = data[k]
                b = c - 1 if c <= N_COUNT_BUCKETS else N_COUNT_BUCKETS
                rs[fill[b]] = r
                cs[fill[b]] = c
                fill[b] += 1
        d = depth[i]
        d32 = np.float32(d)
        r32 = np.float32(1.0) / d32
        r64 = np.float64(r32) if float32_reciprocal else 1.0 / d
        for b in range(N_COUNT_BUCKETS):
            heads[b] = _value(b + 1, np.nan, d, d32, r32, r64, 1.0, 1.0, float32_head, reciprocal)
        # put every count bucket in rank order; compute values; equal values in token order
        for b in range(N_COUNT_BUCKETS):
            lo, hi = off[b], off[b + 1]
            if hi - lo == 0:
                continue
            _sort_ranks(rs, lo, hi, bitmap)
            head = heads[b]
            for j in range(lo, hi):
                r = rs[j]
                if reciprocal:
                    vals[j] = head * rank_inv_median[r]
                else:
                    vals[j] = head / rank_median[r]
                toks[j] = rank_token[r]
                t = toks[j]
                v = vals[j]
                q = j
                while q > lo and vals[q - 1] == v and toks[q - 1] > t:
                    toks[q] = toks[q - 1]
                    q -= 1
                toks[q] = t
        # the bucket of large counts: sort by (value descending, token ascending)
        lo, hi = off[N_COUNT_BUCKETS], off[nb]
        for j in range(lo, hi):
            r = rs[j]
            v = _value(cs[j], np.nan, d, d32, r32, r64, rank_median[r], rank_inv_median[r],
                       float32_head, reciprocal)
            t = rank_token[r]
            q = j
            while q > lo and (vals[q - 1] < v or (vals[q - 1] == v and toks[q - 1] > t)):
                vals[q] = vals[q - 1]
                toks[q] = toks[q - 1]
                q -= 1
            vals[q] = v
            toks[q] = t
        # merge the buckets
        for b in range(nb):
            fill[b] = off[b]
        length = min(total, max_genes)
        for j in range(length):
            best = -1
            bv = 0.0
            bt = 0
            for b in range(nb):
                h = fill[b]
                if h < off[b + 1]:
                    v = vals[h]
                    t = toks[h]
                    if best < 0 or v > bv or (v == bv and t < bt):
                        best = b
                        bv = v
                        bt = t
            out[pos] = bt
            pos += 1
            fill[best] += 1
        lengths[i] = length
    return out[:pos], lengths


@njit(cache=True, nogil=True)
def _counts_from_values_csr(data, indices, indptr, tolerance, max_count):  # type: ignore[no-untyped-def]
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
            r = np.rint(x)
            if not (r >= 0 and r <= max_count and abs(x - r) <= tolerance):
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
