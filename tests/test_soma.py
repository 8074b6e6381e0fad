"""TileDB-SOMA experiments as a source: the same cells give the same corpus as the h5ad files they came from.

The experiment is written here, with ``tiledbsoma.io.from_h5ad``, from two real public h5ad files (Kang 2018
PBMC, control and stimulated; their first cells, with obs columns added to a temporary copy: a per-file
``dataset_id``, a donor, a tissue and ``is_primary_data``; var gets CELLxGENE's ``feature_id`` Ensembl IDs).
A build of the experiment with a ``value_filter`` and the default ``split_by = "dataset_id"`` must give the
same shards, dictionaries, medians and lengths, byte for byte, as a build of the same cells from h5ad files
(the copies with only the selected cells, ids ``<id>/<value>``); workers, block size, the snapshot
timestamp and an interruption must not change a byte.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from corpus_files import corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec, load_manifest
from genecorpus.dataset import plan_dataset, split_dataset
from genecorpus.errors import ConfigError, GenecorpusError, InputError
from genecorpus.executors import LocalExecutor
from genecorpus.io import open_dataset
from genecorpus.io.soma import experiment_identity
from genecorpus.public_data import fetch_public_file
from genecorpus.resume import WorkFolder
from genecorpus.validate import validate_corpus

REPO = Path(__file__).resolve().parents[1]
N_CELLS = 400
"""Cells taken from each real file (the experiment holds twice as many)."""
BLOOD = 'tissue_general == "blood"'
OBS_COLUMNS = ("donor", "is_primary_data")
SHARD_CELLS = 120
"""Three tasks per part: tasks, shards and the interruption have something to cut."""


def _copy_with_annotations(name: str, key: str, folder: Path, seed: int) -> Any:
    """The first cells of a real file, with obs columns and CELLxGENE's feature_id added (a copy)."""
    import anndata
    from anndata.utils import make_index_unique

    adata = anndata.read_h5ad(fetch_public_file(key))[:N_CELLS].copy()
    symbols = adata.var_names.astype(str).to_numpy()
    mapped = genes.map_to_ensembl(symbols, kind="symbol")
    # from_h5ad needs unique var ids; the symbols themselves stay in feature_name
    adata.var = pd.DataFrame({"feature_id": mapped.ensembl_ids.astype(str), "feature_name": symbols},
                             index=make_index_unique(pd.Index(symbols)).rename("var_id"))
    rng = np.random.default_rng(seed)
    adata.obs = pd.DataFrame({
        "dataset_id": name,
        "donor": pd.Categorical(rng.choice(["d1", "d2", "d3"], adata.n_obs)),
        "tissue_general": np.where(rng.random(adata.n_obs) < 0.8, "blood", "lung"),
        "is_primary_data": rng.random(adata.n_obs) < 0.95,
    }, index=adata.obs_names.astype(str).rename("obs_id"))
    adata.write_h5ad(folder / f"{name}.h5ad")
    adata[adata.obs["tissue_general"] == "blood"].copy().write_h5ad(folder / f"{name}-blood.h5ad")
    return adata


def _ingest(experiment: Path, files: list[Path]) -> None:
    """Write ``files`` into one experiment: the first creates it, the others are appended after registration."""
    import tiledbsoma.io

    mapping = tiledbsoma.io.register_h5ads(None, [str(f) for f in files], measurement_name="RNA",
                                           obs_field_name="obs_id", var_field_name="var_id")
    tiledbsoma.io.from_h5ad(str(experiment), files[0], "RNA", registration_mapping=mapping)
    mapping.prepare_experiment(str(experiment))
    for f in files[1:]:
        tiledbsoma.io.from_h5ad(str(experiment), f, "RNA", registration_mapping=mapping)


