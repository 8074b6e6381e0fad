"""The model side: masked-gene pretraining, cell embeddings, evaluation and in-silico perturbation.

A product of its own on top of the corpus folder: it reads corpora through :mod:`genecorpus.corpus`
(and input counts, for the evaluation baseline, through :mod:`genecorpus.dataset`) and never imports
the builder. Needs the ``train`` extra (torch, transformers, scikit-learn), imported inside the functions
that use it, so that importing this package stays cheap.

==================== ==========================================================================
module               what it owns
==================== ==========================================================================
``bert``             presets (``tiny``, ``small``, ``gf-6l``), ``BertConfig``, the model folder, the device,
                     SDPA attention, ``autocast(device, precision)``
``card``             the model card (``README.md``, Hugging Face format) generated from the model info
``masking``          the masked-gene objective: which positions are masked and how
``sampling``         held-out split of whole datasets, the length-grouped sampler, a global batch's
                     micro-batches per process
``distributed``      which process am I (torchrun's variables), the process group, typed collectives
``rank_baseline``    the rank-position frequency baseline of masked-gene prediction
``pretrain``         the training loop (one process or several with DDP), checkpoints and ``--resume``
``embed``            cell embeddings of a corpus to ``.h5ad``
``perturb``          in-silico deletion and overexpression
``evaluate``         k-fold classifiers on embeddings beside the log1p → PCA(50) baseline
``finetune``         cell classifiers (``BertForSequenceClassification``) beside that baseline; ``predict``
==================== ==========================================================================
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from genecorpus.model.embed import embed_corpus
    from genecorpus.model.evaluate import EvaluationReport, evaluate_embeddings, write_evaluation
    from genecorpus.model.finetune import FinetuneResult, finetune, predict_cells
    from genecorpus.model.perturb import PerturbResult, perturb
    from genecorpus.model.pretrain import PretrainResult, pretrain

_LAZY = {
    "embed_corpus": "embed",
    "EvaluationReport": "evaluate", "evaluate_embeddings": "evaluate", "write_evaluation": "evaluate",
    "FinetuneResult": "finetune", "finetune": "finetune", "predict_cells": "finetune",
    "PerturbResult": "perturb", "perturb": "perturb",
    "PretrainResult": "pretrain", "pretrain": "pretrain",
}

__all__ = [
    "EvaluationReport",
    "FinetuneResult",
    "PerturbResult",
    "PretrainResult",
    "embed_corpus",
    "evaluate_embeddings",
    "finetune",
    "perturb",
    "predict_cells",
    "pretrain",
    "write_evaluation",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"genecorpus.model.{_LAZY[name]}"), name)
    msg = f"module 'genecorpus.model' has no attribute {name!r}"
    raise AttributeError(msg)
