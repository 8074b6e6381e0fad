"""The schedule of a pretraining run: how many optimizer steps, their learning-rate warm-up, and what is
validated when.

A step count decides the steps exactly, the same on every machine: ``max_steps``, or ``epochs`` × batches
per epoch (one epoch when nothing is given). A time limit alone *plans* them: the run measures its own
speed in its first steps (:class:`MeasuredTimes`), and :func:`plan_steps_for_time` picks the largest step
count whose training, validations and writes fit in the time left. Such a plan depends on the machine
and its load; it is recorded (:class:`StepPlan`), and ``--max-steps N --warmup-steps W`` with the
recorded values reproduces the run anywhere. When the machine turns out slower or faster than measured
(a shared machine can change speed by a factor of several within seconds), the run re-plans: the
learning rate goes on linearly from its current value to zero at the new last step
(:meth:`LearningRateSchedule.replan`, :func:`replan_steps`), and the plan records it.

Validation is bounded by default (:func:`plan_validation`): all evaluations together cost about
:data:`VALIDATION_SHARE` of the training compute. Costs are counted in tokens — a validation token
(forward pass only) costs :data:`EVAL_TOKEN_COST` of a training token (forward, backward, optimizer) —
so that a run with a step count gets the same validation schedule on every machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_EVALS",
    "DEFAULT_VAL_CELLS",
    "EVAL_TOKEN_COST",
    "MIN_VAL_CELLS",
    "PLANNED_BY",
    "VALIDATION_SHARE",
    "LearningRateSchedule",
    "MeasuredTimes",
    "Replan",
    "StepPlan",
    "ValidationPlan",
    "WorkSizes",
    "default_warmup_steps",
    "measuring_done",
    "plan_steps_for_time",
    "plan_validation",
    "replan_steps",
]

PLANNED_BY = ("max_steps", "epochs", "time_limit")
"""How a run's step count was decided."""
WARMUP_DIVISOR = 10
"""Default warm-up: a tenth of the steps (rounded down)…"""
MAX_WARMUP_STEPS = 1000
"""…and at most this many steps."""
DEFAULT_EVALS = 10
"""Evaluations per run when ``eval_every`` is not given (the last one at the last step)."""
DEFAULT_VAL_CELLS = 2000
"""Held-out cells in the validation sample when ``val_cells`` is not given (fewer in a short run)."""
MIN_VAL_CELLS = 100
"""The validation sample keeps at least this many cells (or every held-out cell, if fewer): some 7,000
masked genes at 450 genes a cell."""
VALIDATION_SHARE = 0.10
"""Default cost of all evaluations of a run, as a share of its training compute: half for the final
evaluation (on the whole validation sample), half for the intermediate ones (on a fixed subset)."""
EVAL_TOKEN_COST = 0.35
"""Cost of scoring a validation token relative to training on one token. Measured on a CPU (torch 2.13,
presets ``tiny`` and ``small``): 0.25–0.4; a forward pass is about a third of forward + backward."""
SAFETY_SHARE = 0.03
"""Share of a time limit a time plan leaves unused, for a machine slower than measured…"""
MIN_SAFETY_SECONDS = 1.0
"""…and at least this many seconds."""
MEASURE_MIN_STEPS = 2
"""A time plan times at least this many steps after the first (whose one-off costs it leaves out)…"""
MEASURE_MAX_STEPS = 50
"""…and stops at this many, or once :data:`MEASURE_SHARE` of the time limit has passed…"""
MEASURE_SHARE = 0.01
"""…(a share of the time limit)…"""
MEASURE_MAX_SHARE = 0.05
"""…and, whatever the count, once this share has passed (a slow model: at least two steps). The
measured steps are undone, so measuring is kept short: the run re-plans if the first measure was off."""


def measuring_done(n_steps: int, seconds: float, budget_seconds: float) -> bool:
    """Whether a time plan has timed enough steps: ``n_steps`` (the first included) in ``seconds``.

    Examples
    --------
    >>> measuring_done(2, 0.5, 600), measuring_done(3, 6.0, 600), measuring_done(51, 2.0, 600)
    (False, True, True)
    """
    if n_steps > MEASURE_MIN_STEPS and (seconds >= MEASURE_SHARE * budget_seconds or n_steps > MEASURE_MAX_STEPS):
        return True
    return (n_steps >= 2 and seconds >= MEASURE_MAX_SHARE * budget_seconds) or seconds >= budget_seconds / 2


