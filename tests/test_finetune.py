"""`genecorpus finetune` and `genecorpus predict` on real Kang 2018 PBMC cells (ctrl and IFN-β-stimulated as two
datasets; with the shared Kang labels also cell types).

Expectations come from sklearn / numpy / torch run by hand (the baseline, the split's proportions, the weighted
cross-entropy), from the files the run wrote read back independently, and from the corpus itself.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch  # the train extra: make test installs it, so a missing one fails here
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from typer.testing import CliRunner

from genecorpus.cli import app
from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.bert import bert_config, save_model
from genecorpus.model.finetune import (
    TEST,
    TRAIN,
    VAL,
    balanced_class_weights,
    cell_losses,
    finetune,
    predict_cells,
    split_labeled_cells,
)
from genecorpus.public_data import fetch_public_file
from genecorpus.testing import write_h5ad
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {"batch_size": 16, "max_length": 256, "lr": 1e-3}
"""Settings that keep a run to seconds: the tiny model learns ctrl vs stim at this rate in a few epochs."""


@pytest.fixture(autouse=True)
def _one_blas_thread() -> object:
    """The baselines' and the by-hand PCAs: OpenBLAS threads crawl when other processes share the cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def kang(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A corpus of 160 control and 160 stimulated real Kang cells (datasets ``ctrl`` and ``stim``) and the counts."""
    from genecorpus.build import build_corpus
    from genecorpus.config import BuildConfig, DatasetSpec

    folder = tmp_path_factory.mktemp("finetune-corpus")
    out: dict = {"folder": folder}
    for name, stim in (("kang_pbmc_ctrl", "ctrl"), ("kang_pbmc_stim", "stim")):
        adata = ad.read_h5ad(fetch_public_file(name))
        rows = np.sort(np.random.default_rng(1).choice(adata.n_obs, 160, replace=False))
        counts = sp.csr_matrix(adata.X[rows])
        out[stim] = write_h5ad(folder / f"{stim}.h5ad", counts, cell_ids=adata.obs_names[rows].to_numpy(dtype=object),
                               gene_ids=adata.var_names.to_numpy(dtype=object))
        out[f"{stim}_counts"] = counts
        out[f"{stim}_row"] = {str(c): i for i, c in enumerate(adata.obs_names[rows])}
    config = BuildConfig(datasets=tuple(DatasetSpec(path=str(out[s]), id=s, gene_id="symbol") for s in ("ctrl", "stim")))
    out["corpus"] = build_corpus(config, folder / "corpus", workers=1, report=False).path
    return out


def _fresh_model(corpus: Path, out: Path, *, dropout: float | None = None, seed: int = 0) -> Path:
    """A freshly initialised tiny BertForMaskedLM folder with the corpus's dictionary (no pretraining record)."""
    from transformers import BertForMaskedLM

    tdict = CorpusReader.open(corpus).token_dictionary
    config = bert_config("tiny", tdict, max_positions=2048)
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    torch.manual_seed(seed)
    save_model(BertForMaskedLM(config), out, tdict)
    return out


@pytest.fixture(scope="module")
def fresh(kang: dict) -> Path:
    return _fresh_model(kang["corpus"], kang["folder"] / "fresh")


@pytest.fixture(scope="module")
def stim_run(kang: dict, fresh: Path) -> object:
    """ctrl vs stim (the dataset_id column), one stratified split, 4 epochs."""
    return finetune(kang["corpus"], kang["folder"] / "stim-classifier", model=fresh, label="dataset_id", epochs=4,
                    **FAST)


# ---------------------------------------------------------------- the split


