"""Speed of ``genecorpus embed`` and ``genecorpus perturb`` with randomly initialised preset models.

Usage::

    .venv/bin/python benchmarks/embed_speed.py CORPUS [--presets tiny,small] [--cells 300]
        [--batch-sizes 16] [--perturb-gene CD74]

Random weights run exactly as fast as trained ones, so no pretraining is needed. Each preset's model is
built with ``torch.manual_seed(0)`` for the corpus's dictionary and saved to a temporary folder; the
first ``--cells`` cells are embedded once for warm-up (excluded) and once timed. Prints cells/s and
tokens/s (special tokens included) per preset and batch size, and for perturbation (two forward passes
per changed cell) cells/s over the cells that hold the gene.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--batch-sizes", default="16")
    parser.add_argument("--perturb-gene", default="CD74")
    args = parser.parse_args()
    os.environ.setdefault("GENECORPUS_NO_PROGRESS", "1")

    import torch
    from transformers import BertForMaskedLM

    from genecorpus.corpus import CorpusReader
    from genecorpus.model.bert import bert_config, save_model
    from genecorpus.model.embed import embed_corpus, quiet_transformers
    from genecorpus.model.perturb import perturb

    quiet_transformers()
    reader = CorpusReader.open(args.corpus)
    rows = np.arange(min(args.cells, reader.n_cells))
    n_tokens = int(reader.lengths[rows].sum())
    print(f"corpus {args.corpus}: {len(rows)} cells, {n_tokens / len(rows):.0f} tokens/cell on average; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            torch.manual_seed(0)
            model = save_model(BertForMaskedLM(bert_config(preset, reader.token_dictionary, max_positions=4096)),
                               Path(tmp) / preset, reader.token_dictionary)
            embed_corpus(args.corpus, model, out=Path(tmp) / "warm.h5ad", cells=rows[:8], device="cpu")
            for batch_size in (int(b) for b in args.batch_sizes.split(",")):
                started = time.perf_counter()
                embed_corpus(args.corpus, model, out=Path(tmp) / "e.h5ad", cells=rows, batch_size=batch_size,
                             device="cpu")
                seconds = time.perf_counter() - started
                print(f"embed   {preset:<6} batch {batch_size:>3}: {len(rows) / seconds:7.1f} cells/s "
                      f"{n_tokens / seconds:9.0f} tokens/s ({seconds:.1f} s)")
            started = time.perf_counter()
            result = perturb(Path(tmp) / "e.h5ad", model, genes=[args.perturb_gene], mode="delete", device="cpu")
            seconds = time.perf_counter() - started
            n_changed = int(result.cells["changed"].sum())
            print(f"perturb {preset:<6} delete {args.perturb_gene}: {n_changed} of {len(rows)} cells changed, "
                  f"{n_changed / seconds:.1f} changed cells/s ({seconds:.1f} s)")


if __name__ == "__main__":
    main()
