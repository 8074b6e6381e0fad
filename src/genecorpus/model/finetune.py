"""Fine-tuning: a ``BertForSequenceClassification`` cell classifier trained on a labeled corpus column.

The starting weights are a genecorpus model folder or a Geneformer checkpoint (with its token dictionary);
the pooler and the classification head are new. The classifier pools the hidden state of each cell's first
token, as Geneformer's cell classifier does: the ``<cls>`` token in the gc104m layout; in the gc30m layout
(no ``<cls>``) the cell's top-ranked gene, whose state sees the whole cell through attention.

The protocol (see ``docs/model.md``, "Fine-tuning"):

1. Labels: a corpus column, or a column of a CSV joined on key columns (:func:`~genecorpus.model.evaluate.join_labels`).
   Cells with a missing label are left out; so are classes too small for the split (listed in the record).
2. Split: per class, a seeded share of the cells tests and another validates (stratified), or ``folds``
   stratified folds each tested by a model trained on the others, or whole datasets tested
   (``hold_out_datasets``).
3. No test cell was trained on: besides the split, when the starting model was pretrained on this same corpus,
   the test cells are drawn from the cells its pretraining held out (its recorded split, recomputed).
4. Training: AdamW with linear warm-up and decay over global batches drawn by length
   (:class:`~genecorpus.model.sampling.LengthGroupedSampler`); the loss of a step is the sum of the cells'
   (class-weighted) cross-entropies over the cells of the global batch, summed over micro-batches; early
   stopping on validation macro F1 keeps the best evaluation's weights.
   Under ``torchrun`` every process trains on its share of each global batch (as ``pretrain`` does:
   :func:`~genecorpus.model.sampling.split_batch`, ``DistributedDataParallel``), validation and test cells are
   scored in shares and gathered, so every process takes the same early-stopping decisions; rank 0 computes the
   baseline and writes the folder.
5. Test macro F1 and accuracy beside the log1p → PCA(50) → logistic-regression baseline of ``evaluate`` fitted on
   the same training cells and scored on the same test cells, and a constant (majority-class) predictor.

The model folder::

    OUT/config.json, model.safetensors, token_dictionary.pkl    BertForSequenceClassification.from_pretrained
    OUT/genecorpus_model.json    kind "classifier": classes, split, settings, metrics beside the baselines, timings
    OUT/metrics.json, metrics.csv, per_class.csv     test metrics of the model, the baseline, the constant
    OUT/predictions.csv, split.csv                   the test cells' predictions; every cell's role
    OUT/confusion_model.png, confusion_baseline.png

Needs the ``train`` extra (torch, transformers, scikit-learn), imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.corpus import publish_file, publish_folder
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.bert import (
    ATTENTION,
    MODEL_INFO,
    autocast,
    model_info,
    model_token_dictionary,
    quiet_transformers,
    require_torch,
    resolve_precision,
)
from genecorpus.model.card import corpus_record
from genecorpus.model.distributed import (
    SINGLE,
    Process,
    all_reduce_max,
    all_reduce_sums,
    barrier,
    broadcast_object,
    gather_objects,
    process_group,
    shard_rows,
)
from genecorpus.model.evaluate import require_sklearn

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    import pandas as pd
    import torch
    from transformers import BertForSequenceClassification

    from genecorpus.corpus import CorpusReader
    from genecorpus.vocab import TokenDictionary

logger = logging.getLogger(__name__)

__all__ = ["FinetuneResult", "FinetuneSettings", "balanced_class_weights", "cell_losses", "finetune",
           "predict_cells", "split_labeled_cells"]

KIND = "classifier"
"""``kind`` of a classifier's ``genecorpus_model.json``."""
TRAIN, VAL, TEST, EXCLUDED = 0, 1, 2, -1
"""Roles of a cell in a split."""
ROLE_NAMES = {TRAIN: "train", VAL: "val", TEST: "test", EXCLUDED: "excluded"}
METHODS = ("model", "baseline", "constant")
"""The scored predictors, in report order."""
DEFAULT_EPOCHS = 5.0
"""Epochs when neither ``epochs`` nor ``max_steps`` is given."""
PROBABILITY_PREFIX = "prob_"
"""Column prefix of the per-class probabilities in ``predictions.csv``."""


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a fine-tuning run; recorded in ``genecorpus_model.json``."""

    epochs: float | None = None
    """Passes over the training cells; exclusive with ``max_steps``. Neither: 5 epochs."""
    max_steps: int | None = None
    batch_size: int = 16
    """Cells per process in one forward/backward pass. The global batch — the cells of one optimizer step — is
    ``batch_size × grad_accum × processes``; it decides the trajectory."""
    grad_accum: int = 1
    """Micro-batches whose gradients one step adds up (gradient accumulation)."""
    max_batch_tokens: int | None = None
    """Most padded tokens (cells × longest cell) in one forward pass: longer cells are cut into smaller
    micro-batches (memory only; the loss and gradient are those of the global batch)."""
    dropout: float | None = None
    """Dropout of the encoder and the head; None: the starting model's. Processes draw their own dropout
    masks, so only with 0 does a run of several processes give a single process's numbers."""
    lr: float = 5e-5
    """Peak learning rate of AdamW (Geneformer's cell-classification example uses 5e-5)."""
    weight_decay: float = 0.001
    warmup_steps: int | None = None
    """Linear warm-up; default 10 % of the steps (at most 1,000), then linear decay to 0."""
    max_length: int | None = None
    """Tokens per cell; default the longest cell, at most the model's positions."""
    seed: int = 0
    val_fraction: float = 0.1
    """Share of each class's cells that validates (early stopping)."""
    test_fraction: float = 0.2
    """Share of each class's cells that tests (single split; not with ``folds`` or ``hold_out_datasets``)."""
    folds: int | None = None
    """k-fold: each fold's cells tested by a model trained on the rest."""
    hold_out_datasets: tuple[str, ...] = ()
    """Datasets whose cells are the test cells (all of them; no other cell tests)."""
    eval_every: int | None = None
    """Steps between validations; default one epoch (and always one at the end)."""
    patience: int | None = 3
    """Stop after this many validations without a better macro F1; None: never stop early."""
    freeze_layers: int = 0
    """Freeze the embeddings and the lowest N encoder layers (0: train everything)."""
    class_weights: str = "none"
    """``"balanced"``: cross-entropy weighted n / (classes × cells of the class) over the training cells."""
    time_limit: float | None = None
    """Minutes of wall time, a hard cap: training stops in time to evaluate and save."""
    grad_clip: float = 1.0
    pretraining_cells: str = "restrict"
    """When the starting model was pretrained on this corpus: ``"restrict"`` the test cells to the cells
    pretraining held out (fail if that leaves none), or ``"warn"`` and record how many it saw."""
    baseline: bool = True
    """Compute the log1p → PCA(50) baseline (needs the cells' raw counts)."""
    precision: str = "auto"
    """Arithmetic of the forward passes: ``auto`` (bf16 autocast on a CUDA device with bf16, else fp32), ``fp32``
    or ``bf16`` (see :func:`genecorpus.model.bert.autocast`)."""


