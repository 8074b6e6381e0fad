"""Which process am I: the one owner of multi-process runs under ``torchrun`` (or ``srun`` + torchrun).

``torchrun`` starts one Python process per device and tells each its place through environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``). :func:`start_process_group`
reads them and joins ``torch.distributed``'s process group — ``gloo`` when the process computes on the CPU,
``nccl`` on CUDA (device ``cuda:LOCAL_RANK``); without them it returns a plain single process and creates
no process group at all, so a run started as ``genecorpus pretrain …`` is exactly what it was before
multi-process training existed.

Every other module asks a :class:`Process` (never the environment) which process it is, and talks to
the others through the small typed helpers below. Each helper is a no-op (or the identity) for a single
process, so callers write one code path:

================================ =======================================================================
helper                           what it does
================================ =======================================================================
:func:`shard_rows`               this process's strided share of an array of rows
:func:`all_reduce_sums`          element-wise sums over the processes (float64)
:func:`all_reduce_max`           element-wise maxima over the processes (int64): flags, decisions
:func:`broadcast_object`         rank 0's picklable object, on every process
:func:`gather_objects`           every process's picklable object, on rank 0 (None elsewhere)
:func:`barrier`                  wait until every process gets here
================================ =======================================================================

``torch`` is imported inside the functions: importing this module is cheap, and :func:`launched_process`
(no torch) tells the command line which process it runs in before anything heavy is imported.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from genecorpus.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

logger = logging.getLogger(__name__)

__all__ = ["TIMEOUT_VARIABLE", "Process", "all_reduce_max", "all_reduce_sums", "barrier", "broadcast_object",
           "gather_objects", "launched_process", "process_group", "shard_rows", "start_process_group",
           "stop_process_group"]

TIMEOUT_VARIABLE = "GENECORPUS_DIST_TIMEOUT"
"""Environment variable: seconds to wait for the rendezvous and for any collective (default 1,800)."""
DEFAULT_TIMEOUT = 1800.0

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    """This process's place among the processes of a run."""

    rank: int = 0
    """0 … ``world_size`` − 1; rank 0 decides, logs and writes."""
    world_size: int = 1
    local_rank: int = 0
    """Rank among the processes of this node (picks the GPU)."""
    backend: str | None = None
    """``"gloo"`` or ``"nccl"`` when a process group was joined; None for a plain single process."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, plans, decides and writes."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """A process group exists (started by torchrun, even with one process)."""
        return self.backend is not None

    def to_dict(self) -> dict[str, Any]:
        """What a model folder records about the processes that trained it."""
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = Process()
"""A plain single process: no process group."""


def launched_process() -> Process:
    """The place torchrun's variables give this process, without joining anything (and without torch).

    The command line uses it to keep progress bars and INFO logs to rank 0; ``backend`` stays None.
    """
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    try:
        return Process(int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"]),
                       int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        return SINGLE


def start_process_group(device: str | None = None) -> tuple[Process, torch.device]:
    """Join the process group torchrun's environment describes, or run as a single process.

    Parameters
    ----------
    device
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``… or None (CUDA when available, else CPU). Under torchrun a
        CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process) and the backend ``nccl``; the CPU
        gets ``gloo``.

    Returns
    -------
    process, device
        The :class:`Process` (``backend`` None without torchrun's variables) and the torch device it
        computes on.

    Raises
    ------
    ConfigError
        The variables are incomplete or the rendezvous fails (one line naming what to check).
    """
    import torch

    from genecorpus.model.bert import pick_device

    place = launched_process()
    if "WORLD_SIZE" not in os.environ:
        return SINGLE, pick_device(device)
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing or place.world_size < 1 or not 0 <= place.rank < place.world_size:
        msg = (f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing) or 'RANK'} "
               f"{'is missing' if missing else 'is out of range'}: start the processes with torchrun "
               "(or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT as torchrun does)")
        raise ConfigError(msg)
    chosen = pick_device(device)
    if chosen.type == "cuda":
        if place.local_rank >= torch.cuda.device_count():
            msg = (f"LOCAL_RANK {place.local_rank}: this node has {torch.cuda.device_count()} GPU(s); start at "
                   "most one process per GPU (torchrun --nproc-per-node)")
            raise ConfigError(msg)
        chosen = torch.device("cuda", place.local_rank)
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = _timeout()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        import torch.distributed as dist

        with _native_stderr_kept_back() as kept:
            dist.init_process_group(backend, rank=place.rank, world_size=place.world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
            kept.release = True
    except (RuntimeError, ValueError, OSError) as e:  # DistNetworkError/DistStoreError are RuntimeErrors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        msg = (f"rank {place.rank} of {place.world_size} could not join the process group at {where} "
               f"({backend}) within {timeout:g} s ({first[:160]}): check that all {place.world_size} processes "
               "were started (torchrun --nnodes/--nproc-per-node), that MASTER_ADDR/MASTER_PORT (or "
               "--rdzv-endpoint) reach rank 0's node and the port is open")
        raise ConfigError(msg) from None
    process = Process(place.rank, place.world_size, place.local_rank, backend)
    logger.info("process %d of %d (%s, %s) joined the group at %s", process.rank, process.world_size, backend,
                chosen, where)
    return process, chosen


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[tuple[Process, torch.device]]:
    """:func:`start_process_group` for the block, then :func:`stop_process_group` — unless a process group
    already existed (the caller's, e.g. a script that trains twice): then it is used and left in place.

    Examples
    --------
    >>> with process_group("cpu") as (process, device):  # doctest: +SKIP
    ...     rows = shard_rows(np.arange(10), process)
    """
    existing = _existing_process()
    if existing is not None:
        yield existing
        return
    process, chosen = start_process_group(device)
    try:
        yield process, chosen
    except BaseException:
        stop_process_group(process)  # no barrier: the other processes may never get there
        raise
    barrier(process)  # every process is done with the group before any leaves it
    stop_process_group(process)


def _existing_process() -> tuple[Process, torch.device] | None:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    return Process(dist.get_rank(), dist.get_world_size(), local_rank, backend), device


class _KeptBack:
    release = False


@contextlib.contextmanager
def _native_stderr_kept_back() -> Iterator[_KeptBack]:
    """Hold back what torch's C++ side writes to stderr (file descriptor 2) inside the block: a failing
    rendezvous prints a retry message and a C++ stack trace per attempt, which the one-line error replaces.
    Written out after the block if ``release`` was set (the rendezvous worked: its warnings may matter)."""
    import sys
    import tempfile

    kept = _KeptBack()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable file descriptor 2: nothing to hold back
        yield kept
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield kept
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if kept.release:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def stop_process_group(process: Process) -> None:
    """Leave the process group (if this process joined one); safe to call twice.

    Objects that hold the group and are no longer referenced (a ``DistributedDataParallel`` wrapper sits
    in reference cycles) are collected first: left to the interpreter's exit, gloo's threads would be torn
    down with the interpreter half gone, which aborts the process (SIGABRT) after a run that went well.
    """
    if not process.is_distributed:
        return
    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_VARIABLE)
    if value is None:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        msg = f"{TIMEOUT_VARIABLE}={value!r}: give a positive number of seconds"
        raise ConfigError(msg)
    return seconds


def _device(process: Process) -> torch.device:
    """Where a collective's tensors live: the GPU for nccl, the CPU for gloo."""
    import torch

    return torch.device("cuda", process.local_rank) if process.backend == "nccl" else torch.device("cpu")


def shard_rows(rows: np.ndarray, process: Process) -> np.ndarray:
    """This process's strided share of ``rows``: ``rows[rank::world_size]``.

    Every element goes to exactly one process; shares differ in size by at most one, and a sorted
    ``rows`` (e.g. by length) gives every process a share of the same spread.
    """
    return rows[process.rank::process.world_size]


def all_reduce_sums(values: np.ndarray | list[float], process: Process) -> np.ndarray:
    """Element-wise sums of ``values`` over all processes (float64; ``values`` itself for one process)."""
    return _all_reduce(np.asarray(values, dtype=np.float64), "SUM", process)


def all_reduce_max(values: np.ndarray | list[int], process: Process) -> np.ndarray:
    """Element-wise maxima of integer ``values`` over all processes (int64): any process's flag, or rank
    0's decision when the others send 0."""
    return _all_reduce(np.asarray(values, dtype=np.int64), "MAX", process)


def _all_reduce(local: np.ndarray, op: str, process: Process) -> np.ndarray:
    """``local`` reduced element-wise over all processes with ``torch.distributed.ReduceOp.<op>`` (a copy)."""
    if not process.is_distributed or process.world_size == 1:
        return local.copy()
    import torch
    import torch.distributed as dist

    tensor = torch.from_numpy(local.copy()).to(_device(process))
    dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
    return tensor.cpu().numpy()


def broadcast_object(obj: T, process: Process) -> T:
    """Rank 0's ``obj`` on every process (pickled; keep it small). Other ranks' ``obj`` is ignored."""
    if not process.is_distributed or process.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if process.is_main else None]
    dist.broadcast_object_list(box, src=0, device=_device(process))
    return box[0]  # type: ignore[return-value]


def gather_objects(obj: T, process: Process) -> list[T] | None:
    """Every process's ``obj`` in rank order on rank 0, None on the others (pickled)."""
    if not process.is_distributed or process.world_size == 1:
        return [obj]
    import torch.distributed as dist

    if process.backend == "nccl":  # nccl has no gather of objects: gather to all, keep rank 0's
        everything: list[Any] = [None] * process.world_size
        dist.all_gather_object(everything, obj)
        return everything if process.is_main else None
    box: list[Any] | None = [None] * process.world_size if process.is_main else None
    dist.gather_object(obj, box, dst=0)
    return box


def barrier(process: Process) -> None:
    """Wait until every process reaches this point."""
    if not process.is_distributed or process.world_size == 1:
        return
    import torch.distributed as dist

    if process.backend == "nccl":
        dist.barrier(device_ids=[process.local_rank])
    else:
        dist.barrier()
