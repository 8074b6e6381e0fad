"""`genecorpus validate`: good corpora pass; each kind of damage, written into real Arrow, is named."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from genecorpus import _kernels, genes
from genecorpus.build import build_corpus
from genecorpus.cli import app
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.corpus.folder import sha256_of_path
from genecorpus.errors import InputError
from genecorpus.testing import random_counts, write_h5ad, write_loom
from genecorpus.validate import CHECKS, ValidationReport, validate_corpus

if TYPE_CHECKING:
    from collections.abc import Callable

Rows = list[dict[str, Any]]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An h5ad (sparse, with obs n_counts that differ from the totals) and a loom (dense) dataset."""
    folder = tmp_path_factory.mktemp("validate-inputs")
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    a = random_counts(230, len(ids), density=0.15, seed=1)
    b = random_counts(170, len(ids), density=0.2, seed=2)
    n_counts = np.asarray(a.sum(axis=1)).ravel() + 5.0
    path_a = write_h5ad(folder / "a.h5ad", a, cell_ids=[f"a{i}" for i in range(230)], gene_ids=ids,
                        obs={"n_counts": n_counts})
    path_b = write_loom(folder / "b.loom", b, cell_ids=[f"b{i}" for i in range(170)], gene_ids=ids)
    return Path(path_a), Path(path_b)


def _build(inputs: tuple[Path, Path], out: Path, layout: str) -> Path:
    config = BuildConfig(datasets=tuple(DatasetSpec(path=str(p), gene_id="ensembl") for p in inputs),
                         layout=layout, shard_cells=100)
    build_corpus(config, out, report=False)
    return out


