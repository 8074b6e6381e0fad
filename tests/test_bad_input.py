"""Bad input on the command line: one clear line, a non-zero exit, nothing half-written.

Every case writes an input that is wrong in one way, runs the real ``genecorpus build`` or
``genecorpus tokenize`` (through typer's :class:`~typer.testing.CliRunner`, in this process) and checks
the project's standard for bad input (see ``genecorpus.errors``):

1. the exit code is not 0 and the error was handled (no uncaught exception, no traceback);
2. stderr is exactly one line, ``error: …``, that names the offending file, the item (cell, gene,
   column, key, line) where there is one, and what to do;
3. neither the output folder nor a ``.<out>.incomplete-*`` sibling exists afterwards.

A few inputs look wrong but are accepted on purpose (duplicate gene ids are summed, SPEC §2.2;
duplicate cell barcodes are kept, see ``docs/decisions.md``); those cases check the result instead.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
import shutil
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from genecorpus import testing
from genecorpus.cli import app

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from click.testing import Result

# Protein-coding genes of GENCODE v48, so that cells pass QC and every gene is in the vocabulary.
GENES = [
    "ENSG00000000003", "ENSG00000000419", "ENSG00000000457", "ENSG00000000460", "ENSG00000000938",
    "ENSG00000000971", "ENSG00000001036", "ENSG00000001084", "ENSG00000001167", "ENSG00000001460",
    "ENSG00000001461", "ENSG00000001497",
]
N_CELLS = 30
CELLS = [f"c{i}" for i in range(N_CELLS)]

runner = CliRunner()


# ---------------------------------------------------------------------------------------- helpers


def good_counts(n_cells: int = N_CELLS) -> np.ndarray:
    """Dense counts 1-4 on every gene: every cell passes QC and has all genes."""
    return np.random.default_rng(0).integers(1, 5, size=(n_cells, len(GENES))).astype(np.float64)


def write_h5ad(path: Path, x: np.ndarray | None = None, **kwargs: Any) -> Path:
    """An h5ad of ``x`` (default :func:`good_counts`) with cells ``c0…`` and :data:`GENES`."""
    x = good_counts() if x is None else x
    kwargs.setdefault("cell_ids", CELLS[: x.shape[0]])
    kwargs.setdefault("gene_ids", GENES[: x.shape[1]])
    kwargs.setdefault("dtype", np.float64)
    return testing.write_h5ad(path, sp.csr_matrix(x), **kwargs)


def write_manifest(folder: Path, *datasets: dict[str, Any], top: str = "") -> Path:
    """A manifest ``m.toml`` with ``top`` lines first, then one ``[[datasets]]`` table per dict."""
    lines = [top]
    for entry in datasets:
        lines.append("[[datasets]]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in entry.items()]
    path = folder / "m.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args: str | os.PathLike[str]) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def build(data: Path, out: Path, top: str = "", **entry: Any) -> Result:
    """``genecorpus build`` of one dataset ``data`` (manifest beside ``out``)."""
    return run_cli("build", write_manifest(out.parent, {"path": str(data), **entry}, top=top),
                   "--out", out, "--no-report")


def write_dictionaries(folder: Path) -> tuple[Path, Path]:
    """A gc30m token dictionary and gene medians for :data:`GENES`."""
    tokens = folder / "tokens.pkl"
    tokens.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(GENES)}}))
    medians = folder / "medians.pkl"
    medians.write_bytes(pickle.dumps(dict.fromkeys(GENES, 2.0)))
    return tokens, medians


def tokenize(data: Path, out: Path, *, tokens: Path, medians: Path, extra: tuple[str, ...] = ()) -> Result:
    return run_cli("tokenize", data, "--out", out, "--token-dictionary", tokens, "--gene-medians", medians,
                   "--no-report", *extra)


def leftovers(out: Path) -> list[str]:
    """Hidden siblings a build leaves while running (``.<out>.incomplete-*``, ``.<out>.old-*``)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def assert_clean_failure(result: Result, out: Path, *needles: str, out_may_exist: bool = False) -> str:
    """Check the standard for bad input; return the error line."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {result.stderr}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    if not out_may_exist:
        assert not out.exists()
    assert leftovers(out) == []
    return line


# ------------------------------------------------------------------------------ unreadable inputs


def _garbage_h5ad(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp / "garbage.h5ad"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path, {}


def _truncated_h5ad(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = write_h5ad(tmp / "cut.h5ad")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path, {}


def _h5ad_without_x(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = write_h5ad(tmp / "nox.h5ad")
    with h5py.File(path, "r+") as f:
        del f["X"]
    return path, {}


def _h5ad_declared_loom(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return write_h5ad(tmp / "really.h5ad"), {"format": "loom"}


def _unknown_format_name(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return write_h5ad(tmp / "named.h5ad"), {"format": "parquet"}


def _unknown_suffix(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = tmp / "counts.xyz"
    path.write_text("what is this\n")
    return path, {}


def _missing_file(tmp: Path) -> tuple[Path, dict[str, Any]]:
    return tmp / "nowhere.h5ad", {}


def _plain_folder(tmp: Path) -> tuple[Path, dict[str, Any]]:
    folder = tmp / "somefolder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a matrix\n")
    return folder, {}


def _folder_named_h5ad(tmp: Path) -> tuple[Path, dict[str, Any]]:
    folder = tmp / "folder.h5ad"
    folder.mkdir()
    return folder, {}


def _ragged_csv(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = testing.write_text(tmp / "ragged.csv", sp.csr_matrix(good_counts()), cell_ids=CELLS, gene_ids=GENES)
    lines = path.read_text().splitlines()
    lines[5] = lines[5].rsplit(",", 2)[0]  # cell c4 loses its last two values
    path.write_text("\n".join(lines) + "\n")
    return path, {}


def _mtx_without_features(tmp: Path) -> tuple[Path, dict[str, Any]]:
    folder = testing.write_10x_mtx(tmp / "mtx", sp.csr_matrix(good_counts().astype(np.int32)),
                                   cell_ids=CELLS, gene_ids=GENES)
    (folder / "features.tsv.gz").unlink()
    return folder, {}


def _loom_without_attributes(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = testing.write_loom(tmp / "bare.loom", sp.csr_matrix(good_counts()), cell_ids=CELLS, gene_ids=GENES)
    with h5py.File(path, "r+") as f:
        del f["row_attrs"]
        del f["col_attrs"]
        f.create_group("row_attrs")
        f.create_group("col_attrs")
    return path, {}


def _zarr_with_cut_chunk(tmp: Path) -> tuple[Path, dict[str, Any]]:
    path = testing.write_zarr(tmp / "cut.zarr", sp.csr_matrix(good_counts()), cell_ids=CELLS, gene_ids=GENES,
                              zarr_format=2)
    chunk = path / "X" / "data" / "0"  # blosc, which would decode the half chunk into garbage
    chunk.write_bytes(chunk.read_bytes()[:40])
    return path, {}


def _zarr_without_x(tmp: Path) -> tuple[Path, dict[str, Any]]:
    import zarr

    path = testing.write_zarr(tmp / "nox.zarr", sp.csr_matrix(good_counts()), cell_ids=CELLS, gene_ids=GENES,
                              layer="counts")
    shutil.rmtree(path / "X")
    zarr.consolidate_metadata(path)
    return path, {}


def _zarr_group_not_anndata(tmp: Path) -> tuple[Path, dict[str, Any]]:
    import zarr

    path = tmp / "plain.zarr"
    zarr.open_group(path, mode="w").create_array("X", shape=(N_CELLS, len(GENES)), dtype="f4")
    return path, {}


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
@pytest.mark.parametrize(("make", "needles"), [
    pytest.param(_garbage_h5ad, ["garbage.h5ad", "not a readable", "re-download"], id="corrupt-hdf5"),
    pytest.param(_truncated_h5ad, ["cut.h5ad", "re-download"], id="truncated-h5ad"),
    pytest.param(_h5ad_without_x, ["nox.h5ad", "no X", "layer="], id="h5ad-without-X"),
    pytest.param(_h5ad_declared_loom, ["really.h5ad", "'loom'", "content is h5ad", "omit format"],
                 id="wrong-format-declared"),
    pytest.param(_unknown_format_name, ["named.h5ad", "'parquet'", "known formats: h5ad", "omit it"],
                 id="unknown-format-name"),
    pytest.param(_unknown_suffix, ["counts.xyz", "unknown input format", "pass format="], id="unknown-suffix"),
    pytest.param(_missing_file, ["nowhere.h5ad", "check the path"], id="file-not-found"),
    pytest.param(_plain_folder, ["somefolder", "a folder that no reader recognizes", "matrix.mtx"],
                 id="folder-without-matrix"),
    pytest.param(_folder_named_h5ad, ["folder.h5ad", "a folder that no reader recognizes", "give a data file"],
                 id="folder-given-as-file"),
    pytest.param(_ragged_csv, ["ragged.csv", "line 6", "'c4'", "11 fields", "fix"], id="csv-ragged-rows"),
    pytest.param(_mtx_without_features, ["mtx", "features.tsv", "needs all three"], id="10x-without-features"),
    pytest.param(_loom_without_attributes, ["bare.loom", "no gene ids", "add row_attrs/Gene"], id="loom-without-attributes"),
    pytest.param(_zarr_with_cut_chunk, ["cut.zarr", "/X/data: chunk 0", "re-download or re-export"],
                 id="zarr-chunk-cut-short"),
    pytest.param(_zarr_without_x, ["nox.zarr", "no X", "layer="], id="zarr-without-X"),
    pytest.param(_zarr_group_not_anndata, ["plain.zarr", "not a zarr AnnData", "re-export"],
                 id="zarr-group-not-anndata"),
])
def test_unreadable_input(tmp_path: Path, make: Callable[[Path], tuple[Path, dict[str, Any]]],
                          needles: list[str]) -> None:
    data, entry = make(tmp_path)
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out, **entry), out, *needles)


# ---------------------------------------------------------------------------- values, not counts


@pytest.mark.parametrize(("value", "what"), [
    pytest.param(2.5, "not an integer", id="fraction"),
    pytest.param(-1.0, "negative", id="negative"),
    pytest.param(math.nan, "NaN", id="nan"),
    pytest.param(math.inf, "infinite", id="inf"),
    pytest.param(2.0**31, "larger than 2**31-1", id="above-int32"),
])
def test_values_that_are_not_counts(tmp_path: Path, value: float, what: str) -> None:
    x = good_counts()
    x[7, 3] = value
    data = write_h5ad(tmp_path / "values.h5ad", x)
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "values.h5ad", "'c7'", GENES[3], what, "raw integer counts")


def test_counts_above_int32_in_an_integer_matrix(tmp_path: Path) -> None:
    x = good_counts().astype(np.int64)
    x[2, 5] = 2**31 + 7
    data = write_h5ad(tmp_path / "wide.h5ad", x, dtype=np.int64)
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "wide.h5ad", "'c2'", GENES[5], "larger than 2**31-1")


# ---------------------------------------------------------------------------------------- genes


def test_mixed_species(tmp_path: Path) -> None:
    genes = [*GENES[:-2], "ENSMUSG00000064370", "ENSMUSG00000000001"]
    data = write_h5ad(tmp_path / "mixed.h5ad", gene_ids=genes)
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "mixed.h5ad", "'ENSMUSG00000064370'",
                         "keep only the human genes")


def test_no_gene_maps(tmp_path: Path) -> None:
    genes = [f"NOT_A_GENE_{i}" for i in range(len(GENES))]
    data = write_h5ad(tmp_path / "nomap.h5ad", gene_ids=genes)
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "nomap.h5ad", "'NOT_A_GENE_0'", "check that the genes")


def test_unknown_annotation_release(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "sym.h5ad", gene_ids=["TP53", "CD4", "MS4A1", "CD3E", "ACTB", "GAPDH", "B2M",
                                                       "CD8A", "LYZ", "NKG7", "GNLY", "CD14"])
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out, release="hg42"), out, "sym.h5ad", "'hg42'", "valid: ")


def test_duplicate_gene_ids_are_summed(tmp_path: Path) -> None:
    """SPEC §2.2: columns that end up as the same Ensembl ID are summed, not refused."""
    genes = [*GENES[:-1], f"{GENES[0]}.7"]  # last column is the first gene again, with a version
    data = write_h5ad(tmp_path / "dup_genes.h5ad", gene_ids=genes)
    out = tmp_path / "corpus"
    result = build(data, out)
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["datasets"][0]["genes"]["n_genes_in_universe"] == len(GENES) - 1
    assert manifest["datasets"][0]["genes"]["n_columns_in_universe"] == len(GENES)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicate_cell_barcodes_are_kept(tmp_path: Path) -> None:
    """Duplicate barcodes within a dataset are kept as they are (docs/decisions.md, Bad input)."""
    import datasets

    cells = [*CELLS[:-1], CELLS[0]]
    data = write_h5ad(tmp_path / "dup_cells.h5ad", cell_ids=cells)
    out = tmp_path / "corpus"
    result = build(data, out)
    assert result.exit_code == 0, result.stderr
    corpus = datasets.load_from_disk(str(out))
    assert corpus["cell_id"] == cells


# -------------------------------------------------------------------------------------- manifest


@pytest.mark.parametrize(("text", "needles"), [
    pytest.param("layout = 'gc30m\n[[datasets]]\npath = 'a.h5ad'\n", ["line 1", "TOML"], id="malformed-toml"),
    pytest.param("layout = 'gc30m'\n", ["[[datasets]]"], id="missing-datasets"),
    pytest.param("colour = 'red'\n[[datasets]]\npath = 'a.h5ad'\n", ["colour", "not permitted"], id="unknown-key"),
    pytest.param("[[datasets]]\npath = 'a.h5ad'\nformt = 'h5ad'\n", ["datasets.0.formt"], id="unknown-dataset-key"),
    pytest.param("[[datasets]]\npath = 'a.h5ad'\n[[datasets]]\npath = 'sub/a.h5ad'\n", ["'a'", "unique id"],
                 id="duplicate-dataset-id"),
    pytest.param("[[datasets]]\npath = 'a.h5ad'\nid = 'x'\n[[datasets]]\npath = 'b.h5ad'\nid = 'x'\n",
                 ["'x'", "unique id"], id="duplicate-explicit-id"),
    pytest.param("layout = 'gc31m'\n[[datasets]]\npath = 'a.h5ad'\n", ["layout", "gc30m"], id="unknown-layout"),
    pytest.param("block_size = 0\n[[datasets]]\npath = 'a.h5ad'\n", ["block_size", "greater than"],
                 id="block-size-zero"),
    pytest.param("[[datasets]]\nid = 'a'\n", ["datasets.0.path", "Field required"], id="dataset-without-path"),
    pytest.param("[[datasets]]\npath = 'a.h5ad'\ngene_id = 'entrez'\n", ["datasets.0.gene_id", "'symbol'"],
                 id="unknown-gene-id-kind"),
])
def test_manifest_errors(tmp_path: Path, text: str, needles: list[str]) -> None:
    write_h5ad(tmp_path / "a.h5ad")
    (tmp_path / "m.toml").write_text(text)
    out = tmp_path / "corpus"
    line = assert_clean_failure(run_cli("build", tmp_path / "m.toml", "--out", out), out, "m.toml", *needles)
    assert "fix the manifest" in line or "list at least one" in line


def test_manifest_that_is_not_text(tmp_path: Path) -> None:
    manifest = tmp_path / "m.toml"
    manifest.write_bytes(b"\xf9\xfa" + np.random.default_rng(0).bytes(64))
    out = tmp_path / "corpus"
    assert_clean_failure(run_cli("build", manifest, "--out", out), out, "m.toml", "UTF-8 TOML")


def test_unknown_reference_annotation(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out, top="reference = 'gencode99'"), out,
                         "reference", "'gencode99'", "valid: gencode48", "fix reference in the manifest")


def test_manifest_not_found(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    assert_clean_failure(run_cli("build", tmp_path / "nope.toml", "--out", out), out, "nope.toml", "check the path")


def test_obs_column_that_does_not_exist(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "obs.h5ad", obs={"cell_type": ["T"] * N_CELLS})
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out, obs_columns=["celltype"]), out,
                         "obs.h5ad", "'celltype'", "available: cell_type")


def test_filter_column_with_strings(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "flags.h5ad", obs={"filter_pass": ["yes", "no"] * (N_CELLS // 2)})
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "flags.h5ad", "'filter_pass'", "cell 'c0'", "'yes'",
                         "boolean or 0/1")


# -------------------------------------------------------------------------------- empty corpora


@pytest.mark.parametrize(("make", "needles"), [
    pytest.param(lambda p: write_h5ad(p, good_counts(0)), ["0 cells in the input"], id="zero-cells"),
    pytest.param(lambda p: write_h5ad(p, obs={"filter_pass": np.zeros(N_CELLS, dtype=bool)}),
                 [f"{N_CELLS} by filter_pass"], id="all-filtered-by-filter-pass"),
    pytest.param(lambda p: write_h5ad(p, np.where(np.arange(len(GENES)) < 3, good_counts(), 0.0)),
                 [f"{N_CELLS} by min_genes"], id="all-dropped-by-qc"),
])
def test_build_without_any_cell_fails(tmp_path: Path, make: Callable[[Path], Path], needles: list[str]) -> None:
    """A corpus with no cell is useless for pretraining: the build fails and says why, per dataset."""
    data = make(tmp_path / "empty.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out), out, "no cell", "empty.h5ad", *needles)


def test_tokenize_without_any_cell_fails(tmp_path: Path) -> None:
    tokens, medians = write_dictionaries(tmp_path)
    data = write_h5ad(tmp_path / "none_pass.h5ad", obs={"filter_pass": np.zeros(N_CELLS, dtype=int)})
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians), out,
                         "no cell", "none_pass.h5ad", f"{N_CELLS} by filter_pass")


def test_empty_dataset_beside_others_is_counted(tmp_path: Path) -> None:
    """An empty dataset among others does not fail the build: it is counted with 0 cells."""
    write_h5ad(tmp_path / "empty.h5ad", good_counts(0))
    write_h5ad(tmp_path / "full.h5ad")
    manifest = write_manifest(tmp_path, {"path": "empty.h5ad"}, {"path": "full.h5ad"})
    out = tmp_path / "corpus"
    result = run_cli("build", manifest, "--out", out, "--no-report")
    assert result.exit_code == 0, result.stderr
    counts = [d["cells"] for d in json.loads((out / "manifest.json").read_text())["datasets"]]
    assert counts[0]["in"] == 0 and counts[1]["kept"] == N_CELLS


# ---------------------------------------------------------------------------------- dictionaries


class Evil:
    """A pickle payload that runs a shell command when unpickled by :func:`pickle.load`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _not_a_pickle(path: Path) -> None:
    path.write_text("ENSG00000000003\t0\n")


