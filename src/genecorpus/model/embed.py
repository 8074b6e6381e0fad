"""Cell embeddings: one layer of a pretrained ``BertForMaskedLM`` pooled over each cell's gene tokens.

A cell's embedding is the mean of the chosen layer's hidden states over its *gene* positions (padding and
the special tokens ``<cls>``, ``<eos>``, ``<mask>`` left out), or the ``<cls>`` state of gc104m-layout
cells. Cells are read by row from a corpus (:class:`~genecorpus.corpus.CorpusReader`), sorted by length
(longest first) and run in batches padded to the longest cell of the batch, under
``torch.inference_mode()`` with SDPA attention, in float32 — or under bf16 autocast
(:func:`genecorpus.model.bert.autocast`: by default on a CUDA device with bf16, or ``precision="bf16"``
anywhere), the embeddings still returned as float32; they go back to the corpus's row order. Since
padding is masked out, the batch size changes results only within float tolerance (~1e-6 in float32).

The output is an ``.h5ad`` file: ``obsm["X_genecorpus"]`` (float32, cells x hidden size), ``obs`` with
the corpus's metadata columns (``dataset_id``, ``cell_id``, labels, ``length``) plus ``corpus_row``, an
empty ``X`` (cells x 0), and ``uns["genecorpus"]`` recording the corpus, the model, the layer and the
pooling. :mod:`genecorpus.model.perturb` reads it back.

Under ``torchrun`` (see :mod:`genecorpus.model.distributed`) each process embeds every ``world_size``-th
of the rows (a strided share: every process gets cells of every length), rank 0 gathers the shares and
writes one ``.h5ad`` in the requested row order; the numbers equal a single process's within float
tolerance (they differ only by the padding width of the batches a cell ran in).

Needs the ``train`` extra (torch and transformers); importing this module does not import torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from genecorpus.errors import ConfigError, InputError

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import anndata as ad
    import pandas as pd
    import torch
    from transformers import BertForMaskedLM

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.distributed import Process
    from genecorpus.vocab import TokenDictionary

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDING_KEY", "CellEncoder", "check_dictionaries", "embed_corpus", "open_corpus_for_model"]

EMBEDDING_KEY = "X_genecorpus"
"""``obsm`` key of the cell embeddings."""

UNS_KEY = "genecorpus"
"""``uns`` key of the embedding's provenance (corpus, model, layer, pooling)."""

Pool = Literal["mean", "cls"]
ProgressCallback = Callable[[str, int, int], None]
"""``progress(stage, done, total)``, called after each batch."""


