"""Benchmark genecorpus against the plain read of its input and against Geneformer's NumPy encoding.

Usage::

    make bench                      # 100k and 1M cells (generated once, cached)
    make bench QUICK=1              # 20k cells, for development
    .venv/bin/python benchmarks/run.py --sizes 100k --workers 1,2 --formats h5ad_gzip

For each size it measures, in one run: the read floor (h5py, 10k-cell blocks) of every file;
``genecorpus tokenize`` with Geneformer's gc30M dictionaries and ``genecorpus build`` end to end as
subprocesses (wall time, cells/s, tokens/s, peak RSS of the process tree, CPU time) with 1 and 2
workers; the encoding kernel ``genecorpus.encode.rank_value_encode`` on one core on an in-memory
10k-cell block, against a straightforward SciPy/NumPy encoding (Geneformer's per-cell argsort).
It prints tables with ratios (x floor, x baseline, 2 workers / 1 worker) and the issue's targets,
and writes everything with the machine description to ``benchmarks/results.json``
(``results-quick.json`` in quick mode).

Synthetic inputs live in ``$GENECORPUS_BENCH_DIR`` (default ``benchmarks/.cache``); see
``synthetic.py`` for how they are made. Geneformer's dictionaries are read from
``$GENECORPUS_GENEFORMER_DICTS`` (default ``../shared/geneformer-dicts`` next to the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from rich.console import Console
from rich.table import Table

from genecorpus.corpus.folder import MANIFEST
from genecorpus.corpus.manifest import Manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import measure
import synthetic

if TYPE_CHECKING:
    from collections.abc import Callable

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_SIZES = "100k,1M"
QUICK_SIZES = "20k"
WARMUP_CELLS = 2048
"""Cells of the tiny dataset every command runs on once before timing (Numba caches, imports)."""
KERNEL_CELLS = 10_000
MAX_GENES = 2048
OUTPUT_BYTES_PER_CELL = 6000
"""Conservative disk space a corpus written from one cell takes while it is being built."""

FORMAT_LABELS = {"h5ad": "h5ad", "h5ad_gzip": "h5ad gzip", "loom": "loom"}
CONTENDED_NOTE = f"! other processes used > {measure.QUIET_OTHER_CORES} cores meanwhile"

# The targets.
TARGET_SIZE = 1_000_000
TOKENIZE_CELLS_PER_S = 20_000
TOKENIZE_X_FLOOR = 2.0
KERNEL_TOKENS_PER_S = 15e6
MEDIANS_X_FLOOR = 2.5
BUILD_X_FLOOR = 5.0
BUILD_RSS_BYTES = 1.5e9
RSS_SIZE_TOLERANCE = 0.10
WORKER_SPEEDUP = 1.8


def parse_size(text: str) -> int:
    """``"100k"`` → 100000, ``"1M"`` → 1000000, ``"2048"`` → 2048."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if scale > 1 else t) * scale)


def gb(n: float) -> str:
    """Bytes as GB with two decimals."""
    return f"{n / 1e9:.2f} GB"


def log(message: str) -> None:
    """A timestamped progress line."""
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


@dataclass
class Target:
    """One of the issue's targets and what was measured for it."""

    name: str
    goal: str
    measured: str
    where: str
    met: bool | None
    """None: not measurable in this run."""
    proxy: bool = False
    """Measured on another size than the target's."""


