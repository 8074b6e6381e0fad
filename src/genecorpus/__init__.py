"""genecorpus: Genecorpus-style rank-value-encoded single-cell corpora, built fast and exactly.

The public API, one name per command and the types they take and return::

    from genecorpus import build_corpus, load_manifest, validate_corpus
    config = load_manifest("corpus.toml")
    result = build_corpus(config, "out/corpus", workers=2)   # result.manifest: the typed run record
    report = validate_corpus("out/corpus")

=============================== ==================================================================
command                         function
=============================== ==================================================================
``genecorpus build``            :func:`build_corpus` (with :func:`load_manifest`)
``genecorpus tokenize``         :func:`tokenize`
``genecorpus inspect``          :func:`describe_corpus`
``genecorpus report``           :func:`write_report`
``genecorpus validate``         :func:`validate_corpus`
``genecorpus pretrain``         :func:`pretrain` (``train`` extra)
``genecorpus embed``            :func:`embed_corpus` (``train`` extra)
``genecorpus evaluate``         :func:`evaluate_embeddings` (``train`` extra)
``genecorpus perturb``          :func:`perturb` (``train`` extra)
``genecorpus finetune``         :func:`finetune` (``train`` extra)
``genecorpus predict``          :func:`predict_cells` (``train`` extra)
=============================== ==================================================================

Everything else is internal; the packages :mod:`genecorpus.io`, :mod:`genecorpus.corpus` and
:mod:`genecorpus.model` have public surfaces of their own for readers, the corpus folder and models.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from genecorpus.errors import GenecorpusError

if TYPE_CHECKING:
    from genecorpus.build import BuildResult, build_corpus, tokenize
    from genecorpus.config import BuildConfig, DatasetSpec, QCParams, load_manifest
    from genecorpus.corpus import CorpusReader, Manifest
    from genecorpus.describe import describe_corpus
    from genecorpus.encode import rank_value_encode
    from genecorpus.io import open_dataset
    from genecorpus.model.embed import embed_corpus
    from genecorpus.model.evaluate import EvaluationReport, evaluate_embeddings
    from genecorpus.model.finetune import FinetuneResult, finetune, predict_cells
    from genecorpus.model.perturb import PerturbResult, perturb
    from genecorpus.model.pretrain import PretrainResult, pretrain
    from genecorpus.report import write_report
    from genecorpus.validate import ValidationReport, validate_corpus
    from genecorpus.vocab import TokenDictionary, load_gene_medians

# Imported on first use, so that `import genecorpus.vocab` or the CLI's --help stay fast; the model
# modules import torch only inside their functions.
_LAZY = {
    "BuildResult": "build", "build_corpus": "build", "tokenize": "build",
    "BuildConfig": "config", "DatasetSpec": "config", "QCParams": "config", "load_manifest": "config",
    "CorpusReader": "corpus", "Manifest": "corpus",
    "describe_corpus": "describe",
    "rank_value_encode": "encode",
    "open_dataset": "io",
    "embed_corpus": "model.embed",
    "EvaluationReport": "model.evaluate", "evaluate_embeddings": "model.evaluate",
    "FinetuneResult": "model.finetune", "finetune": "model.finetune", "predict_cells": "model.finetune",
    "PerturbResult": "model.perturb", "perturb": "model.perturb",
    "PretrainResult": "model.pretrain", "pretrain": "model.pretrain",
    "write_report": "report",
    "ValidationReport": "validate", "validate_corpus": "validate",
    "TokenDictionary": "vocab", "load_gene_medians": "vocab",
}

__version__ = "0.1.0"

__all__ = [
    "BuildConfig",
    "BuildResult",
    "CorpusReader",
    "DatasetSpec",
    "EvaluationReport",
    "FinetuneResult",
    "GenecorpusError",
    "Manifest",
    "PerturbResult",
    "PretrainResult",
    "QCParams",
    "TokenDictionary",
    "ValidationReport",
    "__version__",
    "build_corpus",
    "describe_corpus",
    "embed_corpus",
    "evaluate_embeddings",
    "finetune",
    "load_gene_medians",
    "load_manifest",
    "open_dataset",
    "perturb",
    "predict_cells",
    "pretrain",
    "rank_value_encode",
    "tokenize",
    "validate_corpus",
    "write_report",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"genecorpus.{_LAZY[name]}"), name)
    msg = f"module 'genecorpus' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
