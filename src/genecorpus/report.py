"""The corpus report: one static HTML page with summary tables and PNG plots (SPEC §2.8).

:func:`write_report` reads what a build left in a corpus folder — ``manifest.json``, ``lengths.pkl``,
``gene_medians.tsv`` and, for ``build`` corpora, ``report/qc_sample.npz`` (per-cell QC statistics of a
fixed sample of cells) — and writes ``report/index.html`` with its PNGs beside it. It never reads the
input datasets, so it can be re-run on any finished corpus.

The output depends only on the corpus's files: no paths, dates or matplotlib version are written, figure
sizes are fixed per number of datasets, and everything is drawn in manifest order. matplotlib draws with
its Agg canvas on :class:`~matplotlib.figure.Figure` objects (no pyplot state) under matplotlib's default
style, so a user's ``matplotlibrc`` does not change the bytes.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from genecorpus.corpus.folder import GENE_MEDIANS_TSV, LENGTHS, MANIFEST, QC_SAMPLE, REPORT_DIR, read_lengths
from genecorpus.corpus.manifest import (
    DROP_REASONS,
    ComputedMedians,
    DatasetRecord,
    DepthSource,
    DuplicatesSummary,
    Manifest,
    QCThresholds,
)
from genecorpus.corpus.qc_sample import QCSample
from genecorpus.corpus.shards import publish_folder
from genecorpus.errors import ConfigError, DictionaryError, InputError
from genecorpus.vocab import LAYOUTS, load_gene_medians

if TYPE_CHECKING:
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["MAX_DATASET_PANELS", "require_report_dependencies", "write_report"]

MAX_DATASET_PANELS = 24
"""Datasets drawn as small multiples in the QC figures; the others are only in the tables."""

MAX_BAR_DATASETS = 60
"""Datasets drawn in the cells-per-dataset bar chart."""

_KEPT_COLOR = "#4c72b0"
_REASON_COLORS = {
    "filter_pass": "#8c8c8c",
    "n_counts_outlier": "#dd8452",
    "mito_outlier": "#c44e52",
    "min_genes": "#8172b3",
    "no_vocab_genes": "#937860",
    "not_primary_data": "#da8bc3",
    "duplicate": "#55a868",
}
_CUT_COLOR = "#222222"
_BAND_ALPHA = 0.1
"""Opacity of the shaded ranges (a QC rule's kept range, a dataset's one-count band)."""
_DPI = 100
_PNG_METADATA: dict[str, str | None] = {"Software": None}
"""Keeps the matplotlib version out of the PNG, so bytes only change when the picture does."""

_OVERFLOW_QUANTILE = 0.005
"""QC histograms span the cut lines and all but this fraction of the largest values."""

_TARGET_SUM = 10_000.0
"""The scale of the normalization ``count / n_counts * 10,000`` (``_kernels.TARGET_SUM``, not imported: numba)."""

MAX_DEPTH_MARKS = 8
"""Datasets whose one-count value is marked on the medians plot; the caption names them all."""

_MARK_COLORS = ("#c44e52", "#dd8452", "#55a868", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")


@dataclass(frozen=True)
class _CaptionedPlot:
    """One figure of the page: its PNG file, a short alt text and the caption printed under it."""

    file: str
    alt: str
    caption: str
    """What the reader sees and how to read it, with the numbers of this corpus."""


@dataclass(frozen=True)
class _OneCountMark:
    """Where a gene seen with one count lands on the medians' scale in the cells of one dataset.

    A count of 1 in a cell of depth ``n_counts`` is ``10,000 / n_counts``; taken at the median depth of
    the dataset's kept cells in the QC sample, and over the middle half of them (25th to 75th percentile).
    """

    dataset_id: str
    median_depth: float
    """Median ``n_counts`` of the dataset's kept cells in the QC sample."""
    value: float
    """``10,000 / median_depth``."""
    band: tuple[float, float]
    """``10,000 / (75th percentile of n_counts)``, ``10,000 / (25th percentile)``."""


# ------------------------------------------------------------------------------------------ inputs


@dataclass(frozen=True)
class _Corpus:
    """Everything the report shows, read from a corpus folder."""

    root: Path
    manifest: Manifest
    lengths: np.ndarray
    gene_medians: np.ndarray | None
    sample: QCSample | None

    @property
    def datasets(self) -> tuple[DatasetRecord, ...]:
        return self.manifest.datasets

    @property
    def layout(self) -> str:
        return self.manifest.corpus.layout

    @property
    def n_sd(self) -> float:
        return self.manifest.parameters.qc.n_sd

    @property
    def length_limit(self) -> int:
        layout = LAYOUTS[self.layout]
        return layout.max_genes + (2 if layout.wrap_cls_eos else 0)


def _read_corpus(root: Path) -> _Corpus:
    if not root.is_dir():
        msg = f"{root}: not a folder; give a corpus folder written by genecorpus build or tokenize"
        raise InputError(msg)
    manifest = Manifest.read(root / MANIFEST)
    lengths = read_lengths(root / LENGTHS)
    if lengths.shape[0] != manifest.corpus.n_cells:
        msg = (f"{root / LENGTHS}: {lengths.shape[0]} lengths but manifest.json counts {manifest.corpus.n_cells} "
               f"cells; the folder is inconsistent, rebuild the corpus")
        raise InputError(msg)
    medians_path = root / GENE_MEDIANS_TSV
    gene_medians = None
    if medians_path.is_file():
        try:
            gene_medians = np.array(list(load_gene_medians(medians_path).values()), dtype=np.float64)
        except DictionaryError as e:
            raise InputError(str(e)) from None
    sample = QCSample.read(root / REPORT_DIR / QC_SAMPLE, n_datasets=len(manifest.datasets))
    return _Corpus(root, manifest, lengths, gene_medians, sample)


# ------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png", dpi=_DPI, metadata=_PNG_METADATA)


