"""The model card: README.md of a real (tiny) pretraining run, its YAML header, its figures against
genecorpus_model.json, the limitations it derives, a classifier's card, and ``genecorpus card``."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pytest
import yaml
from kang_corpus import kang_corpus
from typer.testing import CliRunner

from genecorpus.cli import app
from genecorpus.errors import InputError
from genecorpus.model.card import CARD, model_card, write_model_card
from genecorpus.model.pretrain import pretrain

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(corpus, model folder, its genecorpus_model.json): tiny, 6 steps, on real Kang cells as two datasets
    (200 control, 100 stimulated), so one dataset is held out."""
    folder = tmp_path_factory.mktemp("card")
    corpus = kang_corpus(folder, 200, 100, seed=0)
    model = folder / "pbmc-tiny"
    pretrain(corpus, model, preset="tiny", max_steps=6, batch_size=4, max_length=64, val_cells=24,
             baseline_cells=200)
    return corpus, model, json.loads((model / "genecorpus_model.json").read_text())


def split_card(text: str) -> tuple[dict[str, Any], str]:
    """The YAML header (parsed with PyYAML) and the Markdown body of a card."""
    match = re.match(r"---\n(.*?\n)---\n(.*)", text, flags=re.DOTALL)
    assert match, "the card does not start with a --- YAML header ---"
    return yaml.safe_load(match.group(1)), match.group(2)


