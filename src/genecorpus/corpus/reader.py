"""Random access to a corpus's cells, for training and inference.

Opens what :class:`~genecorpus.corpus.folder.CorpusFiles` locates — a genecorpus folder, any HuggingFace
``save_to_disk`` folder with ``input_ids``, or parquet files such as the published Genecorpus-30M — and
hands out cells by row number. Arrow shards are memory-mapped (zero copy: the resident set is what is
read); parquet files are decoded once into Arrow memory. Lengths come from ``lengths.pkl``, else from the
``length`` column, else from the list offsets, as NumPy arrays, never as Python objects per cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genecorpus.corpus.folder import CorpusFiles, read_lengths
from genecorpus.errors import InputError

if TYPE_CHECKING:
    import os

    import pandas as pd

    from genecorpus.vocab import TokenDictionary

__all__ = ["CorpusReader"]


@dataclass(frozen=True)
class _Chunk:
    start: int
    """First row of the chunk in the corpus."""
    offsets: np.ndarray
    """``input_ids`` list offsets of the chunk (int32 or int64, length rows + 1)."""
    values: np.ndarray
    """The chunk's flat token ids (int16/int32/int64, a view of the mapped file)."""


class CorpusReader:
    """Cells of a corpus by row number: token ids, lengths, metadata and the token dictionary.

    Use :meth:`open`. Row numbers are positions in the corpus's row order (shard after shard).
    """

    def __init__(self, files: CorpusFiles, table: pa.Table, token_dictionary: TokenDictionary,
                 lengths: np.ndarray) -> None:
        self.files = files
        self.table = table
        self.token_dictionary = token_dictionary
        self.lengths = lengths
        """Tokens per cell (int64), special tokens included."""
        self._chunks = self._index(table)
        self._starts = np.array([c.start for c in self._chunks], dtype=np.int64)

    @classmethod
    def open(cls, path: str | os.PathLike[str],
             token_dictionary: str | os.PathLike[str] | None = None) -> CorpusReader:
        """Open a corpus folder or parquet file(s).

        Parameters
        ----------
        path
            A genecorpus corpus folder, a ``save_to_disk`` folder, a parquet file or a folder of them.
        token_dictionary
            The token dictionary pickle, if the folder has no ``token_dictionary.pkl`` (the published
            Genecorpus-30M needs Geneformer's ``token_dictionary_gc30M.pkl``).

        Raises
        ------
        InputError
            No such corpus, no ``input_ids`` column, or no token dictionary.
        """
        files = CorpusFiles.locate(path, token_dictionary)
        dictionary = files.load_token_dictionary()
        tables = []
        for shard in files.shards:
            try:
                if files.kind == "arrow":
                    with pa.ipc.open_stream(pa.memory_map(str(shard))) as reader:
                        tables.append(reader.read_all())
                else:
                    tables.append(pq.read_table(shard, memory_map=True))
            except (OSError, pa.ArrowInvalid) as e:
                msg = f"{shard}: not a readable corpus shard ({e}); rebuild or re-download it"
                raise InputError(msg) from None
        if not tables or "input_ids" not in tables[0].column_names:
            msg = f"{files.root}: no input_ids column; give a tokenized corpus"
            raise InputError(msg)
        table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        lengths = cls._lengths(files, table)
        return cls(files, table, dictionary, lengths)

    @staticmethod
    def _lengths(files: CorpusFiles, table: pa.Table) -> np.ndarray:
        if files.manifest is not None and files.lengths_file.is_file():
            lengths = read_lengths(files.lengths_file)
            if len(lengths) == table.num_rows:
                return lengths
        if "length" in table.column_names:
            return table.column("length").to_numpy().astype(np.int64)
        parts = [np.diff(np.asarray(c.offsets)) for c in table.column("input_ids").chunks]
        return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)

    @staticmethod
    def _index(table: pa.Table) -> list[_Chunk]:
        chunks, start = [], 0
        for chunk in table.column("input_ids").chunks:
            if isinstance(chunk, pa.ChunkedArray):  # pragma: no cover - defensive
                chunk = chunk.combine_chunks()
            offsets = np.asarray(chunk.offsets)
            values = np.asarray(chunk.values)
            chunks.append(_Chunk(start, offsets, values))
            start += len(chunk)
        return chunks

    # ---- cells

    @property
    def n_cells(self) -> int:
        """Rows of the corpus."""
        return self.table.num_rows

    @property
    def columns(self) -> list[str]:
        """Metadata columns (everything but ``input_ids``)."""
        return [c for c in self.table.column_names if c != "input_ids"]

    def input_ids(self, row: int) -> np.ndarray:
        """Token ids of one cell (a read-only view; int16, int32 or int64 as stored)."""
        k = int(np.searchsorted(self._starts, row, side="right")) - 1
        if row < 0 or row >= self.n_cells or k < 0:
            msg = f"row {row} is outside the corpus (0..{self.n_cells - 1})"
            raise IndexError(msg)
        c = self._chunks[k]
        i = row - c.start
        return c.values[c.offsets[i]:c.offsets[i + 1]]

    def batch(self, rows: np.ndarray | list[int]) -> list[np.ndarray]:
        """Token ids of several cells, in the order given."""
        return [self.input_ids(int(r)) for r in rows]

    def column(self, name: str) -> np.ndarray:
        """One metadata column as a NumPy array (object dtype for strings)."""
        if name not in self.table.column_names or name == "input_ids":
            msg = f"{self.files.root}: no column {name!r}; the corpus has {', '.join(self.columns)}"
            raise InputError(msg)
        return self.table.column(name).to_numpy(zero_copy_only=False)

    def obs(self, columns: list[str] | None = None) -> pd.DataFrame:
        """Metadata columns (default: all but ``input_ids``) as a DataFrame, one row per cell."""
        import pandas as pd

        names = self.columns if columns is None else columns
        return pd.DataFrame({n: self.column(n) for n in names})

    def dataset_ids(self) -> np.ndarray | None:
        """The ``dataset_id`` column, or None if the corpus has none (e.g. the published one)."""
        return self.column("dataset_id") if "dataset_id" in self.table.column_names else None

    def describe(self) -> dict[str, Any]:
        """A few facts for logs: cells, tokens, shards, vocabulary size."""
        return {"path": str(self.files.root), "n_cells": self.n_cells, "n_tokens": int(self.lengths.sum()),
                "n_shards": len(self.files.shards), "vocab_size": len(self.token_dictionary.to_mapping())}
