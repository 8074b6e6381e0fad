"""File fingerprints recorded in a corpus's ``manifest.json``: the inputs and the corpus's own files.

``build``/``tokenize`` record the sha256 of every input (``datasets[].sha256``) and of the dictionary and
lengths files they write beside the shards (``files``); ``validate`` recomputes them to tell whether an
input can still be used to recompute cells and whether a dictionary was changed after the build.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

__all__ = ["RECORDED_FILES", "file_digests", "sha256_of_path"]

RECORDED_FILES = ("token_dictionary.pkl", "gene_medians.tsv", "gene_medians.pkl", "lengths.pkl")
"""Files beside the shards whose sha256 the manifest records under ``files``."""


def sha256_of_path(path: str | os.PathLike[str], *, stop: threading.Event | None = None) -> tuple[str, int]:
    """The sha256 (hex) and size in bytes of a file, or of a folder (such as a 10x matrix folder).

    A folder's digest is the sha256 of the lines ``relative/path<NUL>file digest``, one per file in
    sorted order, so that it does not depend on the order in which the file system lists them; its size
    is the sum of its files' sizes. Setting ``stop`` (from another thread) abandons the digest early.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = pathlib.Path(tmp, "a.txt")
    ...     _ = p.write_text("abc")
    ...     sha256_of_path(p)[0][:16], sha256_of_path(p)[1]
    ('ba7816bf8f01cfea', 3)
    """
    path = Path(path)
    if path.is_dir():
        h = hashlib.sha256()
        size = 0
        for p in sorted(q for q in path.rglob("*") if q.is_file()):
            digest, n = sha256_of_path(p, stop=stop)
            h.update(f"{p.relative_to(path)}\0{digest}\n".encode())
            size += n
        return h.hexdigest(), size
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as fh:
        while (n := fh.readinto(buf)) and not (stop is not None and stop.is_set()):
            h.update(view[:n])  # releases the GIL: other threads run meanwhile
    return h.hexdigest(), path.stat().st_size


def file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of each of :data:`RECORDED_FILES` present in ``folder`` (a corpus being written)."""
    return {name: sha256_of_path(folder / name)[0] for name in RECORDED_FILES if (folder / name).is_file()}
