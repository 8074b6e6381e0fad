"""The command line on bad input: one clear line, non-zero exit, nothing left behind.

Cases marked ``SUBPROCESS`` run the real ``python -m genecorpus`` in a new process, so that its stderr
holds everything the process prints (warnings, HDF5's own diagnostics), for each command at least once.
The others check the same message through typer's CliRunner in this process, which saves an interpreter
start-up per case; test_bad_input.py has many more cases that way.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from genecorpus.cli import app

GENES = ["ENSG00000141510", "ENSG00000012048", "ENSG00000139618", "ENSG00000157764", "ENSG00000146648",
         "ENSG00000133703", "ENSG00000121879", "ENSG00000171862", "ENSG00000198804"]


SUBPROCESS = "subprocess"
IN_PROCESS = "in-process"


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run(*args: str, cwd: Path, how: str = SUBPROCESS) -> Outcome:
    """``genecorpus *args`` run from ``cwd``: in a new process (the real entry point), or in this one."""
    if how == IN_PROCESS:
        with contextlib.chdir(cwd):
            result = CliRunner().invoke(app, list(args))
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        return Outcome(result.exit_code, result.stdout, result.stderr)
    env = {**os.environ, "GENECORPUS_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "genecorpus", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)
    return Outcome(done.returncode, done.stdout, done.stderr)


def write_h5ad(path: Path, x: np.ndarray) -> Path:
    a = ad.AnnData(sp.csr_matrix(x.astype(np.float32)))
    a.var_names = GENES[: x.shape[1]]
    a.obs_names = [f"c{i}" for i in range(x.shape[0])]
    a.write_h5ad(path)
    return path


def good_counts() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 5, size=(40, len(GENES))).astype(np.float64)


def manifest(tmp: Path, data: Path, extra: str = "") -> Path:
    p = tmp / "m.toml"
    p.write_text(f'{extra}\n[[datasets]]\npath = "{data}"\n')
    return p


def assert_clean_failure(result: Outcome, out: Path, *needles: str) -> None:
    assert result.returncode != 0
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(("value", "word", "how"), [(0.5, "c3", IN_PROCESS), (-2.0, "c3", IN_PROCESS),
                                                    (np.nan, "c3", SUBPROCESS)])  # a NaN warning would reach stderr
def test_build_refuses_values_that_are_not_counts(tmp_path: Path, value: float, word: str, how: str) -> None:
    x = good_counts()
    x[3, 2] = value
    data = write_h5ad(tmp_path / "bad.h5ad", x)
    out = tmp_path / "corpus"
    result = run("build", str(manifest(tmp_path, data)), "--out", str(out), cwd=tmp_path, how=how)
    assert_clean_failure(result, out, "bad.h5ad", word, GENES[2])


def test_truncated_h5ad(tmp_path: Path) -> None:
    """In a real process: HDF5's C library prints its own error stack to stderr unless silenced."""
    data = write_h5ad(tmp_path / "cut.h5ad", good_counts())
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    out = tmp_path / "corpus"
    assert_clean_failure(run("build", str(manifest(tmp_path, data)), "--out", str(out), cwd=tmp_path),
                         out, "cut.h5ad")


