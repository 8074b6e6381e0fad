"""Resumable builds: kill a real ``genecorpus build`` with SIGKILL, resume it, and compare bytes.

The reference is an uninterrupted build of the same manifest (in this process, one worker: the bytes
do not depend on where the tasks ran, see test_determinism.py). A build with two workers is started in
its own process group, killed (the driver and its workers) once a condition on its work folder holds —
all QC tasks done, a median pass under way, part files being written, or a random moment — and resumed
by ``genecorpus build --resume`` with two workers (while writing, and after the random kills), or by
``build_corpus(..., resume=True)`` in this process (what ``genecorpus build --resume --workers 1`` runs,
without an interpreter to start). The output must be byte-identical to the reference
(the manifest up to its timings), and the resumed run must reuse exactly the tasks the killed one had
finished: its log line per stage says how many it reused, which is compared with the records counted on
disk at the moment of the kill.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import re
import signal
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from corpus_files import corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import BuildConfig, DatasetSpec, QCParams, load_manifest
from genecorpus.errors import ConfigError, GenecorpusError
from genecorpus.executors import LocalExecutor
from genecorpus.resume import WorkFolder
from genecorpus.testing import random_counts, write_h5ad

if TYPE_CHECKING:
    from collections.abc import Callable

N_CELLS = 1000  # per dataset: 3 x 4 tasks per stage, enough to stop a build in the middle of each
SHARD_CELLS = 250
COPY_EVERY = 5
"""Dataset c holds copies of every 5th cell of dataset a: duplicate detection reads and drops them."""
STAGES = ("qc", "candidates", "candidate_cells", "verify", "histogram", "selection", "encode")


def _counts(n_cells: int, seed: int) -> Any:
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    return ids, random_counts(n_cells, len(ids), density=0.15, seed=seed)


def _write(folder: Path, name: str, seed: int, n_cells: int = N_CELLS, *, copies_of: int | None = None) -> Path:
    """A random dataset; ``copies_of``: its cells 0, 5, 10, … are the cells of dataset ``copies_of``'s seed
    with the same index (re-published copies, other barcodes), so the duplicates pass has work."""
    ids, counts = _counts(n_cells, seed)
    if copies_of is not None:
        counts = counts.tolil()
        counts[::COPY_EVERY] = _counts(n_cells, copies_of)[1][::COPY_EVERY]
        counts = counts.tocsr()
    return Path(write_h5ad(folder / f"{name}.h5ad", counts, gene_ids=ids,
                           cell_ids=np.array([f"{name}{i}" for i in range(n_cells)], dtype=object)))


def _manifest(folder: Path, paths: list[Path], extra: str = "") -> Path:
    lines = [f"shard_cells = {SHARD_CELLS}", "block_size = 100", extra]
    for p in paths:
        lines += ["[[datasets]]", f'path = "{p}"', 'gene_id = "ensembl"']
    path = folder / "m.toml"
    path.write_text("\n".join(lines) + "\n")
    return path




def _cli(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "genecorpus", "build", *map(str, args), "--workers", "2", "--no-report"]


def _env() -> dict[str, str]:
    return {**os.environ, "GENECORPUS_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("resume")
    paths = [_write(folder, "a", 1), _write(folder, "b", 2), _write(folder, "c", 3, copies_of=1)]
    manifest = _manifest(folder, paths)
    reference = folder / "reference"
    built = build_corpus(load_manifest(manifest), reference, report=False)
    copies = built.manifest.datasets[2].cells.dropped["duplicate"]
    assert copies >= 0.9 * N_CELLS // COPY_EVERY, "the reference build should find the copies in dataset c"
    return {"folder": folder, "paths": paths, "manifest": manifest, "reference": corpus_file_digests(reference)}


def _records(work: Path) -> dict[str, int]:
    return {s: len(list((work / "tasks" / s).glob("*.pkl"))) for s in STAGES}


def _kill_when(manifest: Path, out: Path, condition: Callable[[Path], bool], *, resume: bool = False,
               timeout: float = 180, sig: signal.Signals = signal.SIGKILL) -> dict[str, int] | None:
    """Start a build and send ``sig`` to its process group once ``condition(work folder)`` holds.

    Returns the finished task records per stage once the build has ended, or None if it finished first.
    SIGINT is Ctrl-C in a terminal: the build must then stop with one line, exit 130, and leave no process.
    """
    work = out.with_name(f".{out.name}.incomplete")
    args = ["--resume"] if resume else []
    proc = subprocess.Popen(_cli(manifest, "--out", out, *args), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if work.is_dir() and condition(work):
                os.killpg(proc.pid, sig)
                _, stderr = proc.communicate(timeout=60)
                if sig == signal.SIGINT:
                    _check_interrupted(proc, stderr, work)
                return _records(work)
            if time.monotonic() > deadline:
                pytest.fail("the build did not reach the kill point in time")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return None


def _check_interrupted(proc: subprocess.Popen[str], stderr: str, work: Path) -> None:
    """Ctrl-C: exit 130, one line naming the kept tasks and --resume, and no worker left running."""
    assert proc.returncode == 130, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0] == (f"interrupted: {sum(_records(work).values())} finished tasks are kept in {work}: rerun "
                        "with --resume to continue"), stderr
    deadline = time.monotonic() + 20  # the workers were stopped with the driver (exited ones may take a
    while True:                       # moment to be reaped once the driver has gone)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "processes of the interrupted build are still running"
        time.sleep(0.1)


def _resume_by_cli(data: dict[str, Any], out: Path) -> str:
    """``genecorpus build --resume`` with two workers; its log."""
    done = subprocess.run(_cli(data["manifest"], "--out", out, "--resume"), env=_env(), capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stderr


def _resume_in_process(data: dict[str, Any], out: Path, caplog: pytest.LogCaptureFixture) -> str:
    """What ``genecorpus build --resume --workers 1`` runs, called in this process; its log."""
    with caplog.at_level(logging.INFO, logger="genecorpus"):
        build_corpus(load_manifest(data["manifest"]), out, resume=True, report=False)
    return caplog.text


def _check_resumed(data: dict[str, Any], out: Path, at_kill: dict[str, int] | None, log: str) -> None:
    """The resumed build's bytes are the reference's, and it reused exactly the tasks finished at the kill."""
    assert corpus_file_digests(out) == data["reference"]
    assert not out.with_name(f".{out.name}.incomplete").exists()
    log = " ".join(log.split())
    if at_kill is not None:
        for stage, n in at_kill.items():
            found = re.search(rf"{stage}: (\d+) of (\d+) tasks reused", log)
            if found:  # the stage ran again: every task the killed build had finished was reused
                assert int(found.group(1)) == n, (stage, log)
            else:  # a stage is only skipped if the killed build had not reached it
                assert n == 0, (stage, log)


def _all_qc_done(work: Path) -> bool:
    return _records(work)["qc"] == 3 * N_CELLS // SHARD_CELLS


def _candidates_under_way(work: Path) -> bool:
    return _records(work)["candidates"] >= 1


def _candidate_cells_under_way(work: Path) -> bool:
    return _records(work)["candidate_cells"] >= 1


def _medians_under_way(work: Path) -> bool:
    return _records(work)["histogram"] >= 1


def _selection_under_way(work: Path) -> bool:
    return _records(work)["selection"] >= 1


def _writing(work: Path) -> bool:
    return len(list((work / "parts").glob("*.arrow"))) >= 3


@pytest.mark.parametrize(("condition", "by_cli", "sig"), [
    (_all_qc_done, False, signal.SIGKILL), (_candidates_under_way, False, signal.SIGKILL),
    (_candidate_cells_under_way, False, signal.SIGINT), (_medians_under_way, False, signal.SIGKILL),
    pytest.param(_selection_under_way, False, signal.SIGINT, marks=pytest.mark.slow),  # as mid-histogram
    (_writing, True, signal.SIGKILL)],
    ids=["after-qc", "mid-candidates", "ctrl-c-mid-candidate-cells", "mid-histogram", "ctrl-c-mid-selection",
         "mid-writing"])
def test_kill_and_resume_gives_identical_bytes(data: dict[str, Any], tmp_path: Path,
                                               condition: Callable[[Path], bool], by_cli: bool,
                                               sig: signal.Signals, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "corpus"
    at_kill = _kill_when(data["manifest"], out, condition, sig=sig)
    assert at_kill is not None, "the build finished before the kill point"
    assert not out.exists()
    # resumed by `genecorpus build --resume` with two workers, or in this process with one (what a build
    # reuses must not depend on the number of workers either; no interpreter or pool to start)
    log = _resume_by_cli(data, out) if by_cli else _resume_in_process(data, out, caplog)
    _check_resumed(data, out, at_kill, log)


class _SecondsAfterFirstLook:
    """A kill condition that holds ``delay`` seconds after it is first asked, i.e. after the work folder
    appeared (a fresh build: once the driver has started; a resumed one: right from the start)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.start: float | None = None

    def __call__(self, _work: Path) -> bool:
        now = time.monotonic()
        if self.start is None:
            self.start = now
        return now - self.start > self.delay


