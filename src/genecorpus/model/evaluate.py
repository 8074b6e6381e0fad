"""How well cell embeddings predict a label, beside the log1p-PCA baseline on the same cells (SPEC §2.9).

The protocol, for an embedding ``.h5ad`` written by ``genecorpus embed`` (``obsm["X_genecorpus"]``, corpus
metadata in ``obs``, the corpus path in ``uns["genecorpus"]["corpus"]``):

1. The label is an ``obs`` column, or a column of a CSV joined onto ``obs`` (:func:`join_labels`). Cells
   whose label is missing or empty are left out; so are classes with fewer cells than folds (stratified
   K-fold needs at least one per fold), and the report lists them.
2. One ``StratifiedKFold(folds, shuffle=True, random_state=seed)`` split of those cells is used by every
   method and classifier, so all scores are paired fold by fold.
3. Methods: ``embedding`` (the embeddings as they are) and ``baseline``: the cells' raw counts, read
   again from the corpus's inputs (or from count files the user gives), normalized to 10,000 counts per
   cell and log1p-transformed, then PCA(50) fitted on the training split of each fold only.
4. Classifiers, each behind a ``StandardScaler`` fitted on the training split: ``logreg`` (multinomial
   logistic regression, L2, C = 1, lbfgs) and ``knn`` (15 nearest neighbours, Euclidean distance on
   the standardized features, uniform vote).
5. Per fold: macro F1 and accuracy of the test split; reported as mean ± SD (ddof = 1) across folds,
   with the out-of-fold predictions of every cell for the confusion matrices.

The baseline's PCA runs on the sparse log1p matrix (``PCA(svd_solver="arpack")`` centres implicitly), so
memory stays at the size of the sparse counts; genes are the union of the datasets' genes (Ensembl IDs
where the identifiers map, as in the corpus, the identifier itself otherwise), zero where a dataset has
no such gene.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp

from genecorpus.config import DatasetSpec
from genecorpus.corpus.folder import MANIFEST
from genecorpus.corpus.manifest import Manifest
from genecorpus.corpus.shards import publish_folder
from genecorpus.dataset import gene_keys, plan_dataset
from genecorpus.errors import ConfigError, InputError
from genecorpus.io import DEFAULT_BLOCK_SIZE
from genecorpus.io.registry import is_uri

if TYPE_CHECKING:
    import anndata
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "CLASSIFIERS",
    "EMBEDDING_KEY",
    "ClassifierScores",
    "EvaluationReport",
    "baseline_pca",
    "confusion_figure",
    "evaluate_embeddings",
    "evaluation_markdown",
    "join_labels",
    "label_values",
    "log1p_normalize",
    "make_classifier",
    "read_cell_counts",
    "require_sklearn",
    "stratified_folds",
    "write_evaluation",
]

logger = logging.getLogger(__name__)

EMBEDDING_KEY = "X_genecorpus"
"""The ``obsm`` entry holding the embeddings (float32, cells × dimensions)."""
CLASSIFIERS = ("logreg", "knn")
"""Classifier names, in report order."""
METHODS = ("embedding", "baseline")
"""Method names, in report order."""
BASELINE_COMPONENTS = 50
"""Principal components of the baseline (SPEC §2.9)."""
TARGET_SUM = 10_000.0
"""Counts per cell after normalization, before log1p."""
LOGREG_MAX_ITER = 5_000
"""lbfgs iterations: enough for standardized 50–512-dimensional features to converge."""

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)`` callback, as the CLI's progress bars take it."""


