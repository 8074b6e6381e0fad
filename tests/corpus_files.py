"""What tests compare two corpora by: the sha256 of their files."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

SHARD_FILES = (".arrow", ".pkl", ".tsv")
"""Shards, dictionaries, medians and lengths: the files a corpus's cells decide."""


def corpus_file_digests(folder: Path, *, suffixes: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                        recursive: bool = True, strip_timings: bool = True) -> dict[str, str]:
    """sha256 of the files of a corpus by their path in the folder.

    Parameters
    ----------
    folder
        The corpus folder.
    suffixes
        Only files with these suffixes (default: every file).
    skip
        File names left out (e.g. ``manifest.json``, whose inputs' paths differ between two builds).
    recursive
        Files of subfolders too (``report/``); else the top level only.
    strip_timings
        Digest the manifest without its timings (wall clock), so that two builds of the same inputs and
        settings compare equal; False digests it as it is.
    """
    out = {}
    for p in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if not p.is_file() or p.name in skip or (suffixes is not None and p.suffix not in suffixes):
            continue
        data = p.read_bytes()
        if p.name == "manifest.json" and strip_timings:
            manifest = json.loads(data)
            manifest.pop("timings")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out