def test_split_is_stratified_seeded_and_disjoint() -> None:
    y = np.repeat([0, 1, 2], [200, 50, 3])
    split = split_labeled_cells(y, n_classes=3, val_fraction=0.1, test_fraction=0.25, seed=4)
    roles = split.roles[0]
    for c, n in enumerate((200, 50, 3)):
        members = roles[y == c]
        # proportions of each class within one cell of the asked shares; at least one cell in each role
        assert abs((members == TEST).sum() - 0.25 * n) <= 1 and (members == TEST).sum() >= 1
        assert abs((members == VAL).sum() - 0.1 * n) <= 1 and (members == VAL).sum() >= 1
        assert (members == TRAIN).sum() >= 1
    assert set(np.unique(roles)) == {TRAIN, VAL, TEST}
    again = split_labeled_cells(y, n_classes=3, val_fraction=0.1, test_fraction=0.25, seed=4)
    np.testing.assert_array_equal(again.roles, split.roles)
    other = split_labeled_cells(y, n_classes=3, val_fraction=0.1, test_fraction=0.25, seed=5)
    assert (other.roles != split.roles).any()
    # cells that may not test never do, and the test cells come from the others
    testable = np.arange(len(y)) % 2 == 0
    guarded = split_labeled_cells(y, n_classes=3, val_fraction=0.1, test_fraction=0.25, testable=testable).roles[0]
    assert not (guarded[~testable] == TEST).any()
    assert abs((guarded[y == 0] == TEST).sum() - 50) <= 1


def test_folds_and_held_out_datasets() -> None:
    y = np.repeat([0, 1], [30, 12])
    split = split_labeled_cells(y, n_classes=2, folds=3, val_fraction=0.1, seed=0)
    assert split.n_runs == 3
    np.testing.assert_array_equal((split.roles == TEST).sum(axis=0), np.ones(len(y)))  # every cell tests once
    for k in range(3):
        np.testing.assert_array_equal(split.roles[k] == TEST, split.fold == k)
        assert np.bincount(y[split.roles[k] == TEST]).tolist() == [10, 4]
    datasets = np.array(["a"] * 20 + ["b"] * 10 + ["c"] * 12)
    held = split_labeled_cells(y, n_classes=2, dataset_ids=datasets, hold_out_datasets=["c"], val_fraction=0.2)
    np.testing.assert_array_equal(held.roles[0] == TEST, datasets == "c")
    assert ((held.roles[0] == VAL) & (datasets == "c")).sum() == 0


# ---------------------------------------------------------------- one run on ctrl vs stim


def test_model_beats_the_constant_predictor(stim_run: object, kang: dict) -> None:
    out = stim_run.model_path
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "confusion_baseline.png", "confusion_model.png", "genecorpus_model.json", "metrics.csv",
        "metrics.json", "model.safetensors", "per_class.csv", "predictions.csv", "split.csv", "token_dictionary.pkl"]
    assert not [p for p in out.parent.iterdir() if ".incomplete" in p.name]
    assert (out / "README.md").read_text().splitlines()[0] == "---"  # the model card, titled by the folder's name
    assert f"# {out.name}" in (out / "README.md").read_text()
    predictions = pd.read_csv(out / "predictions.csv")
    model_f1 = f1_score(predictions["true"], predictions["predicted"], average="macro")
    majority = pd.read_csv(out / "split.csv").query("split == 'train'")["label"].mode()[0]
    constant_f1 = f1_score(predictions["true"], [majority] * len(predictions), average="macro")
    assert model_f1 > constant_f1 + 0.25, (model_f1, constant_f1)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["macro_f1"] == pytest.approx(model_f1)
    assert metrics["model"]["accuracy"] == pytest.approx(accuracy_score(predictions["true"], predictions["predicted"]))
    assert metrics["constant"]["macro_f1"] == pytest.approx(constant_f1)
    info = json.loads((out / "genecorpus_model.json").read_text())
    assert info["kind"] == "classifier" and info["classes"] == ["ctrl", "stim"]
    assert info["metrics"] == metrics
    per_class = pd.read_csv(out / "per_class.csv").query("method == 'model'").set_index("class")
    assert per_class.loc["stim", "recall"] == pytest.approx(
        np.mean(predictions.predicted[predictions.true == "stim"] == "stim"))
    table = pd.read_csv(out / "metrics.csv")
    assert table.query("method == 'baseline' and metric == 'macro_f1'")["value"].item() == pytest.approx(
        metrics["baseline"]["macro_f1"])


