"""The ``genecorpus`` command line: thin commands that parse, call the Python API and report.

Errors caused by input are printed as one line (``error: …``) with exit code 1; ``--debug`` shows the
traceback. Progress bars go to stderr and are off when stderr is not a terminal or
``GENECORPUS_NO_PROGRESS`` is set.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from genecorpus.errors import GenecorpusError, InputError

if TYPE_CHECKING:
    from collections.abc import Callable

    from genecorpus.build import BuildResult
    from genecorpus.config import ClusterSpec
    from genecorpus.executors import Executor

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Build Genecorpus-style rank-value-encoded single-cell corpora (Geneformer format).",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

_err = Console(stderr=True)
_state = {"debug": False}


def _print_version(*, value: bool) -> None:
    if value:
        from genecorpus import __version__

        typer.echo(f"genecorpus {__version__}")
        raise typer.Exit


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More log output.")] = 0,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    from rich.logging import RichHandler

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=_err)])
    for noisy in ("numba", "h5py", "fsspec", "distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # what --resume reuses and redoes is always shown
        logging.getLogger("genecorpus.resume").setLevel(logging.INFO)


class _Progress:
    """Driver-side progress bars, one per stage (under torchrun: rank 0's only)."""

    def __init__(self) -> None:
        self.enabled = _err.is_terminal and not os.environ.get("GENECORPUS_NO_PROGRESS") and _reports()
        self._progress = None
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._progress = Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), console=_err, transient=False)
            self._progress.start()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        raise e
    # escaped: messages quote manifest syntax such as [[datasets]], which rich would take as markup
    _err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _run_with_progress(run: Callable[[Executor], BuildResult], *, workers: int | None, engine: str | None,
                       scheduler: str | None, cluster: ClusterSpec | None = None) -> None:
    """Run a corpus job on the chosen executor with progress bars; print its summary or the error line."""
    from genecorpus.corpus.folder import REPORT_DIR
    from genecorpus.describe import describe_corpus
    from genecorpus.executors import make_executor

    try:
        with _Progress() as progress:
            executor = make_executor(workers=workers, engine=engine, scheduler=scheduler, cluster=cluster,
                                     progress=progress)
            try:
                result = run(executor)
            finally:
                executor.close()
        typer.echo(describe_corpus(result.path, n_examples=1, scan=False))
        index = result.path / REPORT_DIR / "index.html"
        if index.is_file():
            typer.echo(f"\nreport: {index}")
    except GenecorpusError as e:
        _fail(e)


@app.command()
def build(
    manifest: Annotated[Path, typer.Argument(help="TOML manifest listing the datasets.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Corpus folder to create.")],
    workers: Annotated[int | None, typer.Option(
        min=1, help="Worker processes, local or Dask (same output for any number; default 1).")] = None,
    engine: Annotated[str | None, typer.Option(
        help="local (worker processes) or dask (LocalCluster, or the manifest's \\[cluster] section).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running Dask scheduler.")] = None,
    block_size: Annotated[int | None, typer.Option(help="Cells read at a time (overrides the manifest).")] = None,
    layout: Annotated[str | None, typer.Option(help="gc30m or gc104m (overrides the manifest).")] = None,
    duplicates: Annotated[str | None, typer.Option(
        help="Cells found in two datasets: drop the later copies, report them, or keep (do not look); "
             "overrides the manifest (default drop).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    on_error: Annotated[str, typer.Option(
        help="fail: stop at the first unreadable dataset; skip: leave it out and list it in the manifest.")] = "fail",
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted build of OUT from its finished tasks (and keep them if this run fails).")] = False,
    report: Annotated[bool, typer.Option(help="Write OUT/report/index.html.")] = True,
) -> None:
    """Build a corpus: read, map genes, QC, exact medians, rank value encoding, Arrow shards.

    Example:

        genecorpus build examples/pbmc_demo.toml --out pbmc-corpus --workers 2
    """
    from genecorpus.build import build_corpus
    from genecorpus.config import load_cluster_spec, load_manifest

    def run(executor: Executor) -> BuildResult:
        config = load_manifest(manifest, block_size=block_size, layout=layout, duplicates=duplicates)
        return build_corpus(config, out, workers=workers or 1, overwrite=overwrite, executor=executor,
                            report=report, on_error=on_error, resume=resume)

    try:
        cluster = load_cluster_spec(manifest)
    except GenecorpusError as e:
        _fail(e)
    _run_with_progress(run, workers=workers, engine=engine, scheduler=scheduler, cluster=cluster)