def _short(name: str, width: int = 32) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _edges(values: np.ndarray, lo: float, hi: float, *, bins: int = 50) -> np.ndarray:
    """Histogram bin edges over [lo, hi]: one bin per integer when integers span few values."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    integer = values.dtype.kind in "iu" or bool(np.all(np.mod(values, 1) == 0))
    if integer and hi - lo <= bins:
        return np.arange(math.floor(lo) - 0.5, math.ceil(hi) + 1.0, 1.0)
    if hi <= lo:
        pad = abs(lo) * 0.05 or 0.5
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, bins + 1)


def _stacked_hist(ax: Axes, edges: np.ndarray, layers: Sequence[tuple[str, str, np.ndarray]]) -> None:
    """Draw histograms stacked in the given order; layers are (label, colour, values)."""
    bottom = np.zeros(edges.shape[0] - 1, dtype=np.float64)
    for label, color, values in layers:
        counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0].astype(np.float64)
        if counts.any():
            ax.stairs(bottom + counts, edges, baseline=bottom, fill=True, color=color, label=label,
                      linewidth=0)
        bottom += counts


def _sample_layers(values: np.ndarray, reason: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    layers = [("kept", _KEPT_COLOR, values[reason < 0])]
    for i, name in enumerate(DROP_REASONS):
        layers.append((f"dropped: {name}", _REASON_COLORS[name], values[reason == i]))
    return layers


def _legend(fig: Figure, labels: Sequence[str], *, ncols: int, n_sd: float | None) -> None:
    from matplotlib.patches import Patch

    colors = {"kept": _KEPT_COLOR} | {f"dropped: {k}": v for k, v in _REASON_COLORS.items()}
    handles = [Patch(color=colors[label], label=label) for label in labels]
    if n_sd is not None:
        handles.append(_cut_handle(n_sd))
        handles.append(Patch(color=_KEPT_COLOR, alpha=_BAND_ALPHA, label="kept range"))
    fig.legend(handles=handles, loc="outside upper center", ncols=ncols, frameon=False, fontsize=9)


def _cut_handle(n_sd: float) -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], color=_CUT_COLOR, linestyle="--", linewidth=1, label=f"{_fmt(n_sd)}-SD cut")


def _used_labels(sample: QCSample) -> list[str]:
    present = {int(r) for r in np.unique(sample.reason).tolist()}
    return ["kept"] + [f"dropped: {name}" for i, name in enumerate(DROP_REASONS) if i in present]


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _qc_panel(ax: Axes, ds: DatasetRecord, sample: QCSample, *, stat: str) -> None:
    """One dataset's histogram of n_counts or mito, with the cut lines of its rule."""
    qc = ds.qc
    values = sample.n_counts if stat == "n_counts" else sample.mito
    title = _short(ds.dataset_id)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    enabled = qc.enabled
    no_mito = (enabled and not qc.mito_rule) or ds.genes.n_mito_columns == 0
    if stat == "mito" and no_mito:
        ax.text(0.5, 0.5, "mito rule skipped\n(no mitochondrial genes)", ha="center", va="center",
                transform=ax.transAxes, fontsize=9, color="#555555")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    if values.size == 0:
        ax.text(0.5, 0.5, "no cells", ha="center", va="center", transform=ax.transAxes, fontsize=9)
        return
    rng = qc.n_counts_range if stat == "n_counts" else qc.mito_range
    cuts = [float(c) for c in rng] if enabled else []
    # values are never negative, so a cut below zero removes nothing and is not drawn
    cuts = sorted({c for c in cuts if c >= 0})
    lo = min([float(values.min()), *cuts])
    hi = max([float(values.max()), *cuts])
    # a few extreme cells would squeeze everything else into one bin: they go in the last bin instead
    top = max([float(np.quantile(values, 1 - _OVERFLOW_QUANTILE)), *cuts])
    n_over = 0
    if top > lo and hi > lo + 1.25 * (top - lo):
        hi = lo + 1.1 * (top - lo)
        n_over = int((values > hi).sum())
    edges = _edges(values, lo, hi)
    sd = qc.n_counts_sd if stat == "n_counts" else qc.mito_sd
    if enabled and sd > 0:  # the kept range, lightly shaded behind the bars
        ax.axvspan(max(float(rng[0]), float(edges[0])), min(float(rng[1]), float(edges[-1])), color=_KEPT_COLOR,
                   alpha=_BAND_ALPHA, linewidth=0, zorder=0)
    _stacked_hist(ax, edges, _sample_layers(values, sample.reason))
    for c in cuts:
        ax.axvline(c, color=_CUT_COLOR, linestyle="--", linewidth=1)
    kept = int((sample.reason < 0).sum())
    text = f"sample {values.size:,} of {ds.cells.n_in:,}\nkept {100 * kept / values.size:.1f}%"
    ax.set_xlim(edges[0], edges[-1])
    if lo == hi:
        span = edges[-1] - edges[0]
        ax.set_xlim(edges[0] - 2 * span, edges[-1] + 2 * span)
        ax.set_xticks([lo], [_fmt(lo)])
        text += f"\nevery cell: {_fmt(lo)}"
    if enabled and sd == 0:
        text += "\nall equal: the rule removes nothing"
    elif enabled:
        text += f"\nkeep {_kept_range(float(rng[0]), float(rng[1]), sd=sd)}"
    if not enabled:
        text += "\nQC disabled: no cut"
    if n_over:
        text += f"\n{n_over:,} above {_fmt(hi)} in last bin"
    ax.text(0.98, 0.95, text, ha="right", va="top", transform=ax.transAxes, fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})
    ax.set_ylim(0, ax.get_ylim()[1] * 1.4)  # headroom for the text


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def _plot_qc(corpus: _Corpus, sample: QCSample, *, stat: str, max_panels: int, path: Path) -> _CaptionedPlot:
    shown = corpus.datasets[:max_panels]
    ncols = min(len(shown), 4) or 1
    nrows = max(math.ceil(len(shown) / ncols), 1)
    fig = _new_figure(3.4 * ncols + 0.4, 2.5 * nrows + 0.9)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        if i >= len(shown):
            ax.set_axis_off()
            continue
        _qc_panel(ax, shown[i], sample.of(i), stat=stat)
    modes = {d.qc.mito_mode for d in shown}
    xlabel = ("total counts per cell (n_counts)" if stat == "n_counts"
              else "mitochondrial " + (" / ".join(sorted(modes)) if modes else "counts") + " per cell")
    if len(corpus.datasets) > len(shown):
        xlabel += f"\n(the first {len(shown)} of {len(corpus.datasets)} datasets; the tables list all)"
    fig.supxlabel(xlabel, fontsize=10)
    fig.supylabel("cells in the QC sample", fontsize=10)
    any_cut = any(d.qc.enabled for d in shown)
    _legend(fig, _used_labels(sample), ncols=6 if ncols > 2 else 3, n_sd=corpus.n_sd if any_cut else None)
    _save(fig, path)
    alt = ("Per-dataset histograms of total counts per cell" if stat == "n_counts"
           else "Per-dataset histograms of mitochondrial counts per cell")
    return _CaptionedPlot(path.name, alt + f" with the {_fmt(corpus.n_sd)}-SD cut lines",
                          _qc_caption(corpus, stat=stat, shown=shown))