@pytest.fixture(scope="module")
def kang(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The annotated copies, their blood-only copies, the experiment made from the copies, and its reference
    corpus (one worker, default block size)."""
    pytest.importorskip("tiledbsoma")
    folder = tmp_path_factory.mktemp("kang-soma")
    for name, key, seed in (("ctrl", "kang_pbmc_control", 1), ("stim", "kang_pbmc_stimulated", 2)):
        _copy_with_annotations(name, key, folder, seed)
    experiment = folder / "experiment"
    _ingest(experiment, [folder / "ctrl.h5ad", folder / "stim.h5ad"])
    reference = folder / "reference"
    build_corpus(_soma_config(experiment), reference, report=False)
    return {"folder": folder, "experiment": experiment, "reference": reference}


def _soma_config(experiment: Path, **settings: Any) -> BuildConfig:
    spec = DatasetSpec(path=str(experiment), id="kang", value_filter=BLOOD, obs_columns=OBS_COLUMNS)
    return BuildConfig(datasets=(spec,), shard_cells=SHARD_CELLS, **settings)


def _files_config(folder: Path) -> BuildConfig:
    specs = tuple(DatasetSpec(path=str(folder / f"{name}-blood.h5ad"), id=f"kang/{name}", obs_columns=OBS_COLUMNS)
                  for name in ("ctrl", "stim"))
    return BuildConfig(datasets=specs, shard_cells=SHARD_CELLS)


def _digests(corpus: Path, *, skip: tuple[str, ...] = ("manifest.json",)) -> dict[str, str]:
    return corpus_file_digests(corpus, skip=skip)


def _manifest(corpus: Path) -> dict[str, Any]:
    """manifest.json without what differs between two builds of the same cells (timings, the snapshot)."""
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest.pop("timings")
    for dataset in manifest["datasets"]:
        if dataset.get("soma"):
            dataset["soma"].pop("snapshot_ms")
    return manifest


# ------------------------------------------------------------------------------------- identity with files


def test_experiment_gives_the_corpus_of_its_files(kang: dict[str, Any], tmp_path: Path) -> None:
    files = tmp_path / "files"
    build_corpus(_files_config(kang["folder"]), files, report=False)
    # state.json holds the settings' fingerprint, which names the inputs; everything else is the cells'
    skip = ("manifest.json", "state.json")
    assert _digests(kang["reference"], skip=skip) == _digests(files, skip=skip)
    assert sum(name.endswith(".arrow") for name in _digests(files)) == 6  # 3 tasks per part
    soma, plain = _manifest(kang["reference"]), _manifest(files)
    for mine, theirs in zip(soma["datasets"], plain["datasets"], strict=True):
        assert mine["dataset_id"] == theirs["dataset_id"]
        assert mine["cells"] == theirs["cells"] and mine["qc"] == theirs["qc"] and mine["genes"] == theirs["genes"]
        assert mine["matrix"] == "ms['RNA'].X['data']" and theirs["matrix"] == "X"
    assert [d["dataset_id"] for d in soma["datasets"]] == ["kang/ctrl", "kang/stim"]
    record = soma["datasets"][0]["soma"]
    blood = sum(d["cells"]["in"] for d in soma["datasets"])
    assert record["uri"] == str(kang["experiment"]) and record["value_filter"] == BLOOD
    assert record["n_selected"] == blood < 2 * N_CELLS and record["local"]
    assert record["token"].startswith("soma-files:") and soma["datasets"][0]["sha256"] == record["token"]


def test_cellxgene_layout_reads_raw_counts_as_the_file_does(kang: dict[str, Any], tmp_path: Path) -> None:
    """A CELLxGENE-style file (normalized X, raw counts in raw.X, feature_is_filtered in var): from_h5ad writes
    raw.X into the measurement ``raw``, and ``counts = "auto"`` reads it as it reads the file's raw.X."""
    import anndata

    adata = anndata.read_h5ad(kang["folder"] / "stim.h5ad")[:250].copy()
    counts = adata.X.copy()
    adata.raw = adata.copy()  # raw.var: the var columns, without feature_is_filtered (as CELLxGENE's)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    normalized = counts.multiply(1e4 / np.maximum(totals, 1)[:, None]).tocsr()
    normalized.data = np.log1p(normalized.data).astype(np.float32)
    adata.X = normalized
    adata.var["feature_is_filtered"] = np.arange(adata.n_vars) % 50 == 0
    path = tmp_path / "cellxgene.h5ad"
    adata.write_h5ad(path)
    experiment = tmp_path / "experiment"
    _ingest(experiment, [path])
    outs = {}
    for name, spec in (("soma", DatasetSpec(path=str(experiment), id="x", split_by=False)),
                       ("file", DatasetSpec(path=str(path), id="x"))):
        outs[name] = tmp_path / name
        build_corpus(BuildConfig(datasets=(spec,)), outs[name], report=False)
    skip = ("manifest.json", "state.json")
    assert _digests(outs["soma"], skip=skip) == _digests(outs["file"], skip=skip)
    soma, plain = (json.loads((outs[n] / "manifest.json").read_text())["datasets"][0] for n in ("soma", "file"))
    assert (soma["matrix"], plain["matrix"]) == ("ms['raw'].X['data']", "raw.X")
    assert soma["genes"] == plain["genes"] and soma["genes"]["n_filtered_out"] > 0


def test_workers_block_size_and_snapshot_change_no_byte(kang: dict[str, Any], two_worker_pool: LocalExecutor,
                                                         tmp_path: Path) -> None:
    """Two workers, another block size, and a new snapshot timestamp (a fresh build) give the same bytes."""
    out = tmp_path / "corpus"
    build_corpus(_soma_config(kang["experiment"], block_size=97), out, executor=two_worker_pool, report=False)
    assert _digests(out) == _digests(kang["reference"])
    assert _manifest(out)["corpus"] == _manifest(kang["reference"])["corpus"]
    snapshots = [json.loads((c / "manifest.json").read_text())["datasets"][0]["soma"]["snapshot_ms"]
                 for c in (out, kang["reference"])]
    assert snapshots[0] > snapshots[1]


def test_validate_reads_the_experiment_again(kang: dict[str, Any], tmp_path: Path) -> None:
    report = validate_corpus(kang["reference"], all_cells=True)
    assert report.ok, report.to_text()
    assert report.check("inputs").status == "pass"
    assert report.check("encoding").n_checked == report.n_cells > 0
    # the same corpus as if read from a remote experiment: nothing to list, nothing recomputed, no failure
    remote = tmp_path / "remote"
    shutil.copytree(kang["reference"], remote)
    manifest = json.loads((remote / "manifest.json").read_text())
    for dataset in manifest["datasets"]:
        dataset["soma"].update(uri="s3://bucket/experiment", local=False)
    (remote / "manifest.json").write_text(json.dumps(manifest))
    report = validate_corpus(remote)
    assert report.ok, report.to_text()
    assert "remote TileDB-SOMA experiments: not checked" in report.to_text()
    assert report.check("encoding").n_checked == 0


# -------------------------------------------------------------------------------------------------- resume


class _InterruptAt:
    """A progress callback that raises KeyboardInterrupt when ``stage`` starts (like Ctrl-C)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == self.stage and done == 0:
            raise KeyboardInterrupt


def test_interrupted_build_resumes_at_its_snapshot(kang: dict[str, Any], tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "corpus"
    config = _soma_config(kang["experiment"])
    with pytest.raises(KeyboardInterrupt):
        build_corpus(config, out, executor=LocalExecutor(1, progress=_InterruptAt("encode")), report=False)
    work = out.with_name(f".{out.name}.incomplete")
    recorded = json.loads((work / "inputs.json").read_text())[str(kang["experiment"])]
    with caplog.at_level(logging.INFO, logger="genecorpus"):
        build_corpus(config, out, report=False, resume=True)
    log = " ".join(caplog.text.split())
    assert "qc: 6 of 6 tasks reused" in log and "selection: 6 of 6 tasks reused" in log, log
    assert _digests(out) == _digests(kang["reference"])
    assert _manifest(out) == _manifest(kang["reference"])
    soma = json.loads((out / "manifest.json").read_text())["datasets"][0]["soma"]
    assert soma["snapshot_ms"] == recorded["snapshot_ms"] and soma["token"] == recorded["token"]


def test_appended_cells_change_the_token(kang: dict[str, Any], tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A write to a local experiment changes its token: a resumed build takes a new snapshot and redoes its
    tasks. A remote experiment's token is its URI and snapshot (taken to be immutable)."""
    import anndata
    import tiledbsoma.io

    experiment = tmp_path / "experiment"
    shutil.copytree(kang["experiment"], experiment)
    before = experiment_identity(str(experiment), snapshot_ms=1)
    assert before == experiment_identity(str(experiment), snapshot_ms=2)  # the listing, not the timestamp
    out = tmp_path / "corpus"
    work = WorkFolder(out)
    work.open(resume=False, overwrite=False)
    work.record_soma_snapshot(str(experiment), 12345)
    work.release()

    extra = anndata.read_h5ad(kang["folder"] / "ctrl.h5ad")[:5].copy()
    extra.obs_names = [f"extra{i}" for i in range(5)]
    extra.obs.index.name = "obs_id"
    mapping = tiledbsoma.io.register_anndatas(str(experiment), [extra], measurement_name="RNA",
                                              obs_field_name="obs_id", var_field_name="var_id")
    mapping.prepare_experiment(str(experiment))
    tiledbsoma.io.from_anndata(str(experiment), extra, "RNA", registration_mapping=mapping)
    after = experiment_identity(str(experiment), snapshot_ms=1)
    assert after.token != before.token and after.n_bytes > before.n_bytes

    resumed = WorkFolder(out)
    resumed.corpus.mkdir(parents=True, exist_ok=True)  # as an interrupted build leaves it
    resumed.open(resume=True, overwrite=False)
    with caplog.at_level(logging.WARNING, logger="genecorpus"):
        assert resumed.soma_snapshot(str(experiment)) is None  # changed: a new snapshot, its tasks redone
    assert "changed since the interrupted build" in caplog.text
    resumed.record_soma_snapshot(str(experiment), 23456)
    assert resumed.soma_snapshot(str(experiment)) == 23456  # unchanged since recorded: its snapshot is reused
    resumed.remove()

    remote = "s3://bucket/census/homo_sapiens"
    assert experiment_identity(remote, snapshot_ms=1).token != experiment_identity(remote, snapshot_ms=2).token


# ------------------------------------------------------------------------------------------ errors, extra


def _plan(spec: DatasetSpec) -> None:
    plan = plan_dataset(spec, universe=genes.candidate_genes())
    split_dataset(plan)


@pytest.mark.parametrize(("settings", "words"), [
    ({"measurement": "ATAC"}, ["no measurement 'ATAC'", "available: RNA"]),
    ({"layer": "counts"}, ["no X layer 'counts'", "available: data"]),
    ({"value_filter": 'tissue_general = "blood"'}, ["value_filter", "cannot be applied", "tissue_general"]),
    ({"value_filter": 'organ == "blood"'}, ["value_filter", "organ", "obs columns"]),
    ({"value_filter": 'tissue_general == "brain"'}, ["value_filter", "selects no cell of the 800"]),
    ({"split_by": "sample"}, ["no obs column 'sample' to split by", "donor"]),
    ({"obs_columns": ("cell_type",)}, ["obs column 'cell_type' not found", "tissue_general"]),
])
def test_bad_query_is_one_line_naming_the_experiment(kang: dict[str, Any], settings: dict[str, Any],
                                                     words: list[str]) -> None:
    with pytest.raises(GenecorpusError) as info:
        _plan(DatasetSpec(path=str(kang["experiment"]), **settings))
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(kang["experiment"])), message
    for word in words:
        assert word in message, message