@dataclass(frozen=True)
class FinetuneResult:
    """What a fine-tuning run produced."""

    model_path: Path
    """The model folder (``BertForSequenceClassification.from_pretrained`` opens it)."""
    classes: tuple[str, ...]
    metrics: dict[str, dict[str, float]]
    """``{"model"|"baseline"|"constant": {"macro_f1", "accuracy", "n_cells"}}`` of the test cells (with
    folds: means over folds, and ``macro_f1_sd``/``accuracy_sd``)."""
    predictions: pd.DataFrame = field(repr=False)
    """``predictions.csv``: the test cells in corpus order."""
    info: dict[str, Any] = field(repr=False)
    """The model folder's ``genecorpus_model.json``."""

    def table(self) -> str:
        """Test macro F1 and accuracy of the model, the baseline and the constant predictor."""
        lines = [f"{'':<10}{'macro F1':>16}{'accuracy':>16}{'cells':>8}"]
        for method in METHODS:
            m = self.metrics.get(method)
            if m is None:
                continue
            f1, acc = f"{m['macro_f1']:.3f}", f"{m['accuracy']:.3f}"
            if "macro_f1_sd" in m:
                f1, acc = f"{f1} ± {m['macro_f1_sd']:.3f}", f"{acc} ± {m['accuracy_sd']:.3f}"
            lines.append(f"{method:<10}{f1:>16}{acc:>16}{int(m['n_cells']):>8}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class LabeledSplit:
    """Roles of the labeled cells of a run: one split, or one per fold."""

    roles: np.ndarray
    """int8 (folds or 1, labeled cells): :data:`TRAIN`, :data:`VAL`, :data:`TEST` or :data:`EXCLUDED`."""
    fold: np.ndarray | None = None
    """Test fold of each labeled cell with ``folds`` (int64, -1: never tested)."""

    @property
    def n_runs(self) -> int:
        """Models to train: 1, or the folds."""
        return int(self.roles.shape[0])


def split_labeled_cells(y: np.ndarray, *, n_classes: int, dataset_ids: np.ndarray | None = None,
                        val_fraction: float = 0.1, test_fraction: float = 0.2, folds: int | None = None,
                        hold_out_datasets: Sequence[str] = (), testable: np.ndarray | None = None,
                        seed: int = 0) -> LabeledSplit:
    """Stratified, seeded train / validation / test roles of labeled cells.

    Single split: for each class of ``n`` cells, ``max(1, round(test_fraction × n))`` test cells are drawn from
    its ``testable`` cells (fewer if it has fewer), then ``max(1, round(val_fraction × n))`` validation cells
    from the rest (leaving at least one to train). With ``folds``: the testable cells are split by
    ``StratifiedKFold(folds, shuffle=True, random_state=seed)``; in each fold the others train, a stratified
    ``val_fraction`` of them validating. With ``hold_out_datasets``: their testable cells test, the others
    train and validate. Untestable cells never test (with ``hold_out_datasets`` they are excluded).

    Parameters
    ----------
    y
        Class index of each labeled cell (int64, 0 … n_classes - 1).
    n_classes
        Number of classes.
    dataset_ids
        Dataset of each cell (needed with ``hold_out_datasets``).
    testable
        bool per cell: may be a test cell (default: all).
    seed
        Same seed, same split.

    Returns
    -------
    LabeledSplit

    Examples
    --------
    >>> s = split_labeled_cells(np.repeat([0, 1], 10), n_classes=2, val_fraction=0.1, test_fraction=0.2)
    >>> [int((s.roles[0] == role).sum()) for role in (TRAIN, VAL, TEST)]
    [14, 2, 4]
    """
    y = np.asarray(y, dtype=np.int64)
    testable = np.ones(len(y), dtype=bool) if testable is None else np.asarray(testable, dtype=bool)
    if hold_out_datasets:
        ids = np.asarray(dataset_ids).astype(str)
        held = np.isin(ids, list(hold_out_datasets))
        roles = np.where(held, np.where(testable, TEST, EXCLUDED), TRAIN).astype(np.int8)
        _draw_validation(roles, y, n_classes, val_fraction, np.random.default_rng([seed, 0xF17E, 1]))
        return LabeledSplit(roles[None, :])
    if folds is not None:
        from genecorpus.model.evaluate import stratified_folds

        fold = np.full(len(y), -1, dtype=np.int64)
        candidates = np.flatnonzero(testable)
        fold[candidates] = stratified_folds(y[candidates], folds=folds, seed=seed)
        runs = np.empty((folds, len(y)), dtype=np.int8)
        for k in range(folds):
            runs[k] = np.where(fold == k, TEST, TRAIN)
            _draw_validation(runs[k], y, n_classes, val_fraction, np.random.default_rng([seed, 0xF17E, 2, k]))
        return LabeledSplit(runs, fold)
    rng = np.random.default_rng([seed, 0xF17E, 0])
    roles = np.full(len(y), TRAIN, dtype=np.int8)
    for c in range(n_classes):
        members = rng.permutation(np.flatnonzero(y == c))
        n_test = min(max(1, round(test_fraction * len(members))), len(members) - 2)
        candidates = members[testable[members]]
        roles[candidates[:max(0, n_test)]] = TEST
    _draw_validation(roles, y, n_classes, val_fraction, rng)
    return LabeledSplit(roles[None, :])


def _draw_validation(roles: np.ndarray, y: np.ndarray, n_classes: int, val_fraction: float,
                     rng: np.random.Generator) -> None:
    """Turn ``max(1, round(val_fraction × class cells))`` training cells of each class into validation cells,
    leaving at least one to train (in place)."""
    for c in range(n_classes):
        pool = rng.permutation(np.flatnonzero((y == c) & (roles == TRAIN)))
        n_class = int((y == c).sum())
        n_val = min(max(1, round(val_fraction * n_class)), len(pool) - 1)
        roles[pool[:max(0, n_val)]] = VAL


def _min_class_cells(s: FinetuneSettings) -> int:
    """Cells a class needs for the split: one to train, one to validate and (but with held-out datasets) a test
    cell per fold."""
    if s.hold_out_datasets:
        return 2
    return max(3, s.folds or 0)


# ------------------------------------------------------------------------------------------- the leakage guard


@dataclass(frozen=True)
class _PretrainingCells:
    """Which cells of this corpus the starting model trained on (in pretraining, or in an earlier fine-tuning),
    as far as it is known."""

    status: str
    """``"same_corpus"`` (``seen`` known), ``"other_corpus"``, ``"unknown_split"`` (same corpus, split not
    recomputable), ``"no_record"`` (no genecorpus_model.json, e.g. a Geneformer checkpoint)."""
    seen: np.ndarray | None
    """bool per corpus row: the starting model trained on it (with ``status == "same_corpus"``)."""
    record: dict[str, Any]


def _pretraining_record(info: dict[str, Any]) -> dict[str, Any] | None:
    """The pretraining part of a model's info: its own (a pretrained model) or the one it carried forward."""
    if info.get("kind") == KIND:
        return info.get("pretraining")
    if "split" in info and "corpus" in info:
        return {"corpus": info["corpus"], "split": info["split"],
                "seed": info.get("settings", {}).get("seed", info.get("seed")),
                "val_fraction": info.get("settings", {}).get("val_fraction")}
    return None


def _same_corpus(mine: dict[str, Any], theirs: dict[str, Any]) -> bool:
    """Whether a recorded corpus identity is this corpus: same path, same manifest digest, or same cells and tokens."""
    digests = (mine.get("manifest_sha256"), theirs.get("manifest_sha256"))
    return (theirs.get("path") == mine["path"] or (None not in digests and digests[0] == digests[1])
            or (theirs.get("n_cells") == mine["n_cells"] and theirs.get("n_tokens") == mine["n_tokens"]))


def _pretraining_cells(model: Path, reader: CorpusReader, mine: dict[str, Any]) -> _PretrainingCells:
    """The cells the starting model trained on: its pretraining's training cells (recomputed from its recorded
    split), and — for a classifier fine-tuned on this corpus — the cells it was fine-tuned and validated on.
    ``mine`` is this corpus's :func:`~genecorpus.model.card.corpus_record`."""
    from genecorpus.model.sampling import split_cells

    info = model_info(model)
    record = _pretraining_record(info)
    earlier = _finetuning_cells(model, info, reader, mine)
    if record is None:
        if earlier is not None:
            return _PretrainingCells("same_corpus", earlier, {})
        return _PretrainingCells("no_record", None, {})
    if not _same_corpus(mine, record["corpus"]):
        if earlier is not None:
            return _PretrainingCells("same_corpus", earlier, record)
        return _PretrainingCells("other_corpus", None, record)
    split = record["split"]
    if split.get("by") == "dataset" and reader.dataset_ids() is not None:
        seen = ~np.isin(reader.dataset_ids().astype(str), list(split.get("val_datasets", ())))
    elif record.get("seed") is not None and record.get("val_fraction") is not None:
        again = split_cells(reader.lengths, reader.dataset_ids(), val_fraction=record["val_fraction"],
                            seed=record["seed"])
        seen = np.zeros(reader.n_cells, dtype=bool)
        seen[again.train_rows] = True
    else:
        return _PretrainingCells("unknown_split", None, record)
    if int(seen.sum()) != split.get("n_train_cells"):
        return _PretrainingCells("unknown_split", None, record)
    return _PretrainingCells("same_corpus", seen if earlier is None else seen | earlier, record)


def _finetuning_cells(model: Path, info: dict[str, Any], reader: CorpusReader,
                      mine: dict[str, Any]) -> np.ndarray | None:
    """bool per row: a classifier fine-tuned on this corpus trained or validated on it (None: not such a model)."""
    import pandas as pd

    if info.get("kind") != KIND or not _same_corpus(mine, info.get("corpus", {})):
        return None
    split = pd.read_csv(model / "split.csv", usecols=["corpus_row", "split"])
    seen = np.zeros(reader.n_cells, dtype=bool)
    seen[split.corpus_row[split.split.isin(["train", "val"])].to_numpy()] = True
    return seen


# ------------------------------------------------------------------------------------------------ the loss


def balanced_class_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    """``n / (n_classes × cells of the class)`` over the training cells ``y`` (float64; sklearn's "balanced").

    The weights' mean over the training cells is 1, so a weighted loss keeps the unweighted one's scale.
    """
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=n_classes).astype(np.float64)
    return np.divide(len(y), n_classes * counts, out=np.zeros(n_classes), where=counts > 0)


