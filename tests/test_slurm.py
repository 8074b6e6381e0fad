"""A real SLURM: ``genecorpus build`` through the manifest's ``[cluster] kind = "slurm"`` on this machine.

``scripts/slurm/start-local-slurm.sh`` starts a single-node SLURM from Debian's packages (munged,
slurmctld, slurmd; installed when missing, as root), every port on 127.0.0.1; the module's fixture runs it
and stops what it started. It skips only where the script cannot run (not Linux, or not root with no
SLURM running); as root a failing script fails the tests. The builds are the command line a user runs:
the driver starts a ``dask_jobqueue.SLURMCluster`` whose two workers are ``sbatch`` jobs run by slurmd,
scheduler and workers on the loopback interface (``interface = "lo"``). The reference is a local build of
the same manifest in this process; a worker job cancelled with ``scancel`` mid-build has its tasks rerun
by Dask on the other job (or on the jobs submitted in place of every job), and the bytes are the same; a
build interrupted with Ctrl-C is finished by ``--resume`` (slow: ``make test-all``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
from corpus_files import corpus_file_digests

from genecorpus import genes
from genecorpus.build import build_corpus
from genecorpus.config import load_cluster_spec, load_manifest
from genecorpus.testing import random_counts, write_h5ad

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "slurm"
STATE = Path(os.environ.get("GENECORPUS_SLURM_DIR", "/tmp/genecorpus-slurm"))
DAEMONS = ("munged", "slurmctld", "slurmd")
N_CELLS = 1000
SHARD_CELLS = 250
TASKS = 3 * N_CELLS // SHARD_CELLS
"""Tasks per stage: three datasets of four tasks each."""
CLUSTER = """
[cluster]
engine = "dask"
kind = "slurm"
workers = 2
memory_per_worker = "2GiB"
walltime = "00:10:00"
interface = "lo"
worker_extra_args = ["--dashboard-address", "127.0.0.1:0"]
log_directory = "{logs}"
"""


def _daemon_pids() -> dict[str, int]:
    """The daemons of the script's folder that run, by name."""
    pids = {}
    for name in DAEMONS:
        try:
            pid = int((STATE / f"{name}.pid").read_text())
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                pids[name] = pid
        except (OSError, ValueError):
            continue
    return pids


@pytest.fixture(scope="module")
def slurm() -> Iterator[dict[str, str]]:
    """The environment of a command that uses the local SLURM (``SLURM_CONF``), started by the script
    unless it runs already; what the fixture started it stops at the end."""
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("no SLURM: scripts/slurm/start-local-slurm.sh needs Linux and bash")
    started_here = len(_daemon_pids()) < len(DAEMONS)
    if started_here and os.geteuid() != 0:
        pytest.skip("no SLURM: installing and starting its daemons (scripts/slurm/start-local-slurm.sh) needs root")
    done = subprocess.run(["bash", str(SCRIPTS / "start-local-slurm.sh")], capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0:  # as root on Linux the script must work (make test and CI run as root)
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].removeprefix("start-local-slurm: ")
        pytest.fail(f"scripts/slurm/start-local-slurm.sh failed: {why}")
    conf = done.stdout.strip().removeprefix("export SLURM_CONF=")
    yield {**os.environ, "SLURM_CONF": conf, "GENECORPUS_NO_PROGRESS": "1"}
    if started_here:
        subprocess.run(["bash", str(SCRIPTS / "stop-local-slurm.sh")], capture_output=True, timeout=120, check=False)




@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three generated datasets, a manifest without ``[cluster]``, and the digests of its local build."""
    folder = tmp_path_factory.mktemp("slurm")
    ids = np.concatenate([genes.candidate_genes()[::40][:400], genes.mito_genes()[:13]]).astype(object)
    lines = [f"shard_cells = {SHARD_CELLS}", "block_size = 100"]
    for seed, name in enumerate("abc", start=1):
        path = write_h5ad(folder / f"{name}.h5ad", random_counts(N_CELLS, len(ids), density=0.15, seed=seed),
                          gene_ids=ids, cell_ids=np.array([f"{name}{i}" for i in range(N_CELLS)], dtype=object))
        lines += ["[[datasets]]", f'path = "{path}"', 'gene_id = "ensembl"']
    head = "\n".join(lines) + "\n"
    local = folder / "local.toml"
    local.write_text(head)
    reference = folder / "reference"
    build_corpus(load_manifest(local), reference, report=False)
    return {"head": head, "reference": corpus_file_digests(reference)}


def _slurm_manifest(data: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The manifest with its SLURM ``[cluster]`` section, and the folder of the jobs' logs."""
    logs = folder / "jobs"
    manifest = folder / "m.toml"
    manifest.write_text(data["head"] + CLUSTER.format(logs=logs))
    spec = load_cluster_spec(manifest)
    assert spec is not None and spec.kind == "slurm" and spec.interface == "lo"
    return manifest, logs