@pytest.fixture(scope="module")
def gc30m(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(inputs, tmp_path_factory.mktemp("validate-gc30m") / "corpus", "gc30m")


@pytest.fixture(scope="module")
def gc104m(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(inputs, tmp_path_factory.mktemp("validate-gc104m") / "corpus", "gc104m")


# ------------------------------------------------------------------------------------------ helpers


def copy_corpus(corpus: Path, tmp_path: Path) -> Path:
    out = tmp_path / "corpus"
    shutil.copytree(corpus, out)
    return out


def shard_path(corpus: Path, index: int) -> Path:
    return sorted(corpus.glob("data-*.arrow"))[index]


def rewrite_shard(path: Path, edit: Callable[[Rows], Rows]) -> None:
    """Read an Arrow stream shard, edit its rows as Python dicts, write it back with the same schema."""
    table = pa.ipc.open_stream(path.read_bytes()).read_all()
    rows = edit(table.to_pylist())
    new = pa.Table.from_pylist(rows, schema=table.schema)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(new)


def edit_row(row: int, change: Callable[[dict[str, Any]], None]) -> Callable[[Rows], Rows]:
    def edit(rows: Rows) -> Rows:
        change(rows[row])
        return rows

    return edit


def run_cli(*args: str) -> tuple[int, dict[str, Any]]:
    """``genecorpus validate ... --json`` in-process: exit code and the parsed report."""
    result = CliRunner().invoke(app, ["validate", *args, "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.stdout)


def failed(report: dict[str, Any]) -> set[str]:
    return {c["name"] for c in report["checks"] if c["status"] == "FAIL"}


def check_of(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in report["checks"] if c["name"] == name)


def messages(report: dict[str, Any], name: str) -> str:
    return "\n".join(p["message"] for p in check_of(report, name)["problems"])


def assert_all_pass(report: ValidationReport) -> None:
    assert [c.name for c in report.checks] == list(CHECKS)
    assert report.ok, report.to_text()
    assert all(c.status == "pass" for c in report.checks), report.to_text()


# ------------------------------------------------------------------------------------- good corpora


@pytest.mark.parametrize("layout", ["gc30m", "gc104m"])
def test_built_corpus_passes_every_check(layout: str, request: pytest.FixtureRequest) -> None:
    corpus: Path = request.getfixturevalue(layout)
    report = validate_corpus(corpus, all_cells=True)
    assert_all_pass(report)
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert report.n_cells == manifest["corpus"]["n_cells"] > 300
    assert report.n_shards == 5
    assert report.check("encoding").n_checked == report.n_cells
    assert report.check("inputs").n_checked == 2
    text = report.to_text()
    assert text.splitlines()[-1].startswith("summary: pass")
    assert len(text.splitlines()) == len(CHECKS) + 2


def test_sample_recomputes_about_the_requested_number_of_cells(gc30m: Path) -> None:
    report = validate_corpus(gc30m, sample_cells=20)
    n = report.check("encoding").n_checked
    assert 15 <= n <= 25, report.check("encoding")
    assert report.ok
    assert validate_corpus(gc30m, check_inputs=False).check("encoding").status == "skipped"


def test_real_pbmc_tokenized_with_geneformer_dictionaries(kang_gc30m: Path) -> None:
    """Geneformer's float32 arithmetic on the real float32 CSC file: every cell recomputes exactly."""
    report = validate_corpus(kang_gc30m, all_cells=True)
    assert_all_pass(report)
    assert report.mode == "tokenize"
    assert report.check("encoding").n_checked == report.n_cells == 3000


def test_real_pbmc_tie_order_is_checked(kang_gc30m: Path, tmp_path: Path) -> None:
    """Swap the last two genes of a real cell (a cell's tail holds its nearest values)."""
    corpus = copy_corpus(kang_gc30m, tmp_path)
    rows = pa.ipc.open_stream(shard_path(corpus, 0).read_bytes()).read_all().column("input_ids").to_pylist()
    row = next(i for i, ids in enumerate(rows) if len(ids) > 50)

    def swap_tail(r: dict[str, Any]) -> None:
        ids = r["input_ids"]
        ids[-1], ids[-2] = ids[-2], ids[-1]

    rewrite_shard(shard_path(corpus, 0), edit_row(row, swap_tail))
    code, report = run_cli(str(corpus), "--all-cells")
    assert code == 1
    assert failed(report) == {"encoding"}
    assert check_of(report, "encoding")["n_failed"] == 1
    problem = check_of(report, "encoding")["problems"][0]
    assert problem["row"] == row and problem["shard"] == shard_path(corpus, 0).name
    assert "out of order" in problem["message"]


def test_published_genecorpus_sample(genecorpus_sample: Path, geneformer_dicts: Path, tmp_path: Path) -> None:
    sample = genecorpus_sample
    tdict = geneformer_dicts / "token_dictionary_gc30M.pkl"
    medians = geneformer_dicts / "gene_median_dictionary_gc30M.pkl"
    report = validate_corpus(sample, token_dictionary=tdict, gene_medians=medians)
    assert report.ok, report.to_text()
    assert report.n_cells == 500
    statuses = {c.name: c.status for c in report.checks}
    for name in ("shards", "lengths", "tokens", "layout", "unique_tokens", "nonempty_cells", "dictionaries"):
        assert statuses[name] == "pass", report.to_text()
    assert statuses["cell_counts"] == statuses["encoding"] == "skipped"

    table = pq.read_table(sample)
    ids = table.column("input_ids").to_pylist()
    ids[7][5] = ids[7][2]
    pq.write_table(table.set_column(0, "input_ids", pa.array(ids, table.schema.field("input_ids").type)),
                   tmp_path / "bad.parquet")
    code, bad = run_cli(str(tmp_path / "bad.parquet"), "--token-dictionary", str(tdict))
    assert code == 1
    assert failed(bad) == {"unique_tokens"}
    problem = check_of(bad, "unique_tokens")["problems"][0]
    assert problem["row"] == 7 and "positions 2 and 5" in problem["message"]


# ------------------------------------------------------------------------------------------- damage


def _swap_first_two(r: dict[str, Any]) -> None:
    r["input_ids"][0], r["input_ids"][1] = r["input_ids"][1], r["input_ids"][0]


def _lengthen(r: dict[str, Any]) -> None:
    r["length"] += 1


def _out_of_range(r: dict[str, Any]) -> None:
    r["input_ids"][3] = 30_000


def _duplicate(r: dict[str, Any]) -> None:
    r["input_ids"][4] = r["input_ids"][1]


def _drop_first_row(rows: Rows) -> Rows:
    return rows[1:]


@pytest.mark.parametrize(("edit", "expected_failures", "check", "needle"), [
    pytest.param(edit_row(3, _swap_first_two), {"encoding"}, "encoding", "out of order", id="swap-tokens"),
    pytest.param(edit_row(5, _lengthen), {"lengths", "lengths_file"}, "lengths", "but input_ids has",
                 id="change-length"),
    pytest.param(_drop_first_row, {"cell_counts", "lengths", "lengths_file"}, "cell_counts", "the manifest says",
                 id="drop-row"),
    pytest.param(edit_row(2, _out_of_range), {"tokens", "encoding"}, "tokens", "token 30000 at position 3",
                 id="token-out-of-range"),
    pytest.param(edit_row(4, _duplicate), {"unique_tokens", "encoding"}, "unique_tokens", "positions 1 and 4",
                 id="duplicate-token"),
])
def test_damaged_shard_is_reported(gc30m: Path, tmp_path: Path, edit: Callable[[Rows], Rows],
                                   expected_failures: set[str], check: str, needle: str) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    assert run_cli(str(corpus), "--all-cells")[0] == 0
    rewrite_shard(shard_path(corpus, 1), edit)
    code, report = run_cli(str(corpus), "--all-cells")
    assert code == 1
    assert not report["ok"]
    assert failed(report) == expected_failures, json.dumps(report, indent=1)
    problem = check_of(report, check)["problems"][0]
    assert needle in problem["message"], problem
    if check != "cell_counts":
        assert problem["shard"] == shard_path(corpus, 1).name
        assert problem["cell_id"] is not None


def test_dropped_row_names_the_dataset(gc30m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    rewrite_shard(shard_path(corpus, 3), _drop_first_row)  # shards 0-2: dataset a, 3-4: dataset b
    report = validate_corpus(corpus, check_inputs=False)
    problems = report.check("cell_counts").problems
    assert [p.dataset_id for p in problems if p.dataset_id] == ["b"]
    assert report.check("cell_counts").n_failed == 2  # the total and dataset b


def test_missing_eos_in_gc104m(gc104m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc104m, tmp_path)

    def drop_eos(r: dict[str, Any]) -> None:
        r["input_ids"] = r["input_ids"][:-1]
        r["length"] -= 1

    rewrite_shard(shard_path(corpus, 0), edit_row(1, drop_eos))
    code, report = run_cli(str(corpus), "--all-cells")
    assert code == 1
    # the length file and the manifest's token count still count the <eos>
    assert failed(report) == {"layout", "lengths", "lengths_file", "encoding"}
    problem = check_of(report, "layout")["problems"][0]
    assert problem["row"] == 1 and "not <eos>" in problem["message"]
    assert check_of(report, "layout")["n_failed"] == 1


def test_special_token_inside_a_gc104m_cell(gc104m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc104m, tmp_path)

    def cls_inside(r: dict[str, Any]) -> None:
        r["input_ids"][3] = r["input_ids"][0]

    rewrite_shard(shard_path(corpus, 2), edit_row(0, cls_inside))
    report = validate_corpus(corpus, check_inputs=False)
    assert {c.name for c in report.checks if c.status == "FAIL"} == {"layout", "unique_tokens"}
    assert "<cls> at position 3" in report.check("layout").problems[0].message


def test_truncated_shard(gc30m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    shard = shard_path(corpus, 2)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, report = run_cli(str(corpus))
    assert code == 1
    assert "shards" in failed(report) and "cell_counts" in failed(report)
    assert check_of(report, "shards")["problems"][0]["shard"] == shard.name


def _write_medians(corpus: Path, medians: dict[str, float]) -> None:
    with (corpus / "gene_medians.tsv").open("w") as fh:
        fh.write("ensembl_id\tmedian\n")
        fh.writelines(f"{g}\t{v!r}\n" for g, v in medians.items())
    (corpus / "gene_medians.pkl").write_bytes(pickle.dumps(medians, protocol=4))


def _medians(corpus: Path) -> dict[str, float]:
    return pickle.loads((corpus / "gene_medians.pkl").read_bytes())


def test_changed_median_is_reported(gc30m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    medians = _medians(corpus)
    gene = sorted(medians)[10]
    medians[gene] *= 1.5
    _write_medians(corpus, medians)  # both files, consistently: only the recorded sha256 tells
    code, report = run_cli(str(corpus), "--no-check-inputs")
    assert code == 1
    assert failed(report) == {"dictionaries"}
    assert "gene_medians.tsv: sha256 differs" in messages(report, "dictionaries")
    assert "gene_medians.pkl: sha256 differs" in messages(report, "dictionaries")


def test_median_that_is_not_positive_and_files_that_disagree(gc30m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    medians = _medians(corpus)
    gene = sorted(medians)[3]
    medians[gene] = 0.0
    (corpus / "gene_medians.pkl").write_bytes(pickle.dumps(medians, protocol=4))
    report = validate_corpus(corpus, check_inputs=False)
    text = "\n".join(p.message for p in report.check("dictionaries").problems)
    assert f"median of {gene} is 0.0; medians must be finite and positive" not in text  # the TSV is used
    assert f"disagree on {gene}" in text
    _write_medians(corpus, medians)
    report = validate_corpus(corpus, check_inputs=False)
    text = "\n".join(p.message for p in report.check("dictionaries").problems)
    assert f"median of {gene} is 0.0; medians must be finite and positive" in text
    # the gene is now outside the vocabulary, and the corpus still holds its token
    assert "without a median" in "\n".join(p.message for p in report.check("tokens").problems)


def test_changed_input_skips_recomputation_unless_required(gc30m: Path, inputs: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    own_input = tmp_path / "a.h5ad"
    shutil.copy(inputs[0], own_input)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["datasets"][0]["path"] = str(own_input)
    manifest["datasets"][0]["spec"]["path"] = str(own_input)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    code, report = run_cli(str(corpus), "--all-cells", "--require-inputs")
    assert code == 0, json.dumps(report, indent=1)

    with own_input.open("ab") as fh:
        fh.write(b"\0")
    code, report = run_cli(str(corpus), "--all-cells")
    assert code == 0  # a changed input is not a failure of the corpus: its cells are not recomputed
    inputs_check = check_of(report, "inputs")
    assert inputs_check["status"] == "skipped"
    assert "sha256 differs" in inputs_check["notes"][0] and "dataset a" in inputs_check["notes"][0]
    encoding = check_of(report, "encoding")
    assert encoding["status"] == "pass"
    assert encoding["n_checked"] == manifest["datasets"][1]["cells"]["kept"]

    code, report = run_cli(str(corpus), "--all-cells", "--require-inputs")
    assert code == 1
    assert failed(report) == {"inputs"}
    problem = check_of(report, "inputs")["problems"][0]
    assert problem["dataset_id"] == "a" and "sha256 differs" in problem["message"]

    own_input.unlink()
    code, report = run_cli(str(corpus), "--require-inputs")
    assert code == 1 and "not found" in messages(report, "inputs")


def test_recomputation_notices_different_counts(gc30m: Path, inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """An input with the same cells but other counts, its new sha256 recorded: the cells differ."""
    corpus = copy_corpus(gc30m, tmp_path)
    a = ad.read_h5ad(inputs[0])
    x = sp.csr_matrix(a.X)
    x.data = x.data * np.random.default_rng(3).integers(1, 4, size=x.data.shape[0]).astype(x.data.dtype)
    a.X = x
    other = tmp_path / "a.h5ad"
    a.write_h5ad(other)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["datasets"][0].update(path=str(other), sha256=sha256_of_path(other)[0])
    manifest["datasets"][0]["spec"]["path"] = str(other)
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    report = validate_corpus(corpus, all_cells=True)
    assert {c.name for c in report.checks if c.status == "FAIL"} == {"encoding"}
    encoding = report.check("encoding")
    assert encoding.n_failed > 100
    assert all(p.cell_id.startswith("a") for p in encoding.problems)


def test_not_a_corpus(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neither"):
        validate_corpus(tmp_path)
    result = CliRunner().invoke(app, ["validate", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output and "Traceback" not in result.output


def test_text_output_names_the_offending_row(gc30m: Path, tmp_path: Path) -> None:
    corpus = copy_corpus(gc30m, tmp_path)
    rewrite_shard(shard_path(corpus, 0), edit_row(6, _lengthen))
    result = CliRunner().invoke(app, ["validate", str(corpus), "--no-check-inputs"])
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(ln.startswith("FAIL     lengths ") for ln in lines)
    assert any(f"{shard_path(corpus, 0).name} row 6, cell a6:" in ln for ln in lines), result.stdout
    assert lines[-1].startswith("summary: FAIL")


# ------------------------------------------------------------------------------------------- kernel


def _reference_problems(tokens: list[int], length: int, kinds: np.ndarray, cls: int, eos: int, wrap: bool,
                        max_length: int) -> int:
    """What `cell_problems_csr` should say about one row, computed the obvious way."""
    flags = 0
    if length != len(tokens):
        flags |= _kernels.CELL_LENGTH_MISMATCH
    if len(tokens) > max_length:
        flags |= _kernels.CELL_TOO_LONG
    if len(set(tokens)) != len(tokens):
        flags |= _kernels.CELL_DUPLICATE_TOKEN
    in_range = [t for t in tokens if 0 <= t < len(kinds)]
    if len(in_range) != len(tokens):
        flags |= _kernels.CELL_TOKEN_OUT_OF_RANGE
    if any(kinds[t] == _kernels.TOKEN_UNKNOWN for t in in_range):
        flags |= _kernels.CELL_TOKEN_NOT_IN_DICTIONARY
    if any(kinds[t] == _kernels.TOKEN_GENE_WITHOUT_MEDIAN for t in in_range):
        flags |= _kernels.CELL_GENE_WITHOUT_MEDIAN
    specials = [k for k, t in enumerate(tokens) if 0 <= t < len(kinds) and kinds[t] == _kernels.TOKEN_SPECIAL]
    if wrap:
        ok = len(tokens) >= 2 and tokens[0] == cls and tokens[-1] == eos and specials == [0, len(tokens) - 1]
    else:
        ok = not specials
    if not ok:
        flags |= _kernels.CELL_SPECIAL_MISPLACED
    if len(tokens) - len(specials) == 0:
        flags |= _kernels.CELL_EMPTY
    return flags


@pytest.mark.parametrize("wrap", [False, True])
def test_cell_problems_kernel_matches_reference(wrap: bool) -> None:
    rng = np.random.default_rng(7)
    kinds = np.full(40, _kernels.TOKEN_GENE, dtype=np.int8)
    kinds[:4] = _kernels.TOKEN_SPECIAL
    kinds[[10, 11]] = _kernels.TOKEN_UNKNOWN
    kinds[[20]] = _kernels.TOKEN_GENE_WITHOUT_MEDIAN
    rows, lengths = [], []
    for _ in range(3000):
        n = int(rng.integers(0, 9))
        body = rng.choice(np.arange(4, 40), size=n, replace=False).tolist()
        row = [2, *body, 3] if wrap else body
        if row and rng.random() < 0.4:
            row[int(rng.integers(len(row)))] = int(rng.choice([-1, 0, 1, 2, 3, 10, 20, 45, *row]))
        if rng.random() < 0.1 and row:
            row = row[:-1]
        rows.append(row)
        lengths.append(len(row) + (1 if rng.random() < 0.05 else 0))
    tokens = np.array([t for r in rows for t in r], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int32)
    seen = np.zeros(64, dtype=np.int64)
    got = _kernels.cell_problems_csr(tokens, offsets, np.array(lengths, dtype=np.int64), kinds, 2, 3, wrap, 8,
                                      seen, 1)
    expected = [_reference_problems(r, n, kinds, 2, 3, wrap, 8) for r, n in zip(rows, lengths, strict=True)]
    assert got.tolist() == expected
    assert len(set(expected)) > 10  # the rows exercise many combinations
