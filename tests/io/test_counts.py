"""validate_counts: the gate every block goes through, against a slow dense NumPy reference."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import scipy.sparse as sp

import genecorpus.io.counts
import genecorpus.io.registry
import genecorpus.io.text
import genecorpus.testing
from genecorpus.errors import CountsError
from genecorpus.io.counts import validate_counts
from genecorpus.testing import random_counts

CELLS = [f"cell{i}" for i in range(6)]
GENES = [f"gene{j}" for j in range(8)]


def _validate(matrix: object, *, start: int = 0) -> sp.csr_matrix:
    return validate_counts(matrix, path="data.h5ad", cell_ids=CELLS, gene_ids=GENES, start=start)


def reference_counts(dense: np.ndarray) -> np.ndarray:
    """Slow reference: every value finite, >= 0 and within 1e-6 of an integer, then rounded."""
    for value in dense.ravel().tolist():
        assert np.isfinite(value)
        assert value >= 0
        assert abs(value - round(value)) <= 1e-6
    return np.rint(dense).astype(np.int64)


def assert_canonical(csr: sp.csr_matrix) -> None:
    assert isinstance(csr, sp.csr_matrix)
    assert (csr.data.dtype, csr.indices.dtype, csr.indptr.dtype) == (np.int32, np.int32, np.int64)
    assert (csr.data != 0).all()
    for row in range(csr.shape[0]):
        assert (np.diff(csr.indices[csr.indptr[row] : csr.indptr[row + 1]]) > 0).all()


@pytest.mark.parametrize(
    "dtype",
    [
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
    ],
)
def test_every_numeric_dtype_matches_reference(dtype: type) -> None:
    counts = random_counts(6, 8, density=0.5, seed=2)
    counts.data = np.minimum(counts.data, 100)  # fits int8 and float16 exactly
    matrix = counts.copy()
    matrix.data = counts.data.astype(dtype)  # as a reader builds it (scipy refuses float16 itself)
    out = _validate(matrix)
    assert_canonical(out)
    np.testing.assert_array_equal(out.toarray(), reference_counts(counts.toarray().astype(float)))


def test_bool_dense_and_coo_inputs() -> None:
    dense = np.array([[0, 1], [1, 0]], dtype=bool)
    assert _validate(dense).toarray().tolist() == [[0, 1], [1, 0]]
    assert _validate(sp.coo_matrix(dense.astype(float))).toarray().tolist() == [[0, 1], [1, 0]]


def test_near_integers_rounded_and_zeros_dropped() -> None:
    dense = np.array(
        [[2 + 0.9e-6, 0.0, 1e-9], [0.0, 5 - 0.9e-6, 0.0], [0.0, 0.0, 0.0]], dtype=np.float64
    )
    csr = sp.csr_matrix(dense)
    csr.data[csr.data == 0] = 0  # make sure nothing odd
    with_explicit_zero = sp.csr_matrix(
        (
            np.array([2 + 0.9e-6, 0.0, 1e-9, 5 - 0.9e-6]),
            np.array([0, 1, 2, 1]),
            np.array([0, 3, 4, 4]),
        ),
        shape=(3, 3),
    )
    for matrix in (csr, with_explicit_zero):
        out = _validate(matrix)
        assert_canonical(out)
        assert out.toarray().tolist() == [[2, 0, 0], [0, 5, 0], [0, 0, 0]]
        assert out.nnz == 2


def test_tolerance_is_one_millionth() -> None:
    with pytest.raises(CountsError, match="not an integer"):
        _validate(sp.csr_matrix(np.array([[2 + 2e-6]])))


def test_duplicates_summed_and_indices_sorted() -> None:
    matrix = sp.csr_matrix(
        (np.array([3.0, 1.0, 2.0, 4.0]), np.array([5, 1, 5, 0]), np.array([0, 3, 4])), shape=(2, 8)
    )
    out = _validate(matrix)
    assert_canonical(out)
    assert out.toarray()[0].tolist() == [0, 1, 0, 0, 0, 5, 0, 0]
    assert out.toarray()[1].tolist() == [4, 0, 0, 0, 0, 0, 0, 0]


def test_duplicates_overflowing_int32_are_refused() -> None:
    matrix = sp.csr_matrix(
        (np.array([2**31 - 1, 5], dtype=np.int64), np.array([3, 3]), np.array([0, 2])), shape=(1, 8)
    )
    with pytest.raises(CountsError, match="duplicate entries sum"):
        _validate(matrix)


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (-2.0, "negative"),
        (1.5, "not an integer"),
        (np.nan, "NaN"),
        (np.inf, "infinite"),
        (-np.inf, "-infinite"),
        (2.0**31, "larger than"),
    ],
)
def test_message_names_file_first_cell_and_gene(value: float, words: str) -> None:
    # bad values at (3, 7), (3, 2) stored in that order, and (5, 0): (3, 2) comes first
    matrix = sp.csr_matrix(
        (
            np.array([1.0, value, value, value]),
            np.array([4, 7, 2, 0]),
            np.array([0, 1, 1, 1, 3, 3, 4]),
        ),
        shape=(6, 8),
    )
    with pytest.raises(CountsError) as info:
        _validate(matrix, start=100)
    message = str(info.value)
    assert message.startswith("data.h5ad: cell 'cell3' (row 103), gene 'gene2' (column 2)")
    assert words in message
    assert "3 bad value(s)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("values", "dtype"),
    [
        ([-1], np.int64),
        ([-1], np.int8),
        ([2**31], np.int64),
        ([2**32], np.uint64),
        ([2**31], np.uint32),
    ],
)
def test_bad_integers(values: list[int], dtype: type) -> None:
    matrix = sp.csr_matrix(
        (np.array(values, dtype=dtype), np.array([1]), np.array([0, 1])), shape=(1, 8)
    )
    with pytest.raises(CountsError, match=r"cell 'cell0'.*gene 'gene1'"):
        _validate(matrix)


def test_random_blocks_match_reference() -> None:
    rng = np.random.default_rng(0)
    for seed in range(5):
        counts = random_counts(40, 30, density=0.2, seed=seed).astype(np.float64)
        counts.data += rng.uniform(-1e-7, 1e-7, counts.nnz)
        out = validate_counts(
            counts,
            path="x",
            cell_ids=[str(i) for i in range(40)],
            gene_ids=[str(j) for j in range(30)],
        )
        assert_canonical(out)
        np.testing.assert_array_equal(out.toarray(), reference_counts(counts.toarray()))


def test_random_counts_contract() -> None:
    counts = random_counts(200, 300, density=0.1, seed=4)
    assert counts.shape == (200, 300)
    assert counts.data.dtype == np.int32
    assert counts.has_canonical_format
    assert (counts.data >= 1).all()
    assert 0.08 < counts.nnz / (200 * 300) <= 0.1
    assert np.mean(counts.data <= 3) > 0.7  # mostly 1-3
    assert counts.data.max() > 50  # with a long tail
    assert (random_counts(200, 300, density=0.1, seed=4) != counts).nnz == 0  # deterministic


@pytest.mark.parametrize(
    "module",
    [genecorpus.io.registry, genecorpus.io.counts, genecorpus.io.text, genecorpus.testing],
)
def test_docstring_examples(module: object) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)  # type: ignore[arg-type]
    assert result.failed == 0