class Benchmark:
    """One benchmark run: datasets, measurements, targets, report."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sizes: list[int] = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        self.formats: list[str] = [f.strip() for f in args.formats.split(",") if f.strip()]
        self.workers: list[int] = [int(w) for w in args.workers.split(",") if w.strip()]
        unknown = [f for f in self.formats if f not in synthetic.FORMATS]
        if unknown:
            msg = f"unknown format {unknown[0]!r}; choose from {', '.join(synthetic.FORMATS)}"
            raise SystemExit(msg)
        self.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        self.cache_dir = Path(args.cache_dir).resolve()
        self.dict_dir = Path(args.dict_dir).resolve()
        self.token_dictionary = self.dict_dir / "token_dictionary_gc30M.pkl"
        self.gene_medians = self.dict_dir / "gene_median_dictionary_gc30M.pkl"
        for p in (self.token_dictionary, self.gene_medians):
            if not p.exists():
                msg = f"{p} not found: set GENECORPUS_GENEFORMER_DICTS or --dict-dir to Geneformer's dictionaries"
                raise SystemExit(msg)
        cli = Path(sys.executable).with_name("genecorpus")
        self.cli = [str(cli)] if cli.exists() else [sys.executable, "-m", "genecorpus"]
        self.env = {**os.environ, "GENECORPUS_NO_PROGRESS": "1"}
        self.runs_dir = self.cache_dir / "runs"
        self.logs_dir = self.cache_dir / "logs"
        self.results: dict[str, Any] = {
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "settings": {"sizes": self.sizes, "formats": self.formats, "workers": self.workers,
                         "skip": sorted(self.skip), "quick": args.quick, "cache_dir": str(self.cache_dir),
                         "runs_per_command": args.runs, "floor_block_cells": measure.FLOOR_BLOCK_CELLS,
                         "kernel_cells": KERNEL_CELLS, "max_genes": MAX_GENES},
            "machine": measure.machine_info(REPO),
            "datasets": {}, "floor": {}, "tokenize": {}, "build": {}, "kernel": {}, "startup": {},
        }
        self.vocab = synthetic.load_vocabulary(self.dict_dir)
        self._warm_source = ""
        """Fingerprint of src/ when the last warm-up ran."""

    # ------------------------------------------------------------------------------------ datasets

    def dataset(self, n_cells: int) -> synthetic.SyntheticDataset:
        """The cached synthetic files of ``n_cells`` cells (generated on first use)."""
        from genecorpus.public_data import fetch_public_file

        return synthetic.ensure_dataset(n_cells, self.cache_dir, vocab=self.vocab, dict_dir=self.dict_dir,
                                        reference=lambda: fetch_public_file("kang_pbmc_ctrl"), log=log)

    def wait_for_quiet(self) -> float:
        """Wait (up to ``--quiet-wait`` s) until other processes leave the CPUs to us; return s waited."""
        if self.args.quiet_wait <= 0:
            return 0.0
        waited = measure.wait_for_quiet(max_wait=self.args.quiet_wait)
        if waited > self.args.quiet_wait - 1:
            log(f"other processes kept the CPUs busy for {waited:.0f} s; measuring anyway (marked '!')")
        elif waited > 2:
            log(f"waited {waited:.0f} s for other processes to leave the CPUs")
        return waited

    def check_disk(self) -> None:
        """Fail early, before generating anything, when the whole run cannot fit on the disk."""
        sizes = [*self.sizes, WARMUP_CELLS]
        inputs = sum(synthetic.estimate_bytes(n) for n in sizes if synthetic.cached_dataset(n, self.cache_dir) is None)
        outputs = OUTPUT_BYTES_PER_CELL * max(sizes)
        log(f"disk: {gb(inputs)} of new inputs + up to {gb(outputs)} of outputs at a time under {self.cache_dir}")
        synthetic.check_free_space(self.cache_dir, inputs + outputs,
                                   f"benchmarking sizes {', '.join(map(synthetic.size_label, self.sizes))}")

    # ------------------------------------------------------------------------------------ commands

    def _manifest_toml(self, path: Path, name: str) -> Path:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        toml = self.runs_dir / f"{name}.toml"
        toml.write_text(f'[[datasets]]\npath = {json.dumps(str(path))}\ngene_id = "ensembl"\n')
        return toml

    def command(self, tool: str, path: Path, workers: int, name: str) -> list[str]:
        """The ``genecorpus tokenize`` or ``genecorpus build`` command line for one input."""
        out = self.runs_dir / name
        if tool == "tokenize":
            return [*self.cli, "tokenize", str(path), "--out", str(out), "--token-dictionary",
                    str(self.token_dictionary), "--gene-medians", str(self.gene_medians), "--no-report",
                    "--workers", str(workers)]
        return [*self.cli, "-v", "build", str(self._manifest_toml(path, name)), "--out", str(out),
                "--no-report", "--workers", str(workers)]

    def run_tool(self, tool: str, path: Path, workers: int, name: str, *, n_cells: int,
                 warming: bool = False) -> dict[str, Any]:
        """Run one command, measure it, read its manifest, delete its output; return the record.

        When ``src/`` changed since the last warm-up (others edit it while we measure), the warm-up is
        run again first, so that Numba recompiling changed kernels is not timed.
        """
        source = measure.source_fingerprint(REPO)
        if not warming and source != self._warm_source:
            log("src/ changed since the warm-up: warming up again")
            self.warm_up()
        out = self.runs_dir / name
        shutil.rmtree(out, ignore_errors=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        argv = self.command(tool, path, workers, name)
        timeout = self.args.timeout or max(900.0, 0.018 * n_cells)
        waited = 0.0 if warming else self.wait_for_quiet()
        load = os.getloadavg()[0]
        result = measure.run_monitored(argv, env=self.env, timeout=timeout, log_path=log_path)
        record: dict[str, Any] = {
            "argv": " ".join(argv), "ok": result.ok, "returncode": result.returncode,
            "timed_out": result.timed_out, "timeout_seconds": timeout,
            "wall_seconds": round(result.wall_seconds, 3), "cpu_seconds": round(result.cpu_seconds, 2),
            "cpu_utilization": round(result.cpu_seconds / result.wall_seconds, 2),
            "peak_rss_bytes": result.peak_rss_bytes, "peak_process_hwm_bytes": result.peak_process_hwm_bytes,
            "max_processes": result.max_processes, "rss_samples": result.n_samples,
            "n_cells_in": n_cells, "cells_per_second": round(n_cells / result.wall_seconds, 1),
            "load_average_before": round(load, 2), "waited_for_quiet_seconds": round(waited, 1),
            "other_cores": round(result.other_cores, 2), "src_sha256": source, "log": str(log_path),
        }
        manifest_path = out / MANIFEST
        if result.ok and manifest_path.exists():
            manifest = Manifest.read(manifest_path)
            record["n_cells_out"] = manifest.corpus.n_cells
            record["n_tokens"] = manifest.corpus.n_tokens
            record["tokens_per_second"] = round(manifest.corpus.n_tokens / result.wall_seconds, 1)
            record["output_bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            record["timings"] = manifest.timings
        elif not result.ok:
            record["stderr_tail"] = result.stderr_tail
            log(f"    FAILED ({'timeout' if result.timed_out else f'exit {result.returncode}'}); "
                f"see {log_path}:\n{result.stderr_tail}")
        shutil.rmtree(out, ignore_errors=True)
        return record

    # -------------------------------------------------------------------------------- measurements

    def measure_startup(self) -> None:
        """Interpreter + import time of the CLI's build module: a fixed cost in every command."""
        argv = [sys.executable, "-c", "import genecorpus.cli, genecorpus.build"]
        best = min(measure.run_monitored(argv, env=self.env).wall_seconds for _ in range(3))
        self.results["startup"] = {"import_seconds": round(best, 3)}
        log(f"startup: python + import genecorpus.build takes {best:.2f} s")

    def warm_up(self) -> None:
        """Run each command once on a tiny file so Numba's on-disk caches are filled before timing."""
        ds = self.dataset(WARMUP_CELLS)
        self._warm_source = measure.source_fingerprint(REPO)
        for fmt in self.formats:
            for tool in ("tokenize", "build"):
                if tool in self.skip:
                    continue
                record = self.run_tool(tool, ds.paths[fmt], 1, f"warmup-{tool}-{fmt}", n_cells=WARMUP_CELLS,
                                       warming=True)
                log(f"warm-up {tool} {FORMAT_LABELS[fmt]}: {record['wall_seconds']:.1f} s"
                    + ("" if record["ok"] else " (failed)"))

    def measure_floor(self, label: str, ds: synthetic.SyntheticDataset) -> None:
        """Plain reads of X for every file (best of three when the file fits comfortably in the page cache)."""
        out = self.results["floor"].setdefault(label, {})
        mem = self.results["machine"]["memory_bytes"] or 0
        for fmt in self.formats:
            path = ds.paths[fmt]
            repeats = 3 if path.stat().st_size < mem / 3 else 1
            self.wait_for_quiet()
            load = os.getloadavg()[0]
            runs, others = [], []
            for _ in range(repeats):
                with measure.OtherLoad() as other:
                    runs.append(measure.read_floor(path, fmt))
                others.append(other.cores)
            best_index = min(range(repeats), key=lambda i: runs[i].seconds)
            best = runs[best_index]
            out[fmt] = {"seconds": round(best.seconds, 3), "all_seconds": [round(r.seconds, 3) for r in runs],
                        "n_cells": best.n_cells, "values_read": best.n_values, "stored_bytes": best.stored_bytes,
                        "cells_per_second": round(best.cells_per_second, 1),
                        "mb_per_second": round(best.mb_per_second, 1), "load_average_before": round(load, 2),
                        "other_cores": round(others[best_index], 2)}
            log(f"[{label}] floor {FORMAT_LABELS[fmt]}: {best.seconds:.2f} s, {best.cells_per_second:,.0f} cells/s, "
                f"{best.mb_per_second:,.0f} MB/s of {best.stored_bytes / 1e6:,.0f} MB")

    def measure_tool(self, tool: str, label: str, ds: synthetic.SyntheticDataset) -> None:
        """``genecorpus tokenize`` or ``build`` on every file with every worker count."""
        synthetic.check_free_space(self.cache_dir, OUTPUT_BYTES_PER_CELL * ds.n_cells, f"the {label} {tool} output")
        out = self.results[tool].setdefault(label, {})
        for fmt in self.formats:
            for workers in self.workers:
                name = f"{label}-{tool}-{fmt}-w{workers}"
                log(f"[{label}] {tool} {FORMAT_LABELS[fmt]}, {workers} worker(s) ...")
                runs = [self.run_tool(tool, ds.paths[fmt], workers, name, n_cells=ds.n_cells)
                        for _ in range(self.args.runs)]
                ok = [r for r in runs if r["ok"]]
                record = min(ok, key=lambda r: r["wall_seconds"]) if ok else runs[-1]
                record["all_wall_seconds"] = [r["wall_seconds"] for r in runs]
                out.setdefault(fmt, {})[str(workers)] = record
                if record["ok"]:
                    log(f"[{label}]   {record['wall_seconds']:.1f} s, {record['cells_per_second']:,.0f} cells/s, "
                        f"peak RSS {gb(record['peak_rss_bytes'])}, CPU {record['cpu_utilization']:.2f}")

    def measure_kernel(self, ds: synthetic.SyntheticDataset) -> None:
        """rank_value_encode vs the SciPy/NumPy baseline on one in-memory block, pinned to one core."""
        # imported here, not at the top: a kernel mid-rewrite must not stop the other measurements
        from genecorpus import encode

        n = min(KERNEL_CELLS, ds.n_cells)
        block = synthetic.read_block(ds.paths["h5ad"], 0, n)
        counts = sp.csr_matrix((block.data.astype(np.int64), block.indices, block.indptr),
                               shape=(n, self.vocab.n_genes))
        depth = block.n_counts.astype(np.float64)
        inputs: dict[str, Any] = {"depth": depth, "medians": self.vocab.medians, "tokens": self.vocab.tokens,
                                  "max_genes": MAX_GENES}
        record: dict[str, Any] = {"n_cells": n, "nnz": int(counts.nnz), "source": str(ds.paths["h5ad"])}
        self.wait_for_quiet()
        with measure.single_core() as cpu, measure.OtherLoad() as other:
            record["cpu"] = cpu
            try:
                # the rank order is prepared once per corpus (as build/tokenize do), not per block
                order = encode.RankOrder.from_genes(self.vocab.medians, self.vocab.tokens)
                order.positions(reciprocal=False)
                ours_inputs = {"depth": depth, "order": order, "max_genes": MAX_GENES}
                ours = encode.rank_value_encode(counts, **ours_inputs)
                times = measure.time_repeated(lambda: encode.rank_value_encode(counts, **ours_inputs),
                                              repeats=self.args.repeats)
            except Exception as e:  # noqa: BLE001 - the kernel is being rewritten; report, do not crash
                record["error"] = f"{type(e).__name__}: {e}"
                log(f"kernel: rank_value_encode failed: {record['error']}")
                ours, times = None, []
            base = measure.baseline_rank_value_encode(counts, **inputs)
            base_times = measure.time_repeated(lambda: measure.baseline_rank_value_encode(counts, **inputs),
                                               repeats=max(3, self.args.repeats // 2), min_seconds=1.0)
        record["other_cores"] = round(other.cores, 2)
        n_tokens = int(base[1].sum())
        record["baseline"] = self._timing(base_times, n_tokens, counts.nnz)
        if ours is not None:
            n_ours = int(np.asarray(ours[1]).sum())
            record["genecorpus"] = self._timing(times, n_ours, counts.nnz)
            record["speedup_vs_baseline"] = round(float(np.median(base_times) / np.median(times)), 2)
            record["cells_identical_to_baseline"] = round(measure.identical_cells(
                (np.asarray(ours[0]), np.asarray(ours[1])), base), 5)
            log(f"kernel: {record['genecorpus']['tokens_per_second'] / 1e6:.1f} M tokens/s on one core, "
                f"{record['speedup_vs_baseline']:.1f}x the baseline "
                f"({record['baseline']['tokens_per_second'] / 1e6:.2f} M tokens/s); "
                f"{record['cells_identical_to_baseline']:.2%} of cells identical")
        self.results["kernel"] = record

    @staticmethod
    def _timing(times: list[float], n_tokens: int, nnz: int) -> dict[str, Any]:
        med = float(np.median(times))
        return {"repeats": len(times), "best_seconds": round(min(times), 5), "median_seconds": round(med, 5),
                "n_tokens": n_tokens, "tokens_per_second": round(n_tokens / med, 1),
                "nonzeros_per_second": round(nnz / med, 1)}

    # ------------------------------------------------------------------------------------- ratios

    def _floor_seconds(self, label: str, fmt: str) -> float | None:
        rec = self.results["floor"].get(label, {}).get(fmt)
        return rec["seconds"] if rec else None

    def add_ratios(self) -> None:
        """x floor and 2-workers-over-1 ratios on every tool record."""
        for tool in ("tokenize", "build"):
            for label, by_fmt in self.results[tool].items():
                for fmt, by_workers in by_fmt.items():
                    floor = self._floor_seconds(label, fmt)
                    one = by_workers.get("1")
                    for w, rec in by_workers.items():
                        if not rec["ok"]:
                            continue
                        if floor:
                            rec["x_floor"] = round(rec["wall_seconds"] / floor, 2)
                        medians = _median_seconds(rec.get("timings"))
                        if medians is not None:
                            rec["median_seconds"] = round(medians, 3)
                            if floor:
                                rec["medians_x_floor"] = round(medians / floor, 2)
                        if one and one["ok"] and w != "1":
                            rec["speedup_vs_1_worker"] = round(one["wall_seconds"] / rec["wall_seconds"], 2)

    # ------------------------------------------------------------------------------------- targets

    def _pick(self, tool: str, fmt: str, workers: str) -> tuple[str, dict[str, Any]] | None:
        """The record at the target size, else at the largest measured size."""
        labels = [synthetic.size_label(n) for n in [TARGET_SIZE, *sorted(self.sizes, reverse=True)]]
        for label in labels:
            rec = self.results[tool].get(label, {}).get(fmt, {}).get(workers)
            if rec and rec["ok"]:
                return label, rec
        return None

    @staticmethod
    def _target(name: str, goal: str, picked: tuple[str, dict[str, Any]] | None, *, key: str,
                show: Callable[[float], str], met: Callable[[float], bool], where: str) -> Target:
        """A target evaluated on ``picked[1][key]`` (n/a when nothing was measured)."""
        if picked is None or picked[1].get(key) is None:
            return Target(name, goal, "n/a", where, None)
        label, rec = picked
        value = float(rec[key])
        return Target(name, goal, show(value), f"{label} {where}", met(value),
                      proxy=label != synthetic.size_label(TARGET_SIZE))

    def targets(self) -> list[Target]:
        """Evaluate the issue's targets on what was measured."""
        target_label = synthetic.size_label(TARGET_SIZE)
        times = lambda v: f"{v:.2f}x"  # noqa: E731
        out = [
            self._target(f"tokenize throughput ({FORMAT_LABELS[fmt]})", f">= {TOKENIZE_CELLS_PER_S:,} cells/s",
                         self._pick("tokenize", fmt, "2"), key="cells_per_second",
                         show=lambda v: f"{v:,.0f} cells/s", met=lambda v: v >= TOKENIZE_CELLS_PER_S,
                         where=f"{FORMAT_LABELS[fmt]}, 2 workers")
            for fmt in ("h5ad", "h5ad_gzip")
        ]
        out.append(self._target("tokenize vs read floor", f"<= {TOKENIZE_X_FLOOR}x floor",
                                self._pick("tokenize", "h5ad_gzip", "2"), key="x_floor", show=times,
                                met=lambda v: v <= TOKENIZE_X_FLOOR, where="h5ad gzip, 2 workers"))
        kernel = self.results["kernel"].get("genecorpus")
        out.append(Target("encoding kernel", f">= {KERNEL_TOKENS_PER_S / 1e6:.0f}M tokens/s/core",
                          f"{kernel['tokens_per_second'] / 1e6:.1f}M tokens/s" if kernel else "n/a",
                          f"{self.results['kernel'].get('n_cells', 0):,}-cell block, 1 core",
                          kernel["tokens_per_second"] >= KERNEL_TOKENS_PER_S if kernel else None))
        out.append(self._target("exact medians vs read floor", f"<= {MEDIANS_X_FLOOR}x floor",
                                self._pick("build", "h5ad_gzip", "2"), key="medians_x_floor", show=times,
                                met=lambda v: v <= MEDIANS_X_FLOOR, where="h5ad gzip, 2 workers"))
        if out[-1].met is None:
            out[-1].measured = "n/a (build reports no stage timings)"
        out.append(self._target("full build vs read floor", f"<= {BUILD_X_FLOOR}x floor",
                                self._pick("build", "h5ad_gzip", "2"), key="x_floor", show=times,
                                met=lambda v: v <= BUILD_X_FLOOR, where="h5ad gzip, 2 workers"))
        largest = synthetic.size_label(max(self.sizes)) if self.sizes else ""
        out.append(self._target("build peak RSS", f"<= {BUILD_RSS_BYTES / 1e9:.1f} GB",
                                self._peak_build_rss(target_label) or self._peak_build_rss(largest),
                                key="peak_rss_bytes", show=gb, met=lambda v: v <= BUILD_RSS_BYTES,
                                where="h5ad gzip, max over workers"))
        small = self._peak_build_rss(synthetic.size_label(100_000))
        large = self._peak_build_rss(target_label)
        goal = f"100k within +/-{RSS_SIZE_TOLERANCE:.0%} of 1M"
        if small and large:
            ratio = small[1]["peak_rss_bytes"] / large[1]["peak_rss_bytes"]
            out.append(Target("build RSS independent of size", goal, f"100k/1M = {ratio:.2f}", "h5ad gzip",
                              abs(ratio - 1) <= RSS_SIZE_TOLERANCE))
        else:
            out.append(Target("build RSS independent of size", goal, "n/a (needs 100k and 1M)", "", None))
        out.extend(
            self._target(f"{tool}: 2 workers vs 1", f">= {WORKER_SPEEDUP}x", self._pick(tool, "h5ad_gzip", "2"),
                         key="speedup_vs_1_worker", show=times, met=lambda v: v >= WORKER_SPEEDUP,
                         where="h5ad gzip")
            for tool in ("tokenize", "build")
        )
        return out

    def _peak_build_rss(self, label: str) -> tuple[str, dict[str, Any]] | None:
        by_workers = self.results["build"].get(label, {}).get("h5ad_gzip", {})
        ok = [r for r in by_workers.values() if r["ok"]]
        if not ok:
            return None
        return label, max(ok, key=lambda r: r["peak_rss_bytes"])

    # ---------------------------------------------------------------------------------------- run

    def run(self) -> None:
        """Generate, measure, report."""
        m = self.results["machine"]
        log(f"machine: {m['cpu_model']}, {m['usable_cpus']} CPUs, {gb(m['memory_bytes'])} RAM; "
            f"genecorpus {m['versions']['genecorpus']} at {m['git_commit'][:10]}"
            + (f" + uncommitted changes in {len(m['uncommitted_src_changes'])} src files"
               if m["uncommitted_src_changes"] else ""))
        self.check_disk()
        datasets = {}
        for n in self.sizes:
            ds = self.dataset(n)
            datasets[n] = ds
            self.results["datasets"][synthetic.size_label(n)] = {
                **ds.info, "paths": {k: str(p) for k, p in ds.paths.items()}}
        if "startup" not in self.skip:
            self.measure_startup()
        if "kernel" not in self.skip and self.sizes:
            self.measure_kernel(datasets[min(self.sizes)])
        if not {"tokenize", "build"} <= self.skip:
            self.warm_up()
        for n in self.sizes:
            label, ds = synthetic.size_label(n), datasets[n]
            if "floor" not in self.skip:
                self.measure_floor(label, ds)
            for tool in ("tokenize", "build"):
                if tool not in self.skip:
                    self.measure_tool(tool, label, ds)
            self.add_ratios()
            self.save()  # keep what is measured even if a later size fails
        self.add_ratios()
        self.results["targets"] = [asdict(t) for t in self.targets()]
        end = measure.repository_state(REPO)
        self.results["repository_at_end"] = end
        if end["src_sha256"] != self.results["machine"]["src_sha256"]:
            self.results["src_changed_during_run"] = True
            log("WARNING: src/ changed while the benchmark ran (commit "
                f"{self.results['machine']['git_commit'][:10]} -> {end['git_commit'][:10]}); "
                "the measurements mix code versions")
        self.results["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
        self.save()
        print_tables(self.results)
        log(f"results written to {self.args.output}")

    def save(self) -> None:
        """Write the results JSON."""
        Path(self.args.output).write_text(json.dumps(self.results, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    msg = f"not JSON serializable: {type(value).__name__}"
    raise TypeError(msg)


def _median_seconds(timings: dict[str, Any] | None) -> float | None:
    """Seconds of the median stages in a manifest's ``timings`` ({stage: seconds}), if any."""
    if not timings:
        return None
    stages = [float(v) for k, v in timings.items() if "median" in k.lower() and isinstance(v, int | float)]
    return sum(stages) if stages else None


# ------------------------------------------------------------------------------------------ tables


def _floor_table(results: dict[str, Any]) -> Table:
    table = Table(title="Read floor: h5py, 10k-cell blocks", title_justify="left")
    for col in ("size", "file", "X on disk", "seconds", "cells/s", "MB/s"):
        table.add_column(col, justify="left" if col in {"size", "file"} else "right")
    for label, by_fmt in results["floor"].items():
        for fmt, r in by_fmt.items():
            table.add_row(label, FORMAT_LABELS[fmt] + ("!" if _contended(r) else ""),
                          f"{r['stored_bytes'] / 1e6:,.0f} MB", f"{r['seconds']:.2f}",
                          f"{r['cells_per_second']:,.0f}", f"{r['mb_per_second']:,.0f}")
    if any(_contended(r) for by_fmt in results["floor"].values() for r in by_fmt.values()):
        table.caption = CONTENDED_NOTE
    return table


def _tool_row(tool: str, r: dict[str, Any]) -> list[str]:
    if not r["ok"]:
        return ["timeout" if r["timed_out"] else f"failed ({r['returncode']})", *[""] * 7]
    if tool == "tokenize":
        middle = f"{r['tokens_per_second'] / 1e6:.2f}" if r.get("tokens_per_second") else "-"
    else:
        middle = f"{r['median_seconds']:.1f}" if "median_seconds" in r else "n/a"
        if "medians_x_floor" in r:
            middle += f" ({r['medians_x_floor']:.1f}x)"
    return [f"{r['wall_seconds']:.1f}", f"{r['cells_per_second']:,.0f}", middle, gb(r["peak_rss_bytes"]),
            str(r["max_processes"]), f"{r['cpu_utilization']:.2f}", f"{r['x_floor']:.2f}x" if "x_floor" in r else "-",
            f"{r['speedup_vs_1_worker']:.2f}x" if "speedup_vs_1_worker" in r else ""]


def _tool_table(results: dict[str, Any], tool: str) -> Table:
    table = Table(title=f"genecorpus {tool} (end to end, subprocess)", title_justify="left")
    middle = "M tokens/s" if tool == "tokenize" else "medians s (x floor)"
    for col in ("size", "file", "workers", "wall s", "cells/s", middle, "peak RSS", "procs", "CPU/wall",
                "x floor", "2w / 1w"):
        table.add_column(col, justify="left" if col in {"size", "file"} else "right")
    start = results["machine"].get("src_sha256")
    for label, by_fmt in results[tool].items():
        for fmt, by_workers in by_fmt.items():
            for w, r in by_workers.items():
                marker = ("*" if r.get("src_sha256", start) != start else "") + ("!" if _contended(r) else "")
                table.add_row(label, FORMAT_LABELS[fmt], w + marker, *_tool_row(tool, r))
    records = [r for by_fmt in results[tool].values() for by_workers in by_fmt.values() for r in by_workers.values()]
    notes = []
    if any(r.get("src_sha256", start) != start for r in records):
        notes.append("* measured after src/ changed during the run")
    if any(_contended(r) for r in records):
        notes.append(CONTENDED_NOTE)
    table.caption = "; ".join(notes) or None
    return table


def _contended(record: dict[str, Any]) -> bool:
    return float(record.get("other_cores", 0.0)) > measure.QUIET_OTHER_CORES


def _kernel_table(k: dict[str, Any]) -> Table:
    table = Table(title=f"Encoding kernel, in memory, 1 core ({k['n_cells']:,} cells, {k['nnz']:,} nonzeros, "
                  f"max {MAX_GENES} genes)", title_justify="left")
    for col in ("implementation", "repeats", "median s", "M tokens/s", "M nonzeros/s", "x baseline"):
        table.add_column(col, justify="left" if col == "implementation" else "right")
    rows = (("genecorpus.encode.rank_value_encode", "genecorpus"), ("SciPy/NumPy per-cell argsort", "baseline"))
    for name, key in rows:
        r = k.get(key)
        if r is None:
            table.add_row(name, "", k.get("error", "failed"), "", "", "")
            continue
        speed = f"{k['speedup_vs_baseline']:.1f}x" if key == "genecorpus" and "speedup_vs_baseline" in k else "1.0x"
        table.add_row(name, str(r["repeats"]), f"{r['median_seconds']:.4f}", f"{r['tokens_per_second'] / 1e6:.2f}",
                      f"{r['nonzeros_per_second'] / 1e6:.2f}", speed)
    return table


def _targets_table(targets: list[dict[str, Any]]) -> Table:
    table = Table(title="Targets (from the issue)", title_justify="left")
    for col in ("target", "goal", "measured", "where", "met"):
        table.add_column(col)
    for t in targets:
        met = "n/a" if t["met"] is None else ("[green]yes[/]" if t["met"] else "[red]no[/]")
        if t["proxy"] and t["met"] is not None:
            met += " (proxy: not 1M)"
        table.add_row(t["name"], t["goal"], t["measured"], t["where"], met)
    return table


def print_tables(results: dict[str, Any]) -> None:
    """Print the floor, tokenize, build, kernel and target tables."""
    console = Console(width=max(120, shutil.get_terminal_size((160, 40)).columns))
    tables = [_floor_table(results), _tool_table(results, "tokenize"), _tool_table(results, "build")]
    for table in tables:
        if table.row_count:
            console.print(table)
    k = results.get("kernel") or {}
    if k:
        console.print(_kernel_table(k))
        if "cells_identical_to_baseline" in k:
            console.print(f"  cells with identical tokens in both: {k['cells_identical_to_baseline']:.2%} "
                          "(any difference: near-ties, which the baseline orders with an unstable sort)")
    if results.get("targets"):
        console.print(_targets_table(results["targets"]))
    startup = results.get("startup", {}).get("import_seconds")
    if startup:
        console.print(f"  every command includes ~{startup:.1f} s of interpreter start-up and imports")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None, help=f"comma-separated cell counts (default {DEFAULT_SIZES})")
    parser.add_argument("--quick", action="store_true", help=f"development run: --sizes {QUICK_SIZES}")
    parser.add_argument("--formats", default=",".join(synthetic.FORMATS), help="files to measure: h5ad,h5ad_gzip,loom")
    parser.add_argument("--workers", default="1,2", help="worker counts for tokenize and build (default 1,2)")
    parser.add_argument("--skip", default="", help="skip some of: startup,kernel,floor,tokenize,build")
    parser.add_argument("--repeats", type=int, default=5, help="kernel repeats (at least; default 5)")
    parser.add_argument("--quiet-wait", type=float, default=600.0,
                        help="before each measurement, wait up to this many seconds while other processes use "
                             f"more than {measure.QUIET_OTHER_CORES} cores (0: do not wait; default 600)")
    parser.add_argument("--runs", type=int, default=1,
                        help="runs of each tokenize/build command; the fastest is reported (default 1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per command (default max(900, 0.018 x cells))")
    parser.add_argument("--cache-dir", default=os.environ.get("GENECORPUS_BENCH_DIR", str(BENCH_DIR / ".cache")),
                        help="where synthetic inputs and outputs go ($GENECORPUS_BENCH_DIR)")
    parser.add_argument("--dict-dir", default=os.environ.get("GENECORPUS_GENEFORMER_DICTS",
                                                             str(REPO.parent / "shared" / "geneformer-dicts")),
                        help="Geneformer's dictionaries ($GENECORPUS_GENEFORMER_DICTS)")
    parser.add_argument("--output", default=None, help="results JSON (default benchmarks/results.json, "
                        "results-quick.json with --quick)")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = QUICK_SIZES if args.quick else DEFAULT_SIZES
    if args.output is None:
        args.output = str(BENCH_DIR / ("results-quick.json" if args.quick else "results.json"))
    # end our subprocess groups on SIGTERM too (run_monitored cleans up on any exception)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    Benchmark(args).run()


if __name__ == "__main__":
    main()