def cell_losses(logits: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Each cell's cross-entropy (float32, one per cell), times its class's weight when weights are given.

    A step's loss is the sum of these over the cells of its global batch divided by the number of those cells
    (not by the sum of the weights, as ``torch.nn.functional.cross_entropy(weight=...)`` would): micro-batches
    and ranks then add up to the loss of the whole batch.
    """
    import torch

    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    return losses if class_weights is None else losses * class_weights[targets]


# ---------------------------------------------------------------------------------------------------- models


def _open_classifier_start(model: Path, classes: tuple[str, ...], tdict: TokenDictionary, seed: int,
                           device: torch.device, *, dropout: float | None = None) -> BertForSequenceClassification:
    """The classifier initialised from ``model``: its encoder weights, a new pooler and head (seeded); with
    ``dropout``, that dropout in the encoder and the head instead of the model's."""
    import torch
    from transformers import AutoConfig, BertForSequenceClassification

    config = AutoConfig.from_pretrained(model)
    if tdict.max_token >= config.vocab_size:
        msg = (f"{model}: has {config.vocab_size} token embeddings but its dictionary ids go up to "
               f"{tdict.max_token}; give the dictionary the model was trained with")
        raise InputError(msg)
    was_classifier = any("SequenceClassification" in a for a in (config.architectures or []))
    rates = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
                                        "classifier_dropout": dropout}
    torch.manual_seed(seed)
    try:
        net = BertForSequenceClassification.from_pretrained(
            model, num_labels=len(classes), id2label=dict(enumerate(classes)),
            label2id={c: i for i, c in enumerate(classes)}, problem_type="single_label_classification",
            ignore_mismatched_sizes=was_classifier, attn_implementation=ATTENTION, **rates)  # a head may differ
    except (OSError, ValueError) as e:
        msg = f"{model}: cannot load the model ({str(e).splitlines()[0]}); check the folder's weights"
        raise InputError(msg) from None
    return net.to(device)


def _freeze(net: BertForSequenceClassification, layers: int) -> None:
    n = len(net.bert.encoder.layer)
    if layers > n:
        msg = f"--freeze-layers {layers}: the model has {n} encoder layers; give 0 to {n}"
        raise ConfigError(msg)
    if layers == 0:
        return
    for module in (net.bert.embeddings, *net.bert.encoder.layer[:layers]):
        for param in module.parameters():
            param.requires_grad_(False)


