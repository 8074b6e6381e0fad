"""Pretraining: masking rules, the length-grouped sampler, the held-out split, the rank baseline,
training on a real corpus, resume, the model folder and the command line."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import time
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch  # the train extra: make test installs it, so a missing one fails here
import transformers
from kang_corpus import kang_corpus

from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.masking import IGNORE_INDEX, mask_genes, pad_cells
from genecorpus.model.pretrain import pretrain
from genecorpus.model.rank_baseline import RankFrequencyBaseline, position_bins
from genecorpus.model.sampling import LengthGroupedSampler, split_cells
from genecorpus.model.schedule import (
    VALIDATION_SHARE,
    LearningRateSchedule,
    MeasuredTimes,
    WorkSizes,
    measuring_done,
    plan_steps_for_time,
    plan_validation,
    replan_steps,
)
from genecorpus.vocab import TokenDictionary

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Small settings that keep each run to seconds on a shared CPU.
FAST = {"preset": "tiny", "batch_size": 4, "max_length": 64, "val_cells": 24, "baseline_cells": 200}
# The same with the default, bounded validation (no val_cells).
FAST_AUTO_VAL = {k: v for k, v in FAST.items() if k != "val_cells"}


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def real_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Kang 2018 PBMC cells as two datasets: 300 control and 150 IFN-β-stimulated cells."""
    return kang_corpus(tmp_path_factory.mktemp("pretrain-corpus"), 300, 150, seed=0)


@pytest.fixture
def warm_imports() -> None:
    """Import what a first run imports (seconds), so that a test's time limit is the run's, not the imports'."""
    import matplotlib.pyplot  # noqa: F401 - the loss curve
    from transformers import BertForMaskedLM  # noqa: F401


