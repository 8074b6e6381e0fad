"""What tests compare two corpora by: the sha256 of every file."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


def corpus_file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file of a corpus by its path in the folder; the manifest without its timings (wall
    clock), so that two builds of the same inputs and settings compare equal."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if p.name == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("timings")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out