def test_bad_sources_are_one_line(kang: dict[str, Any], tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no TileDB-SOMA experiment there"):
        open_dataset(str(tmp_path / "empty"), format="soma")
    with pytest.raises(ConfigError, match="value_filter applies to TileDB-SOMA experiments"):
        _plan(DatasetSpec(path=str(kang["folder"] / "ctrl.h5ad"), value_filter=BLOOD))
    with pytest.raises(InputError, match="option measurement= does not apply to the h5ad format"):
        _plan(DatasetSpec(path=str(kang["folder"] / "ctrl.h5ad"), measurement="RNA"))
    with pytest.raises(ValueError, match="value_filter applies to TileDB-SOMA experiments"):
        DatasetSpec(path="x.h5ad", format="h5ad", value_filter=BLOOD)
    with pytest.raises(ConfigError, match=r"holds a credential.*environment"):
        open_dataset(str(kang["experiment"]), tiledb_config={"vfs.s3.aws_secret_access_key": "x"})
    with pytest.raises(InputError, match="format 'h5ad' reads local files, not URIs"):
        open_dataset("s3://bucket/pbmc.h5ad", format="h5ad")


def test_one_query_in_two_datasets_is_refused_two_queries_are_not(kang: dict[str, Any], tmp_path: Path) -> None:
    """Cells read twice would be counted twice: the same query of one experiment under two dataset ids is refused
    before any task runs; another filter of the same experiment is another dataset."""
    spec = DatasetSpec(path=str(kang["experiment"]), id="a", value_filter=BLOOD, split_by=False)
    again = spec.model_copy(update={"id": "b"})
    with pytest.raises(ConfigError, match=r"dataset 'b' .*the same query of the same experiment as .*dataset 'a'"):
        build_corpus(BuildConfig(datasets=(spec, again)), tmp_path / "twice", report=False)
    assert not (tmp_path / "twice").exists()
    other = again.model_copy(update={"value_filter": 'tissue_general == "blood" and donor == "d1"'})
    build_corpus(BuildConfig(datasets=(spec, other), duplicates="keep"), tmp_path / "two", report=False)
    assert (tmp_path / "two" / "manifest.json").is_file()


def test_remote_uri_is_a_string_and_takes_the_same_path(tmp_path: Path) -> None:
    """A URI is never resolved against the manifest's folder; it is opened by the SOMA reader, which fails
    here (no network) in one line naming it."""
    uri = "s3://genecorpus-no-such-bucket/census/homo_sapiens"
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'[[datasets]]\npath = "{uri}"\nvalue_filter = \'{BLOOD}\'\n'
                        'tiledb_config = { "vfs.s3.region" = "us-west-2", "vfs.s3.no_sign_request" = "true", '
                        '"vfs.s3.connect_max_tries" = "1", "vfs.s3.connect_timeout_ms" = "2000" }\n')
    spec = load_manifest(manifest).datasets[0]
    assert spec.path == uri and spec.dataset_id == "homo_sapiens"
    pytest.importorskip("tiledbsoma")
    with pytest.raises(InputError) as info:
        _plan(spec)
    message = str(info.value)
    assert message.startswith(f"{uri}: ") and "\n" not in message and "TileDB-SOMA" in message, message


