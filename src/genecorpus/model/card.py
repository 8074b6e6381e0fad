"""The model card: a ``README.md`` in the Hugging Face model-card format, generated from the model info.

Every model folder with a ``genecorpus_model.json`` gets one (:func:`genecorpus.model.bert.save_model`
writes it; ``genecorpus card MODEL`` writes it again). Every figure in it is read from the info dict —
nothing is typed by hand — so the card and ``genecorpus_model.json`` cannot disagree, and the limitations
it lists are those the run measured (a schedule not completed, a model behind its baseline, few steps…).

The card is a YAML header (Hugging Face's model-card metadata: ``library_name``, ``pipeline_tag``,
``tags``, a ``model-index`` with the held-out metrics, and our own ``genecorpus`` block with the corpus's
manifest digest) and Markdown sections: the model, the corpus, training, held-out evaluation beside the
baselines, intended use, limitations, how to load it.

Two kinds of info are read, each parsed into frozen pydantic models (unknown keys are ignored, missing
required ones fail with one line naming the key):

``kind: "pretrain"`` (or no ``kind``) — what :func:`genecorpus.model.pretrain.pretrain` writes: ``preset``,
``architecture``, ``layout``, ``max_positions``, ``corpus`` (:class:`CorpusInfo`), ``split``
(:class:`PretrainSplit`), ``plan``, ``training`` (:class:`TrainingInfo`), ``metrics``
(:class:`PretrainMetrics`), ``evals``, ``settings``, ``versions``, ``attention``.

``kind: "classifier"`` — what ``genecorpus finetune`` writes (:class:`ClassifierInfo`): ``label`` (the
column predicted), ``classes``, ``start_model`` (``{"path", "preset"}``), ``metrics`` (``{"model",
"baseline", "constant"}``, each ``{"macro_f1", "accuracy", "n_cells"}`` and over folds ``*_sd``: the
fine-tuned model, log1p → PCA(50) → logistic regression on the same train/test cells, the majority
class), ``split`` (``by``: ``stratified``/``folds``/``datasets``, ``n_cells`` by role, ``hold_out_datasets``,
``per_class`` cells by role), optionally ``corpus``, ``training`` (``steps``, ``device``, ``bf16``,
``runs``), ``architecture``, ``leakage_guard``, ``timings``.

Needs nothing beyond pydantic to build the text; writing the YAML header uses PyYAML (a dependency of
transformers, so of the ``train`` extra).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genecorpus.corpus.folder import MANIFEST, sha256_of_path
from genecorpus.errors import InputError

if TYPE_CHECKING:
    import os

    from genecorpus.corpus import CorpusReader

__all__ = [
    "CARD", "ClassifierInfo", "CorpusInfo", "PretrainInfo", "cells_by_dataset", "corpus_record", "model_card",
    "parse_model_info", "write_model_card",
]

CARD = "README.md"
"""The model card's file name in a model folder (what the Hugging Face Hub shows)."""
FEW_CELLS = 1_000_000
"""A pretraining corpus smaller than this is called small on the card (Geneformer V1: ~30 M cells)."""
FEW_TEST_CELLS = 10
"""Classes with fewer test cells than this are named on the card: their figures are noise."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


# ---------------------------------------------------------------- what the card reads

class DatasetCells(_Record):
    """One dataset of a corpus: its cells and tokens in the corpus."""

    dataset_id: str
    n_cells: int
    n_tokens: int | None = None


class CorpusInfo(_Record):
    """The corpus a model was trained on (``info["corpus"]``; see :func:`corpus_record`)."""

    path: str
    n_cells: int
    n_tokens: int
    layout: str | None = None
    """``gc30m`` (``<pad>``, ``<mask>``) or ``gc104m`` (also ``<cls>``, ``<eos>``)."""
    format: str | None = None
    """The manifest's format (``genecorpus/1``); None for a corpus genecorpus did not write."""
    manifest_sha256: str | None = None
    """sha256 of the corpus folder's ``manifest.json``: which corpus, exactly."""
    token_dictionary_sha256: str | None = None
    n_genes: int | None = None
    """Genes in the token dictionary (special tokens not counted)."""
    datasets: tuple[DatasetCells, ...] = ()

    @field_validator("datasets", mode="before")
    @classmethod
    def _datasets_as_mapping(cls, value: Any) -> Any:
        """``{dataset_id: n_cells}`` (fine-tuning's record) or None, as well as the list of records."""
        if value is None:
            return ()
        if isinstance(value, dict):
            return [{"dataset_id": k, "n_cells": v} for k, v in value.items()]
        return value


