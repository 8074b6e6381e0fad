"""Shared fixtures: real public datasets (downloaded once, cached), the optional published files of the
shared folder (Geneformer dictionaries, Genecorpus sample, Kang labels), and corpora several modules use.

The shared folder is ``$GENECORPUS_SHARED``, else ``../shared`` beside the checkout. Tests take its files
through the fixtures below only, so that one variable moves them all and every skip says where it looked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest

from genecorpus import genes
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import random_counts, write_h5ad, write_loom

if TYPE_CHECKING:
    from collections.abc import Iterator

    from genecorpus.executors import LocalExecutor

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GENECORPUS_SHARED", REPO.parent / "shared"))
GENEFORMER_DICTS = SHARED / "geneformer-dicts"
GENECORPUS_SAMPLE = SHARED / "genecorpus-sample" / "genecorpus_500_samples.parquet"
KANG_LABELS = SHARED / "labels" / "kang_ifnb_labels.csv"
SET_SHARED = ("optional file: set GENECORPUS_SHARED to the folder that holds geneformer-dicts/, "
              "genecorpus-sample/ and labels/ to run this test")

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
def celltypist_frame(celltypist_csv: Path) -> pd.DataFrame:
    """The celltypist sample read by pandas (cells x symbols, floats as written), parsed once: several
    modules check against it and pandas takes seconds over its 32,786 columns. Treat it as read-only."""
    return pd.read_csv(celltypist_csv, index_col=0, low_memory=False)


@pytest.fixture(scope="session")
def celltypist_subset_csv(celltypist_frame: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 120 celltypist cells over every 10th of its genes and all its MT- genes, written as the
    original is (CSV, cells as rows, empty corner label, float noise kept): the real file's format and
    values at a fraction of its parsing time (which grows with the 32,786 columns)."""
    columns = list(dict.fromkeys([c for c in celltypist_frame.columns if c.startswith("MT-")]
                                 + list(celltypist_frame.columns[::10])))
    path = tmp_path_factory.mktemp("celltypist-subset") / "celltypist120.csv"
    celltypist_frame.iloc[:120][columns].to_csv(path)
    return path


def _shared_file(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path}; {SET_SHARED}")
    return path


@pytest.fixture(scope="session")
def shared_folder() -> Path:
    """The shared folder (``$GENECORPUS_SHARED``, else ``../shared``); it may be absent."""
    return SHARED


@pytest.fixture(scope="session")
def geneformer_dicts() -> Path:
    """The published Geneformer dictionaries (skipped where the shared folder lacks them)."""
    return _shared_file(GENEFORMER_DICTS / "token_dictionary_gc30M.pkl", "the Geneformer dictionaries").parent


@pytest.fixture(scope="session")
def genecorpus_sample() -> Path:
    """The published Genecorpus-30M sample, 500 cells in one parquet file (skipped where absent)."""
    return _shared_file(GENECORPUS_SAMPLE, "the published Genecorpus-30M sample")


@pytest.fixture(scope="session")
def kang_labels() -> Path:
    """The Kang / Seurat cell-type labels of the Kang 2018 PBMC cells (skipped where absent)."""
    return _shared_file(KANG_LABELS, "the Kang PBMC labels")


@pytest.fixture(scope="session")
def kang_gc30m(kang_control: Path, geneformer_dicts: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Kang PBMC control data tokenized with the published gc30M dictionaries (read-only:
    test_tokenize compares it with the reference encoding, test_validate validates it)."""
    from genecorpus.build import tokenize

    out = tmp_path_factory.mktemp("kang-gc30m") / "corpus"
    tokenize([kang_control], out, token_dictionary=geneformer_dicts / "token_dictionary_gc30M.pkl",
             gene_medians=geneformer_dicts / "gene_median_dictionary_gc30M.pkl", gene_id="symbol", report=False)
    return out


@pytest.fixture(scope="session")
def two_worker_pool() -> Iterator[LocalExecutor]:
    """Two local worker processes, started once for the in-process builds that compare one worker with
    two (``build_corpus(..., executor=two_worker_pool)``): starting a pool costs more than those builds.
    ``workers=2`` itself, which starts a pool per build, is used by test_api, test_build and the command
    line tests."""
    from genecorpus.executors import LocalExecutor

    pool = LocalExecutor(2)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the tiny models: a second thread gains nothing at their size, and two threads
    crawl (tens of seconds per test) when other processes share the machine's two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