def gc104m_dictionary(n_genes: int = 40) -> TokenDictionary:
    """A gc104m-style dictionary: <pad> 0, <mask> 1, <cls> 2, <eos> 3, then genes."""
    mapping = {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    mapping.update({f"ENSG{i:011d}": 4 + i for i in range(n_genes)})
    return TokenDictionary.from_mapping(mapping)


def gc104m_cells(tdict: TokenDictionary, rng: np.random.Generator, n_cells: int) -> list[np.ndarray]:
    """Cells ``<cls> genes… <eos>`` of 0 to 40 distinct genes in random order."""
    cls, eos = tdict.special["<cls>"], tdict.special["<eos>"]
    cells = []
    for _ in range(n_cells):
        genes = rng.permutation(tdict.gene_tokens)[: rng.integers(0, len(tdict.gene_tokens) + 1)]
        cells.append(np.concatenate([[cls], genes, [eos]]).astype(np.int16))
    return cells


# ---------------------------------------------------------------- masking

def test_masking_never_selects_special_tokens_or_padding() -> None:
    tdict = gc104m_dictionary()
    rng = np.random.default_rng(1)
    specials = set(tdict.special.values())
    for _ in range(200):
        batch = pad_cells(gc104m_cells(tdict, rng, 8), tdict)
        masked = mask_genes(batch, tdict, rng)
        selected = masked.labels != IGNORE_INDEX
        # selected positions hold genes in the original; specials and padding are untouched
        assert not np.isin(batch.input_ids[selected], list(specials)).any()
        assert (batch.attention_mask[selected] == 1).all()
        untouched = ~selected
        assert (masked.input_ids[untouched] == batch.input_ids[untouched]).all()
        assert (masked.labels[selected] == batch.input_ids[selected]).all()


def test_masking_proportions_and_random_tokens_are_genes(real_corpus: Path) -> None:
    reader = CorpusReader.open(real_corpus)
    tdict = reader.token_dictionary
    mask_id = tdict.special["<mask>"]
    genes = set(tdict.gene_tokens.tolist())
    rng = np.random.default_rng(7)
    n_genes = n_selected = n_mask = n_random = n_same = 0
    expected_selected = 0.0
    for start in range(0, 400, 8):
        batch = pad_cells(reader.batch(np.arange(start, start + 8)), tdict, max_length=256)
        masked = mask_genes(batch, tdict, rng)
        sel = masked.labels != IGNORE_INDEX
        per_cell_genes = (batch.attention_mask == 1).sum(axis=1)  # this corpus has no special tokens
        n_genes += int(per_cell_genes.sum())
        expected_selected += float(np.maximum(0.15 * per_cell_genes, 1).sum())
        n_selected += int(sel.sum())
        new, old = masked.input_ids[sel], masked.labels[sel]
        n_mask += int((new == mask_id).sum())
        replaced = new[(new != mask_id) & (new != old)]
        assert set(replaced.tolist()) <= genes
        n_random += len(replaced)
        n_same += int((new == old).sum())
    # 15 % of the genes, rounded at random per cell: the total is within a few cells of its expectation
    assert abs(n_selected - expected_selected) < 4 * math.sqrt(400 * 0.25) + 1
    assert abs(n_selected / n_genes - 0.15) < 0.005
    # 80/10/10 within 4 binomial standard deviations (a random gene equal to the original counts as
    # unchanged: probability 1/n_genes, negligible with ~10,000 genes)
    for count, p in ((n_mask, 0.8), (n_random, 0.1 * (1 - 1 / len(genes))), (n_same, 0.1 + 0.1 / len(genes))):
        assert abs(count - p * n_selected) < 4 * math.sqrt(n_selected * p * (1 - p)), (count, p, n_selected)


def test_random_replacements_are_uniform_over_gene_tokens() -> None:
    tdict = gc104m_dictionary(n_genes=20)
    rng = np.random.default_rng(3)
    counts: Counter[int] = Counter()
    for _ in range(400):
        batch = pad_cells(gc104m_cells(tdict, rng, 16), tdict)
        masked = mask_genes(batch, tdict, rng)
        sel = masked.labels != IGNORE_INDEX
        action = masked.input_ids[sel]
        counts.update(action[action != tdict.special["<mask>"]].tolist())
    assert set(counts) <= set(tdict.gene_tokens.tolist())
    observed = np.array([counts[t] for t in tdict.gene_tokens.tolist()], dtype=float)
    expected = observed.sum() / len(observed)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 45  # 19 degrees of freedom: P(chi2 > 45) < 0.001


def test_at_least_one_gene_selected_per_cell_and_none_in_empty_cells() -> None:
    tdict = gc104m_dictionary()
    cls, eos = tdict.special["<cls>"], tdict.special["<eos>"]
    cells = [np.array([cls, eos]), np.array([cls, 10, eos]), np.array([cls, 10, 11, eos]),
             np.array([cls, eos])]
    for seed in range(50):
        masked = mask_genes(pad_cells(cells, tdict), tdict, np.random.default_rng(seed))
        assert ((masked.labels != IGNORE_INDEX).sum(axis=1) == [0, 1, 1, 0]).all()


def test_masking_is_a_pure_function_of_the_generator() -> None:
    tdict = gc104m_dictionary()
    batch = pad_cells(gc104m_cells(tdict, np.random.default_rng(0), 8), tdict)
    before = batch.input_ids.copy()
    a = mask_genes(batch, tdict, np.random.default_rng(5))
    b = mask_genes(batch, tdict, np.random.default_rng(5))
    assert (a.input_ids == b.input_ids).all() and (a.labels == b.labels).all()
    assert (batch.input_ids == before).all()


def test_padding_and_truncation_keep_eos() -> None:
    tdict = gc104m_dictionary()
    cells = [np.array([2, 10, 11, 12, 13, 3], dtype=np.int16), np.array([2, 10, 3], dtype=np.int16)]
    batch = pad_cells(cells, tdict, max_length=4)
    assert batch.input_ids.tolist() == [[2, 10, 11, 3], [2, 10, 3, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert batch.input_ids.dtype == np.int64


# ---------------------------------------------------------------- sampler and split

def test_sampler_visits_every_cell_once_per_epoch(real_corpus: Path) -> None:
    lengths = CorpusReader.open(real_corpus).lengths
    rows = np.arange(len(lengths))[::2]  # a training subset
    sampler = LengthGroupedSampler(rows, lengths[rows], batch_size=8, seed=3)
    for epoch in range(3):
        batches = list(sampler)
        seen = np.concatenate(batches)
        assert sorted(seen.tolist()) == rows.tolist()
        assert len(batches) == math.ceil(len(rows) / 8)
        assert sum(len(b) < 8 for b in batches) <= 1
        assert sampler.epoch == epoch + 1
    first, second = sampler.epoch_batches(0), sampler.epoch_batches(1)
    assert not all((a == b).all() for a, b in zip(first, second, strict=True))


def test_sampler_groups_by_length(real_corpus: Path) -> None:
    lengths = CorpusReader.open(real_corpus).lengths
    rows = np.arange(len(lengths))

    def padding(batches: list[np.ndarray]) -> int:
        return int(sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches))

    grouped = padding(LengthGroupedSampler(rows, lengths, batch_size=8, seed=0).epoch_batches(0))
    perm = np.random.default_rng(0).permutation(rows)
    random = padding([perm[i:i + 8] for i in range(0, len(perm), 8)])
    assert grouped < 0.25 * random, (grouped, random)


def test_sampler_is_deterministic_and_resumes(real_corpus: Path) -> None:
    lengths = CorpusReader.open(real_corpus).lengths
    rows = np.arange(len(lengths))
    a = LengthGroupedSampler(rows, lengths, batch_size=16, seed=9)
    reference = [a.next_batch() for _ in range(70)]  # crosses the end of epoch 1 (29 batches each)
    b = LengthGroupedSampler(rows, lengths, batch_size=16, seed=9)
    first = [b.next_batch() for _ in range(33)]
    state = json.loads(json.dumps(b.state_dict()))
    c = LengthGroupedSampler(rows, lengths, batch_size=16, seed=9)
    c.load_state_dict(state)
    rest = [c.next_batch() for _ in range(37)]
    assert all((x == y).all() for x, y in zip(reference, first + rest, strict=True))
    other = LengthGroupedSampler(rows, lengths, batch_size=8, seed=9)
    with pytest.raises(ConfigError, match="batch_size"):
        other.load_state_dict(state)


def test_split_holds_out_whole_datasets(real_corpus: Path) -> None:
    reader = CorpusReader.open(real_corpus)
    datasets = reader.dataset_ids()
    split = split_cells(reader.lengths, datasets, val_fraction=0.05, seed=0)
    assert split.by == "dataset" and len(split.val_datasets) == 1
    held = datasets[split.val_rows]
    assert set(held.tolist()) == set(split.val_datasets)
    assert not set(datasets[split.train_rows].tolist()) & set(split.val_datasets)
    assert len(split.train_rows) + split.n_held_out == reader.n_cells


def test_split_holds_out_the_datasets_asked_for() -> None:
    datasets = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 20, dtype=object)
    split = split_cells(np.ones(100, np.int64), datasets, val_fraction=0.05, val_cells=1000, hold_out=("c", "a"))
    assert split.by == "dataset" and split.val_datasets == ("a", "c")
    np.testing.assert_array_equal(split.train_rows, np.arange(50, 80))
    np.testing.assert_array_equal(split.val_rows, np.r_[0:50, 80:100])
    assert split.n_held_out == 70
    with pytest.raises(ConfigError, match=r"--hold-out-datasets d: the corpus has no dataset 'd'; its datasets: a, b, c"):
        split_cells(np.ones(100, np.int64), datasets, hold_out=("d",))
    with pytest.raises(ConfigError, match="that is every dataset of the corpus"):
        split_cells(np.ones(100, np.int64), datasets, hold_out=("a", "b", "c"))


def test_split_by_dataset_reaches_the_fraction_and_never_takes_all() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(50, 500, size=30)
    ids = np.repeat([f"d{i}" for i in range(30)], sizes).astype(object)
    lengths = np.ones(len(ids), dtype=np.int64)
    chosen = set()
    for seed in range(5):
        split = split_cells(lengths, ids, val_fraction=0.1, val_cells=10**6, seed=seed)
        n_held = sum(int(sizes[int(d[1:])]) for d in split.val_datasets)
        assert split.n_held_out == n_held >= 0.1 * len(ids)
        assert n_held <= 0.2 * len(ids) + 1  # close to the target: within twice it
        again = split_cells(lengths, ids, val_fraction=0.1, val_cells=10**6, seed=seed)
        assert again.val_datasets == split.val_datasets
        chosen.add(split.val_datasets)
    assert len(chosen) > 1  # the seed decides
    two = np.array(["a"] * 10 + ["b"] * 10, dtype=object)
    split = split_cells(np.ones(20, np.int64), two, val_fraction=0.9, seed=0)
    assert len(split.val_datasets) == 1 and len(split.train_rows) == 10


def test_split_by_cell_without_datasets_and_val_cap() -> None:
    lengths = np.ones(1000, dtype=np.int64)
    split = split_cells(lengths, None, val_fraction=0.2, val_cells=50, seed=1)
    assert split.by == "cell" and split.n_held_out == 200 and len(split.val_rows) == 50
    assert len(split.train_rows) == 800
    assert not set(split.train_rows.tolist()) & set(split.val_rows.tolist())
    with pytest.raises(ConfigError, match="val-fraction"):
        split_cells(lengths, None, val_fraction=1.5)


# ---------------------------------------------------------------- baseline

def test_rank_baseline_matches_a_slow_count(real_corpus: Path) -> None:
    reader = CorpusReader.open(real_corpus)
    tdict = reader.token_dictionary
    cells = [reader.input_ids(r) for r in range(200)]
    baseline = RankFrequencyBaseline.fit(iter(cells), tdict, max_length=300)
    # slow reference: Counter per position bin, bins from the definition (exact < 64, 4 per octave)
    def bin_of(p: int) -> int:
        return p if p < 64 else 64 + math.floor(math.log2(p / 64) * 4 + 1e-9)
    counters: dict[int, Counter[int]] = {}
    for cell in cells:
        for p, t in enumerate(cell[:300].tolist()):
            counters.setdefault(bin_of(p), Counter())[t] += 1
    for b, counter in counters.items():
        top = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
        assert baseline.top[b].tolist() == [t for t, _ in top]
    labels = np.full((2, 300), IGNORE_INDEX, dtype=np.int64)
    positions = [(0, 0), (0, 5), (1, 70), (1, 299)]
    truth = [int(cells[0][0]), int(cells[1][5]), int(cells[2][70]), int(cells[3][299])]
    for (row, pos), t in zip(positions, truth, strict=True):
        labels[row, pos] = t
    score = baseline.score(labels)
    n_genes = len(tdict.gene_tokens)
    expect = 0.0
    for (_, pos), t in zip(positions, truth, strict=True):
        c = counters[bin_of(pos)]
        expect -= math.log((c[t] + 1) / (sum(c.values()) + n_genes))
    assert score["n"] == 4
    assert score["loss_sum"] == pytest.approx(expect, rel=1e-9)
    assert position_bins(np.array([299]))[0] == bin_of(299)


# ---------------------------------------------------------------- training

def test_tiny_lowers_the_loss_on_a_real_corpus(real_corpus: Path, tmp_path: Path) -> None:
    result = pretrain(real_corpus, tmp_path / "model", max_steps=24, eval_every=8, lr=3e-3, **FAST)
    evals = result.info["evals"]
    assert [e["step"] for e in evals] == [8, 16, 24]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    train_loss = torch.load(tmp_path / "model" / "checkpoint" / "training_state.pt",
                            weights_only=True)["history"]["train_loss"]
    assert len(train_loss) == 24 and np.mean(train_loss[-6:]) < np.mean(train_loss[:6]) - 0.1
    assert result.steps == 24 and result.info["training"]["tokens_seen"] > 24 * 4 * 10
    # the baseline is scored on the same masked positions at every evaluation
    assert len({(e["baseline_val_loss"], e["n_masked"]) for e in evals}) == 1


def test_model_folder_opens_with_from_pretrained(real_corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    result = pretrain(real_corpus, out, max_steps=6, **FAST)
    model = transformers.BertForMaskedLM.from_pretrained(out)
    assert model.config.vocab_size == CorpusReader.open(real_corpus).token_dictionary.max_token + 1
    assert model.config.max_position_embeddings == 2048
    assert TokenDictionary.load(out / "token_dictionary.pkl").to_mapping() == \
        CorpusReader.open(real_corpus).token_dictionary.to_mapping()
    info = json.loads((out / "genecorpus_model.json").read_text())
    assert info["split"]["by"] == "dataset" and len(info["split"]["val_datasets"]) == 1
    assert info["metrics"] == result.metrics
    assert set(result.metrics) == {"val_loss", "val_top1", "val_top10", "baseline_val_loss",
                                   "baseline_val_top1", "baseline_val_top10"}
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint" / "training_state.pt").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for path in [*out.iterdir(), *(out / "checkpoint").iterdir()]:  # the user's usual permissions, not 0600
        assert path.stat().st_mode & 0o777 == (0o777 if path.is_dir() else 0o666) & ~umask, path
    last = transformers.BertForMaskedLM.from_pretrained(out / "checkpoint").state_dict()
    assert all(torch.equal(value, last[key]) for key, value in model.state_dict().items())
    with pytest.raises(ConfigError, match=r"--resume .* --overwrite"):
        pretrain(real_corpus, out, max_steps=6, **FAST)


class _CrashError(RuntimeError):
    pass


def test_resume_continues_the_same_trajectory(real_corpus: Path, tmp_path: Path) -> None:
    settings = {**FAST, "max_steps": 12, "save_every": 4, "eval_every": 4, "seed": 11}
    straight = pretrain(real_corpus, tmp_path / "a", **settings)

    def crash_at_step_6(stage: str, done: int, total: int) -> None:
        if done == 6:
            raise _CrashError

    with pytest.raises(_CrashError):
        pretrain(real_corpus, tmp_path / "b", progress=crash_at_step_6, **settings)
    state = json.loads((tmp_path / "b" / "checkpoint" / "training_state.json").read_text())
    assert state["step"] == 4
    resumed = pretrain(real_corpus, tmp_path / "b", resume=True, **settings)
    a = json.loads((tmp_path / "a" / "genecorpus_model.json").read_text())
    b = json.loads((tmp_path / "b" / "genecorpus_model.json").read_text())
    assert resumed.steps == straight.steps == 12
    ta = torch.load(tmp_path / "a" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    tb = torch.load(tmp_path / "b" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    np.testing.assert_allclose(tb["train_loss"], ta["train_loss"], rtol=1e-5)
    np.testing.assert_allclose([e["val_loss"] for e in b["evals"]], [e["val_loss"] for e in a["evals"]],
                               rtol=1e-5)
    # dropout is on (tiny: 0.02), so equal losses needed the torch RNG state restored too
    assert transformers.BertConfig.from_pretrained(tmp_path / "a").hidden_dropout_prob > 0
    with pytest.raises(ConfigError, match="seed"):
        pretrain(real_corpus, tmp_path / "b", resume=True, **{**settings, "seed": 12})


def test_time_limit_stops_cleanly(real_corpus: Path, tmp_path: Path) -> None:
    result = pretrain(real_corpus, tmp_path / "m", max_steps=1000, time_limit=1e-4, **FAST)
    assert result.stopped == "time_limit" and result.steps < 1000
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "m" / "checkpoint" / "training_state.pt").is_file()


# ---------------------------------------------------------------- the schedule and validation plans

def test_validation_plan_keeps_to_its_share_and_to_what_the_user_gave() -> None:
    sizes = WorkSizes(batch_size=8, train_tokens_per_step=8 * 450, val_tokens_per_cell=450, n_val_candidates=2000)
    # a long run: the whole default sample at every one of ~10 evaluations fits in the share
    long = plan_validation(20_000, sizes)
    assert long.n_val_cells == 2000 and long.n_intermediate == 9 and long.eval_every == 2000
    assert long.n_subset_batches == long.n_batches and long.estimated_share <= VALIDATION_SHARE + 1e-9
    # a shorter one: the whole sample at the end, a fixed subset of it before
    shorter = plan_validation(5000, sizes)
    assert shorter.n_val_cells == 2000 and shorter.n_intermediate == 9
    assert shorter.n_subset_batches < shorter.n_batches and shorter.estimated_share <= VALIDATION_SHARE + 1e-9
    # a run of 700 steps (20 CPU minutes of `small`): a smaller sample, still ~10 evaluations, within the share
    mid = plan_validation(700, sizes)
    assert 100 <= mid.n_val_cells < 2000 and mid.n_intermediate == 9
    assert mid.estimated_share <= VALIDATION_SHARE + 1e-9
    subset = mid.subset_batches()
    assert len(subset) == mid.n_subset_batches and subset[0] == 0 and subset[-1] == mid.n_batches - 1
    # a very short run: the sample's floor, and no intermediate evaluation that would not fit
    short = plan_validation(20, sizes)
    assert short.n_val_cells == 100 and short.n_intermediate == 0 and short.eval_every == 20
    # given val_cells: every evaluation scores all of them, as many evaluations as fit (at most ~10)
    fixed = plan_validation(700, sizes, fixed_val_cells=True)
    assert fixed.n_val_cells == 2000 and fixed.n_subset_batches == fixed.n_batches
    assert fixed.n_intermediate == 0 and fixed.eval_every == 700
    many = plan_validation(5000, sizes, fixed_val_cells=True)
    assert many.n_intermediate == 4 and many.estimated_share <= VALIDATION_SHARE + 1e-9
    # given eval_every: that rhythm, whatever it costs
    every = plan_validation(700, sizes, eval_every=10)
    assert every.eval_every == 10 and every.n_intermediate == 69 and every.n_subset_batches >= 1
    both = plan_validation(700, sizes, eval_every=50, fixed_val_cells=True)
    assert (both.eval_every, both.n_intermediate, both.n_val_cells) == (50, 13, 2000)
    # a resumed run given more steps keeps the sample and subset, and spreads as many evaluations
    longer = mid.with_steps(1400)
    assert (longer.n_val_cells, longer.n_subset_batches, longer.n_intermediate) == (
        mid.n_val_cells, mid.n_subset_batches, 9)
    assert longer.eval_every == 140 and longer.estimated_share < mid.estimated_share


def test_time_plan_fills_the_budget_and_no_more() -> None:
    sizes = WorkSizes(batch_size=8, train_tokens_per_step=4000, val_tokens_per_cell=500, n_val_candidates=2000)
    times = MeasuredTimes(train_seconds_per_token=4e-4, eval_seconds_per_token=1.2e-4, checkpoint_seconds=2.0,
                          model_seconds=1.5, n_steps=15, seconds=25.0)
    for budget in (60.0, 600.0, 1500.0, 6000.0):
        steps, validation, seconds = plan_steps_for_time(budget, times, sizes=sizes, save_every=500)
        # the estimate is the sum of its parts, and one more step would not fit in the budget less its margin
        val = validation.scored_cells * 500 * 1.2e-4
        writes = ((steps - 1) // 500 + 1) * 2.0 + 1.5
        assert seconds == pytest.approx(steps * 1.6 + val + writes)
        margin = max(1.0, 0.03 * budget)
        assert seconds <= budget - margin < seconds + 1.6 + 2.0 + validation.subset_cells * 500 * 1.2e-4 * 2
        assert validation.estimated_share <= VALIDATION_SHARE + 1e-9 or validation.n_val_cells == 100
    # a budget shorter than a step: one step (the run then stops at its time limit)
    assert plan_steps_for_time(1.0, times, sizes=sizes)[0] == 1
    # given val_cells and eval_every, the plan keeps them and trains less
    fixed, fixed_validation, _ = plan_steps_for_time(1500.0, times, sizes=sizes, eval_every=50, fixed_val_cells=True)
    assert fixed_validation.eval_every == 50 and fixed_validation.n_subset_batches == fixed_validation.n_batches
    assert fixed < plan_steps_for_time(1500.0, times, sizes=sizes)[0]


def test_measuring_stops_after_a_few_steps_or_a_share_of_the_budget() -> None:
    assert not measuring_done(1, 0.1, 600) and not measuring_done(2, 5.9, 600)
    assert measuring_done(3, 6.0, 600) and not measuring_done(3, 5.9, 600)  # three steps and 1 % of the budget
    assert measuring_done(51, 1.0, 600) and not measuring_done(50, 1.0, 600)  # fast steps: fifty of them
    assert measuring_done(2, 30.0, 600) and not measuring_done(1, 30.0, 600)  # slow steps: two of them
    assert measuring_done(1, 300.0, 600)  # one step took half the budget


def test_learning_rate_schedule_is_transformers_and_replans_continuously() -> None:
    from transformers.optimization import _get_linear_schedule_with_warmup_lr_lambda as reference

    for total in (1, 2, 9, 10, 11, 57, 1000, 12_345):
        for warmup in sorted({0, 1, total // 10, min(1000, total // 10), total - 1, total, total + 5}):
            schedule = LearningRateSchedule.linear(warmup_steps=warmup, total_steps=total)
            for step in range(total + 2):  # the same factors to the last bit
                assert schedule(step) == reference(step, num_warmup_steps=warmup, num_training_steps=total)
    # a re-plan keeps the factor of the step it happens at, and ends at 0 at the new count
    for step, total, warmup in ((30, 60, 10), (30, 200, 10), (5, 50, 8), (5, 400, 40), (99, 100, 10)):
        schedule = LearningRateSchedule.linear(warmup_steps=10, total_steps=100)
        before = [schedule(s) for s in range(step + 1)]
        schedule.replan(step, total_steps=total, warmup_steps=warmup)
        after = [schedule(s) for s in range(total + 2)]
        assert after[step] == before[step] and after[total] == 0.0 and after[total - 1] > 0.0
        np.testing.assert_allclose(after[:step], before[:step], rtol=1e-12)  # the steps done: unchanged
        tail = np.array(after[max(step, warmup):total + 1])
        assert np.all(np.diff(tail) < 0)  # falling to 0 once warmed up
        if step < warmup:
            assert max(after) == 1.0 and after[warmup] == 1.0


def test_replan_only_when_the_pace_misses_the_time_limit() -> None:
    on_time = {"seconds_per_step": 1.0, "limit_seconds": 1000}
    assert replan_steps(100, 500, seconds_left=430, **on_time) is None  # 400 steps + the 30 s margin
    assert replan_steps(100, 500, seconds_left=421, **on_time) is None  # 9 s late: the margin takes it
    assert replan_steps(100, 500, seconds_left=419, **on_time) == 489  # 11 s late: fewer steps
    assert replan_steps(100, 500, seconds_left=300, **on_time) == 370
    assert replan_steps(100, 500, seconds_left=470, **on_time) is None  # 40 s early: not worth a change
    assert replan_steps(100, 500, seconds_left=600, **on_time) == 670  # 170 s early: more steps
    assert replan_steps(100, 500, seconds_left=-5, **on_time) == 101  # out of time: end at the next step


@pytest.mark.usefixtures("warm_imports")
def test_time_limit_alone_plans_the_steps_and_ends_the_schedule(real_corpus: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # a wide safety margin; re-planning stays on: this machine's speed moves by tens of percent within seconds
    # when it is shared (make test runs two test processes), which is what re-planning is for
    monkeypatch.setattr("genecorpus.model.schedule.SAFETY_SHARE", 0.3)
    limit = 0.1  # minutes
    started = time.monotonic()
    result = pretrain(real_corpus, tmp_path / "m", time_limit=limit, lr=2e-3, save_every=10_000, **FAST_AUTO_VAL)
    took = time.monotonic() - started
    plan, training = result.info["plan"], result.info["training"]
    assert plan["planned_by"] == "time_limit" and plan["seconds_per_step"] > 0 and plan["measured_steps"] >= 2
    assert result.stopped == "planned_steps" and training["schedule_completed"]
    assert result.steps == plan["total_steps"] == training["total_steps"] >= 20
    first_total = plan["replans"][0]["from_total"] if plan["replans"] else plan["total_steps"]
    assert plan["warmup_steps"] == first_total // 10 == result.info["settings"]["warmup_steps"]
    assert result.info["settings"]["max_steps"] is None  # the plan decided, not a setting
    assert took < limit * 60 + 2.0  # a hard cap (plus the return from the call)
    history = torch.load(tmp_path / "m" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    rates = np.array(history["learning_rate"])
    assert len(rates) == result.steps and rates[0] == 0.0
    assert rates.max() == pytest.approx(2e-3) and int(np.argmax(rates)) == plan["warmup_steps"]
    assert np.all(np.diff(rates[plan["warmup_steps"]:]) < 0) and training["last_lr"] == rates[-1]
    # the schedule ran to its end: its last straight piece (from the warm-up, or from the last re-plan, which
    # keeps the rate and aims it at 0 at the new last step) reaches 0 one step after the last step
    start = max([plan["warmup_steps"], *(r["step"] for r in plan["replans"])])
    assert rates[-1] == pytest.approx(rates[start] / (result.steps - start), rel=1e-9)
    if plan["replans"]:  # the machine's pace changed: the schedule above still ran to its end
        return
    assert rates[-1] <= 0.05 * 2e-3
    # the measuring steps were undone: the same run as one given the planned steps and warm-up
    same = pretrain(real_corpus, tmp_path / "n", max_steps=plan["total_steps"], warmup_steps=plan["warmup_steps"],
                    lr=2e-3, save_every=10_000, **FAST_AUTO_VAL)
    again = torch.load(tmp_path / "n" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    assert again["train_loss"] == history["train_loss"] and again["learning_rate"] == history["learning_rate"]
    assert same.info["plan"]["planned_by"] == "max_steps" and same.stopped == "max_steps"


@pytest.mark.usefixtures("warm_imports")
def test_a_plan_that_was_too_optimistic_is_corrected_in_time(real_corpus: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from genecorpus.model import pretrain as pretrain_module

    plan = pretrain_module.plan_steps_for_time

    def four_times_too_many(budget: float, *args: object, **kwargs: object) -> object:
        return plan(4 * budget, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pretrain_module, "plan_steps_for_time", four_times_too_many)
    monkeypatch.setattr("genecorpus.model.schedule.SAFETY_SHARE", 0.2)
    limit = 0.1  # minutes
    started = time.monotonic()
    result = pretrain(real_corpus, tmp_path / "m", time_limit=limit, lr=2e-3, save_every=10_000, **FAST_AUTO_VAL)
    took = time.monotonic() - started
    plan_info = result.info["plan"]
    first = plan_info["replans"][0]
    assert first["total_steps"] < first["from_total"]  # fewer steps than the (wrong) plan
    assert plan_info["total_steps"] == result.steps == plan_info["replans"][-1]["total_steps"]
    assert result.stopped == "planned_steps" and result.info["training"]["schedule_completed"]
    assert took < limit * 60 + 2.0
    rates = np.array(torch.load(tmp_path / "m" / "checkpoint" / "training_state.pt",
                                weights_only=True)["history"]["learning_rate"])
    peak = int(np.argmax(rates))
    # the schedule ran to its end: falling, and one more step of the last slope reaches 0 (a late re-plan
    # leaves a steeper slope, so the last rate is not a set share of the peak)
    assert np.all(np.diff(rates[peak:]) <= 0) and rates[-1] <= 1.001 * (rates[-2] - rates[-1])


@pytest.mark.usefixtures("warm_imports")
def test_step_count_keeps_its_schedule_under_a_time_limit(real_corpus: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    settings = {**FAST, "max_steps": 12, "eval_every": 4, "seed": 3}
    plain = pretrain(real_corpus, tmp_path / "a", **settings)
    capped = pretrain(real_corpus, tmp_path / "b", time_limit=30, **settings)
    assert capped.info["plan"] == plain.info["plan"] and capped.info["plan"]["planned_by"] == "max_steps"
    assert [e["val_loss"] for e in capped.info["evals"]] == [e["val_loss"] for e in plain.info["evals"]]
    assert capped.stopped == plain.stopped == "max_steps"
    # a step count that cannot finish in time: kept (not re-planned), a warning early, the cap holds
    limit = 0.05  # minutes
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="genecorpus.model.pretrain"):
        cut = pretrain(real_corpus, tmp_path / "c", max_steps=100_000, time_limit=limit, **FAST)
    took = time.monotonic() - started
    assert cut.info["plan"]["total_steps"] == 100_000 and cut.info["plan"]["warmup_steps"] == 1000
    assert cut.stopped == "time_limit" and 0 < cut.steps < 100_000
    assert not cut.info["training"]["schedule_completed"]
    warnings = [r.getMessage() for r in caplog.records]
    assert any("will stop near step" in w and "give no --max-steps" in w for w in warnings), warnings
    assert any("before the learning-rate schedule ended" in w for w in warnings), warnings
    assert took < limit * 60 + 2.0


def test_validation_is_bounded_by_default_and_given_settings_are_kept(real_corpus: Path, tmp_path: Path) -> None:
    auto = pretrain(real_corpus, tmp_path / "a", max_steps=200, **FAST_AUTO_VAL)
    validation, evals = auto.info["plan"]["validation"], auto.info["evals"]
    n_val = auto.info["split"]["n_val_cells"]
    # a short run: a seeded sample of the 149 held-out cells, at least 100, and a subset of it before the end
    assert validation["n_val_cells"] == n_val and 100 <= n_val < auto.info["split"]["n_held_out_cells"] == 149
    assert 0 < validation["n_subset_batches"] < validation["n_batches"]
    assert [e["step"] for e in evals] == [20, 40, 60, 80, 100, 120, 140, 160, 180, 200]
    # intermediate evaluations score the same few cells every time; the final one all of them
    assert len({(e["n_cells"], e["n_masked"], e["baseline_val_loss"]) for e in evals[:-1]}) == 1
    assert evals[0]["n_cells"] <= n_val // 4 and evals[-1]["n_cells"] == n_val
    # the final record also holds the subset's metrics, to compare with the earlier evaluations
    assert evals[-1]["subset_n_masked"] == evals[0]["n_masked"] and "subset_val_loss" in evals[-1]
    # cells scored vs the 800 trained on, all of 64 tokens (a validation cell costs ~1/3 of a training cell);
    # ten evaluations of every held-out cell would have scored 1,490
    scored = sum(e["n_cells"] for e in evals)
    assert scored <= 0.25 * 200 * 4 and validation["estimated_share"] <= VALIDATION_SHARE
    assert auto.info["training"]["eval_seconds"] == pytest.approx(sum(e["seconds"] for e in evals), abs=0.01)
    # given eval_every: that rhythm (on the bounded subset); given val_cells: every evaluation scores them all
    every = pretrain(real_corpus, tmp_path / "b", max_steps=12, eval_every=4, **FAST_AUTO_VAL)
    assert [e["step"] for e in every.info["evals"]] == [4, 8, 12]
    cells = pretrain(real_corpus, tmp_path / "c", max_steps=12, val_cells=40, **FAST_AUTO_VAL)
    assert [e["n_cells"] for e in cells.info["evals"]] == [40] * len(cells.info["evals"])
    assert cells.info["split"]["n_val_cells"] == 40


@pytest.mark.usefixtures("warm_imports")
def test_resume_keeps_the_steps_planned_from_the_time_limit(real_corpus: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("genecorpus.model.schedule.SAFETY_SHARE", 0.3)
    settings = {**FAST_AUTO_VAL, "save_every": 4}

    def crash_at_step_6(stage: str, done: int, total: int) -> None:
        if done == 6:
            raise _CrashError

    with pytest.raises(_CrashError):
        pretrain(real_corpus, tmp_path / "m", time_limit=0.1, progress=crash_at_step_6, **settings)
    saved = json.loads((tmp_path / "m" / "checkpoint" / "training_state.json").read_text())
    assert saved["step"] == 4 and saved["plan"]["planned_by"] == "time_limit"
    resumed = pretrain(real_corpus, tmp_path / "m", resume=True, **settings)  # no time limit: no new plan
    assert resumed.info["plan"] == {**saved["plan"], "validation": resumed.info["plan"]["validation"]}
    assert resumed.steps == saved["total_steps"] and resumed.stopped == "planned_steps"
    assert resumed.info["training"]["schedule_completed"]


def test_bad_settings_are_one_line_errors(real_corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        pretrain(real_corpus, tmp_path / "m", max_steps=3, epochs=1)
    with pytest.raises(ConfigError, match="unknown; use one of tiny, small, gf-6l"):
        pretrain(real_corpus, tmp_path / "m", preset="huge")
    with pytest.raises(ConfigError, match="no checkpoint"):
        pretrain(real_corpus, tmp_path / "m", resume=True, max_steps=3)
    with pytest.raises(InputError, match="neither a save_to_disk folder"):
        pretrain(tmp_path, tmp_path / "m2", max_steps=3)
    bare = shutil.copytree(real_corpus, tmp_path / "bare")
    (bare / "token_dictionary.pkl").unlink()
    with pytest.raises(InputError, match=r"no token_dictionary\.pkl; pass the corpus's token dictionary"):
        pretrain(bare, tmp_path / "m2", max_steps=3)
    assert not (tmp_path / "m").exists() and not (tmp_path / "m2").exists()


def test_published_parquet_sample(tmp_path: Path, genecorpus_sample: Path, geneformer_dicts: Path) -> None:
    result = pretrain(genecorpus_sample, tmp_path / "m", max_steps=4, token_dictionary=geneformer_dicts /
                      "token_dictionary_gc30M.pkl", **FAST)
    assert result.info["split"]["by"] == "cell"
    assert result.info["split"]["n_held_out_cells"] == 25  # 5 % of 500
    model = transformers.BertForMaskedLM.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == TokenDictionary.load(
        geneformer_dicts / "token_dictionary_gc30M.pkl").max_token + 1


# ---------------------------------------------------------------- command line

def test_cli_pretrain_end_to_end_and_one_line_errors(real_corpus: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from genecorpus.cli import app

    runner = CliRunner()
    out = tmp_path / "model"
    args = ["pretrain", str(real_corpus), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
            "--batch-size", "4", "--max-length", "48", "--val-cells", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "baseline" in result.output and "top-10" in result.output
    assert (out / "config.json").is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    lines = [ln for ln in again.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "--resume" in lines[0]
    resumed = runner.invoke(app, [*args[:7], "6", *args[8:], "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "genecorpus_model.json").read_text())["training"]["steps"] == 6
    shown = runner.invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert "planned from it" in re.sub(r"[│\s]+", " ", shown.output)  # rich wraps the help in a box


def test_gc104m_corpus_keeps_cls_and_eos_and_never_masks_them(real_corpus: Path, tmp_path: Path,
                                                              geneformer_dicts: Path) -> None:
    from genecorpus.build import tokenize

    h5ad = real_corpus.parent / "kang_pbmc_ctrl.h5ad"
    corpus = tmp_path / "gc104m"
    tokenize([h5ad], corpus, token_dictionary=geneformer_dicts / "token_dictionary_gc95M.pkl",
             gene_medians=geneformer_dicts / "gene_median_dictionary_gc95M.pkl",
             gene_mapping=geneformer_dicts / "ensembl_mapping_dict_gc95M.pkl", layout="gc104m",
             gene_id="symbol", report=False)
    reader = CorpusReader.open(corpus)
    tdict = reader.token_dictionary
    cls, eos = tdict.special["<cls>"], tdict.special["<eos>"]
    rng = np.random.default_rng(0)
    for start in range(0, 96, 8):
        cells = reader.batch(np.arange(start, start + 8))
        batch = pad_cells(cells, tdict, max_length=32)
        assert (batch.input_ids[:, 0] == cls).all()
        ends = batch.attention_mask.sum(axis=1) - 1
        assert (batch.input_ids[np.arange(8), ends] == eos).all()
        masked = mask_genes(batch, tdict, rng)
        selected = masked.labels != IGNORE_INDEX
        assert not selected[:, 0].any() and not selected[np.arange(8), ends].any()
        # 15 % of the 30 genes of each cell (rounded at random per cell): 36 of 240, give or take a few
        assert abs(int(selected.sum()) - 0.15 * int((ends - 1).sum())) < 5
    result = pretrain(corpus, tmp_path / "m", max_steps=3, **{**FAST, "max_length": 32})
    config = transformers.BertConfig.from_pretrained(tmp_path / "m")
    assert config.max_position_embeddings == 4096 and result.info["layout"] == "gc104m"


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resume_continues(real_corpus: Path,
                                                                            tmp_path: Path) -> None:
    """A real SIGINT during step 6 (what Ctrl-C sends): the run saves a checkpoint at step 6 and stops with a
    note saying so; --resume then follows the uninterrupted trajectory."""
    settings = {**FAST, "max_steps": 10, "save_every": 100, "eval_every": 5, "seed": 5}
    straight = pretrain(real_corpus, tmp_path / "a", **settings)

    def ctrl_c_in_step_6(stage: str, done: int, total: int) -> None:
        if done == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt) as stopped:
        pretrain(real_corpus, tmp_path / "b", progress=ctrl_c_in_step_6, **settings)
    assert stopped.value.__notes__ == [
        f"pretraining stopped at step 6 of 10; its checkpoint is in {tmp_path / 'b' / 'checkpoint'}: rerun the "
        "same command with --resume to continue"]
    assert json.loads((tmp_path / "b" / "checkpoint" / "training_state.json").read_text())["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's handler is gone
    resumed = pretrain(real_corpus, tmp_path / "b", resume=True, **settings)
    assert resumed.steps == straight.steps == 10
    ta = torch.load(tmp_path / "a" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    tb = torch.load(tmp_path / "b" / "checkpoint" / "training_state.pt", weights_only=True)["history"]
    np.testing.assert_allclose(tb["train_loss"], ta["train_loss"], rtol=1e-5)
