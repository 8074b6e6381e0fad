"""The corpus folder: its file names, finding its shards, its lengths file, dictionaries and digests.

A corpus folder, as ``build`` and ``tokenize`` write it::

    data-XXXXX-of-NNNNN.arrow   the cells (see :mod:`genecorpus.corpus.shards`)
    state.json                  HuggingFace ``save_to_disk`` state (the shard list)
    dataset_info.json           HuggingFace features
    token_dictionary.pkl        Geneformer-compatible ``{token: id}``
    gene_medians.tsv            ``ensembl_id<TAB>median``, exact float64 ``repr``
    gene_medians.pkl            the same medians as Geneformer's pickle
    lengths.pkl                 tokens per cell, a pickled list of int (Geneformer's lengths file)
    manifest.json               the run record (:class:`~genecorpus.corpus.manifest.Manifest`)
    report/                     ``index.html``, its PNGs, and ``qc_sample.npz``

:class:`CorpusFiles` also opens folders genecorpus did not write: any ``save_to_disk`` folder with
``input_ids``, and parquet files such as the published Genecorpus-30M (no manifest, dictionary given).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genecorpus.corpus.manifest import Manifest
from genecorpus.errors import InputError
from genecorpus.vocab import TokenDictionary, unpickle_restricted, write_gene_medians

if TYPE_CHECKING:
    import os
    import threading
    from collections.abc import Iterator, Mapping

__all__ = [
    "CORPUS_MARKERS", "DATASET_INFO", "GENE_MEDIANS_PKL", "GENE_MEDIANS_TSV", "LENGTHS", "MANIFEST", "QC_SAMPLE",
    "RECORDED_FILES", "REPORT_DIR", "STATE", "TOKEN_DICTIONARY", "CorpusFiles", "file_digests", "is_corpus_folder",
    "read_lengths", "sha256_of_path", "write_dictionaries", "write_lengths",
]

MANIFEST = "manifest.json"
STATE = "state.json"
DATASET_INFO = "dataset_info.json"
TOKEN_DICTIONARY = "token_dictionary.pkl"
GENE_MEDIANS_TSV = "gene_medians.tsv"
GENE_MEDIANS_PKL = "gene_medians.pkl"
LENGTHS = "lengths.pkl"
REPORT_DIR = "report"
QC_SAMPLE = "qc_sample.npz"
"""In :data:`REPORT_DIR`: per-cell QC statistics of a fixed sample of cells (see :mod:`genecorpus.corpus.qc_sample`)."""

RECORDED_FILES = (TOKEN_DICTIONARY, GENE_MEDIANS_TSV, GENE_MEDIANS_PKL, LENGTHS)
"""Files beside the shards whose sha256 the manifest records under ``files``."""
CORPUS_MARKERS = (MANIFEST, STATE)
"""Files that make a folder a corpus (which ``--overwrite`` may replace)."""


def is_corpus_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a corpus (a manifest or a ``save_to_disk`` state), not other files."""
    return any((folder / name).is_file() for name in CORPUS_MARKERS)