def _qc_caption(corpus: _Corpus, *, stat: str, shown: Sequence[DatasetRecord]) -> str:
    """What a QC figure shows, and how many cells its rule removed from each dataset it draws."""
    reason = "n_counts_outlier" if stat == "n_counts" else "mito_outlier"
    if stat == "n_counts":
        what = ("One panel per dataset: how many cells have each total count (n_counts, the sum of a cell's "
                "counts over all its genes, i.e. how deeply it was sequenced), in a fixed sample of at most "
                "about 20,000 cells per dataset.")
    else:
        fraction = any(d.qc.mito_mode == "fraction" for d in shown)
        what = ("One panel per dataset: each cell's counts on mitochondrial genes"
                + (" (as a fraction of its n_counts where the rule reads fractions)" if fraction else "")
                + ", in the same sample; a large mitochondrial share usually marks a damaged or dying cell.")
    how = (f"Bars are stacked by the cells' QC verdict: blue cells are kept, the other colours are dropped, "
           f"each under the first rule that removed it (so a dropped colour inside the cuts is a cell another "
           f"rule removed). The dashed lines are the dataset's cuts at the mean ± {_fmt(corpus.n_sd)} SD of its "
           f"cells and the shaded band between them is the range kept: cells outside it are dropped as "
           f"{reason}. A cut below zero removes nothing and is not drawn (the box says 'no lower cut'). The "
           f"box gives the sample size, the share of the sample kept and the kept range; when a few extreme "
           f"cells would squeeze the rest into one bar, they are piled into the last bar and the box says how "
           f"many. Cells dropped later because none of their genes is in the vocabulary appear as kept here.")
    parts = []
    for d in shown:
        qc, cells = d.qc, d.cells
        if not qc.enabled:
            parts.append(f"{d.dataset_id}: QC off, no cut")
            continue
        if stat == "mito" and (not qc.mito_rule or d.genes.n_mito_columns == 0):
            parts.append(f"{d.dataset_id}: no mitochondrial genes, rule skipped")
            continue
        sd, rng = (qc.n_counts_sd, qc.n_counts_range) if stat == "n_counts" else (qc.mito_sd, qc.mito_range)
        if sd == 0:
            parts.append(f"{d.dataset_id}: every cell at {_fmt(rng[0])}, no cut")
            continue
        removed = cells.dropped[reason]
        parts.append(f"{d.dataset_id} {removed:,} of {cells.n_in:,} cells ({_percent(removed, cells.n_in)}; kept: "
                     f"{_kept_range(float(rng[0]), float(rng[1]), sd=sd)})")
    removed_text = f" Cells this rule removed (all cells, from manifest.json): {'; '.join(parts)}." if parts else ""
    return f"{what} {how}{removed_text}"


def _plot_cells(corpus: _Corpus, path: Path) -> _CaptionedPlot:
    shown = corpus.datasets[:MAX_BAR_DATASETS]
    n = max(len(shown), 1)
    fig = _new_figure(9.0, 1.4 + 0.32 * n)
    ax = fig.subplots()
    y = np.arange(len(shown))
    left = np.zeros(len(shown), dtype=np.float64)
    layers = [("kept", _KEPT_COLOR, [d.cells.kept for d in shown])]
    layers += [(f"dropped: {r}", _REASON_COLORS[r], [d.cells.dropped[r] for d in shown]) for r in DROP_REASONS]
    for label, color, counts in layers:
        width = np.asarray(counts, dtype=np.float64)
        if width.any() or label == "kept":
            ax.barh(y, width, left=left, color=color, label=label, height=0.7)
        left += width
    for yi, d, total in zip(y, shown, left, strict=True):
        n_in = d.cells.n_in
        pct = 100 * d.cells.kept / n_in if n_in else 0.0
        ax.text(total, yi, f"  {pct:.1f}% kept", va="center", fontsize=8)
    ax.set_yticks(y, [_short(d.dataset_id) for d in shown], fontsize=8)
    ax.set_ylim(len(shown) - 0.5, -0.5)
    ax.set_xlim(0, (left.max() if left.size and left.max() > 0 else 1) * 1.18)
    ax.set_xlabel("cells (all cells, from manifest.json)")
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    title = "Cells in, kept and dropped by reason, per dataset"
    if len(corpus.datasets) > len(shown):
        title += f" (the first {len(shown)} of {len(corpus.datasets)})"
    ax.set_title(title, fontsize=11)
    _save(fig, path)
    return _CaptionedPlot(path.name, "Cells in, kept and dropped by reason, per dataset", _cells_caption(corpus))


def _cells_caption(corpus: _Corpus) -> str:
    """What the cells chart shows, with the corpus's totals and its largest losses."""
    datasets = corpus.datasets
    n_in = sum(d.cells.n_in for d in datasets)
    kept = sum(d.cells.kept for d in datasets)
    dropped = {r: sum(d.cells.dropped[r] for d in datasets) for r in DROP_REASONS}
    text = ("One bar per dataset: every cell read from it, blue for the cells kept in the corpus and the other "
            "colours for the cells dropped, each counted under the first rule that removed it (in the order of "
            "the table's columns); the percentage after a bar is the share of its cells kept.")
    text += f" In all, {kept:,} of {n_in:,} cells ({_percent(kept, n_in)}) were kept"
    listed = [f"{r} {n:,}" for r, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])) if n]
    text += ("; dropped: " + ", ".join(listed) + ".") if listed else "; no cell was dropped."
    with_cells = [d for d in datasets if d.cells.n_in]
    if len(with_cells) > 1:
        worst = min(with_cells, key=lambda d: d.cells.kept / d.cells.n_in)
        text += f" Lowest share kept: {worst.dataset_id} ({_percent(worst.cells.kept, worst.cells.n_in)})."
    return text


