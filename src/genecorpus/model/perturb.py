"""In-silico perturbation: delete or overexpress genes in cells' rank value encodings and re-embed them.

Geneformer's in-silico perturbation, on CPU or GPU. For each cell, the token sequence is perturbed:

- ``delete``: the perturbed genes' tokens are removed;
- ``overexpress``: they are moved to the front (after ``<cls>`` in the gc104m layout), and inserted there
  when the cell lacks them; the sequence is then cut back to its original length (keeping ``<eos>``).

Both sequences run through the model; the comparison uses the genes the two sequences share, the
perturbed genes themselves left out of both (as Geneformer does):

- the *cell shift* is ``1 - cos`` between the mean hidden states over those genes, before and after;
- each shared gene's *shift* is ``1 - cos`` between its hidden state before and after, averaged over the
  perturbed cells that hold it.

A cell whose sequence does not change (deleting a gene it lacks) is not run again: its shift is 0.

Needs the ``train`` extra (torch and transformers); importing this module does not import torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from genecorpus.errors import ConfigError, GeneMappingError, InputError
from genecorpus.model.embed import (
    UNS_KEY,
    CellEncoder,
    corpus_obs,
    model_dictionary_path,
    open_corpus_for_model,
    select_rows,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd

    from genecorpus.model.embed import ProgressCallback
    from genecorpus.vocab import TokenDictionary

logger = logging.getLogger(__name__)

__all__ = ["MIN_CELLS", "PerturbResult", "perturb", "perturb_tokens", "resolve_genes"]

Mode = Literal["delete", "overexpress"]
MODES: tuple[str, ...] = ("delete", "overexpress")


MIN_CELLS = 10
"""Default of :attr:`PerturbResult.min_cells`."""

@dataclass(frozen=True)
class PerturbResult:
    """What a perturbation did to cells and to the other genes' embeddings."""

    mode: str
    """``delete`` or ``overexpress``."""
    genes: pd.DataFrame
    """The perturbed genes: ``query`` (as given), ``ensembl_id``, ``symbol``, ``token``."""
    cells: pd.DataFrame
    """One row per cell: its corpus metadata, ``corpus_row``, ``n_genes_present`` (perturbed genes in the
    cell), ``changed`` (sequence differs), ``n_genes_compared``, ``cosine`` and ``shift`` (= 1 - cosine;
    NaN when no gene is left to compare)."""
    gene_shifts: pd.DataFrame
    """One row per gene compared in at least one changed cell, largest ``mean_shift`` first:
    ``ensembl_id``, ``symbol``, ``token``, ``mean_shift``, ``n_cells``."""
    min_cells: int = MIN_CELLS
    """Genes compared in fewer cells are left out of :meth:`top_genes` (their mean is noise); all are in
    :attr:`gene_shifts` and the genes CSV."""

    @property
    def mean_shift(self) -> float:
        """Mean cell shift over all cells (NaN shifts left out)."""
        return float(np.nanmean(self.cells["shift"])) if len(self.cells) else float("nan")

    @property
    def mean_shift_containing(self) -> float:
        """Mean cell shift over the cells that hold at least one perturbed gene (NaN if none does)."""
        shifts = self.cells.loc[self.cells["n_genes_present"] > 0, "shift"].to_numpy(dtype=float)
        shifts = shifts[~np.isnan(shifts)]
        return float(shifts.mean()) if len(shifts) else float("nan")

    def top_genes(self, n: int = 20) -> pd.DataFrame:
        """The ``n`` genes whose embeddings moved most, among those compared in at least ``min_cells`` cells."""
        return self.gene_shifts[self.gene_shifts["n_cells"] >= self.min_cells].head(n)

    def write(self, prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``PREFIX_cells.csv`` and ``PREFIX_genes.csv`` (each via a temporary sibling)."""
        from genecorpus.corpus import publish_file

        prefix = Path(prefix)
        return (publish_file(prefix.with_name(f"{prefix.name}_cells.csv"),
                             lambda tmp: self.cells.to_csv(tmp, index=False)),
                publish_file(prefix.with_name(f"{prefix.name}_genes.csv"),
                             lambda tmp: self.gene_shifts.to_csv(tmp, index=False)))

    def to_text(self, top: int = 20) -> str:
        """A summary: the genes, the cell shifts, and the ``top`` genes that moved most."""
        named = ", ".join(f"{s or e} ({e})" for e, s in zip(self.genes["ensembl_id"], self.genes["symbol"],
                                                              strict=True))
        n_with = int((self.cells["n_genes_present"] > 0).sum())
        lines = [
            f"{self.mode} {named}",
            f"cells: {len(self.cells)}, holding the gene(s): {n_with}, changed: {int(self.cells['changed'].sum())}",
            f"mean cell shift (1 - cosine): {self.mean_shift:.6f} over all cells, "
            f"{self.mean_shift_containing:.6f} over cells holding the gene(s)",
        ]
        head = self.top_genes(top)
        if not len(head) and len(self.gene_shifts):
            lines.append(f"no gene was compared in {self.min_cells} cells or more (--min-cells); the genes CSV "
                         "lists every gene")
        if len(head):
            lines.append(f"genes whose embeddings moved most (top {len(head)}, among genes compared in at least "
                         f"{self.min_cells} cells):")
            lines.append(f"  {'ensembl_id':<16} {'symbol':<12} {'mean_shift':>11} {'n_cells':>8}")
            for row in head.itertuples(index=False):
                lines.append(f"  {row.ensembl_id:<16} {row.symbol:<12} {row.mean_shift:>11.6f} {row.n_cells:>8}")
        return "\n".join(lines)


def perturb_tokens(ids: np.ndarray, tokens: Sequence[int] | np.ndarray, *, mode: Mode,
                   cls_token: int | None = None, eos_token: int | None = None) -> np.ndarray:
    """A cell's token sequence with genes deleted or overexpressed (int64).

    Parameters
    ----------
    ids
        The cell's token ids (rank value encoding, highest rank first).
    tokens
        Token ids of the genes to perturb; overexpressed genes go to the front in this order.
    mode
        ``"delete"``: remove them. ``"overexpress"``: move them to the front (after a leading
        ``cls_token``), inserting those the cell lacks, and cut back to the original length (keeping a
        trailing ``eos_token``).

    Examples
    --------
    >>> perturb_tokens(np.array([5, 6, 7, 8]), [7], mode="delete").tolist()
    [5, 6, 8]
    >>> perturb_tokens(np.array([2, 5, 6, 7, 3]), [9], mode="overexpress", cls_token=2, eos_token=3).tolist()
    [2, 9, 5, 6, 3]
    """
    ids = np.asarray(ids, dtype=np.int64)
    genes = np.asarray(list(dict.fromkeys(int(t) for t in tokens)), dtype=np.int64)
    rest = ids[~np.isin(ids, genes)]
    if mode == "delete":
        return rest
    if mode != "overexpress":
        msg = f"mode {mode!r}: use one of {', '.join(MODES)}"
        raise ConfigError(msg)
    head = rest[:1] if cls_token is not None and len(rest) and rest[0] == cls_token else rest[:0]
    moved = np.concatenate([head, genes, rest[len(head):]])
    if len(moved) <= len(ids):
        return moved
    if eos_token is not None and len(ids) and ids[-1] == eos_token:
        return np.concatenate([moved[: len(ids) - 1], ids[-1:]])
    return moved[: len(ids)]


def resolve_genes(genes: Sequence[str], token_dictionary: TokenDictionary) -> pd.DataFrame:
    """Ensembl IDs, symbols and token ids of genes given as Ensembl IDs or symbols.

    Symbols are looked up in the vendored gene tables (GENCODE v48 first, then the older Ensembl
    releases), taking the first release whose gene is in the dictionary.

    Raises
    ------
    InputError
        A gene that is not a known symbol or Ensembl ID, or not in the token dictionary.
    """
    import pandas as pd

    from genecorpus.genes import RELEASES, map_to_ensembl, strip_version

    vocab = dict(zip(token_dictionary.gene_ids.tolist(), token_dictionary.gene_tokens.tolist(), strict=True))
    rows = []
    for query in genes:
        query = str(query).strip()
        if not query:
            continue
        if query.upper().startswith("ENSG"):
            candidates = [str(strip_version([query.upper()])[0])]
        else:
            candidates = []
            for release in RELEASES:
                try:
                    mapped = map_to_ensembl([query], kind="symbol", release=release).ensembl_ids[0]
                except GeneMappingError:  # raised when nothing maps
                    continue
                if mapped and mapped not in candidates:
                    candidates.append(mapped)
            if not candidates:
                msg = (f"gene {query!r}: not a human gene symbol of GENCODE v48 or Ensembl 84-100; "
                       "give its Ensembl ID (ENSG...)")
                raise InputError(msg)
        found = next((c for c in candidates if c in vocab), None)
        if found is None:
            msg = (f"gene {query!r} ({candidates[0]}) is not in the model's token dictionary; "
                   "choose a gene of its vocabulary")
            raise InputError(msg)
        rows.append((query, found, int(vocab[found])))
    if not rows:
        msg = "no genes given; pass --genes with Ensembl IDs or symbols, e.g. --genes CD74,MS4A1"
        raise ConfigError(msg)
    frame = pd.DataFrame(rows, columns=["query", "ensembl_id", "token"])
    frame.insert(2, "symbol", gene_symbols(frame["ensembl_id"].to_numpy()))
    return frame.drop_duplicates("ensembl_id", ignore_index=True)


def gene_symbols(ensembl_ids: np.ndarray) -> np.ndarray:
    """Symbol of each Ensembl ID (GENCODE v48, else the newest release naming it; ``""`` if none)."""
    from genecorpus.genes import RELEASES, load_gene_table

    symbols = np.full(len(ensembl_ids), "", dtype=object)
    for release in RELEASES:
        missing = symbols == ""
        if not missing.any():
            break
        table = load_gene_table(release)
        named = dict(zip(table["ensembl_id"], table["symbol"], strict=True))
        symbols[missing] = [named.get(e, "") for e in ensembl_ids[missing]]
    return symbols


@dataclass(frozen=True)
class _Source:
    corpus: Path
    rows: np.ndarray | None
    corpus_token_dictionary: Path | None
    layer: int | None


def _read_source(source: Path) -> _Source:
    """Where the cells are: an embedding ``.h5ad`` names its corpus and rows; else ``source`` is a corpus."""
    if not (source.is_file() and source.suffix == ".h5ad"):
        return _Source(source, None, None, None)
    import anndata as ad

    try:
        emb = ad.read_h5ad(source)
    except OSError as e:
        msg = f"{source}: not a readable .h5ad ({e}); give an embedding written by genecorpus embed"
        raise InputError(msg) from None
    info = emb.uns.get(UNS_KEY)
    if not isinstance(info, dict) or "corpus" not in info or "corpus_row" not in emb.obs:
        msg = f"{source}: not written by genecorpus embed (no uns['{UNS_KEY}'] or obs['corpus_row']); give the corpus"
        raise InputError(msg)
    corpus = Path(str(info["corpus"]))
    if not corpus.exists():
        msg = f"{source}: its corpus {corpus} is missing; give the corpus folder instead"
        raise InputError(msg)
    tdict = str(info.get("corpus_token_dictionary", ""))
    return _Source(corpus, emb.obs["corpus_row"].to_numpy(dtype=np.int64), Path(tdict) if tdict else None,
                   int(info["layer"]) if "layer" in info else None)


def perturb(
    source: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    genes: Sequence[str],
    mode: Mode = "delete",
    layer: int | None = None,
    batch_size: int = 16,
    max_cells: int | None = None,
    device: str | None = None,
    token_dictionary: str | os.PathLike[str] | None = None,
    corpus_token_dictionary: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    min_cells: int = MIN_CELLS,
) -> PerturbResult:
    """Delete or overexpress genes in cells and measure how the cell and gene embeddings move.

    Parameters
    ----------
    source
        An embedding ``.h5ad`` written by :func:`genecorpus.model.embed.embed_corpus` (its cells, from the
        corpus it names), or a corpus folder / parquet file(s) (all its cells).
    model
        A model folder, or a Geneformer checkpoint folder with ``token_dictionary``.
    genes
        Ensembl IDs or symbols of the genes to perturb (together, in every cell).
    mode
        ``"delete"`` or ``"overexpress"`` (see :func:`perturb_tokens`).
    layer
        Hidden-state index compared (default: the embedding's layer, else -2, the penultimate).
    batch_size
        Cells per forward pass.
    max_cells
        Perturb only the first ``max_cells`` cells of the source.
    device
        ``"cpu"``, ``"cuda"``…; default CUDA when available, else CPU.
    token_dictionary, corpus_token_dictionary
        The model's and the corpus's token dictionaries, when their folders have none.
    progress
        Called as ``progress("perturb", cells_done, cells_total)`` after each batch.
    min_cells
        The genes that moved most are reported among genes compared in at least this many cells.

    Returns
    -------
    Per-cell shifts and per-gene mean shifts; see :class:`PerturbResult`.

    Examples
    --------
    >>> result = perturb("pbmc-emb.h5ad", "pbmc-model", genes=["CD74"], mode="delete")  # doctest: +SKIP
    >>> result.write("cd74-deletion")  # doctest: +SKIP
    """

    from genecorpus.model.bert import load_model, quiet_transformers, require_torch

    require_torch()
    quiet_transformers()
    if mode not in MODES:
        msg = f"--mode {mode}: use one of {', '.join(MODES)}"
        raise ConfigError(msg)
    if max_cells is not None and max_cells < 1:
        msg = f"--max-cells {max_cells}: give at least 1"
        raise ConfigError(msg)
    where = _read_source(Path(source))
    bert, model_dictionary = load_model(model, token_dictionary=token_dictionary, device=device)
    reader = open_corpus_for_model(
        where.corpus, model_dictionary, model_dictionary_path=model_dictionary_path(model, token_dictionary),
        model_name=str(model), corpus_token_dictionary=corpus_token_dictionary or where.corpus_token_dictionary)
    perturbed_genes = resolve_genes(genes, model_dictionary)
    layer = layer if layer is not None else where.layer if where.layer is not None else -2
    encoder = CellEncoder(bert, model_dictionary, layer=layer)
    if batch_size < 1:
        msg = f"batch size {batch_size}: give at least 1"
        raise ConfigError(msg)
    gene_tokens = perturbed_genes["token"].to_numpy(dtype=np.int64)
    rows = select_rows(reader, where.rows)
    if max_cells is not None:
        rows = rows[:max_cells]

    special = model_dictionary.special
    originals = [encoder.truncate(ids) for ids in reader.batch(rows)]
    perturbed = [perturb_tokens(ids, gene_tokens, mode=mode, cls_token=special.get("<cls>"),
                                eos_token=special.get("<eos>")) for ids in originals]
    comparison = _Comparison(encoder, gene_tokens)
    changed = np.array([not np.array_equal(o, p) for o, p in zip(originals, perturbed, strict=True)], dtype=bool)
    todo = np.flatnonzero(changed)
    todo = todo[np.argsort(-np.array([len(originals[i]) for i in todo], dtype=np.int64), kind="stable")]
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        comparison.add([originals[i] for i in batch], [perturbed[i] for i in batch], batch)
        if progress is not None:
            progress("perturb", min(start + batch_size, len(todo)), len(todo))

    cells = corpus_obs(reader, rows).reset_index(names="cell")
    cells["n_genes_present"] = [int(np.isin(gene_tokens, o).sum()) for o in originals]
    cells["changed"] = changed
    unchanged_compared = [int((encoder.is_gene(o) & ~np.isin(o, gene_tokens)).sum()) for o in originals]
    cells["n_genes_compared"] = np.where(changed, comparison.n_compared(len(rows)), unchanged_compared)
    cells["cosine"] = np.where(changed, comparison.cell_cosine(len(rows)), 1.0)
    cells["shift"] = 1.0 - cells["cosine"]
    return PerturbResult(mode=mode, genes=perturbed_genes, cells=cells, gene_shifts=comparison.gene_table(),
                         min_cells=min_cells)


class _Comparison:
    """Running comparison of original and perturbed cells: cell cosines and per-gene shift sums."""

    def __init__(self, encoder: CellEncoder, gene_tokens: np.ndarray) -> None:
        self.encoder = encoder
        self.excluded = np.concatenate([encoder.non_gene_ids, gene_tokens])
        self.cosines: dict[int, float] = {}
        self.compared: dict[int, int] = {}
        self.shift_sum = np.zeros(encoder.vocab_size, dtype=np.float64)
        self.n_cells = np.zeros(encoder.vocab_size, dtype=np.int64)

    def add(self, originals: list[np.ndarray], perturbed: list[np.ndarray], indices: np.ndarray) -> None:
        """Run a batch of cell pairs through the model and record their shifts."""
        states_o, _ = self.encoder.layer_states(originals)
        states_p, _ = self.encoder.layer_states(perturbed)
        states_o_np = states_o.cpu().numpy().astype(np.float64)
        states_p_np = states_p.cpu().numpy().astype(np.float64)
        for k, (o, p) in enumerate(zip(originals, perturbed, strict=True)):
            shared, pos_o, pos_p = shared_positions(o, p, self.excluded)
            index = int(indices[k])
            self.compared[index] = len(shared)
            if not len(shared):
                self.cosines[index] = float("nan")
                continue
            before, after = states_o_np[k, pos_o], states_p_np[k, pos_p]
            self.cosines[index] = cosine(before.mean(axis=0), after.mean(axis=0))
            shifts = 1.0 - cosine_rows(before, after)
            np.add.at(self.shift_sum, shared, shifts)
            np.add.at(self.n_cells, shared, 1)

    def cell_cosine(self, n: int) -> np.ndarray:
        """Cosine per cell index (NaN where not compared)."""
        out = np.full(n, np.nan)
        for i, c in self.cosines.items():
            out[i] = c
        return out

    def n_compared(self, n: int) -> np.ndarray:
        """Genes compared per cell index."""
        out = np.zeros(n, dtype=np.int64)
        for i, c in self.compared.items():
            out[i] = c
        return out

    def gene_table(self) -> pd.DataFrame:
        """Mean shift per gene over the cells that hold it, largest first."""
        import pandas as pd

        tokens = np.flatnonzero(self.n_cells)
        lookup = dict(zip(self.encoder.token_dictionary.gene_tokens.tolist(),
                          self.encoder.token_dictionary.gene_ids.tolist(), strict=True))
        ensembl_ids = np.array([lookup.get(int(t), "") for t in tokens], dtype=object)
        frame = pd.DataFrame({
            "ensembl_id": ensembl_ids,
            "symbol": gene_symbols(ensembl_ids) if len(tokens) else np.array([], dtype=object),
            "token": tokens.astype(np.int64),
            "mean_shift": self.shift_sum[tokens] / self.n_cells[tokens],
            "n_cells": self.n_cells[tokens],
        })
        return frame.sort_values(["mean_shift", "token"], ascending=[False, True], ignore_index=True)


def shared_positions(original: np.ndarray, perturbed: np.ndarray,
                     excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tokens in both sequences but not in ``excluded``, and their positions in each (sorted by token).

    Tokens of a rank value encoding are unique within a cell, so each has one position.
    """
    shared = np.intersect1d(original, perturbed)
    shared = shared[~np.isin(shared, excluded)]
    order_o, order_p = np.argsort(original, kind="stable"), np.argsort(perturbed, kind="stable")
    pos_o = order_o[np.searchsorted(original[order_o], shared)]
    pos_p = order_p[np.searchsorted(perturbed[order_p], shared)]
    return shared, pos_o, pos_p


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (float64)."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two (n, d) arrays (float64, length n)."""
    return np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
