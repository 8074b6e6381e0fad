"""Faults of the machine, not of the input: each ends ``genecorpus build`` with one line, exit 1.

Real faults, not mocks: a full file system and a read-only one are small tmpfs mounts in a private mount
namespace (``unshare``); a folder the user may not write and a file the user may not read are real
permissions (as root, the build runs in a user namespace where root's owner-only bits are all it has).
The interrupt (Ctrl-C) and the workers killed as the OOM killer would are in ``test_resume.py``, where
the resumed build is compared with an uninterrupted one.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from genecorpus import genes
from genecorpus.testing import random_counts, write_h5ad

if TYPE_CHECKING:
    from collections.abc import Iterator

N_CELLS = 3000
"""Cells per dataset: two datasets write a few MB of work files, more than the 1 MB file system holds."""


def _can(*cmd: str) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


MOUNTS = _can("unshare", "-rm", "true")
needs_mounts = pytest.mark.skipif(
    not MOUNTS, reason="needs `unshare -rm` (util-linux, user + mount namespaces) to mount a small tmpfs")
AS_OTHER: list[str] = ["unshare", "-U"] if os.geteuid() == 0 else []
needs_unprivileged = pytest.mark.skipif(
    bool(AS_OTHER) and not _can("unshare", "-U", "true"),
    reason="running as root: needs `unshare -U` (user namespaces) so that file permissions apply")


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    """Inputs and a manifest in a folder every user may read (the unprivileged runs read them too)."""
    with tempfile.TemporaryDirectory(prefix="genecorpus-faults-") as name:
        path = Path(name)
        path.chmod(0o755)
        ids = np.concatenate([genes.candidate_genes()[::30][:600], genes.mito_genes()[:13]]).astype(object)
        lines = ["block_size = 500"]
        for seed in (1, 2):
            counts = random_counts(N_CELLS, len(ids), density=0.2, seed=seed)
            h5ad = write_h5ad(path / f"d{seed}.h5ad", counts, gene_ids=ids,
                              cell_ids=[f"d{seed}-{i}" for i in range(N_CELLS)])
            Path(h5ad).chmod(0o644)
            lines += ["[[datasets]]", f'path = "{h5ad}"', 'gene_id = "ensembl"']
        manifest = path / "m.toml"
        manifest.write_text("\n".join(lines) + "\n")
        manifest.chmod(0o644)
        yield path


def _build(manifest: Path, out: str | Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "genecorpus", *extra, "build", str(manifest), "--out", str(out),
            "--workers", "2", "--no-report"]


def _in_tmpfs(mountpoint: Path, options: str, cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` with a fresh tmpfs (``options``) on ``mountpoint``; print what the tmpfs holds after."""
    script = 'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; shift 2; "$@"; rc=$?; ls -A "$MNT"; exit $rc'
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", options, str(mountpoint), *cmd],
                          capture_output=True, text=True, check=False,
                          env={**os.environ, "MNT": str(mountpoint), "GENECORPUS_NO_PROGRESS": "1"})
    assert done.returncode != 99, f"mounting a tmpfs failed: {done.stderr}"
    return done


def _one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


@needs_mounts
def test_full_disk_is_one_line_that_says_where_and_what_to_do(folder: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = _in_tmpfs(mnt, "size=1m", _build(folder / "m.toml", mnt / "corpus"))
    line = _one_error_line(done)
    assert "no space left on device" in line and f"while building {mnt / 'corpus'}" in line, line
    assert "free space on that file system" in line, line
    left = done.stdout.split()
    assert "corpus" not in left, "no half-written corpus may be left"
    if "finished tasks are kept" in line:  # the work folder named by the line is what stays
        assert left == [".corpus.incomplete"] and "--resume" in line, (left, line)
    else:
        assert left == [], left


@needs_mounts
def test_debug_shows_the_traceback(folder: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = _in_tmpfs(mnt, "ro,size=1m", _build(folder / "m.toml", mnt / "corpus", "--debug"))
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "Read-only file system" in done.stderr, done.stderr


@needs_mounts
def test_read_only_file_system(folder: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = _in_tmpfs(mnt, "ro,size=1m", _build(folder / "m.toml", mnt / "corpus"))
    line = _one_error_line(done)
    assert f"{mnt}/.corpus.incomplete: read-only file system" in line, line
    assert "choose an --out on a writable file system" in line, line


@needs_unprivileged
def test_folder_the_user_may_not_write(folder: Path) -> None:
    locked = folder / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        done = subprocess.run([*AS_OTHER, *_build(folder / "m.toml", locked / "corpus")], capture_output=True,
                              text=True, check=False, env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    finally:
        locked.chmod(0o755)
    line = _one_error_line(done)
    assert f"{locked}/.corpus.incomplete: permission denied" in line, line
    assert "choose an --out in a folder you may write to" in line, line
    assert list(locked.iterdir()) == []


@needs_unprivileged
def test_input_the_user_may_not_read(folder: Path) -> None:
    secret = folder / "secret.h5ad"
    shutil.copyfile(folder / "d1.h5ad", secret)
    secret.chmod(0)
    manifest = folder / "secret.toml"
    manifest.write_text(f'[[datasets]]\npath = "{secret}"\ngene_id = "ensembl"\n')
    manifest.chmod(0o644)
    out = folder / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    done = subprocess.run([*AS_OTHER, *_build(manifest, out / "corpus")], capture_output=True, text=True,
                          check=False, env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"})
    line = _one_error_line(done)
    assert line == (f"error: {secret}: permission denied: this user may not read the file; make it readable "
                    "(chmod a+r) or copy it somewhere you may read"), line
    assert stat.S_IMODE(secret.stat().st_mode) == 0, "the input is never modified"
    assert list(out.iterdir()) == []
