"""The corpus folder's owner: the typed manifest, the lengths file, and corpora written by earlier versions."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from genecorpus.corpus import CorpusFiles, CorpusReader, Manifest, read_lengths
from genecorpus.corpus.manifest import DepthSource
from genecorpus.describe import describe_corpus
from genecorpus.errors import InputError
from genecorpus.report import write_report
from genecorpus.validate import validate_corpus

OLD = Path(__file__).parent / "data" / "corpus-0.1.0"


@pytest.fixture
def old_corpus(tmp_path: Path) -> Path:
    """A copy of the corpus genecorpus 0.1.0 wrote (the golden folder is never written to)."""
    return Path(shutil.copytree(OLD, tmp_path / "corpus"))


def _facts_kept(old: object, new: object, where: str = "") -> list[str]:
    """Where ``new`` loses or changes a fact of ``old`` (``new`` may hold more: fields added later)."""
    if isinstance(old, dict):
        return [f"{where}/{k} missing" for k in old if not isinstance(new, dict) or k not in new] + [
            p for k in old if isinstance(new, dict) and k in new for p in _facts_kept(old[k], new[k], f"{where}/{k}")]
    if isinstance(old, list):
        if not isinstance(new, list) or len(old) != len(new):
            return [where]
        return [p for i, (u, v) in enumerate(zip(old, new, strict=True)) for p in _facts_kept(u, v, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {old!r} != {new!r}"]


def test_manifest_of_0_1_0_opens_and_writes_back_every_fact() -> None:
    text = (OLD / "manifest.json").read_text()
    manifest = Manifest.read(OLD / "manifest.json")
    raw = json.loads(text)
    assert _facts_kept(raw, json.loads(manifest.to_json())) == []
    assert manifest.datasets[0].cells.dropped["duplicate"] == 0  # reasons added later dropped nothing
    assert manifest.corpus.n_cells == raw["corpus"]["n_cells"] == 389
    a, b = manifest.datasets
    assert (a.dataset_id, b.dataset_id) == ("a", "b")
    assert a.cells.n_in == 230 and b.cells.n_in == 170
    assert a.cells.n_in == a.cells.kept + sum(a.cells.dropped.values())
    assert a.depth is DepthSource.TOTAL_COUNTS
    assert manifest.medians.source == "computed" and manifest.medians.datasets == ("a",)
    assert manifest.parameters.datasets[1].use_for_medians is False


def test_manifest_of_the_first_release_without_later_fields_opens(tmp_path: Path) -> None:
    raw = json.loads((OLD / "manifest.json").read_text())
    for key in ("skipped", "files", "timings"):  # added after the first release
        del raw[key]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    manifest = Manifest.read(tmp_path / "manifest.json")
    assert manifest.skipped == () and manifest.files == {} and manifest.timings == {}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda raw: raw.update(format="genecorpus/9"), "manifest format 'genecorpus/9'"),
    (lambda raw: raw.pop("format"), "not a genecorpus manifest"),
    (lambda raw: raw["corpus"].update(layout="gc31m"), "corpus.layout"),
    (lambda raw: raw["datasets"][0]["cells"].pop("in"), "datasets.0.cells.in"),
    (lambda raw: raw["datasets"][0].update(depth="guessed"), "datasets.0.depth"),
])
def test_a_damaged_manifest_is_one_clear_error(tmp_path: Path, edit: object, message: str) -> None:
    raw = json.loads((OLD / "manifest.json").read_text())
    edit(raw)  # type: ignore[operator]
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match=message) as info:
        Manifest.read(tmp_path / "manifest.json")
    assert str(tmp_path / "manifest.json") in str(info.value)
    assert "\n" not in str(info.value)


def test_a_corpus_of_0_1_0_validates_reads_and_reports(old_corpus: Path) -> None:
    report = validate_corpus(old_corpus)
    failed = [c.name for c in report.checks if c.status == "FAIL"]
    assert not failed, report.to_text()
    assert report.n_cells == 389
    reader = CorpusReader.open(old_corpus)
    assert reader.n_cells == 389
    assert np.array_equal(reader.lengths, read_lengths(old_corpus / "lengths.pkl"))
    text = describe_corpus(old_corpus)
    assert any(line.startswith("a ") and "230" in line for line in text.splitlines()), text
    index = write_report(old_corpus)
    assert "389" in index.read_text()


def test_lengths_are_read_through_the_restricted_unpickler(tmp_path: Path) -> None:
    path = tmp_path / "lengths.pkl"
    path.write_bytes(pickle.dumps([3, 1, 2]))
    assert read_lengths(path).tolist() == [3, 1, 2]
    assert read_lengths(path).dtype == np.int64

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("unpickled",))

    path.write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(InputError, match="not a pickled list of lengths"):
        read_lengths(path)
    path.write_bytes(pickle.dumps([1.5, 2]))
    with pytest.raises(InputError, match="not a pickled list of int lengths"):
        read_lengths(path)
    with pytest.raises(InputError, match="missing"):
        read_lengths(tmp_path / "none.pkl")


def test_corpus_files_locates_shards_manifest_and_dictionary(old_corpus: Path) -> None:
    files = CorpusFiles.locate(old_corpus)
    assert files.kind == "arrow"
    assert [p.name for p in files.shards] == list(files.manifest.corpus.shards)  # type: ignore[union-attr]
    assert files.token_dictionary == old_corpus / "token_dictionary.pkl"
    n = sum(batch.num_rows for batch in files.iter_batches(["length"]))
    assert n == 389
