"""`genecorpus evaluate` on real Kang 2018 PBMC counts and the real Kang / Seurat labels.

Stand-in embeddings (the embed command is tested elsewhere): a PCA of the cells' log counts (a good
embedding) and Gaussian noise (a useless one). Expectations come from sklearn run by hand on dense
matrices read with anndata, not from the code under test.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import sklearn  # noqa: F401 - the train extra: make test installs it, so a missing one fails here
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from typer.testing import CliRunner

from genecorpus.cli import app
from genecorpus.errors import InputError
from genecorpus.model.evaluate import (
    EMBEDDING_KEY,
    ClassifierScores,
    EvaluationReport,
    evaluate_embeddings,
    join_labels,
    write_evaluation,
)
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import write_h5ad

JOIN = "cell=cell_id,stim=dataset_id"  # the labels file as published: stim is ctrl|stim = our dataset ids
PER_CLASS = {"CD4 T cells": 110, "CD14+ Monocytes": 110, "B cells": 80, "NK cells": 60}


@pytest.fixture(autouse=True)
def _one_blas_thread() -> object:
    """The by-hand dense PCAs: OpenBLAS threads crawl when other processes share the cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="session")
def kang_subset(kang_labels: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """ctrl.h5ad (labeled cells of 4 types + 60 unlabeled) and stim.h5ad (80 cells), real counts."""
    folder = tmp_path_factory.mktemp("kang-eval")
    table = pd.read_csv(kang_labels, dtype=str, keep_default_na=False)
    rng = np.random.default_rng(7)
    out: dict = {"folder": folder}
    for stim, key in (("ctrl", "kang_pbmc_ctrl"), ("stim", "kang_pbmc_stim")):
        adata = ad.read_h5ad(fetch_public_file(key))
        names = adata.obs_names.astype(str).to_numpy()
        sub = table[table.stim == stim].set_index("cell").loc[names]
        if stim == "ctrl":
            picks = [rng.choice(np.flatnonzero(sub.cell_type_kang.to_numpy() == c), n, replace=False)
                     for c, n in PER_CLASS.items()]
            picks.append(rng.choice(np.flatnonzero(sub.cell_type_kang.to_numpy() == ""), 60, replace=False))
            rows = np.sort(np.concatenate(picks))
        else:
            rows = np.sort(rng.choice(len(names), 80, replace=False))
        counts = sp.csr_matrix(adata.X[rows])
        out[stim] = write_h5ad(folder / f"{stim}.h5ad", counts, cell_ids=names[rows].tolist(),
                               gene_ids=adata.var_names.astype(str).tolist())
        out[f"{stim}_counts"] = counts
        out[f"{stim}_cells"] = names[rows]
        out["genes"] = adata.var_names.astype(str).to_numpy()
    return out


_STAND_INS: dict[tuple[str, ...], np.ndarray] = {}
"""The stand-in PCA embeddings made so far, by the cells they embed (the same cells give the same PCA)."""


def _embedding_file(subset: dict, path: Path, kind: str, *, ctrl_only: bool = False,
                    corpus: str | None = None) -> Path:
    """An embed-style .h5ad: obs dataset_id/cell_id, obsm X_genecorpus = PCA(20) of log counts or noise."""
    parts = ["ctrl"] if ctrl_only else ["ctrl", "stim"]
    obs = pd.DataFrame({
        "dataset_id": np.concatenate([[p] * len(subset[f"{p}_cells"]) for p in parts]),
        "cell_id": np.concatenate([subset[f"{p}_cells"] for p in parts]),
    })
    obs.index = [f"{d}:{c}" for d, c in zip(obs.dataset_id, obs.cell_id, strict=True)]
    if kind == "pca":
        key = tuple(obs.index)
        if key not in _STAND_INS:
            counts = sp.vstack([subset[f"{p}_counts"] for p in parts]).toarray().astype(np.float64)
            logs = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
            _STAND_INS[key] = PCA(20, svd_solver="randomized", random_state=0).fit_transform(logs)
        emb = _STAND_INS[key]
    else:
        emb = np.random.default_rng(3).standard_normal((len(obs), 32))
    adata = ad.AnnData(obs=obs)
    adata.obsm[EMBEDDING_KEY] = emb.astype(np.float32)
    if corpus is not None:
        adata.uns["genecorpus"] = {"corpus": corpus, "model": "stand-in", "layer": -1, "pool": "mean"}
    adata.write_h5ad(path)
    return path


def _counts(subset: dict) -> list[Path]:
    return [subset["ctrl"], subset["stim"]]


def test_good_embedding_beats_chance_noise_does_not(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    good = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca")
    noise = _embedding_file(kang_subset, tmp_path / "noise.h5ad", "noise")
    # 3 folds (the default 5: test_outputs_and_determinism): each fold fits the baseline's PCA again
    r_good = evaluate_embeddings(good, "cell_type_kang", counts=_counts(kang_subset), labels=kang_labels, join=JOIN,
                                 folds=3)
    r_noise = evaluate_embeddings(noise, "cell_type_kang", counts=_counts(kang_subset), labels=kang_labels,
                                  join=JOIN, folds=3)
    # unlabeled ctrl cells and all stim cells (no Kang label) are left out
    assert r_good.n_cells == sum(PER_CLASS.values())
    assert r_good.n_unlabeled == 60 + 80
    assert r_good.class_counts() == dict(sorted(PER_CLASS.items()))
    for clf in ("logreg", "knn"):
        good_f1 = r_good.score("embedding", clf).mean_sd("macro_f1")[0]
        noise_f1 = r_noise.score("embedding", clf).mean_sd("macro_f1")[0]
        base_f1 = r_noise.score("baseline", clf).mean_sd("macro_f1")[0]
        assert good_f1 > 0.85, (clf, good_f1)  # 4 classes: chance is ~0.25
        assert base_f1 > 0.85, (clf, base_f1)
        assert noise_f1 < 0.45, (clf, noise_f1)
        assert noise_f1 < base_f1 - 0.4
    # the baseline does not depend on the embeddings
    np.testing.assert_array_equal(r_good.score("baseline", "logreg").predictions,
                                  r_noise.score("baseline", "logreg").predictions)


def test_baseline_matches_sklearn_by_hand_on_one_fold(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    emb = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca", ctrl_only=True)
    report = evaluate_embeddings(emb, "cell_type_kang", counts=[kang_subset["ctrl"]], labels=kang_labels, join=JOIN)

    # by hand: dense log1p(counts per 10k) of the labeled ctrl cells, exact PCA(50) on fold 0's training cells
    table = pd.read_csv(kang_labels, dtype=str, keep_default_na=False)
    names = table[table.stim == "ctrl"].set_index("cell").cell_type_kang
    labels = names.loc[kang_subset["ctrl_cells"]].to_numpy()
    keep = labels != ""
    counts = kang_subset["ctrl_counts"].toarray().astype(np.float64)[keep]
    logs = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    classes, y = np.unique(labels[keep], return_inverse=True)
    assert tuple(classes) == report.classes
    np.testing.assert_array_equal(y, report.y)
    train, test = next(StratifiedKFold(5, shuffle=True, random_state=0).split(logs, y))
    np.testing.assert_array_equal(np.flatnonzero(report.fold == 0), np.sort(test))
    pca = PCA(50, svd_solver="full").fit(logs[train])
    z_train, z_test = pca.transform(logs[train]), pca.transform(logs[test])
    scaler = StandardScaler().fit(z_train)
    logreg = LogisticRegression(max_iter=5000).fit(scaler.transform(z_train), y[train])
    by_hand = logreg.predict(scaler.transform(z_test))
    ours = report.score("baseline", "logreg").predictions[test]
    assert np.mean(ours == by_hand) >= 0.97  # randomized vs exact PCA: the trailing components differ slightly
    assert abs(f1_score(y[test], ours, average="macro") - f1_score(y[test], by_hand, average="macro")) < 0.03
    mean = z_train.mean(axis=0)
    knn = KNeighborsClassifier(15, metric="cosine").fit(z_train - mean, y[train])
    knn_by_hand = knn.predict(z_test - mean)
    assert np.mean(report.score("baseline", "knn").predictions[test] == knn_by_hand) >= 0.95


def test_folds_are_stratified_and_shared_by_every_method(kang_subset: dict, kang_labels: Path,
                                                         tmp_path: Path) -> None:
    emb = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca")
    report = evaluate_embeddings(emb, "cell_type_kang", counts=_counts(kang_subset), labels=kang_labels,
                                 join=JOIN, folds=4, seed=11)
    expected = np.empty(report.n_cells, dtype=np.int64)
    for k, (_, test) in enumerate(StratifiedKFold(4, shuffle=True, random_state=11).split(report.y, report.y)):
        expected[test] = k
    np.testing.assert_array_equal(report.fold, expected)
    per_fold = np.array([np.bincount(report.y[report.fold == k], minlength=4) for k in range(4)])
    assert (per_fold.max(axis=0) - per_fold.min(axis=0)).max() <= 1  # each class spread evenly
    assert len(report.scores) == 4
    for s in report.scores:  # every method's per-fold scores are those of these folds' test cells
        assert (s.predictions >= 0).all()
        for k in range(4):
            test = report.fold == k
            assert s.macro_f1[k] == pytest.approx(f1_score(report.y[test], s.predictions[test], average="macro"))
            assert s.accuracy[k] == pytest.approx(accuracy_score(report.y[test], s.predictions[test]))
    again = evaluate_embeddings(emb, "cell_type_kang", labels=kang_labels, join=JOIN, folds=4, seed=11,
                                baseline=False)
    np.testing.assert_array_equal(again.fold, report.fold)
    np.testing.assert_array_equal(again.score("embedding", "logreg").predictions,
                                  report.score("embedding", "logreg").predictions)


def test_small_classes_are_dropped_and_reported(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    emb_path = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca", ctrl_only=True)
    adata = ad.read_h5ad(emb_path)
    joined = join_labels(adata.obs, kang_labels, join=JOIN)
    nk = np.flatnonzero(joined.cell_type_kang.to_numpy() == "NK cells")
    drop = np.zeros(adata.n_obs, dtype=bool)
    drop[nk[3:]] = True  # keep 3 NK cells: fewer than 5 folds
    small = adata[~drop].copy()
    report = evaluate_embeddings(small, "cell_type_kang", labels=kang_labels, join=JOIN, baseline=False)
    assert report.dropped_classes == {"NK cells": 3}
    assert "NK cells" not in report.classes
    assert report.n_cells == sum(n for c, n in PER_CLASS.items() if c != "NK cells")
    assert "NK cells (3)" in report.describe()
    three = evaluate_embeddings(small, "cell_type_kang", labels=kang_labels, join=JOIN, baseline=False, folds=3)
    assert three.dropped_classes == {}
    assert "NK cells" in three.classes


def test_corpus_manifest_gives_the_baseline_counts(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    """A real corpus built from the two files: the baseline finds the cells' counts through its manifest."""
    from genecorpus.build import build_corpus
    from genecorpus.config import BuildConfig, DatasetSpec
    from genecorpus.corpus import CorpusReader

    config = BuildConfig(datasets=tuple(
        DatasetSpec(path=str(kang_subset[s]), id=s, gene_id="symbol", release="grch37") for s in ("ctrl", "stim")))
    corpus = build_corpus(config, tmp_path / "corpus", workers=1, report=False).path
    obs = CorpusReader.open(corpus).obs(["dataset_id", "cell_id"])
    assert 400 < len(obs) <= 500  # after QC: the embedding covers the corpus's cells only
    subset = {**kang_subset}
    for s in ("ctrl", "stim"):
        kept = np.isin(kang_subset[f"{s}_cells"], obs.cell_id[obs.dataset_id == s])
        subset[f"{s}_cells"] = kang_subset[f"{s}_cells"][kept]
        subset[f"{s}_counts"] = kang_subset[f"{s}_counts"][kept]
    emb = _embedding_file(subset, tmp_path / "emb.h5ad", "pca", corpus=str(corpus))
    via_manifest = evaluate_embeddings(emb, "cell_type_kang", labels=kang_labels, join=JOIN, folds=3)
    via_files = evaluate_embeddings(emb, "cell_type_kang", labels=kang_labels, join=JOIN, counts=_counts(kang_subset),
                                    folds=3)
    assert via_manifest.baseline_source is not None and "manifest.json" in via_manifest.baseline_source
    for clf in ("logreg", "knn"):
        np.testing.assert_array_equal(via_manifest.score("baseline", clf).predictions,
                                      via_files.score("baseline", clf).predictions)


def test_outputs_and_determinism(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    emb = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca")
    report = evaluate_embeddings(emb, "stim", counts=_counts(kang_subset), labels=kang_labels, join=JOIN,
                                 out=tmp_path / "eval")
    files = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert files == ["confusion_baseline_knn.png", "confusion_baseline_logreg.png", "confusion_embedding_knn.png",
                     "confusion_embedding_logreg.png", "metrics.csv", "metrics.json", "predictions.csv", "report.md",
                     "table.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval")]  # no temporary left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "eval").stat().st_mode & 0o777 == 0o777 & ~umask  # the user's usual permissions, not 0700
    metrics = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    row = metrics[(metrics.method == "baseline") & (metrics.classifier == "logreg") & (metrics.metric == "macro_f1")]
    folds = row[[f"fold_{k}" for k in range(1, 6)]].to_numpy().ravel()
    assert row["mean"].item() == pytest.approx(folds.mean())
    assert row["sd"].item() == pytest.approx(folds.std(ddof=1))
    info = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert info["classes"] == {"ctrl": 420, "stim": 80}
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv", dtype=str)
    assert len(predictions) == 500 and set(predictions.columns) >= {"cell_id", "dataset_id", "label", "fold",
                                                                     "embedding_logreg", "baseline_knn"}
    assert (predictions.label == predictions.dataset_id).all()  # stim (ctrl|stim) names the file
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert markdown.count("](confusion_") == 4
    assert "| ctrl | 420 |" in markdown and "| stim | 80 |" in markdown
    assert report.score("embedding", "logreg").mean_sd("accuracy")[0] > 0.9  # IFN-beta response is strong
    again = evaluate_embeddings(emb, "stim", counts=_counts(kang_subset), labels=kang_labels, join=JOIN,
                                out=tmp_path / "eval")  # replaces the folder
    assert again.to_dict() == report.to_dict()


def test_errors_are_one_line(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    emb = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca")
    with pytest.raises(InputError, match=r"no label column 'celltype'; available: dataset_id, cell_id, cell, stim, cell_type_kang"):
        evaluate_embeddings(emb, "celltype", labels=kang_labels, join=JOIN, baseline=False)
    ctrl_only = _embedding_file(kang_subset, tmp_path / "ctrl.h5ad", "pca", ctrl_only=True)
    with pytest.raises(InputError, match=r"label 'stim' has 1 class\(es\) with at least 5 cells"):
        evaluate_embeddings(ctrl_only, "stim", labels=kang_labels, join=JOIN, baseline=False, out=tmp_path / "never")
    with pytest.raises(InputError, match=r"dataset 'ctrl' .*cells not found, e\.g\. cell '"):
        evaluate_embeddings(emb, "stim", labels=kang_labels, join=JOIN,
                            counts=[kang_subset["stim"], _renamed(kang_subset["stim"], tmp_path / "other" / "ctrl.h5ad")])
    with pytest.raises(InputError, match=r"no raw counts for the baseline"):
        evaluate_embeddings(emb, "stim", labels=kang_labels, join=JOIN)
    with pytest.raises(InputError, match=r"no column 'cell' to join on"):
        evaluate_embeddings(emb, "stim", labels=_renamed(kang_labels, tmp_path / "x.csv", drop_header=True),
                            join=JOIN, baseline=False)
    assert not (tmp_path / "never").exists()

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(emb), "--label", "celltype", "--labels", str(kang_labels),
                                 "--join", JOIN, "--no-baseline"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "available:" in lines[0], result.output


def _renamed(path: Path, target: Path, *, drop_header: bool = False) -> Path:
    data = Path(path).read_bytes()
    if drop_header:
        data = b"a,b,c,d\n" + data.split(b"\n", 1)[1]
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(data)
    return target


def test_cli_runs_and_prints_the_table(kang_subset: dict, kang_labels: Path, tmp_path: Path) -> None:
    emb = _embedding_file(kang_subset, tmp_path / "pca.h5ad", "pca")
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(emb), "--label", "cell_type_kang", "--labels", str(kang_labels),
                                 "--join", JOIN, "--counts", str(kang_subset["ctrl"]), "--counts",
                                 str(kang_subset["stim"]), "--folds", "3", "--out", str(tmp_path / "ev")],
                           env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    assert result.exit_code == 0, result.output
    assert "method    | classifier | macro F1 (mean ± sd)" in result.output
    assert result.output.count("| 360     | 4") == 4  # 4 rows: embedding/baseline x logreg/knn
    assert "left out: 140 cells without a label" in result.output
    assert (tmp_path / "ev" / "confusion_embedding_logreg.png").stat().st_size > 1000


def _imbalanced_report(n_classes: int = 12, *, seed: int = 5) -> EvaluationReport:
    """A made-up evaluation: classes from 400 cells down to 6, 80% of cells predicted right, the rest at random."""
    rng = np.random.default_rng(seed)
    classes = tuple(f"type {chr(ord('A') + k)}" for k in range(n_classes))
    sizes = np.geomspace(400, 6, n_classes).round().astype(np.int64)
    y = rng.permutation(np.repeat(np.arange(n_classes), sizes))
    predicted = np.where(rng.random(y.size) < 0.8, y, rng.integers(0, n_classes, y.size))
    fold = rng.integers(0, 5, y.size)
    f1 = np.array([0.70, 0.72, 0.68, 0.71, 0.69])
    scores = (ClassifierScores("embedding", "logreg", f1, f1 + 0.1, predicted),)
    return EvaluationReport(label="cell_type", classes=classes, y=y, fold=fold,
                            cells=pd.DataFrame({"cell_id": [f"c{i}" for i in range(y.size)]}), scores=scores,
                            n_input_cells=int(y.size), n_unlabeled=0)


def test_confusion_matrix_shows_the_cells_of_each_class() -> None:
    """Tick labels carry each true class's cell count; each square its row share over its cells (none: empty)."""
    from genecorpus.model.evaluate import _draw_confusion  # the figure object: its labels are the promise

    report = _imbalanced_report()
    scores = report.scores[0]
    expected = confusion_matrix(report.y, scores.predictions)
    np.testing.assert_array_equal(report.confusion("embedding", "logreg"), expected)
    sizes = np.bincount(report.y)
    ax = _draw_confusion(report, scores).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        f"{c} (n={n:,})" for c, n in zip(report.classes, sizes, strict=True)]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(report.classes)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert (expected == 0).any()  # empty squares are exercised
    for i, j in np.ndindex(expected.shape):
        if expected[i, j]:
            assert texts[i, j] == f"{expected[i, j] / sizes[i]:.2f}\n{expected[i, j]:,}"
        else:
            assert (i, j) not in texts


def test_evaluation_markdown_captions_each_matrix(tmp_path: Path) -> None:
    report = _imbalanced_report()
    write_evaluation(report, tmp_path / "eval")
    markdown = (tmp_path / "eval" / "report.md").read_text()
    sizes = np.bincount(report.y)
    for c, n in zip(report.classes, sizes, strict=True):
        assert f"| {c} | {n:,} |" in markdown
    image = "![Confusion matrix of embedding + logreg](confusion_embedding_logreg.png)"
    assert image in markdown
    assert (tmp_path / "eval" / "confusion_embedding_logreg.png").is_file()
    caption = markdown.split(image, 1)[1].strip()
    big, small = int(np.argmax(sizes)), int(np.argmin(sizes))
    assert (f"from {report.classes[big]} (n={sizes[big]:,}) to {report.classes[small]} (n={sizes[small]:,}), "
            f"{sizes[big] / sizes[small]:.1f} to 1") in caption
    matrix = confusion_matrix(report.y, report.scores[0].predictions)
    recall = np.diag(matrix) / sizes
    worst = int(np.argmin(recall))
    off = matrix[worst].copy()
    off[worst] = 0
    assert (f"Lowest recall: {report.classes[worst]}, {matrix[worst, worst]:,} of {sizes[worst]:,} cells "
            f"({recall[worst]:.2f}), most often predicted as {report.classes[int(np.argmax(off))]}") in caption
