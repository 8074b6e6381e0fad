"""The corpus folder: the one owner of its format, for the builder that writes it and everyone who reads it.

==================== ==========================================================================
module               what it owns
==================== ==========================================================================
``folder``           file names, :class:`CorpusFiles` (finding shards, manifest, dictionary), the
                     lengths file, the dictionaries in the folder, file digests
``manifest``         the run record ``manifest.json``: :class:`Manifest` and its per-dataset records
``shards``           the Arrow shards in HuggingFace ``save_to_disk`` layout, atomic publishing
``qc_sample``        ``report/qc_sample.npz``, the per-cell QC statistics the report draws
``reader``           :class:`CorpusReader`, random access to cells for training and inference
==================== ==========================================================================

The builder writes through this package; ``report``, ``validate``, ``inspect`` and the model package
read through it. It imports nothing of either.
"""

from __future__ import annotations

from genecorpus.corpus.folder import (
    LENGTHS,
    MANIFEST,
    REPORT_DIR,
    TOKEN_DICTIONARY,
    CorpusFiles,
    is_corpus_folder,
    read_lengths,
    sha256_of_path,
)
from genecorpus.corpus.manifest import DROP_REASONS, DatasetRecord, DepthSource, Manifest
from genecorpus.corpus.qc_sample import QCSample
from genecorpus.corpus.reader import CorpusReader
from genecorpus.corpus.shards import publish_file, publish_folder

__all__ = [
    "DROP_REASONS",
    "LENGTHS",
    "MANIFEST",
    "REPORT_DIR",
    "TOKEN_DICTIONARY",
    "CorpusFiles",
    "CorpusReader",
    "DatasetRecord",
    "DepthSource",
    "Manifest",
    "QCSample",
    "is_corpus_folder",
    "publish_file",
    "publish_folder",
    "read_lengths",
    "sha256_of_path",
]
