"""open_dataset's dispatch: names, suffixes, content sniffing, options and their errors."""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import h5py
import pytest

import genecorpus.io as gio
from genecorpus.errors import InputError
from genecorpus.io import iter_block_ranges, known_formats, open_dataset, register_reader, registry

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Dataset

FORMATS = ["h5ad", "anndata", "loom", "10x-h5", "10x-mtx", "csv", "tsv", "txt", "zarr", "soma"]


def test_known_formats() -> None:
    assert known_formats() == FORMATS


def test_small_public_surface() -> None:
    assert set(gio.__all__) == {
        "CellBlock",
        "CellSource",
        "DEFAULT_BLOCK_SIZE",
        "iter_block_ranges",
        "known_formats",
        "open_dataset",
        "register_reader",
    }


def test_iter_block_ranges() -> None:
    assert iter_block_ranges(7, 7) == [(0, 7)]
    assert iter_block_ranges(7, 1000) == [(0, 7)]
    assert iter_block_ranges(7, 3) == [(0, 3), (3, 6), (6, 7)]
    assert iter_block_ranges(0, 3) == []
    ranges = iter_block_ranges(10_001, 10_000)
    assert ranges == [(0, 10_000), (10_000, 10_001)]
    with pytest.raises(ValueError, match="at least 1"):
        iter_block_ranges(5, 0)


def test_unknown_suffix_lists_known_formats(tmp_path: Path) -> None:
    path = tmp_path / "counts.xyz"
    path.write_text("gene,cell\nA,1\n")
    with pytest.raises(InputError) as info:
        open_dataset(path)
    message = str(info.value)
    assert str(path) in message
    assert "'.xyz'" in message
    for name in FORMATS:
        assert name in message


def test_unknown_format_name_lists_known_formats(dataset: Dataset) -> None:
    with pytest.raises(InputError, match=r"unknown input format 'parquet'.*h5ad, anndata, loom"):
        open_dataset(dataset.paths["h5ad-csr"], format="parquet")


def test_format_must_fit_the_kind_of_source(dataset: Dataset) -> None:
    with pytest.raises(InputError, match="format 'anndata' reads an in-memory object"):
        open_dataset(dataset.paths["h5ad-csr"], format="anndata")
    with pytest.raises(
        InputError, match="format 'h5ad' reads a file or folder path, not a AnnData"
    ):
        open_dataset(dataset.source("anndata"), format="h5ad")
    with open_dataset(dataset.source("anndata"), format="anndata") as source:
        assert source.format == "anndata"


def test_unknown_object_type() -> None:
    with pytest.raises(InputError, match="cannot read an object of type dict"):
        open_dataset({"X": 1})


@pytest.mark.parametrize(
    ("case_name", "new_name", "expected"),
    [
        ("h5ad-csr", "really_h5ad.h5", "h5ad"),  # shared suffix: content decides
        ("h5ad-csr", "no_suffix", "h5ad"),
        ("loom", "no_suffix", "loom"),
        ("10x-h5-v3", "matrix.hdf5", "10x-h5"),
        ("10x-h5-v2", "no_suffix", "10x-h5"),
    ],
)
def test_content_sniffing(
    dataset: Dataset, tmp_path: Path, case_name: str, new_name: str, expected: str
) -> None:
    path = tmp_path / new_name
    shutil.copy(dataset.paths[case_name], path)
    with open_dataset(path) as source:
        assert source.format == expected
        assert source.n_cells == dataset.n_cells


def test_folder_is_sniffed_as_10x(dataset: Dataset, tmp_path: Path) -> None:
    folder = tmp_path / "filtered_feature_bc_matrix"
    shutil.copytree(dataset.paths["10x-mtx-v3"], folder)
    with open_dataset(folder) as source:
        assert source.format == "10x-mtx"


def test_explicit_format_wins_over_suffix(dataset: Dataset, tmp_path: Path) -> None:
    path = tmp_path / "table.data"
    shutil.copy(dataset.paths["csv-cells-as-rows"], path)
    with open_dataset(path, format="csv") as source:
        assert source.format == "csv"
        assert list(source.var_names) == dataset.gene_ids


@pytest.mark.parametrize(
    ("case_name", "option"),
    [
        ("csv-cells-as-rows", {"layer": "counts"}),
        ("csv-cells-as-rows", {"use_raw": True}),
        ("h5ad-csr", {"cells_as_rows": True}),
        ("10x-h5-v3", {"layer": "x"}),
        ("loom", {"use_raw": True}),
    ],
)
def test_options_that_do_not_apply_are_refused(
    dataset: Dataset, case_name: str, option: dict[str, object]
) -> None:
    with pytest.raises(InputError, match=f"option {next(iter(option))}= does not apply"):
        open_dataset(dataset.paths[case_name], **option)  # type: ignore[arg-type]


def test_hdf5_that_is_no_known_layout(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("something", data=[1, 2, 3])
    with pytest.raises(InputError, match=r"other\.h5: expected one cellranger 2 genome group"):
        open_dataset(path)


def test_register_reader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, dataset: Dataset) -> None:
    monkeypatch.setattr(registry, "_READERS", dict(registry._READERS))
    opened = []

    @register_reader("custom", suffixes=(".custom",), options=("layer",))
    def _open_custom(path: Path, *, layer: str | None = None) -> object:
        opened.append((path.name, layer))
        return open_dataset(dataset.paths["h5ad-csr"])

    path = tmp_path / "x.CUSTOM"
    path.write_text("")
    with open_dataset(path, layer="L") as source:
        assert source.format == "h5ad"
    assert opened == [("x.CUSTOM", "L")]
    assert "custom" in known_formats()
    with pytest.raises(ValueError, match="already registered"):
        register_reader("custom")(_open_custom)
    with pytest.raises(ValueError, match="unknown option"):
        register_reader("other", options=("genome",))
