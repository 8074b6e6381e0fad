"""The registry of input formats: how :func:`open_dataset` finds the reader of a source.

A format module registers its opener with :func:`register_reader` when it is imported; importing
:mod:`genecorpus.io` imports them all. This module imports no format module, so they depend on it
and not the other way round.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from genecorpus.errors import InputError
from genecorpus.io.block import DEFAULT_BLOCK_SIZE, CellSource

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "OPTIONS",
    "ReaderSpec",
    "is_uri",
    "iter_block_ranges",
    "known_formats",
    "open_dataset",
    "reads_at_snapshot",
    "register_reader",
]

logger = logging.getLogger(__name__)

OPTIONS = ("layer", "use_raw", "cells_as_rows", "measurement", "snapshot_ms", "tiledb_config")
"""Reader options of :func:`open_dataset`; each reader declares the ones it understands."""

_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(source: object) -> bool:
    """Whether ``source`` is a URI with a scheme (``s3://…``, ``gs://…``, ``tiledb://…``, ``file://…``).

    Such a source is a string everywhere: it is never resolved against a folder nor checked for on the
    local file system, and only readers registered with ``uris=True`` open it.

    Examples
    --------
    >>> is_uri("s3://cellxgene-census-public-us-west-2/cell-census"), is_uri("data/pbmc.h5ad")
    (True, False)
    """
    return isinstance(source, str) and _URI_SCHEME.match(source) is not None


Opener = TypeVar("Opener", bound="Callable[..., CellSource]")
"""Function that opens one source in one format; it receives only the options it declared."""


@dataclass(frozen=True)
class ReaderSpec:
    """One registered input format."""

    name: str
    opener: Callable[..., CellSource]
    suffixes: tuple[str, ...]
    """Lower-case file suffixes owned by the format, compound ones included (``".csv.gz"``)."""
    sniff: Callable[[Any], bool] | None
    """Return True when a path (or in-memory object) is in this format; must never raise."""
    options: frozenset[str]
    """Names from :data:`OPTIONS` the opener accepts."""
    in_memory: bool
    """The opener takes in-memory objects (e.g. ``AnnData``) rather than paths."""
    folders: bool = False
    """The format's sources are folders named with one of its suffixes (``.zarr``)."""
    uris: bool = False
    """The opener also takes URIs with a scheme (``s3://…``), as strings (see :func:`is_uri`)."""


_READERS: dict[str, ReaderSpec] = {}


def register_reader(
    name: str,
    *,
    suffixes: tuple[str, ...] = (),
    sniff: Callable[[Any], bool] | None = None,
    options: tuple[str, ...] = (),
    in_memory: bool = False,
    folders: bool = False,
    uris: bool = False,
) -> Callable[[Opener], Opener]:
    """Register the decorated function as the opener of input format ``name``.

    Parameters
    ----------
    name
        Format name users pass as ``format=`` and that ends up in ``CellSource.format``.
    suffixes
        File suffixes that select this format, e.g. ``(".h5ad",)``; matched case-insensitively,
        longest first.
    sniff
        Content test ``(path_or_object) -> bool`` used when no suffix decides (or to confirm a
        suffix shared by several formats). It receives a :class:`~pathlib.Path` for files and
        folders, or the object itself for in-memory sources, and must return False rather than
        raise.
    options
        The :func:`open_dataset` options (names from :data:`OPTIONS`) the opener accepts; giving
        any other one for this format is an :class:`~genecorpus.errors.InputError`.
    in_memory
        The opener takes an in-memory object (such as an ``anndata.AnnData``) instead of a
        :class:`~pathlib.Path`.
    folders
        The format's sources are folders named with one of ``suffixes`` (a ``.zarr`` store): a
        folder with such a name that no content test recognizes goes to this opener, which says
        what is wrong with it (other folders are detected by content only).
    uris
        The opener also takes URIs with a scheme (``s3://bucket/…``), given to it as strings; a URI
        with no ``format`` goes to the first such reader.

    Returns
    -------
    The decorator, which returns the opener unchanged.

    Examples
    --------
    >>> @register_reader("demo", suffixes=(".demo",))
    ... def _open_demo(path):
    ...     raise NotImplementedError
    >>> "demo" in known_formats()
    True
    >>> _ = _READERS.pop("demo")
    """
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        msg = f"reader {name!r}: unknown option(s) {unknown}; choose from {list(OPTIONS)}"
        raise ValueError(msg)

    def decorate(opener: Opener) -> Opener:
        if name in _READERS:
            msg = f"a reader named {name!r} is already registered"
            raise ValueError(msg)
        _READERS[name] = ReaderSpec(
            name=name,
            opener=opener,
            suffixes=tuple(s.lower() for s in suffixes),
            sniff=sniff,
            options=frozenset(options),
            in_memory=in_memory,
            folders=folders,
            uris=uris,
        )
        return opener

    return decorate


def known_formats() -> list[str]:
    """Return the names of the registered input formats, in registration order.

    Examples
    --------
    >>> {"h5ad", "loom", "10x-mtx", "10x-h5", "csv"} <= set(known_formats())
    True
    """
    return list(_READERS)


def iter_block_ranges(n_cells: int, block_size: int = DEFAULT_BLOCK_SIZE) -> list[tuple[int, int]]:
    """Split ``n_cells`` rows into consecutive ``(start, stop)`` ranges of at most ``block_size``.

    Examples
    --------
    >>> iter_block_ranges(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    >>> iter_block_ranges(0, 4)
    []
    """
    if block_size < 1:
        msg = f"block_size must be at least 1, got {block_size}"
        raise ValueError(msg)
    return [(start, min(start + block_size, n_cells)) for start in range(0, n_cells, block_size)]


def _known_list() -> str:
    return ", ".join(_READERS)


def _matching_suffix(spec: ReaderSpec, name: str) -> int:
    """Length of the longest suffix of ``spec`` that ``name`` ends with (0 if none)."""
    return max((len(s) for s in spec.suffixes if name.endswith(s)), default=0)


def _sniff(spec: ReaderSpec, source: Any) -> bool:
    return spec.sniff is not None and spec.sniff(source)


def _detect_format(source: Any) -> ReaderSpec:
    if is_uri(source):
        for spec in _READERS.values():
            if spec.uris:
                return spec
        msg = f"{source}: no reader opens URIs (known formats: {_known_list()}); give a local path"
        raise InputError(msg)
    if not isinstance(source, Path):
        for spec in _READERS.values():
            if _sniff(spec, source):
                return spec
        msg = (
            f"cannot read an object of type {type(source).__name__}; pass a file path or an "
            f"anndata.AnnData (known formats: {_known_list()})"
        )
        raise InputError(msg)
    if source.is_dir():  # a reader's content test decides, else the suffix of a folder format
        for spec in _READERS.values():
            if _sniff(spec, source):
                return spec
        name = source.name.lower()
        for spec in _READERS.values():
            if spec.folders and _matching_suffix(spec, name):
                return spec  # its opener explains what is wrong with the folder
        msg = (
            f"{source}: a folder that no reader recognizes (folders are read as 10x matrix "
            "folders with matrix.mtx[.gz], features.tsv[.gz] or genes.tsv[.gz] and "
            "barcodes.tsv[.gz], AnnData .zarr folders, TileDB-SOMA experiments); give a data file or one of "
            "those folders"
        )
        raise InputError(msg)
    name = source.name.lower()
    by_suffix = sorted(
        (spec for spec in _READERS.values() if _matching_suffix(spec, name)),
        key=lambda spec: -_matching_suffix(spec, name),
    )
    # A suffix decides unless its reader can check content and says no (an .h5 that is an h5ad).
    if by_suffix and (by_suffix[0].sniff is None or _sniff(by_suffix[0], source)):
        return by_suffix[0]
    for spec in _READERS.values():
        if spec not in by_suffix[:1] and _sniff(spec, source):
            logger.info("%s: read as %s (detected from its content)", source, spec.name)
            return spec
    if by_suffix:
        return by_suffix[0]  # its opener explains what is wrong with the file
    msg = (
        f"{source}: unknown input format (suffix {source.suffix or 'none'!r}); known formats: "
        f"{_known_list()}; rename the file or pass format=..."
    )
    raise InputError(msg)


def reads_at_snapshot(source: str | os.PathLike[str] | Any, *, format: str | None = None) -> bool:  # noqa: A002
    """Whether ``source``'s format opens at a point in time (its reader takes ``snapshot_ms``).

    A versioned store (a TileDB-SOMA experiment) can change while a build reads it; the build fixes one
    timestamp for every read of such a dataset. Files are never versioned.

    Parameters
    ----------
    source
        A path, a URI, or an in-memory object, as :func:`open_dataset` takes it.
    format
        The declared format, if any (it decides; detection otherwise).

    Returns
    -------
    True for a source whose reader accepts ``snapshot_ms``; False otherwise, also for a source that no
    reader recognizes (:func:`open_dataset` says what is wrong with it).

    Examples
    --------
    >>> reads_at_snapshot("s3://bucket/census/experiment")
    True
    >>> reads_at_snapshot("counts.h5ad", format="h5ad")
    False
    """
    if format is not None:
        return format in _READERS and "snapshot_ms" in _READERS[format].options
    if isinstance(source, str | os.PathLike) and not is_uri(source):
        source = Path(source)
        if not source.exists():
            return False
    try:
        spec = _detect_format(source)
    except InputError:
        return False
    return "snapshot_ms" in spec.options


def _require_readable(path: Path) -> None:
    """One line for a file or folder this user may not read, before any reader meets it."""
    try:
        if path.is_dir():
            next(path.iterdir(), None)
        else:
            with path.open("rb"):
                pass
    except PermissionError:
        what = "folder" if path.is_dir() else "file"
        msg = (f"{path}: permission denied: this user may not read the {what}; make it readable "
               f"(chmod a+r{'x' if what == 'folder' else ''}) or copy it somewhere you may read")
        raise InputError(msg) from None
    except OSError as exc:
        msg = f"{path}: cannot be read ({exc.strerror or exc}); check the file system and rerun"
        raise InputError(msg) from None


def open_dataset(
    source: str | os.PathLike[str] | Any,
    *,
    format: str | None = None,  # noqa: A002 - the user-facing name of the option
    layer: str | None = None,
    use_raw: bool = False,
    cells_as_rows: bool | None = None,
    measurement: str | None = None,
    snapshot_ms: int | None = None,
    tiledb_config: Mapping[str, str] | None = None,
) -> CellSource:
    """Open one input dataset as a :class:`CellSource` of raw-count row blocks.

    Parameters
    ----------
    source
        Path of a file, 10x folder, zarr folder or TileDB-SOMA experiment folder, the URI of a
        TileDB-SOMA experiment (``s3://…``, kept as a string), or an in-memory ``anndata.AnnData``.
    format
        Registered format name (see :func:`known_formats`); detected from the suffix or the content
        when None.
    layer
        Read counts from this layer instead of X (h5ad, zarr, AnnData, loom).
    use_raw
        Read counts from ``raw.X`` (genes from ``raw.var``) instead of X (h5ad, zarr, AnnData).
    cells_as_rows
        Orientation of a CSV/TSV table; detected (and logged) when None.
    measurement
        The measurement of a TileDB-SOMA experiment to read (default ``RNA``).
    snapshot_ms
        Open every object of a TileDB-SOMA experiment at this TileDB timestamp (milliseconds since
        1970); now when None.
    tiledb_config
        TileDB configuration for a TileDB-SOMA experiment (e.g. ``{"vfs.s3.region": "us-west-2"}``).

    Returns
    -------
    An open source; call ``close()`` (or use it as a context manager) when done.

    Raises
    ------
    InputError
        The file is missing or unreadable, its format is unknown, or an option does not apply to it.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> adata = anndata.AnnData(np.array([[1.0, 0.0], [0.0, 3.0]], dtype=np.float32))
    >>> with open_dataset(adata) as source:
    ...     source.read_block(0, 2).counts.toarray().tolist()
    [[1, 0], [0, 3]]
    """
    if isinstance(source, str | os.PathLike) and not is_uri(source):
        source = Path(source)
        if not source.exists():
            msg = f"{source}: no such file or folder; check the path"
            raise InputError(msg)
        _require_readable(source)
    if format is None:
        spec = _detect_format(source)
    elif format in _READERS:
        spec = _READERS[format]
    else:
        msg = (
            f"{source}: unknown input format {format!r}; known formats: {_known_list()}; "
            "fix format or omit it to detect the format"
        )
        raise InputError(msg)
    if is_uri(source) and not spec.uris:
        msg = f"{source}: format {spec.name!r} reads local files, not URIs; download the file and give its path"
        raise InputError(msg)
    if not is_uri(source) and spec.in_memory == isinstance(source, Path):
        wanted = "an in-memory object" if spec.in_memory else "a file or folder path"
        given_what = str(source) if isinstance(source, Path) else f"a {type(source).__name__}"
        msg = f"format {spec.name!r} reads {wanted}, not {given_what}; omit format= to detect it"
        raise InputError(msg)
    options = {"layer": layer, "use_raw": use_raw, "cells_as_rows": cells_as_rows, "measurement": measurement,
               "snapshot_ms": snapshot_ms, "tiledb_config": tiledb_config}
    given = {"layer": layer is not None, "use_raw": use_raw, "cells_as_rows": cells_as_rows is not None,
             "measurement": measurement is not None, "snapshot_ms": snapshot_ms is not None,
             "tiledb_config": bool(tiledb_config)}
    refused = [name for name, is_given in given.items() if is_given and name not in spec.options]
    if refused:
        accepted = ", ".join(sorted(spec.options)) or "none"
        msg = (
            f"{source}: option {refused[0]}= does not apply to the {spec.name} format "
            f"(its options: {accepted}); remove it"
        )
        raise InputError(msg)
    try:
        return spec.opener(source, **{name: options[name] for name in spec.options})
    except InputError as exc:
        actual = _declared_format_mismatch(spec, source) if format is not None else None
        if actual is None:
            raise
        msg = (
            f"{source}: declared as format {spec.name!r} but its content is {actual.name}; "
            f"declare format {actual.name!r} or omit format to detect it"
        )
        raise InputError(msg) from exc


def _declared_format_mismatch(declared: ReaderSpec, source: Any) -> ReaderSpec | None:
    """The format whose content test ``source`` passes when the declared one fails it, if any."""
    if not isinstance(source, Path) or _sniff(declared, source):
        return None
    for spec in _READERS.values():
        if spec is not declared and not spec.in_memory and _sniff(spec, source):
            return spec
    return None