def test_missing_file(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    result = run("build", str(manifest(tmp_path, tmp_path / "nowhere.h5ad")), "--out", str(out), cwd=tmp_path,
                 how=IN_PROCESS)
    assert_clean_failure(result, out, "nowhere.h5ad")


@pytest.mark.parametrize(("text", "needle"), [
    ("layout = 'gc31m'", "layout"),
    ("colour = 'red'", "colour"),
    ("this is not toml", "TOML"),
])
def test_manifest_errors(tmp_path: Path, text: str, needle: str) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad", good_counts())
    out = tmp_path / "corpus"
    assert_clean_failure(run("build", str(manifest(tmp_path, data, text)), "--out", str(out), cwd=tmp_path,
                             how=IN_PROCESS), out, "m.toml", needle)


def test_no_dataset_feeds_the_medians(tmp_path: Path) -> None:
    """Every dataset with use_for_medians = false: named as the cause before anything is read."""
    data = write_h5ad(tmp_path / "ok.h5ad", good_counts())
    m = tmp_path / "m.toml"
    m.write_text(f'[[datasets]]\npath = "{data}"\nuse_for_medians = false\n')
    out = tmp_path / "corpus"
    assert_clean_failure(run("build", str(m), "--out", str(out), cwd=tmp_path, how=IN_PROCESS), out, "m.toml",
                         "use_for_medians = false", "vocabulary would be empty")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


@pytest.mark.parametrize(("payload", "how"), [([1, 2, 3], IN_PROCESS), (Evil(), SUBPROCESS),
                                             ({"<pad>": 0, "<mask>": [1]}, IN_PROCESS)])
def test_dictionary_that_is_not_a_plain_dict(tmp_path: Path, payload: object, how: str) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad", good_counts())
    bad = tmp_path / "token_dictionary.pkl"
    bad.write_bytes(pickle.dumps(payload))
    medians = tmp_path / "medians.pkl"
    medians.write_bytes(pickle.dumps(dict.fromkeys(GENES, 1.0)))
    out = tmp_path / "corpus"
    result = run("tokenize", str(data), "--out", str(out), "--token-dictionary", str(bad),
                 "--gene-medians", str(medians), cwd=tmp_path, how=how)
    assert_clean_failure(result, out, "token_dictionary.pkl")
    assert not (tmp_path / "pwned.txt").exists()


def test_tokenize_with_own_dictionaries_and_inspect(tmp_path: Path) -> None:
    data = write_h5ad(tmp_path / "ok.h5ad", good_counts())
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(sorted(GENES))}}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(dict.fromkeys(GENES, 2.0)))
    out = tmp_path / "corpus"
    result = run("tokenize", str(data), "--out", str(out), "--token-dictionary", "t.pkl",
                 "--gene-medians", "m.pkl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run("inspect", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ("cells:" in result.stdout and "TP53" in result.stdout) or "top genes" in result.stdout
    again = run("tokenize", str(data), "--out", str(out), "--token-dictionary", "t.pkl",
                "--gene-medians", "m.pkl", cwd=tmp_path, how=IN_PROCESS)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_tokenize_reads_the_counts_layer_it_is_told(tmp_path: Path) -> None:
    """Normalized X with the counts in a layer auto does not know: the error names the tokenize options, and
    ``--layer`` reads the layer (the tokens equal those of the counts written as X)."""
    counts = good_counts()
    a = ad.AnnData(sp.csr_matrix(np.log1p(counts).astype(np.float32)))
    a.var_names, a.obs_names = GENES[: counts.shape[1]], [f"c{i}" for i in range(counts.shape[0])]
    a.layers["umi"] = sp.csr_matrix(counts.astype(np.float32))
    a.write_h5ad(tmp_path / "normalized.h5ad")
    write_h5ad(tmp_path / "plain.h5ad", counts)
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(sorted(GENES))}}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps(dict.fromkeys(GENES, 2.0)))
    dicts = ["--token-dictionary", "t.pkl", "--gene-medians", "m.pkl", "--no-report"]
    refused = run("tokenize", "normalized.h5ad", "--out", "a", *dicts, cwd=tmp_path, how=IN_PROCESS)
    assert_clean_failure(refused, tmp_path / "a", "normalized.h5ad", "--layer")
    for name, extra in (("layer", ["--layer", "umi"]), ("plain", [])):
        source = "plain.h5ad" if name == "plain" else "normalized.h5ad"
        done = run("tokenize", source, "--out", name, *dicts, *extra, cwd=tmp_path, how=IN_PROCESS)
        assert done.returncode == 0, done.stderr
    import datasets

    tokens_of = [datasets.load_from_disk(str(tmp_path / name))["input_ids"] for name in ("layer", "plain")]
    assert tokens_of[0] == tokens_of[1] and len(tokens_of[0]) == counts.shape[0]


def test_version_help_and_worker_count() -> None:
    """``--version`` prints the package version; ``build --help`` shows the ``[cluster]`` section by name and
    an example manifest that exists; a worker count below 1 is refused before anything runs."""
    import genecorpus

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"genecorpus {genecorpus.__version__}"
    shown = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "200"}, terminal_width=200)
    assert "[cluster] section" in shown.output
    assert "examples/pbmc_demo.toml" in shown.output
    assert (Path(__file__).resolve().parents[1] / "examples" / "pbmc_demo.toml").is_file()
    for command in (["build", "m.toml", "--out", "x"], ["tokenize", "a.h5ad", "--out", "x", "--token-dictionary",
                                                        "t.pkl", "--gene-medians", "m.pkl"]):
        refused = runner.invoke(app, [*command, "--workers", "0"])
        assert refused.exit_code == 2 and "--workers" in refused.output
