"""Resumable builds: a work folder beside the corpus that keeps every finished task's result.

A build assembles its corpus in ``.<out>.incomplete/`` (a sibling of ``OUT``, so the final rename stays on
one file system)::

    lock                        held (flock) by the build that owns the folder
    inputs.json                 per input path: the token that names its content, size/mtime, sha256; per
                                TileDB-SOMA experiment: its token and the snapshot timestamp it is read at
    tasks/<stage>/<key>.pkl     a finished task's result (zlib-compressed pickle, written atomically)
    tasks/<stage>/<key>.json    what the key was made of (to say why a task is redone)
    parts/<key>.arrow           the Arrow part an encoding task wrote
    fingerprints/<key>.npy      the cells' fingerprints a QC task wrote (duplicate detection)
    candidate_cells/<key>/      candidate cells read again for verification (duplicate detection)
    publish.json                part → shard names while shards are moved into ``corpus/``
    corpus/                     the corpus being assembled; renamed to ``OUT`` when complete

A task's *key* is the sha256 of its *components*: the code, its input file's content token, its
dataset's plan, its range of cells, the settings of its stage and the corpus-wide results it depends on
(for instance the median of every gene, for encoding). A rerun with ``--resume`` looks each task up by
key: a finished one is loaded, never redone; anything that changed changes exactly the keys that depend
on it. A record is written only after its task (and its part file) is complete, by rename, so a killed
task leaves nothing that a resumed build would use.

This module owns the keys (:class:`TaskKeys`, :func:`fingerprint`), the records (:func:`run_recorded`),
the input digests computed while a build runs (:class:`InputDigests`) and the work folder
(:class:`WorkFolder`); the build calls it around every stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import pickle
import secrets
import shutil
import threading
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel

from genecorpus.corpus.folder import sha256_of_path
from genecorpus.errors import ConfigError, TaskFailure
from genecorpus.io.soma import ExperimentIdentity, experiment_identity

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from types import TracebackType

    from genecorpus.dataset import CellRange, DatasetPlan

logger = logging.getLogger(__name__)

__all__ = [
    "InputDigests", "TaskKeys", "WorkFolder", "code_fingerprint", "file_identity", "fingerprint", "run_recorded",
    "task_key",
]

COMPONENT_REASONS = {
    "code": "genecorpus itself changed",
    "input": "the input file changed",
    "dataset": "the dataset's entry in the manifest changed",
    "cells": "the dataset's cells were split into other tasks",
    "settings": "settings or corpus-wide results it depends on changed",
    "upstream": "its QC task was redone",
}
"""Why a task is redone, by the first component of its key that differs from the earlier run's."""


# ------------------------------------------------------------------------------------------ keys


def fingerprint(*objs: Any) -> str:
    """sha256 (hex) of a canonical encoding of ``objs``.

    Handles None, bool, int, float, str, bytes, paths, NumPy arrays and scalars, lists, tuples, dicts,
    dataclasses (their fields), pydantic models, Arrow schemas and types. Equal values give equal
    digests in any process; object arrays are encoded element by element as strings.
    """
    h = hashlib.sha256()
    for obj in objs:
        _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:
    if obj is None or isinstance(obj, bool | int | float | str):
        data = json.dumps(obj).encode()
        h.update(b"j%d:" % len(data) + data)
    elif isinstance(obj, bytes):
        h.update(b"b%d:" % len(obj) + obj)
    elif isinstance(obj, os.PathLike):
        _feed(h, os.fspath(obj))
    elif isinstance(obj, np.ndarray):
        h.update(f"a{obj.dtype.str}{obj.shape}:".encode())
        if obj.dtype == object:
            _feed(h, [str(v) for v in obj.ravel().tolist()])
        else:
            h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, np.generic):
        _feed(h, obj.item())
    elif isinstance(obj, BaseModel):
        _feed(h, type(obj).__qualname__)
        _feed(h, obj.model_dump_json())
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _feed(h, type(obj).__qualname__)
        for f in dataclasses.fields(obj):
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, dict):
        h.update(b"d%d:" % len(obj))
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
    elif isinstance(obj, list | tuple):
        h.update(b"l%d:" % len(obj))
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, pa.Schema):
        _feed(h, obj.serialize().to_pybytes())
    elif isinstance(obj, pa.DataType):
        _feed(h, str(obj))
    else:
        msg = f"cannot fingerprint a {type(obj).__name__}"
        raise TypeError(msg)