@app.command()
def tokenize(
    inputs: Annotated[list[Path], typer.Argument(help="Input files (h5ad, zarr, loom, 10x, CSV/TSV).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Corpus folder to create.")],
    token_dictionary: Annotated[Path, typer.Option(help="Token dictionary pickle (e.g. Geneformer's).")],
    gene_medians: Annotated[Path, typer.Option(help="Gene median dictionary (.pkl) or genecorpus TSV.")],
    gene_mapping: Annotated[Path | None, typer.Option(help="Geneformer ensembl_mapping_dict pickle.")] = None,
    layout: Annotated[str | None, typer.Option(help="gc30m or gc104m; default from the dictionary.")] = None,
    obs_columns: Annotated[str, typer.Option(help="Comma-separated obs columns to keep.")] = "",
    gene_id: Annotated[str, typer.Option(help="Kind of gene identifiers: auto, ensembl or symbol.")] = "auto",
    layer: Annotated[str | None, typer.Option(
        help="Read the counts from this AnnData layer (default: X if it holds counts, else raw.X, else "
             "layers['counts']).")] = None,
    use_raw: Annotated[bool, typer.Option("--use-raw", help="Read the counts from raw.X.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Worker processes, local or Dask (default 1).")] = None,
    engine: Annotated[str | None, typer.Option(
        help="local (worker processes) or dask (a LocalCluster of --workers processes).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Address of a running Dask scheduler.")] = None,
    block_size: Annotated[int, typer.Option(help="Cells read at a time (memory, not output).")] = 2_000,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    on_error: Annotated[str, typer.Option(
        help="fail: stop at the first unreadable dataset; skip: leave it out and list it in the manifest.")] = "fail",
    resume: Annotated[bool, typer.Option(
        help="Continue an interrupted build of OUT from its finished tasks (and keep them if this run fails).")] = False,
    report: Annotated[bool, typer.Option(help="Write OUT/report/index.html.")] = True,
) -> None:
    """Tokenize datasets with given dictionaries, as Geneformer's TranscriptomeTokenizer does.

    No QC beyond the filter_pass column and cells without vocabulary genes. Examples:

        genecorpus tokenize pbmc.h5ad --out pbmc-gc30m \\
            --token-dictionary token_dictionary_gc30M.pkl \\
            --gene-medians gene_median_dictionary_gc30M.pkl

        genecorpus tokenize a.h5ad b.loom --out v2 --layout gc104m \\
            --token-dictionary token_dictionary_gc104M.pkl \\
            --gene-medians gene_median_dictionary_gc104M.pkl \\
            --gene-mapping ensembl_mapping_dict_gc104M.pkl --obs-columns cell_type
    """
    from genecorpus.build import tokenize as tokenize_datasets

    def run(executor: Executor) -> BuildResult:
        return tokenize_datasets(
            inputs, out, token_dictionary=token_dictionary, gene_medians=gene_medians,
            gene_mapping=gene_mapping, layout=layout, gene_id=gene_id, layer=layer, use_raw=use_raw,
            workers=workers or 1,
            obs_columns=[c.strip() for c in obs_columns.split(",") if c.strip()],
            block_size=block_size, overwrite=overwrite, executor=executor, report=report, on_error=on_error,
            resume=resume)

    _run_with_progress(run, workers=workers, engine=engine, scheduler=scheduler)


@app.command()
def inspect(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder (or published parquet files).")],
    token_dictionary: Annotated[Path | None, typer.Option(help="Token dictionary, if not in the folder.")] = None,
    cells: Annotated[int, typer.Option(help="How many cells to decode to gene symbols.")] = 1,
) -> None:
    """Summarize a corpus: cells, tokens, lengths, per-dataset counts, and decoded example cells.

    Example:

        genecorpus inspect pbmc-corpus --cells 2
    """
    from genecorpus.describe import describe_corpus

    try:
        typer.echo(describe_corpus(corpus, token_dictionary=token_dictionary, n_examples=cells))
    except GenecorpusError as e:
        _fail(e)


@app.command()
def report(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder written by build or tokenize.")],
    max_panels: Annotated[int, typer.Option(help="Datasets drawn in the QC figures (all are in the tables).")] = 24,
) -> None:
    """Write CORPUS/report/index.html: QC histograms, cells, lengths, genes, medians, tables.

    The QC histograms show the 3-SD cuts; every plot has a caption with this corpus's numbers.

    Example:

        genecorpus report pbmc-corpus
    """
    from genecorpus.report import write_report

    try:
        index = write_report(corpus, max_panels=max_panels)
    except GenecorpusError as e:
        _fail(e)
    typer.echo(f"report: {index}")