def _evil_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": Evil(path.with_suffix(".pwned"))}))


def _list_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps(list(GENES)))


def _changed(token: str, value: object = None) -> Callable[[Path], None]:
    """A writer of the good token dictionary with ``token`` removed (``value`` None) or set to ``value``."""
    def write(path: Path) -> None:
        tokens: dict[str, object] = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(GENES)}}
        if value is None:
            del tokens[token]
        else:
            tokens[token] = value
        path.write_bytes(pickle.dumps(tokens))
    return write


@pytest.mark.parametrize(("write", "needles"), [
    pytest.param(_not_a_pickle, ["not a plain dictionary pickle"], id="not-a-pickle"),
    pytest.param(_evil_pickle, ["refuses to load", "system"], id="pickle-that-runs-code"),
    pytest.param(_list_pickle, ["holds a list"], id="pickle-of-a-list"),
    pytest.param(_changed("<pad>"), ["<pad>"], id="missing-pad"),
    pytest.param(_changed("<mask>"), ["<mask>"], id="missing-mask"),
    pytest.param(_changed(GENES[5], 2.5), [f"'{GENES[5]}'", "2.5", "not an integer"], id="float-token-id"),
    pytest.param(_changed(GENES[5], "seven"), [f"'{GENES[5]}'", "'seven'", "not an integer"], id="str-token-id"),
    pytest.param(_changed(GENES[5], 3), [f"'{GENES[1]}'", f"'{GENES[5]}'", "share the id 3"], id="shared-token-id"),
    pytest.param(_changed(GENES[5], -3), [f"'{GENES[5]}'", "negative"], id="negative-token-id"),
])
def test_bad_token_dictionary(tmp_path: Path, write: Callable[[Path], None], needles: list[str]) -> None:
    _, medians = write_dictionaries(tmp_path)
    bad = tmp_path / "bad_tokens.pkl"
    write(bad)
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    line = assert_clean_failure(tokenize(data, out, tokens=bad, medians=medians), out, "bad_tokens.pkl", *needles)
    assert "Geneformer" in line or "corrupt" in line
    assert not bad.with_suffix(".pwned").exists()