class Architecture(_Record):
    layers: int
    hidden: int
    heads: int
    intermediate: int
    activation: str = "relu"
    dropout: float = 0.02


class PretrainSplit(_Record):
    by: str
    """``dataset`` (whole datasets held out) or ``cell`` (a random share of cells)."""
    val_datasets: tuple[str, ...] = ()
    n_train_cells: int
    n_held_out_cells: int
    n_val_cells: int
    val_cells_by_dataset: dict[str, int] = Field(default_factory=dict)
    """Validation cells per dataset (the scored sample)."""


def _precision_of_older_records(data: Any) -> Any:
    """A training record of before ``precision``, which recorded ``bf16`` (a bool) instead, as it is now."""
    if isinstance(data, dict) and "precision" not in data and "bf16" in data:
        return {**data, "precision": "bf16" if data["bf16"] else "fp32"}
    return data


class ProcessesInfo(_Record):
    """The processes that trained a model (``torchrun``) and its batch; one process for older records."""

    world_size: int = 1
    backend: str | None = None
    global_batch: int | None = None
    """Cells of one optimizer step: ``batch_size × grad_accum × world_size``."""
    batch_size: int | None = None
    """Cells per process in one forward pass."""
    grad_accum: int = 1
    max_batch_tokens: int | None = None


class TrainingInfo(_Record):
    steps: int
    total_steps: int
    schedule_completed: bool
    epochs: float
    tokens_seen: int
    wall_seconds: float
    train_seconds: float
    stopped: str
    device: str
    peak_lr: float | None = None
    last_lr: float | None = None
    tokens_per_second: float | None = None
    precision: str = "fp32"

    @model_validator(mode="before")
    @classmethod
    def _older_records(cls, data: Any) -> Any:
        return _precision_of_older_records(data)


class PretrainMetrics(_Record):
    val_loss: float
    val_top1: float
    val_top10: float
    baseline_val_loss: float
    baseline_val_top1: float
    baseline_val_top10: float


class PretrainInfo(_Record):
    """The ``genecorpus_model.json`` of a pretrained ``BertForMaskedLM``."""

    kind: Literal["pretrain"] = "pretrain"
    preset: str
    architecture: Architecture
    layout: str
    max_positions: int
    corpus: CorpusInfo
    split: PretrainSplit
    training: TrainingInfo
    metrics: PretrainMetrics
    evals: tuple[dict[str, float], ...] = ()
    settings: dict[str, Any] = Field(default_factory=dict)
    plan: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    attention: str | None = None
    n_parameters: int | None = None
    seed: int | None = None
    processes: ProcessesInfo = Field(default_factory=ProcessesInfo)


class MethodMetrics(_Record):
    """Test figures of one method (the split's, or the mean over folds with their SD)."""

    macro_f1: float
    accuracy: float
    n_cells: int
    macro_f1_sd: float | None = None
    accuracy_sd: float | None = None


class ClassifierMetrics(_Record):
    model: MethodMetrics
    """The fine-tuned classifier."""
    constant: MethodMetrics
    """Always the training cells' most frequent class."""
    baseline: MethodMetrics | None = None
    """log1p → PCA(50) → logistic regression fitted and tested on the same cells (None: not computed)."""


class ClassifierSplit(_Record):
    by: str
    """``stratified`` (a stratified share of the cells), ``folds`` (k folds) or ``datasets`` (whole
    datasets held out for testing)."""
    n_cells: dict[str, int]
    """Cells by role: ``train``, ``val`` (early stopping), ``test``."""
    hold_out_datasets: tuple[str, ...] = ()
    folds: int | None = None
    n_test_cells_all_folds: int | None = None
    per_class: dict[str, dict[str, int]] = Field(default_factory=dict)
    """Per class, cells by role."""


class ClassifierRun(_Record):
    steps: int | None = None
    planned_steps: int | None = None
    best_step: int | None = None
    stopped: str | None = None
    epochs: float | None = None


