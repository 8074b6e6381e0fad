"""SDPA attention for every model we build or load (against eager attention, on padded real cells), and
the bf16 autocast path exercised on the CPU (pretraining and embedding against fp32)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from embedding_data import kang_corpus, tiny_model

from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError
from genecorpus.model.bert import autocast, bert_config, load_model, resolve_precision
from genecorpus.model.embed import CellEncoder, embed_corpus
from genecorpus.model.pretrain import pretrain
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LENGTHS = (512, 300, 128, 64, 17, 5)
"""Six real cells cut to these lengths (their first genes by rank, as ``--max-length`` does): a padded batch
where most positions of the short cells are padding."""


@pytest.fixture(scope="module")
def corpus_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """300 real Kang control cells (gc30m, our dictionary) and a randomly initialised tiny model."""
    folder = tmp_path_factory.mktemp("attention")
    corpus = kang_corpus(folder, "gc30m")
    return corpus, tiny_model(folder / "tiny", corpus / "token_dictionary.pkl")


def padded_batch(corpus: Path) -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray]]:
    reader = CorpusReader.open(corpus)
    long_rows = np.flatnonzero(reader.lengths >= max(LENGTHS))[: len(LENGTHS)]
    cells = [np.asarray(c[:n], dtype=np.int64) for c, n in zip(reader.batch(long_rows), LENGTHS, strict=True)]
    ids = np.zeros((len(cells), max(LENGTHS)), dtype=np.int64)  # 0 = <pad> in our dictionaries
    attention = np.zeros_like(ids)
    for i, cell in enumerate(cells):
        ids[i, : len(cell)] = cell
        attention[i, : len(cell)] = 1
    return torch.from_numpy(ids), torch.from_numpy(attention), cells


# ---------------------------------------------------------------- SDPA

def test_models_are_built_and_loaded_with_sdpa(corpus_and_model: tuple[Path, Path]) -> None:
    corpus, model = corpus_and_model
    tdict = TokenDictionary.load(corpus / "token_dictionary.pkl")
    assert bert_config("tiny", tdict, max_positions=64)._attn_implementation == "sdpa"
    assert load_model(model, device="cpu")[0].config._attn_implementation == "sdpa"
    assert load_model(model, device="cpu", attention="eager")[0].config._attn_implementation == "eager"


def test_sdpa_matches_eager_attention_on_padded_real_cells(corpus_and_model: tuple[Path, Path]) -> None:
    """Every layer's hidden states at the cells' real positions: SDPA on the padded batch against eager
    attention on the padded batch and on each cell alone (no padding, no mask). Tolerance 1e-5 (absolute,
    on states of magnitude ~4): the two compute the same sums in another order, float32 rounding (~1e-7
    relative) accumulated over a softmax of up to 512 terms and two layers; measured ~7e-7."""
    corpus, model = corpus_and_model
    sdpa, _ = load_model(model, device="cpu")
    eager, _ = load_model(model, device="cpu", attention="eager")
    ids, attention, cells = padded_batch(corpus)
    real = attention.bool()
    with torch.no_grad():
        fused = sdpa.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        plain = eager.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        for layer, (a, b) in enumerate(zip(fused, plain, strict=True)):
            assert torch.isfinite(a[real]).all()
            assert (a[real] - b[real]).abs().max() <= 1e-5, f"layer {layer}"
        for i, cell in enumerate(cells):
            alone = eager.bert(input_ids=torch.from_numpy(cell)[None], output_hidden_states=True).hidden_states
            for layer, states in enumerate(alone):
                assert (fused[layer][i, : len(cell)] - states[0]).abs().max() <= 1e-5, f"cell {i}, layer {layer}"


def test_attention_weights_need_eager(corpus_and_model: tuple[Path, Path]) -> None:
    """SDPA returns no attention weights (transformers warns and gives none): the reason for
    ``load_model(attention="eager")``, whose weights are a softmax over the real positions only."""
    corpus, model = corpus_and_model
    ids, attention, _ = padded_batch(corpus)
    sdpa, _ = load_model(model, device="cpu")
    eager, _ = load_model(model, device="cpu", attention="eager")
    with torch.no_grad():
        assert not sdpa.bert(input_ids=ids, attention_mask=attention, output_attentions=True).attentions
        weights = eager.bert(input_ids=ids, attention_mask=attention, output_attentions=True).attentions
    assert len(weights) == eager.config.num_hidden_layers
    first = weights[0]  # (cells, heads, query, key)
    torch.testing.assert_close(first.sum(-1), torch.ones_like(first.sum(-1)))
    shortest = LENGTHS.index(min(LENGTHS))
    assert first[shortest, :, :, min(LENGTHS):].abs().max() == 0  # no weight on padding


# ---------------------------------------------------------------- precision

def test_precision_choices() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match=r"--precision .fp16.: unknown; use one of auto, fp32, bf16"):
        resolve_precision("fp16", cpu)
    layer = torch.nn.Linear(4, 4)
    with autocast(cpu, "bf16"):
        assert layer(torch.ones(2, 4)).dtype == torch.bfloat16
    with autocast(cpu, "auto"):
        assert layer(torch.ones(2, 4)).dtype == torch.float32


def test_bf16_embeddings_on_cpu_are_close_to_fp32(corpus_and_model: tuple[Path, Path], tmp_path: Path) -> None:
    """bf16 keeps 8 bits of mantissa (rounding 2⁻⁸ ≈ 0.4 % per operation): each cell's embedding within
    1 % (relative L2) of fp32 and pointing the same way (cosine ≥ 0.999); hidden states per position
    within 2 %. Measured on these random tiny weights: ~1e-4 and ~2e-4 (the residual stream, kept in
    fp32, dominates)."""
    corpus, model = corpus_and_model
    rows = np.arange(48)
    fp32 = embed_corpus(corpus, model, out=tmp_path / "fp32.h5ad", precision="fp32", device="cpu", cells=rows)
    bf16 = embed_corpus(corpus, model, out=tmp_path / "bf16.h5ad", precision="bf16", device="cpu", cells=rows)
    assert (fp32.uns["genecorpus"]["precision"], bf16.uns["genecorpus"]["precision"]) == ("fp32", "bf16")
    a, b = fp32.obsm["X_genecorpus"], bf16.obsm["X_genecorpus"]
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert not np.array_equal(a, b)  # the bf16 path did run
    relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(a, axis=1)
    cosine = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert relative.max() <= 0.01
    assert cosine.min() >= 0.999
    bert, tdict = load_model(model, device="cpu")
    _, _, cells = padded_batch(corpus)
    states32, genes = CellEncoder(bert, tdict, layer=-1, precision="fp32").layer_states(cells)
    states16, _ = CellEncoder(bert, tdict, layer=-1, precision="bf16").layer_states(cells)
    per_position = (states32 - states16)[genes].norm(dim=-1) / states32[genes].norm(dim=-1)
    assert per_position.max() <= 0.02


def test_bf16_pretraining_on_cpu_follows_fp32(corpus_and_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Six steps of the same run (same seed, batches, masks) in fp32 and under bf16 autocast: every
    training loss finite and within 0.05 nats of fp32's (~9.2 nats: 0.5 %, about one bf16 rounding of the
    logits), the final validation loss within 0.05 and top-10 within 2 points."""
    corpus, _ = corpus_and_model
    settings = {"preset": "tiny", "max_steps": 6, "batch_size": 4, "max_length": 64, "val_cells": 24,
                "baseline_cells": 200, "device": "cpu"}
    runs = {p: pretrain(corpus, tmp_path / p, precision=p, **settings) for p in ("fp32", "bf16")}
    assert runs["bf16"].info["training"]["precision"] == "bf16"
    losses = {p: torch.load(tmp_path / p / "checkpoint" / "training_state.pt", weights_only=True)["history"]["train_loss"]
              for p in runs}
    assert len(losses["bf16"]) == 6
    assert np.isfinite(losses["bf16"]).all()
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], atol=0.05)
    m32, m16 = runs["fp32"].metrics, runs["bf16"].metrics
    assert np.isfinite(list(m16.values())).all()
    assert abs(m16["val_loss"] - m32["val_loss"]) <= 0.05
    assert abs(m16["val_top10"] - m32["val_top10"]) <= 0.02
