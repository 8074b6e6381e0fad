"""Where tasks run: in this process, or in a pool of local worker processes.

Every executor returns results **in task order**, whatever order they finish in, so reductions are
merged in a fixed order and the output does not depend on the number of workers.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import heapq
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from genecorpus.config import ClusterSpec, Engine
from genecorpus.errors import ConfigError, WorkerLostError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

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


class _RemoteTracebackError(Exception):
    """The traceback of an error raised in a worker process, chained to it as its ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return self.text


def _serve(conn: Connection) -> None:
    """A worker process: run each ``(fn, args)`` received on ``conn`` and send its outcome back.

    The outcome is ``(True, result, None)`` or ``(False, error, traceback text)``. The worker stops when
    it receives None or when the driver's end of the pipe is gone (the driver died).
    """
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        except BaseException as e:  # noqa: BLE001  (the task could not be unpickled here)
            conn.send((False, e, traceback.format_exc()))
            continue
        if message is None:
            return
        fn, args = message
        try:
            outcome = (True, fn(*args), None)
        except BaseException as e:  # noqa: BLE001  (raised again in the driver)
            outcome = (False, e, traceback.format_exc())
        try:
            conn.send(outcome)
        except Exception as e:  # noqa: BLE001  (pickling failed before anything was written: say so instead)
            error = RuntimeError(f"{getattr(fn, '__name__', fn)}: what it returned or raised cannot be sent "
                                 f"to the driver ({type(e).__name__}: {e})")
            conn.send((False, error, traceback.format_exc()))


@dataclass(eq=False)
class _Worker:
    """A worker process, the driver's end of its pipe, and what it is running."""

    process: BaseProcess
    conn: Connection
    busy: bool = False
    """A task (or the warm-up) was sent and its outcome not received yet."""
    task: int | None = None
    """Index of the task it runs; None for the warm-up."""


class _WorkerDiedError(Exception):
    """A worker process died: its pipe ended or broke (internal to :class:`LocalExecutor`)."""


