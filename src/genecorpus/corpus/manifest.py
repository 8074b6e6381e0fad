"""The run record of a corpus (``manifest.json``) as a typed, frozen, versioned model.

``build`` and ``tokenize`` write one :class:`Manifest`; ``report``, ``validate``, ``inspect``, ``embed``,
``evaluate`` and the corpus reader read it back through :meth:`Manifest.read`, never as raw JSON. The
JSON is the model's dump, field by field, in the order written here; ``format`` names the version of the
record. Fields added after the first release (``skipped``, ``files``, ``timings``) have defaults, so
manifests written by genecorpus 0.1.0 keep opening.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from genecorpus.config import BuildConfig, DatasetSpec, Mode, describe_validation_error
from genecorpus.errors import InputError
from genecorpus.vocab import LayoutName

if TYPE_CHECKING:
    import os

__all__ = [
    "DROP_REASONS", "FORMAT", "RULE_ORDER", "CellCounts", "ComputedMedians", "CorpusSummary", "DatasetRecord",
    "DepthSource", "GeneMappingSummary", "GivenMedians", "Manifest", "QCThresholds", "SkippedDataset", "SomaInput",
    "Stage",
    "VocabularySummary", "package_versions",
]

FORMAT = "genecorpus/1"
"""The version of the record this module reads and writes."""

DROP_REASONS = ("filter_pass", "n_counts_outlier", "mito_outlier", "min_genes", "no_vocab_genes", "not_primary_data",
                "duplicate")
"""Why a cell was dropped. A dropped cell counts under the first rule it fails, in the order :data:`RULE_ORDER`;
the index of a reason here is what ``report/qc_sample.npz`` stores, so new reasons are only ever appended."""
RULE_ORDER = ("filter_pass", "not_primary_data", "duplicate", "n_counts_outlier", "mito_outlier", "min_genes",
              "no_vocab_genes")
"""The order in which the rules drop cells: pre-selection, curation, duplicates (so that QC sees each dataset
as it would be without its copies), QC, then encoding."""

Stage = Literal["plan", "qc", "duplicates", "medians", "encode"]
"""The pass of a build in which a skipped dataset failed."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class DepthSource(StrEnum):
    """Where each cell's depth (``n_counts``, the divisor of the normalization) comes from."""

    OBS_N_COUNTS = "obs n_counts"
    """The dataset's ``obs["n_counts"]`` column (Geneformer's convention)."""
    TOTAL_COUNTS = "sum of counts over all input genes"
    """The sum of the cell's counts over every input column, mapped or not."""


class GeneMappingSummary(_Record):
    """How one dataset's gene columns were mapped onto the gene universe."""

    n_input_genes: int
    """Gene columns of the input."""
    id_kind: Literal["ensembl", "symbol"]
    """What the identifiers were taken to be."""
    release: str | None
    """Annotation release of the symbols (declared or detected); None for Ensembl IDs or a mapping."""
    n_unmapped: int
    """Columns whose identifier names no gene."""
    n_ambiguous: int
    """Columns whose symbol names several genes."""
    n_columns_in_universe: int
    """Columns that map into the gene universe (candidate genes, or the token dictionary's)."""
    n_genes_in_universe: int
    """Distinct universe genes they map to (columns of one gene are summed)."""
    n_mito_columns: int
    """Columns of mitochondrial genes."""
    n_filtered_out: int = 0
    """Columns left out because ``var["feature_is_filtered"]`` marks them (CELLxGENE's curation)."""


class QCThresholds(_Record):
    """One dataset's QC rule, fixed after its statistics pass (SPEC §2.3)."""

    enabled: bool
    """False: only ``filter_pass`` and cells without vocabulary genes drop cells (``tokenize``)."""
    n_counts_mean: float
    n_counts_sd: float
    """Population SD of ``n_counts`` over the pre-selected cells."""
    n_counts_range: tuple[float, float]
    """Cells outside ``mean ± n_sd · sd`` are dropped."""
    mito_rule: bool
    """Whether the mitochondrial rule applied (QC on, and the dataset has mitochondrial genes)."""
    mito_mode: Literal["counts", "fraction"]
    mito_mean: float
    mito_sd: float
    mito_range: tuple[float, float]
    min_genes: int
    """Cells with fewer detected candidate genes are dropped."""


