from __future__ import annotations

from genecorpus.cli import main

main()