class LocalExecutor:
    """Runs tasks in this process (``workers=1``) or in ``workers`` spawned processes.

    Each worker has a pipe of its own and runs one task at a time, so a worker that dies (killed, or out
    of memory) — even halfway through sending a result — is seen at once by its pipe's end and its
    process sentinel, and harms no other worker. It is replaced and its task rerun, up to ``restarts``
    times per stage; one more death stops the stage with :class:`~genecorpus.errors.WorkerLostError`.
    (``concurrent.futures.ProcessPoolExecutor`` shares one result pipe between its workers: a worker
    killed while writing to it leaves the pool waiting forever.)
    """

    def __init__(self, workers: int = 1, *, progress: ProgressCallback | None = None, restarts: int = 2) -> None:
        self.workers = max(1, int(workers))
        self.progress = progress
        self.restarts = restarts
        self._workers: list[_Worker] = []

    def _spawn(self) -> _Worker:
        ctx = multiprocessing.get_context("spawn")
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(theirs,), name="genecorpus-worker", daemon=True)
        with _children_ignore_sigint():
            process.start()
        theirs.close()  # the worker's end lives in the worker only: its death ends the pipe
        return _Worker(process, ours)

    def _fill(self) -> None:
        """As many live workers as asked for (one that died while idle is replaced: no task was lost)."""
        if not self._workers:
            require_guarded_main()
        for worker in [w for w in self._workers if not w.busy and not w.process.is_alive()]:
            self._discard(worker)
        while len(self._workers) < self.workers:
            self._workers.append(self._spawn())

    def _discard(self, worker: _Worker) -> None:
        self._workers.remove(worker)
        worker.conn.close()
        if worker.process.is_alive():
            worker.process.kill()
        worker.process.join(timeout=10)

    def start(self, modules: Sequence[str]) -> None:
        """Spawn the workers now and let them import ``modules`` (no-op for one worker)."""
        if self.workers > 1:
            self._fill()
            for worker in self._workers:
                if not worker.busy:
                    with contextlib.suppress(OSError):  # one that died is replaced by the first stage
                        worker.conn.send((_import_modules, (list(modules),)))
                        worker.busy, worker.task = True, None

    def map(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Run every task; results come back in task order."""
        return self.fold(stage, fn, tasks, _append, [])

    def fold(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
             combine: Callable[[A, Any], A], initial: A) -> A:
        """``combine(acc, result)`` over the results in task order, each dropped once combined.

        At most ``2 * workers`` results wait to be combined, so memory holds the accumulator and a few
        results, whatever the number of tasks. A task's error is raised once the tasks under way have
        finished (nothing writes to the build afterwards), with the worker's traceback as its cause.
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
            return self._fold_in_workers(stage, fn, tasks, combine, initial)
        except BaseException:
            if any(w.busy for w in self._workers):  # Ctrl-C, or the driver failed: stop them now
                self._terminate()
            raise

    def _fold_in_workers(self, stage: str, fn: Callable[..., Any], tasks: Sequence[tuple[Any, ...]],
                         combine: Callable[[A, Any], A], acc: A) -> A:
        total, window = len(tasks), 2 * self.workers
        self._fill()
        todo = list(range(total))  # a heap: the earliest task not run yet comes first
        results: dict[int, Any] = {}
        errors: dict[int, BaseException] = {}
        lost: WorkerLostError | None = None
        combined = done = deaths = 0
        while combined < total:
            if not errors and lost is None:
                for worker in [w for w in self._workers if not w.busy]:
                    if not todo or todo[0] - combined >= window:
                        break
                    worker.busy, worker.task = True, heapq.heappop(todo)
                    with contextlib.suppress(OSError):  # it died while idle: the wait below sees it, and the
                        worker.conn.send((fn, tasks[worker.task]))  # task goes back to the heap
            busy = [w for w in self._workers if w.busy]
            if not busy:
                break
            ready = set(mp_connection.wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for worker in busy:
                if worker.conn not in ready and worker.process.sentinel not in ready:
                    continue
                try:
                    ok, value, trace = self._receive(worker)
                except _WorkerDiedError:
                    deaths += 1
                    if worker.task is not None and worker.task not in todo:
                        heapq.heappush(todo, worker.task)
                    self._discard(worker)
                    if deaths > self.restarts:
                        msg = (f"worker processes died {deaths} times during {stage} (killed, or out of "
                               "memory); use fewer --workers or a smaller block_size")
                        lost = lost or WorkerLostError(msg)
                    elif lost is None and not errors:
                        logger.warning("a worker process died during %s (killed, or out of memory); starting "
                                       "another and rerunning its task (restart %d of %d)",
                                       stage, deaths, self.restarts)
                        self._workers.append(self._spawn())
                    continue
                if worker.task is None:  # the warm-up: a failed import shows again in the first task
                    continue
                if ok:
                    results[worker.task] = value
                    done += 1
                    if self.progress:
                        self.progress(stage, done, total)
                else:
                    value.__cause__ = _RemoteTracebackError(f'\n"""\n{trace}"""')
                    errors[worker.task] = value
            while combined in results:
                acc = combine(acc, results.pop(combined))
                combined += 1
        if errors:
            raise errors[min(errors)]
        if lost is not None:
            raise lost
        return acc

    @staticmethod
    def _receive(worker: _Worker) -> tuple[bool, Any, str | None]:
        """The outcome a busy worker sent; raises :class:`_WorkerDiedError` if it died instead."""
        try:
            if worker.conn.poll():
                outcome = worker.conn.recv()
                worker.busy = False
                return outcome
        except (EOFError, OSError):  # it died, perhaps halfway through a message
            raise _WorkerDiedError from None
        raise _WorkerDiedError  # its sentinel: the process ended without a word

    def close(self) -> None:
        """Stop the worker processes (each finishes what it runs)."""
        for worker in self._workers:
            with contextlib.suppress(OSError):
                worker.conn.send(None)
        for worker in list(self._workers):
            worker.process.join(timeout=30)
            self._discard(worker)

    def _terminate(self) -> None:
        """Stop the workers at once (Ctrl-C): tasks under way write by rename, so nothing is left half-done."""
        for worker in self._workers:
            worker.process.terminate()
        for worker in list(self._workers):
            self._discard(worker)


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