@pytest.mark.slow  # three runs; each stage is killed and resumed in make test by the test above
def test_kill_at_random_moments_and_resume_repeatedly(data: dict[str, Any], tmp_path: Path) -> None:
    """Kill, resume and kill the resumed run again, at random times; the last resume finishes."""
    repeats = int(os.environ.get("GENECORPUS_KILL_REPEATS", "2"))
    rng = random.Random(int(os.environ.get("GENECORPUS_KILL_SEED", "0")))
    out = tmp_path / "corpus"
    at_kill = None
    for i in range(repeats):
        # a build of these inputs keeps its work folder about 2-3 s on two cores: most kills land inside
        delay = rng.uniform(0.2, 2.0)
        # after the first kill, every run resumes the one before (and may itself be killed)
        at_kill = _kill_when(data["manifest"], out, _SecondsAfterFirstLook(delay), resume=i > 0)
        print(f"kill {i} after {delay:.1f} s: finished tasks {at_kill}")
        if at_kill is None:  # finished before the kill: resuming a complete corpus is a no-op
            break
    _check_resumed(data, out, at_kill, _resume_by_cli(data, out))


# ------------------------------------------------------------------------- in-process, interrupted


class _InterruptAt:
    """A progress callback that raises KeyboardInterrupt when ``stage`` starts (like Ctrl-C)."""

    def __init__(self, stage: str, then: Callable[[], None] | None = None) -> None:
        self.stage = stage
        self.then = then

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == self.stage and done == 0:
            if self.then is not None:
                self.then()
            raise KeyboardInterrupt


