"""Shared data for the reader tests: one small count matrix written once in every format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genecorpus import testing

if TYPE_CHECKING:
    from pathlib import Path

N_CELLS = 53
N_GENES = 41

FILE_CASES = (
    "h5ad-csr",
    "h5ad-csc",
    "h5ad-dense",
    "loom",
    "zarr-v2-csr",
    "zarr-v3-csc",
    "zarr-v3-dense",
    "10x-mtx-v2",
    "10x-mtx-v3",
    "10x-h5-v2",
    "10x-h5-v3",
    "csv-cells-as-rows",
    "tsv-cells-as-columns",
    "txt-cells-as-columns",
)
"""The cases :func:`genecorpus.testing.write_all_formats` writes."""


def make_counts() -> sp.csr_matrix:
    """The shared matrix: random counts with one empty cell, one empty gene and one large count."""
    counts = testing.random_counts(N_CELLS, N_GENES, density=0.3, seed=7).tolil()
    counts[4, :] = 0
    counts[:, 9] = 0
    counts[20, 3] = 123_456
    out = sp.csr_matrix(counts, dtype=np.int64)
    out.eliminate_zeros()
    return out


def make_obs() -> dict[str, Any]:
    """Per-cell columns of every kind: strings, categorical, float, int, bool."""
    rng = np.random.default_rng(3)
    return {
        "donor": np.array([f"donor-{i % 5}-é" for i in range(N_CELLS)], dtype=object),
        "cell_type": pd.Categorical(rng.choice(["B cell", "T cell", "NK cell"], N_CELLS)),
        "score": rng.normal(size=N_CELLS),
        "n_counts_given": rng.integers(100, 5000, size=N_CELLS),
        "filter_pass": rng.random(N_CELLS) > 0.2,
    }


@dataclass(frozen=True)
class Dataset:
    """The truth every case is written from."""

    counts: sp.csr_matrix
    cell_ids: list[str]
    gene_ids: list[str]
    obs: dict[str, Any]
    paths: dict[str, Path]

    @property
    def n_cells(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_genes(self) -> int:
        return int(self.counts.shape[1])

    def source(self, case: str) -> Any:
        """What to pass to open_dataset for a case (a path, or an AnnData for ``anndata``)."""
        if case == "anndata":
            return anndata.AnnData(
                X=self.counts.astype(np.float32),
                obs=pd.DataFrame(self.obs, index=pd.Index(self.cell_ids, dtype=object)),
                var=pd.DataFrame(index=pd.Index(self.gene_ids, dtype=object)),
            )
        return self.paths[case]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """The shared matrix written in every format (once per session)."""
    counts = make_counts()
    cell_ids = testing.cell_ids_for(N_CELLS)
    gene_ids = testing.gene_ids_for(N_GENES)
    obs = make_obs()
    paths = testing.write_all_formats(
        tmp_path_factory.mktemp("formats"), counts, cell_ids=cell_ids, gene_ids=gene_ids, obs=obs
    )
    assert set(paths) == set(FILE_CASES)
    return Dataset(counts, cell_ids, gene_ids, obs, paths)


@pytest.fixture(params=(*FILE_CASES, "anndata"))
def case(request: pytest.FixtureRequest) -> str:
    """Every format and layout, one at a time."""
    return str(request.param)
