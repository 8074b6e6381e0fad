"""Where tasks run: in this process, or in a pool of local worker processes.

Every executor returns results **in task order**, whatever order they finish in, so reductions are
merged in a fixed order and the output does not depend on the number of workers.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from genecorpus.config import ClusterSpec, Engine
from genecorpus.errors import ConfigError, WorkerLostError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "DaskExecutor", "Executor", "LocalExecutor", "ProgressCallback", "fold", "make_executor", "require_guarded_main",
]

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


@contextlib.contextmanager
def _children_ignore_sigint() -> Iterator[None]:
    """Processes started inside this block ignore SIGINT for good.

    Ctrl-C reaches every process of the terminal's process group: the driver alone should stop (and stop
    the workers), not each worker with a traceback of its own. A child whose parent ignores SIGINT keeps
    it ignored (Python installs its KeyboardInterrupt handler only over the default action). SIGINT is
    blocked meanwhile, so a Ctrl-C in this short window is delivered to the driver afterwards, not lost.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def require_guarded_main() -> None:
    """Refuse to start worker processes from a script that would run again in each of them.

    Spawned workers import the main script again (as multiprocessing does: a script file, but not a
    package's ``__main__`` nor an interactive session); one that calls genecorpus at its top level would
    start the same build in every worker. Raises :class:`~genecorpus.errors.ConfigError` naming the fix.
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    spec = getattr(main, "__spec__", None)
    if not path or (spec is not None and spec.name.endswith(".__main__")):
        return
    try:
        tree = ast.parse(Path(path).read_text())
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in names) and any(
                    isinstance(n, ast.Constant) and n.value == "__main__" for n in names):
                return
    msg = (f"{path}: genecorpus starts worker processes, which import this script again and would start "
           "the build again; put the calls under `if __name__ == \"__main__\":` (see the README), or use "
           "workers=1")
    raise ConfigError(msg)


class LocalExecutor:
    """Runs tasks in this process (``workers=1``) or in ``workers`` spawned processes.

    A worker process that dies (killed, or out of memory) breaks the pool; the pool is then started
    again and the unfinished tasks rerun, up to ``restarts`` times per stage.
    """

    def __init__(self, workers: int = 1, *, progress: ProgressCallback | None = None, restarts: int = 2) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress
        self.restarts = restarts
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            require_guarded_main()
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx)
        return self._pool

    def start(self, modules: Sequence[str]) -> None:
        """Spawn the workers now and let them import ``modules`` (no-op for one worker)."""
        if self.workers > 1:
            pool = self._get_pool()
            with _children_ignore_sigint():
                for _ in range(self.workers):
                    pool.submit(_import_modules, list(modules))

    def map(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run every task; results come back in task order."""
        return self.fold(stage, fn, tasks, _append, [])

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
        try:
            return self._fold_in_pool(stage, fn, tasks, combine, initial)
        except KeyboardInterrupt:
            self._terminate()
            raise

    def _fold_in_pool(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
                      combine: Callable[[A, Any], A], acc: A) -> A:
        total = len(tasks)
        pool = self._get_pool()
        window = 2 * self.workers
        futures: dict[int, Future[Any]] = {}
        running: set[Future[Any]] = set()
        submitted = combined = done_count = restarts = 0
        while combined < total:
            while submitted < total and submitted - combined < window:
                fut = _submit(pool, fn, tasks[submitted])
                futures[submitted] = fut
                running.add(fut)
                submitted += 1
            done, running = wait(running, return_when=FIRST_COMPLETED)
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors and all(isinstance(e, BrokenProcessPool) for e in errors) and restarts < self.restarts:
                restarts += 1
                logger.warning("a worker process died during %s (killed, or out of memory); starting the "
                               "workers again and rerunning its unfinished tasks (restart %d of %d)",
                               stage, restarts, self.restarts)
                self._pool.shutdown(wait=False, cancel_futures=True)  # type: ignore[union-attr]
                self._pool = None
                pool = self._get_pool()
                for i, fut in futures.items():
                    if not fut.done() or fut.exception() is not None:
                        futures[i] = _submit(pool, fn, tasks[i])
                # what the next wait watches: every task not combined yet and not finished well, so that a
                # task whose new pool broke at once is seen failed again, not skipped forever
                running = {f for f in futures.values() if not f.done() or f.exception() is not None}
                continue
            if errors:
                for other in running:
                    other.cancel()
                wait(running)  # tasks already under way finish: nothing writes to the build after we raise
                if isinstance(errors[0], BrokenProcessPool):
                    msg = (f"worker processes died {restarts + 1} times during {stage} (killed, or out of "
                           "memory); use fewer --workers or a smaller block_size")
                    raise WorkerLostError(msg) from errors[0]
                raise errors[0]
            done_count += len(done)
            if self.progress and done:
                self.progress(stage, done_count, total)
            # a future that failed after the wait above (a worker died meanwhile) is left to the next wait
            while combined in futures and futures[combined].done() and futures[combined].exception() is None:
                acc = combine(acc, futures.pop(combined).result())
                combined += 1
        return acc

    def close(self) -> None:
        """Shut the worker pool down."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _terminate(self) -> None:
        """Stop the workers at once (Ctrl-C): tasks under way write by rename, so nothing is left half-done."""
        if self._pool is None:
            return
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None


def _submit(pool: ProcessPoolExecutor, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
    """``pool.submit`` with workers started SIGINT-free; a pool broken meanwhile gives a failed future."""
    try:
        with _children_ignore_sigint():
            return pool.submit(fn, *args)
    except BrokenProcessPool as e:  # a worker died since the last wait: handled like a task that saw it
        failed: Future[Any] = Future()
        failed.set_exception(e)
        return failed


class DaskExecutor:
    """Runs tasks on Dask ``distributed``: a ``LocalCluster``, a SLURM cluster, or a running scheduler.

    Tasks are module-level functions whose arguments name files, not arrays; an argument object shared
    by several tasks (the build context) is sent to the cluster once. Results come back in task order.
    A lost worker's tasks are rerun by the scheduler (``distributed.scheduler.allowed-failures``), and a
    SLURM job that ends is replaced by a new one; an error raised by a task is not retried, since reading
    the same bytes again gives the same error.
    """

    def __init__(self, client: Any, *, cluster: Any = None, progress: ProgressCallback | None = None,
                 n_workers: int = 1) -> None:
        self.client = client
        self.cluster = cluster
        self.progress = progress
        self.workers = max(1, n_workers)
        self._warm_up: list[Any] = []

    @classmethod
    def create(cls, spec: ClusterSpec, *, progress: ProgressCallback | None = None) -> DaskExecutor:
        """Start (or connect to) the cluster that ``spec`` describes."""
        try:
            from distributed import Client, LocalCluster
        except ImportError:
            msg = "the dask engine needs the dask extra: pip install 'genecorpus[dask]'"
            raise ConfigError(msg) from None
        # importing distributed sets its loggers to INFO (its config); keep them as quiet as ours
        logging.getLogger("distributed").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        if spec.kind == "scheduler":
            try:
                client = Client(spec.address, timeout="30s")
            except (OSError, TimeoutError) as e:
                msg = f"cannot reach the Dask scheduler at {spec.address} ({e}); check the address"
                raise ConfigError(msg) from None
            n = max(1, len(client.scheduler_info().get("workers", {})))
            return cls(client, progress=progress, n_workers=n)
        if spec.kind == "slurm":
            slurm_cluster = _slurm_cluster_class()
            # the scheduler runs in this process; its HTTP server listens on its own address, not 0.0.0.0
            cluster = slurm_cluster(
                cores=spec.threads_per_worker, processes=1, memory=spec.memory_per_worker, queue=spec.queue,
                account=spec.account, walltime=spec.walltime, local_directory=spec.local_directory,
                job_extra_directives=list(spec.job_extra_directives),
                job_script_prologue=list(spec.job_script_prologue), python=spec.python,
                interface=spec.interface, worker_extra_args=list(spec.worker_extra_args),
                log_directory=spec.log_directory, scheduler_options={"dashboard_address": None})
            try:
                _check_job_script(cluster.job_script())
            except ConfigError:
                cluster.close()
                raise
            # submitted now, then kept at that count: a job that ends (scancel, walltime, a node lost) is
            # replaced once the scheduler gives its worker up (distributed.deploy.lost-worker-timeout)
            cluster.scale(jobs=spec.workers)
            cluster.adapt(minimum_jobs=spec.workers, maximum_jobs=spec.workers)
        else:
            with _children_ignore_sigint():
                cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=spec.threads_per_worker,
                                       processes=True, memory_limit=spec.memory_per_worker,
                                       local_directory=spec.local_directory, dashboard_address=None)
        client = Client(cluster)
        return cls(client, cluster=cluster, progress=progress, n_workers=spec.workers)

    def start(self, modules: Sequence[str]) -> None:
        """Let the workers that are up import ``modules`` (SLURM workers may still be queued)."""
        with contextlib.suppress(Exception):  # a warm-up only: the first task imports them anyway
            workers = list(self.client.scheduler_info().get("workers", {}))
            # one task pinned to each worker; kept referenced so that they are not cancelled
            self._warm_up = [self.client.submit(_import_modules, list(modules), workers=[w],
                                                allow_other_workers=False, pure=False) for w in workers]

    def _submit(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        self._await_warm_up()
        token = uuid.uuid4().hex[:8]
        shared = self._share(stage, tasks, token)
        return [self.client.submit(fn, *(shared.get(id(a), a) for a in tasks[i]), key=f"{stage}-{i}-{token}",
                                   pure=False) for i in range(len(tasks))]

    def _await_warm_up(self) -> None:
        """Let the warm-up imports finish before anything is sent to the workers.

        A worker unpickles what it receives in another thread than the one running the warm-up task; two
        threads importing submodules of one package at once can see it half initialized (an ImportError).
        """
        warm_up, self._warm_up = self._warm_up, []
        if warm_up:
            from distributed import wait

            with contextlib.suppress(Exception):  # a failed warm-up only means the first task imports
                wait(warm_up)

    def _share(self, stage: str, tasks: Sequence[tuple[Any, ...]], token: str) -> dict[int, Any]:
        """Objects passed to more than one task, sent to the cluster once (id → future).

        Each is the result of a task that returns it, not scattered data: the scheduler keeps the object
        in that task, so a copy lost with its workers (a SLURM job cancelled, a node lost, every worker
        gone) is made again. Scattered data would be lost for good, and every task needing it cancelled
        ("already forgotten"), once the workers holding it are gone; Dask keeps a single copy of data that
        no task is waiting for.
        """
        seen: dict[int, tuple[int, Any]] = {}
        for args in tasks:
            for a in args:
                # functions travel by reference; small and per-task values are not worth a task of their own
                if not isinstance(a, (str, int, float, bool, bytes, type(None), os.PathLike)) and not callable(a):
                    n, _ = seen.get(id(a), (0, a))
                    seen[id(a)] = (n + 1, a)
        shared = {k: a for k, (n, a) in seen.items() if n > 1}
        if not shared:
            return {}
        return {k: self.client.submit(_identity, a, key=f"{stage}-shared-{n}-{token}", pure=False)
                for n, (k, a) in enumerate(shared.items())}

    def map(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run every task on the cluster; results come back in task order."""
        return self.fold(stage, fn, tasks, _append, [])

    def fold(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
             combine: Callable[[A, Any], A], initial: A) -> A:
        """``combine(acc, result)`` over the results in task order; a result is released once combined."""
        from distributed import as_completed

        total = len(tasks)
        if self.progress:
            self.progress(stage, 0, total)
        futures = self._submit(stage, fn, tasks)
        position = {f.key: i for i, f in enumerate(futures)}
        done_flags = [False] * total
        acc = initial
        combined = 0
        try:
            for n, fut in enumerate(as_completed(futures), start=1):
                if fut.status == "error":
                    fut.result()  # raises the task's own exception
                done_flags[position[fut.key]] = True
                if self.progress:
                    self.progress(stage, n, total)
                while combined < total and done_flags[combined]:
                    acc = combine(acc, futures[combined].result())
                    futures[combined].release()
                    combined += 1
        except BaseException:
            self.client.cancel(futures)
            raise
        return acc

    def close(self) -> None:
        """Close the client, and the cluster if this executor started it."""
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _slurm_cluster_class() -> Any:
    """``dask_jobqueue.SLURMCluster``, imported without taking Ctrl-C away from the build.

    dask-jobqueue 0.9.0 sets SIGINT to ``sys.exit()`` when it is imported (dask/dask-jobqueue#696, fixed
    after 0.9.0): Ctrl-C then ended a build with exit status 0, no word and its jobs left to the cluster's
    shutdown. The handler that was there before is put back, so Ctrl-C stops the build as with local workers
    (exit 130, the finished tasks kept for ``--resume``).
    """
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        msg = "kind = \"slurm\" needs dask-jobqueue: pip install 'genecorpus[dask]'"
        raise ConfigError(msg) from None
    if main and getattr(signal.getsignal(signal.SIGINT), "__module__", None) == "dask_jobqueue.runner":
        ours = before if getattr(before, "__module__", None) != "dask_jobqueue.runner" else None
        signal.signal(signal.SIGINT, ours if ours is not None else signal.default_int_handler)
    return SLURMCluster


