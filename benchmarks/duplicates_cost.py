"""What duplicate detection costs: the same build with ``--duplicates keep`` (no fingerprints, no
candidates, no verification) and ``--duplicates drop`` (the default), alternated, in one run.

Usage::

    .venv/bin/python benchmarks/duplicates_cost.py                 # kang, synthetic 100k, 100k twice
    .venv/bin/python benchmarks/duplicates_cost.py --sizes 20k --runs 1 --scenarios once

Scenarios:

- ``kang``: the ``make example`` manifest (4 real datasets, 17,558 cells, 1,344 of them copies of
  cells of an earlier dataset);
- ``synthetic <n>``: one synthetic dataset (``synthetic.py``; no cell twice) — the common case;
- ``synthetic <n> twice``: the same file listed twice (``allow_repeated_files = true``): every cell of the
  second is a copy, the worst case for the candidate and verification stages.

Each build runs as ``genecorpus build --no-report --workers W`` in a subprocess; the wall time of each
policy is the median of ``--runs`` alternated runs. Also printed: the ``duplicates`` stage of the
manifest's timings, and whether ``keep`` and ``drop`` gave the same shards where no copy exists. The
issue's target is at most 15 % more time. Results go to ``benchmarks/duplicates_cost.json``.
Synthetic inputs need Geneformer's dictionaries (``--dict-dir``, as ``run.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from genecorpus.corpus.folder import MANIFEST
from genecorpus.corpus.manifest import Manifest
from genecorpus.public_data import link_public_files

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import synthetic

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.15
KANG_FILES = ("kang_pbmc_ctrl", "kang_pbmc_stim", "kang_pbmc_control", "celltypist_sample")


def _shard_digest(corpus: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(corpus.glob("*.arrow")):
        h.update(p.read_bytes())
    return h.hexdigest()


def _synthetic_manifest(folder: Path, path: Path, *, twice: bool) -> Path:
    entry = f'[[datasets]]\npath = {json.dumps(str(path))}\ngene_id = "ensembl"\n'
    text = ("allow_repeated_files = true\n" + entry + entry.replace("[[datasets]]", '[[datasets]]\nid = "again"')
            if twice else entry)
    toml = folder / f"{path.stem}{'-twice' if twice else ''}.toml"
    toml.write_text(text)
    return toml


def _run(cli: list[str], manifest: Path, out: Path, policy: str, workers: int, log: Path) -> dict[str, Any]:
    argv = [*cli, "build", str(manifest), "--out", str(out), "--overwrite", "--no-report",
            "--workers", str(workers), "--duplicates", policy]
    result = measure.run_monitored(argv, env={**os.environ, "GENECORPUS_NO_PROGRESS": "1"}, log_path=log)
    if not result.ok:
        msg = f"{' '.join(argv)} failed:\n{result.stderr_tail}"
        raise SystemExit(msg)
    m = Manifest.read(out / MANIFEST)
    return {"wall_seconds": result.wall_seconds, "peak_rss_bytes": result.peak_rss_bytes,
            "duplicates_stage_seconds": m.timings.get("duplicates", 0.0),
            "n_dropped": m.duplicates.n_dropped if m.duplicates else 0,
            "n_cells": m.corpus.n_cells, "shards": _shard_digest(out)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100k", help="synthetic sizes (default 100k; '' for none)")
    parser.add_argument("--runs", type=int, default=3, help="runs per policy (median; default 3)")
    parser.add_argument("--scenarios", default="kang,once,twice", help="which of kang, once, twice (default all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "GENECORPUS_BENCH_DIR", REPO / "benchmarks" / ".cache")))
    parser.add_argument("--dict-dir", type=Path, default=Path(os.environ.get(
        "GENECORPUS_GENEFORMER_DICTS", REPO.parent / "shared" / "geneformer-dicts")))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "duplicates_cost.json")
    args = parser.parse_args()

    work = args.cache_dir.resolve() / "duplicates"
    work.mkdir(parents=True, exist_ok=True)
    scenarios: list[tuple[str, Path, bool]] = []  # name, manifest, has copies
    wanted = {s.strip() for s in args.scenarios.split(",")}
    if "kang" in wanted:
        link_public_files(KANG_FILES, REPO / "examples" / "data")
        scenarios.append(("kang (4 real datasets)", REPO / "examples" / "kang_pretrain.toml", True))
    for label in [s.strip() for s in args.sizes.split(",") if s.strip()]:
        from genecorpus.public_data import fetch_public_file

        n = int(float(label.rstrip("kKmM")) * (1_000_000 if label[-1] in "mM" else 1000))
        data = synthetic.ensure_dataset(n, args.cache_dir.resolve(), vocab=synthetic.load_vocabulary(args.dict_dir),
                                        dict_dir=args.dict_dir,
                                        reference=lambda: fetch_public_file("kang_pbmc_ctrl"), log=print)
        h5ad = data.paths["h5ad"]
        if "once" in wanted:
            scenarios.append((f"synthetic {label}", _synthetic_manifest(work, h5ad, twice=False), False))
        if "twice" in wanted:
            scenarios.append((f"synthetic {label} twice", _synthetic_manifest(work, h5ad, twice=True), True))

    cli = [sys.executable, "-m", "genecorpus"]
    results: dict[str, Any] = {"machine": measure.machine_info(REPO), "runs": args.runs, "workers": args.workers,
                               "scenarios": {}}
    table = Table(title=f"duplicate detection: build time, drop / keep (median of {args.runs}, "
                        f"{args.workers} workers)")
    for col in ("scenario", "cells", "keep s", "drop s", "drop / keep", "duplicates stage s", "dropped",
                "peak RSS keep / drop GB", "target ≤ 1.15"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for name, manifest, has_copies in scenarios:
        runs: dict[str, list[dict[str, Any]]] = {"keep": [], "drop": []}
        out = work / "corpus"
        for i in range(args.runs):
            for policy in ("keep", "drop") if i % 2 == 0 else ("drop", "keep"):
                print(f"{name}: {policy} run {i + 1}/{args.runs}", flush=True)
                runs[policy].append(_run(cli, manifest, out, policy, args.workers, work / "build.log"))
        shutil.rmtree(out, ignore_errors=True)
        keep = statistics.median(r["wall_seconds"] for r in runs["keep"])
        drop = statistics.median(r["wall_seconds"] for r in runs["drop"])
        stage = statistics.median(r["duplicates_stage_seconds"] for r in runs["drop"])
        same = runs["keep"][0]["shards"] == runs["drop"][0]["shards"]
        if not has_copies and not same:
            print(f"! {name}: keep and drop gave different shards although no copy exists")
        ratio = drop / keep
        results["scenarios"][name] = {"keep": runs["keep"], "drop": runs["drop"], "ratio": ratio,
                                      "same_shards": same}
        rss = [max(r["peak_rss_bytes"] for r in runs[p]) / 1e9 for p in ("keep", "drop")]
        table.add_row(name, f"{runs['keep'][0]['n_cells']:,}", f"{keep:.1f}", f"{drop:.1f}", f"{ratio:.3f}",
                      f"{stage:.1f}", f"{runs['drop'][0]['n_dropped']:,}", f"{rss[0]:.2f} / {rss[1]:.2f}",
                      "met" if ratio <= TARGET else "NOT met")
    Console().print(table)
    args.output.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"results: {args.output}")


if __name__ == "__main__":
    main()