@functools.cache
def code_fingerprint() -> str:
    """sha256 of genecorpus's own source files: results of other code are never reused."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def task_key(components: dict[str, str]) -> str:
    """The key of a task: sha256 of its components (name → digest or short text)."""
    return fingerprint(components)


class TaskKeys:
    """The keys of a build's tasks, from their components (see the module docstring).

    Parameters
    ----------
    work
        The build's work folder (where the records are).
    tokens
        Content token of each input, by the ``path`` of its datasets' specs (:meth:`WorkFolder.input_tokens`,
        :meth:`WorkFolder.soma_snapshot`); in-memory datasets have none.
    qc_settings
        Fingerprint of what the QC pass depends on besides its cells.
    """

    def __init__(self, work: WorkFolder, tokens: dict[str, str], qc_settings: str) -> None:
        self.work = work
        self.tokens = tokens
        self.qc_settings = qc_settings
        self._plans: dict[int, tuple[DatasetPlan, str]] = {}
        """id → (plan, fingerprint); the plan is kept so that its id cannot be reused by another object."""

    def _plan(self, plan: DatasetPlan) -> str:
        if id(plan) not in self._plans:
            # the snapshot a SOMA experiment is read at is not the plan's identity: its content token is
            self._plans[id(plan)] = (plan, fingerprint({f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)
                                                        if f.name not in ("index", "source", "snapshot_ms")}))
        return self._plans[id(plan)][1]

    def components(self, plans: Sequence[DatasetPlan], cells: CellRange, settings: str,
                   upstream: str | None = None) -> tuple[str, dict[str, str]]:
        """The task's slot (dataset and cells, for messages) and its key components."""
        plan = plans[cells.dataset]
        comps = {"code": code_fingerprint(), "input": self.tokens.get(plan.spec.path, "in-memory"),
                 "dataset": self._plan(plan), "cells": f"{cells.start}:{cells.stop}", "settings": settings}
        if upstream is not None:
            comps["upstream"] = upstream
        return f"{plan.spec.path}[{cells.start}:{cells.stop}]", comps

    def records(self, stage: str, plans: Sequence[DatasetPlan], cells: Sequence[CellRange],
                settings: Callable[[CellRange], str], upstream: Sequence[str] | None = None,
                ) -> tuple[list[Path | None], list[str]]:
        """Record paths (None without records) and keys of a stage's tasks, one per range of cells."""
        entries = [self.components(plans, c, settings(c), upstream[i] if upstream else None)
                   for i, c in enumerate(cells)]
        records = self.work.plan_stage(stage, entries)
        return records, [task_key(c) for _, c in entries]


# --------------------------------------------------------------------------------------- records


_RECORD_MODULES = ("genecorpus.", "numpy", "pathlib", "collections")
_RECORD_BUILTINS = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bytes",
                              "bool", "complex", "slice", "bytearray"})


class _RecordUnpickler(pickle.Unpickler):  # noqa: S301 - the restricted unpickler of task records itself
    """Loads task records: genecorpus result classes, NumPy arrays and plain containers only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _RECORD_BUILTINS) or module.startswith(_RECORD_MODULES):
            return super().find_class(module, name)
        msg = f"a task record refers to {module}.{name}"
        raise pickle.UnpicklingError(msg)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _load_record(record: Path) -> Any:
    """The result stored in ``record`` if it and the files it names are intact, else None."""
    try:
        data = zlib.decompress(record.read_bytes())
        result, outputs = _RecordUnpickler(io.BytesIO(data)).load()
        if all(Path(p).stat().st_size == size for p, size in outputs):
            return result
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError, AttributeError):
        logger.debug("ignoring the damaged task record %s", record)
    return None


def run_recorded(record: Path | None, outputs: Sequence[Path], fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or the result stored in ``record`` by an earlier run of the same task.

    Runs in the worker. A result is stored (with the sizes of the files ``outputs`` the task wrote)
    only after ``fn`` returned; a :class:`~genecorpus.errors.TaskFailure` is never stored.
    """
    if record is None:
        return fn(*args)
    if record.exists():
        result = _load_record(record)
        if result is not None:
            return result
    result = fn(*args)
    if not isinstance(result, TaskFailure):
        sizes = [(str(p), Path(p).stat().st_size) for p in outputs]
        _write_atomic(record, zlib.compress(pickle.dumps((result, sizes), protocol=5), 1))
    return result


