"""Typed, frozen configuration: datasets, QC parameters, build settings; TOML manifests.

A build manifest is a TOML file::

    layout = "gc30m"            # or "gc104m"
    block_size = 2000           # cells read at a time (does not change the output)

    [qc]
    mito = "counts"             # or "fraction"

    [[datasets]]
    path = "data/pbmc.h5ad"     # relative to the manifest's folder
    id = "pbmc"                 # dataset_id column; default: file name without suffix
    gene_id = "symbol"          # "ensembl", "symbol" or "auto"
    release = "grch37"          # annotation release of the symbols; detected when omitted
    obs_columns = ["cell_type"]
    use_for_medians = true

    [[datasets]]                # a TileDB-SOMA experiment: a local folder, or a URI (kept as it is)
    path = "s3://cellxgene-census-public-us-west-2/cell-census/2024-07-01/soma/census_data/homo_sapiens"
    id = "census-blood"
    layer = "raw"               # the X layer with raw counts (measurement = "RNA" by default)
    value_filter = 'tissue_general == "blood" and is_primary_data == True'
    split_by = "dataset_id"     # the default for SOMA: each source dataset gets its own QC
    tiledb_config = { "vfs.s3.region" = "us-west-2", "vfs.s3.no_sign_request" = "true" }
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from genecorpus.errors import ConfigError
from genecorpus.io.block import DEFAULT_BLOCK_SIZE
from genecorpus.io.registry import is_uri

if TYPE_CHECKING:
    import os

__all__ = [
    "BuildConfig", "ClusterSpec", "DatasetSpec", "Engine", "GeneIdKind", "Mode", "OnError", "QCParams",
    "describe_validation_error", "load_cluster_spec", "load_manifest",
]

Mode = Literal["build", "tokenize"]
"""``build``: QC and medians computed (unless given); ``tokenize``: given dictionaries, as Geneformer's tokenizer."""
OnError = Literal["fail", "skip"]
"""``fail``: the first dataset that cannot be read stops the build; ``skip``: it is left out and listed."""
Engine = Literal["local", "dask"]
"""Where tasks run: local worker processes, or Dask ``distributed``."""
GeneIdKind = Literal["auto", "ensembl", "symbol"]
"""What a dataset's gene identifiers are: Ensembl IDs, symbols, or detected."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatasetSpec(_Frozen):
    """One input dataset of a corpus."""

    path: str
    """File or folder (10x matrix folder, AnnData ``.zarr`` folder, TileDB-SOMA experiment) to read, or the
    URI of a TileDB-SOMA experiment (``s3://…``; a URI with a scheme is kept as it is)."""
    id: str | None = None
    """Value of the ``dataset_id`` column; defaults to the file name without its suffixes."""
    format: str | None = None
    """Reader name (``h5ad``, ``zarr``, ``loom``, ``10x-mtx``, ``10x-h5``, ``csv``, ``tsv``, ``soma``); sniffed when
    omitted (a URI is read as ``soma``)."""
    gene_id: GeneIdKind = "auto"
    """Kind of gene identifiers in the input."""
    gene_column: str | None = None
    """var column holding the identifiers; default ``ensembl_id`` or ``feature_id`` (CELLxGENE, the Census) when
    present, else the var index (a SOMA experiment's ``var_id`` column, as ``tiledbsoma.io.from_h5ad`` writes it)."""
    release: str | None = None
    """Annotation release of gene symbols (e.g. ``grch37``, ``ensembl93``); detected when omitted."""
    layer: str | None = None
    """Read ``layers[layer]`` instead of X (h5ad, zarr, loom); for SOMA, the X layer (default ``raw`` when
    present, e.g. the Census's raw counts, else ``data``, from_h5ad's X, else the only layer)."""
    use_raw: bool = False
    """Read ``raw.X`` instead of X (h5ad, zarr; for SOMA the measurement ``raw``, where from_h5ad writes it)."""
    measurement: str | None = None
    """SOMA: the measurement to read; ``RNA`` when omitted."""
    value_filter: str | None = None
    """SOMA: the cells to read, as an obs filter in TileDB-SOMA's syntax, e.g.
    ``is_primary_data == True and tissue_general == "blood"``; every cell when omitted."""
    tiledb_config: dict[str, str] = Field(default_factory=dict)
    """SOMA: TileDB configuration, e.g. ``{"vfs.s3.region" = "us-west-2", "vfs.s3.no_sign_request" = "true"}``
    for the public Census bucket. Recorded in the manifest: keep credentials in the environment."""
    counts: Literal["auto", "X"] = "auto"
    """Where the raw counts are when neither ``layer`` nor ``use_raw`` says: ``auto`` reads X if it holds
    integer counts, else ``raw.X``, else ``layers["counts"]`` (CELLxGENE files keep normalized values in X),
    and records which in the manifest; ``X`` always reads X."""
    cells_as_rows: bool | None = None
    """Orientation of a CSV/TSV file; detected when omitted."""
    obs_columns: tuple[str, ...] = ()
    """Per-cell metadata columns copied into the corpus (after ``dataset_id`` and ``cell_id``)."""
    use_for_medians: bool = True
    """Whether this dataset's kept cells contribute to the corpus medians."""
    filter_column: str = "filter_pass"
    """Boolean obs column that pre-selects cells when present (Geneformer's convention)."""
    select_columns: tuple[str, ...] = ()
    """More boolean obs columns that pre-select cells like ``filter_column``: a cell is kept only with 1/True
    in every one of them (they must exist); dropped cells count under ``filter_pass``."""
    split_by: str | Literal[False] | None = None
    """An obs column (e.g. ``donor_id``, ``sample``) whose values split the file into datasets ``<id>/<value>``,
    each with its own QC (the card filters within a dataset), in the order of the values. For a SOMA experiment
    the default is ``dataset_id`` when obs has it (the Census's source datasets); ``false`` never splits."""
    primary_only: bool = True
    """Drop the cells whose ``is_primary_data`` (CELLxGENE: the same cells are published elsewhere) is
    False, under ``not_primary_data``, when the dataset has that column."""

    @property
    def dataset_id(self) -> str:
        """The dataset's identifier in the corpus."""
        if self.id:
            return self.id
        name = Path(self.path.rstrip("/")).name
        for suffix in (".gz", ".h5ad", ".zarr", ".loom", ".h5", ".csv", ".tsv", ".txt"):
            name = name.removesuffix(suffix)
        return name

    @field_validator("tiledb_config", mode="before")
    @classmethod
    def _config_values_as_text(cls, value: Any) -> Any:
        """TileDB takes every setting as a string: TOML's ``true`` and ``1`` become ``"true"`` and ``"1"``."""
        if not isinstance(value, dict):
            return value
        return {k: (str(v).lower() if isinstance(v, bool) else str(v)) if isinstance(v, bool | int | float) else v
                for k, v in value.items()}

    @model_validator(mode="after")
    def _soma_options_for_soma(self) -> DatasetSpec:
        given = [name for name in ("measurement", "value_filter", "tiledb_config") if getattr(self, name)]
        if given and self.format is not None and self.format != "soma":
            msg = (f"{given[0]} applies to TileDB-SOMA experiments (format = \"soma\"), not to format "
                   f"{self.format!r}; remove it")
            raise ValueError(msg)
        return self


class QCParams(_Frozen):
    """Per-dataset quality control (SPEC §2.3)."""

    enabled: bool = True
    """False skips the outlier and minimum-gene rules (``tokenize`` does this)."""
    n_sd: float = 3.0
    """Cells further than this many population SDs from the dataset mean are dropped."""
    mito: Literal["counts", "fraction"] = "counts"
    """Apply the mitochondrial rule to counts (the card) or to the fraction of counts."""
    min_genes: int = 7
    """Cells with fewer detected candidate genes are dropped."""


class BuildConfig(_Frozen):
    """Everything that determines a corpus's bytes (the worker count does not)."""

    datasets: tuple[DatasetSpec, ...] = Field(min_length=1)
    layout: Literal["gc30m", "gc104m"] = "gc30m"
    qc: QCParams = QCParams()
    reference: str = "gencode48"
    """Annotation whose protein-coding and miRNA genes are the candidate genes."""
    gene_medians: str | None = None
    """Read medians (and so the vocabulary) from this file instead of computing them."""
    token_dictionary: str | None = None
    """Use this token dictionary instead of building one from the vocabulary."""
    gene_mapping: str | None = None
    """Geneformer ``ensembl_mapping_dict`` applied to input gene identifiers."""
    block_size: int = Field(default=DEFAULT_BLOCK_SIZE, ge=1)
    """Cells read at a time; changes memory use, never the output."""
    shard_cells: int = Field(default=50_000, ge=1)
    """Input cells per task and output shard; a shard holds the kept cells of that many input cells."""
    use_obs_n_counts: bool = True
    """Take each cell's depth from ``obs["n_counts"]`` when present (Geneformer compatibility)."""
    duplicates: Literal["drop", "report", "keep"] = "drop"
    """Cells found in several datasets from their counts (:mod:`genecorpus.duplicates`): ``drop`` keeps the
    first in manifest order and drops the later copies under ``duplicate`` before the medians; ``report``
    only lists them in the manifest; ``keep`` does not look."""
    allow_repeated_files: bool = False
    """Build even when two datasets are the same file (same sha256); by default that is refused, since
    every cell would be in the corpus twice."""

    @field_validator("datasets")
    @classmethod
    def _unique_ids(cls, value: tuple[DatasetSpec, ...]) -> tuple[DatasetSpec, ...]:
        seen: set[str] = set()
        for spec in value:
            if spec.dataset_id in seen:
                msg = f"dataset id {spec.dataset_id!r} appears twice; give each dataset a unique id"
                raise ValueError(msg)
            seen.add(spec.dataset_id)
        return value

    @model_validator(mode="after")
    def _something_feeds_the_medians(self) -> BuildConfig:
        if self.gene_medians is None and not any(spec.use_for_medians for spec in self.datasets):
            msg = ("every dataset has use_for_medians = false and no gene_medians are given, so no gene would "
                   "have a median and the vocabulary would be empty; set use_for_medians = true on at least "
                   "one dataset, or give gene_medians")
            raise ValueError(msg)
        return self


class ClusterSpec(_Frozen):
    """Where the tasks run: the ``[cluster]`` section of a manifest. Never changes the output."""

    engine: Engine = "local"
    """``local`` worker processes, or Dask ``distributed``."""
    kind: Literal["local", "slurm", "scheduler"] = "local"
    """For ``dask``: start a ``LocalCluster``, a ``dask_jobqueue.SLURMCluster``, or connect to ``address``."""
    address: str | None = None
    """Scheduler address (``tcp://host:8786``) when ``kind = "scheduler"``."""
    workers: int = Field(default=1, ge=1)
    """Worker processes (local, LocalCluster) or SLURM jobs (one worker process each)."""
    threads_per_worker: int = Field(default=1, ge=1)
    """Threads per Dask worker; 1 keeps HDF5 reads parallel across processes."""
    memory_per_worker: str = "4GiB"
    """Memory limit of each worker (LocalCluster ``memory_limit``, SLURM ``memory``)."""
    queue: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account."""
    walltime: str = "04:00:00"
    """SLURM job time limit."""
    job_extra_directives: tuple[str, ...] = ()
    """Extra ``#SBATCH`` lines, e.g. ``["--constraint=cpu"]``."""
    job_script_prologue: tuple[str, ...] = ()
    """Shell lines run before the worker starts, e.g. ``["source ~/venvs/genecorpus/bin/activate"]``."""
    python: str | None = None
    """The Python a SLURM job starts its worker with (default: the driver's own, ``sys.executable``);
    ``"python"`` takes the one the prologue put on the PATH."""
    interface: str | None = None
    """Network interface of the scheduler and the SLURM workers (``ib0``; ``lo`` on a one-node SLURM keeps
    every connection on 127.0.0.1); default: the scheduler listens on every interface."""
    worker_extra_args: tuple[str, ...] = ()
    """Extra ``dask worker`` options of each SLURM job, e.g. ``["--dashboard-address", "127.0.0.1:0"]``."""
    log_directory: str | None = None
    """Folder of the SLURM jobs' output (``dask-worker-<job>.err``/``.out``; default: SLURM's
    ``slurm-<job>.out`` in the folder the build runs from)."""
    local_directory: str | None = None
    """Node-local scratch for Dask spill files."""

    @model_validator(mode="after")
    def _address_for_scheduler(self) -> ClusterSpec:
        if self.kind == "scheduler" and not self.address:
            msg = 'kind = "scheduler" needs an address, e.g. address = "tcp://host:8786"'
            raise ValueError(msg)
        return self


def load_cluster_spec(path: str | os.PathLike[str]) -> ClusterSpec | None:
    """The ``[cluster]`` section of a TOML manifest, or None when it has none."""
    path = Path(path)
    raw = _read_toml(path)
    section = raw.get("cluster")
    if section is None:
        return None
    if not isinstance(section, dict):
        msg = f"{path}: [cluster] must be a table; see docs/scale-out.md"
        raise ConfigError(msg)
    try:
        return ClusterSpec.model_validate(section)
    except ValidationError as e:
        msg = f"{path}: cluster.{describe_validation_error(e)}; fix the manifest"
        raise ConfigError(msg) from None


def describe_validation_error(e: ValidationError) -> str:
    """The first problem of a pydantic validation error as ``field: message``."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "manifest"
    # our validators' own messages, without the "Value error, " pydantic puts before them
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def load_manifest(path: str | os.PathLike[str], **overrides: object) -> BuildConfig:
    """Read a TOML build manifest; dataset paths are resolved against the manifest's folder (URIs are kept)."""
    path = Path(path)
    raw = _read_toml(path)
    raw.pop("cluster", None)  # where tasks run is not part of the corpus (see load_cluster_spec)
    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        msg = f"{path}: no [[datasets]] entries; list at least one dataset with a path"
        raise ConfigError(msg)
    base = path.resolve().parent
    for entry in datasets:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not is_uri(entry["path"]):
            entry["path"] = str((base / entry["path"]).resolve())
    for key in ("gene_medians", "token_dictionary", "gene_mapping"):
        if isinstance(raw.get(key), str):
            raw[key] = str((base / raw[key]).resolve())
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return BuildConfig.model_validate(raw)
    except ValidationError as e:
        msg = f"{path}: {describe_validation_error(e)}; fix the manifest"
        raise ConfigError(msg) from None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        msg = f"{path}: manifest not found; check the path"
        raise ConfigError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{path}: cannot read the manifest ({e}); give a UTF-8 TOML file"
        raise ConfigError(msg) from None
    except tomllib.TOMLDecodeError as e:
        msg = f"{path}: not valid TOML ({e}); fix the manifest"
        raise ConfigError(msg) from None
