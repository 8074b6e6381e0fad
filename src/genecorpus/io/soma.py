"""TileDB-SOMA experiments (a local folder, or a URI such as the CELLxGENE Census's) read by soma_joinid.

A SOMA experiment holds one ``obs`` dataframe (cells) and measurements ``ms[name]``, each with a ``var``
dataframe (genes) and X layers (cells x genes matrices). :class:`SomaReader` opens one measurement and
one X layer of it as a :class:`~genecorpus.io.CellSource`:

- **rows are soma_joinids**: ``read_rows(joinids)`` reads any set of cells (the cells a query selected),
  ``read_block(start, stop)`` the cells whose joinid is in ``start:stop`` (experiments written by
  ``tiledbsoma.io`` and the Census number their cells ``0 .. n_obs - 1``);
  :meth:`SomaReader.query_obs` runs an obs ``value_filter`` and returns the sorted joinids it selects
  (with one column's values, to split the cells by it);
- **genes** are the measurement's var rows in soma_joinid order; ``var_names`` is the ``var_id`` column
  that ``tiledbsoma.io.from_h5ad`` writes the AnnData var index into, else ``feature_id`` (the Census's
  Ensembl IDs), else the var soma_joinid; every var column is an annotation column, so the dataset
  reader finds ``feature_id`` (Ensembl IDs) before anything else, as for CELLxGENE files;
- **cell ids** are the ``obs_id`` column (from_h5ad's obs index), else the soma_joinid as a string (the
  Census has no barcode column);
- **the matrix** is ``ms[measurement].X[layer]``: the measurement defaults to ``RNA``; ``use_raw`` reads
  the measurement ``raw``, where from_h5ad writes an AnnData's ``raw.X``; the layer defaults to ``raw``
  (the Census's raw counts), else ``data`` (from_h5ad's X), else the only layer. So an experiment made
  from h5ad files reads as the files do: X, ``layers[name]`` and ``raw.X`` are ``data``, ``name`` and
  the ``raw`` measurement;
- **a snapshot**: the experiment is opened at one TileDB timestamp (``snapshot_ms``, now when not
  given), so every task of a build reads the same cells even while someone writes to the experiment.

Counts are validated as every reader's are (:func:`~genecorpus.io.counts.validate_counts`) and keep the
stored value dtype (float32 in the Census and from_h5ad). A block costs one sparse read of its cells'
coordinates (TileDB fetches only the tiles that hold them) and one obs read of its cells.

:func:`experiment_identity` names an experiment's content without reading it, for resume keys and the
manifest: a local experiment by the listing of its files (relative path and size: TileDB never rewrites
a file, every write adds uniquely named fragment files), a remote one by its URI and the snapshot
timestamp (remote experiments such as Census releases are taken to be immutable).

``tiledbsoma`` is the optional ``soma`` extra; it is imported only when an experiment is opened.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from genecorpus.errors import ConfigError, CountsError, InputError
from genecorpus.io.block import CellBlock
from genecorpus.io.counts import validate_counts
from genecorpus.io.reader import BaseReader, as_str_array
from genecorpus.io.registry import is_uri, register_reader

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from types import ModuleType

    import pyarrow as pa

__all__ = [
    "CELL_ID_COLUMN",
    "DEFAULT_LAYERS",
    "DEFAULT_MEASUREMENT",
    "GENE_ID_COLUMN",
    "JOINID",
    "RAW_MEASUREMENT",
    "ExperimentIdentity",
    "SomaReader",
    "experiment_identity",
    "is_soma_experiment",
    "local_experiment_path",
    "require_tiledbsoma",
]

DEFAULT_MEASUREMENT = "RNA"
"""The measurement read when none is given (the Census's, and ``from_h5ad``'s usual name)."""
RAW_MEASUREMENT = "raw"
"""The measurement ``tiledbsoma.io.from_h5ad`` writes an AnnData's ``raw.X`` and ``raw.var`` into."""
DEFAULT_LAYERS = ("raw", "data")
"""X layers read when none is given, the first present: the Census's raw counts, from_h5ad's X."""
CELL_ID_COLUMN = "obs_id"
"""obs column of cell ids (``from_h5ad``'s default ``obs_id_name``, holding the AnnData obs index)."""
GENE_ID_COLUMN = "var_id"
"""var column of gene ids (``from_h5ad``'s default ``var_id_name``, holding the AnnData var index)."""
JOINID = "soma_joinid"
"""SOMA's integer id of every obs and var row."""
SOMA_EXTRA = "pip install 'genecorpus[soma]'"
SPAN_READ_FACTOR = 2
"""A block's cells are read as one range of joinids when the range holds at most this many times as many
cells as the block (the others are dropped), else as a list of joinids: a range read costs TileDB far less
than as many points, and reads at most twice the block's cells."""

