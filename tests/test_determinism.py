"""Same inputs and settings → identical bytes, whatever the block size or the number of workers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.testing import random_counts, write_h5ad, write_loom


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("det")
    cands = genes.candidate_genes()
    ids = np.concatenate([cands[::40][:400], genes.mito_genes()[:13]]).astype(object)
    a = random_counts(230, len(ids), density=0.15, seed=1)
    b = random_counts(170, len(ids), density=0.2, seed=2)
    pa = write_h5ad(folder / "a.h5ad", a, cell_ids=np.array([f"a{i}" for i in range(230)], dtype=object),
                    gene_ids=ids)
    pb = write_loom(folder / "b.loom", b, cell_ids=np.array([f"b{i}" for i in range(170)], dtype=object),
                    gene_ids=ids)
    return Path(pa), Path(pb)


@pytest.fixture(scope="module")
def reference_build(two_datasets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "corpus"
    build_corpus(_config(two_datasets, 1000), out, report=False)
    return out


def _config(paths: tuple[Path, Path], block_size: int) -> BuildConfig:
    return BuildConfig(datasets=tuple(DatasetSpec(path=str(p), gene_id="ensembl") for p in paths),
                       block_size=block_size, shard_cells=100)


@pytest.mark.parametrize(("block_size", "workers"), [(1, 1), (7, 2), (1000, 2)])
def test_bytes_do_not_depend_on_blocks_or_workers(two_datasets: tuple[Path, Path], reference_build: Path,
                                                  tmp_path: Path, block_size: int, workers: int) -> None:
    out = tmp_path / "corpus"
    build_corpus(_config(two_datasets, block_size), out, workers=workers, report=False)
    got = _digests(out)
    assert got == _digests(reference_build)
    assert sum(name.endswith(".arrow") for name in got) == 5  # 230 → 3 shards, 170 → 2 (100 input cells each)