def _plot_lengths(corpus: _Corpus, path: Path) -> _CaptionedPlot:
    limit = corpus.length_limit
    lengths = corpus.lengths
    fig = _new_figure(8.0, 3.6)
    ax = fig.subplots()
    hi = max(limit, int(lengths.max()) if lengths.size else 0)
    edges = np.linspace(0, hi, 65) if hi > 64 else np.arange(-0.5, hi + 1.5)
    _stacked_hist(ax, edges, [("_cells", _KEPT_COLOR, lengths)])
    ax.axvline(limit, color=_CUT_COLOR, linestyle="--", linewidth=1,
               label=f"truncation limit {limit:,} ({corpus.layout})")
    at_limit = int((lengths >= limit).sum())
    if lengths.size:
        text = (f"{lengths.size:,} cells, mean {lengths.mean():,.1f}, median {np.median(lengths):,.0f}\n"
                f"{at_limit:,} cells ({100 * at_limit / lengths.size:.1f}%) truncated at the limit")
    else:
        text = "no cells"
    ax.text(0.5, 0.95, text, ha="center", va="top", transform=ax.transAxes, fontsize=8)
    ax.set_xlim(0, hi * 1.03 + 1)
    ax.set_xlabel("length (tokens per cell, special tokens included)")
    ax.set_ylabel("cells")
    ax.legend(loc="upper right", fontsize=8, frameon=False)
    ax.set_title("Length of the encoded cells", fontsize=11)
    _save(fig, path)
    return _CaptionedPlot(path.name, "Histogram of lengths with the truncation limit", _lengths_caption(corpus))


def _lengths_caption(corpus: _Corpus) -> str:
    """What the lengths histogram shows, with the share of cells cut at the layout's limit."""
    layout = LAYOUTS[corpus.layout]
    limit, lengths = corpus.length_limit, corpus.lengths
    specials = ", plus its <cls> and <eos> tokens" if layout.wrap_cls_eos else ""
    text = (f"Length of each encoded cell: one token per vocabulary gene detected in the cell{specials}, the "
            f"genes ranked by their expression relative to the gene's median (highest first). The model reads "
            f"at most {limit:,} tokens (layout {layout.name}, the dashed line): a cell with more genes keeps its "
            f"{layout.max_genes:,} highest-ranked ones, so such cells pile up at the line.")
    if lengths.size:
        at_limit = int((lengths >= limit).sum())
        text += (f" {at_limit:,} of {lengths.size:,} cells ({_percent(at_limit, lengths.size)}) reach the limit; "
                 f"the median cell has {np.median(lengths):,.0f} tokens (mean {lengths.mean():,.1f}).")
    return text


def _plot_genes(corpus: _Corpus, path: Path) -> _CaptionedPlot:
    fig = _new_figure(8.0, 3.6)
    ax = fig.subplots()
    sample = corpus.sample
    if sample is not None:
        values = sample.n_genes
        hi = float(values.max()) if values.size else 1.0
        _stacked_hist(ax, _edges(values, 0.0, hi, bins=60), _sample_layers(values, sample.reason))
        rules = sorted({d.qc.min_genes for d in corpus.datasets if d.qc.enabled})
        for m in rules:
            ax.axvline(m, color=_CUT_COLOR, linestyle="--", linewidth=1, label=f"min_genes = {m}")
        ax.set_xlabel("detected candidate genes per cell (QC sample, all datasets)")
        ax.set_ylabel("cells in the QC sample")
        ax.set_title("Genes detected per cell", fontsize=11)
    else:
        layout = LAYOUTS[corpus.layout]
        values = corpus.lengths - (2 if layout.wrap_cls_eos else 0)
        hi = float(max(layout.max_genes, int(values.max()) if values.size else 0))
        _stacked_hist(ax, _edges(values, 0.0, hi, bins=64), [("_cells", _KEPT_COLOR, values)])
        ax.axvline(layout.max_genes, color=_CUT_COLOR, linestyle="--", linewidth=1,
                   label=f"at most {layout.max_genes:,} genes ({layout.name})")
        ax.set_xlabel("vocabulary genes encoded per cell (from lengths; truncated)")
        ax.set_ylabel("cells")
        ax.set_title("Genes per cell in the corpus (no QC sample)", fontsize=11)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    _save(fig, path)
    return _CaptionedPlot(path.name, "Genes detected per cell", _genes_caption(corpus))


def _genes_caption(corpus: _Corpus) -> str:
    """What the genes-per-cell histogram shows, with the min_genes rule's toll and the typical cell."""
    sample = corpus.sample
    if sample is None:
        layout = LAYOUTS[corpus.layout]
        values = corpus.lengths - (2 if layout.wrap_cls_eos else 0)
        text = (f"Vocabulary genes encoded per cell, read from the lengths (special tokens left out), so at "
                f"most {layout.max_genes:,} (the dashed line): a cell with more detected genes is cut there. "
                f"This corpus has no QC sample, so the cells that were dropped are not shown.")
        if values.size:
            text += f" The median cell has {np.median(values):,.0f} genes."
        return text
    text = ("How many genes each cell expresses: its candidate genes (protein-coding and miRNA) with a count "
            "above zero, pooled over the QC samples of all datasets and stacked by QC verdict as in the "
            "figures above.")
    rules = sorted({d.qc.min_genes for d in corpus.datasets if d.qc.enabled})
    if rules:
        removed = sum(d.cells.dropped["min_genes"] for d in corpus.datasets)
        text += (f" The dashed line is the min_genes rule ({', '.join(map(str, rules))}): a cell detecting fewer "
                 f"genes (an empty droplet or debris, usually) is dropped; it removed {removed:,} cells in all.")
    kept = sample.n_genes[sample.reason < 0]
    if kept.size:
        p5, p50, p95 = np.percentile(kept, [5, 50, 95])
        text += (f" Kept cells of the sample detect a median of {p50:,.0f} genes (5th–95th percentile "
                 f"{p5:,.0f}–{p95:,.0f}).")
    return text


def _one_count_marks(corpus: _Corpus) -> tuple[_OneCountMark, ...]:
    """Per dataset that fed the computed medians: the value one count takes in its kept cells' depths."""
    medians, sample = corpus.manifest.medians, corpus.sample
    if sample is None or not isinstance(medians, ComputedMedians):
        return ()
    fed = set(medians.datasets)
    marks = []
    for i, d in enumerate(corpus.datasets):
        part = sample.of(i)
        depth = part.n_counts[(part.reason < 0) & (part.n_counts > 0)].astype(np.float64)
        if d.dataset_id not in fed or depth.size == 0:
            continue
        q25, q50, q75 = (float(q) for q in np.percentile(depth, [25, 50, 75]))
        marks.append(_OneCountMark(d.dataset_id, q50, _TARGET_SUM / q50, (_TARGET_SUM / q75, _TARGET_SUM / q25)))
    return tuple(marks)


