"""Measurement helpers: monitored subprocesses, plain-read floors, kernel timing, the NumPy baseline.

Peak memory of a command is the peak, over samples taken every ``poll_interval`` seconds, of the
summed resident set size (``VmRSS``) of the process and all its descendants, read from ``/proc``
(workers are separate processes, so the tree is what counts; shared pages are counted once per
process, as ``ps`` would). The largest single-process high-water mark (``VmHWM``) seen is reported
too, as a cross-check that does not depend on sampling.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import platform
import resource
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numba
import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

FLOOR_BLOCK_CELLS = 10_000
"""Cells per block of the plain reads (the block size of genecorpus's readers)."""

LOOM_FLOOR_PIECE_CELLS = 640
"""Width of the column slabs the loom floor reads inside a block (10 chunk widths, ~65 MB dense)."""

PACKAGES = ("genecorpus", "numpy", "scipy", "numba", "h5py", "anndata", "pyarrow", "datasets", "pandas")
"""Package versions recorded with the results."""


# ------------------------------------------------------------------------------ process-tree memory


def _read_status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:  # noqa: PTH123
            for line in fh:
                name, _, rest = line.partition(":")
                if name in keys:
                    out[name] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError, PermissionError, ValueError, IndexError):
        pass
    return out


def _children_from_task_files(pid: int) -> list[int] | None:
    """Children of ``pid`` from ``/proc/<pid>/task/*/children``; None when the kernel lacks them."""
    task_dir = Path(f"/proc/{pid}/task")
    found = False
    children: list[int] = []
    try:
        for task in task_dir.iterdir():
            path = task / "children"
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            found = True
            children.extend(int(t) for t in text.split())
    except (FileNotFoundError, ProcessLookupError):
        return []
    return children if found else None


