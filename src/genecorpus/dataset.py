"""A dataset mapped onto a gene set: the one reader of input cells for ``build``, ``validate`` and ``evaluate``.

:func:`plan_dataset` opens an input (any format :mod:`genecorpus.io` reads, or an in-memory AnnData),
resolves its gene identifiers to Ensembl IDs (:mod:`genecorpus.genes`), maps its columns onto a gene
*universe* (the candidate genes of a build, a token dictionary's genes, or any sorted set of keys), checks
the requested obs columns, and returns a small picklable :class:`DatasetPlan`. Tasks then read the cells
with :meth:`DatasetPlan.read_blocks`, in blocks of bounded size, as :class:`GeneBlock`: the counts with
the columns of one gene summed, each cell's depth (``n_counts``), its mitochondrial counts, detected genes
and ``filter_pass`` pre-selection. Nobody else maps genes or collapses columns.

Examples
--------
>>> import anndata, numpy as np
>>> from genecorpus.config import DatasetSpec
>>> adata = anndata.AnnData(np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 4.0]], dtype=np.float32))
>>> adata.var_names = ["ENSG00000000003", "ENSG00000000005", "ENSG00000000003.2"]
>>> spec = DatasetSpec(path="<AnnData>", gene_id="ensembl")
>>> plan = plan_dataset(spec, universe=np.array(["ENSG00000000003", "ENSG00000000005"], dtype=object),
...                     source=adata)
>>> block = next(plan.read_blocks(0, 2, block_size=2))
>>> block.genes.toarray().tolist(), block.stats.n_counts.tolist()
([[1, 2], [4, 3]], [3, 7])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from genecorpus import _kernels, genes
from genecorpus.corpus.manifest import DepthSource, GeneMappingSummary
from genecorpus.errors import ConfigError, CountsError, GenecorpusError, GeneMappingError, InputError
from genecorpus.io import CellBlock, open_dataset
from genecorpus.io.block import QueryableSource
from genecorpus.io.registry import reads_at_snapshot

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from genecorpus.config import DatasetSpec
    from genecorpus.io import CellSource

__all__ = [
    "CellRange", "CellStats", "DatasetPlan", "GeneBlock", "gene_keys", "plan_dataset", "split_cells", "split_dataset",
]

_NO_GENES = np.empty(0, dtype=object)


@dataclass(frozen=True)
class CellStats:
    """Per-cell statistics of one block, computed while its columns are collapsed onto genes.

    Attributes
    ----------
    n_counts
        Total counts over all input genes, mapped or not (int64).
    mito_counts
        Counts on mitochondrial genes (int64).
    n_genes
        Number of detected (count > 0) universe genes (int64).
    preselected
        The pre-selection columns (``filter_pass`` and ``select_columns``: cells whose values equal 1), or
        all True (bool).
    primary
        False for the cells ``is_primary_data`` marks as published elsewhere, else True (bool).
    """

    n_counts: np.ndarray
    mito_counts: np.ndarray
    n_genes: np.ndarray
    preselected: np.ndarray
    primary: np.ndarray

    @property
    def selected(self) -> np.ndarray:
        """The cells QC looks at: pre-selected and primary (bool)."""
        return self.preselected & self.primary

    def mito_values(self, mode: str) -> np.ndarray:
        """The quantity the mitochondrial rule looks at: counts (int64) or fraction (float64)."""
        if mode == "fraction":
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = self.mito_counts / self.n_counts
            return np.where(self.n_counts > 0, frac, 0.0)
        return self.mito_counts

    def take(self, rows: np.ndarray) -> CellStats:
        """The statistics of some cells of the block (a copy)."""
        return CellStats(*(getattr(self, f.name)[rows] for f in fields(self)))

    @classmethod
    def concatenate(cls, parts: Sequence[CellStats]) -> CellStats:
        """The statistics of several blocks, one after the other."""
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))


@dataclass(frozen=True)
class GeneBlock:
    """Cells ``start:start + n`` of a dataset mapped onto the universe, with their statistics."""

    start: int
    """Index of the first cell within the dataset."""
    cell_ids: np.ndarray
    """Object array of str."""
    obs: dict[str, np.ndarray]
    """The requested obs columns."""
    genes: sp.csr_matrix
    """Cells × universe genes, input columns of one gene summed (int64 data, int32 indices, unsorted)."""
    stats: CellStats
    depth: np.ndarray
    """Each cell's depth (float64): ``obs["n_counts"]`` or the total counts (see :class:`DepthSource`)."""
    depth_dtype: np.dtype
    """dtype in which the input stores the depth (int64 when it is the total counts)."""
    value_dtype: np.dtype
    """dtype in which the input stores the counts (Geneformer's arithmetic depends on it)."""
    dense_input: bool
    """The input stores a dense matrix."""


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset mapped onto a universe of ``n_genes`` genes: what every task needs (small, picklable)."""

    index: int
    """Position of the dataset in the corpus."""
    spec: DatasetSpec
    n_cells: int
    n_genes: int
    """Size of the universe."""
    col_to_gene: np.ndarray
    """Input column → index into the universe, or -1 (not a universe gene), or -2 (left out entirely:
    ``feature_is_filtered``) (int32)."""
    is_mito_col: np.ndarray
    """Input column is a mitochondrial gene (bool)."""
    gene_summary: GeneMappingSummary
    depth: DepthSource
    filter_column: str | None
    """The pre-selection column when the input has it."""
    select_columns: tuple[str, ...]
    """Further pre-selection columns (all present in the input)."""
    primary_column: str | None
    """``is_primary_data`` when the input has it and the spec drops non-primary cells."""
    layer: str | None
    use_raw: bool
    """The matrix of counts, resolved from the spec (``counts = "auto"`` may choose raw.X or a layer)."""
    injective: bool
    """No two input columns map to the same gene (nothing to sum)."""
    source: Any = None
    """An in-memory AnnData (Python API only; read in this process)."""
    part: str | None = None
    """The value of ``spec.split_by`` this plan reads (None: the whole file)."""
    rows: np.ndarray | None = None
    """The file's rows of this part, ascending (int64); None: every row. Cell ``i`` of the plan is row ``rows[i]``.
    For a SOMA experiment, the soma_joinids its query (and part) selected."""
    measurement: str | None = None
    """SOMA: the measurement read (resolved: ``RNA``, or ``raw`` for ``use_raw``); None for files."""
    snapshot_ms: int | None = None
    """SOMA: the TileDB timestamp (ms since 1970) at which every task opens the experiment; None for files.
    Not part of the plan's identity in resume keys (the experiment's content token is)."""

    @property
    def dataset_id(self) -> str:
        """The dataset's id in the corpus: the spec's, or ``<id>/<value>`` for a part of a split file."""
        return self.spec.dataset_id if self.part is None else f"{self.spec.dataset_id}/{self.part}"

    def open(self) -> CellSource:
        """Open the dataset for reading (a SOMA experiment at the plan's snapshot)."""
        return _open(self.spec, self.source, layer=self.layer, use_raw=self.use_raw, measurement=self.measurement,
                     snapshot_ms=self.snapshot_ms)

    @property
    def matrix(self) -> str:
        """Where the counts are read from: ``X``, ``raw.X``, ``layers['<name>']`` or ``ms['RNA'].X['raw']``."""
        if self.measurement is not None:
            return f"ms[{self.measurement!r}].X[{self.layer!r}]"
        return "raw.X" if self.use_raw else f"layers[{self.layer!r}]" if self.layer else "X"

    def read_blocks(self, start: int, stop: int, *, block_size: int,
                    obs_columns: Sequence[str] = ()) -> Iterator[GeneBlock]:
        """Read cells ``start:stop`` in blocks of at most ``block_size`` cells, mapped onto the universe.

        Raises
        ------
        InputError
            A block cannot be read, the ``filter_pass`` column is not boolean, or a cell has a
            non-positive ``obs["n_counts"]`` but nonzero counts.
        """
        from_obs = self.depth is DepthSource.OBS_N_COUNTS
        want = list(dict.fromkeys([*obs_columns, *(["n_counts"] if from_obs else []), *self._flag_columns]))
        source = self.open()
        try:
            for first, block in self._read_cells(source, start, stop, block_size=block_size, obs_columns=want):
                x = block.counts
                gdata, gidx, gptr, totals, mito = _kernels.collapse_csr(
                    x.data, x.indices, x.indptr.astype(np.int64), self.col_to_gene, self.is_mito_col,
                    self.n_genes, self.injective)
                g = sp.csr_matrix((gdata, gidx, gptr), shape=(x.shape[0], self.n_genes))
                stats = CellStats(totals, mito, np.diff(gptr), self._preselected(block.obs, block.cell_ids),
                                  self._primary(block.obs, block.cell_ids))
                depth, depth_dtype = totals.astype(np.float64), np.dtype(np.int64)
                if from_obs:
                    depth, depth_dtype = self._obs_depth(block.obs["n_counts"], stats, block.cell_ids)
                yield GeneBlock(first, block.cell_ids, block.obs, g, stats, depth, depth_dtype,
                                block.value_dtype or np.dtype(np.float32), block.dense_input)
        finally:
            source.close()

    def _read_cells(self, source: CellSource, start: int, stop: int, *, block_size: int,
                    obs_columns: list[str]) -> Iterator[tuple[int, CellBlock]]:
        """Cells ``start:stop`` of the plan as (index of the first, block); a part's rows are picked out of
        the file's blocks of ``block_size`` rows, from its first row to its last (blocks without any are skipped),
        or read ``block_size`` at a time from a source that reads any rows (a SOMA experiment)."""
        if self.rows is not None and isinstance(source, QueryableSource):
            for first in range(start, stop, block_size):
                last = min(first + block_size, stop)
                yield first, replace(self._read_selected(source, self.rows[first:last], obs_columns), start=first)
            return
        if self.rows is None:
            for first in range(start, stop, block_size):
                yield first, self._read_rows(source, first, min(first + block_size, stop), obs_columns)
            return
        members = self.rows[start:stop]
        if not len(members):
            return
        for lo in range(int(members[0]), int(members[-1]) + 1, block_size):
            hi = min(lo + block_size, int(members[-1]) + 1)
            a, b = np.searchsorted(members, [lo, hi])
            if a == b:
                continue
            block = self._read_rows(source, lo, hi, obs_columns)
            pick = members[a:b] - lo
            yield start + int(a), CellBlock(
                counts=block.counts[pick], cell_ids=block.cell_ids[pick], start=start + int(a),
                obs={name: np.asarray(values)[pick] for name, values in block.obs.items()},
                value_dtype=block.value_dtype, dense_input=block.dense_input)

    def _read_selected(self, source: QueryableSource, rows: np.ndarray, obs_columns: list[str]) -> CellBlock:
        try:
            return source.read_rows(rows, obs_columns=obs_columns)
        except GenecorpusError:
            raise
        except (OSError, ValueError, KeyError) as e:
            msg = f"{self.spec.path}: cannot read {len(rows)} cells from soma_joinid {rows[0]} on ({e})"
            raise InputError(msg) from None

    def _read_rows(self, source: CellSource, first: int, last: int, obs_columns: list[str]) -> CellBlock:
        try:
            return source.read_block(first, last, obs_columns=obs_columns)
        except GenecorpusError:
            raise
        except (OSError, ValueError, KeyError) as e:
            msg = f"{self.spec.path}: cannot read cells {first}:{last} ({e}); the file may be corrupt"
            raise InputError(msg) from None

    @property
    def _flag_columns(self) -> list[str]:
        return [*([self.filter_column] if self.filter_column else []), *self.select_columns,
                *([self.primary_column] if self.primary_column else [])]

    def _preselected(self, obs: Mapping[str, np.ndarray], cell_ids: np.ndarray) -> np.ndarray:
        keep = np.ones(len(cell_ids), dtype=bool)
        for name in [*([self.filter_column] if self.filter_column else []), *self.select_columns]:
            keep &= self._flags(name, obs[name], cell_ids)
        return keep

    def _primary(self, obs: Mapping[str, np.ndarray], cell_ids: np.ndarray) -> np.ndarray:
        if not self.primary_column:
            return np.ones(len(cell_ids), dtype=bool)
        return self._flags(self.primary_column, obs[self.primary_column], cell_ids)

    def _flags(self, name: str, values: np.ndarray, cell_ids: np.ndarray) -> np.ndarray:
        """A boolean obs column as bool: 1/True keeps a cell (Geneformer's test is ``value == 1``)."""
        flags = np.asarray(values)
        if flags.dtype.kind in "biuf":
            return flags == 1
        text = np.array([str(v).lower() for v in flags.tolist()], dtype=object)
        known = np.isin(text, ["true", "false", "1", "0"])
        if not known.all():
            i = int(np.flatnonzero(~known)[0])
            msg = (f"{self.spec.path}: obs column {name!r} holds {flags.dtype} values "
                   f"(cell {cell_ids[i]!r}: {flags[i]!r}); it must be boolean or 0/1 "
                   f"(cells with 1/True are kept)")
            raise InputError(msg)
        return np.isin(text, ["true", "1"])

    def _obs_depth(self, stored: np.ndarray, stats: CellStats, cell_ids: np.ndarray) -> tuple[np.ndarray, np.dtype]:
        stored = np.asarray(stored)
        depth = stored.astype(np.float64)
        bad = (stats.n_genes > 0) & ~(depth > 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            msg = (f"{self.spec.path}: cell {cell_ids[i]!r} has obs n_counts {depth[i]} but nonzero counts; "
                   f"fix obs['n_counts'] or drop the column")
            raise InputError(msg)
        return depth, stored.dtype


ENSEMBL_COLUMNS = ("ensembl_id", "feature_id")
"""var columns that hold Ensembl IDs, by convention (ours and Geneformer's; CELLxGENE's)."""
SYMBOL_COLUMN = "feature_name"
"""CELLxGENE's var column of gene symbols (its index is Ensembl IDs)."""


def _identifiers(source: CellSource, spec: DatasetSpec) -> np.ndarray:
    """The gene identifiers of the input columns.

    ``gene_column`` when given; else an Ensembl ID column (:data:`ENSEMBL_COLUMNS`); else, for
    ``gene_id = "symbol"``, CELLxGENE's ``feature_name``; else the var index.
    """
    if spec.gene_column:
        if spec.gene_column not in source.var_columns:
            msg = (f"{source.path}: no var column {spec.gene_column!r}; available: "
                   f"{', '.join(source.var_columns) or 'none'} (or omit gene_column to use the index)")
            raise ConfigError(msg)
        return source.var_column(spec.gene_column)
    for name in ENSEMBL_COLUMNS:
        if name in source.var_columns:
            return source.var_column(name)
    if spec.gene_id == "symbol" and SYMBOL_COLUMN in source.var_columns:
        return source.var_column(SYMBOL_COLUMN)
    return source.var_names


def _map(source: CellSource, spec: DatasetSpec, mapping: Mapping[str, str] | None) -> genes.GeneMapping:
    try:
        return genes.map_to_ensembl(_identifiers(source, spec), kind=spec.gene_id, release=spec.release,
                                    mapping=mapping)
    except GenecorpusError as e:
        msg = f"{source.path}: {e}"
        raise type(e)(msg) from None


def _keys(source: CellSource, spec: DatasetSpec,
          mapping: Mapping[str, str] | None) -> tuple[np.ndarray, genes.GeneMapping | None]:
    """Per input column: its Ensembl ID where the identifier maps to one, else the identifier itself.

    Also returns the mapping, or None when no identifier could be mapped (then every key is an identifier).
    """
    identifiers = np.asarray([str(i) for i in _identifiers(source, spec)], dtype=object)
    try:
        mapped = _map(source, spec, mapping)
    except GeneMappingError:
        return identifiers, None
    return np.where(mapped.ensembl_ids != "", mapped.ensembl_ids, identifiers), mapped


def gene_keys(spec: DatasetSpec, *, mapping: Mapping[str, str] | None = None, source: Any = None) -> np.ndarray:
    """The key of each gene column of a dataset: its Ensembl ID where it maps to one, else its identifier.

    For gene sets that keep what does not map (the evaluation baseline): pass the union of several
    datasets' keys as the ``universe`` of :func:`plan_dataset` with ``unmapped="keep"``.

    Returns
    -------
    Object array of str, one per input column.
    """
    layer, use_raw = _counts_matrix(spec, source)
    with _open(spec, source, layer=layer, use_raw=use_raw) as opened:
        return _keys(opened, spec, mapping)[0]


def _open(spec: DatasetSpec, source: Any, *, layer: str | None = None, use_raw: bool = False,
          measurement: str | None = None, snapshot_ms: int | None = None) -> CellSource:
    target = source if source is not None else spec.path
    return open_dataset(target, format=spec.format, layer=layer, use_raw=use_raw, cells_as_rows=spec.cells_as_rows,
                        measurement=measurement or spec.measurement, snapshot_ms=snapshot_ms,
                        tiledb_config=spec.tiledb_config or None)


def _reads_at_snapshot(spec: DatasetSpec, source: Any) -> bool:
    """The dataset is a versioned store (a TileDB-SOMA experiment): its reads must share one timestamp."""
    return source is None and reads_at_snapshot(spec.path, format=spec.format)


def now_ms() -> int:
    """The current time as a TileDB timestamp (milliseconds since 1970)."""
    return time.time_ns() // 1_000_000


COUNTS_PROBE_CELLS = 500
"""Cells of a matrix read to tell raw counts from normalized values (``counts = "auto"``)."""
COUNTS_LAYER = "counts"
"""The layer that holds raw counts by convention (scanpy's and CELLxGENE submitters' ``layers["counts"]``)."""


def _counts_matrix(spec: DatasetSpec, source: Any, snapshot_ms: int | None = None) -> tuple[str | None, bool]:
    """``(layer, use_raw)`` of the matrix that holds the raw counts (see ``DatasetSpec.counts``).

    X is taken unless its first :data:`COUNTS_PROBE_CELLS` cells are not integer counts and ``raw.X`` or
    ``layers["counts"]`` exists; then the first of those whose cells are counts. When none is, the error is
    X's own (which says what to do). A SOMA experiment is read alike: its default X layer, else the
    measurement ``raw`` (from_h5ad's ``raw.X``), else the X layer ``counts``.
    """
    if spec.layer is not None or spec.use_raw or spec.counts == "X":
        return spec.layer, spec.use_raw
    others = []
    for layer, use_raw in ((None, True), (COUNTS_LAYER, False)):
        try:
            _open(spec, source, layer=layer, use_raw=use_raw, snapshot_ms=snapshot_ms).close()
        except InputError:
            continue  # the format has no such matrix, or this file has none
        others.append((layer, use_raw))
    if not others:
        return None, False
    try:
        _probe(spec, source, None, use_raw=False, snapshot_ms=snapshot_ms)
    except CountsError as x_error:
        for layer, use_raw in others:
            try:
                _probe(spec, source, layer, use_raw=use_raw, snapshot_ms=snapshot_ms)
            except CountsError:
                continue
            return layer, use_raw
        raise x_error from None
    return None, False


def _probe(spec: DatasetSpec, source: Any, layer: str | None, *, use_raw: bool, snapshot_ms: int | None) -> None:
    with _open(spec, source, layer=layer, use_raw=use_raw, snapshot_ms=snapshot_ms) as opened:
        opened.read_block(0, min(opened.n_cells, COUNTS_PROBE_CELLS))


FILTERED_COLUMN = "feature_is_filtered"
"""CELLxGENE's var column marking genes the submitter filtered out of X (their raw counts are left out too)."""
PRIMARY_COLUMN = "is_primary_data"
"""CELLxGENE's obs column: False for cells also published in another dataset."""


def _filtered_out(opened: CellSource, spec: DatasetSpec, source: Any, *, use_raw: bool) -> np.ndarray:
    """Per input column: marked by ``var["feature_is_filtered"]`` (bool); all False without that column.

    ``raw.X`` has its own var, without the column: it is then looked up in X's var by gene name.
    """
    flags_of = _open(spec, source, snapshot_ms=getattr(opened, "snapshot_ms", None)) if use_raw else opened
    if FILTERED_COLUMN not in flags_of.var_columns:
        if flags_of is not opened:
            flags_of.close()
        return np.zeros(len(opened.var_names), dtype=bool)
    try:
        values = np.asarray([str(v).lower() in ("true", "1") for v in flags_of.var_column(FILTERED_COLUMN)])
        marked = set(np.asarray(flags_of.var_names, dtype=object)[values].tolist())
    finally:
        if flags_of is not opened:
            flags_of.close()
    return np.array([name in marked for name in np.asarray(opened.var_names, dtype=object).tolist()], dtype=bool)


def plan_dataset(
    spec: DatasetSpec,
    *,
    universe: np.ndarray,
    mito: np.ndarray = _NO_GENES,
    mapping: Mapping[str, str] | None = None,
    use_obs_n_counts: bool = True,
    unmapped: Literal["drop", "keep"] = "drop",
    index: int = 0,
    source: Any = None,
    snapshot_ms: int | None = None,
) -> DatasetPlan:
    """Open a dataset and map its gene columns onto ``universe``: the one entry point for reading cells.

    Parameters
    ----------
    spec
        The dataset: path, format and reader options, gene identifiers (``gene_id``, ``gene_column``,
        ``release``), requested ``obs_columns`` and the pre-selection column.
    universe
        Sorted object array of Ensembl IDs (or keys, see ``unmapped``); block columns follow its order.
    mito
        Ensembl IDs of the mitochondrial genes (for :attr:`CellStats.mito_counts`).
    mapping
        Geneformer ``ensembl_mapping_dict`` applied to the identifiers.
    use_obs_n_counts
        Take each cell's depth from ``obs["n_counts"]`` when the dataset has it.
    unmapped
        ``"drop"``: columns whose identifier maps to no Ensembl ID are left out (the corpus's rule).
        ``"keep"``: such a column is matched to ``universe`` by its identifier (see :func:`gene_keys`).
    index
        Position of the dataset in the corpus.
    source
        An in-memory ``anndata.AnnData`` to read instead of ``spec.path``.
    snapshot_ms
        For a TileDB-SOMA experiment: the TileDB timestamp (ms) to read it at; now when None. Its
        ``value_filter`` is run here, once: the plan's ``rows`` are the soma_joinids it selects.

    Raises
    ------
    InputError
        The dataset cannot be opened, none of its genes is in the universe, an obs column is missing, or a
        SOMA ``value_filter`` cannot be applied or selects no cell.
    GeneMappingError
        Its identifiers cannot be mapped (``unmapped="drop"``).
    ConfigError
        ``gene_column`` or an obs column is not in the dataset.
    """
    if _reads_at_snapshot(spec, source) and snapshot_ms is None:
        snapshot_ms = now_ms()  # every read of the plan, here and in the tasks, sees this one snapshot
    layer, use_raw = _counts_matrix(spec, source, snapshot_ms)
    with _open(spec, source, layer=layer, use_raw=use_raw, snapshot_ms=snapshot_ms) as opened:
        selected = _selected_rows(opened, spec)
        if unmapped == "drop":
            mapped: genes.GeneMapping | None = _map(opened, spec, mapping)
            keys = mapped.ensembl_ids
        else:
            keys, mapped = _keys(opened, spec, mapping)
        filtered_out = _filtered_out(opened, spec, source, use_raw=use_raw)
        col_to_gene = genes.collapse_index(keys, universe)
        col_to_gene[filtered_out] = _kernels.EXCLUDED_COLUMN
        is_mito = np.isin(keys, mito)
        n_used = int((col_to_gene >= 0).sum())
        n_distinct = int(np.unique(col_to_gene[col_to_gene >= 0]).shape[0])
        summary = GeneMappingSummary(
            n_input_genes=len(keys),
            id_kind=mapped.kind if mapped is not None else "symbol",
            release=mapped.release if mapped is not None else None,
            n_unmapped=int(mapped.n_unmapped) if mapped is not None else len(keys),
            n_ambiguous=int(mapped.n_ambiguous) if mapped is not None else 0,
            n_columns_in_universe=n_used,
            n_genes_in_universe=n_distinct,
            n_mito_columns=int(is_mito.sum()),
            n_filtered_out=int(filtered_out.sum()),
        )
        if n_used == 0:
            msg = (f"{opened.path}: none of its {len(keys)} genes is in the gene universe; check gene_id, "
                   f"release or the gene mapping")
            raise InputError(msg)
        obs = set(opened.obs_columns)
        missing = [c for c in (*spec.obs_columns, *spec.select_columns) if c not in obs]
        if missing:
            msg = (f"{opened.path}: obs column {missing[0]!r} not found; available: "
                   f"{', '.join(sorted(obs)) or 'none'}")
            raise ConfigError(msg)
        soma = isinstance(opened, QueryableSource)
        return DatasetPlan(
            index=index, spec=spec, n_cells=opened.n_cells if selected is None else len(selected),
            n_genes=len(universe), col_to_gene=col_to_gene,
            is_mito_col=is_mito, gene_summary=summary,
            depth=DepthSource.OBS_N_COUNTS if use_obs_n_counts and "n_counts" in obs else DepthSource.TOTAL_COUNTS,
            filter_column=spec.filter_column if spec.filter_column in obs else None,
            select_columns=tuple(spec.select_columns),
            primary_column=PRIMARY_COLUMN if spec.primary_only and PRIMARY_COLUMN in obs else None,
            layer=getattr(opened, "layer", None) if soma else layer, use_raw=use_raw and not soma,
            injective=n_distinct == n_used, source=source, rows=selected,
            measurement=getattr(opened, "measurement", None) if soma else None,
            snapshot_ms=getattr(opened, "snapshot_ms", None) if soma else None,
        )


def _selected_rows(opened: CellSource, spec: DatasetSpec) -> np.ndarray | None:
    """The rows a queryable source's ``value_filter`` selects (every row without one); None for a file."""
    if not isinstance(opened, QueryableSource):
        if spec.value_filter is not None:
            msg = (f"{opened.path}: value_filter applies to TileDB-SOMA experiments, not to the {opened.format} "
                   "format; remove it (select cells with select_columns)")
            raise ConfigError(msg)
        return None
    rows, _ = opened.query_obs(spec.value_filter)
    if spec.value_filter is not None and not len(rows):
        msg = (f"{opened.path}: value_filter {spec.value_filter!r} selects no cell of the {opened.n_cells} in obs; "
               "check the column names and values it compares")
        raise InputError(msg)
    return rows


SOMA_SPLIT_COLUMN = "dataset_id"
"""The obs column a SOMA experiment is split by when ``split_by`` is not given: the Census's source datasets."""


def split_dataset(plan: DatasetPlan) -> list[DatasetPlan]:
    """The parts of a dataset planned with ``spec.split_by``: one plan per value of that obs column.

    Parts come in the order of their values (as strings, sorted), each with the rows that hold its value;
    each is its own dataset for QC, medians and the manifest, ``<id>/<value>``. A plan without
    ``split_by`` is returned alone. A SOMA experiment is split by :data:`SOMA_SPLIT_COLUMN` unless
    ``split_by`` says otherwise (``false``: not at all); the column is read for the query's cells only,
    in the same scan of obs that runs its ``value_filter``.

    Raises
    ------
    ConfigError
        The dataset has no such obs column.
    """
    column = plan.spec.split_by
    if column is False or (column is None and plan.measurement is None):
        return [plan]
    with plan.open() as source:
        if column is None:  # a SOMA experiment
            if SOMA_SPLIT_COLUMN not in source.obs_columns:
                return [plan]
            column = SOMA_SPLIT_COLUMN
        if column not in source.obs_columns:
            msg = (f"{plan.spec.path}: no obs column {column!r} to split by; available: "
                   f"{', '.join(sorted(source.obs_columns)) or 'none'}")
            raise ConfigError(msg)
        if isinstance(source, QueryableSource) and plan.rows is not None:
            selected, found = source.query_obs(plan.spec.value_filter, column=column)
            if not np.array_equal(selected, plan.rows):
                msg = f"{plan.spec.path}: the query selected other cells than when planned; build again"
                raise InputError(msg)
            assert found is not None
            positions: np.ndarray = plan.rows
        else:
            found, positions = np.asarray(source.obs_column(column)), np.arange(plan.n_cells, dtype=np.int64)
        values = np.array([str(v) for v in found.tolist()], dtype=object)
    parts = []
    for value in sorted(set(values.tolist())):
        rows = positions[values == value].astype(np.int64)
        parts.append(replace(plan, part=value, rows=rows, n_cells=len(rows)))
    return parts


@dataclass(frozen=True)
class CellRange:
    """Input cells ``start:stop`` of dataset ``dataset``: the unit of a stage's task and of an output shard."""

    index: int
    """Position among all ranges of the corpus (orders results and shards)."""
    dataset: int
    """Index of the dataset's plan."""
    start: int
    stop: int


def split_cells(plans: Sequence[DatasetPlan], cells_per_range: int) -> list[CellRange]:
    """Cut every dataset into ranges of at most ``cells_per_range`` cells, datasets in order.

    A dataset without cells still gets one (empty) range, so that every dataset has a task.

    Examples
    --------
    >>> import numpy as np
    >>> from types import SimpleNamespace as P
    >>> [(r.dataset, r.start, r.stop) for r in split_cells([P(index=0, n_cells=5), P(index=1, n_cells=0)], 2)]
    [(0, 0, 2), (0, 2, 4), (0, 4, 5), (1, 0, 0)]
    """
    ranges: list[CellRange] = []
    for plan in plans:
        for start in range(0, max(plan.n_cells, 1), cells_per_range):
            ranges.append(CellRange(len(ranges), plan.index, start, min(start + cells_per_range, plan.n_cells)))
    return ranges