class CellCounts(_Record):
    """One dataset's cells: ``n_in == kept + sum(dropped.values())``."""

    n_in: int = Field(alias="in")
    """Cells in the input."""
    kept: int
    """Cells in the corpus."""
    dropped: dict[str, int]
    """Dropped cells by reason, every reason of :data:`DROP_REASONS` listed in that order."""

    @field_validator("dropped")
    @classmethod
    def _every_reason(cls, value: dict[str, int]) -> dict[str, int]:
        # reasons added after a manifest was written dropped no cell of it
        unknown = sorted(set(value) - set(DROP_REASONS))
        if unknown:
            msg = f"unknown drop reason {unknown[0]!r}; known: {', '.join(DROP_REASONS)}"
            raise ValueError(msg)
        return {reason: value.get(reason, 0) for reason in DROP_REASONS}


class SomaInput(_Record):
    """A TileDB-SOMA experiment read by a dataset: which cells of which snapshot, and what names its content."""

    uri: str
    """Local folder or URI of the experiment (as the manifest gave it)."""
    snapshot_ms: int
    """TileDB timestamp (ms since 1970) at which every object of the experiment was opened: reading it again at
    this timestamp gives the same cells."""
    token: str
    """``soma-files:<sha256>`` of the listing of a local experiment's files (relative path and size), or
    ``soma-uri:<sha256>`` of a remote one's URI and snapshot (taken to be immutable)."""
    local: bool
    """A local experiment (its listing can be checked again)."""
    measurement: str
    layer: str
    """The X layer the counts were read from."""
    value_filter: str | None
    """The obs filter that selected the cells (None: every cell)."""
    n_selected: int
    """Cells the filter selected (in every part of a split)."""
    n_vars: int
    """Genes of the measurement."""


class DatasetRecord(_Record):
    """One dataset of the corpus: where it came from, how it was read, and where its cells went."""

    dataset_id: str
    path: str
    """The input; ``"<AnnData>"`` for an in-memory object; a TileDB-SOMA experiment's URI."""
    sha256: str
    """The input's sha256 (a folder's: over its files); ``"in-memory"`` for an AnnData; a TileDB-SOMA
    experiment's token (see :attr:`SomaInput.token`: its files are listed, not hashed)."""
    bytes: int
    """The input's size (a local SOMA experiment's files; 0 for a remote one)."""
    spec: DatasetSpec
    genes: GeneMappingSummary
    depth: DepthSource
    filter_column: str | None
    """The pre-selection column found in the input (None: all cells pre-selected)."""
    qc: QCThresholds
    cells: CellCounts
    matrix: str | None = None
    """The matrix the counts were read from (``X``, ``raw.X`` or ``layers['counts']``; chosen by
    ``counts = "auto"``); None in manifests written before it was recorded (then ``spec`` says)."""
    select_columns: tuple[str, ...] = ()
    """Further pre-selection columns found in the input (``spec.select_columns``)."""
    primary_column: str | None = None
    """``is_primary_data`` when the input has it and ``spec.primary_only`` (its False cells were dropped)."""
    split_value: str | None = None
    """For a part of a file split by ``spec.split_by``: the value its cells hold (its id is ``<id>/<value>``)."""
    soma: SomaInput | None = None
    """For a TileDB-SOMA experiment: the snapshot and query read (None for files)."""

    @property
    def in_memory(self) -> bool:
        """The dataset was an in-memory AnnData, which cannot be read again."""
        return self.sha256 == "in-memory"


class ComputedMedians(_Record):
    """Medians computed by the build."""

    source: Literal["computed"] = "computed"
    method: str
    datasets: tuple[str, ...]
    """Datasets whose kept cells fed the medians."""
    n_detected_genes: int


class GivenMedians(_Record):
    """Medians read from a file (``gene_medians`` of the manifest, ``--gene-medians``)."""

    source: str
    """The file."""
    sha256: str


class VocabularySummary(_Record):
    """The token dictionary written beside the shards."""

    n_genes: int
    n_tokens: int
    """Genes and special tokens."""
    special_tokens: dict[str, int]


