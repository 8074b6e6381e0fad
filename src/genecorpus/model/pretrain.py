"""Pretraining: a ``BertForMaskedLM`` learns the masked-gene objective on a corpus.

One training loop, written out rather than delegated to ``transformers.Trainer``, because every part of
it is prescribed (SPEC §2.9) and must be exactly reproducible across a restart: the masking RNG is
derived from ``(seed, step)``, the sampler's state is two integers, and the checkpoint holds the model,
optimizer, scheduler, torch RNG and histories. The MLM head runs only on the masked positions (15 % of
the tokens), which gives the same loss as ``BertForMaskedLM.forward(labels=...)`` without building the
``cells × positions × vocabulary`` logits, the largest tensor of a step.

The model folder (see :mod:`genecorpus.model.bert`)::

    MODEL/config.json, model.safetensors, token_dictionary.pkl, genecorpus_model.json, loss_curve.png
    MODEL/checkpoint/   config.json, model.safetensors, training_state.pt, training_state.json
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.bert import (
    MODEL_INFO,
    PRESETS,
    bert_config,
    default_permissions,
    pick_device,
    quiet_transformers,
    require_torch,
    save_model,
)
from genecorpus.model.masking import PaddedBatch, mask_genes, pad_cells
from genecorpus.model.rank_baseline import RankFrequencyBaseline
from genecorpus.model.sampling import CellSplit, LengthGroupedSampler, split_cells

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from transformers import BertForMaskedLM

    from genecorpus.model.masking import MaskedBatch

logger = logging.getLogger(__name__)

__all__ = ["MAX_POSITIONS", "PretrainResult", "PretrainSettings", "pretrain"]

MAX_POSITIONS = {"gc30m": 2048, "gc104m": 4096}
"""Position embeddings of a model per corpus layout (Geneformer V1 and V2)."""
CHECKPOINT = "checkpoint"
TRAINING_STATE = "training_state.pt"
LOSS_CURVE = "loss_curve.png"


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides a pretraining run; recorded in the model info and the checkpoint."""

    preset: str = "small"
    """A name of :data:`genecorpus.model.bert.PRESETS`."""
    max_steps: int | None = None
    """Optimizer steps; exclusive with ``epochs``. Neither: one epoch."""
    epochs: float | None = None
    """Passes over the training cells (steps = epochs × batches per epoch)."""
    batch_size: int = 8
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.001
    """AdamW weight decay (Geneformer's value), not applied to biases and LayerNorm weights."""
    warmup_steps: int | None = None
    """Linear warm-up; default 10 % of the steps, at most 1,000."""
    max_length: int | None = None
    """Tokens per cell; default the longest cell, capped at the layout's 2,048 / 4,096 positions."""
    seed: int = 0
    val_fraction: float = 0.05
    val_cells: int = 2000
    eval_every: int | None = None
    """Steps between validations; default about ten per run (and always at the end)."""
    save_every: int = 500
    time_limit: float | None = None
    """Minutes; the run stops cleanly (checkpoint, model, metrics) after the step that passes it."""
    baseline_cells: int = 20_000
    """Training cells (a seeded sample) the rank-frequency baseline is counted on."""
    grad_clip: float = 1.0


# Settings a resumed run must share with its checkpoint: they decide the trajectory.
_TRAJECTORY_SETTINGS = ("preset", "batch_size", "lr", "weight_decay", "max_length", "seed", "val_fraction",
                        "val_cells", "baseline_cells", "grad_clip")


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run produced."""

    model_path: Path
    """The model folder (``BertForMaskedLM.from_pretrained`` opens it)."""
    steps: int
    """Optimizer steps done in total (including those of resumed runs)."""
    metrics: dict[str, float]
    """Final validation metrics: ``val_loss``, ``val_top1``, ``val_top10`` and the same with
    ``baseline_`` in front, over the same masked positions."""
    stopped: str
    """``"max_steps"`` or ``"time_limit"``."""
    info: dict[str, Any] = field(repr=False)
    """The model folder's ``genecorpus_model.json``."""