# ------------------------------------------------------------------------------------ input digests


class InputDigests:
    """sha256 of the input files, computed in one background thread while the stages run.

    ``on_done(path, sha256, identity)`` is called from that thread as each digest is ready, with the
    file's size and modification time taken before hashing (see :meth:`WorkFolder.record_digest`).
    A context manager: leaving it abandons unfinished digests.
    """

    def __init__(self, paths: Sequence[Path],
                 on_done: Callable[[Path, str, list[int]], None] | None = None) -> None:
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="genecorpus-sha256")
        self._on_done = on_done
        self._futures = {p: self._pool.submit(self._digest, p) for p in dict.fromkeys(paths)}

    def _digest(self, path: Path) -> tuple[str, int]:
        identity = file_identity(path) if self._on_done is not None else []
        digest, size = sha256_of_path(path, stop=self._stop)
        if self._on_done is not None and not self._stop.is_set():
            self._on_done(path, digest, identity)
        return digest, size

    def get(self, path: Path) -> tuple[str, int]:
        """Digest and size in bytes of one of the paths (waits for it)."""
        return self._futures[path].result()

    def close(self) -> None:
        """Stop hashing (an unfinished digest is abandoned)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> InputDigests:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# ----------------------------------------------------------------------------------- work folder


def file_identity(path: Path) -> list[int]:
    """Size in bytes and newest modification time (ns) of a file or of a folder's files."""
    files = [p for p in sorted(path.rglob("*")) if p.is_file()] if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return [sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]