@dataclass(frozen=True)
class CorpusFiles:
    """Where a corpus's rows, run record and dictionaries are."""

    root: Path
    """The folder (for a single parquet file, its folder)."""
    shards: tuple[Path, ...]
    """Row files in corpus order."""
    kind: Literal["arrow", "parquet"]
    """Arrow IPC stream shards of a ``save_to_disk`` folder, or parquet files."""
    manifest: Manifest | None
    """The run record; None for corpora genecorpus did not write."""
    token_dictionary: Path | None
    """The token dictionary given, else the folder's, else None."""

    @classmethod
    def locate(cls, path: str | os.PathLike[str],
               token_dictionary: str | os.PathLike[str] | None = None) -> CorpusFiles:
        """Find the shards, manifest and dictionary of a corpus folder, a parquet file or a folder of them.

        Raises
        ------
        InputError
            No such path, no shards in it, or a manifest that cannot be read.
        """
        root = Path(path)
        if not root.exists():
            msg = f"{root}: no such corpus; give a folder written by genecorpus or parquet files"
            raise InputError(msg)
        kind: Literal["arrow", "parquet"]
        if root.is_file() and root.suffix == ".parquet":
            shards, kind, folder = (root,), "parquet", root.parent
        elif (root / STATE).exists():
            state = json.loads((root / STATE).read_text())
            shards = tuple(root / f["filename"] for f in state["_data_files"])
            kind, folder = "arrow", root
        else:
            shards = tuple(sorted(root.glob("*.parquet")))
            kind, folder = "parquet", root
            if not shards:
                msg = f"{root}: neither a save_to_disk folder (state.json) nor parquet files; check the path"
                raise InputError(msg)
        manifest = Manifest.read(folder / MANIFEST) if (folder / MANIFEST).exists() else None
        tdict = Path(token_dictionary) if token_dictionary else folder / TOKEN_DICTIONARY
        return cls(folder, shards, kind, manifest, tdict if tdict.exists() else None)

    @property
    def lengths_file(self) -> Path:
        """``lengths.pkl`` (it may not exist)."""
        return self.root / LENGTHS

    @property
    def gene_medians_files(self) -> tuple[Path, Path]:
        """``gene_medians.tsv`` and ``gene_medians.pkl`` (they may not exist)."""
        return self.root / GENE_MEDIANS_TSV, self.root / GENE_MEDIANS_PKL

    @property
    def qc_sample_file(self) -> Path:
        """``report/qc_sample.npz`` (it may not exist)."""
        return self.root / REPORT_DIR / QC_SAMPLE

    def load_token_dictionary(self) -> TokenDictionary:
        """The token dictionary.

        Raises
        ------
        InputError
            The corpus has none and none was given.
        """
        if self.token_dictionary is None:
            msg = (f"{self.root}: has no {TOKEN_DICTIONARY}; pass the corpus's token dictionary "
                   "(e.g. --token-dictionary token_dictionary_gc30M.pkl)")
            raise InputError(msg)
        return TokenDictionary.load(self.token_dictionary)

    def iter_batches(self, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream the corpus's record batches in row order (one batch resident at a time)."""
        for shard in self.shards:
            if self.kind == "arrow":
                # a file, not a memory map: the resident set stays one batch, not the whole corpus
                with pa.OSFile(str(shard)) as src, pa.ipc.open_stream(src) as reader:
                    for batch in reader:
                        yield batch.select(columns) if columns else batch
            else:
                yield from pq.ParquetFile(shard).iter_batches(columns=columns)


# ------------------------------------------------------------------------------------- lengths file


def write_lengths(folder: Path, lengths: np.ndarray) -> None:
    """Write ``lengths.pkl``: tokens per cell as a pickled list of int (Geneformer's lengths file)."""
    with (folder / LENGTHS).open("wb") as fh:
        pickle.dump(np.asarray(lengths).tolist(), fh, protocol=4)


def read_lengths(path: str | os.PathLike[str]) -> np.ndarray:
    """A lengths file (a pickled list of ints) as int64, through the restricted unpickler.

    Raises
    ------
    InputError
        The file is missing, or is not a pickled list of ints (the message says which).
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: missing; the corpus folder is incomplete, rebuild it"
        raise InputError(msg)
    try:
        values = unpickle_restricted(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        reason = " ".join(str(e).split())
        msg = f"{path}: not a pickled list of lengths ({reason}); rebuild the corpus"
        raise InputError(msg) from None
    if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        msg = f"{path}: not a pickled list of int lengths; rebuild the corpus"
        raise InputError(msg)
    try:
        return np.array(values, dtype=np.int64)
    except OverflowError:
        msg = f"{path}: holds lengths beyond int64; rebuild the corpus"
        raise InputError(msg) from None


# ------------------------------------------------------------------------------------- dictionaries


def write_dictionaries(folder: Path, token_dictionary: TokenDictionary, gene_medians: Mapping[str, float]) -> None:
    """Write ``token_dictionary.pkl`` and the medians (``gene_medians.tsv`` and ``.pkl``) into ``folder``."""
    token_dictionary.save(folder / TOKEN_DICTIONARY)
    write_gene_medians(dict(gene_medians), folder / GENE_MEDIANS_TSV, folder / GENE_MEDIANS_PKL)


# ------------------------------------------------------------------------------------------ digests


def sha256_of_path(path: str | os.PathLike[str], *, stop: threading.Event | None = None) -> tuple[str, int]:
    """The sha256 (hex) and size in bytes of a file, or of a folder (such as a 10x matrix folder).

    A folder's digest is the sha256 of the lines ``relative/path<NUL>file digest``, one per file in
    sorted order, so that it does not depend on the order in which the file system lists them; its size
    is the sum of its files' sizes. Setting ``stop`` (from another thread) abandons the digest early.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = pathlib.Path(tmp, "a.txt")
    ...     _ = p.write_text("abc")
    ...     sha256_of_path(p)[0][:16], sha256_of_path(p)[1]
    ('ba7816bf8f01cfea', 3)
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        size = 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            digest, n = sha256_of_path(p, stop=stop)
            h.update(f"{p.relative_to(path)}\0{digest}\n".encode())
            size += n
        return h.hexdigest(), size
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while (n := fh.readinto(buf)) and not (stop is not None and stop.is_set()):
            h.update(view[:n])  # releases the GIL: other threads run meanwhile
    return h.hexdigest(), path.stat().st_size


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each of :data:`RECORDED_FILES` present in ``folder`` (a corpus being written)."""
    return {name: sha256_of_path(folder / name)[0] for name in RECORDED_FILES if (folder / name).is_file()}