def test_token_dictionary_out_of_ensembl_order(tmp_path: Path) -> None:
    """``build`` with a given dictionary breaks rank ties by token id, so ids must follow the Ensembl IDs."""
    shuffled = tmp_path / "shuffled.pkl"
    shuffled.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, **{g: 20 - i for i, g in enumerate(GENES)}}))
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(build(data, out, top=f"token_dictionary = '{shuffled}'"), out,
                         "shuffled.pkl", "ascending Ensembl-ID order", "give a dictionary")


@pytest.mark.parametrize(("value", "shown"), [
    pytest.param(-1.5, "-1.5", id="negative"),
    pytest.param(math.nan, "nan", id="nan"),
    pytest.param(0.0, "0.0", id="zero"),
    pytest.param("two", "'two', not a number", id="string"),
])
def test_bad_gene_medians(tmp_path: Path, value: object, shown: str) -> None:
    tokens, _ = write_dictionaries(tmp_path)
    medians = tmp_path / "bad_medians.pkl"
    medians.write_bytes(pickle.dumps({**dict.fromkeys(GENES, 2.0), GENES[4]: value}))
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians), out, "bad_medians.pkl", GENES[4], shown,
                         "positive and finite" if isinstance(value, float) else "gene_median_dictionary")


def test_gene_medians_tsv_with_a_bad_line(tmp_path: Path) -> None:
    tokens, _ = write_dictionaries(tmp_path)
    medians = tmp_path / "medians.tsv"
    medians.write_text("ensembl_id\tmedian\n" + "".join(f"{g}\t2.0\n" for g in GENES[:3]) + f"{GENES[3]} 2.0\n")
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians), out, "medians.tsv", "line 5")