def test_missing_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    """Without tiledbsoma, genecorpus imports and builds from files; a SOMA source is refused in one line."""
    manifest = tmp_path / "m.toml"
    manifest.write_text('[[datasets]]\npath = "s3://bucket/census/homo_sapiens"\n')
    blocked = ("import sys; sys.modules['tiledbsoma'] = None; "  # an import of it now raises ImportError
               "from genecorpus.cli import main; sys.argv = ['genecorpus', 'build', sys.argv[1], '--out', sys.argv[2]]; "
               "main()")
    done = subprocess.run([sys.executable, "-c", blocked, str(manifest), str(tmp_path / "out")], capture_output=True,
                          text=True, check=False, env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: s3://bucket/census/homo_sapiens: reading a TileDB-SOMA experiment needs "
                                   "the soma extra: pip install 'genecorpus[soma]'"), done.stderr


def test_docs_census_manifest_reads_as_written() -> None:
    """The blood corpus of docs/census.md is a manifest genecorpus reads, with the settings the text explains."""
    text = (REPO / "docs" / "census.md").read_text()
    block = text.split("```toml\n", 1)[1].split("```", 1)[0]
    import tomllib

    raw = tomllib.loads(block)
    spec = BuildConfig.model_validate(raw).datasets[0]
    assert spec.path.startswith("s3://cellxgene-census-public-us-west-2/cell-census/")
    assert spec.path.endswith("/soma/census_data/homo_sapiens")
    assert spec.value_filter == 'is_primary_data == True and tissue_general == "blood"'
    assert (spec.measurement, spec.layer, spec.split_by, spec.gene_id) == ("RNA", "raw", "dataset_id", "ensembl")
    assert {"cell_type", "assay", "donor_id"} <= set(spec.obs_columns)