@dataclass
class CellEncoder:
    """A model's encoder applied to cells' token sequences, returning one layer's hidden states.

    Parameters
    ----------
    model
        A ``BertForMaskedLM`` in eval mode (see :func:`genecorpus.model.bert.load_model`).
    token_dictionary
        The model's vocabulary: its ``<pad>`` pads batches; ``<pad>``, ``<mask>``, ``<cls>`` and ``<eos>``
        are not genes.
    layer
        Index into ``hidden_states``: 0 is the embedding output, 1..n the transformer layers, negative
        indices count from the last (-1 = last layer, -2 = penultimate, Geneformer's default).
    max_length
        Longest sequence fed to the model; longer cells keep their first tokens. Default and upper bound:
        the model's ``max_position_embeddings``.
    precision
        ``auto`` (bf16 autocast on a CUDA device with bf16, else float32), ``fp32`` or ``bf16``.
    """

    model: BertForMaskedLM
    token_dictionary: TokenDictionary
    layer: int = -2
    max_length: int | None = None
    precision: str = "auto"

    def __post_init__(self) -> None:
        n_layers = int(self.model.config.num_hidden_layers)
        if not -(n_layers + 1) <= self.layer <= n_layers:
            msg = (f"layer {self.layer} does not exist: the model has hidden states 0..{n_layers} "
                   f"(or -1..-{n_layers + 1} from the last); pick one of those")
            raise ConfigError(msg)
        limit = int(self.model.config.max_position_embeddings)
        if self.max_length is not None and self.max_length < 1:
            msg = f"max_length {self.max_length}: give a positive number of tokens"
            raise ConfigError(msg)
        self.max_length = min(self.max_length or limit, limit)
        self.pad_id = int(self.token_dictionary.special["<pad>"])
        self.cls_id = self.token_dictionary.special.get("<cls>")
        self.non_gene_ids = np.array(sorted(self.token_dictionary.special.values()), dtype=np.int64)
        self.vocab_size = int(self.model.config.vocab_size)
        self.device = next(self.model.parameters()).device
        from genecorpus.model.bert import resolve_precision

        self.resolved_precision = resolve_precision(self.precision, self.device)
        """``fp32`` or ``bf16``: what ``precision`` means on the model's device."""

    @property
    def hidden_size(self) -> int:
        """Width of the hidden states (and of the embeddings)."""
        return int(self.model.config.hidden_size)

    def truncate(self, ids: np.ndarray) -> np.ndarray:
        """The first ``max_length`` tokens of a cell (int64)."""
        return np.asarray(ids[: self.max_length], dtype=np.int64)

    def is_gene(self, ids: np.ndarray) -> np.ndarray:
        """Which positions of a token sequence hold genes (bool, same shape as ``ids``)."""
        return ~np.isin(ids, self.non_gene_ids)

    def layer_states(self, sequences: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the chosen layer for a batch of (already truncated) token sequences.

        Returns
        -------
        states
            float32 tensor (batch, longest length, hidden size) on the model's device; padded positions
            hold whatever the model computed there (use the mask).
        gene_mask
            bool tensor (batch, longest length): True at gene positions (not padding, not special).
        """
        import torch

        from genecorpus.model.bert import autocast

        longest = max(len(s) for s in sequences)
        ids = np.full((len(sequences), longest), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(sequences), longest), dtype=np.int64)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = s
            attention[i, : len(s)] = 1
        top = int(ids.max(initial=0))
        if top >= self.vocab_size:
            msg = (f"token id {top} is outside the model's vocabulary of {self.vocab_size}; the corpus was "
                   "tokenized with another dictionary: re-tokenize it with the model's token dictionary")
            raise InputError(msg)
        gene_mask = torch.from_numpy(self.is_gene(ids) & (attention == 1)).to(self.device)
        input_ids = torch.from_numpy(ids).to(self.device)
        attention_mask = torch.from_numpy(attention).to(self.device)
        layers = self.model.bert.encoder.layer
        depth = self.layer % (len(layers) + 1)  # hidden_states[depth] is the output of layer `depth`
        try:
            # the layers above the chosen one do not change it: leave them out (-2 of 4 layers: 25 % faster)
            self.model.bert.encoder.layer = layers[: max(depth, 1)]
            with torch.inference_mode(), autocast(self.device, self.precision):
                out = self.model.bert(input_ids=input_ids, attention_mask=attention_mask,
                                      output_hidden_states=True)
                states = out.hidden_states[depth].float()
        finally:
            self.model.bert.encoder.layer = layers
        return states, gene_mask

    def pool(self, sequences: Sequence[np.ndarray], pool: Pool = "mean") -> np.ndarray:
        """Embeddings of one batch of (already truncated) sequences: float32 (batch, hidden size)."""
        states, gene_mask = self.layer_states(sequences)
        if pool == "cls":
            return states[:, 0, :].cpu().numpy().astype(np.float32)
        weights = gene_mask.to(states.dtype).unsqueeze(-1)
        n_genes = weights.sum(dim=1).clamp(min=1.0)
        return ((states * weights).sum(dim=1) / n_genes).cpu().numpy().astype(np.float32)

    def embed(self, sequences: Sequence[np.ndarray], *, pool: Pool = "mean", batch_size: int = 16,
              progress: ProgressCallback | None = None) -> np.ndarray:
        """Embeddings of token sequences, in their order: float32 (n, hidden size).

        Sequences are truncated to ``max_length``, sorted by length (longest first, ties in input order)
        and run ``batch_size`` at a time.
        """
        if batch_size < 1:
            msg = f"batch size {batch_size}: give at least 1"
            raise ConfigError(msg)
        if pool not in ("mean", "cls"):
            msg = f"pool {pool!r}: use mean or cls"
            raise ConfigError(msg)
        if pool == "cls" and self.cls_id is None:
            msg = "--pool cls: the token dictionary has no <cls> token (gc30M layout); use --pool mean"
            raise ConfigError(msg)
        truncated = [self.truncate(s) for s in sequences]
        lengths = np.array([len(s) for s in truncated], dtype=np.int64)
        if len(lengths) and lengths.min() == 0:
            msg = f"cell {int(np.argmin(lengths))} has no tokens; give cells with at least one gene"
            raise InputError(msg)
        order = np.argsort(-lengths, kind="stable")
        out = np.zeros((len(truncated), self.hidden_size), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = [truncated[i] for i in rows]
            if pool == "cls":
                first = np.array([s[0] for s in batch])
                if (first != self.cls_id).any():
                    where = int(rows[int(np.argmax(first != self.cls_id))])
                    msg = f"cell {where} does not start with <cls>; use --pool mean for this corpus"
                    raise InputError(msg)
            out[rows] = self.pool(batch, pool)
            if progress is not None:
                progress("embed", min(start + batch_size, len(order)), len(order))
        return out


def check_dictionaries(corpus_dictionary: TokenDictionary, model_dictionary: TokenDictionary, *,
                       corpus_name: str, model_name: str) -> None:
    """Raise unless every token of the corpus's dictionary has the same id in the model's dictionary.

    Raises
    ------
    InputError
        A token of the corpus missing from the model's vocabulary or numbered differently.
    """
    model_ids = model_dictionary.to_mapping()
    for token, token_id in corpus_dictionary.to_mapping().items():
        if model_ids.get(token) != token_id:
            where = "is not in" if token not in model_ids else f"is {model_ids[token]} in"
            msg = (f"{corpus_name}: was tokenized with another dictionary ({token} is token {token_id} there "
                   f"but {where} the dictionary of {model_name}); re-tokenize the corpus with the model's "
                   "token dictionary")
            raise InputError(msg)


def open_corpus_for_model(corpus: str | os.PathLike[str], model_dictionary: TokenDictionary, *,
                          model_dictionary_path: str | os.PathLike[str], model_name: str,
                          corpus_token_dictionary: str | os.PathLike[str] | None = None) -> CorpusReader:
    """Open a corpus whose token ids the model understands.

    A corpus without its own ``token_dictionary.pkl`` (e.g. the published Genecorpus-30M parquet files)
    is read with ``corpus_token_dictionary`` if given, else with the model's dictionary.
    """
    from genecorpus.corpus import CorpusFiles, CorpusReader

    if corpus_token_dictionary is not None and not Path(corpus_token_dictionary).is_file():
        msg = f"{corpus_token_dictionary}: no such token dictionary; check the path"
        raise InputError(msg)
    files = CorpusFiles.locate(corpus, corpus_token_dictionary)
    reader = CorpusReader.open(corpus, files.token_dictionary or model_dictionary_path)
    check_dictionaries(reader.token_dictionary, model_dictionary, corpus_name=str(corpus), model_name=model_name)
    return reader


def model_dictionary_path(model: str | os.PathLike[str],
                          token_dictionary: str | os.PathLike[str] | None) -> Path:
    """Where the model's dictionary is read from (``token_dictionary`` or the folder's copy)."""
    from genecorpus.model.bert import TOKEN_DICTIONARY

    return Path(token_dictionary) if token_dictionary else Path(model) / TOKEN_DICTIONARY


def embed_corpus(
    corpus: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str],
    layer: int = -2,
    pool: Pool = "mean",
    batch_size: int = 16,
    max_length: int | None = None,
    precision: str = "auto",
    device: str | None = None,
    token_dictionary: str | os.PathLike[str] | None = None,
    corpus_token_dictionary: str | os.PathLike[str] | None = None,
    cells: Sequence[int] | np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> ad.AnnData | None:
    """Embed the cells of a corpus with a pretrained model and write them to an ``.h5ad`` file.

    Parameters
    ----------
    corpus
        A corpus folder (genecorpus or ``save_to_disk``) or parquet file(s).
    model
        A model folder written by ``genecorpus pretrain``, or a Geneformer checkpoint folder (then give
        ``token_dictionary``).
    out
        The ``.h5ad`` file to write (via a temporary sibling, renamed when complete).
    layer
        Hidden-state index: 0 = embedding output, -1 = last layer, -2 = penultimate (default).
    pool
        ``"mean"`` over gene tokens, or ``"cls"``: the ``<cls>`` state (gc104m layout only).
    batch_size
        Cells per forward pass (memory and speed; results agree within float tolerance).
    max_length
        Tokens kept per cell (default: the model's ``max_position_embeddings``, also the upper bound).
    precision
        ``auto`` (bf16 autocast on a CUDA device with bf16, else float32), ``fp32`` or ``bf16``.
    device
        ``"cpu"``, ``"cuda"``…; default CUDA when available, else CPU. Under ``torchrun``, each process
        embeds its share of the cells (``cuda`` becomes ``cuda:LOCAL_RANK``) and rank 0 writes ``out``.
    token_dictionary
        The model's token dictionary, if its folder has none (Geneformer checkpoints).
    corpus_token_dictionary
        The corpus's token dictionary, if its folder has none; default: the model's.
    cells
        Corpus rows to embed, in the order wanted (default: all, in row order).
    progress
        Called as ``progress("embed", cells_done, cells_total)`` after each batch (the process's own cells).

    Returns
    -------
    The AnnData that was written: ``obsm["X_genecorpus"]`` float32 (cells x hidden size), ``obs`` the
    corpus's metadata plus ``corpus_row``, ``uns["genecorpus"]`` the provenance (plus, in memory only,
    ``seconds``: the time spent embedding). Under torchrun: on rank 0; the other processes return None
    (once rank 0 has written the file).

    Raises
    ------
    InputError
        Unreadable corpus or model, or a corpus tokenized with another dictionary.
    ConfigError
        A layer the model does not have, ``pool="cls"`` without ``<cls>``, a bad batch size.

    Examples
    --------
    >>> emb = embed_corpus("pbmc-corpus", "pbmc-model", out="pbmc-emb.h5ad")  # doctest: +SKIP
    >>> emb.obsm["X_genecorpus"].shape  # doctest: +SKIP
    (3000, 128)
    """
    from genecorpus.model.bert import require_torch
    from genecorpus.model.distributed import process_group

    require_torch()
    with process_group(device) as (process, torch_device):
        return _embed_in_process(corpus, model, out=Path(out), layer=layer, pool=pool, batch_size=batch_size,
                                 max_length=max_length, precision=precision, device=str(torch_device),
                                 token_dictionary=token_dictionary,
                                 corpus_token_dictionary=corpus_token_dictionary, cells=cells, progress=progress,
                                 process=process)


def _embed_in_process(corpus: str | os.PathLike[str], model: str | os.PathLike[str], *, out: Path, layer: int,
                      pool: Pool, batch_size: int, max_length: int | None, precision: str, device: str,
                      token_dictionary: str | os.PathLike[str] | None,
                      corpus_token_dictionary: str | os.PathLike[str] | None,
                      cells: Sequence[int] | np.ndarray | None, progress: ProgressCallback | None,
                      process: Process) -> ad.AnnData | None:
    """:func:`embed_corpus` in one process of the run: its share of the rows, gathered and written by rank 0."""
    from genecorpus.model.bert import load_model, quiet_transformers
    from genecorpus.model.distributed import barrier, gather_objects, shard_rows

    quiet_transformers()
    bert, model_dictionary = load_model(model, token_dictionary=token_dictionary, device=device)
    tdict_path = model_dictionary_path(model, token_dictionary)
    reader = open_corpus_for_model(corpus, model_dictionary, model_dictionary_path=tdict_path,
                                   model_name=str(model), corpus_token_dictionary=corpus_token_dictionary)
    encoder = CellEncoder(bert, model_dictionary, layer=layer, max_length=max_length, precision=precision)
    rows = select_rows(reader, cells)
    n_long = int((reader.lengths[rows] > encoder.max_length).sum())
    if n_long and process.is_main:
        logger.warning("%d of %d cells are longer than %d tokens; their first %d tokens are embedded",
                       n_long, len(rows), encoder.max_length, encoder.max_length)
    started = time.perf_counter()
    positions = shard_rows(np.arange(len(rows)), process)  # rows[rank::world]: every length in every share
    mine = encoder.embed(reader.batch(rows[positions]), pool=pool, batch_size=batch_size, progress=progress)
    shares = gather_objects(mine, process)
    seconds = time.perf_counter() - started
    if shares is None:  # not rank 0: wait until it has written them
        barrier(process)
        return None
    embeddings = np.zeros((len(rows), encoder.hidden_size), dtype=np.float32)
    for rank, share in enumerate(shares):
        embeddings[rank::process.world_size] = share
    adata = embeddings_anndata(reader, rows, embeddings, uns={
        "corpus": str(Path(corpus).resolve()),
        "model": str(Path(model).resolve()),
        "layer": int(layer),
        "pool": pool,
        "token_dictionary": str(tdict_path.resolve()),
        "corpus_token_dictionary": (str(reader.files.token_dictionary.resolve())
                                    if reader.files.token_dictionary else ""),
        "max_length": int(encoder.max_length),
        "precision": encoder.resolved_precision,
        "attention": str(bert.config._attn_implementation),
        "n_truncated": n_long,
    })
    if process.world_size > 1:
        adata.uns[UNS_KEY]["world_size"] = process.world_size
    write_h5ad_atomic(adata, out)
    logger.info("embedded %d cells in %.1f s (%.1f cells/s)", len(rows), seconds, len(rows) / max(seconds, 1e-9))
    adata.uns[UNS_KEY]["seconds"] = seconds
    barrier(process)
    return adata


def select_rows(reader: CorpusReader, cells: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """Corpus rows to process (int64): ``cells`` checked against the corpus, or all rows."""
    if cells is None:
        return np.arange(reader.n_cells, dtype=np.int64)
    rows = np.asarray(cells, dtype=np.int64).ravel()
    bad = rows[(rows < 0) | (rows >= reader.n_cells)]
    if len(bad):
        msg = (f"{reader.files.root}: row {int(bad[0])} is outside the corpus (0..{reader.n_cells - 1}); "
               "give existing rows")
        raise InputError(msg)
    return rows


def embeddings_anndata(reader: CorpusReader, rows: np.ndarray, embeddings: np.ndarray,
                       uns: dict[str, object]) -> ad.AnnData:
    """An AnnData of embeddings: the corpus's metadata of ``rows`` in ``obs``, embeddings in ``obsm``."""
    import anndata as ad

    obs = corpus_obs(reader, rows)
    return ad.AnnData(X=np.zeros((len(rows), 0), dtype=np.float32), obs=obs,
                      obsm={EMBEDDING_KEY: embeddings}, uns={UNS_KEY: uns})


def corpus_obs(reader: CorpusReader, rows: np.ndarray) -> pd.DataFrame:
    """The corpus's metadata columns for ``rows`` plus ``corpus_row``, indexed by unique cell names.

    The names are ``dataset_id:cell_id`` (or ``cell_id``) when those are unique, else the row numbers.
    String columns with missing values become categoricals (what ``.h5ad`` stores for them).
    """
    import pandas as pd

    columns = {}
    for name in reader.columns:
        values = reader.column(name)[rows]
        if values.dtype == object and any(v is None for v in values):
            columns[name] = pd.Categorical(values)
        else:
            columns[name] = values
    obs = pd.DataFrame(columns)
    obs["corpus_row"] = rows
    names = pd.Index([str(r) for r in rows])
    if "cell_id" in obs:
        cell_ids = obs["cell_id"].astype(str)
        candidate = (obs["dataset_id"].astype(str) + ":" + cell_ids) if "dataset_id" in obs else cell_ids
        if candidate.is_unique:
            names = pd.Index(candidate.to_numpy())
    obs.index = names
    return obs


def write_h5ad_atomic(adata: ad.AnnData, out: Path) -> None:
    """Write ``adata`` to a temporary sibling of ``out`` and rename it into place."""
    from genecorpus.corpus import publish_file

    publish_file(out, adata.write_h5ad, suffix=".h5ad")
