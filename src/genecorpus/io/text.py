"""Delimited text count tables (CSV/TSV, plain or gzipped), with cells as rows or as columns.

Layout: one header line of labels, then one line per row whose first field is the row label. The
header may start with a corner label (``gene,cell1,...``), an empty corner (``,cell1,...`` as pandas
writes) or omit the corner (R's ``write.table``, e.g. Seurat's ``pbmc_raw.txt``).

The table is parsed once, when the source is opened, with ``pyarrow.csv`` in pieces of
:data:`TEXT_BLOCK_BYTES` bytes, each made sparse at once, so memory is about 12 bytes per non-zero
value (plus one parsed piece), not the dense table. Blocks are then sliced from it.

Orientation (``cells_as_rows``), when not declared, is detected and logged: column labels that look
like Ensembl gene ids mean cells are rows; row labels that do mean cells are columns; else labels
that look like cell barcodes (a run of 8 or more ``ACGT``) on one axis only make that axis the
cells; else the axis with more labels is taken as the genes.

Formats: ``csv`` (``.csv[.gz]``, comma), ``tsv`` (``.tsv[.gz]``, ``.tab``, tab) and ``txt``
(``.txt[.gz]``, delimiter sniffed from the header line among tab, comma, semicolon and space).
There are no obs or var columns.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import re
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import scipy.sparse as sp

from genecorpus.errors import InputError
from genecorpus.io.reader import BaseReader, as_str_array, one_line
from genecorpus.io.registry import register_reader

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["TEXT_BLOCK_BYTES", "TextReader", "detect_cells_as_rows"]

logger = logging.getLogger(__name__)

TEXT_BLOCK_BYTES = 1 << 25
"""Bytes of text parsed at once (few large pieces: pyarrow's cost per column and piece dominates
wide tables; the parsed piece takes about 8 bytes per field)."""

_ENSEMBL_ID = r"^ENS[A-Z]*G\d{11}(?:\.\d+)?$"
_BARCODE = r"[ACGT]{8,}"
_DELIMITERS = ("\t", ",", ";", " ")
_MAJORITY = 0.5
_MAX_DETAIL = 300
"""Characters of a parser message quoted in an error (pyarrow quotes whole rows)."""


def _fraction_matching(labels: Sequence[str] | np.ndarray, pattern: str) -> float:
    if not len(labels):
        return 0.0
    return float(pd.Series(labels, dtype=object).astype(str).str.contains(pattern).mean())


def detect_cells_as_rows(
    row_labels: Sequence[str] | np.ndarray, column_labels: Sequence[str] | np.ndarray
) -> tuple[bool, str]:
    """Decide whether a table's rows are cells, from its row and column labels.

    Parameters
    ----------
    row_labels, column_labels
        The labels of the table's rows (first field of each line) and columns (header).

    Returns
    -------
    ``(cells_as_rows, reason)``, the reason being a short phrase for the log.

    Examples
    --------
    >>> detect_cells_as_rows(["c1", "c2"], ["ENSG00000141510", "ENSG00000012048"])
    (True, 'column labels look like Ensembl gene ids')
    >>> detect_cells_as_rows(["MS4A1", "CD79B", "CD3E"], ["ATGCCAGAACGACT", "CATGGCCTGTGCAT"])
    (False, 'column labels look like cell barcodes')
    """
    rows_ensembl = _fraction_matching(row_labels, _ENSEMBL_ID) > _MAJORITY
    cols_ensembl = _fraction_matching(column_labels, _ENSEMBL_ID) > _MAJORITY
    if cols_ensembl != rows_ensembl:
        axis = "column" if cols_ensembl else "row"
        return cols_ensembl, f"{axis} labels look like Ensembl gene ids"
    rows_barcode = _fraction_matching(row_labels, _BARCODE) > _MAJORITY
    cols_barcode = _fraction_matching(column_labels, _BARCODE) > _MAJORITY
    if cols_barcode != rows_barcode:
        axis = "row" if rows_barcode else "column"
        return rows_barcode, f"{axis} labels look like cell barcodes"
    if len(column_labels) >= len(row_labels):
        return True, "more columns than rows, so columns are taken as genes"
    return False, "more rows than columns, so rows are taken as genes"


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open(encoding="utf-8", newline="")


def _read_head(path: Path, delimiter: str | None) -> tuple[str, list[str], list[str]]:
    """Return the delimiter, the header fields and the first data line's fields."""
    try:
        with _open_text(path) as fh:
            first, second = fh.readline(), fh.readline()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        msg = f"{path}: not a readable text table ({one_line(exc)}); re-download or re-export it"
        raise InputError(msg) from exc
    if not second.strip():
        msg = f"{path}: needs a header line and at least one data line; is the file complete?"
        raise InputError(msg)
    if delimiter is None:
        delimiter = max(_DELIMITERS, key=first.count)
        if first.count(delimiter) == 0:
            msg = (
                f"{path}: cannot find the delimiter (tab, comma, semicolon or space) in the header"
            )
            raise InputError(msg)
        logger.info("%s: delimiter %r", path, delimiter)
    header = next(csv.reader([first.rstrip("\r\n")], delimiter=delimiter))
    row = next(csv.reader([second.rstrip("\r\n")], delimiter=delimiter))
    return delimiter, header, row


