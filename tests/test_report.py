"""The corpus report: files, tables that match the manifest, tokenize corpora, bad folders."""

from __future__ import annotations

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
from corpus_files import corpus_file_digests

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
    return corpus_file_digests(folder, recursive=False, strip_timings=False)


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


def _figures(page: str) -> dict[str, str]:
    """Each figure's PNG file name → its caption (unescaped)."""
    found = re.findall(r'<figure>\s*<img src="([^"]+)"[^>]*>\s*<figcaption>(.*?)</figcaption>\s*</figure>', page, re.S)
    return {name: html.unescape(caption) for name, caption in found}


@pytest.mark.parametrize("corpus", ["built", "tokenized"])
def test_every_plot_has_a_caption(corpus: str, request: pytest.FixtureRequest) -> None:
    """Every PNG of the page sits in a figure with a caption of its own, and no image is left without one."""
    folder = request.getfixturevalue(corpus)
    page = write_report(folder).read_text()
    figures = _figures(page)
    pngs = sorted(p.name for p in (folder / "report").glob("*.png"))
    assert sorted(figures) == pngs
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == pngs  # no image outside a figure
    assert all(len(c) > 200 for c in figures.values()), figures
    assert len(set(figures.values())) == len(figures)  # not one boilerplate text
    if corpus == "tokenized":
        assert "not computed from these cells" in figures["medians.png"]
        assert "no QC sample" in figures["genes_detected.png"]


def test_captions_state_the_corpus_numbers(built: Path, index: Path) -> None:
    """The cells, QC, genes and lengths captions give the counts of manifest.json, lengths.pkl and the sample."""
    figures = _figures(index.read_text())
    manifest = json.loads((built / "manifest.json").read_text())
    datasets = {d["dataset_id"]: d for d in manifest["datasets"]}
    n_in = sum(d["cells"]["in"] for d in datasets.values())
    kept = sum(d["cells"]["kept"] for d in datasets.values())
    assert f"In all, {kept:,} of {n_in:,} cells ({100 * kept / n_in:.1f}%) were kept" in figures["cells.png"]
    for name, d in datasets.items():
        removed = d["cells"]["dropped"]["n_counts_outlier"]
        assert removed > 0  # the fixture's outliers: the count is exercised
        assert f"{name} {removed:,} of {d['cells']['in']:,} cells" in figures["qc_n_counts.png"]
    alpha_mito = datasets["alpha"]["cells"]["dropped"]["mito_outlier"]
    assert f"alpha {alpha_mito:,} of 240 cells" in figures["qc_mito.png"]
    assert "beta: no mitochondrial genes, rule skipped" in figures["qc_mito.png"]
    min_genes = sum(d["cells"]["dropped"]["min_genes"] for d in datasets.values())
    assert min_genes > 0
    assert f"it removed {min_genes:,} cells in all" in figures["genes_detected.png"]
    with np.load(built / "report" / "qc_sample.npz") as z:
        n_genes, reason = z["n_genes"], z["reason"]
    assert f"median of {np.median(n_genes[reason < 0]):,.0f} genes" in figures["genes_detected.png"]
    lengths = np.asarray(pickle.loads((built / "lengths.pkl").read_bytes()))
    assert f"{int((lengths >= 2048).sum()):,} of {lengths.size:,} cells" in figures["lengths.png"]
    assert f"the median cell has {np.median(lengths):,.0f} tokens" in figures["lengths.png"]


def test_medians_caption_explains_the_peaks_with_numbers(built: Path, index: Path) -> None:
    """The medians are of depth-normalized values, not whole counts: the caption places one count in each
    dataset's cells (10,000 / median depth of the kept sample cells) and its shares of genes match numpy."""
    caption = _figures(index.read_text())["medians.png"]
    medians = pd.read_csv(built / "gene_medians.tsv", sep="\t")["median"].to_numpy()
    # the premise: normalized medians are (almost) never whole or half numbers, so they are not what peaks
    assert np.mean(np.mod(2 * medians, 1) == 0) < 0.01
    assert "not whole numbers" in caption
    manifest = json.loads((built / "manifest.json").read_text())
    with np.load(built / "report" / "qc_sample.npz") as z:
        dataset, n_counts, reason = z["dataset"], z["n_counts"], z["reason"]
    values, lows, highs = [], [], []
    for i, d in enumerate(manifest["datasets"]):
        depth = n_counts[(dataset == i) & (reason < 0)]
        q25, q50, q75 = np.percentile(depth, [25, 50, 75])
        values.append(1e4 / q50)
        lows.append(1e4 / q75)
        highs.append(1e4 / q25)
        assert f"{d['dataset_id']} {1e4 / q50:.3g} ({q50:,.0f} counts)" in caption
    in_band = np.any([(medians >= lo) & (medians <= hi) for lo, hi in zip(lows, highs, strict=True)], axis=0)
    n = medians.size
    assert f"{100 * in_band.mean():.1f}% of the {n:,} genes lie in a band" in caption
    assert f"{100 * np.mean(medians >= 2 * max(values)):.1f}% lie at or above twice the highest line" in caption
    assert f"{100 * np.mean(medians < min(lows)):.1f}% lie below the lowest band" in caption
    assert f"Median of the {n:,} medians: {np.median(medians):.3g}" in caption


def test_duplicates_matrix_caption_says_what_a_number_counts(built: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(built, tmp_path / "corpus")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["duplicates"] |= {"policy": "report", "shared": [{"a": "alpha", "b": "beta", "n_cells": 12}]}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(copy).read_text()
    assert _row(page, "duplicates", "beta") == ["beta", "12"]
    caption = html.unescape(re.search(r'<table id="duplicates">\s*<caption>(.*?)</caption>', page, re.S).group(1))
    assert "cells of the row's dataset" in caption
    assert "empty square means none" in caption
    assert "stay in the corpus" in caption  # policy report
    assert "12 of the 160 cells of beta (7.5%) are copies of cells of alpha" in caption
