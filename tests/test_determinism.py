"""Same inputs and settings → identical bytes, whatever the block size or the number of workers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from corpus_files import corpus_file_digests

from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec

if TYPE_CHECKING:
    from pathlib import Path

    from genecorpus.executors import LocalExecutor


def _digests(folder: Path) -> dict[str, str]:
    return corpus_file_digests(folder, skip=("manifest.json",), recursive=False)


@pytest.fixture(scope="module")
def reference_build(h5ad_and_loom: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "corpus"
    build_corpus(_config(h5ad_and_loom, 1000), out, report=False)
    return out


def _config(paths: tuple[Path, Path], block_size: int) -> BuildConfig:
    return BuildConfig(datasets=tuple(DatasetSpec(path=str(p), gene_id="ensembl") for p in paths),
                       block_size=block_size, shard_cells=100)


@pytest.mark.parametrize(("block_size", "workers"), [(1, 1), (7, 2), (1000, 2)])
def test_bytes_do_not_depend_on_blocks_or_workers(h5ad_and_loom: tuple[Path, Path], reference_build: Path,
                                                  two_worker_pool: LocalExecutor, tmp_path: Path, block_size: int,
                                                  workers: int) -> None:
    out = tmp_path / "corpus"
    executor = {1: None, 2: two_worker_pool}[workers]  # None: tasks run in this process
    build_corpus(_config(h5ad_and_loom, block_size), out, executor=executor, report=False)
    got = _digests(out)
    assert got == _digests(reference_build)
    assert sum(name.endswith(".arrow") for name in got) == 5  # 230 → 3 shards, 170 → 2 (100 input cells each)