class ClassifierTraining(_Record):
    steps: int | None = None
    device: str | None = None
    precision: str | None = None
    train_seconds: float | None = None
    processes: ProcessesInfo = Field(default_factory=ProcessesInfo)
    runs: tuple[ClassifierRun, ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _older_records(cls, data: Any) -> Any:
        return _precision_of_older_records(data)


class StartModel(_Record):
    path: str
    kind: str | None = None
    preset: str | None = None


class LeakageGuard(_Record):
    status: str | None = None
    restricted_test_to_pretraining_held_out: bool = False
    """The starting model was pretrained on this corpus and only cells its pretraining held out test."""
    n_test_cells_seen_in_pretraining: int | None = None


class ClassifierInfo(_Record):
    """The ``genecorpus_model.json`` of a fine-tuned cell classifier (``BertForSequenceClassification``),
    as ``genecorpus finetune`` writes it (the keys the card reads; the others are ignored)."""

    kind: Literal["classifier"]
    label: str
    """The predicted column (or the labels file's column)."""
    classes: tuple[str, ...]
    start_model: StartModel
    """The pretrained model it was initialised from."""
    metrics: ClassifierMetrics
    split: ClassifierSplit
    corpus: CorpusInfo | None = None
    training: ClassifierTraining = Field(default_factory=ClassifierTraining)
    architecture: Architecture | None = None
    leakage_guard: LeakageGuard | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    attention: str | None = None
    n_parameters: int | None = None
    versions: dict[str, str] = Field(default_factory=dict)


def parse_model_info(info: dict[str, Any], *, source: str = "the model info") -> PretrainInfo | ClassifierInfo:
    """The typed record of a ``genecorpus_model.json`` dict.

    Raises
    ------
    InputError
        A required key missing or of the wrong type (named), or an unknown ``kind``.
    """
    kind = info.get("kind", "pretrain")
    models: dict[str, type[PretrainInfo] | type[ClassifierInfo]] = {
        "pretrain": PretrainInfo, "classifier": ClassifierInfo}
    if kind not in models:
        msg = f"{source}: unknown kind {kind!r}; a model card is written for kind pretrain or classifier"
        raise InputError(msg)
    try:
        return models[kind].model_validate(info)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        msg = f"{source}: {where}: {first['msg']}; the model card needs it (rewrite the model with this genecorpus)"
        raise InputError(msg) from None


# ---------------------------------------------------------------- what a run records for it

def corpus_record(reader: CorpusReader) -> dict[str, Any]:
    """What a model's info records about its corpus (:class:`CorpusInfo` as a dict).

    The manifest's digest and format when the folder has a ``manifest.json``; per dataset, the cells and
    tokens of the ``dataset_id`` column (else the manifest's kept cells); the layout and the token
    dictionary's digest.
    """
    files = reader.files
    manifest_path = files.root / MANIFEST
    tdict = reader.token_dictionary
    record: dict[str, Any] = {
        "path": str(files.root.resolve()), "n_cells": reader.n_cells, "n_tokens": int(reader.lengths.sum()),
        "layout": tdict.layout().name, "n_genes": len(tdict.gene_tokens),
        "format": files.manifest.format if files.manifest else None,
        "manifest_sha256": sha256_of_path(manifest_path)[0] if manifest_path.is_file() else None,
        "token_dictionary_sha256": sha256_of_path(files.token_dictionary)[0] if files.token_dictionary else None,
    }
    ids = reader.dataset_ids()
    if ids is not None:
        names, inverse = np.unique(ids.astype(str), return_inverse=True)
        cells = np.bincount(inverse, minlength=len(names))
        tokens = np.bincount(inverse, weights=reader.lengths, minlength=len(names))
        record["datasets"] = [{"dataset_id": str(n), "n_cells": int(c), "n_tokens": int(t)}
                              for n, c, t in zip(names, cells, tokens, strict=True)]
    elif files.manifest is not None:
        record["datasets"] = [{"dataset_id": d.dataset_id, "n_cells": d.cells.kept} for d in files.manifest.datasets]
    return record


def cells_by_dataset(reader: CorpusReader, rows: np.ndarray) -> dict[str, int]:
    """Cells of ``rows`` per ``dataset_id`` (empty for a corpus without the column)."""
    ids = reader.dataset_ids()
    if ids is None or len(rows) == 0:
        return {}
    names, counts = np.unique(ids[rows].astype(str), return_counts=True)
    return {str(n): int(c) for n, c in zip(names, counts, strict=True)}


# ---------------------------------------------------------------- the card

def write_model_card(folder: str | os.PathLike[str], info: dict[str, Any], *, name: str | None = None) -> Path:
    """Write ``folder/README.md`` from the model's info dict (what ``genecorpus_model.json`` holds).

    ``name`` (default: the folder's name) titles the card and its loading examples.
    """
    from genecorpus.corpus import publish_file

    text = model_card(info, name=name or Path(folder).name)
    return publish_file(Path(folder) / CARD, lambda tmp: tmp.write_text(text))


def model_card(info: dict[str, Any], *, name: str = "model") -> str:
    """The model card's Markdown text (YAML header first) for a model info dict.

    Parameters
    ----------
    info
        A ``genecorpus_model.json`` dict of ``kind`` ``pretrain`` (the default) or ``classifier``.
    name
        The model's name in the title (the folder's name).

    Raises
    ------
    InputError
        The info lacks what the card needs (see :func:`parse_model_info`).
    """
    record = parse_model_info(info)
    if isinstance(record, ClassifierInfo):
        return _classifier_card(record, name)
    return _pretrain_card(record, name)


def _yaml_header(metadata: dict[str, Any]) -> str:
    import yaml

    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _genecorpus_block(corpus: CorpusInfo | None, kind: str) -> dict[str, Any]:
    block: dict[str, Any] = {"kind": kind}
    if corpus is not None:
        block.update({"corpus_manifest_sha256": corpus.manifest_sha256, "format": corpus.format,
                      "layout": corpus.layout, "n_cells": corpus.n_cells, "n_tokens": corpus.n_tokens})
    return block


def _tags(kind: str, layout: str | None) -> list[str]:
    task = "fill-mask" if kind == "pretrain" else "text-classification"
    return ["single-cell", "transcriptomics", "geneformer", "genecorpus", task] + ([layout] if layout else [])


def _metric(name: str, kind: str, value: float) -> dict[str, Any]:
    return {"name": name, "type": kind, "value": value}


def _pretrain_card(r: PretrainInfo, name: str) -> str:
    m, t, c, s = r.metrics, r.training, r.corpus, r.split
    held_out = _held_out_words(s)
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "fill-mask",
        "tags": _tags("pretrain", r.layout),
        "genecorpus": _genecorpus_block(c, "pretrain"),
        "model-index": [{"name": name, "results": [{
            "task": {"type": "fill-mask", "name": "masked-gene prediction"},
            "dataset": {"type": "genecorpus", "name": f"held-out cells ({held_out})"},
            "metrics": [_metric("validation loss (nats)", "loss", m.val_loss),
                        _metric("top-1 accuracy", "accuracy", m.val_top1),
                        _metric("top-10 accuracy", "top_10_accuracy", m.val_top10),
                        _metric("baseline validation loss (nats)", "loss", m.baseline_val_loss),
                        _metric("baseline top-1 accuracy", "accuracy", m.baseline_val_top1),
                        _metric("baseline top-10 accuracy", "top_10_accuracy", m.baseline_val_top10)],
        }]}],
    }
    a = r.architecture
    n_masked = r.evals[-1].get("n_masked") if r.evals else None
    lines = [
        _yaml_header(metadata),
        f"# {name}",
        "",
        f"A Geneformer-style `BertForMaskedLM` pretrained with genecorpus {_version()} on the masked-gene "
        "objective: each cell is its genes ranked by normalised expression, 15 % of the gene positions are "
        "masked, and the model predicts the masked genes.",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| architecture | BERT encoder, preset `{r.preset}`: {a.layers} layers, hidden size {a.hidden}, "
        f"{a.heads} attention heads, intermediate size {a.intermediate}, {a.activation}, dropout {a.dropout:g} |",
        f"| parameters | {_num(r.n_parameters)} |",
        f"| positions | {r.max_positions:,} (cells of up to {_max_length(r):,} tokens were trained on) |",
        f"| layout | {r.layout} ({_layout_words(r.layout)}) |",
        f"| attention | {r.attention or 'not recorded'} |",
        "",
        *_corpus_section(c),
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| steps | {t.steps:,} done of {t.total_steps:,} planned ({_planned_by(r)}); schedule completed: "
        f"{'yes' if t.schedule_completed else 'no'}; stopped by: {t.stopped} |",
        f"| epochs | {t.epochs:.3f} over {s.n_train_cells:,} training cells |",
        f"| tokens seen | {t.tokens_seen:,} |",
        f"| batch | {_batch_words(r.processes, r.settings)} |",
        f"| learning rate | peak {_num(t.peak_lr)}, last {_num(t.last_lr)} (linear warm-up "
        f"{r.settings.get('warmup_steps', '?')} steps, then linear decay), AdamW, weight decay "
        f"{r.settings.get('weight_decay', '?')} |",
        f"| time | {t.wall_seconds:,.1f} s wall, {t.train_seconds:,.1f} s in training steps"
        f"{_rate_words(t.tokens_per_second)} |",
        f"| device | {t.device}, {t.precision}, {_processes_words(r.processes)} |",
        f"| seed | {r.seed if r.seed is not None else r.settings.get('seed', '?')} |",
        f"| versions | {', '.join(f'{k} {v}' for k, v in r.versions.items()) or 'not recorded'} |",
        "",
        "## Held-out evaluation",
        "",
        f"Masked-gene prediction on {s.n_val_cells:,} held-out cells ({held_out})"
        + (f", {int(n_masked):,} masked genes" if n_masked else "")
        + ", beside the baseline that predicts the gene most frequent at each rank position in the training "
        "cells (scored on the same masked positions):",
        "",
        "| | loss (nats) | top-1 | top-10 |",
        "| --- | ---: | ---: | ---: |",
        f"| model | {m.val_loss:.4f} | {m.val_top1:.4f} | {m.val_top10:.4f} |",
        f"| baseline: gene frequency at the rank position | {m.baseline_val_loss:.4f} | {m.baseline_val_top1:.4f} "
        f"| {m.baseline_val_top10:.4f} |",
        "",
        "## Intended use",
        "",
        "A starting point for fine-tuning cell classifiers (`genecorpus finetune`), and for cell embeddings "
        "(`genecorpus embed`) and in-silico perturbation (`genecorpus perturb`), on corpora tokenized with the "
        "same token dictionary. A research model: not for diagnosis or any clinical decision.",
        "",
        "## Limitations",
        "",
        *[f"- {x}" for x in pretrain_limitations(r)],
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import BertForMaskedLM",
        "",
        f'model = BertForMaskedLM.from_pretrained("{name}", attn_implementation="sdpa")',
        "```",
        "",
        "```sh",
        f"genecorpus embed CORPUS --model {name} --out embeddings.h5ad"
        + (f" --max-length {_max_length(r)}" if _max_length(r) < r.max_positions else ""),
        "```",
        "",
        "Cells must be tokenized with this folder's `token_dictionary.pkl` (`genecorpus tokenize` or `build`). "
        "`genecorpus_model.json` holds every figure of this card and the full settings.",
        "",
    ]
    return "\n".join(lines)