class CorpusSummary(_Record):
    """What the shards hold."""

    n_cells: int
    n_tokens: int
    layout: LayoutName
    shards: tuple[str, ...]
    """Shard file names, in row order."""
    columns: tuple[str, ...]


class SharedCells(_Record):
    """Cells of dataset ``b`` that are copies of cells of dataset ``a`` (``a`` earlier in the manifest)."""

    a: str
    b: str
    n_cells: int


class DuplicatesSummary(_Record):
    """What duplicate detection found (:mod:`genecorpus.duplicates`)."""

    policy: Literal["drop", "report"]
    rule: str
    """The verification rule, in words."""
    n_key_pairs: int = 0
    """Pairs of cells that shared a fingerprint key (counted once per key range in which they did)."""
    n_candidate_pairs: int
    """Of those, the pairs whose sketches agree: verified on their counts."""
    n_verified_pairs: int
    """Of those, the pairs verification calls the same cell (across datasets and within)."""
    n_common_keys: int
    """Keys shared by too many cells to make candidates (very shallow cells)."""
    shared: tuple[SharedCells, ...]
    """Per pair of datasets that share cells, how many (every pair with at least one)."""
    within: dict[str, int]
    """Per dataset with any: cells identical to an earlier cell of the same dataset (reported, not dropped)."""
    n_dropped: int
    """Cells dropped as later copies (0 with ``report``)."""


class SkippedDataset(_Record):
    """A dataset left out with ``--on-error skip``."""

    dataset_id: str
    path: str
    stage: Stage
    error: str


class Manifest(_Record):
    """The run record of a corpus: inputs, parameters, versions, per-dataset facts and the outputs."""

    format: Literal["genecorpus/1"] = FORMAT
    mode: Mode
    """``build`` (QC, medians computed unless given) or ``tokenize`` (given dictionaries)."""
    parameters: BuildConfig
    """Everything that determined the bytes."""
    versions: dict[str, str]
    """Python and package versions of the run."""
    datasets: tuple[DatasetRecord, ...]
    medians: ComputedMedians | GivenMedians
    vocabulary: VocabularySummary
    corpus: CorpusSummary
    skipped: tuple[SkippedDataset, ...] = ()
    duplicates: DuplicatesSummary | None = None
    """None when duplicates were not looked for (``keep``, ``tokenize``, or manifests before 0.2)."""
    files: dict[str, str] = Field(default_factory=dict)
    """sha256 of the dictionary and lengths files beside the shards (by file name)."""
    timings: dict[str, float] = Field(default_factory=dict)
    """Wall-clock seconds per stage and in total."""

    def to_json(self) -> str:
        """The ``manifest.json`` text (two-space indented, newline-terminated)."""
        return json.dumps(self.model_dump(mode="json", by_alias=True), indent=2) + "\n"

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``manifest.json``."""
        Path(path).write_text(self.to_json())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read a ``manifest.json``.

        Raises
        ------
        InputError
            The file is missing, not JSON, not a genecorpus manifest, or of an unknown format version.
        """
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            msg = (f"{path.parent}: not a genecorpus corpus folder (no {path.name}); give the --out folder "
                   f"of genecorpus build or tokenize")
            raise InputError(msg) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            msg = f"{path}: not valid JSON ({e}); rebuild the corpus"
            raise InputError(msg) from None
        if not isinstance(raw, dict) or "format" not in raw:
            msg = f"{path}: not a genecorpus manifest (no 'format'); give a corpus folder written by genecorpus"
            raise InputError(msg)
        if raw["format"] != FORMAT:
            msg = (f"{path}: manifest format {raw['format']!r}, which this genecorpus does not know "
                   f"(it reads {FORMAT!r}); upgrade genecorpus")
            raise InputError(msg)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            msg = f"{path}: not a valid genecorpus manifest ({describe_validation_error(e)}); rebuild the corpus"
            raise InputError(msg) from None


def package_versions() -> dict[str, str]:
    """Python's and the versions of the packages that determine a corpus's bytes, for the manifest."""
    out = {"python": platform.python_version()}
    for pkg in ("genecorpus", "numpy", "scipy", "numba", "pyarrow", "anndata", "h5py", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