_SECRET_WORDS = ("secret", "token", "password", "access_key", "session")
"""Parts of TileDB configuration keys that hold credentials, which a manifest must not record."""


def require_tiledbsoma(uri: str) -> ModuleType:
    """Return the ``tiledbsoma`` module, or raise a one-line error naming the ``soma`` extra."""
    try:
        import tiledbsoma
    except ImportError:
        msg = f"{uri}: reading a TileDB-SOMA experiment needs the soma extra: {SOMA_EXTRA}"
        raise ConfigError(msg) from None
    return tiledbsoma


def local_experiment_path(uri: str) -> Path | None:
    """The folder of a local experiment (a path, or a ``file://`` URI); None for a remote URI."""
    if not is_uri(uri):
        return Path(uri)
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path))
    return None


@dataclass(frozen=True)
class ExperimentIdentity:
    """What names a SOMA experiment's content in resume keys and the manifest (no content is hashed)."""

    token: str
    """``soma-files:<sha256>`` of the listing of a local experiment's files (relative path and size), or
    ``soma-uri:<sha256>`` of a remote experiment's URI and snapshot timestamp."""
    n_bytes: int
    """Total size of a local experiment's files; 0 for a remote one."""
    local: bool


def experiment_identity(uri: str, *, snapshot_ms: int) -> ExperimentIdentity:
    """Name the content of the SOMA experiment at ``uri`` as read at ``snapshot_ms``, cheaply.

    A local experiment is named by the sorted list of its files with their sizes: TileDB writes every
    change as new, uniquely named fragment files and never rewrites one, so any write, consolidation or
    vacuum changes the list, and the snapshot does not enter (an unchanged experiment keeps its token).
    A remote experiment (``s3://``, ``gs://``, ``tiledb://``, ...) cannot be listed cheaply: it is named
    by its URI and the snapshot timestamp, on the assumption that what a URI held at a time does not
    change (CELLxGENE Census releases are immutable, versioned URIs).

    Examples
    --------
    >>> experiment_identity("s3://bucket/census/homo_sapiens", snapshot_ms=1).token[:9]
    'soma-uri:'
    """
    folder = local_experiment_path(uri)
    if folder is None:
        digest = hashlib.sha256(f"{uri.rstrip('/')}\0{snapshot_ms}".encode()).hexdigest()
        return ExperimentIdentity(f"soma-uri:{digest}", 0, local=False)
    h = hashlib.sha256()
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root, name)
            size = path.stat().st_size
            h.update(f"{path.relative_to(folder).as_posix()}\0{size}\n".encode())
            total += size
    return ExperimentIdentity(f"soma-files:{h.hexdigest()}", total, local=True)


def _message(exc: BaseException) -> str:
    """A tiledbsoma error's message on one line, without the Python traceback its C++ errors carry."""
    text = str(exc).split("\n\nAt:")[0]
    return " ".join(text.split()) or type(exc).__name__


