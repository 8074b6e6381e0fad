"""Throughput of genecorpus's model code paths beside the plain single-process loop, on the same real data.

Usage::

    .venv/bin/python benchmarks/model_speed.py [--preset small] [--steps 10] [--batch-size 8]
        [--max-length N] [--embed-cells 300] [--precision auto] [--only pretrain,embed] [--json FILE]

Data: the Kang 2018 PBMC control cells (``genecorpus.public_data``, downloaded once), built once into a
corpus under ``--cache-dir`` (default ``benchmarks/.cache``, or ``$GENECORPUS_BENCH_DIR``). Both sides of
each comparison run in this process, on the same cells, with the same preset, batch size, max length,
learning rate and masking rule; random weights (a model's speed does not depend on its weights).

- **pretrain, ours**: :func:`genecorpus.model.pretrain.pretrain` itself — length-grouped batches, the MLM
  head on the masked positions only, SDPA attention, ``--precision`` autocast — timed by its own record of
  the seconds spent in training steps (``training.train_seconds``: batch assembly, masking, forward,
  backward, optimizer; no evaluation or checkpoint).
- **pretrain, plain**: the loop one writes first — batches of random cells padded to the longest,
  ``BertForMaskedLM(input_ids, attention_mask, labels=...)`` (logits for every position and the whole
  vocabulary), eager attention, fp32, AdamW and gradient clipping as ours.
- **embed, ours**: :func:`genecorpus.model.embed.embed_corpus` — cells sorted by length, only the layers up
  to the chosen one, SDPA, autocast — timed by its own record (``uns["genecorpus"]["seconds"]``).
- **embed, plain**: cells in random order padded to the longest of each batch, the whole eager model with
  ``output_hidden_states=True``, mean of layer -2 over the gene positions.

Rates: cells (samples) per second and *real* tokens (padding not counted) per second; the ratio is ours
over plain. The first step or batch of each side is included on both sides (one-off costs alike). On a
shared machine the speed moves with the other jobs, so each comparison runs ``--repeats`` times, the two
sides alternating, and each side's best round is reported (the least disturbed one).
- **finetune, ours**: :func:`genecorpus.model.finetune.finetune` — length-grouped batches, SDPA, autocast —
  timed by its own record (``training.runs[0].train_seconds``) on a two-class label every corpus has (cells
  deeper or shallower than the median; speed does not depend on what is learnt), from random weights.
- **finetune, plain**: random batches of the same training cells padded to the longest,
  ``BertForSequenceClassification(labels=...)``, eager attention, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Callable

    from genecorpus.corpus import CorpusReader

DEFAULT_CACHE = Path(__file__).resolve().parent / ".cache"


@dataclass(frozen=True)
class Rate:
    """One side of a comparison: what it processed and in how many seconds."""

    cells: int
    tokens: int
    """Real (non-padding) tokens."""
    seconds: float

    @property
    def cells_per_second(self) -> float:
        return self.cells / self.seconds

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds


@dataclass(frozen=True)
class Comparison:
    task: str
    ours: Rate
    plain: Rate | None
    note: str = ""


def kang_corpus(cache: Path) -> Path:
    """The Kang 2018 PBMC control cells as a genecorpus corpus (gc30m layout, our dictionary), built once."""
    from genecorpus.build import build_corpus
    from genecorpus.config import BuildConfig, DatasetSpec
    from genecorpus.public_data import fetch_public_file

    out = cache / "model-speed" / "kang-control-corpus"
    if (out / "manifest.json").is_file():
        return out
    spec = DatasetSpec(path=str(fetch_public_file("kang_pbmc_control")), id="kang_ctrl", gene_id="symbol",
                       release="grch37")
    build_corpus(BuildConfig(datasets=(spec,)), out, workers=1, report=False)
    return out


# ---------------------------------------------------------------- pretrain

def measure_pretrain(corpus: Path, work: Path, args: argparse.Namespace) -> Comparison:
    from genecorpus.model.pretrain import pretrain

    result = pretrain(corpus, work / "ours", preset=args.preset, max_steps=args.steps, batch_size=args.batch_size,
                      max_length=args.max_length, val_cells=8, eval_every=10**9, save_every=10**9,
                      baseline_cells=200, precision=args.precision, device=args.device, overwrite=True)
    t = result.info["training"]
    ours = Rate(t["steps"] * args.batch_size, int(t["tokens_seen"]), float(t["train_seconds"]))
    plain = plain_pretrain(corpus, args, max_length=int(result.info["settings"]["max_length"]))
    setting = f"{args.steps} steps of {args.batch_size} cells, max length {result.info['settings']['max_length']}"
    return Comparison("pretrain", ours, plain, f"{setting}, ours {t['precision']}/{t['attention']}, plain fp32/eager")


def plain_pretrain(corpus: Path, args: argparse.Namespace, *, max_length: int) -> Rate:
    import torch
    from transformers import BertForMaskedLM

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.bert import bert_config, pick_device
    from genecorpus.model.masking import mask_genes, pad_cells
    from genecorpus.model.pretrain import MAX_POSITIONS

    reader = CorpusReader.open(corpus)
    tdict = reader.token_dictionary
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(args.preset, tdict, max_positions=MAX_POSITIONS[tdict.layout().name]))
    model.set_attn_implementation("eager")
    model.to(device).train()
    order = np.random.default_rng(0).permutation(reader.n_cells)

    def batch_at(step: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        rows = order[step * args.batch_size:(step + 1) * args.batch_size]
        batch = mask_genes(pad_cells(reader.batch(rows), tdict, max_length=max_length), tdict,
                           np.random.default_rng([0, 1, step]))
        return len(rows), batch.input_ids, batch.attention_mask, batch.labels

    return _plain_steps(model, batch_at, steps=args.steps, lr=1e-3, device=device)


def _plain_steps(model: Any, batch_at: Callable[[int], tuple[int, np.ndarray, np.ndarray, np.ndarray]], *,
                 steps: int, lr: float, device: Any) -> Rate:
    """The plain loop's ``steps`` training steps: AdamW, clipping at 1, one batch per step.

    ``batch_at(step)`` gives the step's cell count, ``input_ids``, ``attention_mask`` and ``labels``
    (NumPy arrays); its reading and padding are timed with the step, as they are in ours.
    """
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.001)
    cells = tokens = 0
    started = time.perf_counter()
    for step in range(steps):
        n_cells, input_ids, attention_mask, labels = batch_at(step)
        out = model(input_ids=torch.from_numpy(input_ids).to(device),
                    attention_mask=torch.from_numpy(attention_mask).to(device),
                    labels=torch.from_numpy(labels).to(device))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(out.loss.detach())  # waits for the device
        cells += n_cells
        tokens += int(attention_mask.sum())
    return Rate(cells, tokens, time.perf_counter() - started)


def _random_model_folder(preset: str, tdict: Any, folder: Path) -> Path:
    """A model folder of ``preset`` with seeded random weights (speed does not depend on the weights)."""
    import torch
    from transformers import BertForMaskedLM

    from genecorpus.model.bert import bert_config, save_model
    from genecorpus.model.pretrain import MAX_POSITIONS

    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset, tdict, max_positions=MAX_POSITIONS[tdict.layout().name]))
    return save_model(model, folder, tdict)


# ---------------------------------------------------------------- embed

def measure_embed(corpus: Path, work: Path, args: argparse.Namespace) -> Comparison:

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.embed import embed_corpus
    from genecorpus.model.pretrain import MAX_POSITIONS

    reader = CorpusReader.open(corpus)
    tdict = reader.token_dictionary
    model_path = _random_model_folder(args.preset, tdict, work / "embed-model")
    rows = np.sort(np.random.default_rng(0).choice(reader.n_cells, min(args.embed_cells, reader.n_cells),
                                                   replace=False))
    max_length = args.max_length or MAX_POSITIONS[tdict.layout().name]
    embed_corpus(corpus, model_path, out=work / "warm.h5ad", cells=rows[:8], device=args.device)  # imports, allocator
    adata = embed_corpus(corpus, model_path, out=work / "ours.h5ad", cells=rows, batch_size=args.batch_size,
                         max_length=max_length, precision=args.precision, device=args.device)
    tokens = int(np.minimum(reader.lengths[rows], max_length).sum())
    ours = Rate(len(rows), tokens, float(adata.uns["genecorpus"]["seconds"]))
    plain = plain_embed(reader, model_path, rows, args, max_length=max_length)
    u = adata.uns["genecorpus"]
    return Comparison("embed", ours, plain, f"{len(rows)} cells, batch {args.batch_size}, layer -2, "
                                            f"ours {u['precision']}/{u['attention']}, plain fp32/eager")


def plain_embed(reader: CorpusReader, model_path: Path, rows: np.ndarray, args: argparse.Namespace, *,
                max_length: int) -> Rate:
    import torch
    from transformers import BertForMaskedLM

    from genecorpus.model.bert import pick_device
    from genecorpus.model.masking import pad_cells

    tdict = reader.token_dictionary
    device = pick_device(args.device)
    model = BertForMaskedLM.from_pretrained(model_path, attn_implementation="eager").to(device).eval()
    specials = np.array(sorted(tdict.special.values()))
    order = np.random.default_rng(1).permutation(rows)
    tokens = 0
    started = time.perf_counter()
    with torch.no_grad():
        for start in range(0, len(order), args.batch_size):
            batch = pad_cells(reader.batch(order[start:start + args.batch_size]), tdict, max_length=max_length)
            ids = torch.from_numpy(batch.input_ids).to(device)
            attention = torch.from_numpy(batch.attention_mask).to(device)
            states = model.bert(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-2]
            genes = (attention.bool() & ~torch.isin(ids, torch.from_numpy(specials).to(device))).unsqueeze(-1)
            ((states * genes).sum(1) / genes.sum(1).clamp(min=1)).cpu().numpy()
            tokens += int(batch.attention_mask.sum())
    return Rate(len(rows), tokens, time.perf_counter() - started)


# ---------------------------------------------------------------- finetune

def measure_finetune(corpus: Path, work: Path, args: argparse.Namespace) -> Comparison:
    import pandas as pd

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.finetune import finetune

    reader = CorpusReader.open(corpus)
    tdict = reader.token_dictionary
    start = _random_model_folder(args.preset, tdict, work / "finetune-start")
    # a two-class label every corpus has (speed does not depend on what is learnt): deeper or shallower cells
    labels = work / "depth-labels.csv"
    deep = reader.lengths > np.median(reader.lengths)
    pd.DataFrame({"cell_id": reader.column("cell_id"),
                  "depth": np.where(deep, "deep", "shallow")}).to_csv(labels, index=False)
    result = finetune(corpus, work / "classifier", model=start, label="depth", labels=labels, join="cell_id",
                      max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, lr=1e-4,
                      eval_every=10**9, patience=None, baseline=False, precision=args.precision, device=args.device,
                      overwrite=True)
    run = result.info["training"]["runs"][0]
    ours = Rate(run["steps"] * args.batch_size, int(run["tokens_seen"]), float(run["train_seconds"]))
    max_length = int(result.info["settings"]["max_length"])
    split = pd.read_csv(work / "classifier" / "split.csv")
    train_rows = split.loc[split["split"] == "train", "corpus_row"].to_numpy()
    y = (reader.lengths[train_rows] > np.median(reader.lengths)).astype(np.int64)  # classes sort: deep < shallow
    plain = plain_finetune(reader, start, train_rows, 1 - y, args, max_length=max_length)
    t = result.info["training"]
    return Comparison("finetune", ours, plain, f"{args.steps} steps of {args.batch_size} cells, max length "
                                               f"{max_length}, ours {t['precision']}/sdpa, plain fp32/eager")


def plain_finetune(reader: CorpusReader, model_path: Path, rows: np.ndarray, y: np.ndarray, args: argparse.Namespace,
                   *, max_length: int) -> Rate:
    """Random batches of the training cells padded to the longest, ``BertForSequenceClassification(labels=...)``
    with eager attention, fp32, AdamW and gradient clipping as ours."""
    import torch
    from transformers import BertForSequenceClassification

    from genecorpus.model.bert import pick_device
    from genecorpus.model.masking import pad_cells

    tdict = reader.token_dictionary
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(model_path, num_labels=2, attn_implementation="eager")
    model.to(device).train()
    order = np.random.default_rng(0).permutation(len(rows))

    def batch_at(step: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        pick = order[(step * args.batch_size) % len(rows):][:args.batch_size]
        batch = pad_cells(reader.batch(rows[pick]), tdict, max_length=max_length)
        return len(pick), batch.input_ids, batch.attention_mask, y[pick]

    return _plain_steps(model, batch_at, steps=args.steps, lr=1e-4, device=device)


MEASUREMENTS = {"pretrain": measure_pretrain, "embed": measure_embed, "finetune": measure_finetune}


# ---------------------------------------------------------------- main

def best_of(rounds: list[Comparison]) -> Comparison:
    """Each side's fastest round (tokens/s), with every round's rates in the note."""
    ours = max((c.ours for c in rounds), key=lambda r: r.tokens_per_second)
    plains = [c.plain for c in rounds if c.plain is not None]
    plain = max(plains, key=lambda r: r.tokens_per_second) if plains else None
    if len(rounds) > 1 and plain is not None:
        spread = "; rounds (tokens/s ours/plain): " + ", ".join(
            f"{c.ours.tokens_per_second:.0f}/{c.plain.tokens_per_second:.0f}" for c in rounds if c.plain)
    else:
        spread = ""
    return Comparison(rounds[0].task, ours, plain, rounds[0].note + spread)

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=10, help="Training steps of each side.")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None,
                        help="Tokens per cell (default: pretrain's default, the longest cell within the layout's cap).")
    parser.add_argument("--embed-cells", type=int, default=300)
    parser.add_argument("--precision", default="auto", help="Ours: auto, fp32 or bf16 (plain is always fp32).")
    parser.add_argument("--device", default=None)
    parser.add_argument("--only", default="pretrain,embed,finetune")
    parser.add_argument("--repeats", type=int, default=2, help="Rounds per comparison (sides alternate; best kept).")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("GENECORPUS_BENCH_DIR", DEFAULT_CACHE)))
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures to this file.")
    args = parser.parse_args()
    os.environ.setdefault("GENECORPUS_NO_PROGRESS", "1")

    import torch

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.bert import quiet_transformers

    quiet_transformers()
    corpus = kang_corpus(args.cache_dir)
    lengths = CorpusReader.open(corpus).lengths
    print(f"corpus: Kang 2018 PBMC control, {len(lengths):,} cells, tokens per cell median {int(np.median(lengths))}, "
          f"max {int(lengths.max())}; preset {args.preset}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    print(f"{'':<9}{'ours cells/s':>13}{'tokens/s':>10}{'plain cells/s':>15}{'tokens/s':>10}{'ratio':>7}  setting")
    with tempfile.TemporaryDirectory(prefix="model-speed-") as tmp:
        for name in args.only.split(","):
            rounds = [MEASUREMENTS[name](corpus, Path(tmp) / f"{name}-{r}", args) for r in range(args.repeats)]
            c = best_of(rounds)
            results.append(c)
            if c.plain is None:
                print(f"{c.task:<9}{'':>55}  {c.note}", flush=True)
                continue
            print(f"{c.task:<9}{c.ours.cells_per_second:>13.2f}{c.ours.tokens_per_second:>10.0f}"
                  f"{c.plain.cells_per_second:>15.2f}{c.plain.tokens_per_second:>10.0f}"
                  f"{c.ours.tokens_per_second / c.plain.tokens_per_second:>6.2f}×  {c.note}", flush=True)
    if args.json:
        args.json.write_text(json.dumps([{**asdict(c), "ratio_tokens_per_second": (
            c.ours.tokens_per_second / c.plain.tokens_per_second if c.plain else None)} for c in results], indent=2))


if __name__ == "__main__":
    main()
