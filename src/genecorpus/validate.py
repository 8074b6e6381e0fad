"""Check a corpus: its shards against the manifest, the dictionaries and, when they are at hand, the inputs.

:func:`validate_corpus` reads the shards once, record batch by record batch (memory is bounded by one
batch, one input block and the per-token and per-cell tables below), and checks

``shards``
    every shard listed in ``state.json`` (or every parquet file) opens, has ``input_ids`` and ``length``;
``cell_counts``
    the number of cells equals the manifest's, overall and per dataset, datasets in manifest order;
``lengths``
    ``length == len(input_ids)`` in every cell, and the total equals the manifest's token count;
``tokens``
    every token id is in the token dictionary; every non-special token is a gene with a median;
``layout``
    SPEC §2.7 for the manifest's layout: gc30m has no special token and at most 2,048 tokens; gc104m
    starts with ``<cls>``, ends with ``<eos>``, has no other special token and at most 4,096 tokens;
``unique_tokens``, ``nonempty_cells``
    no token twice in a cell, no cell without a gene token;
``dictionaries``
    the token dictionary loads; every gene of it has a finite positive median; ``gene_medians.tsv`` and
    ``.pkl`` agree; the files match the sha256 the manifest records; the medians equal those of the
    median file the corpus was made with, when that file is still there and unchanged;
``lengths_file``
    ``lengths.pkl`` equals the ``length`` column;
``inputs``
    the inputs listed in the manifest exist and have the recorded sha256 (otherwise the check is
    skipped, or fails with ``require_inputs``);
``encoding``
    a sample of cells (or all) is recomputed from the input counts: each corpus cell is found in its
    input by ``cell_id`` (in input order), its values ``count / n_counts * 10,000 / median`` are
    evaluated with the arithmetic the corpus was made with (SPEC §2.6 float64 for ``build``,
    Geneformer's for ``tokenize``, see ``docs/decisions.md``), and its tokens must be in
    non-increasing value order (ties by ascending token) and equal the expected encoding.

Corpora in the published Genecorpus-30M format (parquet files or a ``save_to_disk`` folder without a
manifest, with a token dictionary given) get the checks that need no manifest.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from genecorpus import _kernels
from genecorpus.corpus.folder import (
    GENE_MEDIANS_PKL,
    GENE_MEDIANS_TSV,
    LENGTHS,
    TOKEN_DICTIONARY,
    CorpusFiles,
    read_lengths,
    sha256_of_path,
)
from genecorpus.corpus.manifest import DatasetRecord, DepthSource, GivenMedians, Manifest
from genecorpus.dataset import DatasetPlan, GeneBlock, plan_dataset, split_dataset
from genecorpus.encode import SPEC_ARITHMETIC, Arithmetic
from genecorpus.errors import DictionaryError, GenecorpusError, InputError
from genecorpus.io import DEFAULT_BLOCK_SIZE
from genecorpus.io.soma import experiment_identity, local_experiment_path
from genecorpus.vocab import (
    LAYOUTS,
    Layout,
    TokenDictionary,
    load_gene_medians,
    load_pickled_dict,
)

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Iterator

    import scipy.sparse as sp


__all__ = ["CHECKS", "DEFAULT_SAMPLE_CELLS", "CheckResult", "Problem", "ValidationReport", "validate_corpus"]

CHECKS = ("shards", "cell_counts", "lengths", "tokens", "layout", "unique_tokens", "nonempty_cells",
          "dictionaries", "lengths_file", "inputs", "encoding")
"""The checks of :func:`validate_corpus`, in report order."""

DEFAULT_SAMPLE_CELLS = 1000
"""Cells recomputed from the inputs unless all are asked for; spread evenly over the corpus."""

MAX_PROBLEMS = 5
"""Offending items named per check; the counts cover all of them."""

Status = Literal["pass", "FAIL", "skipped"]

_TOKEN_SCALE = 10_000.0
_NO_DICTIONARY_MAX_ID = 1 << 22
"""Without a token dictionary, duplicates are looked for among ids below this bound."""


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class Problem:
    """One offending item: where it is (shard file and row, cell, dataset, file) and what is wrong."""

    message: str
    shard: str | None = None
    """Shard file name."""
    row: int | None = None
    """Row index within the shard (0-based)."""
    cell_id: str | None = None
    dataset_id: str | None = None

    def describe(self) -> str:
        """One line: ``shard row N, cell ID: message``."""
        where = []
        if self.shard is not None:
            where.append(self.shard if self.row is None else f"{self.shard} row {self.row}")
        if self.cell_id is not None:
            where.append(f"cell {self.cell_id}")
        if self.dataset_id is not None:
            where.append(f"dataset {self.dataset_id}")
        return f"{', '.join(where)}: {self.message}" if where else self.message


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: status, a one-line summary with counts, and the first problems."""

    name: str
    status: Status
    summary: str
    n_checked: int
    """Items looked at (cells, datasets, genes or files, as the summary says)."""
    n_failed: int
    """Items that failed."""
    problems: tuple[Problem, ...] = ()
    """The first :data:`MAX_PROBLEMS` offending items."""
    notes: tuple[str, ...] = ()
    """Why the check (or part of it) was skipped, and other remarks."""


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate_corpus` found: one :class:`CheckResult` per check of :data:`CHECKS`."""

    path: Path
    kind: str
    """``"arrow"`` (save_to_disk folder) or ``"parquet"``."""
    layout: str
    mode: str | None
    """``"build"`` or ``"tokenize"`` from the manifest; None without a manifest."""
    n_shards: int
    n_cells: int
    """Rows read from the shards."""
    checks: tuple[CheckResult, ...]
    warnings: tuple[str, ...] = ()
    """What a user should know that fails no check (datasets left out with ``--on-error skip``)."""

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not fail)."""
        return all(c.status != "FAIL" for c in self.checks)

    def check(self, name: str) -> CheckResult:
        """The result of check ``name`` (one of :data:`CHECKS`)."""
        for c in self.checks:
            if c.name == name:
                return c
        msg = f"no check {name!r}; the checks are {', '.join(CHECKS)}"
        raise KeyError(msg)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serializable data."""
        return {
            "path": str(self.path), "ok": self.ok, "kind": self.kind, "layout": self.layout,
            "mode": self.mode, "n_shards": self.n_shards, "n_cells": self.n_cells, "warnings": list(self.warnings),
            "checks": [{
                "name": c.name, "status": c.status, "summary": c.summary, "n_checked": c.n_checked,
                "n_failed": c.n_failed, "notes": list(c.notes),
                "problems": [{"shard": p.shard, "row": p.row, "cell_id": p.cell_id,
                              "dataset_id": p.dataset_id, "message": p.message} for p in c.problems],
            } for c in self.checks],
        }

    def to_text(self) -> str:
        """One line per check (status, name, counts), its first problems or notes, and a summary line."""
        lines = [f"corpus: {self.path} ({self.kind}, {self.n_shards} shard(s), layout {self.layout}"
                 f"{f', made by {self.mode}' if self.mode else ''})"]
        for c in self.checks:
            lines.append(f"{c.status:<8} {c.name:<15} {c.summary}")
            lines.extend(f"{'':24} {p.describe()}" for p in c.problems)
            if c.n_failed > len(c.problems):
                lines.append(f"{'':24} … and {c.n_failed - len(c.problems):,} more")
            lines.extend(f"{'':24} {note}" for note in c.notes)
        lines.extend(f"WARNING  {w}" for w in self.warnings)
        failed = [c.name for c in self.checks if c.status == "FAIL"]
        n_skipped = sum(c.status == "skipped" for c in self.checks)
        skipped = f", {n_skipped} skipped" if n_skipped else ""
        if self.warnings:
            skipped += f", {len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}"
        if failed:
            lines.append(f"summary: FAIL — {len(failed)} of {len(self.checks)} checks failed "
                         f"({', '.join(failed)}){skipped}; {self.n_cells:,} cells")
        else:
            lines.append(f"summary: pass — {len(self.checks) - n_skipped} checks passed{skipped}; "
                         f"{self.n_cells:,} cells")
        return "\n".join(lines)


@dataclass
class _Tally:
    """A check being run: counts, the first problems, notes, or why it cannot run."""

    name: str
    n_checked: int = 0
    n_failed: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None
    """Why the check could not run (its status is then ``skipped`` unless something failed)."""

    @property
    def wants_problems(self) -> bool:
        """Whether another offending item would still be named (describing it may be costly)."""
        return len(self.problems) < MAX_PROBLEMS

    def fail(self, problem: Problem | None, *, count: int = 1) -> None:
        """Count a failure; ``problem`` may be None once :attr:`wants_problems` is False."""
        self.n_failed += count
        if problem is not None and self.wants_problems:
            self.problems.append(problem)

    def fail_rows(self, rows: np.ndarray, problem_of: Callable[[int], Problem]) -> None:
        """Count ``rows`` (int array) as failed; describe only the first few, with ``problem_of(row)``."""
        self.n_failed += len(rows)
        for i in rows[: MAX_PROBLEMS - len(self.problems)].tolist():
            self.problems.append(problem_of(i))

    def result(self, summary: str) -> CheckResult:
        if self.n_failed:
            status: Status = "FAIL"
        elif self.skipped is not None:
            status, summary = "skipped", self.skipped
        else:
            status = "pass"
        return CheckResult(self.name, status, summary, self.n_checked, self.n_failed, tuple(self.problems),
                           tuple(self.notes))


# ------------------------------------------------------------------------------------- dictionaries


@dataclass(frozen=True)
class _Vocabulary:
    """The token dictionary's genes with their tokens and medians (NaN: no usable median)."""

    dictionary: TokenDictionary
    medians: np.ndarray | None
    """Per gene of ``dictionary.gene_ids``: its median (float64); None when no median file is known."""

    @property
    def gene_ids(self) -> np.ndarray:
        return self.dictionary.gene_ids

    @property
    def tokens(self) -> np.ndarray:
        return self.dictionary.gene_tokens.astype(np.int64)

    def has_median(self) -> np.ndarray:
        """Per gene: whether it has a finite positive median (bool)."""
        if self.medians is None:
            return np.ones(len(self.gene_ids), dtype=bool)
        return np.isfinite(self.medians) & (self.medians > 0)

    def token_kinds(self) -> np.ndarray:
        """Per token id ``0..max_token``: its ``_kernels.TOKEN_*`` kind (int8)."""
        kinds = np.full(self.dictionary.max_token + 1, _kernels.TOKEN_UNKNOWN, dtype=np.int8)
        kinds[self.tokens] = np.where(self.has_median(), _kernels.TOKEN_GENE,
                                      _kernels.TOKEN_GENE_WITHOUT_MEDIAN)
        kinds[list(self.dictionary.special.values())] = _kernels.TOKEN_SPECIAL
        return kinds

    def gene_of(self, token: int) -> str:
        """The Ensembl ID or special token name of a token id, for messages."""
        hit = np.flatnonzero(self.dictionary.gene_tokens == token)
        if hit.size:
            return str(self.gene_ids[hit[0]])
        for name, value in self.dictionary.special.items():
            if value == token:
                return name
        return "not in the dictionary"


def _read_median_values(path: Path) -> dict[str, float]:
    """All medians of a ``.pkl`` or genecorpus ``.tsv`` file, bad values included (to be reported)."""
    if path.suffix == ".pkl":
        out = {}
        for gene, value in load_pickled_dict(path).items():
            if not isinstance(value, int | float):
                msg = f"{path}: median of {gene} is {value!r}, not a number"
                raise DictionaryError(msg)
            out[gene] = float(value)
        return out
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{path}: cannot read gene medians ({e})"
        raise DictionaryError(msg) from None
    out = {}
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        try:
            out[parts[0]] = float(parts[1])
        except (IndexError, ValueError):
            msg = f"{path}: line {n} is not 'ensembl_id<TAB>median'"
            raise DictionaryError(msg) from None
    return out


def _recorded_digest_problems(root: Path, manifest: Manifest | None,
                              names: tuple[str, ...]) -> list[Problem]:
    """Files among ``names`` whose sha256 differs from the one the manifest records (or that are gone)."""
    recorded = manifest.files if manifest is not None else {}
    problems = []
    for name in names:
        if name not in recorded:
            continue
        path = root / name
        if not path.is_file():
            problems.append(Problem(f"{name} is missing; the manifest records it"))
        elif sha256_of_path(path)[0] != recorded[name]:
            problems.append(Problem(f"{name}: sha256 differs from the manifest's; the file was changed after "
                                    f"the corpus was written"))
    return problems


def _check_dictionaries(files: CorpusFiles, gene_medians: Path | None,
                        layout: Layout) -> tuple[_Tally, _Vocabulary | None]:
    """Load the token dictionary and medians and check that they are complete and unchanged."""
    tally = _Tally("dictionaries")
    manifest = files.manifest
    dictionary = None
    if files.token_dictionary is None:
        tally.skipped = "no token dictionary (give --token-dictionary): tokens are not checked"
    else:
        try:
            dictionary = TokenDictionary.load(files.token_dictionary)
        except DictionaryError as e:
            tally.fail(Problem(str(e)))
    if dictionary is not None:
        missing = [t for t in layout.special_tokens if t not in dictionary.special]
        if missing:
            tally.fail(Problem(f"{files.token_dictionary}: has no {missing[0]} token, which layout "
                               f"{layout.name} needs"))

    in_folder = files.gene_medians_files
    sources = [gene_medians] if gene_medians else [p for p in in_folder if p.is_file()]
    loaded: list[tuple[Path, dict[str, float]]] = []
    for path in sources:
        try:
            loaded.append((path, _read_median_values(path)))
        except DictionaryError as e:
            tally.fail(Problem(str(e)))
    if len(loaded) == 2:
        (path_a, a), (path_b, b) = loaded
        differ = sorted(g for g in a.keys() | b.keys() if not _same_median(a.get(g), b.get(g)))
        for gene in differ[:MAX_PROBLEMS]:
            tally.fail(Problem(f"{path_a.name} and {path_b.name} disagree on {gene}: {a.get(gene)!r} vs "
                               f"{b.get(gene)!r}"))
        tally.n_failed += max(len(differ) - MAX_PROBLEMS, 0)
    medians = loaded[0][1] if loaded else None
    if not sources and manifest is not None:
        tally.fail(Problem("gene_medians.tsv and gene_medians.pkl are missing"))
    elif not sources:
        tally.notes.append("no median dictionary (give --gene-medians): medians are not checked")

    for problem in _recorded_digest_problems(files.root, manifest, (TOKEN_DICTIONARY, GENE_MEDIANS_TSV,
                                                                    GENE_MEDIANS_PKL)):
        tally.fail(problem)

    if dictionary is None:
        return tally, None
    per_gene = None
    if medians is not None:
        per_gene = np.array([medians.get(g, np.nan) for g in dictionary.gene_ids.tolist()], dtype=np.float64)
        tally.n_checked = len(per_gene)
        # a dictionary given to `build` whose genes were not all detected: those have no median
        absent_allowed = bool(manifest is not None and manifest.parameters.token_dictionary
                              and manifest.medians.source == "computed")
        n_absent = 0
        for gene, value in zip(dictionary.gene_ids.tolist(), per_gene.tolist(), strict=True):
            if gene not in medians:
                n_absent += 1
                if not absent_allowed:
                    tally.fail(Problem(f"gene {gene} of the token dictionary has no median"))
            elif not (math.isfinite(value) and value > 0):
                tally.fail(Problem(f"median of {gene} is {value!r}; medians must be finite and positive"))
        if n_absent and absent_allowed:
            tally.notes.append(f"{n_absent:,} genes of the given token dictionary were not detected "
                               f"(no median)")
        _compare_with_source_medians(tally, manifest, dictionary, medians)
    return tally, _Vocabulary(dictionary, per_gene)


def _same_median(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def _compare_with_source_medians(tally: _Tally, manifest: Manifest | None, dictionary: TokenDictionary,
                                 medians: dict[str, float]) -> None:
    """The corpus's medians must equal those of the file it was made with (when that is unchanged)."""
    provenance = manifest.medians if manifest is not None else None
    if not isinstance(provenance, GivenMedians):
        return
    source = Path(provenance.source)
    if not source.is_file():
        tally.notes.append(f"median source {source} not found: corpus medians not compared with it")
        return
    if sha256_of_path(source)[0] != provenance.sha256:
        tally.notes.append(f"median source {source} changed since the build: corpus medians not "
                           f"compared with it")
        return
    try:
        given = load_gene_medians(source)
    except DictionaryError as e:
        tally.fail(Problem(str(e)))
        return
    for gene in dictionary.gene_ids.tolist():
        if gene in medians and gene in given and medians[gene] != given[gene]:
            tally.fail(Problem(f"median of {gene} is {medians[gene]!r}; {source.name}, which the corpus "
                               f"was made with, gives {given[gene]!r}"))


# ------------------------------------------------------------------------------------------- inputs


def _check_inputs(manifest: Manifest | None, *, check_inputs: bool,
                  require_inputs: bool) -> tuple[_Tally, set[int]]:
    """Which datasets' inputs are present and unchanged (sha256 as recorded)."""
    tally = _Tally("inputs")
    if manifest is None:
        tally.skipped = "no manifest.json: the inputs are unknown"
        return tally, set()
    if not check_inputs:
        tally.skipped = "not requested"
        return tally, set()
    available = set()
    remote = 0
    for i, entry in enumerate(manifest.datasets):
        tally.n_checked += 1
        path, digest = entry.path, entry.sha256
        if entry.soma is not None:
            reason = _soma_input_problem(entry)
            if reason is None:
                available.add(i)
                continue
            if not entry.soma.local:  # nothing to check: a note, never a failure
                tally.notes.append(Problem(reason, dataset_id=entry.dataset_id).describe())
                remote += 1
                continue
        elif entry.in_memory:
            reason = "an in-memory AnnData; it cannot be read again"
        elif not Path(path).exists():
            reason = f"{path} not found"
        elif sha256_of_path(path)[0] != digest:
            reason = f"{path} changed since the corpus was made (sha256 differs from the manifest's)"
        else:
            available.add(i)
            continue
        problem = Problem(reason, dataset_id=entry.dataset_id)
        if require_inputs:
            tally.fail(problem)
        else:
            tally.notes.append(problem.describe())
    n_missing = tally.n_checked - len(available) - remote
    if n_missing and not require_inputs:
        tally.skipped = (f"{n_missing} of {tally.n_checked} inputs missing or changed: their cells are not "
                         f"recomputed (--require-inputs makes this a failure)")
    elif remote:
        tally.skipped = (f"{remote} of {tally.n_checked} inputs are remote TileDB-SOMA experiments: not checked "
                         "(taken to be immutable at their snapshot), their cells not recomputed")
    return tally, available


def _soma_input_problem(entry: DatasetRecord) -> str | None:
    """Why a TileDB-SOMA experiment cannot be read again as the build read it (None: it can).

    A local experiment is listed again (its files and their sizes: the token); a remote one is not checked,
    nor read (recomputing a sample would read whole queries over the network).
    """
    assert entry.soma is not None
    uri = entry.soma.uri
    if not entry.soma.local:
        return (f"{uri} is a remote TileDB-SOMA experiment: not checked (taken to be immutable at its snapshot "
                f"{entry.soma.snapshot_ms}); its cells are not recomputed")
    folder = local_experiment_path(uri)
    if folder is None or not folder.is_dir():
        return f"{uri} not found"
    if experiment_identity(uri, snapshot_ms=entry.soma.snapshot_ms).token != entry.soma.token:
        return f"{uri} changed since the corpus was made (its files differ from the manifest's listing)"
    return None


# ----------------------------------------------------------------------------------------- encoding


def _normalized_values(counts: np.ndarray, depth: np.ndarray, median: np.ndarray,
                       arithmetic: Arithmetic) -> np.ndarray:
    """``count / depth * 10,000 / median`` per entry, evaluated as ``arithmetic`` says (float64 result).

    The same operations, in the same dtypes, as ``_value`` in :func:`genecorpus._kernels.rank_value_encode_csr`,
    written in NumPy.
    """
    if arithmetic.reciprocal:
        r32 = np.float32(1.0) / depth.astype(np.float32)
        if arithmetic.head_dtype == "float32":
            head = ((counts.astype(np.float32) * r32) * np.float32(_TOKEN_SCALE)).astype(np.float64)
        else:
            r64 = r32.astype(np.float64) if arithmetic.reciprocal_dtype == "float32" else 1.0 / depth
            head = (counts * r64) * _TOKEN_SCALE
        return head * np.divide(1.0, median)
    if arithmetic.head_dtype == "float32":
        head32 = (counts.astype(np.float32) / depth.astype(np.float32)) * np.float32(_TOKEN_SCALE)
        head = head32.astype(np.float64)
    else:
        head = counts / depth * _TOKEN_SCALE
    return head / median


@dataclass(frozen=True)
class _InputBlock:
    """Input cells ``start:start + n`` mapped to the dictionary's genes, with depth and arithmetic."""

    start: int
    cell_ids: np.ndarray
    """Object array of str."""
    genes: sp.csr_matrix
    """Cells × dictionary genes, input columns of one gene summed (int64)."""
    depth: np.ndarray
    """Per cell ``n_counts`` (float64)."""
    arithmetic: Arithmetic


class _InputCells:
    """One input dataset read block by block in input order, to find the corpus's cells by ``cell_id``.

    The dataset is read as the build read it (:func:`~genecorpus.dataset.plan_dataset` with the recorded
    gene identifiers, release, mapping and depth), onto the token dictionary's genes. Corpus cells of a
    dataset are a subsequence of its input cells, so each cell is looked for after the previous one found;
    a cell id that occurs several times in the input is matched to its first occurrence after that point.
    """

    def __init__(self, record: DatasetRecord, vocab: _Vocabulary, *, mapping: dict[str, str] | None,
                 geneformer_arithmetic: bool) -> None:
        spec = record.spec.model_copy(update={"release": record.spec.release or record.genes.release})
        self.dataset_id = spec.dataset_id
        plan = plan_dataset(spec, universe=vocab.gene_ids, mapping=mapping,
                            use_obs_n_counts=record.depth is DepthSource.OBS_N_COUNTS,
                            snapshot_ms=record.soma.snapshot_ms if record.soma is not None else None)
        if record.split_value is not None:  # read only the part's cells
            plan = next((p for p in split_dataset(plan) if p.part == record.split_value), plan)
        self.plan: DatasetPlan = plan
        self.blocks: Iterator[GeneBlock] = self.plan.read_blocks(0, self.plan.n_cells, block_size=DEFAULT_BLOCK_SIZE)
        self.geneformer_arithmetic = geneformer_arithmetic
        self.block: _InputBlock | None = None
        self.position = 0
        """Next cell of ``block`` to look at."""

    def find(self, cell_id: str) -> tuple[_InputBlock, int] | None:
        """The block and row of the next input cell named ``cell_id``, or None when there is none."""
        while True:
            block = self.block
            if block is not None:
                if self.position < len(block.cell_ids) and block.cell_ids[self.position] == cell_id:
                    hit = self.position
                else:
                    hits = np.flatnonzero(block.cell_ids[self.position:] == cell_id)
                    hit = self.position + int(hits[0]) if hits.size else -1
                if hit >= 0:
                    self.position = hit + 1
                    return block, hit
            read = next(self.blocks, None)
            if read is None:
                self.block = None
                return None
            arithmetic = Arithmetic.geneformer_of(read) if self.geneformer_arithmetic else SPEC_ARITHMETIC
            cell_ids = np.array([str(c) for c in read.cell_ids.tolist()], dtype=object)
            self.block = _InputBlock(read.start, cell_ids, read.genes, read.depth, arithmetic)
            self.position = 0

    def close(self) -> None:
        close = getattr(self.blocks, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class _CorpusCell:
    """A corpus row waiting to be compared with its input cell."""

    shard: str
    row: int
    cell_id: str
    tokens: np.ndarray


@dataclass(frozen=True)
class _RankedCells:
    """The expressed dictionary genes of some input cells, each cell sorted by (value desc, token asc)."""

    tokens: np.ndarray
    """int64, cell after cell."""
    values: np.ndarray
    """float64, aligned with ``tokens``."""
    bounds: np.ndarray
    """Cell ``i`` is ``bounds[i]:bounds[i + 1]`` (int64)."""

    @classmethod
    def rank(cls, block: _InputBlock, rows: np.ndarray, vocab: _Vocabulary) -> _RankedCells:
        sub = block.genes[rows]
        cell = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
        gene = sub.indices.astype(np.int64)
        counts = sub.data
        median = vocab.medians[gene] if vocab.medians is not None else np.full(len(gene), np.nan)
        ok = np.isfinite(median) & (median > 0)
        cell, gene, counts, median = cell[ok], gene[ok], counts[ok], median[ok]
        values = _normalized_values(counts, block.depth[rows][cell], median, block.arithmetic)
        tokens = vocab.tokens[gene]
        order = np.lexsort((tokens, -values, cell))
        bounds = np.searchsorted(cell[order], np.arange(len(rows) + 1))
        return cls(tokens[order], values[order], bounds)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and values of cell ``i``, highest value first."""
        span = slice(self.bounds[i], self.bounds[i + 1])
        return self.tokens[span], self.values[span]


class _EncodingCheck:
    """Recomputes corpus cells from their inputs, one input block at a time."""

    def __init__(self, tally: _Tally, manifest: Manifest, vocab: _Vocabulary, layout: Layout,
                 available: set[int]) -> None:
        self.tally = tally
        self.entries = manifest.datasets
        self.use_obs_n_counts = manifest.parameters.use_obs_n_counts
        self.vocab = vocab
        self.layout = layout
        self.available = available
        self.geneformer_arithmetic = manifest.mode == "tokenize"
        self.mapping_path = manifest.parameters.gene_mapping
        self.mapping: dict[str, str] | None = None
        self.dataset = -1
        self.cells: _InputCells | None = None
        self.pending: list[tuple[int, _CorpusCell]] = []
        self.pending_block: _InputBlock | None = None
        self.n_not_checked = 0

    def add(self, dataset: int, cell: _CorpusCell) -> None:
        """Queue a corpus cell of dataset ``dataset`` (manifest index); rows come in corpus order."""
        if dataset not in self.available or dataset < self.dataset:
            self.n_not_checked += 1
            return
        if dataset != self.dataset:
            self._open(dataset)
        if self.cells is None:
            self.n_not_checked += 1
            return
        try:
            found = self.cells.find(cell.cell_id)
        except (GenecorpusError, OSError, ValueError, KeyError) as e:
            self._give_up(f"cannot read its input ({_one_line(e)}); its other cells are not checked")
            self.n_not_checked += 1
            return
        if found is None:
            self.tally.fail(Problem(f"not found in the input {self.entries[dataset].path} after the "
                                    f"previous cell; the dataset's later cells are not checked",
                                    cell.shard, cell.row, cell.cell_id))
            self._give_up(None)
            return
        block, row = found
        if self.pending_block is not None and block is not self.pending_block:
            self._flush()
        self.pending_block = block
        self.pending.append((row, cell))

    def finish(self) -> None:
        """Check what is queued and close the input."""
        self._open(-1)

    def _open(self, dataset: int) -> None:
        self._flush()
        if self.cells is not None:
            self.cells.close()
            self.cells = None
        self.dataset = dataset
        if dataset < 0:
            return
        entry = self.entries[dataset]
        try:
            if self.mapping_path and self.mapping is None:
                self.mapping = {str(k): str(v) for k, v in load_pickled_dict(self.mapping_path).items()}
            self.cells = _InputCells(entry, self.vocab, mapping=self.mapping,
                                     geneformer_arithmetic=self.geneformer_arithmetic)
        except (GenecorpusError, OSError, ValueError, KeyError) as e:
            self.tally.fail(Problem(f"cannot open its input {entry.path} ({_one_line(e)})",
                                    dataset_id=entry.dataset_id))

    def _give_up(self, message: str | None) -> None:
        """Stop checking the current dataset (an input cell was not found or could not be read)."""
        if message is not None:
            self.tally.fail(Problem(message, dataset_id=self.entries[self.dataset].dataset_id))
        self._flush()
        if self.cells is not None:
            self.cells.close()
            self.cells = None

    def _flush(self) -> None:
        block, pending = self.pending_block, self.pending
        self.pending_block, self.pending = None, []
        if block is None or not pending:
            return
        ranked = _RankedCells.rank(block, np.array([row for row, _ in pending], dtype=np.int64), self.vocab)
        special = self.vocab.dictionary.special
        for i, (_, cell) in enumerate(pending):
            self.tally.n_checked += 1
            tokens, values = ranked.cell(i)
            expected = tokens[: self.layout.max_genes]
            if self.layout.wrap_cls_eos:
                expected = np.concatenate([[special.get("<cls>", -1)], expected, [special.get("<eos>", -1)]])
            if np.array_equal(cell.tokens, expected):
                continue
            problem = None
            if self.tally.wants_problems:
                message = _describe_mismatch(cell.tokens, tokens, values, expected, layout=self.layout,
                                             vocab=self.vocab)
                problem = Problem(message, cell.shard, cell.row, cell.cell_id)
            self.tally.fail(problem)


def _describe_mismatch(stored: np.ndarray, tokens: np.ndarray, values: np.ndarray, expected: np.ndarray, *,
                       layout: Layout, vocab: _Vocabulary) -> str:
    """What is wrong with a cell whose tokens differ from the expected encoding.

    ``tokens``/``values`` are the input cell's expressed vocabulary genes, highest value first.
    """
    first = 1 if layout.wrap_cls_eos else 0
    body = [int(t) for t in stored[first: len(stored) - first]]
    exp_body = [int(t) for t in expected[first: len(expected) - first]]
    value_of = dict(zip(tokens.tolist(), values.tolist(), strict=True))

    def name(t: int) -> str:
        value = f", value {value_of[t]:.9g}" if t in value_of else ""
        return f"{t} ({vocab.gene_of(t)}{value})"

    for k, t in enumerate(body):
        if t not in value_of:
            return f"token {name(t)} at position {k + first} is not expressed in the input cell"
    for k in range(len(body) - 1):
        a, b = body[k], body[k + 1]
        if value_of[a] < value_of[b] or (value_of[a] == value_of[b] and a > b):
            return (f"tokens out of order at positions {k + first} and {k + first + 1}: {name(a)} before "
                    f"{name(b)} (values must not increase; ties by ascending token)")
    for k, (t, e) in enumerate(zip(body, exp_body, strict=False)):
        if t != e:
            return f"position {k + first}: the input gives token {name(e)}, the corpus has {name(t)}"
    if len(body) != len(exp_body):
        return f"{len(body)} gene tokens; the input gives {len(exp_body)} (layout {layout.name})"
    return "special tokens differ from the layout's"


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


# ------------------------------------------------------------------------------------------- shards


_COLUMNS = ("input_ids", "dataset_id", "cell_id", "length")


@contextlib.contextmanager
def _open_shard(shard: Path, kind: str) -> Iterator[tuple[pa.Schema, Iterator[pa.RecordBatch]]]:
    """A shard's schema and its record batches, in row order."""
    if kind == "arrow":
        with pa.OSFile(str(shard)) as source, pa.ipc.open_stream(source) as reader:  # RSS: one batch
            yield reader.schema, iter(reader)
    else:
        parquet = pq.ParquetFile(shard)
        columns = [c for c in _COLUMNS if c in parquet.schema_arrow.names]
        yield parquet.schema_arrow, parquet.iter_batches(columns=columns)


def _schema_problem(schema: pa.Schema) -> str | None:
    for name in ("input_ids", "length"):
        if name not in schema.names:
            return f"no {name!r} column (columns: {', '.join(schema.names)})"
    ids = schema.field("input_ids").type
    if not (pa.types.is_list(ids) or pa.types.is_large_list(ids)) or not pa.types.is_integer(ids.value_type):
        return f"input_ids is {ids}, not a list of integers"
    if not pa.types.is_integer(schema.field("length").type):
        return f"length is {schema.field('length').type}, not an integer"
    return None


_CELL_CHECKS = {
    "lengths": _kernels.CELL_LENGTH_MISMATCH,
    "tokens": _kernels.CELL_TOKEN_OUT_OF_RANGE | _kernels.CELL_TOKEN_NOT_IN_DICTIONARY
    | _kernels.CELL_GENE_WITHOUT_MEDIAN,
    "layout": _kernels.CELL_TOO_LONG | _kernels.CELL_SPECIAL_MISPLACED,
    "unique_tokens": _kernels.CELL_DUPLICATE_TOKEN,
    "nonempty_cells": _kernels.CELL_EMPTY,
}
"""Which per-cell problem bits each per-cell check reports."""


class _CorpusScan:
    """One pass over the shards, batch by batch, feeding every check."""

    def __init__(self, files: CorpusFiles, *, layout: Layout, vocab: _Vocabulary | None,
                 lengths_file: np.ndarray | None, lengths_tally: _Tally, encoding: _EncodingCheck | None,
                 sample_stride: int) -> None:
        self.files = files
        self.layout = layout
        self.vocab = vocab
        self.tallies = {name: _Tally(name) for name in ("shards", "cell_counts", *_CELL_CHECKS)}
        self.tallies["lengths_file"] = lengths_tally
        self.kinds = vocab.token_kinds() if vocab is not None else np.zeros(0, dtype=np.int8)
        self.special = vocab.dictionary.special if vocab is not None else {}
        # without a dictionary the special tokens are unknown: only the length limit is checked
        self.wrap = layout.wrap_cls_eos and vocab is not None
        self.max_length = layout.max_genes + (2 if layout.wrap_cls_eos else 0)
        self.seen = np.zeros(len(self.kinds), dtype=np.int64)
        self.lengths_file = lengths_file
        self.encoding = encoding
        self.sample_stride = sample_stride
        self.dataset_ids = [d.dataset_id for d in files.manifest.datasets] if files.manifest is not None else []
        self.dataset_rows = np.zeros(len(self.dataset_ids), dtype=np.int64)
        self.last_dataset = -1
        self.has_dataset_column = False
        self.n_rows = 0
        self.n_tokens = 0

    def scan(self, shard: Path) -> None:
        """Check every row of one shard; a shard that cannot be read is reported and skipped."""
        tally = self.tallies["shards"]
        tally.n_checked += 1
        row = 0
        try:
            with _open_shard(shard, self.files.kind) as (schema, batches):
                problem = _schema_problem(schema)
                if problem is not None:
                    tally.fail(Problem(problem, shard.name))
                    return
                for batch in batches:
                    self._scan_batch(shard.name, row, batch)
                    row += batch.num_rows
        except (OSError, pa.ArrowException) as e:
            where = f" after row {row}" if row else ""
            tally.fail(Problem(f"cannot be read{where} ({_one_line(e)})", shard.name))

    def _scan_batch(self, shard: str, first_row: int, batch: pa.RecordBatch) -> None:
        n = batch.num_rows
        ids = batch.column("input_ids")
        values = ids.values
        if values.null_count:
            values = pc.fill_null(values, -1)
        tokens = values.to_numpy(zero_copy_only=False)
        offsets = ids.offsets.to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(batch.column("length"), -1).cast(pa.int64()).to_numpy(zero_copy_only=False)
        span = tokens[offsets[0]:offsets[-1]]
        if self.vocab is None and span.size:
            needed = min(int(span.max()) + 1, _NO_DICTIONARY_MAX_ID)
            if needed > len(self.seen):
                self.seen = np.zeros(needed, dtype=np.int64)
        flags = _kernels.cell_problems_csr(
            tokens, offsets, lengths, self.kinds, self.special.get("<cls>", -1),
            self.special.get("<eos>", -1), self.wrap, self.max_length, self.seen, self.n_rows + 1)
        cell_ids = batch.column("cell_id") if "cell_id" in batch.schema.names else None

        def cell_id(i: int) -> str | None:
            return None if cell_ids is None else cell_ids[i].as_py()

        for name, bits in _CELL_CHECKS.items():
            if name == "tokens" and self.vocab is None:
                continue
            tally = self.tallies[name]
            tally.n_checked += n

            def problem_of(i: int, bits: int = bits) -> Problem:
                row = tokens[offsets[i]:offsets[i + 1]]
                message = self._describe(int(flags[i]) & bits, row, int(lengths[i]))
                return Problem(message, shard, first_row + i, cell_id(i))

            tally.fail_rows(np.flatnonzero(flags & bits), problem_of)

        dataset = self._count_datasets(batch, shard, first_row, cell_id)
        self._compare_lengths_file(lengths, shard, first_row, cell_id)
        if self.encoding is not None and dataset is not None and cell_ids is not None:
            global_rows = self.n_rows + np.arange(n)
            for i in np.flatnonzero((global_rows % self.sample_stride == 0) & (dataset >= 0)).tolist():
                cid = cell_id(i)
                if cid is None:
                    self.encoding.n_not_checked += 1
                    continue
                row_tokens = tokens[offsets[i]:offsets[i + 1]].astype(np.int64)
                self.encoding.add(int(dataset[i]), _CorpusCell(shard, first_row + i, cid, row_tokens))
        self.n_rows += n
        self.n_tokens += int(lengths.sum())

    def _count_datasets(self, batch: pa.RecordBatch, shard: str, first_row: int,
                        cell_id: Callable[[int], str | None]) -> np.ndarray | None:
        """Count rows per dataset; report unknown dataset ids and rows out of manifest order."""
        if self.files.manifest is None or "dataset_id" not in batch.schema.names:
            return None
        self.has_dataset_column = True
        tally = self.tallies["cell_counts"]
        column = batch.column("dataset_id")
        index = pc.fill_null(pc.index_in(column, value_set=pa.array(self.dataset_ids, pa.string())), -1)
        dataset = index.to_numpy(zero_copy_only=False).astype(np.int64)
        known = dataset >= 0
        self.dataset_rows += np.bincount(dataset[known], minlength=len(self.dataset_ids))
        tally.fail_rows(np.flatnonzero(~known), lambda i: Problem(
            f"dataset_id {column[i].as_py()!r} is not a dataset of the manifest", shard, first_row + i,
            cell_id(i)))
        sequence = np.concatenate([[self.last_dataset], dataset[known]])
        backwards = np.flatnonzero(np.diff(sequence) < 0)
        if backwards.size:
            i = int(np.flatnonzero(known)[backwards[0]])
            before = self.dataset_ids[sequence[backwards[0]]]
            problem = Problem(f"dataset {self.dataset_ids[dataset[i]]!r} after {before!r}: rows are not in "
                              f"manifest order", shard, first_row + i, cell_id(i))
            tally.fail(problem, count=int(backwards.size))
        if known.any():
            self.last_dataset = int(dataset[known][-1])
        return dataset

    def _compare_lengths_file(self, lengths: np.ndarray, shard: str, first_row: int,
                              cell_id: Callable[[int], str | None]) -> None:
        if self.lengths_file is None:
            return
        tally = self.tallies["lengths_file"]
        recorded = self.lengths_file[self.n_rows: self.n_rows + len(lengths)]
        tally.n_checked += len(recorded)
        tally.fail_rows(np.flatnonzero(recorded != lengths[: len(recorded)]), lambda i: Problem(
            f"lengths.pkl has {recorded[i]}, the length column {lengths[i]}", shard, first_row + i,
            cell_id(i)))

    def _describe(self, flags: int, row: np.ndarray, length: int) -> str:
        """The problems ``flags`` of one row, in words."""
        vocab = self.vocab
        words = []
        tokens = [int(t) for t in row]
        if flags & _kernels.CELL_LENGTH_MISMATCH:
            words.append(f"length is {length} but input_ids has {len(tokens)} tokens")
        if flags & _kernels.CELL_TOKEN_OUT_OF_RANGE:
            k = next(k for k, t in enumerate(tokens) if t < 0 or t >= len(self.kinds))
            words.append(f"token {tokens[k]} at position {k} is outside the dictionary's ids "
                         f"0..{len(self.kinds) - 1}")
        for bit, kind, what in ((_kernels.CELL_TOKEN_NOT_IN_DICTIONARY, _kernels.TOKEN_UNKNOWN,
                                 "is not a token of the dictionary"),
                                (_kernels.CELL_GENE_WITHOUT_MEDIAN, _kernels.TOKEN_GENE_WITHOUT_MEDIAN,
                                 "is a gene without a median (not in the vocabulary)")):
            if flags & bit:
                k = next(k for k, t in enumerate(tokens)
                         if 0 <= t < len(self.kinds) and self.kinds[t] == kind)
                gene = f" ({vocab.gene_of(tokens[k])})" if vocab is not None else ""
                words.append(f"token {tokens[k]}{gene} at position {k} {what}")
        if flags & _kernels.CELL_DUPLICATE_TOKEN:
            seen: dict[int, int] = {}
            for k, t in enumerate(tokens):
                if t in seen:
                    gene = f" ({vocab.gene_of(t)})" if vocab is not None else ""
                    words.append(f"token {t}{gene} at positions {seen[t]} and {k}")
                    break
                seen[t] = k
        if flags & _kernels.CELL_EMPTY:
            words.append("no gene token" if tokens else "no token")
        if flags & _kernels.CELL_TOO_LONG:
            words.append(f"{len(tokens)} tokens, more than the {self.max_length:,} of layout "
                         f"{self.layout.name}")
        if flags & _kernels.CELL_SPECIAL_MISPLACED:
            words.append(self._describe_specials(tokens))
        return "; ".join(words)

    def _describe_specials(self, tokens: list[int]) -> str:
        names = {v: k for k, v in self.special.items()}
        cls, eos = self.special.get("<cls>"), self.special.get("<eos>")
        if self.wrap:
            if not tokens or tokens[0] != cls:
                return f"first token is {tokens[0] if tokens else 'missing'}, not <cls> ({cls})"
            if len(tokens) < 2 or tokens[-1] != eos:
                return f"last token is {tokens[-1]}, not <eos> ({eos})"
        last = len(tokens) - 1
        for k, t in enumerate(tokens):
            if t in names and not (self.wrap and ((k == 0 and t == cls) or (k == last and t == eos))):
                return f"special token {names[t]} at position {k} (layout {self.layout.name})"
        return f"special tokens misplaced (layout {self.layout.name})"

    def results(self, manifest: Manifest | None, n_shards: int) -> dict[str, CheckResult]:
        """The results of the checks this pass feeds."""
        t = self.tallies
        out = {"shards": t["shards"].result(f"{n_shards} shard(s) read, {self.n_rows:,} cells")}

        counts = t["cell_counts"]
        if manifest is None:
            counts.skipped = "no manifest.json: nothing to compare the number of cells with"
        else:
            expected = manifest.corpus.n_cells
            counts.n_checked = len(self.dataset_ids)
            if expected != self.n_rows:
                counts.fail(Problem(f"the shards hold {self.n_rows:,} cells, the manifest says {expected:,}"))
            if self.has_dataset_column or not self.n_rows:
                for entry, got in zip(manifest.datasets, self.dataset_rows.tolist(), strict=True):
                    kept = entry.cells.kept
                    if kept != got:
                        counts.fail(Problem(f"{got:,} cells in the shards, the manifest says {kept:,} kept",
                                            dataset_id=entry.dataset_id))
            else:
                counts.notes.append("no dataset_id column: cells per dataset not compared")
        out["cell_counts"] = counts.result(f"{self.n_rows:,} cells in {len(self.dataset_ids)} dataset(s), "
                                           f"as the manifest says")

        lengths = t["lengths"]
        n_tokens = manifest.corpus.n_tokens if manifest is not None else None
        if n_tokens is not None and n_tokens != self.n_tokens:
            lengths.fail(Problem(f"the lengths add up to {self.n_tokens:,} tokens, the manifest says "
                                 f"{n_tokens:,}"))
        out["lengths"] = lengths.result(f"{self.n_rows:,} cells, {self.n_tokens:,} tokens")

        tokens = t["tokens"]
        if self.vocab is None:
            tokens.skipped = "no token dictionary (give --token-dictionary)"
        known = self.vocab is None or self.vocab.medians is not None
        out["tokens"] = tokens.result(f"{self.n_rows:,} cells: every token a gene of the dictionary"
                                      f"{'' if known else ' (no medians: vocabulary unknown)'}")
        layout = t["layout"]
        if self.vocab is None:
            layout.notes.append("no token dictionary: only the length limit is checked")
        rule = "<cls> first, <eos> last" if self.layout.wrap_cls_eos else "no special token"
        out["layout"] = layout.result(f"{self.n_rows:,} cells follow {self.layout.name} (at most "
                                      f"{self.max_length:,} tokens, {rule})")
        out["unique_tokens"] = t["unique_tokens"].result(f"{self.n_rows:,} cells without a repeated token")
        out["nonempty_cells"] = t["nonempty_cells"].result(f"{self.n_rows:,} cells with at least one gene")

        lengths_file = t["lengths_file"]
        if self.lengths_file is not None and len(self.lengths_file) != self.n_rows:
            lengths_file.fail(Problem(f"lengths.pkl has {len(self.lengths_file):,} entries for "
                                      f"{self.n_rows:,} cells"))
        out["lengths_file"] = lengths_file.result(f"{lengths_file.n_checked:,} lengths equal the length "
                                                  f"column")
        return out


# --------------------------------------------------------------------------------------------- main


def validate_corpus(
    path: str | os.PathLike[str],
    *,
    check_inputs: bool = True,
    require_inputs: bool = False,
    all_cells: bool = False,
    sample_cells: int = DEFAULT_SAMPLE_CELLS,
    token_dictionary: str | os.PathLike[str] | None = None,
    gene_medians: str | os.PathLike[str] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ValidationReport:
    """Check a corpus folder (or published parquet files) for consistency and against its inputs.

    Reads the shards once, batch by batch; see the module documentation for the checks. Problems in
    the corpus are reported, not raised.

    Parameters
    ----------
    path
        A corpus folder written by ``build``/``tokenize``, a ``save_to_disk`` folder, or parquet files.
    check_inputs
        Recompute cells from the inputs listed in the manifest (when present and unchanged).
    require_inputs
        Fail, rather than skip the recomputation, when an input is missing or changed.
    all_cells
        Recompute every cell instead of a sample of ``sample_cells`` spread over the corpus.
    sample_cells
        About how many cells to recompute (every k-th row).
    token_dictionary, gene_medians
        Dictionaries for a corpus folder that has none (e.g. the published Genecorpus-30M files).
    progress
        Called as ``progress("validate", shards_done, n_shards)``.

    Returns
    -------
    ValidationReport
        One :class:`CheckResult` per check; ``report.ok`` is True when none failed.

    Raises
    ------
    InputError
        ``path`` is neither a corpus folder nor parquet files.
    DictionaryError
        A dictionary file given as an argument does not exist.

    Examples
    --------
    >>> report = validate_corpus("my-corpus")  # doctest: +SKIP
    >>> report.ok, report.check("encoding").summary  # doctest: +SKIP
    (True, '1,000 cells recomputed from the inputs (sample), all equal')
    """
    for given in (token_dictionary, gene_medians):
        if given is not None and not Path(given).is_file():
            msg = f"{given}: no such dictionary file; check the path"
            raise DictionaryError(msg)
    files = CorpusFiles.locate(path, token_dictionary)
    manifest = files.manifest
    layout = _corpus_layout(files)
    dictionaries, vocab = _check_dictionaries(files, Path(gene_medians) if gene_medians else None, layout)
    inputs, available = _check_inputs(manifest, check_inputs=check_inputs, require_inputs=require_inputs)
    lengths_tally = _Tally("lengths_file")
    lengths_file = _load_lengths_file(files, lengths_tally)

    encoding_tally = _Tally("encoding")
    encoding = None
    if manifest is None:
        encoding_tally.skipped = "no manifest.json: the inputs are unknown"
    elif not check_inputs:
        encoding_tally.skipped = "not requested (--no-check-inputs)"
    elif vocab is None or vocab.medians is None:
        encoding_tally.skipped = "no token dictionary or medians to recompute cells with"
    elif not available:
        encoding_tally.skipped = "no input available to recompute cells from"
    else:
        encoding = _EncodingCheck(encoding_tally, manifest, vocab, layout, available)
    n_expected = (manifest.corpus.n_cells if manifest is not None else 0) or 1
    stride = 1 if all_cells else max(1, -(-n_expected // max(sample_cells, 1)))

    scan = _CorpusScan(files, layout=layout, vocab=vocab, lengths_file=lengths_file,
                       lengths_tally=lengths_tally, encoding=encoding, sample_stride=stride)
    for done, shard in enumerate(files.shards):
        scan.scan(shard)
        if progress is not None:
            progress("validate", done + 1, len(files.shards))
    if encoding is not None:
        encoding.finish()

    results = scan.results(manifest, len(files.shards))
    results["dictionaries"] = _dictionaries_result(dictionaries, vocab, manifest)
    soma = manifest is not None and any(d.soma is not None for d in manifest.datasets)
    results["inputs"] = inputs.result(f"{inputs.n_checked} input(s) present, sha256 as recorded"
                                      + (" (a SOMA experiment's: the listing of its files)" if soma else ""))
    results["encoding"] = _encoding_result(encoding_tally, encoding, stride)
    return ValidationReport(
        path=files.root if files.kind == "arrow" else Path(path), kind=files.kind, layout=layout.name,
        mode=manifest.mode if manifest is not None else None, n_shards=len(files.shards), n_cells=scan.n_rows,
        checks=tuple(results[name] for name in CHECKS),
        warnings=tuple(f"dataset {d.dataset_id} ({d.path}) was left out with --on-error skip (at {d.stage}): "
                       f"{d.error}" for d in (manifest.skipped if manifest is not None else ())),
    )


def _corpus_layout(files: CorpusFiles) -> Layout:
    """The manifest's layout; without a manifest the token dictionary's; else gc30m."""
    if files.manifest is not None:
        return LAYOUTS[files.manifest.corpus.layout]
    if files.token_dictionary is not None:
        with contextlib.suppress(DictionaryError):  # reported by the dictionaries check
            return TokenDictionary.load(files.token_dictionary).layout()
    return LAYOUTS["gc30m"]


def _load_lengths_file(files: CorpusFiles, tally: _Tally) -> np.ndarray | None:
    """``lengths.pkl`` as int64, or None (reported: missing, unreadable, or changed since the build)."""
    path = files.lengths_file
    for problem in _recorded_digest_problems(files.root, files.manifest, (LENGTHS,)):
        tally.fail(problem)
    if not path.is_file():
        if files.manifest is None:
            tally.skipped = f"no {LENGTHS}"
        elif not tally.n_failed:
            tally.fail(Problem(f"{LENGTHS} is missing"))
        return None
    try:
        return read_lengths(path)
    except InputError as e:
        tally.fail(Problem(str(e)))
        return None


def _dictionaries_result(tally: _Tally, vocab: _Vocabulary | None, manifest: Manifest | None) -> CheckResult:
    n_genes = len(vocab.gene_ids) if vocab is not None else 0
    if vocab is not None and vocab.medians is not None:
        summary = f"{n_genes:,} genes, each with a finite positive median"
    else:
        summary = f"token dictionary of {n_genes:,} genes loads"
    if manifest is not None and manifest.files:
        summary += "; files as the manifest records"
    return tally.result(summary)


def _encoding_result(tally: _Tally, encoding: _EncodingCheck | None, stride: int) -> CheckResult:
    if encoding is not None:
        if encoding.n_not_checked:
            tally.notes.append(f"{encoding.n_not_checked:,} sampled cells not checked (input unavailable or "
                               f"unreadable, or cell not found)")
        if not tally.n_checked and not tally.n_failed:
            tally.skipped = "no cell could be recomputed"
    what = "all cells" if stride == 1 else f"a sample, every {_ordinal(stride)} cell"
    verdict = f"{tally.n_failed:,} differ" if tally.n_failed else "all equal the expected encoding"
    return tally.result(f"{tally.n_checked:,} cells recomputed from the inputs ({what}); {verdict}")


def _ordinal(n: int) -> str:
    """``1`` → ``"1st"``, ``3`` → ``"3rd"``, ``12`` → ``"12th"``, ``1234`` → ``"1,234th"``."""
    suffix = "th" if 11 <= n % 100 <= 13 else ("th", "st", "nd", "rd", "th")[min(n % 10, 4)]
    return f"{n:,}{suffix}"
