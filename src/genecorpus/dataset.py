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

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from genecorpus import _kernels, genes
from genecorpus.corpus.manifest import DepthSource, GeneMappingSummary
from genecorpus.errors import ConfigError, GenecorpusError, GeneMappingError, InputError
from genecorpus.io import open_dataset

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping, Sequence

    from genecorpus.config import DatasetSpec
    from genecorpus.io import CellSource

__all__ = ["CellRange", "CellStats", "DatasetPlan", "GeneBlock", "gene_keys", "plan_dataset", "split_cells"]

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
        The ``filter_pass`` column (cells whose value equals 1), or all True (bool).
    """

    n_counts: np.ndarray
    mito_counts: np.ndarray
    n_genes: np.ndarray
    preselected: np.ndarray

    def mito_values(self, mode: str) -> np.ndarray:
        """The quantity the mitochondrial rule looks at: counts (int64) or fraction (float64)."""
        if mode == "fraction":
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = self.mito_counts / self.n_counts
            return np.where(self.n_counts > 0, frac, 0.0)
        return self.mito_counts

    def take(self, rows: np.ndarray) -> CellStats:
        """The statistics of some cells of the block (a copy)."""
        return CellStats(self.n_counts[rows], self.mito_counts[rows], self.n_genes[rows], self.preselected[rows])

    @classmethod
    def concatenate(cls, parts: Sequence[CellStats]) -> CellStats:
        """The statistics of several blocks, one after the other."""
        return cls(*(np.concatenate([getattr(p, name) for p in parts])
                     for name in ("n_counts", "mito_counts", "n_genes", "preselected")))


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
    """Input column → index into the universe, or -1 (int32)."""
    is_mito_col: np.ndarray
    """Input column is a mitochondrial gene (bool)."""
    gene_summary: GeneMappingSummary
    depth: DepthSource
    filter_column: str | None
    """The pre-selection column when the input has it."""
    injective: bool
    """No two input columns map to the same gene (nothing to sum)."""
    source: Any = None
    """An in-memory AnnData (Python API only; read in this process)."""

    def open(self) -> CellSource:
        """Open the dataset for reading."""
        s = self.spec
        target = self.source if self.source is not None else s.path
        return open_dataset(target, format=s.format, layer=s.layer, use_raw=s.use_raw,
                            cells_as_rows=s.cells_as_rows)

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
        want = list(dict.fromkeys([*obs_columns, *(["n_counts"] if from_obs else []),
                                   *([self.filter_column] if self.filter_column else [])]))
        source = self.open()
        try:
            for first in range(start, stop, block_size):
                last = min(first + block_size, stop)
                try:
                    block = source.read_block(first, last, obs_columns=want)
                except GenecorpusError:
                    raise
                except (OSError, ValueError, KeyError) as e:
                    msg = f"{self.spec.path}: cannot read cells {first}:{last} ({e}); the file may be corrupt"
                    raise InputError(msg) from None
                x = block.counts
                gdata, gidx, gptr, totals, mito = _kernels.collapse_csr(
                    x.data, x.indices, x.indptr.astype(np.int64), self.col_to_gene, self.is_mito_col,
                    self.n_genes, self.injective)
                g = sp.csr_matrix((gdata, gidx, gptr), shape=(x.shape[0], self.n_genes))
                stats = CellStats(totals, mito, np.diff(gptr), self._preselected(block.obs, block.cell_ids))
                depth, depth_dtype = totals.astype(np.float64), np.dtype(np.int64)
                if from_obs:
                    depth, depth_dtype = self._obs_depth(block.obs["n_counts"], stats, block.cell_ids)
                yield GeneBlock(first, block.cell_ids, block.obs, g, stats, depth, depth_dtype,
                                block.value_dtype or np.dtype(np.float32), block.dense_input)
        finally:
            source.close()

    def _preselected(self, obs: Mapping[str, np.ndarray], cell_ids: np.ndarray) -> np.ndarray:
        if not self.filter_column:
            return np.ones(len(cell_ids), dtype=bool)
        flags = np.asarray(obs[self.filter_column])
        if flags.dtype.kind not in "biuf":
            msg = (f"{self.spec.path}: obs column {self.filter_column!r} holds {flags.dtype} values "
                   f"(cell {cell_ids[0]!r}: {flags[0]!r}); it must be boolean or 0/1 "
                   f"(cells with 1/True are kept)")
            raise InputError(msg)
        return flags == 1  # Geneformer's test: a cell passes when its value equals 1

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


def _identifiers(source: CellSource, spec: DatasetSpec) -> np.ndarray:
    """The gene identifiers of the input columns: ``gene_column``, else ``ensembl_id``, else the var index."""
    if spec.gene_column:
        if spec.gene_column not in source.var_columns:
            msg = (f"{source.path}: no var column {spec.gene_column!r}; available: "
                   f"{', '.join(source.var_columns) or 'none'} (or omit gene_column to use the index)")
            raise ConfigError(msg)
        return source.var_column(spec.gene_column)
    if "ensembl_id" in source.var_columns:
        return source.var_column("ensembl_id")
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
    with _open(spec, source) as opened:
        return _keys(opened, spec, mapping)[0]


def _open(spec: DatasetSpec, source: Any) -> CellSource:
    target = source if source is not None else spec.path
    return open_dataset(target, format=spec.format, layer=spec.layer, use_raw=spec.use_raw,
                        cells_as_rows=spec.cells_as_rows)


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

    Raises
    ------
    InputError
        The dataset cannot be opened, none of its genes is in the universe, or an obs column is missing.
    GeneMappingError
        Its identifiers cannot be mapped (``unmapped="drop"``).
    ConfigError
        ``gene_column`` or an obs column is not in the dataset.
    """
    with _open(spec, source) as opened:
        if unmapped == "drop":
            mapped: genes.GeneMapping | None = _map(opened, spec, mapping)
            keys = mapped.ensembl_ids
        else:
            keys, mapped = _keys(opened, spec, mapping)
        col_to_gene = genes.collapse_index(keys, universe)
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
        )
        if n_used == 0:
            msg = (f"{opened.path}: none of its {len(keys)} genes is in the gene universe; check gene_id, "
                   f"release or the gene mapping")
            raise InputError(msg)
        obs = set(opened.obs_columns)
        missing = [c for c in spec.obs_columns if c not in obs]
        if missing:
            msg = (f"{opened.path}: obs column {missing[0]!r} not found; available: "
                   f"{', '.join(sorted(obs)) or 'none'}")
            raise ConfigError(msg)
        return DatasetPlan(
            index=index, spec=spec, n_cells=opened.n_cells, n_genes=len(universe), col_to_gene=col_to_gene,
            is_mito_col=is_mito, gene_summary=summary,
            depth=DepthSource.OBS_N_COUNTS if use_obs_n_counts and "n_counts" in obs else DepthSource.TOTAL_COUNTS,
            filter_column=spec.filter_column if spec.filter_column in obs else None,
            injective=n_distinct == n_used, source=source,
        )


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