@dataclass
class _History:
    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    """Wall time in training steps only (no evaluation, checkpoints or setup)."""
    train_loss: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)


def pretrain(
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    preset: str = "small",
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.001,
    warmup_steps: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.05,
    val_cells: int = 2000,
    eval_every: int | None = None,
    save_every: int = 500,
    time_limit: float | None = None,
    baseline_cells: int = 20_000,
    device: str | None = None,
    token_dictionary: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> PretrainResult:
    """Pretrain a ``BertForMaskedLM`` on a corpus with the masked-gene objective (SPEC §2.9).

    Parameters
    ----------
    corpus
        A genecorpus folder, a ``save_to_disk`` folder or parquet file(s) (the published format).
    out
        The model folder to create (or to continue with ``resume``).
    preset, max_steps, epochs, batch_size, lr, weight_decay, warmup_steps, max_length, seed,
    val_fraction, val_cells, eval_every, save_every, time_limit, baseline_cells
        See :class:`PretrainSettings`.
    device
        ``"cpu"``, ``"cuda"``…; default CUDA when available, else CPU.
    token_dictionary
        The corpus's token dictionary, if its folder has none (the published Genecorpus-30M).
    resume
        Continue from ``out/checkpoint``; with the same settings, the losses are those of an
        uninterrupted run. ``max_steps``/``epochs`` may be raised to train longer.
    overwrite
        Replace an existing ``out``.
    progress
        Called as ``progress(stage, done, total)``.

    Returns
    -------
    PretrainResult

    Raises
    ------
    ConfigError
        Invalid settings, ``out`` exists without ``resume``/``overwrite``, or a checkpoint made with
        other settings.
    InputError
        The corpus cannot be read, or holds tokens outside the dictionary.

    Examples
    --------
    >>> result = pretrain("pbmc-corpus", "pbmc-model", preset="tiny", max_steps=200)  # doctest: +SKIP
    >>> result.metrics["val_top1"], result.metrics["baseline_val_top1"]  # doctest: +SKIP
    """
    require_torch()
    settings = PretrainSettings(
        preset=preset, max_steps=max_steps, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, max_length=max_length, seed=seed,
        val_fraction=val_fraction, val_cells=val_cells, eval_every=eval_every, save_every=save_every,
        time_limit=time_limit, baseline_cells=baseline_cells)
    _check_settings(settings)
    torch_device = pick_device(device)
    out = Path(out)
    _check_output(out, resume=resume, overwrite=overwrite)
    reader = CorpusReader.open(corpus, token_dictionary)
    if reader.n_cells == 0:
        msg = f"{reader.files.root}: the corpus has no cells; build it from non-empty datasets"
        raise InputError(msg)
    if overwrite and out.exists():
        _remove_model_folder(out, reader.files.root)
    with _deterministic_torch(enabled=torch_device.type == "cuda"):
        return _Run(reader, out, settings, device=torch_device, resume=resume, progress=progress).train()


def _check_settings(s: PretrainSettings) -> None:
    if s.preset not in PRESETS:
        msg = f"--preset {s.preset!r}: unknown; use one of {', '.join(PRESETS)}"
        raise ConfigError(msg)
    if s.max_steps is not None and s.epochs is not None:
        msg = "--max-steps and --epochs: give one of them, not both"
        raise ConfigError(msg)
    checks = [("--max-steps", s.max_steps, 1), ("--epochs", s.epochs, 1e-9),
              ("--batch-size", s.batch_size, 1),
              ("--lr", s.lr, 1e-12), ("--max-length", s.max_length, 1), ("--val-cells", s.val_cells, 1),
              ("--eval-every", s.eval_every, 1), ("--save-every", s.save_every, 1),
              ("--time-limit", s.time_limit, 1e-9), ("--baseline-cells", s.baseline_cells, 1)]
    for name, value, least in checks:
        if value is not None and value < least:
            msg = f"{name} {value}: must be positive"
            raise ConfigError(msg)
    if s.warmup_steps is not None and s.warmup_steps < 0:
        msg = f"--warmup-steps {s.warmup_steps}: must be 0 or more"
        raise ConfigError(msg)
    if s.weight_decay < 0:
        msg = f"--weight-decay {s.weight_decay}: must be 0 or more"
        raise ConfigError(msg)


def _check_output(out: Path, *, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        msg = "--resume and --overwrite: give one of them (resume continues, overwrite starts afresh)"
        raise ConfigError(msg)
    if resume:
        if _find_checkpoint(out) is None:
            msg = f"{out}: no checkpoint to resume from ({out / CHECKPOINT} is missing); run without --resume"
            raise ConfigError(msg)
    elif out.exists() and not overwrite:
        msg = f"{out}: already exists; use --resume to continue its training or --overwrite to start afresh"
        raise ConfigError(msg)


def _remove_model_folder(out: Path, corpus_root: Path) -> None:
    """Remove ``out`` for ``--overwrite``, only if it is a model folder (never the corpus or a parent)."""
    resolved, corpus = out.resolve(), corpus_root.resolve()
    if resolved == corpus or resolved in corpus.parents:
        msg = f"{out}: holds the corpus; give another --out"
        raise ConfigError(msg)
    if out.is_dir() and any(out.iterdir()) and not ((out / "config.json").is_file() or _find_checkpoint(out)):
        msg = f"{out}: exists and is not a model folder; --overwrite only replaces models, give another --out"
        raise ConfigError(msg)
    if out.is_dir():
        shutil.rmtree(out)
    else:
        out.unlink()


def _find_checkpoint(out: Path) -> Path | None:
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):  # .old: a crash between the two renames of a save
        if (out / name / TRAINING_STATE).is_file():
            return out / name
    return None


class _deterministic_torch:  # noqa: N801 - used as a context manager, like torch's own
    """Deterministic CUDA kernels inside the block (restored after; they need a cuBLAS workspace).

    Only for CUDA: torch's CPU kernels used here are deterministic already, and turning the switch on
    imports ``torch._inductor`` (seconds).
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        if not self.enabled:
            return
        import torch

        self._before = torch.are_deterministic_algorithms_enabled()
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        import torch

        torch.use_deterministic_algorithms(self._before)


class _Run:
    """One pretraining run: the state of the loop and what it writes."""

    def __init__(self, reader: CorpusReader, out: Path, settings: PretrainSettings, *, device: torch.device,
                 resume: bool, progress: Callable[[str, int, int], None] | None) -> None:
        import torch

        quiet_transformers()
        self.reader, self.out, self.progress = reader, out, progress
        self.tdict = reader.token_dictionary
        self.layout = self.tdict.layout()
        self.device = device
        self.bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        longest = int(reader.lengths.max())
        cap = MAX_POSITIONS[self.layout.name]
        self.max_length = settings.max_length or min(longest, cap)
        self.max_positions = max(cap, self.max_length)
        self.split: CellSplit = split_cells(
            reader.lengths, reader.dataset_ids(), val_fraction=settings.val_fraction,
            val_cells=settings.val_cells, seed=settings.seed)
        self.sampler = LengthGroupedSampler(self.split.train_rows, reader.lengths[self.split.train_rows],
                                            batch_size=settings.batch_size, seed=settings.seed)
        per_epoch = self.sampler.batches_per_epoch
        if settings.max_steps is not None:
            total = settings.max_steps
        else:
            total = max(1, math.ceil((settings.epochs or 1.0) * per_epoch))
        checkpoint = _find_checkpoint(out) if resume else None
        saved = torch.load(checkpoint / TRAINING_STATE, weights_only=True) if checkpoint else None
        warmup = settings.warmup_steps
        if warmup is None:
            warmup = saved["settings"]["warmup_steps"] if saved else min(1000, total // 10)
        self.settings = PretrainSettings(**{
            **asdict(settings), "max_length": self.max_length, "warmup_steps": warmup,
            "eval_every": settings.eval_every or max(1, math.ceil(total / 10))})
        self.total_steps = total
        self.history = _History()
        self.model = self._build_model(checkpoint)
        self.optimizer = self._build_optimizer()
        from transformers import get_linear_schedule_with_warmup

        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, total)
        if saved is not None:
            self._restore(saved)
        self.baseline = self._fit_baseline()
        self.val_batches = self._masked_val_batches()

    # ---- setup

    def _build_model(self, checkpoint: Path | None) -> BertForMaskedLM:
        import torch
        from transformers import BertForMaskedLM

        config = bert_config(self.settings.preset, self.tdict, max_positions=self.max_positions)
        if checkpoint is not None:
            model = BertForMaskedLM.from_pretrained(checkpoint)
            if model.config.vocab_size != config.vocab_size or model.config.hidden_size != config.hidden_size:
                msg = (f"{checkpoint}: the checkpoint's model does not fit this corpus and preset; "
                       "resume with the same ones")
                raise ConfigError(msg)
        else:
            torch.manual_seed(self.settings.seed)
            model = BertForMaskedLM(config)
        return model.to(self.device)

    def _build_optimizer(self) -> torch.optim.AdamW:
        import torch

        decay, no_decay = [], []
        for name, param in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(param)
        return torch.optim.AdamW([{"params": decay, "weight_decay": self.settings.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=self.settings.lr)

    def _restore(self, saved: dict[str, Any]) -> None:
        import torch

        mine = self._compat()
        for key, value in saved["settings"].items():
            if key in mine and mine[key] != value:
                msg = (f"{self.out / CHECKPOINT}: was made with {key}={value!r}, this run has {mine[key]!r}; "
                       "resume with the same corpus and settings (or start afresh with --overwrite)")
                raise ConfigError(msg)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])
        h = saved["history"]
        self.history = _History(int(h["step"]), int(h["tokens_seen"]), float(h["seconds"]),
                                float(h["train_seconds"]), list(h["train_loss"]),
                                [dict(e) for e in h["evals"]])
        if saved["total_steps"] != self.total_steps:
            logger.warning("resuming at step %d with %d steps in all (the checkpoint's run had %d): the "
                           "learning-rate schedule changes from here on", self.history.step, self.total_steps,
                           saved["total_steps"])
        torch.set_rng_state(saved["torch_rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        logger.info("resumed from step %d of %s", self.history.step, self.out / CHECKPOINT)

    def _compat(self) -> dict[str, Any]:
        s = asdict(self.settings)
        return {**{k: s[k] for k in _TRAJECTORY_SETTINGS}, "warmup_steps": s["warmup_steps"],
                "n_cells": self.reader.n_cells, "n_tokens": int(self.reader.lengths.sum())}

    def _fit_baseline(self) -> RankFrequencyBaseline:
        rows = self.split.train_rows
        if len(rows) > self.settings.baseline_cells:
            rng = np.random.default_rng([self.settings.seed, 0xBA5E])
            rows = np.sort(rng.choice(rows, self.settings.baseline_cells, replace=False))
        return RankFrequencyBaseline.fit((self.reader.input_ids(int(r)) for r in rows), self.tdict,
                                         max_length=self.max_length)

    def _masked_val_batches(self) -> list[MaskedBatch]:
        """The validation cells, longest first, masked once with a fixed seed: every eval scores the same."""
        rows = self.split.val_rows[np.argsort(-self.reader.lengths[self.split.val_rows], kind="stable")]
        rng = np.random.default_rng([self.settings.seed, 0xE7A1])
        size = self.settings.batch_size
        return [mask_genes(self._pad(rows[i:i + size]), self.tdict, rng) for i in range(0, len(rows), size)]

    def _pad(self, rows: np.ndarray) -> PaddedBatch:
        batch = pad_cells(self.reader.batch(rows), self.tdict, max_length=self.max_length)
        top = int(batch.input_ids.max(initial=0))
        if top > self.tdict.max_token:
            row = int(rows[int(np.argmax(batch.input_ids.max(axis=1)))])
            msg = (f"{self.reader.files.root}: cell {row} holds token {top}, beyond the dictionary's "
                   f"largest id {self.tdict.max_token}; give the token dictionary the corpus was built with")
            raise InputError(msg)
        return batch

    # ---- the loop

    def _masked_loss(self, batch: MaskedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy over the masked positions, and their logits and labels."""
        import torch

        ids = torch.from_numpy(batch.input_ids).to(self.device)
        attention = torch.from_numpy(batch.attention_mask).to(self.device)
        labels = torch.from_numpy(batch.labels).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
            selected = labels >= 0
            logits = self.model.cls(hidden[selected]).float()
        targets = labels[selected]
        if len(targets) == 0:  # no gene in any cell of the batch: nothing to learn, a zero loss with a graph
            return hidden.sum() * 0.0, logits, targets
        return torch.nn.functional.cross_entropy(logits, targets), logits, targets

    def train(self) -> PretrainResult:
        import torch

        s, h = self.settings, self.history
        started = time.monotonic()
        deadline = started + s.time_limit * 60 if s.time_limit else math.inf
        stopped = "max_steps"
        logger.info("pretraining %s on %d cells (%d held out, %s) for %d steps, max length %d, on %s",
                    s.preset, len(self.split.train_rows), self.split.n_held_out, self.split.by,
                    self.total_steps, self.max_length, self.device)
        while h.step < self.total_steps:
            if time.monotonic() >= deadline:
                stopped = "time_limit"
                logger.info("time limit of %s min reached at step %d", s.time_limit, h.step)
                break
            step_started = time.monotonic()
            self.model.train()
            rows = self.sampler.next_batch()
            padded = self._pad(rows)
            batch = mask_genes(padded, self.tdict, np.random.default_rng([s.seed, 1, h.step]))
            loss, _, _ = self._masked_loss(batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            h.step += 1
            h.tokens_seen += padded.n_tokens
            h.train_loss.append(float(loss.detach()))
            h.train_seconds += time.monotonic() - step_started
            if h.step % s.eval_every == 0 or h.step == self.total_steps:
                self._evaluate()
            if h.step % s.save_every == 0 and h.step < self.total_steps:
                h.seconds += time.monotonic() - started
                started = time.monotonic()
                self._save_checkpoint()
            if self.progress is not None:
                self.progress("pretrain", h.step, self.total_steps)
        if not h.evals or h.evals[-1]["step"] != h.step:
            self._evaluate()
        h.seconds += time.monotonic() - started
        self._save_checkpoint()
        return self._write_model(stopped)

    def _evaluate(self) -> dict[str, float]:
        import torch

        self.model.eval()
        sums = {"loss_sum": 0.0, "top1": 0.0, "top10": 0.0, "n": 0.0}
        base = {"loss_sum": 0.0, "top1": 0.0, "top10": 0.0, "n": 0.0}
        with torch.no_grad():
            for batch in self.val_batches:
                if not (batch.labels >= 0).any():
                    continue
                loss, logits, targets = self._masked_loss(batch)
                k = min(10, logits.shape[-1])
                top = logits.topk(k, dim=-1).indices
                n = float(len(targets))
                sums["loss_sum"] += float(loss) * n
                sums["top1"] += float((top[:, 0] == targets).sum())
                sums["top10"] += float((top == targets[:, None]).any(dim=-1).sum())
                sums["n"] += n
                for key, value in self.baseline.score(batch.labels).items():
                    base[key] += value
        n = max(sums["n"], 1.0)
        record = {"step": self.history.step, "val_loss": sums["loss_sum"] / n, "val_top1": sums["top1"] / n,
                  "val_top10": sums["top10"] / n, "baseline_val_loss": base["loss_sum"] / n,
                  "baseline_val_top1": base["top1"] / n, "baseline_val_top10": base["top10"] / n,
                  "n_masked": sums["n"]}
        self.history.evals.append(record)
        logger.info("step %d: val loss %.4f (baseline %.4f), top-1 %.3f (%.3f), top-10 %.3f (%.3f)",
                    record["step"], record["val_loss"], record["baseline_val_loss"], record["val_top1"],
                    record["baseline_val_top1"], record["val_top10"], record["baseline_val_top10"])
        return record

    # ---- outputs

    def _save_checkpoint(self) -> Path:
        """Write ``out/checkpoint`` atomically: a complete new one, or the previous one left in place."""
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / CHECKPOINT
        tmp = self.out / f".{CHECKPOINT}.incomplete"
        old = self.out / f".{CHECKPOINT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        default_permissions(tmp)
        h = self.history
        state = {
            "settings": {**self._compat()}, "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(), "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "history": {"step": h.step, "tokens_seen": h.tokens_seen, "seconds": h.seconds,
                        "train_seconds": h.train_seconds,
                        "train_loss": list(h.train_loss), "evals": [dict(e) for e in h.evals]},
        }
        torch.save(state, tmp / TRAINING_STATE)
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": h.step, "total_steps": self.total_steps, "sampler": self.sampler.state_dict(),
             "settings": state["settings"]}, indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_model(self, stopped: str) -> PretrainResult:
        import torch
        import transformers

        h = self.history
        metrics = {k: v for k, v in h.evals[-1].items() if k not in ("step", "n_masked")}
        preset = PRESETS[self.settings.preset]
        info = {
            "preset": self.settings.preset, "architecture": asdict(preset), "layout": self.layout.name,
            "max_positions": self.max_positions,
            "corpus": {"path": str(self.reader.files.root.resolve()), "n_cells": self.reader.n_cells,
                       "n_tokens": int(self.reader.lengths.sum())},
            "split": self.split.to_dict(),
            "training": {"steps": h.step, "total_steps": self.total_steps,
                         "epochs": h.step / self.sampler.batches_per_epoch, "tokens_seen": h.tokens_seen,
                         "wall_seconds": round(h.seconds, 1), "train_seconds": round(h.train_seconds, 2),
                         "steps_per_second": _rate(h.step, h.train_seconds, 3),
                         "tokens_per_second": _rate(h.tokens_seen, h.train_seconds, 0),
                         "stopped": stopped, "device": str(self.device),
                         "bf16": self.bf16},
            "metrics": metrics, "evals": h.evals, "seed": self.settings.seed,
            "settings": asdict(self.settings),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        tmp = self.out / ".model.incomplete"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(self.model, tmp, self.tdict, info)
        _plot_loss_curve(h, tmp / LOSS_CURVE)
        for path in sorted(tmp.iterdir()):
            path.replace(self.out / path.name)
        tmp.rmdir()
        logger.info("model written to %s (%s)", self.out, MODEL_INFO)
        return PretrainResult(self.out, h.step, metrics, stopped, info)


def _rate(amount: float, seconds: float, digits: int) -> float | None:
    return round(amount / seconds, digits) if seconds > 0 else None


def _plot_loss_curve(history: _History, path: Path) -> Path:
    """Training loss per step (raw and smoothed), validation loss, and the baseline's as a line."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    losses = np.asarray(history.train_loss, dtype=float)
    steps = np.arange(1, len(losses) + 1)
    window = max(1, len(losses) // 50)
    if window > 1:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"train (mean of {window} steps)")
    elif len(losses):
        ax.plot(steps, losses, color="tab:blue", linewidth=0.8, label="train (per step)")
    if history.evals:
        ax.plot([e["step"] for e in history.evals], [e["val_loss"] for e in history.evals], "o-",
                color="tab:orange", label="validation")
        ax.axhline(history.evals[-1]["baseline_val_loss"], color="tab:gray", linestyle="--",
                   label="baseline: gene frequency at the rank position")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-gene cross-entropy (nats)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
