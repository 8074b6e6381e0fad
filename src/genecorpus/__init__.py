"""genecorpus: Genecorpus-style rank-value-encoded single-cell corpora, built fast and exactly.

The public API::

    from genecorpus import BuildConfig, DatasetSpec, build_corpus, load_manifest, validate_corpus
    config = load_manifest("corpus.toml")
    result = build_corpus(config, "out/corpus", workers=2)
    report = validate_corpus("out/corpus")
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from genecorpus.errors import GenecorpusError

if TYPE_CHECKING:
    from genecorpus.build import BuildResult, build_corpus, tokenize
    from genecorpus.config import BuildConfig, DatasetSpec, QCParams, load_manifest
    from genecorpus.model.embed import embed_corpus
    from genecorpus.encode import rank_value_encode
    from genecorpus.io import open_dataset
    from genecorpus.model.perturb import PerturbResult, perturb
    from genecorpus.validate import ValidationReport, validate_corpus
    from genecorpus.vocab import TokenDictionary, load_gene_medians

# Imported on first use, so that `import genecorpus.vocab` or the CLI's --help stay fast.
_LAZY = {
    "BuildResult": "build", "build_corpus": "build", "tokenize": "build",
    "BuildConfig": "config", "DatasetSpec": "config", "QCParams": "config", "load_manifest": "config",
    "rank_value_encode": "encode", "open_dataset": "io",
    "TokenDictionary": "vocab", "load_gene_medians": "vocab",
    "ValidationReport": "validate", "validate_corpus": "validate",
    # model commands: these modules import torch only inside their functions
    "embed_corpus": "model.embed", "PerturbResult": "model.perturb", "perturb": "model.perturb",
}

__version__ = "0.1.0"

__all__ = [
    "BuildConfig",
    "BuildResult",
    "DatasetSpec",
    "GenecorpusError",
    "PerturbResult",
    "QCParams",
    "TokenDictionary",
    "ValidationReport",
    "__version__",
    "build_corpus",
    "embed_corpus",
    "load_gene_medians",
    "load_manifest",
    "open_dataset",
    "perturb",
    "rank_value_encode",
    "tokenize",
    "validate_corpus",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:  # noqa: ANN401
    if name in _LAZY:
        return getattr(importlib.import_module(f"genecorpus.{_LAZY[name]}"), name)
    msg = f"module 'genecorpus' has no attribute {name!r}"
    raise AttributeError(msg)