def pretrain_limitations(r: PretrainInfo) -> list[str]:
    """The limitations a pretraining run's record shows, one sentence each (what the card lists)."""
    m, t, c, s = r.metrics, r.training, r.corpus, r.split
    out = []
    if not t.schedule_completed:
        out.append(f"Training stopped at step {t.steps:,} of {t.total_steps:,} ({t.stopped}), before the "
                   f"learning-rate schedule ended (last rate {_num(t.last_lr)}, peak {_num(t.peak_lr)}).")
    worse = [what for what, model, base, lower_is_better in (
        ("loss", m.val_loss, m.baseline_val_loss, True), ("top-1", m.val_top1, m.baseline_val_top1, False),
        ("top-10", m.val_top10, m.baseline_val_top10, False))
        if (model >= base if lower_is_better else model <= base)]
    if worse:
        out.append(f"The model is not better than the rank-frequency baseline on held-out cells in {', '.join(worse)}: "
                   "it has not learned more than where genes usually rank.")
    if t.epochs < 1:
        out.append(f"The model saw {t.epochs:.2f} of one pass over its training cells ({t.steps:,} steps, "
                   f"{t.tokens_seen:,} tokens): a start of pretraining, not a converged model.")
    if t.device.startswith("cpu"):
        out.append(f"Trained on a CPU, {_duration(t.train_seconds)} in training steps: far less compute than a "
                   "GPU pretraining run.")
    if c.n_cells < FEW_CELLS:
        out.append(f"The corpus has {c.n_cells:,} cells (Geneformer was pretrained on about 30 million): the "
                   "model has seen few cell types, tissues and protocols.")
    if s.by == "dataset" and len(s.val_datasets) == 1:
        out.append(f"The held-out figures come from one dataset ({s.val_datasets[0]}): they say how the model "
                   "does on that dataset's cells, not on other labs' cells in general.")
    elif s.by == "cell":
        out.append("The held-out cells are a random share of the training datasets (same labs, same protocols): "
                   "the figures do not test other labs' data.")
    if r.layout == "gc30m":
        out.append("The gc30m layout has no <cls> token: cell embeddings are means over gene positions "
                   "(`--pool mean`); there is no <cls> state to fine-tune or pool.")
    if _max_length(r) < r.max_positions:
        out.append(f"Trained on the first {_max_length(r):,} genes by rank of each cell: position embeddings "
                   f"beyond {_max_length(r):,} (of {r.max_positions:,}) are untrained; embed with "
                   f"`--max-length {_max_length(r)}`.")
    if c.manifest_sha256 is None:
        out.append("The corpus has no genecorpus manifest: its inputs and quality control are not recorded.")
    return out