class WorkFolder:
    """The ``.<out>.incomplete`` folder of one build (see the module docstring).

    Parameters
    ----------
    out
        The corpus folder the build publishes.
    records
        Keep task records (False for in-memory datasets, whose content has no file to name it).
    """

    def __init__(self, out: Path, *, records: bool = True) -> None:
        self.out = out
        self.path = out.with_name(f".{out.name}.incomplete")
        self.records = records
        self.resumed = False
        self._lock_file: Any = None
        self._inputs: dict[str, dict[str, Any]] = {}
        self._inputs_lock = threading.Lock()

    # ---- state of an earlier run

    @staticmethod
    def unfinished(out: Path) -> bool:
        """Whether an interrupted build of ``out`` left a work folder that holds a corpus in progress."""
        return (out.with_name(f".{out.name}.incomplete") / "corpus").is_dir()

    @property
    def corpus(self) -> Path:
        """The corpus being assembled (renamed to ``out`` when complete)."""
        return self.path / "corpus"

    def n_finished(self) -> int:
        """Task records present."""
        tasks = self.path / "tasks"
        return sum(1 for _ in tasks.glob("*/*.pkl")) if tasks.is_dir() else 0

    # ---- lifecycle

    def open(self, *, resume: bool, overwrite: bool) -> None:
        """Create or take over the work folder; with ``resume``, keep what an earlier run finished.

        Raises
        ------
        ConfigError
            Another build holds the folder, or an unfinished build is there and neither ``resume``
            nor ``overwrite`` says what to do with it.
        """
        existed = self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        unfinished = self.corpus.is_dir()
        if existed and unfinished and not resume and not overwrite:
            n = self.n_finished()
            self.release()
            msg = (f"{self.path}: holds an unfinished build of {self.out} ({n} finished tasks); rerun with "
                   "--resume to continue it, or with --overwrite to start again")
            raise ConfigError(msg)
        if resume and unfinished:
            self.resumed = True
            self._unpublish()
            n = self.n_finished()
            logger.info("resuming the unfinished build in %s (%d finished tasks)", self.path, n)
        else:
            self._clear(keep=("lock",))
        shutil.rmtree(self.corpus, ignore_errors=True)
        for sub in ("corpus", "tasks", "parts", "fingerprints"):
            (self.path / sub).mkdir(exist_ok=True)
        inputs = self.path / "inputs.json"
        if self.resumed and inputs.is_file():
            with contextlib.suppress(ValueError, OSError):
                self._inputs = json.loads(inputs.read_text())

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection against two builds
            return
        fh = (self.path / "lock").open("a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            msg = (f"{self.path}: another genecorpus build of {self.out} is running; wait for it to finish "
                   "or choose another --out")
            raise ConfigError(msg) from None
        self._lock_file = fh

    def release(self) -> None:
        """Release the lock (the folder stays)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _clear(self, keep: Iterable[str]) -> None:
        keep = set(keep)
        for child in self.path.iterdir():
            if child.name in keep:
                continue
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def discard_leftover(self) -> None:
        """Remove what a build killed after publishing left behind (no corpus in progress), if unlocked."""
        if not self.path.is_dir() or self.corpus.is_dir():
            return
        try:
            self._lock()
        except ConfigError:
            return  # another build is starting in it
        self.remove()

    def remove(self) -> None:
        """Delete the work folder (after publishing, or after a failure nobody will resume).

        Renamed first, so that a task still running on a cluster worker cannot write into it again.
        """
        self.release()
        if not self.path.exists():
            return
        trash = self.path.with_name(f"{self.path.name}.removed-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self.path.rename(trash)
        except OSError:
            trash = self.path
        shutil.rmtree(trash, ignore_errors=True)

    # ---- inputs

    def input_tokens(self, paths: Sequence[Path], digest: Callable[[Path], tuple[str, int]]) -> dict[Path, str]:
        """A token per input that changes exactly when its content does.

        A fresh build names an input by its size and modification time, so that no task waits for its
        sha256; the sha256 is recorded beside the token once :meth:`record_digest` has it. A resumed
        build computes every sha256 first and keeps the earlier token only for inputs whose sha256 is
        unchanged (or, if the earlier run was killed before hashing it, whose size and time are).
        """
        tokens: dict[Path, str] = {}
        with self._inputs_lock:
            earlier = dict(self._inputs)
        for path in paths:
            ident = file_identity(path)
            rec = earlier.get(str(path))
            if self.resumed:
                sha, _ = digest(path)
                same = rec is not None and (rec.get("sha256") == sha or (
                    rec.get("sha256") is None and rec.get("identity") == ident))
                token = rec["token"] if same and rec is not None else f"sha256:{sha}"
                if rec is not None and not same:
                    logger.warning("%s: changed since the interrupted build (sha256 differs); its tasks are "
                                   "redone", path)
                entry = {"token": token, "identity": ident, "sha256": sha}
            else:
                token = f"file:{ident[0]}:{ident[1]}"
                entry = {"token": token, "identity": ident, "sha256": None}
            tokens[path] = token
            with self._inputs_lock:
                known = self._inputs.get(str(path), {})  # the hashing thread may have been first
                if entry["sha256"] is None and known.get("identity") == ident:
                    entry["sha256"] = known.get("sha256")
                self._inputs[str(path)] = entry
        self._save_inputs()
        return tokens

    def soma_snapshot(self, uri: str) -> int | None:
        """The snapshot timestamp (ms) to read a TileDB-SOMA experiment at: the interrupted build's, if any.

        A resumed build reads an experiment at the timestamp the interrupted one recorded when the
        experiment is unchanged: always for a remote one (taken to be immutable), and for a local one when
        the listing of its files is the same. Otherwise (a fresh build, or a changed local experiment,
        whose tasks are then redone) it returns None: the build takes a new snapshot.
        """
        if not self.resumed:
            return None
        with self._inputs_lock:
            rec = self._inputs.get(uri)
        if rec is None or rec.get("snapshot_ms") is None:
            return None
        snapshot = int(rec["snapshot_ms"])
        if experiment_identity(uri, snapshot_ms=snapshot).token == rec.get("token"):
            return snapshot
        logger.warning("%s: changed since the interrupted build (its files differ); its tasks are redone", uri)
        return None

    def record_soma_snapshot(self, uri: str, snapshot_ms: int) -> ExperimentIdentity:
        """Remember the snapshot a TileDB-SOMA experiment is read at; returns its identity (its token names
        its content in task keys and the manifest)."""
        identity = experiment_identity(uri, snapshot_ms=snapshot_ms)
        with self._inputs_lock:
            self._inputs[uri] = {"token": identity.token, "snapshot_ms": snapshot_ms, "bytes": identity.n_bytes,
                                 "local": identity.local}
        self._save_inputs()
        return identity

    def record_digest(self, path: Path, sha256: str, identity: Sequence[int]) -> None:
        """Remember an input's sha256 (called from the hashing thread) if the file did not change."""
        with self._inputs_lock:
            entry = self._inputs.setdefault(str(path), {"token": None, "identity": list(identity)})
            if list(entry["identity"]) == list(identity):
                entry["sha256"] = sha256
        self._save_inputs()

    def _save_inputs(self) -> None:
        with self._inputs_lock:
            data = json.dumps(self._inputs, indent=1, sort_keys=True).encode()
            with contextlib.suppress(FileNotFoundError):  # the folder was removed after a failure
                _write_atomic(self.path / "inputs.json", data)

    # ---- tasks

    def part(self, key: str) -> Path:
        """The Arrow part file of an encoding task."""
        return self.path / "parts" / f"{key}.arrow"

    def fingerprints(self, key: str) -> Path:
        """The cells' fingerprints a QC task wrote (see :mod:`genecorpus.duplicates`)."""
        return self.path / "fingerprints" / f"{key}.npy"

    def candidate_cells(self, key: str) -> Path:
        """The folder where a task stored the candidate cells it read again, for verification."""
        return self.path / "candidate_cells" / key

    def plan_stage(self, stage: str, entries: Sequence[tuple[str, dict[str, str]]]) -> list[Path | None]:
        """Record paths for a stage's tasks, given each task's slot (dataset and cells) and components.

        With a resumed build, logs how many tasks were finished before and why the others are redone.
        """
        if not self.records:
            return [None] * len(entries)
        folder = self.path / "tasks" / stage
        folder.mkdir(parents=True, exist_ok=True)
        keys = [task_key(c) for _, c in entries]
        records = [folder / f"{k}.pkl" for k in keys]
        if self.resumed:
            self._report(stage, entries, keys, records)
        for (slot, components), key in zip(entries, keys, strict=True):
            about = folder / f"{key}.json"
            if not about.exists():
                _write_atomic(about, json.dumps({"slot": slot, "components": components}).encode())
        return list(records)

    def _report(self, stage: str, entries: Sequence[tuple[str, dict[str, str]]], keys: Sequence[str],
                records: Sequence[Path]) -> None:
        folder = self.path / "tasks" / stage
        current = set(keys)
        earlier: dict[str, dict[str, str]] = {}  # slot → components of a finished task no longer wanted
        for about in folder.glob("*.json"):
            if about.stem in current or not about.with_suffix(".pkl").exists():
                continue
            with contextlib.suppress(ValueError, OSError, KeyError):
                info = json.loads(about.read_text())
                earlier[info["slot"]] = info["components"]
        reused = sum(r.exists() for r in records)
        reasons: Counter[str] = Counter()
        for (slot, components), record in zip(entries, records, strict=True):
            if record.exists() or slot not in earlier:
                continue
            old = earlier[slot]
            name = next((n for n in COMPONENT_REASONS if old.get(n) != components.get(n)), "settings")
            reasons[COMPONENT_REASONS[name] + (f" ({slot.rsplit('[', 1)[0]})" if name == "input" else "")] += 1
        fresh = len(entries) - reused - sum(reasons.values())
        parts = [f"{n} redone because {why}" for why, n in reasons.most_common()]
        if fresh:
            parts.append(f"{fresh} not run before")
        log = logger.warning if reasons else logger.info
        log("%s: %d of %d tasks reused%s", stage, reused, len(entries), "; " + "; ".join(parts) if parts else "")

    # ---- publishing

    def journal_publish(self, moves: Sequence[tuple[Path, str]]) -> None:
        """Write down which part becomes which shard before the parts are moved into ``corpus/``."""
        _write_atomic(self.path / "publish.json",
                      json.dumps([[str(p), name] for p, name in moves]).encode())

    def _unpublish(self) -> None:
        """Move shards an interrupted run had published back to their parts (their records need them)."""
        journal = self.path / "publish.json"
        if not journal.is_file():
            return
        with contextlib.suppress(ValueError, OSError):
            for part, name in json.loads(journal.read_text()):
                shard = self.corpus / name
                if shard.is_file() and not Path(part).exists():
                    shard.replace(part)
        journal.unlink(missing_ok=True)
