"""Readers: every supported input format opened as a :class:`CellSource` of raw-count row blocks.

Formats are registered with :func:`register_reader` (one decorated opener per format, with the file
suffixes it owns and an optional content sniffer), and :func:`open_dataset` looks them up: by the
name given, else by the path's suffix (confirmed by the sniffer when the suffix is shared, e.g. an
``.h5`` that is really an h5ad), else by content. The registered names are

========== ===============================================================================
``h5ad``    AnnData ``.h5ad`` (X CSR, CSC or dense; ``layer=``; ``use_raw=``)
``anndata`` an in-memory ``anndata.AnnData`` (``layer=``; ``use_raw=``)
``loom``    ``.loom`` (``layer=``)
``10x-mtx`` 10x matrix folder (cellranger 2 ``genes.tsv`` / 3 ``features.tsv.gz``) or its ``.mtx``
``10x-h5``  10x ``.h5`` (cellranger 2 genome groups / 3 ``/matrix``)
``csv``     comma-separated text, optionally ``.gz`` (``cells_as_rows=``)
``tsv``     tab-separated text, optionally ``.gz`` (``cells_as_rows=``)
``txt``     ``.txt`` text whose delimiter is sniffed (``cells_as_rows=``)
``zarr``    AnnData ``.zarr`` folder, zarr format 2 or 3 (X as in h5ad; ``layer=``; ``use_raw=``)
``soma``    TileDB-SOMA experiment, a local folder or a URI such as the CELLxGENE Census's
            (``measurement=``; ``layer=``; ``use_raw=``; ``snapshot_ms=``; ``tiledb_config=``); needs
            the ``soma`` extra
========== ===============================================================================

Inside: :mod:`~genecorpus.io.registry` holds the registry and :func:`open_dataset`;
:mod:`~genecorpus.io.reader` the skeleton every reader builds on; :mod:`~genecorpus.io.counts` the
validation every block goes through; :mod:`~genecorpus.io.store` the arrays and groups of HDF5 files
and zarr folders read by row range; :mod:`~genecorpus.io.hdf5` what the HDF5 formats share;
:mod:`~genecorpus.io.anndata_layout` anndata's on-disk layout, which h5ad and zarr share; one module
per format (``h5ad``, ``memory``, ``loom``, ``tenx``, ``text``, ``zarr``, ``soma``) registers its readers.
"""

from __future__ import annotations

from genecorpus.io.block import DEFAULT_BLOCK_SIZE, CellBlock, CellSource
from genecorpus.io.registry import iter_block_ranges, known_formats, open_dataset, register_reader

# Importing a format module registers its readers, in the order of this import: the order in which
# known_formats() lists the formats and open_dataset tries their content tests, so it is not sorted.
from genecorpus.io import h5ad, memory, loom, tenx, text, zarr, soma  # isort: skip

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "CellBlock",
    "CellSource",
    "iter_block_ranges",
    "known_formats",
    "open_dataset",
    "register_reader",
]

_READER_MODULES = (h5ad, memory, loom, tenx, text, zarr, soma)
"""The modules of the built-in readers, in registration order."""
