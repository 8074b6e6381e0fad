"""Pretraining: a ``BertForMaskedLM`` learns the masked-gene objective on a corpus.

One training loop, written out rather than delegated to ``transformers.Trainer``, because every part of
it is prescribed (SPEC §2.9) and must be exactly reproducible across a restart: the masking RNG is
derived from ``(seed, step)``, the sampler's state is two integers, and the checkpoint holds the model,
optimizer, scheduler, torch RNG and histories. The MLM head runs only on the masked positions (15 % of
the tokens), which gives the same loss as ``BertForMaskedLM.forward(labels=...)`` without building the
``cells × positions × vocabulary`` logits, the largest tensor of a step.

How many steps, with which learning-rate schedule, and what is validated when is decided by
:mod:`genecorpus.model.schedule`: by the step count when one is given, else — with a time limit — from the
speed the run measures in its first steps (then undone: the run restarts from step 0 with its plan), and
re-planned while it goes if the machine turns slower or faster. A time limit is a hard cap in every case.

Under ``torchrun`` the same loop runs in every process (:mod:`genecorpus.model.distributed`): the sampler
deals *global* batches (``batch_size × grad_accum × processes`` cells), every process masks the whole
global batch and trains on its share of it (:func:`~genecorpus.model.sampling.split_batch`) inside
``DistributedDataParallel``, with the loss normalised over the global batch's masked positions, so the run
follows a single process with that batch. Rank 0 plans, decides (time limit, re-plans; any process's
Ctrl-C) and writes; the decisions reach the others in one small all-reduce per step.

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
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.corpus import CorpusReader
from genecorpus.errors import ConfigError, InputError
from genecorpus.model.bert import (
    ATTENTION,
    MODEL_INFO,
    PRESETS,
    adamw,
    autocast,
    bert_config,
    default_permissions,
    quiet_transformers,
    require_torch,
    resolve_precision,
    save_model,
)
from genecorpus.model.card import cells_by_dataset, corpus_record
from genecorpus.model.distributed import (
    Process,
    all_reduce_max,
    all_reduce_sums,
    barrier,
    broadcast_object,
    gather_objects,
    launched_process,
    process_group,
)
from genecorpus.model.masking import MaskedBatch, PaddedBatch, mask_genes, pad_cells
from genecorpus.model.rank_baseline import RankFrequencyBaseline
from genecorpus.model.sampling import CellSplit, LengthGroupedSampler, split_batch, split_cells
from genecorpus.model.schedule import (
    DEFAULT_EVALS,
    DEFAULT_VAL_CELLS,
    EVAL_TOKEN_COST,
    REPLAN_EVERY_SHARE,
    LearningRateSchedule,
    MeasuredTimes,
    Replan,
    StepPlan,
    ValidationPlan,
    WorkSizes,
    default_warmup_steps,
    measuring_done,
    plan_steps_for_time,
    plan_validation,
    replan_steps,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    import torch
    from matplotlib.axes import Axes
    from transformers import BertForMaskedLM

logger = logging.getLogger(__name__)

__all__ = ["MAX_POSITIONS", "PretrainResult", "PretrainSettings", "pretrain"]

MAX_POSITIONS = {"gc30m": 2048, "gc104m": 4096}
"""Position embeddings of a model per corpus layout (Geneformer V1 and V2)."""
CHECKPOINT = "checkpoint"
TRAINING_STATE = "training_state.pt"
LOSS_CURVE = "loss_curve.png"
METRICS = ("val_loss", "val_top1", "val_top10", "baseline_val_loss", "baseline_val_top1", "baseline_val_top10")
"""The validation metrics of an evaluation record (the others: ``step``, ``n_masked``, ``n_cells``…)."""
RECENT_SHARE = 0.1
"""The pace a run with a time limit goes by: that of its steps in this last share of the limit."""
PACE_TOLERANCE = 1.1
"""A run with a time limit warns when its remaining steps need more than this times the time left."""
SIZE_SAMPLE_BATCHES = 1000
"""Training batches whose padded tokens give the mean tokens per step a time plan counts with."""


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that decides a pretraining run; recorded in the model info and the checkpoint."""

    preset: str = "small"
    """A name of :data:`genecorpus.model.bert.PRESETS`."""
    max_steps: int | None = None
    """Optimizer steps; exclusive with ``epochs``. Neither: planned from ``time_limit`` if given, else
    one epoch."""
    epochs: float | None = None
    """Passes over the training cells (steps = epochs × batches per epoch)."""
    batch_size: int = 8
    """Cells per process in one forward/backward pass (a micro-batch). The global batch — the cells of
    one optimizer step — is ``batch_size × grad_accum × processes``; it decides the trajectory."""
    grad_accum: int = 1
    """Micro-batches whose gradients one optimizer step sums (gradient accumulation)."""
    max_batch_tokens: int | None = None
    """Most padded tokens (cells × longest cell) in one micro-batch: a batch of long cells is cut into
    several, so that it does not exhaust memory. None: no limit."""
    dropout: float | None = None
    """Dropout of the hidden states and attention; None: the preset's (0.02)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.001
    """AdamW weight decay (Geneformer's value), not applied to biases and LayerNorm weights."""
    warmup_steps: int | None = None
    """Linear warm-up; default 10 % of the (planned) steps, at most 1,000."""
    max_length: int | None = None
    """Tokens per cell; default the longest cell, capped at the layout's 2,048 / 4,096 positions."""
    seed: int = 0
    val_fraction: float = 0.05
    """Share of the cells held out from training (whole datasets when there are several)."""
    hold_out_datasets: tuple[str, ...] = ()
    """The datasets to hold out from training, instead of a seeded choice of ``val_fraction`` of the cells
    (e.g. to keep the cells a fine-tuned classifier will be tested on out of pretraining)."""
    val_cells: int | None = None
    """Held-out cells every evaluation scores. Default: a sample of at most 2,000 for the final
    evaluation and a fixed subset of it for the intermediate ones, sized so that validation costs
    about 10 % of the training compute (see :func:`genecorpus.model.schedule.plan_validation`)."""
    eval_every: int | None = None
    """Steps between validations; default about ten per run, fewer with ``val_cells`` if they would
    cost more than 10 % (and always one at the end)."""
    save_every: int = 500
    time_limit: float | None = None
    """Minutes of wall time from the call, a hard cap: the run stops in time to evaluate and write its
    checkpoint and model. Without ``max_steps``/``epochs``, the steps are planned to fill it (measured
    on this machine, so the step count varies from machine to machine and with the load)."""
    baseline_cells: int = 20_000
    """Training cells (a seeded sample) the rank-frequency baseline is counted on."""
    grad_clip: float = 1.0
    precision: str = "auto"
    """Arithmetic of the forward passes: ``auto`` (bf16 autocast on a CUDA device with bf16, else fp32),
    ``fp32`` or ``bf16`` (see :func:`genecorpus.model.bert.autocast`)."""


# Settings a resumed run must share with its checkpoint: they decide the trajectory (with the global batch,
# the resolved dropout and the corpus's size; the per-process batch and the processes do not).
_TRAJECTORY_SETTINGS = ("preset", "lr", "weight_decay", "max_length", "seed", "val_fraction",
                        "hold_out_datasets", "val_cells", "baseline_cells", "grad_clip")


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
    """``"max_steps"`` (the steps of ``max_steps``/``epochs`` done), ``"planned_steps"`` (the steps
    planned from the time limit done) or ``"time_limit"`` (stopped by the time limit before the
    learning-rate schedule ended)."""
    info: dict[str, Any] = field(repr=False)
    """The model folder's ``genecorpus_model.json``."""


@dataclass
class _History:
    step: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    """Wall time in training steps only (no evaluation, checkpoints or setup)."""
    eval_seconds: float = 0.0
    """Wall time in evaluations."""
    train_loss: list[float] = field(default_factory=list)
    learning_rate: list[float] = field(default_factory=list)
    """The learning rate each step was taken with."""
    evals: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "seconds": self.seconds,
                "train_seconds": self.train_seconds, "eval_seconds": self.eval_seconds,
                "train_loss": list(self.train_loss), "learning_rate": list(self.learning_rate),
                "evals": [dict(e) for e in self.evals]}

    @classmethod
    def from_dict(cls, h: dict[str, Any]) -> _History:
        losses = list(h["train_loss"])
        # checkpoints before the learning rate was recorded: unknown (NaN) for their steps
        rates = list(h.get("learning_rate", [math.nan] * len(losses)))
        return cls(int(h["step"]), int(h["tokens_seen"]), float(h["seconds"]), float(h["train_seconds"]),
                   float(h.get("eval_seconds", 0.0)), losses, rates, [dict(e) for e in h["evals"]])


