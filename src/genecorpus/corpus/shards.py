"""Arrow shards in HuggingFace ``save_to_disk`` layout, streamed and published atomically.

Each encoding task streams its cells into its own part file (Arrow IPC stream, record batches of a fixed
number of rows, so batch boundaries do not depend on the read block size); :func:`publish_shards`
renames the non-empty parts to ``data-XXXXX-of-NNNNN.arrow`` in task order and writes ``state.json`` and
``dataset_info.json``. Only this module decides shard names and their metadata.

The schema's ``huggingface`` metadata names list features ``Sequence``, which every ``datasets`` release
reads (Geneformer pins old ones; the published Genecorpus-30M uses the same).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from genecorpus.corpus.folder import DATASET_INFO, STATE

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = [
    "ROWS_PER_BATCH", "ColumnSpec", "ShardWriter", "corpus_schema", "publish_file", "publish_folder", "publish_shards",
]

ROWS_PER_BATCH = 1000
"""Rows per Arrow record batch (HuggingFace's default writer batch size)."""

_ARROW_TO_HF = {
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.string(): "string",
}


@dataclass(frozen=True)
class ColumnSpec:
    """A metadata column of the corpus: name and Arrow type (string, int64, float64 or bool)."""

    name: str
    type: pa.DataType


def corpus_schema(token_type: pa.DataType, metadata: Sequence[ColumnSpec]) -> pa.Schema:
    """The corpus schema: ``input_ids``, metadata columns in order, ``length`` — with HF features."""
    fields = [pa.field("input_ids", pa.list_(token_type))]
    fields += [pa.field(c.name, c.type) for c in metadata]
    fields.append(pa.field("length", pa.int64()))
    features: dict[str, Any] = {
        "input_ids": {"feature": {"dtype": _ARROW_TO_HF[token_type], "_type": "Value"},
                      "_type": "Sequence"},
    }
    for c in metadata:
        features[c.name] = {"dtype": _ARROW_TO_HF[c.type], "_type": "Value"}
    features["length"] = {"dtype": "int64", "_type": "Value"}
    meta = {"huggingface": json.dumps({"info": {"features": features}}, separators=(", ", ": "))}
    return pa.schema(fields, metadata=meta)


class ShardWriter:
    """Streams rows into one Arrow IPC stream file, in record batches of :data:`ROWS_PER_BATCH` rows."""

    def __init__(self, path: str | os.PathLike[str], schema: pa.Schema) -> None:
        self.path = Path(path)
        self.schema = schema
        # unique: a task rerun after its worker was lost must not share a file with the lost attempt
        self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        self._sink = pa.OSFile(str(self._tmp), "wb")
        self._writer = pa.ipc.new_stream(self._sink, schema)
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.n_rows = 0

    def write(self, tokens: np.ndarray, lengths: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Append cells: flat ``tokens``, per-cell ``lengths`` (int64) and metadata column arrays."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        token_type = self.schema.field("input_ids").type.value_type
        ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(tokens, type=token_type))
        arrays = [ids]
        for f in self.schema:
            if f.name in ("input_ids", "length"):
                continue
            arrays.append(pa.array(columns[f.name], type=f.type, from_pandas=True))
        arrays.append(pa.array(lengths, type=pa.int64()))
        batch = pa.RecordBatch.from_arrays(arrays, schema=self.schema)
        self._pending.append(batch)
        self._pending_rows += batch.num_rows
        self.n_rows += batch.num_rows
        while self._pending_rows >= ROWS_PER_BATCH:
            self._flush(ROWS_PER_BATCH)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending, schema=self.schema)
        head, rest = table.slice(0, rows), table.slice(rows)
        # a copy, never a slice: a slice keeps its parent's buffers, and the IPC writer pads a list column's
        # values by where the slice starts, so the bytes would depend on how the rows arrived (block size)
        written = head.take(pa.array(np.arange(rows, dtype=np.int64))).combine_chunks()
        self._writer.write_batch(written.to_batches()[0])
        self._pending = rest.combine_chunks().to_batches() if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        """Flush the last partial batch and move the file into place."""
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._sink.close()
        self._tmp.replace(self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._writer.close()
        self._sink.close()
        self._tmp.unlink(missing_ok=True)


def publish_shards(
    folder: Path, parts: Sequence[tuple[Path, int]], schema: pa.Schema, fingerprint: str,
    *, journal: Callable[[list[tuple[Path, str]]], None] | None = None,
) -> list[str]:
    """Move non-empty part files to ``folder/data-XXXXX-of-NNNNN.arrow`` in the given order; write HF metadata.

    ``parts`` holds (path, number of rows) in corpus order; empty parts stay where they are. ``journal``
    is told every (part, shard name) move before the first one. Returns the shard file names. An
    all-empty corpus still gets one (empty) shard so that ``datasets.load_from_disk`` opens it.
    """
    nonempty = [p for p, n in parts if n > 0]
    if not nonempty and parts:
        nonempty = [parts[0][0]]
    names = [f"data-{i:05d}-of-{len(nonempty):05d}.arrow" for i in range(len(nonempty))]
    moves = list(zip(nonempty, names, strict=True))
    if journal is not None:
        journal(moves)
    for part, name in moves:
        part.replace(folder / name)
    state = {
        "_data_files": [{"filename": n} for n in names],
        "_fingerprint": hashlib.sha256(fingerprint.encode()).hexdigest()[:16],
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (folder / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (folder / DATASET_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return names


def publish_file(final: Path, write: Callable[[Path], object], *, suffix: str = "") -> Path:
    """Write a file through ``write(tmp)`` into a hidden sibling of ``final``, then rename it into place: readers
    see the old file or the whole new one, and a failed write leaves nothing behind.

    Parameters
    ----------
    final
        The file to write (its folder is created).
    write
        Writes the file's content to the path it is given.
    suffix
        Ending of the temporary name, for writers that require one (``".h5ad"`` for anndata).

    Returns
    -------
    ``final``.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.incomplete{suffix}")
    try:
        write(tmp)
        tmp.replace(final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def publish_folder(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing one is replaced, never seen half-written."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