def table_row(body: str, first_cell: str) -> list[str]:
    """The cells after the first of the Markdown table row that starts with ``first_cell``."""
    rows = [line for line in body.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one row {first_cell!r}, found {len(rows)}"
    return [c.strip() for c in rows[0].strip().strip("|").split("|")][1:]


def section(body: str, title: str) -> str:
    """The text of a ``## title`` section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", body, flags=re.DOTALL | re.MULTILINE)
    assert match, f"no section {title!r}"
    return match.group(1)


# ---------------------------------------------------------------- the card of a real run

def test_card_header_is_hugging_face_metadata_with_the_corpus_digest(run: tuple[Path, Path, dict[str, Any]]) -> None:
    corpus, model, info = run
    header, _ = split_card((model / CARD).read_text())
    assert header["library_name"] == "transformers"
    assert header["pipeline_tag"] == "fill-mask"
    assert {"single-cell", "geneformer", "genecorpus", "fill-mask"} <= set(header["tags"])
    # the digest is that of the corpus's manifest file, computed here from its bytes
    assert header["genecorpus"]["corpus_manifest_sha256"] == hashlib.sha256(
        (corpus / "manifest.json").read_bytes()).hexdigest()
    assert header["genecorpus"]["format"] == json.loads((corpus / "manifest.json").read_text())["format"]
    assert header["genecorpus"]["layout"] == "gc30m"
    # the model-index holds the final metrics exactly, as huggingface_hub reads them
    from huggingface_hub import ModelCard

    results = ModelCard((model / CARD).read_text()).data.eval_results
    by_name = {r.metric_name: r.metric_value for r in results}
    m = info["metrics"]
    assert by_name["validation loss (nats)"] == m["val_loss"]
    assert by_name["top-1 accuracy"] == m["val_top1"]
    assert by_name["top-10 accuracy"] == m["val_top10"]
    assert by_name["baseline validation loss (nats)"] == m["baseline_val_loss"]
    assert by_name["baseline top-10 accuracy"] == m["baseline_val_top10"]
    assert {r.task_type for r in results} == {"fill-mask"}


def test_card_figures_equal_the_model_info(run: tuple[Path, Path, dict[str, Any]]) -> None:
    corpus, model, info = run
    _, body = split_card((model / CARD).read_text())
    m = info["metrics"]
    model_row = [float(x) for x in table_row(body, "model")]
    base_row = [float(x) for x in table_row(body, "baseline: gene frequency at the rank position")]
    np.testing.assert_allclose(model_row, [m["val_loss"], m["val_top1"], m["val_top10"]], atol=5e-5)
    np.testing.assert_allclose(base_row, [m["baseline_val_loss"], m["baseline_val_top1"],
                                          m["baseline_val_top10"]], atol=5e-5)
    t = info["training"]
    steps = table_row(body, "steps")[0]
    assert steps.startswith(f"{t['steps']:,} done of {t['total_steps']:,} planned")
    assert table_row(body, "tokens seen") == [f"{t['tokens_seen']:,}"]
    assert table_row(body, "parameters") == [f"{info['n_parameters']:,}"]
    # the corpus: per-dataset cells and tokens counted here from the shards' columns
    shards = [pa.ipc.open_stream(pa.OSFile(str(p))).read_all() for p in sorted(corpus.glob("data-*.arrow"))]
    table = pa.concat_tables(shards)
    ids = np.asarray(table.column("dataset_id").to_pylist())
    lengths = np.asarray(table.column("length").to_pylist())
    for dataset in ("kang_pbmc_ctrl", "kang_pbmc_stim"):
        assert table_row(body, dataset) == [f"{int((ids == dataset).sum()):,}",
                                            f"{int(lengths[ids == dataset].sum()):,}"]
    assert f"{len(ids):,} cells, {int(lengths.sum()):,} tokens" in section(body, "Corpus")
    evaluation = section(body, "Held-out evaluation")
    assert f"on {info['split']['n_val_cells']:,} held-out cells" in evaluation
    assert info["split"]["val_datasets"][0] in evaluation
    assert "from_pretrained(\"pbmc-tiny\"" in section(body, "How to use")


def test_model_info_records_attention_and_precision(run: tuple[Path, Path, dict[str, Any]]) -> None:
    _, model, info = run
    assert info["attention"] == "sdpa"
    assert info["training"]["precision"] == "fp32"  # auto on a CPU
    _, body = split_card((model / CARD).read_text())
    assert table_row(body, "attention") == ["sdpa"]
    assert table_row(body, "device") == ["cpu, fp32, 1 process"]


# ---------------------------------------------------------------- limitations from what was measured

def variant(info: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A copy of ``info`` with ``"a.b": value`` changes applied."""
    out = copy.deepcopy(info)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = out
        for p in parents:
            node = node[p]
        node[key] = value
    return out


def limitations(info: dict[str, Any]) -> str:
    return section(split_card(model_card(info, name="m"))[1], "Limitations")


@pytest.mark.parametrize(("phrase", "holds", "does_not_hold"), [
    ("before the learning-rate schedule ended",
     {"training.schedule_completed": False, "training.steps": 3, "training.stopped": "time_limit"},
     {"training.schedule_completed": True}),
    ("not better than the rank-frequency baseline",
     {"metrics.val_loss": 9.0, "metrics.baseline_val_loss": 8.0},
     {"metrics.val_loss": 5.0, "metrics.baseline_val_loss": 8.0, "metrics.val_top1": 0.2,
      "metrics.baseline_val_top1": 0.1, "metrics.val_top10": 0.5, "metrics.baseline_val_top10": 0.3}),
    ("of one pass over its training cells", {"training.epochs": 0.25}, {"training.epochs": 3.0}),
    ("Trained on a CPU", {"training.device": "cpu"}, {"training.device": "cuda:0"}),
    ("come from one dataset", {"split.by": "dataset", "split.val_datasets": ["lab_b"]},
     {"split.by": "dataset", "split.val_datasets": ["lab_b", "lab_c"]}),
    ("random share of the training datasets", {"split.by": "cell", "split.val_datasets": []},
     {"split.by": "dataset"}),
    ("has no <cls> token", {"layout": "gc30m"}, {"layout": "gc104m"}),
    ("position embeddings", {"settings.max_length": 64, "max_positions": 2048},
     {"settings.max_length": 2048, "max_positions": 2048}),
    ("no genecorpus manifest", {"corpus.manifest_sha256": None}, {"corpus.manifest_sha256": "ab" * 32}),
])
def test_limitations_appear_when_their_condition_holds(run: tuple[Path, Path, dict[str, Any]], phrase: str,
                                                       holds: dict[str, Any], does_not_hold: dict[str, Any]) -> None:
    info = run[2]
    assert phrase in limitations(variant(info, **holds))
    assert phrase not in limitations(variant(info, **does_not_hold))


def test_incomplete_info_fails_with_one_line_naming_the_key(run: tuple[Path, Path, dict[str, Any]]) -> None:
    info = copy.deepcopy(run[2])
    del info["metrics"]["val_top1"]
    with pytest.raises(InputError, match=r"metrics\.val_top1"):
        model_card(info)
    with pytest.raises(InputError, match="unknown kind"):
        model_card({**info, "kind": "regressor"})


# ---------------------------------------------------------------- a classifier's card

# the shape genecorpus finetune writes (the keys the card reads, and some it does not)
CLASSIFIER = {
    "kind": "classifier", "label": "cell_type", "classes": ["B", "CD4 T", "NK"],
    "start_model": {"path": "/models/pbmc-small", "kind": "pretrained", "preset": "small"},
    "metrics": {"model": {"macro_f1": 0.8123, "accuracy": 0.9011, "n_cells": 200},
                "baseline": {"macro_f1": 0.9456, "accuracy": 0.9688, "n_cells": 200},
                "constant": {"macro_f1": 0.2222, "accuracy": 0.5, "n_cells": 200}},
    "split": {"by": "stratified", "n_cells": {"train": 600, "val": 100, "test": 200}, "hold_out_datasets": [],
              "per_class": {"B": {"train": 120, "val": 20, "test": 40}, "CD4 T": {"train": 460, "val": 76, "test": 154},
                            "NK": {"train": 20, "val": 4, "test": 6}}},
    "corpus": {"path": "/corpora/kang", "n_cells": 900, "n_tokens": 600_000, "manifest_sha256": "ab" * 32,
               "layout": "gc30m", "datasets": {"kang_ctrl": 900}},
    "training": {"runs": [{"steps": 300, "planned_steps": 400, "best_step": 250, "stopped": "early_stopping",
                           "epochs": 4.0}], "steps": 300, "device": "cpu", "bf16": False, "train_seconds": 95.0},
    "leakage_guard": {"status": "other_corpus", "n_test_cells_seen_in_pretraining": 0},
    "timings": {"wall_seconds": 120.5},
    "future_key_the_card_does_not_read": {"ignored": True},
}


def test_classifier_card_puts_test_metrics_beside_the_baselines(tmp_path: Path) -> None:
    path = write_model_card(tmp_path, CLASSIFIER, name="pbmc-classifier")
    header, body = split_card(path.read_text())
    assert header["pipeline_tag"] == "text-classification"
    assert header["genecorpus"]["classes"] == ["B", "CD4 T", "NK"]
    assert header["genecorpus"]["corpus_manifest_sha256"] == "ab" * 32
    values = {m["name"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert values["fine-tuned model test macro F1"] == 0.8123
    assert values["baseline log1p-PCA(50) test macro F1"] == 0.9456
    assert values["constant predictor test accuracy"] == 0.5
    assert table_row(body, "fine-tuned model") == ["0.8123", "0.9011"]
    assert table_row(body, "baseline: log1p → PCA(50) → logistic regression") == ["0.9456", "0.9688"]
    assert table_row(body, "constant predictor (most frequent training class)") == ["0.2222", "0.5000"]
    assert table_row(body, "NK") == ["20", "4", "6"]
    assert table_row(body, "kang_ctrl") == ["900", "not recorded"]
    assert table_row(body, "device") == ["cpu, fp32, 1 process"]
    limits = section(body, "Limitations")
    assert "behind the log1p → PCA(50) baseline" in limits  # 0.8123 < 0.9456
    assert "NK (6)" in limits and "CD4 T (154)" not in limits  # fewer than 10 test cells
    assert "not better than always predicting" not in limits
    assert "pretraining cells" not in limits
    better = variant(CLASSIFIER, **{"metrics.model.macro_f1": 0.97})
    assert "behind the log1p" not in limitations(better)
    leaked = variant(CLASSIFIER, **{"leakage_guard.n_test_cells_seen_in_pretraining": 12})
    assert "12 test cells were among the start model's pretraining cells" in limitations(leaked)
    no_baseline = copy.deepcopy(CLASSIFIER)
    del no_baseline["metrics"]["baseline"]
    _, body = split_card(model_card(no_baseline))
    assert table_row(body, "baseline: log1p → PCA(50) → logistic regression") == ["not computed", "not computed"]
    assert "baseline was not computed" in section(body, "Limitations")


def test_folds_show_their_spread() -> None:
    folds = variant(CLASSIFIER, **{"split.by": "folds", "split.folds": 5, "split.n_test_cells_all_folds": 900,
                                   "metrics.model.macro_f1_sd": 0.0123})
    _, body = split_card(model_card(folds))
    assert table_row(body, "fine-tuned model") == ["0.8123 ± 0.0123", "0.9011"]
    assert "On 900 test cells (5 stratified folds) (mean ± SD over 5 folds" in body


# ---------------------------------------------------------------- the command

def test_card_command_rewrites_the_card(run: tuple[Path, Path, dict[str, Any]], tmp_path: Path) -> None:
    _, model, _ = run
    expected = (model / CARD).read_text()
    (model / CARD).unlink()
    result = CliRunner().invoke(app, ["card", str(model)])
    assert result.exit_code == 0, result.output
    assert (model / CARD).read_text() == expected
    result = CliRunner().invoke(app, ["card", str(tmp_path)])
    assert result.exit_code != 0
    assert "genecorpus_model.json" in result.output


def test_card_of_an_older_record(run: tuple[Path, Path, dict[str, Any]]) -> None:
    """Model folders of before this card recorded ``training.bf16`` (a bool) and no ``attention``."""
    info = copy.deepcopy(run[2])
    del info["attention"], info["training"]["precision"]
    info["training"]["bf16"] = True
    _, body = split_card(model_card(info, name="old"))
    assert table_row(body, "device") == ["cpu, bf16, 1 process"]
    assert table_row(body, "attention") == ["not recorded"]


def test_card_says_how_many_processes_trained_and_the_global_batch(run: tuple[Path, Path, dict[str, Any]]) -> None:
    _, body = split_card(model_card(run[2], name="one"))
    assert table_row(body, "batch") == ["4 cells per optimizer step (4 cells per forward pass)"]
    info = copy.deepcopy(run[2])
    info["processes"] = {"world_size": 2, "backend": "gloo", "global_batch": 16, "batch_size": 4, "grad_accum": 2,
                         "max_batch_tokens": 2048}
    _, body = split_card(model_card(info, name="two"))
    assert table_row(body, "batch") == ["16 cells per optimizer step (4 cells per forward pass × 2 accumulated × "
                                        "2 processes), at most 2,048 padded tokens per pass"]
    assert table_row(body, "device") == ["cpu, fp32, 2 processes (gloo)"]