def test_gene_mapping_with_bad_values(tmp_path: Path) -> None:
    tokens, medians = write_dictionaries(tmp_path)
    mapping = tmp_path / "mapping.pkl"
    mapping.write_bytes(pickle.dumps({"TP53": GENES[0], "CD4": 17}))
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians, extra=("--gene-mapping", str(mapping))),
                         out, "mapping.pkl", "'CD4'", "ensembl_mapping_dict")


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--gene-id", "entrez", "gene_id"),
    ("--layout", "gc31m", "layout"),
    ("--block-size", "0", "block_size"),
])
def test_tokenize_bad_option(tmp_path: Path, option: str, value: str, needle: str) -> None:
    tokens, medians = write_dictionaries(tmp_path)
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians, extra=(option, value)),
                         out, needle, "Input should be")


def test_tokenize_obs_column_that_does_not_exist(tmp_path: Path) -> None:
    tokens, medians = write_dictionaries(tmp_path)
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert_clean_failure(tokenize(data, out, tokens=tokens, medians=medians, extra=("--obs-columns", "tissue")),
                         out, "ok.h5ad", "'tissue'", "available")


# ---------------------------------------------------------------------------------------- output


def test_output_path_is_an_existing_file(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    out.write_text("precious\n")
    for flags in ((), ("--overwrite",)):
        result = run_cli("build", write_manifest(tmp_path, {"path": str(data)}), "--out", out, "--no-report", *flags)
        assert_clean_failure(result, out, "corpus", "not a corpus folder", "--out", out_may_exist=True)
        assert out.read_text() == "precious\n"


def test_output_folder_that_is_not_a_corpus_is_never_overwritten(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("precious\n")
    result = run_cli("build", write_manifest(tmp_path, {"path": str(data)}), "--out", out, "--overwrite")
    assert_clean_failure(result, out, "results", "not a corpus folder", out_may_exist=True)
    assert (out / "thesis.tex").read_text() == "precious\n"


def test_existing_corpus_needs_overwrite(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    manifest = write_manifest(tmp_path, {"path": str(data)})
    assert run_cli("build", manifest, "--out", out, "--no-report").exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = run_cli("build", manifest, "--out", out, "--no-report")
    assert_clean_failure(result, out, "corpus", "already exists", "--overwrite", out_may_exist=True)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    result = run_cli("build", manifest, "--out", out, "--no-report", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert leftovers(out) == []


def test_failed_overwrite_keeps_the_old_corpus(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad")
    out = tmp_path / "corpus"
    assert run_cli("build", write_manifest(tmp_path, {"path": str(data)}), "--out", out, "--no-report").exit_code == 0
    x = good_counts()
    x[1, 1] = 0.5
    shutil.copy(write_h5ad(tmp_path / "bad.h5ad", x), data)
    result = run_cli("build", write_manifest(tmp_path, {"path": str(data)}), "--out", out, "--overwrite")
    assert_clean_failure(result, out, "ok.h5ad", "'c1'", out_may_exist=True)
    assert (out / "manifest.json").exists()
