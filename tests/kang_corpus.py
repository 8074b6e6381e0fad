"""A small corpus of real Kang 2018 PBMC cells, as the model tests build it."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import scipy.sparse as sp

from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import write_h5ad

if TYPE_CHECKING:
    from pathlib import Path


def kang_corpus(folder: Path, n_control: int, n_stimulated: int, *, seed: int) -> Path:
    """``folder/corpus``: a seeded random choice of ``n_control`` control and ``n_stimulated`` IFN-β-stimulated
    cells of the real Kang 2018 files, as two datasets (ids ``kang_pbmc_ctrl`` and ``kang_pbmc_stim``)."""
    paths = []
    for name, n in (("kang_pbmc_ctrl", n_control), ("kang_pbmc_stim", n_stimulated)):
        adata = ad.read_h5ad(fetch_public_file(name))
        rows = np.sort(np.random.default_rng(seed).choice(adata.n_obs, n, replace=False))
        paths.append(write_h5ad(folder / f"{name}.h5ad", sp.csr_matrix(adata.X[rows]),
                                cell_ids=adata.obs_names[rows].to_numpy(dtype=object),
                                gene_ids=adata.var_names.to_numpy(dtype=object)))
    config = BuildConfig(datasets=tuple(DatasetSpec(path=str(p), id=p.stem, gene_id="symbol") for p in paths))
    return build_corpus(config, folder / "corpus", workers=1, report=False).path