def _classifier_card(r: ClassifierInfo, name: str) -> str:
    m, s = r.metrics, r.split
    test_words = _test_words(s)
    methods = [("fine-tuned model", "model", m.model), ("baseline log1p-PCA(50)", "baseline", m.baseline),
               ("constant predictor", "constant", m.constant)]
    index_metrics = []
    for title, _, mm in methods:
        if mm is not None:
            index_metrics += [_metric(f"{title} test macro F1", "f1", mm.macro_f1),
                              _metric(f"{title} test accuracy", "accuracy", mm.accuracy)]
    layout = r.corpus.layout if r.corpus else None
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": _tags("classifier", layout),
        "genecorpus": {**_genecorpus_block(r.corpus, "classifier"), "label": r.label, "classes": list(r.classes),
                       "start_model": r.start_model.path},
        "model-index": [{"name": name, "results": [{
            "task": {"type": "text-classification", "name": f"cell classification: {r.label}"},
            "dataset": {"type": "genecorpus", "name": f"test cells ({test_words})"},
            "metrics": index_metrics,
        }]}],
    }
    tr, arch = r.training, r.architecture
    folds = f" (mean ± SD over {s.folds} folds, every cell tested once)" if s.by == "folds" and s.folds else ""
    n_test = s.n_test_cells_all_folds if s.by == "folds" and s.n_test_cells_all_folds else s.n_cells.get("test", 0)
    rows = {"model": "fine-tuned model", "baseline": "baseline: log1p → PCA(50) → logistic regression",
            "constant": "constant predictor (most frequent training class)"}
    lines = [
        _yaml_header(metadata),
        f"# {name}",
        "",
        f"A cell classifier (`BertForSequenceClassification`) fine-tuned with genecorpus {_version()} from "
        f"`{r.start_model.path}` to predict `{r.label}`: {len(r.classes)} classes ({', '.join(r.classes)}).",
        "",
        "## Model",
        "",
        "| | |",
        "| --- | --- |",
        f"| start model | `{r.start_model.path}`" + (f" (preset `{r.start_model.preset}`)" if r.start_model.preset
                                                    else "") + " |",
        (f"| architecture | BERT encoder: {arch.layers} layers, hidden size {arch.hidden}, {arch.heads} heads; a "
         f"classification head of {len(r.classes)} classes |" if arch else
         f"| architecture | BERT encoder; a classification head of {len(r.classes)} classes |"),
        f"| parameters | {_num(r.n_parameters)} |",
        f"| attention | {r.attention or 'not recorded'} |",
        "",
        *(_corpus_section(r.corpus) if r.corpus else []),
        "## Training",
        "",
        "| | |",
        "| --- | --- |",
        f"| cells | {s.n_cells.get('train', 0):,} training, {s.n_cells.get('val', 0):,} validation (early stopping), "
        f"{s.n_cells.get('test', 0):,} test; split: {s.by} |",
        f"| steps | {_num(tr.steps)}" + "".join(
            f"; run {i + 1}: {_num(run.steps)} of {_num(run.planned_steps)} planned, best at step "
            f"{_num(run.best_step)}, {_num(run.epochs)} epochs, stopped by {run.stopped or '?'}"
            for i, run in enumerate(tr.runs)) + " |",
        f"| time | {_num(r.timings.get('wall_seconds'))} s wall, {_num(tr.train_seconds)} s in training steps |",
        f"| device | {tr.device or 'not recorded'}, {tr.precision or 'not recorded'}, "
        f"{_processes_words(tr.processes)} |",
        "",
        "## Held-out evaluation",
        "",
        f"On {n_test:,} test cells ({test_words}){folds} that neither training nor early stopping saw"
        f"{_pretraining_words(r.leakage_guard)}; the baseline was fitted on the same training cells and scored on "
        "the same test cells:",
        "",
        "| | macro F1 | accuracy |",
        "| --- | ---: | ---: |",
    ]
    for _, key, mm in methods:
        if mm is None:
            lines.append(f"| {rows[key]} | not computed | not computed |")
        else:
            lines.append(f"| {rows[key]} | {mm.macro_f1:.4f}{_sd(mm.macro_f1_sd)} | {mm.accuracy:.4f}"
                         f"{_sd(mm.accuracy_sd)} |")
    lines.append("")
    if s.per_class:
        lines += ["Cells per class:", "", "| class | training | validation | test |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {c} | {n.get('train', 0):,} | {n.get('val', 0):,} | {n.get('test', 0):,} |"
                  for c, n in s.per_class.items()]
        lines.append("")
    lines += [
        "## Intended use",
        "",
        f"Labelling cells of new corpora tokenized with the same token dictionary with one of the {len(r.classes)} "
        f"`{r.label}` classes it was trained on (`genecorpus predict`). It cannot name a class it has not seen. "
        "A research model: not for diagnosis or any clinical decision.",
        "",
        "## Limitations",
        "",
        *[f"- {x}" for x in classifier_limitations(r)],
        "",
        "## How to use",
        "",
        "```python",
        "from transformers import BertForSequenceClassification",
        "",
        f'model = BertForSequenceClassification.from_pretrained("{name}", attn_implementation="sdpa")',
        "labels = model.config.id2label",
        "```",
        "",
    ]
    return "\n".join(lines)