def _column_values(column: pa.ChunkedArray) -> np.ndarray:
    """An obs column as the h5ad reader gives it: strings and categoricals (SOMA enumerations) as object
    arrays (None where missing), numbers and booleans with their dtype, integers with missing values as
    float64 (NaN), booleans with missing values as objects (None)."""
    import pyarrow as pa

    kind = column.type
    if pa.types.is_dictionary(kind):  # each value is its category's one Python object: 8 bytes a cell
        parts = []
        for chunk in column.chunks:
            categories = np.array([*chunk.dictionary.to_pylist(), None], dtype=object)
            codes = chunk.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            parts.append(categories[codes])  # -1 (missing) picks the trailing None
        return np.concatenate(parts) if parts else np.empty(0, dtype=object)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    if column.null_count:
        if pa.types.is_integer(kind) or pa.types.is_floating(kind):
            return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
        return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive runs of sorted joinids as inclusive ``(first, last)`` pairs."""
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(rows) - 1]])
    return [(int(rows[a]), int(rows[b])) for a, b in zip(starts.tolist(), stops.tolist(), strict=True)]


class SomaReader(BaseReader):
    """One measurement and X layer of a TileDB-SOMA experiment, read by soma_joinid (see the module docstring).

    Parameters
    ----------
    uri
        Local folder or URI of the experiment (``s3://…``, ``tiledb://…``).
    measurement
        Measurement to read; :data:`DEFAULT_MEASUREMENT` when None.
    layer
        X layer to read; the first of :data:`DEFAULT_LAYERS` present, else the only one, when None.
    use_raw
        Read the measurement :data:`RAW_MEASUREMENT` (an AnnData's ``raw.X``, as from_h5ad writes it).
    snapshot_ms
        TileDB timestamp (ms since 1970) at which every object is opened; now when None. The one used is
        :attr:`snapshot_ms`.
    tiledb_config
        TileDB configuration, e.g. ``{"vfs.s3.region": "us-west-2", "vfs.s3.no_sign_request": "true"}``
        for the public Census bucket; credentials belong in the environment, not here.
    """

    _container = "experiment"

    def __init__(self, uri: str, *, measurement: str | None = None, layer: str | None = None,
                 use_raw: bool = False, snapshot_ms: int | None = None,
                 tiledb_config: Mapping[str, str] | None = None) -> None:
        super().__init__(uri, "soma")
        self._var_names_cache: np.ndarray | None = None
        soma = require_tiledbsoma(uri)
        self._soma = soma
        if use_raw and measurement not in (None, RAW_MEASUREMENT):
            msg = f"{uri}: give measurement= or use_raw=True (the measurement {RAW_MEASUREMENT!r}), not both"
            raise InputError(msg)
        self.measurement = RAW_MEASUREMENT if use_raw else measurement or DEFAULT_MEASUREMENT
        config = dict(tiledb_config or {})
        secret = [key for key in config if any(word in key.lower() for word in _SECRET_WORDS)]
        if secret:
            msg = (f"{uri}: tiledb_config key {secret[0]!r} holds a credential, which the corpus manifest would "
                   "record; set it in the environment instead (e.g. AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
            raise ConfigError(msg)
        try:
            context = soma.SOMATileDBContext(tiledb_config=config) if config else None
            self._experiment = soma.Experiment.open(uri, tiledb_timestamp=snapshot_ms, context=context)
        except soma.DoesNotExistError:
            msg = f"{uri}: no TileDB-SOMA experiment there; check the path or URI"
            raise InputError(msg) from None
        except (soma.SOMAError, OSError, ValueError, TypeError) as e:
            msg = f"{uri}: cannot open the TileDB-SOMA experiment ({_message(e)}); check the URI and the network"
            raise InputError(msg) from None
        try:
            self._setup(layer)
        except BaseException:
            self._experiment.close()
            raise

    @property
    def snapshot_ms(self) -> int:
        """The TileDB timestamp (ms since 1970) at which the experiment is read."""
        return int(self._experiment.tiledb_timestamp_ms)

    @property
    def matrix(self) -> str:
        """Where the counts are read from, e.g. ``ms['RNA'].X['raw']``."""
        return f"ms[{self.measurement!r}].X[{self.layer!r}]"

    def _setup(self, layer: str | None) -> None:
        exp, soma = self._experiment, self._soma
        measurements = list(exp.ms.keys()) if "ms" in exp else []
        if self.measurement not in measurements:
            msg = (f"{self.path}: no measurement {self.measurement!r}; available: {', '.join(measurements) or 'none'}"
                   " (set measurement = ... in the manifest)")
            raise InputError(msg)
        ms = exp.ms[self.measurement]
        layers = list(ms.X.keys()) if "X" in ms else []
        if layer is None:
            found = [name for name in DEFAULT_LAYERS if name in layers]
            if not found and len(layers) != 1:
                msg = (f"{self.path}: measurement {self.measurement!r} has X layers {', '.join(layers) or 'none'}; "
                       "say which holds raw counts with layer = ...")
                raise InputError(msg)
            layer = found[0] if found else layers[0]
        elif layer not in layers:
            msg = (f"{self.path}: no X layer {layer!r} in measurement {self.measurement!r}; available: "
                   f"{', '.join(layers) or 'none'}")
            raise InputError(msg)
        self.layer = layer
        self._x = ms.X[layer]
        if not isinstance(self._x, soma.SparseNDArray | soma.DenseNDArray):
            msg = f"{self.path}: {self.matrix} is a {type(self._x).__name__}, not a matrix of counts"
            raise InputError(msg)
        self.stored_dense = isinstance(self._x, soma.DenseNDArray)
        # tasks only need the genes' joinids: the other var columns are read when asked for (planning)
        self._var_joinids = np.sort(ms.var.read(column_names=[JOINID]).concat().column(JOINID).to_numpy()
                                    ).astype(np.int64)
        self._dense_var = bool(np.array_equal(self._var_joinids, np.arange(len(self._var_joinids))))
        self._var = {name: _VarColumn(ms.var, name) for name in ms.var.schema.names if name != JOINID}
        self._obs_schema = list(exp.obs.schema.names)
        self._cell_id_column = CELL_ID_COLUMN if CELL_ID_COLUMN in self._obs_schema else None
        self._n_cells = int(exp.obs.count)
        self._value_dtype = np.dtype(self._x.schema.field("soma_data").type.to_pandas_dtype())

    # -- the CellSource interface ---------------------------------------------------------------
    @property
    def var_names(self) -> np.ndarray:
        """Object array of str, one per gene in var joinid order: ``var_id``, else ``feature_id``, else the joinid."""
        if self._var_names_cache is None:
            name = next((name for name in (GENE_ID_COLUMN, "feature_id") if name in self._var), None)
            self._var_names_cache = (self.var_column(name) if name else as_str_array(self._var_joinids.astype(str)))
        return self._var_names_cache

    @property
    def n_genes(self) -> int:
        """Number of genes (var rows) of the measurement."""
        return len(self._var_joinids)

    @property
    def obs_columns(self) -> list[str]:
        """The obs dataframe's columns, ``soma_joinid`` first."""
        return list(self._obs_schema)

    def obs_column(self, name: str) -> np.ndarray:
        """Return obs column ``name`` for every cell of the experiment, in soma_joinid order (reads no counts)."""
        self._require_obs([name])
        table = self._read_obs(None, [name])
        return _column_values(table.column(name))

    def read_block(self, start: int, stop: int, *, obs_columns: Sequence[str] = ()) -> CellBlock:
        """Read the cells whose soma_joinid is in ``start:stop`` (see :meth:`read_rows`)."""
        if not 0 <= start <= stop:
            msg = f"{self.path}: rows {start}:{stop} are not a range of soma_joinids"
            raise IndexError(msg)
        return self.read_rows(np.arange(start, stop, dtype=np.int64), obs_columns=obs_columns)

    def read_rows(self, rows: np.ndarray, *, obs_columns: Sequence[str] = ()) -> CellBlock:
        """Read the cells with soma_joinids ``rows`` as validated raw counts, with the requested obs columns.

        Parameters
        ----------
        rows
            soma_joinids, ascending and distinct (int64); a block of them, so that memory stays bounded.
        obs_columns
            Names from :attr:`obs_columns` to read alongside the counts.

        Returns
        -------
        The :class:`CellBlock` of the cells in the order of ``rows`` (``start`` 0), columns in var order.

        Raises
        ------
        InputError
            A joinid is not in the experiment, or the experiment cannot be read.
        CountsError
            A value is not a raw count.
        """
        if isinstance(obs_columns, str):
            obs_columns = [obs_columns]
        rows = np.asarray(rows, dtype=np.int64)
        self._require_obs(obs_columns)
        wanted = list(dict.fromkeys([*([self._cell_id_column] if self._cell_id_column else []), *obs_columns]))
        try:
            obs = self._read_obs(rows, wanted)
            counts = self._read_matrix(rows)
        except self._soma.SOMAError as e:
            msg = (f"{self.path}: cells with soma_joinid {rows[0] if len(rows) else 0}..{rows[-1] if len(rows) else 0} "
                   f"could not be read ({_message(e)}); check the experiment and the network")
            raise InputError(msg) from None
        cell_ids = (as_str_array(_column_values(obs.column(self._cell_id_column))) if self._cell_id_column
                    else as_str_array(rows.astype(str)))
        values = {name: _column_values(obs.column(name)) for name in obs_columns}
        try:
            checked = validate_counts(counts, path=self.path, cell_ids=cell_ids, gene_ids=_GeneIds(self), start=0)
        except CountsError as exc:
            exc.add_note(f"while reading {len(rows)} cells of {self.path} ({self.matrix}, soma_joinids "
                         f"{rows[0]}..{rows[-1]})")
            raise
        return CellBlock(counts=checked, cell_ids=cell_ids, start=0, obs=values, value_dtype=self._value_dtype,
                         dense_input=self.stored_dense)

    def query_obs(self, value_filter: str | None, *, column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The soma_joinids of the cells that ``value_filter`` selects, ascending, in one scan of obs.

        Parameters
        ----------
        value_filter
            An obs filter in TileDB-SOMA's syntax (``tissue_general == "blood" and is_primary_data == True``);
            None selects every cell.
        column
            An obs column whose values to return too (aligned with the joinids), e.g. to split the cells.

        Returns
        -------
        The joinids (int64) and the column's values (None without ``column``).

        Raises
        ------
        InputError
            The filter cannot be parsed or names a column obs does not have.
        """
        if column is not None:
            self._require_obs([column])
        import pyarrow as pa

        names = [JOINID, *([column] if column is not None and column != JOINID else [])]
        joinids, values = [], []
        try:
            for batch in self._experiment.obs.read(column_names=names, value_filter=value_filter):
                joinids.append(batch.column(JOINID).to_numpy())
                if column is not None:
                    values.append(_column_values(pa.chunked_array([batch.column(column)])))
        except (self._soma.SOMAError, ValueError) as e:
            msg = (f"{self.path}: value_filter {value_filter!r} cannot be applied ({_message(e)}); write it in "
                   f"TileDB-SOMA's syntax over the obs columns ({', '.join(self._obs_schema)}), e.g. "
                   "tissue_general == \"blood\" and is_primary_data == True")
            raise InputError(msg) from None
        found = np.concatenate(joinids).astype(np.int64) if joinids else np.empty(0, np.int64)
        order = np.argsort(found, kind="stable")
        if column is None:
            return found[order], None
        picked = np.concatenate(values) if values else np.empty(0, dtype=object)
        return found[order], picked[order]

    def close(self) -> None:
        """Close the experiment."""
        self._experiment.close()

    # -- what BaseReader asks of a format (range reads go through read_rows) --------------------
    def _read_counts(self, start: int, stop: int) -> Any:
        return self._read_matrix(np.arange(start, stop, dtype=np.int64))

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self.read_rows(np.arange(start, stop, dtype=np.int64)).cell_ids

    # -- reading --------------------------------------------------------------------------------
    def _require_obs(self, names: Sequence[str]) -> None:
        missing = [name for name in names if name not in self._obs_schema]
        if missing:
            msg = (f"{self.path}: no cell annotation column {missing[0]!r}; available: "
                   f"{', '.join(self._obs_schema) or 'none'}")
            raise InputError(msg)

    def _read_obs(self, rows: np.ndarray | None, names: Sequence[str]) -> pa.Table:
        """obs columns ``names`` of the cells ``rows`` (every cell when None), in joinid order, checked complete."""
        coords = () if rows is None else (rows,)
        table = self._experiment.obs.read(coords, column_names=[JOINID, *[n for n in names if n != JOINID]]).concat()
        table = table.take(np.argsort(table.column(JOINID).to_numpy(), kind="stable"))
        if rows is not None and table.num_rows != len(rows):
            found = table.column(JOINID).to_numpy()
            absent = rows[~np.isin(rows, found)]
            msg = (f"{self.path}: no cell with soma_joinid {int(absent[0]) if len(absent) else -1} in obs "
                   f"({len(absent)} of {len(rows)} asked for are missing); the experiment changed or its joinids "
                   "are not 0 .. n_obs - 1")
            raise InputError(msg)
        return table

    def _read_matrix(self, rows: np.ndarray) -> sp.csr_matrix:
        """Counts of the cells ``rows`` (ascending joinids) as CSR, columns in var order, sorted indices."""
        n_rows, n_genes = len(rows), len(self._var_joinids)
        if self.stored_dense:
            pieces = [np.asarray(self._x.read((slice(first, last), slice(None))).to_numpy())
                      for first, last in _runs(rows)] if n_rows else []
            dense = np.concatenate(pieces) if pieces else np.zeros((0, n_genes), self._value_dtype)
            return sp.csr_matrix(dense[:, self._var_joinids] if not self._dense_var else dense)
        if not n_rows:
            return sp.csr_matrix((0, n_genes), dtype=self._value_dtype)
        first, span = int(rows[0]), int(rows[-1] - rows[0]) + 1
        if span <= SPAN_READ_FACTOR * n_rows:  # one range over the span (cheaper than points), others dropped
            coords: Any = slice(first, int(rows[-1]))  # SOMA slices include their stop
            position = np.full(span, -1, dtype=np.int64)
            position[rows - first] = np.arange(n_rows)
        else:
            coords, position = rows, None
        # TileDB's own result order is the fastest by far (row-major costs ten times more); CSR is made here
        table = self._x.read((coords, slice(None))).tables().concat()
        dim0 = table.column("soma_dim_0").to_numpy()
        dim1 = table.column("soma_dim_1").to_numpy()
        data = table.column("soma_data").to_numpy()
        if position is None:
            at_row = np.searchsorted(rows, dim0)
        else:
            at_row = position[dim0 - first]
            selected = at_row >= 0
            if not selected.all():
                at_row, dim1, data = at_row[selected], dim1[selected], data[selected]
        at_col = dim1 if self._dense_var else np.searchsorted(self._var_joinids, dim1)
        matrix = sp.csr_matrix((data, (at_row, at_col)), shape=(n_rows, n_genes))
        matrix.sort_indices()
        return matrix

    def __repr__(self) -> str:
        return (f"<SomaReader {self.path!r} {self.matrix} @ {self.snapshot_ms}: {self.n_cells} cells x "
                f"{self.n_genes} genes>")


class _VarColumn:
    """A var column of a measurement, read whole (in var joinid order) the first time it is asked for."""

    def __init__(self, var: Any, name: str) -> None:
        self._var = var
        self._name = name

    def read(self, start: int, stop: int | None) -> np.ndarray:
        table = self._var.read(column_names=[JOINID, self._name]).concat()
        table = table.take(np.argsort(table.column(JOINID).to_numpy(), kind="stable"))
        return _column_values(table.column(self._name))[start:stop]


class _GeneIds:
    """The gene ids of a reader, looked up only when an error message names one."""

    def __init__(self, reader: SomaReader) -> None:
        self._reader = reader

    def __getitem__(self, index: int) -> str:
        return str(self._reader.var_names[index])

    def __len__(self) -> int:
        return self._reader.n_genes


def is_soma_experiment(source: Any) -> bool:
    """A local folder holding a TileDB group with ``obs`` and ``ms`` members (a SOMA experiment's layout).

    Looks only at the folder's entries, so it is cheap and never imports tiledbsoma; the opener checks
    that the group is an experiment.
    """
    if not isinstance(source, Path):
        return False
    try:
        return ((source / "__tiledb_group.tdb").exists() or (source / "__group").is_dir()) and all(
            (source / name).is_dir() for name in ("obs", "ms"))
    except OSError:
        return False


@register_reader("soma", sniff=is_soma_experiment, uris=True,
                 options=("layer", "use_raw", "measurement", "snapshot_ms", "tiledb_config"))
def _open_soma(source: Path | str, *, layer: str | None = None, use_raw: bool = False,
               measurement: str | None = None, snapshot_ms: int | None = None,
               tiledb_config: Mapping[str, str] | None = None) -> SomaReader:
    return SomaReader(str(source), measurement=measurement, layer=layer, use_raw=use_raw, snapshot_ms=snapshot_ms,
                      tiledb_config=tiledb_config)
