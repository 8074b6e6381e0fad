"""Read a corpus back — ours or the published Genecorpus-30M format — and describe it.

A corpus is a HuggingFace ``save_to_disk`` folder (``state.json`` + Arrow stream shards) or parquet
files. Only the ``input_ids`` and ``length`` columns are required; the token dictionary comes from the
folder (``token_dictionary.pkl``) or is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from genecorpus.errors import InputError
from genecorpus.vocab import TokenDictionary, load_lengths_file

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["CorpusFiles", "describe_corpus", "iter_corpus_batches"]


@dataclass(frozen=True)
class CorpusFiles:
    """Where a corpus's rows and dictionaries are."""

    root: Path
    shards: tuple[Path, ...]
    kind: str
    """``"arrow"`` (save_to_disk folder) or ``"parquet"``."""
    manifest: dict[str, Any] | None
    token_dictionary: Path | None

    @classmethod
    def locate(cls, path: str | os.PathLike[str], token_dictionary: str | os.PathLike[str] | None = None) -> CorpusFiles:
        """Find the shards of a corpus folder, a parquet file or a folder of parquet files."""
        root = Path(path)
        if not root.exists():
            msg = f"{root}: no such corpus; give a folder written by genecorpus or parquet files"
            raise InputError(msg)
        if root.is_file() and root.suffix == ".parquet":
            shards, kind, folder = (root,), "parquet", root.parent
        elif (root / "state.json").exists():
            state = json.loads((root / "state.json").read_text())
            shards = tuple(root / f["filename"] for f in state["_data_files"])
            kind, folder = "arrow", root
        else:
            shards = tuple(sorted(root.glob("*.parquet")))
            kind, folder = "parquet", root
            if not shards:
                msg = f"{root}: neither a save_to_disk folder (state.json) nor parquet files; check the path"
                raise InputError(msg)
        manifest_path = folder / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
        tdict = Path(token_dictionary) if token_dictionary else folder / "token_dictionary.pkl"
        return cls(folder, shards, kind, manifest, tdict if tdict.exists() else None)


def iter_corpus_batches(files: CorpusFiles, columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream the corpus's record batches in row order."""
    for shard in files.shards:
        if files.kind == "arrow":
            # a file, not a memory map: the resident set stays one batch, not the whole corpus
            with pa.OSFile(str(shard)) as src, pa.ipc.open_stream(src) as reader:
                for batch in reader:
                    yield batch.select(columns) if columns else batch
        else:
            yield from pq.ParquetFile(shard).iter_batches(columns=columns)


def _symbols() -> dict[str, str]:
    from genecorpus.genes import load_gene_table

    table = load_gene_table("gencode48")
    return dict(zip(table["ensembl_id"], table["symbol"], strict=True))


def describe_corpus(
    path: str | os.PathLike[str],
    *,
    token_dictionary: str | os.PathLike[str] | None = None,
    n_examples: int = 1,
    scan: bool = True,
) -> str:
    """A human-readable summary: totals, lengths, per-dataset table and decoded example cells.

    ``scan=False`` (the summary printed after a build) takes the lengths from the corpus's lengths
    file instead of reading every shard, and reads only the first cells.
    """
    files = CorpusFiles.locate(path, token_dictionary)
    lengths_parts = []
    first_cells: list[np.ndarray] = []
    n_tokens_max = 0
    dtype = None
    lengths_file = files.root / "lengths.pkl"
    if not scan and files.manifest is not None and lengths_file.is_file():
        lengths_parts.append(np.asarray(load_lengths_file(lengths_file), dtype=np.int64))
    for batch in iter_corpus_batches(files, ["input_ids", "length"]):
        if lengths_parts and not scan:
            ids = batch.column("input_ids")
            dtype = ids.type.value_type
            first_cells.extend(np.array(ids[i].values) for i in range(min(n_examples, len(batch))))
            break
        # copies: a view would keep the whole batch (all its columns) alive
        lengths_parts.append(np.array(batch.column("length").to_numpy(), dtype=np.int64))
        ids = batch.column("input_ids")
        dtype = ids.type.value_type
        if len(first_cells) < n_examples:
            for i in range(min(n_examples - len(first_cells), len(batch))):
                first_cells.append(np.array(ids[i].values))
        if len(ids.values):
            n_tokens_max = max(n_tokens_max, int(pa.compute.max(ids.values).as_py()))
    lengths = np.concatenate(lengths_parts) if lengths_parts else np.empty(0, np.int64)
    lines = [f"corpus: {files.root} ({files.kind}, {len(files.shards)} shard(s), input_ids {dtype})",
             f"cells: {len(lengths):,}   tokens: {int(lengths.sum()):,}"
             + (f"   largest token id: {n_tokens_max}" if n_tokens_max else "")]
    if len(lengths):
        q = np.percentile(lengths, [0, 50, 100])
        lines.append(f"length: min {q[0]:.0f}  median {q[1]:.0f}  max {q[2]:.0f}  mean {lengths.mean():.1f}")
    m = files.manifest
    if m:
        lines.append(f"layout: {m['corpus']['layout']}   vocabulary: {m['vocabulary']['n_genes']:,} genes   "
                     f"medians: {m['medians']['source']}")
        lines.append("")
        lines.append(f"{'dataset':<28}{'in':>9}{'kept':>9}  dropped by reason")
        for d in m["datasets"]:
            dropped = ", ".join(f"{k} {v}" for k, v in d["cells"]["dropped"].items() if v) or "none"
            lines.append(f"{d['dataset_id']:<28}{d['cells']['in']:>9,}{d['cells']['kept']:>9,}  {dropped}")
    if first_cells:
        if files.token_dictionary is None:
            lines.append("\n(no token dictionary: pass --token-dictionary to decode cells)")
        else:
            tdict = TokenDictionary.load(files.token_dictionary)
            names = {v: k for k, v in tdict.to_mapping().items()}
            symbols = _symbols()
            for n, cell in enumerate(first_cells):
                genes = [names.get(int(t), f"?{t}") for t in cell[:20]]
                shown = " ".join(symbols.get(g, g) for g in genes)
                lines.append(f"\ncell {n} ({len(cell)} tokens), top genes: {shown}{' …' if len(cell) > 20 else ''}")
    return "\n".join(lines)
