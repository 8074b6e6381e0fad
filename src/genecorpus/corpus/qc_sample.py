"""``report/qc_sample.npz``: the QC statistics of a fixed sample of cells, with each cell's verdict.

``build`` writes it after the QC pass (about 20,000 cells per dataset at most); the report draws the QC
histograms from it. Every array has one entry per sampled cell.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from genecorpus.corpus.manifest import DROP_REASONS
from genecorpus.errors import InputError

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["QCSample"]


@dataclass(frozen=True)
class QCSample:
    """Per-cell QC statistics of sampled cells of every dataset."""

    dataset: np.ndarray
    """Index of the cell's dataset in the manifest's ``datasets`` (int32)."""
    n_counts: np.ndarray
    """Total counts (int64)."""
    mito: np.ndarray
    """Mitochondrial counts or fraction, as the dataset's QC rule reads them (float64)."""
    n_genes: np.ndarray
    """Detected candidate genes (int64)."""
    reason: np.ndarray
    """Index into :data:`~genecorpus.corpus.manifest.DROP_REASONS`, or -1 when kept (int8)."""

    def of(self, index: int) -> QCSample:
        """The cells of dataset ``index``."""
        sel = self.dataset == index
        return QCSample(*(getattr(self, f.name)[sel] for f in fields(self)))

    def write(self, path: Path) -> None:
        """Write the ``.npz`` (creating its folder)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def read(cls, path: Path, *, n_datasets: int) -> QCSample | None:
        """Read the sample of a corpus with ``n_datasets`` datasets; None when the file is absent.

        Raises
        ------
        InputError
            The file is unreadable or does not match the manifest.
        """
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {f.name: np.asarray(z[f.name]) for f in fields(cls)}
        except KeyError as e:
            msg = f"{path}: no array {e}; delete it (QC plots are then skipped) or rebuild the corpus"
            raise InputError(msg) from None
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            msg = f"{path}: unreadable ({e}); delete it (QC plots are then skipped) or rebuild the corpus"
            raise InputError(msg) from None
        n = {a.shape[0] for a in arrays.values()}
        d, r = arrays["dataset"], arrays["reason"]
        if (len(n) != 1 or (d.size and (d.min() < 0 or d.max() >= n_datasets))
                or (r.size and (r.min() < -1 or r.max() >= len(DROP_REASONS)))):
            msg = (f"{path}: does not match manifest.json (array lengths, dataset or reason indices); "
                   f"rebuild the corpus")
            raise InputError(msg)
        return cls(**arrays)