def default_warmup_steps(total_steps: int) -> int:
    """The default linear warm-up of a run of ``total_steps``: 10 % of the steps, at most 1,000.

    Examples
    --------
    >>> default_warmup_steps(700), default_warmup_steps(50_000)
    (70, 1000)
    """
    return min(MAX_WARMUP_STEPS, total_steps // WARMUP_DIVISOR)


@dataclass(frozen=True)
class StepPlan:
    """The optimizer steps of a run, their learning-rate schedule and how the count was decided."""

    total_steps: int
    """Steps of the linear warm-up and decay schedule; the learning rate reaches 0 after the last."""
    warmup_steps: int
    """Steps of the linear warm-up from 0 to the peak learning rate."""
    planned_by: str
    """``"max_steps"``, ``"epochs"`` (also the default single epoch) or ``"time_limit"``."""
    seconds_per_step: float | None = None
    """Training seconds per step the time plan assumed (measured); None for a step count."""
    measured_steps: int = 0
    """Steps timed to measure the speed (then undone: the run restarts from step 0 with the plan)."""
    measure_seconds: float = 0.0
    """Wall time the measuring took (steps, one validation sample, one model write)."""
    estimated_seconds: float | None = None
    """The time plan's estimate of the rest of the run: training, validations and writes."""
    replans: tuple[Replan, ...] = ()
    """Changes of the step count while the run went (a time plan only); ``total_steps`` and
    ``warmup_steps`` are those of the last."""

    def to_dict(self) -> dict[str, Any]:
        """What the model info and the checkpoint record about the plan."""
        return {**asdict(self), "replans": [asdict(r) for r in self.replans]}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> StepPlan:
        """The plan :meth:`to_dict` recorded."""
        fields = {k: record[k] for k in cls.__dataclass_fields__ if k in record}
        fields["replans"] = tuple(Replan(**r) for r in record.get("replans", ()))
        return cls(**fields)


@dataclass(frozen=True)
class Replan:
    """A change of a time plan's step count while the run went."""

    step: int
    """Steps done when it changed."""
    from_total: int
    """The step count before."""
    total_steps: int
    """The step count after."""
    warmup_steps: int
    """The warm-up after (it only changes while the run is still warming up)."""
    seconds_per_step: float
    """The training seconds per step seen when it changed (validations and checkpoints aside)."""


@dataclass
class LearningRateSchedule:
    """The learning rate per step, as a factor of the peak: linear between breakpoints, 0 after the last.

    A new schedule is the linear warm-up and decay of ``transformers.get_linear_schedule_with_warmup``
    (the same factors to the last bit, so a run gives the same losses with either);
    :meth:`replan` moves its end and keeps it continuous.

    Examples
    --------
    >>> schedule = LearningRateSchedule.linear(warmup_steps=2, total_steps=10)
    >>> [round(schedule(s), 3) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    >>> schedule.replan(6, total_steps=8, warmup_steps=2)
    >>> [round(schedule(s), 3) for s in (5, 6, 7, 8)]
    [0.625, 0.5, 0.25, 0.0]
    """

    points: list[tuple[int, float]]
    """``(step, factor)`` breakpoints, steps increasing."""

    @classmethod
    def linear(cls, *, warmup_steps: int, total_steps: int) -> LearningRateSchedule:
        """Linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
        if warmup_steps >= total_steps:  # as transformers: the warm-up goes on, no decay within the run
            return cls([(0, 0.0), (warmup_steps, 1.0)])
        if warmup_steps == 0:
            return cls([(0, 1.0), (total_steps, 0.0)])
        return cls([(0, 0.0), (warmup_steps, 1.0), (total_steps, 0.0)])

    def __call__(self, step: int) -> float:
        """The factor of the peak learning rate at ``step`` (steps done; the next one uses it)."""
        for (a, fa), (b, fb) in zip(self.points, self.points[1:], strict=False):
            if a <= step < b:
                # written as transformers writes it: s / W rising, (N - s) / (N - W) falling
                if fb >= fa:
                    return fa + (fb - fa) * ((step - a) / (b - a))
                return fb + (fa - fb) * ((b - step) / (b - a))
        return 0.0

    def replan(self, step: int, *, total_steps: int, warmup_steps: int) -> None:
        """From ``step`` on: on to 1 at ``warmup_steps`` if still ahead, then linearly to 0 at ``total_steps``.

        The factor at ``step`` (the learning rate of the next step) does not change.
        """
        factor = self(step)
        points = [p for p in self.points if p[0] < step]
        points.append((step, factor))
        if step < warmup_steps < total_steps:
            points.append((warmup_steps, 1.0))
        points.append((max(total_steps, points[-1][0] + 1), 0.0))
        self.points = points


@dataclass(frozen=True)
class WorkSizes:
    """The tokens a run's steps and validation cells hold: what its costs are counted in."""

    batch_size: int
    """Cells per training step and per validation batch."""
    train_tokens_per_step: float
    """Mean tokens of a training batch, padding included (the model computes on them)."""
    val_tokens_per_cell: float
    """Mean tokens of a validation cell in its batch (longest first, so little padding)."""
    n_val_candidates: int
    """Cells the validation sample can hold: the held-out cells, at most ``val_cells`` or
    :data:`DEFAULT_VAL_CELLS`."""


@dataclass(frozen=True)
class ValidationPlan:
    """When a run validates and on which cells.

    The final evaluation (at the last step, or where a time limit stops the run) scores the whole
    validation sample; the intermediate ones score the same subset of its batches every time, spread
    over the batches (which are sorted by length), so that they can be compared with one another.
    """

    total_steps: int
    """Steps of the run it was planned for."""
    eval_every: int
    """Steps between intermediate evaluations."""
    n_val_cells: int
    """Cells of the validation sample, all scored by the final evaluation."""
    n_batches: int
    """Batches of the validation sample."""
    n_subset_batches: int
    """Batches an intermediate evaluation scores (``n_batches``: the whole sample)."""
    n_intermediate: int
    """Intermediate evaluations planned (before the last step)."""
    estimated_share: float
    """Estimated cost of all evaluations as a share of the training compute."""

    def subset_batches(self) -> np.ndarray:
        """Indices of the batches intermediate evaluations score: evenly spread, the same every time.

        Examples
        --------
        >>> ValidationPlan(100, 10, 40, 10, 3, 9, 0.1).subset_batches().tolist()
        [0, 4, 9]
        """
        return np.unique(np.linspace(0, self.n_batches - 1, self.n_subset_batches).round().astype(np.int64))

    @property
    def subset_cells(self) -> int:
        """Cells an intermediate evaluation scores (the last batch may be short)."""
        return self.n_val_cells if self.n_subset_batches >= self.n_batches else self.n_subset_batches * (
            math.ceil(self.n_val_cells / self.n_batches))

    @property
    def scored_cells(self) -> int:
        """Cells scored by all evaluations of the run, the final one included."""
        return self.n_val_cells + self.n_intermediate * self.subset_cells

    def with_steps(self, total_steps: int, eval_every: int | None = None) -> ValidationPlan:
        """The same sample and subset over a run of ``total_steps`` (a resumed run given more steps).

        ``eval_every`` default: as many intermediate evaluations as planned, spread over the new run.

        Examples
        --------
        >>> plan = ValidationPlan(100, 10, 40, 10, 3, 9, 0.1).with_steps(200)
        >>> plan.eval_every, plan.n_intermediate, round(plan.estimated_share, 3)
        (20, 9, 0.05)
        """
        every = eval_every or max(1, math.ceil(total_steps / (self.n_intermediate + 1)))
        n_intermediate = (total_steps - 1) // every
        scored = self.n_val_cells + n_intermediate * self.subset_cells
        share = self.estimated_share * scored / max(1, self.scored_cells) * self.total_steps / total_steps
        return replace(self, total_steps=total_steps, eval_every=every, n_intermediate=n_intermediate,
                       estimated_share=share)

    def to_dict(self) -> dict[str, Any]:
        """What the model info and the checkpoint record about validation."""
        return {**asdict(self), "estimated_share": round(self.estimated_share, 4)}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> ValidationPlan:
        """The plan :meth:`to_dict` recorded."""
        return cls(**{k: record[k] for k in cls.__dataclass_fields__})


def plan_validation(total_steps: int, sizes: WorkSizes, *, eval_every: int | None = None,
                    fixed_val_cells: bool = False, eval_cost: float = EVAL_TOKEN_COST,
                    share: float = VALIDATION_SHARE) -> ValidationPlan:
    """Validation of a run of ``total_steps``, costing about ``share`` of its training compute.

    What the user gave is kept: ``eval_every`` fixes the rhythm, ``fixed_val_cells`` (``val_cells``
    given) makes every evaluation score the whole sample. The rest is chosen to fit the budget: the
    validation sample takes half of it (at least :data:`MIN_VAL_CELLS` cells, at most the candidates),
    the intermediate evaluations the other half: ``DEFAULT_EVALS - 1`` of them on a fixed subset of the
    sample's batches, fewer if not even one batch each fits (with ``fixed_val_cells``: as many
    whole-sample evaluations as fit). A short run can exceed the budget through the sample's floor, or
    through a given ``eval_every`` (at least one batch per evaluation).

    Parameters
    ----------
    total_steps
        Optimizer steps of the run.
    sizes
        Tokens per training step and per validation cell; candidate validation cells.
    eval_every
        Steps between evaluations, if the user gave it; default about :data:`DEFAULT_EVALS` per run.
    fixed_val_cells
        Every evaluation scores all candidate cells (the user gave ``val_cells``).
    eval_cost
        Cost of a validation token relative to a training token.
    share
        Budget of all evaluations, as a share of the training compute.

    Returns
    -------
    ValidationPlan

    Examples
    --------
    >>> sizes = WorkSizes(batch_size=8, train_tokens_per_step=4000, val_tokens_per_cell=500,
    ...                   n_val_candidates=2000)
    >>> plan = plan_validation(700, sizes)
    >>> plan.n_val_cells, plan.n_intermediate, plan.n_subset_batches * 8, round(plan.estimated_share, 3)
    (800, 9, 88, 0.1)
    """
    cells_budget = share * total_steps * sizes.train_tokens_per_step / eval_cost / max(1.0, sizes.val_tokens_per_cell)
    n_candidates = max(1, sizes.n_val_candidates)
    if fixed_val_cells:
        n_val = n_candidates
    else:
        n_val = int(min(n_candidates, max(min(MIN_VAL_CELLS, n_candidates), cells_budget // 2)))
    size = sizes.batch_size
    n_batches = math.ceil(n_val / size)
    every = eval_every or max(1, math.ceil(total_steps / DEFAULT_EVALS))
    n_intermediate = (total_steps - 1) // every
    left = max(0.0, cells_budget - n_val)
    n_subset = n_batches if fixed_val_cells else min(n_batches, max(1, int(left / max(1, n_intermediate) // size)))
    if eval_every is None and n_intermediate:  # only as many evaluations as fit
        per_eval = min(n_subset * size, n_val)
        n_intermediate = min(n_intermediate, int(left // per_eval))
        every = math.ceil(total_steps / (n_intermediate + 1))
        n_intermediate = (total_steps - 1) // every
    plan = ValidationPlan(total_steps, every, n_val, n_batches, n_subset, n_intermediate, 0.0)
    cost = plan.scored_cells * sizes.val_tokens_per_cell * eval_cost
    return replace(plan, estimated_share=cost / (total_steps * sizes.train_tokens_per_step))


@dataclass(frozen=True)
class MeasuredTimes:
    """What a run measured of its own speed, per unit of work (wall seconds)."""

    train_seconds_per_token: float
    """Seconds of a training step per token of its batch (padding included), the first step excluded."""
    eval_seconds_per_token: float
    """Seconds of scoring a validation batch per token."""
    checkpoint_seconds: float
    """Seconds of writing a checkpoint (model, optimizer state, histories)."""
    model_seconds: float
    """Seconds of writing the final model folder with its loss curve."""
    n_steps: int
    """Steps timed (the first one included)."""
    seconds: float
    """Wall time of the measuring."""


REPLAN_EVERY_SHARE = 0.05
"""A time plan checks its pace each time this share of the time limit has passed…"""
REPLAN_LATE_SHARE = 0.01
"""…takes fewer steps when it would end this share of the time limit late (within the safety margin)…"""
REPLAN_AHEAD_SHARE = 0.05
"""…and more when it would otherwise end this share of the time limit early."""


def replan_steps(step: int, total_steps: int, *, seconds_left: float, seconds_per_step: float,
                 limit_seconds: float) -> int | None:
    """The step count a time plan changes to at ``step``, or None to keep ``total_steps``.

    Parameters
    ----------
    step
        Steps done.
    total_steps
        The planned steps.
    seconds_left
        Seconds left for the remaining steps, once the final evaluation and writes are set aside.
    seconds_per_step
        Seconds a step costs at the pace seen, validations and checkpoints included.
    limit_seconds
        The time limit (its safety margin is kept free).

    Examples
    --------
    >>> replan_steps(100, 700, seconds_left=640, seconds_per_step=1.0, limit_seconds=1200)  # on time
    >>> replan_steps(100, 700, seconds_left=400, seconds_per_step=1.0, limit_seconds=1200)  # slower
    464
    >>> replan_steps(100, 700, seconds_left=800, seconds_per_step=1.0, limit_seconds=1200)  # much faster
    864
    """
    usable = seconds_left - max(MIN_SAFETY_SECONDS, SAFETY_SHARE * limit_seconds)
    target = step + max(1, int(usable / max(1e-9, seconds_per_step)))
    if usable < 0 and target < total_steps:
        return target
    if abs(target - total_steps) < 2:  # a step's difference: the margin takes it
        return None
    if (total_steps - target) * seconds_per_step > REPLAN_LATE_SHARE * limit_seconds:
        return target
    if (target - total_steps) * seconds_per_step > REPLAN_AHEAD_SHARE * limit_seconds:
        return target
    return None


def plan_steps_for_time(budget_seconds: float, times: MeasuredTimes, *, sizes: WorkSizes,
                        eval_every: int | None = None, fixed_val_cells: bool = False,
                        save_every: int = 500) -> tuple[int, ValidationPlan, float]:
    """The most steps whose training, validation and writes fit in ``budget_seconds``.

    A safety margin (:data:`SAFETY_SHARE` of the budget, at least :data:`MIN_SAFETY_SECONDS`) is left
    for a machine slower than measured. Validation is planned with the measured cost of a validation
    token relative to a training token.

    Parameters
    ----------
    budget_seconds
        Wall seconds left for training, validations, checkpoints and the final model.
    times
        The measured speed.
    sizes, eval_every, fixed_val_cells
        See :func:`plan_validation`.
    save_every
        Steps between checkpoints (one more is written at the end).

    Returns
    -------
    tuple[int, ValidationPlan, float]
        The step count (at least 1), its validation and its estimated seconds.

    Examples
    --------
    >>> times = MeasuredTimes(train_seconds_per_token=2.5e-4, eval_seconds_per_token=8e-5,
    ...                       checkpoint_seconds=0.5, model_seconds=1.0, n_steps=12, seconds=20.0)
    >>> sizes = WorkSizes(batch_size=8, train_tokens_per_step=4000, val_tokens_per_cell=500,
    ...                   n_val_candidates=2000)
    >>> steps, validation, seconds = plan_steps_for_time(1180, times, sizes=sizes)
    >>> steps, validation.n_val_cells, round(seconds)
    (1038, 1297, 1144)
    """
    step_seconds = max(1e-9, times.train_seconds_per_token * sizes.train_tokens_per_step)
    eval_cost = max(0.01, times.eval_seconds_per_token / max(1e-12, times.train_seconds_per_token))
    usable = budget_seconds - max(MIN_SAFETY_SECONDS, SAFETY_SHARE * budget_seconds)

    def estimate(steps: int) -> tuple[float, ValidationPlan]:
        validation = plan_validation(steps, sizes, eval_every=eval_every, fixed_val_cells=fixed_val_cells,
                                     eval_cost=eval_cost)
        scored = validation.scored_cells
        writes = ((steps - 1) // save_every + 1) * times.checkpoint_seconds + times.model_seconds
        seconds = (steps * step_seconds + scored * sizes.val_tokens_per_cell * times.eval_seconds_per_token
                   + writes)
        return seconds, validation

    low, high = 1, max(2, math.ceil(usable / step_seconds) + 1)
    while low + 1 < high:  # estimate(low) fits, or low == 1; estimate(high) does not
        middle = (low + high) // 2
        if estimate(middle)[0] <= usable:
            low = middle
        else:
            high = middle
    seconds, validation = estimate(low)
    return low, validation, seconds