def _plot_medians(corpus: _Corpus, medians: np.ndarray, path: Path) -> _CaptionedPlot:
    fig = _new_figure(8.0, 3.6)
    ax = fig.subplots()
    positive = medians[np.isfinite(medians) & (medians > 0)]
    marks = _one_count_marks(corpus)
    drawn = marks[:MAX_DEPTH_MARKS]
    if positive.size:
        lo = min([float(positive.min()), *(m.value for m in drawn)])
        hi = max([float(positive.max()), *(m.value for m in drawn)])
        if hi <= lo * 1.001:
            lo, hi = lo / 2, hi * 2
        edges = np.geomspace(lo, hi, 61)
        for color, m in zip(_MARK_COLORS, drawn, strict=False):
            ax.axvspan(*m.band, color=color, alpha=_BAND_ALPHA, linewidth=0, zorder=0)
        _stacked_hist(ax, edges, [("_genes", _KEPT_COLOR, positive)])
        for color, m in zip(_MARK_COLORS, drawn, strict=False):
            ax.axvline(m.value, color=color, linestyle="--", linewidth=1.2,
                       label=f"1 count in a {_short(m.dataset_id, 24)} cell of median depth: {_fmt(m.value)}")
        ax.set_xscale("log")
        ax.set_xlim(edges[0], edges[-1])
        ax.text(0.02, 0.95, f"{positive.size:,} genes\nmedian of medians {np.median(positive):.3g}",
                ha="left", va="top", transform=ax.transAxes, fontsize=8)
        if drawn:
            ax.legend(loc="upper right", fontsize=7, frameon=False)
    else:
        ax.text(0.5, 0.5, "no positive gene medians", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("gene median of count / n_counts × 10,000 over the cells that express it (log scale)")
    ax.set_ylabel("genes")
    ax.set_title("Gene medians: the normalized expression of each gene where it is detected", fontsize=11)
    _save(fig, path)
    return _CaptionedPlot(path.name, "Distribution of gene medians, log scale",
                          _medians_caption(corpus, positive, marks))


def _medians_caption(corpus: _Corpus, medians: np.ndarray, marks: Sequence[_OneCountMark]) -> str:
    """Why the medians gather in peaks (the depth of the cells), with the shares of genes at each place."""
    source = corpus.manifest.medians
    scale = ("count / n_counts × 10,000: the gene's count in a cell divided by the cell's total counts, scaled "
             "to 10,000. The encoding ranks the genes of a cell by that value divided by the gene's median, so "
             "a gene ranks high where it is expressed above its usual level.")
    why = ("Counts are whole numbers, and in typical single-cell data most genes are seen with a single count in "
           "most of the cells that express them; such a gene's median is then 10,000 divided by the depth "
           "(n_counts) of a typical cell that expresses it. So the medians are not whole numbers, yet they "
           "gather where one count (or two, or three) falls in a typical cell: the peaks are set by the depth "
           "of the cells rather than by the genes.")
    if not isinstance(source, ComputedMedians):
        text = (f"Medians read from the given file (the table above), not computed from these cells: each is a "
                f"gene's median, over the cells of the corpus they were computed on that express it, of {scale} "
                f"{why}")
    else:
        text = (f"Each gene's median is taken over the kept cells of {', '.join(source.datasets)} that express "
                f"it, of {scale} {why}")
    n = medians.size
    if n == 0:
        return text
    summary = (f" Median of the {n:,} medians: {_fmt(float(np.median(medians)))} (5th–95th percentile "
               f"{_fmt(float(np.percentile(medians, 5)))}–{_fmt(float(np.percentile(medians, 95)))}).")
    if not marks:
        if isinstance(source, ComputedMedians):
            text += " The QC sample is missing, so where one count falls in these cells is not marked."
        return text + summary
    in_band = np.zeros(n, dtype=bool)
    for m in marks:
        in_band |= (medians >= m.band[0]) & (medians <= m.band[1])
    above = int((medians >= 2 * max(m.value for m in marks)).sum())
    below = int((medians < min(m.band[0] for m in marks)).sum())
    if len(marks) == 1:
        m = marks[0]
        text += (f" The dashed line marks one count in a cell of {m.dataset_id}'s median depth ({m.median_depth:,.0f} "
                 f"counts): {_fmt(m.value)}; the shaded band, one count over the middle half of its kept cells "
                 f"(depths {_TARGET_SUM / m.band[1]:,.0f}–{_TARGET_SUM / m.band[0]:,.0f}, QC sample).")
        where = "in the band"
        twice, lowest, deepest = "the line", "the band", "its"
    else:
        listed = "; ".join(f"{m.dataset_id} {_fmt(m.value)} ({m.median_depth:,.0f} counts)" for m in marks)
        text += (f" Each dashed line marks one count in a cell of a dataset's median depth — {listed} — and each "
                 f"shaded band one count over the middle half of that dataset's kept cells (QC sample): datasets "
                 f"sequenced to different depths give separate peaks, and a gene lands nearer the one whose "
                 f"cells express it most.")
        if len(marks) > MAX_DEPTH_MARKS:
            text += f" The first {MAX_DEPTH_MARKS} of the {len(marks)} datasets are drawn."
        where = "in a band"
        twice, lowest = "the highest line", "the lowest band"
        deepest = f"the deepest dataset's ({max(marks, key=lambda m: m.median_depth).dataset_id})"
    marked = {m.dataset_id for m in marks}
    from_obs = [d.dataset_id for d in corpus.datasets if d.dataset_id in marked and d.depth is DepthSource.OBS_N_COUNTS]
    if from_obs:
        text += (f" ({', '.join(from_obs)}: the medians divide by obs n_counts, the marks by the total counts the "
                 f"QC sample holds.)")
    text += (f" {_percent(int(in_band.sum()), n)} of the {n:,} genes lie {where}, where the median of a gene seen "
             f"with one count lies; {_percent(above, n)} lie at or above twice {twice} (two counts or more in a cell of median "
             f"depth: genes expressed strongly wherever they are detected, or found mostly in shallow cells); "
             f"{_percent(below, n)} lie below {lowest} (genes found mostly in cells deeper than three quarters "
             f"of {deepest} kept cells: one count is worth less in a deeper cell).")
    return text + summary


# -------------------------------------------------------------------------------------------- html


_TEMPLATE = """\
<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>genecorpus report — {{ datasets|length }} dataset(s), {{ "{:,}".format(corpus.n_cells) }} cells</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f2f2f2; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.total td { font-weight: bold; background: #fafafa; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 0.4em 0.8em; margin: 0.6em 0; }
caption { text-align: left; font-style: italic; padding: 0.2em 0; }
figure { margin: 0.5em 0 1.5em; }
figcaption { max-width: 62em; font-size: 0.9em; line-height: 1.4; color: #333; }
</style>
</head>
<body>
{% macro figure(plot) %}<figure>
<img src="{{ plot.file }}" alt="{{ plot.alt }}">
<figcaption>{{ plot.caption }}</figcaption>
</figure>{% endmacro %}
<h1>genecorpus report</h1>
<table>
<tr><th>mode</th><td>{{ mode }}</td></tr>
<tr><th>layout</th><td>{{ corpus.layout }} (length limit {{ "{:,}".format(limit) }} tokens)</td></tr>
<tr><th>datasets</th><td class="num">{{ datasets|length }}</td></tr>
<tr><th>cells</th><td class="num">{{ "{:,}".format(corpus.n_cells) }}</td></tr>
<tr><th>tokens</th><td class="num">{{ "{:,}".format(corpus.n_tokens) }}</td></tr>
<tr><th>mean length</th><td class="num">{{ mean_length }}</td></tr>
<tr><th>shards</th><td class="num">{{ corpus.n_shards }}</td></tr>
<tr><th>columns</th><td>{{ corpus.columns }}</td></tr>
<tr><th>vocabulary</th><td>{{ vocab }}</td></tr>
<tr><th>gene medians</th><td>{{ medians_source }}</td></tr>
</table>
{% for note in notes %}<p class="note">{{ note }}</p>
{% endfor %}
<h2>Cells per dataset</h2>
<table id="cells">
<caption>From manifest.json: every input cell is kept or counted under the first drop reason that applies.</caption>
<tr><th>dataset</th><th>cells in</th><th>kept</th><th>% kept</th>{% for r in reasons %}<th>{{ r }}</th>{% endfor %}</tr>
{% for row in cell_rows %}<tr{% if row.total %} class="total"{% endif %}><td>{{ row.name }}</td><td class="num">{{ row.n_in }}</td><td class="num">{{ row.kept }}</td><td class="num">{{ row.pct }}</td>{% for v in row.dropped %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{{ figure(plots["cells.png"]) }}
{% if skipped %}<table id="skipped">
<caption>Datasets left out with --on-error skip: none of their cells is in the corpus.</caption>
<tr><th>dataset</th><th>path</th><th>stage</th><th>error</th></tr>
{% for s in skipped %}<tr><td>{{ s.dataset_id }}</td><td>{{ s.path }}</td><td>{{ s.stage }}</td><td>{{ s.error }}</td></tr>
{% endfor %}</table>
{% endif %}

{% if dup %}<h2>Duplicate cells</h2>
<p>Cells found in two datasets from their counts (policy <b>{{ dup.policy }}</b>: {{ dup.fate }}). Rule: {{ dup.rule }}.
{{ dup.n_key }} pairs of cells shared a fingerprint key; {{ dup.n_candidate }} of them had agreeing sketches and were
compared on their counts, and {{ dup.n_verified }} were verified{% if dup.n_common != "0" %}
({{ dup.n_common }} fingerprints shared by too many cells were not used){% endif %}.</p>
{% if dup.columns %}<table id="duplicates">
<caption>{{ dup.caption }}</caption>
<tr><th>dataset (copies) · earlier dataset →</th>{% for name in dup.columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for row in dup.rows %}<tr><td>{{ row.name }}</td>{% for v in row.cells %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>No cell was found in two datasets.</p>
{% endif %}{% if dup.within %}<p>Cells identical to an earlier cell of the same dataset (reported, kept):
{{ dup.within }}.</p>
{% endif %}{% endif %}
<h2>Quality control</h2>
{% if "qc_n_counts.png" in plots %}
<h3>Total counts per cell</h3>
{{ figure(plots["qc_n_counts.png"]) }}
<h3>Mitochondrial {{ mito_modes }} per cell</h3>
{{ figure(plots["qc_mito.png"]) }}
{% endif %}
<table id="qc">
<caption>Thresholds per dataset (population SD over the dataset's preselected cells).</caption>
<tr><th>dataset</th><th>QC</th><th>n_counts mean ± SD</th><th>n_counts kept range</th><th>mito rule</th><th>mito mean ± SD</th><th>mito kept range</th><th>min genes</th></tr>
{% for row in qc_rows %}<tr><td>{{ row.name }}</td><td>{{ row.enabled }}</td><td class="num">{{ row.n_counts }}</td><td class="num">{{ row.n_counts_range }}</td><td>{{ row.mito_rule }}</td><td class="num">{{ row.mito }}</td><td class="num">{{ row.mito_range }}</td><td class="num">{{ row.min_genes }}</td></tr>
{% endfor %}</table>

<h2>Genes</h2>
<table id="genes">
<caption>Gene mapping per dataset: input columns, identifiers that could not be mapped or were ambiguous, and what reached the gene universe.</caption>
<tr><th>dataset</th><th>ids</th><th>release</th><th>input genes</th><th>unmapped</th><th>ambiguous</th><th>columns in universe</th><th>genes in universe</th><th>mito columns</th><th>depth</th></tr>
{% for row in gene_rows %}<tr><td>{{ row.name }}</td><td>{{ row.id_kind }}</td><td>{{ row.release }}</td><td class="num">{{ row.n_input_genes }}</td><td class="num">{{ row.n_unmapped }}</td><td class="num">{{ row.n_ambiguous }}</td><td class="num">{{ row.n_columns_in_universe }}</td><td class="num">{{ row.n_genes_in_universe }}</td><td class="num">{{ row.n_mito_columns }}</td><td>{{ row.depth }}</td></tr>
{% endfor %}</table>
{{ figure(plots["genes_detected.png"]) }}

<h2>Lengths</h2>
{{ figure(plots["lengths.png"]) }}

<h2>Gene medians</h2>
<table id="medians">
<caption>Median provenance (manifest.json).</caption>
{% for key, value in provenance %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% if "medians.png" in plots %}{{ figure(plots["medians.png"]) }}{% endif %}

<h2>Software</h2>
<table id="versions">
{% for key, value in versions %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
</body>
</html>
"""


def _num(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else str(x)


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in sorted(value.items()))
    return _num(value)


def _cell_rows(datasets: Sequence[DatasetRecord]) -> list[dict[str, Any]]:
    rows = []
    tot_in = tot_kept = 0
    tot_dropped = dict.fromkeys(DROP_REASONS, 0)
    for d in datasets:
        c = d.cells
        tot_in += c.n_in
        tot_kept += c.kept
        for r in DROP_REASONS:
            tot_dropped[r] += c.dropped[r]
        rows.append({"name": d.dataset_id, "n_in": _num(c.n_in), "kept": _num(c.kept),
                     "pct": f"{100 * c.kept / c.n_in:.1f}" if c.n_in else "–",
                     "dropped": [_num(c.dropped[r]) for r in DROP_REASONS], "total": False})
    rows.append({"name": "total", "n_in": _num(tot_in), "kept": _num(tot_kept),
                 "pct": f"{100 * tot_kept / tot_in:.1f}" if tot_in else "–",
                 "dropped": [_num(tot_dropped[r]) for r in DROP_REASONS], "total": True})
    return rows


def _duplicates_context(summary: DuplicatesSummary | None, datasets: Sequence[DatasetRecord]) -> dict[str, Any] | None:
    """The duplicates section: the matrix of shared cells over the datasets that share any (manifest order)."""
    if summary is None:
        return None
    order = {d.dataset_id: i for i, d in enumerate(datasets)}
    earlier = sorted({s.a for s in summary.shared}, key=order.__getitem__)
    later = sorted({s.b for s in summary.shared}, key=order.__getitem__)
    n = {(s.b, s.a): s.n_cells for s in summary.shared}
    return {
        "caption": _duplicates_caption(summary, datasets),
        "policy": summary.policy,
        "fate": f"{_num(summary.n_dropped)} later copies dropped" if summary.policy == "drop" else "reported, kept",
        "rule": summary.rule, "n_key": _num(summary.n_key_pairs), "n_candidate": _num(summary.n_candidate_pairs),
        "n_verified": _num(summary.n_verified_pairs), "n_common": _num(summary.n_common_keys),
        "columns": earlier,
        "rows": [{"name": b, "cells": [_num(n[(b, a)]) if (b, a) in n else "" for a in earlier]} for b in later],
        "within": ", ".join(f"{k} {_num(v)}" for k, v in summary.within.items()),
    }


def _duplicates_caption(summary: DuplicatesSummary, datasets: Sequence[DatasetRecord]) -> str:
    """What a number of the shared-cells matrix counts, what became of those cells, and the largest overlap."""
    fate = ("they were dropped from the row's dataset (the cells table counts them under duplicate)"
            if summary.policy == "drop" else "they are only listed and stay in the corpus")
    text = ("Each number counts the cells of the row's dataset that the rule above calls the same cell as a cell "
            "of the column's dataset, which comes earlier in the manifest (so the row's cells are the later "
            f"copies); an empty square means none was found. Under policy {summary.policy}, {fate}.")
    n_in = {d.dataset_id: d.cells.n_in for d in datasets}
    if summary.shared:
        top = max(summary.shared, key=lambda s: (s.n_cells / max(n_in.get(s.b, 0), 1), s.n_cells))
        text += (f" Largest share: {top.n_cells:,} of the {n_in.get(top.b, 0):,} cells of {top.b} "
                 f"({_percent(top.n_cells, n_in.get(top.b, 0))}) are copies of cells of {top.a}.")
    return text


def _mito_rule_text(qc: QCThresholds) -> str:
    if not qc.enabled:
        return "skipped (QC disabled)"
    if not qc.mito_rule:
        return "skipped (no mitochondrial genes)"
    return f"on {qc.mito_mode}"


def _kept_range(lo: float, hi: float, *, sd: float) -> str:
    """A rule's kept range as a reader takes it: a bound below zero cuts nothing; SD 0 cuts nothing."""
    if sd == 0:
        return f"all at {_fmt(lo)}: no cut"
    if lo < 0:
        return f"no lower cut; ≤ {_fmt(hi)}"
    return f"[{_fmt(lo)}, {_fmt(hi)}]"


def _qc_rows(datasets: Sequence[DatasetRecord]) -> list[dict[str, str]]:
    rows = []
    for d in datasets:
        qc = d.qc
        on = qc.enabled
        mito_on = on and qc.mito_rule
        nr, mr = qc.n_counts_range, qc.mito_range
        rows.append({
            "name": d.dataset_id,
            "enabled": "on" if on else "off",
            "n_counts": f"{_fmt(qc.n_counts_mean)} ± {_fmt(qc.n_counts_sd)}" if on else "–",
            "n_counts_range": _kept_range(nr[0], nr[1], sd=qc.n_counts_sd) if on else "–",
            "mito_rule": _mito_rule_text(qc),
            "mito": f"{_fmt(qc.mito_mean)} ± {_fmt(qc.mito_sd)}" if mito_on else "–",
            "mito_range": _kept_range(mr[0], mr[1], sd=qc.mito_sd) if mito_on else "–",
            "min_genes": str(qc.min_genes) if on else "–",
        })
    return rows


def _gene_rows(datasets: Sequence[DatasetRecord]) -> list[dict[str, str]]:
    rows = []
    for d in datasets:
        row = {k: _num(v) if v is not None else "–" for k, v in d.genes.model_dump().items()}
        rows.append(row | {"name": d.dataset_id, "depth": str(d.depth)})
    return rows


def _notes(corpus: _Corpus, *, qc_plots: bool, max_panels: int) -> list[str]:
    notes = []
    mode = corpus.manifest.mode
    if corpus.sample is None:
        if mode == "tokenize":
            notes.append("This corpus was made by tokenize, which does no QC beyond filter_pass and cells "
                         "without vocabulary genes: there are no QC plots.")
        else:
            notes.append(f"{REPORT_DIR}/{QC_SAMPLE} is missing, so the QC plots are skipped; rebuild "
                         "the corpus to get them.")
    off = [d.dataset_id for d in corpus.datasets if not d.qc.enabled]
    if mode == "build" and off:
        notes.append("QC was disabled (no 3-SD or min_genes rule) for: " + ", ".join(off) + ".")
    n = len(corpus.datasets)
    if qc_plots and n > max_panels:
        notes.append(f"The QC figures show the first {max_panels} of {n} datasets; the tables list all.")
    if n > MAX_BAR_DATASETS:
        notes.append(f"The cells-per-dataset chart shows the first {MAX_BAR_DATASETS} of {n} datasets; "
                     "the table lists all.")
    skipped = [d.dataset_id for d in corpus.datasets if d.qc.enabled and not d.qc.mito_rule]
    if skipped:
        notes.append("Mitochondrial rule skipped (no mitochondrial genes in the dataset): "
                     + ", ".join(skipped) + ".")
    if corpus.gene_medians is None:
        notes.append("gene_medians.tsv is missing, so the median distribution is not drawn.")
    return notes


def _render_html(corpus: _Corpus, *, plots: Sequence[_CaptionedPlot], max_panels: int) -> str:
    import jinja2

    m = corpus.manifest
    c = m.corpus
    vocab = m.vocabulary
    specials = ", ".join(f"{k} = {v}" for k, v in sorted(vocab.special_tokens.items(), key=lambda kv: (kv[1], kv[0])))
    provenance = sorted((str(k), _plain(v)) for k, v in m.medians.model_dump(mode="json").items())
    versions = sorted((str(k), str(v)) for k, v in m.versions.items())
    modes = sorted({d.qc.mito_mode for d in corpus.datasets})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(_TEMPLATE).render(
        mode=m.mode,
        corpus={"layout": corpus.layout, "n_cells": c.n_cells, "n_tokens": c.n_tokens, "n_shards": len(c.shards),
                "columns": ", ".join(c.columns)},
        limit=corpus.length_limit,
        mean_length=f"{corpus.lengths.mean():,.1f}" if corpus.lengths.size else "–",
        datasets=corpus.datasets,
        vocab=(f"{_num(vocab.n_genes)} genes, {_num(vocab.n_tokens)} tokens"
               + (f" (special: {specials})" if specials else "")),
        medians_source=m.medians.source,
        notes=_notes(corpus, qc_plots=any(p.file == "qc_n_counts.png" for p in plots), max_panels=max_panels),
        reasons=DROP_REASONS,
        cell_rows=_cell_rows(corpus.datasets),
        dup=_duplicates_context(m.duplicates, corpus.datasets),
        skipped=m.skipped,
        plots={p.file: p for p in plots},
        mito_modes=" / ".join(modes) or "counts",
        qc_rows=_qc_rows(corpus.datasets),
        gene_rows=_gene_rows(corpus.datasets),
        provenance=provenance,
        versions=versions,
    )


# ----------------------------------------------------------------------------------------- publish


def _owned(name: str) -> bool:
    """Files of ``report/`` that a report run writes (and so replaces); others are carried over."""
    return name == "index.html" or name.endswith(".png")


def _carry_over(old: Path, new: Path) -> None:
    for p in sorted(old.iterdir()):
        if _owned(p.name) or (new / p.name).exists():
            continue
        try:
            os.link(p, new / p.name)
        except OSError:
            if p.is_dir():
                shutil.copytree(p, new / p.name)
            else:
                shutil.copy2(p, new / p.name)


def _publish(tmp: Path, final: Path) -> None:
    """Swap the finished folder in; a reader sees the old or the new report, never half of one."""
    if final.exists():
        _carry_over(final, tmp)
    publish_folder(tmp, final)


def require_report_dependencies() -> None:
    """Raise :class:`~genecorpus.errors.ConfigError` unless matplotlib and jinja2 are installed.

    Cheap (nothing is imported), so a build can check before it starts rather than fail at the end.

    Examples
    --------
    >>> from genecorpus.report import require_report_dependencies
    >>> require_report_dependencies()
    """
    missing = [name for name in ("matplotlib", "jinja2") if importlib.util.find_spec(name) is None]
    if missing:
        msg = (f"the report needs {' and '.join(missing)}, which is not installed; "
               f"pip install 'genecorpus[report]'")
        raise ConfigError(msg)


def write_report(corpus: str | os.PathLike[str], *, max_panels: int = MAX_DATASET_PANELS) -> Path:
    """Write the HTML report of a corpus folder into ``<corpus>/report/`` and return its ``index.html``.

    The page has summary tables (cells in, kept and dropped by reason per dataset with totals, QC
    thresholds, gene mapping, median provenance, versions) and plots: per-dataset QC histograms of
    ``n_counts`` and the mitochondrial statistic with the 3-SD cut lines (``build`` corpora only; they
    come from ``report/qc_sample.npz``), cells per dataset, the length histogram with the layout's
    truncation limit, genes detected per cell, and the gene medians (log scale, with where one count
    falls in each dataset's cells). Every plot has a caption that says what it shows and how to read it,
    with this corpus's numbers (cells each rule removed, the share of genes at one count, ...). An existing
    report is replaced; other files in ``report/`` (such as ``qc_sample.npz``) are kept.

    Parameters
    ----------
    corpus
        A corpus folder written by ``genecorpus build`` or ``genecorpus tokenize``.
    max_panels
        At most this many datasets (in manifest order) are drawn in the QC figures; all are in the tables.

    Returns
    -------
    The path of ``report/index.html``.

    Raises
    ------
    InputError
        ``corpus`` is not a corpus folder, or one of its files is unreadable or inconsistent.
    ConfigError
        matplotlib or jinja2 is not installed.

    Examples
    --------
    >>> from genecorpus.report import write_report
    >>> write_report("pbmc-corpus")  # doctest: +SKIP
    PosixPath('pbmc-corpus/report/index.html')
    """
    if max_panels < 1:
        msg = f"max_panels must be at least 1, got {max_panels}"
        raise ConfigError(msg)
    require_report_dependencies()
    import matplotlib.style

    data = _read_corpus(Path(corpus))
    final = data.root / REPORT_DIR
    # mkdir (not mkdtemp, which makes it private) so the published folder gets the usual permissions
    tmp = data.root / f".{REPORT_DIR}.incomplete-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as e:
        msg = f"{data.root}: cannot write the report ({e.strerror}); check the folder's permissions"
        raise InputError(msg) from None
    try:
        # a user's matplotlibrc must not change the pictures
        with matplotlib.style.context("default"):
            sample = data.sample if data.datasets else None
            plots = []
            if sample is not None:
                plots.append(_plot_qc(data, sample, stat="n_counts", max_panels=max_panels,
                                      path=tmp / "qc_n_counts.png"))
                plots.append(_plot_qc(data, sample, stat="mito", max_panels=max_panels, path=tmp / "qc_mito.png"))
            plots.append(_plot_cells(data, tmp / "cells.png"))
            plots.append(_plot_lengths(data, tmp / "lengths.png"))
            plots.append(_plot_genes(data, tmp / "genes_detected.png"))
            if data.gene_medians is not None:
                plots.append(_plot_medians(data, data.gene_medians, tmp / "medians.png"))
        html = _render_html(data, plots=plots, max_panels=max_panels)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("report written to %s", final / "index.html")
    return final / "index.html"