def _config(paths: list[Path], **kwargs: Any) -> BuildConfig:
    specs = tuple(DatasetSpec(path=str(p), gene_id="ensembl", **kwargs.pop(p.stem, {})) for p in paths)
    return BuildConfig(datasets=specs, shard_cells=SHARD_CELLS, block_size=100, **kwargs)


def _interrupted(config: BuildConfig, out: Path, stage: str) -> None:
    with pytest.raises(KeyboardInterrupt):
        build_corpus(config, out, executor=LocalExecutor(1, progress=_InterruptAt(stage)), report=False)
    assert WorkFolder.unfinished(out) and not out.exists()


@pytest.fixture
def small(tmp_path: Path) -> list[Path]:
    return [_write(tmp_path, name, seed) for name, seed in (("a", 1), ("b", 2), ("c", 3))]


def test_changed_input_redoes_exactly_its_tasks(small: list[Path], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "corpus"
    _interrupted(_config(small), out, "encode")
    _write(tmp_path, "b", seed=7)  # new content, same path
    with caplog.at_level(logging.INFO, logger="genecorpus"):
        build_corpus(_config(small), out, report=False, resume=True)
    log = " ".join(caplog.text.split())
    assert "b.h5ad: changed since the interrupted build (sha256 differs)" in log
    assert re.search(r"qc: 8 of 12 tasks reused; 4 redone because the input file changed \(\S*b\.h5ad\)", log), log
    fresh = tmp_path / "fresh"
    build_corpus(_config(small), fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


def test_changed_parameter_redoes_what_depends_on_it(small: list[Path], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "corpus"
    _interrupted(_config(small), out, "encode")
    changed = _config(small, c={"use_for_medians": False})  # c's entry changes; the medians change
    with caplog.at_level(logging.INFO, logger="genecorpus"):
        build_corpus(changed, out, report=False, resume=True)
    log = " ".join(caplog.text.split())
    assert "qc: 8 of 12 tasks reused; 4 redone because the dataset's entry in the manifest changed" in log, log
    assert re.search(r"histogram: 0 of 8 tasks reused; 8 redone because settings or corpus-wide", log), log
    fresh = tmp_path / "fresh"
    build_corpus(changed, fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


def test_changed_qc_setting_redoes_every_task(small: list[Path], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "corpus"
    _interrupted(_config(small), out, "medians (selection)")
    changed = _config(small, qc=QCParams(n_sd=2.5))
    with caplog.at_level(logging.INFO, logger="genecorpus"):
        build_corpus(changed, out, report=False, resume=True)
    assert "qc: 0 of 12 tasks reused; 12 redone because settings" in " ".join(caplog.text.split())
    fresh = tmp_path / "fresh"
    build_corpus(changed, fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


def test_damaged_record_is_redone(small: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    _interrupted(_config(small), out, "encode")
    work = out.with_name(f".{out.name}.incomplete")
    damaged = sorted((work / "tasks" / "qc").glob("*.pkl"))[0]
    damaged.write_bytes(damaged.read_bytes()[:50])  # as if the disk lost its end
    build_corpus(_config(small), out, report=False, resume=True)
    fresh = tmp_path / "fresh"
    build_corpus(_config(small), fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


def test_unfinished_build_needs_resume_or_overwrite(small: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    _interrupted(_config(small), out, "medians (histogram)")
    with pytest.raises(ConfigError, match=r"unfinished build.*--resume.*--overwrite"):
        build_corpus(_config(small), out, report=False)
    assert WorkFolder.unfinished(out)  # refused: nothing was removed
    build_corpus(_config(small), out, report=False, overwrite=True)  # starts again
    assert not WorkFolder.unfinished(out) and (out / "manifest.json").is_file()


def test_resume_of_a_complete_corpus(small: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    build_corpus(_config(small), out, report=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    leftover = out.with_name(".corpus.incomplete")  # as left by a build killed just after publishing
    (leftover / "tasks" / "qc").mkdir(parents=True)
    result = build_corpus(_config(small), out, report=False, resume=True)  # up to date: nothing to do
    assert result.n_cells > 0 and {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert not leftover.exists()
    _write(tmp_path, "a", seed=9)
    with pytest.raises(ConfigError, match=r"a\.h5ad.*--overwrite"):
        build_corpus(_config(small), out, report=False, resume=True)
    build_corpus(_config(small), out, report=False, resume=True, overwrite=True)
    fresh = tmp_path / "fresh"
    build_corpus(_config(small), fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


def test_a_second_build_of_the_same_corpus_is_refused(small: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    holder = WorkFolder(out)
    holder.open(resume=False, overwrite=False)
    try:
        with pytest.raises(ConfigError, match="another genecorpus build"):
            build_corpus(_config(small), out, report=False)
    finally:
        holder.remove()


def test_failure_keeps_finished_tasks_only_with_resume(small: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5ad"
    counts = random_counts(600, 413, density=0.15, seed=4).astype(np.float32)
    counts.data[-1] = 2.5  # found when its last task is read
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    write_h5ad(bad, counts, gene_ids=ids, cell_ids=np.array([f"x{i}" for i in range(600)], dtype=object))
    out = tmp_path / "corpus"
    with pytest.raises(GenecorpusError, match=r"2\.5"):
        build_corpus(_config([*small, bad]), out, report=False)
    assert not out.with_name(".corpus.incomplete").exists()  # the default leaves nothing behind
    with pytest.raises(GenecorpusError, match=r"2\.5"):
        build_corpus(_config([*small, bad]), out, report=False, resume=True)
    assert WorkFolder.unfinished(out)  # kept for the next --resume
    build_corpus(_config(small), out, report=False, resume=True)  # the bad dataset removed from the manifest
    fresh = tmp_path / "fresh"
    build_corpus(_config(small), fresh, report=False)
    assert corpus_file_digests(out) == corpus_file_digests(fresh)


# ------------------------------------------------------------------- faults after the QC pass


def test_skip_after_qc_leaves_the_dataset_out(small: list[Path], tmp_path: Path) -> None:
    """A file that becomes unreadable after the QC pass is skipped; the rest is as if never listed."""
    victim = small[1]
    kept = victim.read_bytes()

    def corrupt() -> None:
        victim.write_bytes(b"gone" * 1000)

    out = tmp_path / "corpus"
    try:
        build_corpus(_config(small), out, report=False, on_error="skip",
                     executor=LocalExecutor(1, progress=_InterruptAtOnce("encode", corrupt)))
    finally:
        victim.write_bytes(kept)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["dataset_id"] for s in manifest["skipped"]] == ["b"]
    assert manifest["skipped"][0]["stage"] == "encode"
    fresh = tmp_path / "fresh"
    build_corpus(_config([small[0], small[2]]), fresh, report=False)
    mine, theirs = corpus_file_digests(out), corpus_file_digests(fresh)
    for name in ("manifest.json", "state.json"):  # they name the datasets given
        mine.pop(name)
        theirs.pop(name)
    assert mine == theirs


class _InterruptAtOnce:
    """A progress callback that calls ``then`` the first time ``stage`` starts (no interruption)."""

    def __init__(self, stage: str, then: Callable[[], None]) -> None:
        self.stage = stage
        self.then: Callable[[], None] | None = then

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == self.stage and done == 0 and self.then is not None:
            self.then()
            self.then = None


# ---------------------------------------------------------------------------- lost workers


def _die_once(marker: str, value: int) -> int:
    """Kill this worker process the first time (as the OOM killer would), then return ``value``."""
    path = Path(marker)
    if value == 3 and not path.exists():
        path.write_text("died")
        os._exit(9)
    return value * 10


def test_a_lost_worker_is_replaced_and_its_task_rerun(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    executor = LocalExecutor(2)
    try:
        with caplog.at_level(logging.WARNING, logger="genecorpus"):
            results = executor.map("t", _die_once, [(str(tmp_path / "marker"), i) for i in range(8)])
    finally:
        executor.close()
    assert results == [i * 10 for i in range(8)]
    assert "a worker process died during t" in caplog.text


def _die_halfway_through_its_result(marker: str, value: int) -> int:
    """The first time: write the length header and a few bytes of a 1 MiB result into the worker's pipe, then
    die (a worker killed while sending what it returns)."""
    path = Path(marker)
    if value == 3 and not path.exists():
        path.write_text("died")
        pipe = next(o for o in gc.get_objects() if isinstance(o, Connection) and o.writable)
        os.write(pipe.fileno(), struct.pack("!i", 1 << 20) + b"\x80\x05 a few bytes")
        os._exit(9)
    return value * 10


@pytest.mark.timeout(120)
def test_a_worker_killed_while_sending_its_result_is_replaced(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A result cut short is not waited for: the worker is seen dead, replaced, and its task rerun (a pool
    whose workers share one result pipe waits for the rest of the message forever)."""
    executor = LocalExecutor(2)
    try:
        with caplog.at_level(logging.WARNING, logger="genecorpus"):
            results = executor.map("t", _die_halfway_through_its_result,
                                   [(str(tmp_path / "marker"), i) for i in range(8)])
    finally:
        executor.close()
    assert (tmp_path / "marker").exists() and results == [i * 10 for i in range(8)]
    assert "a worker process died during t" in caplog.text


def test_workers_killed_again_and_again_end_with_one_line(data: dict[str, Any], tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Every worker SIGKILLed as it appears (what the OOM killer does to a build that cannot fit): after
    its restarts the build stops with one line that keeps the finished tasks, and --resume finishes."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "corpus"
    work = out.with_name(f".{out.name}.incomplete")
    proc = subprocess.Popen(_cli(data["manifest"], "--out", out), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver, kills = psutil.Process(proc.pid), 0
    try:
        while proc.poll() is None:
            if work.is_dir() and _records(work)["qc"] >= 1:
                for child in driver.children():
                    with contextlib.suppress(psutil.Error):
                        if "resource_tracker" not in " ".join(child.cmdline()):
                            child.kill()
                            kills += 1
            time.sleep(0.01)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 1, stderr
    assert kills >= 3 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    kept = sum(_records(work).values())
    assert re.fullmatch(
        r"error: worker processes died 3 times during \S+ \(killed, or out of memory\); use fewer --workers or "
        rf"a smaller block_size; {kept} finished tasks are kept in {re.escape(str(work))}: rerun with --resume "
        "to continue", lines[0]), lines[0]
    assert not out.exists()
    _check_resumed(data, out, _records(work), _resume_in_process(data, out, caplog))
