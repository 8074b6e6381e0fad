"""The corpus builder: plan → QC → medians → encode → publish.

:func:`build_corpus` is the driver; each stage is a call into the module that owns it, run as tasks
through an :class:`~genecorpus.executors.Executor`:

=========== ===================================================== ====================================
stage       what it does                                           owner
=========== ===================================================== ====================================
plan        open every dataset, map its genes onto the universe   :func:`genecorpus.dataset.plan_dataset`
qc          moments, thresholds, value windows, the QC sample     :func:`genecorpus.qc.qc_task`
medians     histogram pass, selection pass, exact medians         :mod:`genecorpus.medians`
encode      rank value encoding into one Arrow part per task      :func:`genecorpus.encode.encode_task`
publish     shards, dictionaries, lengths, manifest, report       :mod:`genecorpus.corpus`
=========== ===================================================== ====================================

A task is a range of at most :attr:`BuildConfig.shard_cells` input cells of one dataset; it reopens its
file from the plan and reads it in blocks of :attr:`BuildConfig.block_size` cells. Results are merged in
task order, and every finished task is recorded (:mod:`genecorpus.resume`), so neither the block size,
the number of workers nor an interruption changes a byte of the output. With ``on_error="skip"`` a dataset
whose task fails is dropped (:meth:`_Build.drop_failed`) and the stages run again without it, reusing
every recorded task: the corpus is then exactly the corpus built without that dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from pydantic import ValidationError

from genecorpus import genes, medians
from genecorpus.config import BuildConfig, DatasetSpec, GeneIdKind, Mode, OnError, QCParams, describe_validation_error
from genecorpus.corpus.folder import (
    CORPUS_MARKERS,
    MANIFEST,
    QC_SAMPLE,
    REPORT_DIR,
    file_digests,
    is_corpus_folder,
    sha256_of_path,
    write_dictionaries,
    write_lengths,
)
from genecorpus.corpus.manifest import (
    DROP_REASONS,
    CellCounts,
    ComputedMedians,
    CorpusSummary,
    DatasetRecord,
    DuplicatesSummary,
    GivenMedians,
    Manifest,
    SharedCells,
    SkippedDataset,
    SomaInput,
    Stage,
    VocabularySummary,
    package_versions,
)
from genecorpus.corpus.shards import corpus_schema, publish_folder, publish_shards
from genecorpus.dataset import CellRange, CellStats, DatasetPlan, plan_dataset, split_cells, split_dataset
from genecorpus.duplicates import (
    RULE,
    Candidates,
    CandidateSettings,
    CellsRead,
    VerifySettings,
    candidate_task,
    cell_files,
    cells_task,
    duplicate_groups,
    gene_groups,
    sketch_path,
    verify_task,
)
from genecorpus.encode import EncodeResult, EncodeSettings, RankOrder, encode_task, metadata_columns
from genecorpus.errors import (
    ConfigError,
    DictionaryError,
    GenecorpusError,
    InputError,
    ResourceError,
    TaskFailure,
    WorkerLostError,
    environment_fault,
    is_environment_fault,
)
from genecorpus.executors import Executor, LocalExecutor, fold
from genecorpus.io import DEFAULT_BLOCK_SIZE
from genecorpus.io.soma import ExperimentIdentity, experiment_identity
from genecorpus.qc import (
    QC_SAMPLE_CELLS,
    DatasetQC,
    QCMoments,
    QCPassSettings,
    QCTaskResult,
    dataset_thresholds,
    qc_sample,
    qc_task,
)
from genecorpus.report import write_report
from genecorpus.resume import (
    InputDigests,
    TaskKeys,
    WorkFolder,
    code_fingerprint,
    file_identity,
    fingerprint,
    run_recorded,
)
from genecorpus.vocab import LAYOUTS, LayoutName, TokenDictionary, load_gene_medians, load_pickled_dict

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

logger = logging.getLogger(__name__)

__all__ = ["BuildResult", "build_corpus", "tokenize"]


@dataclass(frozen=True)
class BuildResult:
    """Where the corpus is and what is in it."""

    path: Path
    manifest: Manifest = field(repr=False)

    @property
    def n_cells(self) -> int:
        """Cells in the corpus."""
        return self.manifest.corpus.n_cells

    @property
    def n_tokens(self) -> int:
        """Tokens in the corpus (special tokens included)."""
        return self.manifest.corpus.n_tokens

    @property
    def n_shards(self) -> int:
        """Shard files."""
        return len(self.manifest.corpus.shards)


# ---------------------------------------------------------------------------------------- the driver


def build_corpus(
    config: BuildConfig,
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    mode: Mode = "build",
    overwrite: bool = False,
    executor: Executor | None = None,
    sources: Sequence[Any] = (),
    report: bool = True,
    on_error: OnError = "fail",
    resume: bool = False,
) -> BuildResult:
    """Build a corpus folder from the datasets of ``config`` (SPEC §2.1–§2.8).

    Parameters
    ----------
    config
        Datasets and settings; see :class:`~genecorpus.config.BuildConfig`.
    out
        The corpus folder to create; assembled in ``.<out>.incomplete`` and renamed when complete.
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
        ``"skip"``: a dataset that fails in any pass is left out (the corpus is then exactly the build
        without it) and listed under ``skipped`` in the manifest.
    resume
        Continue the unfinished build of ``out`` that a killed or failed run left in
        ``.<out>.incomplete`` (see :mod:`genecorpus.resume`): finished tasks whose inputs and settings
        are unchanged are reused, the rest is redone, and the output is byte-identical to an
        uninterrupted build. If this run fails too, its finished tasks are kept for the next
        ``resume``. If ``out`` is complete and up to date, it is returned as it is.

    Returns
    -------
    BuildResult
        The folder and its :class:`~genecorpus.corpus.manifest.Manifest`.

    Raises
    ------
    GenecorpusError
        On bad input or settings (one-line message naming the file and the item), including a
        corpus left without any cell; ``out`` is then untouched and no temporary folder remains
        (unless ``resume`` asked to keep finished tasks).
    """
    out = Path(out)
    in_memory = any(s is not None for s in sources)
    if on_error not in ("fail", "skip"):
        msg = f"on_error must be 'fail' or 'skip', not {on_error!r}"
        raise ConfigError(msg)
    if mode not in ("build", "tokenize"):
        msg = f"mode must be 'build' or 'tokenize', not {mode!r}"
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
        manifest = _Build.start(config, mode, work, executor, sources, skip=on_error == "skip").run()
        _require_cells(manifest)
        manifest.write(work.corpus / MANIFEST)
        if report:
            write_report(work.corpus)
        publish_folder(work.corpus, out)
        work.remove()
    except BaseException as e:
        _fail_build(e, work, out, resume=resume)
        raise
    finally:
        if own_executor and executor is not None:
            executor.close()
    return BuildResult(out, manifest)


def _fail_build(e: BaseException, work: WorkFolder, out: Path, *, resume: bool) -> None:
    """Keep the finished tasks when the build may be resumed, and raise a machine fault as one line.

    Bad input removes the work folder (nothing half-written remains) unless ``resume`` asked to keep it;
    a fault of the machine (full disk, unwritable folder, killed workers, Ctrl-C) keeps it, since rerunning
    with ``--resume`` after fixing the machine continues where the build stopped.
    """
    fault = is_environment_fault(e)
    n = work.n_finished()
    kept = ""
    if n and (resume or fault):
        work.release()
        kept = f"{n} finished tasks are kept in {work.path}: rerun with --resume to continue"
    else:
        work.remove()
    if isinstance(e, KeyboardInterrupt):
        if kept:
            e.add_note(kept)
        return
    if isinstance(e, WorkerLostError):
        raise WorkerLostError(f"{e}; {kept}" if kept else str(e)) from e.__cause__
    if fault:
        line = environment_fault(e, where=work.path, doing=f"building {out}")
        raise ResourceError(f"{line}; {kept}" if kept else line) from e
    if kept:
        logger.warning("%s", kept)


class _Timings(dict[str, float]):
    """Wall-clock seconds per stage, for the manifest (``timings``) and the benchmarks."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name] = round(time.perf_counter() - start, 3)


