"""A corpus described for people: totals, lengths, per-dataset cells and decoded example cells.

Reads any corpus :class:`~genecorpus.corpus.folder.CorpusFiles` finds — ours, or the published
Genecorpus-30M parquet files (only ``input_ids`` and ``length`` are needed; the token dictionary comes
from the folder or is given). Behind ``genecorpus inspect``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from genecorpus.corpus.folder import CorpusFiles, read_lengths
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    import os

    from genecorpus.corpus.manifest import Manifest

__all__ = ["describe_corpus"]


def _symbols() -> dict[str, str]:
    from genecorpus.genes import load_gene_table

    table = load_gene_table("gencode48")
    return dict(zip(table["ensembl_id"], table["symbol"], strict=True))


def _duplicates_line(m: Manifest) -> str:
    """What duplicate detection found, in one line."""
    d = m.duplicates
    if d is None:
        return 'duplicates: not looked for (duplicates = "keep")'
    n_shared = sum(s.n_cells for s in d.shared)
    pairs = len(d.shared)
    within = sum(d.within.values())
    fate = f"{d.n_dropped:,} dropped" if d.policy == "drop" else "reported, kept"
    found = (f"{n_shared:,} cells also in an earlier dataset ({pairs} pair{'s' if pairs != 1 else ''} of "
             f"datasets), {fate}" if n_shared else "no cell found in two datasets")
    return f"duplicates ({d.policy}): {found}; {within:,} identical cells within a dataset (kept)"


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
    if not scan and files.manifest is not None and files.lengths_file.is_file():
        lengths_parts.append(read_lengths(files.lengths_file))
    for batch in files.iter_batches(["input_ids", "length"]):
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
    if m is not None:
        lines.append(f"layout: {m.corpus.layout}   vocabulary: {m.vocabulary.n_genes:,} genes   "
                     f"medians: {m.medians.source}")
        if m.mode == "build":
            lines.append(_duplicates_line(m))
        lines.append("")
        lines.append(f"{'dataset':<28}{'in':>9}{'kept':>9}  dropped by reason")
        for d in m.datasets:
            dropped = ", ".join(f"{k} {v:,}" for k, v in d.cells.dropped.items() if v) or "none"
            lines.append(f"{d.dataset_id:<28}{d.cells.n_in:>9,}{d.cells.kept:>9,}  {dropped}")
        for skipped in m.skipped:
            lines.append(f"{skipped.dataset_id:<28}{'skipped':>18}  (--on-error skip, at {skipped.stage}): "
                         f"{skipped.error}")
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
