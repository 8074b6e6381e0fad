"""The corpus report: files, tables that match the manifest, tokenize corpora, bad folders."""

from __future__ import annotations

import hashlib
import html
import json
import pickle
import re
import shutil
from typing import TYPE_CHECKING

import anndata as ad
import jinja2  # noqa: F401 - core dependencies: never skipped
import matplotlib  # noqa: F401
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec
from genecorpus.corpus.manifest import DROP_REASONS
from genecorpus.errors import InputError
from genecorpus.report import write_report

if TYPE_CHECKING:
    from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
QC_PNGS = ("qc_n_counts.png", "qc_mito.png")
OTHER_PNGS = ("cells.png", "lengths.png", "genes_detected.png", "medians.png")


def _write_h5ad(path: Path, *, seed: int, n_cells: int, with_mito: bool) -> Path:
    """Integer counts over 500 candidate genes (+ chrM genes), with a few cells built to fail QC."""
    rng = np.random.default_rng(seed)
    cand = genes.candidate_genes()[:500].tolist()
    mito = genes.mito_genes()[:5].tolist() if with_mito else []
    rate = rng.gamma(0.6, 1.0, len(cand))
    depth = rng.lognormal(0.0, 0.25, n_cells)
    x = rng.poisson(np.outer(depth, rate * 2.0)).astype(np.int64)
    m = rng.poisson(3.0, (n_cells, len(mito))).astype(np.int64)
    x[:3] *= 30  # n_counts outliers
    if with_mito:
        m[3:6] += 400  # mitochondrial outliers
    x[6:9] = 0
    x[6:9, :3] = 1  # fewer than 7 detected genes
    counts = sp.csr_matrix(np.hstack([x, m]))
    a = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"c{seed}-{i}" for i in range(n_cells)]),
                   var=pd.DataFrame(index=cand + mito))
    a.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("report-inputs")
    return (_write_h5ad(d / "a.h5ad", seed=1, n_cells=240, with_mito=True),
            _write_h5ad(d / "b.h5ad", seed=2, n_cells=160, with_mito=False))