def require_sklearn() -> None:
    """Raise a one-line error if scikit-learn (in the ``train`` extra) is not installed."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        msg = "genecorpus evaluate needs scikit-learn: pip install 'genecorpus[train]'"
        raise ConfigError(msg) from None


# ------------------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ClassifierScores:
    """One method × classifier: per-fold scores and out-of-fold predictions."""

    method: str
    """``"embedding"`` or ``"baseline"``."""
    classifier: str
    """``"logreg"`` or ``"knn"``."""
    macro_f1: np.ndarray
    """Macro-averaged F1 of each fold's test cells (float64, length folds)."""
    accuracy: np.ndarray
    """Accuracy of each fold's test cells (float64, length folds)."""
    predictions: np.ndarray
    """Predicted class index of every evaluated cell, from the fold where it was a test cell (int64)."""

    def mean_sd(self, metric: str) -> tuple[float, float]:
        """Mean and sample SD (ddof = 1) across folds of ``"macro_f1"`` or ``"accuracy"``."""
        values = getattr(self, metric)
        return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class EvaluationReport:
    """Cross-validated classification of one label from embeddings and from the baseline."""

    label: str
    classes: tuple[str, ...]
    """Class names, sorted; ``y`` and predictions index into them."""
    y: np.ndarray
    """True class index of each evaluated cell (int64)."""
    fold: np.ndarray
    """Test fold (0-based) of each evaluated cell (int64)."""
    cells: pd.DataFrame
    """``obs`` of the evaluated cells (index reset), in the embedding file's order."""
    scores: tuple[ClassifierScores, ...]
    n_input_cells: int
    """Cells in the embedding file."""
    n_unlabeled: int
    """Cells left out for a missing or empty label."""
    dropped_classes: dict[str, int] = field(default_factory=dict)
    """Classes left out for having fewer cells than folds, with their cell counts."""
    baseline_source: str | None = None
    """Where the baseline's counts came from, or None when it was not computed."""
    n_baseline_genes: int = 0
    folds: int = 5
    seed: int = 0
    n_neighbors: int = 15

    @property
    def n_cells(self) -> int:
        """Cells evaluated."""
        return int(self.y.shape[0])

    def score(self, method: str, classifier: str) -> ClassifierScores:
        """The scores of one method and classifier."""
        for s in self.scores:
            if s.method == method and s.classifier == classifier:
                return s
        msg = f"no scores for {method} + {classifier}"
        raise KeyError(msg)

    def class_counts(self) -> dict[str, int]:
        """Evaluated cells per class."""
        counts = np.bincount(self.y, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    def confusion(self, method: str, classifier: str) -> np.ndarray:
        """Cells of each true class (rows) predicted as each class (columns), out of fold (int64, classes × classes).

        Rows sum to the cells of each class (:meth:`class_counts`), since every cell is a test cell once.
        """
        n = len(self.classes)
        predicted = self.score(method, classifier).predictions
        return np.bincount(self.y * n + predicted, minlength=n * n).reshape(n, n).astype(np.int64)

    def table(self) -> str:
        """The summary table: method | classifier | macro F1 | accuracy | n cells | n classes."""
        header = ("method", "classifier", "macro F1 (mean ± sd)", "accuracy (mean ± sd)", "n cells", "n classes")
        rows = []
        for s in self.scores:
            f1, f1_sd = s.mean_sd("macro_f1")
            acc, acc_sd = s.mean_sd("accuracy")
            rows.append((s.method, s.classifier, f"{f1:.3f} ± {f1_sd:.3f}", f"{acc:.3f} ± {acc_sd:.3f}",
                         str(self.n_cells), str(len(self.classes))))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
        lines.append("-+-".join("-" * w for w in widths))
        lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
        return "\n".join(lines)

    def describe(self) -> str:
        """The table with what was evaluated and what was left out, for the terminal."""
        lines = [f"label {self.label!r}: {self.n_cells} of {self.n_input_cells} cells, "
                 f"{len(self.classes)} classes, {self.folds}-fold stratified CV (seed {self.seed})"]
        if self.n_unlabeled:
            lines.append(f"left out: {self.n_unlabeled} cells without a label")
        if self.dropped_classes:
            listed = ", ".join(f"{c} ({n})" for c, n in self.dropped_classes.items())
            lines.append(f"left out: classes with fewer than {self.folds} cells: {listed}")
        if self.baseline_source:
            lines.append(f"baseline: log1p(counts per 10k) -> PCA({BASELINE_COMPONENTS}) over "
                         f"{self.n_baseline_genes} genes, counts from {self.baseline_source}")
        lines += ["", self.table()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-cell arrays, JSON-ready."""
        results = []
        for s in self.scores:
            entry: dict[str, Any] = {"method": s.method, "classifier": s.classifier}
            for metric in ("macro_f1", "accuracy"):
                mean, sd = s.mean_sd(metric)
                entry[metric] = {"mean": mean, "sd": sd, "folds": [float(v) for v in getattr(s, metric)]}
            results.append(entry)
        return {
            "label": self.label, "n_input_cells": self.n_input_cells, "n_cells": self.n_cells,
            "n_unlabeled": self.n_unlabeled, "classes": self.class_counts(),
            "dropped_classes": self.dropped_classes, "folds": self.folds, "seed": self.seed,
            "n_neighbors": self.n_neighbors, "baseline": {
                "source": self.baseline_source, "n_genes": self.n_baseline_genes,
                "pipeline": f"counts per {int(TARGET_SUM)} -> log1p -> PCA({BASELINE_COMPONENTS}) in each "
                            "training fold -> standardize -> classifier"},
            "classifiers": {"logreg": f"StandardScaler + LogisticRegression(lbfgs, max_iter={LOGREG_MAX_ITER})",
                            "knn": f"StandardScaler + KNeighborsClassifier({self.n_neighbors}, euclidean)"},
            "results": results,
        }

    def metrics_frame(self) -> pd.DataFrame:
        """One row per method × classifier × metric: mean, sd and each fold's value."""
        import pandas as pd

        rows = []
        for s in self.scores:
            for metric in ("macro_f1", "accuracy"):
                mean, sd = s.mean_sd(metric)
                row = {"method": s.method, "classifier": s.classifier, "metric": metric, "mean": mean, "sd": sd}
                row |= {f"fold_{k + 1}": float(v) for k, v in enumerate(getattr(s, metric))}
                rows.append(row)
        return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------- labels


def read_embeddings(emb: str | os.PathLike[str] | anndata.AnnData) -> anndata.AnnData:
    """Open an embedding ``.h5ad`` (or take an AnnData) and check it holds ``obsm["X_genecorpus"]``."""
    import anndata

    if isinstance(emb, anndata.AnnData):
        adata, name = emb, "the embeddings"
    else:
        path = Path(emb)
        if not path.is_file():
            msg = f"{path}: no such file; give the .h5ad written by genecorpus embed"
            raise InputError(msg)
        try:
            adata = anndata.read_h5ad(path)
        except (OSError, KeyError, ValueError) as e:
            msg = f"{path}: not a readable .h5ad ({str(e).splitlines()[0]}); give the file genecorpus embed wrote"
            raise InputError(msg) from None
        name = str(path)
    if EMBEDDING_KEY not in adata.obsm:
        keys = ", ".join(adata.obsm.keys()) or "none"
        msg = f"{name}: no obsm[{EMBEDDING_KEY!r}] (obsm has: {keys}); give the file genecorpus embed wrote"
        raise InputError(msg)
    return adata


def _parse_join(join: str | Mapping[str, str] | Sequence[str] | None) -> dict[str, str] | None:
    """``"cell=cell_id,dataset_id"`` (or a mapping / list) → {CSV column: obs column}."""
    if join is None:
        return None
    if isinstance(join, Mapping):
        return {str(k): str(v) for k, v in join.items()}
    items = [s.strip() for s in join.split(",")] if isinstance(join, str) else [str(s).strip() for s in join]
    pairs: dict[str, str] = {}
    for item in items:
        if not item:
            continue
        csv_col, _, obs_col = item.partition("=")
        pairs[csv_col.strip()] = (obs_col or csv_col).strip()
    if not pairs:
        msg = f"join {join!r}: no columns; give e.g. cell_id,dataset_id or cell=cell_id,stim=dataset_id"
        raise ConfigError(msg)
    return pairs


def join_labels(obs: pd.DataFrame, labels: str | os.PathLike[str], *,
                join: str | Mapping[str, str] | Sequence[str] | None = None) -> pd.DataFrame:
    """``obs`` with the columns of a labels CSV added, matched on key columns (a left join).

    Parameters
    ----------
    obs
        The cells' metadata (e.g. ``cell_id``, ``dataset_id``).
    labels
        A CSV with a header; every value is read as text.
    join
        Key columns: ``"cell_id,dataset_id"``, or ``"cell=cell_id,stim=dataset_id"`` to pair a CSV column
        with a differently named ``obs`` column (also a ``{csv: obs}`` mapping). Default: the CSV columns
        that ``obs`` also has. Values must then be equal as text (a CSV saying ``ctrl`` where ``obs``
        says ``kang_ctrl`` matches nothing: rewrite the CSV).

    Returns
    -------
    A new DataFrame, same rows and index as ``obs``; the CSV's columns added (replacing ``obs`` columns
    of the same name; key columns too unless named as their ``obs`` column), missing where a cell has no
    row in the CSV.

    Raises
    ------
    InputError
        Unreadable CSV, key columns missing, or a key that occurs twice in the CSV.
    """
    import pandas as pd

    path = Path(labels)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as e:
        msg = f"{path}: cannot read the labels CSV ({str(e).splitlines()[0]}); give a CSV file with a header"
        raise InputError(msg) from None
    pairs = _parse_join(join)
    if pairs is None:
        pairs = {c: c for c in table.columns if c in obs.columns}
        if not pairs:
            msg = (f"{path}: no column in common with the cells' metadata ({', '.join(map(str, obs.columns))}); "
                   "name the key columns with --join, e.g. --join cell=cell_id")
            raise InputError(msg)
    for csv_col, obs_col in pairs.items():
        if csv_col not in table.columns:
            msg = f"{path}: no column {csv_col!r} to join on; its columns are {', '.join(table.columns)}"
            raise InputError(msg)
        if obs_col not in obs.columns:
            msg = (f"join {csv_col}={obs_col}: the cells have no column {obs_col!r}; "
                   f"they have {', '.join(map(str, obs.columns))}")
            raise InputError(msg)
    csv_keys = list(pairs)
    duplicated = table.duplicated(csv_keys)
    if duplicated.any():
        example = ", ".join(table.loc[duplicated.idxmax(), csv_keys].tolist())
        msg = f"{path}: key ({', '.join(csv_keys)}) = ({example}) occurs twice; keep one row per cell"
        raise InputError(msg)
    # a key column named as its obs column adds nothing; one named otherwise (stim=dataset_id) is kept
    added = table.drop(columns=[c for c, o in pairs.items() if c == o]).replace("", np.nan)
    keys = pd.MultiIndex.from_frame(table[csv_keys].astype(str))
    wanted = pd.MultiIndex.from_frame(obs[list(pairs.values())].astype(str))
    at = keys.get_indexer(wanted)
    out = obs.copy()
    for column in added.columns:
        values = added[column].to_numpy(dtype=object)[np.maximum(at, 0)]
        values[at < 0] = np.nan
        out[column] = values
    matched = int((at >= 0).sum())
    logger.info("%s: %d of %d cells matched on %s", path, matched, len(obs), ", ".join(csv_keys))
    if matched == 0:
        example = ", ".join(f"{o}={obs[o].iloc[0]!s}" for o in pairs.values()) if len(obs) else ""
        msg = (f"{path}: no cell matched on ({', '.join(f'{c}={o}' for c, o in pairs.items())}); "
               f"e.g. no row for {example}; check the key values (they must be equal as text)")
        raise InputError(msg)
    return out


def label_values(obs: pd.DataFrame, label: str, source: str) -> np.ndarray:
    """The label of each cell as text; ``""`` where it is missing or blank."""
    import pandas as pd

    if label not in obs.columns:
        msg = f"{source}: no label column {label!r}; available: {', '.join(map(str, obs.columns))}"
        raise InputError(msg)
    column = obs[label].astype(object)
    text = column.where(~pd.isna(column), "").map(lambda v: str(v).strip())
    return text.to_numpy(dtype=object)


# ------------------------------------------------------------------------------------------- counts


@dataclass(frozen=True)
class _CountSource:
    """One input of raw counts and how to read it."""

    dataset_id: str | None
    """Cells of this dataset are looked up here; None: any cell whose id is found."""
    spec: DatasetSpec
    """The path, reader options and gene identifiers (as the corpus read them)."""
    snapshot_ms: int | None = None
    """A TileDB-SOMA experiment is read at the snapshot the corpus was built from."""


def _sources_from_manifest(corpus: str | os.PathLike[str]) -> list[_CountSource]:
    root = Path(corpus)
    if not (root / MANIFEST).is_file():
        msg = (f"{root}: no manifest.json, so the cells' raw counts cannot be found; "
               "pass the count files with --counts")
        raise InputError(msg)
    manifest = Manifest.read(root / MANIFEST)
    sources = [_CountSource(d.dataset_id, d.spec.model_copy(update={"release": d.spec.release or d.genes.release}),
                            d.soma.snapshot_ms if d.soma is not None else None)
               for d in manifest.datasets]
    if not sources:
        msg = f"{root / MANIFEST}: lists no datasets; pass the count files with --counts"
        raise InputError(msg)
    return sources


def _file_dataset_id(path: Path) -> str:
    name = path.name.rstrip("/")
    for suffix in (".gz", ".h5ad", ".loom", ".h5", ".csv", ".tsv", ".txt", ".mtx"):
        name = name.removesuffix(suffix)
    return name


def _read_source_cells(source: _CountSource, wanted: dict[str, int]) -> tuple[np.ndarray, sp.csr_matrix, np.ndarray]:
    """The cells of ``wanted`` (cell id → position) found in one input: positions, counts, gene keys.

    A gene's key is its Ensembl ID where the dataset's identifier maps to one (as the corpus maps it), the
    identifier otherwise; the columns are the dataset's distinct keys, sorted, columns of one key summed.
    """
    if not is_uri(source.spec.path) and not Path(source.spec.path).exists():
        what = f"dataset {source.dataset_id!r}" if source.dataset_id else "count file"
        msg = f"{source.spec.path}: no such file ({what}); pass the count files with --counts"
        raise InputError(msg)
    keys = np.unique(gene_keys(source.spec))
    plan = plan_dataset(source.spec, universe=keys, unmapped="keep", snapshot_ms=source.snapshot_ms)
    positions, blocks, seen = [], [], set()
    for block in plan.read_blocks(0, plan.n_cells, block_size=DEFAULT_BLOCK_SIZE):
        rows = []
        for i, cell_id in enumerate(block.cell_ids.tolist()):
            cell_id = str(cell_id)
            if cell_id in wanted:
                if cell_id in seen:
                    msg = (f"{source.spec.path}: cell id {cell_id!r} occurs twice, so its counts are ambiguous; "
                           "make the cell ids unique (e.g. obs_names_make_unique) and rebuild")
                    raise InputError(msg)
                seen.add(cell_id)
                rows.append(i)
                positions.append(wanted[cell_id])
        if rows:
            blocks.append(block.genes[rows])
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(keys)), dtype=np.int64)
    counts.sort_indices()
    return np.asarray(positions, dtype=np.int64), counts, keys


