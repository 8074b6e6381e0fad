"""Shared fixtures: real public datasets (downloaded once, cached) and the Geneformer dictionaries."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from genecorpus import genes
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import random_counts, write_h5ad, write_loom

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENECORPUS_SHARED", REPO.parent / "shared"))
GENEFORMER_DICTS = SHARED / "geneformer-dicts"

os.environ.setdefault("GENECORPUS_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def kang_control() -> Path:
    """Kang 2018 PBMC control: 3,000 cells x 35,635 hg19 symbols, float32 CSC raw counts."""
    return fetch_public_file("kang_pbmc_control")


@pytest.fixture(scope="session")
def celltypist_csv() -> Path:
    """559 immune cells x 32,786 symbols, cells as rows, float counts with ~1e-12 noise."""
    return fetch_public_file("celltypist_sample")


@pytest.fixture(scope="session")
def geneformer_dicts() -> Path:
    """The published Geneformer dictionaries (skipped where ../shared is absent)."""
    if not (GENEFORMER_DICTS / "token_dictionary_gc30M.pkl").exists():
        pytest.skip(f"Geneformer dictionaries not found at {GENEFORMER_DICTS} (set GENECORPUS_SHARED)")
    return GENEFORMER_DICTS


@pytest.fixture(scope="session")
def h5ad_and_loom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two small generated datasets over the same genes: 230 cells in an h5ad, 170 in a dense loom."""
    folder = tmp_path_factory.mktemp("h5ad-and-loom")
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    a = random_counts(230, len(ids), density=0.15, seed=1)
    b = random_counts(170, len(ids), density=0.2, seed=2)
    pa = write_h5ad(folder / "a.h5ad", a, cell_ids=np.array([f"a{i}" for i in range(230)], dtype=object),
                    gene_ids=ids)
    pb = write_loom(folder / "b.loom", b, cell_ids=np.array([f"b{i}" for i in range(170)], dtype=object),
                    gene_ids=ids)
    return Path(pa), Path(pb)