@pytest.fixture(scope="module")
def built(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-build") / "corpus"
    config = BuildConfig(datasets=(DatasetSpec(path=str(inputs[0]), id="alpha"),
                                   DatasetSpec(path=str(inputs[1]), id="beta")))
    build_corpus(config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(sum(d["cells"]["dropped"].values()) for d in manifest["datasets"]) > 0
    return out


@pytest.fixture(scope="module")
def index(built: Path) -> Path:
    """The report of ``built``, written once for the tests that only read it."""
    return write_report(built)


@pytest.fixture(scope="module")
def tokenized(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("report-tokenize")
    vocab = sorted(genes.candidate_genes()[:500].tolist())
    token_dict = {"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(vocab)}
    (d / "tokens.pkl").write_bytes(pickle.dumps(token_dict))
    (d / "medians.pkl").write_bytes(pickle.dumps(dict.fromkeys(vocab, 1.0)))
    config = BuildConfig(datasets=(DatasetSpec(path=str(inputs[0]), id="alpha"),),
                         token_dictionary=str(d / "tokens.pkl"), gene_medians=str(d / "medians.pkl"))
    out = d / "corpus"
    build_corpus(config, out, mode="tokenize")
    return out


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 100
    assert height > 100
    assert b"Matplotlib" not in data  # no version stamp, so equal pictures are equal bytes


def _row(page: str, table: str, first_cell: str) -> list[str]:
    """The cells of the row of table ``table`` whose first cell is ``first_cell``."""
    body = re.search(rf'<table id="{table}">(.*?)</table>', page, re.S)
    assert body is not None
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body.group(1), re.S):
        cells = [html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
        if cells and cells[0] == first_cell:
            return cells
    pytest.fail(f"no row {first_cell!r} in table {table}")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_build_report_files(built: Path, index: Path) -> None:
    assert index == built / "report" / "index.html"
    for name in (*QC_PNGS, *OTHER_PNGS):
        _assert_png(built / "report" / name)
        assert f'src="{name}"' in index.read_text()
    assert (built / "report" / "qc_sample.npz").is_file()
    assert not [p for p in built.iterdir() if p.name.startswith(".report")]


def test_html_tables_match_manifest(built: Path, index: Path) -> None:
    page = index.read_text()
    manifest = json.loads((built / "manifest.json").read_text())
    for d in manifest["datasets"]:
        c = d["cells"]
        row = _row(page, "cells", d["dataset_id"])
        assert row[1:3] == [f"{c['in']:,}", f"{c['kept']:,}"]
        assert row[4:] == [f"{c['dropped'][r]:,}" for r in DROP_REASONS]
        g = _row(page, "genes", d["dataset_id"])
        assert g[3] == f"{d['genes']['n_input_genes']:,}"
    total = _row(page, "cells", "total")
    assert total[2] == f"{manifest['corpus']['n_cells']:,}"
    assert _row(page, "qc", "beta")[4] == "skipped (no mitochondrial genes)"
    assert "Mitochondrial rule skipped" in page
    assert "2,048" in page  # the gc30m truncation limit


def test_report_is_deterministic_and_replaced(built: Path, index: Path) -> None:
    report = index.parent
    (report / "stale.png").write_bytes(PNG_SIGNATURE)
    (report / "notes.txt").write_text("mine\n")
    before = _digests(report)
    write_report(built)
    after = _digests(report)
    assert "stale.png" not in after
    assert after["notes.txt"] == before["notes.txt"]
    assert after["qc_sample.npz"] == before["qc_sample.npz"]
    assert {k: v for k, v in before.items() if k != "stale.png"} == after
    (report / "notes.txt").unlink()


def test_panel_cap_is_noted(built: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(built, tmp_path / "corpus")
    page = write_report(copy, max_panels=1).read_text()
    assert "first 1 of 2 datasets" in page


def test_tokenize_corpus_has_no_qc_plots(tokenized: Path) -> None:
    index = write_report(tokenized)
    page = index.read_text()
    for name in QC_PNGS:
        assert not (tokenized / "report" / name).exists()
        assert name not in page
    for name in OTHER_PNGS:
        _assert_png(tokenized / "report" / name)
    assert "no QC plots" in page
    manifest = json.loads((tokenized / "manifest.json").read_text())
    row = _row(page, "cells", "alpha")
    assert row[2] == f"{manifest['datasets'][0]['cells']['kept']:,}"


@pytest.mark.parametrize("case", ["missing", "empty", "bad-json", "not-manifest"])
def test_not_a_corpus(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "folder"
    if case != "missing":
        folder.mkdir()
    if case == "bad-json":
        (folder / "manifest.json").write_text("{")
    if case == "not-manifest":
        (folder / "manifest.json").write_text('{"name": "something else"}')
    with pytest.raises(InputError, match=re.escape(str(folder))):
        write_report(folder)
    assert not (folder / "report").exists()


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("unpickled",))


@pytest.mark.parametrize(("case", "message"), [
    ("lengths-missing", "lengths.pkl: missing"),
    ("lengths-count", "inconsistent"),
    ("lengths-global", "not a pickled list"),
    ("sample-corrupt", "qc_sample.npz"),
])
def test_broken_corpus_files(built: Path, tmp_path: Path, case: str, message: str) -> None:
    copy = tmp_path / "corpus"
    (copy / "report").mkdir(parents=True)
    for name in ("manifest.json", "gene_medians.tsv", "lengths.pkl"):
        (copy / name).write_bytes((built / name).read_bytes())
    if case == "lengths-missing":
        (copy / "lengths.pkl").unlink()
    if case == "lengths-count":
        (copy / "lengths.pkl").write_bytes(pickle.dumps([1, 2, 3]))
    if case == "lengths-global":
        (copy / "lengths.pkl").write_bytes(pickle.dumps(_Evil()))
    if case == "sample-corrupt":
        (copy / "report" / "qc_sample.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match=re.escape(message)):
        write_report(copy)
    assert not [p for p in copy.iterdir() if p.name.startswith(".report")]


def test_kept_ranges_read_as_what_they_cut(built: Path, index: Path) -> None:
    """A kept range whose lower bound is below zero cuts nothing below: the table says "no lower cut"
    rather than printing a negative count as if it were a cut."""
    manifest = json.loads((built / "manifest.json").read_text())
    html = index.read_text()
    table = html[html.index('<table id="qc">'):]
    table = table[:table.index("</table>")]
    lows = []
    for d in manifest["datasets"]:
        lo = d["qc"]["n_counts_range"][0]
        row = next(r for r in table.split("<tr>") if f"<td>{d['dataset_id']}</td>" in r)
        assert ("no lower cut" in row) == (lo < 0), row
        assert "[-" not in row, row
        lows.append(lo)
    assert min(lows) < 0  # the fixture's outliers widen the SD: the case is exercised