def _columns_to_csr(columns: Sequence[pa.Array], n_rows: int) -> sp.csr_matrix:
    """Return parsed float columns as a CSR of shape (n_columns, n_rows), keeping NaN entries."""
    indptr = np.zeros(len(columns) + 1, dtype=np.int64)
    rows: list[np.ndarray] = []
    values: list[np.ndarray] = []
    for j, column in enumerate(columns):
        dense = column.to_numpy(zero_copy_only=False)
        nonzero = np.flatnonzero(dense)
        rows.append(nonzero)
        values.append(dense[nonzero])
        indptr[j + 1] = indptr[j] + len(nonzero)
    out = sp.csr_matrix((len(columns), n_rows), dtype=np.float64)
    if rows:
        out.data = np.concatenate(values)
        out.indices = np.concatenate(rows).astype(np.int32)
        out.indptr = indptr
    return out


def _first_ragged_line(path: Path, delimiter: str, n_fields: int) -> tuple[int, int, str] | None:
    """Return (line number, fields, label) of the first data line without ``n_fields`` fields.

    Only called after a parse error: pyarrow's streaming reader does not know line numbers.
    """
    try:
        with _open_text(path) as fh:
            for number, fields in enumerate(csv.reader(fh, delimiter=delimiter), start=1):
                if number > 1 and fields and len(fields) != n_fields:
                    return number, len(fields), fields[0]
    except (OSError, EOFError, UnicodeDecodeError, csv.Error):
        return None
    return None