def _check_job_script(script: str) -> None:
    """``sbatch --test-only`` of a worker's job script: SLURM's own reason if it would refuse the jobs.

    dask-jobqueue submits from its event loop and only logs a refusal (no controller, a wrong partition,
    more memory than a node has), and the build would then wait for workers for ever.
    """
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".sh", prefix="genecorpus-job-") as file:
        file.write(script)
        file.flush()
        try:
            done = subprocess.run(["sbatch", "--test-only", file.name], capture_output=True, text=True,
                                  timeout=120, check=False)
        except FileNotFoundError:
            msg = ('kind = "slurm" submits jobs with sbatch, which is not on the PATH; run the build on a '
                   "SLURM login node")
            raise ConfigError(msg) from None
        except subprocess.TimeoutExpired:
            msg = "sbatch --test-only did not answer in 120 s; check the SLURM controller (sinfo)"
            raise ConfigError(msg) from None
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or f"exit {done.returncode}"
        msg = (f"SLURM would refuse the worker jobs of [cluster]: {why}; check queue, account, "
               "memory_per_worker, walltime and job_extra_directives, or that the controller answers (sinfo)")
        raise ConfigError(msg)


def _identity(x: A) -> A:
    return x


def _append(acc: list[Any], item: Any) -> list[Any]:
    acc.append(item)
    return acc