def read_cell_counts(obs: pd.DataFrame, *, counts: Sequence[str | os.PathLike[str]] | None = None,
                     corpus: str | os.PathLike[str] | None = None) -> tuple[sp.csr_matrix, np.ndarray, str]:
    """Raw counts of the given cells, read again from their input files.

    Parameters
    ----------
    obs
        One row per cell with ``cell_id`` (else the index is the cell id) and, to tell datasets apart,
        ``dataset_id``.
    counts
        Count files (any format :func:`genecorpus.io.open_dataset` reads). A file whose name without
        suffixes equals a ``dataset_id`` holds that dataset's cells; when the names do not match the
        datasets, cells are looked up by id in all files.
    corpus
        A corpus folder: its ``manifest.json`` lists the inputs, their dataset ids and reader options.
        Used when ``counts`` is not given.

    Returns
    -------
    counts
        CSR (n_cells × n_genes) int64 raw counts, rows in ``obs`` order.
    genes
        Gene key of each column (object array of str): the Ensembl ID where the dataset's identifier
        maps to one, the identifier otherwise; the sorted union over datasets, zeros where absent.
    source
        A short description of where the counts came from.

    Raises
    ------
    InputError
        An input is missing, or some cells are not in it (the message names the dataset and a cell).
    """
    import pandas as pd

    cell_ids = (obs["cell_id"] if "cell_id" in obs.columns else pd.Series(obs.index)).astype(str).to_numpy()
    dataset_ids = obs["dataset_id"].astype(str).to_numpy() if "dataset_id" in obs.columns else None
    if counts:
        paths = [Path(p) for p in counts]
        by_stem = {_file_dataset_id(p): p for p in paths}
        if dataset_ids is not None and set(dataset_ids) <= set(by_stem):
            sources = [_CountSource(d, DatasetSpec(path=str(p))) for d, p in by_stem.items()]
        else:
            sources = [_CountSource(None, DatasetSpec(path=str(p))) for p in paths]
        description = ", ".join(str(p) for p in paths)
    elif corpus is not None:
        sources = _sources_from_manifest(corpus)
        description = f"the inputs listed in {Path(corpus) / MANIFEST}"
    else:
        msg = ("no raw counts for the baseline: the embeddings name no corpus; pass the count files "
               "with --counts (or skip the baseline with --no-baseline)")
        raise InputError(msg)

    found = np.full(len(cell_ids), -1, dtype=np.int64)
    parts: list[tuple[np.ndarray, sp.csr_matrix, np.ndarray]] = []
    for spec in sources:
        if spec.dataset_id is not None:
            if dataset_ids is None:
                msg = "the cells have no dataset_id column, so the manifest's datasets cannot be told apart"
                raise InputError(msg)
            members = np.flatnonzero(dataset_ids == spec.dataset_id)
        else:
            members = np.flatnonzero(found < 0)
        if members.size == 0:
            continue
        wanted = {cell_ids[i]: int(i) for i in members}
        if len(wanted) < members.size:
            msg = (f"{spec.dataset_id or spec.spec.path}: several evaluated cells share a cell id; "
                   "give each cell a unique id within its dataset")
            raise InputError(msg)
        positions, block, keys = _read_source_cells(spec, wanted)
        found[positions] = len(parts)
        parts.append((positions, block, keys))
        if spec.dataset_id is not None and positions.size < members.size:
            missing = members[~np.isin(members, positions)]
            msg = (f"dataset {spec.dataset_id!r} ({spec.spec.path}): {missing.size} of {members.size} cells not found, "
                   f"e.g. cell {cell_ids[missing[0]]!r}; pass the count files the corpus was built from with --counts")
            raise InputError(msg)
    missing = np.flatnonzero(found < 0)
    if missing.size:
        i = missing[0]
        where = f"dataset {dataset_ids[i]!r}" if dataset_ids is not None else "the count files"
        msg = (f"{missing.size} of {len(cell_ids)} cells have no counts in {description}, e.g. cell "
               f"{cell_ids[i]!r} of {where}; pass the count files that hold them with --counts")
        raise InputError(msg)

    genes = np.array(sorted(set().union(*(set(k.tolist()) for _, _, k in parts))), dtype=object)
    stacked, order = [], []
    for positions, block, keys in parts:
        column = np.searchsorted(genes, keys)
        to_union = sp.csr_matrix((np.ones(len(keys), dtype=np.int64), (np.arange(len(keys)), column)),
                                 shape=(len(keys), len(genes)))
        stacked.append(sp.csr_matrix(block.astype(np.int64) @ to_union))
        order.append(positions)
    matrix = sp.vstack(stacked, format="csr")
    rows = np.empty(len(cell_ids), dtype=np.int64)
    rows[np.concatenate(order)] = np.arange(len(cell_ids))
    return matrix[rows], genes, description


