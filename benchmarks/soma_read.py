"""What building from a local TileDB-SOMA experiment costs, against the same cells in h5ad files, in one run.

Usage::

    .venv/bin/python benchmarks/soma_read.py                        # 100k cells, 1 and 2 workers
    .venv/bin/python benchmarks/soma_read.py --cells 20000 --workers 2 --runs 1

The inputs are written once to ``<cache-dir>/soma-<size>/`` (``--cache-dir`` or ``$GENECORPUS_BENCH_DIR``;
default ``benchmarks/.cache/``): ten h5ad files of ``cells / 10`` cells each (``genecorpus.testing.random_counts``
over 20,000 candidate genes and the 13 chrM genes, ~1,100 nonzeros per cell as in 10x PBMC data, float32 CSR
counts as the Census and ``from_h5ad`` store them; obs ``dataset_id`` = the file, ``tissue_general`` 80 %
``blood``, ``is_primary_data``), and one SOMA experiment made from them with ``tiledbsoma.io.from_h5ad``
(registered, appended file after file, as the Census holds its source datasets).

Measured, each build a ``genecorpus build --no-report --workers W`` subprocess (best of ``--runs``):

- ``h5ad``: the ten files, ids ``synthetic/<file>``;
- ``soma``: the experiment, split by its ``dataset_id`` (the default): the same ten datasets, the same cells;
  its shards must be those of ``h5ad`` (checked);
- ``soma filtered``: the experiment with ``value_filter = 'tissue_general == "blood"'`` (80 % of the cells).

Printed and written to ``benchmarks/soma_read.json``: wall seconds, input cells per second, seconds per
million cells (extrapolated linearly: every pass reads its cells in bounded blocks), the ratio soma / h5ad,
peak RSS of the process tree, and the stored bytes per cell of the experiment's X (what a remote read moves).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from genecorpus import genes
from genecorpus.corpus.folder import MANIFEST
from genecorpus.corpus.manifest import Manifest
from genecorpus.testing import random_counts, write_h5ad

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure

REPO = Path(__file__).resolve().parents[1]
N_FILES = 10
N_GENES = 20_000
NONZEROS_PER_CELL = 1_100
BLOOD = 'tissue_general == "blood"'


def _write_inputs(folder: Path, n_cells: int) -> tuple[list[Path], Path]:
    """The ten h5ad files and the experiment made from them (written once; reused when complete)."""
    files = [folder / f"d{i}.h5ad" for i in range(N_FILES)]
    experiment = folder / "experiment"
    done = folder / "inputs.json"
    stamp = {"cells": n_cells, "files": N_FILES, "genes": N_GENES, "nonzeros_per_cell": NONZEROS_PER_CELL}
    if done.is_file() and json.loads(done.read_text()) == stamp:
        return files, experiment
    import shutil

    import tiledbsoma.io

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    candidates, mito = genes.candidate_genes(), genes.mito_genes()
    gene_ids = np.concatenate([candidates[~np.isin(candidates, mito)][:N_GENES], mito]).astype(object)
    per_file = n_cells // N_FILES
    t0 = time.perf_counter()
    for i, path in enumerate(files):
        counts = random_counts(per_file, len(gene_ids), density=NONZEROS_PER_CELL / len(gene_ids), seed=i)
        rng = np.random.default_rng(100 + i)
        obs = {"dataset_id": np.full(per_file, path.stem, dtype=object),
               "tissue_general": np.where(rng.random(per_file) < 0.8, "blood", "lung").astype(object),
               "is_primary_data": rng.random(per_file) < 0.97}
        write_h5ad(path, counts, cell_ids=np.array([f"{path.stem}-{j}" for j in range(per_file)], dtype=object),
                   gene_ids=gene_ids, obs=obs)
        print(f"wrote {path.name} ({counts.nnz:,} nonzeros)", flush=True)
    mapping = tiledbsoma.io.register_h5ads(None, [str(f) for f in files], measurement_name="RNA",
                                           obs_field_name="obs_id", var_field_name="var_id")
    for i, path in enumerate(files):
        tiledbsoma.io.from_h5ad(str(experiment), str(path), "RNA", registration_mapping=mapping)
        if i == 0:
            mapping.prepare_experiment(str(experiment))
        print(f"ingested {path.name} into {experiment.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    done.write_text(json.dumps(stamp))
    return files, experiment


def _manifests(folder: Path, files: list[Path], experiment: Path) -> dict[str, Path]:
    entries = {
        "h5ad": "".join(f'[[datasets]]\npath = "{f}"\nid = "synthetic/{f.stem}"\ngene_id = "ensembl"\n' for f in files),
        "soma": f'[[datasets]]\npath = "{experiment}"\nid = "synthetic"\ngene_id = "ensembl"\n',
        "soma filtered": (f'[[datasets]]\npath = "{experiment}"\nid = "synthetic"\ngene_id = "ensembl"\n'
                          f"value_filter = '{BLOOD}'\n"),
    }
    paths = {}
    for name, text in entries.items():
        paths[name] = folder / f"{name.replace(' ', '-')}.toml"
        paths[name].write_text(text)
    return paths


def _shards(corpus: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(corpus.glob("*.arrow")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _build(manifest: Path, out: Path, workers: int, log: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "genecorpus", "build", str(manifest), "--out", str(out), "--overwrite",
            "--no-report", "--workers", str(workers)]
    result = measure.run_monitored(argv, env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"}, log_path=log)
    if not result.ok:
        msg = f"{' '.join(argv)} failed:\n{result.stderr_tail}"
        raise SystemExit(msg)
    m = Manifest.read(out / MANIFEST)
    n_in = sum(d.cells.n_in for d in m.datasets)
    return {"wall_seconds": result.wall_seconds, "peak_rss_bytes": result.peak_rss_bytes, "cells_in": n_in,
            "cells_per_second": n_in / result.wall_seconds, "seconds_per_million": result.wall_seconds / n_in * 1e6,
            "timings": m.timings, "shards": _shards(out)}


def _stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000, help="cells in all (default 100,000)")
    parser.add_argument("--workers", default="1,2", help="worker counts (default 1,2)")
    parser.add_argument("--runs", type=int, default=1, help="runs per build (best of; default 1)")
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "GENECORPUS_BENCH_DIR", REPO / "benchmarks" / ".cache")))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "soma_read.json")
    args = parser.parse_args()

    folder = args.cache_dir.resolve() / f"soma-{args.cells}"
    files, experiment = _write_inputs(folder, args.cells)
    manifests = _manifests(folder, files, experiment)
    x_bytes = _stored_bytes(experiment / "ms" / "RNA" / "X")
    results: dict[str, Any] = {"machine": measure.machine_info(REPO), "cells": args.cells, "files": N_FILES,
                               "experiment_x_bytes": x_bytes, "x_bytes_per_cell": x_bytes / args.cells,
                               "h5ad_bytes": sum(f.stat().st_size for f in files), "builds": {}}
    print(f"experiment X: {x_bytes / 1e6:,.0f} MB stored, {x_bytes / args.cells:,.0f} bytes per cell; "
          f"h5ad files: {results['h5ad_bytes'] / 1e6:,.0f} MB")
    for workers in [int(w) for w in args.workers.split(",")]:
        for name, manifest in manifests.items():
            runs = [_build(manifest, folder / "corpus", workers, folder / "build.log") for _ in range(args.runs)]
            best = min(runs, key=lambda r: r["wall_seconds"])
            results["builds"][f"{name}, {workers} workers"] = best
            print(f"{name:14s} {workers} workers: {best['wall_seconds']:7.1f} s, {best['cells_per_second']:7,.0f} "
                  f"cells/s, {best['seconds_per_million'] / 60:6.1f} min per million cells, peak RSS "
                  f"{best['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)
        h5ad, soma = results["builds"][f"h5ad, {workers} workers"], results["builds"][f"soma, {workers} workers"]
        ratio = soma["wall_seconds"] / h5ad["wall_seconds"]
        results["builds"][f"soma / h5ad, {workers} workers"] = {"ratio": ratio,
                                                                "same_shards": soma["shards"] == h5ad["shards"]}
        print(f"soma / h5ad, {workers} workers: {ratio:.2f}x; same shards: {soma['shards'] == h5ad['shards']}")
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