def make_executor(*, workers: int | None = None, engine: Engine | None = None, scheduler: str | None = None,
                  cluster: ClusterSpec | None = None, progress: ProgressCallback | None = None) -> Executor:
    """The executor for the command line's ``--engine``/``--scheduler``/``--workers`` and ``[cluster]``.

    ``--scheduler`` connects to a running Dask scheduler. ``--engine dask`` uses the manifest's
    ``[cluster]`` if it describes a Dask cluster, else a ``LocalCluster`` of ``workers`` single-threaded
    processes; ``--engine local`` uses local processes. Without ``--engine`` the ``[cluster]`` section
    decides, and local processes are the default. ``workers`` overrides the section's count.
    """
    if engine not in (None, "local", "dask"):
        msg = f"unknown engine {engine!r}; use --engine local or --engine dask"
        raise ConfigError(msg)
    if scheduler:
        return DaskExecutor.create(ClusterSpec(engine="dask", kind="scheduler", address=scheduler),
                                   progress=progress)
    spec = cluster or ClusterSpec()
    if workers is not None:
        spec = spec.model_copy(update={"workers": workers})
    if engine is not None:
        spec = spec.model_copy(update={"engine": engine})
    if spec.engine == "dask":
        return DaskExecutor.create(spec, progress=progress)
    return LocalExecutor(spec.workers, progress=progress)


def fold(executor: Executor, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
         combine: Callable[[A, Any], A], *, initial: A) -> A:
    """``combine(acc, result)`` over the task results in task order.

    Uses the executor's own ``fold`` when it has one (results are dropped as they are combined), else
    reduces the list that :meth:`Executor.map` returns.
    """
    own = getattr(executor, "fold", None)
    if own is not None:
        return own(stage, fn, tasks, combine, initial)  # type: ignore[no-any-return]
    return functools.reduce(combine, executor.map(stage, fn, tasks), initial)