def classifier_limitations(r: ClassifierInfo) -> list[str]:
    """The limitations a fine-tuning run's record shows, one sentence each (what the card lists)."""
    m, s = r.metrics, r.split
    out = []
    if m.baseline is None:
        out.append("The log1p → PCA(50) baseline was not computed: there is nothing to say whether fine-tuning beats "
                   "a simple classifier on these cells.")
    elif m.model.macro_f1 < m.baseline.macro_f1:
        out.append(f"The fine-tuned model is behind the log1p → PCA(50) baseline on the same test cells (macro F1 "
                   f"{m.model.macro_f1:.4f} against {m.baseline.macro_f1:.4f}): for this label, the simple baseline "
                   "is the better classifier.")
    if m.model.macro_f1 <= m.constant.macro_f1 or m.model.accuracy <= m.constant.accuracy:
        out.append("The fine-tuned model is not better than always predicting the most frequent class.")
    few = [(c, n.get("test", 0)) for c, n in s.per_class.items() if n.get("test", 0) < FEW_TEST_CELLS]
    if few and s.by != "folds":
        out.append(f"Classes with fewer than {FEW_TEST_CELLS} test cells, whose figures are noise: "
                   + ", ".join(f"{c} ({n})" for c, n in few) + ".")
    if s.by == "datasets" and len(s.hold_out_datasets) == 1:
        out.append(f"The test cells come from one dataset ({s.hold_out_datasets[0]}).")
    elif s.by != "datasets":
        out.append("The test cells come from the training datasets (same labs, same protocols): how the model "
                   "does on other labs' cells is not measured here.")
    seen = r.leakage_guard.n_test_cells_seen_in_pretraining if r.leakage_guard else None
    if seen:
        out.append(f"{seen:,} test cells were among the start model's pretraining cells (self-supervised, "
                   "without labels): the test figures may be optimistic.")
    if any(run.stopped == "time_limit" for run in r.training.runs):
        out.append("The time limit stopped training before its planned steps.")
    if r.training.device is not None and r.training.device.startswith("cpu"):
        out.append(f"Fine-tuned on a CPU ({_duration(r.training.train_seconds)} in training steps).")
    return out