def log1p_normalize(counts: sp.spmatrix) -> sp.csr_matrix:
    """``log1p(counts / n_counts * 10,000)`` per cell, as CSR float64 (empty cells stay zero)."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scale = np.divide(TARGET_SUM, totals, out=np.zeros_like(totals), where=totals > 0)
    normalized = sp.csr_matrix(sp.diags(scale) @ counts)
    normalized.data = np.log1p(normalized.data)
    return normalized


# ------------------------------------------------------------------------------ cross-validation


def make_classifier(name: str, *, n_neighbors: int, n_train: int) -> Any:
    """An unfitted ``logreg`` or ``knn`` pipeline of :data:`CLASSIFIERS` (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if name == "logreg":
        model = LogisticRegression(max_iter=LOGREG_MAX_ITER)
    else:
        # centred, not scaled: scaling would give the baseline's noisy trailing PCs the weight of the first
        model = KNeighborsClassifier(n_neighbors=min(n_neighbors, n_train), metric="cosine")
        return Pipeline([("center", StandardScaler(with_std=False)), (name, model)])
    return Pipeline([("scale", StandardScaler()), (name, model)])


class CenteredRandomizedPCA:
    """PCA of a sparse matrix by randomized SVD with implicit centring (never densifies the matrix).

    ``PCA(svd_solver="arpack")`` is the exact alternative for sparse input, but needs ~20 s per fold on
    3,500 Kang cells × 14,053 genes, where the trailing singular values are nearly equal (so the 50th
    component is arbitrary anyway); this takes well under a second. Halko, Martinsson & Tropp (2011),
    algorithm 4.4: a Gaussian test matrix of ``n_components + n_oversamples`` columns, ``n_iter`` power
    iterations (LU-normalized, as sklearn's ``randomized_svd``), all products with ``X - 1 mean`` done as
    ``X @ M - 1 (mean @ M)``.
    Signs follow sklearn's ``svd_flip`` convention (largest loading of each component positive).
    Has ``fit``/``transform``/``fit_transform`` so it can stand in a scikit-learn ``Pipeline``.
    """

    def __init__(self, n_components: int = BASELINE_COMPONENTS, *, n_oversamples: int = 20, n_iter: int = 7,
                 random_state: int = 0) -> None:
        self.n_components = n_components
        self.n_oversamples = n_oversamples
        self.n_iter = n_iter
        self.random_state = random_state

    def fit(self, x: sp.spmatrix | np.ndarray, y: object = None) -> CenteredRandomizedPCA:
        """Fit the components (``components_``: n_components × n_genes float64) and ``mean_``."""
        x = sp.csr_matrix(x, dtype=np.float64)
        n_cells, n_genes = x.shape
        mean = np.asarray(x.mean(axis=0)).ravel()

        def times(m: np.ndarray) -> np.ndarray:  # (X - 1 mean) @ m
            return np.asarray(x @ m) - np.outer(np.ones(n_cells), mean @ m)

        def times_t(m: np.ndarray) -> np.ndarray:  # (X - 1 mean).T @ m
            return np.asarray(x.T @ m) - np.outer(mean, m.sum(axis=0))

        from scipy.linalg import lu, qr

        rng = np.random.default_rng(self.random_state)
        size = min(self.n_components + self.n_oversamples, n_cells, n_genes)
        # sklearn's randomized_range_finder: LU keeps the power iterations well scaled at half QR's cost
        q = times(rng.standard_normal((n_genes, size)))
        for _ in range(self.n_iter):
            q = lu(q, permute_l=True, check_finite=False)[0]
            q = lu(times_t(q), permute_l=True, check_finite=False)[0]
            q = times(q)
        q = qr(q, mode="economic", check_finite=False)[0]
        b = times_t(q).T  # size x n_genes: the centred matrix projected on the range found
        # SVD of b from the small Gram matrix b b^T (only the leading, well-separated values are kept)
        values, vectors = np.linalg.eigh(b @ b.T)
        order = np.argsort(values)[::-1][:self.n_components]
        s = np.sqrt(np.maximum(values[order], 0))
        vt = (vectors[:, order].T @ b) / np.where(s > 0, s, 1)[:, None]
        signs = np.sign(vt[np.arange(len(vt)), np.abs(vt).argmax(axis=1)])
        self.components_ = vt * signs[:, None]
        self.singular_values_ = s
        self.mean_ = mean
        return self

    def transform(self, x: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Principal-component scores (n_cells × n_components float64)."""
        return np.asarray(sp.csr_matrix(x, dtype=np.float64) @ self.components_.T) - self.mean_ @ self.components_.T

    def fit_transform(self, x: sp.spmatrix | np.ndarray, y: object = None) -> np.ndarray:
        """:meth:`fit`, then :meth:`transform` of the same cells."""
        return self.fit(x, y).transform(x)


def baseline_pca(n_train: int, n_genes: int, seed: int) -> CenteredRandomizedPCA:
    """The baseline's PCA: 50 components (fewer if the training cells or genes allow fewer), seeded."""
    return CenteredRandomizedPCA(min(BASELINE_COMPONENTS, n_train - 1, n_genes - 1), random_state=seed)


def stratified_folds(y: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """Test fold of each cell under ``StratifiedKFold(folds, shuffle=True, random_state=seed)`` (int64)."""
    from sklearn.model_selection import StratifiedKFold

    fold = np.empty(len(y), dtype=np.int64)
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold[test] = k
    return fold


def _cross_validate(features: dict[str, Any], y: np.ndarray, fold: np.ndarray, *, n_neighbors: int, seed: int,
                    progress: Progress | None) -> tuple[ClassifierScores, ...]:
    from sklearn.metrics import accuracy_score, f1_score

    folds = int(fold.max()) + 1
    labels = np.arange(int(y.max()) + 1)
    f1 = {(m, c): np.zeros(folds) for m in features for c in CLASSIFIERS}
    acc = {(m, c): np.zeros(folds) for m in features for c in CLASSIFIERS}
    predictions = {(m, c): np.full(len(y), -1, dtype=np.int64) for m in features for c in CLASSIFIERS}
    total, done = folds * len(features), 0
    for k in range(folds):
        train, test = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        for method, x in features.items():
            x_train, x_test = x[train], x[test]
            if method == "baseline":  # PCA fitted on the training cells only: no leakage into the test fold
                pca = baseline_pca(len(train), x.shape[1], seed)
                x_train = pca.fit_transform(x_train)
                x_test = pca.transform(x_test)
            for name in CLASSIFIERS:
                model = make_classifier(name, n_neighbors=n_neighbors, n_train=len(train))
                model.fit(x_train, y[train])
                predicted = model.predict(x_test)
                predictions[method, name][test] = predicted
                f1[method, name][k] = f1_score(y[test], predicted, labels=labels, average="macro", zero_division=0)
                acc[method, name][k] = accuracy_score(y[test], predicted)
            done += 1
            if progress is not None:
                progress("cross-validation", done, total)
    return tuple(ClassifierScores(m, c, f1[m, c], acc[m, c], predictions[m, c])
                 for m in features for c in CLASSIFIERS)


def evaluate_embeddings(
    emb: str | os.PathLike[str] | anndata.AnnData,
    label: str,
    *,
    counts: Sequence[str | os.PathLike[str]] | None = None,
    labels: str | os.PathLike[str] | None = None,
    join: str | Mapping[str, str] | Sequence[str] | None = None,
    folds: int = 5,
    seed: int = 0,
    out: str | os.PathLike[str] | None = None,
    n_neighbors: int = 15,
    baseline: bool = True,
    progress: Progress | None = None,
) -> EvaluationReport:
    """Cross-validated label prediction from embeddings, beside the log1p-PCA(50) baseline (SPEC §2.9).

    Parameters
    ----------
    emb
        The ``.h5ad`` written by ``genecorpus embed`` (``obsm["X_genecorpus"]``), or such an AnnData.
    label
        The ``obs`` (or labels CSV) column to predict.
    counts
        Count files for the baseline (see :func:`read_cell_counts`); default: the inputs listed in the
        manifest of the corpus named in ``uns["genecorpus"]["corpus"]``.
    labels
        A CSV joined onto ``obs`` before the label is taken (see :func:`join_labels`).
    join
        Its key columns (see :func:`join_labels`).
    folds
        Stratified folds (at least 2); classes with fewer cells are left out.
    seed
        Seed of the fold split and of the baseline's PCA.
    out
        Folder to write ``metrics.csv``, ``metrics.json``, ``predictions.csv`` and the confusion-matrix
        PNGs into (see :func:`write_evaluation`).
    n_neighbors
        k of the kNN classifier.
    baseline
        Compute the baseline (needs the raw counts).
    progress
        ``progress(stage, done, total)`` callback.

    Returns
    -------
    The scores and out-of-fold predictions of ``embedding`` and ``baseline`` × ``logreg`` and ``knn``.

    Raises
    ------
    InputError
        No such label column, fewer than two classes with ``folds`` cells, or no counts for some cells.

    Examples
    --------
    >>> report = evaluate_embeddings("emb.h5ad", "cell_type")  # doctest: +SKIP
    >>> print(report.table())  # doctest: +SKIP
    """
    require_sklearn()
    if folds < 2:
        msg = f"--folds {folds}: cross-validation needs at least 2 folds"
        raise ConfigError(msg)
    if n_neighbors < 1:
        msg = f"--n-neighbors {n_neighbors}: give at least 1"
        raise ConfigError(msg)
    adata = read_embeddings(emb)
    source = str(emb) if isinstance(emb, str | os.PathLike) else "the embeddings"
    obs = adata.obs.copy()
    if "cell_id" not in obs.columns:
        obs["cell_id"] = adata.obs_names.astype(str)
    if labels is not None:
        obs = join_labels(obs, labels, join=join)
        source = f"{source} + {labels}"
    values = label_values(obs, label, source)
    labeled = values != ""
    names, sizes = np.unique(values[labeled], return_counts=True)
    dropped = {str(n): int(s) for n, s in zip(names, sizes, strict=True) if s < folds}
    kept_classes = [str(n) for n, s in zip(names, sizes, strict=True) if s >= folds]
    if len(kept_classes) < 2:
        msg = (f"{source}: label {label!r} has {len(kept_classes)} class(es) with at least {folds} cells "
               f"({int(labeled.sum())} labeled cells of {len(values)}); need 2 or more (or fewer --folds)")
        raise InputError(msg)
    keep = labeled & np.isin(values, kept_classes)
    rows = np.flatnonzero(keep)
    classes = tuple(kept_classes)
    y = np.searchsorted(np.array(classes, dtype=object), values[rows]).astype(np.int64)
    fold = stratified_folds(y, folds=folds, seed=seed)
    cells = obs.iloc[rows].reset_index(drop=True)

    embeddings = np.asarray(adata.obsm[EMBEDDING_KEY], dtype=np.float64)[rows]
    if not np.isfinite(embeddings).all():
        msg = f"{source}: obsm[{EMBEDDING_KEY!r}] holds NaN or infinite values; re-run genecorpus embed"
        raise InputError(msg)
    features: dict[str, Any] = {"embedding": embeddings}
    baseline_source, n_genes = None, 0
    if baseline:
        corpus = dict(adata.uns.get("genecorpus", {})).get("corpus")
        matrix, genes, baseline_source = read_cell_counts(cells, counts=counts, corpus=corpus)
        features["baseline"] = log1p_normalize(matrix)
        n_genes = len(genes)
    from threadpoolctl import threadpool_limits

    # The matrices are small (cells x 50-512, QR of cells x 70): one BLAS thread is as fast, and far
    # faster when other processes share the cores (OpenBLAS threads then spin: 0.8 s per QR instead of 0.03).
    with threadpool_limits(limits=1, user_api="blas"):
        scores = _cross_validate(features, y, fold, n_neighbors=n_neighbors, seed=seed, progress=progress)
    report = EvaluationReport(
        label=label, classes=classes, y=y, fold=fold, cells=cells, scores=scores,
        n_input_cells=adata.n_obs, n_unlabeled=int((~labeled).sum()), dropped_classes=dropped,
        baseline_source=baseline_source, n_baseline_genes=n_genes, folds=folds, seed=seed,
        n_neighbors=n_neighbors)
    if out is not None:
        write_evaluation(report, out)
    return report


# ------------------------------------------------------------------------------------------ outputs


_METHOD_WORDS = {"embedding": "the cell embeddings",
                 "baseline": f"the baseline (counts per {int(TARGET_SUM):,}, log1p, PCA({BASELINE_COMPONENTS}))"}


def _confusion_file(scores: ClassifierScores) -> str:
    return f"confusion_{scores.method}_{scores.classifier}.png"


def _short_class(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _draw_confusion(report: EvaluationReport, scores: ClassifierScores) -> Figure:
    """The confusion matrix of one method × classifier (see :func:`confusion_figure`), out of fold."""
    f1, f1_sd = scores.mean_sd("macro_f1")
    return confusion_figure(report.confusion(scores.method, scores.classifier), report.classes,
                            title=f"{report.label}: {scores.method} + {scores.classifier}, "
                                  f"macro F1 {f1:.3f} ± {f1_sd:.3f}",
                            xlabel="predicted class (out of fold)", ylabel="true class (n = cells evaluated)")


def confusion_figure(counts: np.ndarray, classes: Sequence[str], *, title: str, xlabel: str, ylabel: str) -> Figure:
    """A confusion matrix: true classes with their cell counts down, predictions across.

    Each square is coloured by its share of the row (the true class's cells) and, up to 25 classes, shows
    that share over its number of cells; squares without cells stay empty.

    Parameters
    ----------
    counts
        Cells of each true class (rows) predicted as each class (columns), int (classes × classes).
    classes
        Class names, in the order of ``counts``' rows and columns.
    title, xlabel, ylabel
        The figure's first title line and the axis labels.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(classes)
    totals = counts.sum(axis=1)
    shares = counts / np.maximum(totals, 1)[:, None]
    annotate = n <= 25
    size = 2.5 + (0.55 if annotate else 0.3) * n
    fig = Figure(figsize=(size + 2.8, size + 1.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shares, vmin=0, vmax=1, cmap="Blues")
    names = [_short_class(c) for c in classes]
    ax.set_xticks(range(n), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{name} (n={int(t):,})" for name, t in zip(names, totals, strict=True)], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if annotate:
        fontsize = 7 if n <= 15 else 6
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, f"{shares[i, j]:.2f}\n{int(counts[i, j]):,}", ha="center", va="center",
                            fontsize=fontsize, linespacing=1.1,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_title(f"{title}\n"
                 + ("each square: share of the true class's cells (top), cells (bottom); empty: none"
                    if annotate else "colour: share of the true class's cells"), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class's cells (rows sum to 1)")
    return fig


def _confusion_caption(report: EvaluationReport, scores: ClassifierScores) -> str:
    """How to read one confusion matrix, with its class sizes, imbalance and weakest class."""
    counts = report.confusion(scores.method, scores.classifier)
    totals = counts.sum(axis=1)
    correct = np.diag(counts)
    recall = correct / np.maximum(totals, 1)
    classifier = ("logistic regression" if scores.classifier == "logreg"
                  else f"{report.n_neighbors}-nearest-neighbour vote")
    text = (f"Rows are the true {report.label} of the {report.n_cells:,} cells evaluated, each with its number "
            f"of cells (n); columns are the class a {classifier} on {_METHOD_WORDS[scores.method]} predicted "
            f"for a cell while the cell's fold was held out ({report.folds}-fold cross-validation). Each square "
            f"gives the share of the row's cells (colour and top number; a row sums to 1) and their number "
            f"(bottom); an empty square holds no cell. The diagonal is each class's recall: the share of its "
            f"cells predicted right.")
    big, small = int(np.argmax(totals)), int(np.argmin(totals))
    f1, acc = scores.mean_sd("macro_f1")[0], scores.mean_sd("accuracy")[0]
    text += (f" Classes run from {report.classes[big]} (n={int(totals[big]):,}) to {report.classes[small]} "
             f"(n={int(totals[small]):,}), {totals[big] / max(totals[small], 1):.1f} to 1: macro F1 ({f1:.3f}) "
             f"weighs every class alike and accuracy ({acc:.3f}) every cell, so accuracy well above macro F1 "
             f"means the small classes are predicted worse.")
    worst = int(np.argmin(recall))
    if correct[worst] < totals[worst]:
        missed = counts[worst].copy()
        missed[worst] = 0
        other = int(np.argmax(missed))
        text += (f" Lowest recall: {report.classes[worst]}, {int(correct[worst]):,} of {int(totals[worst]):,} "
                 f"cells ({recall[worst]:.2f}), most often predicted as {report.classes[other]} "
                 f"({int(missed[other]):,} cell{'s' if missed[other] > 1 else ''}).")
    else:
        text += " Every cell is predicted as its true class."
    return text


def evaluation_markdown(report: EvaluationReport) -> str:
    """The evaluation as a markdown page: the table, the cells per class, each confusion matrix with its caption.

    The images are referred to by the file names :func:`write_evaluation` gives them.

    Examples
    --------
    >>> print(evaluation_markdown(report))  # doctest: +SKIP
    """
    lines = [f"# Evaluation of `{report.label}`", "", "```text", report.describe(), "```", "",
             "Cells evaluated per class (each class is split evenly over the folds):", "",
             "| class | cells |", "| --- | ---: |"]
    for name, n in report.class_counts().items():
        escaped = name.replace("|", r"\|")  # a "|" in a class name would end the table cell
        lines.append(f"| {escaped} | {n:,} |")
    for s in report.scores:
        f1, f1_sd = s.mean_sd("macro_f1")
        lines += ["", f"## {s.method} + {s.classifier} (macro F1 {f1:.3f} ± {f1_sd:.3f})", "",
                  f"![Confusion matrix of {s.method} + {s.classifier}]({_confusion_file(s)})", "",
                  _confusion_caption(report, s)]
    return "\n".join(lines) + "\n"


def write_evaluation(report: EvaluationReport, out: str | os.PathLike[str]) -> Path:
    """Write the report into the folder ``out`` (replaced whole, atomically); returns its path.

    Files: ``metrics.csv`` (method × classifier × metric: mean, sd, fold_1…), ``metrics.json``
    (:meth:`EvaluationReport.to_dict`), ``predictions.csv`` (per cell: ids, label, fold and each
    method × classifier's out-of-fold prediction), ``table.txt``, ``confusion_<method>_<clf>.png``
    (confusion matrix of the out-of-fold predictions: each true class's cell count on its tick label,
    each square its share of the row and its cells) and ``report.md`` (the table, the cells per class
    and each confusion matrix with a caption saying how to read it).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir (not mkdtemp, which makes it private) so the published folder gets the user's usual permissions
    tmp = out.parent / f".{out.name}.{os.getpid()}-{secrets.token_hex(4)}.incomplete"
    tmp.mkdir()
    try:
        report.metrics_frame().to_csv(tmp / "metrics.csv", index=False)
        (tmp / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        (tmp / "table.txt").write_text(report.describe() + "\n")
        keep = [c for c in ("dataset_id", "cell_id") if c in report.cells.columns]
        predictions = report.cells[keep].copy()
        predictions["label"] = np.array(report.classes, dtype=object)[report.y]
        predictions["fold"] = report.fold
        for s in report.scores:
            predictions[f"{s.method}_{s.classifier}"] = np.array(report.classes, dtype=object)[s.predictions]
        predictions.to_csv(tmp / "predictions.csv", index=False)
        for s in report.scores:
            _draw_confusion(report, s).savefig(tmp / _confusion_file(s), format="png", dpi=100,
                                               metadata={"Software": None})
        (tmp / "report.md").write_text(evaluation_markdown(report), encoding="utf-8")
        publish_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