def test_baseline_scores_the_same_cells_as_sklearn_by_hand(stim_run: object, kang: dict) -> None:
    out = stim_run.model_path
    split = pd.read_csv(out / "split.csv")
    predictions = pd.read_csv(out / "predictions.csv")
    test = split[split.split == "test"]
    np.testing.assert_array_equal(predictions.corpus_row, test.corpus_row)  # the same test cells, corpus order
    assert predictions.baseline_predicted.notna().all()
    train = split[split.split == "train"]
    # by hand: dense counts of the cells from the files the corpus was built from, log1p(per 10k), exact PCA(50)
    # on the training cells, standardize, logistic regression
    def dense(cells: pd.DataFrame) -> np.ndarray:
        x = np.vstack([kang[f"{d}_counts"][kang[f"{d}_row"][c]].toarray() for d, c in zip(
            cells.dataset_id, cells.cell_id.astype(str), strict=True)]).astype(np.float64)
        return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)

    x_train, x_test = dense(train), dense(test)
    pca = PCA(50, svd_solver="full").fit(x_train)
    scaler = StandardScaler().fit(pca.transform(x_train))
    logreg = LogisticRegression(max_iter=5000).fit(scaler.transform(pca.transform(x_train)), train.label)
    by_hand = logreg.predict(scaler.transform(pca.transform(x_test)))
    assert np.mean(by_hand == predictions.baseline_predicted.to_numpy()) >= 0.97  # randomized vs exact PCA
    metrics = json.loads((out / "metrics.json").read_text())["baseline"]
    assert metrics["n_cells"] == len(test)
    assert abs(metrics["macro_f1"] - f1_score(test.label, by_hand, average="macro")) < 0.03
    assert abs(metrics["accuracy"] - accuracy_score(test.label, by_hand)) < 0.03