@dataclass(frozen=True)
class _Settings:
    """What a build reads once, before any dataset: dictionaries, gene universe, QC rule, layout."""

    config: BuildConfig
    mode: Mode
    universe: np.ndarray
    """Sorted Ensembl IDs that cells are mapped onto: the candidate genes, or the token dictionary's."""
    mito: np.ndarray
    token_dictionary: TokenDictionary | None
    given_medians: dict[str, float] | None
    mapping: dict[str, str] | None
    qc: QCParams

    @functools.cached_property
    def mito_mask(self) -> np.ndarray:
        """Which universe genes are mitochondrial (bool, one per gene of ``universe``)."""
        return np.isin(self.universe, self.mito)

    @classmethod
    def load(cls, config: BuildConfig, mode: Mode) -> _Settings:
        token_dict = TokenDictionary.load(config.token_dictionary) if config.token_dictionary else None
        given_medians = load_gene_medians(config.gene_medians) if config.gene_medians else None
        mapping = None
        if config.gene_mapping:
            raw = load_pickled_dict(config.gene_mapping)
            bad = [k for k, v in raw.items() if not isinstance(v, str)]
            if bad:
                msg = (f"{config.gene_mapping}: value of {bad[0]!r} is not an Ensembl ID string; give an "
                       "ensembl_mapping_dict")
                raise DictionaryError(msg)
            mapping = {str(k): str(v) for k, v in raw.items()}
        if mode == "tokenize" and (token_dict is None or given_medians is None):
            msg = "tokenize needs --token-dictionary and --gene-medians (e.g. Geneformer's gc30M or gc104M files)"
            raise ConfigError(msg)
        if token_dict is not None:
            missing = [t for t in LAYOUTS[config.layout].special_tokens if t not in token_dict.special]
            if missing:
                msg = (f"{config.token_dictionary}: has no {missing[0]} token, which layout {config.layout} "
                       f"needs; use --layout {token_dict.layout().name} or another dictionary")
                raise DictionaryError(msg)
        if mode == "tokenize":
            assert token_dict is not None
            universe, mito = token_dict.gene_ids, np.empty(0, dtype=object)
        else:
            try:
                universe = genes.candidate_genes(config.reference)
            except GenecorpusError as e:
                msg = f"reference: {e}; fix reference in the manifest"
                raise ConfigError(msg) from None
            mito = genes.mito_genes(config.reference)
        qc = config.qc if mode == "build" else QCParams(enabled=False)
        return cls(config, mode, universe, mito, token_dict, given_medians, mapping, qc)

    @property
    def need_medians(self) -> bool:
        """Medians are computed (none were given)."""
        return self.given_medians is None

    @property
    def find_duplicates(self) -> bool:
        """Cells are fingerprinted in the QC pass and duplicates looked for (a build, not with ``keep``).

        ``tokenize`` reproduces Geneformer's tokenizer: every input cell is tokenized.
        """
        return self.mode == "build" and self.config.duplicates != "keep"