def _pad(reader: CorpusReader, tdict: TokenDictionary, rows: np.ndarray, max_length: int,
         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    from genecorpus.model.masking import pad_cells

    batch = pad_cells(reader.batch(rows), tdict, max_length=max_length)
    return (torch.from_numpy(batch.input_ids).to(device), torch.from_numpy(batch.attention_mask).to(device))


def _logits(net: BertForSequenceClassification, ids: torch.Tensor, attention: torch.Tensor, *,
            precision: str) -> torch.Tensor:
    """The classifier's logits (float32), under the autocast of ``precision`` (:func:`~genecorpus.model.bert.autocast`,
    the same as pretraining's)."""

    with autocast(ids.device, precision):
        return net(input_ids=ids, attention_mask=attention).logits.float()


def _probabilities(net: BertForSequenceClassification, reader: CorpusReader, tdict: TokenDictionary,
                   rows: np.ndarray, *, max_length: int, batch_size: int, precision: str,
                   process: Process = SINGLE,
                   progress: Callable[[str, int, int], None] | None = None) -> np.ndarray:
    """Class probabilities of ``rows`` (float32, rows × classes, in the order of ``rows``), longest cells first.

    Several processes score every ``world_size``-th cell of that order each, and every process gets all of
    them back (so every process takes the same decisions from them).
    """
    import torch

    device = next(net.parameters()).device
    out = np.zeros((len(rows), net.config.num_labels), dtype=np.float32)
    order = shard_rows(np.argsort(-reader.lengths[rows], kind="stable"), process)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            ids, attention = _pad(reader, tdict, rows[part], max_length, device)
            out[part] = torch.softmax(_logits(net, ids, attention, precision=precision), dim=-1).cpu().numpy()
            if progress is not None:
                progress("predict", min(start + batch_size, len(order)), len(order))
    if process.world_size > 1:
        shares = gather_objects((order, out[order]), process)
        if shares is not None:
            for positions, values in shares:
                out[positions] = values
        out = broadcast_object(out, process)
    return out


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Macro F1 over the classes the cells hold, accuracy, cells."""
    from sklearn.metrics import accuracy_score, f1_score

    if len(y_true) == 0:
        return {"macro_f1": math.nan, "accuracy": math.nan, "n_cells": 0}
    return {"macro_f1": float(f1_score(y_true, y_pred, labels=np.unique(y_true), average="macro", zero_division=0)),
            "accuracy": float(accuracy_score(y_true, y_pred)), "n_cells": len(y_true)}


# ------------------------------------------------------------------------------------------------ training


@dataclass
class _Trained:
    net: BertForSequenceClassification
    steps: int
    best_step: int
    stopped: str
    evals: list[dict[str, float]]
    train_loss: list[float]
    train_seconds: float
    eval_seconds: float
    n_train_cells_seen: int
    n_train_tokens_seen: int
    """Tokens of the training cells the steps took (after truncation to the max length; padding not counted)."""
    total_steps: int
    warmup_steps: int


class _Trainer:
    """Trains one classifier on one split's training cells, validating on its validation cells."""

    def __init__(self, reader: CorpusReader, tdict: TokenDictionary, net: BertForSequenceClassification,
                 settings: FinetuneSettings, *, max_length: int, deadline: float,
                 progress: Callable[[str, int, int], None] | None, process: Process = SINGLE) -> None:
        import torch

        from genecorpus.model.bert import adamw

        self.reader, self.tdict, self.net, self.s = reader, tdict, net, settings
        self.max_length, self.deadline, self.progress, self.process = max_length, deadline, progress, process
        self.device = next(net.parameters()).device
        self.precision = resolve_precision(settings.precision, self.device)
        self.optimizer = adamw(net, lr=settings.lr, weight_decay=settings.weight_decay)
        self.weights: torch.Tensor | None = None
        self.global_batch = settings.batch_size * settings.grad_accum * process.world_size
        """Cells of one optimizer step, over all processes and micro-batches."""
        # several processes: DistributedDataParallel averages the gradients over them in each step's last backward
        self.module: Any = net if process.world_size == 1 else torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def step(self, rows: np.ndarray, y: np.ndarray, step: int) -> float:
        """One optimizer step on a global batch: loss = Σ cell losses / cells of the batch, over micro-batches and
        processes.

        This process trains on its share of the batch (:func:`~genecorpus.model.sampling.split_batch`); each
        micro-batch adds its cells' loss sum × processes / cells of the batch, which ``DistributedDataParallel``'s
        mean over the processes turns into the gradient of the global batch's mean loss. Dropout is seeded from
        ``(seed, step)`` (and the rank), so a step's randomness does not depend on what ran before.
        """
        from contextlib import nullcontext

        import torch

        from genecorpus.model.sampling import split_batch

        p = self.process
        self.net.train()
        key = [self.s.seed, 2, step] if p.rank == 0 else [self.s.seed, 2, step, p.rank]
        torch.manual_seed(int(np.random.default_rng(key).integers(2**62)))
        n = len(rows)
        lengths = np.minimum(self.reader.lengths[rows], self.max_length)
        parts = split_batch(lengths, rank=p.rank, world_size=p.world_size, grad_accum=self.s.grad_accum,
                            max_batch_tokens=self.s.max_batch_tokens)
        total = 0.0
        if not parts:  # a short last batch left this process no cell: join the gradient exchange with nothing
            ids, attention = _pad(self.reader, self.tdict, rows[:1], self.max_length, self.device)
            (_logits(self.module, ids, attention, precision=self.precision).sum() * 0.0).backward()
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with nullcontext() if last or p.world_size == 1 else self.module.no_sync():
                ids, attention = _pad(self.reader, self.tdict, rows[part], self.max_length, self.device)
                targets = torch.from_numpy(y[part]).to(self.device)
                logits = _logits(self.module, ids, attention, precision=self.precision)
                loss = cell_losses(logits, targets, self.weights).sum()
                (loss * (p.world_size / n)).backward()
            total += float(loss.detach())
        trainable = [param for param in self.net.parameters() if param.requires_grad]
        torch.nn.utils.clip_grad_norm_(trainable, self.s.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(all_reduce_sums([total], p)[0]) / n

    def validate(self, rows: np.ndarray, y: np.ndarray) -> dict[str, float]:
        probs = _probabilities(self.net, self.reader, self.tdict, rows, max_length=self.max_length,
                               batch_size=self.s.batch_size, precision=self.precision, process=self.process)
        return _scores(y, probs.argmax(axis=1))

    def train(self, train_rows: np.ndarray, y_train: np.ndarray, val_rows: np.ndarray, y_val: np.ndarray,
              n_classes: int) -> _Trained:
        import torch
        from torch.optim.lr_scheduler import LambdaLR

        from genecorpus.model.sampling import LengthGroupedSampler
        from genecorpus.model.schedule import LearningRateSchedule, default_warmup_steps

        s = self.s
        if s.class_weights == "balanced":
            self.weights = torch.tensor(balanced_class_weights(y_train, n_classes), dtype=torch.float32,
                                        device=self.device)
        label_of = dict(zip(train_rows.tolist(), y_train.tolist(), strict=True))
        sampler = LengthGroupedSampler(train_rows, self.reader.lengths[train_rows], batch_size=self.global_batch,
                                       seed=s.seed)
        per_epoch = sampler.batches_per_epoch
        total = s.max_steps or max(1, math.ceil((s.epochs or DEFAULT_EPOCHS) * per_epoch))
        warmup = s.warmup_steps if s.warmup_steps is not None else default_warmup_steps(total)
        schedule = LearningRateSchedule.linear(warmup_steps=warmup, total_steps=total)
        self.scheduler = LambdaLR(self.optimizer, lambda step: schedule(step))  # noqa: PLW0108
        every = s.eval_every or per_epoch
        evals: list[dict[str, float]] = []
        losses: list[float] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        since_best, step, stopped, seen, tokens_seen = 0, 0, "max_steps", 0, 0
        train_seconds = eval_seconds = 0.0
        eval_per_cell = None

        def evaluate() -> None:
            nonlocal best, since_best, eval_seconds, eval_per_cell
            began = time.monotonic()
            record = {"step": step, **self.validate(val_rows, y_val)}
            took = time.monotonic() - began
            eval_seconds += took
            eval_per_cell = took / max(1, len(val_rows))
            record["seconds"] = round(took, 3)
            evals.append(record)
            logger.info("step %d: validation macro F1 %.4f, accuracy %.4f", step, record["macro_f1"],
                        record["accuracy"])
            if best is None or record["macro_f1"] > best[0]:
                weights = {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
                best = (record["macro_f1"], step, weights)
                since_best = 0
            else:
                since_best += 1

        logger.info("fine-tuning on %d cells (%d validate) for %d steps of %d cells (%d warm-up), max length %d, "
                    "on %s%s", len(train_rows), len(val_rows), total, self.global_batch, warmup, self.max_length,
                    self.device, f" × {self.process.world_size} processes" if self.process.world_size > 1 else "")
        while step < total:
            # keep room for the final validation, the test predictions and the writes (estimated from the last ones)
            reserve = 5.0 + 3 * (eval_per_cell or 0.0) * len(val_rows)
            late = time.monotonic() + reserve >= self.deadline
            if self.process.world_size > 1:  # rank 0's clock decides for every process
                late = bool(all_reduce_max([int(late) if self.process.is_main else 0], self.process)[0])
            if late:
                stopped = "time_limit"
                logger.warning("time limit: stopping fine-tuning at step %d of %d", step, total)
                break
            began = time.monotonic()
            rows = sampler.next_batch()
            losses.append(self.step(rows, np.array([label_of[r] for r in rows.tolist()], dtype=np.int64), step))
            train_seconds += time.monotonic() - began
            seen += len(rows)
            tokens_seen += int(np.minimum(self.reader.lengths[rows], self.max_length).sum())
            step += 1
            if self.progress is not None:
                self.progress("finetune", step, total)
            if step % every == 0 and step < total:
                evaluate()
                if s.patience is not None and since_best >= s.patience:
                    stopped = "early_stopping"
                    logger.info("no better validation macro F1 in %d evaluations: stopping at step %d", s.patience,
                                step)
                    break
        if not evals or evals[-1]["step"] != step:
            evaluate()
        assert best is not None
        self.net.load_state_dict(best[2])
        return _Trained(self.net, step, best[1], stopped, evals, losses, train_seconds, eval_seconds, seen, tokens_seen,
                        total, warmup)


# ------------------------------------------------------------------------------------------------ the run


def _check_settings(s: FinetuneSettings) -> None:
    if s.max_steps is not None and s.epochs is not None:
        msg = "--max-steps and --epochs: give one of them, not both"
        raise ConfigError(msg)
    for name, value, least in (("--max-steps", s.max_steps, 1), ("--epochs", s.epochs, 1e-9),
                               ("--batch-size", s.batch_size, 1), ("--grad-accum", s.grad_accum, 1),
                               ("--lr", s.lr, 1e-12), ("--max-length", s.max_length, 1),
                               ("--eval-every", s.eval_every, 1), ("--patience", s.patience, 1),
                               ("--time-limit", s.time_limit, 1e-9), ("--max-batch-tokens", s.max_batch_tokens, 1)):
        if value is not None and value < least:
            msg = f"{name} {value}: must be positive"
            raise ConfigError(msg)
    if s.dropout is not None and not 0 <= s.dropout < 1:
        msg = f"--dropout {s.dropout}: give a probability in [0, 1)"
        raise ConfigError(msg)
    if s.folds is not None and s.folds < 2:
        msg = f"--folds {s.folds}: k-fold needs at least 2 folds"
        raise ConfigError(msg)
    if s.folds is not None and s.hold_out_datasets:
        msg = "--folds and --hold-out-datasets: give one of them (held-out datasets are the test cells)"
        raise ConfigError(msg)
    if not 0 < s.val_fraction < 1 or not 0 < s.test_fraction < 1 or s.val_fraction + s.test_fraction >= 1:
        msg = (f"--val-fraction {s.val_fraction} and --test-fraction {s.test_fraction}: each must be in (0, 1) "
               "and together below 1")
        raise ConfigError(msg)
    if s.freeze_layers < 0:
        msg = f"--freeze-layers {s.freeze_layers}: must be 0 or more"
        raise ConfigError(msg)
    if s.class_weights not in ("balanced", "none"):
        msg = f"--class-weights {s.class_weights!r}: use balanced or none"
        raise ConfigError(msg)
    if s.pretraining_cells not in ("restrict", "warn"):
        msg = f"--pretraining-cells {s.pretraining_cells!r}: use restrict or warn"
        raise ConfigError(msg)
    if s.warmup_steps is not None and s.warmup_steps < 0:
        msg = f"--warmup-steps {s.warmup_steps}: must be 0 or more"
        raise ConfigError(msg)


def _check_output(out: Path, corpus_root: Path, *, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        msg = f"{out}: already exists; use --overwrite to replace it"
        raise ConfigError(msg)
    if out.exists():
        resolved, corpus = out.resolve(), corpus_root.resolve()
        if resolved == corpus or resolved in corpus.parents:
            msg = f"{out}: holds the corpus; give another --out"
            raise ConfigError(msg)
        if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
            msg = f"{out}: exists and is not a model folder; --overwrite only replaces models, give another --out"
            raise ConfigError(msg)


def _check_hold_out(obs: pd.DataFrame, hold_out: tuple[str, ...], source: str) -> None:
    if not hold_out:
        return
    if "dataset_id" not in obs.columns:
        msg = f"{source}: has no dataset_id column; --hold-out-datasets needs one"
        raise InputError(msg)
    missing = sorted(set(hold_out) - set(obs["dataset_id"].astype(str)))
    if missing:
        msg = (f"--hold-out-datasets {', '.join(missing)}: no such dataset in {source}; it has "
               f"{', '.join(sorted(set(obs['dataset_id'].astype(str))))}")
        raise InputError(msg)


def _testable_rows(pre: _PretrainingCells, policy: str, model: Path) -> np.ndarray | None:
    """The leakage guard: bool per corpus row, may test (None: every row may)."""
    if pre.status == "same_corpus" and policy == "restrict":
        logger.warning("the model was trained on cells of this corpus (pretraining or an earlier fine-tuning): test "
                       "cells are drawn from the %d cells it did not train on", int((~pre.seen).sum()))
        return ~pre.seen
    if pre.status == "unknown_split":
        msg = (f"{model}: was pretrained on this corpus, but its held-out cells cannot be recomputed from its "
               "genecorpus_model.json; fine-tune on another corpus, or give --pretraining-cells warn to test on "
               "cells pretraining may have seen")
        if policy == "restrict":
            raise InputError(msg)
        logger.warning(msg)
    elif pre.status == "no_record":
        logger.info("%s has no %s: whether its pretraining saw this corpus's cells is unknown", model, MODEL_INFO)
    return None


def finetune(
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str],
    label: str,
    labels: str | os.PathLike[str] | None = None,
    join: str | Mapping[str, str] | Sequence[str] | None = None,
    epochs: float | None = None,
    max_steps: int | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    max_batch_tokens: int | None = None,
    dropout: float | None = None,
    precision: str = "auto",
    lr: float = 5e-5,
    weight_decay: float = 0.001,
    warmup_steps: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    folds: int | None = None,
    hold_out_datasets: Sequence[str] = (),
    eval_every: int | None = None,
    patience: int | None = 3,
    freeze_layers: int = 0,
    class_weights: str = "none",
    time_limit: float | None = None,
    pretraining_cells: str = "restrict",
    baseline: bool = True,
    counts: Sequence[str | os.PathLike[str]] | None = None,
    device: str | None = None,
    token_dictionary: str | os.PathLike[str] | None = None,
    corpus_token_dictionary: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a cell classifier on a labeled corpus and score it beside the log1p-PCA baseline on the same cells.

    Parameters
    ----------
    corpus
        A corpus folder (or ``save_to_disk`` folder, parquet files) tokenized with the model's dictionary.
    out
        The model folder to create (written as ``.OUT.*.incomplete``, then renamed).
    model
        A genecorpus model folder (pretrained or a classifier) or a Geneformer checkpoint.
    label
        The corpus (or ``labels`` CSV) column to predict.
    labels, join
        A CSV joined onto the corpus's metadata and its key columns (see
        :func:`genecorpus.model.evaluate.join_labels`).
    epochs, max_steps, batch_size, grad_accum, max_batch_tokens, dropout, precision, lr, weight_decay, warmup_steps,
    max_length, seed, val_fraction, test_fraction, folds, hold_out_datasets, eval_every, patience, freeze_layers,
    class_weights, time_limit, pretraining_cells, baseline
        See :class:`FinetuneSettings`.
    counts
        Raw count files for the baseline (default: the inputs the corpus manifest lists).
    device
        ``"cpu"``, ``"cuda"``…; default CUDA when available.
    token_dictionary
        The model's dictionary if its folder has none (Geneformer checkpoints).
    corpus_token_dictionary
        The corpus's dictionary if its folder has none (default: the model's).
    overwrite
        Replace an existing model folder ``out``.
    progress
        Called as ``progress(stage, done, total)``.

    Returns
    -------
    FinetuneResult

    Raises
    ------
    ConfigError
        Invalid settings, or ``out`` exists without ``overwrite``.
    InputError
        Unreadable corpus or model, another vocabulary, no such label column, fewer than two classes, no test
        cell left by the pretraining guard, or no raw counts for the baseline.

    Examples
    --------
    >>> r = finetune("pbmc-corpus", "pbmc-cell-types", model="pbmc-model", label="cell_type",
    ...              epochs=10, lr=1e-4)  # doctest: +SKIP
    >>> print(r.table())  # doctest: +SKIP
    """
    started = time.monotonic()
    require_torch()
    require_sklearn()
    quiet_transformers()
    if epochs is None and max_steps is None:
        epochs = DEFAULT_EPOCHS
    settings = FinetuneSettings(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, grad_accum=grad_accum,
        max_batch_tokens=max_batch_tokens, dropout=dropout, precision=precision, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, max_length=max_length, seed=seed,
        val_fraction=val_fraction, test_fraction=test_fraction, folds=folds,
        hold_out_datasets=tuple(hold_out_datasets), eval_every=eval_every, patience=patience,
        freeze_layers=freeze_layers, class_weights=class_weights, time_limit=time_limit,
        pretraining_cells=pretraining_cells, baseline=baseline)
    _check_settings(settings)
    with process_group(device) as (process, torch_device):
        result = _finetune(settings, corpus, Path(out), model=Path(model), label=label, labels=labels, join=join,
                           counts=counts, token_dictionary=token_dictionary,
                           corpus_token_dictionary=corpus_token_dictionary, overwrite=overwrite, progress=progress,
                           started=started, process=process, torch_device=torch_device)
        return broadcast_object(result, process)  # rank 0's (it alone computed the baseline and wrote the folder)


def _finetune(settings: FinetuneSettings, corpus: str | os.PathLike[str], out: Path, *, model: Path, label: str,
              labels: str | os.PathLike[str] | None, join: str | Mapping[str, str] | Sequence[str] | None,
              counts: Sequence[str | os.PathLike[str]] | None, token_dictionary: str | os.PathLike[str] | None,
              corpus_token_dictionary: str | os.PathLike[str] | None, overwrite: bool,
              progress: Callable[[str, int, int], None] | None, started: float, process: Process,
              torch_device: torch.device) -> FinetuneResult | None:
    """:func:`finetune` in one process (of one or several): its result on rank 0, None on the others."""
    from genecorpus.model.embed import corpus_obs, open_corpus_for_model
    from genecorpus.model.evaluate import join_labels, label_values

    tdict, tdict_path = model_token_dictionary(model, token_dictionary)
    reader = open_corpus_for_model(corpus, tdict, model_dictionary_path=tdict_path, model_name=str(model),
                                   corpus_token_dictionary=corpus_token_dictionary)
    if process.is_main:
        _check_output(out, reader.files.root, overwrite=overwrite)
    barrier(process)
    obs = corpus_obs(reader, np.arange(reader.n_cells, dtype=np.int64)).reset_index(drop=True)
    source = str(corpus)
    if labels is not None:
        obs = join_labels(obs, labels, join=join)
        source = f"{source} + {labels}"
    values = label_values(obs, label, source)
    _check_hold_out(obs, settings.hold_out_datasets, source)
    corpus_of_run = corpus_record(reader)  # hashes the manifest and dictionary: once per run
    pre = _pretraining_cells(model, reader, corpus_of_run)
    testable_rows = _testable_rows(pre, settings.pretraining_cells, model)

    # classes and the split
    labeled = values != ""
    if settings.hold_out_datasets:
        held = np.isin(obs["dataset_id"].astype(str).to_numpy(), list(settings.hold_out_datasets))
        names, sizes = np.unique(values[labeled & ~held], return_counts=True)
    else:
        names, sizes = np.unique(values[labeled], return_counts=True)
    least = _min_class_cells(settings)
    classes = tuple(str(n) for n, k in zip(names, sizes, strict=True) if k >= least)
    dropped = {str(n): int(k) for n, k in zip(names, sizes, strict=True) if k < least}
    if len(classes) < 2:
        msg = (f"{source}: label {label!r} has {len(classes)} class(es) with at least {least} cells "
               f"({int(labeled.sum())} labeled cells of {len(values)}); need 2 or more")
        raise InputError(msg)
    if dropped:
        logger.warning("left out: classes with fewer than %d cells: %s", least,
                       ", ".join(f"{c} ({k})" for c, k in dropped.items()))
    rows = np.flatnonzero(labeled & np.isin(values, classes)).astype(np.int64)
    y = np.searchsorted(np.array(classes, dtype=object), values[rows]).astype(np.int64)
    dataset_ids = obs["dataset_id"].astype(str).to_numpy()[rows] if "dataset_id" in obs.columns else None
    split = split_labeled_cells(y, n_classes=len(classes), dataset_ids=dataset_ids,
                                val_fraction=settings.val_fraction, test_fraction=settings.test_fraction,
                                folds=settings.folds, hold_out_datasets=settings.hold_out_datasets,
                                testable=None if testable_rows is None else testable_rows[rows], seed=settings.seed)
    tested = (split.roles == TEST).any(axis=0)
    if not tested.any():
        why = ("the cells pretraining held out have no label of the kept classes" if pre.status == "same_corpus"
               else "the split left none")
        msg = f"{source}: no labeled cell can test: {why}; fine-tune on another corpus or give --pretraining-cells warn"
        raise InputError(msg)
    test_classes = np.unique(y[tested])
    if len(test_classes) < len(classes):
        absent = [classes[c] for c in range(len(classes)) if c not in test_classes]
        logger.warning("no test cell of %s: %s; macro F1 is over the %d class(es) the test cells hold",
                       "class" if len(absent) == 1 else "classes", ", ".join(absent), len(test_classes))
    n_seen = int(pre.seen[rows[tested]].sum()) if pre.seen is not None else None
    if n_seen:
        logger.warning("%d of the %d test cells were pretraining cells of the starting model", n_seen,
                       int(tested.sum()))

    # the baseline's features (independent of the model): counts of every cell that trains or tests
    setup_seconds = time.monotonic() - started
    baseline_began = time.monotonic()
    features, baseline_source, n_genes = None, None, 0
    if settings.baseline and process.is_main:  # rank 0 scores the baseline; the others only train
        from genecorpus.model.evaluate import log1p_normalize, read_cell_counts

        used = ((split.roles == TRAIN) | (split.roles == TEST)).any(axis=0)
        matrix, genes, baseline_source = read_cell_counts(obs.iloc[rows[used]], counts=counts,
                                                          corpus=None if counts else reader.files.root)
        features = {"x": log1p_normalize(matrix), "at": np.cumsum(used) - 1}
        n_genes = len(genes)
    baseline_seconds = time.monotonic() - baseline_began

    # train, one model per split
    longest = int(reader.lengths.max())
    from transformers import AutoConfig

    positions = int(AutoConfig.from_pretrained(model).max_position_embeddings)
    resolved_length = min(settings.max_length or longest, positions)
    settings = replace(settings, max_length=resolved_length)
    deadline = started + settings.time_limit * 60 if settings.time_limit else math.inf
    runs: list[dict[str, Any]] = []
    n_classes = len(classes)
    probs_all = np.full((len(rows), n_classes), np.nan, dtype=np.float32)
    base_all = np.full(len(rows), -1, dtype=np.int64)
    const_all = np.full(len(rows), -1, dtype=np.int64)
    best_net, best_val, saved_run = None, -math.inf, 0
    for k in range(split.n_runs):
        roles = split.roles[k]
        train, val, test = (np.flatnonzero(roles == r) for r in (TRAIN, VAL, TEST))
        net = _open_classifier_start(model, classes, tdict, settings.seed, torch_device, dropout=settings.dropout)
        _freeze(net, settings.freeze_layers)
        baseline_predicted, baseline_run_seconds = None, 0.0
        if features is not None:  # before training: the time limit then caps the training, not the baseline
            began = time.monotonic()
            baseline_predicted = _baseline_predictions(features, train, test, y, settings.seed)
            baseline_run_seconds = time.monotonic() - began
        fold_deadline = time.monotonic() + (deadline - time.monotonic()) / (split.n_runs - k)
        trainer = _Trainer(reader, tdict, net, settings, max_length=resolved_length, deadline=fold_deadline,
                           progress=progress, process=process)
        trained = trainer.train(rows[train], y[train], rows[val], y[val], n_classes)
        test_began = time.monotonic()
        probs = _probabilities(trained.net, reader, tdict, rows[test], max_length=resolved_length,
                               batch_size=settings.batch_size, precision=trainer.precision, process=process)
        test_seconds = time.monotonic() - test_began
        probs_all[test] = probs
        majority = int(np.argmax(np.bincount(y[train], minlength=n_classes)))
        const_all[test] = majority
        run: dict[str, Any] = {
            "fold": k if split.fold is not None else None,
            "n_cells": {"train": len(train), "val": len(val), "test": len(test)},
            "steps": trained.steps, "planned_steps": trained.total_steps, "warmup_steps": trained.warmup_steps,
            "best_step": trained.best_step, "stopped": trained.stopped,
            "epochs": trained.n_train_cells_seen / max(1, len(train)), "tokens_seen": trained.n_train_tokens_seen,
            "best_val_macro_f1": max(e["macro_f1"] for e in trained.evals), "evals": trained.evals,
            "train_loss_first": trained.train_loss[0] if trained.train_loss else None,
            "train_loss_last": trained.train_loss[-1] if trained.train_loss else None,
            "train_seconds": round(trained.train_seconds, 2), "eval_seconds": round(trained.eval_seconds, 2),
            "test_seconds": round(test_seconds, 2),
            "test": {"model": _scores(y[test], probs.argmax(axis=1)),
                     "constant": _scores(y[test], np.full(len(test), majority))},
        }
        if baseline_predicted is not None:
            base_all[test] = baseline_predicted
            run["baseline_seconds"] = round(baseline_run_seconds, 2)
            run["test"]["baseline"] = _scores(y[test], baseline_predicted)
        runs.append(run)
        logger.info("%stest macro F1 %.4f (baseline %s, constant %.4f) on %d cells",
                    f"fold {k + 1}: " if split.fold is not None else "", run["test"]["model"]["macro_f1"],
                    f"{run['test']['baseline']['macro_f1']:.4f}" if "baseline" in run["test"] else "not computed",
                    run["test"]["constant"]["macro_f1"], len(test))
        if run["best_val_macro_f1"] > best_val:
            best_net, best_val, saved_run = trained.net, run["best_val_macro_f1"], k
        else:
            del trained
    assert best_net is not None

    if not process.is_main:  # rank 0 writes
        barrier(process)
        return None
    metrics = _summary(runs)
    test_cells = np.flatnonzero(tested)
    wall = time.monotonic() - started
    base = base_all if features is not None else None
    timings = {"setup_seconds": round(setup_seconds, 2), "baseline_features_seconds": round(baseline_seconds, 2),
               "train_seconds": round(sum(r["train_seconds"] for r in runs), 2),
               "eval_seconds": round(sum(r["eval_seconds"] for r in runs), 2),
               "test_seconds": round(sum(r["test_seconds"] for r in runs), 2), "wall_seconds": round(wall, 1)}
    info = _info(settings, model, pre, corpus=corpus_of_run, classes=classes, dropped=dropped, label=label,
                 labels=labels, source=source, split=split, y=y, runs=runs, metrics=metrics, saved_run=saved_run,
                 n_seen=n_seen, n_test=len(test_cells), n_unlabeled=int((~labeled).sum()),
                 baseline_source=baseline_source,
                 n_genes=n_genes, timings=timings, device=torch_device,
                 precision=resolve_precision(settings.precision, torch_device),
                 config=best_net.config, processes={**process.to_dict(), "global_batch": trainer.global_batch,
                                                    "batch_size": settings.batch_size,
                                                    "grad_accum": settings.grad_accum,
                                                    "max_batch_tokens": settings.max_batch_tokens})
    predictions = _predictions_frame(obs, rows, y, classes, test=test_cells, probs=probs_all, base=base,
                                     fold=split.fold)
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.incomplete"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        _write_folder(tmp, best_net, tdict, info, name=out.name, predictions=predictions, runs=runs, classes=classes,
                      y=y, test=test_cells, probs=probs_all, base=base, const=const_all, obs=obs, rows=rows,
                      split=split, pre=pre, label=label)
        publish_folder(tmp, out)  # a previous classifier (--overwrite) is replaced, never seen half-gone
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        barrier(process)
    logger.info("classifier written to %s", out)
    return FinetuneResult(out, classes, metrics, predictions, info)


def _baseline_predictions(features: dict[str, Any], train: np.ndarray, test: np.ndarray, y: np.ndarray,
                          seed: int) -> np.ndarray:
    """evaluate's log1p → PCA(50) (fitted on the training cells) → standardize → logistic regression."""
    from threadpoolctl import threadpool_limits

    from genecorpus.model.evaluate import baseline_pca, make_classifier

    x, at = features["x"], features["at"]
    x_train, x_test = x[at[train]], x[at[test]]
    with threadpool_limits(limits=1, user_api="blas"):
        pca = baseline_pca(len(train), x.shape[1], seed)
        z_train = pca.fit_transform(x_train)
        clf = make_classifier("logreg", n_neighbors=15, n_train=len(train))
        clf.fit(z_train, y[train])
        return clf.predict(pca.transform(x_test)).astype(np.int64)


def _summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Test metrics per method: the split's, or the mean and SD (ddof = 1) over folds."""
    metrics: dict[str, dict[str, float]] = {}
    for method in METHODS:
        if method not in runs[0]["test"]:
            continue
        per = [r["test"][method] for r in runs]
        entry: dict[str, Any] = {"macro_f1": float(np.mean([p["macro_f1"] for p in per])),
                                 "accuracy": float(np.mean([p["accuracy"] for p in per])),
                                 "n_cells": int(sum(p["n_cells"] for p in per))}
        if len(runs) > 1:
            for metric in ("macro_f1", "accuracy"):
                values = np.array([p[metric] for p in per])
                entry[f"{metric}_sd"] = float(values.std(ddof=1))
                entry[f"{metric}_folds"] = [float(v) for v in values]
        metrics[method] = entry
    return metrics


def _info(settings: FinetuneSettings, model: Path, pre: _PretrainingCells, *,
          classes: tuple[str, ...], dropped: dict[str, int], label: str, labels: Any, source: str,
          split: LabeledSplit, y: np.ndarray, runs: list[dict[str, Any]],
          metrics: dict[str, Any], saved_run: int, n_seen: int | None, n_test: int, n_unlabeled: int,
          baseline_source: str | None, n_genes: int, timings: dict[str, float], device: torch.device,
          precision: str, config: Any, processes: dict[str, Any], corpus: dict[str, Any]) -> dict[str, Any]:
    import torch
    import transformers

    start_info = model_info(model)
    roles = split.roles[saved_run]
    per_class = {c: {ROLE_NAMES[r]: int(((y == i) & (roles == r)).sum()) for r in (TRAIN, VAL, TEST)}
                 for i, c in enumerate(classes)}
    if split.fold is not None:
        by = "folds"
    elif settings.hold_out_datasets:
        by = "datasets"
    else:
        by = "stratified"
    guard = {"status": pre.status,
             "restricted_test_to_pretraining_held_out": pre.status == "same_corpus"
             and settings.pretraining_cells == "restrict",
             "n_test_cells_seen_in_pretraining": n_seen, "pretraining_corpus": pre.record.get("corpus"),
             "pretraining_split": pre.record.get("split")}
    train_seconds = sum(r["train_seconds"] for r in runs)
    steps = sum(r["steps"] for r in runs)
    return {
        "kind": KIND, "label": label, "labels_csv": str(labels) if labels is not None else None,
        "classes": list(classes), "id2label": dict(enumerate(classes)),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(classes)},
        "dropped_classes": dropped, "n_unlabeled": n_unlabeled,
        "corpus": corpus,
        "architecture": {"layers": config.num_hidden_layers, "hidden": config.hidden_size,
                         "heads": config.num_attention_heads, "intermediate": config.intermediate_size,
                         "vocab_size": config.vocab_size, "max_positions": config.max_position_embeddings},
        "start_model": {"path": str(model.resolve()), "kind": start_info.get("kind", "pretrained" if start_info else
                                                                             "unknown (no genecorpus_model.json)"),
                        "preset": start_info.get("preset")},
        "pretraining": pre.record or None,
        "leakage_guard": guard,
        "split": {"by": by, "val_fraction": settings.val_fraction,
                  "test_fraction": None if by != "stratified" else settings.test_fraction,
                  "folds": settings.folds, "hold_out_datasets": list(settings.hold_out_datasets),
                  "seed": settings.seed, "saved_model_fold": saved_run if split.fold is not None else None,
                  "n_cells": {ROLE_NAMES[r]: int((roles == r).sum()) for r in (TRAIN, VAL, TEST)},
                  "n_test_cells_all_folds": n_test, "per_class": per_class},
        "settings": {**asdict(settings), "hold_out_datasets": list(settings.hold_out_datasets)},
        "pooling": "first token (BertForSequenceClassification's pooler: dense + tanh over the first position)",
        "training": {"runs": runs, "steps": steps, "device": str(device), "precision": precision,
                     "processes": processes,
                     "train_seconds": round(train_seconds, 2),
                     "steps_per_second": round(steps / train_seconds, 3) if train_seconds > 0 else None},
        "metrics": metrics,
        "baseline": {"source": baseline_source, "n_genes": n_genes,
                     "pipeline": "counts per 10000 -> log1p -> PCA(50) fitted on the training cells -> standardize "
                                 "-> logistic regression (as genecorpus evaluate)",
                     "train_cells": "the model's training cells (not its validation cells)"} if baseline_source
        else None,
        "constant": "the training cells' most frequent class, predicted for every test cell",
        "metric_definition": "macro F1 over the classes present among the test cells; accuracy over the test cells",
        "timings": timings,
        "source": source,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


def _predictions_frame(obs: pd.DataFrame, rows: np.ndarray, y: np.ndarray, classes: tuple[str, ...], *,
                       test: np.ndarray, probs: np.ndarray, base: np.ndarray | None,
                       fold: np.ndarray | None) -> pd.DataFrame:
    """The test cells in corpus order: ids, true and predicted class, each class's probability."""
    import pandas as pd

    names = np.array(classes, dtype=object)
    frame = pd.DataFrame({"corpus_row": rows[test]})
    for column in ("cell_id", "dataset_id"):
        if column in obs.columns:
            frame[column] = obs[column].to_numpy()[rows[test]]
    frame["true"] = names[y[test]]
    frame["predicted"] = names[probs[test].argmax(axis=1)]
    if base is not None:
        frame["baseline_predicted"] = names[base[test]]
    if fold is not None:
        frame["fold"] = fold[test]
    for i, c in enumerate(classes):
        frame[f"{PROBABILITY_PREFIX}{c}"] = probs[test, i]
    return frame


def _write_folder(tmp: Path, net: BertForSequenceClassification, tdict: TokenDictionary, info: dict[str, Any], *,
                  name: str, runs: list[dict[str, Any]], predictions: pd.DataFrame,
                  classes: tuple[str, ...], y: np.ndarray, test: np.ndarray, probs: np.ndarray,
                  base: np.ndarray | None, const: np.ndarray, obs: pd.DataFrame, rows: np.ndarray,
                  split: LabeledSplit, pre: _PretrainingCells, label: str) -> None:
    import pandas as pd
    from sklearn.metrics import precision_recall_fscore_support

    from genecorpus.model.bert import save_model
    from genecorpus.model.evaluate import confusion_figure

    tmp.mkdir()
    metrics = info["metrics"]
    save_model(net, tmp, tdict, info, name=name)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    n_folds = len(runs) if len(runs) > 1 else 0
    table = []
    for method, m in metrics.items():
        for metric in ("macro_f1", "accuracy"):
            row = {"method": method, "metric": metric, "value": m[metric], "sd": m.get(f"{metric}_sd"),
                   "n_cells": m["n_cells"]}
            row |= {f"fold_{k + 1}": runs[k]["test"][method][metric] for k in range(n_folds)}
            table.append(row)
    pd.DataFrame(table).to_csv(tmp / "metrics.csv", index=False)
    predicted = {"model": probs[test].argmax(axis=1), "constant": const[test]}
    if base is not None:
        predicted["baseline"] = base[test]
    per_class = []
    n = len(classes)
    for method in METHODS:
        if method not in predicted:
            continue
        p, r, f, support = precision_recall_fscore_support(y[test], predicted[method], labels=np.arange(n),
                                                           zero_division=0)
        per_class += [{"method": method, "class": c, "precision": float(p[i]), "recall": float(r[i]),
                       "f1": float(f[i]), "support": int(support[i])} for i, c in enumerate(classes)]
        if method == "constant":
            continue
        counts = np.bincount(y[test] * n + predicted[method], minlength=n * n).reshape(n, n)
        m = metrics[method]
        who = "fine-tuned model" if method == "model" else "baseline (log1p, PCA(50), logistic regression)"
        fig = confusion_figure(counts, classes, title=f"{label}: {who}, test macro F1 {m['macro_f1']:.3f}",
                               xlabel="predicted class" + (" (out of fold)" if n_folds else ""),
                               ylabel="true class (n = test cells)")
        fig.savefig(tmp / f"confusion_{method}.png", format="png", dpi=100, metadata={"Software": None})
    pd.DataFrame(per_class).to_csv(tmp / "per_class.csv", index=False)
    predictions.to_csv(tmp / "predictions.csv", index=False)
    all_rows = np.arange(len(obs))
    frame = pd.DataFrame({"corpus_row": all_rows})
    for column in ("cell_id", "dataset_id"):
        if column in obs.columns:
            frame[column] = obs[column].to_numpy()
    label_of = np.full(len(obs), "", dtype=object)
    label_of[rows] = np.array(classes, dtype=object)[y]
    frame["label"] = label_of
    role = np.full(len(obs), "excluded", dtype=object)
    saved = info["split"]["saved_model_fold"] or 0
    role[rows] = np.array([ROLE_NAMES[int(r)] for r in split.roles[saved]], dtype=object)
    frame["split"] = role
    if split.fold is not None:
        fold = np.full(len(obs), -1, dtype=np.int64)
        fold[rows] = split.fold
        frame["test_fold"] = fold
    if pre.seen is not None:
        frame["pretraining"] = np.where(pre.seen, "train", "held_out")
    frame.to_csv(tmp / "split.csv", index=False)


# ------------------------------------------------------------------------------------------------ predict


def predict_cells(
    corpus: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    max_length: int | None = None,
    device: str | None = None,
    precision: str = "auto",
    corpus_token_dictionary: str | os.PathLike[str] | None = None,
    cells: Sequence[int] | np.ndarray | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> pd.DataFrame:
    """Label cells of a corpus with a classifier written by :func:`finetune`.

    Parameters
    ----------
    corpus
        A corpus tokenized with the classifier's token dictionary (checked as ``embed`` checks it).
    model
        The classifier's folder.
    out
        A CSV to write (via a temporary sibling, renamed when complete).
    batch_size
        Cells per forward pass (memory and speed only).
    max_length
        Tokens per cell; default the classifier's training ``max_length`` (so its predictions are reproduced).
    cells
        Corpus rows to label (default all), in the order wanted.

    Returns
    -------
    One row per cell in the order of ``cells`` (default corpus order): ``corpus_row``, ``cell_id`` and
    ``dataset_id`` (when the corpus has them), ``predicted`` and ``prob_<class>`` (float32) per class.

    Raises
    ------
    InputError
        Not a classifier folder, or a corpus tokenized with another dictionary.
    """
    require_torch()
    quiet_transformers()
    from transformers import AutoConfig, BertForSequenceClassification

    from genecorpus.model.embed import open_corpus_for_model, select_rows

    model = Path(model)
    tdict, tdict_path = model_token_dictionary(model)
    config = AutoConfig.from_pretrained(model)
    if not any("SequenceClassification" in a for a in (config.architectures or [])):
        kind = ", ".join(config.architectures or ["model of unknown architecture"])
        msg = f"{model}: not a cell classifier (a {kind}); give a folder genecorpus finetune wrote"
        raise InputError(msg)
    if batch_size < 1:
        msg = f"--batch-size {batch_size}: must be at least 1"
        raise ConfigError(msg)
    reader = open_corpus_for_model(corpus, tdict, model_dictionary_path=tdict_path, model_name=str(model),
                                   corpus_token_dictionary=corpus_token_dictionary)
    trained_length = model_info(model).get("settings", {}).get("max_length")
    length = min(max_length or trained_length or config.max_position_embeddings, config.max_position_embeddings)
    rows = select_rows(reader, cells)
    with process_group(device) as (process, torch_device):  # under torchrun: each process scores its share
        resolved = resolve_precision(precision, torch_device)
        net = BertForSequenceClassification.from_pretrained(model, attn_implementation=ATTENTION).to(torch_device)
        probs = _probabilities(net, reader, tdict, rows, max_length=length, batch_size=batch_size,
                               precision=resolved, process=process, progress=progress)
        frame = _labelled_cells(reader, rows, probs, config)
        if out is not None and process.is_main:
            publish_file(Path(out), lambda tmp: frame.to_csv(tmp, index=False))
        barrier(process)
    return frame


def _labelled_cells(reader: CorpusReader, rows: np.ndarray, probs: np.ndarray, config: Any) -> pd.DataFrame:
    """``predict_cells``'s table: the rows, their cell and dataset ids, the predicted class, each class's
    probability."""
    import pandas as pd

    from genecorpus.model.embed import corpus_obs

    classes = [config.id2label[i] for i in range(config.num_labels)]
    obs = corpus_obs(reader, rows)
    frame = pd.DataFrame({"corpus_row": rows})
    for column in ("cell_id", "dataset_id"):
        if column in obs.columns:
            frame[column] = obs[column].to_numpy()
    frame["predicted"] = np.array(classes, dtype=object)[probs.argmax(axis=1)] if len(rows) else []
    for i, c in enumerate(classes):
        frame[f"{PROBABILITY_PREFIX}{c}"] = probs[:, i]
    return frame

