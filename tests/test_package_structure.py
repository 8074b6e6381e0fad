"""The package's conventions, made executable: public surfaces, signatures, docstrings, file names, doctests.

The one-way import graph is checked by import-linter (``lint-imports``, contracts in pyproject.toml) and
the code style by ruff, both run by ``make test`` before pytest.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import genecorpus

SRC = Path(genecorpus.__file__).parent
PUBLIC_PACKAGES = ("genecorpus", "genecorpus.io", "genecorpus.corpus", "genecorpus.model")


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_every_exported_name_resolves_and_is_documented(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"{package}.{name} has no docstring"


def test_the_lazy_table_is_the_public_surface() -> None:
    lazy = set(genecorpus._LAZY)
    eager = {"GenecorpusError", "__version__"}
    assert lazy | eager == set(genecorpus.__all__)
    for name, module in genecorpus._LAZY.items():
        assert getattr(importlib.import_module(f"genecorpus.{module}"), name) is getattr(genecorpus, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = genecorpus.nope  # type: ignore[attr-defined]


@pytest.mark.parametrize("package", PUBLIC_PACKAGES)
def test_public_functions_take_at_most_two_positionals_and_annotate_returns(package: str) -> None:
    module = importlib.import_module(package)
    for name in module.__all__:
        obj = getattr(module, name)
        if not inspect.isfunction(obj):
            continue
        sig = inspect.signature(obj)
        positional = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert len(positional) <= 2, f"{package}.{name}: {len(positional)} positional parameters"
        assert not any(p.annotation in ("bool", bool) for p in positional), f"{package}.{name}: boolean positional"
        assert sig.return_annotation is not inspect.Signature.empty, f"{package}.{name}: no return annotation"


def test_the_model_commands_are_exported() -> None:
    for name in ("pretrain", "embed_corpus", "evaluate_embeddings", "perturb"):
        assert name in genecorpus.__all__
        assert getattr(genecorpus, name).__module__.startswith("genecorpus.model.")


CORPUS_FILE_NAMES = {"manifest.json", "lengths.pkl", "token_dictionary.pkl", "gene_medians.tsv", "gene_medians.pkl",
                     "state.json", "dataset_info.json", "qc_sample.npz"}


def test_only_the_corpus_folder_module_spells_the_corpus_file_names() -> None:
    owner = SRC / "corpus" / "folder.py"
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in CORPUS_FILE_NAMES:
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_no_module_shadows_the_standard_library() -> None:
    import sys

    names = {m.name.rsplit(".", 1)[-1] for m in pkgutil.walk_packages([str(SRC)], "genecorpus.")}
    # the readers' package is genecorpus.io, as anndata's is anndata.io: always reached by that full name
    assert not (names & set(sys.stdlib_module_names)) - {"io"}, names & set(sys.stdlib_module_names)


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], "genecorpus.") if m.name != "genecorpus.__main__")


@pytest.mark.parametrize("name", _modules())
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) of {name} failed"
