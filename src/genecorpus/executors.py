"""Where tasks run: in this process, or in a pool of local worker processes.

Every executor returns results **in task order**, whatever order they finish in, so reductions are
merged in a fixed order and the output does not depend on the number of workers.
"""

from __future__ import annotations

import functools
import importlib
import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, ProcessPoolExecutor, wait
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from concurrent.futures import Future

logger = logging.getLogger(__name__)

__all__ = ["Executor", "LocalExecutor", "ProgressCallback", "fold"]

A = TypeVar("A")


class ProgressCallback(Protocol):
    """Told about each finished task: stage name, tasks done, tasks in the stage."""

    def __call__(self, stage: str, done: int, total: int) -> None: ...


class Executor(Protocol):
    """Runs ``fn(*args)`` for each task and returns the results in task order."""

    def map(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run every task; raise the first task error after stopping the rest."""
        ...

    def start(self, modules: Sequence[str]) -> None:
        """Start workers ahead of the first stage, importing ``modules`` (may do nothing)."""
        ...

    def close(self) -> None:
        """Release workers."""
        ...


def _import_modules(modules: Sequence[str]) -> None:
    for name in modules:
        importlib.import_module(name)


class LocalExecutor:
    """Runs tasks in this process (``workers=1``) or in ``workers`` spawned processes."""

    def __init__(self, workers: int = 1, *, progress: ProgressCallback | None = None) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool

    def start(self, modules: Sequence[str]) -> None:
        """Spawn the workers now and let them import ``modules`` (no-op for one worker)."""
        if self.workers > 1:
            pool = self._get_pool()
            for _ in range(self.workers):
                pool.submit(_import_modules, list(modules))

    def map(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run every task; results come back in task order."""
        total = len(tasks)
        if self.progress:
            self.progress(stage, 0, total)
        if self.workers == 1 or total <= 1:
            results = []
            for i, args in enumerate(tasks):
                results.append(fn(*args))
                if self.progress:
                    self.progress(stage, i + 1, total)
            return results
        pool = self._get_pool()
        futures = [pool.submit(fn, *args) for args in tasks]
        done_count = 0
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
            done_count += len(done)
            if self.progress:
                self.progress(stage, done_count, total)
        return [f.result() for f in futures]

    def fold(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
             combine: Callable[[A, Any], A], initial: A) -> A:
        """``combine(acc, result)`` over the results in task order, each dropped once combined.

        At most ``2 * workers`` tasks are submitted and not yet combined, so memory holds the
        accumulator and a few results, whatever the number of tasks.
        """
        total = len(tasks)
        if self.progress:
            self.progress(stage, 0, total)
        acc = initial
        if self.workers == 1 or total <= 1:
            for i, args in enumerate(tasks):
                acc = combine(acc, fn(*args))
                if self.progress:
                    self.progress(stage, i + 1, total)
            return acc
        pool = self._get_pool()
        window = 2 * self.workers
        futures: dict[int, Future[Any]] = {}
        running: set[Future[Any]] = set()
        submitted = combined = done_count = 0
        while combined < total:
            while submitted < total and submitted - combined < window:
                fut = pool.submit(fn, *tasks[submitted])
                futures[submitted] = fut
                running.add(fut)
                submitted += 1
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                if fut.exception() is not None:
                    for other in running:
                        other.cancel()
                    raise fut.exception()  # type: ignore[misc]
            done_count += len(done)
            if self.progress and done:
                self.progress(stage, done_count, total)
            while combined in futures and futures[combined].done():
                acc = combine(acc, futures.pop(combined).result())
                combined += 1
        return acc

    def close(self) -> None:
        """Shut the worker pool down."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def fold(executor: Executor, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
         combine: Callable[[A, Any], A], initial: A) -> A:
    """``combine(acc, result)`` over the task results in task order.

    Uses the executor's own ``fold`` when it has one (results are dropped as they are combined), else
    reduces the list that :meth:`Executor.map` returns.
    """
    own = getattr(executor, "fold", None)
    if own is not None:
        return own(stage, fn, tasks, combine, initial)  # type: ignore[no-any-return]
    return functools.reduce(combine, executor.map(stage, fn, tasks), initial)
