"""The Dask engine: a real LocalCluster (2 workers × 1 thread) gives the bytes of a local build.

One cluster serves the module (a LocalCluster takes seconds to start); the command line reaches it through
its manifest's ``[cluster]`` section.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from corpus_files import corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.cli import app
from genecorpus.config import BuildConfig, ClusterSpec, DatasetSpec, load_cluster_spec
from genecorpus.errors import ConfigError, InputError
from genecorpus.executors import DaskExecutor, LocalExecutor, make_executor
from genecorpus.testing import random_counts, write_h5ad


def _digests(folder: Path) -> dict[str, str]:
    return corpus_file_digests(folder, skip=("manifest.json",))


LOCAL_CLUSTER = ClusterSpec(engine="dask", kind="local", workers=2, memory_per_worker="2GiB")


@pytest.fixture(scope="module")
def cluster() -> DaskExecutor:
    executor = DaskExecutor.create(LOCAL_CLUSTER)
    yield executor
    executor.close()


def _config(paths: tuple[Path, ...]) -> BuildConfig:
    return BuildConfig(datasets=tuple(DatasetSpec(path=str(p), gene_id="ensembl") for p in paths),
                       block_size=64, shard_cells=100)


def test_dask_local_cluster_gives_the_bytes_of_local_workers(
        h5ad_and_loom: tuple[Path, Path], cluster: DaskExecutor, two_worker_pool: LocalExecutor,
        tmp_path: Path) -> None:
    local1, local2, dask = tmp_path / "w1", tmp_path / "w2", tmp_path / "dask"
    build_corpus(_config(h5ad_and_loom), local1, workers=1, report=False)
    build_corpus(_config(h5ad_and_loom), local2, executor=two_worker_pool, report=False)
    build_corpus(_config(h5ad_and_loom), dask, executor=cluster, report=False)
    assert len(cluster.client.scheduler_info()["workers"]) == 2
    want = _digests(local1)
    assert sum(name.endswith(".arrow") for name in want) == 5
    assert _digests(local2) == want
    assert _digests(dask) == want
    m1, md = (json.loads((p / "manifest.json").read_text()) for p in (local1, dask))
    assert m1["corpus"] == md["corpus"] and m1["datasets"] == md["datasets"]


def test_task_errors_reach_the_driver_with_file_and_cells(
        h5ad_and_loom: tuple[Path, Path], cluster: DaskExecutor, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5ad"
    ids = genes.candidate_genes()[::40][:400].astype(object)
    counts = random_counts(50, len(ids), density=0.2, seed=3).astype(np.float32)
    counts.data[7] = 2.5  # not a count
    write_h5ad(bad, counts, cell_ids=np.array([f"c{i}" for i in range(50)], dtype=object), gene_ids=ids)
    out = tmp_path / "corpus"
    with pytest.raises(InputError, match=r"bad\.h5ad.*2\.5"):
        build_corpus(_config((h5ad_and_loom[0], bad)), out, executor=cluster, report=False)
    assert not out.exists()
    assert not list(tmp_path.glob(".corpus.incomplete-*"))


def test_fold_combines_in_task_order(cluster: DaskExecutor) -> None:
    tasks = [(i,) for i in range(25)]
    assert cluster.fold("t", _slow_identity, tasks, _concat, ()) == tuple(range(25))
    assert cluster.map("t", _slow_identity, tasks) == list(range(25))


def _slow_identity(i: int) -> int:
    import time

    time.sleep(0.01 * ((i * 7) % 5))  # finish out of order
    return i


def _concat(acc: tuple[int, ...], x: int) -> tuple[int, ...]:
    return (*acc, x)


def test_make_executor_choices() -> None:
    assert isinstance(make_executor(), LocalExecutor)
    local = make_executor(workers=3)
    assert isinstance(local, LocalExecutor) and local.workers == 3
    spec = ClusterSpec(engine="local", workers=2)
    assert make_executor(cluster=spec).workers == 2  # type: ignore[attr-defined]
    assert make_executor(cluster=spec, workers=1).workers == 1  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unknown engine"):
        make_executor(engine="spark")


def test_connect_to_a_running_scheduler(cluster: DaskExecutor) -> None:
    executor = make_executor(scheduler=cluster.client.scheduler.address)
    try:
        assert isinstance(executor, DaskExecutor) and executor.workers == 2
        assert executor.map("t", _slow_identity, [(3,), (1,)]) == [3, 1]
    finally:
        executor.close()
    assert cluster.map("t", _slow_identity, [(2,)]) == [2]  # the cluster is not closed by a client


def test_cli_engine_dask_and_cluster_section(h5ad_and_loom: tuple[Path, Path], cluster: DaskExecutor,
                                             tmp_path: Path) -> None:
    from distributed import get_task_stream
    from typer.testing import CliRunner

    lines = [f'[[datasets]]\npath = "{p}"\ngene_id = "ensembl"\n' for p in h5ad_and_loom]
    head = "block_size = 64\nshard_cells = 100\n" + "".join(lines)
    # a section that starts a LocalCluster reads as the spec the `cluster` fixture started its cluster from
    local = tmp_path / "local.toml"
    local.write_text(head + '[cluster]\nengine = "dask"\nkind = "local"\nworkers = 2\nmemory_per_worker = "2GiB"\n')
    assert load_cluster_spec(local) == LOCAL_CLUSTER
    # the build runs on the cluster the section names: here that one, by its scheduler's address
    manifest = tmp_path / "m.toml"
    manifest.write_text(head + f'[cluster]\nengine = "dask"\nkind = "scheduler"\n'
                               f'address = "{cluster.client.scheduler.address}"\nworkers = 2\n')
    runner = CliRunner()
    with get_task_stream(client=cluster.client) as stream:
        res = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "c"), "--no-report"])
    assert res.exit_code == 0, res.output
    stages = {str(task["key"]).rsplit("-", 2)[0] for task in stream.data}
    assert {"qc", "encode"} <= stages, stages
    assert len(cluster.client.scheduler_info()["workers"]) == 2  # still up: the command closed its client only
    res = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "l"), "--no-report",
                              "--engine", "local"])
    assert res.exit_code == 0, res.output
    assert _digests(tmp_path / "c") == _digests(tmp_path / "l")
    bad = tmp_path / "bad.toml"
    bad.write_text("".join(lines) + '[cluster]\nengine = "dask"\nkind = "scheduler"\n')
    res = runner.invoke(app, ["build", str(bad), "--out", str(tmp_path / "x")])
    assert res.exit_code == 1
    assert "bad.toml: cluster." in res.output and "needs an address" in res.output


def test_duplicates_on_dask_give_the_bytes_of_local_workers(h5ad_and_loom: tuple[Path, Path], cluster: DaskExecutor,
                                                            tmp_path: Path) -> None:
    """A third dataset re-publishes 100 cells of the first (other barcodes, reversed order): the duplicates
    pass finds and drops them on a Dask cluster exactly as in this process."""
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    copies = random_counts(230, len(ids), density=0.15, seed=1)[:100][::-1]  # the conftest's first dataset
    again = write_h5ad(tmp_path / "again.h5ad", copies, gene_ids=ids,
                       cell_ids=np.array([f"again{i}" for i in range(100)], dtype=object))
    paths = (*h5ad_and_loom, Path(again))
    local, dask = tmp_path / "local", tmp_path / "dask"
    built = build_corpus(_config(paths), local, workers=1, report=False)
    build_corpus(_config(paths), dask, executor=cluster, report=False)
    assert built.manifest.duplicates is not None and built.manifest.duplicates.n_dropped == 100
    assert _digests(dask) == _digests(local)