def _build(manifest: Path, out: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    """``genecorpus build m.toml --out OUT --engine dask``, as a user types it."""
    return subprocess.Popen([sys.executable, "-m", "genecorpus", "build", str(manifest), "--out", str(out),
                             "--engine", "dask", "--no-report"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    return stderr


def _jobs(logs: Path) -> list[int]:
    """The ids of the worker jobs, from their log files ``dask-worker-<job>.err``."""
    return sorted(int(m.group(1)) for p in logs.glob("*.err") if (m := re.fullmatch(r".*-(\d+)\.err", p.name)))


def _scontrol_job(job: int, env: dict[str, str]) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", str(job)], env=env, capture_output=True, text=True,
                           check=True).stdout
    return dict(field.split("=", 1) for field in shown.split() if "=" in field)


def _records(work: Path, stage: str) -> int:
    return len(list((work / "tasks" / stage).glob("*.pkl")))


def _until(condition: Callable[[], bool], proc: subprocess.Popen[str], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the build ended before {what}: {proc.stderr.read() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} after {timeout} s")
        time.sleep(0.02)


def _listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, address) of every TCP socket these processes listen on."""
    import psutil

    return [(c.pid, c.laddr.ip) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids]


def _job_pids(jobs: list[int]) -> set[int]:
    """The processes of these SLURM jobs (their environment names the job)."""
    import psutil

    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("SLURM_JOB_ID") in {str(j) for j in jobs}:
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


def test_slurm_daemons_listen_on_loopback_only(slurm: dict[str, str]) -> None:
    pids = _daemon_pids()
    assert set(pids) == set(DAEMONS)
    listening = _listening(set(pids.values()))
    assert {pid for pid, _ in listening} == {pids["slurmctld"], pids["slurmd"]}  # munged: a Unix socket
    assert all(ip == "127.0.0.1" for _, ip in listening), listening
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=slurm, capture_output=True, text=True,
                           check=True).stdout.split()
    assert nodes[0] == "localhost" and nodes[1] in {"idle", "mixed", "allocated"}, nodes


def test_build_on_slurm_gives_the_bytes_of_a_local_build(slurm: dict[str, str], data: dict[str, Any],
                                                         tmp_path: Path) -> None:
    manifest, logs = _slurm_manifest(data, tmp_path)
    _wait(_build(manifest, tmp_path / "corpus", slurm))
    assert corpus_file_digests(tmp_path / "corpus") == data["reference"]
    # the workers were sbatch jobs that slurmd launched on the node, connected over loopback (two were asked
    # for; on a loaded machine the first may finish the build before the second has started)
    jobs = _jobs(logs)
    assert 1 <= len(jobs) <= 2, sorted(logs.iterdir())
    slurmd_log = (STATE / "log" / "slurmd.log").read_text()
    for job in jobs:
        assert f"Launching batch job {job} for UID" in slurmd_log
        shown = _scontrol_job(job, slurm)
        assert shown["BatchHost"] == "localhost" and shown["JobName"] == "dask-worker", shown
        assert shown["JobState"] == "CANCELLED", shown  # dask-jobqueue scancels its jobs when it closes
        worker_log = (logs / f"dask-worker-{job}.err").read_text()
        assert re.search(r"Start worker at: +tcp://127\.0\.0\.1:\d+", worker_log), worker_log
        assert re.search(r"Registered to: +tcp://127\.0\.0\.1:\d+", worker_log), worker_log


@pytest.mark.parametrize("cancelled", ["one job", "every job"])
def test_scancel_mid_build_is_recovered_with_the_same_bytes(slurm: dict[str, str], data: dict[str, Any],
                                                           tmp_path: Path, cancelled: str) -> None:
    """Once the first QC results are in, one worker job or both are cancelled with ``scancel``. Dask reruns
    their tasks on the job left, or on the jobs submitted in their place (the job count is kept), and the
    build ends with the local build's bytes."""
    import psutil

    manifest, logs = _slurm_manifest(data, tmp_path)
    out = tmp_path / "corpus"
    work = out.with_name(f".{out.name}.incomplete")
    env = {**slurm, "DASK_DISTRIBUTED__DEPLOY__LOST_WORKER_TIMEOUT": "1s"}  # replace a lost job after 1 s, not 15
    proc = _build(manifest, out, env)
    try:
        # both jobs when the machine lets the second start in time; "one job" with a single job running is
        # then every job, recovered by the job submitted in its place
        _until(lambda: len(_jobs(logs)) >= 1 and _records(work, "qc") >= 2, proc, "a job and 2 QC results")
        jobs = _jobs(logs)
        # every TCP port of the build listens on loopback: the scheduler (in the driver) and each job's
        # nanny, worker and worker HTTP server
        driver = {proc.pid} | {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        in_jobs = _job_pids(jobs)
        listening = _listening(driver | in_jobs)
        assert all(ip == "127.0.0.1" for _, ip in listening), listening
        assert len([pid for pid, _ in listening if pid in driver]) >= 1, listening
        assert len([pid for pid, _ in listening if pid in in_jobs]) >= 2 * len(jobs), listening
        killed = jobs[:1] if cancelled == "one job" else jobs
        subprocess.run(["scancel", *map(str, killed)], env=slurm, check=True)
        squeue = ["squeue", "-h", "-j", ",".join(map(str, killed))]
        _until(lambda: not subprocess.run(squeue, env=slurm, capture_output=True, text=True, check=False).stdout,
               proc, f"jobs {killed} ended")
        assert _records(work, "encode") < TASKS  # work was left to the jobs that remain or replace them
    except BaseException:
        proc.kill()
        raise
    _wait(proc)
    assert corpus_file_digests(out) == data["reference"]
    for job in killed:
        assert _scontrol_job(job, slurm)["JobState"] == "CANCELLED"
        assert f"JOB {job} ON localhost CANCELLED" in (logs / f"dask-worker-{job}.err").read_text()
    if cancelled == "every job":  # the build was finished by jobs submitted after the kill
        replacements = [job for job in _jobs(logs) if job not in jobs]
        assert replacements
        slurmd_log = (STATE / "log" / "slurmd.log").read_text()
        for job in replacements:
            assert f"Launching batch job {job} for UID" in slurmd_log
            assert "Registered to:" in (logs / f"dask-worker-{job}.err").read_text()


def test_jobs_slurm_would_refuse_stop_the_build_with_its_reason(slurm: dict[str, str], data: dict[str, Any],
                                                               tmp_path: Path) -> None:
    """More memory per job than the node has: one line with SLURM's reason at once, not a build waiting for
    workers that never come (dask-jobqueue only logs a refused ``sbatch``)."""
    manifest, logs = _slurm_manifest(data, tmp_path)
    manifest.write_text(manifest.read_text().replace('memory_per_worker = "2GiB"', 'memory_per_worker = "64TiB"'))
    done = subprocess.run([sys.executable, "-m", "genecorpus", "build", str(manifest), "--out", str(tmp_path / "c")],
                          env=slurm, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("error: SLURM would refuse the worker jobs of [cluster]: "), done.stderr
    assert "Requested node configuration is not available" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not _jobs(logs)
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".c.incomplete*"))


def test_importing_the_slurm_cluster_keeps_ctrl_c() -> None:
    """dask-jobqueue 0.9.0 sets SIGINT to ``sys.exit()`` on import: Ctrl-C must stay a KeyboardInterrupt."""
    code = ("import signal\nfrom genecorpus.executors import _slurm_cluster_class\n_slurm_cluster_class()\n"
            "assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, signal.getsignal(signal.SIGINT)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow  # the scancel tests check the recovery by Dask; this one the recovery by --resume
def test_ctrl_c_on_slurm_then_resume_gives_the_same_bytes(slurm: dict[str, str], data: dict[str, Any],
                                                          tmp_path: Path) -> None:
    manifest, logs = _slurm_manifest(data, tmp_path)
    out = tmp_path / "corpus"
    work = out.with_name(f".{out.name}.incomplete")
    proc = _build(manifest, out, slurm)
    try:
        _until(lambda: _records(work, "qc") >= 2, proc, "2 QC results")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    except BaseException:
        proc.kill()
        raise
    assert proc.returncode == 130, stderr
    assert re.fullmatch(r"interrupted: \d+ finished tasks are kept in .*: rerun with --resume to continue\n",
                        stderr), stderr
    jobs = _jobs(logs)
    assert jobs and not subprocess.run(["squeue", "-h", "-j", ",".join(map(str, jobs))], env=slurm,
                                       capture_output=True, text=True, check=False).stdout  # cancelled on the way out
    resumed = subprocess.run([sys.executable, "-m", "genecorpus", "build", str(manifest), "--out", str(out),
                              "--engine", "dask", "--no-report", "--resume"], env=slurm, capture_output=True,
                             text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert corpus_file_digests(out) == data["reference"]