def _sd(value: float | None) -> str:
    return f" ± {value:.4f}" if value is not None else ""


# ---------------------------------------------------------------- pieces

def _corpus_section(c: CorpusInfo) -> list[str]:
    facts = [f"{c.n_cells:,} cells, {c.n_tokens:,} tokens ({c.n_tokens / max(c.n_cells, 1):,.0f} per cell)"]
    if c.layout:
        facts.append(f"layout {c.layout}")
    if c.n_genes:
        facts.append(f"a token dictionary of {c.n_genes:,} genes"
                     + (f" (sha256 `{c.token_dictionary_sha256}`)" if c.token_dictionary_sha256 else ""))
    lines = ["## Corpus", "", ", ".join(facts) + ".", ""]
    if c.manifest_sha256:
        lines += [f"Manifest{f' ({c.format})' if c.format else ''}: sha256 `{c.manifest_sha256}` — the corpus's "
                  "`manifest.json` records every input file's digest, the quality control and the build settings.",
                  ""]
    else:
        lines += ["No genecorpus manifest (a corpus genecorpus did not write).", ""]
    if c.datasets:
        lines += ["| dataset | cells | tokens |", "| --- | ---: | ---: |"]
        lines += [f"| {d.dataset_id} | {d.n_cells:,} | {_num(d.n_tokens)} |" for d in c.datasets]
        lines.append("")
    return lines


