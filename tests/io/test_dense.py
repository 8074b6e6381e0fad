"""Dense slabs (dense h5ad X, loom's genes × cells matrix) to CSR, against scipy.sparse."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from genecorpus import _kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.uint16, np.int64])
@pytest.mark.parametrize("transposed", [False, True])
def test_dense_to_csr_matches_scipy(dtype: type, transposed: bool) -> None:
    rng = np.random.default_rng(3)
    dense = (rng.poisson(0.3, (300, 70)) * (rng.random((300, 70)) < 0.4)).astype(dtype)
    dense[5] = 0  # an empty row and an empty column
    dense[:, 9] = 0
    expected = sp.csr_matrix(dense.T if transposed else dense)
    data, indices, indptr = _kernels.dense_to_csr(dense, transposed)
    got = sp.csr_matrix((data, indices, indptr), shape=expected.shape)
    assert got.dtype == expected.dtype
    assert got.has_sorted_indices
    np.testing.assert_array_equal(got.indptr, expected.indptr)
    np.testing.assert_array_equal(got.indices, expected.indices)
    np.testing.assert_array_equal(got.data, expected.data)


def test_nan_is_kept_as_a_value() -> None:
    """NaN is nonzero: it must reach count validation, which names it."""
    data, indices, indptr = _kernels.dense_to_csr(np.array([[np.nan, 0], [0, 1]], dtype=np.float32), False)
    assert np.isnan(data[0]) and indices.tolist() == [0, 1] and indptr.tolist() == [0, 1, 2]
