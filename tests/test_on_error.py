"""``on_error="skip"``: a dataset that cannot be read is left out and listed; the rest is untouched."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from corpus_files import corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.errors import InputError
from genecorpus.testing import random_counts, write_h5ad


def _shards(folder: Path) -> dict[str, str]:
    return corpus_file_digests(folder, suffixes=(".arrow",), recursive=False)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("on-error")
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    out = {}
    for name, seed in (("a", 1), ("b", 2)):
        counts = random_counts(150, len(ids), density=0.15, seed=seed)
        out[name] = Path(write_h5ad(folder / f"{name}.h5ad", counts, gene_ids=ids,
                                    cell_ids=np.array([f"{name}{i}" for i in range(150)], dtype=object)))
    bad_values = random_counts(150, len(ids), density=0.15, seed=3).astype(np.float32)
    bad_values.data[-1] = 2.5  # only found when the cells are read (QC pass), not when the file is planned
    out["values"] = Path(write_h5ad(folder / "values.h5ad", bad_values, gene_ids=ids,
                                    cell_ids=np.array([f"v{i}" for i in range(150)], dtype=object)))
    garbage = folder / "garbage.h5ad"
    garbage.write_bytes(b"not an HDF5 file" * 100)
    out["garbage"] = garbage
    return out


def _config(*paths: Path) -> BuildConfig:
    return BuildConfig(datasets=tuple(DatasetSpec(path=str(p), gene_id="ensembl") for p in paths),
                       block_size=50, shard_cells=100)


def test_skip_leaves_failed_datasets_out(inputs: dict[str, Path], tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    build_corpus(_config(inputs["a"], inputs["b"]), alone, report=False)
    mixed = tmp_path / "mixed"
    build_corpus(_config(inputs["garbage"], inputs["a"], inputs["values"], inputs["b"]), mixed,
                 report=False, on_error="skip")
    assert _shards(mixed) == _shards(alone)
    for name in ("gene_medians.tsv", "token_dictionary.pkl", "lengths.pkl"):
        assert (mixed / name).read_bytes() == (alone / name).read_bytes()
    manifest = json.loads((mixed / "manifest.json").read_text())
    assert [d["dataset_id"] for d in manifest["datasets"]] == ["a", "b"]
    skipped = {s["dataset_id"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"garbage", "values"}
    assert skipped["garbage"]["stage"] == "plan" and "garbage.h5ad" in skipped["garbage"]["error"]
    assert skipped["values"]["stage"] == "qc" and "2.5" in skipped["values"]["error"]


@pytest.mark.parametrize("workers", [1, 2])
def test_fail_stops_and_publishes_nothing(inputs: dict[str, Path], tmp_path: Path, workers: int) -> None:
    out = tmp_path / "corpus"
    with pytest.raises(InputError, match=r"values\.h5ad.*2\.5"):
        build_corpus(_config(inputs["a"], inputs["values"]), out, report=False, workers=workers)
    assert not out.exists() and not list(tmp_path.glob(".corpus.*"))


def test_skip_with_nothing_left_fails(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    with pytest.raises(InputError, match="every dataset failed"):
        build_corpus(_config(inputs["garbage"], inputs["values"]), out, report=False, on_error="skip")
    assert not out.exists() and not list(tmp_path.glob(".corpus.*"))


def test_cli_on_error_skip(inputs: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genecorpus.cli import app

    manifest = tmp_path / "m.toml"
    manifest.write_text("".join(f'[[datasets]]\npath = "{inputs[n]}"\ngene_id = "ensembl"\n' for n in ("a", "garbage")))
    runner = CliRunner()
    res = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "c"), "--no-report"])
    assert res.exit_code == 1 and "garbage.h5ad" in res.output
    res = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "c"), "--no-report",
                              "--on-error", "skip"])
    assert res.exit_code == 0, res.output
    skipped = json.loads((tmp_path / "c" / "manifest.json").read_text())["skipped"]
    assert [s["dataset_id"] for s in skipped] == ["garbage"]
    # the summary, inspect and the report show it, not only the manifest and a warning
    assert re.search(r"garbage\s+skipped\s+\(--on-error skip, at plan\)", res.output), res.output
    checked = runner.invoke(app, ["validate", str(tmp_path / "c")])
    assert checked.exit_code == 0 and "WARNING  dataset garbage" in checked.output, checked.output
    assert re.search(r"summary: pass .*, 1 warning;", checked.output), checked.output
    shown = runner.invoke(app, ["inspect", str(tmp_path / "c")])
    assert shown.exit_code == 0 and "garbage" in shown.output and "skipped" in shown.output
    reported = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "e"), "--on-error", "skip"])
    index = tmp_path / "e" / "report" / "index.html"
    assert reported.exit_code == 0 and f"report: {index}" in reported.output.replace("\n", "")
    assert 'id="skipped"' in index.read_text() and "garbage" in index.read_text()
    res = runner.invoke(app, ["build", str(manifest), "--out", str(tmp_path / "d"), "--on-error", "maybe"])
    assert res.exit_code == 1 and "on_error must be 'fail' or 'skip'" in res.output