@dataclass
class _Pace:
    """What this session has measured of its speed, to keep within the time limit."""

    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    eval_seconds: float = 0.0
    """Seconds of this session's evaluations…"""
    eval_as_train_seconds: float = 0.0
    """…and what their tokens would have cost in training steps at the pace of the moment."""
    measured_eval_cost: float | None = None
    """A validation token's cost relative to a training token, as the time plan measured it."""
    checkpoint_seconds: float = 0.0
    model_seconds: float = 0.0
    warned: bool = False
    recent_rate: tuple[float, float] | None = None
    """When the recent pace was last computed, and its seconds per token."""
    replanning: bool = False
    """The steps were planned from the time limit in this session: re-plan them if the pace changes."""
    last_check: float = 0.0


def pretrain(
    corpus: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    preset: str = "small",
    max_steps: int | None = None,
    epochs: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_batch_tokens: int | None = None,
    dropout: float | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.001,
    warmup_steps: int | None = None,
    max_length: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.05,
    hold_out_datasets: Sequence[str] = (),
    val_cells: int | None = None,
    eval_every: int | None = None,
    save_every: int = 500,
    time_limit: float | None = None,
    baseline_cells: int = 20_000,
    precision: str = "auto",
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
    preset, max_steps, epochs, batch_size, grad_accum, max_batch_tokens, dropout, lr, weight_decay,
    warmup_steps, max_length, seed, val_fraction, hold_out_datasets, val_cells, eval_every, save_every, time_limit,
    baseline_cells, precision
        See :class:`PretrainSettings`.
    device
        ``"cpu"``, ``"cuda"``…; default CUDA when available, else CPU. Under ``torchrun`` each process
        joins the process group (:mod:`genecorpus.model.distributed`; ``cuda`` becomes
        ``cuda:LOCAL_RANK``) and the model is trained with ``DistributedDataParallel``; rank 0 plans,
        logs and writes, and every process returns the same result.
    token_dictionary
        The corpus's token dictionary, if its folder has none (the published Genecorpus-30M).
    resume
        Continue from ``out/checkpoint``; with the same settings, the losses are those of an
        uninterrupted run. The checkpoint's planned steps are kept (a time limit caps the session
        but does not re-plan); ``max_steps``/``epochs`` may be raised to train longer. Any number of
        processes may resume: the per-process batch is derived from the checkpoint's global batch.
    overwrite
        Replace an existing ``out``.
    progress
        Called as ``progress(stage, done, total)`` (in every process; the command line shows rank 0's).

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
    >>> result = pretrain("pbmc-corpus", "pbmc-model", time_limit=20, overwrite=True)  # doctest: +SKIP
    >>> result.info["plan"]["total_steps"], result.stopped  # doctest: +SKIP
    (712, 'planned_steps')
    """
    started = time.monotonic()
    require_torch()
    settings = PretrainSettings(
        preset=preset, max_steps=max_steps, epochs=epochs, batch_size=batch_size, grad_accum=grad_accum,
        max_batch_tokens=max_batch_tokens, dropout=dropout, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup_steps, max_length=max_length, seed=seed,
        val_fraction=val_fraction, hold_out_datasets=tuple(hold_out_datasets), val_cells=val_cells,
        eval_every=eval_every, save_every=save_every,
        time_limit=time_limit, baseline_cells=baseline_cells, precision=precision)
    _check_settings(settings)
    out = Path(out)
    with process_group(device) as (process, torch_device):
        _check_output(out, resume=resume, overwrite=overwrite)
        reader = CorpusReader.open(corpus, token_dictionary)
        if reader.n_cells == 0:
            msg = f"{reader.files.root}: the corpus has no cells; build it from non-empty datasets"
            raise InputError(msg)
        if overwrite and out.exists() and process.is_main:
            _remove_model_folder(out, reader.files.root)
        barrier(process)  # nobody looks at `out` before rank 0 emptied it
        with _deterministic_torch(enabled=torch_device.type == "cuda"):
            run = _Run(reader, out, settings, device=torch_device, process=process, resume=resume,
                       progress=progress, started=started)
            try:
                return run.train()
            finally:  # DistributedDataParallel holds the process group: it goes first (stop_process_group)
                del run.loss_module


def _check_settings(s: PretrainSettings) -> None:
    if s.preset not in PRESETS:
        msg = f"--preset {s.preset!r}: unknown; use one of {', '.join(PRESETS)}"
        raise ConfigError(msg)
    if s.max_steps is not None and s.epochs is not None:
        msg = "--max-steps and --epochs: give one of them, not both"
        raise ConfigError(msg)
    checks = [("--max-steps", s.max_steps, 1), ("--epochs", s.epochs, 1e-9),
              ("--batch-size", s.batch_size, 1), ("--grad-accum", s.grad_accum, 1),
              ("--max-batch-tokens", s.max_batch_tokens, 1),
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
    if s.dropout is not None and not 0 <= s.dropout < 1:
        msg = f"--dropout {s.dropout}: must be in [0, 1) (the presets use 0.02)"
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


class _StopOnCtrlC:
    """Ctrl-C during the training steps: the first stops after the current step (with a checkpoint), a
    second one at once. Only where Ctrl-C reaches Python (the main thread, SIGINT not ignored).

    Under torchrun (``launched``) SIGTERM counts as Ctrl-C too — torchrun passes a Ctrl-C on to its
    processes and SLURM ends a job with SIGTERM, both giving ~30 s before SIGKILL — and a signal within
    :data:`SAME_SIGNAL_SECONDS` of the first is the same one arriving twice (from the terminal and from
    torchrun), not a second Ctrl-C."""

    SAME_SIGNAL_SECONDS = 2.0

    def __init__(self, *, launched: bool = False) -> None:
        self.requested = False
        self.launched = launched
        self._first = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopOnCtrlC:
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle)
            if self.launched and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, _signum: int, _frame: object) -> None:
        if self.requested:
            if self.launched and time.monotonic() - self._first < self.SAME_SIGNAL_SECONDS:
                return
            raise KeyboardInterrupt
        self.requested = True
        self._first = time.monotonic()
        logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)")

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


class _Run:
    """One pretraining run: the state of the loop and what it writes."""

    def __init__(self, reader: CorpusReader, out: Path, settings: PretrainSettings, *, device: torch.device,
                 process: Process, resume: bool, progress: Callable[[str, int, int], None] | None,
                 started: float) -> None:
        import torch

        quiet_transformers()
        self.reader, self.out, self.progress, self.process = reader, out, progress, process
        self.started = self._accounted = started
        self.deadline = started + settings.time_limit * 60 if settings.time_limit else math.inf
        self.deadline_hit = False
        """The time limit stopped the steps before the planned count."""
        self.tdict = reader.token_dictionary
        self.layout = self.tdict.layout()
        self.device = device
        self.precision = resolve_precision(settings.precision, device)
        longest = int(reader.lengths.max())
        cap = MAX_POSITIONS[self.layout.name]
        self.max_length = settings.max_length or min(longest, cap)
        self.max_positions = max(cap, self.max_length)
        if settings.max_batch_tokens is not None and settings.max_batch_tokens < self.max_length:
            msg = (f"--max-batch-tokens {settings.max_batch_tokens}: below the max length of {self.max_length} "
                   "tokens, so one long cell would not fit; give at least that (or a smaller --max-length)")
            raise ConfigError(msg)
        checkpoint = _find_checkpoint(out) if resume else None
        saved = torch.load(checkpoint / TRAINING_STATE, weights_only=True) if checkpoint else None
        if saved is not None and settings.val_cells is None:  # the checkpoint's validation sample
            settings = replace(settings, val_cells=saved["settings"]["val_cells"])
        if saved is not None:
            settings = self._fit_global_batch(settings, saved)
        self.settings = replace(settings, max_length=self.max_length)
        self.global_batch = settings.batch_size * settings.grad_accum * process.world_size
        """Cells of one optimizer step, over all processes and micro-batches."""
        self.dropout = PRESETS[settings.preset].dropout if settings.dropout is None else settings.dropout
        self.split: CellSplit = split_cells(
            reader.lengths, reader.dataset_ids(), val_fraction=settings.val_fraction,
            val_cells=settings.val_cells or DEFAULT_VAL_CELLS, seed=settings.seed, hold_out=settings.hold_out_datasets)
        # the sampler deals global batches, the same for any number of processes; each process takes its share
        self.sampler = LengthGroupedSampler(self.split.train_rows, reader.lengths[self.split.train_rows],
                                            batch_size=self.global_batch, seed=settings.seed)
        self.sizes = self._work_sizes()
        self.history = _History()
        self.pace = _Pace()
        self.model = self._build_model(checkpoint)
        self.loss_module = self._wrap_model()
        self.optimizer = self._build_optimizer()
        self._plan: StepPlan | None = None
        self._validation: ValidationPlan | None = None
        self.schedule: LearningRateSchedule | None = None
        self.val_batches: list[MaskedBatch] = []
        planned = self._plan_from_settings(saved)
        if planned is not None:
            self._start(*planned)
        if saved is not None:
            self._restore(saved)
        self.baseline = self._fit_baseline()

    # ---- the plan

    def _plan_from_settings(self, saved: dict[str, Any] | None) -> tuple[StepPlan, ValidationPlan] | None:
        """The steps and validation a step count (or the checkpoint) decides; None: plan from the time limit."""
        s = self.settings
        if s.max_steps is not None:
            total, by = s.max_steps, "max_steps"
        elif s.epochs is not None:
            total, by = max(1, math.ceil(s.epochs * self.sampler.batches_per_epoch)), "epochs"
        elif saved is not None:  # resume the checkpoint's plan, not a new one
            plan = StepPlan.from_dict(saved["plan"]) if "plan" in saved else StepPlan(
                saved["total_steps"], saved["settings"]["warmup_steps"], "max_steps")
            total, by = plan.total_steps, plan.planned_by
        elif s.time_limit is not None:
            return None
        else:
            total, by = max(1, self.sampler.batches_per_epoch), "epochs"
        if s.warmup_steps is not None:
            warmup = s.warmup_steps
        else:
            warmup = saved["settings"]["warmup_steps"] if saved else default_warmup_steps(total)
        if saved is not None and "plan" in saved and saved["total_steps"] == total:
            plan = StepPlan.from_dict({**saved["plan"], "warmup_steps": warmup})
        else:
            plan = StepPlan(total, warmup, by)
        if saved is not None and "schedule" in saved and saved["total_steps"] == total:
            self.schedule = LearningRateSchedule([(int(a), float(f)) for a, f in saved["schedule"]])
        if saved is None:
            validation = plan_validation(total, self.sizes, eval_every=s.eval_every,
                                         fixed_val_cells=s.val_cells is not None)
        elif "validation" in saved:
            validation = ValidationPlan.from_dict(saved["validation"])
            if total != validation.total_steps or s.eval_every not in (None, validation.eval_every):
                validation = validation.with_steps(total, s.eval_every)
        else:  # a checkpoint of before validation plans: every evaluation scored the whole sample
            n_val = len(self.split.val_rows)
            n_batches = math.ceil(n_val / self.global_batch)
            every = s.eval_every or max(1, math.ceil(total / DEFAULT_EVALS))
            validation = ValidationPlan(total, every, n_val, n_batches, n_batches, (total - 1) // every, 0.0)
            cost = validation.scored_cells * self.sizes.val_tokens_per_cell * EVAL_TOKEN_COST
            validation = replace(validation, estimated_share=cost / (total * self.sizes.train_tokens_per_step))
        return plan, validation

    def _plan_from_time_limit(self) -> None:
        """Measure the speed, undo the measuring steps, and plan the steps that fill the time limit."""
        s = self.settings
        logger.info("timing a few training steps to plan the steps from the time limit (then undone: the run "
                    "starts from step 0)")
        times = self._measure_speed(self.deadline - time.monotonic())
        planned: tuple[StepPlan, ValidationPlan] | None = None
        if self.process.is_main:  # rank 0 plans from its clock, the others take its plan
            total, validation, estimated = plan_steps_for_time(
                self.deadline - time.monotonic(), times, sizes=self.sizes, eval_every=s.eval_every,
                fixed_val_cells=s.val_cells is not None, save_every=s.save_every)
            warmup = s.warmup_steps if s.warmup_steps is not None else default_warmup_steps(total)
            if warmup >= total:
                logger.warning("the warm-up (%d steps) is as long as the %d steps planned from the time limit: "
                               "the learning rate will not decay; give a shorter --warmup-steps", warmup, total)
            step_seconds = times.train_seconds_per_token * self.sizes.train_tokens_per_step
            planned = (StepPlan(total, warmup, "time_limit", seconds_per_step=round(step_seconds, 4),
                                measured_steps=times.n_steps, measure_seconds=round(times.seconds, 2),
                                estimated_seconds=round(estimated, 1)), validation)
        planned = broadcast_object(planned, self.process)
        if planned is None:
            msg = "rank 0 sent no plan"
            raise RuntimeError(msg)
        plan, validation = planned
        self.pace.measured_eval_cost = times.eval_seconds_per_token / max(1e-12, times.train_seconds_per_token)
        self.pace.checkpoint_seconds, self.pace.model_seconds = times.checkpoint_seconds, times.model_seconds
        self.pace.replanning, self.pace.last_check = True, time.monotonic()
        self._start(plan, validation)

    def _start(self, plan: StepPlan, validation: ValidationPlan) -> None:
        """Fix the plan: the learning-rate schedule, the resolved settings, the validation batches."""
        from torch.optim.lr_scheduler import LambdaLR

        self._plan, self._validation = plan, validation
        if self.schedule is None:
            self.schedule = LearningRateSchedule.linear(warmup_steps=plan.warmup_steps, total_steps=plan.total_steps)
        # a plain function, not the schedule object nor a method: LambdaLR would save an object's state and load
        # it back over the plan of a resumed run given more steps; the checkpoint holds the schedule itself
        self.scheduler = LambdaLR(self.optimizer, lambda step: self._schedule(step))  # noqa: PLW0108
        self.settings = replace(self.settings, warmup_steps=plan.warmup_steps, eval_every=validation.eval_every)
        if validation.n_val_cells < len(self.split.val_rows):  # a short run scores a seeded sample of them
            rng = np.random.default_rng([self.settings.seed, 0x5A3B])
            rows = np.sort(rng.choice(self.split.val_rows, validation.n_val_cells, replace=False))
            self.split = replace(self.split, val_rows=rows)
        self.val_batches = self._masked_val_batches()
        self.val_tokens = sum(b.input_ids.size for b in self.val_batches)
        self.subset = validation.subset_batches()

    @property
    def plan(self) -> StepPlan:
        """The steps and their schedule (set by :meth:`_start`)."""
        if self._plan is None:
            msg = "the run's steps are not planned yet"
            raise RuntimeError(msg)
        return self._plan

    @property
    def validation(self) -> ValidationPlan:
        """When and what the run validates (set by :meth:`_start`)."""
        if self._validation is None:
            msg = "the run's validation is not planned yet"
            raise RuntimeError(msg)
        return self._validation

    @property
    def total_steps(self) -> int:
        return self.plan.total_steps

    def _schedule(self, step: int) -> float:
        if self.schedule is None:
            msg = "the run's learning-rate schedule is not planned yet"
            raise RuntimeError(msg)
        return self.schedule(step)

    def _work_sizes(self) -> WorkSizes:
        """Tokens of a training step (mean over a sample of batches) and of a validation cell (global batches)."""
        lengths, size = self.reader.lengths, self.global_batch
        batches = self.sampler.epoch_batches(self.sampler.epoch)[:SIZE_SAMPLE_BATCHES]
        train = np.mean([len(b) * min(int(lengths[b].max()), self.max_length) for b in batches])
        rows = self._val_rows_longest_first()
        val = sum(len(rows[i:i + size]) * min(int(lengths[rows[i]]), self.max_length)
                  for i in range(0, len(rows), size))
        return WorkSizes(size, float(train), val / max(1, len(rows)), len(rows))

    def _measure_speed(self, budget: float) -> MeasuredTimes:
        """Time training steps, a validation batch and a model write; then undo the steps (weights, torch RNG,
        sampler; the optimizer was a throwaway one), so the run is the one ``--max-steps`` would give."""
        import torch

        started = time.monotonic()
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng_state = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        sampler_state = self.sampler.state_dict()
        optimizer = self._build_optimizer()
        seconds: list[float] = []
        tokens: list[int] = []
        while not seconds or self._agree(not measuring_done(len(seconds), time.monotonic() - started, budget)):
            _, _, padded, took = self._train_step(optimizer, None, len(seconds))
            seconds.append(took)
            tokens.append(padded.input_ids.size)
        first = 1 if len(seconds) > 1 else 0  # the first step pays one-off costs (allocation, lazy setup)
        train_per_token = sum(seconds[first:]) / max(1, sum(tokens[first:]))
        eval_per_token = self._measure_validation()
        model_seconds, plot_seconds = self._measure_writes()
        self.model.load_state_dict(weights)
        self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(rng_state)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        self.sampler.load_state_dict(sampler_state)
        took = time.monotonic() - started
        logger.info("timed %d training steps (%.3g s/step after the first), a validation batch and a model "
                    "write in %.1f s", len(seconds), train_per_token * self.sizes.train_tokens_per_step, took)
        # a checkpoint writes the model and AdamW's two moments of every weight: three models' worth
        return MeasuredTimes(train_per_token, eval_per_token, 3 * model_seconds, model_seconds + plot_seconds,
                             len(seconds), took)

    def _agree(self, decision: bool) -> bool:  # noqa: FBT001 - one yes or no
        """Rank 0's yes or no, on every process."""
        return bool(all_reduce_max([int(decision) if self.process.is_main else 0], self.process)[0])

    def _measure_validation(self) -> float:
        """Seconds per token of scoring a validation batch of middle length (each process its share)."""
        rows, size = self._val_rows_longest_first(), self.global_batch
        middle = (len(rows) // size // 2) * size
        batch = mask_genes(self._pad(rows[middle:middle + size]), self.tdict,
                           np.random.default_rng([self.settings.seed, 0x71E5]))
        began = time.monotonic()
        self._score([batch])
        return (time.monotonic() - began) / max(1, batch.input_ids.size)

    def _measure_writes(self) -> tuple[float, float]:
        """Seconds of writing the model's weights, and of drawing the loss curve (each timed the second
        time: the first pays imports that the run's own writes will not)."""
        if not self.process.is_main:  # only rank 0 writes, and plans
            return 0.0, 0.0
        parent = self.out.parent if self.out.parent.is_dir() else None
        history = _History(train_loss=[1.0] * 100, learning_rate=[0.0] * 100)
        seconds = []
        with tempfile.TemporaryDirectory(prefix=f".{self.out.name}.measure-", dir=parent) as folder:
            for _ in range(2):
                began = time.monotonic()
                self.model.save_pretrained(Path(folder) / "model", safe_serialization=True)
                middle = time.monotonic()
                _plot_loss_curve(history, Path(folder) / LOSS_CURVE)
                seconds = [middle - began, time.monotonic() - middle]
        return seconds[0], seconds[1]

    # ---- setup

    def _build_model(self, checkpoint: Path | None) -> BertForMaskedLM:
        import torch
        from transformers import BertForMaskedLM

        config = bert_config(replace(PRESETS[self.settings.preset], dropout=self.dropout), self.tdict,
                             max_positions=self.max_positions)
        if checkpoint is not None:
            model = BertForMaskedLM.from_pretrained(checkpoint, attn_implementation=ATTENTION)
            if model.config.vocab_size != config.vocab_size or model.config.hidden_size != config.hidden_size:
                msg = (f"{checkpoint}: the checkpoint's model does not fit this corpus and preset; "
                       "resume with the same ones")
                raise ConfigError(msg)
            model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = self.dropout
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = self.dropout
        else:
            torch.manual_seed(self.settings.seed)
            model = BertForMaskedLM(config)
            if not self.process.is_main:  # the same weights everywhere, but each process its own dropout masks
                _seed_process_rng(self.settings.seed, self.process.rank, 0)
        return model.to(self.device)

    def _wrap_model(self) -> torch.nn.Module:
        """The module a training step calls: the masked-gene loss, in ``DistributedDataParallel`` when
        several processes train (it averages the gradients over them in the backward pass)."""
        import torch

        module = _masked_lm_loss(self.model, precision=self.precision, every_parameter=self.process.world_size > 1)
        if self.process.world_size == 1:
            return module
        return torch.nn.parallel.DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False)  # the buffers (position ids) never change

    def _build_optimizer(self) -> torch.optim.AdamW:
        return adamw(self.model, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

    def _fit_global_batch(self, settings: PretrainSettings, saved: dict[str, Any]) -> PretrainSettings:
        """The per-process batch that gives the checkpoint's global batch with this many processes."""
        world = self.process.world_size
        theirs = _saved_processes(saved)
        if theirs["world_size"] != world and self.process.is_main:
            logger.info("resuming a run of %d process(es) with %d", theirs["world_size"], world)
        wanted = theirs["global_batch"]
        if settings.batch_size * settings.grad_accum * world == wanted:
            return settings
        if wanted % (settings.grad_accum * world) == 0:
            batch = wanted // (settings.grad_accum * world)
            if self.process.is_main:
                logger.info("the checkpoint's global batch is %d cells: %d per process (× %d accumulated × %d "
                            "processes) instead of --batch-size %d", wanted, batch, settings.grad_accum, world,
                            settings.batch_size)
            return replace(settings, batch_size=batch)
        where = self.out / CHECKPOINT
        if wanted % world:
            msg = (f"{where}: was trained with a global batch of {wanted} cells, which {world} processes cannot "
                   f"share evenly; resume with a number of processes that divides {wanted}")
        else:
            msg = (f"{where}: was trained with a global batch of {wanted} cells; with {world} process(es) give "
                   f"--batch-size × --grad-accum = {wanted // world}, e.g. --batch-size {wanted // world} "
                   "--grad-accum 1")
        raise ConfigError(msg)

    def _restore(self, saved: dict[str, Any]) -> None:
        import torch

        mine = self._compat()
        theirs = dict(saved["settings"])
        if "global_batch" not in theirs:  # checkpoints of before several processes: one, no accumulation
            theirs["global_batch"] = theirs.pop("batch_size")
        for key, value in theirs.items():
            if key in mine and mine[key] != value:
                msg = (f"{self.out / CHECKPOINT}: was made with {key}={value!r}, this run has {mine[key]!r}; "
                       "resume with the same corpus and settings (or start afresh with --overwrite)")
                raise ConfigError(msg)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.sampler.load_state_dict(saved["sampler"])
        self.history = _History.from_dict(saved["history"])
        if saved["total_steps"] != self.total_steps and self.process.is_main:
            logger.warning("resuming at step %d with %d steps in all (the checkpoint's run had %d): the "
                           "learning-rate schedule changes from here on", self.history.step, self.total_steps,
                           saved["total_steps"])
        if saved["total_steps"] != self.total_steps:
            # the optimizer holds the old schedule's rate for the next step (0 after its last): the new one's
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
                group["lr"] = base * self._schedule(self.history.step)
        rank, by_rank = self.process.rank, saved.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == self.process.world_size:  # as many processes: each its own
            cpu_rng, cuda_rng = by_rank[rank]
        elif rank == 0:
            cpu_rng, cuda_rng = saved["torch_rng"], saved.get("cuda_rng")
        else:  # more processes than the checkpoint's: a seeded stream of dropout masks of their own
            cpu_rng = cuda_rng = None
            _seed_process_rng(self.settings.seed, rank, self.history.step)
        if cpu_rng is not None:
            torch.set_rng_state(cpu_rng)
        if self.device.type == "cuda" and cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        if self.process.is_main:
            logger.info("resumed from step %d of %s", self.history.step, self.out / CHECKPOINT)

    def _compat(self) -> dict[str, Any]:
        s = asdict(self.settings)
        trajectory = {k: list(s[k]) if isinstance(s[k], tuple) else s[k] for k in _TRAJECTORY_SETTINGS}
        return {**trajectory, "global_batch": self.global_batch, "dropout": self.dropout,
                "warmup_steps": s["warmup_steps"], "n_cells": self.reader.n_cells,
                "n_tokens": int(self.reader.lengths.sum())}

    def _processes(self) -> dict[str, Any]:
        """How the work was spread: recorded in the checkpoint and the model info."""
        s = self.settings
        return {**self.process.to_dict(), "global_batch": self.global_batch, "batch_size": s.batch_size,
                "grad_accum": s.grad_accum, "max_batch_tokens": s.max_batch_tokens}

    def _fit_baseline(self) -> RankFrequencyBaseline:
        rows = self.split.train_rows
        if len(rows) > self.settings.baseline_cells:
            rng = np.random.default_rng([self.settings.seed, 0xBA5E])
            rows = np.sort(rng.choice(rows, self.settings.baseline_cells, replace=False))
        return RankFrequencyBaseline.fit((self.reader.input_ids(int(r)) for r in rows), self.tdict,
                                         max_length=self.max_length)

    def _val_rows_longest_first(self) -> np.ndarray:
        return self.split.val_rows[np.argsort(-self.reader.lengths[self.split.val_rows], kind="stable")]

    def _masked_val_batches(self) -> list[MaskedBatch]:
        """The validation cells, longest first, masked once with a fixed seed: every eval scores the same."""
        rows = self._val_rows_longest_first()
        rng = np.random.default_rng([self.settings.seed, 0xE7A1])
        size = self.global_batch
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

    def _masked_loss(self, batch: MaskedBatch, *, train: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over the masked positions, and their logits and labels (through
        ``DistributedDataParallel`` when ``train``ing with several processes)."""
        import torch

        module = self.loss_module if train else self.loss_module_plain
        ids = torch.from_numpy(batch.input_ids).to(self.device)
        attention = torch.from_numpy(batch.attention_mask).to(self.device)
        labels = torch.from_numpy(batch.labels).to(self.device)
        return module(ids, attention, labels)

    @property
    def loss_module_plain(self) -> torch.nn.Module:
        """The loss without ``DistributedDataParallel`` (validation: no gradients to share)."""
        return getattr(self.loss_module, "module", self.loss_module)

    def _my_micro_batches(self, batch: MaskedBatch) -> list[tuple[np.ndarray, MaskedBatch]]:
        """This process's micro-batches of a global batch (:func:`~genecorpus.model.sampling.split_batch`):
        their positions in it, and their cells cut to the width of their longest cell."""
        s, p = self.settings, self.process
        lengths = batch.attention_mask.sum(axis=1)
        parts = split_batch(lengths, rank=p.rank, world_size=p.world_size, grad_accum=s.grad_accum,
                            max_batch_tokens=s.max_batch_tokens)
        return [(part, _take_cells(batch, part)) for part in parts]

    def _train_step(self, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                    step: int) -> tuple[float, float, PaddedBatch, float]:
        """One optimizer step on the sampler's next (global) batch: its loss, learning rate, batch and seconds.

        The whole global batch is padded and masked with the step's generator in every process, so every
        process knows its masked positions ``n``; this process's micro-batches then each contribute their
        mean loss × (their masked positions) × (processes) / ``n``, which ``DistributedDataParallel``'s mean
        over the processes turns into the gradient of the global batch's mean loss.
        """
        import torch

        started = time.monotonic()
        self.loss_module.train()
        rows = self.sampler.next_batch()
        padded = self._pad(rows)
        batch = mask_genes(padded, self.tdict, np.random.default_rng([self.settings.seed, 1, step]))
        n_masked = int((batch.labels >= 0).sum())
        world = self.process.world_size
        parts = self._my_micro_batches(batch)
        if logger.isEnabledFor(logging.DEBUG):  # what each process trained on (the tests check the shards)
            logger.debug("step %d rank %d micro-batch rows %s", step, self.process.rank,
                         json.dumps([rows[positions].tolist() for positions, _ in parts]))
        micro, weights = [m for _, m in parts], [1.0] * len(parts)
        if not micro:  # a short last batch left this process no cell: join the gradient exchange with nothing
            micro, weights = [_take_cells(batch, np.zeros(1, np.int64))], [0.0]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (part, weight) in enumerate(zip(micro, weights, strict=True)):
            last = i == len(micro) - 1
            sync = nullcontext() if last or world == 1 else self.loss_module.no_sync()  # type: ignore[operator]
            with sync:
                loss, _, targets = self._masked_loss(part, train=True)
                n = len(targets) * weight
                scale = n * world / max(n_masked, 1)
                (loss if scale == 1.0 else loss * scale).backward()
            total = total + loss.detach().double() * n
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        lr = float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        local = float(total)  # waits for the device, so the time is the step's
        value = float(all_reduce_sums([local], self.process)[0]) / max(n_masked, 1) if n_masked else 0.0
        return value, lr, padded, time.monotonic() - started

    def train(self) -> PretrainResult:
        if self._plan is None:
            self._plan_from_time_limit()
        h = self.history
        self._log_plan()
        stopped = "planned_steps" if self.plan.planned_by == "time_limit" else "max_steps"
        with _StopOnCtrlC(launched=launched_process() != Process() or self.process.is_distributed) as ctrl_c:
            self._steps_until_done(ctrl_c)
        if self.deadline_hit:
            stopped = "time_limit"
        n_val = len(self.split.val_rows)  # records of older checkpoints have no n_cells: they scored every cell
        if not h.evals or h.evals[-1]["step"] != h.step or h.evals[-1].get("n_cells", n_val) < n_val:
            self._evaluate(final=True)
        self._save_checkpoint()
        return self._write_model(stopped)

    def _decide(self, ctrl_c: _StopOnCtrlC) -> tuple[bool, bool]:
        """Before a step, the same decisions in every process: (Ctrl-C in any process, time limit reached —
        rank 0's clock); rank 0's re-planned step count and warm-up reach the others with them."""
        main = self.process.is_main
        deadline = (main and self.deadline < math.inf
                    and time.monotonic() + self._end_seconds() >= self.deadline)
        plan = self.plan
        agreed = all_reduce_max([int(ctrl_c.requested), int(deadline), plan.total_steps if main else 0,
                                 plan.warmup_steps if main else 0], self.process)
        total, warmup = int(agreed[2]), int(agreed[3])
        if not main and (total, warmup) != (plan.total_steps, plan.warmup_steps):
            self._apply_replan(total, warmup, math.nan)
        return bool(agreed[0]), bool(agreed[1])

    def _steps_until_done(self, ctrl_c: _StopOnCtrlC) -> None:
        """Train until the planned steps are done or the time limit nears; Ctrl-C saves a checkpoint first."""
        s, h = self.settings, self.history
        while True:
            interrupted, deadline = self._decide(ctrl_c)
            if h.step >= self.total_steps:
                break
            if interrupted:
                interrupt = KeyboardInterrupt()
                if h.step:
                    self._save_checkpoint()
                    interrupt.add_note(f"pretraining stopped at step {h.step} of {self.total_steps}; its "
                                       f"checkpoint is in {self.out / CHECKPOINT}: rerun the same command with "
                                       "--resume to continue")
                raise interrupt
            if deadline:
                self.deadline_hit = True
                lr = self.optimizer.param_groups[0]["lr"] / s.lr
                say = logger.warning if self.process.is_main else logger.debug
                say("time limit of %s min: stopping at step %d of %d, before the learning-rate schedule ended "
                    "(at %.0f %% of its peak); --resume continues it", s.time_limit, h.step, self.total_steps,
                    100 * lr)
                break
            loss, lr, padded, took = self._train_step(self.optimizer, self.scheduler, h.step)
            h.step += 1
            h.tokens_seen += padded.n_tokens
            h.train_loss.append(loss)
            h.learning_rate.append(lr)
            h.train_seconds += took
            self.pace.step_seconds.append(took)
            self.pace.step_tokens.append(padded.input_ids.size)
            # rank 0 keeps the time; its re-plans reach the others in _decide
            if self.process.is_main and self.pace.replanning:
                self._check_replan()
            elif self.process.is_main:
                self._check_pace()
            if h.step % s.eval_every == 0 and h.step < self.total_steps:
                self._evaluate(final=False)
            if h.step % s.save_every == 0 and h.step < self.total_steps:
                self._save_checkpoint()
            if self.progress is not None:
                self.progress("pretrain", h.step, self.total_steps)

    def _log_plan(self) -> None:
        plan, v, h = self.plan, self.validation, self.history
        how = {"max_steps": "--max-steps", "epochs": "--epochs (default one epoch)",
               "time_limit": "the time limit"}[plan.planned_by]
        if plan.seconds_per_step is not None:
            how += f" at {plan.seconds_per_step:.3g} s/step measured over {plan.measured_steps} steps"
        logger.info("pretraining %s on %d cells (%d held out, %s) for %d steps (planned by %s; %d warm-up), max "
                    "length %d, on %s%s", self.settings.preset, len(self.split.train_rows), self.split.n_held_out,
                    self.split.by, plan.total_steps, how, plan.warmup_steps, self.max_length, self.device,
                    f", from step {h.step}" if h.step else "")
        if self.process.world_size > 1 or self.settings.grad_accum > 1 or self.settings.max_batch_tokens:
            logger.info("global batch of %d cells: %d process(es) (%s) × %d micro-batch(es) × %d cells%s",
                        self.global_batch, self.process.world_size, self.process.backend or "no process group",
                        self.settings.grad_accum, self.settings.batch_size,
                        f", each cut to at most {self.settings.max_batch_tokens} padded tokens"
                        if self.settings.max_batch_tokens else "")
        if v.n_intermediate == 0:
            when = "no evaluation before"
        elif v.n_subset_batches >= v.n_batches:
            when = f"all of them every {v.eval_every} steps too"
        else:
            subset_cells = sum(len(self.val_batches[i].input_ids) for i in self.subset)
            when = f"the same {subset_cells} of them every {v.eval_every} steps before"
        logger.info("validation: %d held-out cells at the end, %s (estimated %.0f %% of the training compute)",
                    v.n_val_cells, when, 100 * v.estimated_share)

    def _end_seconds(self) -> float:
        """Estimated seconds of the final evaluation and the writes (0 for what is not measured yet)."""
        p = self.pace
        return self._eval_seconds_per_token() * self.val_tokens + p.checkpoint_seconds + p.model_seconds

    def _train_seconds_per_token(self) -> float:
        """Seconds per token of this session's recent training steps (0 before any).

        Per token, as the plan counts (batches differ in length); recent — the last
        :data:`RECENT_SHARE` of the time limit, at least five steps — because a shared machine's speed moves;
        the session's first step, which pays one-off costs, left out.
        """
        p = self.pace
        now = time.monotonic()
        if p.recent_rate is not None and now - p.recent_rate[0] < 1.0:  # called every step: once a second is enough
            return p.recent_rate[1]
        first = 1 if len(p.step_seconds) > 1 else 0
        window = RECENT_SHARE * (self.settings.time_limit or math.inf) * 60
        start, seconds = len(p.step_seconds), 0.0
        while start > first and (seconds < window or len(p.step_seconds) - start < 5):
            start -= 1
            seconds += p.step_seconds[start]
        rate = seconds / max(1, sum(p.step_tokens[start:]))
        p.recent_rate = (now, rate) if p.step_seconds else None
        return rate

    def _step_seconds(self) -> float:
        """Seconds of a mean training step at the recent pace."""
        return self._train_seconds_per_token() * self.sizes.train_tokens_per_step

    def _eval_seconds_per_token(self) -> float:
        """Seconds per validation token at the recent pace: the training pace times the cost of a validation
        token relative to a training token — seen in this session's evaluations, or measured before, or
        else :data:`~genecorpus.model.schedule.EVAL_TOKEN_COST`."""
        p = self.pace
        if p.eval_as_train_seconds > 0:
            cost = p.eval_seconds / p.eval_as_train_seconds
        else:
            cost = p.measured_eval_cost or EVAL_TOKEN_COST
        return cost * self._train_seconds_per_token()

    def _check_replan(self) -> None:
        """Every few percent of the time limit: change the step count if the run would end late (or early)."""
        p, h, s = self.pace, self.history, self.settings
        now = time.monotonic()
        limit = (s.time_limit or 0.0) * 60
        if len(p.step_seconds) < 3 or now - p.last_check < REPLAN_EVERY_SHARE * limit:
            return
        if h.step >= self.total_steps - 1 or self._schedule(h.step) == 0.0:  # the schedule has (all but) ended
            return
        p.last_check = now
        step_seconds = self._step_seconds()
        v = self.validation
        per_step = (step_seconds + v.subset_cells * self.sizes.val_tokens_per_cell * self._eval_seconds_per_token()
                    / s.eval_every + p.checkpoint_seconds / s.save_every)
        total = replan_steps(h.step, self.total_steps, seconds_left=self.deadline - now - self._end_seconds(),
                             seconds_per_step=per_step, limit_seconds=limit)
        if total is None:
            return
        plan = self.plan
        warmup = plan.warmup_steps
        if h.step < warmup and s.warmup_steps is None:  # still warming up: the warm-up of the new count
            warmup = max(h.step, default_warmup_steps(total))
        self._apply_replan(total, warmup, step_seconds)
        logger.info("at step %d, steps take %.3g s (%.3g s planned): %d steps in all instead of %d, the learning rate "
                    "going on linearly to 0 at the new last step", h.step, step_seconds,
                    plan.seconds_per_step or math.nan, total, plan.total_steps)

    def _apply_replan(self, total: int, warmup: int, step_seconds: float) -> None:
        """From this step on: ``total`` steps, the learning rate going on linearly to 0 at the last."""
        plan, v, h = self.plan, self.validation, self.history
        if self.schedule is not None:
            self.schedule.replan(h.step, total_steps=total, warmup_steps=warmup)
        replan = Replan(h.step, plan.total_steps, total, warmup, round(step_seconds, 4))
        self._plan = replace(plan, total_steps=total, warmup_steps=warmup, replans=(*plan.replans, replan))
        self._validation = v.with_steps(total, v.eval_every)
        self.settings = replace(self.settings, warmup_steps=warmup)

    def _check_pace(self) -> None:
        """Once, early: warn if the steps cannot be done before the time limit at the speed seen so far."""
        p, h, s = self.pace, self.history, self.settings
        now = time.monotonic()
        if p.warned or s.time_limit is None or not measuring_done(len(p.step_seconds), sum(p.step_seconds),
                                                                  s.time_limit * 60):
            return
        p.warned = True
        step_seconds = self._step_seconds()
        left = self.total_steps - h.step
        eval_per_token = self._eval_seconds_per_token()
        v = self.validation
        evals = (self.total_steps - 1) // s.eval_every - h.step // s.eval_every
        per_step = step_seconds + (evals * v.subset_cells * self.sizes.val_tokens_per_cell * eval_per_token
                                   + (left // s.save_every) * p.checkpoint_seconds) / max(1, left)
        room = self.deadline - now - self._end_seconds()
        if left * per_step <= PACE_TOLERANCE * room:
            return
        reach = h.step + max(0, int(room / per_step))
        lr = self.scheduler.lr_lambdas[0](reach)
        hint = ("the machine is slower than when the steps were planned" if self.plan.planned_by == "time_limit" else
                "give no --max-steps/--epochs to plan the steps from the time limit")
        logger.warning("at %.3g s per step, the %d steps left need about %.1f min, and %.1f min are left before the "
                       "time limit: the run will stop near step %d of %d with the learning rate at %.0f %% of its "
                       "peak (%s)", step_seconds, left, left * per_step / 60, max(0.0, room) / 60, reach,
                       self.total_steps, 100 * lr, hint)

    def _score(self, batches: list[MaskedBatch]) -> list[tuple[dict[str, float], dict[str, float]]]:
        """The model's and the baseline's sums (loss, top-1, top-10, n) on each (global) batch: this process
        scores its share of the batch's cells (:meth:`_my_micro_batches`), and the sums are added up over
        the processes."""
        import torch

        self.model.eval()
        local = np.zeros((len(batches), 7), dtype=np.float64)
        with torch.no_grad():
            for i, whole in enumerate(batches):
                for _, batch in self._my_micro_batches(whole):
                    if not (batch.labels >= 0).any():
                        continue
                    loss, logits, targets = self._masked_loss(batch)
                    k = min(10, logits.shape[-1])
                    top = logits.topk(k, dim=-1).indices
                    n = float(len(targets))
                    base = self.baseline.score(batch.labels)
                    local[i] += [float(loss) * n, float((top[:, 0] == targets).sum()),
                                 float((top == targets[:, None]).any(dim=-1).sum()), n,
                                 base["loss_sum"], base["top1"], base["top10"]]
        sums = all_reduce_sums(local, self.process)
        keys = ("loss_sum", "top1", "top10", "n")
        return [({k: float(v) for k, v in zip(keys, row[:4], strict=True)},
                 {"n": float(row[3]), **{k: float(v) for k, v in zip(keys[:3], row[4:], strict=True)}})
                for row in sums]

    def _evaluate(self, *, final: bool) -> dict[str, float]:
        """Score the whole validation sample (``final``) or the fixed subset of its batches."""
        started = time.monotonic()
        chosen = range(len(self.val_batches)) if final else self.subset.tolist()
        scores = self._score([self.val_batches[i] for i in chosen])
        record: dict[str, float] = {"step": self.history.step, **_metrics(scores),
                                    "n_cells": sum(len(self.val_batches[i].input_ids) for i in chosen)}
        if final and len(self.subset) < len(self.val_batches):  # the subset too, to compare with earlier evals
            in_subset = set(self.subset.tolist())
            subset = _metrics([sc for i, sc in zip(chosen, scores, strict=True) if i in in_subset])
            record.update({f"subset_{k}": subset[k] for k in ("val_loss", "val_top1", "val_top10", "n_masked")})
        took = time.monotonic() - started
        record["seconds"] = round(took, 3)
        self.history.eval_seconds += took
        if self.pace.step_seconds:
            tokens = sum(self.val_batches[i].input_ids.size for i in chosen)
            self.pace.eval_seconds += took
            self.pace.eval_as_train_seconds += tokens * self._train_seconds_per_token()
        self.history.evals.append(record)
        logger.info("step %d: val loss %.4f (baseline %.4f), top-1 %.3f (%.3f), top-10 %.3f (%.3f) on %d cells",
                    record["step"], record["val_loss"], record["baseline_val_loss"], record["val_top1"],
                    record["baseline_val_top1"], record["val_top10"], record["baseline_val_top10"],
                    record["n_cells"])
        return record

    # ---- outputs

    def _save_checkpoint(self) -> Path:
        """Write ``out/checkpoint`` atomically: a complete new one, or the previous one left in place.

        Collective: every process sends its torch generator states to rank 0, which alone writes; the
        others wait until the checkpoint is in place."""
        import torch

        started = time.monotonic()
        self._account_time()
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        by_rank = gather_objects((torch.get_rng_state(), cuda_rng), self.process)
        final = self.out / CHECKPOINT
        if by_rank is not None:
            self._write_checkpoint(by_rank)
        barrier(self.process)
        self.pace.checkpoint_seconds = time.monotonic() - started
        if not self.pace.model_seconds:  # unmeasured: the final model folder writes less than a checkpoint
            self.pace.model_seconds = self.pace.checkpoint_seconds
        return final

    def _write_checkpoint(self, by_rank: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        """Rank 0's part of :meth:`_save_checkpoint`: the files."""
        import torch

        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / CHECKPOINT
        tmp = self.out / f".{CHECKPOINT}.incomplete"
        old = self.out / f".{CHECKPOINT}.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        default_permissions(tmp)
        state = {
            "settings": {**self._compat()}, "total_steps": self.total_steps, "plan": self.plan.to_dict(),
            "validation": self.validation.to_dict(),
            "schedule": [[a, f] for a, f in self.schedule.points] if self.schedule else None,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(), "torch_rng": by_rank[0][0], "cuda_rng": by_rank[0][1],
            "rng_by_rank": by_rank if len(by_rank) > 1 else None, "processes": self._processes(),
            "history": self.history.to_dict(),
        }
        torch.save(state, tmp / TRAINING_STATE)
        (tmp / "training_state.json").write_text(json.dumps(
            {"step": self.history.step, "total_steps": self.total_steps, "plan": state["plan"],
             "sampler": self.sampler.state_dict(), "settings": state["settings"], "processes": state["processes"]},
            indent=2) + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _account_time(self) -> None:
        now = time.monotonic()
        self.history.seconds += now - self._accounted
        self._accounted = now

    def _write_model(self, stopped: str) -> PretrainResult:
        import torch
        import transformers

        self._account_time()
        h = self.history
        metrics = {k: h.evals[-1][k] for k in METRICS}
        preset = PRESETS[self.settings.preset]
        info = {
            "preset": self.settings.preset, "architecture": asdict(preset), "layout": self.layout.name,
            "max_positions": self.max_positions,
            "corpus": corpus_record(self.reader),
            "split": {**self.split.to_dict(),
                      "val_cells_by_dataset": cells_by_dataset(self.reader, self.split.val_rows)},
            "plan": {**self.plan.to_dict(), "validation": self.validation.to_dict()},
            "training": {"steps": h.step, "total_steps": self.total_steps,
                         "schedule_completed": h.step >= self.total_steps,
                         "last_lr": h.learning_rate[-1] if h.learning_rate else None, "peak_lr": self.settings.lr,
                         "epochs": h.step / self.sampler.batches_per_epoch, "tokens_seen": h.tokens_seen,
                         "wall_seconds": round(h.seconds, 1), "train_seconds": round(h.train_seconds, 2),
                         "eval_seconds": round(h.eval_seconds, 2),
                         "steps_per_second": _rate(h.step, h.train_seconds, 3),
                         "tokens_per_second": _rate(h.tokens_seen, h.train_seconds, 0),
                         "stopped": stopped, "device": str(self.device),
                         "precision": self.precision, "attention": ATTENTION},
            "metrics": metrics, "evals": h.evals, "seed": self.settings.seed,
            "settings": {**asdict(self.settings), "dropout": self.dropout}, "processes": self._processes(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        if self.process.is_main:  # the others wait, then return what rank 0 wrote
            tmp = self.out / ".model.incomplete"
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(self.model, tmp, self.tdict, info, name=self.out.name)
            _plot_loss_curve(h, tmp / LOSS_CURVE)
            for path in sorted(tmp.iterdir()):
                path.replace(self.out / path.name)
            tmp.rmdir()
            logger.info("model written to %s (%s)", self.out, MODEL_INFO)
        info = broadcast_object(info, self.process)
        return PretrainResult(self.out, h.step, metrics, stopped, info)


def _metrics(scores: list[tuple[dict[str, float], dict[str, float]]]) -> dict[str, float]:
    """Metrics of :data:`METRICS` and ``n_masked`` from per-batch sums of :meth:`_Run._score`."""
    sums = {key: sum(model[key] for model, _ in scores) for key in ("loss_sum", "top1", "top10", "n")}
    base = {key: sum(baseline[key] for _, baseline in scores) for key in ("loss_sum", "top1", "top10")}
    n = max(sums["n"], 1.0)
    return {"val_loss": sums["loss_sum"] / n, "val_top1": sums["top1"] / n, "val_top10": sums["top10"] / n,
            "baseline_val_loss": base["loss_sum"] / n, "baseline_val_top1": base["top1"] / n,
            "baseline_val_top10": base["top10"] / n, "n_masked": sums["n"]}


def _rate(amount: float, seconds: float, digits: int) -> float | None:
    return round(amount / seconds, digits) if seconds > 0 else None


def _plot_validation(ax: Axes, evals: list[dict[str, float]]) -> None:
    """Validation loss: one line over the cells every evaluation scored, the final sample's apart."""
    final = evals[-1]
    if "subset_val_loss" not in final:
        ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o-", color="tab:orange",
                label="validation")
        return
    earlier = [e for e in evals[:-1] if e.get("n_cells", final["n_cells"]) < final["n_cells"]]
    subset_cells = int(earlier[0]["n_cells"]) if earlier else 0
    ax.plot([e["step"] for e in earlier] + [final["step"]],
            [e["val_loss"] for e in earlier] + [final["subset_val_loss"]], "o-", color="tab:orange",
            label=f"validation ({subset_cells} cells, the same each time)" if earlier else "validation")
    ax.plot([final["step"]], [final["val_loss"]], "D", color="tab:red",
            label=f"final validation (all {int(final['n_cells'])} cells)")


def _plot_loss_curve(history: _History, path: Path) -> Path:
    """Training loss per step (raw and smoothed), validation loss, the baseline's as a line, and the
    learning rate on a second axis."""
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
        _plot_validation(ax, history.evals)
        ax.axhline(history.evals[-1]["baseline_val_loss"], color="tab:gray", linestyle="--",
                   label="baseline: gene frequency at the rank position")
    ax.set_xlabel("step")
    ax.set_ylabel("masked-gene cross-entropy (nats)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    rates = np.asarray(history.learning_rate, dtype=float)
    if len(rates) and np.isfinite(rates).any():
        lr_axis = ax.twinx()
        lr_axis.plot(np.arange(1, len(rates) + 1), rates, color="tab:gray", linewidth=0.8, alpha=0.6)
        lr_axis.set_ylabel("learning rate", color="tab:gray")
        lr_axis.set_ylim(bottom=0)
        lr_axis.tick_params(axis="y", colors="tab:gray", labelsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _take_cells(batch: MaskedBatch, positions: np.ndarray) -> MaskedBatch:
    """Cells ``positions`` of a batch, cut to the width of the longest of them (the rest is padding)."""
    attention = batch.attention_mask[positions]
    width = max(1, int(attention.sum(axis=1).max(initial=1)))
    return MaskedBatch(batch.input_ids[positions, :width], batch.labels[positions, :width], attention[:, :width])


def _seed_process_rng(seed: int, rank: int, step: int) -> None:
    """Seed this process's torch generator (dropout) from the run's seed, its rank and the step it starts at."""
    import torch

    torch.manual_seed(int(np.random.SeedSequence([seed, 0xD5, rank, step]).generate_state(1, np.uint64)[0] >> 1))


def _saved_processes(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's processes and global batch (older checkpoints: one process, no accumulation)."""
    if "processes" in saved:
        return dict(saved["processes"])
    batch = int(saved["settings"]["batch_size"])
    return {"world_size": 1, "backend": None, "global_batch": batch, "batch_size": batch, "grad_accum": 1,
            "max_batch_tokens": None}


def _masked_lm_loss(model: BertForMaskedLM, *, precision: str, every_parameter: bool) -> torch.nn.Module:
    """A module whose forward is the masked-gene loss of ``model`` (SPEC §2.9), the MLM head on the masked
    positions only: ``(mean cross-entropy, their logits, their labels)`` from ``(input ids, attention mask,
    labels)``. A module, not a method, so that ``DistributedDataParallel`` can wrap the whole computation.

    ``precision``: the forward pass's arithmetic, through :func:`genecorpus.model.bert.autocast`.
    ``every_parameter``: a batch without a masked gene still runs the head (times 0), so that every weight
    gets a gradient — ``DistributedDataParallel`` waits for all of them in every backward pass.
    """
    import torch

    class MaskedLMLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            with autocast(ids.device, precision):
                hidden = self.model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
                selected = labels >= 0
                logits = self.model.cls(hidden[selected]).float()
            targets = labels[selected]
            if len(targets) == 0:  # no gene in any cell of the batch: nothing to learn, a zero loss with a graph
                zero = hidden.sum() * 0.0
                if every_parameter:
                    with autocast(ids.device, precision):
                        zero = zero + self.model.cls(hidden[:, :1]).float().sum() * 0.0
                return zero, logits, targets
            return torch.nn.functional.cross_entropy(logits, targets), logits, targets

    return MaskedLMLoss()