def _parent_map() -> dict[int, list[int]]:
    """ppid → pids, by scanning ``/proc/*/stat`` (for kernels without ``children`` files)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:  # noqa: PTH123
                stat = fh.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        tree.setdefault(int(fields[1]), []).append(int(entry.name))
    return tree


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    has_children_files = _children_from_task_files(root) is not None
    tree = None if has_children_files else _parent_map()
    pids, stack = [], [root]
    while stack:
        pid = stack.pop()
        pids.append(pid)
        kids = _children_from_task_files(pid) if tree is None else tree.get(pid, [])
        stack.extend(kids or [])
    return pids


class TreeMemoryMonitor:
    """Samples the summed RSS of a process tree on a background thread."""

    def __init__(self, root: int, *, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_hwm_kib = 0
        self.max_processes = 0
        self.n_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        """Take one sample now."""
        total = 0
        pids = process_tree(self.root)
        for pid in pids:
            status = _read_status_kib(pid, ("VmRSS", "VmHWM"))
            total += status.get("VmRSS", 0)
            self.peak_hwm_kib = max(self.peak_hwm_kib, status.get("VmHWM", 0))
        self.peak_rss_kib = max(self.peak_rss_kib, total)
        self.max_processes = max(self.max_processes, len(pids))
        self.n_samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


# ------------------------------------------------------------------------------- other load on the machine

QUIET_OTHER_CORES = 0.25
"""A machine is quiet when other processes use less than this many cores."""


def machine_busy_seconds() -> float:
    """CPU seconds every process (and the hypervisor's steal) has spent since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:  # noqa: PTH123
        fields = [int(v) for v in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped descendants."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherLoad:
    """CPU used by *other* processes on the machine while a block runs (cores, averaged over its time).

    Our own CPU is this process plus the children it has reaped, so the block must wait for the
    commands it starts. Others' work (e.g. a test suite started by someone else) inflates our times.
    """

    def __enter__(self) -> OtherLoad:
        self._busy = machine_busy_seconds()
        self._own = own_cpu_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        other = (machine_busy_seconds() - self._busy) - (own_cpu_seconds() - self._own)
        self.cpu_seconds = max(0.0, other)
        self.cores = self.cpu_seconds / wall


def wait_for_quiet(*, max_wait: float, probe: float = 1.0, threshold: float = QUIET_OTHER_CORES) -> float:
    """Wait until other processes use less than ``threshold`` cores (probed for ``probe`` s); return s waited."""
    t0 = time.perf_counter()
    while True:
        with OtherLoad() as load:
            time.sleep(probe)
        waited = time.perf_counter() - t0
        if load.cores < threshold or waited >= max_wait:
            return waited


@dataclass(frozen=True)
class CommandResult:
    """What one monitored command did."""

    argv: list[str]
    returncode: int
    wall_seconds: float
    cpu_seconds: float
    """User + system CPU time of the process and its reaped descendants."""
    peak_rss_bytes: int
    """Peak of the sampled summed RSS of the process tree."""
    peak_process_hwm_bytes: int
    """Largest single-process RSS high-water mark seen."""
    max_processes: int
    n_samples: int
    timed_out: bool
    other_cores: float
    """Cores used by other processes on the machine meanwhile (see :class:`OtherLoad`)."""
    stderr_tail: str = field(repr=False)

    @property
    def ok(self) -> bool:
        """The command exited with status 0 in time."""
        return self.returncode == 0 and not self.timed_out


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """End the process group of a command we started (SIGTERM, then SIGKILL after 30 s)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_monitored(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float | None = None,
                  log_path: Path | None = None, interval: float = 0.05) -> CommandResult:
    """Run a command to completion, measuring wall time, CPU time and the peak RSS of its process tree.

    The command runs in its own session so that, on timeout, exactly its process group is ended.
    stdout and stderr go to ``log_path`` (or are discarded); the last lines of stderr are kept.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timed_out = False
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(log_path.open("wb")) if log_path else subprocess.DEVNULL
        other = stack.enter_context(OtherLoad())
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(argv), env=env, stdout=sink, stderr=sink, start_new_session=True)
        with TreeMemoryMonitor(proc.pid, interval=interval) as monitor:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _end_group(proc)
            except BaseException:
                _end_group(proc)
                raise
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = ""
    if log_path and log_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
    return CommandResult(list(argv), proc.returncode, wall, cpu, monitor.peak_rss_kib * 1024,
                         monitor.peak_hwm_kib * 1024, monitor.max_processes, monitor.n_samples, timed_out,
                         other.cores, tail)


# ----------------------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class FloorResult:
    """A plain block-by-block read of X."""

    seconds: float
    n_cells: int
    n_values: int
    """Values read: stored nonzeros (h5ad) or dense matrix entries (loom)."""
    stored_bytes: int
    """On-disk bytes of X (after compression)."""

    @property
    def cells_per_second(self) -> float:
        """Cells read per second."""
        return self.n_cells / self.seconds

    @property
    def mb_per_second(self) -> float:
        """Stored MB (1e6 bytes) of X read per second."""
        return self.stored_bytes / 1e6 / self.seconds


def stored_bytes_of_x(path: Path, fmt: str) -> int:
    """On-disk size of the count matrix: X's data, indices and indptr (h5ad) or /matrix (loom)."""
    with h5py.File(path, "r") as f:
        if fmt == "loom":
            return int(f["matrix"].id.get_storage_size())
        return sum(int(f["X"][k].id.get_storage_size()) for k in ("data", "indices", "indptr"))


def read_floor_h5ad(path: Path, *, block_cells: int = FLOOR_BLOCK_CELLS) -> FloorResult:
    """Read a CSR h5ad's X block by block with h5py: indptr slice, then the data and indices slices."""
    t0 = time.perf_counter()
    n_values = 0
    with h5py.File(path, "r") as f:
        x = f["X"]
        data, indices, indptr = x["data"], x["indices"], x["indptr"]
        n_cells = int(indptr.shape[0] - 1)
        for start in range(0, n_cells, block_cells):
            ptr = indptr[start : min(start + block_cells, n_cells) + 1]
            lo, hi = int(ptr[0]), int(ptr[-1])
            d = data[lo:hi]
            i = indices[lo:hi]
            n_values += d.shape[0]
            del i
    seconds = time.perf_counter() - t0
    return FloorResult(seconds, n_cells, n_values, stored_bytes_of_x(path, "h5ad"))


def read_floor_loom(path: Path, *, block_cells: int = FLOOR_BLOCK_CELLS,
                    piece_cells: int = LOOM_FLOOR_PIECE_CELLS) -> FloorResult:
    """Read a loom's genes x cells matrix in blocks of cells, each in chunk-aligned column slabs."""
    t0 = time.perf_counter()
    n_values = 0
    with h5py.File(path, "r") as f:
        matrix = f["matrix"]
        n_cells = int(matrix.shape[1])
        for start in range(0, n_cells, block_cells):
            stop = min(start + block_cells, n_cells)
            lo = start
            while lo < stop:
                hi = min((lo // piece_cells + 1) * piece_cells, stop)
                slab = matrix[:, lo:hi]
                n_values += slab.size
                lo = hi
    seconds = time.perf_counter() - t0
    return FloorResult(seconds, n_cells, n_values, stored_bytes_of_x(path, "loom"))


def read_floor(path: Path, fmt: str) -> FloorResult:
    """The plain read of X for a file of format ``fmt`` (``h5ad``, ``h5ad_gzip`` or ``loom``)."""
    return read_floor_loom(path) if fmt == "loom" else read_floor_h5ad(path)


# ------------------------------------------------------------------------------------------ kernels


@contextlib.contextmanager
def single_core() -> Iterator[int]:
    """Pin this process to one CPU (and Numba to one thread) for the duration; yields the CPU."""
    previous = os.sched_getaffinity(0)
    cpu = min(previous)
    os.sched_setaffinity(0, {cpu})
    numba_threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, previous)
        numba.set_num_threads(numba_threads)


def time_repeated(fn: Callable[[], Any], *, repeats: int = 5, min_seconds: float = 2.0,
                  max_repeats: int = 50) -> list[float]:
    """Seconds of each call of ``fn``: at least ``repeats`` calls and ``min_seconds`` in total."""
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def baseline_rank_value_encode(counts: sp.csr_matrix, *, depth: np.ndarray, medians: np.ndarray,
                               tokens: np.ndarray, max_genes: int) -> tuple[np.ndarray, np.ndarray]:
    """Geneformer's reference encoding with SciPy/NumPy: normalize, then one argsort per cell.

    ``X / n_counts[:, None] * 10_000 / medians`` on the vocabulary genes, then for each cell
    ``tokens[np.argsort(-values)][:max_genes]``. Rows are sliced through ``indptr`` (cheaper than
    Geneformer's ``X_norm[i]``), so the baseline is, if anything, flattered.
    """
    in_vocab = medians > 0
    x = counts[:, np.flatnonzero(in_vocab)]
    norm = sp.csr_matrix(x / depth[:, None] * 10_000 / medians[in_vocab])
    vocab_tokens = tokens[in_vocab]
    data, indices, indptr = norm.data, norm.indices, norm.indptr
    out: list[np.ndarray] = []
    lengths = np.empty(norm.shape[0], dtype=np.int64)
    for i in range(norm.shape[0]):
        a, b = indptr[i], indptr[i + 1]
        ranked = vocab_tokens[indices[a:b]][np.argsort(-data[a:b])][:max_genes]
        out.append(ranked)
        lengths[i] = ranked.shape[0]
    return (np.concatenate(out) if out else np.empty(0, dtype=tokens.dtype)), lengths


def identical_cells(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Fraction of cells whose token sequences are identical in two (flat tokens, lengths) outputs."""
    (ta, la), (tb, lb) = a, b
    if la.shape != lb.shape:
        return 0.0
    same = la == lb
    starts_a = np.concatenate([[0], np.cumsum(la)[:-1]])
    starts_b = np.concatenate([[0], np.cumsum(lb)[:-1]])
    for i in np.flatnonzero(same):
        n = la[i]
        if not np.array_equal(ta[starts_a[i] : starts_a[i] + n], tb[starts_b[i] : starts_b[i] + n]):
            same[i] = False
    return float(same.mean()) if same.size else 1.0


# ------------------------------------------------------------------------------------------ machine


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def source_fingerprint(repo: Path) -> str:
    """sha256 over the package sources (``src/**/*.py``): tells whether the code changed during a run."""
    digest = hashlib.sha256()
    for path in sorted((repo / "src").rglob("*.py")):
        digest.update(str(path.relative_to(repo)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def repository_state(repo: Path) -> dict[str, Any]:
    """Commit, uncommitted source files and source fingerprint of the repository measured."""
    changed = [line[3:] for line in _git(repo, "status", "--porcelain", "--", "src").splitlines()]
    return {"git_commit": _git(repo, "rev-parse", "HEAD"), "uncommitted_src_changes": changed,
            "src_sha256": source_fingerprint(repo)}


def machine_info(repo: Path) -> dict[str, Any]:
    """CPU, cores, memory, OS, Python and package versions, and the repository state measured."""
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_bytes": _mem_total_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        **repository_state(repo),
    }


__all__ = [
    "QUIET_OTHER_CORES",
    "CommandResult",
    "FloorResult",
    "OtherLoad",
    "TreeMemoryMonitor",
    "baseline_rank_value_encode",
    "identical_cells",
    "machine_busy_seconds",
    "machine_info",
    "own_cpu_seconds",
    "process_tree",
    "read_floor",
    "repository_state",
    "run_monitored",
    "single_core",
    "stored_bytes_of_x",
    "time_repeated",
    "wait_for_quiet",
]