@dataclass
class _Build:
    """The typed state of one build: its settings, where tasks run, and the datasets still in it."""

    settings: _Settings
    work: WorkFolder
    executor: Executor
    skip: bool
    plans: list[DatasetPlan]
    """Datasets in the corpus, numbered by their position (``index``)."""
    skipped: list[SkippedDataset]
    """Datasets left out with ``on_error="skip"``, in the order they failed."""
    started: float
    """When the build started (``time.perf_counter``)."""
    timings: _Timings = field(default_factory=_Timings)
    experiments: dict[str, ExperimentIdentity] = field(default_factory=dict)
    """The TileDB-SOMA experiments read, by the ``path`` of their specs: what names their content."""

    @classmethod
    def start(cls, config: BuildConfig, mode: Mode, work: WorkFolder, executor: Executor, sources: Sequence[Any],
              *, skip: bool) -> _Build:
        """Load the settings and plan every dataset (a dataset that cannot be planned is skipped or raises)."""
        started = time.perf_counter()
        settings = _Settings.load(config, mode)
        build = cls(settings, work, executor, skip, plans=[], skipped=[], started=started)
        snapshots: dict[str, int] = {}
        """TileDB-SOMA experiment → the timestamp every dataset of this build reads it at."""
        for i, spec in enumerate(config.datasets):
            source = sources[i] if i < len(sources) else None  # None: read spec.path
            try:
                snapshot = snapshots.get(spec.path) or (work.soma_snapshot(spec.path) if source is None else None)
                plan = plan_dataset(spec, universe=settings.universe, mito=settings.mito, mapping=settings.mapping,
                                    use_obs_n_counts=config.use_obs_n_counts, source=source, snapshot_ms=snapshot)
                if plan.snapshot_ms is not None and spec.path not in snapshots:
                    snapshots[spec.path] = plan.snapshot_ms
                    build.experiments[spec.path] = work.record_soma_snapshot(spec.path, plan.snapshot_ms)
                parts = split_dataset(plan)
            except GenecorpusError as e:
                if not skip:
                    raise
                build._skip(spec.dataset_id, spec.path, "plan", str(e))
                continue
            build.plans += [dataclasses.replace(p, index=len(build.plans) + j) for j, p in enumerate(parts)]
        build._require_some()
        if not config.allow_repeated_files:
            _refuse_repeated_files(build.plans)
        return build

    # ---- the stages, in order

    def run(self) -> Manifest:
        """Run QC, medians and encoding (again without any dataset that failed), then assemble the corpus."""
        files = [p.spec.path for p in self.plans if p.source is None and p.snapshot_ms is None]
        paths = [Path(f) for f in files]
        with InputDigests(paths, on_done=self.work.record_digest if self.work.records else None) as digests:
            tokens: dict[str, str] = {}
            if self.work.records:
                by_path = self.work.input_tokens(paths, digests.get)
                tokens = {f: by_path[Path(f)] for f in files}
                tokens.update({uri: identity.token for uri, identity in self.experiments.items()})
            keys = TaskKeys(self.work, tokens,
                            fingerprint("qc", self.settings.mode, len(self.settings.universe), self.settings.qc,
                                        self.settings.universe, QC_SAMPLE_CELLS, self.settings.find_duplicates))
            while True:
                cells = split_cells(self.plans, self.settings.config.shard_cells)
                logger.info("%d datasets, %d cells, %d tasks", len(self.plans),
                            sum(p.n_cells for p in self.plans), len(cells))
                qc = self._qc(keys, cells)
                if qc.failed:
                    self.drop_failed("qc", qc.failed)
                    continue
                medians_ = self._medians(keys, cells, qc)
                if medians_.failed:
                    self.drop_failed("medians", medians_.failed)
                    continue
                vocabulary = _Vocabulary.choose(self.settings, medians_.gene_median)
                encoded = self._encode(keys, cells, qc, vocabulary)
                if encoded.failed:
                    self.drop_failed("encode", encoded.failed)
                    continue
                return self._publish(_Passes(cells, qc, medians_, vocabulary, encoded), digests)

    def _qc(self, keys: TaskKeys, cells: list[CellRange]) -> _QCPass:
        """The QC pass (moments, value windows, fingerprints), duplicate detection, then the thresholds."""
        s = self.settings
        results: list[QCTaskResult]
        if s.qc.enabled or s.need_medians or s.find_duplicates:
            records, qc_keys = keys.records("qc", self.plans, cells, lambda _: keys.qc_settings)
            groups = gene_groups(len(s.universe), s.mito_mask) if s.find_duplicates else None
            settings = QCPassSettings(s.config.block_size, s.qc.mito, value_window=s.need_medians,
                                      fingerprint_groups=groups)
            outputs = [self.work.fingerprints(k) for k in qc_keys]
            with self.timings.stage("qc"):
                args = [(self.plans[c.dataset], c, settings, out) for c, out in zip(cells, outputs, strict=True)]
                written = [(out, sketch_path(out)) for out in outputs] if s.find_duplicates else None
                results = self.executor.map("qc", run_recorded, self._tasks(records, qc_task, args, outputs=written))
            failed = _failed_datasets(cells, results)
            if failed:
                return _QCPass([], [], qc_keys, failed)
        else:
            results = [QCTaskResult(QCMoments(), medians.GeneWindow.empty(0)) for _ in cells]
            qc_keys = []
        copies = _Copies.none()
        if s.find_duplicates:
            with self.timings.stage("duplicates"):
                copies = self._duplicates(keys, cells, qc_keys)
            if copies.failed:
                return _QCPass([], [], qc_keys, copies.failed)
        thresholds = dataset_thresholds(self.plans, cells, results, s.qc, duplicates=copies.dropped)
        sample = qc_sample(cells, results, thresholds, s.qc.mito)
        if sample is not None:
            sample.write(self.work.corpus / REPORT_DIR / QC_SAMPLE)
        return _QCPass(results, thresholds, qc_keys, {}, copies.summary)

    def _duplicates(self, keys: TaskKeys, cells: list[CellRange], qc_keys: list[str]) -> _Copies:
        """Cells published twice (:mod:`genecorpus.duplicates`): candidates from the QC pass's fingerprints,
        read again and verified; with ``drop``, the later copies and their QC statistics."""
        s = self.settings
        files = tuple((str(self.work.fingerprints(k)), c.dataset) for c, k in zip(cells, qc_keys, strict=True))
        n_ranges = min(MAX_KEY_RANGES, max(2, -(-sum(c.stop - c.start for c in cells) // CELLS_PER_KEY_RANGE)))
        width = 2**64 // n_ranges
        tasks = [CandidateSettings(files, p * width, (p + 1) * width if p < n_ranges - 1 else 2**64)
                 for p in range(n_ranges)]
        upstream = fingerprint("candidates", qc_keys, [c.dataset for c in cells])
        records = self.work.plan_stage("candidates", [
            (f"keys {p + 1}/{len(tasks)}", {"code": code_fingerprint(), "settings": fingerprint(upstream, p)})
            for p in range(len(tasks))])
        found: list[Candidates] = self.executor.map("duplicates (candidates)", run_recorded, [
            (r, (), candidate_task, t) for r, t in zip(records, tasks, strict=True)])
        pairs = np.unique(np.concatenate([f.pairs for f in found]), axis=0)
        read, failed = self._candidate_cells(keys, cells, qc_keys, pairs)
        if failed:
            return _Copies.none(failed)
        checks = self._verify(pairs, read, upstream)
        verified = pairs[checks] if len(pairs) else pairs
        drop = duplicate_groups(verified) if s.config.duplicates == "drop" else {}
        summary = _duplicates_summary(self.plans, s.config.duplicates, found, verified, n_dropped=len(drop))
        logger.info("duplicates: %d pairs shared a key, %d candidates, %d verified; %d cells dropped",
                    summary.n_key_pairs, len(pairs), len(verified), len(drop))
        dropped: dict[int, tuple[np.ndarray, CellStats]] = {}
        for d in sorted({d for d, _ in drop}):
            copies = np.array(sorted(c for dd, c in drop if dd == d), dtype=np.int64)
            stats = [r.stats.take(np.flatnonzero(np.isin(r.cells, copies))) for c, r, _ in read if c.dataset == d]
            dropped[d] = (copies, CellStats.concatenate(stats))
        return _Copies(dropped, summary, {})

    def _candidate_cells(self, keys: TaskKeys, cells: list[CellRange], qc_keys: list[str], pairs: np.ndarray,
                         ) -> tuple[list[tuple[CellRange, CellsRead, Path]], dict[int, str]]:
        """The candidate cells read again, per range that holds any: the range, what came back, the folder."""
        wanted = np.unique(np.concatenate([pairs[:, :2], pairs[:, 2:]]), axis=0)
        by_range = []
        for c in cells:
            mine = wanted[(wanted[:, 0] == c.dataset) & (wanted[:, 1] >= c.start) & (wanted[:, 1] < c.stop), 1]
            if len(mine):
                by_range.append((c, mine))
        if not by_range:
            return [], {}
        wanted_of = {c.index: mine for c, mine in by_range}
        records, cell_keys = keys.records("candidate_cells", self.plans, [c for c, _ in by_range],
                                          lambda c: fingerprint("cells", wanted_of[c.index]),
                                          [qc_keys[c.index] for c, _ in by_range])
        folders = [self.work.candidate_cells(k) for k in cell_keys]
        results = self.executor.map("duplicates (cells)", run_recorded, self._tasks(records, cells_task, [
            (self.plans[c.dataset], c, mine, self.settings.config.block_size, folder)
            for (c, mine), folder in zip(by_range, folders, strict=True)],
            outputs=[cell_files(folder) for folder in folders]))
        failed = _failed_datasets([c for c, _ in by_range], results)
        read = [(c, r, folder) for (c, _), r, folder in zip(by_range, results, folders, strict=True)
                if isinstance(r, CellsRead)]
        return read, failed

    def _verify(self, pairs: np.ndarray, read: list[tuple[CellRange, CellsRead, Path]], upstream: str) -> np.ndarray:
        """Verify the candidate pairs in tasks of at most ``VERIFY_PAIRS_PER_TASK`` pairs, grouped by the range of
        their second cell; each task reads only its pairs' cells. Returns which pairs are one cell (bool)."""
        if not len(pairs):
            return np.zeros(0, bool)
        s = self.settings
        folders = tuple(str(f) for _, _, f in read)
        ranges = sorted((c.dataset, c.start, j) for j, (c, _, _) in enumerate(read))
        bounds = np.array([(d, start) for d, start, _ in ranges], dtype=np.int64)
        folder_of_range = np.array([j for _, _, j in ranges], dtype=np.int64)

        def stored_in(dataset: np.ndarray, cell: np.ndarray) -> np.ndarray:
            at = np.searchsorted(bounds[:, 0] * 2**40 + bounds[:, 1], dataset * 2**40 + cell, side="right") - 1
            return folder_of_range[at]

        where = np.stack([stored_in(pairs[:, 0], pairs[:, 1]), stored_in(pairs[:, 2], pairs[:, 3])], axis=1)
        has = [np.isin(np.arange(len(s.universe)), p.col_to_gene[p.col_to_gene >= 0]) for p in self.plans]
        not_mito = ~s.mito_mask
        order = np.lexsort((np.arange(len(pairs)), where[:, 1]))
        chunks = [c for f in np.unique(where[:, 1]).tolist()
                  for m in [order[where[order, 1] == f]]
                  for c in np.array_split(m, -(-len(m) // VERIFY_PAIRS_PER_TASK))]
        tasks = []
        for chunk in chunks:
            involved = {(min(a, b), max(a, b)) for a, b in pairs[chunk][:, [0, 2]].tolist()}
            shared = {(a, b): has[a] & has[b] & not_mito if a != b else np.ones(len(s.universe), bool)
                      for a, b in sorted(involved)}
            tasks.append(VerifySettings(pairs[chunk], folders, where[chunk], shared, len(s.universe)))
        names = [Path(f).name for f in folders]  # the cells tasks' keys
        records = self.work.plan_stage("verify", [
            (f"pairs {i + 1}/{len(tasks)}", {"code": code_fingerprint(), "settings": fingerprint(
                upstream, t.pairs, [names[f] for f in t.stored_in.ravel()])})
            for i, t in enumerate(tasks)])
        checks = self.executor.map("duplicates (verify)", run_recorded,
                                   [(r, (), verify_task, t) for r, t in zip(records, tasks, strict=True)])
        same = np.zeros(len(pairs), bool)
        for chunk, check in zip(chunks, checks, strict=True):
            same[chunk] = check.same
        return same

    def _medians(self, keys: TaskKeys, cells: list[CellRange], qc: _QCPass) -> _MedianPass:
        s = self.settings
        if not s.need_medians:
            assert s.given_medians is not None and s.config.gene_medians is not None
            gene_median = np.array([s.given_medians.get(g, np.nan) for g in s.universe.tolist()], dtype=np.float64)
            if s.mode == "tokenize":
                missing = np.flatnonzero(np.isnan(gene_median))
                if missing.size:
                    msg = (f"{s.config.gene_medians}: no median for {missing.size} genes of the token dictionary "
                           f"(e.g. {s.universe[missing[0]]}); give the matching gene_median_dictionary")
                    raise DictionaryError(msg)
            source = Path(s.config.gene_medians)
            return _MedianPass(gene_median, GivenMedians(source=str(source), sha256=sha256_of_path(source)[0]))

        window = medians.GeneWindow.empty(len(s.universe))
        for r in qc.results:
            window.merge(r.window)
        shift = window.shifts()
        med_cells = [c for c in cells if self.plans[c.dataset].spec.use_for_medians]
        upstream = [qc.keys[c.index] for c in med_cells]

        # partial results are folded in task order as they arrive: memory does not grow with the tasks
        histogram = medians.HistogramSettings(s.config.block_size, window, shift)
        shared = _settings_key("histogram", histogram)
        records, _ = keys.records("histogram", self.plans, med_cells,
                                  lambda c: fingerprint(shared, qc.thresholds[c.dataset]), upstream)
        with self.timings.stage("medians_histogram"):
            combine = _Failures(med_cells, medians.add_histograms)
            hist = fold(self.executor, "medians (histogram)", run_recorded, self._tasks(
                records, medians.histogram_task,
                [(self.plans[c.dataset], c, qc.thresholds[c.dataset], histogram) for c in med_cells]),
                combine, initial=np.zeros((len(s.universe), medians.N_BINS), dtype=np.int64))
        if combine.failed:
            return _MedianPass.failure(combine.failed)

        selection = medians.SelectionSettings(s.config.block_size, window, shift,
                                              medians.MedianTargets.from_histogram(hist))
        shared = _settings_key("selection", selection)
        records, _ = keys.records("selection", self.plans, med_cells,
                                  lambda c: fingerprint(shared, qc.thresholds[c.dataset]), upstream)
        with self.timings.stage("medians_selection"):
            combine = _Failures(med_cells, medians.ValueMultiset.merge)
            values = fold(self.executor, "medians (selection)", run_recorded, self._tasks(
                records, medians.selection_task,
                [(self.plans[c.dataset], c, qc.thresholds[c.dataset], selection) for c in med_cells]),
                combine, initial=medians.ValueMultiset.empty(len(s.universe)))
            if combine.failed:
                return _MedianPass.failure(combine.failed)
            gene_median = medians.select_medians(selection.targets, values)
            del values
        provenance = ComputedMedians(
            method="exact nonzero median of count / n_counts * 10000 (float64), radix selection",
            datasets=tuple(p.dataset_id for p in self.plans if p.spec.use_for_medians),
            n_detected_genes=int(np.isfinite(gene_median).sum()),
        )
        return _MedianPass(gene_median, provenance)

    def _encode(self, keys: TaskKeys, cells: list[CellRange], qc: _QCPass, vocabulary: _Vocabulary) -> _EncodePass:
        s = self.settings
        metadata = metadata_columns(self.plans)
        dictionary = vocabulary.token_dictionary
        token_type = pa.int16() if dictionary.max_token <= np.iinfo(np.int16).max else pa.int32()
        settings = EncodeSettings(RankOrder.from_genes(vocabulary.encode_medians, vocabulary.tokens), s.config.layout,
                                  dictionary.special, corpus_schema(token_type, metadata), metadata,
                                  geneformer_arithmetic=s.mode == "tokenize", block_size=s.config.block_size)
        shared = _settings_key("encode", settings)
        records, enc_keys = keys.records("encode", self.plans, cells,
                                         lambda c: fingerprint(shared, qc.thresholds[c.dataset]), qc.keys or None)
        parts = [self.work.part(k) for k in enc_keys]
        with self.timings.stage("encode"):
            results: list[EncodeResult] = self.executor.map("encode", run_recorded, self._tasks(
                records, encode_task,
                [(self.plans[c.dataset], c, qc.thresholds[c.dataset], settings, part)
                 for c, part in zip(cells, parts, strict=True)],
                outputs=[(part,) for part in parts]))
        return _EncodePass(results, settings.schema, _failed_datasets(cells, results))

    def _publish(self, passes: _Passes, digests: InputDigests) -> Manifest:
        """Shards, dictionaries, lengths and the manifest of the finished corpus in the work folder."""
        s = self.settings
        cells, qc, medians_, vocabulary, encoded = (passes.cells, passes.qc, passes.medians, passes.vocabulary,
                                                    passes.encoded)
        folder = self.work.corpus
        # everything that determines the bytes; the block size does not
        hf_fingerprint = json.dumps([s.config.model_dump(mode="json", exclude={"block_size"}), s.mode], sort_keys=True)
        shard_names = publish_shards(folder, [(r.part, r.n_rows) for r in encoded.results], encoded.schema,
                                     hf_fingerprint, journal=self.work.journal_publish)
        write_dictionaries(folder, vocabulary.token_dictionary, vocabulary.gene_medians())
        lengths = np.concatenate([r.lengths for r in encoded.results]) if encoded.results else np.empty(0, np.int64)
        write_lengths(folder, lengths)
        manifest = Manifest(
            mode=s.mode,
            parameters=s.config,
            versions=package_versions(),
            datasets=self._records(cells, qc, encoded.results, digests),
            medians=medians_.provenance,
            vocabulary=VocabularySummary(n_genes=len(vocabulary.genes),
                                         n_tokens=len(vocabulary.token_dictionary.to_mapping()),
                                         special_tokens=vocabulary.token_dictionary.special),
            corpus=CorpusSummary(n_cells=int(lengths.shape[0]), n_tokens=int(lengths.sum()), layout=s.config.layout,
                                 shards=tuple(shard_names), columns=tuple(encoded.schema.names)),
            skipped=tuple(self.skipped),
            duplicates=qc.duplicates,
            files=file_digests(folder),
        )
        self.timings["total"] = round(time.perf_counter() - self.started, 3)
        return manifest.model_copy(update={"timings": dict(self.timings)})

    def _records(self, cells: Sequence[CellRange], qc: _QCPass, encoded: Sequence[EncodeResult],
                 digests: InputDigests) -> tuple[DatasetRecord, ...]:
        """The manifest's record of every dataset, counting each task's results once (linear in tasks and datasets,
        which matters for thousands of Census parts)."""
        results: dict[int, list[EncodeResult]] = {plan.index: [] for plan in self.plans}
        for cell_range, result in zip(cells, encoded, strict=True):
            results[cell_range.dataset].append(result)
        selected: Counter[str] = Counter()  # cells of each declared dataset (split parts together)
        for plan in self.plans:
            selected[plan.spec.model_dump_json()] += plan.n_cells
        return tuple(self._record(plan, results[plan.index], selected[plan.spec.model_dump_json()], qc, digests)
                     for plan in self.plans)

    def _record(self, plan: DatasetPlan, rs: Sequence[EncodeResult], n_selected: int, qc: _QCPass,
                digests: InputDigests) -> DatasetRecord:
        dropped = {name: sum(r.dropped[name] for r in rs) for name in DROP_REASONS}
        n_in = sum(r.n_in for r in rs)
        kept = sum(r.n_rows for r in rs)
        if n_in != kept + sum(dropped.values()) or n_in != plan.n_cells:
            msg = f"internal accounting error for {plan.spec.path}: {n_in} in, {kept} kept, {dropped}"
            raise RuntimeError(msg)
        experiment = self.experiments.get(plan.spec.path) if plan.snapshot_ms is not None else None
        soma = None
        if plan.source is not None:
            digest, size = "in-memory", 0
        elif experiment is not None and plan.snapshot_ms is not None:
            digest, size = experiment.token, experiment.n_bytes
            soma = SomaInput(uri=plan.spec.path, snapshot_ms=plan.snapshot_ms, token=experiment.token,
                             local=experiment.local, measurement=plan.measurement or "", layer=plan.layer or "",
                             value_filter=plan.spec.value_filter,
                             n_selected=n_selected,
                             n_vars=plan.gene_summary.n_input_genes)
        else:
            digest, size = digests.get(Path(plan.spec.path))
        return DatasetRecord(
            dataset_id=plan.dataset_id,
            path=plan.spec.path if plan.source is None else "<AnnData>",
            sha256=digest,
            bytes=size,
            spec=plan.spec,
            genes=plan.gene_summary,
            depth=plan.depth,
            filter_column=plan.filter_column,
            qc=qc.thresholds[plan.index].to_record(),
            cells=CellCounts(n_in=n_in, kept=kept, dropped=dropped),
            matrix=plan.matrix,
            select_columns=plan.select_columns,
            primary_column=plan.primary_column,
            split_value=plan.part,
            soma=soma,
        )

    # ---- failures

    def drop_failed(self, stage: Stage, failed: dict[int, str]) -> None:
        """Leave out the datasets (by plan index) whose tasks failed in ``stage``, and number the rest again.

        The stages then run again from QC: every task of the other datasets is found in its record, and
        the corpus is exactly the corpus built without the failed ones.
        """
        for index, message in sorted(failed.items()):
            self._skip(self.plans[index].dataset_id, self.plans[index].spec.path, stage, message)
        kept = [p for p in self.plans if p.index not in failed]
        self.plans = [dataclasses.replace(p, index=j) for j, p in enumerate(kept)]
        self._require_some()

    def _skip(self, dataset_id: str, path: str, stage: Stage, message: str) -> None:
        logger.warning("skipping %s: %s", dataset_id, message)
        self.skipped.append(SkippedDataset(dataset_id=dataset_id, path=path, stage=stage, error=message))

    def _require_some(self) -> None:
        if not self.plans:
            first = self.skipped[0] if self.skipped else None
            name, error = (first.dataset_id, first.error) if first else ("?", "no datasets")
            msg = f"every dataset failed ({len(self.skipped)} skipped); the first, {name}: {error}"
            raise InputError(msg)

    def _tasks(self, records: Sequence[Path | None], fn: Callable[..., Any], args: Sequence[tuple[Any, ...]], *,
               outputs: Sequence[tuple[Path, ...]] | None = None) -> list[tuple[Any, ...]]:
        """Argument tuples of :func:`~genecorpus.resume.run_recorded` around ``fn`` (failures kept with skip)."""
        inner = [(_failure_as_result, fn, *a) if self.skip else (fn, *a) for a in args]
        outs = outputs if outputs is not None else [()] * len(args)
        return [(r, o, *a) for r, o, a in zip(records, outs, inner, strict=True)]


@dataclass(frozen=True)
class _QCPass:
    """The QC pass: per-task results and keys, per-dataset thresholds, and the datasets that failed."""

    results: list[QCTaskResult]
    thresholds: list[DatasetQC]
    keys: list[str]
    """Record key of each task (empty when the pass did not run), upstream of the later passes' keys."""
    failed: dict[int, str]
    """Dataset (plan index) → the message of its first failed task (``on_error="skip"``)."""
    duplicates: DuplicatesSummary | None = None
    """What duplicate detection found (None when it did not look)."""


@dataclass(frozen=True)
class _Copies:
    """Cells dropped as later copies: per dataset, their indices (ascending) and QC statistics."""

    dropped: dict[int, tuple[np.ndarray, CellStats]]
    summary: DuplicatesSummary | None
    failed: dict[int, str]

    @classmethod
    def none(cls, failed: dict[int, str] | None = None) -> _Copies:
        """No copies (duplicates not looked for, or some datasets' tasks failed)."""
        return cls({}, None, failed or {})


@dataclass(frozen=True)
class _MedianPass:
    """Each universe gene's median (float64, NaN when not detected) and where the medians come from."""

    gene_median: np.ndarray
    provenance: ComputedMedians | GivenMedians | None
    failed: dict[int, str] = field(default_factory=dict)

    @classmethod
    def failure(cls, failed: dict[int, str]) -> _MedianPass:
        """A pass that some datasets' tasks failed in."""
        return cls(np.empty(0), None, failed)


@dataclass(frozen=True)
class _EncodePass:
    """The parts the encoding tasks wrote (in task order) and their schema."""

    results: list[EncodeResult]
    schema: pa.Schema
    failed: dict[int, str]


@dataclass(frozen=True)
class _Passes:
    """The results of every pass of a build that finished, in order."""

    cells: list[CellRange]
    qc: _QCPass
    medians: _MedianPass
    vocabulary: _Vocabulary
    encoded: _EncodePass


@dataclass(frozen=True)
class _Vocabulary:
    """The corpus's genes and tokens over the universe."""

    universe: np.ndarray
    token_dictionary: TokenDictionary
    tokens: np.ndarray
    """Token id of each universe gene, or -1 (int32)."""
    gene_median: np.ndarray
    """Median of each universe gene (float64, NaN when not detected)."""
    in_vocab: np.ndarray
    """Universe gene has a token and a median (bool)."""

    @classmethod
    def choose(cls, settings: _Settings, gene_median: np.ndarray) -> _Vocabulary:
        """The given token dictionary, or one of the genes that have a median; checked for the tie rule."""
        dictionary = settings.token_dictionary
        universe = settings.universe
        if dictionary is None:
            dictionary = TokenDictionary.from_genes(universe[np.isfinite(gene_median)], LAYOUTS[settings.config.layout])
        pos = dict(zip(dictionary.gene_ids.tolist(), dictionary.gene_tokens.tolist(), strict=True))
        tokens = np.array([pos.get(g, -1) for g in universe.tolist()], dtype=np.int32)
        in_vocab = (tokens >= 0) & np.isfinite(gene_median)
        if np.any(np.diff(tokens[in_vocab]) <= 0):
            msg = (f"{settings.config.token_dictionary}: gene ids are not in ascending Ensembl-ID order, which the "
                   "tie rule of the rank value encoding needs; give a dictionary in that order (Geneformer's are)")
            raise DictionaryError(msg)
        written = TokenDictionary(np.array(list(dictionary.gene_ids), dtype=object), dictionary.gene_tokens,
                                  dictionary.special)
        return cls(universe, written, tokens, gene_median, in_vocab)

    @property
    def encode_medians(self) -> np.ndarray:
        """Median of each vocabulary gene, 0 for the other universe genes (what the encoder reads)."""
        return np.where(self.in_vocab, self.gene_median, 0.0)

    @property
    def genes(self) -> np.ndarray:
        """Universe genes in the vocabulary, ascending."""
        return self.universe[self.in_vocab]

    def gene_medians(self) -> dict[str, float]:
        """Median of each vocabulary gene, as written beside the shards."""
        medians_ = self.gene_median[self.in_vocab].tolist()
        return {g: float(m) for g, m in zip(self.genes.tolist(), medians_, strict=True)}


VERIFY_PAIRS_PER_TASK = 20_000
"""Candidate pairs per verification task (its memory: the counts of at most twice as many cells)."""
CELLS_PER_KEY_RANGE = 1_000_000
MAX_KEY_RANGES = 4096
"""Candidate tasks: one per million input cells (at least 2, at most 4,096), each reading its range of
every task's fingerprint keys: about 128 MB of keys per task, whatever the corpus size."""


def _duplicates_summary(plans: Sequence[DatasetPlan], policy: str, found: Sequence[Candidates], verified: np.ndarray,
                        *, n_dropped: int) -> DuplicatesSummary:
    across = verified[verified[:, 0] != verified[:, 2]] if len(verified) else verified
    shared: dict[tuple[int, int], set[int]] = {}
    for da, _, db, cb in across.tolist():
        shared.setdefault((da, db), set()).add(cb)
    within_cells: dict[int, set[int]] = {}
    for da, _, _, cb in (verified[verified[:, 0] == verified[:, 2]] if len(verified) else verified).tolist():
        within_cells.setdefault(da, set()).add(cb)
    within = {plans[d].dataset_id: len(c) for d, c in sorted(within_cells.items())}
    return DuplicatesSummary(
        policy=policy, rule=RULE, n_key_pairs=sum(f.n_key_pairs for f in found),
        n_candidate_pairs=sum(len(f.pairs) for f in found), n_verified_pairs=len(verified),
        n_common_keys=sum(f.n_common_keys for f in found),
        shared=tuple(SharedCells(a=plans[a].dataset_id, b=plans[b].dataset_id, n_cells=len(c))
                     for (a, b), c in sorted(shared.items())),
        within=within, n_dropped=n_dropped)


def _settings_key(name: str, settings: Any) -> str:
    """Fingerprint of a pass's settings for the task keys, without the block size (which changes no result)."""
    return fingerprint(name, dataclasses.replace(settings, block_size=0))


def _failure_as_result(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, with an input error returned as a :class:`TaskFailure` (``--on-error skip``)."""
    try:
        return fn(*args)
    except GenecorpusError as e:
        return TaskFailure(str(e))


def _failed_datasets(cells: Sequence[CellRange], results: Sequence[Any]) -> dict[int, str]:
    """Dataset → the message of its first failed task, from a stage's results in task order."""
    combine = _Failures(cells, lambda acc, _: acc)
    for result in results:
        combine(None, result)
    return combine.failed


class _Failures:
    """Wraps a fold's ``combine``: task failures are noted by dataset instead of combined."""

    def __init__(self, cells: Sequence[CellRange], combine: Callable[[Any, Any], Any]) -> None:
        self.cells = cells
        self.combine = combine
        self.failed: dict[int, str] = {}
        self._next = 0

    def __call__(self, acc: Any, result: Any) -> Any:
        cells = self.cells[self._next]
        self._next += 1
        if isinstance(result, TaskFailure):
            self.failed.setdefault(cells.dataset, result.message)
            return acc
        return self.combine(acc, result)


def _refuse_repeated_files(plans: Sequence[DatasetPlan]) -> None:
    """Refuse two datasets read from the same file, or from two files with the same content.

    Only distinct files of equal size are hashed here (rarely any); the other inputs' sha256 is computed
    in the background while the build runs, as always.
    """
    # A declared dataset may give several plans (the parts of a split file or experiment); two declared datasets
    # may not read the same thing: one file, or one query (measurement, layer, filter) of one experiment.
    first: dict[tuple[str | None, ...], DatasetPlan] = {}
    files: dict[Path, DatasetPlan] = {}
    for plan in plans:
        if plan.source is not None:
            continue
        if plan.snapshot_ms is not None:
            what = "the same query of the same experiment as"
            key: tuple[str | None, ...] = (plan.spec.path.rstrip("/"), plan.measurement, plan.layer,
                                           plan.spec.value_filter)
        else:
            what = "the same file as"
            path = Path(plan.spec.path).resolve()
            key = (str(path),)
            files.setdefault(path, plan)
        seen = first.setdefault(key, plan)
        if seen.spec != plan.spec:
            _repeated(plan, seen, what)
    by_size: dict[int, list[Path]] = {}
    for path in files:
        by_size.setdefault(file_identity(path)[0], []).append(path)
    for paths in (p for p in by_size.values() if len(p) > 1):
        seen: dict[str, DatasetPlan] = {}
        for path in paths:
            digest = sha256_of_path(path)[0]
            if digest in seen:
                _repeated(files[path], seen[digest], f"identical to (sha256 {digest[:12]}…)")
            seen[digest] = files[path]


def _repeated(plan: DatasetPlan, first: DatasetPlan, how: str) -> None:
    msg = (f"{plan.spec.path}: dataset {plan.dataset_id!r} is {how} {first.spec.path} (dataset "
           f"{first.dataset_id!r}), so its cells would be in the corpus twice; remove one, or set "
           "allow_repeated_files = true in the manifest")
    raise ConfigError(msg)


# ------------------------------------------------------------------------------------- the out folder


def _check_out(out: Path, *, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        msg = f"{out}: is a file, not a corpus folder; choose another --out"
        raise ConfigError(msg)
    if out.exists() and not overwrite:
        msg = f"{out}: already exists; choose another --out or pass --overwrite"
        raise ConfigError(msg)
    # --overwrite replaces a corpus, never a folder of other files given as --out by mistake
    if out.exists() and any(out.iterdir()) and not is_corpus_folder(out):
        msg = (f"{out}: is not a corpus folder (no {' or '.join(CORPUS_MARKERS)}), so --overwrite "
               "does not replace it; choose another --out")
        raise ConfigError(msg)
    out.parent.mkdir(parents=True, exist_ok=True)


def _finished_build(config: BuildConfig, mode: Mode, out: Path, *, overwrite: bool) -> BuildResult | None:
    """For ``--resume`` when ``out`` exists and nothing is unfinished: its result if it is up to date.

    Up to date means built by the same command (mode and every parameter) from inputs with the same
    sha256. Otherwise returns None with ``overwrite`` (build again) and raises without it.
    """
    try:
        manifest: Manifest | None = Manifest.read(out / MANIFEST)
    except InputError:
        manifest = None
    why = "is not a corpus built by genecorpus"
    if manifest is not None:
        why = "was built with other settings"
        if manifest.mode == mode and manifest.parameters == config:
            changed = [d.path for d in manifest.datasets if _input_changed(d)]
            if not changed:
                logging.getLogger("genecorpus.resume").info("%s is complete and up to date: nothing to resume", out)
                return BuildResult(out, manifest)
            why = f"was built from inputs that have changed since ({changed[0]})"
    if overwrite:
        return None
    msg = (f"{out}: already exists and {why}; there is no unfinished build to resume; pass --overwrite to "
           "build it again")
    raise ConfigError(msg)


def _input_changed(record: DatasetRecord) -> bool:
    """Whether a dataset's input is gone or differs from what the manifest records.

    A TileDB-SOMA experiment is compared by its token: a local one by the listing of its files, a remote one
    not at all (remote experiments such as Census releases are taken to be immutable).
    """
    if record.soma is not None:
        if not record.soma.local:
            return False
        identity = experiment_identity(record.soma.uri, snapshot_ms=record.soma.snapshot_ms)
        return identity.token != record.soma.token
    return not Path(record.path).exists() or sha256_of_path(Path(record.path))[0] != record.sha256


def _require_cells(manifest: Manifest, *, max_datasets: int = 5) -> None:
    """Refuse a corpus without cells, saying per dataset where its cells went."""
    if manifest.corpus.n_cells:
        return
    parts = []
    for d in manifest.datasets[:max_datasets]:
        dropped = ", ".join(f"{n} by {reason}" for reason, n in d.cells.dropped.items() if n)
        parts.append(f"{d.path}: " + (f"{d.cells.n_in} cells, dropped {dropped}" if d.cells.n_in
                                      else "0 cells in the input"))
    more = len(manifest.datasets) - max_datasets
    listed = "; ".join(parts) + (f"; and {more} more datasets" if more > 0 else "")
    msg = (f"no cell is left for the corpus ({listed}); check the input files, their filter_pass "
           "column, the QC settings and the gene ids")
    raise InputError(msg)


# -------------------------------------------------------------------------------------------- tokenize


def tokenize(
    inputs: Sequence[str | os.PathLike[str] | Any],
    out: str | os.PathLike[str],
    *,
    token_dictionary: str | os.PathLike[str],
    gene_medians: str | os.PathLike[str],
    gene_mapping: str | os.PathLike[str] | None = None,
    layout: LayoutName | None = None,
    obs_columns: Sequence[str] = (),
    gene_id: GeneIdKind = "auto",
    layer: str | None = None,
    use_raw: bool = False,
    workers: int = 1,
    block_size: int = DEFAULT_BLOCK_SIZE,
    overwrite: bool = False,
    executor: Executor | None = None,
    report: bool = True,
    on_error: OnError = "fail",
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
    layer, use_raw
        Read the counts from this AnnData layer, or from ``raw.X``; by default X when it holds counts,
        else ``raw.X``, else ``layers["counts"]`` (``counts = "auto"``).
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
                specs.append(DatasetSpec(path=str(item), gene_id=gene_id, obs_columns=tuple(obs_columns),
                                         layer=layer, use_raw=use_raw))
                sources.append(None)
            else:
                specs.append(DatasetSpec(path=f"<AnnData {i}>", id=f"anndata-{i}", gene_id=gene_id,
                                         obs_columns=tuple(obs_columns), layer=layer, use_raw=use_raw))
                sources.append(item)
        ids = [s.dataset_id for s in specs]
        if len(set(ids)) != len(ids):
            specs = [s.model_copy(update={"id": f"{i}-{s.dataset_id}"}) for i, s in enumerate(specs)]
        config = BuildConfig(
            datasets=tuple(specs), layout=layout, block_size=block_size,
            token_dictionary=str(token_dictionary), gene_medians=str(gene_medians),
            gene_mapping=str(gene_mapping) if gene_mapping else None,
            duplicates="keep",  # Geneformer's tokenizer, reproduced: every input cell is tokenized
        )
    except ValidationError as e:
        msg = f"invalid tokenize settings: {describe_validation_error(e)}"
        raise ConfigError(msg) from None
    return build_corpus(config, out, workers=workers, mode="tokenize", overwrite=overwrite,
                        executor=executor, sources=sources if any(s is not None for s in sources) else (),
                        report=report, on_error=on_error, resume=resume)
