"""`make demo`: fetch two real PBMC datasets, build a corpus, and show what is in it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from genecorpus.public_data import link_public_files

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "demo-out" / "pbmc-corpus"


def main() -> None:
    link_public_files(("kang_pbmc_control", "celltypist_sample"), HERE / "data")
    cmd = [sys.executable, "-m", "genecorpus", "build", str(HERE / "pbmc_demo.toml"),
           "--out", str(OUT), "--workers", "2", "--overwrite"]
    print("$ genecorpus", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)

    import datasets

    ds = datasets.load_from_disk(str(OUT))
    print(f"\ndatasets.load_from_disk({str(OUT)!r}) ->\n{ds}")
    print(f"\nThe corpus is in {OUT}")


if __name__ == "__main__":
    main()
