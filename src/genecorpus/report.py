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
from genecorpus.corpus.manifest import DROP_REASONS, DatasetRecord, DuplicatesSummary, Manifest, QCThresholds
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
_DPI = 100
_PNG_METADATA: dict[str, str | None] = {"Software": None}
"""Keeps the matplotlib version out of the PNG, so bytes only change when the picture does."""

_OVERFLOW_QUANTILE = 0.005
"""QC histograms span the cut lines and all but this fraction of the largest values."""


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
    sd = qc.n_counts_sd if stat == "n_counts" else qc.mito_sd
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


def _plot_qc(corpus: _Corpus, sample: QCSample, *, stat: str, max_panels: int, path: Path) -> None:
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


def _plot_cells(corpus: _Corpus, path: Path) -> None:
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


def _plot_lengths(corpus: _Corpus, path: Path) -> None:
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


def _plot_genes(corpus: _Corpus, path: Path) -> None:
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


def _plot_medians(values: np.ndarray, path: Path) -> None:
    fig = _new_figure(8.0, 3.6)
    ax = fig.subplots()
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size:
        lo, hi = float(positive.min()), float(positive.max())
        if hi <= lo * 1.001:
            lo, hi = lo / 2, hi * 2
        edges = np.geomspace(lo, hi, 61)
        _stacked_hist(ax, edges, [("_genes", _KEPT_COLOR, positive)])
        ax.set_xscale("log")
        ax.set_xlim(edges[0], edges[-1])
        ax.text(0.02, 0.95, f"{positive.size:,} genes\nmedian of medians {np.median(positive):.3g}",
                ha="left", va="top", transform=ax.transAxes, fontsize=8)
    else:
        ax.text(0.5, 0.5, "no positive gene medians", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("gene median (nonzero counts / n_counts × 10,000), log scale")
    ax.set_ylabel("genes")
    ax.set_title("Distribution of the gene medians", fontsize=11)
    _save(fig, path)


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
</style>
</head>
<body>
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
<img src="cells.png" alt="Cells in, kept and dropped by reason, per dataset">
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
<caption>Cells of the row's dataset that are copies of cells of the column's (earlier) dataset.</caption>
<tr><th>dataset (copies) · earlier dataset →</th>{% for name in dup.columns %}<th>{{ name }}</th>{% endfor %}</tr>
{% for row in dup.rows %}<tr><td>{{ row.name }}</td>{% for v in row.cells %}<td class="num">{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% else %}<p>No cell was found in two datasets.</p>
{% endif %}{% if dup.within %}<p>Cells identical to an earlier cell of the same dataset (reported, kept):
{{ dup.within }}.</p>
{% endif %}{% endif %}
<h2>Quality control</h2>
{% if qc_plots %}
<p>Histograms of a fixed sample of cells of each dataset (at most about 20,000 per dataset), coloured by QC
verdict; dashed lines are the mean ± {{ n_sd }} SD cuts from manifest.json (a cut below zero removes nothing and is
not drawn). Cells dropped later because none of their genes is in the vocabulary appear as kept here.</p>
<h3>Total counts per cell</h3>
<img src="qc_n_counts.png" alt="Per-dataset histograms of n_counts with the 3-SD cut lines">
<h3>Mitochondrial {{ mito_modes }} per cell</h3>
<img src="qc_mito.png" alt="Per-dataset histograms of mitochondrial counts with the 3-SD cut lines">
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
<img src="genes_detected.png" alt="Genes detected per cell">

<h2>Lengths</h2>
<img src="lengths.png" alt="Histogram of lengths with the truncation limit">

<h2>Gene medians</h2>
<table id="medians">
<caption>Median provenance (manifest.json).</caption>
{% for key, value in provenance %}<tr><th>{{ key }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% if medians_plot %}<img src="medians.png" alt="Distribution of gene medians, log scale">{% endif %}

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
        "policy": summary.policy,
        "fate": f"{_num(summary.n_dropped)} later copies dropped" if summary.policy == "drop" else "reported, kept",
        "rule": summary.rule, "n_key": _num(summary.n_key_pairs), "n_candidate": _num(summary.n_candidate_pairs),
        "n_verified": _num(summary.n_verified_pairs), "n_common": _num(summary.n_common_keys),
        "columns": earlier,
        "rows": [{"name": b, "cells": [_num(n[(b, a)]) if (b, a) in n else "" for a in earlier]} for b in later],
        "within": ", ".join(f"{k} {_num(v)}" for k, v in summary.within.items()),
    }


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


def _render_html(corpus: _Corpus, *, qc_plots: bool, max_panels: int) -> str:
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
        notes=_notes(corpus, qc_plots=qc_plots, max_panels=max_panels),
        reasons=DROP_REASONS,
        cell_rows=_cell_rows(corpus.datasets),
        dup=_duplicates_context(m.duplicates, corpus.datasets),
        skipped=m.skipped,
        qc_plots=qc_plots,
        n_sd=_fmt(corpus.n_sd),
        mito_modes=" / ".join(modes) or "counts",
        qc_rows=_qc_rows(corpus.datasets),
        gene_rows=_gene_rows(corpus.datasets),
        provenance=provenance,
        medians_plot=corpus.gene_medians is not None,
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
    truncation limit, genes detected per cell, and the gene medians (log scale). An existing report is
    replaced; other files in ``report/`` (such as ``qc_sample.npz``) are kept.

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
            qc_plots = sample is not None
            if sample is not None:
                _plot_qc(data, sample, stat="n_counts", max_panels=max_panels, path=tmp / "qc_n_counts.png")
                _plot_qc(data, sample, stat="mito", max_panels=max_panels, path=tmp / "qc_mito.png")
            _plot_cells(data, tmp / "cells.png")
            _plot_lengths(data, tmp / "lengths.png")
            _plot_genes(data, tmp / "genes_detected.png")
            if data.gene_medians is not None:
                _plot_medians(data.gene_medians, tmp / "medians.png")
        html = _render_html(data, qc_plots=qc_plots, max_panels=max_panels)
        (tmp / "index.html").write_text(html, encoding="utf-8")
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("report written to %s", final / "index.html")
    return final / "index.html"
