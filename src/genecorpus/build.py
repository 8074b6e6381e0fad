"""The corpus builder: plan → QC statistics → medians → encode and write → publish.

Stages are plain functions over *tasks* (a dataset and a range of :attr:`BuildConfig.shard_cells` input
cells) run through an :class:`~genecorpus.executors.Executor`. Tasks reopen their file from its path and
read it in blocks of :attr:`BuildConfig.block_size` cells; each returns a small mergeable result (or
writes its own shard), and results are merged in task order. Neither the block size nor the number of
workers changes a byte of the output.

Data is read at most four times: QC statistics (with each gene's value range), median histogram,
median selection, encoding. ``tokenize`` (given medians, no QC) reads it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import os
import pickle
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from pydantic import ValidationError

from genecorpus import _kernels, genes, medians
from genecorpus.config import BuildConfig, DatasetSpec, QCParams, describe_validation_error
from genecorpus.encode import SPEC_ARITHMETIC, Arithmetic, RankOrder, apply_layout, rank_value_encode
from genecorpus.errors import ConfigError, DictionaryError, GenecorpusError, InputError, TaskFailure
from genecorpus.executors import Executor, LocalExecutor, fold
from genecorpus.io import DEFAULT_BLOCK_SIZE, open_dataset
from genecorpus.manifest import file_digests, sha256_of_path
from genecorpus.report import write_report
from genecorpus.resume import WorkFolder, code_fingerprint, file_identity, fingerprint, run_recorded, task_key
from genecorpus.qc import (
    DROP_REASONS,
    NO_VOCAB_REASON,
    CellStats,
    DatasetQC,
    QCMoments,
    count_reasons,
    keep_mask,
)
from genecorpus.shards import ColumnSpec, ShardWriter, corpus_schema, publish_folder, publish_shards
from genecorpus.vocab import LAYOUTS, TokenDictionary, load_gene_medians, load_pickled_dict, write_gene_medians

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from genecorpus.io import CellSource

logger = logging.getLogger(__name__)

__all__ = ["BuildResult", "build_corpus", "tokenize"]

_FIXED_COLUMNS = ("dataset_id", "cell_id")
_CORPUS_MARKERS = ("manifest.json", "state.json")
"""Files that make a folder a corpus that ``overwrite`` may replace."""


# --------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class DatasetPlan:
    """What every task needs to know about one dataset (small and picklable)."""

    index: int
    spec: DatasetSpec
    n_cells: int
    n_genes_in: int
    col_to_gene: np.ndarray
    """Input column → index into the gene universe, or -1 (int32)."""
    is_mito_col: np.ndarray
    """Input column is a mitochondrial gene (bool)."""
    gene_summary: dict[str, Any]
    obs_n_counts: bool
    """Depth comes from ``obs["n_counts"]``."""
    filter_column: str | None
    injective: bool
    """No two input columns map to the same gene (nothing to sum)."""
    source: Any = None
    """An in-memory AnnData (Python API only; runs in this process)."""

    def open(self) -> CellSource:
        """Open the dataset for reading."""
        s = self.spec
        target = self.source if self.source is not None else s.path
        return open_dataset(target, format=s.format, layer=s.layer, use_raw=s.use_raw,
                            cells_as_rows=s.cells_as_rows)


@dataclass(frozen=True)
class Context:
    """Settings shared by all tasks of a build."""

    plans: tuple[DatasetPlan, ...]
    n_genes: int
    """Size of the gene universe (candidate genes, or the token dictionary's genes)."""
    block_size: int
    qc: QCParams
    need_window: bool
    """Whether the statistics pass also records each gene's value range (medians are computed)."""


@dataclass(frozen=True)
class Task:
    """Input cells ``start:stop`` of dataset ``dataset``; ``index`` orders tasks and shards."""

    index: int
    dataset: int
    start: int
    stop: int


def _plan_tasks(plans: Sequence[DatasetPlan], shard_cells: int) -> list[Task]:
    tasks: list[Task] = []
    for plan in plans:
        for start in range(0, max(plan.n_cells, 1), shard_cells):
            tasks.append(Task(len(tasks), plan.index, start, min(start + shard_cells, plan.n_cells)))
    return tasks


def _gene_identifiers(source: CellSource, spec: DatasetSpec) -> np.ndarray:
    if spec.gene_column:
        if spec.gene_column not in source.var_columns:
            msg = (f"{source.path}: no var column {spec.gene_column!r}; available: "
                   f"{', '.join(source.var_columns) or 'none'} (or omit gene_column to use the index)")
            raise ConfigError(msg)
        return source.var_column(spec.gene_column)
    if "ensembl_id" in source.var_columns:
        return source.var_column("ensembl_id")
    return source.var_names


def _plan_dataset(index: int, spec: DatasetSpec, source: CellSource, *, universe: np.ndarray,
                  mito: np.ndarray, mapping: dict[str, str] | None, use_obs_n_counts: bool,
                  in_memory: Any = None) -> DatasetPlan:
    ids = _gene_identifiers(source, spec)
    try:
        mapped = genes.map_to_ensembl(ids, kind=spec.gene_id, release=spec.release, mapping=mapping)
    except GenecorpusError as e:
        msg = f"{source.path}: {e}"
        raise type(e)(msg) from None
    col_to_gene = genes.collapse_index(mapped.ensembl_ids, universe)
    is_mito = np.isin(mapped.ensembl_ids, mito)
    n_used = int((col_to_gene >= 0).sum())
    summary = {
        "n_input_genes": len(ids),
        "id_kind": mapped.kind,
        "release": mapped.release,
        "n_unmapped": int(mapped.n_unmapped),
        "n_ambiguous": int(mapped.n_ambiguous),
        "n_columns_in_universe": n_used,
        "n_genes_in_universe": int(np.unique(col_to_gene[col_to_gene >= 0]).shape[0]),
        "n_mito_columns": int(is_mito.sum()),
    }
    if n_used == 0:
        msg = (f"{source.path}: none of its {len(ids)} genes is in the gene universe; check gene_id, "
               f"release or the gene mapping")
        raise InputError(msg)
    obs = set(source.obs_columns)
    missing = [c for c in spec.obs_columns if c not in obs]
    if missing:
        msg = (f"{source.path}: obs column {missing[0]!r} not found; available: "
               f"{', '.join(sorted(obs)) or 'none'}")
        raise ConfigError(msg)
    return DatasetPlan(
        index=index, spec=spec, n_cells=source.n_cells, n_genes_in=len(ids), col_to_gene=col_to_gene,
        is_mito_col=is_mito, gene_summary=summary,
        obs_n_counts=use_obs_n_counts and "n_counts" in obs,
        filter_column=spec.filter_column if spec.filter_column in obs else None,
        injective=bool(np.unique(col_to_gene[col_to_gene >= 0]).shape[0] == n_used),
        source=in_memory,
    )


# ------------------------------------------------------------------------------------ block reading


@dataclass(frozen=True)
class _Block:
    start: int
    cell_ids: np.ndarray
    obs: dict[str, np.ndarray]
    genes: sp.csr_matrix
    """Cells × universe genes, duplicate columns summed (int64 data, int32 indices, unsorted)."""
    stats: CellStats
    depth: np.ndarray
    geneformer: Arithmetic
    """How Geneformer's tokenizer would evaluate the values of this block (used by ``tokenize``)."""


def _read_blocks(ctx: Context, plan: DatasetPlan, task: Task, extra_obs: Sequence[str] = ()) -> Iterator[_Block]:
    """Read a task's cells block by block, mapped to the gene universe, with their statistics."""
    want = list(dict.fromkeys([*extra_obs, *(["n_counts"] if plan.obs_n_counts else []),
                               *([plan.filter_column] if plan.filter_column else [])]))
    source = plan.open()
    try:
        for start in range(task.start, task.stop, ctx.block_size):
            stop = min(start + ctx.block_size, task.stop)
            try:
                block = source.read_block(start, stop, obs_columns=want)
            except GenecorpusError:
                raise
            except (OSError, ValueError, KeyError) as e:
                msg = f"{plan.spec.path}: cannot read cells {start}:{stop} ({e}); the file may be corrupt"
                raise InputError(msg) from None
            x = block.counts
            indptr = x.indptr.astype(np.int64)
            gdata, gidx, gptr, totals, mito = _kernels._collapse_csr(
                x.data, x.indices, indptr, plan.col_to_gene, plan.is_mito_col, ctx.n_genes, plan.injective)
            g = sp.csr_matrix((gdata, gidx, gptr), shape=(x.shape[0], ctx.n_genes))
            if plan.filter_column:
                flags = np.asarray(block.obs[plan.filter_column])
                if flags.dtype.kind not in "biuf":
                    msg = (f"{plan.spec.path}: obs column {plan.filter_column!r} holds {flags.dtype} values "
                           f"(cell {block.cell_ids[0]!r}: {flags[0]!r}); it must be boolean or 0/1 "
                           f"(cells with 1/True are kept)")
                    raise InputError(msg)
                pre = flags == 1  # Geneformer's test: a cell passes when its value equals 1
            else:
                pre = np.ones(x.shape[0], dtype=bool)
            stats = CellStats(totals, mito, np.diff(gptr), pre)
            depth = totals.astype(np.float64)
            depth_dtype = np.dtype(np.int64)
            if plan.obs_n_counts:
                stored = np.asarray(block.obs["n_counts"])
                depth, depth_dtype = stored.astype(np.float64), stored.dtype
                bad = (np.diff(gptr) > 0) & ~(depth > 0)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    msg = (f"{plan.spec.path}: cell {block.cell_ids[i]!r} has obs n_counts "
                           f"{depth[i]} but nonzero counts; fix obs['n_counts'] or drop the column")
                    raise InputError(msg)
            geneformer = Arithmetic.geneformer(value_dtype=block.value_dtype or np.dtype(np.float32),
                                               depth_dtype=depth_dtype, dense=block.dense_input)
            yield _Block(start, block.cell_ids, block.obs, g, stats, depth, geneformer)
    finally:
        source.close()


# ------------------------------------------------------------------------------------------ stages


QC_SAMPLE_CELLS = 20_000
"""At most about this many cells per dataset keep their QC statistics for the report."""


@dataclass
class StatsResult:
    """QC moments, gene value window and a fixed sample of per-cell statistics of one task."""

    moments: QCMoments
    window: medians.GeneWindow
    sample: CellStats | None = None


def _stats_task(ctx: Context, task: Task) -> StatsResult:
    plan = ctx.plans[task.dataset]
    moments = QCMoments()
    window = medians.GeneWindow.empty(ctx.n_genes)
    stride = -(-plan.n_cells // QC_SAMPLE_CELLS)
    samples = []
    for b in _read_blocks(ctx, plan, task):
        moments.add(b.stats, ctx.qc.mito)
        rows = np.flatnonzero((np.arange(b.start, b.start + b.genes.shape[0]) % stride) == 0)
        samples.append(CellStats(*(np.asarray(a)[rows] for a in (
            b.stats.n_counts, b.stats.mito_counts, b.stats.n_genes, b.stats.preselected))))
        if ctx.need_window and plan.spec.use_for_medians:
            window.add(b.genes, b.depth, b.stats.preselected)
    sample = CellStats(*(np.concatenate(parts) for parts in zip(
        *((c.n_counts, c.mito_counts, c.n_genes, c.preselected) for c in samples), strict=True))) if samples else None
    return StatsResult(moments, window, sample)


def _failure_as_result(fn: Callable[..., Any], *args: Any) -> Any:  # noqa: ANN401
    """``fn(*args)``, with an input error returned as a :class:`TaskFailure` (``--on-error skip``)."""
    try:
        return fn(*args)
    except GenecorpusError as e:
        return TaskFailure(str(e))


class _DatasetsFailed(Exception):  # noqa: N818 - control flow, not an error the user sees
    """Datasets (by plan index into ``plans``) whose tasks failed after the QC pass, with ``--on-error skip``."""

    def __init__(self, stage: str, plans: list[DatasetPlan], failed: dict[int, str]) -> None:
        super().__init__(stage)
        self.stage = stage
        self.plans = plans
        self.failed = failed


def _failed_datasets(tasks: Sequence[Task], results: Sequence[Any]) -> dict[int, str]:
    """Dataset → the message of its first failed task, from a stage's results in task order."""
    combine = _Failures(tasks, lambda acc, _: acc)
    for result in results:
        combine(None, result)
    return combine.failed


class _Failures:
    """Wraps a fold's ``combine``: task failures are noted by dataset instead of combined."""

    def __init__(self, tasks: Sequence[Task], combine: Callable[[Any, Any], Any]) -> None:
        self.tasks = tasks
        self.combine = combine
        self.failed: dict[int, str] = {}
        self._next = 0

    def __call__(self, acc: Any, result: Any) -> Any:  # noqa: ANN401
        task = self.tasks[self._next]
        self._next += 1
        if isinstance(result, TaskFailure):
            self.failed.setdefault(task.dataset, result.message)
            return acc
        return self.combine(acc, result)


def _require_some(plans: Sequence[DatasetPlan], skipped: Sequence[dict[str, str]]) -> None:
    if not plans:
        first = skipped[0] if skipped else {"dataset_id": "?", "error": "no datasets"}
        msg = (f"every dataset failed ({len(skipped)} skipped); the first, {first['dataset_id']}: "
               f"{first['error']}")
        raise InputError(msg)


def _histogram_task(ctx: Context, task: Task, qc: DatasetQC, window: medians.GeneWindow,
                    shift: np.ndarray) -> np.ndarray:
    # int32 keeps the table small enough for the CPU cache (a task has far fewer than 2**31 cells)
    hist = np.zeros((ctx.n_genes, medians.N_BINS), dtype=np.int32)
    for b in _read_blocks(ctx, ctx.plans[task.dataset], task):
        medians.histogram_values(b.genes, b.depth, keep_mask(b.stats, qc)[0], window, shift, hist)
    return hist


def _add_into(acc: np.ndarray, part: np.ndarray) -> np.ndarray:
    acc += part
    return acc


def _select_task(ctx: Context, task: Task, qc: DatasetQC, window: medians.GeneWindow,
                 shift: np.ndarray, targets: medians.MedianTargets) -> medians.ValueMultiset:
    selection = medians.ValueSelection(window, shift, targets)
    for b in _read_blocks(ctx, ctx.plans[task.dataset], task):
        selection.add(b.genes, b.depth, keep_mask(b.stats, qc)[0])
    return selection.result()


@dataclass(frozen=True)
class EncodeSettings:
    """What the encoding pass needs besides the context."""

    order: RankOrder
    """The vocabulary's genes (universe indices) in rank positions, with tokens and medians."""
    layout: str
    special: dict[str, int]
    schema: pa.Schema
    metadata: tuple[ColumnSpec, ...]
    geneformer_arithmetic: bool
    """Divide in the dtype Geneformer's NumPy code would use (``tokenize``); float64 otherwise."""


@dataclass
class EncodeResult:
    """What one encoding task wrote."""

    n_in: int
    n_rows: int
    n_tokens: int
    dropped: dict[str, int]
    lengths: np.ndarray
    part: Path


def _encode_task(ctx: Context, task: Task, qc: DatasetQC, enc: EncodeSettings, part: Path) -> EncodeResult:
    plan = ctx.plans[task.dataset]
    layout = LAYOUTS[enc.layout]
    wanted = [c.name for c in enc.metadata if c.name not in _FIXED_COLUMNS and c.name in plan.spec.obs_columns]
    writer = ShardWriter(part, enc.schema)
    dropped = dict.fromkeys(DROP_REASONS, 0)
    lengths_all: list[np.ndarray] = []
    n_in = 0
    try:
        for b in _read_blocks(ctx, plan, task, extra_obs=wanted):
            n_in += b.genes.shape[0]
            keep, reason = keep_mask(b.stats, qc)
            tokens, lengths = rank_value_encode(
                b.genes, depth=b.depth, order=enc.order, keep=keep, max_genes=layout.max_genes,
                arithmetic=b.geneformer if enc.geneformer_arithmetic else SPEC_ARITHMETIC)
            rows = np.flatnonzero(keep)
            lengths = lengths[rows]
            empty = lengths == 0
            reason[rows[empty]] = NO_VOCAB_REASON
            for name, c in count_reasons(reason).items():
                dropped[name] += c
            rows, lengths = rows[~empty], lengths[~empty]
            tokens, lengths = apply_layout(tokens, lengths, layout=layout, special=enc.special)
            columns = {"dataset_id": np.full(rows.shape[0], plan.spec.dataset_id, dtype=object),
                       "cell_id": np.asarray(b.cell_ids, dtype=object)[rows]}
            for c in enc.metadata:
                if c.name in _FIXED_COLUMNS:
                    continue
                if c.name in b.obs:
                    columns[c.name] = _as_column(np.asarray(b.obs[c.name])[rows], c)
                else:
                    columns[c.name] = np.full(rows.shape[0], None, dtype=object)
            writer.write(tokens, lengths, columns)
            lengths_all.append(lengths)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    lengths_arr = np.concatenate(lengths_all) if lengths_all else np.empty(0, np.int64)
    return EncodeResult(n_in, writer.n_rows, int(lengths_arr.sum()), dropped, lengths_arr, part)


def _as_column(values: np.ndarray, col: ColumnSpec) -> np.ndarray:
    if col.type == pa.string():
        return np.array([None if v is None else str(v) for v in values.tolist()], dtype=object)
    return values


def _arrow_type(values: np.ndarray) -> pa.DataType:
    kind = values.dtype.kind
    if kind == "b":
        return pa.bool_()
    if kind in "iu":
        return pa.int64()
    if kind == "f":
        return pa.float64()
    return pa.string()


def _metadata_columns(plans: Sequence[DatasetPlan]) -> tuple[ColumnSpec, ...]:
    types: dict[str, set[pa.DataType]] = {}
    for plan in plans:
        if not plan.spec.obs_columns or plan.n_cells == 0:
            for name in plan.spec.obs_columns:
                types.setdefault(name, set())
            continue
        source = plan.open()
        try:
            sample = source.read_block(0, 1, obs_columns=list(plan.spec.obs_columns)).obs
        finally:
            source.close()
        for name in plan.spec.obs_columns:
            types.setdefault(name, set()).add(_arrow_type(np.asarray(sample[name])))
    cols = [ColumnSpec("dataset_id", pa.string()), ColumnSpec("cell_id", pa.string())]
    for name, kinds in types.items():
        if name in _FIXED_COLUMNS:
            continue
        if len(kinds) == 1:
            (t,) = kinds
        elif kinds and kinds <= {pa.int64(), pa.float64()}:
            t = pa.float64()
        else:
            t = pa.string()
        cols.append(ColumnSpec(name, t))
    return tuple(cols)


# ------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildResult:
    """Where the corpus is and what is in it."""

    path: Path
    n_cells: int
    n_tokens: int
    n_shards: int
    manifest: dict[str, Any] = field(repr=False)


class _InputDigests:
    """sha256 of the input files, computed in one background thread while the stages run.

    ``on_done(path, sha256, identity)`` is called from that thread as each digest is ready, with the
    file's size and modification time taken before hashing (see :class:`~genecorpus.resume.WorkFolder`).
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
        """Digest and size of one of the paths (waits for it)."""
        return self._futures[path].result()

    def close(self) -> None:
        """Stop hashing (an unfinished digest is abandoned)."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("genecorpus", "numpy", "scipy", "numba", "pyarrow", "anndata", "h5py", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _check_out(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        msg = f"{out}: is a file, not a corpus folder; choose another --out"
        raise ConfigError(msg)
    if out.exists() and not overwrite:
        msg = f"{out}: already exists; choose another --out or pass --overwrite"
        raise ConfigError(msg)
    # --overwrite replaces a corpus, never a folder of other files given as --out by mistake
    if out.exists() and any(out.iterdir()) and not any((out / n).is_file() for n in _CORPUS_MARKERS):
        msg = (f"{out}: is not a corpus folder (no {' or '.join(_CORPUS_MARKERS)}), so --overwrite "
               "does not replace it; choose another --out")
        raise ConfigError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)


def _finished_build(config: BuildConfig, mode: str, out: Path, *, overwrite: bool) -> BuildResult | None:
    """For ``--resume`` when ``out`` exists and nothing is unfinished: its result if it is up to date.

    Up to date means built by the same command (mode and every parameter) from inputs with the same
    sha256. Otherwise returns None with ``overwrite`` (build again) and raises without it.
    """
    try:
        manifest = json.loads((out / "manifest.json").read_text())
        built = manifest["parameters"], manifest["mode"], manifest["datasets"]
    except (OSError, ValueError, KeyError, TypeError):
        built = None
    why = "is not a corpus built by genecorpus"
    if built is not None:
        params, built_mode, datasets = built
        why = "was built with other settings"
        if built_mode == mode and params == json.loads(json.dumps(config.model_dump(mode="json"))):
            changed = [d["path"] for d in datasets if not Path(d["path"]).exists()
                       or sha256_of_path(Path(d["path"]))[0] != d["sha256"]]
            if not changed:
                logging.getLogger("genecorpus.resume").info("%s is complete and up to date: nothing to resume", out)
                return BuildResult(out, manifest["corpus"]["n_cells"], manifest["corpus"]["n_tokens"],
                                   len(manifest["corpus"]["shards"]), manifest)
            why = f"was built from inputs that have changed since ({changed[0]})"
    if overwrite:
        return None
    msg = (f"{out}: already exists and {why}; there is no unfinished build to resume; pass --overwrite to "
           "build it again")
    raise ConfigError(msg)


def _require_cells(manifest: dict[str, Any], *, max_datasets: int = 5) -> None:
    """Refuse a corpus without cells, saying per dataset where its cells went."""
    if manifest["corpus"]["n_cells"]:
        return
    parts = []
    for d in manifest["datasets"][:max_datasets]:
        cells = d["cells"]
        dropped = ", ".join(f"{n} by {reason}" for reason, n in cells["dropped"].items() if n)
        parts.append(f"{d['path']}: " + (f"{cells['in']} cells, dropped {dropped}" if cells["in"]
                                          else "0 cells in the input"))
    more = len(manifest["datasets"]) - max_datasets
    listed = "; ".join(parts) + (f"; and {more} more datasets" if more > 0 else "")
    msg = (f"no cell is left for the corpus ({listed}); check the input files, their filter_pass "
           "column, the QC settings and the gene ids")
    raise InputError(msg)


def build_corpus(
    config: BuildConfig,
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    mode: str = "build",
    overwrite: bool = False,
    executor: Executor | None = None,
    sources: Sequence[Any] = (),
    report: bool = True,
    on_error: str = "fail",
    resume: bool = False,
) -> BuildResult:
    """Build a corpus folder from the datasets of ``config`` (SPEC §2.1–§2.8).

    Parameters
    ----------
    config
        Datasets and settings; see :class:`~genecorpus.config.BuildConfig`.
    out
        The corpus folder to create; written to a temporary sibling and renamed when complete.
    workers
        Local worker processes (output is identical for any number).
    mode
        ``"build"`` (QC, medians computed unless given) or ``"tokenize"`` (given dictionaries, no QC
        beyond ``filter_pass`` and empty cells).
    overwrite
        Replace an existing corpus ``out`` (never a file or a folder that is not a corpus).
    executor
        Run tasks through this executor instead of a :class:`LocalExecutor`.
    sources
        In-memory ``AnnData`` objects matching ``config.datasets`` by position (Python API).
    report
        Write ``report/index.html`` with its plots (SPEC §2.8).
    on_error
        ``"fail"``: the first dataset that cannot be read stops the build, nothing is published.
        ``"skip"``: a dataset that fails while it is planned or read for QC statistics is left out (the
        corpus is then exactly the build without it) and listed under ``skipped`` in the manifest;
        errors in later passes still stop the build.

    Returns
    -------
    BuildResult with the folder, cell, token and shard counts and the manifest dict.

    Raises
    ------
    GenecorpusError
        On bad input or settings (one-line message naming the file and the item), including a
        corpus left without any cell; ``out`` is then untouched and no temporary folder remains
        (unless ``resume`` asked to keep finished tasks).
    resume
        Continue the unfinished build of ``out`` that a killed or failed run left in
        ``.<out>.incomplete`` (see :mod:`genecorpus.resume`): finished tasks whose inputs and settings
        are unchanged are reused, the rest is redone, and the output is byte-identical to an
        uninterrupted build. If this run fails too, its finished tasks are kept for the next
        ``resume``. If ``out`` is complete and up to date, it is returned as it is.
    """
    out = Path(out)
    in_memory = any(s is not None for s in sources)
    if on_error not in ("fail", "skip"):
        msg = f"on_error must be 'fail' or 'skip', not {on_error!r}"
        raise ConfigError(msg)
    if resume and in_memory:
        msg = "resume needs datasets read from files, not in-memory AnnData objects"
        raise ConfigError(msg)
    if resume and out.is_dir() and not WorkFolder.unfinished(out):
        finished = _finished_build(config, mode, out, overwrite=overwrite)
        if finished is not None:
            WorkFolder(out).discard_leftover()
            return finished
    _check_out(out, overwrite=overwrite)
    work = WorkFolder(out, records=not in_memory)
    work.open(resume=resume, overwrite=overwrite)
    own_executor = executor is None
    if in_memory and workers > 1:
        workers = 1  # in-memory objects are not sent to other processes
    try:
        executor = executor or LocalExecutor(workers)
        executor.start(["genecorpus.build"])  # workers import while the driver plans
        manifest = _run(config, work, executor=executor, mode=mode, sources=sources, skip=on_error == "skip")
        _require_cells(manifest)
        (work.corpus / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if report:
            write_report(work.corpus)
        publish_folder(work.corpus, out)
        work.remove()
    except BaseException as e:
        n = work.n_finished()
        if (resume or isinstance(e, KeyboardInterrupt)) and n:
            work.release()
            logger.warning("%d finished tasks are kept in %s; rerun with --resume to continue", n, work.path)
        else:
            work.remove()
        raise
    finally:
        if own_executor and executor is not None:
            executor.close()
    return BuildResult(out, manifest["corpus"]["n_cells"], manifest["corpus"]["n_tokens"],
                       len(manifest["corpus"]["shards"]), manifest)


def _load_dictionaries(config: BuildConfig, mode: str) -> tuple[TokenDictionary | None, dict[str, float] | None, dict[str, str] | None]:
    token_dict = TokenDictionary.load(config.token_dictionary) if config.token_dictionary else None
    given_medians = load_gene_medians(config.gene_medians) if config.gene_medians else None
    mapping = None
    if config.gene_mapping:
        raw = load_pickled_dict(config.gene_mapping)
        bad = [k for k, v in raw.items() if not isinstance(v, str)]
        if bad:
            msg = f"{config.gene_mapping}: value of {bad[0]!r} is not an Ensembl ID string; give an ensembl_mapping_dict"
            raise DictionaryError(msg)
        mapping = {str(k): str(v) for k, v in raw.items()}
    if mode == "tokenize" and (token_dict is None or given_medians is None):
        msg = "tokenize needs --token-dictionary and --gene-medians (e.g. Geneformer's gc30M or gc104M files)"
        raise ConfigError(msg)
    if token_dict is not None:
        layout = LAYOUTS[config.layout]
        missing = [t for t in layout.special_tokens if t not in token_dict.special]
        if missing:
            msg = (f"{config.token_dictionary}: has no {missing[0]} token, which layout {config.layout} "
                   f"needs; use --layout {token_dict.layout().name} or another dictionary")
            raise DictionaryError(msg)
    return token_dict, given_medians, mapping


class _Timings(dict[str, float]):
    """Wall-clock seconds per stage, for the manifest (``timings``) and the benchmarks."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 3)


def _run(config: BuildConfig, work: WorkFolder, *, executor: Executor, mode: str, sources: Sequence[Any],
         skip: bool) -> dict[str, Any]:
    timings = _Timings()
    started = time.perf_counter()
    token_dict, given_medians, mapping = _load_dictionaries(config, mode)
    qc_params = config.qc if mode == "build" else QCParams(enabled=False)

    if mode == "tokenize":
        assert token_dict is not None and given_medians is not None
        universe = token_dict.gene_ids
        mito = np.empty(0, dtype=object)
    else:
        try:
            universe = genes.candidate_genes(config.reference)
        except GenecorpusError as e:
            msg = f"reference: {e}; fix reference in the manifest"
            raise ConfigError(msg) from None
        mito = genes.mito_genes(config.reference)

    plans: list[DatasetPlan] = []
    skipped: list[dict[str, str]] = []
    for i, spec in enumerate(config.datasets):
        in_memory = sources[i] if i < len(sources) else None  # None: read spec.path
        try:
            source = open_dataset(in_memory if in_memory is not None else spec.path, format=spec.format,
                                  layer=spec.layer, use_raw=spec.use_raw, cells_as_rows=spec.cells_as_rows)
            try:
                plans.append(_plan_dataset(len(plans), spec, source, universe=universe, mito=mito,
                                           mapping=mapping, use_obs_n_counts=config.use_obs_n_counts,
                                           in_memory=in_memory))
            finally:
                source.close()
        except GenecorpusError as e:
            if not skip:
                raise
            logger.warning("skipping %s: %s", spec.dataset_id, e)
            skipped.append({"dataset_id": spec.dataset_id, "path": spec.path, "stage": "plan", "error": str(e)})
    _require_some(plans, skipped)
    paths = [Path(p.spec.path) for p in plans if p.source is None]
    digests = _InputDigests(paths, on_done=work.record_digest if work.records else None)
    try:
        keys = _KeyMaker(work, work.input_tokens(paths, digests.get) if work.records else {},
                         fingerprint("qc", mode, len(universe), qc_params, universe, QC_SAMPLE_CELLS))
        while True:
            try:
                return _run_stages(config, work, executor=executor, mode=mode, plans=plans, universe=universe,
                                   token_dict=token_dict, given_medians=given_medians, qc_params=qc_params,
                                   digests=digests, timings=timings, started=started, skip=skip,
                                   skipped=skipped, keys=keys)
            except _DatasetsFailed as e:  # run again without them: their results change the medians
                plans = _without_failed(e.plans, e.failed, e.stage, skipped)
    finally:
        digests.close()


def _without_failed(plans: Sequence[DatasetPlan], failed: dict[int, str], stage: str,
                    skipped: list[dict[str, str]]) -> list[DatasetPlan]:
    """``plans`` without the failed datasets (noted in ``skipped``), numbered again."""
    for index, message in sorted(failed.items()):
        spec = plans[index].spec
        logger.warning("skipping %s: %s", spec.dataset_id, message)
        skipped.append({"dataset_id": spec.dataset_id, "path": spec.path, "stage": stage, "error": message})
    kept = [dataclasses.replace(p, index=j) for j, p in enumerate(p for p in plans if p.index not in failed)]
    _require_some(kept, skipped)
    return kept


class _KeyMaker:
    """Task records of a build: each task's key components (see :mod:`genecorpus.resume`)."""

    def __init__(self, work: WorkFolder, tokens: dict[Path, str], qc_settings: str) -> None:
        self.work = work
        self.tokens = tokens
        self.qc_settings = qc_settings
        self._plans: dict[int, tuple[DatasetPlan, str]] = {}
        """id → (plan, fingerprint); the plan is kept so that its id cannot be reused by another object."""

    def _plan(self, plan: DatasetPlan) -> str:
        if id(plan) not in self._plans:
            self._plans[id(plan)] = (plan, fingerprint(
                {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan) if f.name not in ("index", "source")}))
        return self._plans[id(plan)][1]

    def components(self, plans: Sequence[DatasetPlan], task: Task, settings: str,
                   upstream: str | None = None) -> tuple[str, dict[str, str]]:
        """The task's slot (for messages) and key components."""
        plan = plans[task.dataset]
        comps = {"code": code_fingerprint(), "input": self.tokens.get(Path(plan.spec.path), "in-memory"),
                 "dataset": self._plan(plan), "cells": f"{task.start}:{task.stop}", "settings": settings}
        if upstream is not None:
            comps["upstream"] = upstream
        return f"{plan.spec.path}[{task.start}:{task.stop}]", comps

    def records(self, stage: str, plans: Sequence[DatasetPlan], tasks: Sequence[Task],
                settings: Callable[[Task], str], upstream: Sequence[str] | None = None,
                ) -> tuple[list[Path | None], list[str]]:
        """Record paths and keys of a stage's tasks."""
        entries = [self.components(plans, t, settings(t), upstream[i] if upstream else None)
                   for i, t in enumerate(tasks)]
        records = self.work.plan_stage(stage, entries)
        return records, [task_key(c) for _, c in entries]


def _recorded(records: Sequence[Path | None], fn: Callable[..., Any], args: Sequence[tuple[Any, ...]], *,
              skip: bool, outputs: Sequence[tuple[Path, ...]] | None = None) -> list[tuple[Any, ...]]:
    """Task argument tuples for :func:`~genecorpus.resume.run_recorded` around ``fn``."""
    inner = [(_failure_as_result, fn, *a) if skip else (fn, *a) for a in args]
    outs = outputs if outputs is not None else [()] * len(args)
    return [(r, o, *a) for r, o, a in zip(records, outs, inner, strict=True)]


def _run_stages(config: BuildConfig, work: WorkFolder, *, executor: Executor, mode: str, plans: list[DatasetPlan],
                universe: np.ndarray, token_dict: TokenDictionary | None, given_medians: dict[str, float] | None,
                qc_params: QCParams, digests: _InputDigests, timings: _Timings, started: float,
                skip: bool, skipped: list[dict[str, str]], keys: _KeyMaker) -> dict[str, Any]:
    tmp = work.corpus
    layout = LAYOUTS[config.layout]
    need_medians = given_medians is None
    ctx = Context(tuple(plans), len(universe), config.block_size, qc_params, need_medians)
    tasks = _plan_tasks(plans, config.shard_cells)
    logger.info("%d datasets, %d cells, %d tasks", len(plans), sum(p.n_cells for p in plans), len(tasks))

    # QC statistics and value windows
    qc_keys: list[str] | None = None
    if qc_params.enabled or need_medians:
        records, qc_keys = keys.records("qc", plans, tasks, lambda _: keys.qc_settings)
        with timings.stage("qc"):
            stats = executor.map("qc", run_recorded,
                                 _recorded(records, _stats_task, [(ctx, t) for t in tasks], skip=skip))
        failed = _failed_datasets(tasks, stats)
        if failed:  # leave those datasets out: the rest is planned again as if they had not been listed
            kept = [(s, k) for t, s, k in zip(tasks, stats, qc_keys, strict=True) if t.dataset not in failed]
            stats, qc_keys = [s for s, _ in kept], [k for _, k in kept]
            plans = _without_failed(plans, failed, "qc", skipped)
            ctx = Context(tuple(plans), len(universe), config.block_size, qc_params, need_medians)
            tasks = _plan_tasks(plans, config.shard_cells)
    else:
        stats = [StatsResult(QCMoments(), medians.GeneWindow.empty(0)) for _ in tasks]
    dataset_qc: list[DatasetQC] = []
    for plan in plans:
        moments = QCMoments()
        for t, s in zip(tasks, stats, strict=True):
            if t.dataset == plan.index:
                moments.merge(s.moments)
        dataset_qc.append(DatasetQC.from_moments(moments, qc_params, has_mito=bool(plan.is_mito_col.any())))

    _write_qc_sample(tmp / "report" / "qc_sample.npz", tasks, stats, dataset_qc, qc_params.mito)

    # medians over the universe
    if need_medians:
        window = medians.GeneWindow.empty(len(universe))
        for s in stats:
            window.merge(s.window)
        shift = window.shifts()
        med_tasks = [t for t in tasks if plans[t.dataset].spec.use_for_medians]
        assert qc_keys is not None
        upstream = [qc_keys[t.index] for t in med_tasks]
        # partial results are folded in task order as they arrive: memory does not grow with the tasks
        shared = fingerprint("histogram", window, shift)
        records, _ = keys.records("histogram", plans, med_tasks,
                                  lambda t: fingerprint(shared, dataset_qc[t.dataset]), upstream)
        with timings.stage("medians_histogram"):
            combine = _Failures(med_tasks, _add_into)
            hist = fold(executor, "medians (histogram)", run_recorded, _recorded(
                records, _histogram_task, [(ctx, t, dataset_qc[t.dataset], window, shift) for t in med_tasks],
                skip=skip), combine, np.zeros((len(universe), medians.N_BINS), dtype=np.int64))
        if combine.failed:
            raise _DatasetsFailed("medians", plans, combine.failed)
        targets = medians.MedianTargets.from_histogram(hist)
        shared = fingerprint("selection", window, shift, targets)
        records, _ = keys.records("selection", plans, med_tasks,
                                  lambda t: fingerprint(shared, dataset_qc[t.dataset]), upstream)
        with timings.stage("medians_selection"):
            combine = _Failures(med_tasks, medians.ValueMultiset.merge)
            values = fold(executor, "medians (selection)", run_recorded, _recorded(
                records, _select_task,
                [(ctx, t, dataset_qc[t.dataset], window, shift, targets) for t in med_tasks], skip=skip),
                combine, medians.ValueMultiset.empty(len(universe)))
            if combine.failed:
                raise _DatasetsFailed("medians", plans, combine.failed)
            gene_median = medians.select_medians(targets, values)
            del values
        provenance: dict[str, Any] = {
            "source": "computed",
            "method": "exact nonzero median of count / n_counts * 10000 (float64), radix selection",
            "datasets": [p.spec.dataset_id for p in plans if p.spec.use_for_medians],
            "n_detected_genes": int(np.isfinite(gene_median).sum()),
        }
    else:
        assert given_medians is not None
        gene_median = np.array([given_medians.get(g, np.nan) for g in universe.tolist()], dtype=np.float64)
        provenance = {"source": str(config.gene_medians), "sha256": sha256_of_path(Path(config.gene_medians))[0]}
        if mode == "tokenize":
            missing = np.flatnonzero(np.isnan(gene_median))
            if missing.size:
                msg = (f"{config.gene_medians}: no median for {missing.size} genes of the token dictionary "
                       f"(e.g. {universe[missing[0]]}); give the matching gene_median_dictionary")
                raise DictionaryError(msg)

    # vocabulary and tokens
    if token_dict is None:
        vocab = universe[np.isfinite(gene_median)]
        token_dict = TokenDictionary.from_genes(vocab, layout)
    pos = {g: t for g, t in zip(token_dict.gene_ids.tolist(), token_dict.gene_tokens.tolist(), strict=True)}
    tokens = np.array([pos.get(g, -1) for g in universe.tolist()], dtype=np.int32)
    in_vocab = (tokens >= 0) & np.isfinite(gene_median)
    if np.any(np.diff(tokens[in_vocab]) <= 0):
        msg = (f"{config.token_dictionary}: gene ids are not in ascending Ensembl-ID order, which the tie "
               "rule of the rank value encoding needs; give a dictionary in that order (Geneformer's are)")
        raise DictionaryError(msg)
    enc_medians = np.where(in_vocab, gene_median, 0.0)

    # encode and write
    metadata = _metadata_columns(plans)
    token_type = pa.int16() if token_dict.max_token <= np.iinfo(np.int16).max else pa.int32()
    schema = corpus_schema(token_type, metadata)
    enc = EncodeSettings(RankOrder.from_genes(enc_medians, tokens), layout.name, token_dict.special, schema, metadata,
                         geneformer_arithmetic=mode == "tokenize")
    shared = fingerprint("encode", enc)
    records, enc_keys = keys.records("encode", plans, tasks, lambda t: fingerprint(shared, dataset_qc[t.dataset]),
                                     qc_keys)
    parts = [work.part(k) for k in enc_keys]
    with timings.stage("encode"):
        results: list[EncodeResult] = executor.map("encode", run_recorded, _recorded(
            records, _encode_task, [(ctx, t, dataset_qc[t.dataset], enc, part) for t, part in zip(tasks, parts, strict=True)],
            skip=skip, outputs=[(part,) for part in parts]))
    failed = _failed_datasets(tasks, results)
    if failed:
        raise _DatasetsFailed("encode", plans, failed)
    vocab_genes = universe[in_vocab]
    # everything that determines the bytes; the block size does not
    hf_fingerprint = json.dumps([config.model_dump(mode="json", exclude={"block_size"}), mode], sort_keys=True)
    shard_names = publish_shards(tmp, [(r.part, r.n_rows) for r in results], schema, hf_fingerprint,
                                 journal=work.journal_publish)

    token_dict_out = TokenDictionary(
        np.array(list(token_dict.gene_ids), dtype=object), token_dict.gene_tokens, token_dict.special)
    token_dict_out.save(tmp / "token_dictionary.pkl")
    write_gene_medians({g: float(m) for g, m in zip(vocab_genes.tolist(), gene_median[in_vocab].tolist(), strict=True)},
                       tmp / "gene_medians.tsv", tmp / "gene_medians.pkl")
    lengths = np.concatenate([r.lengths for r in results]) if results else np.empty(0, np.int64)
    with (tmp / "lengths.pkl").open("wb") as fh:
        pickle.dump(lengths.tolist(), fh, protocol=4)

    manifest = _manifest(config, mode, plans, tasks, dataset_qc, results, provenance, shard_names,
                         token_dict, vocab_genes, lengths, [c.name for c in metadata], digests)
    manifest["skipped"] = skipped
    manifest["files"] = file_digests(tmp)
    timings["total"] = round(time.perf_counter() - started, 3)
    manifest["timings"] = dict(timings)
    return manifest


def _write_qc_sample(path: Path, tasks: Sequence[Task], stats: Sequence[StatsResult],
                     dataset_qc: Sequence[DatasetQC], mito_mode: str) -> None:
    """Per-cell QC statistics of a fixed sample of cells, with their QC verdict, for the report."""
    parts = [(t.dataset, s.sample) for t, s in zip(tasks, stats, strict=True) if s.sample is not None]
    if not parts:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons = [keep_mask(sample, dataset_qc[d])[1] for d, sample in parts]
    np.savez_compressed(
        path,
        dataset=np.concatenate([np.full(len(s.n_counts), d, dtype=np.int32) for d, s in parts]),
        n_counts=np.concatenate([s.n_counts for _, s in parts]),
        mito=np.concatenate([s.mito_values(mito_mode).astype(np.float64) for _, s in parts]),
        n_genes=np.concatenate([s.n_genes for _, s in parts]),
        reason=np.concatenate(reasons),
    )


def _manifest(config: BuildConfig, mode: str, plans: Sequence[DatasetPlan], tasks: Sequence[Task],
              dataset_qc: Sequence[DatasetQC], results: Sequence[EncodeResult], provenance: dict[str, Any],
              shard_names: list[str], token_dict: TokenDictionary, vocab_genes: np.ndarray,
              lengths: np.ndarray, columns: list[str], digests: _InputDigests) -> dict[str, Any]:
    datasets = []
    for plan in plans:
        rs = [r for t, r in zip(tasks, results, strict=True) if t.dataset == plan.index]
        dropped = {name: sum(r.dropped[name] for r in rs) for name in DROP_REASONS}
        n_in = sum(r.n_in for r in rs)
        kept = sum(r.n_rows for r in rs)
        if n_in != kept + sum(dropped.values()) or n_in != plan.n_cells:
            msg = f"internal accounting error for {plan.spec.path}: {n_in} in, {kept} kept, {dropped}"
            raise RuntimeError(msg)
        path = Path(plan.spec.path)
        digest, size = digests.get(path) if plan.source is None else ("in-memory", 0)
        datasets.append({
            "dataset_id": plan.spec.dataset_id,
            "path": plan.spec.path if plan.source is None else "<AnnData>",
            "sha256": digest,
            "bytes": size,
            "spec": plan.spec.model_dump(mode="json"),
            "genes": plan.gene_summary,
            "depth": "obs n_counts" if plan.obs_n_counts else "sum of counts over all input genes",
            "filter_column": plan.filter_column,
            "qc": dataset_qc[plan.index].to_json(),
            "cells": {"in": n_in, "kept": kept, "dropped": dropped},
        })
    return {
        "format": "genecorpus/1",
        "mode": mode,
        "parameters": config.model_dump(mode="json"),
        "versions": _versions(),
        "datasets": datasets,
        "medians": provenance,
        "vocabulary": {"n_genes": int(len(vocab_genes)), "n_tokens": len(token_dict.to_mapping()),
                       "special_tokens": token_dict.special},
        "corpus": {
            "n_cells": int(lengths.shape[0]),
            "n_tokens": int(lengths.sum()),
            "layout": config.layout,
            "shards": shard_names,
            "columns": ["input_ids", *columns, "length"],
        },
    }


def tokenize(
    inputs: Sequence[str | os.PathLike[str] | Any],
    out: str | os.PathLike[str],
    *,
    token_dictionary: str | os.PathLike[str],
    gene_medians: str | os.PathLike[str],
    gene_mapping: str | os.PathLike[str] | None = None,
    layout: str | None = None,
    obs_columns: Sequence[str] = (),
    gene_id: str = "auto",
    workers: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    overwrite: bool = False,
    executor: Executor | None = None,
    report: bool = True,
    on_error: str = "fail",
    resume: bool = False,
) -> BuildResult:
    """Tokenize datasets with given dictionaries, as Geneformer's ``TranscriptomeTokenizer`` does.

    No QC beyond the ``filter_pass`` column and cells without vocabulary genes (SPEC §3).

    Parameters
    ----------
    inputs
        Paths (h5ad, loom, 10x folder or .h5, CSV/TSV) or in-memory ``anndata.AnnData`` objects.
    out
        The corpus folder to create.
    token_dictionary, gene_medians, gene_mapping
        Geneformer dictionaries (``token_dictionary*.pkl``, ``gene_median_dictionary*.pkl`` or our TSV,
        optional ``ensembl_mapping_dict*.pkl``).
    layout
        ``"gc30m"`` or ``"gc104m"``; by default the one the token dictionary was made for.
    obs_columns
        Per-cell metadata columns to copy.
    gene_id
        ``"auto"``, ``"ensembl"`` or ``"symbol"``.
    workers, block_size, overwrite, executor, report, on_error, resume
        As for :func:`build_corpus`.

    Returns
    -------
    BuildResult
    """
    if layout is None:
        layout = TokenDictionary.load(token_dictionary).layout().name
    specs, sources = [], []
    try:
        for i, item in enumerate(inputs):
            if isinstance(item, str | os.PathLike):
                specs.append(DatasetSpec(path=str(item), gene_id=gene_id, obs_columns=tuple(obs_columns)))
                sources.append(None)
            else:
                specs.append(DatasetSpec(path=f"<AnnData {i}>", id=f"anndata-{i}", gene_id=gene_id,
                                         obs_columns=tuple(obs_columns)))
                sources.append(item)
        ids = [s.dataset_id for s in specs]
        if len(set(ids)) != len(ids):
            specs = [s.model_copy(update={"id": f"{i}-{s.dataset_id}"}) for i, s in enumerate(specs)]
        config = BuildConfig(
            datasets=tuple(specs), layout=layout, block_size=block_size,
            token_dictionary=str(token_dictionary), gene_medians=str(gene_medians),
            gene_mapping=str(gene_mapping) if gene_mapping else None,
        )
    except ValidationError as e:
        msg = f"invalid tokenize settings: {describe_validation_error(e)}"
        raise ConfigError(msg) from None
    return build_corpus(config, out, workers=workers, mode="tokenize", overwrite=overwrite,
                        executor=executor, sources=sources if any(s is not None for s in sources) else (),
                        report=report, on_error=on_error, resume=resume)