@app.command()
def validate(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder (or published parquet files).")],
    all_cells: Annotated[bool, typer.Option("--all-cells", help="Recompute every cell from the inputs, not a sample.")] = False,
    sample_cells: Annotated[int, typer.Option(help="About how many cells to recompute from the inputs.")] = 1000,
    check_inputs: Annotated[bool, typer.Option(help="Recompute cells from the inputs listed in the manifest.")] = True,
    require_inputs: Annotated[bool, typer.Option("--require-inputs", help="Fail when an input is missing or changed (default: skip the recomputation).")] = False,
    token_dictionary: Annotated[Path | None, typer.Option(help="Token dictionary, if not in the folder.")] = None,
    gene_medians: Annotated[Path | None, typer.Option(help="Gene medians (.pkl or .tsv), if not in the folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a corpus against its manifest, its dictionaries and its inputs.

    One line per check (shards, cell counts, lengths, tokens, layout, unique tokens, non-empty
    cells, dictionaries, lengths file, inputs, cells recomputed from the inputs), the first
    offending rows of a failed check, and a summary line. Exit code 0 only if every check holds;
    missing or changed inputs skip the recomputation unless --require-inputs. Examples:

        genecorpus validate pbmc-corpus

        genecorpus validate pbmc-corpus --all-cells --require-inputs --json

        genecorpus validate genecorpus_500_samples.parquet \\
            --token-dictionary token_dictionary_gc30M.pkl
    """
    import json

    from genecorpus.validate import validate_corpus

    try:
        with _Progress() as progress:
            result = validate_corpus(
                corpus, check_inputs=check_inputs, require_inputs=require_inputs, all_cells=all_cells,
                sample_cells=sample_cells, token_dictionary=token_dictionary, gene_medians=gene_medians,
                progress=progress)
    except GenecorpusError as e:
        _fail(e)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.to_text())
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def embed(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder (or published parquet files).")],
    model: Annotated[Path, typer.Option(help="Model folder (genecorpus pretrain) or a Geneformer checkpoint.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .h5ad file to write.")],
    layer: Annotated[int, typer.Option(
        help="Hidden states: 0 = embedding output, -1 = last layer, -2 = penultimate (Geneformer's default).")] = -2,
    pool: Annotated[str, typer.Option(help="mean (over gene tokens) or cls (the <cls> state, gc104m layout).")] = "mean",
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass (memory and speed only).")] = 16,
    max_length: Annotated[int | None, typer.Option(
        help="Tokens kept per cell (default: the model's maximum).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: CUDA if available).")] = None,
    token_dictionary: Annotated[Path | None, typer.Option(
        help="The model's token dictionary, if its folder has none (Geneformer checkpoints).")] = None,
    corpus_token_dictionary: Annotated[Path | None, typer.Option(
        help="The corpus's token dictionary, if its folder has none (default: the model's).")] = None,
    precision: Annotated[str, typer.Option(
        help="auto (bf16 autocast on a CUDA GPU with bf16, else fp32), fp32 or bf16.")] = "auto",
) -> None:
    """Embed every cell of a corpus with a model, into obsm["X_genecorpus"] of an .h5ad.

    A cell's embedding is the mean of a layer's hidden states over its gene tokens (or its <cls> state);
    the .h5ad's obs holds the corpus metadata.

    Examples:

        genecorpus embed pbmc-corpus --model pbmc-model --out pbmc-emb.h5ad

        torchrun --nproc-per-node 2 -m genecorpus embed pbmc-corpus --model pbmc-model --out pbmc-emb.h5ad

        genecorpus embed genecorpus_500_samples.parquet --model Geneformer/gf-6L-30M-i2048 \\
            --token-dictionary token_dictionary_gc30M.pkl --out sample-emb.h5ad --layer -1
    """
    from genecorpus.model.bert import require_torch
    from genecorpus.model.embed import EMBEDDING_KEY, embed_corpus

    _quiet_other_processes()
    try:
        require_torch()
        with _Progress() as progress:
            adata = embed_corpus(corpus, model, out=out, layer=layer, pool=pool, batch_size=batch_size,  # type: ignore[arg-type]
                                 max_length=max_length, device=device, token_dictionary=token_dictionary,
                                 corpus_token_dictionary=corpus_token_dictionary, precision=precision,
                                 progress=progress)
    except GenecorpusError as e:
        _fail(e)
    if adata is None:  # another process than rank 0 under torchrun: rank 0 reports
        return
    info = adata.uns["genecorpus"]
    seconds = float(info["seconds"])
    typer.echo(f"embedded {adata.n_obs} cells in {seconds:.1f} s ({adata.n_obs / max(seconds, 1e-9):.1f} cells/s): "
               f"{adata.obsm[EMBEDDING_KEY].shape[1]} dimensions, layer {info['layer']}, {info['pool']} pooling")
    typer.echo(f"wrote {out} (obsm['{EMBEDDING_KEY}']; obs: {', '.join(map(str, adata.obs.columns))})")


@app.command()
def perturb(
    source: Annotated[Path, typer.Argument(help="An embedding .h5ad (genecorpus embed) or a corpus.")],
    model: Annotated[Path, typer.Option(help="Model folder (genecorpus pretrain) or a Geneformer checkpoint.")],
    genes: Annotated[str, typer.Option(help="Comma-separated Ensembl IDs or symbols, perturbed together.")],
    mode: Annotated[str, typer.Option(help="delete (remove the tokens) or overexpress (move them to the front).")] = "delete",
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Write OUT_cells.csv and OUT_genes.csv.")] = None,
    max_cells: Annotated[int | None, typer.Option(help="Perturb only the first N cells.")] = None,
    layer: Annotated[int | None, typer.Option(
        help="Hidden states compared (default: the embedding's layer, else -2).")] = None,
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = 16,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default: CUDA if available).")] = None,
    top: Annotated[int, typer.Option(help="Genes listed whose embeddings moved most.")] = 20,
    min_cells: Annotated[int, typer.Option(
        min=1, help="List only genes compared in at least this many cells (fewer: noise).")] = 10,
    token_dictionary: Annotated[Path | None, typer.Option(
        help="The model's token dictionary, if its folder has none (Geneformer checkpoints).")] = None,
    corpus_token_dictionary: Annotated[Path | None, typer.Option(
        help="The corpus's token dictionary, if its folder has none (default: the model's).")] = None,
) -> None:
    """In-silico deletion or overexpression of genes, as Geneformer's in-silico perturbation.

    Re-embeds each cell with the genes removed or moved to the front, and reports the cosine shift of
    the cell embedding per cell and on average, and the genes whose embeddings moved most.

    Examples:

        genecorpus perturb pbmc-emb.h5ad --model pbmc-model --genes CD74 --mode delete --out cd74-del

        genecorpus perturb pbmc-corpus --model pbmc-model --genes ENSG00000156738,CD79A \\
            --mode overexpress --max-cells 500
    """
    from genecorpus.model.bert import require_torch
    from genecorpus.model.perturb import perturb as perturb_cells

    try:
        require_torch()
        with _Progress() as progress:
            result = perturb_cells(source, model, genes=genes.split(","), mode=mode, layer=layer,  # type: ignore[arg-type]
                                   batch_size=batch_size, max_cells=max_cells, device=device,
                                   token_dictionary=token_dictionary,
                                   corpus_token_dictionary=corpus_token_dictionary, progress=progress,
                                   min_cells=min_cells)
        written = result.write(out) if out is not None else ()
    except GenecorpusError as e:
        _fail(e)
    typer.echo(result.to_text(top))
    for path in written:
        typer.echo(f"wrote {path}")


@app.command()
def evaluate(
    emb: Annotated[Path, typer.Argument(help="Embeddings .h5ad written by genecorpus embed.")],
    label: Annotated[str, typer.Option("--label", "-l", help="obs (or --labels CSV) column to predict.")],
    counts: Annotated[list[Path] | None, typer.Option(
        "--counts", help="Raw count files for the baseline (repeat; default: the corpus manifest's inputs).")] = None,
    labels: Annotated[Path | None, typer.Option(help="CSV of labels joined onto the cells.")] = None,
    join: Annotated[str | None, typer.Option(
        help="Join keys of --labels: csv_col[=obs_col],... (default: the columns both have).")] = None,
    folds: Annotated[int, typer.Option(help="Stratified cross-validation folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the folds and of the baseline's PCA.")] = 0,
    n_neighbors: Annotated[int, typer.Option(help="k of the kNN classifier.")] = 15,
    baseline: Annotated[bool, typer.Option(help="Compute the log1p-PCA(50) baseline from raw counts.")] = True,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder for metrics and confusion matrices.")] = None,
) -> None:
    """Predict a label from cell embeddings, beside a log1p counts -> PCA(50) baseline.

    Logistic regression and kNN, stratified k-fold CV; the baseline (log1p-normalized counts -> PCA(50)
    -> the same classifiers) runs on the same cells and folds.

    Cells without a label and classes with fewer cells than folds are left out (and listed). Prints
    macro F1 and accuracy (mean ± SD over folds); --out writes metrics.csv, metrics.json,
    predictions.csv, confusion_<method>_<classifier>.png (cells per true class on the labels, each
    square's share and cells) and report.md (the matrices with captions on how to read them). Examples:

        genecorpus evaluate emb.h5ad --label cell_type --out eval-cell-type

        genecorpus evaluate emb.h5ad --label cell_type_kang --labels kang_labels.csv \\
            --join cell=cell_id,dataset=dataset_id --counts kang_ctrl.h5ad --counts kang_stim.h5ad
    """
    from genecorpus.model.evaluate import evaluate_embeddings

    try:
        with _Progress() as progress:
            report = evaluate_embeddings(emb, label, counts=counts or None, labels=labels, join=join, folds=folds,
                                         seed=seed, out=out, n_neighbors=n_neighbors, baseline=baseline,
                                         progress=progress)
    except GenecorpusError as e:
        _fail(e)
    typer.echo(report.describe())
    if out is not None:
        typer.echo(f"\nwritten: {out}")


@app.command()
def pretrain(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder (or published parquet files).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model folder to create.")],
    preset: Annotated[str, typer.Option(help="Model size: tiny, small or gf-6l (Geneformer V1).")] = "small",
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (or give --epochs; neither: planned from --time-limit, else one epoch).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training cells.")] = None,
    batch_size: Annotated[int, typer.Option(help="Cells per process in one forward pass; a step's global batch is this × --grad-accum × processes.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches whose gradients one step adds up (gradient accumulation).")] = 1,
    max_batch_tokens: Annotated[int | None, typer.Option(help="Most padded tokens (cells × longest cell) in one forward pass; longer batches are cut into several (same gradient), so that long cells do not exhaust memory.")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout of hidden states and attention (default: the preset's, 0.02).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, linear warm-up and decay).")] = 1e-3,
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (default 10 % of the (planned) steps, at most 1,000).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per cell (default the longest cell, at most 2,048 / 4,096).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of everything: same seed, same model.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of cells held out (whole datasets when there are several).")] = 0.05,
    hold_out_datasets: Annotated[str | None, typer.Option(help="Comma-separated datasets to hold out from training (instead of --val-fraction's choice).")] = None,
    val_cells: Annotated[int | None, typer.Option(help="Held-out cells every validation scores (default: up to 2,000 at the end and a fixed subset of them before, so that validation costs ~10 % of training).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validations (default ~10 per run; fewer with --val-cells if they would cost more than ~10 %).")] = None,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    time_limit: Annotated[float | None, typer.Option(help="Minutes of wall time, a hard cap (the run evaluates and saves within it). Without --max-steps/--epochs, the steps and the learning-rate schedule are planned from it, from the speed measured in the first steps.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default CUDA if available).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on a CUDA GPU with bf16, else fp32), fp32 or bf16.")] = "auto",
    token_dictionary: Annotated[Path | None, typer.Option(help="Token dictionary, if not in the corpus folder.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Pretrain a BertForMaskedLM on a corpus with the masked-gene objective.

    15 % of each cell's genes are predicted (80 % masked, 10 % a random gene, 10 % unchanged),
    batches are drawn by length, and held-out cells (whole datasets when there are several) are
    scored against a baseline that predicts a gene from its rank position. OUT opens with
    BertForMaskedLM.from_pretrained and holds the token dictionary, genecorpus_model.json,
    loss_curve.png and a checkpoint for --resume. With --time-limit alone, the run measures its
    speed, plans the steps to fill the time and ends with its learning rate decayed (the plan is in
    genecorpus_model.json; --max-steps with it reproduces the run on any machine). Under torchrun, one
    process per GPU (or CPU) trains with DistributedDataParallel; rank 0 logs and writes. Examples:

        genecorpus pretrain pbmc-corpus --out pbmc-model --preset small --time-limit 20

        torchrun --nproc-per-node 2 -m genecorpus pretrain pbmc-corpus --out pbmc-model --batch-size 4

        genecorpus pretrain pbmc-corpus --out pbmc-model --preset small --max-steps 4000 --resume

        genecorpus pretrain genecorpus_500_samples.parquet --out gc-model --preset tiny \\
            --epochs 2 --token-dictionary token_dictionary_gc30M.pkl
    """
    from genecorpus.model.bert import require_torch

    try:
        require_torch()
        from genecorpus.model.pretrain import pretrain as pretrain_model

        logging.getLogger("genecorpus.model.pretrain").setLevel(logging.INFO)
        _quiet_other_processes()
        with _Progress() as progress:
            result = pretrain_model(
                corpus, out, preset=preset, max_steps=max_steps, epochs=epochs, batch_size=batch_size,
                grad_accum=grad_accum, max_batch_tokens=max_batch_tokens, dropout=dropout, lr=lr,
                warmup_steps=warmup_steps, max_length=max_length, seed=seed, val_fraction=val_fraction,
                hold_out_datasets=tuple(d.strip() for d in (hold_out_datasets or "").split(",") if d.strip()),
                val_cells=val_cells, eval_every=eval_every, save_every=save_every, time_limit=time_limit,
                precision=precision, device=device, token_dictionary=token_dictionary, resume=resume,
                overwrite=overwrite,
                progress=progress)
    except GenecorpusError as e:
        _fail(e)
    if not _reports():
        return
    m, training, plan = result.metrics, result.info["training"], result.info["plan"]
    typer.echo(f"model: {result.model_path} ({result.steps} steps, {training['tokens_seen']:,} tokens, "
               f"{training['wall_seconds']:.0f} s, stopped at {result.stopped.replace('_', ' ')})")
    if plan["planned_by"] == "time_limit":
        replans = plan["replans"]
        first = replans[0]["from_total"] if replans else plan["total_steps"]
        changed = f", re-planned {len(replans)}× to {plan['total_steps']:,}" if replans else ""
        last = "none" if training["last_lr"] is None else f"{training['last_lr']:.2g}"
        typer.echo(f"steps planned from the time limit: {first:,} at {plan['seconds_per_step']:.3g} s per step "
                   f"(measured){changed}; {plan['warmup_steps']:,} of warm-up, last learning rate {last} (peak "
                   f"{training['peak_lr']:g}); {training['eval_seconds']:.0f} s validating, "
                   f"{training['train_seconds']:.0f} s training")
    typer.echo(f"validation on {result.info['split']['n_val_cells']:,} held-out cells "
               f"({int(result.info['evals'][-1]['n_masked']):,} masked genes):")
    typer.echo(f"  {'':<10}{'loss':>9}{'top-1':>9}{'top-10':>9}")
    for name, prefix in (("model", ""), ("baseline", "baseline_")):
        typer.echo(f"  {name:<10}{m[prefix + 'val_loss']:>9.4f}{m[prefix + 'val_top1']:>9.4f}"
                   f"{m[prefix + 'val_top10']:>9.4f}")


@app.command()
def finetune(
    corpus: Annotated[Path, typer.Argument(help="A corpus folder tokenized with the model's dictionary.")],
    model: Annotated[Path, typer.Option(help="Model folder (genecorpus pretrain) or a Geneformer checkpoint.")],
    label: Annotated[str, typer.Option("--label", "-l", help="Corpus (or --labels CSV) column to predict.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Classifier folder to create.")],
    labels: Annotated[Path | None, typer.Option(help="CSV of labels joined onto the cells.")] = None,
    join: Annotated[str | None, typer.Option(
        help="Join keys of --labels: csv_col[=corpus_col],... (default: the columns both have).")] = None,
    epochs: Annotated[float | None, typer.Option(help="Passes over the training cells (default 5).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (instead of --epochs).")] = None,
    batch_size: Annotated[int, typer.Option(help="Cells per process in one forward pass; a step's global batch is this × --grad-accum × processes.")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches whose gradients one step adds up (gradient accumulation).")] = 1,
    max_batch_tokens: Annotated[int | None, typer.Option(help="Most padded tokens in one forward pass: long cells go in smaller micro-batches (memory only).")] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout of the encoder and head (default: the model's).")] = None,
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on a CUDA GPU with bf16, else fp32), fp32 or bf16.")] = "auto",
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, linear warm-up and decay).")] = 5e-5,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.001,
    warmup_steps: Annotated[int | None, typer.Option(help="Warm-up steps (default 10 % of the steps).")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per cell (default the longest cell, at most the model's positions).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the split, the new head and the batches.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Share of each class's cells that validates (early stopping).")] = 0.1,
    test_fraction: Annotated[float, typer.Option(help="Share of each class's cells that tests.")] = 0.2,
    folds: Annotated[int | None, typer.Option(help="k-fold instead of one split: each fold tested by a model trained on the rest.")] = None,
    hold_out_datasets: Annotated[str | None, typer.Option(help="Comma-separated datasets whose cells are the test cells.")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between validations (default one epoch).")] = None,
    patience: Annotated[int, typer.Option(help="Stop after this many validations without a better macro F1 (0: never).")] = 3,
    freeze_layers: Annotated[int, typer.Option(help="Freeze the embeddings and the lowest N encoder layers.")] = 0,
    class_weights: Annotated[str, typer.Option(help="balanced (weighted cross-entropy) or none.")] = "none",
    time_limit: Annotated[float | None, typer.Option(help="Minutes of wall time, a hard cap (stops, evaluates, saves).")] = None,
    pretraining_cells: Annotated[str, typer.Option(help="If the model was pretrained on this corpus: restrict the test cells to those pretraining held out, or warn.")] = "restrict",
    baseline: Annotated[bool, typer.Option(help="Compute the log1p-PCA(50) baseline from raw counts.")] = True,
    counts: Annotated[list[Path] | None, typer.Option(
        "--counts", help="Raw count files for the baseline (repeat; default: the corpus manifest's inputs).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default CUDA if available).")] = None,
    token_dictionary: Annotated[Path | None, typer.Option(
        help="The model's token dictionary, if its folder has none (Geneformer checkpoints).")] = None,
    corpus_token_dictionary: Annotated[Path | None, typer.Option(
        help="The corpus's token dictionary, if its folder has none (default: the model's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
) -> None:
    """Fine-tune a cell classifier on a labeled corpus, beside the log1p-PCA(50) baseline on the same cells.

    A BertForSequenceClassification (first-token pooling, new head) starts from the model's weights; a
    stratified seeded train/validation/test split (or --folds, or --hold-out-datasets); early stopping on
    validation macro F1 keeps the best weights. If the model was pretrained on this corpus, only cells its
    pretraining held out test. OUT opens with BertForSequenceClassification.from_pretrained and holds
    genecorpus_model.json, metrics, per-class figures, test predictions, the split and confusion matrices.
    Examples:

        genecorpus finetune pbmc-corpus --model pbmc-model --label cell_type --out pbmc-cell-types

        genecorpus finetune pbmc-corpus --model pbmc-model --label cell_type_kang --labels kang_labels.csv \\
            --join cell=cell_id --out kang-types --epochs 10 --lr 1e-4 --freeze-layers 2 --class-weights balanced
    """
    from genecorpus.model.bert import require_torch

    try:
        require_torch()
        from genecorpus.model.finetune import finetune as finetune_model

        logging.getLogger("genecorpus.model.finetune").setLevel(logging.INFO)
        _quiet_other_processes()
        held = tuple(d.strip() for d in hold_out_datasets.split(",") if d.strip()) if hold_out_datasets else ()
        with _Progress() as progress:
            result = finetune_model(
                corpus, out, model=model, label=label, labels=labels, join=join, epochs=epochs, max_steps=max_steps,
                batch_size=batch_size, grad_accum=grad_accum, max_batch_tokens=max_batch_tokens, dropout=dropout,
                precision=precision, lr=lr,
                weight_decay=weight_decay, warmup_steps=warmup_steps, max_length=max_length, seed=seed,
                val_fraction=val_fraction,
                test_fraction=test_fraction, folds=folds, hold_out_datasets=held, eval_every=eval_every,
                patience=patience or None, freeze_layers=freeze_layers, class_weights=class_weights,
                time_limit=time_limit, pretraining_cells=pretraining_cells, baseline=baseline, counts=counts or None,
                device=device, token_dictionary=token_dictionary, corpus_token_dictionary=corpus_token_dictionary,
                overwrite=overwrite, progress=progress)
    except GenecorpusError as e:
        _fail(e)
    if not _reports():
        return
    info = result.info
    split = info["split"]
    typer.echo(f"classifier: {result.model_path} ({len(result.classes)} classes of {label!r}; split {split['by']}: "
               f"{split['n_cells']['train']} train, {split['n_cells']['val']} val, "
               f"{split['n_test_cells_all_folds']} test cells)")
    if info["dropped_classes"]:
        typer.echo("left out (too few cells): " + ", ".join(f"{c} ({n})" for c, n in info["dropped_classes"].items()))
    guard = info["leakage_guard"]
    if guard["restricted_test_to_pretraining_held_out"]:
        typer.echo("test cells: only cells the model's pretraining held out (it was pretrained on this corpus)")
    elif guard["n_test_cells_seen_in_pretraining"]:
        typer.echo(f"warning: {guard['n_test_cells_seen_in_pretraining']} test cells were pretraining cells")
    typer.echo(result.table())


@app.command()
def predict(
    corpus: Annotated[Path, typer.Argument(help="A corpus tokenized with the classifier's token dictionary.")],
    model: Annotated[Path, typer.Option(help="Classifier folder written by genecorpus finetune.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV to write: one row per cell, in corpus order.")],
    batch_size: Annotated[int, typer.Option(help="Cells per forward pass (memory and speed only).")] = 32,
    max_length: Annotated[int | None, typer.Option(help="Tokens per cell (default: the classifier's training length).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1... (default CUDA if available).")] = None,
    corpus_token_dictionary: Annotated[Path | None, typer.Option(
        help="The corpus's token dictionary, if its folder has none (default: the classifier's).")] = None,
) -> None:
    """Label every cell of a corpus with a fine-tuned classifier: predicted class and each class's probability.

    Example:

        genecorpus predict new-pbmc-corpus --model pbmc-cell-types --out new-pbmc-cell-types.csv
    """
    from genecorpus.model.bert import require_torch

    try:
        require_torch()
        from genecorpus.model.finetune import predict_cells

        _quiet_other_processes()
        with _Progress() as progress:
            frame = predict_cells(corpus, model, out=out, batch_size=batch_size, max_length=max_length,
                                  device=device, corpus_token_dictionary=corpus_token_dictionary, progress=progress)
    except GenecorpusError as e:
        _fail(e)
    if not _reports():
        return
    counts = frame["predicted"].value_counts()
    typer.echo(f"labelled {len(frame)} cells: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    typer.echo(f"wrote {out}")


def _reports() -> bool:
    """This process prints what a command did: a plain process, or rank 0 under torchrun."""
    from genecorpus.model.distributed import launched_process

    return launched_process().is_main


def _quiet_other_processes() -> None:
    """Under torchrun, only rank 0 logs what a run does; the other processes warnings and errors only."""
    if not _reports():
        logging.getLogger("genecorpus").setLevel(logging.WARNING)
        for name in ("genecorpus.model.pretrain", "genecorpus.model.embed", "genecorpus.model.finetune",
                     "genecorpus.model.distributed"):
            logging.getLogger(name).setLevel(logging.WARNING)


@app.command()
def card(
    model: Annotated[Path, typer.Argument(help="A model folder with a genecorpus_model.json.")],
) -> None:
    """(Re)write MODEL/README.md, the model card, from MODEL/genecorpus_model.json.

    Every figure of the card is read from genecorpus_model.json. Example:

        genecorpus card pbmc-model
    """
    from genecorpus.model.bert import MODEL_INFO, model_info
    from genecorpus.model.card import write_model_card

    try:
        info = model_info(model)
        if not info:
            msg = f"{model}: has no {MODEL_INFO}; give a model folder written by genecorpus pretrain or finetune"
            raise InputError(msg)
        path = write_model_card(model, info, name=model.resolve().name)
    except GenecorpusError as e:
        _fail(e)
    typer.echo(f"wrote {path}")

def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that caused ``e`` (through typer's ``Exit(130)``), if any."""
    seen: BaseException | None = e
    for _ in range(4):
        if seen is None or isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def main() -> None:
    """Entry point of the ``genecorpus`` console script.

    A fault of the machine that a command did not word itself (a full disk, an unwritable folder, no
    memory) and Ctrl-C end with one line too; ``--debug`` shows the traceback.
    """
    from genecorpus.errors import environment_fault

    try:
        app()
    except SystemExit as e:  # typer turns Ctrl-C into a silent exit 130; say what it left
        interrupt = _interrupt_behind(e)
        if interrupt is None or _state["debug"]:
            raise
        notes = getattr(interrupt, "__notes__", [])
        _err.print(escape(": ".join(["interrupted", "; ".join(notes)]) if notes else "interrupted"),
                   highlight=False, soft_wrap=True)
        sys.exit(130)
    except (OSError, MemoryError) as e:
        if _state["debug"] or isinstance(e, GenecorpusError):
            raise
        _err.print(f"[bold red]error:[/] {escape(environment_fault(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