def test_predictions_are_in_corpus_order_and_predict_reproduces_them(stim_run: object, kang: dict,
                                                                     tmp_path: Path) -> None:
    out = stim_run.model_path
    saved = pd.read_csv(out / "predictions.csv")
    assert saved.corpus_row.is_monotonic_increasing
    reader = CorpusReader.open(kang["corpus"])
    cell_ids = reader.column("cell_id").astype(str)
    np.testing.assert_array_equal(saved.cell_id.astype(str), cell_ids[saved.corpus_row])
    result = CliRunner().invoke(app, ["predict", str(kang["corpus"]), "--model", str(out), "--out",
                                      str(tmp_path / "all.csv")], env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    assert result.exit_code == 0, result.output
    labelled = pd.read_csv(tmp_path / "all.csv")
    np.testing.assert_array_equal(labelled.corpus_row, np.arange(reader.n_cells))
    np.testing.assert_array_equal(labelled.cell_id.astype(str), cell_ids)
    np.testing.assert_array_equal(labelled.dataset_id.astype(str), reader.column("dataset_id").astype(str))
    again = labelled.iloc[saved.corpus_row.to_numpy()]
    np.testing.assert_array_equal(again.predicted.to_numpy(), saved.predicted.to_numpy())
    for c in ("ctrl", "stim"):
        np.testing.assert_allclose(again[f"prob_{c}"], saved[f"prob_{c}"], atol=1e-5)
    # the API, on some rows in another order
    rows = saved.corpus_row.to_numpy()[::-1][:20]
    picked = predict_cells(kang["corpus"], out, cells=rows, batch_size=5)
    np.testing.assert_array_equal(picked.corpus_row, rows)
    np.testing.assert_allclose(picked.prob_stim, again.set_index("corpus_row").loc[rows, "prob_stim"], atol=1e-5)


def test_from_pretrained_opens_the_classifier(stim_run: object, kang: dict) -> None:
    from transformers import BertForSequenceClassification

    net = BertForSequenceClassification.from_pretrained(stim_run.model_path).eval()
    assert net.config.id2label == {0: "ctrl", 1: "stim"}
    assert net.config.label2id == {"ctrl": 0, "stim": 1}
    saved = pd.read_csv(stim_run.model_path / "predictions.csv").iloc[0]
    ids = CorpusReader.open(kang["corpus"]).input_ids(int(saved.corpus_row))[:256].astype(np.int64)
    with torch.no_grad():
        probs = torch.softmax(net(input_ids=torch.from_numpy(ids)[None]).logits, dim=-1)[0].numpy()
    np.testing.assert_allclose(probs, [saved.prob_ctrl, saved.prob_stim], atol=1e-5)


# ---------------------------------------------------------------- training settings


def test_early_stopping_keeps_the_best_evaluation(kang: dict, fresh: Path, tmp_path: Path) -> None:
    result = finetune(kang["corpus"], tmp_path / "es", model=fresh, label="dataset_id", max_steps=24, eval_every=2,
                      patience=2, baseline=False, **{**FAST, "lr": 3e-3})
    run = result.info["training"]["runs"][0]
    f1s = [e["macro_f1"] for e in run["evals"]]
    best = int(np.argmax(f1s))
    assert run["best_step"] == run["evals"][best]["step"]
    if run["stopped"] == "early_stopping":  # stopped as soon as `patience` evaluations did no better
        assert len(f1s) - 1 - best == 2 and run["steps"] < 24
    # the kept weights score the validation cells as the best evaluation did
    split = pd.read_csv(tmp_path / "es" / "split.csv")
    val = split[split.split == "val"]
    again = predict_cells(kang["corpus"], tmp_path / "es", cells=val.corpus_row.to_numpy())
    assert f1_score(val.label, again.predicted, labels=np.unique(val.label), average="macro") == pytest.approx(max(f1s))


def test_frozen_layers_keep_their_weights(kang: dict, fresh: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    finetune(kang["corpus"], tmp_path / "frozen", model=fresh, label="dataset_id", max_steps=4, freeze_layers=1,
             baseline=False, **FAST)
    before, after = load_file(fresh / "model.safetensors"), load_file(tmp_path / "frozen" / "model.safetensors")
    frozen = [k for k in before if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in before if k.startswith("bert.encoder.layer.1.") and k.endswith("weight")]
    assert frozen and trained
    for k in frozen:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    assert all(not torch.equal(after[k], before[k]) for k in trained)
    with pytest.raises(ConfigError, match="--freeze-layers 3: the model has 2 encoder layers"):
        finetune(kang["corpus"], tmp_path / "never", model=fresh, label="dataset_id", max_steps=1, freeze_layers=3,
                 baseline=False, **FAST)


def test_class_weights_give_the_weighted_cross_entropy_by_hand(kang: dict, tmp_path: Path) -> None:
    from genecorpus.model.finetune import _open_classifier_start, _Trainer  # one step of the loop: the promise

    y = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=y)
    np.testing.assert_allclose(balanced_class_weights(y, 3), expected)
    logits = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    log_p = torch.log_softmax(logits, dim=-1).numpy()
    by_hand = -log_p[np.arange(8), y] * expected[y]
    np.testing.assert_allclose(cell_losses(logits, torch.from_numpy(y), torch.tensor(expected, dtype=torch.float32)),
                               by_hand, rtol=1e-5)

    # a training step's loss: Σ weight × cross-entropy / cells of the global batch, over micro-batches
    from genecorpus.model.finetune import FinetuneSettings

    model = _fresh_model(kang["corpus"], tmp_path / "no-dropout", dropout=0.0)
    reader = CorpusReader.open(kang["corpus"])
    net = _open_classifier_start(model, ("ctrl", "stim"), reader.token_dictionary, 0, torch.device("cpu"))
    net.config.classifier_dropout = 0.0
    rows = np.arange(0, 320, 40)
    labels = (reader.column("dataset_id")[rows] == "stim").astype(np.int64)
    weights = np.array([0.25, 1.75])
    with torch.no_grad():
        ids = [torch.from_numpy(reader.input_ids(int(r))[:64].astype(np.int64))[None] for r in rows]
        logits = torch.cat([net(input_ids=i).logits for i in ids]).numpy()
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = float(np.sum(-log_p[np.arange(len(rows)), labels] * weights[labels]) / len(rows))
    settings = FinetuneSettings(grad_accum=3, class_weights="balanced")
    trainer = _Trainer(reader, reader.token_dictionary, net, settings, max_length=64, deadline=np.inf, progress=None)
    trainer.weights = torch.tensor(weights, dtype=torch.float32)
    from torch.optim.lr_scheduler import LambdaLR

    trainer.scheduler = LambdaLR(trainer.optimizer, lambda _: 1.0)
    net.classifier.train()
    for module in net.modules():  # no dropout anywhere: the step's forward pass is the by-hand one
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    assert trainer.step(rows, labels, 0) == pytest.approx(expected_loss, rel=1e-4)
    unweighted = float(np.mean(-log_p[np.arange(len(rows)), labels]))
    assert abs(expected_loss - unweighted) > 1e-3  # the weights change the loss


def test_time_limit_stops_evaluates_and_saves(kang: dict, fresh: Path, tmp_path: Path) -> None:
    result = finetune(kang["corpus"], tmp_path / "timed", model=fresh, label="dataset_id", epochs=200, time_limit=0.2,
                      baseline=False, **FAST)
    run = result.info["training"]["runs"][0]
    assert run["stopped"] == "time_limit" and run["steps"] < 200 * 15
    assert run["evals"][-1]["step"] == run["steps"]  # evaluated where it stopped
    assert result.info["timings"]["wall_seconds"] <= 0.2 * 60 + 3  # the cap, and the writes within a few seconds
    assert (tmp_path / "timed" / "model.safetensors").is_file()


# ---------------------------------------------------------------- the leakage guard


@pytest.fixture(scope="module")
def pretrained(kang: dict) -> Path:
    """tiny, pretrained a few steps on this corpus: its pretraining holds out one whole dataset."""
    from genecorpus.model.pretrain import pretrain

    out = kang["folder"] / "pretrained"
    pretrain(kang["corpus"], out, preset="tiny", max_steps=4, batch_size=4, max_length=64, val_cells=8,
             baseline_cells=50)
    return out


def test_test_cells_are_cells_pretraining_held_out(kang: dict, pretrained: Path, tmp_path: Path) -> None:
    info = json.loads((pretrained / "genecorpus_model.json").read_text())
    held_out = set(info["split"]["val_datasets"])
    assert len(held_out) == 1
    result = finetune(kang["corpus"], tmp_path / "guarded", model=pretrained, label="dataset_id", max_steps=2,
                      baseline=False, **FAST)
    predictions = pd.read_csv(tmp_path / "guarded" / "predictions.csv")
    datasets = CorpusReader.open(kang["corpus"]).column("dataset_id").astype(str)
    assert set(datasets[predictions.corpus_row]) == held_out
    guard = result.info["leakage_guard"]
    assert guard["status"] == "same_corpus" and guard["restricted_test_to_pretraining_held_out"]
    assert guard["n_test_cells_seen_in_pretraining"] == 0
    split = pd.read_csv(tmp_path / "guarded" / "split.csv")
    assert (split.pretraining == np.where(np.isin(datasets, list(held_out)), "held_out", "train")).all()
    assert "nor the starting model's pretraining" in (tmp_path / "guarded" / "README.md").read_text()
    # warn instead: the stratified test cells of the other dataset are counted
    warned = finetune(kang["corpus"], tmp_path / "warned", model=pretrained, label="dataset_id", max_steps=2,
                      baseline=False, pretraining_cells="warn", **FAST)
    test = pd.read_csv(tmp_path / "warned" / "predictions.csv")
    seen = int((~np.isin(datasets[test.corpus_row], list(held_out))).sum())
    assert seen > 0
    assert warned.info["leakage_guard"]["n_test_cells_seen_in_pretraining"] == seen
    assert not warned.info["leakage_guard"]["restricted_test_to_pretraining_held_out"]
    assert f"({seen:,} of them were cells of the starting model's pretraining)" in (
        tmp_path / "warned" / "README.md").read_text()


def test_guard_with_one_dataset_tests_only_the_cells_pretraining_held_out(kang: dict, tmp_path: Path) -> None:
    """A corpus of one dataset: pretraining holds out random cells; the guard finds them again (its recorded
    seed and share) and tests only among them."""
    from genecorpus.build import build_corpus
    from genecorpus.config import BuildConfig, DatasetSpec
    from genecorpus.model.pretrain import pretrain

    corpus = build_corpus(BuildConfig(datasets=(DatasetSpec(path=str(kang["ctrl"]), id="ctrl", gene_id="symbol"),)),
                          tmp_path / "one-dataset", workers=1, report=False).path
    model = tmp_path / "pretrained"
    pretrain(corpus, model, preset="tiny", max_steps=2, batch_size=4, max_length=64, val_cells=8,
             baseline_cells=50, val_fraction=0.4, seed=7)
    info = json.loads((model / "genecorpus_model.json").read_text())
    assert info["split"]["by"] == "cell"
    reader = CorpusReader.open(corpus)
    trained = _pretraining_rows(reader, info)
    assert len(trained) == info["split"]["n_train_cells"]
    held_out = np.ones(reader.n_cells, dtype=bool)
    held_out[trained] = False
    labels = tmp_path / "depth.csv"
    deep = reader.lengths > np.median(reader.lengths)
    pd.DataFrame({"cell_id": reader.column("cell_id"), "depth": np.where(deep, "deep", "shallow")}).to_csv(
        labels, index=False)
    result = finetune(corpus, tmp_path / "guarded", model=model, label="depth", labels=labels, join="cell_id",
                      max_steps=2, baseline=False, **FAST)
    assert result.info["leakage_guard"]["restricted_test_to_pretraining_held_out"]
    tested = pd.read_csv(tmp_path / "guarded" / "predictions.csv").corpus_row.to_numpy()
    assert len(tested) > 0 and held_out[tested].all()
    split = pd.read_csv(tmp_path / "guarded" / "split.csv")
    np.testing.assert_array_equal(split.pretraining.to_numpy() == "held_out", held_out[split.corpus_row])


def _pretraining_rows(reader: CorpusReader, info: dict) -> np.ndarray:
    """The rows a by-cell pretraining split trained on, drawn by hand as split_cells documents it: a seeded
    ``rng.choice`` of ceil(val_fraction × n) rows is held out."""
    import math

    n = reader.n_cells
    rng = np.random.default_rng([info["settings"]["seed"], 0x5EED])
    held = rng.choice(n, size=min(math.ceil(info["settings"]["val_fraction"] * n), n - 1), replace=False)
    return np.setdiff1d(np.arange(n), held)


def test_fine_tuning_a_classifier_again_tests_only_cells_it_never_trained_on(stim_run: object, kang: dict,
                                                                            tmp_path: Path) -> None:
    before = pd.read_csv(stim_run.model_path / "split.csv")
    again = finetune(kang["corpus"], tmp_path / "again", model=stim_run.model_path, label="dataset_id", max_steps=2,
                     baseline=False, seed=1, **FAST)
    tested = pd.read_csv(tmp_path / "again" / "predictions.csv").corpus_row
    assert set(tested) <= set(before.corpus_row[before.split == "test"])
    assert again.info["leakage_guard"]["restricted_test_to_pretraining_held_out"]


# ---------------------------------------------------------------- bad input


def test_bad_input_is_one_line(kang: dict, fresh: Path, tmp_path: Path) -> None:
    corpus = kang["corpus"]
    with pytest.raises(InputError, match=r"no label column 'cell_type'; available: .*dataset_id"):
        finetune(corpus, tmp_path / "a", model=fresh, label="cell_type", max_steps=1)
    one = tmp_path / "one.csv"
    cells = CorpusReader.open(corpus).column("cell_id")
    pd.DataFrame({"cell_id": cells, "kind": "pbmc"}).to_csv(one, index=False)
    with pytest.raises(InputError, match=r"label 'kind' has 1 class\(es\) with at least 3 cells"):
        finetune(corpus, tmp_path / "b", model=fresh, label="kind", labels=one, join="cell_id", max_steps=1)
    other = {"<pad>": 0, "<mask>": 1, **{f"ENSG{i:011d}": i + 2 for i in range(50)}}
    foreign = tmp_path / "foreign"
    from transformers import BertForMaskedLM

    tdict = TokenDictionary.from_mapping(other)
    save_model(BertForMaskedLM(bert_config("tiny", tdict, max_positions=512)), foreign, tdict)
    with pytest.raises(InputError, match=r"was tokenized with another dictionary"):
        finetune(corpus, tmp_path / "c", model=foreign, label="dataset_id", max_steps=1)
    with pytest.raises(InputError, match=r"not a cell classifier"):
        predict_cells(corpus, fresh)
    with pytest.raises(InputError, match=r"--hold-out-datasets nope: no such dataset .* it has ctrl, stim"):
        finetune(corpus, tmp_path / "a", model=fresh, label="dataset_id", hold_out_datasets=["nope"], max_steps=1)
    with pytest.raises(InputError, match=r"label 'dataset_id' has 1 class\(es\) with at least 2 cells"):
        # the held-out dataset's class never trains: one class is left
        finetune(corpus, tmp_path / "a", model=fresh, label="dataset_id", hold_out_datasets=["stim"], max_steps=1)
    assert not [p for p in tmp_path.iterdir() if p.name[0] in "abc" or ".incomplete" in p.name]
    result = CliRunner().invoke(app, ["finetune", str(corpus), "--model", str(foreign), "--label", "dataset_id",
                                      "--out", str(tmp_path / "d")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "another dictionary" in lines[0], result.output


def test_a_checkpoint_without_a_dictionary_takes_one(kang: dict, fresh: Path, tmp_path: Path) -> None:
    """A Geneformer-style folder (config and weights only) needs its token dictionary given."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(fresh / name, bare / name)
    with pytest.raises(InputError, match=r"has no token_dictionary.pkl; pass the model's token dictionary"):
        finetune(kang["corpus"], tmp_path / "x", model=bare, label="dataset_id", max_steps=1)
    result = finetune(kang["corpus"], tmp_path / "x", model=bare, token_dictionary=fresh / "token_dictionary.pkl",
                      label="dataset_id", max_steps=1, baseline=False, **FAST)
    assert result.info["leakage_guard"]["status"] == "no_record"
    assert (tmp_path / "x" / "token_dictionary.pkl").read_bytes() == (fresh / "token_dictionary.pkl").read_bytes()


# ---------------------------------------------------------------- cell types (the shared Kang labels)


def test_cell_types(kang: dict, fresh: Path, kang_labels: Path, tmp_path: Path) -> None:
    """The Kang cell types (labeled in the control cells only): the stimulated cells have no label and are left out."""
    result = CliRunner().invoke(app, [
        "finetune", str(kang["corpus"]), "--model", str(fresh), "--label", "cell_type_kang", "--labels",
        str(kang_labels), "--join", "cell=cell_id,stim=dataset_id", "--epochs", "15", "--lr", "2e-3",
        "--max-length", "256", "--class-weights", "balanced", "--test-fraction", "0.3", "--out", str(tmp_path / "types")],
        env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    assert result.exit_code == 0, result.output
    assert all(f"\n{m} " in result.output for m in ("model", "baseline", "constant")), result.output
    predictions = pd.read_csv(tmp_path / "types" / "predictions.csv")
    assert (predictions.dataset_id == "ctrl").all()
    labels = pd.read_csv(kang_labels, dtype=str, keep_default_na=False).query("stim == 'ctrl'").set_index("cell")
    np.testing.assert_array_equal(predictions.true, labels.loc[predictions.cell_id, "cell_type_kang"])
    metrics = json.loads((tmp_path / "types" / "metrics.json").read_text())
    assert metrics["model"]["macro_f1"] > metrics["constant"]["macro_f1"] + 0.2, metrics
    info = json.loads((tmp_path / "types" / "genecorpus_model.json").read_text())
    assert info["n_unlabeled"] == int((labels.reindex(CorpusReader.open(kang["corpus"]).column("cell_id").astype(str))
                                       ["cell_type_kang"].fillna("") == "").sum())
    assert info["settings"]["class_weights"] == "balanced"
