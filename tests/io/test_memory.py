"""Block reads of the streaming formats allocate about one block, not the file."""

from __future__ import annotations

import tracemalloc
from typing import TYPE_CHECKING

import numpy as np
import pytest

from genecorpus import testing
from genecorpus.io import open_dataset

if TYPE_CHECKING:
    from pathlib import Path

N_CELLS, N_GENES, BLOCK = 6000, 500, 60


@pytest.fixture(scope="module")
def big_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("big")
    counts = testing.random_counts(N_CELLS, N_GENES, density=0.2, seed=9)
    ids = {"cell_ids": testing.cell_ids_for(N_CELLS), "gene_ids": testing.gene_ids_for(N_GENES)}
    return {
        "h5ad-csr": testing.write_h5ad(root / "csr.h5ad", counts, **ids),
        "h5ad-dense": testing.write_h5ad(root / "dense.h5ad", counts, **ids, x_format="dense"),
        "loom": testing.write_loom(root / "big.loom", counts, **ids),
        "10x-h5": testing.write_10x_h5(root / "big.h5", counts, **ids),
    }


@pytest.mark.parametrize("case", ["h5ad-csr", "h5ad-dense", "loom", "10x-h5"])
def test_block_read_memory_is_bounded_by_the_block(big_files: dict[str, Path], case: str) -> None:
    whole_dense_bytes = N_CELLS * N_GENES * np.dtype(np.float32).itemsize  # 12 MB
    block_dense_bytes = BLOCK * N_GENES * np.dtype(np.float64).itemsize  # 240 kB
    with open_dataset(big_files[case]) as source:
        source.read_block(0, BLOCK)  # warm caches (var names, h5py metadata)
        tracemalloc.start()
        try:
            for start in range(BLOCK, 20 * BLOCK, BLOCK):
                block = source.read_block(start, start + BLOCK)
                assert block.n_cells == BLOCK
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 * block_dense_bytes < whole_dense_bytes / 5
