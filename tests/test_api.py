"""The Python API: in-memory AnnData, the public surface, and reading the published corpus format."""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import TYPE_CHECKING

import anndata as ad
import datasets
import numpy as np
import pytest
import scipy.sparse as sp

import genecorpus
from genecorpus.errors import CountsError

if TYPE_CHECKING:
    from pathlib import Path

GENES = sorted(["ENSG00000141510", "ENSG00000012048", "ENSG00000139618", "ENSG00000157764",
                "ENSG00000146648", "ENSG00000133703", "ENSG00000121879", "ENSG00000171862"])


@pytest.fixture
def dictionaries(tmp_path: Path) -> tuple[Path, Path]:
    tokens = {"<pad>": 0, "<mask>": 1, **{g: i + 2 for i, g in enumerate(GENES)}}
    (tmp_path / "t.pkl").write_bytes(pickle.dumps(tokens))
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({g: 1.0 + i / 4 for i, g in enumerate(GENES)}))
    return tmp_path / "t.pkl", tmp_path / "m.pkl"


def _adata(seed: int, n: int = 30) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    a = ad.AnnData(sp.csr_matrix(rng.integers(0, 4, (n, len(GENES))).astype(np.float32)))
    a.var_names = GENES
    a.obs_names = [f"s{seed}-c{i}" for i in range(n)]
    a.obs["cell_type"] = rng.choice(["T", "B", "NK"], n)
    return a


def test_tokenize_in_memory_anndata_equals_file(dictionaries: tuple[Path, Path], tmp_path: Path) -> None:
    t, m = dictionaries
    a = _adata(1)
    from_memory = genecorpus.tokenize([a], tmp_path / "mem", token_dictionary=t, gene_medians=m,
                                      obs_columns=["cell_type"])
    a.write_h5ad(tmp_path / "a.h5ad")
    from_file = genecorpus.tokenize([tmp_path / "a.h5ad"], tmp_path / "file", token_dictionary=t,
                                    gene_medians=m, obs_columns=["cell_type"], workers=2)
    x, y = datasets.load_from_disk(str(from_memory.path)), datasets.load_from_disk(str(from_file.path))
    assert x["input_ids"] == y["input_ids"]
    assert x["cell_id"] == y["cell_id"]
    nonempty = [c for c, n in zip(a.obs_names, np.asarray(a.X.sum(axis=1)).ravel(), strict=False) if n > 0]
    assert x["cell_id"] == nonempty
    assert x["cell_type"] == y["cell_type"] == [a.obs.loc[c, "cell_type"] for c in x["cell_id"]]


def test_in_memory_bad_counts_named(dictionaries: tuple[Path, Path], tmp_path: Path) -> None:
    t, m = dictionaries
    a = _adata(2)
    a.X = a.X.toarray()
    a.X[4, 3] = 1.5
    with pytest.raises(CountsError, match=r"s2-c4.*ENSG|ENSG.*s2-c4"):
        genecorpus.tokenize([a], tmp_path / "bad", token_dictionary=t, gene_medians=m)
    assert not (tmp_path / "bad").exists()


def test_import_is_light() -> None:
    code = "import sys, genecorpus; print('numba' in sys.modules, 'pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_inspect_reads_published_genecorpus_sample(genecorpus_sample: Path, geneformer_dicts: Path) -> None:
    from genecorpus.describe import describe_corpus

    text = describe_corpus(genecorpus_sample, token_dictionary=geneformer_dicts / "token_dictionary_gc30M.pkl")
    assert "cells: 500" in text
    assert "top genes:" in text and "?" not in text.split("top genes:")[1].split()[0]


def test_a_script_without_the_main_guard_is_refused_before_anything_runs(tmp_path: Path) -> None:
    """Spawned workers import the main script again: an unguarded script asking for two workers stops at once
    with the fix in one line and leaves nothing; the same calls under the guard build the corpus."""
    from genecorpus import genes
    from genecorpus.testing import random_counts, write_h5ad

    ids = genes.candidate_genes()[::40][:300].astype(object)
    data = write_h5ad(tmp_path / "a.h5ad", random_counts(200, len(ids), density=0.2, seed=1), gene_ids=ids,
                      cell_ids=np.array([f"c{i}" for i in range(200)], dtype=object))
    calls = ("import genecorpus\n"
             f"config = genecorpus.BuildConfig(datasets=[genecorpus.DatasetSpec(path={str(data)!r}, gene_id='ensembl')])\n"
             f"genecorpus.build_corpus(config, {str(tmp_path / 'out')!r}, workers=2, report=False)\n")
    unguarded = tmp_path / "unguarded.py"
    unguarded.write_text(calls)
    done = subprocess.run([sys.executable, str(unguarded)], capture_output=True, text=True, check=False, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(
        f'{unguarded}: genecorpus starts worker processes, which import this script again and would start the build '
        'again; put the calls under `if __name__ == "__main__":` (see the README), or use workers=1')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "unguarded.py"]  # nothing written
    guarded = tmp_path / "guarded.py"
    guarded.write_text('if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in calls.splitlines()))
    done = subprocess.run([sys.executable, str(guarded)], capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()