def _held_out_words(s: PretrainSplit) -> str:
    if s.by == "dataset":
        return "whole datasets held out from training: " + ", ".join(s.val_datasets)
    spread = ", ".join(f"{k} {v:,}" for k, v in s.val_cells_by_dataset.items())
    return "a random share of the cells held out from training" + (f"; {spread}" if spread else "")


def _test_words(s: ClassifierSplit) -> str:
    if s.by == "datasets":
        return "whole datasets held out: " + ", ".join(s.hold_out_datasets)
    if s.by == "folds":
        return f"{s.folds} stratified folds"
    return "a stratified random share of the cells"


def _layout_words(layout: str) -> str:
    return {"gc30m": "Geneformer V1: <pad>, <mask>, up to 2,048 genes",
            "gc104m": "Geneformer V2: <cls> genes… <eos>, up to 4,096 tokens"}.get(layout, "unknown")


def _max_length(r: PretrainInfo) -> int:
    value = r.settings.get("max_length")
    return int(value) if isinstance(value, int) and value > 0 else r.max_positions


def _planned_by(r: PretrainInfo) -> str:
    by = r.plan.get("planned_by")
    return {"max_steps": "by --max-steps", "epochs": "by --epochs", "time_limit": "from the time limit"}.get(
        str(by), "as recorded")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "a time not recorded"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _rate_words(tokens_per_second: float | None) -> str:
    return f" ({tokens_per_second:,.0f} tokens/s)" if tokens_per_second else ""


def _version() -> str:
    """This package's version (the card names the software that wrote it, not a web address)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genecorpus")
    except PackageNotFoundError:
        return "(version unknown)"


def _pretraining_words(guard: LeakageGuard | None) -> str:
    """What the test cells were to the starting model's pretraining, when its record says."""
    if guard is None:
        return ""
    if guard.restricted_test_to_pretraining_held_out:
        return ", nor the starting model's pretraining (it was pretrained on this corpus and held them out)"
    if guard.n_test_cells_seen_in_pretraining:
        return f" ({guard.n_test_cells_seen_in_pretraining:,} of them were cells of the starting model's pretraining)"
    return ""


def _processes_words(p: ProcessesInfo) -> str:
    return f"{p.world_size} process{'es' if p.world_size > 1 else ''}" + (f" ({p.backend})" if p.backend else "")


def _batch_words(p: ProcessesInfo, settings: dict[str, Any]) -> str:
    per = p.batch_size if p.batch_size is not None else settings.get("batch_size", "?")
    total = p.global_batch if p.global_batch is not None else per
    parts = [f"{per} cells per forward pass"]
    if p.grad_accum > 1:
        parts.append(f"{p.grad_accum} accumulated")
    if p.world_size > 1:
        parts.append(f"{p.world_size} processes")
    budget = f", at most {p.max_batch_tokens:,} padded tokens per pass" if p.max_batch_tokens else ""
    return f"{total} cells per optimizer step ({' × '.join(parts)}){budget}"


def _num(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not recorded"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def _yes_no(value: bool | None) -> str:  # noqa: FBT001 - a value to print, not a switch
    return "not recorded" if value is None else ("yes" if value else "no")
