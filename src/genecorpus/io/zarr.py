"""AnnData zarr folders (``.zarr``, as ``AnnData.write_zarr`` writes them) read block by block.

The folder holds the same layout as an h5ad file (see :mod:`~genecorpus.io.anndata_layout`, which
reads both: CSR, CSC or dense X, ``layer=``, ``use_raw=``, obs and var dataframes), in zarr format 2
or 3; it is opened with zarr (3 or later), read only, and never with ``anndata.read_zarr``.
:class:`ZarrGroup` and :class:`ZarrArray` wrap zarr's nodes as the
:class:`~genecorpus.io.store.GroupNode` and :class:`~genecorpus.io.store.ArrayNode` the layout is
read through: reads give numpy arrays (strings as object arrays of str, as h5py's are read), and a
chunk zarr cannot decode is an :class:`OSError` naming the array, which the reader reports in one
line ending "re-download or re-export it".

Two kinds of damage zarr does not notice are checked before each read, on the chunks it touches:

- a chunk cut short in a blosc-compressed array (zarr format 2's default codec): blosc decodes past
  the end of a short chunk instead of failing, so the compressed size in the chunk's header must be
  the size of the chunk file;
- a missing chunk of a sparse matrix's ``data``, ``indices`` or ``indptr``: zarr reads a chunk that
  is not there as zeros, which would silently change the counts, and anndata writes every chunk of
  these arrays unless the matrix holds no value at all (zarr skips only chunks that are all zeros).

A missing chunk of any other array reads as zeros (or empty strings), as zarr means it: a dense X's
all-zero chunks, an all-False mask, are not written. Only local folders are read (not zip files or
remote stores).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.errors import InputError
from genecorpus.io.anndata_layout import AnnDataLayoutReader
from genecorpus.io.reader import one_line
from genecorpus.io.registry import register_reader
from genecorpus.io.store import encoding_type

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from types import ModuleType

    import zarr

__all__ = ["ZarrArray", "ZarrFolder", "ZarrGroup", "ZarrReader"]

_DECODE_ERRORS = (RuntimeError, ValueError, EOFError, zlib.error)
"""What zarr's codecs raise for a chunk they cannot decode (blosc, zstd, lz4: RuntimeError; a chunk
of the wrong size: ValueError; gzip and zlib: EOFError, zlib.error; OSError passes as it is)."""

_OPEN_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError)
"""What zarr raises for a folder that is not a zarr group or whose metadata is damaged (its own
errors are ValueErrors; a missing node is a FileNotFoundError or a KeyError)."""

_SPARSE_ARRAYS = ("data", "indices", "indptr")
_BLOSC_HEADER = 16
"""Bytes of a blosc frame's header; bytes 12-16 hold the frame's compressed size."""


@dataclass(frozen=True)
class ZarrFolder:
    """The folder a node belongs to (the ``file`` of an h5py node)."""

    filename: str


def _is_blosc(codec: Any) -> bool:
    return getattr(codec, "codec_id", None) == "blosc" or type(codec).__name__ == "BloscCodec"


class ZarrArray:
    """A zarr array as an :class:`~genecorpus.io.store.ArrayNode` (see the module docstring).

    ``every_chunk_stored``: a chunk that is not in the folder is damage, not zeros.
    """

    def __init__(self, array: zarr.Array, folder: ZarrFolder, *, every_chunk_stored: bool = False) -> None:
        self.native = array
        """The zarr array itself (what ``anndata.io.read_elem`` takes)."""
        self.file = folder
        self.name: str = array.name
        self.shape: tuple[int, ...] = tuple(int(n) for n in array.shape)
        self.ndim = len(self.shape)
        strings = array.dtype.kind in "TO"
        self.dtype = np.dtype(object) if strings else np.dtype(array.dtype)
        self._strings = strings
        self._every_chunk_stored = every_chunk_stored
        self._stored_shape = array.shards or array.chunks
        """Shape of one stored object (a chunk, or a shard holding several)."""
        compressors = array.compressors
        self._blosc = array.shards is None and bool(compressors) and _is_blosc(compressors[-1])
        self._path = Path(folder.filename, array.path)
        metadata = self._path / (".zarray" if array.metadata.zarr_format == 2 else "zarr.json")
        if not metadata.is_file():  # listed by the consolidated metadata, not in the folder
            msg = f"{self.name}: {metadata.relative_to(folder.filename)} is missing"
            raise OSError(msg)

    @property
    def attrs(self) -> Mapping[str, Any]:
        """The array's attributes."""
        return self.native.attrs

    def __getitem__(self, selection: Any) -> Any:
        """Return the selected values (strings as an object array of str); damage is an OSError."""
        self._check_chunks(selection)
        try:
            values = self.native[selection]
        except _DECODE_ERRORS as exc:
            msg = f"{self.name}: {one_line(exc)}"
            raise OSError(msg) from exc
        if self._strings and isinstance(values, np.ndarray):
            return values.astype(object)
        return values

    def _chunk_coordinates(self, selection: Any) -> Iterator[tuple[int, ...]]:
        """Grid coordinates of the stored chunks (or shards) that hold ``selection``."""
        parts = selection if isinstance(selection, tuple) else (selection,)
        ranges = []
        for axis, (n, step) in enumerate(zip(self.shape, self._stored_shape, strict=True)):
            part = parts[axis] if axis < len(parts) else slice(None)
            if isinstance(part, int | np.integer) and n:
                index = int(part) % n
                ranges.append(range(index // step, index // step + 1))
                continue
            start, stop, _ = part.indices(n) if isinstance(part, slice) else (0, n, 1)  # else: all
            if stop <= start:
                return iter(())
            ranges.append(range(start // step, (stop - 1) // step + 1))
        return itertools.product(*ranges)

    def _check_chunks(self, selection: Any) -> None:
        """Raise OSError when a chunk ``selection`` reads is missing (where it must be stored) or
        is a blosc frame cut short."""
        if not self._every_chunk_stored and not self._blosc:
            return
        for coordinates in self._chunk_coordinates(selection):
            key = self.native.metadata.encode_chunk_key(coordinates)
            chunk = self._path / key
            try:
                size = chunk.stat().st_size
                if self._blosc:
                    with chunk.open("rb") as fh:
                        header = fh.read(_BLOSC_HEADER)
            except FileNotFoundError:
                if self._every_chunk_stored:
                    msg = f"{self.name}: chunk {key} is missing"
                    raise OSError(msg) from None
                continue
            if self._blosc:
                expected = int.from_bytes(header[12:16], "little") if len(header) == _BLOSC_HEADER else -1
                if expected != size:
                    msg = f"{self.name}: chunk {key} holds {size} bytes, its blosc header says {expected}"
                    raise OSError(msg)


class ZarrGroup:
    """A zarr group as a :class:`~genecorpus.io.store.GroupNode`, whose members come wrapped too."""

    def __init__(self, group: zarr.Group, folder: ZarrFolder) -> None:
        self.native = group
        """The zarr group itself (what ``anndata.io.read_elem`` takes)."""
        self.file = folder
        self.name: str = group.name
        # anndata writes every chunk of a sparse matrix's arrays unless the matrix is empty
        data = group.get("data") if encoding_type(self) in {"csr_matrix", "csc_matrix"} else None
        self._complete_arrays = _SPARSE_ARRAYS if data is not None and data.shape[0] > 0 else ()

    @property
    def attrs(self) -> Mapping[str, Any]:
        """The group's attributes."""
        return self.native.attrs

    def __contains__(self, name: object) -> bool:
        return name in self.native

    def __iter__(self) -> Iterator[str]:
        return iter(self.native)

    def __getitem__(self, name: str) -> ZarrArray | ZarrGroup:
        return self._wrap(name, self.native[name])

    def get(self, name: str) -> ZarrArray | ZarrGroup | None:
        """Return member ``name`` wrapped, or None when there is none."""
        node = self.native.get(name)
        return None if node is None else self._wrap(name, node)

    def _wrap(self, name: str, node: zarr.Array | zarr.Group) -> ZarrArray | ZarrGroup:
        import zarr

        if isinstance(node, zarr.Array):
            return ZarrArray(node, self.file, every_chunk_stored=name in self._complete_arrays)
        return ZarrGroup(node, self.file)


def _zarr(path: str) -> ModuleType:
    import zarr

    major = int(zarr.__version__.split(".")[0])
    if major < 3:
        msg = (
            f"{path}: reading zarr folders needs zarr >= 3, but zarr {zarr.__version__} is installed; "
            "pip install -U 'zarr>=3'"
        )
        raise InputError(msg)
    return zarr


class ZarrReader(AnnDataLayoutReader):
    """An AnnData zarr folder (format 2 or 3), read one row block at a time.

    Cells, genes and columns are those of the h5ad reader (see
    :class:`~genecorpus.io.anndata_layout.AnnDataLayoutReader`). A folder zarr cannot open is
    refused as "not a readable zarr folder", one whose AnnData cannot be read (damaged metadata or
    chunks) as "not a readable zarr AnnData folder", each with a one-line :class:`InputError`.
    """

    _described_as = "a zarr AnnData"
    _container = "folder"

    def __init__(self, path: Path, *, layer: str | None = None, use_raw: bool = False) -> None:
        super().__init__(str(path), "zarr")
        zarr = _zarr(self.path)
        try:
            group = zarr.open_group(path, mode="r")
        except _OPEN_ERRORS as exc:
            raise self._unreadable(exc, opened=False) from exc
        self._root = ZarrGroup(group, ZarrFolder(self.path))
        try:
            self._setup_layout(self._root, layer=layer, use_raw=use_raw)
        except InputError:  # what is wrong is already said
            raise
        except _OPEN_ERRORS as exc:
            raise self._unreadable(exc, opened=True) from exc

    def _unreadable(self, exc: BaseException, *, opened: bool) -> InputError:
        """"not a readable zarr folder" when zarr cannot open it, "... zarr AnnData folder" after."""
        kind = "zarr AnnData" if opened else "zarr"
        msg = f"{self.path}: not a readable {kind} folder ({one_line(exc)}); re-download or re-export it"
        return InputError(msg)

    def close(self) -> None:
        """Release the folder's store."""
        self._root.native.store.close()


def _sniff_zarr(source: Any) -> bool:
    """A folder with zarr group metadata and AnnData's ``obs``, ``var`` and ``X``/``layers``/``raw``.

    Looks only at the folder's entries (a local zarr store keeps each member in a sub-folder), so it
    is cheap and never imports zarr.
    """
    if not isinstance(source, Path):
        return False
    try:
        if not ((source / "zarr.json").is_file() or (source / ".zgroup").is_file()):
            return False
        return all((source / name).is_dir() for name in ("obs", "var")) and any(
            (source / name).exists() for name in ("X", "layers", "raw")
        )
    except OSError:
        return False


@register_reader(
    "zarr", suffixes=(".zarr",), sniff=_sniff_zarr, options=("layer", "use_raw"), folders=True
)
def _open_zarr(path: Path, *, layer: str | None = None, use_raw: bool = False) -> ZarrReader:
    return ZarrReader(path, layer=layer, use_raw=use_raw)
