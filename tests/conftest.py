"""Shared fixtures: real public datasets (downloaded once, cached) and the Geneformer dictionaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from genecorpus.public_data import fetch_public_file

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