class TextReader(BaseReader):
    """A delimited text count table, parsed once into sparse rows (see the module docstring).

    ``var_names`` are the gene labels: the header's when cells are rows, the rows' otherwise.
    """

    def __init__(
        self,
        path: Path,
        *,
        format_name: str,
        delimiter: str | None,
        cells_as_rows: bool | None = None,
    ) -> None:
        super().__init__(str(path), format_name)
        delimiter, header, first_row = _read_head(path, delimiter)
        n_fields = len(first_row)
        if len(header) == n_fields:
            column_labels = header[1:]
        elif len(header) == n_fields - 1:
            column_labels = header  # R's write.table: no corner label
        else:
            msg = (
                f"{path}: the header has {len(header)} fields but the first line has {n_fields}; "
                f"check the delimiter ({delimiter!r}) or pass format=..."
            )
            raise InputError(msg)
        row_labels, by_column = self._parse(path, delimiter, column_labels)
        column_labels_arr = as_str_array(np.asarray(column_labels, dtype=object))
        if cells_as_rows is None:
            cells_as_rows, reason = detect_cells_as_rows(row_labels, column_labels_arr)
            logger.info(
                "%s: cells taken as %s (%s); pass cells_as_rows= to override",
                path,
                "rows" if cells_as_rows else "columns",
                reason,
            )
        self.cells_as_rows = cells_as_rows
        if cells_as_rows:
            self._counts = by_column.T.tocsr()
            self._cell_ids, self._var_names = row_labels, column_labels_arr
        else:
            self._counts = by_column
            self._cell_ids, self._var_names = column_labels_arr, row_labels
        self._n_cells = len(self._cell_ids)

    def _parse(
        self, path: Path, delimiter: str, column_labels: list[str]
    ) -> tuple[np.ndarray, sp.csr_matrix]:
        names = [f"f{i}" for i in range(len(column_labels) + 1)]
        types = dict.fromkeys(names[1:], pa.float64())
        types[names[0]] = pa.string()
        labels: list[np.ndarray] = []
        pieces: list[sp.csr_matrix] = []
        try:
            reader = pa_csv.open_csv(
                str(path),
                read_options=pa_csv.ReadOptions(
                    column_names=names, skip_rows=1, block_size=TEXT_BLOCK_BYTES
                ),
                parse_options=pa_csv.ParseOptions(delimiter=delimiter),
                convert_options=pa_csv.ConvertOptions(column_types=types),
            )
            for batch in reader:
                labels.append(batch.column(0).to_numpy(zero_copy_only=False).astype(object))
                pieces.append(_columns_to_csr(batch.columns[1:], batch.num_rows))
        except (pa.ArrowInvalid, OSError, EOFError) as exc:
            # "Expected N columns, got M: <the whole row>" has no line number: find the line
            ragged = (_first_ragged_line(path, delimiter, len(names))
                      if "columns, got" in str(exc) else None)
            if ragged is not None:
                line, n_fields, label = ragged
                msg = (
                    f"{path}: line {line} (row {label!r}) has {n_fields} fields but the header "
                    f"makes {len(names)}; every line needs a label and one value per column: "
                    "fix or re-export the table"
                )
                raise InputError(msg) from exc
            detail = str(exc).splitlines()[0][:_MAX_DETAIL]
            found = re.search(r"column #(\d+)", detail)
            where = ""
            if found and 0 < int(found.group(1)) <= len(column_labels):
                where = f" in column {column_labels[int(found.group(1)) - 1]!r}"
            msg = (
                f"{path}: cannot parse the table{where} ({detail}); it must hold a header and "
                "numeric counts with one label per line"
            )
            raise InputError(msg) from exc
        if not pieces:
            msg = f"{path}: the table has no data lines"
            raise InputError(msg)
        # Pieces are (columns x rows of the batch); side by side they are the table transposed.
        by_column = pieces[0] if len(pieces) == 1 else sp.hstack(pieces, format="csr")
        return as_str_array(np.concatenate(labels)), by_column

    def _read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._counts[start:stop]

    def _read_cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self._cell_ids[start:stop]


_TEXT_OPTIONS = ("cells_as_rows",)


@register_reader("csv", suffixes=(".csv", ".csv.gz"), options=_TEXT_OPTIONS)
def _open_csv(path: Path, *, cells_as_rows: bool | None = None) -> TextReader:
    return TextReader(path, format_name="csv", delimiter=",", cells_as_rows=cells_as_rows)


@register_reader("tsv", suffixes=(".tsv", ".tsv.gz", ".tab", ".tab.gz"), options=_TEXT_OPTIONS)
def _open_tsv(path: Path, *, cells_as_rows: bool | None = None) -> TextReader:
    return TextReader(path, format_name="tsv", delimiter="\t", cells_as_rows=cells_as_rows)


@register_reader("txt", suffixes=(".txt", ".txt.gz"), options=_TEXT_OPTIONS)
def _open_txt(path: Path, *, cells_as_rows: bool | None = None) -> TextReader:
    return TextReader(path, format_name="txt", delimiter=None, cells_as_rows=cells_as_rows)
